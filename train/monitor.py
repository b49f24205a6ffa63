"""Evaluation while training and predictor diagnostics.

- :func:`extract_features` (sharded over ranks, gathered) and :func:`knn_top1`, the weighted kNN
  monitor of Wu et al. (2018) used by BYOL/SimSiam re-implementations.
- :func:`effective_rank` of a representation (Roy & Vetterli 2007) and a collapse warning.
- :class:`Diagnostics`: the paper's Fig. 2 over training — eigenvalues of F̂ and of W_p,
  eigenspace alignment cos(u_j, W_p u_j), asymmetry of W_p — saved as PNG.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm


@torch.no_grad()
def extract_features(backbone: nn.Module, loader: DataLoader, device: torch.device, amp_dtype=None,
                     channels_last: bool = False, desc: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features (N, D) float32 and labels (N,) of a loader over :class:`train.data.Views`.

    Under DDP each rank embeds its DistributedSampler shard; the shards are gathered and put back
    in dataset order, so every rank returns the same full tensors. ``desc``: show a progress bar.
    """
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    for x, y, _ in tqdm(loader, desc=desc, disable=desc is None, leave=False, mininterval=1.0, dynamic_ncols=True):
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            f = backbone(x)
        feats.append(f.float())
        labels.append(y.to(device))
    backbone.train(was_training)
    f, y = torch.cat(feats), torch.cat(labels)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        world = dist.get_world_size()
        fs, ys = [torch.empty_like(f) for _ in range(world)], [torch.empty_like(y) for _ in range(world)]
        dist.all_gather(fs, f)  # DistributedSampler pads, so every shard has the same length
        dist.all_gather(ys, y)
        # rank r holds samples r, r + world, ...: interleave back to dataset order, drop the padding
        f = torch.stack(fs, 1).flatten(0, 1)[: len(loader.dataset)]
        y = torch.stack(ys, 1).flatten(0, 1)[: len(loader.dataset)]
    return f, y


@torch.no_grad()
def knn_top1(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor,
             k: int, t: float, num_classes: int, chunk: int = 1024) -> float:
    """Weighted kNN top-1 accuracy (%): cosine similarity, the k nearest vote with exp(sim / t)."""
    keep = train_y >= 0  # unlabeled samples (label -1) cannot vote
    bank, bank_y = F.normalize(train_f[keep], dim=1), train_y[keep]
    k = min(k, len(bank))
    correct = 0
    for i in range(0, len(test_f), chunk):
        q = F.normalize(test_f[i:i + chunk], dim=1)
        sim, idx = (q @ bank.t()).topk(k, dim=1)  # (n, k)
        votes = torch.zeros(len(q), num_classes, device=q.device)
        votes.scatter_add_(1, bank_y[idx], (sim / t).exp())
        correct += (votes.argmax(1) == test_y[i:i + chunk]).sum().item()
    return 100.0 * correct / max(1, len(test_f))


@torch.no_grad()
def effective_rank(f: torch.Tensor) -> float:
    """exp(entropy of the normalised singular values) of the centred features: between 1
    (all samples on a line: collapse) and min(N, D)."""
    f = f.double() - f.double().mean(0)
    s = torch.linalg.svdvals(f)
    if s.sum() <= 0:
        return 1.0
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


class Diagnostics:
    """Per-epoch record of the predictor's statistics (the paper's Fig. 2) and its PNG.

    ``record`` takes F̂ (d x d, the running correlation of the predictor's input) and W_p (d x d,
    or None when the predictor is not linear). With F̂ = U diag(s) U^T it keeps: s; the eigenvalues
    of W_p's symmetric part; cos(u_j, W_p u_j) per eigenvector u_j (1 = aligned); and
    ||W_p - W_p^T||_F / ||W_p||_F. The effective rank of the backbone features is kept beside them.
    """

    def __init__(self) -> None:
        self.history: dict[str, list] = {"epoch": [], "corr_eig": [], "wp_eig": [], "align": [],
                                         "asym": [], "erank": []}

    @torch.no_grad()
    def record(self, epoch: int, corr: torch.Tensor | None, wp: torch.Tensor | None, erank: float) -> None:
        h = self.history
        h["epoch"].append(epoch)
        h["erank"].append(erank)
        s = u = None
        if corr is not None:
            s, u = torch.linalg.eigh(corr.double().cpu())  # ascending
            s, u = s.flip(0), u.flip(1)  # largest first
        h["corr_eig"].append(s.float() if s is not None else None)
        if wp is None:
            h["wp_eig"].append(None), h["align"].append(None), h["asym"].append(None)
            return
        w = wp.double().cpu()
        h["wp_eig"].append(torch.linalg.eigvalsh(0.5 * (w + w.t())).flip(0).float())
        h["asym"].append(float(torch.linalg.norm(w - w.t()) / torch.linalg.norm(w).clamp_min(1e-30)))
        if u is None:
            h["align"].append(None)
        else:
            wu = w @ u  # column j: W_p u_j
            h["align"].append(((u * wu).sum(0) / wu.norm(dim=0).clamp_min(1e-30)).float())

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.history = state["history"]

    def to_json(self, path: str | Path) -> None:
        plain = {k: [v.tolist() if isinstance(v, torch.Tensor) else v for v in vals]
                 for k, vals in self.history.items()}
        Path(path).write_text(json.dumps(plain))

    def plot(self, path: str | Path, collapse_erank: float, title: str = "") -> None:
        """Five panels: log s_j of F̂, eigenvalues of W_p, alignment, asymmetry, effective rank."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        h = self.history
        fig, axes = plt.subplots(1, 5, figsize=(22, 4))
        panels = [("corr_eig", "log10 eigenvalues of F̂", True), ("wp_eig", "eigenvalues of W_p (sym. part)", False),
                  ("align", "alignment cos(u_j, W_p u_j)", False)]
        for ax, (key, name, log) in zip(axes, panels):
            rows = [(e, v) for e, v in zip(h["epoch"], h[key]) if v is not None]
            if rows:
                epochs = [e for e, _ in rows]
                m = torch.stack([v for _, v in rows]).double()  # (T, d): column j = j-th largest of F̂
                if log:
                    m = m.clamp_min(1e-12).log10()
                cmap = plt.get_cmap("viridis")
                for j in range(m.shape[1]):
                    ax.plot(epochs, m[:, j].numpy(), color=cmap(j / max(1, m.shape[1] - 1)), lw=0.8)
            else:
                ax.text(0.5, 0.5, "n/a for this predictor", ha="center", transform=ax.transAxes)
            ax.set_title(name)
            ax.set_xlabel("epoch")
        rows = [(e, v) for e, v in zip(h["epoch"], h["asym"]) if v is not None]
        if rows:
            axes[3].plot(*zip(*rows), marker=".")
        else:
            axes[3].text(0.5, 0.5, "n/a for this predictor", ha="center", transform=axes[3].transAxes)
        axes[3].set_title("asymmetry ||W_p - W_p^T|| / ||W_p||")
        axes[4].plot(h["epoch"], h["erank"], marker=".")
        axes[4].axhline(collapse_erank, color="r", ls="--", lw=1, label="collapse threshold")
        axes[4].set_title("effective rank of features")
        axes[4].legend()
        for ax in axes[3:]:
            ax.set_xlabel("epoch")
        if title:
            fig.suptitle(title + "   (colour: eigen-index, dark = largest eigenvalue of F̂)")
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)


def collapse_message(erank: float, threshold: float) -> str | None:
    if math.isnan(erank) or erank < threshold:
        return (f"representation collapse: effective rank of the features is {erank:.2f} "
                f"(< monitor.collapse_erank={threshold})")
    return None
