#!/usr/bin/env python3
"""Weak scaling of a gradcast cluster across simulated hosts (deploy/netsim.sh):
the coordinator and every node in a network namespace of its own, each host's
link shaped to --rate, the global batch growing with the nodes (--per-node
samples each). Prints, per node count, the measured step time beside the cost
model's prediction, the bytes on the busiest link and the weak-scaling
efficiency (one node's step time / N nodes' step time).

    sudo bench/scaling.py --model resnet20 --rate 1gbit --compute-ms 50 \\
        [--nodes 1 2 4 8] [--steps 30] [--per-node 128] [--wire f32] \\
        [--data path/to/cifar-10-binary.tar.gz]

--compute-ms N emulates the nodes' compute (a node waits N ms per step and
answers a pseudo-gradient: `gradcast node --emulate-compute-ms`), so many
nodes fit on a few cores and only the communication is measured;
--compute-ms 0 uses real compute (1 thread per node). --ddp adds PyTorch DDP
(gloo, real compute, bench/.venv) on the same simulated links, one rank per
host, as the anchor; compare it with a real-compute gradcast run at the same
--per-node.
"""

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NETSIM = os.path.join(ROOT, "deploy", "netsim.sh")
SAMPLE_BYTES = 3 * 32 * 32 + 1
# TCP/IP over Ethernet carries 1448 payload bytes in 1514 on the wire.
PAYLOAD = 1448 / 1514


def rate_bytes(rate):
    m = re.fullmatch(r"([0-9.]+)([kmg]?)bit", rate.lower())
    if not m:
        sys.exit(f"cannot read rate {rate!r}")
    return float(m[1]) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m[2]] / 8 * PAYLOAD


def star_bytes(trainable, state, nodes, per_node, wire):
    """Bytes through the coordinator's link per step, down and up, today:
    every node gets the whole weights (f32, or bf16 changes) and its samples,
    and sends the whole gradient (f32, or bf16) and the state (f32)."""
    w = 2 if wire == "bf16" else 4
    down = nodes * ((trainable + state) * w + per_node * SAMPLE_BYTES)
    up = nodes * (trainable * w + state * 4)
    return down, up


def sharded_bytes(trainable, state, nodes, per_node, wire="f32"):
    """Bytes through the busiest link per step with one aggregator beside
    every node: a node host sends (N-1)/N of its answer to the other
    aggregators and its aggregator gets N-1 slices of M/N from them (and
    the same again for the weights, the other way); the coordinator's link
    carries only the samples (sent a step ahead)."""
    m = trainable * (2 if wire == "bf16" else 4) + state * 4
    each = (nodes - 1) * m / nodes
    return each, each


def predict_sharded(model_bytes, nodes, bandwidth, compute_s, update_s):
    """Compute, then every host's answer out and its aggregator's slices in
    at once (full duplex: (N-1)/N of M each way), the plan and commit round
    trips (in update_s), then the new slices out to every node and in from
    every aggregator ((N-1)/N of M again)."""
    return compute_s + 2 * (nodes - 1) * model_bytes / nodes / bandwidth + update_s


def predict(down, up, bandwidth, compute_s, update_s):
    """Today's step is serial: weights and samples down, compute, gradients
    up, average + optimizer; nothing overlaps."""
    return down / bandwidth + compute_s + up / bandwidth + update_s


def netsim(args, env=None):
    return subprocess.run([NETSIM, *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def gradcast_run(a, nodes):
    global_batch = a.per_node * nodes
    node_args = "--threads 1"
    if a.compute_ms > 0:
        node_args += f" --emulate-compute-ms {a.compute_ms}"
    coordinator = [
        "--data", a.data, "--model", a.model, "--nodes", str(nodes),
        "--batch-size", str(global_batch), "--epochs", "1",
        "--train-limit", str(global_batch * a.steps), "--test-limit", str(nodes),
        "--shm-dir", "off", "--wire", a.wire, "--progress", "plain",
        "--step-timeout", "600",
    ]
    aggregators = nodes if a.aggregators else 0
    out = netsim(["run", "--nodes", str(nodes), "--rate", a.rate,
                  "--node-args", node_args, "--aggregators", str(aggregators),
                  "--", *coordinator])
    text = out.stdout + out.stderr
    if out.returncode != 0:
        sys.exit(f"netsim run failed ({out.returncode}):\n{text[-3000:]}")
    start = re.search(r"training starts .*trainable=(\d+) state=(\d+)", text)
    step = re.search(r"step time: ([0-9.]+) ms per step = send ([0-9.]+) \+ compute ([0-9.]+)"
                     r" \+ transfer ([0-9.]+) \+ update ([0-9.]+)", text)
    if not (start and step):
        sys.exit(f"no step times in the coordinator's output:\n{text[-3000:]}")
    return {
        "trainable": int(start[1]), "state": int(start[2]),
        "step_ms": float(step[1]), "send": float(step[2]), "compute": float(step[3]),
        "transfer": float(step[4]), "update": float(step[5]),
    }


def ddp_run(a, nodes):
    python = os.environ.get("PYTHON", os.path.join(ROOT, "bench", ".venv", "bin", "python"))
    if not os.access(python, os.X_OK):
        sys.exit(f"no {python}: run bench/setup-venv.sh first (or set PYTHON)")
    up = netsim(["up", "--nodes", str(nodes), "--rate", a.rate])
    if up.returncode != 0:
        sys.exit(f"netsim up failed:\n{up.stderr}")
    try:
        global_batch = a.per_node * nodes
        ranks = []
        for r in range(nodes):
            cmd = [NETSIM, "exec", f"node{r + 1}", "--", python,
                   os.path.join(ROOT, "bench", "ddp_reference.py"), "--model", a.model,
                   "--batch-size", str(global_batch), "--ranks", str(nodes),
                   "--threads-per-rank", "1", "--samples", str(global_batch * a.steps),
                   "--warmup", "2", "--channels-last", "--rank", str(r),
                   "--master", "10.77.0.11:29500"]
            # Gloo finds its own address through the host name, which every
            # simulated host shares: name the interface instead.
            env = {**os.environ, "GLOO_SOCKET_IFNAME": "eth0"}
            ranks.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True, env=env))
            time.sleep(0.2)
        outs = [p.communicate(timeout=1800) for p in ranks]
        if any(p.returncode != 0 for p in ranks):
            sys.exit("a DDP rank failed:\n" + "\n".join(o[1][-2000:] for o in outs))
        return json.loads(outs[0][0].strip().splitlines()[-1])["step_ms"]
    finally:
        netsim(["down"])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--rate", default="1gbit")
    p.add_argument("--compute-ms", type=int, default=50)
    p.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--per-node", type=int, default=128)
    p.add_argument("--wire", default="f32", choices=["f32", "bf16"])
    p.add_argument("--data", default=os.environ.get(
        "GRADCAST_DATA", os.path.join(ROOT, "..", "shared", "data", "cifar-10-binary.tar.gz")))
    p.add_argument("--ddp", action="store_true", help="also PyTorch DDP on the same links")
    p.add_argument("--aggregators", action="store_true",
                   help="one shard aggregator beside every node (gradcast aggregator)")
    a = p.parse_args()
    if not os.path.exists(a.data):
        sys.exit(f"no data at {a.data}; pass --data path/to/cifar-10-binary.tar.gz")
    if max(a.nodes) * a.per_node * a.steps > 50000:
        a.steps = 50000 // (max(a.nodes) * a.per_node)
        print(f"(--steps lowered to {a.steps}: the largest run must fit in 50,000 samples)")
    check = netsim(["check"])
    if check.returncode != 0:
        sys.exit(f"SKIPPED: {check.stdout.strip()}")
    variant = subprocess.run([os.path.join(ROOT, "bench", "cpu-variant.sh")],
                             capture_output=True, text=True).stdout.strip()
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    compute = f"emulated {a.compute_ms} ms" if a.compute_ms else "real, 1 thread per node"
    print(f"# {time.strftime('%Y-%m-%dT%H:%MZ', time.gmtime())} commit {commit}, {os.cpu_count()} cores,"
          f" {variant}; {a.model}, {a.rate} per host, compute {compute},"
          f" {a.per_node} samples per node per step, {a.steps} steps, wire {a.wire}")
    bandwidth = rate_bytes(a.rate)
    rows = []
    for n in a.nodes:
        r = gradcast_run(a, n)
        compute_s = r["compute"] / 1000
        if a.aggregators:
            down, up = sharded_bytes(r["trainable"], r["state"], n, a.per_node, a.wire)
            model_bytes = r["trainable"] * (2 if a.wire == "bf16" else 4) + r["state"] * 4
            r["predicted"] = 1000 * predict_sharded(
                model_bytes, n, bandwidth, compute_s, r["update"] / 1000)
        else:
            down, up = star_bytes(r["trainable"], r["state"], n, a.per_node, a.wire)
            r["predicted"] = 1000 * predict(down, up, bandwidth, compute_s, r["update"] / 1000)
        r["busiest_mb"] = (down + up) / 1e6
        r["n"] = n
        if a.ddp and n > 1:
            r["ddp_ms"] = ddp_run(a, n)
        rows.append(r)
        print(f"  N={n}: {r['step_ms']:.1f} ms per step (predicted {r['predicted']:.1f})", flush=True)
    base = rows[0]["step_ms"] if rows[0]["n"] == 1 else None
    print()
    print("| nodes | busiest link MB/step (down+up) | predicted ms | measured ms | send + compute"
          " + transfer + update | samples/s | efficiency |" + (" DDP ms |" if a.ddp else ""))
    print("|---:|---:|---:|---:|---|---:|---:|" + ("---:|" if a.ddp else ""))
    for r in rows:
        rate = r["n"] * a.per_node / (r["step_ms"] / 1000)
        eff = f"{base / r['step_ms']:.2f}" if base else "–"
        split = f"{r['send']:.1f} + {r['compute']:.1f} + {r['transfer']:.1f} + {r['update']:.1f}"
        ddp = f" {r['ddp_ms']:.1f} |" if "ddp_ms" in r else (" – |" if a.ddp else "")
        print(f"| {r['n']} | {r['busiest_mb']:.1f} | {r['predicted']:.1f} | {r['step_ms']:.1f} |"
              f" {split} | {rate:.0f} | {eff} |{ddp}")
    if not math.isfinite(sum(r["step_ms"] for r in rows)):
        sys.exit(1)


if __name__ == "__main__":
    main()
