"""The BYOL network: backbone + projector (online), a predictor, and an EMA target
(MoCo's ``builder.py`` shape: the network, its target copy, a no-grad update method).

Predictor choices (``predictor.name``): ``directpred`` (:class:`fastpred.DirectPredictor`, W_p set
from the eigendecomposition of the running correlation of its input, paper Eqs. 18-19), ``linear``
(bias-free d x d trained by SGD, optionally symmetric as in the paper's Table 3), ``mlp`` (BYOL's
Linear-BN-ReLU-Linear) and ``none`` (identity; collapses, paper Sec. 3).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.resnet import BasicBlock

import fastpred
from fastpred.losses import byol_loss, isoloss

from .config import Config, directpred_kwargs


class SmallResNet(nn.Module):
    """A residual net for tiny images: 3x3 stem, one BasicBlock per stage, stride 2 between stages,
    global average pool. ``resnet_small`` (digits): widths 32-64-128, stride-1 stem, output dim 128.
    ``resnet_mini`` (fashion_mnist): widths 16-32-64 and a stride-2 stem (28 -> 14 -> 7 -> 4 px),
    2.6M multiply-adds per 28x28 image instead of 37M, so a study of many runs fits on 2 CPU cores.
    ``model.width`` k multiplies every stage's width (WideResNet's k): resnet_mini with k=4 is
    64-128-256, 256 features for the linear probe."""

    def __init__(self, in_channels: int, widths: tuple[int, ...] = (32, 64, 128), stem_stride: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, stem_stride, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            down = None if stride == 1 and cin == w else nn.Sequential(
                nn.Conv2d(cin, w, 1, stride, bias=False), nn.BatchNorm2d(w))
            blocks.append(BasicBlock(cin, w, stride, down))
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.out_dim = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1)  # (N, out_dim)


def build_backbone(arch: str, in_channels: int, cifar_stem: bool, width: int = 1) -> tuple[nn.Module, int]:
    """Backbone without its classifier, and its feature dimension; ``width`` multiplies the stage
    widths of resnet_small / resnet_mini (``model.width``)."""
    if arch == "resnet_small":
        net = SmallResNet(in_channels, (32 * width, 64 * width, 128 * width))
        return net, net.out_dim
    if arch == "resnet_mini":
        net = SmallResNet(in_channels, (16 * width, 32 * width, 64 * width), stem_stride=2)
        return net, net.out_dim
    if arch not in ("resnet18", "resnet50"):
        raise ValueError(f"model.arch={arch!r}: expected resnet_small, resnet_mini, resnet18 or resnet50")
    if width != 1:
        raise ValueError(f"model.width={width}: only resnet_small and resnet_mini are widened; {arch} takes width 1")
    net = getattr(torchvision.models, arch)(weights=None)
    dim = net.fc.in_features
    net.fc = nn.Identity()
    if cifar_stem:  # 32-96 px images: keep the resolution (SimCLR/DirectPred CIFAR variant)
        net.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    return net, dim


def mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """BYOL's projector / predictor head: Linear-BN-ReLU-Linear."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out_dim))


class LinearPredictor(nn.Module):
    """Bias-free d x d predictor trained by gradient; ``symmetric`` uses (W + W^T)/2 (paper Table 3)."""

    def __init__(self, dim: int, symmetric: bool = False):
        super().__init__()
        self.symmetric = symmetric
        self.weight = nn.Parameter(torch.empty(dim, dim))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's initialisation

    def effective_weight(self) -> torch.Tensor:
        return 0.5 * (self.weight + self.weight.t()) if self.symmetric else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.effective_weight().t()  # (N, d)


def build_predictor(cfg, dim: int) -> nn.Module:
    """``cfg``: the predictor section of the config."""
    if cfg.name == "directpred":
        # .weight requires grad only when freq > 1 (trained between rebuilds); it joins the optimizer then
        return fastpred.DirectPredictor(dim, **directpred_kwargs(cfg))
    if cfg.name == "linear":
        return LinearPredictor(dim, cfg.symmetric)
    if cfg.name == "mlp":
        return mlp(dim, cfg.mlp_hidden, dim)
    if cfg.name == "none":
        return nn.Identity()
    raise ValueError(f"predictor.name={cfg.name!r}: expected directpred, linear, mlp or none")


def predictor_matrix(predictor: nn.Module) -> torch.Tensor | None:
    """The linear map W_p (d x d) the predictor applies, or None when there is no single one
    (MLP, identity, or a partitioned DirectPredictor)."""
    if isinstance(predictor, fastpred.DirectPredictor):
        return predictor.weight.detach() if predictor.weight.ndim == 2 else None
    if isinstance(predictor, LinearPredictor):
        return predictor.effective_weight().detach()
    return None


class BYOL(nn.Module):
    """Online backbone + projector + predictor, and a target (EMA copy, or the online net itself).

    ``forward(v1, v2)`` returns the loss, the online backbone features of view 1 (detached, for the
    probe) and the projector outputs fed to the predictor (detached, for diagnostics). A
    DirectPredictor is called once per view and, attached to the optimizer (``train_step``), folds
    both views' 2B samples into its correlation once per optimizer step, as the authors' trainer
    does; another predictor is called once on both views concatenated.

    ``loss``: ``byol`` or ``isoloss`` (:mod:`fastpred.losses`), in the given ``loss_form``.
    """

    def __init__(self, backbone: nn.Module, projector: nn.Module, predictor: nn.Module, *,
                 ema: bool = True, stop_grad: bool = True, symmetric_loss: bool = True,
                 loss: str = "byol", loss_form: str = "cosine"):
        super().__init__()
        if ema and not stop_grad:
            raise ValueError("model.stop_grad=false needs model.ema=false: an EMA target is never trained, "
                             "so a gradient through it changes nothing (the paper's no-stop-gradient case is W_a = W)")
        if loss not in ("byol", "isoloss"):
            raise ValueError(f"loss={loss!r}: expected byol or isoloss")
        self.backbone, self.projector, self.predictor = backbone, projector, predictor
        self.ema, self.stop_grad, self.symmetric_loss = ema, stop_grad, symmetric_loss
        self.loss, self.loss_form = loss, loss_form
        if ema:  # BYOL copies the online weights; they then follow an EMA
            self.target_backbone = copy.deepcopy(backbone).requires_grad_(False)
            self.target_projector = copy.deepcopy(projector).requires_grad_(False)

    def forward(self, v1: torch.Tensor, v2: torch.Tensor):
        h1 = self.backbone(v1)  # (B, feat)
        z1 = self.projector(h1)  # (B, d)
        need_z2 = self.symmetric_loss or not self.ema
        z2 = None
        if need_z2:
            with torch.set_grad_enabled(torch.is_grad_enabled() and (self.symmetric_loss or not self.stop_grad)):
                z2 = self.projector(self.backbone(v2))  # (B, d)
        if self.symmetric_loss and isinstance(self.predictor, fastpred.DirectPredictor):
            p1, p2 = self.predictor(z1), self.predictor(z2)  # per view; attached, both fold as one batch per step
        elif self.symmetric_loss:
            p1, p2 = self.predictor(torch.cat([z1, z2])).chunk(2)  # one predictor call per step
        else:
            p1, p2 = self.predictor(z1), None
        if self.ema:
            with torch.no_grad():
                t2 = self.target_projector(self.target_backbone(v2))
                t1 = self.target_projector(self.target_backbone(v1)) if self.symmetric_loss else None
        else:
            t1, t2 = (z1.detach(), z2.detach()) if self.stop_grad else (z1, z2)
        loss = self.pair_loss(z1, p1, t2)
        if self.symmetric_loss:
            loss = loss + self.pair_loss(z2, p2, t1)
        z = torch.cat([z1, z2]) if self.symmetric_loss else z1
        return loss, h1.detach(), z.detach()

    def pair_loss(self, z: torch.Tensor, p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The loss of one view pair: online projection ``z``, its prediction ``p``, target ``t``."""
        if self.loss == "isoloss":
            return isoloss(z, p, t, self.loss_form)
        return byol_loss(p, t, self.loss_form)

    @torch.no_grad()
    def update_target(self, tau: float) -> None:
        """target <- tau * target + (1 - tau) * online, for the parameters (BYOL Eq. 1's xi update).

        The target's BatchNorm statistics are its own: it runs in training mode, as in BYOL."""
        if not self.ema:
            return
        pairs = ((self.target_backbone, self.backbone), (self.target_projector, self.projector))
        for tgt, src in pairs:
            torch._foreach_lerp_(list(tgt.parameters()), list(src.parameters()), 1.0 - tau)


def build_model(cfg: Config, in_channels: int, seed: int) -> BYOL:
    """The full network, initialised from ``seed`` alone (linear_eval rebuilds it at random init)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone, feat_dim = build_backbone(cfg.model.arch, in_channels, cfg.model.cifar_stem, cfg.model.width)
        projector = mlp(feat_dim, cfg.model.proj_hidden, cfg.model.proj_dim)
        predictor = build_predictor(cfg.predictor, cfg.model.proj_dim)
        model = BYOL(backbone, projector, predictor, ema=cfg.model.ema, stop_grad=cfg.model.stop_grad,
                     symmetric_loss=cfg.model.symmetric_loss, loss=cfg.loss.name, loss_form=cfg.loss.form)
    model.feat_dim = feat_dim
    return model
