"""Fused gated residual + LayerNorm (no affine) + adaLN modulation, in one pass over the row:

    x_out = x + gate * y
    h     = LN(x_out) * (1 + scale) + shift

x, y: (B, T, D); gate, shift, scale: (B, D), broadcast over the T tokens of each sample. This is the
seam between two SiT sublayers: the attention branch's residual update feeding the MLP's norm.
x_out has x's dtype; h has h_dtype (default x's dtype). y may be narrower than x (the bf16-autocast
layout: fp32 residual stream x, bf16 y from an autocast Linear, bf16 h for the next Linear).

Layers: Triton kernels, host launchers, then the `sit_fast::gated_residual_layernorm_modulate`
custom op (with a fake and an autograd formula whose backward is the
`sit_fast::gated_residual_layernorm_modulate_backward` op).

Saved for backward: x_hat = (x_out - mean) * rstd (computed in fp32 by the forward kernel, stored in
h's dtype), y, gate, scale and the per-row fp32 rstd. Neither x nor x_out nor mean is needed: the
LayerNorm VJP only uses x_hat and rstd, and y is needed for dgate. With an fp32 residual stream and
bf16 h this is 2*D (x_hat) + 2*D (y) + 4 bytes per token instead of 4*D (x_out) + 2*D + 8. When h is
narrower than fp32 the gradients see x_hat rounded to h's dtype (slightly less exact); with h in
fp32 the saved x_hat is the forward's exact fp32 value. With a frozen gate (a model that needs no
parameter gradients, as in the likelihood's divergence) y is not kept and backward does not read it.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from . import _launch
from ._rows import (normalize_modulate, normalize_modulate_rows, normalize_modulate_vjp, normalize_modulate_vjp_rows,
                    token_span)

OP = "gated_residual_layernorm_modulate"


@triton.jit
def _gated_residual_layernorm_modulate_fwd_kernel(
    x_out_ptr,  # (B, T, D) out, x's dtype
    h_ptr,  # (B, T, D) out, h's dtype
    x_hat_ptr,  # (B, T, D) out, h's dtype (saved for backward)
    rstd_ptr,  # (B, T) out, fp32
    x_ptr,  # (B, T, D)
    gate_ptr,  # (B, D)
    y_ptr,  # (B, T, D)
    shift_ptr,  # (B, D)
    scale_ptr,  # (B, D)
    stride_x_out_b, stride_x_out_t, stride_x_out_d,
    stride_h_b, stride_h_t, stride_h_d,
    stride_x_hat_b, stride_x_hat_t, stride_x_hat_d,
    stride_stat_b, stride_stat_t,
    stride_x_b, stride_x_t, stride_x_d,
    stride_gate_b, stride_gate_d,
    stride_y_b, stride_y_t, stride_y_d,
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

    gate = tl.load(gate_ptr + b * stride_gate_b + cols * stride_gate_d, mask=mask, other=0.0).to(tl.float32)
    shift = tl.load(shift_ptr + b * stride_shift_b + cols * stride_shift_d, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + b * stride_scale_b + cols * stride_scale_d, mask=mask, other=0.0).to(tl.float32)
    one_plus_scale = 1.0 + scale

    if (ROWS == 1) & ONE_ROW_LOOP:
        x_row = x_ptr + b * stride_x_b + cols * stride_x_d
        y_row = y_ptr + b * stride_y_b + cols * stride_y_d
        if PREFETCH:
            x_next = tl.load(x_row + t_start * stride_x_t, mask=mask, other=0.0)
            y_next = tl.load(y_row + t_start * stride_y_t, mask=mask, other=0.0)
        for t in range(t_start, t_end):
            if PREFETCH:
                x, y = x_next.to(tl.float32), y_next.to(tl.float32)
                more = t + 1 < t_end
                next_mask = cols < tl.where(more, D, 0)  # row t + 1's columns, if in the tile
                x_next = tl.load(x_row + (t + 1) * stride_x_t, mask=next_mask, other=0.0)
                y_next = tl.load(y_row + (t + 1) * stride_y_t, mask=next_mask, other=0.0)
            else:
                x = tl.load(x_row + t * stride_x_t, mask=mask, other=0.0).to(tl.float32)
                y = tl.load(y_row + t * stride_y_t, mask=mask, other=0.0).to(tl.float32)
            # x_out is normalised as stored (rounded to x's dtype), so backward's x_hat matches these stats.
            x_out = (x + gate * y).to(x_out_ptr.dtype.element_ty)
            tl.store(x_out_ptr + b * stride_x_out_b + t * stride_x_out_t + cols * stride_x_out_d, x_out, mask=mask)
            x_res = x_out.to(tl.float32)
            x_hat, h, rstd = normalize_modulate(x_res, mask, D, eps, one_plus_scale, shift)
            tl.store(h_ptr + b * stride_h_b + t * stride_h_t + cols * stride_h_d, h.to(h_ptr.dtype.element_ty),
                     mask=mask)
            if STORE_X_HAT:  # only when a backward will follow
                tl.store(x_hat_ptr + b * stride_x_hat_b + t * stride_x_hat_t + cols * stride_x_hat_d,
                         x_hat.to(x_hat_ptr.dtype.element_ty), mask=mask)
            tl.store(rstd_ptr + b * stride_stat_b + t * stride_stat_t, rstd)
    else:  # a (ROWS, BLOCK_D) tile per iteration: the rows' reductions side by side
        steps = tl.arange(0, ROWS).to(tl.int64)
        col = cols[None, :]
        x_tile = x_ptr + b * stride_x_b + col * stride_x_d
        y_tile = y_ptr + b * stride_y_b + col * stride_y_d
        if PREFETCH:
            t = t_start + steps
            first = (t < t_end)[:, None] & mask[None, :]
            x_next = tl.load(x_tile + t[:, None] * stride_x_t, mask=first, other=0.0)
            y_next = tl.load(y_tile + t[:, None] * stride_y_t, mask=first, other=0.0)
        for t0 in range(t_start, t_end, ROWS):
            t = t0 + steps
            rows = t < t_end
            tile_mask = rows[:, None] & mask[None, :]
            if PREFETCH:
                x, y = x_next.to(tl.float32), y_next.to(tl.float32)
                t_next = t + ROWS
                next_mask = (t_next < t_end)[:, None] & mask[None, :]
                x_next = tl.load(x_tile + t_next[:, None] * stride_x_t, mask=next_mask, other=0.0)
                y_next = tl.load(y_tile + t_next[:, None] * stride_y_t, mask=next_mask, other=0.0)
            else:
                x = tl.load(x_tile + t[:, None] * stride_x_t, mask=tile_mask, other=0.0).to(tl.float32)
                y = tl.load(y_tile + t[:, None] * stride_y_t, mask=tile_mask, other=0.0).to(tl.float32)
            x_out = (x + gate[None, :] * y).to(x_out_ptr.dtype.element_ty)
            tl.store(x_out_ptr + b * stride_x_out_b + t[:, None] * stride_x_out_t + col * stride_x_out_d, x_out,
                     mask=tile_mask)
            x_res = x_out.to(tl.float32)
            x_hat, h, rstd = normalize_modulate_rows(x_res, tile_mask, D, eps, one_plus_scale[None, :],
                                                     shift[None, :])
            tl.store(h_ptr + b * stride_h_b + t[:, None] * stride_h_t + col * stride_h_d,
                     h.to(h_ptr.dtype.element_ty), mask=tile_mask)
            if STORE_X_HAT:
                tl.store(x_hat_ptr + b * stride_x_hat_b + t[:, None] * stride_x_hat_t + col * stride_x_hat_d,
                         x_hat.to(x_hat_ptr.dtype.element_ty), mask=tile_mask)
            tl.store(rstd_ptr + b * stride_stat_b + t * stride_stat_t, rstd, mask=rows)


# VJP, per row, with x_hat = (x_out - mean) * rstd, h = x_hat * (1 + scale) + shift, x_out = x + gate * y.
# x_hat (saved by the forward in h's dtype) and the fp32 rstd are all the LayerNorm part needs:
#   g        = dh * (1 + scale)                                        (gradient reaching x_hat)
#   d_res    = d_ext + rstd * (g - mean(g) - x_hat * mean(g * x_hat))   (gradient of x_out; d_ext: from
#                                                                       later layers; means over D)
#   dx       = d_res
#   dy       = d_res * gate
#   dshift   = sum over tokens of dh                                   (these two only when HAS_DVEC; a
#   dscale   = sum over tokens of dh * x_hat                           frozen model's vectors need neither)
#   dgate    = sum over tokens of d_res * y                            (only when HAS_DGATE; otherwise y
#                                                                       is neither saved nor read)
# Each program sums dshift/dscale/dgate over its own token tile in fp32 and writes one partial row;
# the launcher reduces the (B, n_tiles, D) partials over tiles afterwards (deterministic, no atomics).
@triton.jit
def _gated_residual_layernorm_modulate_bwd_kernel(
    dx_ptr,  # (B, T, D) out, x's dtype
    dy_ptr,  # (B, T, D) out, y's dtype
    dgate_partial_ptr,  # (B, n_tiles, D) out, fp32 (unused when HAS_DGATE is False)
    dshift_partial_ptr,  # (B, n_tiles, D) out, fp32 (unused when HAS_DVEC is False)
    dscale_partial_ptr,  # (B, n_tiles, D) out, fp32 (unused when HAS_DVEC is False)
    dx_out_ptr,  # (B, T, D) incoming gradient of x_out (unused when HAS_DX_OUT is False)
    dh_ptr,  # (B, T, D) incoming gradient of h
    x_hat_ptr,  # (B, T, D) saved normalised x_out, h's dtype
    y_ptr,  # (B, T, D) saved input (unused when HAS_DGATE is False)
    gate_ptr,  # (B, D)
    scale_ptr,  # (B, D)
    rstd_ptr,  # (B, T) fp32
    stride_dx_b, stride_dx_t, stride_dx_d,
    stride_dy_b, stride_dy_t, stride_dy_d,
    stride_part_b, stride_part_tile, stride_part_d,
    stride_dx_out_b, stride_dx_out_t, stride_dx_out_d,
    stride_dh_b, stride_dh_t, stride_dh_d,
    stride_x_hat_b, stride_x_hat_t, stride_x_hat_d,
    stride_y_b, stride_y_t, stride_y_d,
    stride_gate_b, stride_gate_d,
    stride_scale_b, stride_scale_d,
    stride_stat_b, stride_stat_t,
    T, D, rows_per_program, n_tiles,
    HAS_DX_OUT: tl.constexpr,
    HAS_DGATE: tl.constexpr,
    HAS_DVEC: tl.constexpr,
    PREFETCH: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROWS: tl.constexpr = 1,
    ONE_ROW_LOOP: tl.constexpr = True,
):
    b, tile, t_start, t_end, cols, mask = token_span(T, D, rows_per_program, n_tiles, BLOCK_D)

    gate = tl.load(gate_ptr + b * stride_gate_b + cols * stride_gate_d, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + b * stride_scale_b + cols * stride_scale_d, mask=mask, other=0.0).to(tl.float32)
    one_plus_scale = 1.0 + scale
    dgate_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    dshift_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    dscale_acc = tl.zeros([BLOCK_D], dtype=tl.float32)

    rstd_row = rstd_ptr + b * stride_stat_b
    if (ROWS == 1) & ONE_ROW_LOOP:
        dh_row = dh_ptr + b * stride_dh_b + cols * stride_dh_d
        x_hat_row = x_hat_ptr + b * stride_x_hat_b + cols * stride_x_hat_d
        y_row = y_ptr + b * stride_y_b + cols * stride_y_d
        dx_out_row = dx_out_ptr + b * stride_dx_out_b + cols * stride_dx_out_d
        if PREFETCH:  # row t + 1's loads go out before row t's reductions
            dh_next = tl.load(dh_row + t_start * stride_dh_t, mask=mask, other=0.0)
            x_hat_next = tl.load(x_hat_row + t_start * stride_x_hat_t, mask=mask, other=0.0)
            if HAS_DGATE:
                y_next = tl.load(y_row + t_start * stride_y_t, mask=mask, other=0.0)
            rstd_next = tl.load(rstd_row + t_start * stride_stat_t)
            if HAS_DX_OUT:
                dx_out_next = tl.load(dx_out_row + t_start * stride_dx_out_t, mask=mask, other=0.0)
        for t in range(t_start, t_end):
            if PREFETCH:
                dh, x_hat, rstd = dh_next.to(tl.float32), x_hat_next.to(tl.float32), rstd_next
                more = t + 1 < t_end
                next_mask = cols < tl.where(more, D, 0)  # row t + 1's columns, if in the tile
                dh_next = tl.load(dh_row + (t + 1) * stride_dh_t, mask=next_mask, other=0.0)
                x_hat_next = tl.load(x_hat_row + (t + 1) * stride_x_hat_t, mask=next_mask, other=0.0)
                if HAS_DGATE:
                    y = y_next.to(tl.float32)
                    y_next = tl.load(y_row + (t + 1) * stride_y_t, mask=next_mask, other=0.0)
                rstd_next = tl.load(rstd_row + (t + 1) * stride_stat_t, mask=more, other=0.0)
                if HAS_DX_OUT:
                    dx_out = dx_out_next.to(tl.float32)
                    dx_out_next = tl.load(dx_out_row + (t + 1) * stride_dx_out_t, mask=next_mask, other=0.0)
            else:
                dh = tl.load(dh_row + t * stride_dh_t, mask=mask, other=0.0).to(tl.float32)
                x_hat = tl.load(x_hat_row + t * stride_x_hat_t, mask=mask, other=0.0).to(tl.float32)
                if HAS_DGATE:
                    y = tl.load(y_row + t * stride_y_t, mask=mask, other=0.0).to(tl.float32)
                rstd = tl.load(rstd_row + t * stride_stat_t)
            if HAS_DVEC:
                dshift_acc += dh
                dscale_acc += dh * x_hat
            d_res = normalize_modulate_vjp(dh, x_hat, rstd, one_plus_scale, D)
            if HAS_DX_OUT:
                if not PREFETCH:
                    dx_out = tl.load(dx_out_row + t * stride_dx_out_t, mask=mask, other=0.0).to(tl.float32)
                d_res += dx_out
            if HAS_DGATE:
                dgate_acc += d_res * y
            tl.store(dx_ptr + b * stride_dx_b + t * stride_dx_t + cols * stride_dx_d,
                     d_res.to(dx_ptr.dtype.element_ty), mask=mask)
            tl.store(dy_ptr + b * stride_dy_b + t * stride_dy_t + cols * stride_dy_d,
                     (d_res * gate).to(dy_ptr.dtype.element_ty), mask=mask)
    else:  # a (ROWS, BLOCK_D) tile per iteration: the rows' reductions side by side
        steps = tl.arange(0, ROWS).to(tl.int64)
        col = cols[None, :]
        dh_tile = dh_ptr + b * stride_dh_b + col * stride_dh_d
        x_hat_tile = x_hat_ptr + b * stride_x_hat_b + col * stride_x_hat_d
        y_tile = y_ptr + b * stride_y_b + col * stride_y_d
        dx_out_tile = dx_out_ptr + b * stride_dx_out_b + col * stride_dx_out_d
        if PREFETCH:
            t = t_start + steps
            rows = t < t_end
            first = rows[:, None] & mask[None, :]
            dh_next = tl.load(dh_tile + t[:, None] * stride_dh_t, mask=first, other=0.0)
            x_hat_next = tl.load(x_hat_tile + t[:, None] * stride_x_hat_t, mask=first, other=0.0)
            if HAS_DGATE:
                y_next = tl.load(y_tile + t[:, None] * stride_y_t, mask=first, other=0.0)
            rstd_next = tl.load(rstd_row + t * stride_stat_t, mask=rows, other=0.0)
            if HAS_DX_OUT:
                dx_out_next = tl.load(dx_out_tile + t[:, None] * stride_dx_out_t, mask=first, other=0.0)
        for t0 in range(t_start, t_end, ROWS):
            t = t0 + steps
            rows = t < t_end
            tile_mask = rows[:, None] & mask[None, :]
            if PREFETCH:
                dh, x_hat, rstd = dh_next.to(tl.float32), x_hat_next.to(tl.float32), rstd_next
                t_next = t + ROWS
                rows_next = t_next < t_end
                next_mask = rows_next[:, None] & mask[None, :]
                dh_next = tl.load(dh_tile + t_next[:, None] * stride_dh_t, mask=next_mask, other=0.0)
                x_hat_next = tl.load(x_hat_tile + t_next[:, None] * stride_x_hat_t, mask=next_mask, other=0.0)
                if HAS_DGATE:
                    y = y_next.to(tl.float32)
                    y_next = tl.load(y_tile + t_next[:, None] * stride_y_t, mask=next_mask, other=0.0)
                rstd_next = tl.load(rstd_row + t_next * stride_stat_t, mask=rows_next, other=0.0)
                if HAS_DX_OUT:
                    dx_out = dx_out_next.to(tl.float32)
                    dx_out_next = tl.load(dx_out_tile + t_next[:, None] * stride_dx_out_t, mask=next_mask,
                                          other=0.0)
            else:
                dh = tl.load(dh_tile + t[:, None] * stride_dh_t, mask=tile_mask, other=0.0).to(tl.float32)
                x_hat = tl.load(x_hat_tile + t[:, None] * stride_x_hat_t, mask=tile_mask, other=0.0).to(tl.float32)
                if HAS_DGATE:
                    y = tl.load(y_tile + t[:, None] * stride_y_t, mask=tile_mask, other=0.0).to(tl.float32)
                rstd = tl.load(rstd_row + t * stride_stat_t, mask=rows, other=0.0)
            if HAS_DVEC:  # padding rows loaded as zeros add nothing
                dshift_acc += tl.sum(dh, axis=0)
                dscale_acc += tl.sum(dh * x_hat, axis=0)
            d_res = normalize_modulate_vjp_rows(dh, x_hat, rstd, one_plus_scale[None, :], D)
            if HAS_DX_OUT:
                if not PREFETCH:
                    dx_out = tl.load(dx_out_tile + t[:, None] * stride_dx_out_t, mask=tile_mask,
                                     other=0.0).to(tl.float32)
                d_res += dx_out
            if HAS_DGATE:
                dgate_acc += tl.sum(d_res * y, axis=0)
            tl.store(dx_ptr + b * stride_dx_b + t[:, None] * stride_dx_t + col * stride_dx_d,
                     d_res.to(dx_ptr.dtype.element_ty), mask=tile_mask)
            tl.store(dy_ptr + b * stride_dy_b + t[:, None] * stride_dy_t + col * stride_dy_d,
                     (d_res * gate[None, :]).to(dy_ptr.dtype.element_ty), mask=tile_mask)

    part = b * stride_part_b + tile * stride_part_tile + cols * stride_part_d
    if HAS_DGATE:
        tl.store(dgate_partial_ptr + part, dgate_acc, mask=mask)
    if HAS_DVEC:
        tl.store(dshift_partial_ptr + part, dshift_acc, mask=mask)
        tl.store(dscale_partial_ptr + part, dscale_acc, mask=mask)


def check_inputs(
    x: torch.Tensor,
    gate: torch.Tensor,
    y: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    h_dtype: Optional[torch.dtype] = None,
) -> torch.dtype:
    """Validate the inputs; returns h's dtype (h_dtype, or x's dtype when None)."""
    _launch.check_activation(OP, "x", x)
    _launch.check_activation(OP, "y", y, x.shape)
    if y.dtype != x.dtype and x.dtype != torch.float32:
        # Only an fp32 residual stream may take a narrower y (the autocast layout).
        raise ValueError(f"{OP}: y must have x's dtype {x.dtype}, got {y.dtype} "
                         f"(x {tuple(x.shape)}, y {tuple(y.shape)})")
    h_dtype = _launch.check_out_dtype(OP, "h_dtype", h_dtype, x)
    extra = {"y": y.dtype, "h": h_dtype}
    _launch.check_modulation(OP, "gate", gate, x, extra)
    _launch.check_modulation(OP, "shift", shift, x, extra)
    _launch.check_modulation(OP, "scale", scale, x, extra)
    _launch.check_same_device(OP, x=x, gate=gate, y=y, shift=shift, scale=scale)
    return h_dtype


def gated_residual_layernorm_modulate_forward(
    x: torch.Tensor,
    gate: torch.Tensor,
    y: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
    h_dtype: Optional[torch.dtype] = None,
    save_x_hat: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel: returns x_out (x's dtype), h and x_hat (h's dtype), fp32 rstd (B, T).

    save_x_hat=False (no backward to follow, e.g. sampling) skips writing x_hat and returns it empty,
    of shape (B, T, 0).
    """
    h_dtype = check_inputs(x, gate, y, shift, scale, h_dtype)
    _launch.check_runnable(OP, x.device, _gated_residual_layernorm_modulate_fwd_kernel)
    B, T, D = x.shape
    x_out = _launch.empty((B, T, D), x.dtype, x.device)
    h = _launch.empty((B, T, D), h_dtype, x.device)
    x_hat = _launch.empty((B, T, D if save_x_hat else 0), h_dtype, x.device)
    rstd = _launch.empty((B, T), torch.float32, x.device)
    rows_per_program, n_tiles = _launch.token_tiling(B, T, x.device, "fwd")
    if B * n_tiles == 0:
        return x_out, h, x_hat, rstd
    block_d, num_warps = _launch.block_config(D)
    with _launch.on_device(x.device):
        _gated_residual_layernorm_modulate_fwd_kernel[(B * n_tiles,)](
            x_out, h, x_hat, rstd, x, gate, y, shift, scale,
            *x_out.stride(), *h.stride(), *x_hat.stride(), *rstd.stride(), *x.stride(), *gate.stride(), *y.stride(),
            *shift.stride(), *scale.stride(),
            T, D, rows_per_program, n_tiles, eps,
            STORE_X_HAT=save_x_hat, PREFETCH=_launch.prefetch("fwd"), BLOCK_D=block_d,
            **_launch.row_loop("fwd"), num_warps=num_warps, enable_fp_fusion=_launch.FP_FUSION,
        )
    return x_out, h, x_hat, rstd


def gated_residual_layernorm_modulate_backward(
    grad_x_out: Optional[torch.Tensor],
    grad_h: torch.Tensor,
    x_hat: torch.Tensor,
    y: Optional[torch.Tensor],
    gate: torch.Tensor,
    scale: torch.Tensor,
    rstd: torch.Tensor,
    x_dtype: torch.dtype,
    y_dtype: torch.dtype,
    shift_dtype: torch.dtype,
    has_dvec: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernel: returns dx (x_dtype), dgate, dy (y_dtype), dshift (shift_dtype),
    dscale, each in its input's dtype.

    y=None (gate needs no gradient, so y was not saved) skips dgate and returns it empty, (B, 0);
    has_dvec=False (neither shift nor scale needs one) does the same for dshift and dscale."""
    _launch.check_runnable(OP, x_hat.device, _gated_residual_layernorm_modulate_bwd_kernel)
    B, T, D = x_hat.shape
    has_dgate = y is not None
    dx = _launch.empty((B, T, D), x_dtype, x_hat.device)
    dy = _launch.empty((B, T, D), y_dtype, x_hat.device)
    rows_per_program, n_tiles = _launch.token_tiling(B, T, x_hat.device, "bwd")
    # A partial not asked for is empty; the others share one set of strides, a full partial's.
    dgate_partial = _launch.empty((B, n_tiles if has_dgate else 0, D), torch.float32, x_hat.device)
    dshift_partial, dscale_partial = (
        _launch.empty((B, n_tiles if has_dvec else 0, D), torch.float32, x_hat.device) for _ in range(2))
    part_strides = dshift_partial.stride() if has_dvec else dgate_partial.stride()
    if B * n_tiles > 0:
        has_dx_out = grad_x_out is not None
        dx_out_arg = grad_x_out if has_dx_out else grad_h  # placeholders the kernel never reads
        y_arg = y if has_dgate else grad_h
        block_d, num_warps = _launch.block_config(D, "bwd")
        with _launch.on_device(x_hat.device):
            _gated_residual_layernorm_modulate_bwd_kernel[(B * n_tiles,)](
                dx, dy, dgate_partial, dshift_partial, dscale_partial,
                dx_out_arg, grad_h, x_hat, y_arg, gate, scale, rstd,
                *dx.stride(), *dy.stride(), *part_strides, *dx_out_arg.stride(), *grad_h.stride(),
                *x_hat.stride(), *y_arg.stride(), *gate.stride(), *scale.stride(), *rstd.stride(),
                T, D, rows_per_program, n_tiles,
                HAS_DX_OUT=has_dx_out, HAS_DGATE=has_dgate, HAS_DVEC=has_dvec, PREFETCH=_launch.prefetch("bwd"),
                BLOCK_D=block_d, **_launch.row_loop("bwd"), num_warps=num_warps,
                enable_fp_fusion=_launch.FP_FUSION,
            )
    dgate = dgate_partial.sum(dim=1).to(gate.dtype) if has_dgate else gate.new_empty((B, 0))
    if not has_dvec:
        return dx, dgate, dy, scale.new_empty((B, 0), dtype=shift_dtype), scale.new_empty((B, 0))
    dshift = dshift_partial.sum(dim=1).to(shift_dtype)
    dscale = dscale_partial.sum(dim=1).to(scale.dtype)
    return dx, dgate, dy, dshift, dscale


@torch.library.custom_op("sit_fast::gated_residual_layernorm_modulate", mutates_args=())
def gated_residual_layernorm_modulate_op(
    x: torch.Tensor,
    gate: torch.Tensor,
    y: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
    h_dtype: Optional[torch.dtype],
    save_x_hat: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _launch.check_eps(OP, eps)  # again where a compiled caller traced it as a symbol
    return gated_residual_layernorm_modulate_forward(x, gate, y, shift, scale, eps, h_dtype, save_x_hat)


@gated_residual_layernorm_modulate_op.register_fake
def _(x, gate, y, shift, scale, eps, h_dtype, save_x_hat):
    h_dtype = check_inputs(x, gate, y, shift, scale, h_dtype)
    B, T, D = x.shape
    return (
        x.new_empty((B, T, D)),
        x.new_empty((B, T, D), dtype=h_dtype),
        x.new_empty((B, T, D if save_x_hat else 0), dtype=h_dtype),
        x.new_empty((B, T), dtype=torch.float32),
    )


@torch.library.custom_op("sit_fast::gated_residual_layernorm_modulate_backward", mutates_args=())
def gated_residual_layernorm_modulate_backward_op(
    grad_x_out: Optional[torch.Tensor],
    grad_h: torch.Tensor,
    x_hat: torch.Tensor,
    y: Optional[torch.Tensor],
    gate: torch.Tensor,
    scale: torch.Tensor,
    rstd: torch.Tensor,
    x_dtype: torch.dtype,
    y_dtype: torch.dtype,
    shift_dtype: torch.dtype,
    has_dvec: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return gated_residual_layernorm_modulate_backward(
        grad_x_out, grad_h, x_hat, y, gate, scale, rstd, x_dtype, y_dtype, shift_dtype, has_dvec
    )


@gated_residual_layernorm_modulate_backward_op.register_fake
def _(grad_x_out, grad_h, x_hat, y, gate, scale, rstd, x_dtype, y_dtype, shift_dtype, has_dvec):
    B, T, D = x_hat.shape
    vec_d = D if has_dvec else 0
    return (
        x_hat.new_empty((B, T, D), dtype=x_dtype),
        gate.new_empty((B, D if y is not None else 0)),
        x_hat.new_empty((B, T, D), dtype=y_dtype),
        scale.new_empty((B, vec_d), dtype=shift_dtype),
        scale.new_empty((B, vec_d)),
    )


def _setup_context(ctx, inputs, output):
    x, gate, y, shift, scale, _eps, _h_dtype, _save_x_hat = inputs
    _x_out, _h, x_hat, rstd = output
    ctx.mark_non_differentiable(x_hat, rstd)
    # Unused outputs get None, not zero-filled gradients: no pass over (B, T, D) for x_hat and rstd,
    # and none for x_out where only h is used (the last block's), which the kernel then never reads.
    ctx.set_materialize_grads(False)
    ctx.needs_dgate = ctx.needs_input_grad[1]
    ctx.needs_dshift, ctx.needs_dscale = ctx.needs_input_grad[3:5]
    # y only serves dgate: a frozen gate keeps (B, T, D) fewer elements alive.
    ctx.save_for_backward(x_hat, y if ctx.needs_dgate else None, gate, scale, rstd)
    ctx.x_dtype = x.dtype
    ctx.y_dtype = y.dtype
    ctx.shift_dtype = shift.dtype


def _backward(ctx, grad_x_out, grad_h, _grad_x_hat, _grad_rstd):
    if grad_h is None and grad_x_out is None:
        return None, None, None, None, None, None, None, None
    x_hat, y, gate, scale, rstd = ctx.saved_tensors
    if grad_h is None:  # only x_out was used: h's gradient is zero
        grad_h = torch.zeros(x_hat.shape[0], x_hat.shape[1], scale.shape[1], dtype=x_hat.dtype, device=x_hat.device)
    _launch.check_saved_for_backward(OP, x_hat, grad_h)
    has_dvec = ctx.needs_dshift or ctx.needs_dscale  # both come from one pass; a frozen model wants neither
    dx, dgate, dy, dshift, dscale = gated_residual_layernorm_modulate_backward_op(
        grad_x_out, grad_h, x_hat, y, gate, scale, rstd, ctx.x_dtype, ctx.y_dtype, ctx.shift_dtype, has_dvec
    )
    return (dx, (dgate if ctx.needs_dgate else None), dy, (dshift if ctx.needs_dshift else None),
            (dscale if ctx.needs_dscale else None), None, None, None)


gated_residual_layernorm_modulate_op.register_autograd(_backward, setup_context=_setup_context)
gated_residual_layernorm_modulate_backward_op.register_autograd(
    _launch.refuse_double_backward("sit_fast::gated_residual_layernorm_modulate_backward"))


def gated_residual_layernorm_modulate(
    x: torch.Tensor,
    gate: torch.Tensor,
    y: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
    h_dtype: Optional[torch.dtype] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_out, h): x_out = x + gate * y, h = LN(x_out) * (1 + scale) + shift, in one pass.

    x, y: (B, T, D) float32/bfloat16/float16, y in x's dtype, or any of those when x is float32 (the
    bf16-autocast layout: fp32 residual stream, bf16 sublayer output); gate, shift, scale: (B, D) in
    x's, y's or h's dtype or float32. x_out has x's dtype; h has h_dtype (None: x's dtype) and
    normalises x_out as stored. Gradients come back in each input's own dtype.
    """
    _launch.refuse_forward_ad("gated_residual_layernorm_modulate", x=x, gate=gate, y=y, shift=shift, scale=scale)
    _launch.check_eps("gated_residual_layernorm_modulate", eps)
    save_x_hat = _launch.needs_backward(x, gate, y, shift, scale)
    x_out, h, _x_hat, _rstd = gated_residual_layernorm_modulate_op(x, gate, y, shift, scale, eps, h_dtype, save_x_hat)
    return x_out, h
