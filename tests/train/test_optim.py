import math

import pytest
import torch
import torch.nn as nn

from train.config import OptimConfig
from train.optim import LARS, build_optimizer, build_scheduler, ema_tau, lr_factor, param_groups, scaled_lr


def _lrs(cfg: OptimConfig, steps: int, steps_per_epoch: int, total: int) -> list[float]:
    """The learning rate the optimizer actually uses at steps 0..steps-1."""
    model = nn.Linear(3, 3)
    opt = build_optimizer(cfg, model, global_batch=256)
    sched = build_scheduler(cfg, opt, total, steps_per_epoch)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_then_cosine_against_formula():
    # 10 steps/epoch, 2 warm-up epochs, 100 steps in all, lr 0.4
    cfg = OptimConfig(name="sgd", lr=0.4, warmup_epochs=2, schedule="cosine")
    lrs = _lrs(cfg, 100, steps_per_epoch=10, total=100)
    assert lrs[0] == 0.0
    assert lrs[5] == pytest.approx(0.4 * 5 / 20)
    assert lrs[19] == pytest.approx(0.4 * 19 / 20)
    assert lrs[20] == pytest.approx(0.4)  # warm-up done, cosine starts at its top
    for k in (20, 37, 60, 99):
        assert lrs[k] == pytest.approx(0.4 * 0.5 * (1 + math.cos(math.pi * (k - 20) / 80)))
    assert lrs[60] == pytest.approx(0.2)  # half-way through the cosine


def test_constant_schedule_and_lr_scaling():
    cfg = OptimConfig(name="sgd", lr=0.03, schedule="constant")
    assert set(_lrs(cfg, 7, 5, 50)) == {0.03}
    byol = OptimConfig(name="lars", lr=0.3, lr_batch=256)
    assert scaled_lr(byol, 4096) == pytest.approx(4.8)  # BYOL: 0.3 x 4096 / 256
    assert lr_factor(5, 100, 0, "constant") == 1.0
    with pytest.raises(ValueError, match="optim.schedule"):
        lr_factor(5, 100, 0, "step")


def test_ema_tau_cosine_against_formula():
    K, base = 1000, 0.99
    assert ema_tau(0, K, base, "cosine") == pytest.approx(base)
    assert ema_tau(K, K, base, "cosine") == pytest.approx(1.0)
    assert ema_tau(K // 2, K, base, "cosine") == pytest.approx(1 - (1 - base) * 0.5)
    for k in (1, 250, 777):
        assert ema_tau(k, K, base, "cosine") == pytest.approx(1 - (1 - base) * (math.cos(math.pi * k / K) + 1) / 2)
    assert ema_tau(123, K, 0.996, "constant") == 0.996


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)


def test_lars_excludes_biases_and_bn():
    net = _Net()
    groups = param_groups(net, weight_decay=1e-6, exclude_bias_bn=True)
    regular, excluded = ({id(p) for p in g["params"]} for g in groups)
    assert regular == {id(net.conv.weight), id(net.fc.weight)}
    assert excluded == {id(net.conv.bias), id(net.bn.weight), id(net.bn.bias), id(net.fc.bias)}
    assert groups[1]["weight_decay"] == 0.0 and groups[1]["lars"] is False
    assert groups[0]["weight_decay"] == 1e-6 and groups[0]["lars"] is True
    # without exclusion everything is one regular group
    assert len(param_groups(net, 1e-6, exclude_bias_bn=False)) == 1


def test_lars_update_rule():
    torch.manual_seed(0)
    w, b = nn.Parameter(torch.randn(5, 4)), nn.Parameter(torch.randn(5))
    w.grad, b.grad = torch.randn(5, 4), torch.randn(5)
    w0, b0, gw, gb = w.detach().clone(), b.detach().clone(), w.grad.clone(), b.grad.clone()
    lr, wd, eta = 0.5, 0.01, 0.001
    opt = LARS([{"params": [w], "weight_decay": wd, "lars": True},
                {"params": [b], "weight_decay": 0.0, "lars": False}], lr=lr, momentum=0.9, weight_decay=wd, eta=eta)
    opt.step()
    d = gw + wd * w0
    expected_w = w0 - lr * (eta * w0.norm() / d.norm()) * d  # adapted, with weight decay
    assert torch.allclose(w.detach(), expected_w, atol=1e-6)
    assert torch.allclose(b.detach(), b0 - lr * gb, atol=1e-6)  # excluded: plain SGD step
    # second step: momentum on the adapted update
    w.grad, b.grad = gw.clone(), gb.clone()
    opt.step()
    assert torch.allclose(b.detach(), b0 - lr * gb - lr * (0.9 * gb + gb), atol=1e-5)


def test_unknown_optimizer_is_named():
    with pytest.raises(ValueError, match="optim.name='adam'"):
        build_optimizer(OptimConfig(name="adam"), nn.Linear(2, 2), 256)
