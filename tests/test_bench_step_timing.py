import pytest

pytest.importorskip("torchvision")  # train/ needs it

from bench import step_timing  # noqa: E402


def test_step_timing_runs_every_variant_side_by_side(tmp_path):
    args = step_timing.get_args_parser().parse_args(
        ["--config", "digits", "--batch-size", "32", "--steps", "1", "--rounds", "2", "--warmup", "1", "--predictor-reps", "2",
         "--json", str(tmp_path / "t.json")])
    res = step_timing.main(args)
    assert set(res["variants"]) == set(step_timing.VARIANTS)
    assert {"directpred", "linear", "mlp", "none"} <= set(res["variants"])
    for v in res["variants"].values():
        assert len(v["rounds_ms"]) == 2 and v["median_ms"] > 0 and v["predictor_median_ms"] > 0
    assert res["variants"]["linear"]["overhead_vs_linear"] == 0.0
    assert (tmp_path / "t.json").exists()
