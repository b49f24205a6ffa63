"""Two gloo processes with different data hold the same F and W_p as one process on
the concatenated batches (the batch correlation is all-reduced once per step)."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastpred import DirectPredictor

D, N, STEPS = 8, 24, 4


def make_batches(rank):
    g = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(N, D, generator=g) * (1 + rank) + rank for _ in range(STEPS)]


def worker(rank, world, init_file, out_dir, kwargs):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)  # same initial W_p on every rank
    pred = DirectPredictor(D, **kwargs)
    batches = make_batches(rank)
    if rank == 1:
        batches[2] = batches[2].clone()
        batches[2][0, 0] = float("nan")  # one rank's bad batch: every rank skips that step
    for x in batches:
        pred(x)
    torch.save({k: v.clone() for k, v in pred.state_dict().items()}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("kwargs", [dict(), dict(zero_mean=True, freq=2), dict(partitions=2)])
def test_two_ranks_agree_with_one_process_on_the_union(tmp_path, kwargs):
    mp.start_processes(worker, args=(2, str(tmp_path / "init"), str(tmp_path), kwargs), nprocs=2, start_method="spawn")
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k

    torch.manual_seed(0)
    single = DirectPredictor(D, **kwargs)
    b0, b1 = make_batches(0), make_batches(1)
    for step in range(STEPS):
        if step == 2:
            with pytest.warns(RuntimeWarning):
                single(torch.full((N, D), float("nan")))  # the skipped step
            continue
        single(torch.cat([b0[step], b1[step]]))
    for k, v in single.state_dict().items():
        torch.testing.assert_close(r0[k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert int(r0["num_skipped"]) == 1
