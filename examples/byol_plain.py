"""BYOL with a DirectPred predictor in plain PyTorch: the head is called once per view,
and ``attach`` makes each optimizer step one DirectPred step (both views folded into F
as one batch, as the authors do).

    python examples/byol_plain.py --steps 200

Runs on random "images" (two noisy views of the same vector) so that it needs no data.
"""
from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

import fastpred
from fastpred.losses import byol_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)

    online = nn.Sequential(nn.Linear(32, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 16))  # encoder + projector
    target = copy.deepcopy(online).requires_grad_(False)
    predictor = fastpred.DirectPredictor(16)  # rho=0.3, eps=0.1: the paper's best STL-10 run
    optimizer = torch.optim.SGD([*online.parameters(), *predictor.parameters()], lr=0.05, momentum=0.9)
    predictor.attach(optimizer)  # fold F and re-set W_p after each optimizer.step()

    for step in range(args.steps):
        x = torch.randn(args.batch, 32)
        v1, v2 = x + 0.1 * torch.randn_like(x), x + 0.1 * torch.randn_like(x)
        p1, p2 = predictor(online(v1)), predictor(online(v2))  # one call per view
        with torch.no_grad():
            t1, t2 = target(v1), target(v2)
        loss = byol_loss(p1, t2) + byol_loss(p2, t1)  # 2 - 2 cos per view pair; targets from no_grad
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()  # also one DirectPred step
        with torch.no_grad():
            for o, t in zip(online.parameters(), target.parameters()):
                t.lerp_(o, 0.01)  # EMA target, tau = 0.99
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  DirectPred steps {int(predictor.num_updates)}")
    assert int(predictor.num_updates) == args.steps


if __name__ == "__main__":
    main()
