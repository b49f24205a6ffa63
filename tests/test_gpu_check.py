"""`make gpu-check` runs the fake-CUDA tier first, and stops there when it fails."""
import json

import pytest

pytest.importorskip("torchvision")  # bench.gpu_check's training-step plan imports train/

from bench import gpu_check  # noqa: E402


def test_a_failing_fake_tier_stops_the_check_before_any_gpu_test(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(gpu_check, "run_fake_tier",
                        lambda out: {"returncode": 1, "summary": "1 failed, 41 passed", "seconds": 3.0})
    monkeypatch.setattr(gpu_check, "run_gpu_tests", lambda *a, **k: ran.append("gpu tests"))
    monkeypatch.setattr(gpu_check, "bench_train_step", lambda *a, **k: ran.append("benchmarks"))
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 1
    assert ran == []
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["fake_tier"]["returncode"] == 1
    assert "1 failed, 41 passed" in (tmp_path / "report.md").read_text()


def test_the_fake_tier_runs_the_fake_cuda_tests_and_the_cpu_bodies_of_the_gpu_tests():
    assert gpu_check.FAKE_TIER_PATHS == ["tests/test_fake_cuda.py", "tests/gpu"]


def test_the_report_shows_the_module_steps_against_their_floor():
    """The module's GPU step rows (per call, attached; fp32 and bf16) reach report.md with
    their ratio to the floor and their host syncs, as cuda_module_steps returns them."""
    from bench import gpu_check

    rows = [{"dtype": "bfloat16", "case": "floor", "median_ms": 0.5, "x_floor": 1.0},
            {"dtype": "bfloat16", "case": "per_call", "median_ms": 0.55, "x_floor": 1.1, "host_syncs": 0}]
    result = {"environment": {}, "syncs": [], "module_steps": rows, "full": [], "stages": [], "eigh": []}
    md = gpu_check.markdown(result)
    assert "| bfloat16 | per_call | 0.550 | 1.10x | 0 |" in md
    assert "| bfloat16 | floor | 0.500 | 1.00x |  |" in md
