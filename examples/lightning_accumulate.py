"""PyTorch Lightning with gradient accumulation and bf16 mixed precision.

With ``accumulate_grad_batches=2`` Lightning calls ``optimizer.step()`` once every two
micro-batches; ``DirectPredictor.attach`` hooks that step, so F takes one EMA step per
optimizer step from both micro-batches (and both views) together, exactly like one step
on their union. Needs ``pip install lightning``.

    python examples/lightning_accumulate.py --steps 20
"""
from __future__ import annotations

import argparse
import copy

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastpred


class BYOLModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.online = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))
        self.target = copy.deepcopy(self.online).requires_grad_(False)
        self.predictor = fastpred.DirectPredictor(16)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        v1, v2 = x + 0.1 * torch.randn_like(x), x + 0.1 * torch.randn_like(x)
        p1, p2 = self.predictor(self.online(v1)), self.predictor(self.online(v2))
        with torch.no_grad():
            t1, t2 = self.target(v1), self.target(v2)
        loss = (4 - 2 * F.cosine_similarity(p1, t2, dim=-1) - 2 * F.cosine_similarity(p2, t1, dim=-1)).mean()
        self.log("loss", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        with torch.no_grad():
            for o, t in zip(self.online.parameters(), self.target.parameters()):
                t.lerp_(o, 0.01)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.05)
        self.predictor.attach(optimizer)  # Lightning steps this optimizer once per 2 micro-batches
        return optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps")
    args = parser.parse_args()
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(2 * args.steps * 16, 32))
    module = BYOLModule()
    trainer = L.Trainer(max_steps=args.steps, accumulate_grad_batches=2, precision="bf16-mixed", accelerator="cpu",
                        devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, DataLoader(data, batch_size=16))
    print(f"optimizer steps {trainer.global_step}, DirectPred steps {int(module.predictor.num_updates)}")
    assert int(module.predictor.num_updates) == trainer.global_step == args.steps


if __name__ == "__main__":
    main()
