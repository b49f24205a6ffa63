"""bench/train_throughput.py: every (pipeline, layout) is timed in every round, and each speed-up
is the median over rounds of the two pipelines' ratio in the same round."""

import statistics

import numpy as np
import torch

from bench import train_throughput


def test_rounds_time_every_pipeline_and_layout_and_the_speedups_are_paired_medians():
    res = train_throughput.measure("fashion_mnist", ["data.train_subset=0"], batch=16, steps=1, rounds=3,
                                   workers=0, device=torch.device("cpu"), layouts=("nchw", "nhwc"))
    rounds = res["rounds_images_per_s"]
    assert sorted(rounds) == ["batched/nchw", "batched/nhwc", "per_sample/nchw", "per_sample/nhwc"]
    assert all(len(r["step"]) == 3 and all(x > 0 for x in r["step"]) for r in rounds.values())
    assert len(rounds["per_sample/nchw"]["views"]) == 3 and rounds["per_sample/nhwc"]["views"] == []
    assert res["channels_last"] == {"nchw": False, "nhwc": True}

    def ratio(a, b):  # an independent median of same-round ratios
        return float(np.median(np.array(rounds[b]["step"]) / np.array(rounds[a]["step"])))

    for lay in ("nchw", "nhwc"):
        assert res["speedup_batched"][lay] == ratio(f"per_sample/{lay}", f"batched/{lay}")
    assert res["speedup_nhwc"] == ratio("batched/nchw", "batched/nhwc")
    assert res["speedup_end_to_end"] == ratio("per_sample/nchw", "batched/nhwc")
    assert res["images_per_s"]["batched/nhwc"]["step"] == statistics.median(rounds["batched/nhwc"]["step"])
