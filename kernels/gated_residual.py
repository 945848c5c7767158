"""Fused gated residual: out = x + gate[:, None, :] * y.

x, y: (B, T, D); gate: (B, D), broadcast over the T tokens of each sample. out has x's dtype; y may
be narrower than an fp32 x (the bf16-autocast layout), as in gated_residual_layernorm_modulate.

Layers: Triton kernels, host launchers, then the `sit_fast::gated_residual` custom op (with a fake
and an autograd formula whose backward is the `sit_fast::gated_residual_backward` op).
Saved for backward: gate, and y when gate needs a gradient (x is not needed: d out / d x is the
identity). With a frozen gate (a model that needs no parameter gradients, as in the likelihood's
divergence) y is not kept, and backward reads only the incoming gradient.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from . import _launch
from ._rows import token_span

OP = "gated_residual"


@triton.jit
def _gated_residual_fwd_kernel(
    out_ptr,  # (B, T, D) out, x's dtype
    x_ptr,  # (B, T, D)
    gate_ptr,  # (B, D)
    y_ptr,  # (B, T, D)
    stride_out_b, stride_out_t, stride_out_d,
    stride_x_b, stride_x_t, stride_x_d,
    stride_gate_b, stride_gate_d,
    stride_y_b, stride_y_t, stride_y_d,
    T, D, rows_per_program, n_tiles,
    PREFETCH: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROWS: tl.constexpr = 1,
    ONE_ROW_LOOP: tl.constexpr = True,
):
    # One program per (sample b, tile of rows_per_program tokens); ROWS whole rows of D per iteration.
    # PREFETCH: issue the loads of the next rows before these are stored (twice the loads in flight).
    b, _tile, t_start, t_end, cols, mask = token_span(T, D, rows_per_program, n_tiles, BLOCK_D)

    gate = tl.load(gate_ptr + b * stride_gate_b + cols * stride_gate_d, mask=mask, other=0.0).to(tl.float32)
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
            out = x + gate * y
            tl.store(out_ptr + b * stride_out_b + t * stride_out_t + cols * stride_out_d,
                     out.to(out_ptr.dtype.element_ty), mask=mask)
    else:  # a (ROWS, BLOCK_D) tile per iteration
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
            tile_mask = (t < t_end)[:, None] & mask[None, :]
            if PREFETCH:
                x, y = x_next.to(tl.float32), y_next.to(tl.float32)
                t_next = t + ROWS
                next_mask = (t_next < t_end)[:, None] & mask[None, :]
                x_next = tl.load(x_tile + t_next[:, None] * stride_x_t, mask=next_mask, other=0.0)
                y_next = tl.load(y_tile + t_next[:, None] * stride_y_t, mask=next_mask, other=0.0)
            else:
                x = tl.load(x_tile + t[:, None] * stride_x_t, mask=tile_mask, other=0.0).to(tl.float32)
                y = tl.load(y_tile + t[:, None] * stride_y_t, mask=tile_mask, other=0.0).to(tl.float32)
            out = x + gate[None, :] * y
            tl.store(out_ptr + b * stride_out_b + t[:, None] * stride_out_t + col * stride_out_d,
                     out.to(out_ptr.dtype.element_ty), mask=tile_mask)


# Gated residual VJP, per row, with out = x + gate * y:
#   dx    = dout                          (returned as is by the autograd formula, no kernel)
#   dy    = dout * gate
#   dgate = sum over tokens of dout * y   (only when HAS_DGATE; otherwise y is neither saved nor read)
# Each program sums dgate over its own token tile in fp32 and writes one partial row; the launcher
# reduces the (B, n_tiles, D) partials over tiles afterwards (deterministic, no atomics).
@triton.jit
def _gated_residual_bwd_kernel(
    dy_ptr,  # (B, T, D) out, y's dtype
    dgate_partial_ptr,  # (B, n_tiles, D) out, fp32 (unused when HAS_DGATE is False)
    dout_ptr,  # (B, T, D) incoming gradient
    gate_ptr,  # (B, D)
    y_ptr,  # (B, T, D) saved input (unused when HAS_DGATE is False)
    stride_dy_b, stride_dy_t, stride_dy_d,
    stride_part_b, stride_part_tile, stride_part_d,
    stride_dout_b, stride_dout_t, stride_dout_d,
    stride_gate_b, stride_gate_d,
    stride_y_b, stride_y_t, stride_y_d,
    T, D, rows_per_program, n_tiles,
    HAS_DGATE: tl.constexpr,
    PREFETCH: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROWS: tl.constexpr = 1,
    ONE_ROW_LOOP: tl.constexpr = True,
):
    b, tile, t_start, t_end, cols, mask = token_span(T, D, rows_per_program, n_tiles, BLOCK_D)

    gate = tl.load(gate_ptr + b * stride_gate_b + cols * stride_gate_d, mask=mask, other=0.0).to(tl.float32)
    dgate_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    if (ROWS == 1) & ONE_ROW_LOOP:
        dout_row = dout_ptr + b * stride_dout_b + cols * stride_dout_d
        y_row = y_ptr + b * stride_y_b + cols * stride_y_d
        if PREFETCH:  # row t + 1's loads go out before row t is stored
            dout_next = tl.load(dout_row + t_start * stride_dout_t, mask=mask, other=0.0)
            if HAS_DGATE:
                y_next = tl.load(y_row + t_start * stride_y_t, mask=mask, other=0.0)
        for t in range(t_start, t_end):
            if PREFETCH:
                dout = dout_next.to(tl.float32)
                more = t + 1 < t_end
                next_mask = cols < tl.where(more, D, 0)  # row t + 1's columns, if in the tile
                dout_next = tl.load(dout_row + (t + 1) * stride_dout_t, mask=next_mask, other=0.0)
                if HAS_DGATE:
                    y = y_next.to(tl.float32)
                    y_next = tl.load(y_row + (t + 1) * stride_y_t, mask=next_mask, other=0.0)
            else:
                dout = tl.load(dout_row + t * stride_dout_t, mask=mask, other=0.0).to(tl.float32)
                if HAS_DGATE:
                    y = tl.load(y_row + t * stride_y_t, mask=mask, other=0.0).to(tl.float32)
            if HAS_DGATE:
                dgate_acc += dout * y
            dy = dout * gate
            tl.store(dy_ptr + b * stride_dy_b + t * stride_dy_t + cols * stride_dy_d,
                     dy.to(dy_ptr.dtype.element_ty), mask=mask)
    else:  # a (ROWS, BLOCK_D) tile per iteration
        steps = tl.arange(0, ROWS).to(tl.int64)
        col = cols[None, :]
        dout_tile = dout_ptr + b * stride_dout_b + col * stride_dout_d
        y_tile = y_ptr + b * stride_y_b + col * stride_y_d
        if PREFETCH:
            t = t_start + steps
            first = (t < t_end)[:, None] & mask[None, :]
            dout_next = tl.load(dout_tile + t[:, None] * stride_dout_t, mask=first, other=0.0)
            if HAS_DGATE:
                y_next = tl.load(y_tile + t[:, None] * stride_y_t, mask=first, other=0.0)
        for t0 in range(t_start, t_end, ROWS):
            t = t0 + steps
            tile_mask = (t < t_end)[:, None] & mask[None, :]
            if PREFETCH:
                dout = dout_next.to(tl.float32)
                t_next = t + ROWS
                next_mask = (t_next < t_end)[:, None] & mask[None, :]
                dout_next = tl.load(dout_tile + t_next[:, None] * stride_dout_t, mask=next_mask, other=0.0)
                if HAS_DGATE:
                    y = y_next.to(tl.float32)
                    y_next = tl.load(y_tile + t_next[:, None] * stride_y_t, mask=next_mask, other=0.0)
            else:
                dout = tl.load(dout_tile + t[:, None] * stride_dout_t, mask=tile_mask, other=0.0).to(tl.float32)
                if HAS_DGATE:
                    y = tl.load(y_tile + t[:, None] * stride_y_t, mask=tile_mask, other=0.0).to(tl.float32)
            if HAS_DGATE:  # padding rows loaded as zeros add nothing
                dgate_acc += tl.sum(dout * y, axis=0)
            dy = dout * gate[None, :]
            tl.store(dy_ptr + b * stride_dy_b + t[:, None] * stride_dy_t + col * stride_dy_d,
                     dy.to(dy_ptr.dtype.element_ty), mask=tile_mask)

    if HAS_DGATE:
        part = b * stride_part_b + tile * stride_part_tile + cols * stride_part_d
        tl.store(dgate_partial_ptr + part, dgate_acc, mask=mask)


def check_inputs(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> None:
    _launch.check_activation(OP, "x", x)
    _launch.check_activation(OP, "y", y, x.shape)
    if y.dtype != x.dtype and x.dtype != torch.float32:
        # Only an fp32 residual stream may take a narrower y (the autocast layout).
        raise ValueError(f"{OP}: y must have x's dtype {x.dtype}, got {y.dtype} "
                         f"(x {tuple(x.shape)}, y {tuple(y.shape)})")
    _launch.check_modulation(OP, "gate", gate, x, {"y": y.dtype})
    _launch.check_same_device(OP, x=x, gate=gate, y=y)


def gated_residual_forward(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Launch the forward kernel: returns x + gate * y in x's dtype."""
    check_inputs(x, gate, y)
    _launch.check_runnable(OP, x.device, _gated_residual_fwd_kernel)
    B, T, D = x.shape
    out = _launch.empty((B, T, D), x.dtype, x.device)
    rows_per_program, n_tiles = _launch.token_tiling(B, T, x.device, "fwd")
    if B * n_tiles == 0:
        return out
    block_d, num_warps = _launch.block_config(D)
    with _launch.on_device(x.device):
        _gated_residual_fwd_kernel[(B * n_tiles,)](
            out, x, gate, y,
            *out.stride(), *x.stride(), *gate.stride(), *y.stride(),
            T, D, rows_per_program, n_tiles,
            PREFETCH=_launch.prefetch("fwd"), BLOCK_D=block_d, **_launch.row_loop("fwd"),
            num_warps=num_warps, enable_fp_fusion=_launch.FP_FUSION,
        )
    return out


def gated_residual_backward(
    grad_out: torch.Tensor, gate: torch.Tensor, y: Optional[torch.Tensor], y_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward kernel: returns dgate (gate's dtype) and dy (y_dtype).

    y=None (gate needs no gradient, so y was not saved) skips dgate and returns it empty, (B, 0)."""
    _launch.check_runnable(OP, grad_out.device, _gated_residual_bwd_kernel)
    B, T, D = grad_out.shape
    has_dgate = y is not None
    dy = _launch.empty((B, T, D), y_dtype, grad_out.device)
    rows_per_program, n_tiles = _launch.token_tiling(B, T, grad_out.device, "bwd")
    dgate_partial = _launch.empty((B, n_tiles if has_dgate else 0, D), torch.float32, grad_out.device)
    if B * n_tiles > 0:
        y_arg = y if has_dgate else grad_out  # a placeholder the kernel never reads
        block_d, num_warps = _launch.block_config(D, "bwd")
        with _launch.on_device(grad_out.device):
            _gated_residual_bwd_kernel[(B * n_tiles,)](
                dy, dgate_partial, grad_out, gate, y_arg,
                *dy.stride(), *dgate_partial.stride(), *grad_out.stride(), *gate.stride(), *y_arg.stride(),
                T, D, rows_per_program, n_tiles,
                HAS_DGATE=has_dgate, PREFETCH=_launch.prefetch("bwd"), BLOCK_D=block_d,
                **_launch.row_loop("bwd"), num_warps=num_warps, enable_fp_fusion=_launch.FP_FUSION,
            )
    if not has_dgate:
        return gate.new_empty((B, 0)), dy
    dgate = dgate_partial.sum(dim=1).to(gate.dtype)
    return dgate, dy


@torch.library.custom_op("sit_fast::gated_residual", mutates_args=())
def gated_residual_op(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return gated_residual_forward(x, gate, y)


@gated_residual_op.register_fake
def _(x, gate, y):
    check_inputs(x, gate, y)
    return x.new_empty(x.shape)


@torch.library.custom_op("sit_fast::gated_residual_backward", mutates_args=())
def gated_residual_backward_op(
    grad_out: torch.Tensor, gate: torch.Tensor, y: Optional[torch.Tensor], y_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    return gated_residual_backward(grad_out, gate, y, y_dtype)


@gated_residual_backward_op.register_fake
def _(grad_out, gate, y, y_dtype):
    B, _, D = grad_out.shape
    return gate.new_empty((B, D if y is not None else 0)), grad_out.new_empty(grad_out.shape, dtype=y_dtype)


def _setup_context(ctx, inputs, output):
    _x, gate, y = inputs
    _, ctx.needs_dgate, ctx.needs_dy = ctx.needs_input_grad[:3]
    ctx.y_dtype = y.dtype
    # y only serves dgate: a frozen gate keeps (B, T, D) fewer elements alive.
    ctx.save_for_backward(gate, y if ctx.needs_dgate else None)


def _backward(ctx, grad_out):
    if not (ctx.needs_dgate or ctx.needs_dy):
        return grad_out, None, None
    gate, y = ctx.saved_tensors
    dgate, dy = gated_residual_backward_op(grad_out, gate, y, ctx.y_dtype)
    return grad_out, (dgate if ctx.needs_dgate else None), (dy if ctx.needs_dy else None)


gated_residual_op.register_autograd(_backward, setup_context=_setup_context)
gated_residual_backward_op.register_autograd(_launch.refuse_double_backward("sit_fast::gated_residual_backward"))


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + gate[:, None, :] * y in one pass; the result has x's dtype.

    x, y: (B, T, D) float32/bfloat16/float16, y in x's dtype, or any of those when x is float32 (the
    bf16-autocast layout: fp32 residual stream, bf16 sublayer output); gate: (B, D) in x's or y's
    dtype or float32. Gradients come back in each input's own dtype.
    """
    _launch.refuse_forward_ad("gated_residual", x=x, gate=gate, y=y)
    return gated_residual_op(x, gate, y)
