"""One tree of dataclasses holding every hyper-parameter of a run (nanoGPT's ``GPTConfig`` shape).

A run's configuration is the dataclass defaults (which are the ``digits`` preset), then a YAML
preset, then dotted ``key=value`` overrides from the command line, e.g.
``optim.lr=0.05 predictor.name=linear predictor.freq=5``. An unknown key is an error naming it.

``loss.name`` (byol | isoloss) and ``loss.form`` (cosine | euclidean) choose the prediction loss
of :mod:`fastpred.losses`; :func:`check_loss` refuses IsoLoss where it is undefined.

The ``predictor.*`` keys are ``name`` (directpred | linear | mlp | none), ``mlp_hidden``,
``symmetric`` and every keyword argument of :class:`fastpred.DirectPredictor` (``rho``, ``eps``,
``freq``, ...), with that class's defaults.

Every numeric key has an accepted range (``RANGES``), checked by :func:`validate` when the
configuration is built, before anything runs.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A user mistake in the configuration or the data location, reported without a traceback."""


class SettingsDiffer(ConfigError):
    """The processes of one distributed run were given different settings. Every rank raises it
    with the same message; ``rank`` says which one this is (rank 0 alone reports it)."""

    def __init__(self, msg: str, rank: int) -> None:
        super().__init__(msg)
        self.rank = rank


PRESET_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_PRESET = "digits"


@dataclass
class DataConfig:
    name: str = "digits"  # digits | fashion_mnist | cifar10 | stl10 | imagefolder
    root: str = ""  # dataset folder (unused by digits, which ships with scikit-learn)
    train_subset: int = 0  # fashion_mnist: >0 keeps a fixed class-balanced subset of the train split
    image_size: int = 8  # side of the training crops and of the evaluation centre crop
    workers: int = 0  # DataLoader worker processes per rank
    download: bool = False  # cifar10 / stl10: torchvision downloads what data.root lacks (needs a network)
    eval_root: str = ""  # imagefolder: a labelled ImageFolder (train/, val/) for kNN, probe and linear_eval


@dataclass
class AugConfig:
    """Two-view augmentation; a pair of numbers is (view 1, view 2), as in BYOL's asymmetric recipe."""

    crop_scale: tuple[float, float] = (0.6, 1.0)  # RandomResizedCrop area range
    flip: float = 0.0  # horizontal flip probability
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.0, 0.0)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    gray_p: float = 0.0
    blur_p: tuple[float, float] = (0.0, 0.0)
    blur_kernel: float = 0.1  # Gaussian kernel side as a fraction of image_size (sigma 0.1-2)
    solarize_p: tuple[float, float] = (0.0, 0.0)
    normalize: bool = True  # subtract the dataset mean, divide by its std
    # in-memory data (digits, fashion_mnist, cifar10, stl10): both views of a whole batch made on the
    # training device (train.batch_augment); false, and always for imagefolder: per sample in the loader
    batched: bool = True


@dataclass
class ModelConfig:
    arch: str = "resnet_small"  # resnet_small | resnet_mini | resnet18 | resnet50
    width: int = 1  # resnet_small / resnet_mini: every stage's width times this (resnet18 / resnet50: 1)
    cifar_stem: bool = False  # 3x3 stride-1 first conv and no max-pool (small images)
    proj_hidden: int = 256  # projector MLP: Linear-BN-ReLU-Linear
    proj_dim: int = 64
    ema: bool = True  # False: the target is the online network itself (SimSiam-style)
    ema_tau: float = 0.99  # target EMA coefficient (the base value when ema_schedule is cosine)
    ema_schedule: str = "constant"  # constant | cosine (BYOL: tau rises to 1 on a cosine)
    stop_grad: bool = True  # False needs ema=False (an EMA target is never trained)
    symmetric_loss: bool = True  # both views predict each other; False: view 1 predicts view 2
    sync_bn: bool = False  # SyncBatchNorm under multi-GPU DDP
    channels_last: bool = False


@dataclass
class PredictorConfig:
    """``predictor.name`` and its options; below the first three, the keywords of
    :class:`fastpred.DirectPredictor` with its defaults (see its docstring for their meaning)."""

    name: str = "directpred"  # directpred | linear | mlp | none
    mlp_hidden: int = 512  # hidden width of BYOL's 2-layer predictor (mlp)
    symmetric: bool = False  # linear: use (W + W^T) / 2
    rho: float = 0.3  # EMA rate of F (Eq. 19)
    eps: float = 0.1  # added to the normalised eigenvalues (Eq. 18)
    freq: int = 1  # W_p set from F every freq steps, SGD on W_p in between
    power: float = 0.5
    eps_mode: str = "relative"
    zero_mean: bool = False
    min_eig: float = 1e-4
    sync: bool = True
    backend: str = "auto"
    partitions: int = 0
    async_rebuild: bool = False
    solver: str = "auto"  # "auto": DirectCopy's closed form where it holds (power 1), else eigh


TRAINER_PREDICTOR_KEYS = ("name", "mlp_hidden", "symmetric")  # the rest go to fastpred.DirectPredictor


def directpred_kwargs(cfg: PredictorConfig) -> dict[str, Any]:
    """The ``predictor.*`` values that are keywords of ``fastpred.DirectPredictor``."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in TRAINER_PREDICTOR_KEYS}


@dataclass
class LossConfig:
    """The prediction loss of each view pair (:mod:`fastpred.losses`)."""

    name: str = "byol"  # byol | isoloss (Halvagal et al. 2023; needs predictor.name=directpred, freq 1)
    form: str = "cosine"  # cosine: 2 - 2 cos(p, t) | euclidean: |p - t|^2


LOSS_NAMES = ("byol", "isoloss")
LOSS_FORMS = ("cosine", "euclidean")  # fastpred.losses.FORMS


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | lars
    lr: float = 0.05  # learning rate at batch size lr_batch
    lr_batch: int = 0  # >0: lr is scaled by global_batch / lr_batch (BYOL: 256); 0: used as is
    momentum: float = 0.9
    weight_decay: float = 4e-4
    exclude_bias_bn: bool = False  # biases and norm weights get no weight decay (and no LARS adaptation)
    lars_eta: float = 0.001  # LARS trust coefficient
    schedule: str = "cosine"  # constant | cosine (after warm-up)
    warmup_epochs: float = 0.0  # linear warm-up from 0


@dataclass
class MonitorConfig:
    knn_every: int = 1  # epochs between kNN evaluations (the last epoch always runs one)
    knn_k: int = 20
    knn_t: float = 0.1  # temperature of the weighted vote (Wu et al. 2018)
    knn_max_train: int = 0  # >0: memory bank is a fixed random subset of this size
    probe: bool = True  # online linear probe on detached backbone features
    probe_lr: float = 0.1
    collapse_erank: float = 2.0  # warn when the features' effective rank drops below this


@dataclass
class EvalConfig:
    """Linear evaluation (train.linear_eval) of the frozen backbone."""

    epochs: int = 100
    batch_size: int = 256
    lr_grid: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0)  # several: chosen on a held-out part of train
    val_fraction: float = 0.2  # held-out fraction of train used only to pick lr from lr_grid
    weight_decay: float = 0.0
    augment: bool = False  # True: random-resized-crop + flip per epoch; False: cached centre-crop features


@dataclass
class CkptConfig:
    every_steps: int = 200  # also written at every epoch end and on SIGTERM / SIGUSR1
    keep: int = 2  # checkpoints kept (last.pt always links the newest)


@dataclass
class Config:
    epochs: int = 40
    seed: int = 0
    batch_size: int = 128  # global: divided among the ranks
    amp: str = "none"  # none | bf16 | fp16 (autocast; fp16 also uses a GradScaler)
    device: str = "auto"  # auto (cuda when available) | cpu | cuda
    log_every: int = 10  # steps between metrics.jsonl lines
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)


# ----------------------------------------------------------------------------- ranges


@dataclass(frozen=True)
class Range:
    """The accepted values of a numeric key: finite numbers from ``lo`` to ``hi``, where an end
    marked open is excluded. A key holding several numbers (``aug.blur_p``) checks each."""

    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, v: float) -> bool:
        above = v > self.lo if self.lo_open else v >= self.lo
        below = v < self.hi if self.hi_open else v <= self.hi
        return math.isfinite(v) and above and below

    def __str__(self) -> str:
        def num(v: float) -> str:
            return str(int(v)) if float(v).is_integer() else f"{v:g}"

        if self.hi == math.inf:
            return f"a finite number {'>' if self.lo_open else '>='} {num(self.lo)}"
        return f"a number in {'(' if self.lo_open else '['}{num(self.lo)}, {num(self.hi)}{')' if self.hi_open else ']'}"


AT_LEAST_1 = Range(1)
NON_NEGATIVE = Range(0)
POSITIVE = Range(0, lo_open=True)
PROBABILITY = Range(0, 1)
BELOW_1 = Range(0, 1, hi_open=True)

RANGES: dict[str, Range] = {
    # seed: NumPy's seeds (torch's generators take them too); batch_size: BatchNorm in training mode
    # needs more than one value per channel
    "epochs": AT_LEAST_1, "seed": Range(0, 2**32 - 1), "batch_size": Range(2), "log_every": AT_LEAST_1,
    "data.image_size": AT_LEAST_1, "data.workers": NON_NEGATIVE, "data.train_subset": NON_NEGATIVE,
    "aug.crop_scale": Range(0, 1, lo_open=True), "aug.flip": PROBABILITY, "aug.jitter": NON_NEGATIVE,
    "aug.jitter_p": PROBABILITY, "aug.gray_p": PROBABILITY, "aug.blur_p": PROBABILITY,
    "aug.blur_kernel": POSITIVE, "aug.solarize_p": PROBABILITY, "model.width": AT_LEAST_1,
    "model.proj_hidden": AT_LEAST_1, "model.proj_dim": AT_LEAST_1, "model.ema_tau": PROBABILITY,
    "predictor.mlp_hidden": AT_LEAST_1, "predictor.rho": BELOW_1, "predictor.eps": NON_NEGATIVE,
    "predictor.freq": AT_LEAST_1, "predictor.power": POSITIVE, "predictor.min_eig": NON_NEGATIVE,
    "predictor.partitions": NON_NEGATIVE,
    "optim.lr": POSITIVE, "optim.lr_batch": NON_NEGATIVE, "optim.momentum": BELOW_1,
    "optim.weight_decay": NON_NEGATIVE, "optim.lars_eta": POSITIVE, "optim.warmup_epochs": NON_NEGATIVE,
    "monitor.knn_every": AT_LEAST_1, "monitor.knn_k": AT_LEAST_1, "monitor.knn_t": POSITIVE,
    "monitor.knn_max_train": NON_NEGATIVE, "monitor.probe_lr": POSITIVE, "monitor.collapse_erank": NON_NEGATIVE,
    "eval.epochs": AT_LEAST_1, "eval.batch_size": Range(2), "eval.lr_grid": POSITIVE,
    "eval.val_fraction": BELOW_1, "eval.weight_decay": NON_NEGATIVE,
    "ckpt.every_steps": NON_NEGATIVE, "ckpt.keep": AT_LEAST_1,
}


def validate(cfg: Config) -> None:
    """Check every key of ``RANGES`` (types were checked when the values were set).

    Raises:
        ValueError: naming the first key out of range, its value and the accepted range.
    """
    values = _flatten(to_dict(cfg))
    for key, accepted in RANGES.items():
        value = values[key]
        if isinstance(value, list) and not value:
            raise ValueError(f"{key}=[] is empty: it needs at least one value, each {accepted}")
        if not all(v in accepted for v in (value if isinstance(value, list) else [value])):
            each = "each value " if isinstance(value, list) else ""
            raise ValueError(f"{key}={value!r} is out of range: {each}must be {accepted}")
    check_loss(cfg)


def check_loss(cfg: Config) -> None:
    """``loss.*`` choices, and IsoLoss only where it is defined.

    IsoLoss (Halvagal, Laborieux & Zenke 2023) is derived for a predictor set in closed form from
    F: a symmetric PSD ``W_p`` with a square root ``W_p^(1/2)``. Its gradient reaches the online
    projection only, never ``W_p``, so a predictor trained by gradient (``linear``, ``mlp``, or
    DirectPred's SGD steps between rebuilds when ``freq > 1``) would not learn, and a trained
    ``W_p`` has no such square root. Its target is stop-gradient by definition.

    Raises:
        ValueError: naming the key, its value and what is accepted.
    """
    loss, pred = cfg.loss, cfg.predictor
    if loss.name not in LOSS_NAMES:
        raise ValueError(f"loss.name={loss.name!r}: expected one of {', '.join(LOSS_NAMES)}")
    if loss.form not in LOSS_FORMS:
        raise ValueError(f"loss.form={loss.form!r}: expected one of {', '.join(LOSS_FORMS)}")
    if loss.name != "isoloss":
        return
    why = ("IsoLoss needs W_p set from F (symmetric PSD, with a square root W_p^(1/2)) and sends no gradient "
           "to W_p")
    if pred.name != "directpred":
        raise ValueError(f"loss.name=isoloss needs predictor.name=directpred, got {pred.name!r}: {why}, so "
                         "linear and mlp (trained by gradient) would never learn, and with none (W_p = I) it is "
                         "the loss without a predictor, which collapses (use loss.name=byol)")
    if pred.freq != 1:
        raise ValueError(f"loss.name=isoloss needs predictor.freq=1, got {pred.freq}: {why}, so the SGD steps "
                         "on W_p between rebuilds would not happen")
    if not cfg.model.stop_grad:
        raise ValueError("loss.name=isoloss needs model.stop_grad=true: the stop-gradient on the target is part "
                         "of IsoLoss's definition")


# ----------------------------------------------------------------------------- loading


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Check ``value`` against the declared type ``typ`` (ints are accepted for floats)."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(typ):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(key, value, arg)
            except (TypeError, ValueError):
                pass
        raise TypeError(f"config key {key!r}: {value!r} is not a {typ}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"config key {key!r}: expected a list, got {value!r}")
        args = typing.get_args(typ)
        if origin is list or (len(args) == 2 and args[1] is Ellipsis):
            elems = [args[0] if args else Any] * len(value)
        else:
            if len(args) != len(value):
                raise ValueError(f"config key {key!r}: expected {len(args)} values, got {list(value)!r}")
            elems = list(args)
        return tuple(_coerce(key, v, t) for v, t in zip(value, elems))
    if typ is Any:
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"config key {key!r}: expected a number, got {value!r}")
        return float(value)
    if typ is bool and not isinstance(value, bool):
        raise TypeError(f"config key {key!r}: expected true or false, got {value!r}")
    if isinstance(typ, type) and (not isinstance(value, typ) or (typ is int and isinstance(value, bool))):
        raise TypeError(f"config key {key!r}: expected {typ.__name__}, got {value!r}")
    return value


def set_key(cfg: Any, dotted: str, value: Any) -> None:
    """Set ``cfg.a.b = value`` for ``dotted == "a.b"``, naming the key on any error."""
    *path, last = dotted.split(".")
    node, where = cfg, ""
    for part in path:
        sub = getattr(node, part, None) if part in _field_names(node) else None
        if sub is None or not dataclasses.is_dataclass(sub):
            raise ValueError(f"unknown config key {dotted!r}: {where + part!r} is not a section "
                           f"(sections: {', '.join(_sections(node))})")
        node, where = sub, where + part + "."
    names = _field_names(node)
    if last not in names:
        raise ValueError(f"unknown config key {dotted!r} (keys in {where.rstrip('.') or 'the top level'}: "
                       f"{', '.join(sorted(names))})")
    if dataclasses.is_dataclass(getattr(node, last)):
        raise ValueError(f"config key {dotted!r} is a section: set its keys, e.g. {dotted}.{_field_names(getattr(node, last))[0]}=...")
    hints = typing.get_type_hints(type(node))
    setattr(node, last, _coerce(dotted, value, hints[last]))


def _field_names(node: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(node)]


def _sections(node: Any) -> list[str]:
    return [n for n in _field_names(node) if dataclasses.is_dataclass(getattr(node, n))]


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


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


def preset_path(name_or_path: str) -> Path:
    """A YAML path, or the name of a preset in train/configs/ (``cifar10_r18``)."""
    return named_yaml(name_or_path, PRESET_DIR, "--config", "preset")


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


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=0.1"`` -> ``("optim.lr", 0.1)``; the value is parsed as YAML 1.2 (``1e-4``, true, [a, b])."""
    if "=" not in text:
        raise ValueError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    return key.strip(), load_yaml(raw, f"override {text!r}") if raw.strip() else ""


def from_dict(d: dict, cfg: Config | None = None) -> Config:
    """Apply a nested dict (a YAML preset or a saved config) onto ``cfg`` (default: the defaults)."""
    cfg = cfg if cfg is not None else Config()
    for key, value in _flatten(d or {}).items():
        set_key(cfg, key, value)
    return cfg


# keys added after configurations were first saved, with the value a configuration saved before them ran with
ADDED_KEYS: dict[str, Any] = {"aug.batched": False}


def from_saved(d: dict) -> Config:
    """A saved configuration (a checkpoint's, a study's record) as the run it describes: a key it
    predates takes the value that run had (``ADDED_KEYS``), not today's default."""
    cfg = from_dict(d)
    given = _flatten(d or {})
    for key, value in ADDED_KEYS.items():
        if key not in given:
            set_key(cfg, key, value)
    return cfg


def load_config(preset: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the preset (name or YAML path; default ``digits``), then ``key=value`` overrides.

    Raises:
        ConfigError: an unknown preset, file or key (named), or a value of the wrong type, shape or
            range.
    """
    try:
        path = preset_path(preset or DEFAULT_PRESET)
        d = load_yaml(read_text(path, "--config"), f"--config {str(path)!r}") or {}
        if not isinstance(d, dict):
            raise ValueError(f"config {preset!r}: the YAML must be a mapping of keys")
        cfg = from_dict(d)
        for text in overrides:
            key, value = parse_override(text)
            set_key(cfg, key, value)
        validate(cfg)
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from e
    return cfg


def to_dict(cfg: Any) -> dict:
    """Nested plain dict (tuples become lists): YAML- and ``weights_only``-safe."""

    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


def flat(cfg: Config) -> dict[str, Any]:
    """The configuration as ``{"dotted.key": value}`` (tuples as lists)."""
    return _flatten(to_dict(cfg))


def diff(a: Config, b: Config) -> list[str]:
    """Dotted keys whose values differ between two configurations."""
    fa, fb = _flatten(to_dict(a)), _flatten(to_dict(b))
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))


def to_yaml(cfg: Config | dict) -> str:
    """A configuration (or its :func:`to_dict`) as YAML, in declaration order."""
    return yaml.safe_dump(cfg if isinstance(cfg, dict) else to_dict(cfg), sort_keys=False)


def save_yaml(cfg: Config | dict, path: str | Path) -> None:
    Path(path).write_text(to_yaml(cfg))


def presets() -> list[str]:
    """The names of the presets in train/configs/."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def key_summary(cfg: Any = None, indent: str = "  ") -> str:
    """The configuration keys, one line per section (for ``--help``)."""
    cfg = cfg if cfg is not None else Config()
    names = _field_names(cfg)
    lines = [f"{indent}(top level): " + " ".join(n for n in names if not dataclasses.is_dataclass(getattr(cfg, n)))]
    for section in _sections(cfg):
        lines.append(f"{indent}{section}.: " + " ".join(_field_names(getattr(cfg, section))))
    return "\n".join(lines)
