"""Train a small CNN on scikit-learn's 8x8 handwritten digits with fastconv's own layers.

    python bench/train_digits.py                     # fastconv layers, best device backend
    python bench/train_digits.py --torch             # and the same net in PyTorch, timed
    python bench/train_digits.py --plot curves.png   # save the loss curves (needs matplotlib)

Network: conv 3x3 (1 -> 16, pad 1) -> ReLU -> conv 3x3 stride 2 (16 -> 32, pad 1) -> ReLU ->
linear (32*4*4 -> 10), trained with the multiclass hinge loss (fastconv's: mean over the batch,
not divided by the class count) and SGD with momentum. The digits ship inside scikit-learn
(1797 images, no download); 20% are held out, stratified, for the test accuracy.

With ``--torch`` the same network in PyTorch starts from the same weights, sees the same
batches in the same order and minimises the same loss (``MultiMarginLoss`` times the number of
classes), so the two loss curves should agree up to float32 rounding; both times are reported.
Times cover training only; the first fastconv epoch includes Numba's compilation when its cache
is cold, so the steady time per epoch (median of epochs 2..n) is printed as well.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

import common

import fastconv
from fastconv.layers import (SGD, Conv2d, Flatten, Linear, MultiClassHingeLoss, ReLU,
                             Sequential)

CLASSES = 10


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
def load_digits(seed: int, dtype: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Standardised digits as ``(x_train (N, 1, 8, 8), y_train (N,), x_test, y_test)``."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    digits = sk_load_digits()
    x = digits.images[:, None].astype(np.float64) / 16.0
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target.astype(np.int64), test_size=0.2, random_state=seed,
        stratify=digits.target)
    mean, std = x_train.mean(), x_train.std()  # statistics of the training set only
    return ((x_train - mean) / std).astype(dtype), y_train, ((x_test - mean) / std).astype(
        dtype), y_test


def batches(n: int, batch_size: int, epochs: int, seed: int) -> list[list[np.ndarray]]:
    """The shuffled index batches of every epoch, fixed up front so both runs see the same."""
    rng = np.random.default_rng(seed)
    return [np.array_split(rng.permutation(n), range(batch_size, n, batch_size))
            for _ in range(epochs)]


# --------------------------------------------------------------------------------------------
# Progress and results
# --------------------------------------------------------------------------------------------
class ProgressBar:
    """``label epoch 3/10 [#######.......] 23/45  loss 0.1234`` on stderr.

    Redrawn in place on a terminal; elsewhere (logs, CI) only the finished bar of each epoch
    is written, one line per epoch.
    """

    def __init__(self, label: str, epochs: int, width: int = 28, enabled: bool = True) -> None:
        self.label, self.epochs, self.width, self.enabled = label, epochs, width, enabled
        self.tty = sys.stderr.isatty()

    def _line(self, epoch: int, done: int, total: int, loss: float) -> str:
        filled = self.width * done // total
        bar = "#" * filled + "." * (self.width - filled)
        return (f"{self.label:9s} epoch {epoch + 1:>2}/{self.epochs} [{bar}] "
                f"{done:>3}/{total}  loss {loss:.4f}")

    def update(self, epoch: int, done: int, total: int, loss: float) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\r" + self._line(epoch, done, total, loss))
            sys.stderr.flush()

    def end_epoch(self, epoch: int, total: int, loss: float) -> None:
        if self.enabled:
            sys.stderr.write(("\r\033[K" if self.tty else "")
                             + self._line(epoch, total, total, loss) + "\n")
            sys.stderr.flush()


@dataclass
class Run:
    """One training run: per-epoch mean loss, test accuracy and seconds."""

    name: str
    losses: list[float] = field(default_factory=list)
    accuracies: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(self.seconds)

    @property
    def steady(self) -> float:
        """Median seconds per epoch after the first (which may include compilation)."""
        return statistics.median(self.seconds[1:] or self.seconds)


def train(name: str, step: Callable[[np.ndarray], float], evaluate: Callable[[], float],
          plan: list[list[np.ndarray]], bar: ProgressBar,
          sync: Callable[[], None] = lambda: None) -> Run:
    """Run ``step(batch_indices) -> loss`` over the plan; time each epoch (training only)."""
    run = Run(name)
    for epoch, epoch_batches in enumerate(plan):
        start, total, seen = time.perf_counter(), 0.0, 0
        for i, idx in enumerate(epoch_batches):
            total += step(idx) * len(idx)
            seen += len(idx)
            bar.update(epoch, i + 1, len(epoch_batches), total / seen)
        sync()
        run.seconds.append(time.perf_counter() - start)
        run.losses.append(total / seen)
        run.accuracies.append(evaluate())
        bar.end_epoch(epoch, len(epoch_batches), run.losses[-1])
    return run


# --------------------------------------------------------------------------------------------
# The two implementations
# --------------------------------------------------------------------------------------------
def build_model(dtype: Any, seed: int) -> Sequential:
    """conv -> ReLU -> conv -> ReLU -> linear, all fastconv layers, on the CPU."""
    return Sequential(
        Conv2d(1, 16, 3, padding=1, dtype=dtype, seed=seed), ReLU(),
        Conv2d(16, 32, 3, stride=2, padding=1, dtype=dtype, seed=seed + 1), ReLU(),
        Flatten(), Linear(32 * 4 * 4, CLASSES, dtype=dtype, seed=seed + 2))


def fastconv_run(data: tuple, plan: list, args: argparse.Namespace, init: Sequential,
                 bar: ProgressBar) -> Run:
    """Train the fastconv layers on ``args.device``."""
    x_train, y_train, x_test, y_test = data
    model, loss_fn = init, MultiClassHingeLoss()
    xp, sync = np, (lambda: None)
    if args.device == "cuda":
        import cupy

        model.to("cuda")
        xp, sync = cupy, cupy.cuda.get_current_stream().synchronize
    x_train, y_train, x_test = (xp.asarray(a) for a in (x_train, y_train, x_test))
    opt = SGD([model], lr=args.lr, momentum=args.momentum)

    def step(idx: np.ndarray) -> float:
        d_idx = xp.asarray(idx)
        loss = loss_fn(model(x_train[d_idx]), y_train[d_idx])
        model.backward(loss_fn.backward(), input_grad=False)  # no gradient for the images
        opt.step()
        return float(loss)

    def evaluate() -> float:
        pred = model(x_test).argmax(axis=1)
        return float(np.mean(to_host(pred) == y_test))

    return train("fastconv", step, evaluate, plan, bar, sync)


def to_host(a: Any) -> np.ndarray:
    return a if isinstance(a, np.ndarray) else a.get()


def torch_run(data: tuple, plan: list, args: argparse.Namespace, init: Sequential,
              bar: ProgressBar) -> Run:
    """The same network in PyTorch, from the same initial weights."""
    import torch

    device = torch.device("cuda" if args.device == "cuda" else "cpu")
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    conv1, _, conv2, _, _, fc = init.layers
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(32 * 4 * 4, CLASSES))
    with torch.no_grad():
        for module, layer in zip((model[0], model[2], model[5]), (conv1, conv2, fc)):
            module.weight.copy_(torch.from_numpy(to_host(layer.weight)))
            module.bias.copy_(torch.from_numpy(to_host(layer.bias)))
    model.to(device=device, dtype=dtype)
    x_train, y_train, x_test = (torch.from_numpy(a).to(device) for a in data[:3])
    y_test = data[3]
    # MultiMarginLoss divides by the class count; scaled back, it is fastconv's hinge loss.
    margin_loss = torch.nn.MultiMarginLoss()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)

    def step(idx: np.ndarray) -> float:
        t_idx = torch.from_numpy(idx).to(device)
        opt.zero_grad(set_to_none=True)
        loss = margin_loss(model(x_train[t_idx]), y_train[t_idx]) * CLASSES
        loss.backward()
        opt.step()
        return loss.item()

    def evaluate() -> float:
        with torch.no_grad():
            pred = model(x_test).argmax(dim=1).cpu().numpy()
        return float(np.mean(pred == y_test))

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    return train("pytorch", step, evaluate, plan, bar, sync)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def report(runs: list[Run]) -> str:
    """Per-epoch table of loss and test accuracy for every run, then the times."""
    header = "epoch " + "".join(f"| {r.name:>8} loss  acc%  sec " for r in runs)
    lines = [header, "-" * len(header)]
    for e in range(len(runs[0].losses)):
        cells = "".join(f"| {r.losses[e]:13.4f} {100 * r.accuracies[e]:5.1f} "
                        f"{r.seconds[e]:4.2f} " for r in runs)
        lines.append(f"{e + 1:>5} {cells}")
    lines.append("")
    for r in runs:
        lines.append(f"{r.name}: test accuracy {100 * r.accuracies[-1]:.1f}%, training "
                     f"{r.total:.2f} s ({r.steady:.3f} s per epoch after the first)")
    if len(runs) == 2:
        a, b = runs
        lines.append(f"{a.name} / {b.name} time: total {a.total / b.total:.2f}x, "
                     f"steady epoch {a.steady / b.steady:.2f}x (below 1: {a.name} faster)")
    return "\n".join(lines)


def require_matplotlib():
    """``matplotlib.pyplot`` on the Agg backend, or exit saying what to install: called before
    training, so a missing package does not cost a whole run."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib "
                         "(or pip install -e '.[bench]')") from None
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


# One look per implementation: colour, line style and marker differ, so a curve lying exactly
# on another (as fastconv's and PyTorch's loss do) still shows as two.
_STYLES = [dict(color="tab:blue", linestyle="-", marker="o", markersize=7, linewidth=2.5),
           dict(color="tab:orange", linestyle="--", marker="x", markersize=6, linewidth=1.5)]


def plot(runs: list[Run], path: str) -> None:
    """Save loss, test accuracy and seconds per epoch of every run as one PNG."""
    plt = require_matplotlib()
    from matplotlib.ticker import MaxNLocator

    fig, (ax_loss, ax_acc, ax_time) = plt.subplots(1, 3, figsize=(15, 4.2))
    for r, style in zip(runs, _STYLES):
        epochs = range(1, len(r.losses) + 1)
        ax_loss.plot(epochs, r.losses, label=r.name, **style)
        ax_acc.plot(epochs, [100 * a for a in r.accuracies], label=r.name, **style)
        ax_time.plot(epochs, r.seconds, label=f"{r.name}: {r.total:.2f} s in all, "
                     f"{r.steady:.3f} s/epoch steady", **style)
    ax_loss.set(xlabel="epoch", ylabel="training hinge loss", yscale="log",
                title="8x8 digits: loss (curves overlap when equal)")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy")
    ax_time.set(xlabel="epoch", ylabel="seconds (training only)", yscale="log",
                title="time per epoch (epoch 1 may include JIT)")
    for ax in (ax_loss, ax_acc, ax_time):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter,
                     argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and every option's default."""


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--epochs", type=int, default=12, help="passes over the training set")
    parser.add_argument("--batch-size", type=int, default=32, help="images per SGD step")
    parser.add_argument("--lr", type=float, default=0.01, help="SGD learning rate")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                        help="dtype of data and parameters")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where both models train")
    parser.add_argument("--backend", default=None,
                        help="fastconv backend; None: fastconv's choice for the device")
    parser.add_argument("--seed", type=int, default=0, help="data split, init and batches")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for Numba, PyTorch and BLAS; None: all cores")
    parser.add_argument("--torch", action="store_true",
                        help="also train the same network with PyTorch layers and compare")
    parser.add_argument("--plot", metavar="PATH",
                        help="save loss, accuracy and time curves as a PNG (needs matplotlib)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.torch and common.import_torch() is None:
        raise SystemExit("--torch needs PyTorch: pip install torch")
    if args.plot:
        require_matplotlib()  # fail now, not after training
    common.set_threads(args.threads)
    if args.backend:
        fastconv.set_backend(args.backend)
    print(common.format_environment(common.environment()))
    data = load_digits(args.seed, args.dtype)
    plan = batches(len(data[0]), args.batch_size, args.epochs, args.seed)
    print(f"digits: {len(data[0])} train / {len(data[2])} test images, {args.epochs} epochs "
          f"of {len(plan[0])} batches, device {args.device}, {args.dtype}")
    runs = [fastconv_run(data, plan, args, build_model(args.dtype, args.seed),
                         ProgressBar("fastconv", args.epochs, enabled=not args.quiet))]
    if args.torch:  # the same seed gives the same initial weights
        runs.append(torch_run(data, plan, args, build_model(args.dtype, args.seed),
                              ProgressBar("pytorch", args.epochs, enabled=not args.quiet)))
    print(report(runs))
    if args.plot:
        plot(runs, args.plot)
        print(f"loss curves saved to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
