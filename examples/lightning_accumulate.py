"""PyTorch Lightning with gradient accumulation and bf16 mixed precision.

With ``accumulate_grad_batches=2`` Lightning calls ``optimizer.step()`` once every two
micro-batches; ``DirectPredictor.attach`` hooks that step, so F takes one EMA step per
optimizer step from both micro-batches (and both views) together, exactly like one step
on their union. The predictor is attached when training starts and detached when it
ends (not in ``configure_optimizers``), so a second ``trainer.fit`` or an ``lr_find``
before ``fit`` attaches to the optimizer of that run. The EMA target also moves once per
optimizer step (``optimizer_step``), not once per micro-batch. Needs ``pip install lightning``.

    python examples/lightning_accumulate.py --steps 20
"""
from __future__ import annotations

import argparse
import copy

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastpred
from fastpred.losses import byol_loss


class BYOLModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.online = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))
        self.target = copy.deepcopy(self.online).requires_grad_(False)
        self.predictor = fastpred.DirectPredictor(16)
        self.target_updates = 0
        self._attachment = None

    def training_step(self, batch, batch_idx):
        (x,) = batch
        v1, v2 = x + 0.1 * torch.randn_like(x), x + 0.1 * torch.randn_like(x)
        p1, p2 = self.predictor(self.online(v1)), self.predictor(self.online(v2))
        with torch.no_grad():
            t1, t2 = self.target(v1), self.target(v2)
        loss = byol_loss(p1, t2) + byol_loss(p2, t1)  # float32 whatever bf16-mixed says
        self.log("loss", loss, prog_bar=True)
        return loss

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)  # once per 2 micro-batches; the predictor's step follows it
        with torch.no_grad():  # the EMA target: once per optimizer step
            for o, t in zip(self.online.parameters(), self.target.parameters()):
                t.lerp_(o, 0.01)
        self.target_updates += 1

    def on_train_start(self):
        # This run's optimizer (a new one at every fit / lr_find): one DirectPred step per step of it.
        self._attachment = self.predictor.attach(self.trainer.optimizers[0])

    def on_train_end(self):
        self._attachment.remove()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def fit(module: BYOLModule, steps: int) -> L.Trainer:
    """``steps`` optimizer steps of bf16-mixed training, two micro-batches each."""
    data = TensorDataset(torch.randn(2 * steps * 16, 32))
    trainer = L.Trainer(max_steps=steps, accumulate_grad_batches=2, precision="bf16-mixed", accelerator="cpu",
                        devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, DataLoader(data, batch_size=16))
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps")
    args = parser.parse_args()
    torch.manual_seed(0)
    module = BYOLModule()
    trainer = fit(module, args.steps)
    print(f"optimizer steps {trainer.global_step}, DirectPred steps {int(module.predictor.num_updates)}, "
          f"target updates {module.target_updates}")
    assert int(module.predictor.num_updates) == trainer.global_step == module.target_updates == args.steps


if __name__ == "__main__":
    main()
