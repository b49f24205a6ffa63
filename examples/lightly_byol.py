"""lightly's BYOL with DirectPred as the prediction head.

The model follows lightly's documented BYOL example (``BYOLProjectionHead``,
``update_momentum``, ``NegativeCosineSimilarity``, a cosine momentum schedule), with
``BYOLPredictionHead`` replaced by :class:`fastpred.DirectPredictor`, called once per
view as lightly does. Needs ``pip install lightly``.

    python examples/lightly_byol.py --steps 100

A small convolutional backbone on random 32x32 images keeps it quick on a CPU; put a
ResNet and a real dataset with lightly's transforms in their place for a real run.
"""
from __future__ import annotations

import argparse
import copy

import torch
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import BYOLProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.utils.scheduler import cosine_schedule
from torch import nn

import fastpred


class BYOL(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, dim: int = 64) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection_head = BYOLProjectionHead(feature_dim, 256, dim)
        self.prediction_head = fastpred.DirectPredictor(dim)  # instead of BYOLPredictionHead(dim, 256, dim)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.backbone(x).flatten(start_dim=1)
        return self.prediction_head(self.projection_head(y))

    def forward_momentum(self, x: torch.Tensor) -> torch.Tensor:
        y = self.backbone_momentum(x).flatten(start_dim=1)
        return self.projection_head_momentum(y).detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)

    backbone = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1))
    model = BYOL(backbone, feature_dim=32)
    criterion = NegativeCosineSimilarity()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.06)
    model.prediction_head.attach(optimizer)  # one DirectPred step per optimizer step

    for step in range(args.steps):
        momentum = cosine_schedule(step, args.steps, 0.996, 1)
        update_momentum(model.backbone, model.backbone_momentum, m=momentum)
        update_momentum(model.projection_head, model.projection_head_momentum, m=momentum)
        images = torch.rand(args.batch, 3, 32, 32)
        x0 = images + 0.05 * torch.randn_like(images)  # stand-ins for lightly's BYOLTransform views
        x1 = images.flip(-1)
        p0, p1 = model(x0), model(x1)  # the prediction head is called once per view
        z0, z1 = model.forward_momentum(x0), model.forward_momentum(x1)
        loss = 0.5 * (criterion(p0, z1) + criterion(p1, z0))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    assert int(model.prediction_head.num_updates) == args.steps


if __name__ == "__main__":
    main()
