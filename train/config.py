"""One tree of dataclasses holding every hyper-parameter of a run (nanoGPT's ``GPTConfig`` shape),
read and merged by OmegaConf (the configuration library of Hydra, which the authors' code uses).

A run's configuration is the dataclass defaults (which are the ``digits`` preset), then a YAML
preset, then dotted ``key=value`` overrides from the command line, e.g.
``optim.lr=0.05 predictor.name=linear predictor.freq=5``. The dataclasses are an OmegaConf
structured config in struct mode: an unknown key, or a value that does not convert to the key's
type, is one error line naming the key. Values are parsed as YAML 1.2 (:mod:`train.yaml_files`),
then converted as OmegaConf converts them (``1`` for a float key is 1.0, ``yes`` for a boolean is
true, a number for a text key is its text); ``${other.key}`` interpolations resolve.

``loss.name`` (byol | isoloss) and ``loss.form`` (cosine | euclidean) choose the prediction loss
of :mod:`fastpred.losses`. The ``predictor.*`` keys are ``name`` (directpred | linear | mlp |
none), ``mlp_hidden``, ``symmetric`` and every keyword argument of :class:`fastpred.DirectPredictor`
(``rho``, ``eps``, ``freq``, ...), read from its signature with its defaults.

What OmegaConf does not check is ours (:mod:`train.config_checks`, run by :func:`validate` when the
configuration is built, before anything runs): each numeric key's range, the checks across keys,
and a tuple key's number of values.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

import fastpred

from .config_checks import check_augment, check_loss, check_ranges
from .yaml_files import load_yaml, named_yaml, read_text


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


TRAINER_PREDICTOR_KEYS = ("name", "mlp_hidden", "symmetric")  # the rest go to fastpred.DirectPredictor


def _directpred_keywords() -> list[tuple[str, type, Any]]:
    """(name, type, default) of every keyword-only argument of ``fastpred.DirectPredictor``."""
    init = fastpred.DirectPredictor.__init__
    hints = typing.get_type_hints(init)
    return [(p.name, hints[p.name], field(default=p.default))
            for p in inspect.signature(init).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]


PredictorConfig = dataclasses.make_dataclass(
    "PredictorConfig",
    [("name", str, field(default="directpred")),  # directpred | linear | mlp | none
     ("mlp_hidden", int, field(default=512)),  # hidden width of BYOL's 2-layer predictor (mlp)
     ("symmetric", bool, field(default=False)),  # linear: use (W + W^T) / 2
     *_directpred_keywords()],
    namespace={"__doc__": "``predictor.name`` and its options; below the first three, the keywords of "
                          ":class:`fastpred.DirectPredictor` with its defaults (see its docstring)."})
PredictorConfig.__module__ = __name__  # make_dataclass's module= needs Python 3.12


def directpred_kwargs(cfg: PredictorConfig) -> dict[str, Any]:
    """The ``predictor.*`` values that are keywords of ``fastpred.DirectPredictor``."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in TRAINER_PREDICTOR_KEYS}


@dataclass
class LossConfig:
    """The prediction loss of each view pair (:mod:`fastpred.losses`)."""

    name: str = "byol"  # byol | isoloss (Halvagal et al. 2023; needs predictor.name=directpred, freq 1)
    form: str = "cosine"  # cosine: 2 - 2 cos(p, t) | euclidean: |p - t|^2


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


def validate(cfg: Config) -> None:
    """What OmegaConf's types do not check (:mod:`train.config_checks`): every key's range, then the
    checks across keys.

    Raises:
        ValueError: naming the first key out of range (its value and the accepted range), or the keys
            that do not go together.
    """
    check_ranges(flat(cfg))
    check_augment(cfg.aug, cfg.data.image_size)
    check_loss(cfg)


# ----------------------------------------------------------------------------- loading


def preset_path(name_or_path: str) -> Path:
    """A YAML path, or the name of a preset in train/configs/ (``cifar10_r18``)."""
    return named_yaml(name_or_path, PRESET_DIR, "--config", "preset")


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=0.1"`` -> ``("optim.lr", 0.1)``; the value is parsed as YAML 1.2 (``1e-4``, true, [a, b])."""
    if "=" not in text:
        raise ValueError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    return key.strip(), load_yaml(raw, f"override {text!r}") if raw.strip() else ""


@functools.cache
def _schema() -> DictConfig:
    """The defaults as an OmegaConf structured config in struct mode, built once (the slow part:
    a copy is a fraction of it). Never changed: merges work on copies."""
    node = OmegaConf.structured(Config)
    OmegaConf.set_struct(node, True)
    return node


def _one_line(e: OmegaConfBaseException, key: str) -> ValueError:
    """OmegaConf's error (several lines) as one line naming ``key``; an unknown key lists the
    keys where it was looked for."""
    msg = str(e.msg).splitlines()[0]
    if not isinstance(e, (ConfigKeyError, ConfigAttributeError)):
        return ValueError(f"config key {key!r}: {msg}")
    section = (e.full_key or key).rpartition(".")[0]
    keys = OmegaConf.select(_schema(), section) if section else _schema()
    names = ", ".join(keys.keys()) if isinstance(keys, DictConfig) else ""
    return ValueError(f"unknown config key {key!r}: {msg} (keys in {section or 'the top level'}: {names})")


def _as_config(node: DictConfig) -> Config:
    """The dataclasses from OmegaConf's tree, with the tuples the schema declares, each of the declared
    length (OmegaConf 2.3 reads ``tuple[float, float]`` as a list of floats of any length; 2.4 checks)."""

    def typed(obj: Any, prefix: str) -> Any:
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            value, typ = getattr(obj, f.name), hints[f.name]
            if dataclasses.is_dataclass(value):
                typed(value, f"{prefix}{f.name}.")
            elif typing.get_origin(typ) is tuple:
                args = typing.get_args(typ)
                if args[-1] is not Ellipsis and len(value) != len(args):
                    raise ValueError(f"config key {prefix + f.name!r}: expected {len(args)} values, got {list(value)}")
                setattr(obj, f.name, tuple(value))
        return obj

    try:
        return typed(OmegaConf.to_object(node), "")
    except OmegaConfBaseException as e:  # an interpolation that does not resolve, a missing value
        raise _one_line(e, e.full_key) from None


def merge(cfg: Config | None = None, d: dict | None = None, overrides: Iterable[str] = ()) -> Config:
    """``cfg`` (default: the defaults), then a nested dict (a preset, a saved configuration), then
    ``key=value`` overrides, each checked against the schema as it is merged.

    Raises:
        ValueError: an unknown key or a value of the wrong type or shape, naming the key.
    """
    node = _schema().copy() if cfg is None else OmegaConf.structured(cfg)
    OmegaConf.set_struct(node, True)
    try:
        node.merge_with(d or {})
    except OmegaConfBaseException as e:
        raise _one_line(e, e.full_key) from None
    for text in overrides:
        key, value = parse_override(text)
        try:
            OmegaConf.update(node, key, value, merge=True)
        except OmegaConfBaseException as e:
            raise _one_line(e, key) from None
    return _as_config(node)


def from_dict(d: dict, cfg: Config | None = None) -> Config:
    """A nested dict (a YAML preset or a saved config) applied onto ``cfg`` (default: the defaults)."""
    return merge(cfg, d)


# keys added after configurations were first saved, with the value a configuration saved before them ran with
ADDED_KEYS: dict[str, Any] = {"aug.batched": False}


def from_saved(d: dict) -> Config:
    """A saved configuration (a checkpoint's, a study's record) as the run it describes: a key it
    predates takes the value that run had (``ADDED_KEYS``), not today's default."""
    given = _flatten(d or {})
    return merge(None, d, [f"{k}={v}" for k, v in ADDED_KEYS.items() if k not in given])


def load_config(preset: str | None = None, overrides: Iterable[str] = ()) -> Config:
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
        cfg = merge(None, d, overrides)
        validate(cfg)
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from e
    return cfg


def to_dict(cfg: Config) -> dict:
    """Nested plain dict (tuples become lists, as every saved configuration has them): YAML- and
    ``weights_only``-safe."""

    def lists(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: lists(x) for k, x in v.items()}
        return [lists(x) for x in v] if isinstance(v, (list, tuple)) else v

    return lists(dataclasses.asdict(cfg))


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def flat(cfg: Config) -> dict[str, Any]:
    """The configuration as ``{"dotted.key": value}`` (tuples as lists)."""
    return _flatten(to_dict(cfg))


def diff(a: Config, b: Config) -> list[str]:
    """Dotted keys whose values differ between two configurations."""
    fa, fb = flat(a), flat(b)
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))


def old_to_new(old: dict, new: dict, keys: Iterable[str]) -> str:
    """``"optim.lr 0.05 -> 0.1, seed 0 -> 1"``: each key's value in two nested dicts (None where absent)."""
    fo, fn = _flatten(old), _flatten(new)
    return ", ".join(f"{k} {fo.get(k)!r} -> {fn.get(k)!r}" for k in keys)


def to_yaml(cfg: Config | dict) -> str:
    """A configuration (or its :func:`to_dict`) as YAML, in declaration order."""
    return OmegaConf.to_yaml(cfg if isinstance(cfg, dict) else OmegaConf.structured(cfg))


def presets() -> list[str]:
    """The names of the presets in train/configs/."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def key_summary(indent: str = "  ") -> str:
    """The configuration keys, one line per section (for ``--help``)."""
    node = _schema()
    sections = [k for k in node if isinstance(node[k], DictConfig)]
    lines = [f"{indent}(top level): " + " ".join(k for k in node if k not in sections)]
    return "\n".join(lines + [f"{indent}{s}.: " + " ".join(node[s]) for s in sections])

