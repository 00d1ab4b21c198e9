#!/usr/bin/env python3
"""Writes one model's row of docs/seed-table/README.md from its history.

usage: seed_table_row.py OUT_DIR MODEL STUDY_PERCENT PLANNED_EPOCHS WALL_SECONDS
                         NODE_COMPUTE_SECONDS COMMIT
       seed_table_row.py OUT_DIR          (rewrite the table, no new row)

Below the table, the agreement check: for every model with a PyTorch history
in OUT_DIR/pytorch/MODEL.json (bench/pytorch-agreement.sh), the first epochs'
test accuracy of gradcast and PyTorch side by side.

The node compute share is the nodes' compute time over (2 nodes x wall time):
the part of the cluster's time spent in forward and backward passes.
"""
import json
import os
import sys

import agreement_seeds

ORDER = ["simple-cnn", "complex-cnn", "resnet20", "resnet20-dropout", "resnet50-dropout"]
# Beyond the study: the same networks with --augment, below the study's rows.
ORDER += [m + "-augment" for m in ORDER]
STUDY = {
    "simple-cnn": "71.6 %",
    "complex-cnn": "90.5 %",
    "resnet20": "66.2 % (train 96.2 %)",
    "resnet20-dropout": "86.1 % (train 95.0 %)",
    "resnet50-dropout": "87.4 % (train 99.2 %)",
}
STUDY.update({m + "-augment": "(" + STUDY[m].split(" ")[0] + " % without)" for m in list(STUDY)})
HEADER = """# The study's table, trained on gradcast

Each row is trained by `bench/seed-table.sh MODEL` on a 2-node cluster on one
host (2 nodes x 1 thread, batch 32, Adam 1e-3, the model's schedule: constant
for simple-cnn, `step-decay` for complex-cnn, and for the ResNets the Keras
CIFAR-10 ResNet schedule, x0.1 after epoch 80; no augmentation) on the CIFAR-10 binary archive whose pixels went through JPEG
(q75): expect accuracies near, not equal to, the study's. A row whose epochs
are below the plan is a run in progress; rerunning the same command continues
it bit-exactly. Curves: `MODEL.png`; histories: `MODEL.json`. Rows named
`MODEL-augment` go beyond the study: the same recipe with `--augment` (random
crop of the 4-pixel padded image and horizontal flip, `bench/seed-table.sh
MODEL --augment`; a ResNet's augmented row runs the Keras example's 200
epochs, its schedule x0.01 after epoch 120, x0.001 after 160, x0.0005 after
180); their study column gives the study's number without it.

| model | study (test) | epochs | final test | best test (epoch) | final train | wall time | node compute share | commit |
|---|---|---|---|---|---|---|---|---|
"""

# What a reader of a row must know about how it was trained.
NOTES = {
    "complex-cnn": (
        "complex-cnn: trained again from epoch 1 on 2026-12-06, on a slower "
        "Intel host (family 6 model 207, 115 GFLOP/s per core; `bench/RESULTS.md`) "
        "with development work and benchmarks beside it on the same two cores "
        "(epoch 1 took 63 min; alone an epoch takes ~25 there). An earlier run "
        "on the model-167 Intel host reached 0.6044 and 0.6648 after epochs 1 "
        "and 2; one run against another differs by several points in these "
        "first epochs (see the agreement section). Its "
        "complete resume state is 143 MB (47.7 MB of weights plus Adam's m and "
        "v; zstd -19 saves 8 %), too large to keep in git: the next run starts "
        "again from epoch 1 unless the state is carried along "
        "(`SEED_TABLE_RUNS` puts the run folder on a persistent disk) or a GPU "
        "machine runs it."
    ),
    "resnet20-augment": (
        "resnet20-augment: planned for 100 epochs at first; at epoch 100 test "
        "accuracy 0.8748 (best 0.8771 at epoch 94), flat at 0.871–0.877 since "
        "the x0.1 step after epoch 80, so the row was extended to the Keras "
        "example's 200 epochs, whose next step (x0.01) comes after epoch 120. "
        "Its stretches ran on more than one machine variant and build (from "
        "epoch 84 on the Zen 4 variant); the resume is bit-exact, the "
        "arithmetic of each stretch its machine's."
    ),
    "resnet20-dropout": (
        "resnet20-dropout: the learning rate dropped to 1e-4 at epoch 91 instead "
        "of 81 (the run had started before seed-table.sh passed the ResNet "
        "schedule, and ran at a constant 1e-3 up to epoch 90)."
    ),
    "resnet20": (
        "resnet20: stopped at epoch 60 of 100, the curve flat since epoch ~11 "
        "(test accuracy 0.68–0.77 from epoch 11 on, train accuracy 0.93–0.94 from "
        "epoch 40): the overfitting the study reports, at a higher test "
        "accuracy than its 66.2 %. Its last epochs (56–60) ran the build of "
        "`fa2c907`; the learning-rate drop after epoch 80 has not been reached "
        "(rerun `bench/seed-table.sh resnet20` to continue)."
    ),
}


def row(model, history, planned, wall, compute, commit):
    val = history.get("val_accuracy", [])
    train = history.get("accuracy", [])
    if not val:
        return None
    best = max(range(len(val)), key=lambda i: val[i])
    hours = wall / 3600.0
    share = compute / (2.0 * wall) if wall > 0 else 0.0
    return (
        f"| {model} | {STUDY[model]} | {len(val)} of {planned} | {val[-1]:.4f} | "
        f"{val[best]:.4f} ({best + 1}) | {train[-1]:.4f} | {hours:.1f} h | {share:.2f} | {commit} |"
    )


SEEDS_HEADER = """
One run against one run differs by several points by chance alone in these
first epochs (initialisation, order and dropout draws). Over several seeds per engine
(`bench/agreement-seeds.sh MODEL`, table in `seeds/README.md`), the
difference of the mean test accuracies, gradcast minus PyTorch, with its
standard error:

"""

AGREEMENT_EPOCHS = 3
AGREEMENT_HEADER = """
## Agreement with PyTorch

The same network and recipe trained by `bench/pytorch_reference.py --train
MODEL` (PyTorch, the same data, batch 32, Adam 1e-3, the same schedule; its own
initialisation, order and dropout draws): test accuracy after each of the first
epochs, one run each. A wrong BatchNorm, dropout or loss shows up as a gap
beyond what seeds alone give (measured below the table). Histories:
`pytorch/MODEL.json`; made by
`bench/pytorch-agreement.sh MODEL`.

| model | epoch | gradcast | PyTorch | difference |
|---|---:|---:|---:|---:|
"""


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def agreement(out):
    """The agreement table's lines (none without a PyTorch history)."""
    lines = []
    for m in ORDER:
        ours = load(os.path.join(out, f"{m}.json"))
        theirs = load(os.path.join(out, "pytorch", f"{m}.json"))
        if not theirs:
            continue
        a = (ours or {}).get("val_accuracy", [])
        b = theirs.get("val_accuracy", [])
        for e in range(min(AGREEMENT_EPOCHS, len(b))):
            if e < len(a):
                lines.append(f"| {m} | {e + 1} | {a[e]:.4f} | {b[e]:.4f} | {100 * (a[e] - b[e]):+.1f} pt |")
            else:
                lines.append(f"| {m} | {e + 1} | (not trained yet) | {b[e]:.4f} | |")
    return lines


PLAIN = ["simple-cnn", "complex-cnn"]
RESNETS = ["resnet20", "resnet20-dropout", "resnet50-dropout"]


def question(out):
    """The study's question, "can a ResNet beat the plain CNN on CIFAR-10?",
    answered from the histories at hand, without and with augmentation:
    the best test accuracy of each family, and which family leads."""
    lines = []
    for suffix, label in (("", "without augmentation"), ("-augment", "with `--augment`")):
        best = {}
        for m in PLAIN + RESNETS:
            h = load(os.path.join(out, f"{m}{suffix}.json"))
            val = (h or {}).get("val_accuracy", [])
            if val:
                best[m] = (max(val), len(val))
        plain = [(best[m][0], m) for m in PLAIN if m in best]
        resnet = [(best[m][0], m) for m in RESNETS if m in best]
        if not plain or not resnet:
            have = ", ".join(f"{m}{suffix}" for m in best) or "no run yet"
            lines.append(f"- {label}: not answered yet (trained so far: {have}).")
            continue
        (p, pm), (r, rm) = max(plain), max(resnet)
        runs = "; ".join(f"{m}{suffix} {v:.4f} after {e} epochs" for m, (v, e) in best.items())
        verdict = "beats" if r > p else "does not beat"
        missing = [f"{m}{suffix}" for m in PLAIN + RESNETS if m not in best]
        pending = f" Not trained yet: {', '.join(missing)}." if missing else ""
        lines.append(
            f"- {label}: the best ResNet ({rm}, {r:.4f}) {verdict} the best plain CNN "
            f"({pm}, {p:.4f}) by {100 * (r - p):+.1f} points (best test accuracy so far: "
            f"{runs}).{pending}"
        )
    return lines


QUESTION_HEADER = """
## Can a ResNet beat the plain CNN on CIFAR-10?

The study's question, answered from the curves above (best test accuracy of
each run so far; rows in progress can still move it):

"""


def main():
    if len(sys.argv) == 2:
        out, model = sys.argv[1], None
    else:
        out, model, _study, planned, wall, compute, commit = sys.argv[1:8]
    path = os.path.join(out, "README.md")
    rows = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                cells = [c.strip() for c in line.strip().strip("|").split("|")]
                if len(cells) >= 9 and cells[0] in STUDY:
                    rows[cells[0]] = line.rstrip("\n")
    if model:
        with open(os.path.join(out, f"{model}.json")) as f:
            history = json.load(f)
        new = row(model, history, planned, float(wall), float(compute), commit)
        if new:
            rows[model] = new
    with open(path + ".tmp", "w") as f:
        f.write(HEADER)
        for m in ORDER:
            if m in rows:
                f.write(rows[m] + "\n")
        notes = [NOTES[m] for m in ORDER if m in rows and m in NOTES]
        if notes:
            f.write("\n" + "\n\n".join(notes) + "\n")
        f.write(QUESTION_HEADER + "\n".join(question(out)) + "\n")
        lines = agreement(out)
        if lines:
            f.write(AGREEMENT_HEADER + "\n".join(lines) + "\n")
        seeds = agreement_seeds.summary(os.path.join(out, "seeds"))
        if seeds:
            f.write(SEEDS_HEADER + "\n".join(seeds) + "\n")
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
