"""NumPy model of the GPU Winograd kernels' rounding: relative error against float64.

    python bench/winograd_error.py [--channels 64 256 1024] [--tf32]

The numbers behind the F(6x6, 3x3) and F(4x4)+TF32 decisions in ``kernels/winograd.cu``
(neither is offered): standard-normal data, one image of 24 x 24 pixels, 3x3 filters, padding 1.
Transforms (Cook-Toom matrices from the interpolation points below) in float32, the
transform-point sums over the channels in float32 one channel at a time (the kernels' order),
the inverse transform in float32; ``--tf32`` rounds the transformed input and filter to TF32
(10-bit mantissa, round half away from zero, as cvt.rna) before the products. The error is the
relative Frobenius norm ``||y - ref|| / ||ref||`` against a float64 direct convolution. The
model reproduces the host emulation of winograd.cu's F(4x4) (3.40e-6 at 256 channels).
No GPU, no fastconv code: a plain model.
"""
from __future__ import annotations

import argparse

import numpy as np
from numpy.polynomial import polynomial

POINTS = {2: (0, 1, -1), 4: (0, 1, -1, 2, -2), 6: (0, 1, -1, 2, -2, 0.5, -0.5)}


def cook_toom(m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(AT, G, BT)`` of F(m, 3) from the finite points `POINTS[m]` plus the point at
    infinity: ``y = AT [(G g) * (BT d)]`` for a 3-tap correlation of ``d`` (m + 2 values)."""
    pts = np.array(POINTS[m], float)
    n = m + 2
    at, g, bt = np.zeros((m, n)), np.zeros((n, 3)), np.zeros((n, n))
    for j, p in enumerate(pts):
        others = [q for i, q in enumerate(pts) if i != j]
        at[:, j] = p ** np.arange(m)
        g[j] = p ** np.arange(3) / np.prod([p - q for q in others])
        bt[j, :n - 1] = polynomial.polyfromroots(others)
    at[m - 1, n - 1] = g[n - 1, 2] = 1
    bt[n - 1] = polynomial.polyfromroots(pts)
    return at, g, bt


def to_tf32(a: np.ndarray) -> np.ndarray:
    """Round float32 values to TF32 (cvt.rna: to nearest, ties away from zero)."""
    bits = np.asarray(a, np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x1000) & 0xFFFFE000).astype(np.uint32).view(np.float32)


def direct(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """float64 correlation, padding 1: x (C, H, W), w (K, C, 3, 3) -> (K, H, W)."""
    _, h, wd = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1)))
    return sum(np.einsum("kc,chw->khw", w[:, :, r, s], xp[:, r:r + h, s:s + wd])
               for r in range(3) for s in range(3))


def winograd(x: np.ndarray, w: np.ndarray, m: int, tf32: bool) -> np.ndarray:
    """F(m x m, 3 x 3) in float32 with sequential channel sums; same shapes as `direct`."""
    at, g, bt = (a.astype(np.float32) for a in cook_toom(m))
    c, h, wd = x.shape
    a = m + 2
    th, tw = -(-h // m), -(-wd // m)
    xp = np.zeros((c, th * m + 2, tw * m + 2), np.float32)
    xp[:, 1:h + 1, 1:wd + 1] = x
    d = np.stack([np.stack([xp[:, i * m:i * m + a, j * m:j * m + a] for j in range(tw)], 1)
                  for i in range(th)], 1)                      # (C, th, tw, A, A)
    v = np.einsum("ia,ctsab,jb->ctsij", bt, d, bt, dtype=np.float32)
    u = np.einsum("ir,kcrs,js->kcij", g, w, g, dtype=np.float32)
    if tf32:
        v, u = to_tf32(v), to_tf32(u)
    acc = np.zeros((w.shape[0], th, tw, a, a), np.float32)
    for ci in range(c):
        acc += v[ci][None] * u[:, ci][:, None, None]
    y = np.einsum("ai,ktsij,bj->ktsab", at, acc, at, dtype=np.float32)
    return y.transpose(0, 1, 3, 2, 4).reshape(w.shape[0], th * m, tw * m)[:, :h, :wd]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--tf32", action="store_true", help="TF32-rounded operands")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    print(f"{'channels':>8} " + " ".join(f"{f'F({m}x{m})':>10}" for m in POINTS)
          + ("  (TF32 operands)" if args.tf32 else ""))
    for c in args.channels:
        x = rng.standard_normal((c, 24, 24)).astype(np.float32)
        w = rng.standard_normal((8, c, 3, 3)).astype(np.float32)
        ref = direct(x.astype(np.float64), w.astype(np.float64))
        errs = [np.linalg.norm(winograd(x, w, m, args.tf32) - ref) / np.linalg.norm(ref)
                for m in POINTS]
        print(f"{c:>8} " + " ".join(f"{e:>10.2e}" for e in errs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
