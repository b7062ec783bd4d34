"""TEST-SIDE SHIM for the Triton interpreter, used only by the kernel tests: the interpreter multiplies bf16
dot operands as raw 16-bit integer patterns and truncates fp32 -> bf16 casts instead of rounding to nearest
even (triton-lang/triton issue 11584, "the interpreter doesn't support bf16"). Inside `bf16_interpreter()`,
bf16 dot operands are widened to fp32 (exact) and fp32 -> bf16 casts round to nearest even, as a GPU does.
`test_interpreter_still_mishandles_bf16` fails once upstream fixes the interpreter: then delete this file.
"""

import contextlib

import numpy as np
import triton.language as tl
from triton.runtime import interpreter


def _bf16_to_fp32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _fp32_to_bf16(values: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    return np.where(np.isnan(values), np.uint16(0x7FC0), rounded)


@contextlib.contextmanager
def bf16_interpreter():
    builder = interpreter.InterpreterBuilder
    dot, cast = builder.create_dot, builder.cast_impl

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        widen = lambda t: (  # noqa: E731
            interpreter.TensorHandle(_bf16_to_fp32(t.data), tl.float32) if t.dtype.scalar == tl.bfloat16 else t
        )
        return dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return interpreter.TensorHandle(_fp32_to_bf16(src.data), tl.bfloat16)
        return cast(self, src, dst_type)

    builder.create_dot, builder.cast_impl = create_dot, cast_impl
    try:
        yield
    finally:
        builder.create_dot, builder.cast_impl = dot, cast
