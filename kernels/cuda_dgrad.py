"""The strided input gradient split by output phases (geometry only, no CuPy, no kernels).

With stride ``(sh, sw) != (1, 1)`` the input gradient

    grad_input[n, c, h, w] = sum_{k, r, s} grad_output[n, k, p, q] * weight[k, c', r, s]
        over p*sh = h + pt - r*dh and q*sw = w + pl - s*dw

read as one correlation of the stride-dilated grad_output does most of its multiplies on the
inserted zeros (75% with stride 2). Split the input pixels by phase instead: the pixels
``h = ph + sh*i`` of row phase ``ph`` (``0 <= ph < sh``) are reached only by the taps ``r``
with ``r*dh = ph + pt (mod sh)``. With ``g = gcd(sh, dh)`` there are none when ``g`` does not
divide ``ph + pt``; otherwise they form the progression ``r = r0 + j*(sh/g)`` and tap ``j``
reads grad_output row ``i + a0 - j*(dh/g)`` (``a0 = (ph + pt - r0*dh) / sh``, exact). Flipping
``j`` makes that a dense stride-1 forward correlation of grad_output ``(N, K, P, Q)`` with the
sub-kernel (those taps, flipped, input and output channels swapped within each group),
dilation ``dh/g``, top padding ``(Rj - 1)*(dh/g) - a0`` and ``ceil((H - ph) / sh)`` output
rows; the same along the columns. Its result is the compact phase image
``grad_input[:, :, ph::sh, pw::sw]``. Every multiply meets a real grad_output element or an
edge (the padding of the sub-problem), none meets a structural zero.

The sub-problem's padding may be negative (more input padding than the kernel extent: the
first phase rows start inside grad_output) or exceed the kernel extent minus one (a phase
row whose first taps fall above grad_output); the bottom/right padding is implied by the
output size and may be negative too. ``conv2d.cu``'s forward kernel takes any int padding
(signed window origins, unsigned bounds checks), so no view is cropped or copied. These
geometries never pass through ``fastconv``'s argument validation, which would reject them.

``geom`` is any object with the fields of ``fastconv._types.ConvGeometry`` (a frozen
dataclass); this module never imports ``fastconv``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Optional


@dataclass(frozen=True)
class AxisTaps:
    """The taps and the stride-1 sub-correlation of one input phase along one axis.

    Attributes
    ----------
    phase : int
        Input positions ``phase + stride*i``, ``0 <= i < length``.
    length : int
        ``ceil((size - phase) / stride)`` (0 when the phase lies past the input).
    first, step, count : int
        Taps ``first + j*step`` for ``j < count`` (``count`` 0: no tap reaches the phase).
    dilation : int
        Of the sub-correlation: ``dilation / gcd(stride, dilation)``.
    pad : int
        Top (left) padding of the sub-correlation: output ``i`` reads grad_output
        ``i - pad + j'*dilation`` with sub-kernel tap ``j'`` (tap ``first + (count-1-j')*step``
        of the layer). May be negative or exceed the kernel extent.
    pad_end : int
        Bottom (right) padding implied by ``length`` outputs over ``extent`` grad_output
        positions (may be negative).
    """

    phase: int
    length: int
    first: int
    step: int
    count: int
    dilation: int
    pad: int
    pad_end: int

    @property
    def taps(self) -> range:
        """The layer's kernel taps reaching this phase, in increasing order."""
        return range(self.first, self.first + self.count * self.step, self.step)


def axis_taps(phase: int, size: int, extent: int, taps: int, stride: int, dilation: int,
              pad: int) -> AxisTaps:
    """`AxisTaps` of input phase ``phase`` along an axis of ``size`` input positions,
    ``extent`` grad_output positions, ``taps`` kernel taps, with the layer's ``stride``,
    ``dilation`` and leading ``pad``."""
    length = max(0, -(-(size - phase) // stride))
    g = math.gcd(stride, dilation)
    step, sub_dil = stride // g, dilation // g
    t = phase + pad
    if t % g:
        return AxisTaps(phase, length, 0, step, 0, sub_dil, 0, 0)
    # r * dilation = t (mod stride)  <=>  r * sub_dil = t / g (mod step), sub_dil invertible
    first = (t // g) * pow(sub_dil, -1, step) % step if step > 1 else 0
    count = -(-(taps - first) // step) if first < taps else 0
    if count == 0:
        return AxisTaps(phase, length, first, step, 0, sub_dil, 0, 0)
    a0 = (t - first * dilation) // stride  # exact: first * dilation = t (mod stride)
    sub_pad = (count - 1) * sub_dil - a0
    pad_end = (length - 1) + (count - 1) * sub_dil + 1 - extent - sub_pad
    return AxisTaps(phase, length, first, step, count, sub_dil, sub_pad, pad_end)


@dataclass(frozen=True)
class Phase:
    """One input phase ``grad_input[:, :, rows.phase::sh, cols.phase::sw]``.

    Attributes
    ----------
    rows, cols : AxisTaps
    geom : ConvGeometry or None
        Forward geometry of the sub-problem: input grad_output ``(N, K, P, Q)``, weight
        `sub_weight` ``(C, K/groups, Rj, Sj)``, output the phase image
        ``(N, C, rows.length, cols.length)``, stride 1; None when the phase is empty or no
        tap reaches it (its pixels' gradient is zero).
    """

    rows: AxisTaps
    cols: AxisTaps
    geom: Optional[Any]

    @property
    def index(self) -> tuple[int, int]:
        return self.rows.phase, self.cols.phase

    @property
    def pixels(self) -> int:
        """Input pixels of the phase per image and channel."""
        return self.rows.length * self.cols.length

    @property
    def taps(self) -> int:
        """Kernel taps that reach the phase."""
        return self.rows.count * self.cols.count


@lru_cache(maxsize=1024)
def phases(geom: Any) -> tuple[Phase, ...]:
    """The ``sh * sw`` input phases of ``geom``'s input gradient, row phase major."""
    (sh, sw), (dh, dw) = geom.stride, geom.dilation
    pt, _, pl, _ = geom.padding
    out = []
    for ph in range(sh):
        rows = axis_taps(ph, geom.H, geom.P, geom.R, sh, dh, pt)
        for pw in range(sw):
            cols = axis_taps(pw, geom.W, geom.Q, geom.S, sw, dw, pl)
            sub = None
            if rows.count and cols.count and rows.length and cols.length:
                sub = dataclasses.replace(
                    geom, C=geom.K, H=geom.P, W=geom.Q, K=geom.C, R=rows.count, S=cols.count,
                    P=rows.length, Q=cols.length, stride=(1, 1),
                    padding=(rows.pad, rows.pad_end, cols.pad, cols.pad_end),
                    dilation=(rows.dilation, cols.dilation))
            out.append(Phase(rows, cols, sub))
    return tuple(out)


def sub_weight(xp: Any, weight: Any, phase: Phase, groups: int) -> Any:
    """The forward weight ``(C, K/groups, Rj, Sj)`` of ``phase``'s sub-problem, C-contiguous.

    ``weight (K, C/groups, R, S)`` restricted to the phase's taps, flipped in both axes, with
    filters and channels swapped within each group: entry ``[g*Cg + c, k, j, l]`` is
    ``weight[g*Kg + k, c, rows.first + (Rj-1-j)*rows.step, cols.first + (Sj-1-l)*cols.step]``.
    ``xp`` is the array module of ``weight`` (slicing, reshape, transpose and
    ``ascontiguousarray`` only).
    """
    rows, cols = phase.rows, phase.cols
    K, cg = weight.shape[:2]
    kg = K // groups
    taps = weight[:, :, rows.first::rows.step, cols.first::cols.step]
    taps = taps[:, :, :rows.count, :cols.count][:, :, ::-1, ::-1]
    swapped = taps.reshape(groups, kg, cg, rows.count, cols.count).transpose(0, 2, 1, 3, 4)
    return xp.ascontiguousarray(swapped).reshape(groups * cg, kg, rows.count, cols.count)


def multiply_fraction(geom: Any) -> float:
    """Multiplies of the phase split over those of the strided direct input gradient (which
    visits every tap for every input pixel): the fraction of the direct kernel's FMAs that
    meet real grad_output elements or edges, e.g. 0.25 for a 2x2 kernel with stride 2."""
    useful = sum(p.pixels * p.taps for p in phases(geom) if p.geom is not None)
    return useful / max(1, geom.H * geom.W * geom.R * geom.S)
