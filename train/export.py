"""Export the pre-trained backbone of a checkpoint for use elsewhere.

    python -m train.export --ckpt runs/c10/last.pt --out resnet18_directpred.pt [--target]

``last.pt`` is a resume file (optimizer, RNG state, predictor, projector). This writes the
backbone alone as a plain ``state_dict`` (tensors only) that loads with ``strict=True`` into
the matching torchvision model, and a JSON file beside it (``<out>.json``) saying what it is:

    import torch, torchvision
    net = torchvision.models.resnet18()                      # resnet50 alike
    net.fc = torch.nn.Identity()                             # the features, not ImageNet logits
    C = 3                                                    # meta["in_channels"]
    # CIFAR stem (meta["stem"] == "cifar"): 3x3 stride-1 conv1, no max-pool
    net.conv1 = torch.nn.Conv2d(C, 64, 3, 1, 1, bias=False); net.maxpool = torch.nn.Identity()
    # ImageNet stem with C != 3: net.conv1 = torch.nn.Conv2d(C, 64, 7, 2, 3, bias=False)
    net.load_state_dict(torch.load("resnet18_directpred.pt", weights_only=True))

The online backbone is exported by default: it is the network BYOL and DirectPred train and
evaluate (the authors' linear evaluation loads ``online_network_state_dict``). ``--target``
exports the EMA target instead. ``model.arch=resnet_small`` (the digits preset) is this
repository's :class:`train.model.SmallResNet`, which torchvision does not have: its state_dict
is written all the same, and the JSON says how to rebuild it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import fastpred

from . import checkpoint, data
from .config import PRESET_DIR, Config, diff, from_dict, load_config
from .model import build_backbone

TORCHVISION_ARCHS = ("resnet18", "resnet50")
REPO = Path(__file__).resolve().parents[1]  # the clone that holds train/ (for SmallResNet)


class ExportError(ValueError):
    """A checkpoint that cannot be exported as asked, reported without a traceback."""


def backbone_state(model_state: dict[str, torch.Tensor], branch: str) -> dict[str, torch.Tensor]:
    """The ``backbone.*`` (online) or ``target_backbone.*`` (target) entries of a BYOL state_dict,
    prefix removed, as contiguous tensors of their own (not views into the checkpoint's storage)."""
    prefix = {"online": "backbone.", "target": "target_backbone."}[branch]
    return {k[len(prefix):]: v.detach().clone(memory_format=torch.contiguous_format)
            for k, v in model_state.items() if k.startswith(prefix)}


def closest_preset(cfg: Config) -> tuple[str | None, list[str]]:
    """The preset in train/configs/ the run's configuration differs least from, and the keys where it does."""
    best: tuple[str | None, list[str]] = (None, [])
    for path in sorted(PRESET_DIR.glob("*.yaml")):
        keys = diff(load_config(path.stem), cfg)
        if best[0] is None or len(keys) < len(best[1]):
            best = (path.stem, keys)
    return best


def describe(cfg: Config, state: dict, branch: str, feature_dim: int, ckpt: Path) -> dict:
    """What the exported weights are: network, stem, input channels and normalisation, origin."""
    spec = data.spec(cfg.data)
    arch = cfg.model.arch
    stem = "small" if arch == "resnet_small" else ("cifar" if cfg.model.cifar_stem else "imagenet")
    preset, overrides = closest_preset(cfg)
    meta = {
        "arch": arch,
        "torchvision_model": arch if arch in TORCHVISION_ARCHS else None,
        "stem": stem,  # cifar: conv1 = 3x3 stride 1 and maxpool = Identity; imagenet: torchvision's own
        "in_channels": spec.channels,
        "feature_dim": feature_dim,
        "fc": "Identity",
        "branch": branch,
        "image_size": cfg.data.image_size,
        "normalize": {"mean": list(spec.mean), "std": list(spec.std)} if cfg.aug.normalize else None,
        "dataset": cfg.data.name,
        "preset": preset,
        "preset_overrides": overrides,  # keys where the run's configuration differs from that preset
        "predictor": cfg.predictor.name,
        "step": state["step"],
        "epoch": state.get("epoch"),
        "checkpoint": str(ckpt),
        "fastpred_version": fastpred.__version__,
    }
    if arch not in TORCHVISION_ARCHS:
        meta["note"] = (f"model.arch={arch} is train.model.SmallResNet, not a torchvision model: "
                        f"load it into SmallResNet(in_channels={spec.channels}) from this repository")
    return meta


def export(ckpt: str | Path, out: str | Path, target: bool = False) -> dict:
    """Write the backbone of ``ckpt`` to ``out`` (a state_dict) and ``out`` with suffix .json.

    The state_dict is loaded with ``strict=True`` into the network the trainer builds
    (torchvision's model with ``fc = Identity`` and the run's stem) before anything is written.
    Returns the description written to the JSON file.

    Raises:
        ExportError: an unreadable checkpoint, one without a model or configuration, ``--target``
            for a run without an EMA target, or an ``out`` that is a folder or a .json path.
    """
    ckpt, out = Path(ckpt), Path(out)
    branch = "target" if target else "online"
    if out.suffix == ".json" or out.is_dir():
        raise ExportError(f"--out {str(out)!r}: expected a file name such as backbone.pt "
                          "(the description goes beside it, with the suffix .json)")
    try:
        state = checkpoint.load(ckpt)
    except FileNotFoundError as e:
        raise ExportError(f"--ckpt {str(ckpt)!r}: no such file") from e
    except Exception as e:  # truncated, not a checkpoint, refused by weights_only
        why = (str(e).strip().splitlines() or [""])[0][:160]
        raise ExportError(f"--ckpt {str(ckpt)!r} is not a readable checkpoint ({type(e).__name__}: {why})") from e
    missing = [k for k in ("config", "model", "step") if not isinstance(state, dict) or k not in state]
    if missing:
        raise ExportError(f"--ckpt {str(ckpt)!r} is not a train.pretrain checkpoint (no {', '.join(missing)})")
    try:
        cfg = from_dict(state["config"])
    except (ValueError, TypeError) as e:
        raise ExportError(f"--ckpt {str(ckpt)!r}: its configuration does not load here ({e})") from e
    if target and not cfg.model.ema:
        raise ExportError("--target: this run has no separate target network (model.ema=false: the target "
                          "is the online network itself); export without --target")
    weights = backbone_state(state["model"], branch)
    net, feature_dim = build_backbone(cfg.model.arch, data.spec(cfg.data).channels, cfg.model.cifar_stem,
                                      cfg.model.width)
    try:
        net.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise ExportError(f"--ckpt {str(ckpt)!r}: the {branch} backbone does not match "
                          f"model.arch={cfg.model.arch} ({e})") from e
    meta = describe(cfg, state, branch, feature_dim, ckpt)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(weights, out)
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def load_snippet(meta: dict, path: Path) -> str:
    """Python lines, complete with their imports, that rebuild the network and load the exported
    weights: a script that runs from any folder (the weights by their absolute path; for
    ``SmallResNet``, this clone put on ``sys.path``)."""
    path = Path(path).resolve()
    if meta["torchvision_model"] is None:
        return (f"import sys, torch\n"
                f"sys.path.insert(0, {str(REPO)!r})  # this clone: SmallResNet is its network, not torchvision's\n"
                f"from train.model import SmallResNet\n"
                f"net = SmallResNet(in_channels={meta['in_channels']})\n"
                f"net.load_state_dict(torch.load({str(path)!r}, weights_only=True))")
    lines = ["import torch, torchvision", f"net = torchvision.models.{meta['torchvision_model']}()",
             "net.fc = torch.nn.Identity()"]
    if meta["stem"] == "cifar":
        lines.append(f"net.conv1 = torch.nn.Conv2d({meta['in_channels']}, 64, 3, 1, 1, bias=False)")
        lines.append("net.maxpool = torch.nn.Identity()")
    elif meta["in_channels"] != 3:
        lines.append(f"net.conv1 = torch.nn.Conv2d({meta['in_channels']}, 64, 7, 2, 3, bias=False)")
    lines.append(f"net.load_state_dict(torch.load({str(path)!r}, weights_only=True))")
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Export a pre-trained backbone as a plain state_dict")
    p.add_argument("--ckpt", required=True, help="checkpoint written by train.pretrain (e.g. runs/c10/last.pt)")
    p.add_argument("--out", required=True, help="output file (e.g. backbone.pt); its description goes to <out>.json")
    p.add_argument("--target", action="store_true",
                   help="export the EMA target backbone instead of the online one (the default, which is evaluated)")
    return p


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    try:
        info = export(args.ckpt, args.out, args.target)
    except ExportError as e:
        sys.exit(f"error: {e}")
    name = info["torchvision_model"] or f"{info['arch']} (train.model.SmallResNet, not a torchvision model)"
    print(f"wrote the {info['branch']} backbone of {args.ckpt} (step {info['step']}): {name}, "
          f"{info['stem']} stem, {info['in_channels']} input channels, {info['feature_dim']} features")
    print(f"  {args.out}\n  {Path(args.out).with_suffix('.json')}")
    print("load it with:\n" + "\n".join("  " + line for line in load_snippet(info, Path(args.out)).splitlines()))
