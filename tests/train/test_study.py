"""train.study on a tiny grid (digits, 1 epoch): one trained row and one reference row, 1 seed.
Runs really go through subprocesses of the trainer CLI; resume after a kill, no redone runs,
refusal of a changed grid. The verdict rule on hand-made numbers."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from train import study
from train.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]
FAST = {"epochs": 1, "eval.epochs": 2, "eval.lr_grid": [0.1], "monitor.probe": False}


def write_grid(path: Path, lr: float = 0.05, rows: str = "both") -> Path:
    trained = {"name": "dp", "what": "DirectPred", "set": {**FAST, "optim.lr": lr},
               "paper": "x", "expect": {"above": "pixels"}}
    pixels = {"name": "pixels", "reference": "raw_pixels", "set": FAST}
    chosen = {"both": [trained, pixels], "dp": [{**trained, "expect": {}}]}[rows]
    path.write_text(json.dumps({"preset": "digits", "seeds": 1, "rows": chosen}))  # JSON is YAML
    return path


def _log_lines(out: Path, row: str) -> int:
    return len((out / "runs" / row / "seed0" / "log.txt").read_text().splitlines())


def test_tiny_study_runs_resumes_and_refuses_a_changed_grid(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the subprocesses still import this checkout's train/ (PYTHONPATH)
    grid, out = write_grid(tmp_path / "tiny.yaml"), tmp_path / "study"
    cmd = [sys.executable, "-m", "train.study", "--grid", str(grid), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}  # for the study process itself
    # kill the study while its first run (pre-training) is under way: nothing is recorded for it
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    log = out / "runs" / "dp" / "seed0" / "log.txt"
    deadline = time.time() + 120
    while not log.exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    text, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, text
    assert "stopped before finishing dp/seed0" in text
    state = json.loads((out / "study.json").read_text())
    assert state["runs"] == {} and float((log.parent / "wall_s_before_stop.txt").read_text()) > 0

    # the same command continues and finishes both runs
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "[1/2] dp/seed0" in res.stdout and "[2/2] pixels/seed0" in res.stdout and "ETA" in res.stdout
    state = json.loads((out / "study.json").read_text())
    assert sorted(state["runs"]) == ["dp/seed0", "pixels/seed0"]
    dp = state["runs"]["dp/seed0"]
    assert dp["config"]["optim"]["lr"] == 0.05 and dp["config"]["seed"] == 0 and dp["wall_s"] > 0 and dp["resumed"]
    assert 0 <= dp["metrics"]["linear_top1"] <= 100 and dp["metrics"]["erank"] >= 1 and "knn_top1" in dp["metrics"]
    assert state["runs"]["pixels/seed0"]["metrics"]["erank"] > 1
    md = (out / "study.md").read_text()
    assert "| dp |" in md and "| pixels |" in md and "2 of 2 runs" in md
    assert (out / "study.png").stat().st_size > 0

    # finished runs are never redone; a run missing from study.json (killed before it was recorded) is
    lines = {r: _log_lines(out, r) for r in ("dp", "pixels")}
    del state["runs"]["pixels/seed0"]
    (out / "study.json").write_text(json.dumps(state))
    study.main(str(grid), out)
    assert _log_lines(out, "dp") == lines["dp"]  # no new command
    assert _log_lines(out, "pixels") > lines["pixels"]
    assert len(json.loads((out / "study.json").read_text())["runs"]) == 2

    # a grid under which a recorded run would be configured differently is refused, naming it
    write_grid(grid, lr=0.07)
    with pytest.raises(ConfigError, match=r"dp/seed0: optim.lr 0.05 -> 0.07"):
        study.main(str(grid), out)
    write_grid(grid, rows="dp")
    with pytest.raises(ConfigError, match=r"row 'pixels' was removed"):
        study.main(str(grid), out)


def test_grid_errors_are_named(tmp_path):
    p = tmp_path / "g.yaml"
    p.write_text(json.dumps({"preset": "digits", "rows": [{"name": "a", "set": {"optim.lrr": 1}}]}))
    with pytest.raises(ConfigError, match=r"row 'a'.*optim.lrr"):
        study.load_grid(str(p))
    p.write_text(json.dumps({"rows": [{"name": "a", "expect": {"above": "b"}}]}))
    with pytest.raises(ConfigError, match=r"'b' is not a row"):
        study.load_grid(str(p))
    with pytest.raises(ConfigError, match="paper"):  # the known grids are listed
        study.load_grid("no_such_grid")


def test_paper_grid_loads_row_major_with_the_references_first():
    grid = study.load_grid("paper")
    assert grid.preset == "fashion_mnist" and grid.seeds >= 3 and len(grid.rows) >= 20
    assert [r.reference for r in grid.rows[:2]] == ["random_init", "raw_pixels"]
    order = study.plan(grid, 3)
    assert [(r.name, s) for r, s in order[:4]] == [("random_init", 0), ("random_init", 1), ("random_init", 2),
                                                  ("raw_pixels", 0)]


def test_grid_set_applies_to_every_row_before_its_own(tmp_path):
    p = tmp_path / "g.yaml"
    p.write_text(json.dumps({"preset": "digits", "set": {"epochs": 3, "optim.lr": 0.2},
                             "rows": [{"name": "a"}, {"name": "b", "set": {"optim.lr": 0.1}}]}))
    grid = study.load_grid(str(p))
    a, b = (study.run_config(grid, grid.row(n), 1) for n in ("a", "b"))
    assert (a["epochs"], a["optim"]["lr"], b["epochs"], b["optim"]["lr"], b["seed"]) == (3, 0.2, 3, 0.1, 1)
    p.write_text(json.dumps({"preset": "digits", "set": {"optim.lrr": 1}, "rows": [{"name": "a"}]}))
    with pytest.raises(ConfigError, match="optim.lrr"):
        study.load_grid(str(p))


def test_paper_grid_keeps_its_recorded_runs():
    """docs/study.json was recorded with per-sample augmentation, before aug.batched existed: the
    paper grid pins it, so its 78 runs stay valid; without the pin they would be refused."""
    grid = study.load_grid("paper")
    assert "aug.batched=false" in grid.set
    state = json.loads((ROOT / "docs" / "study.json").read_text())
    assert len(state["runs"]) == 78 and "batched" not in state["runs"]["directpred/seed0"]["config"]["aug"]
    study.check_unchanged(grid, state)
    with pytest.raises(ConfigError, match=r"directpred/seed0: aug.batched"):
        study.check_unchanged(dataclasses.replace(grid, set=()), state)


def _steps(cfg: dict) -> int:
    images = cfg["data"]["train_subset"] or 60_000  # Fashion-MNIST's training split
    return cfg["epochs"] * (images // cfg["batch_size"])


def test_long_grid_is_the_main_claims_at_4x_the_steps_with_5_seeds():
    long, paper = study.load_grid("long"), study.load_grid("paper")
    assert long.preset == paper.preset and long.seeds == 5 and "aug.batched=true" in long.set
    assert [r.reference for r in long.rows[:2]] == ["random_init", "raw_pixels"]
    for row in long.rows:  # the same rows as in the paper grid, with their claims
        twin = paper.row(row.name)
        assert (row.set, row.reference, row.expect, row.paper) == (twin.set, twin.reference, twin.expect, twin.paper)
    assert {"directpred", "sgd_linear", "mlp", "no_predictor", "sgd_linear_sym_noema", "sgd_linear_noema",
            "no_stop_grad", "dp_power1", "dp_freq5"} <= {r.name for r in long.rows}
    paper_steps = _steps(study.run_config(paper, paper.row("directpred"), 0))
    assert paper_steps == 468
    assert _steps(study.run_config(long, long.row("directpred"), 0)) >= 4 * paper_steps


def _state(values: dict[str, list[float]], erank: float = 30.0) -> dict:
    runs = {}
    for row, vals in values.items():
        for s, v in enumerate(vals):
            runs[f"{row}/seed{s}"] = {"row": row, "seed": s, "wall_s": 1.0,
                                     "metrics": {"linear_top1": v, "erank": erank}}
    return {"runs": runs}


def test_verdicts():
    rows = (study.Row("rand", reference="random_init"), study.Row("a", expect={"above": "b"}),
            study.Row("b"), study.Row("c", expect={"collapses": True}), study.Row("d", expect={"similar_to": "b"}))
    grid = study.Grid("g", "digits", 3, rows)
    # a: mean 80, std 1; b: mean 78, std 1 -> difference 2 > spread 1: holds
    st = _state({"rand": [70, 71, 72], "a": [79, 80, 81], "b": [77, 78, 79], "c": [60, 61, 62], "d": [78.5, 79, 79.5]})
    assert study.verdict(grid, st, grid.row("a"))[1] == "holds"
    assert study.verdict(grid, st, grid.row("c"))[1] == "holds"  # 10 points below random init
    assert study.verdict(grid, st, grid.row("d"))[1] == "holds"  # +1.0 within spread 1.0
    st = _state({"rand": [70, 71, 72], "a": [76, 77, 78], "b": [77, 78, 79], "c": [80, 81, 82], "d": [80, 81, 82]})
    assert study.verdict(grid, st, grid.row("a"))[1] == "within noise"  # -1 vs spread 1
    assert study.verdict(grid, st, grid.row("c"))[1] == "does not"  # learns: +10 over random init
    assert study.verdict(grid, st, grid.row("d"))[1] == "does not"
    st = _state({"rand": [70, 71, 72], "a": [70, 75, 80], "b": [77, 78, 79]})
    assert study.verdict(grid, st, grid.row("a"))[1] == "within noise"  # -3 vs spread 5
    st = _state({"rand": [70, 71, 72], "c": [80, 81, 82]}, erank=1.2)
    assert study.verdict(grid, st, grid.row("c"))[1] == "holds"  # effective rank below 2: collapsed
