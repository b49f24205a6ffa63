import pytest
import torch

from train import data
from train.augment import two_view_transforms
from train.config import AugConfig, ConfigError, DataConfig, load_config
from train.pretrain import main as pretrain_main


def test_digits_split_and_shapes():
    tr, te = data.Digits("train"), data.Digits("test")
    assert len(tr) + len(te) == 1797 and len(te) == 360
    img, label = tr[0]
    assert img.shape == (1, 8, 8) and img.dtype == torch.uint8 and 0 <= label < 10
    assert sorted(set(te.targets)) == list(range(10))  # stratified


def test_fake_cifar_and_stl_read(fake_cifar, fake_stl):
    c = data.raw_dataset(DataConfig(name="cifar10", root=str(fake_cifar)), "train")
    assert len(c) == 20 and c[0][0].shape == (3, 32, 32)
    s = data.raw_dataset(DataConfig(name="stl10", root=str(fake_stl)), "pretrain")
    assert len(s) == 16 and s[0][0].shape == (3, 96, 96)
    assert s.targets[:8] == [i % 10 for i in range(8)] and s.targets[8:] == [-1] * 8  # unlabeled last


@pytest.mark.parametrize("name", ["cifar10", "stl10", "imagefolder"])
def test_wrong_data_path_fails_at_start_naming_it(name, tmp_path):
    missing = tmp_path / "nowhere"
    cfg = load_config(None, [f"data.name={name}", f"data.root={missing}"])
    with pytest.raises(ConfigError, match="data.root"):
        pretrain_main(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written
    tmp_path.joinpath("empty").mkdir()
    cfg = load_config(None, [f"data.name={name}", f"data.root={tmp_path / 'empty'}"])
    with pytest.raises(ConfigError, match="lacks"):
        pretrain_main(cfg, tmp_path / "out")


def test_resumable_sampler_skips_consumed_batches():
    ds = list(range(103))
    full = data.ResumableSampler(ds, batch_size=10, num_replicas=2, rank=1, seed=5)
    full.set_epoch(3)
    whole = list(full)
    assert all(e == 3 for e, _ in whole) and len(whole) == 51
    part = data.ResumableSampler(ds, batch_size=10, num_replicas=2, rank=1, seed=5)
    part.set_epoch(3, start_batch=2)
    assert list(part) == whole[20:] and len(part) == 31
    other = data.ResumableSampler(ds, batch_size=10, num_replicas=2, rank=0, seed=5)
    other.set_epoch(3)
    assert not {i for _, i in whole} & {i for _, i in other}  # disjoint shards
    full.set_epoch(4)
    assert [i for _, i in full] != [i for _, i in whole]  # a new permutation each epoch


def test_augmentations_are_seeded_per_sample_not_by_global_rng():
    base = data.Digits("train")
    v = data.Views(base, two_view_transforms(AugConfig(), 8, (0.3,), (0.4,)), seed=7)
    a1, a2, label, skipped = v[(2, 11)]
    torch.manual_seed(123)  # the global stream does not matter ...
    b1, b2, *_ = v[(2, 11)]
    assert torch.equal(a1, b1) and torch.equal(a2, b2) and skipped == 0
    c1, _, *_ = v[(3, 11)]  # ... but the epoch does
    assert not torch.equal(a1, c1)
    assert not torch.equal(a1, a2)  # two different views


def test_byol_asymmetric_views():
    cfg = load_config("imagenet_r50_300ep").aug
    t1, t2 = two_view_transforms(cfg, 64, (0.5,) * 3, (0.5,) * 3)
    names1 = [type(t).__name__ for t in t1.transforms]
    names2 = [type(t).__name__ for t in t2.transforms]
    assert "RandomSolarize" not in names1 and "RandomSolarize" in names2  # solarize p 0 / 0.2
    blur = [t for t in t1.transforms if type(t).__name__ == "RandomApply" and
            type(t.transforms[0]).__name__ == "GaussianBlur"]
    assert blur and blur[0].p == 1.0
    blur2 = [t for t in t2.transforms if type(t).__name__ == "RandomApply" and
             type(t.transforms[0]).__name__ == "GaussianBlur"]
    assert blur2[0].p == 0.1
