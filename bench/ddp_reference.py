#!/usr/bin/env python3
"""PyTorch DistributedDataParallel reference for gradcast's cluster: the same
seed networks (from pytorch_reference.py) trained with Adam over gloo, one
process per rank on this host, on random data, at a global batch split evenly
over the ranks.

    bench/.venv/bin/python bench/ddp_reference.py --model resnet20 \
        --batch-size 32 --ranks 2 --threads-per-rank 1 [--samples 6400] [--channels-last]

`--ranks 1` is PyTorch in one process (no DDP), the single-machine baseline.
With `--rank R --master ADDR:PORT` this process is rank R alone (started
once per host, e.g. by bench/scaling.sh in simulated hosts) and rank 0 prints.
Prints one JSON line: training samples per second over `--samples` samples
(after `--warmup` steps) and the mean step time, measured by rank 0 between
two barriers, like gradcast's epoch line:

    {"engine":"pytorch-ddp","model":...,"batch_size":32,"ranks":2,
     "threads_per_rank":1,"samples_per_s":...,"step_ms":...,"memory_format":...}
"""

import argparse
import json
import os
import socket
import sys
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pytorch_reference import RESNET_L2, Resnet, build  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(rank, args, port, out):
    # DDP warns that 1x1 kernels in channels_last have other strides than its
    # buckets; that costs a copy and is part of what is measured.
    warnings.filterwarnings("ignore", message="Grad strides do not match")
    torch.set_num_threads(args.threads_per_rank)
    torch.manual_seed(1)
    distributed = args.ranks > 1
    if distributed:
        addr, _, master_port = (args.master or f"127.0.0.1:{port}").rpartition(":")
        os.environ["MASTER_ADDR"] = addr
        os.environ["MASTER_PORT"] = master_port
        dist.init_process_group("gloo", rank=rank, world_size=args.ranks)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = build(args.model).to(memory_format=fmt)
    l2_kernels = model.l2_kernels() if isinstance(model, Resnet) else []
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-7)
    local = args.batch_size // args.ranks + (1 if rank < args.batch_size % args.ranks else 0)
    g = torch.Generator().manual_seed(42 + rank)
    images = torch.randint(0, 256, (local, 3, 32, 32), generator=g)
    x = (images.float() / 255.0).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (local,), generator=g)
    steps = max(1, args.samples // args.batch_size)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        if l2_kernels:
            loss = loss + RESNET_L2 * sum(w.pow(2).sum() for w in l2_kernels)
        loss.backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    if distributed:
        dist.barrier()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if distributed:
        dist.barrier()
    secs = time.perf_counter() - started
    if rank == 0:
        out.put((steps * args.batch_size / secs, secs / steps))
    if distributed:
        dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--batch-size", type=int, default=32, help="global batch")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--threads-per-rank", type=int, default=1)
    p.add_argument("--samples", type=int, default=6400)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--rank", type=int, help="run this rank only (with --master)")
    p.add_argument("--master", help="rank 0's ADDR:PORT when ranks run on other hosts")
    args = p.parse_args()
    if min(args.batch_size, args.ranks, args.threads_per_rank, args.samples) <= 0:
        raise SystemExit("--batch-size, --ranks, --threads-per-rank and --samples must be positive")
    if args.batch_size < args.ranks:
        raise SystemExit("--batch-size must be at least --ranks")
    if (args.rank is None) != (args.master is None):
        raise SystemExit("--rank and --master go together")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    if args.rank is not None:
        if not 0 <= args.rank < args.ranks:
            raise SystemExit("--rank must be in 0..--ranks")
        train(args.rank, args, None, out)
        if args.rank != 0:
            return
    else:
        port = free_port()
        procs = [ctx.Process(target=train, args=(r, args, port, out)) for r in range(args.ranks)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
        if any(proc.exitcode != 0 for proc in procs):
            raise SystemExit("a rank failed")
    rate, step_s = out.get(timeout=5)
    print(
        json.dumps(
            {
                "engine": "pytorch-ddp" if args.ranks > 1 else "pytorch",
                "model": args.model,
                "batch_size": args.batch_size,
                "ranks": args.ranks,
                "threads_per_rank": args.threads_per_rank,
                "samples_per_s": round(rate, 1),
                "step_ms": round(step_s * 1000, 2),
                "memory_format": "channels_last" if args.channels_last else "nchw",
            },
            separators=(",", ":"),
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
