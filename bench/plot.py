"""One PNG to read a conv benchmark at a glance (``--plot PATH`` of bench/run.py, conv2d.py
and gpu.py).

Left: per layer and mode, fastconv's speedup over PyTorch on a log scale (bar from 1x to the
median ratio; error bar: the run-to-run range from both sides' quartiles; dashed line: 1x). Right: each side's GFLOP/s per
layer and mode against the machine's limit measured in the same run (SGEMM on the CPU, a
large matmul on the GPU). matplotlib is imported by the caller first
(``common.require_matplotlib``), so a missing package stops the run before any timing.
"""
from __future__ import annotations

import math
from typing import Any, Sequence


def _finite(v: Any) -> float:
    return float(v) if v is not None and math.isfinite(float(v)) else math.nan


def conv_plot(rows: Sequence[dict[str, Any]], path: str, *, limit_gflops: float,
              limit_label: str, title: str, fast_key: str = "GFLOP/s",
              torch_key: str = "torch_GFLOP/s", ratio_key: str = "vs_torch",
              lo_key: str = "vs_torch_lo", hi_key: str = "vs_torch_hi",
              other: str = "PyTorch") -> None:
    """Save the two-panel figure for ``rows`` (``case``, ``mode``, rates, ratio and range)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import numpy as np

    rows = [r for r in rows if r.get("check", "ok") == "ok"]
    labels = [f"{r['case']}\n{r['mode']}" for r in rows]
    y = np.arange(len(rows))
    ratio = np.array([_finite(r.get(ratio_key)) for r in rows])
    lo = np.array([_finite(r.get(lo_key)) for r in rows])
    hi = np.array([_finite(r.get(hi_key)) for r in rows])
    err = np.vstack([np.where(np.isfinite(lo), ratio - lo, 0),
                     np.where(np.isfinite(hi), hi - ratio, 0)]).clip(min=0)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 0.45 * len(rows) + 2.2),
                                   sharey=True)
    colors = ["tab:green" if v >= 1 else "tab:red" for v in ratio]
    ax1.barh(y, ratio - 1, left=1, xerr=err, color=colors, alpha=0.8, capsize=3)
    ax1.set_xscale("log")        # 0.5x and 2x the same length either side of 1x
    ax1.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%gx"))
    ax1.axvline(1.0, color="k", ls="--", lw=1)
    for yi, v, top in zip(y, ratio, hi):
        if math.isfinite(v):
            ax1.text(max(v, top) if math.isfinite(top) else v, yi - 0.25, f" {v:.2f}x",
                     va="center", fontsize=8)
    ax1.set_yticks(y, labels, fontsize=8)
    ax1.invert_yaxis()
    ax1.set_xlabel(f"speedup over {other} (> 1: fastconv faster); bars: run-to-run range")
    h = 0.38
    ax2.barh(y - h / 2, [_finite(r.get(fast_key)) for r in rows], h, label="fastconv",
             color="tab:blue")
    ax2.barh(y + h / 2, [_finite(r.get(torch_key)) for r in rows], h, label=other,
             color="tab:orange")
    if limit_gflops and math.isfinite(limit_gflops):
        ax2.axvline(limit_gflops, color="k", ls=":", lw=1.5,
                    label=f"{limit_label}: {limit_gflops:.0f}")
    ax2.set_xlabel("GFLOP/s (direct algorithm's flops)")
    ax2.legend(loc="lower right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
