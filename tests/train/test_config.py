import pytest

import fastpred
from train import config
from train.config import Config, ConfigError, load_config

PRESETS = sorted(p.stem for p in config.PRESET_DIR.glob("*.yaml"))


def test_presets_present():
    assert {"digits", "cifar10_r18", "stl10_r18", "imagenet_r50_300ep", "imagenet_r50_60ep"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_loads_and_round_trips(preset):
    cfg = load_config(preset)
    assert config.from_dict(config.to_dict(cfg)) == cfg


def test_digits_yaml_equals_dataclass_defaults():
    # digits is the default: the YAML spells out the dataclass defaults, and they must not drift
    assert load_config("digits") == Config()
    assert load_config(None) == Config()


def test_directpred_keys_build_the_same_module_as_the_library_defaults():
    # the trainer's defaults make the module fastpred.DirectPredictor makes with its own defaults
    kwargs = config.directpred_kwargs(Config().predictor)
    ours, theirs = fastpred.DirectPredictor(8, **kwargs), fastpred.DirectPredictor(8)
    for k in kwargs:
        assert getattr(ours, k) == getattr(theirs, k), k


# a value other than the default for every DirectPredictor key of PredictorConfig
NON_DEFAULT = {"rho": 0.5, "eps": 0.2, "freq": 5, "power": 1.0, "eps_mode": "absolute", "zero_mean": True,
               "min_eig": 1e-3, "sync": False, "backend": "torch", "partitions": 2, "async_rebuild": True,
               "solver": "newton_schulz"}


def test_every_directpred_key_reaches_the_module():
    assert set(config.directpred_kwargs(Config().predictor)) == set(NON_DEFAULT)  # a new key needs a value here
    for key, value in NON_DEFAULT.items():  # one at a time (newton_schulz needs the default power 0.5)
        cfg = load_config(None, [f"predictor.{key}={value}"])
        module = fastpred.DirectPredictor(8, **config.directpred_kwargs(cfg.predictor))
        assert getattr(module, key) == value, key


def test_overrides_are_typed():
    cfg = load_config("cifar10_r18", ["optim.lr=1", "aug.crop_scale=[0.2, 1]", "model.ema=false", "data.root=/x"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.aug.crop_scale == (0.2, 1.0)
    assert cfg.model.ema is False and cfg.data.root == "/x"


@pytest.mark.parametrize("override, needle", [
    ("predictor.nope=1", "predictor.nope"),
    ("nope=1", "'nope'"),
    ("optimizer.lr=1", "optimizer.lr"),
    ("optim.lr=fast", "optim.lr"),
    ("epochs=1.5", "epochs"),
    ("aug.blur_p=[1.0]", "aug.blur_p"),
    ("model=3", "model"),
    ("no_equals_sign", "key=value"),
])
def test_bad_override_names_the_key(override, needle):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(None, [override])
    assert needle in str(e.value)


def test_unknown_key_in_yaml_is_named(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("epochs: 1\nmodel: {arch: resnet18, widht: 3}\n")
    with pytest.raises(ConfigError, match="model.widht"):
        load_config(str(f))


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ConfigError, match="cifar10_r18"):
        load_config("cifar100")


def test_cli_reports_a_bad_key_without_traceback(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "train.pretrain", "--out", str(tmp_path / "o"), "optim.lrr=0.1"],
                          cwd=repo, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "optim.lrr" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- issue 20.6: YAML 1.2 numbers


@pytest.mark.parametrize("text", ["1e-4", "1e-05", "1E3", "4.0e-4", ".5", "1.", "-2.5e+1", "0.00001"])
def test_numbers_parse_as_python_reads_them(text):
    # PyYAML's YAML 1.1 read "1e-4" (no dot) as text; Python and YAML 1.2 read a number
    assert config.parse_override(f"optim.lr={text}") == ("optim.lr", float(text))


@pytest.mark.parametrize("text, value", [("010", 10), ("0x1f", 31), ("0o17", 15), ("-3", -3), ("yes", "yes"),
                                         ("on", "on"), ("true", True), ("False", False)])
def test_plain_scalars_follow_yaml_1_2(text, value):
    # YAML 1.1: 010 is 8 and yes/on are booleans; YAML 1.2's core schema: 10 and text
    assert config.parse_override(f"k={text}")[1] == value


def test_small_float_override_and_preset_value(tmp_path):
    assert load_config(None, ["predictor.min_eig=1e-4"]).predictor.min_eig == 1e-4
    preset = tmp_path / "p.yaml"
    preset.write_text("optim: {weight_decay: 1e-5, lr: 2e-2}\n")
    cfg = load_config(str(preset))
    assert (cfg.optim.weight_decay, cfg.optim.lr) == (1e-5, 2e-2)


def test_small_float_in_a_study_grid_row(tmp_path):
    # the grid's 0.00001 became the override text "1e-05", which YAML 1.1 refused as a number
    from train import study

    grid = tmp_path / "g.yaml"
    grid.write_text("preset: digits\nseeds: 1\nrows:\n  - name: wd\n    set: {optim.weight_decay: 0.00001}\n")
    g = study.load_grid(str(grid))
    assert study.run_config(g, g.rows[0], 0)["optim"]["weight_decay"] == 1e-5


def test_duplicate_key_in_a_preset_is_refused_naming_it(tmp_path):
    # issue 20.11: PyYAML keeps the last of two equal keys silently
    preset = tmp_path / "dup.yaml"
    preset.write_text("epochs: 3\nseed: 1\nepochs: 5\n")
    with pytest.raises(ConfigError, match="duplicate key 'epochs'.*line 3"):
        load_config(str(preset))


def test_yaml_syntax_error_is_one_line(tmp_path):
    preset = tmp_path / "bad.yaml"
    preset.write_text("optim: {lr: [\n")
    with pytest.raises(ConfigError, match="bad.yaml.*invalid YAML") as e:
        load_config(str(preset))
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- issue 25: the command line and the views


def test_overrides_are_accepted_anywhere_on_the_command_line(tmp_path, capsys):
    # `... --fresh optim.lr=0.1` after an earlier key=value was argparse's "unrecognized arguments"
    from train import pretrain

    pretrain.cli(["--out", str(tmp_path / "o"), "epochs=3", "--fresh", "optim.lr=0.1", "--print-config", "seed=7"])
    printed = config.load_yaml(capsys.readouterr().out)
    assert (printed["epochs"], printed["optim"]["lr"], printed["seed"]) == (3, 0.1, 7)
    assert not (tmp_path / "o").exists()


def test_a_crop_scale_whose_lower_bound_is_above_the_upper_is_refused():
    # torchvision only warns, then samples crops from an empty area range
    with pytest.raises(ConfigError, match=r"aug\.crop_scale=\[1, 0\.5\]: the lower bound") as e:
        load_config(None, ["aug.crop_scale=[1.0, 0.5]"])
    assert "\n" not in str(e.value)
    assert load_config(None, ["aug.crop_scale=[0.5, 0.5]"]).aug.crop_scale == (0.5, 0.5)


@pytest.mark.parametrize("overrides, needle", [
    (["data.image_size=1", "aug.blur_p=[1, 1]"], "data.image_size=1 is too small to blur"),
    (["aug.blur_kernel=2", "aug.blur_p=[1, 1]"], "aug.blur_kernel=2 makes a 17-pixel blur kernel"),  # digits: 8 px
])
def test_a_blur_kernel_wider_than_the_image_is_refused_before_the_run(overrides, needle):
    # it was a 35-81-line traceback at the first batch, in both view paths
    with pytest.raises(ConfigError, match=needle) as e:
        load_config(None, overrides)
    assert "\n" not in str(e.value)
    load_config(None, overrides[:1])  # no blur (blur_p 0): nothing to refuse


@pytest.mark.parametrize("batched", [True, False])
def test_the_widest_accepted_blur_kernel_runs_and_the_next_one_fails_in_torchvision(batched):
    # the rule's reference is torchvision's GaussianBlur (reflect padding): a 15-pixel kernel blurs an
    # 8-pixel image, a 17-pixel one does not
    import torch
    from torchvision.transforms import v2 as T

    from train.augment import view_transform
    from train.batch_augment import BatchAugment

    T.GaussianBlur(15, sigma=1.0)(torch.rand(1, 8, 8))
    with pytest.raises(RuntimeError):
        T.GaussianBlur(17, sigma=1.0)(torch.rand(1, 8, 8))
    cfg = load_config(None, ["aug.blur_kernel=1.9", "aug.blur_p=[1, 1]"])  # round(8 x 1.9) = 15 pixels
    with pytest.raises(ConfigError, match="17-pixel"):
        load_config(None, ["aug.blur_kernel=2", "aug.blur_p=[1, 1]"])  # 16, made odd: 17
    images = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    if batched:
        v1, v2 = BatchAugment(cfg.aug, 8, (0.5,), (0.25,), seed=0)(images, torch.zeros(4, dtype=torch.long), torch.arange(4))
    else:
        v1 = view_transform(cfg.aug, 0, 8, (0.5,), (0.25,))(images[0])
    assert v1.isfinite().all()
