"""The digits default learns something a random network does not.

Criterion: weighted-kNN top-1 on the 360 held-out digits after a short run of the default preset
(5 epochs = 55 steps), learned backbone vs the *same* network at its random initialisation (rebuilt
from the run's seed), must improve by at least 3 points.

Why kNN and not the linear probe: a trained linear classifier already gets 91-95% from random
ResNet features on digits, so its gap is small and seed-dependent (measured after 5 epochs, seeds
0-4: +1.7 to +4.2 points; after 10 epochs of an earlier, weaker preset it was even negative for one
seed). kNN has no fitted parameters and no lr to select and reads the geometry the
self-supervised loss shapes: over seeds 0-4 it went from 84.7-89.2% (random init) to 91.9-95.8%
(learned), gaps +5.8 to +9.4 points. A 3-point threshold (11 test images) keeps a wide margin.
"""

import torch

from train import monitor
from train.config import load_config
from train.linear_eval import load_backbone
from train.pretrain import load_data  # the loaders the trainer's own kNN monitor uses
from train.utils import DistInfo

SHORT = ["epochs=5", "monitor.knn_every=5", "monitor.probe=false", "ckpt.every_steps=0"]


def test_digits_default_learns_beyond_random_init(tmp_path, run_pretrain):
    out = tmp_path / "digits"
    learned = run_pretrain(out, None, *SHORT)
    cfg = load_config(None, SHORT)
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    _, _, bank, test, n_classes, channels = load_data(cfg, info)
    backbone = load_backbone(cfg, None, channels, info.device)  # the weights training started from
    tr_f, tr_y = monitor.extract_features(backbone, bank, info.device)
    te_f, te_y = monitor.extract_features(backbone, test, info.device)
    random_knn = monitor.knn_top1(tr_f, tr_y, te_f, te_y, cfg.monitor.knn_k, cfg.monitor.knn_t, n_classes)
    assert learned["knn_top1"] >= random_knn + 3.0, (learned, random_knn)
    # and the learned state really is the trained one, not the initialisation
    state = torch.load(out / "last.pt", weights_only=True)["model"]
    init = load_backbone(cfg, None, channels, info.device).state_dict()
    assert any(not torch.equal(state[f"backbone.{k}"], v) for k, v in init.items())
