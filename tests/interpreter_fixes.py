"""Test-harness fixes for two known bugs of the Triton interpreter (TRITON_INTERPRET=1).

1. Float casts: downcasts (fp32 -> bf16 / fp16 / fp8) truncate or round half-up on the mantissa
   bits instead of rounding to nearest-even, and widening casts flush subnormal inputs to zero and
   read the E4M3 NaN byte 0xFF as -480. The fix performs every such cast with torch: exact
   widening, and downcasts rounded to nearest-even, saturating fp8 to its finite range as the
   compiled `cvt.rn.satfinite` does.
2. `tl.dot` on bfloat16 operands multiplies the raw uint16 bit patterns. The fix widens bf16
   operands to float32 (exact) before the product.
3. `tl.fma` rounds twice (product, then sum); the fix rounds once, as the GPU's fma does.
4. With numpy >= 2.4, `int()` of a 1-element array raises, which the interpreter does for a loop
   bound computed at run time (`range(k_lo, k_hi)`); the fix reads the element instead.

Kernels and tolerances are untouched: these patch the interpreter only, and only in tests.
Checked on Triton 3.4-3.9: the functions patched here have had the same signatures since 3.4.
"""

from __future__ import annotations

import numpy as np
import torch

_TORCH_FLOAT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
                "fp8e4nv": torch.float8_e4m3fn, "fp8e5": torch.float8_e5m2}
_SATURATE = {"fp8e4nv": 448.0, "fp8e5": 57344.0}
_BITS = {8: torch.uint8, 16: torch.int16, 32: torch.int32}
_NP_BITS = {8: np.uint8, 16: np.uint16, 32: np.uint32}


def _torch_dtype(tl_dtype):
    return _TORCH_FLOAT.get(getattr(tl_dtype, "name", None))


def fma_float32(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Correctly rounded float32 x * y + z (one rounding), as the GPU's fma: float64 holds the product
    exactly; the sum's float64 rounding error (two-sum) decides the rare float32 midpoint cases."""
    x64, y64, z64 = (np.asarray(v, dtype=np.float32).astype(np.float64) for v in (x, y, z))
    with np.errstate(all="ignore"):
        p = x64 * y64
        s = p + z64
        bp = s - p
        err = (p - (s - bp)) + (z64 - bp)  # p + z == s + err exactly (finite inputs)
        r = s.astype(np.float32)
        toward = np.nextafter(r, np.where(s > r.astype(np.float64), np.float32(np.inf), np.float32(-np.inf)))
        mid = (r.astype(np.float64) + toward.astype(np.float64)) / 2
        fix = (s == mid) & (err != 0) & np.isfinite(s) & (np.sign(err) == np.sign(mid - r.astype(np.float64)))
    return np.where(fix, toward, r)


def apply() -> bool:
    """Patch the interpreter in place; returns False if this Triton has no interpreter module."""
    try:
        import triton.language as tl
        from triton._C.libtriton import ir
        from triton.runtime import interpreter
    except ImportError:
        return False
    if getattr(interpreter, "_dsquant_patched", False):
        return True
    original = interpreter._convert_float

    def convert_float(input, input_dtype, output_dtype, rounding_mode):
        src, dst = _torch_dtype(input_dtype), _torch_dtype(output_dtype)
        downcast = input_dtype.primitive_bitwidth > output_dtype.primitive_bitwidth
        if src is None or dst is None or (downcast and rounding_mode == ir.ROUNDING_MODE.RTZ):
            return original(input, input_dtype, output_dtype, rounding_mode)
        raw = torch.from_numpy(np.ascontiguousarray(input).view(_NP_BITS[input_dtype.primitive_bitwidth]).copy())
        x = raw.view(_BITS[input_dtype.primitive_bitwidth]).view(src).float()
        limit = _SATURATE.get(output_dtype.name)
        if limit is not None:
            x = torch.where(torch.isnan(x), x, x.clamp(-limit, limit))
        out = x.to(dst).view(_BITS[output_dtype.primitive_bitwidth]).numpy()
        return out.view(_NP_BITS[output_dtype.primitive_bitwidth])

    interpreter._convert_float = convert_float

    builder_cls = interpreter.InterpreterBuilder
    original_dot = builder_cls.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16 or b.dtype.scalar == tl.bfloat16:
            def widen(h):
                if h.dtype.scalar != tl.bfloat16:
                    return h.data.astype(np.float32)
                return convert_float(h.data, tl.bfloat16, tl.float32, None).view(np.float32)
            out = np.matmul(widen(a), widen(b), dtype=np.float32).astype(d.data.dtype) + d.data
            return interpreter.TensorHandle(out, d.dtype.scalar)
        return original_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    builder_cls.create_dot = create_dot

    original_fma = builder_cls.create_fma

    def create_fma(self, x, y, z):
        if z.data.dtype != np.float32:
            return original_fma(self, x, y, z)
        return interpreter.TensorHandle(fma_float32(x.data, y.data, z.data), z.dtype.scalar)

    builder_cls.create_fma = create_fma

    original_patch_tensor = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        original_patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch_lang_tensor
    interpreter._dsquant_patched = True
    return True
