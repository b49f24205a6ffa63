"""train.study on a tiny grid (digits, 1 epoch): one trained row and one reference row, 1 seed.
Runs really go through subprocesses of the trainer CLI; resume after a kill, no redone runs,
refusal of a changed grid. The verdict rule on hand-made numbers."""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from train import study, study_report
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


def test_paper_grid_loads_seed_major_with_the_references_first():
    grid = study.load_grid("paper")
    assert grid.preset == "fashion_mnist" and grid.seeds >= 3 and len(grid.rows) >= 20
    assert [r.reference for r in grid.rows[:2]] == ["random_init", "raw_pixels"]
    order = study.plan(grid, 3)
    n = len(grid.rows)
    assert [(r.name, s) for r, s in order[:2]] == [("random_init", 0), ("raw_pixels", 0)]
    assert [(r.name, s) for r, s in (order[n - 1], order[n])] == [(grid.rows[-1].name, 0), ("random_init", 1)]
    assert sorted((r.name, s) for r, s in order) == sorted((r.name, s) for r in grid.rows for s in range(3))


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
    """docs/study.json was recorded with per-sample augmentation, before aug.batched existed, and
    under the solver name `eigh`: the paper grid pins both, so its runs stay valid; without the pins
    they would be refused."""
    grid = study.load_grid("paper")
    assert "aug.batched=false" in grid.set and "predictor.solver=eigh" in grid.set
    state = json.loads((ROOT / "docs" / "study.json").read_text())
    assert len(state["runs"]) == 3 * len(grid.rows) and "batched" not in state["runs"]["directpred/seed0"]["config"]["aug"]
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
        assert (row.set, row.reference, row.expect) == (twin.set, twin.reference, twin.expect)
        if row.name != "isoloss":  # the paper grid's isoloss text also remarks on that grid's length
            assert row.paper == twin.paper
    assert {"directpred", "sgd_linear", "mlp", "no_predictor", "sgd_linear_sym_noema", "sgd_linear_noema",
            "no_stop_grad", "dp_power1", "dp_freq5"} <= {r.name for r in long.rows}
    paper_steps = _steps(study.run_config(paper, paper.row("directpred"), 0))
    assert paper_steps == 468
    assert _steps(study.run_config(long, long.row("directpred"), 0)) >= 4 * paper_steps


def _state(values: dict[str, list[float] | dict[int, float]], erank: float | dict[str, float] = 30.0) -> dict:
    """study.json's records: row -> top-1 per seed (a list: seeds 0, 1, ...; a dict: seed -> value)."""
    runs = {}
    for row, vals in values.items():
        per_seed = vals if isinstance(vals, dict) else dict(enumerate(vals))
        er = erank.get(row, 30.0) if isinstance(erank, dict) else erank
        for s, v in per_seed.items():
            runs[f"{row}/seed{s}"] = {"row": row, "seed": s, "wall_s": 1.0, "config": {},
                                     "metrics": {"linear_top1": v, "erank": er}}
    return {"runs": runs}


UNPAIRED_ROWS = (study.Row("rand", reference="random_init"), study.Row("a", expect={"above": "b"}),
                 study.Row("b"), study.Row("c", expect={"collapses": True}), study.Row("d", expect={"similar_to": "b"}))


def test_verdicts_below_3_paired_seeds_keep_the_unpaired_rule(tmp_path):
    grid = study.Grid("g", "digits", 2, UNPAIRED_ROWS)
    # a: mean 80, std 1.41; b: mean 78, std 1.41 -> difference 2 > spread 1.41: holds
    st = _state({"rand": [70, 72], "a": [79, 81], "b": [77, 79], "c": [60, 62], "d": [78.5, 79.5]})
    assert study_report.verdict(grid, st, grid.row("a")) == ("+2.00 vs b (spread 1.41)", "holds")
    assert study_report.verdict(grid, st, grid.row("c"))[1] == "holds"  # 10 points below random init
    assert study_report.verdict(grid, st, grid.row("d"))[1] == "holds"  # +1.0 within spread 1.41
    st = _state({"rand": [70, 72], "a": [76, 78], "b": [77, 79], "c": [80, 82], "d": [80, 82]})
    assert study_report.verdict(grid, st, grid.row("a"))[1] == "within noise"  # -1 vs spread 1.41
    assert study_report.verdict(grid, st, grid.row("c"))[1] == "does not"  # learns: +10 over random init
    assert study_report.verdict(grid, st, grid.row("d"))[1] == "does not"  # +3 vs spread 1.41
    st = _state({"rand": [70, 72], "c": [80, 82]}, erank=1.2)
    assert study_report.verdict(grid, st, grid.row("c"))[1] == "holds"  # effective rank below 2: collapsed
    # 3 seeds each, but only 2 of them in both rows: still the unpaired rule
    st = _state({"a": {0: 79, 1: 81, 7: 80}, "b": {0: 77, 1: 79, 8: 78}})
    assert study_report.paired_diff(grid, st, grid.row("a")).n == 2
    assert study_report.verdict(grid, st, grid.row("a"))[1] == "holds"
    study_report.write_report(grid, st, tmp_path, 3, "python -m train.study --grid g")
    md = (tmp_path / "study.md").read_text()
    # d = 2, 2 (seeds 0, 1): sd 0, so the t interval (t_{0.975,1} = 12.71) is [2, 2]
    assert "| a | > b | 2 | +2.00 ± 0.00 | [+2.00, +2.00] | 2 of 2 | holds (unpaired rule: 2 paired seeds) |" in md
    assert "- a vs b: seed 7 finished in a only: left out of the pairing." in md


def test_paired_verdicts_from_3_seeds():
    """Hand-computed: differences d with mean m, sd s over n = 3 seeds; t_{0.975,2} = 4.303 (printed
    t table) -> interval m ± 4.303 s / sqrt(3) = m ± 2.484 s."""
    b = [70, 75, 80]  # a large seed-to-seed spread shared by every row
    rand = [60, 61, 62]
    rows = [study.Row("rand", reference="random_init"), study.Row("b")]
    cases = {  # name: (expect, per-seed values, verdict)
        "same_shift": ({"above": "b"}, [71, 76, 81], "holds"),  # d = 1, 1, 1: [1, 1]; unpaired: within noise
        "lower": ({"above": "b"}, [69, 74, 79], "contradicted"),  # d = -1, -1, -1
        "wide": ({"above": "b"}, [71, 77, 83], "undecided"),  # d = 1, 2, 3: 2 ± 2.484 = [-0.48, 4.48]
        "below": ({"below": "b"}, [68, 72, 76], "holds"),  # d = -2, -3, -4: [-5.48, -0.52]
        "eq": ({"similar_to": "b"}, [70.1, 74.9, 80.0], "holds"),  # d = .1, -.1, 0: ± 0.248, inside ± 1
        "eq_wide": ({"similar_to": "b"}, [71, 77, 83], "undecided"),  # [-0.48, 4.48] crosses +1
        "eq_far": ({"similar_to": "b"}, [73, 78.5, 84], "contradicted"),  # d = 3, 3.5, 4: [2.26, 4.74] > 1
        "learns": ({"learns": True}, [62, 64, 66], "holds"),  # vs rand: d = 2, 3, 4: [0.52, 5.48]
        "collapses_not": ({"collapses": True}, [62, 64, 66], "contradicted"),
        "collapses_maybe": ({"collapses": True}, [59, 62, 62], "undecided"),  # d = -1, 1, 0: ± 2.484
        "collapsed": ({"collapses": True}, [62, 64, 66], "holds"),  # effective rank 1.2 < 2
        "learns_collapsed": ({"learns": True}, [62, 64, 66], "contradicted"),  # effective rank 1.2 < 2
    }
    rows += [study.Row(name, expect=expect) for name, (expect, _, _) in cases.items()]
    grid = study.Grid("g", "digits", 3, tuple(rows))
    st = _state({"rand": rand, "b": b, **{name: v for name, (_, v, _) in cases.items()}},
                erank={"collapsed": 1.2, "learns_collapsed": 1.2})
    got = {name: study_report.verdict(grid, st, grid.row(name))[1] for name in cases}
    assert got == {name: want for name, (_, _, want) in cases.items()}
    assert study_report.verdict(grid, st, grid.row("same_shift"))[0] == "+1.00 vs b (spread 5.00)"  # unpaired: noise
    p = study_report.paired_diff(grid, st, grid.row("wide"))
    assert p.diffs == (1, 2, 3) and p.mean == 2 and p.sd == 1
    assert p.half_width() == pytest.approx(4.303 / 3 ** 0.5, abs=1e-3)
    assert p.agreeing(+1) == 3


def test_report_shows_the_paired_differences_and_the_unpaired_seeds(tmp_path):
    """Through study.json records: directpred vs sgd_linear over seeds 0-4, sgd_linear's seed 4
    failed and seed 6 exists in it alone; so seeds 0-3 pair: d = 0.5, 1.5, -0.5, 2.5 (mean 1, sd
    sqrt(5 / 3) = 1.2910; t_{0.975,3} = 3.182 -> half-width 3.182 * 1.2910 / 2 = 2.054); 3 of 4 above."""
    rows = (study.Row("random_init", reference="random_init"), study.Row("dp", expect={"above": "sgd"}),
            study.Row("sgd", expect={"learns": True}))
    grid = study.Grid("g", "digits", 5, rows)
    st = _state({"random_init": [70, 71, 72, 73, 74], "dp": [78.5, 79.5, 77.5, 80.5, 79.0],
                 "sgd": {0: 78.0, 1: 78.0, 2: 78.0, 3: 78.0, 6: 78.0}})
    st["runs"]["sgd/seed4"] = {"row": "sgd", "seed": 4, "wall_s": 1.0, "config": {}, "error": "diverged"}
    p = study_report.paired_diff(grid, st, grid.row("dp"))
    assert (p.seeds, p.only_a, p.only_b) == ((0, 1, 2, 3), (4,), (6,))
    assert p.mean == pytest.approx(1.0) and p.sd == pytest.approx((5 / 3) ** 0.5)
    assert p.half_width() == pytest.approx(3.182 * (5 / 3) ** 0.5 / 2, abs=1e-3)
    study_report.write_report(grid, st, tmp_path, 5, "python -m train.study --grid g")
    md = (tmp_path / "study.md").read_text()
    table = md.split("## Claims, paired by seed", 1)[1]
    dp_line = next(l for l in table.splitlines() if l.startswith("| dp |"))
    assert dp_line == "| dp | > sgd | 4 | +1.00 ± 2.05 | [-1.05, +3.05] | 3 of 4 | undecided |"
    # sgd vs random_init: seeds 0-3 pair (4 failed, 6 has no random_init run): d = 8, 7, 6, 5
    sgd_line = next(l for l in table.splitlines() if l.startswith("| sgd |"))
    assert sgd_line.startswith("| sgd | learns | 4 | +6.50 ± 2.05 |") and sgd_line.endswith("| 4 of 4 | holds |")
    assert "- dp vs sgd: seed 4 finished in dp only: left out of the pairing." in table
    assert "- dp vs sgd: seed 6 finished in sgd only: left out of the pairing." in table
    assert "- sgd vs random_init: seed 4 finished in random_init only: left out of the pairing." in table


def test_a_custom_grids_report_describes_its_own_grid_and_config(tmp_path):
    # issue 25 (new user 5): the report wrote "the paper's ablations", "the 10 000 test images" and "SGD"
    # for any grid: here a digits grid (360 test images) trained with LARS, without a paper or a claim
    grid_file = tmp_path / "mine.yaml"
    grid_file.write_text("preset: digits\nseeds: 2\nset: {optim.name: lars, model.ema: false, model.stop_grad: false}\n"
                         "rows:\n  - {name: dp, what: DirectPred}\n  - {name: lin, set: {predictor.name: linear}}\n")
    grid = study.load_grid(str(grid_file))
    study_report.write_report(grid, _state({"dp": [60.0, 61.0], "lin": [55.0]}), tmp_path, 2, "python -m train.study")
    md = (tmp_path / "study.md").read_text()
    for wrong in ("paper's", "10 000", "SGD", ", EMA", "STL-10", "Verdicts:"):
        assert wrong not in md, wrong
    assert md.startswith("# Study `mine` on `digits`\n")
    assert "LARS lr 0.05" in md and "no EMA target" in md and "`digits` training images" in md
    assert "test on the `digits` test split" in md


def test_paper_grid_report_shows_paired_stats_for_its_claims(tmp_path):
    """The recorded 3-seed paper study: its report gets a paired line for every claim row."""
    grid = study.load_grid("paper")
    state = json.loads((ROOT / "docs" / "study.json").read_text())
    study_report.write_report(grid, state, tmp_path, 3, "python -m train.study --grid paper --out docs --seeds 3")
    table = (tmp_path / "study.md").read_text().split("## Claims, paired by seed", 1)[1]
    claims = [r.name for r in grid.rows if r.expect]
    lines = [l for l in table.splitlines() if l.startswith("| ") and not l.startswith("| row ")]
    assert [l.split(" | ")[0][2:] for l in lines] == claims
    assert all(" | 3 | " in l for l in lines)  # every claim row paired over its 3 seeds


# ----------------------------------------------------------------------------- issue 20.9: the study runner's faults


def _one_row_grid(path: Path, name: str = "dp", seeds: object = 1) -> Path:
    path.write_text(json.dumps({"preset": "digits", "seeds": seeds, "rows": [{"name": name, "set": FAST}]}))
    return path


@pytest.mark.parametrize("content", [b'{"grid": "g", "runs": {"dp/seed0": {"row": "dp"', b"\xff\xfe{}", b"",
                                     b"[1, 2]", b'{"runs": {"dp/seed0": {"row": "dp", "config": {}}}}'],
                         ids=["truncated", "not-utf8", "empty", "list", "record-without-seed"])
def test_a_damaged_study_json_is_one_error_naming_it(tmp_path, content):
    grid, out = _one_row_grid(tmp_path / "g.yaml"), tmp_path / "out"
    out.mkdir()
    (out / "study.json").write_bytes(content)
    with pytest.raises(ConfigError, match=r"study.json is damaged .*move it aside") as e:
        study.main(str(grid), out)
    assert "\n" not in str(e.value)
    assert (out / "study.json").read_bytes() == content  # left as it was


@pytest.mark.parametrize("text, match", [
    (json.dumps({"preset": "digits", "seeds": "abc", "rows": [{"name": "a"}]}), "seeds='abc'"),
    ("preset: digits\nrows: [{name: a\n", "invalid YAML"),
    (json.dumps({"preset": "digits", "rows": [{"name": "../../../escape"}]}), "row name '../../../escape'"),
])
def test_bad_grids_are_one_error_line(tmp_path, text, match):
    p = tmp_path / "g.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(match)) as e:
        study.load_grid(str(p))
    assert "\n" not in str(e.value)


def test_seeds_0_is_refused_and_a_second_study_on_one_out_too(tmp_path):
    grid, out = _one_row_grid(tmp_path / "g.yaml"), tmp_path / "out"
    with pytest.raises(ConfigError, match="--seeds 0: expected at least 1"):
        study.main(str(grid), out, seeds=0)
    held = study.lock_study(out)  # another study on the same --out
    try:
        with pytest.raises(ConfigError, match="in use by another study"):
            study.main(str(grid), out)
    finally:
        held.close()
    assert not (out / "study.json").exists()


def test_a_run_killed_by_a_signal_is_not_recorded(tmp_path, monkeypatch, capsys):
    # an OOM kill was recorded as a failure, and the re-run said "already done"
    grid, out = _one_row_grid(tmp_path / "g.yaml"), tmp_path / "out"

    def killed(grid, row, seed, run_dir, runner):
        run_dir.mkdir(parents=True, exist_ok=True)
        runner([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"], run_dir / "log.txt")

    monkeypatch.setattr(study, "execute", killed)
    state = study.main(str(grid), out)
    assert state["runs"] == {} and "killed by SIGKILL" in capsys.readouterr().out
    assert json.loads((out / "study.json").read_text())["runs"] == {}


def test_the_trainer_does_not_outlive_a_killed_study(tmp_path):
    # the child was started in its own session, survived kill -9 of the study and held its folder's lock
    script = ("import sys, time; from pathlib import Path; from train import study; r = study.Runner(); "
              "r([sys.executable, '-c', 'import os, time; print(os.getpid(), flush=True); time.sleep(120)'], "
              "Path(sys.argv[1]))")
    log = tmp_path / "log.txt"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    parent = subprocess.Popen([sys.executable, "-c", script, str(log)], env=env)
    deadline = time.time() + 60
    while time.time() < deadline and len(log.read_text().splitlines() if log.exists() else []) < 2:
        time.sleep(0.05)
    child = int(log.read_text().splitlines()[1])
    parent.kill()
    parent.wait(timeout=30)
    deadline = time.time() + 30
    while time.time() < deadline and _alive(child):
        time.sleep(0.05)
    alive = _alive(child)
    if alive:
        os.kill(child, signal.SIGKILL)
    assert not alive


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_one_seed_gives_no_verdict():
    # one seed has no spread: the unpaired rule would call any difference "holds" (spread 0.00)
    grid = study.Grid("g", "digits", 1, UNPAIRED_ROWS)
    st = _state({"rand": [70], "a": [79], "b": [77], "c": [80], "d": [77.5]})
    for name in ("a", "c", "d"):
        assert study_report.verdict(grid, st, grid.row(name))[1] == "one seed: no verdict"
    st = _state({"rand": [70, 71], "a": [79, 80], "b": [77], "c": [60, 61], "d": [77.5, 78]})
    assert study_report.verdict(grid, st, grid.row("a"))[1] == "one seed: no verdict"  # b has one seed
    assert study_report.verdict(grid, st, grid.row("c"))[1] == "holds"  # two seeds each: the unpaired rule


# ----------------------------------------------------------------------------- --jobs: several runs at a time


def _rows_grid(path: Path, names: list[str], seeds: int = 1) -> Path:
    rows = [{"name": n, "set": {**FAST, "optim.lr": 0.05 + 0.01 * i}} for i, n in enumerate(names)]
    path.write_text(json.dumps({"preset": "digits", "seeds": seeds, "rows": rows}))
    return path


def test_jobs_run_that_many_at_a_time_in_plan_order(tmp_path, monkeypatch):
    grid, out = _rows_grid(tmp_path / "g.yaml", ["a", "b", "c"], seeds=2), tmp_path / "out"
    spans, started = [], []

    def timed(grid, row, seed, run_dir, runner):  # a stand-in run: a child process that sleeps 0.5 s
        run_dir.mkdir(parents=True, exist_ok=True)
        started.append(study.run_key(row, seed))
        t0 = time.monotonic()
        runner([sys.executable, "-c", "import time; time.sleep(0.5)"], run_dir / "log.txt")
        spans.append((t0, time.monotonic()))
        return {"linear_top1": 50.0, "linear_top5": 90.0, "linear_lr": 0.1, "erank": 3.0}

    monkeypatch.setattr(study, "execute", timed)
    state = study.main(str(grid), out, jobs=2)
    plan = [study.run_key(r, s) for r, s in study.plan(study.load_grid(str(grid)), 2)]
    assert sorted(state["runs"]) == sorted(plan)
    # taken in the seed-major order, two at a time (the two of a pair start in either order)
    assert [set(started[i:i + 2]) for i in (0, 2, 4)] == [set(plan[i:i + 2]) for i in (0, 2, 4)], started
    most = max(sum(a < t < b for a, b in spans) for t in (a + 1e-6 for a, _ in spans))
    assert most == 2  # two at a time, never three
    assert all(r["jobs"] == 2 for r in state["runs"].values())
    assert "6 of these runs ran 2 at a time" in (out / "study.md").read_text()
    with pytest.raises(ConfigError, match="--jobs 0: expected a whole number >= 1"):
        study.main(str(grid), out, jobs=0)


def test_jobs_stop_resume_and_give_the_results_of_one_at_a_time(tmp_path):
    """SIGTERM stops both running trainers (each saves its checkpoint); the same command resumes
    them, and every metric equals that of the same runs made one at a time, uninterrupted."""
    grid = _rows_grid(tmp_path / "g.yaml", ["a", "b"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "train.study", "--grid", str(grid), "--out", str(tmp_path / "jobs"), "--jobs", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    logs = [tmp_path / "jobs" / "runs" / r / "seed0" / "log.txt" for r in ("a", "b")]
    deadline = time.time() + 120
    while not all(p.exists() for p in logs) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    text, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, text
    assert "stopped before finishing a/seed0" in text and "stopped before finishing b/seed0" in text, text
    assert json.loads((tmp_path / "jobs" / "study.json").read_text())["runs"] == {}

    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    together = json.loads((tmp_path / "jobs" / "study.json").read_text())["runs"]
    alone = study.main(str(grid), tmp_path / "alone")["runs"]
    assert sorted(together) == sorted(alone) == ["a/seed0", "b/seed0"]
    for key in alone:
        assert together[key]["resumed"] and together[key]["jobs"] == 2 and "jobs" not in alone[key]
        assert together[key]["metrics"] == alone[key]["metrics"], key


# ----------------------------------------------------------------------------- issue 25: study.json records, run folders


@pytest.mark.parametrize("record, named", [
    ({"config": "digits"}, "'dp/seed0': config is 'digits', not an object"),  # was an AttributeError traceback
    ({"row": ["dp"]}, "'dp/seed0': row is ['dp'], not a string"),  # was TypeError: unhashable type
    ({"seed": "zero"}, "'dp/seed0': seed is 'zero', not an integer"),  # blamed the grid
    ({"seed": True}, "seed is True, not an integer"),
    ({"seed": -1}, "seed is -1, not >= 0"),
    ({"wall_s": "1h"}, "wall_s is '1h', not a number"),
    ({"metrics": {"linear_top1": "high"}}, "metric linear_top1 is 'high', not a number"),
    ({"metrics": [1]}, "metrics is [1], not an object"),
], ids=["config-str", "row-list", "seed-str", "seed-bool", "seed-negative", "wall-str", "metric-str", "metrics-list"])
def test_a_study_json_record_of_the_wrong_types_is_one_error_naming_study_json_and_the_record(tmp_path, record,
                                                                                                named):
    grid, out = _one_row_grid(tmp_path / "g.yaml"), tmp_path / "out"
    good = {"row": "dp", "seed": 0, "config": study.run_config(study.load_grid(str(grid)), study.Row("dp", set=()), 0),
            "wall_s": 1.0, "metrics": {"linear_top1": 50.0}}
    out.mkdir()
    content = json.dumps({"grid": "g", "preset": "digits", "runs": {"dp/seed0": {**good, **record}}}).encode()
    (out / "study.json").write_bytes(content)
    with pytest.raises(ConfigError) as e:
        study.main(str(grid), out)
    line = str(e.value)
    assert "\n" not in line and line.startswith(f"{out / 'study.json'} is damaged (run ") and named in line
    assert (out / "study.json").read_bytes() == content


def test_a_run_folder_that_is_a_regular_file_is_one_error_line(tmp_path, monkeypatch):
    # issue 25.5: a FileExistsError traceback
    grid, out = _one_row_grid(tmp_path / "g.yaml"), tmp_path / "out"
    (out / "runs" / "dp").mkdir(parents=True)
    (out / "runs" / "dp" / "seed0").write_text("not a folder")
    monkeypatch.setattr(study, "execute", lambda *a: pytest.fail("the run must not start"))
    with pytest.raises(ConfigError) as e:
        study.main(str(grid), out)
    assert str(e.value) == (f"cannot create the run folder {out / 'runs' / 'dp' / 'seed0'}: "
                            f"{out / 'runs' / 'dp' / 'seed0'} is a file, not a folder; move it aside and re-run")
    assert json.loads((out / "study.json").read_text())["runs"] == {}
    r = subprocess.run([sys.executable, "-m", "train.study", "--grid", str(grid), "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [f"error: {e.value}"], r.stderr
