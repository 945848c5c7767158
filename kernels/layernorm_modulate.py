"""Fused LayerNorm (no affine) + adaLN modulation: y = LN(x) * (1 + scale) + shift.

x: (B, T, D); shift, scale: (B, D), broadcast over the T tokens of each sample.

Layers: Triton kernels, host launchers, then the `sit_fast::layernorm_modulate` custom op (with a
fake and an autograd formula whose backward is the `sit_fast::layernorm_modulate_backward` op).
y has out_dtype (default x's dtype), e.g. bf16 for the next Linear from an fp32 residual stream.
Saved for backward: x_hat = (x - mean) * rstd (computed in fp32 by the forward kernel, stored in
y's dtype), scale and the per-row fp32 rstd; x and mean are not needed by the LayerNorm VJP. When
y is narrower than fp32 the gradients see x_hat rounded to y's dtype (slightly less exact).
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from . import _launch
from ._rows import (normalize_modulate, normalize_modulate_rows, normalize_modulate_vjp, normalize_modulate_vjp_rows,
                    token_span)

OP = "layernorm_modulate"


@triton.jit
def _layernorm_modulate_fwd_kernel(
    y_ptr,  # (B, T, D) out, y's dtype
    x_hat_ptr,  # (B, T, D) out, y's dtype (saved for backward)
    rstd_ptr,  # (B, T) out, fp32
    x_ptr,  # (B, T, D)
    shift_ptr,  # (B, D)
    scale_ptr,  # (B, D)
    stride_y_b, stride_y_t, stride_y_d,
    stride_x_hat_b, stride_x_hat_t, stride_x_hat_d,
    stride_stat_b, stride_stat_t,
    stride_x_b, stride_x_t, stride_x_d,
    stride_shift_b, stride_shift_d,
    stride_scale_b, stride_scale_d,
    T, D, rows_per_program, n_tiles, eps,
    STORE_X_HAT: tl.constexpr,
    PREFETCH: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROWS: tl.constexpr = 1,
    ONE_ROW_LOOP: tl.constexpr = True,
):
    # One program per (sample b, tile of rows_per_program tokens); ROWS whole rows of D per iteration.
    # PREFETCH: issue the loads of the next rows before the reductions of these (twice the loads in flight).
    b, _tile, t_start, t_end, cols, mask = token_span(T, D, rows_per_program, n_tiles, BLOCK_D)

    shift = tl.load(shift_ptr + b * stride_shift_b + cols * stride_shift_d, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + b * stride_scale_b + cols * stride_scale_d, mask=mask, other=0.0).to(tl.float32)
    one_plus_scale = 1.0 + scale

    x_row = x_ptr + b * stride_x_b + cols * stride_x_d
    if (ROWS == 1) & ONE_ROW_LOOP:
        if PREFETCH:
            x_next = tl.load(x_row + t_start * stride_x_t, mask=mask, other=0.0)
        for t in range(t_start, t_end):
            if PREFETCH:
                x = x_next.to(tl.float32)
                next_mask = cols < tl.where(t + 1 < t_end, D, 0)  # row t + 1's columns, if in the tile
                x_next = tl.load(x_row + (t + 1) * stride_x_t, mask=next_mask, other=0.0)
            else:
                x = tl.load(x_row + t * stride_x_t, mask=mask, other=0.0).to(tl.float32)
            x_hat, y, rstd = normalize_modulate(x, mask, D, eps, one_plus_scale, shift)
            tl.store(y_ptr + b * stride_y_b + t * stride_y_t + cols * stride_y_d, y.to(y_ptr.dtype.element_ty),
                     mask=mask)
            if STORE_X_HAT:  # only when a backward will follow
                tl.store(x_hat_ptr + b * stride_x_hat_b + t * stride_x_hat_t + cols * stride_x_hat_d,
                         x_hat.to(x_hat_ptr.dtype.element_ty), mask=mask)
            tl.store(rstd_ptr + b * stride_stat_b + t * stride_stat_t, rstd)
    else:  # a (ROWS, BLOCK_D) tile per iteration: the rows' reductions side by side
        steps = tl.arange(0, ROWS).to(tl.int64)
        col = cols[None, :]
        x_tile = x_ptr + b * stride_x_b + col * stride_x_d
        if PREFETCH:
            t = t_start + steps
            x_next = tl.load(x_tile + t[:, None] * stride_x_t, mask=(t < t_end)[:, None] & mask[None, :], other=0.0)
        for t0 in range(t_start, t_end, ROWS):
            t = t0 + steps
            rows = t < t_end
            tile_mask = rows[:, None] & mask[None, :]
            if PREFETCH:
                x = x_next.to(tl.float32)
                t_next = t + ROWS
                x_next = tl.load(x_tile + t_next[:, None] * stride_x_t,
                                 mask=(t_next < t_end)[:, None] & mask[None, :], other=0.0)
            else:
                x = tl.load(x_tile + t[:, None] * stride_x_t, mask=tile_mask, other=0.0).to(tl.float32)
            x_hat, y, rstd = normalize_modulate_rows(x, tile_mask, D, eps, one_plus_scale[None, :], shift[None, :])
            tl.store(y_ptr + b * stride_y_b + t[:, None] * stride_y_t + col * stride_y_d,
                     y.to(y_ptr.dtype.element_ty), mask=tile_mask)
            if STORE_X_HAT:
                tl.store(x_hat_ptr + b * stride_x_hat_b + t[:, None] * stride_x_hat_t + col * stride_x_hat_d,
                         x_hat.to(x_hat_ptr.dtype.element_ty), mask=tile_mask)
            tl.store(rstd_ptr + b * stride_stat_b + t * stride_stat_t, rstd, mask=rows)


# LayerNorm + modulation VJP, per row, with x_hat = (x - mean) * rstd and y = x_hat * (1 + scale) + shift.
# x_hat (saved by the forward in y's dtype) and the fp32 rstd are all it needs:
#   g       = dy * (1 + scale)                                   (gradient reaching x_hat)
#   dx      = rstd * (g - mean(g) - x_hat * mean(g * x_hat))     (means over the D features)
#   dshift  = sum over tokens of dy                              (these two only when HAS_DVEC; a frozen
#   dscale  = sum over tokens of dy * x_hat                       model's vectors need neither)
# Each program sums dshift/dscale over its own token tile in fp32 and writes one partial row;
# the launcher reduces the (B, n_tiles, D) partials over tiles afterwards (deterministic, no atomics).
@triton.jit
def _layernorm_modulate_bwd_kernel(
    dx_ptr,  # (B, T, D) out, x's dtype
    dshift_partial_ptr,  # (B, n_tiles, D) out, fp32 (unused when HAS_DVEC is False)
    dscale_partial_ptr,  # (B, n_tiles, D) out, fp32 (unused when HAS_DVEC is False)
    dy_ptr,  # (B, T, D) incoming gradient
    x_hat_ptr,  # (B, T, D) saved normalised x, y's dtype
    scale_ptr,  # (B, D)
    rstd_ptr,  # (B, T) fp32
    stride_dx_b, stride_dx_t, stride_dx_d,
    stride_part_b, stride_part_tile, stride_part_d,
    stride_dy_b, stride_dy_t, stride_dy_d,
    stride_x_hat_b, stride_x_hat_t, stride_x_hat_d,
    stride_scale_b, stride_scale_d,
    stride_stat_b, stride_stat_t,
    T, D, rows_per_program, n_tiles,
    HAS_DVEC: tl.constexpr,
    PREFETCH: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROWS: tl.constexpr = 1,
    ONE_ROW_LOOP: tl.constexpr = True,
):
    b, tile, t_start, t_end, cols, mask = token_span(T, D, rows_per_program, n_tiles, BLOCK_D)

    scale = tl.load(scale_ptr + b * stride_scale_b + cols * stride_scale_d, mask=mask, other=0.0).to(tl.float32)
    one_plus_scale = 1.0 + scale
    dshift_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    dscale_acc = tl.zeros([BLOCK_D], dtype=tl.float32)

    rstd_row = rstd_ptr + b * stride_stat_b
    if (ROWS == 1) & ONE_ROW_LOOP:
        dy_row = dy_ptr + b * stride_dy_b + cols * stride_dy_d
        x_hat_row = x_hat_ptr + b * stride_x_hat_b + cols * stride_x_hat_d
        if PREFETCH:  # row t + 1's loads go out before row t's reductions
            dy_next = tl.load(dy_row + t_start * stride_dy_t, mask=mask, other=0.0)
            x_hat_next = tl.load(x_hat_row + t_start * stride_x_hat_t, mask=mask, other=0.0)
            rstd_next = tl.load(rstd_row + t_start * stride_stat_t)
        for t in range(t_start, t_end):
            if PREFETCH:
                dy, x_hat, rstd = dy_next.to(tl.float32), x_hat_next.to(tl.float32), rstd_next
                more = t + 1 < t_end
                next_mask = cols < tl.where(more, D, 0)  # row t + 1's columns, if in the tile
                dy_next = tl.load(dy_row + (t + 1) * stride_dy_t, mask=next_mask, other=0.0)
                x_hat_next = tl.load(x_hat_row + (t + 1) * stride_x_hat_t, mask=next_mask, other=0.0)
                rstd_next = tl.load(rstd_row + (t + 1) * stride_stat_t, mask=more, other=0.0)
            else:
                dy = tl.load(dy_row + t * stride_dy_t, mask=mask, other=0.0).to(tl.float32)
                x_hat = tl.load(x_hat_row + t * stride_x_hat_t, mask=mask, other=0.0).to(tl.float32)
                rstd = tl.load(rstd_row + t * stride_stat_t)
            if HAS_DVEC:
                dshift_acc += dy
                dscale_acc += dy * x_hat
            dx = normalize_modulate_vjp(dy, x_hat, rstd, one_plus_scale, D)
            tl.store(dx_ptr + b * stride_dx_b + t * stride_dx_t + cols * stride_dx_d,
                     dx.to(dx_ptr.dtype.element_ty), mask=mask)
    else:  # a (ROWS, BLOCK_D) tile per iteration: the rows' reductions side by side
        steps = tl.arange(0, ROWS).to(tl.int64)
        col = cols[None, :]
        dy_tile = dy_ptr + b * stride_dy_b + col * stride_dy_d
        x_hat_tile = x_hat_ptr + b * stride_x_hat_b + col * stride_x_hat_d
        if PREFETCH:
            t = t_start + steps
            rows = t < t_end
            first = rows[:, None] & mask[None, :]
            dy_next = tl.load(dy_tile + t[:, None] * stride_dy_t, mask=first, other=0.0)
            x_hat_next = tl.load(x_hat_tile + t[:, None] * stride_x_hat_t, mask=first, other=0.0)
            rstd_next = tl.load(rstd_row + t * stride_stat_t, mask=rows, other=0.0)
        for t0 in range(t_start, t_end, ROWS):
            t = t0 + steps
            rows = t < t_end
            tile_mask = rows[:, None] & mask[None, :]
            if PREFETCH:
                dy, x_hat, rstd = dy_next.to(tl.float32), x_hat_next.to(tl.float32), rstd_next
                t_next = t + ROWS
                rows_next = t_next < t_end
                next_mask = rows_next[:, None] & mask[None, :]
                dy_next = tl.load(dy_tile + t_next[:, None] * stride_dy_t, mask=next_mask, other=0.0)
                x_hat_next = tl.load(x_hat_tile + t_next[:, None] * stride_x_hat_t, mask=next_mask, other=0.0)
                rstd_next = tl.load(rstd_row + t_next * stride_stat_t, mask=rows_next, other=0.0)
            else:
                dy = tl.load(dy_tile + t[:, None] * stride_dy_t, mask=tile_mask, other=0.0).to(tl.float32)
                x_hat = tl.load(x_hat_tile + t[:, None] * stride_x_hat_t, mask=tile_mask, other=0.0).to(tl.float32)
                rstd = tl.load(rstd_row + t * stride_stat_t, mask=rows, other=0.0)
            if HAS_DVEC:  # padding rows loaded as zeros add nothing
                dshift_acc += tl.sum(dy, axis=0)
                dscale_acc += tl.sum(dy * x_hat, axis=0)
            dx = normalize_modulate_vjp_rows(dy, x_hat, rstd, one_plus_scale[None, :], D)
            tl.store(dx_ptr + b * stride_dx_b + t[:, None] * stride_dx_t + col * stride_dx_d,
                     dx.to(dx_ptr.dtype.element_ty), mask=tile_mask)

    if HAS_DVEC:
        part = b * stride_part_b + tile * stride_part_tile + cols * stride_part_d
        tl.store(dshift_partial_ptr + part, dshift_acc, mask=mask)
        tl.store(dscale_partial_ptr + part, dscale_acc, mask=mask)


def check_inputs(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, out_dtype: Optional[torch.dtype] = None
) -> torch.dtype:
    """Validate the inputs; returns y's dtype (out_dtype, or x's dtype when None)."""
    _launch.check_activation(OP, "x", x)
    out_dtype = _launch.check_out_dtype(OP, "out_dtype", out_dtype, x)
    extra = {"out": out_dtype}
    _launch.check_modulation(OP, "shift", shift, x, extra)
    _launch.check_modulation(OP, "scale", scale, x, extra)
    _launch.check_same_device(OP, x=x, shift=shift, scale=scale)
    return out_dtype


def layernorm_modulate_forward(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, out_dtype: Optional[torch.dtype] = None,
    save_x_hat: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel: returns y and x_hat (out_dtype) and the fp32 per-row rstd (B, T).

    save_x_hat=False (no backward to follow, e.g. sampling) skips writing x_hat and returns it empty,
    of shape (B, T, 0).
    """
    out_dtype = check_inputs(x, shift, scale, out_dtype)
    _launch.check_runnable(OP, x.device, _layernorm_modulate_fwd_kernel)
    B, T, D = x.shape
    y = _launch.empty((B, T, D), out_dtype, x.device)
    x_hat = _launch.empty((B, T, D if save_x_hat else 0), out_dtype, x.device)
    rstd = _launch.empty((B, T), torch.float32, x.device)
    rows_per_program, n_tiles = _launch.token_tiling(B, T, x.device, "fwd")
    if B * n_tiles == 0:
        return y, x_hat, rstd
    block_d, num_warps = _launch.block_config(D)
    with _launch.on_device(x.device):
        _layernorm_modulate_fwd_kernel[(B * n_tiles,)](
            y, x_hat, rstd, x, shift, scale,
            *y.stride(), *x_hat.stride(), *rstd.stride(), *x.stride(), *shift.stride(), *scale.stride(),
            T, D, rows_per_program, n_tiles, eps,
            STORE_X_HAT=save_x_hat, PREFETCH=_launch.prefetch("fwd"), BLOCK_D=block_d,
            **_launch.row_loop("fwd"), num_warps=num_warps, enable_fp_fusion=_launch.FP_FUSION,
        )
    return y, x_hat, rstd


def layernorm_modulate_backward(
    grad_y: torch.Tensor,
    x_hat: torch.Tensor,
    scale: torch.Tensor,
    rstd: torch.Tensor,
    x_dtype: torch.dtype,
    shift_dtype: torch.dtype,
    has_dvec: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernel: returns dx (x_dtype), dshift (shift_dtype), dscale (scale's dtype).

    has_dvec=False (neither shift nor scale needs a gradient) skips dshift and dscale and returns
    them empty, (B, 0)."""
    _launch.check_runnable(OP, x_hat.device, _layernorm_modulate_bwd_kernel)
    B, T, D = x_hat.shape
    dx = _launch.empty((B, T, D), x_dtype, x_hat.device)
    rows_per_program, n_tiles = _launch.token_tiling(B, T, x_hat.device, "bwd")
    dshift_partial, dscale_partial = (
        _launch.empty((B, n_tiles if has_dvec else 0, D), torch.float32, x_hat.device) for _ in range(2))
    if B * n_tiles > 0:
        block_d, num_warps = _launch.block_config(D, "bwd")
        with _launch.on_device(x_hat.device):
            _layernorm_modulate_bwd_kernel[(B * n_tiles,)](
                dx, dshift_partial, dscale_partial, grad_y, x_hat, scale, rstd,
                *dx.stride(), *dshift_partial.stride(), *grad_y.stride(), *x_hat.stride(), *scale.stride(),
                *rstd.stride(),
                T, D, rows_per_program, n_tiles,
                HAS_DVEC=has_dvec, PREFETCH=_launch.prefetch("bwd"), BLOCK_D=block_d,
                **_launch.row_loop("bwd"), num_warps=num_warps, enable_fp_fusion=_launch.FP_FUSION,
            )
    if not has_dvec:
        return dx, scale.new_empty((B, 0), dtype=shift_dtype), scale.new_empty((B, 0))
    dshift = dshift_partial.sum(dim=1).to(shift_dtype)
    dscale = dscale_partial.sum(dim=1).to(scale.dtype)
    return dx, dshift, dscale


@torch.library.custom_op("sit_fast::layernorm_modulate", mutates_args=())
def layernorm_modulate_op(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, out_dtype: Optional[torch.dtype],
    save_x_hat: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _launch.check_eps(OP, eps)  # again where a compiled caller traced it as a symbol
    return layernorm_modulate_forward(x, shift, scale, eps, out_dtype, save_x_hat)


@layernorm_modulate_op.register_fake
def _(x, shift, scale, eps, out_dtype, save_x_hat):
    out_dtype = check_inputs(x, shift, scale, out_dtype)
    B, T, D = x.shape
    return (
        x.new_empty((B, T, D), dtype=out_dtype),
        x.new_empty((B, T, D if save_x_hat else 0), dtype=out_dtype),
        x.new_empty((B, T), dtype=torch.float32),
    )


@torch.library.custom_op("sit_fast::layernorm_modulate_backward", mutates_args=())
def layernorm_modulate_backward_op(
    grad_y: torch.Tensor,
    x_hat: torch.Tensor,
    scale: torch.Tensor,
    rstd: torch.Tensor,
    x_dtype: torch.dtype,
    shift_dtype: torch.dtype,
    has_dvec: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return layernorm_modulate_backward(grad_y, x_hat, scale, rstd, x_dtype, shift_dtype, has_dvec)


@layernorm_modulate_backward_op.register_fake
def _(grad_y, x_hat, scale, rstd, x_dtype, shift_dtype, has_dvec):
    B, T, D = x_hat.shape
    vec_d = D if has_dvec else 0
    return (
        x_hat.new_empty((B, T, D), dtype=x_dtype),
        scale.new_empty((B, vec_d), dtype=shift_dtype),
        scale.new_empty((B, vec_d)),
    )


def _setup_context(ctx, inputs, output):
    x, shift, scale, _eps, _out_dtype, _save_x_hat = inputs
    _y, x_hat, rstd = output
    ctx.mark_non_differentiable(x_hat, rstd)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for x_hat and rstd: a pass over (B, T, D) each
    ctx.save_for_backward(x_hat, scale, rstd)
    _, ctx.needs_dshift, ctx.needs_dscale = ctx.needs_input_grad[:3]
    ctx.x_dtype = x.dtype
    ctx.shift_dtype = shift.dtype


def _backward(ctx, grad_y, _grad_x_hat, _grad_rstd):
    if grad_y is None:  # y was not used
        return None, None, None, None, None, None
    x_hat, scale, rstd = ctx.saved_tensors
    _launch.check_saved_for_backward(OP, x_hat, grad_y)
    has_dvec = ctx.needs_dshift or ctx.needs_dscale  # both come from one pass; a frozen model wants neither
    dx, dshift, dscale = layernorm_modulate_backward_op(
        grad_y, x_hat, scale, rstd, ctx.x_dtype, ctx.shift_dtype, has_dvec
    )
    return dx, (dshift if ctx.needs_dshift else None), (dscale if ctx.needs_dscale else None), None, None, None


layernorm_modulate_op.register_autograd(_backward, setup_context=_setup_context)
layernorm_modulate_backward_op.register_autograd(
    _launch.refuse_double_backward("sit_fast::layernorm_modulate_backward"))


def layernorm_modulate(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """y = LN(x) * (1 + scale[:, None, :]) + shift[:, None, :] in one pass; y has out_dtype (None: x's dtype).

    x: (B, T, D) float32/bfloat16/float16; shift, scale: (B, D) in x's dtype, out_dtype or float32.
    Gradients come back in each input's own dtype.
    """
    _launch.refuse_forward_ad("layernorm_modulate", x=x, shift=shift, scale=scale)
    _launch.check_eps("layernorm_modulate", eps)
    save_x_hat = _launch.needs_backward(x, shift, scale)
    y, _x_hat, _rstd = layernorm_modulate_op(x, shift, scale, eps, out_dtype, save_x_hat)
    return y
