"""YAML files as a user writing them means them: YAML 1.2's numbers and booleans, a repeated key
refused, and every problem reported in one line naming the file (presets, grids, overrides).

OmegaConf's own loader (``omegaconf._utils.get_yaml_loader``) reads ``1e-4`` as a number but is
YAML 1.1 otherwise (``010`` is 8, ``yes`` and ``on`` are true), so the trainer keeps this one.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml


def named_yaml(name_or_path: str, folder: Path, option: str, kind: str) -> Path:
    """A YAML path, or the name of a YAML file in ``folder``; errors name ``option`` and the choices.

    Raises:
        FileNotFoundError: no such file, nor a ``kind`` of that name in ``folder``.
    """
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        try:
            p.stat()
        except FileNotFoundError:
            raise FileNotFoundError(f"{option} {name_or_path!r}: no such file") from None
        except OSError:  # there, but not for us (permissions): reading it says why, naming it
            pass
        return p
    p = folder / f"{name_or_path}.yaml"
    if not p.is_file():
        names = sorted(q.stem for q in folder.glob("*.yaml"))
        raise FileNotFoundError(f"{option} {name_or_path!r}: not a YAML file nor a {kind} ({', '.join(names)})")
    return p


class YAMLLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's core schema for plain scalars, and duplicate keys refused.

    PyYAML implements YAML 1.1, where ``1e-4`` (no dot) is text, ``010`` is 8 and ``yes``/``on`` are
    booleans; YAML 1.2 and Python read ``1e-4`` and ``1e-05`` as numbers, ``010`` as 10 and only
    ``true``/``false`` as booleans, which is what a user writing a preset, an override or a grid means.
    A mapping that repeats a key is refused (PyYAML would keep the last value silently).
    """

    yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag not in (
            "tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        text = self.construct_scalar(node)
        sign, digits = (-1, text[1:]) if text[0] == "-" else (1, text.lstrip("+"))
        base = {"0o": 8, "0x": 16}.get(digits[:2], 10)
        return sign * int(digits[2:] if base != 10 else digits, base)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (each key may appear once)", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


# the core schema of YAML 1.2 (https://yaml.org/spec/1.2.2/#1032-tag-resolution)
YAMLLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                 list("tTfF"))
YAMLLoader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"),
                                 list("-+0123456789"))
YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))
YAMLLoader.add_constructor("tag:yaml.org,2002:int", YAMLLoader.construct_yaml_int)


def load_yaml(text: str, where: str = "YAML") -> Any:
    """Parse YAML text as :class:`YAMLLoader` does (YAML 1.2 numbers, duplicate keys refused).

    Raises:
        ValueError: a syntax error or a duplicate key: one line naming ``where``, the line and column.
    """
    try:
        return yaml.load(text, Loader=YAMLLoader)
    except yaml.YAMLError as e:
        raise ValueError(f"{where}: invalid YAML: {' '.join(str(e).split())}") from None


def read_text(path: Path, option: str) -> str:
    """The text of a file the user named with ``option``.

    Raises:
        ValueError: it cannot be read (permissions, a folder, not UTF-8), naming it and why.
    """
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"{option} {str(path)!r}: cannot be read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{option} {str(path)!r}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
