"""Products of bfloat16 inputs, accumulated in float32 and rounded to bfloat16 once.

A bfloat16 model's projections multiply bfloat16 activations by bfloat16 weights; every backend
accumulates such a product in float32 and rounds its result to bfloat16 once. How the product is
written for XLA decides its speed on CPUs: XLA's CPU backend (jaxlib 0.10) runs a product with a
bfloat16 *result* by converting both inputs to float32 and running a float32 matmul, but hands a
product of bfloat16 inputs with a float32 result to YNNPACK's bfloat16 kernels, which use AMX or
AVX512-BF16 where the CPU has them (3.5-4.7x the float32 speed on an AMX Xeon,
``benchmarks/cpu_matmul_backends.json``). So on CPUs a bfloat16 product is written here as a
float32-result product rounded to bfloat16: the same arithmetic, the fast kernel. Its backward
pass is written the same way by hand (a custom VJP), because JAX's own transpose would multiply
the float32 cotangent by a bfloat16 operand, a float32 matmul again. On GPUs and TPUs, where
bfloat16 products run natively, the plain product is kept.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero


def rounds_float32_products() -> bool:
    """Whether bfloat16 products are written as float32-result products rounded once: on the
    CPU backend (see the module docstring)."""
    return jax.default_backend() == "cpu"


def _takes_rounded_form(a: jax.Array, b: jax.Array) -> bool:
    return a.dtype == jnp.bfloat16 and b.dtype == jnp.bfloat16 and rounds_float32_products()


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w`` for ``x`` [..., D] and ``w`` [D, F] of one dtype, the result in that dtype.

    For bfloat16 operands on a backend where `rounds_float32_products`, the product (and each
    product of its backward pass) accumulates in float32 and is rounded once, through the
    fast kernel; otherwise it is the plain ``x @ w``.
    """
    if _takes_rounded_form(x, w):
        return _rounded_matmul(x, w)
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def einsum(spec: str, a: jax.Array, b: jax.Array, out_dtype=None) -> jax.Array:
    """``jnp.einsum(spec, a, b)`` accumulated in float32, the result in ``out_dtype`` (default:
    the operands' dtype), for specs ``"A,B->O"`` in which every index of an operand appears in
    the other operand or in the output (as in attention's two products).

    For bfloat16 operands on a backend where `rounds_float32_products`, its backward products
    are written the same way (a float32 cotangent is rounded to bfloat16 for them, as the
    operands are); otherwise it is `jnp.einsum` with a float32 result, converted.
    """
    out_dtype = jnp.dtype(out_dtype or a.dtype)
    if _takes_rounded_form(a, b):
        return _rounded_einsum(spec, out_dtype, a, b)
    return _product(spec, a, b, out_dtype)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """`jax.lax.dot_general` for `flax.linen.Dense`'s ``dot_general``: its product (the last
    axis of the input against the kernel's first) goes through `matmul`; any other one is
    passed on unchanged."""
    (contract_lhs, contract_rhs), batch = dimension_numbers
    standard = (
        tuple(contract_lhs) == (lhs.ndim - 1,)
        and tuple(contract_rhs) == (0,)
        and rhs.ndim == 2
        and batch == ((), ())
        and precision is None
        and preferred_element_type is None
    )
    if standard:
        return matmul(lhs, rhs)
    return jax.lax.dot_general(
        lhs,
        rhs,
        dimension_numbers,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )


def is_rounded_product(prim, params: dict) -> bool:
    """Whether a primitive, as a `jax.checkpoint` policy sees it, is one of `matmul`'s
    float32-result products (a custom-VJP call of it: named in its parameters by some JAX
    versions, recognised by its backward function in others)."""
    if prim.name != "custom_vjp_call":
        return False
    bwd = params.get("bwd")
    return (
        params.get("name") == _rounded_matmul.__name__
        or getattr(bwd, "f", bwd) is _rounded_matmul_bwd
    )


def _product(spec: str, a, b, dtype):
    """One float32-result product ``jnp.einsum(spec, a, b)`` rounded to ``dtype``."""
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(dtype)


@jax.custom_vjp
def _rounded_matmul(x, w):
    return _product("...d,df->...f", x, w, x.dtype)


def _rounded_matmul_fwd(x, w):
    # Symbolic zeros: a frozen weight (the base under LoRA) gets no gradient product at all.
    x_val, w_val = x.value, w.value
    return _rounded_matmul(x_val, w_val), (x_val, w_val, x.perturbed, w.perturbed)


def _rounded_matmul_bwd(residuals, g):
    x, w, want_dx, want_dw = residuals
    if isinstance(g, SymbolicZero):
        return None, None
    g = g.astype(x.dtype)
    dx = _product("...f,df->...d", g, w, x.dtype) if want_dx else None
    dw = None
    if want_dw:
        rows_x = x.reshape(-1, x.shape[-1])
        rows_g = g.reshape(-1, g.shape[-1])
        dw = _product("nd,nf->df", rows_x, rows_g, w.dtype)
    return dx, dw


_rounded_matmul.defvjp(_rounded_matmul_fwd, _rounded_matmul_bwd, symbolic_zeros=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _rounded_einsum(spec, out_dtype, a, b):
    return _product(spec, a, b, out_dtype)


def _rounded_einsum_fwd(spec, out_dtype, a, b):
    return _rounded_einsum(spec, out_dtype, a, b), (a, b)


def _rounded_einsum_bwd(spec, out_dtype, residuals, g):
    del out_dtype
    a, b = residuals
    inputs, out = spec.replace(" ", "").split("->")
    sa, sb = inputs.split(",")
    g = g.astype(a.dtype)
    return (
        _product(f"{out},{sb}->{sa}", g, b, a.dtype),
        _product(f"{out},{sa}->{sb}", g, a, b.dtype),
    )


_rounded_einsum.defvjp(_rounded_einsum_fwd, _rounded_einsum_bwd)
