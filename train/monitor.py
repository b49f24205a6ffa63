"""Evaluation while training and predictor diagnostics.

- :func:`extract_features` (sharded over ranks, gathered) and :func:`knn_top1`, the weighted kNN
  monitor of Wu et al. (2018) used by BYOL/SimSiam re-implementations.
- :func:`effective_rank` of a representation (Roy & Vetterli 2007) and a collapse warning.
- :class:`Diagnostics`: the paper's Fig. 2 over training — eigenvalues of F̂ and of W_p,
  eigenspace alignment cos(u_j, W_p u_j), asymmetry of W_p — saved as PNG and, with the
  predictor's counters, written to TensorBoard by :func:`write_tensorboard`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

# relative Frobenius norm of W_p - W_p^T above which W_p counts as asymmetric (float32 rounding of a
# symmetric U diag(p) U^T stays below 1e-6)
ASYMMETRY_SHOWN = 1e-4


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
    (all samples on a line: collapse) and min(N, D); NaN for features that are not finite."""
    if not bool(f.isfinite().all()):
        return math.nan
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

    def asymmetric(self) -> bool:
        """Whether W_p was ever measurably asymmetric (a gradient-trained W_p, DirectPred with
        freq > 1); a W_p built as U diag(p) U^T is symmetric to rounding and gets no asymmetry panel."""
        return any(a is not None and a > ASYMMETRY_SHOWN for a in self.history["asym"])

    def plot(self, path: str | Path, collapse_erank: float, title: str = "") -> None:
        """Save :meth:`figure` as a PNG."""
        fig = self.figure(collapse_erank, title)
        fig.savefig(path, dpi=90)
        import matplotlib.pyplot as plt

        plt.close(fig)

    def figure(self, collapse_erank: float, title: str = ""):
        """The paper's Fig. 2 for this run, and the effective rank of the features (a matplotlib Figure).

        Top row, one line per eigen-index j of F̂ (colour bar: dark = largest eigenvalue): the
        eigenvalues s_j of F̂ (log scale), those of W_p, and the alignment cos(u_j, W_p u_j) on a
        fixed 0-1 scale (1: u_j is an eigenvector of W_p). Bottom row: the effective rank of the
        backbone features against the collapse threshold and, when W_p was ever asymmetric,
        ||W_p - W_p^T|| / ||W_p||.
        """
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        h = self.history
        fig = plt.figure(figsize=(13, 7.5), layout="constrained")
        grid = fig.add_gridspec(2, 3, height_ratios=[3, 2])
        top = [fig.add_subplot(grid[0, i]) for i in range(3)]
        show_asym = self.asymmetric()
        ax_rank = fig.add_subplot(grid[1, :2] if show_asym else grid[1, :])
        cmap = plt.get_cmap("viridis")
        dim = next((len(v) for v in h["corr_eig"] if v is not None), 1)
        wp_title = "eigenvalues of W_p" + (" (symmetric part)" if show_asym else " (W_p symmetric throughout)")
        panels = [("corr_eig", "eigenvalues s_j of F̂ (log scale)"), ("wp_eig", wp_title),
                  ("align", "alignment cos(u_j, W_p u_j)   (1 = aligned)")]
        for ax, (key, name) in zip(top, panels):
            rows = [(e, v) for e, v in zip(h["epoch"], h[key]) if v is not None]
            ax.set_title(name, fontsize=10)
            ax.set_xlabel("epoch")
            if not rows:
                ax.text(0.5, 0.5, "n/a: this predictor has no single linear W_p", ha="center", va="center",
                        transform=ax.transAxes)
                continue
            epochs = [e for e, _ in rows]
            m = torch.stack([v for _, v in rows]).double().numpy()  # (T, d): column j follows eigen-index j
            style = {"lw": 0.8, "marker": "." if len(epochs) < 4 else None}
            for j in range(m.shape[1]):
                ax.plot(epochs, m[:, j], color=cmap(j / max(1, dim - 1)), **style)
            if key == "corr_eig":
                ax.set_yscale("log")
                ax.set_ylim(bottom=max(m[m > 0].min() if (m > 0).any() else 1e-12, 1e-12) / 2)
            if key == "align":
                ax.plot(epochs, np.median(m, axis=1), color="black", lw=2, label="median over j")
                ax.set_ylim(min(0.0, float(m.min())) - 0.05, 1.05)
                ax.axhline(1.0, color="grey", lw=0.5, ls=":")
                ax.legend(loc="lower right", fontsize=8)
        bar = fig.colorbar(plt.cm.ScalarMappable(norm=plt.Normalize(0, dim - 1), cmap=cmap), ax=top,
                           location="right", fraction=0.03, pad=0.01)
        bar.set_label("eigen-index j (dark = largest eigenvalue)")
        ax_rank.plot(h["epoch"], h["erank"], marker=".", label="effective rank of the backbone features")
        ax_rank.axhline(collapse_erank, color="r", ls="--", lw=1, label=f"collapse threshold ({collapse_erank:g})")
        ax_rank.set_ylim(bottom=0)
        ax_rank.set_xlim(top[0].get_xlim())
        ax_rank.set_title("effective rank of the features (1 = collapsed onto a line)", fontsize=10)
        ax_rank.set_xlabel("epoch")
        ax_rank.legend(fontsize=8)
        if show_asym:
            ax_asym = fig.add_subplot(grid[1, 2])
            ax_asym.plot(*zip(*[(e, v) for e, v in zip(h["epoch"], h["asym"]) if v is not None]), marker=".")
            ax_asym.set_ylim(bottom=0)
            ax_asym.set_xlim(top[0].get_xlim())
            ax_asym.set_title("asymmetry ||W_p - W_p^T|| / ||W_p||", fontsize=10)
            ax_asym.set_xlabel("epoch")
        if title:
            fig.suptitle(title)
        return fig


def write_tensorboard(writer, step: int, diag: Diagnostics, predictor: nn.Module) -> None:
    """The newest :class:`Diagnostics` record and the predictor's counters, as TensorBoard data.

    Histograms over eigen-indices (TensorBoard's distributions tab draws them over training, as
    Fig. 2 draws lines): log10 eigenvalues of F̂, eigenvalues of W_p, alignment. Scalars: median
    alignment, asymmetry of W_p, and a DirectPredictor's ``num_updates``, ``num_skipped`` and
    ``num_eigh_failures``. ``writer``: a ``SummaryWriter``, or None (tensorboard not installed).
    """
    if writer is None or not diag.history["epoch"]:
        return
    h = diag.history
    corr, wp, align, asym = h["corr_eig"][-1], h["wp_eig"][-1], h["align"][-1], h["asym"][-1]
    if corr is not None:
        writer.add_histogram("predictor/corr_eigenvalues_log10", corr.double().clamp_min(1e-12).log10(), step)
    if wp is not None:
        writer.add_histogram("predictor/wp_eigenvalues", wp, step)
    if align is not None:
        writer.add_histogram("predictor/alignment", align, step)
        writer.add_scalar("predictor/alignment_median", float(align.median()), step)
    if asym is not None:
        writer.add_scalar("predictor/asymmetry", asym, step)
    for name in ("num_updates", "num_skipped", "num_eigh_failures"):
        counter = getattr(predictor, name, None)
        if isinstance(counter, torch.Tensor):
            writer.add_scalar(f"predictor/{name}", int(counter), step)


def collapse_message(erank: float, threshold: float) -> str | None:
    if math.isnan(erank) or erank < threshold:
        return (f"representation collapse: effective rank of the features is {erank:.2f} "
                f"(< monitor.collapse_erank={threshold})")
    return None
