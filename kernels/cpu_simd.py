"""Register shuffles for the cpu kernels: ``numba.extending.intrinsic``s that emit LLVM
``shufflevector``s on 8-element vectors, where Numba's own loops over short rows stay scalar
(and :class:`Vectors`, their code generation, which ``cpu_hinge``'s column pass uses too).

* :func:`transpose8`: an 8 x 8 tile transposed (the hinge loss's short-row blocks);
* :func:`deinterleave16` / :func:`interleave16`: 16 elements split into their even and odd
  ones, and back (the stride-2 phase planes of ``cpu_conv``).

They only move values, so the bits never depend on the vector width (LLVM lowers the shuffles
for any target). No bounds checks: callers keep every access in range. The intrinsics are
inlined into their callers' machine code, so Numba's cache of a caller does not notice a
change here (as with any helper imported from another module): clear the cache after editing.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

LANES = 8

# An 8 x 8 transpose in three steps: interleave 32-bit elements of row pairs, then 64-bit
# pairs, then 128-bit halves (the AVX pattern).
_LO32 = (0, 8, 1, 9, 4, 12, 5, 13)
_HI32 = (2, 10, 3, 11, 6, 14, 7, 15)
_LO64 = (0, 1, 8, 9, 4, 5, 12, 13)
_HI64 = (2, 3, 10, 11, 6, 7, 14, 15)
_LO128 = (0, 1, 2, 3, 8, 9, 10, 11)
_HI128 = (4, 5, 6, 7, 12, 13, 14, 15)
# The even and odd elements of two vectors, and the inverse.
_EVEN = tuple(range(0, 2 * LANES, 2))
_ODD = tuple(range(1, 2 * LANES, 2))
_ZIP_LO = (0, 8, 1, 9, 2, 10, 3, 11)
_ZIP_HI = (4, 12, 5, 13, 6, 14, 7, 15)


def _float_vectors(*arrays) -> bool:
    """Whether the arguments are 1-D arrays of one float dtype (float32 or float64)."""
    return (all(isinstance(a, types.Array) and a.ndim == 1 for a in arrays)
            and len({a.dtype for a in arrays}) == 1
            and arrays[0].dtype in (types.float32, types.float64))


class Vectors:
    """Code generation shared by the intrinsics: the arrays' data pointers, vector loads and
    stores at an element offset (element alignment: unaligned is fine) and shuffles."""

    def __init__(self, context, builder, signature, args, arrays):
        self.builder = builder
        self.data = [context.make_array(signature.args[i])(context, builder, args[i]).data
                     for i in arrays]
        elt = context.get_data_type(signature.args[arrays[0]].dtype)
        self.vty = ir.VectorType(elt, LANES)
        self.size = elt.get_abi_size(context.target_data)

    def offset(self, start, step, i):
        """``start + step * i`` (``step`` an LLVM value, or None for 1)."""
        b = self.builder
        scaled = (ir.Constant(start.type, i) if step is None
                  else b.mul(step, ir.Constant(step.type, i)))
        return b.add(start, scaled)

    def _ptr(self, ptr, off):
        return self.builder.bitcast(self.builder.gep(ptr, [off]), self.vty.as_pointer())

    def load(self, ptr, off):
        return self.builder.load(self._ptr(ptr, off), align=self.size)

    def store(self, value, ptr, off):
        self.builder.store(value, self._ptr(ptr, off), align=self.size)

    def splat(self, value):
        """A vector of ``LANES`` copies of the scalar ``value`` (of the element type)."""
        b = self.builder
        one = b.insert_element(ir.Constant(self.vty, None), value, ir.Constant(ir.IntType(32), 0))
        return b.shuffle_vector(one, one, ir.Constant(ir.VectorType(ir.IntType(32), LANES), None))

    def shuffle(self, a, b, mask):
        return self.builder.shuffle_vector(
            a, b, ir.Constant(ir.VectorType(ir.IntType(32), LANES), list(mask)))

    def two_to_two(self, loads, masks, stores):
        """Two vectors loaded at ``loads`` (``(pointer, offset)`` pairs), shuffled by each of
        ``masks`` and stored at ``stores``."""
        a, b = (self.load(ptr, off) for ptr, off in loads)
        for mask, (ptr, off) in zip(masks, stores):
            self.store(self.shuffle(a, b, mask), ptr, off)


@intrinsic
def transpose8(typingctx, src, src_start, src_step, dst, dst_start, dst_step):
    """``dst[dst_start + c * dst_step + i] = src[src_start + i * src_step + c]`` for ``i, c``
    in ``0..7``: an 8 x 8 tile of a row-major 1-D ``src`` transposed into ``dst`` (same float
    dtype), through registers."""
    if not _float_vectors(src, dst):
        return None
    sig = types.void(src, types.intp, types.intp, dst, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        vec = Vectors(context, builder, signature, args, (0, 3))
        (s, d), (s0, ss, d0, ds) = vec.data, (args[1], args[2], args[4], args[5])
        shuffle = vec.shuffle
        v = [vec.load(s, vec.offset(s0, ss, i)) for i in range(8)]
        a = []                  # a[2k], a[2k+1]: rows 2k, 2k+1 of columns (0,1,4,5), (2,3,6,7)
        for i in range(0, 8, 2):
            a += [shuffle(v[i], v[i + 1], _LO32), shuffle(v[i], v[i + 1], _HI32)]
        b = []                  # b[c], b[4 + c]: rows 0-3, 4-7 of columns c and c + 4
        for base in (0, 4):
            lo, hi = a[base:base + 2], a[base + 2:base + 4]
            b += [shuffle(lo[0], hi[0], _LO64), shuffle(lo[0], hi[0], _HI64),
                  shuffle(lo[1], hi[1], _LO64), shuffle(lo[1], hi[1], _HI64)]
        for c in range(4):
            vec.store(shuffle(b[c], b[4 + c], _LO128), d, vec.offset(d0, ds, c))
            vec.store(shuffle(b[c], b[4 + c], _HI128), d, vec.offset(d0, ds, c + 4))
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def deinterleave16(typingctx, src, s0, even, e0, odd, o0):
    """``even[e0 + i] = src[s0 + 2i]``, ``odd[o0 + i] = src[s0 + 2i + 1]`` for ``i < 8``
    (1-D arrays of one float dtype)."""
    if not _float_vectors(src, even, odd):
        return None
    sig = types.void(src, types.intp, even, types.intp, odd, types.intp)

    def codegen(context, builder, signature, args):
        vec = Vectors(context, builder, signature, args, (0, 2, 4))
        s, e, o = vec.data
        vec.two_to_two([(s, args[1]), (s, vec.offset(args[1], None, LANES))], (_EVEN, _ODD),
                       [(e, args[3]), (o, args[5])])
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def interleave16(typingctx, even, e0, odd, o0, dst, d0):
    """``dst[d0 + 2i] = even[e0 + i]``, ``dst[d0 + 2i + 1] = odd[o0 + i]`` for ``i < 8``, the
    inverse of :func:`deinterleave16`."""
    if not _float_vectors(even, odd, dst):
        return None
    sig = types.void(even, types.intp, odd, types.intp, dst, types.intp)

    def codegen(context, builder, signature, args):
        vec = Vectors(context, builder, signature, args, (0, 2, 4))
        e, o, d = vec.data
        vec.two_to_two([(e, args[1]), (o, args[3])], (_ZIP_LO, _ZIP_HI),
                       [(d, args[5]), (d, vec.offset(args[5], None, LANES))])
        return context.get_dummy_value()
    return sig, codegen
