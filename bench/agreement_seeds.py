#!/usr/bin/env python3
"""Summarises bench/agreement-seeds.sh's runs into DIR/README.md.

usage: agreement_seeds.py DIR

DIR holds ENGINE-MODEL-seedS.json histories (Keras-style, as `gradcast run
--history` and `bench/pytorch_reference.py --history` write them). Per model
and epoch: each engine's mean test accuracy over its seeds, the sample
standard deviation, and the difference of the two means with its standard
error sqrt(sd_a^2/n_a + sd_b^2/n_b). A difference within two standard errors
is what seed noise alone gives about 95 % of the time.
"""

import json
import math
import os
import re
import sys

ENGINES = ["gradcast", "pytorch"]
NAME = re.compile(r"^(gradcast|pytorch)-(.+)-seed(\d+)\.json$")


def stats(values):
    """(mean, sample standard deviation or None for one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def runs(folder):
    """{model: {engine: {seed: [val_accuracy per epoch]}}}."""
    out = {}
    for name in sorted(os.listdir(folder)):
        m = NAME.match(name)
        if not m:
            continue
        engine, model, seed = m.group(1), m.group(2), int(m.group(3))
        try:
            with open(os.path.join(folder, name)) as f:
                acc = json.load(f)["val_accuracy"]
        except (OSError, ValueError, KeyError):
            continue
        out.setdefault(model, {}).setdefault(engine, {})[seed] = acc
    return out


def compare(by_engine, e):
    """Epoch `e` of every run of both engines: (gradcast values, PyTorch
    values, difference of the means in points, its standard error in points
    or None when an engine has a single run); None when either has no run
    that long."""
    a = [h[e] for h in by_engine.get("gradcast", {}).values() if len(h) > e]
    b = [h[e] for h in by_engine.get("pytorch", {}).values() if len(h) > e]
    if not a or not b:
        return None
    (ma, sa), (mb, sb) = stats(a), stats(b)
    se = None
    if sa is not None and sb is not None:
        se = 100 * math.sqrt(sa**2 / len(a) + sb**2 / len(b))
    return a, b, 100 * (ma - mb), se


def cell(values):
    mean, sd = stats(values)
    spread = f" ± {100 * sd:.1f}" if sd is not None else ""
    return f"{100 * mean:.1f} %{spread} ({len(values)})"


def table(model, by_engine):
    """The markdown lines of one model's table."""
    epochs = max(len(a) for e in by_engine.values() for a in e.values())
    lines = [
        f"### {model}",
        "",
        "Seeds: " + "; ".join(
            f"{e} {', '.join(str(s) for s in sorted(by_engine.get(e, {})))}"
            for e in ENGINES if e in by_engine
        ) + ".",
        "",
        "| epoch | gradcast: mean ± sd, pt (runs) | PyTorch: mean ± sd, pt (runs) | difference of means | standard error | within 2 SE | within 2 pt |",
        "|---:|---:|---:|---:|---:|:---:|:---:|",
    ]
    for e in range(epochs):
        found = compare(by_engine, e)
        if found is None:
            continue
        a, b, diff, se = found
        se_text = "" if se is None else f"{se:.1f} pt"
        within_se = "" if se is None else ("yes" if abs(diff) <= 2 * se else "no")
        lines.append(
            f"| {e + 1} | {cell(a)} | {cell(b)} | {diff:+.1f} pt | {se_text} | {within_se} | {'yes' if abs(diff) <= 2 else 'no'} |"
        )
    lines.append("")
    return lines


def summary(folder):
    """One line per model: the difference of the means per epoch with its
    standard error (for the seed table's agreement section)."""
    lines = []
    if not os.path.isdir(folder):
        return lines
    for model, by_engine in sorted(runs(folder).items()):
        ours, theirs = by_engine.get("gradcast", {}), by_engine.get("pytorch", {})
        if not ours or not theirs:
            continue
        epochs = min(max(len(a) for a in ours.values()), max(len(a) for a in theirs.values()))
        cells = []
        for e in range(epochs):
            _, _, diff, se = compare(by_engine, e)
            text = f"epoch {e + 1}: {diff:+.1f} pt"
            if se is not None:
                text += f" (standard error {se:.1f})"
            cells.append(text)
        lines.append(
            f"- {model}, gradcast {len(ours)} runs against PyTorch {len(theirs)}: " + "; ".join(cells) + "."
        )
    return lines


def main():
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    folder = sys.argv[1]
    found = runs(folder)
    lines = [
        "# Agreement with PyTorch, over seeds",
        "",
        "Made by `bench/agreement-seeds.sh MODEL` (the study's recipe: batch 32,",
        "Adam 1e-3, the model's schedule, no augmentation; gradcast on 2 nodes x 1",
        "thread, PyTorch on 2 threads; one seed per run: initialisation, order",
        "and dropout). Test accuracy after each epoch: each engine's mean over its",
        "runs ± the sample standard deviation, and the difference of the two",
        "means with its standard error. Seed noise alone keeps the difference",
        "within two standard errors about 95 % of the time; a wrong BatchNorm,",
        "dropout or loss moves it further. Histories: `ENGINE-MODEL-seedS.json`.",
        "",
    ]
    for model in sorted(found):
        lines += table(model, found[model])
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    main()
