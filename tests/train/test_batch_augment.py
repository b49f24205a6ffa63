"""Batched two-view augmentation (train.batch_augment): its parameters have the distributions of
torchvision's per-sample transforms (two-sample tests against draws from torchvision itself), its
pixels are torchvision's functional ops applied with the same parameters, and a sample's views do
not depend on its batch. Resume with it: tests/train/test_resume.py."""

from __future__ import annotations

import math
import numpy as np
import pytest
import torch
from scipy import stats
from torchvision import transforms as T1
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as F

from train import data
from train import batch_augment as ba
from train.config import AugConfig

N = 100_000  # draws per distribution
P_MIN = 1e-4  # a two-sample test fails below this p-value (deterministic draws: no flaky failures)


def _draw(cfg: AugConfig, n: int, height: int, width: int, view: int = 0, seed: int = 0) -> ba.ViewParams:
    u = ba.uniforms(seed, np.full(n, 3), np.arange(n), view)
    return ba.draw_params(cfg, view, u, height, width)


def _chi2_same(a: np.ndarray, b: np.ndarray) -> float:
    """p-value of a chi-square test that two samples of a discrete variable share a distribution
    (values seen fewer than 20 times in all are pooled)."""
    values, inverse = np.unique(np.concatenate([a, b]), return_inverse=True)
    counts = np.stack([np.bincount(inverse[: len(a)], minlength=len(values)),
                       np.bincount(inverse[len(a):], minlength=len(values))])
    rare = counts.sum(0) < 20
    table = np.concatenate([counts[:, ~rare], counts[:, rare].sum(1, keepdims=True)], axis=1)
    table = table[:, table.sum(0) > 0]
    return stats.chi2_contingency(table)[1]


# ----------------------------------------------------------------------------- the random stream


def test_uniforms_are_uniform_and_independent():
    u = ba.uniforms(0, np.zeros(N, dtype=np.int64), np.arange(N), 0)  # (N, SLOTS)
    assert u.shape == (N, ba.SLOTS) and u.min() >= 0 and u.max() < 1
    assert stats.kstest(u[:, 0], "uniform").pvalue > P_MIN
    assert stats.kstest(u[:, -1], "uniform").pvalue > P_MIN
    limit = 5 / math.sqrt(N)  # five standard errors of a correlation between independent uniforms
    assert abs(np.corrcoef(u[:-1, 0], u[1:, 0])[0, 1]) < limit  # neighbouring indices
    assert abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < limit  # neighbouring slots
    v = ba.uniforms(0, np.ones(N, dtype=np.int64), np.arange(N), 0)  # next epoch
    w = ba.uniforms(0, np.zeros(N, dtype=np.int64), np.arange(N), 1)  # other view
    s = ba.uniforms(1, np.zeros(N, dtype=np.int64), np.arange(N), 0)  # other seed
    for other in (v, w, s):
        assert abs(np.corrcoef(u[:, 0], other[:, 0])[0, 1]) < limit
        assert not np.any(u[:, 0] == other[:, 0])


def test_uniforms_are_a_function_of_the_sample_only():
    idx = np.array([5, 17, 3, 900])
    ep = np.array([0, 2, 2, 7])
    whole = ba.uniforms(4, ep, idx, 1)
    for k in range(len(idx)):
        np.testing.assert_array_equal(ba.uniforms(4, ep[k:k + 1], idx[k:k + 1], 1)[0], whole[k])


# ----------------------------------------------------------------------------- parameter distributions


@pytest.mark.parametrize("height, width, scale, n", [(28, 28, (0.3, 1.0), N), (32, 32, (0.08, 1.0), N // 4),
                                                     (8, 40, (0.08, 1.0), N // 4)],
                         ids=["fashion", "cifar", "wide-fallback"])
def test_crop_boxes_match_torchvision(height, width, scale, n):
    """Box side, area, aspect and position histograms against RandomResizedCrop.get_params's own
    draws (the 8 x 40 image is wider than any allowed ratio: most draws end in the fallback)."""
    cfg = AugConfig(crop_scale=scale)
    p = _draw(cfg, n, height, width)
    torch.manual_seed(0)
    img = torch.empty(1, height, width)
    ref = np.array([T1.RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3]) for _ in range(n)])
    top, left, h, w = (t.numpy() for t in (p.top, p.left, p.height, p.width))
    rt, rl, rh, rw = ref.T
    assert _chi2_same(h * 1000 + w, rh * 1000 + rw) > P_MIN  # joint (height, width)
    assert _chi2_same(h * w, rh * rw) > P_MIN  # area
    assert stats.ks_2samp(np.log(w / h), np.log(rw / rh)).pvalue > P_MIN  # aspect
    # position: uniform over the free range, same as torchvision's randint
    assert stats.ks_2samp(top / np.maximum(height - h, 1), rt / np.maximum(height - rh, 1)).pvalue > P_MIN
    assert stats.ks_2samp(left / np.maximum(width - w, 1), rl / np.maximum(width - rw, 1)).pvalue > P_MIN
    assert (top >= 0).all() and (top + h <= height).all() and (left >= 0).all() and (left + w <= width).all()


def test_crop_boxes_detect_a_wrong_scale():
    """The test above has power: a box distribution off by a little fails it."""
    p = _draw(AugConfig(crop_scale=(0.32, 1.0)), N // 4, 28, 28)
    torch.manual_seed(0)
    ref = np.array([T1.RandomResizedCrop.get_params(torch.empty(1, 28, 28), [0.3, 1.0], [3 / 4, 4 / 3])
                    for _ in range(N // 4)])
    assert _chi2_same((p.height * p.width).numpy(), ref[:, 2] * ref[:, 3]) < P_MIN


def _binomial_ok(hits: np.ndarray, p: float) -> bool:
    n = len(hits)
    return abs(hits.mean() - p) <= 5 * math.sqrt(max(p * (1 - p), 1e-12) / n)


@pytest.mark.parametrize("view", [0, 1])
def test_application_rates(view):
    """Each transform applies with its probability (torchvision: ``torch.rand(1) < p``)."""
    cfg = AugConfig(flip=0.5, jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, gray_p=0.2, blur_p=(1.0, 0.1),
                    solarize_p=(0.0, 0.2))
    p = _draw(cfg, N, 32, 32, view)
    assert _binomial_ok(p.flip.numpy(), 0.5)
    assert _binomial_ok(p.jitter.numpy(), 0.8)
    assert _binomial_ok(p.gray.numpy(), 0.2)
    assert _binomial_ok(p.blur.numpy(), cfg.blur_p[view])
    assert _binomial_ok(p.solarize.numpy(), cfg.solarize_p[view])
    # the decisions are independent of one another: joint rate = product of the rates
    assert _binomial_ok((p.flip & p.gray).numpy(), 0.5 * 0.2)
    assert _binomial_ok((p.jitter & p.flip).numpy(), 0.8 * 0.5)


def test_jitter_factors_order_and_sigma_match_torchvision():
    """ColorJitter's factors and operation order, GaussianBlur's sigma: two-sample tests against
    the transforms' own ``make_params``."""
    n = N // 5
    jitter = (0.4, 0.4, 0.2, 0.1)
    p = _draw(AugConfig(jitter=jitter), n, 32, 32)
    torch.manual_seed(0)
    cj, blur = T.ColorJitter(*jitter), T.GaussianBlur(3, sigma=ba.SIGMA)
    ref = [cj.make_params([]) for _ in range(n)]
    names = ["brightness_factor", "contrast_factor", "saturation_factor", "hue_factor"]
    for k, name in enumerate(names):
        assert stats.ks_2samp(p.factors[:, k].numpy(), [r[name] for r in ref]).pvalue > P_MIN, name
    perm_code = lambda order: order @ np.array([64, 16, 4, 1])  # one integer per permutation
    ours = perm_code(p.order.numpy())
    theirs = perm_code(np.stack([r["fn_idx"].numpy() for r in ref]))
    assert len(np.unique(ours)) == 24 and _chi2_same(ours, theirs) > P_MIN
    sig = [blur.make_params([])["sigma"][0] for _ in range(n)]
    assert stats.ks_2samp(p.sigma.numpy(), sig).pvalue > P_MIN


def test_jitter_of_zero_strength_is_left_out():
    p = _draw(AugConfig(jitter=(0.0, 0.0, 0.0, 0.0), jitter_p=0.8), 1000, 8, 8)
    assert not p.jitter.any()
    for strengths in [(0.4, 0.0, 0.9, 0.0), (1.5, 0.4, 0.0, 0.5)]:  # ranges as ColorJitter's (low end >= 0)
        cj = T.ColorJitter(*strengths)
        ours = ba.jitter_ranges(strengths)
        for r, theirs in zip(ours, (cj.brightness, cj.contrast, cj.saturation, cj.hue)):
            assert (r is None and theirs is None) or r == pytest.approx(tuple(theirs))


# ----------------------------------------------------------------------------- pixels


def _params(boxes, flips, **kw) -> ba.ViewParams:
    b = len(boxes)
    top, left, h, w = (torch.tensor(c) for c in zip(*boxes))
    fields = dict(flip=torch.tensor(flips), jitter=torch.zeros(b, dtype=torch.bool),
                  order=torch.arange(4).repeat(b, 1), factors=torch.ones(b, 4, dtype=torch.float64),
                  gray=torch.zeros(b, dtype=torch.bool), blur=torch.zeros(b, dtype=torch.bool),
                  sigma=torch.ones(b, dtype=torch.float64), solarize=torch.zeros(b, dtype=torch.bool))
    fields.update(kw)
    return ba.ViewParams(top=top, left=left, height=h, width=w, **fields)


# (top, left, height, width): downscaled whole image, up- and downscaled boxes, a 1-pixel-wide one
BOXES = [(0, 0, 28, 40), (3, 5, 10, 12), (10, 2, 17, 35), (0, 39, 28, 1), (20, 20, 8, 9), (1, 1, 26, 30)]


@pytest.mark.parametrize("size", [16, 24, 31])
def test_resized_crop_matches_torchvision_on_fixed_boxes(size):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(len(BOXES), 3, 28, 40, generator=g)
    flips = [False, True, False, True, False, False]
    out = ba.resized_crop(images, _params(BOXES, flips), size)
    for k, ((top, left, h, w), flip) in enumerate(zip(BOXES, flips)):
        ref = F.resized_crop(images[k], top, left, h, w, [size, size], antialias=True)
        ref = F.horizontal_flip(ref) if flip else ref
        torch.testing.assert_close(out[k], ref, atol=1e-5, rtol=0)


def test_resized_crop_of_uint8_within_one_level_of_torchvision():
    """The per-sample path resamples uint8 images in fixed point, rounding after each pass; the
    batched one keeps floats."""
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (len(BOXES), 1, 28, 40), generator=g, dtype=torch.uint8)
    out = ba.resized_crop(images.float() / 255, _params(BOXES, [False] * len(BOXES)), 20) * 255
    for k, (top, left, h, w) in enumerate(BOXES):
        ref = F.resized_crop(images[k], top, left, h, w, [20, 20], antialias=True).float()
        assert (out[k] - ref).abs().max() <= 1 + 1e-3


def test_full_view_matches_torchvision_functional_ops():
    """Every operation on, per sample, against torchvision's functional ops applied with the
    sample's own parameters in torchvision's order (crop, flip, jitter in the drawn order,
    grayscale, blur, solarize, normalise), on float images."""
    cfg = AugConfig(crop_scale=(0.08, 1.0), flip=0.5, jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, gray_p=0.3,
                    blur_p=(0.5, 0.5), blur_kernel=0.1, solarize_p=(0.5, 0.5))
    size, n = 32, 48
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    augment = ba.BatchAugment(cfg, size, mean, std, seed=3)
    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (n, 3, 36, 36), generator=g, dtype=torch.uint8)
    idx, ep = torch.arange(n), torch.full((n,), 1)
    p = augment.params(ep, idx, 0, 36, 36)
    assert p.jitter.any() and p.blur.any() and p.solarize.any() and p.gray.any() and p.flip.any()
    out = augment.view(images, p)
    ops = [F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue]
    kernel = augment.kernel  # train.augment's: odd, at least 3
    for k in range(n):
        x = images[k].float() / 255
        x = F.resized_crop(x, int(p.top[k]), int(p.left[k]), int(p.height[k]), int(p.width[k]), [size, size],
                           antialias=True)
        if p.flip[k]:
            x = F.horizontal_flip(x)
        if p.jitter[k]:
            for op in p.order[k].tolist():
                x = ops[op](x, float(p.factors[k, op]))
        if p.gray[k]:
            x = F.rgb_to_grayscale(x, num_output_channels=3)
        if p.blur[k]:
            x = F.gaussian_blur(x, [kernel, kernel], [float(p.sigma[k])] * 2)
        if p.solarize[k]:
            x = F.solarize(x, 128 / 255)
        x = F.normalize(x, list(mean), list(std))
        torch.testing.assert_close(out[k], x, atol=1e-4, rtol=0, msg=f"sample {k}")


def test_grey_images_skip_saturation_hue_and_grayscale():
    """As torchvision (and PIL): on 1-channel images saturation, hue and grayscale change nothing."""
    images = torch.randint(0, 256, (64, 1, 12, 12), dtype=torch.uint8)
    key = (torch.zeros(64, dtype=torch.int64), torch.arange(64))
    with_them = ba.BatchAugment(AugConfig(jitter=(0.0, 0.0, 0.9, 0.5), jitter_p=1.0, gray_p=1.0), 12, (0.3,), (0.4,), 0)
    without = ba.BatchAugment(AugConfig(jitter=(0.0, 0.0, 0.0, 0.0), gray_p=0.0), 12, (0.3,), (0.4,), 0)
    assert with_them.params(*key, 0, 12, 12).jitter.all()
    for a, b in zip(with_them(images, *key), without(images, *key)):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- batch independence, resume


def test_views_do_not_depend_on_the_batch():
    """A sample's two views are the same, bit for bit, whichever batch it lands in."""
    cfg = AugConfig(crop_scale=(0.08, 1.0), flip=0.5, jitter=(0.4, 0.4, 0.4, 0.1), gray_p=0.2, blur_p=(1.0, 0.1),
                    solarize_p=(0.0, 0.2))
    augment = ba.BatchAugment(cfg, 24, (0.5,) * 3, (0.25,) * 3, seed=11)
    g = torch.Generator().manual_seed(0)
    pool = torch.randint(0, 256, (64, 3, 28, 28), generator=g, dtype=torch.uint8)
    epochs = torch.randint(0, 3, (64,), generator=g)
    whole = augment(pool, epochs, torch.arange(64))
    for batch in (torch.tensor([5]), torch.randperm(64, generator=g)[:17], torch.arange(63, -1, -1)):
        part = augment(pool[batch], epochs[batch], batch)
        for a, b in zip(whole, part):
            assert torch.equal(a[batch], b)


def test_batched_views_loader_yields_the_samplers_batches():
    ds = data.Digits("train")
    sampler = data.ResumableSampler(ds, 32, 1, 0, seed=5)
    sampler.set_epoch(2, start_batch=3)
    seen = []
    loader = data.BatchedViews(ds, sampler, 32, lambda x, e, i: (seen.append((e, i)) or (x.float(), x.float())),
                               torch.device("cpu"))
    batches = list(loader)
    assert len(batches) == len(loader) == sampler.batches_per_epoch() - 3
    keys = list(iter(sampler))
    flat = [(int(e), int(i)) for es, ix in seen for e, i in zip(es, ix)]
    assert flat == keys[: len(flat)] and len(flat) == 32 * len(batches)
    v1, v2, labels, skipped = batches[0]
    assert torch.equal(labels, torch.as_tensor(ds.targets)[seen[0][1]]) and int(skipped.sum()) == 0
    assert torch.equal(v1, ds.images[seen[0][1]].float())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_views_on_cuda_match_the_cpu():
    cfg = AugConfig(crop_scale=(0.08, 1.0), flip=0.5, jitter=(0.4, 0.4, 0.4, 0.1), gray_p=0.2, blur_p=(1.0, 0.1),
                    solarize_p=(0.0, 0.2))
    augment = ba.BatchAugment(cfg, 32, (0.5,) * 3, (0.25,) * 3, seed=1)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    key = (torch.zeros(64, dtype=torch.int64), torch.arange(64))
    for a, b in zip(augment(images, *key), augment(images.cuda(), *key)):
        assert b.is_cuda
        torch.testing.assert_close(b.cpu(), a, atol=1e-4, rtol=0)
