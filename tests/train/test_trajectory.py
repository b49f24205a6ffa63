"""train.trajectory: a study's per-epoch effective rank, read from hand-written metrics.jsonl files
shaped like the trainer's (per-epoch records, evaluations only on some epochs, a closing "final")."""

import json

import pytest

from train import trajectory


def write_run(out, row, seed, records):
    d = out / "runs" / row / f"seed{seed}"
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture
def study(tmp_path):
    write_run(tmp_path, "directpred", 0, [
        {"step": 10, "lr": 0.03, "loss": 1.0},  # a step record: no epoch evaluation
        {"step": 78, "epoch": 1, "loss": 0.8, "erank": 30.0},
        {"step": 156, "epoch": 2, "loss": 0.5},  # an epoch without evaluation (knn_every > 1)
        {"step": 234, "epoch": 3, "loss": 0.4, "erank": 34.0},
        {"final": True, "step": 234, "epoch": 3, "erank": 34.0}])
    write_run(tmp_path, "directpred", 1, [{"step": 78, "epoch": 1, "erank": 20.0}])  # still running
    write_run(tmp_path, "no_predictor", 0, [{"step": 78, "epoch": 1, "erank": 9.0},
                                            {"step": 156, "epoch": 2, "erank": 1.5}])
    write_run(tmp_path, "random_init", 0, [])  # a reference: no metrics.jsonl records
    return tmp_path


def test_trajectories_and_their_mean(study):
    curves = trajectory.trajectories(study)
    assert curves == {"directpred": {0: [(1, 30.0), (3, 34.0)], 1: [(1, 20.0)]},
                      "no_predictor": {0: [(1, 9.0), (2, 1.5)]}}
    assert trajectory.mean_curve(curves["directpred"]) == [(1, 25.0, 2), (3, 34.0, 1)]


def test_figure_and_bad_metric(study):
    path = trajectory.main(study, rows=["no_predictor"])
    assert path == study / "trajectory_erank.png" and path.stat().st_size > 0
    with pytest.raises(ValueError, match="metric='loss'"):
        trajectory.trajectories(study, "loss")
    with pytest.raises(SystemExit, match="no run has a per-epoch knn_top1"):
        trajectory.main(study, metric="knn_top1")
