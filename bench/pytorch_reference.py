#!/usr/bin/env python3
"""PyTorch reference for gradcast: the same seed networks with Keras semantics,
timed on random data (as gradcast's `bench`), or trained on CIFAR-10 with the
study's recipe (as `bench/seed-table.sh`), to check that both learn alike.

    bench/.venv/bin/python bench/pytorch_reference.py --model resnet20 \
        --batch-size 128 --threads 2 [--steps 10] [--warmup 2] [--channels-last]

    bench/.venv/bin/python bench/pytorch_reference.py --train resnet20 \
        --epochs 3 --data path/to/cifar-10-binary.tar.gz [--history FILE]

Training (`--train MODEL`): batch 32, Adam 1e-3 with the model's schedule as
seed-table.sh passes it (step-decay for complex-cnn, the Keras ResNet schedule
for the ResNets, constant for simple-cnn), inputs scaled to [0,1], no
augmentation, every epoch a fresh shuffle with the last short batch kept (as
gradcast does), then the test set in eval mode. One JSON line per epoch, and
with `--history` a Keras-style history (loss, accuracy, val_loss,
val_accuracy, lr) in the same form as gradcast's.

Timing (`--model MODEL`):

Prints one JSON line per measurement (median over the steps), like gradcast's
bench, with "engine": "pytorch" and the memory format:

    {"engine":"pytorch","model":...,"mode":"train"|"eval","batch_size":...,
     "threads":...,"img_per_s":...,"memory_format":"nchw"|"channels_last",...}

A training step is forward + loss (+ L2 for ResNet) + backward + Adam step;
the line also carries the median forward, backward and optimizer seconds.
gradcast's training step has no optimizer (the coordinator applies it), so
"fwd_bwd_img_per_s" gives PyTorch's rate without the Adam step as well.

Keras settings reproduced (see /work/shared/DESIGN.md): "same" padding with
the smaller half first (F.pad for the asymmetric cases: 2x2 kernels, stride-2
3x3 on even sizes), BatchNorm momentum 0.99 in Keras terms (0.01 here) and
eps 1e-3, Adam(1e-3, betas 0.9/0.999, eps 1e-7), L2 1e-4 * sum(w^2) on every
ResNet convolution kernel, glorot-uniform / he-normal kernels, zero biases.
"""

import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

# Trainable parameter counts, identical in Keras and gradcast.
PARAM_COUNTS = {
    "simple-cnn": 1_626_442,
    "complex-cnn": 11_909_514,
    "resnet20": 273_066,
    "resnet20-dropout": 273_066,
    "resnet50-dropout": 760_266,
}

BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # PyTorch: new = (1 - m) * running + m * batch; Keras 0.99.
RESNET_L2 = 1e-4


def same_padding(size, k, stride):
    """Keras "same": (before, after) with the smaller half first."""
    out = -(-size // stride)
    total = max((out - 1) * stride + k - size, 0)
    return total // 2, total - total // 2


class Conv(nn.Module):
    """Conv2d with bias and Keras "same" or "valid" padding."""

    def __init__(self, cin, cout, k, stride=1, same=True, init="glorot"):
        super().__init__()
        self.k, self.stride, self.same = k, stride, same
        self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=0, bias=True)
        if init == "glorot":
            nn.init.xavier_uniform_(self.conv.weight)
        else:  # Keras he_normal: truncated normal, stddev sqrt(2 / fan_in).
            std = math.sqrt(2.0 / (cin * k * k)) / 0.87962566103423978
            nn.init.trunc_normal_(self.conv.weight, 0.0, std, -2 * std, 2 * std)
        nn.init.zeros_(self.conv.bias)
        self._pad_cache = {}

    def forward(self, x):
        if not self.same:
            return self.conv(x)
        h, w = x.shape[-2:]
        pad = self._pad_cache.get((h, w))
        if pad is None:
            top, bottom = same_padding(h, self.k, self.stride)
            left, right = same_padding(w, self.k, self.stride)
            pad = (top, bottom, left, right)
            self._pad_cache[(h, w)] = pad
        top, bottom, left, right = pad
        if top == bottom and left == right:
            if top == 0 and left == 0:
                return self.conv(x)
            return F.conv2d(x, self.conv.weight, self.conv.bias, self.stride, (top, left))
        return self.conv(F.pad(x, (left, right, top, bottom)))


def dense(fan_in, fan_out, init="glorot"):
    layer = nn.Linear(fan_in, fan_out)
    if init == "glorot":
        nn.init.xavier_uniform_(layer.weight)
    else:
        std = math.sqrt(2.0 / fan_in) / 0.87962566103423978
        nn.init.trunc_normal_(layer.weight, 0.0, std, -2 * std, 2 * std)
    nn.init.zeros_(layer.bias)
    return layer


def bn2d(c):
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)


class SimpleCnn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = Conv(3, 32, 3, same=False)
        self.conv2 = Conv(32, 64, 3, same=False)
        self.drop1 = nn.Dropout(0.25)
        self.dense1 = dense(64 * 14 * 14, 128)
        self.drop2 = nn.Dropout(0.5)
        self.dense2 = dense(128, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = self.drop1(F.max_pool2d(x, 2))
        x = F.relu(self.dense1(torch.flatten(x, 1)))
        return self.dense2(self.drop2(x))


class ConvBnRelu(nn.Module):
    def __init__(self, cin, cout, k):
        super().__init__()
        self.conv = Conv(cin, cout, k)
        self.bn = bn2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class ComplexCnn(nn.Module):
    def __init__(self):
        super().__init__()
        plan = [([64, 128, 128], 3), ([256, 256, 256], 2), ([512, 512, 512], 2)]
        groups, cin = [], 3
        for widths, k in plan:
            layers = []
            for cout in widths:
                layers.append(ConvBnRelu(cin, cout, k))
                cin = cout
            layers += [nn.MaxPool2d(2), nn.Dropout(0.25)]
            groups.append(nn.Sequential(*layers))
        self.groups = nn.Sequential(*groups)
        self.dense1 = dense(512 * 4 * 4, 1024)
        self.bn = nn.BatchNorm1d(1024, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.drop = nn.Dropout(0.5)
        self.dense2 = dense(1024, 10)

    def forward(self, x):
        x = torch.flatten(self.groups(x), 1)
        x = self.drop(F.relu(self.bn(self.dense1(x))))
        return self.dense2(x)


class ResnetLayer(nn.Module):
    """Keras resnet_layer: Conv (he_normal, L2, same) -> BN -> [ReLU]."""

    def __init__(self, cin, cout, stride=1, relu=True):
        super().__init__()
        self.conv = Conv(cin, cout, 3, stride=stride, init="he")
        self.bn = bn2d(cout)
        self.relu = relu

    def forward(self, x):
        y = self.bn(self.conv(x))
        return F.relu(y) if self.relu else y


class ResidualBlock(nn.Module):
    def __init__(self, cin, cout, stride, dropout):
        super().__init__()
        self.first = ResnetLayer(cin, cout, stride)
        self.drop = nn.Dropout(0.3) if dropout else nn.Identity()
        self.second = ResnetLayer(cout, cout, 1, relu=False)
        self.shortcut = Conv(cin, cout, 1, stride=stride, init="he") if stride != 1 else None

    def forward(self, x):
        y = self.second(self.drop(self.first(x)))
        if self.shortcut is not None:
            x = self.shortcut(x)
        return F.relu(x + y)


class Resnet(nn.Module):
    def __init__(self, n, dropout):
        super().__init__()
        self.stem = ResnetLayer(3, 16)
        blocks, cin = [], 16
        for stack in range(3):
            filters = 16 << stack
            for block in range(n):
                stride = 2 if stack > 0 and block == 0 else 1
                blocks.append(ResidualBlock(cin, filters, stride, dropout))
                cin = filters
        self.blocks = nn.Sequential(*blocks)
        self.drop = nn.Dropout(0.4) if dropout else nn.Identity()
        self.dense = dense(64, 10, init="he")

    def forward(self, x):
        x = self.blocks(self.stem(x))
        x = torch.flatten(F.avg_pool2d(x, 8), 1)
        return self.dense(self.drop(x))

    def l2_kernels(self):
        return [m.conv.weight for m in self.modules() if isinstance(m, Conv)]


def build(name):
    if name == "simple-cnn":
        return SimpleCnn()
    if name == "complex-cnn":
        return ComplexCnn()
    if name.startswith("resnet"):
        rest = name[len("resnet"):]
        dropout = rest.endswith("-dropout")
        depth = int(rest[: -len("-dropout")] if dropout else rest)
        if depth < 8 or (depth - 2) % 6:
            raise SystemExit(f"unknown model {name}")
        return Resnet((depth - 2) // 6, dropout)
    raise SystemExit(f"unknown model {name}")


def load_cifar(path):
    """CIFAR-10 in the official binary layout (the .tar.gz, the extracted
    cifar-10-batches-bin/ folder, or its parent): (train_x, train_y, test_x,
    test_y) as uint8 NCHW images and int64 labels."""
    import os
    import tarfile

    import numpy as np

    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    blobs = {}
    if os.path.isdir(path):
        folder = path
        if os.path.isdir(os.path.join(path, "cifar-10-batches-bin")):
            folder = os.path.join(path, "cifar-10-batches-bin")
        for n in names:
            with open(os.path.join(folder, n), "rb") as f:
                blobs[n] = f.read()
    else:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                base = os.path.basename(member.name)
                if base in names:
                    blobs[base] = tar.extractfile(member).read()
    missing = [n for n in names if n not in blobs]
    if missing:
        raise SystemExit(f"{path}: missing {', '.join(missing)}")

    def records(blob, name):
        if len(blob) % 3073:
            raise SystemExit(f"{name}: {len(blob)} bytes is not a whole number of 3073-byte records")
        a = np.frombuffer(blob, dtype=np.uint8).reshape(-1, 3073)
        if a[:, 0].max() > 9:
            raise SystemExit(f"{name}: label above 9")
        return a[:, 1:].reshape(-1, 3, 32, 32), a[:, 0].astype(np.int64)

    train = [records(blobs[n], n) for n in names[:5]]
    test_x, test_y = records(blobs["test_batch.bin"], "test_batch.bin")
    train_x = np.concatenate([t[0] for t in train])
    train_y = np.concatenate([t[1] for t in train])
    return (
        torch.from_numpy(train_x.copy()),
        torch.from_numpy(train_y.copy()),
        torch.from_numpy(test_x.copy()),
        torch.from_numpy(test_y.copy()),
    )


def schedule_for(model):
    """The learning-rate schedule seed-table.sh gives MODEL: epoch (0-based) ->
    factor of the base rate, as gradcast's LrSchedule computes it."""
    if model == "complex-cnn":
        def step_decay(epoch):
            r = 1.0
            if epoch >= 20:
                r *= 0.5
            if epoch >= 30:
                r *= 0.25
            if epoch >= 50:
                r *= 0.2
            return r
        return "step-decay", step_decay
    if model.startswith("resnet"):
        def resnet_keras(epoch):
            if epoch > 180:
                return 0.5e-3
            if epoch > 160:
                return 1e-3
            if epoch > 120:
                return 1e-2
            if epoch > 80:
                return 1e-1
            return 1.0
        return "resnet-keras", resnet_keras
    return "constant", lambda epoch: 1.0


def train(args):
    """Trains args.train with the study's recipe and reports every epoch."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train_x, train_y, test_x, test_y = load_cifar(args.data)
    model = build(args.train)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    l2_kernels = model.l2_kernels() if isinstance(model, Resnet) else []
    base_lr = 1e-3
    opt = torch.optim.Adam(model.parameters(), lr=base_lr, betas=(0.9, 0.999), eps=1e-7)
    name, factor = schedule_for(args.train)
    order_rng = torch.Generator().manual_seed(args.seed)
    history = {"loss": [], "accuracy": [], "val_loss": [], "val_accuracy": [], "lr": []}
    n = train_x.shape[0]
    bs = args.batch_size
    for epoch in range(args.epochs):
        lr = base_lr * factor(epoch)
        for group in opt.param_groups:
            group["lr"] = lr
        started = time.perf_counter()
        model.train()
        order = torch.randperm(n, generator=order_rng)
        loss_sum, correct = 0.0, 0
        for start in range(0, n, bs):
            idx = order[start:start + bs]
            x = (train_x[idx].float() / 255.0).contiguous(memory_format=fmt)
            y = train_y[idx]
            opt.zero_grad(set_to_none=True)
            logits = model(x)
            ce = F.cross_entropy(logits, y)
            loss = ce
            if l2_kernels:
                loss = loss + RESNET_L2 * sum(w.pow(2).sum() for w in l2_kernels)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(idx)
            correct += (logits.argmax(1) == y).sum().item()
            if args.progress and (start // bs) % 200 == 0:
                print(f"epoch {epoch + 1} step {start // bs}: loss {loss.item():.4f}", file=sys.stderr, flush=True)
        train_seconds = time.perf_counter() - started
        model.eval()
        val_loss, val_correct = 0.0, 0
        with torch.inference_mode():
            for start in range(0, test_x.shape[0], 500):
                x = (test_x[start:start + 500].float() / 255.0).contiguous(memory_format=fmt)
                y = test_y[start:start + 500]
                logits = model(x)
                val_loss += F.cross_entropy(logits, y, reduction="sum").item()
                val_correct += (logits.argmax(1) == y).sum().item()
        entry = {
            "loss": loss_sum / n,
            "accuracy": correct / n,
            "val_loss": val_loss / test_x.shape[0],
            "val_accuracy": val_correct / test_x.shape[0],
            "lr": lr,
        }
        for k, v in entry.items():
            history[k].append(v)
        print(json.dumps({
            "engine": "pytorch", "model": args.train, "epoch": epoch + 1,
            "schedule": name, "train_seconds": round(train_seconds, 1),
            "threads": args.threads, "torch": torch.__version__, **entry,
        }, separators=(",", ":")), flush=True)
        if args.history:
            with open(args.history + ".tmp", "w") as f:
                json.dump(history, f)
            import os
            os.replace(args.history + ".tmp", args.history)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="time MODEL on random data")
    what.add_argument("--train", metavar="MODEL", help="train MODEL on CIFAR-10 with the study's recipe")
    p.add_argument("--batch-size", type=int, help="default: 128 timing, 32 (the study's) training")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--epochs", type=int, default=3, help="with --train")
    p.add_argument("--data", help="with --train: path/to/cifar-10-binary.tar.gz")
    p.add_argument("--history", help="with --train: write the Keras-style history here")
    p.add_argument("--seed", type=int, default=1, help="with --train")
    p.add_argument("--progress", action="store_true", help="with --train: a loss line every 200 steps")
    args = p.parse_args()
    if args.train:
        if not args.data:
            raise SystemExit("--train needs --data path/to/cifar-10-binary.tar.gz")
        args.batch_size = args.batch_size or 32
        if min(args.batch_size, args.threads, args.epochs) <= 0:
            raise SystemExit("--batch-size, --threads and --epochs must be positive")
        build(args.train)  # an unknown model fails before the data is read
        return train(args)
    args.batch_size = args.batch_size or 128
    if min(args.batch_size, args.threads, args.steps) <= 0 or args.warmup < 0:
        raise SystemExit("--batch-size, --threads and --steps must be positive")

    torch.set_num_threads(args.threads)
    torch.manual_seed(1)
    model = build(args.model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    expected = PARAM_COUNTS.get(args.model)
    if expected is not None:
        assert trainable == expected, f"{args.model}: {trainable} trainable parameters, expected {expected}"
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model = model.to(device=device, memory_format=fmt)
    l2_kernels = model.l2_kernels() if isinstance(model, Resnet) else []
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-7)

    g = torch.Generator().manual_seed(42)
    images = torch.randint(0, 256, (args.batch_size, 3, 32, 32), generator=g)
    x = (images.float() / 255.0).contiguous(memory_format=fmt).to(device)
    y = torch.randint(0, 10, (args.batch_size,), generator=g).to(device)

    def line(mode, secs, **extra):
        out = {
            "engine": "pytorch",
            "model": args.model,
            "mode": mode,
            "batch_size": args.batch_size,
            "threads": args.threads,
            "img_per_s": round(args.batch_size / secs, 2),
            "memory_format": "channels_last" if args.channels_last else "nchw",
            "device": args.device,
        }
        out.update(extra)
        print(json.dumps(out, separators=(",", ":")), flush=True)

    model.train()
    total, fwd, bwd, step_s = [], [], [], []
    for step in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        if l2_kernels:
            loss = loss + RESNET_L2 * sum(w.pow(2).sum() for w in l2_kernels)
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2 = time.perf_counter()
        opt.step()
        sync()
        t3 = time.perf_counter()
        if step >= args.warmup:
            total.append(t3 - t0)
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
            step_s.append(t3 - t2)
    fb = statistics.median(f + b for f, b in zip(fwd, bwd))
    line(
        "train",
        statistics.median(total),
        forward_s=round(statistics.median(fwd), 4),
        backward_s=round(statistics.median(bwd), 4),
        optimizer_s=round(statistics.median(step_s), 4),
        fwd_bwd_img_per_s=round(args.batch_size / fb, 2),
        torch=torch.__version__,
    )

    model.eval()
    total = []
    with torch.inference_mode():
        for step in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            logits = model(x)
            F.cross_entropy(logits, y).item()
            (logits.argmax(1) == y).sum().item()
            if step >= args.warmup:
                total.append(time.perf_counter() - t0)
    line("eval", statistics.median(total), torch=torch.__version__)


if __name__ == "__main__":
    sys.exit(main())
