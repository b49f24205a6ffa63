"""A 2-process run under torchrun on CPU (gloo): DDP, DistributedSampler shards, F̂ all-reduced,
the same weights and predictor state on both ranks, rank-0-only outputs."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def _torchrun_two_ranks(args: list[str]) -> tuple[subprocess.Popen, str]:
    """``torchrun --nproc_per_node=2 ARGS`` from the clone's root, one thread a rank; (process, stderr).
    A run that hangs is killed with its process group and fails the test."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError("the 2-process run hung:\n" + (stdout + stderr)[-4000:])
    return proc, stderr


def test_two_process_gloo_run(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "train.pretrain", "--out", str(out),
           # freq 2: W_p is also a trainable, DDP-reduced parameter between rebuilds
           "epochs=1", "batch_size=256", "predictor.freq=2", "model.sync_bn=true", "ckpt.every_steps=0"]
    # own session: on a timeout the launcher *and* its workers are killed, no orphans are left
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError("2-process run timed out:\n" + (stdout + stderr)[-4000:])
    log = stdout + stderr
    assert proc.returncode == 0, log[-4000:]
    assert "on 2 x cpu" in log
    assert "replicas consistent across 2 ranks" in log, log[-4000:]
    assert "SyncBatchNorm needs GPUs" in log  # sync_bn is ignored on CPU, with a warning
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["final"] is True and lines[-1]["step"] == 5  # 1437 // 256 steps, each rank 128 samples
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["per_rank"]) == 2
    # per-rank RNG streams differ (per-rank seeding)
    assert not torch.equal(state["per_rank"][0]["rng"]["torch"], state["per_rank"][1]["rng"]["torch"])


def test_ranks_given_different_settings_stop_at_start_naming_the_keys(tmp_path):
    # issue 20.10: epochs or batch_size mismatched hung in a collective; rho ran to the end; proj_dim crashed in DDP
    wrapper = tmp_path / "per_rank.py"
    wrapper.write_text("import os, sys\nfrom train import pretrain\n"
                       "extra = ['epochs=3', 'model.proj_dim=32', 'predictor.rho=0.5']\n"
                       "pretrain.cli(sys.argv[1:] + (extra if os.environ['RANK'] == '1' else []))\n")
    out = tmp_path / "run"
    proc, stderr = _torchrun_two_ranks([str(wrapper), "--out", str(out), "epochs=1", "batch_size=256"])
    assert proc.returncode != 0
    # rank 0 alone reports (every rank finds the same keys; rank 1 stops quietly with status 1), in one
    # whole line: two ranks' lines written text-then-newline under torchrun's `python -u` ran together
    errors = [x for x in stderr.splitlines() if "error: " in x]
    assert len(errors) == 1 and errors[0].startswith("error: "), stderr[-4000:]
    assert errors[0].count("different settings") == 1
    assert ("epochs (rank 0: 1, rank 1: 3); model.proj_dim (rank 0: 64, rank 1: 32); "
            "predictor.rho (rank 0: 0.3, rank 1: 0.5)") in errors[0]
    assert "train/pretrain.py" not in stderr  # no traceback from the trainer (torchrun prints its own summary)
    assert not list(out.glob("*.pt")) if out.exists() else True  # nothing trained


@pytest.mark.parametrize("report", [True, False])
def test_an_error_line_is_one_write_or_none(tmp_path, monkeypatch, report):
    # under torchrun (`python -u`), sys.exit("error: ...") wrote the text and its newline in two writes,
    # so two ranks' lines could interleave; the line is now one os.write, and a quiet rank writes nothing
    from train.utils import exit_with_error
    writes = []
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: writes.append(data) or real_write(fd, data))
    with open(tmp_path / "stderr", "w", encoding="utf-8") as f:
        monkeypatch.setattr(sys, "stderr", f)
        with pytest.raises(SystemExit) as e:
            exit_with_error("epochs (rank 0: 1, rank 1: 3) — différent", report=report)
    assert e.value.code == 1
    expected = "error: epochs (rank 0: 1, rank 1: 3) — différent\n"
    assert writes == ([expected.encode()] if report else [])
    assert (tmp_path / "stderr").read_text(encoding="utf-8") == (expected if report else "")


def test_a_setup_error_under_torchrun_is_one_line_from_rank_0(tmp_path):
    # issue 25: batch_size=3 printed the error line once per rank
    out = tmp_path / "run"
    proc, stderr = _torchrun_two_ranks(["-m", "train.pretrain", "--out", str(out), "epochs=1", "batch_size=3"])
    assert proc.returncode != 0
    errors = [x for x in stderr.splitlines() if "error: " in x]
    assert errors == ["error: batch_size=3 must be a multiple of the 2 processes, at least 2 per process "
                      "(BatchNorm needs more than one image)"], stderr[-4000:]
    assert "train/pretrain.py" not in stderr  # no traceback from the trainer
    assert not out.exists()


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the workers through /proc")
def test_sigusr1_to_one_worker_saves_on_every_rank_and_torchrun_exits_0(tmp_path):
    # issue 25, new user 7: SIGTERM to the launcher saves, but torchrun ends with its own SignalException
    # traceback and status 1; the README says to signal a worker instead, which this checks
    import time

    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "train.pretrain", "--out", str(out), "epochs=3", "batch_size=256", "log_every=1",
           "ckpt.every_steps=0"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().strip()):
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended or never started"
            time.sleep(0.5)
        workers = _children(proc.pid)
        assert len(workers) == 2, workers
        os.kill(workers[-1], signal.SIGUSR1)
        stdout, stderr = proc.communicate(timeout=240)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, (stdout + stderr)[-4000:]
    assert "stopped by signal at step" in stdout and "SignalException" not in stderr
    state = torch.load(out / "last.pt", weights_only=True)
    assert 0 < state["step"] < 15 and state["world_size"] == 2
