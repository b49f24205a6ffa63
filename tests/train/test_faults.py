"""Fault trials on the trainer, one test per failure the trials found (issue 13, F1-F13): corrupt,
incomplete and malicious checkpoints, bad values, two trainers on one folder, a re-run after
linear evaluation, stale temp files, a full disk and a folder that cannot be written."""

import contextlib
import errno
import fcntl
import io
import json
import os
import resource
import runpy
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train import checkpoint, linear_eval, pretrain
from train.config import Config, ConfigError, _flatten, from_dict, load_config, to_dict
from train.config_checks import RANGES
from train.metrics_log import MetricsLog

REPO = Path(__file__).resolve().parents[2]
# 1 epoch of 5 steps on digits: checkpoints at step 4 (ckpt.every_steps) and 5 (the epoch's end)
RUN = ["epochs=1", "batch_size=256", "ckpt.every_steps=4", "ckpt.keep=3", "monitor.knn_max_train=200"]
CKPT4, CKPT5 = "ckpt_000000004.pt", "ckpt_000000005.pt"


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 1-epoch run (never modified: tests work on copies)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("finished") / "run"
    pretrain.main(load_config(None, RUN), out)
    torch.set_num_threads(n)
    return out


def _copy(src: Path, dst: Path) -> Path:
    """A copy of a run folder in which last.pt is again a hard link to the newest checkpoint."""
    shutil.copytree(src, dst)
    newest = checkpoint.checkpoints(dst)[-1]
    (dst / "last.pt").unlink()
    os.link(newest, dst / "last.pt")
    return dst


def _flip(path: Path, n: int = 64) -> None:
    """Invert ``n`` bytes in the middle of the file (inside tensor data: the zip archive still opens)."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + n] = bytes(b ^ 0xFF for b in data[mid:mid + n])
    with open(path, "r+b") as f:  # in place: last.pt, a hard link, changes too
        f.write(data)


def _listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != ".lock"}


def _cli(argv: list[str]) -> str:
    """Run ``python -m train.pretrain ARGV`` in this process; return its error line (it must exit 1)."""
    stderr = io.StringIO()
    with pytest.raises(SystemExit) as e, contextlib.redirect_stderr(stderr):
        pretrain.cli(argv)
    text = stderr.getvalue()
    assert e.value.code == 1, (e.value.code, text)
    errors = [x for x in text.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and text.endswith(f"{errors[0]}\n"), text  # one whole line, the last
    return errors[0]


# ----------------------------------------------------------------------------- F1, F2: checkpoint integrity


def _state(v: float) -> dict:
    return {"w": torch.full((100_000,), v), "step": int(v)}


def test_flipped_bytes_are_detected_and_the_previous_checkpoint_used(tmp_path, capsys):
    for step in (1, 2):
        checkpoint.save(_state(step), tmp_path, step, keep=3)
    newest = tmp_path / "ckpt_000000002.pt"
    _flip(newest)
    torch.load(newest, weights_only=True)  # the damage is invisible to torch.load itself
    state, path = checkpoint.load_latest(tmp_path)
    assert state["step"] == 1 and path.name == "ckpt_000000001.pt"
    err = capsys.readouterr().err
    assert "last.pt" in err and "digest" in err  # last.pt is the newest file's hard link


def test_flipped_bytes_in_the_newest_checkpoint_resume_from_the_previous(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path / "run")
    _flip(out / CKPT5)
    pretrain.main(load_config(None, RUN), out)
    captured = capsys.readouterr()
    assert "does not match its digest" in captured.err and "last.pt" in captured.err
    assert f"resumed from {out / CKPT4}" in captured.out
    # the fallback resumed exactly: the retrained step 5 equals the intact run's
    a = checkpoint.load(finished / "last.pt")
    b = checkpoint.load(out / "last.pt")
    assert b["step"] == 5
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_loadable_checkpoint_lacking_keys_is_skipped(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path / "run")
    (out / "last.pt").unlink()
    torch.save({}, out / CKPT5)  # loads, but is no checkpoint of ours (and has no digest)
    pretrain.main(load_config(None, RUN), out)
    captured = capsys.readouterr()
    assert f"{out / CKPT5} lacks 'config'" in captured.err
    assert f"resumed from {out / CKPT4}" in captured.out
    assert checkpoint.load(out / "last.pt")["step"] == 5


def test_no_usable_checkpoint_stops_unless_fresh(finished, tmp_path, read_metrics):
    out = _copy(finished, tmp_path / "run")
    _flip(out / CKPT4)
    _flip(out / CKPT5)
    before = _listing(out)
    line = _cli(["--out", str(out), *RUN])
    assert "no usable checkpoint" in line and str(out) in line and "--fresh" in line
    assert _listing(out) == before  # nothing written, nothing removed

    pretrain.main(load_config(None, RUN), out, fresh=True)  # asked for: starts over, destroys nothing
    assert _listing(out / "old-1") == before
    assert checkpoint.load(out / "last.pt")["step"] == 5 and read_metrics(out)[-1]["final"] is True


def test_pickle_that_would_run_code_is_refused(tmp_path, capsys):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    checkpoint.save(_state(1), tmp_path, 1, keep=3)
    checkpoint.save({"step": 2, "x": Evil()}, tmp_path, 2, keep=3)  # a valid digest: only the content is bad
    with pytest.raises(checkpoint.CheckpointError, match="ckpt_000000002.pt is refused"):
        checkpoint.load(tmp_path / "ckpt_000000002.pt")
    state, path = checkpoint.load_latest(tmp_path)  # and a resume falls back past it
    assert state["step"] == 1 and "refused" in capsys.readouterr().err
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:'train.linear_eval' found in sys.modules")  # runpy of an imported module
@pytest.mark.parametrize("content", [b"", b"garbage" * 10, None], ids=["empty", "garbage", "truncated"])
def test_linear_eval_on_a_bad_checkpoint_is_one_error_line(finished, tmp_path, monkeypatch, content):
    bad = tmp_path / "bad.pt"
    data = (finished / "last.pt").read_bytes()
    bad.write_bytes(content if content is not None else data[: len(data) // 2])
    monkeypatch.setattr(sys, "argv", ["linear_eval", "--ckpt", str(bad)])
    with pytest.raises(SystemExit) as e:
        runpy.run_module("train.linear_eval", run_name="__main__")
    assert str(e.value.code).startswith(f"error: checkpoint {bad}")


def test_checkpoint_without_digest_from_an_older_version_loads_with_a_warning(tmp_path, capsys):
    torch.save(_state(3), tmp_path / "old.pt")
    assert checkpoint.load(tmp_path / "old.pt")["step"] == 3
    assert "old.pt has no digest" in capsys.readouterr().err


def test_checkpoint_still_loads_with_plain_torch_load(finished):
    # the digest trailer follows the zip archive: users' torch.load keeps working
    assert torch.load(finished / "last.pt", weights_only=True)["step"] == 5


# ----------------------------------------------------------------------------- F3-F8: bad values


@pytest.mark.parametrize("override, accepted", [
    ("batch_size=0", ">= 2"), ("predictor.eps=.nan", ">= 0"), ("epochs=0", ">= 1"), ("epochs=-1", ">= 1"),
    ("log_every=0", ">= 1"), ("monitor.knn_k=0", ">= 1"), ("data.image_size=0", ">= 1"),
    # issue 20.7 and 20.11: a BatchNorm traceback after writing the folder; an overflow naming no key
    ("batch_size=1", ">= 2"), (f"seed={2**70}", "[0, 4294967295]"),
])
def test_bad_value_is_one_line_naming_key_value_and_range(tmp_path, override, accepted):
    out = tmp_path / "out"
    line = _cli(["--out", str(out), override])
    key, value = override.split("=")
    assert f"{key}={'nan' if value == '.nan' else value}" in line and accepted in line
    assert not out.exists()  # nothing written


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_gpu_is_one_line(tmp_path):
    out = tmp_path / "out"
    assert "device=cuda" in _cli(["--out", str(out), "device=cuda"])
    assert not out.exists()


def test_every_numeric_key_has_a_range():
    values = _flatten(to_dict(Config()))

    def numeric(v):
        items = v if isinstance(v, list) else [v]
        return all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in items)

    assert {k for k, v in values.items() if numeric(v)} == set(RANGES)


@pytest.mark.parametrize("override", ["optim.lr=.inf", "aug.blur_p=[0.5, 1.5]", "predictor.rho=1",
                                      "model.ema_tau=-0.1", "ckpt.keep=0", "eval.lr_grid=[0.1, 0]",
                                      # issue 20.11: refused only after the whole pre-training
                                      "eval.lr_grid=[]", "eval.batch_size=1"])
def test_more_bad_values_are_refused(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        load_config(None, [override])


def test_print_config_prints_the_resolved_configuration_and_exits(tmp_path, capsys):
    import yaml

    pretrain.cli(["--config", "cifar10_r18", "--out", str(tmp_path / "o"), "--print-config", "optim.lr=0.2"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert from_dict(printed) == load_config("cifar10_r18", ["optim.lr=0.2"])
    assert not (tmp_path / "o").exists()


def test_help_lists_presets_and_keys(capsys):
    with pytest.raises(SystemExit) as e:
        pretrain.cli(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert all(name in text for name in ("digits", "cifar10_r18", "stl10_r18", "imagenet_r50_300ep"))
    assert "predictor.: name" in text and "knn_k" in text and "--print-config" in text


# ----------------------------------------------------------------------------- F11-F13: the run folder


def test_second_trainer_on_the_same_folder_is_refused(finished, tmp_path):
    out = _copy(finished, tmp_path / "run")
    before = _listing(out)
    with open(out / ".lock", "a+") as held:  # another trainer holds the folder
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        line = _cli(["--out", str(out), *RUN, "epochs=2"])
    assert "in use by another trainer" in line
    assert _listing(out) == before


def test_lock_of_a_killed_trainer_does_not_block(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(600)",
                               str(out / ".lock")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert (out / ".lock").exists()
    pretrain.main(load_config(None, RUN), out)  # the finished run is recognised, not refused
    assert "nothing to train" in capsys.readouterr().out


def test_linear_eval_record_survives_a_pretrain_rerun(finished, tmp_path, read_metrics):
    out = _copy(finished, tmp_path / "run")
    linear_eval.main(out / "last.pt", ["eval.epochs=1", "eval.lr_grid=[0.1]"])
    assert "linear_eval" in read_metrics(out)[-1]
    metrics, config_yaml = (out / "metrics.jsonl").read_bytes(), (out / "config.yaml").read_bytes()
    pretrain.main(load_config(None, RUN), out)  # the same command again
    pretrain.main(load_config(None, [*RUN, "optim.lr=0.1"]), out)  # and with another value
    assert (out / "metrics.jsonl").read_bytes() == metrics
    assert (out / "config.yaml").read_bytes() == config_yaml


def test_resume_drops_only_training_records_written_after_the_checkpoint(tmp_path):
    records = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.9},  # covered by the checkpoint
               {"step": 3, "loss": 0.8},  # after it: the resumed run writes it again
               {"final": True, "step": 2, "linear_eval": {"top1": 50.0}},  # another tool's: kept
               {"step": 4, "loss": 0.7}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    log = MetricsLog(tmp_path, True, keep_lines=2)
    log.write({"step": 3, "loss": 0.8})
    kept = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kept == records[:2] + [records[3], {"step": 3, "loss": 0.8}]
    assert log.lines == 4


def test_resume_with_other_values_keeps_config_yaml(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path / "run")
    for name in ("last.pt", CKPT5):  # as if stopped at step 4
        (out / name).unlink()
    config_yaml = (out / "config.yaml").read_bytes()
    pretrain.main(load_config(None, [*RUN, "monitor.knn_k=5"]), out)
    assert "monitor.knn_k" in capsys.readouterr().err
    assert (out / "config.yaml").read_bytes() == config_yaml  # still the checkpoint's values
    import yaml
    assert yaml.safe_load((out / "config_from_step_4.yaml").read_text())["monitor"]["knn_k"] == 5


def test_stale_temp_files_are_removed_at_start(finished, tmp_path):
    out = _copy(finished, tmp_path / "run")
    stale = [out / ".ckpt_000000009.pt.tmp4242", out / ".last.pt.tmp4242"]
    for p in stale:
        p.write_bytes(b"\0" * 1000)
    pretrain.main(load_config(None, RUN), out)
    assert not any(p.exists() for p in stale)


def test_full_disk_is_one_error_line_and_the_previous_checkpoint_survives(finished, tmp_path, monkeypatch):
    out = _copy(finished, tmp_path / "run")
    for name in ("last.pt", CKPT5):  # as if stopped at step 4
        (out / name).unlink()

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint.os, "fsync", full)
    line = _cli(["--out", str(out), *RUN])
    monkeypatch.undo()
    assert "cannot write checkpoint" in line and "No space left on device" in line
    assert sorted(p.name for p in out.iterdir() if p.name.startswith((".ckpt", ".last", "ckpt", "last"))) == [CKPT4]
    assert checkpoint.load(out / CKPT4)["step"] == 4  # intact, digest verified


def test_file_size_limit_is_one_error_line_from_the_command_line(finished, tmp_path):
    # a real failing write (EFBIG under RLIMIT_FSIZE: the disk-full path without filling a disk)
    out = _copy(finished, tmp_path / "run")
    for name in ("last.pt", CKPT5):
        (out / name).unlink()
    limit = (out / CKPT4).stat().st_size // 2  # the small files fit, a checkpoint does not

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "train.pretrain", "--out", str(out), *RUN], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, preexec_fn=small_files)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "cannot write checkpoint" in errors[0], proc.stderr[-3000:]
    assert checkpoint.load(out / CKPT4)["step"] == 4
    assert not [p for p in out.iterdir() if p.name.startswith(".ckpt") or p.name.startswith(".last")]


def test_out_that_cannot_be_written_is_one_error_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    line = _cli(["--out", str(blocker / "run"), *RUN])
    assert "cannot write there" in line and str(blocker / "run") in line


def _as_nobody(monkeypatch, module, name: str) -> None:
    """Call ``module.name`` as user nobody when running as root (root writes and reads anything), and
    only it: the rest of the run (the clone, the venv, the data) may live where nobody cannot go."""
    if os.geteuid() != 0:
        return
    original = getattr(module, name)

    def as_nobody(*args, **kwargs):
        os.seteuid(65534)
        try:
            return original(*args, **kwargs)
        finally:
            os.seteuid(0)

    monkeypatch.setattr(module, name, as_nobody)


def test_read_only_out_is_one_error_line(finished, tmp_path, monkeypatch):
    # issue 20.8: this test failed wherever the clone sat under a folder nobody may enter (/root, a 0700
    # temporary folder): only taking the folder now runs as nobody, not the whole trainer
    out = _copy(finished, tmp_path / "run")
    (out / ".lock").unlink(missing_ok=True)
    out.chmod(0o555)
    _as_nobody(monkeypatch, checkpoint, "lock_folder")
    try:
        line = _cli(["--out", str(out), *RUN, "epochs=2"])
    finally:
        out.chmod(0o755)
    assert "cannot write there (Permission denied)" in line


# ----------------------------------------------------------------------------- issue 20: resume and finishing


def _stopped_at_step_4(finished: Path, dst: Path) -> Path:
    """A copy of the finished run as a kill right after step 4's checkpoint leaves it."""
    out = _copy(finished, dst)
    for name in ("last.pt", CKPT5):
        (out / name).unlink()
    os.link(out / CKPT4, out / "last.pt")
    return out


def _as_killed_after_the_last_checkpoint(out: Path, png: bytes | None) -> None:
    """What a SIGKILL (or a full disk) right after the final checkpoint leaves: metrics.jsonl as the
    checkpoint counted it (no "final" record), and no diagnostics, or a 0-byte PNG."""
    n = checkpoint.load(out / "last.pt")["metrics_lines"]
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text("".join(lines[:n]))
    for name in ("diagnostics.png", "diagnostics.json"):
        (out / name).unlink()
    if png is not None:
        (out / "diagnostics.png").write_bytes(png)


@pytest.mark.parametrize("png", [None, b""], ids=["killed", "full-disk-0-byte-png"])
def test_a_run_stopped_after_its_last_checkpoint_is_finished_by_a_rerun(finished, tmp_path, png, read_metrics,
                                                                         capsys):
    # issue 20.3: the re-run said "nothing to train, nothing written" and the run stayed unfinished for good
    out = _copy(finished, tmp_path / "run")
    _as_killed_after_the_last_checkpoint(out, png)
    pretrain.main(load_config(None, RUN), out)
    assert "writing what the run did not finish" in capsys.readouterr().out
    want = [r for r in read_metrics(finished) if "epoch_time" not in r]
    got = [r for r in read_metrics(out) if "epoch_time" not in r]
    assert got[-1]["final"] is True and got[-1] == want[-1]
    assert (out / "diagnostics.png").stat().st_size > 1000
    assert (out / "diagnostics.json").read_bytes() == (finished / "diagnostics.json").read_bytes()
    before = _listing(out)
    pretrain.main(load_config(None, RUN), out)  # now finished: nothing to train, nothing written
    assert "nothing to train" in capsys.readouterr().out and _listing(out) == before


def test_a_cut_off_last_metrics_line_is_dropped_on_resume_and_read_tolerantly(finished, tmp_path, read_metrics,
                                                                               capsys):
    # issue 20.4: the next record was glued onto the cut-off line, and train.study raised JSONDecodeError
    from train import study

    out = _stopped_at_step_4(finished, tmp_path / "run")
    n = checkpoint.load(out / "last.pt")["metrics_lines"]
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text("".join(lines[:n]) + lines[n][:9])  # a crash in the middle of a write
    assert study.final_metrics(out) is None  # no traceback: the unfinished run has no final record
    pretrain.main(load_config(None, RUN), out)
    assert "cut off mid-write" in capsys.readouterr().err
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("epoch_time", "images_per_s")} for r in rs]
    assert strip(read_metrics(out)) == strip(read_metrics(finished))  # every line parses, none lost
    assert study.final_metrics(out)["step"] == 5
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')
    assert study.final_metrics(out)["step"] == 5


@pytest.mark.parametrize("other", [["model.proj_dim=32"], ["predictor.name=mlp"], ["predictor.name=linear"]])
def test_a_checkpoint_that_does_not_fit_is_named_and_the_previous_one_used(finished, tmp_path, other, capsys):
    # issue 20.1: "size mismatch" / "Missing key(s)" tracebacks, and the older good checkpoints never tried
    from train.model import build_model

    out = _stopped_at_step_4(finished, tmp_path / "run")
    foreign = checkpoint.load(finished / CKPT5)
    cfg = load_config(None, [*RUN, *other])
    foreign["config"], foreign["model"] = to_dict(cfg), build_model(cfg, 1, cfg.seed).state_dict()
    checkpoint.save(foreign, out, 5, keep=3)  # the newest file, last.pt links it
    pretrain.main(load_config(None, RUN), out)
    captured = capsys.readouterr()
    assert f"checkpoint {out / 'last.pt'} does not fit this run" in captured.err
    assert other[0].split("=")[0] in captured.err  # names the setting that differs
    assert f"resumed from {out / CKPT4}" in captured.out
    assert checkpoint.load(out / "last.pt")["step"] == 5


def test_new_optimizer_values_on_resume_are_refused_naming_them(finished, tmp_path):
    # issue 20.2: the new values were recorded, then silently overridden by the restored optimizer state
    out = _stopped_at_step_4(finished, tmp_path / "run")
    before = _listing(out)
    line = _cli(["--out", str(out), *RUN, "optim.lr=0.1", "optim.weight_decay=1e-5"])
    assert "optim.lr 0.05 -> 0.1" in line and "optim.weight_decay 0.0004 -> 1e-05" in line and "--fresh" in line
    line = _cli(["--out", str(out), *RUN, "optim.schedule=constant"])
    assert "optim.schedule 'cosine' -> 'constant'" in line
    assert _listing(out) == before


def test_epochs_lowered_to_where_the_checkpoint_is_are_refused(finished, tmp_path):
    # issue 20.11: the "final" record then carried an older evaluation
    out = _copy(finished, tmp_path / "run")
    state = checkpoint.load(out / "last.pt")
    state["config"]["epochs"] = 3  # as if a 3-epoch run was stopped after its first epoch
    (out / "last.pt").unlink()
    checkpoint.save(state, out, 5, keep=3)
    _as_killed_after_the_last_checkpoint(out, None)
    line = _cli(["--out", str(out), *RUN])  # epochs=1
    assert "epochs=1" in line and "already trained 1 epochs (of epochs=3)" in line
    assert "use epochs>=2" in line  # the bound it suggests is one it accepts (it said epochs>=1)


def test_linear_eval_writes_no_second_final_record_and_no_tensorboard_events(finished, tmp_path, read_metrics):
    # issue 20.13 and 20.11: a second "final" record, an empty event file, duplicate records on a re-run
    out = _copy(finished, tmp_path / "run")
    events = sorted((out / "tb").iterdir())
    for _ in range(2):
        linear_eval.main(out / "last.pt", ["eval.epochs=1", "eval.lr_grid=[0.1]"])
    records = read_metrics(out)
    assert sum(bool(r.get("final")) for r in records) == 1
    assert sum("linear_eval" in r for r in records) == 1  # the re-run replaced its record
    assert sorted((out / "tb").iterdir()) == events


def test_tensorboard_has_each_metric_under_one_tag(finished):
    # issue 20.13: the final record repeated the last epoch's knn_top1 as train/knn_top1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for f in (finished / "tb").iterdir():
        acc = EventAccumulator(str(f))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    # train/ holds the per-log-step values, epoch/ the epoch's means and evaluations, each once
    assert {"epoch/knn_top1", "epoch/probe_top1", "epoch/erank", "train/loss", "epoch/loss"} <= tags
    assert {t for t in tags if t.startswith("train/")} == {"train/loss", "train/lr", "train/tau", "train/images_per_s"}


# on the way to diverging, the predictor may first skip a batch of non-finite features (its warning)
@pytest.mark.filterwarnings("ignore:DirectPredictor.*non-finite:RuntimeWarning")
def test_divergence_is_one_error_line_naming_the_last_good_checkpoint(tmp_path):
    # issue 20.7: optim.lr=1.0e+30 was a FloatingPointError traceback
    out = tmp_path / "run"
    line = _cli(["--out", str(out), "epochs=1", "batch_size=256", "log_every=1", "ckpt.every_steps=1",
                 "monitor.knn_max_train=200", "optim.lr=1.0e+30"])
    assert line.startswith("error: training diverged: ") and "optim.lr=1e+30" in line
    kept = checkpoint.checkpoints(out)
    if kept:  # the one named holds finite weights only
        assert str(kept[-1]) in line
        state = checkpoint.load(kept[-1])
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    else:
        assert "no checkpoint had been written yet" in line


@pytest.mark.parametrize("kind", ["unreadable", "folder", "not-utf8"])
def test_a_config_file_that_cannot_be_read_is_one_error_line(tmp_path, monkeypatch, kind):
    # issue 20.8: a PermissionError traceback
    from train import config

    path = tmp_path / "preset.yaml"
    if kind == "folder":
        path.mkdir()
    else:
        path.write_bytes(b"epochs: 2\n" if kind == "unreadable" else b"epochs: \xff\xfe\n")
    if kind == "unreadable":
        path.chmod(0)
        _as_nobody(monkeypatch, config, "read_text")
    line = _cli(["--config", str(path), "--out", str(tmp_path / "out")])
    assert str(path) in line
    assert {"unreadable": "cannot be read (Permission denied)", "folder": "cannot be read (Is a directory)",
            "not-utf8": "not a UTF-8 text file"}[kind] in line


def test_ctrl_c_saves_after_the_step_and_the_resume_is_exact(finished, tmp_path, monkeypatch, capsys):
    # issue 20.11: SIGINT was a KeyboardInterrupt traceback and no save (SIGTERM saved); with DataLoader
    # workers, which the same Ctrl-C reaches
    from train.model import BYOL

    out = _stopped_at_step_4(finished, tmp_path / "run")
    original = BYOL.update_target

    def update_target(self, tau):  # Ctrl-C in the middle of step 5
        os.kill(os.getpid(), signal.SIGINT)
        return original(self, tau)

    monkeypatch.setattr(BYOL, "update_target", update_target)
    pretrain.main(load_config(None, [*RUN, "data.workers=1"]), out)
    monkeypatch.setattr(BYOL, "update_target", original)
    assert "Ctrl-C: saving a checkpoint after this step" in capsys.readouterr().out
    a, b = checkpoint.load(finished / CKPT5), checkpoint.load(out / "last.pt")
    assert b["step"] == 5
    for k in a["model"]:  # the step finished exactly as in the uninterrupted run
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_features_that_overflow_are_one_divergence_line(tmp_path):
    # IsoLoss in its Euclidean form at the digits default's lr: the loss reaches ~1e8 (finite) while
    # the backbone's features overflow; this was a LinAlgError traceback from the effective rank.
    line = _cli(["--out", str(tmp_path / "run"), "epochs=1", "batch_size=256", "ckpt.every_steps=0",
                 "monitor.knn_max_train=200", "loss.name=isoloss", "loss.form=euclidean"])
    assert line.startswith("error: training diverged: ") and "features are not finite" in line


# ----------------------------------------------------------------------------- issue 25


@pytest.mark.parametrize("last_links", ["foreign", "own"])
def test_retention_counts_only_the_runs_own_loadable_checkpoints(finished, tmp_path, last_links, capsys):
    # issue 25.2: a foreign ckpt_000000099.pt that does not fit was counted, and the run's own usable
    # ckpt_000000004.pt deleted; once last.pt was damaged, the resume found "no usable checkpoint"
    from train.model import build_model

    out = _stopped_at_step_4(finished, tmp_path / "run")
    cfg = load_config(None, [*RUN, "model.proj_dim=32"])
    foreign = {**checkpoint.load(out / CKPT4), "config": to_dict(cfg), "model": build_model(cfg, 1, 0).state_dict()}
    checkpoint.save({**foreign, "step": 99}, out, 99, keep=3)  # intact and loadable; last.pt links it
    if last_links == "own":  # the foreign file is never tried: last.pt, the run's newest, is taken first
        (out / "last.pt").unlink()
        os.link(out / CKPT4, out / "last.pt")
    pretrain.main(load_config(None, [*RUN, "ckpt.keep=2"]), out)  # trains step 5: the run's own are 4 and 5
    if last_links == "foreign":
        assert f"{out / 'last.pt'} does not fit this run" in capsys.readouterr().err
    assert [p.name for p in checkpoint.checkpoints(out)] == [CKPT4, CKPT5, "ckpt_000000099.pt"]
    _flip(out / "last.pt")  # and ckpt_000000005.pt, its hard link
    pretrain.main(load_config(None, [*RUN, "ckpt.keep=2"]), out)
    assert f"resumed from {out / CKPT4}" in capsys.readouterr().out
    assert checkpoint.load(out / "last.pt")["step"] == 5
    assert checkpoint.load(out / "ckpt_000000099.pt")["step"] == 99  # never deleted, never changed


@pytest.mark.parametrize("line", ["5", '"linear_eval"', "[1, 2]", "null"])
def test_a_metrics_line_that_is_json_but_not_an_object_does_not_stop_the_resume(finished, tmp_path, line, capsys):
    # issue 25.4: a line `5` stopped every resume with a TypeError in utils._kept_on_resume
    from train.metrics_log import read_metrics

    out = _stopped_at_step_4(finished, tmp_path / "run")
    n = checkpoint.load(out / "last.pt")["metrics_lines"]
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text("".join(lines[:n]) + line + "\n" + "".join(lines[n:]))
    pretrain.main(load_config(None, RUN), out)
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("epoch_time", "images_per_s")} for r in rs]
    assert strip(read_metrics(out / "metrics.jsonl")) == strip(read_metrics(finished / "metrics.jsonl"))
    assert f"line {n + 1}: not a JSON record, skipped" in capsys.readouterr().err


@pytest.mark.parametrize("batched", ["true", "false"])
@pytest.mark.parametrize("override, named", [
    ("data.image_size=1", "data.image_size=1 is too small to blur"),
    ("aug.blur_kernel=2", "aug.blur_kernel=2 makes a 17-pixel blur kernel"),
])
def test_a_blur_kernel_wider_than_the_image_is_one_line_before_anything_is_written(tmp_path, override, named,
                                                                                     batched):
    # issue 25.7: a 35-81-line traceback at the first batch, in both view paths
    out = tmp_path / "run"
    line = _cli(["--out", str(out), *RUN, "aug.blur_p=[1,1]", f"aug.batched={batched}", override])
    assert line.startswith(f"error: {named}") and "aug.blur_p=[0, 0]" in line
    assert not out.exists()


@pytest.mark.filterwarnings("ignore:DirectPredictor.*non-finite:RuntimeWarning")
def test_config_yaml_is_the_configuration_of_a_rerun_after_a_run_that_wrote_no_checkpoint(tmp_path, capsys):
    # issue 25, new user 2: a run that failed before its first checkpoint left its config.yaml; the
    # re-run with the lr the divergence message suggests trained with config.yaml still saying the old lr
    import yaml

    out = tmp_path / "run"
    first = ["epochs=1", "batch_size=256", "log_every=1", "ckpt.every_steps=0", "monitor.knn_max_train=200"]
    line = _cli(["--out", str(out), *first, "optim.lr=1.0e+30"])
    assert "no checkpoint had been written yet" in line
    assert yaml.safe_load((out / "config.yaml").read_text())["optim"]["lr"] == 1e30
    pretrain.main(load_config(None, [*first, "optim.lr=0.005"]), out)
    assert "replaced by this run's configuration" in capsys.readouterr().out
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written["optim"]["lr"] == 0.005 and written == checkpoint.load(out / "last.pt")["config"]
    assert not list(out.glob(".config.yaml.tmp"))


@pytest.mark.parametrize("backend", ["triton", "cupy"])
def test_a_predictor_backend_that_cannot_run_here_is_one_line_before_anything_is_written(tmp_path, backend):
    # issue 25, new user 3: ~45 lines of traceback at the first step, after config.yaml and tb/ were written.
    # A fresh process without TRITON_INTERPRET (which the test suite sets): Triton cannot run on CPU there.
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "train.pretrain", "--out", str(out), *RUN,
                        f"predictor.backend={backend}"], cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"error: predictor.backend={backend}: backend '{backend}' ")
    assert "does not run on device cpu" in r.stderr or "is not available" in r.stderr  # not installed, say
    assert not out.exists()


def test_last_pt_that_is_a_folder_is_named_in_the_error_line(finished, tmp_path):
    # issue 25: the error named ckpt_000000005.pt, which was in fact written, instead of last.pt
    out = _stopped_at_step_4(finished, tmp_path / "run")
    (out / "last.pt").unlink()
    (out / "last.pt").mkdir()
    line = _cli(["--out", str(out), *RUN])
    assert line.startswith(f"error: cannot point {out / 'last.pt'} at the new checkpoint: Is a directory")
    assert checkpoint.load(out / CKPT5)["step"] == 5  # written, whole, and named as such
    assert f"({out / CKPT5} was written" in line
    assert not [p for p in out.iterdir() if checkpoint.TEMP.match(p.name)]
