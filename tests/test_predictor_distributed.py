"""Two gloo processes with different data hold the same F and W_p as one process on
the concatenated batches (the batch correlation is all-reduced once per step)."""
import datetime
import os
import time

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
    kwargs = dict(kwargs)
    autocast = kwargs.pop("autocast", None)  # statistics stay float32 in an autocast region
    overflow = kwargs.pop("overflow", False)
    pred = DirectPredictor(D, **kwargs)
    batches = make_batches(rank)
    if overflow:  # each rank's x^T x (25 000 x 8.1e33) is finite, their all-reduced sum is not
        batches[2] = torch.full((25_000, D), 9e16)
    elif rank == 1:
        batches[2] = batches[2].clone()
        batches[2][0, 0] = float("nan")  # one rank's bad batch: every rank skips that step
    for x in batches:
        with torch.autocast("cpu", dtype=autocast or torch.float32, enabled=autocast is not None):
            pred(x)
    torch.save({k: v.clone() for k, v in pred.state_dict().items()}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("kwargs", [dict(), dict(zero_mean=True, freq=2), dict(partitions=2),
                                    dict(autocast=torch.bfloat16), dict(overflow=True)],
                         ids=["default", "zero_mean-freq2", "partitions", "bf16-autocast", "overflow-after-all-reduce"])
def test_two_ranks_agree_with_one_process_on_the_union(tmp_path, kwargs):
    mp.start_processes(worker, args=(2, str(tmp_path / "init"), str(tmp_path), kwargs), nprocs=2, start_method="spawn")
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k

    torch.manual_seed(0)
    single = DirectPredictor(D, **{k: v for k, v in kwargs.items() if k not in ("autocast", "overflow")})
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


# ------------------------------------------------------------- drop-in use under DDP
def run_with_deadline(fn, args, nprocs=2, seconds=180):
    """Spawn ``nprocs`` workers; fail (rather than hang) if they do not finish in time."""
    context = mp.start_processes(fn, args=args, nprocs=nprocs, start_method="spawn", join=False)
    deadline = time.monotonic() + seconds
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(f"workers still running after {seconds} s: a collective deadlocked")


EMPTY_STEP = 2  # rank 1 has no samples at this step


def seeded(*args, **kwargs):
    torch.manual_seed(0)  # the same initial W_p (and hyperplanes) on every rank and in the reference
    return DirectPredictor(*args, **kwargs)


def seeded_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(D, D), DirectPredictor(D))


def dropin_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    host_copies = []
    original = torch.Tensor.new_tensor
    torch.Tensor.new_tensor = lambda self, *a, **k: host_copies.append(1) or original(self, *a, **k)
    attached = seeded(D)  # per-view calls, one fold per step
    partitioned = seeded(D, partitions=2)  # one call per step
    local = seeded(D, sync=False)  # each rank its own F
    attached.attach()
    for step, x in enumerate(make_batches(rank)):
        if rank == 1 and step == EMPTY_STEP:
            x = x[:0]
        z1, z2 = x.chunk(2) if len(x) else (x, x)
        attached(z1), attached(z2)
        attached.step()
        partitioned(x)
        local(x)
    torch.Tensor.new_tensor = original
    # Under DDP (which broadcasts buffers from rank 0 at every forward) with 2 micro-batches per step.
    net = seeded_net()
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    net[1].attach(opt)
    for x in make_batches(rank):
        for micro in x.chunk(2):  # without no_sync(): DDP then broadcasts buffers at each forward
            ddp(micro).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    out = {name: {k: v.clone() for k, v in m.state_dict().items()}
           for name, m in (("attached", attached), ("partitioned", partitioned), ("local", local), ("ddp", net))}
    out["host_copies"] = len(host_copies)
    torch.save(out, os.path.join(out_dir, f"dropin{rank}.pt"))
    dist.destroy_process_group()


def test_attach_partitions_empty_rank_and_unsynced_under_two_ranks(tmp_path):
    run_with_deadline(dropin_worker, (2, str(tmp_path / "init"), str(tmp_path)))
    r0 = torch.load(tmp_path / "dropin0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "dropin1.pt", weights_only=True)
    assert r0["host_copies"] == r1["host_copies"] == 0  # partitions count samples on the device
    b0, b1 = make_batches(0), make_batches(1)
    union = [torch.cat([b0[t]] + ([b1[t]] if t != EMPTY_STEP else [])) for t in range(STEPS)]
    for name, kwargs in (("attached", {}), ("partitioned", dict(partitions=2))):
        for k in r0[name]:
            assert torch.equal(r0[name][k], r1[name][k]), (name, k)
        single = seeded(D, **kwargs)
        for x in union:
            single(x)
        if name == "attached":
            single.refresh()  # attached rebuilds in step(); one call per step, at the next call
        for k, v in single.state_dict().items():
            torch.testing.assert_close(r0[name][k], v, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}.{k}: {m}")
    # DDP with accumulation: one step on the union of both ranks' micro-batches (DDP averages
    # the gradients over the ranks, hence the 1/2).
    net = seeded_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    net[1].attach(opt)
    for t in range(STEPS):
        for x in (b0[t], b1[t]):
            for micro in x.chunk(2):
                (0.5 * net(micro).pow(2).mean()).backward()
        opt.step()
        opt.zero_grad()
    for k, v in net.state_dict().items():
        torch.testing.assert_close(r0["ddp"][k], v, rtol=1e-4, atol=1e-5, msg=lambda m: f"ddp {k}: {m}")
        assert torch.equal(r0["ddp"][k], r1["ddp"][k]), k
    # sync=False: each rank's F is the F of its own data alone.
    for rank, out in ((0, r0), (1, r1)):
        alone = seeded(D)
        for step, x in enumerate(make_batches(rank)):
            alone(x[:0] if rank == 1 and step == EMPTY_STEP else x)
        torch.testing.assert_close(out["local"]["corr"], alone.corr, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(r0["local"]["corr"], r1["local"]["corr"])
