"""The SiT MLP's bias + GELU (tanh form), forward and backward, for the fast path's MLP.

    bias_gelu(a, bias) -> g                      g = GELU(a + bias)
    bias_gelu_backward(a, bias, dg, store_g, sum_dbias) -> (da, g, dbias)
        da = dg * GELU'(a + bias); g recomputed (fc2's weight gradient reads it) when store_g;
        dbias = da summed over rows (fc1's bias gradient) when sum_dbias

a, dg: (..., H), last dimension contiguous; bias: (H,). g and da have a's dtype, dbias bias's; the
arithmetic is float32. Unused outputs are empty tensors. In eager PyTorch the backward takes three
passes over the (tokens, 4D) hidden activations (the GELU recomputed, its backward, the bias sum);
here one reads a and dg once and writes da and g.

These are the building blocks of sit_fast.models' MLP op (sit_fast::gelu_linear), whose autograd
formula calls them: they have none of their own. Custom ops with fakes, so that fake-tensor passes
(sit_fast.memory, benchmarks.roofline) see them as one op each.

    GELU_tanh(x)  = x s,                       s = sigmoid(2 u), u = sqrt(2 / pi) (x + 0.044715 x^3)
    GELU_tanh'(x) = s + 2 x s (1 - s) sqrt(2 / pi) (1 + 3 * 0.044715 x^2)
(0.5 (1 + tanh u) = sigmoid(2 u), and d/du of it is 2 s (1 - s).) dbias: fp32 partial sums per
program, over its rows, then summed in a second pass (deterministic).
"""
import math

import torch
import triton
import triton.language as tl

from . import _launch

OP = "bias_gelu"
SQRT_2_OVER_PI = math.sqrt(2 / math.pi)
GELU_CUBIC = 0.044715


@triton.jit
def _gelu_parts(x, K0: tl.constexpr, K1: tl.constexpr):
    """(GELU_tanh(x), sigmoid(2 u)) for x in float32."""
    s = 1.0 / (1.0 + tl.exp(-2.0 * K0 * (x + K1 * x * x * x)))
    return x * s, s


@triton.jit
def _program_span(bias_ptr, N, H, rows_per_program, BLOCK_H: tl.constexpr):
    """This program's run of rows [r_start, r_end) and block of columns (with their mask), and the
    bias there in float32: one program per (run of rows_per_program rows, block of BLOCK_H columns)."""
    pid_r = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_mask = cols < H
    bias = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    r_start = pid_r * rows_per_program
    return pid_r, r_start, tl.minimum(r_start + rows_per_program, N), cols, col_mask, bias


@triton.jit
def _bias_gelu_fwd_kernel(
    g_ptr, a_ptr, bias_ptr,
    N, H, stride_g, stride_a, rows_per_program,
    K0: tl.constexpr, K1: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # A (BLOCK_R, BLOCK_H) tile per step over the program's rows (_program_span).
    pid_r, r_start, r_end, cols, col_mask, bias = _program_span(bias_ptr, N, H, rows_per_program, BLOCK_H)
    for r0 in range(r_start, r_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        mask = (rows < r_end)[:, None] & col_mask[None, :]
        x = tl.load(a_ptr + rows[:, None] * stride_a + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        g, s = _gelu_parts(x + bias[None, :], K0, K1)
        tl.store(g_ptr + rows[:, None] * stride_g + cols[None, :], g.to(g_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(
    da_ptr, g_ptr, partial_ptr, a_ptr, bias_ptr, dg_ptr,
    N, H, stride_da, stride_g, stride_a, stride_dg, rows_per_program,
    K0: tl.constexpr, K1: tl.constexpr, STORE_G: tl.constexpr, SUM_DBIAS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # As the forward; partial_ptr: (programs over rows, H) fp32, this program's column sums of da.
    pid_r, r_start, r_end, cols, col_mask, bias = _program_span(bias_ptr, N, H, rows_per_program, BLOCK_H)
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for r0 in range(r_start, r_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        mask = (rows < r_end)[:, None] & col_mask[None, :]
        x = tl.load(a_ptr + rows[:, None] * stride_a + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dg = tl.load(dg_ptr + rows[:, None] * stride_dg + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = x + bias[None, :]
        g, s = _gelu_parts(x, K0, K1)
        da = dg * (s + 2.0 * x * s * (1.0 - s) * K0 * (1.0 + 3.0 * K1 * x * x))
        tl.store(da_ptr + rows[:, None] * stride_da + cols[None, :], da.to(da_ptr.dtype.element_ty), mask=mask)
        if STORE_G:
            tl.store(g_ptr + rows[:, None] * stride_g + cols[None, :], g.to(g_ptr.dtype.element_ty), mask=mask)
        if SUM_DBIAS:
            acc += tl.sum(tl.where(mask, da, 0.0), axis=0)
    if SUM_DBIAS:
        tl.store(partial_ptr + pid_r * H + cols, acc, mask=col_mask)


def _check(a: torch.Tensor, bias: torch.Tensor, dg: torch.Tensor | None = None) -> None:
    if a.dim() < 1 or a.dtype not in _launch.ACTIVATION_DTYPES:
        raise ValueError(f"{OP}: a must be float32, bfloat16 or float16 with at least one dimension, got "
                         f"{a.dtype} of shape {tuple(a.shape)}")
    H = a.shape[-1]
    if bias.shape != (H,) or bias.dtype not in _launch.ACTIVATION_DTYPES:
        raise ValueError(f"{OP}: bias must be ({H},), as a's last dimension, in float32, bfloat16 or float16, got "
                         f"{bias.dtype} of shape {tuple(bias.shape)} (a {tuple(a.shape)})")
    if dg is not None and (dg.shape != a.shape or dg.dtype not in _launch.ACTIVATION_DTYPES):
        raise ValueError(f"{OP}: dg must have a's shape {tuple(a.shape)} in float32, bfloat16 or float16, got "
                         f"{dg.dtype} of shape {tuple(dg.shape)}")
    _launch.check_same_device(OP, a=a, bias=bias, **({} if dg is None else {"dg": dg}))


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as (rows, H) with unit column stride (a view where the layout allows it)."""
    t = t.reshape(math.prod(t.shape[:-1]), t.shape[-1]) if t.dim() != 2 else t  # -1 is ambiguous when H = 0
    return t if t.stride(-1) == 1 else t.contiguous()


def _tiling(N: int, H: int, device: torch.device, launch: dict[str, int]) -> tuple[int, int, int]:
    """(BLOCK_H, rows_per_program, programs over rows) for a tile of launch["block_rows"] rows and at
    most launch["block_h"] columns: about launch["programs_per_slot"] programs per streaming
    multiprocessor in all (_launch.gelu_launch), each over a run of whole tiles of rows."""
    block_rows = launch["block_rows"]
    block_h = min(launch["block_h"], _launch.next_power_of_2(H))
    col_blocks = triton.cdiv(H, block_h)
    row_programs = max(1, min(triton.cdiv(N, block_rows),
                              triton.cdiv(_launch._program_slots(device) * launch["programs_per_slot"], col_blocks)))
    rows_per_program = triton.cdiv(triton.cdiv(N, row_programs), block_rows) * block_rows
    return block_h, rows_per_program, max(1, triton.cdiv(N, rows_per_program))


def bias_gelu_forward(a: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    _check(a, bias)
    _launch.check_runnable(OP, a.device, _bias_gelu_fwd_kernel)
    a2, bias = _rows(a), bias.contiguous()  # the kernel reads bias with unit stride
    N, H = a2.shape
    g = _launch.empty(a2.shape, a.dtype, a.device)
    if N and H:
        launch = _launch.gelu_launch("fwd")
        block_h, rows_per_program, row_programs = _tiling(N, H, a.device, launch)
        with _launch.on_device(a.device):
            _bias_gelu_fwd_kernel[(row_programs, triton.cdiv(H, block_h))](
                g, a2, bias, N, H, g.stride(0), a2.stride(0), rows_per_program, K0=SQRT_2_OVER_PI, K1=GELU_CUBIC,
                BLOCK_R=launch["block_rows"], BLOCK_H=block_h, num_warps=launch["num_warps"],
                enable_fp_fusion=_launch.FP_FUSION)
    return g.view(a.shape)


def bias_gelu_backward_forward(a: torch.Tensor, bias: torch.Tensor, dg: torch.Tensor, store_g: bool,
                               sum_dbias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(a, bias, dg)
    _launch.check_runnable(OP, a.device, _bias_gelu_bwd_kernel)
    a2, dg2, bias = _rows(a), _rows(dg), bias.contiguous()  # the kernel reads bias with unit stride
    N, H = a2.shape
    da = _launch.empty(a2.shape, a.dtype, a.device)
    g = _launch.empty(a2.shape if store_g else (0,), a.dtype, a.device)
    launch = _launch.gelu_launch("bwd")
    block_h, rows_per_program, row_programs = _tiling(N, H, a.device, launch) if N and H else (1, 1, 0)
    partial = _launch.empty((row_programs, H) if sum_dbias else (0,), torch.float32, a.device)
    if N and H:
        with _launch.on_device(a.device):
            _bias_gelu_bwd_kernel[(row_programs, triton.cdiv(H, block_h))](
                da, g, partial, a2, bias, dg2, N, H, da.stride(0), g.stride(0) if store_g else 0, a2.stride(0),
                dg2.stride(0), rows_per_program, K0=SQRT_2_OVER_PI, K1=GELU_CUBIC, STORE_G=store_g,
                SUM_DBIAS=sum_dbias, BLOCK_R=launch["block_rows"], BLOCK_H=block_h, num_warps=launch["num_warps"],
                enable_fp_fusion=_launch.FP_FUSION)
    dbias = partial.sum(0).to(bias.dtype) if sum_dbias else bias.new_empty(0)  # no rows: zeros
    return da.view(a.shape), (g.view(a.shape) if store_g else g), dbias


@torch.library.custom_op("sit_fast::bias_gelu", mutates_args=())
def bias_gelu_op(a: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return bias_gelu_forward(a, bias)


@bias_gelu_op.register_fake
def _(a, bias):
    _check(a, bias)
    return a.new_empty(a.shape)


@torch.library.custom_op("sit_fast::bias_gelu_backward", mutates_args=())
def bias_gelu_backward_op(a: torch.Tensor, bias: torch.Tensor, dg: torch.Tensor, store_g: bool,
                          sum_dbias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return bias_gelu_backward_forward(a, bias, dg, store_g, sum_dbias)


@bias_gelu_backward_op.register_fake
def _(a, bias, dg, store_g, sum_dbias):
    _check(a, bias, dg)
    return (a.new_empty(a.shape), a.new_empty(a.shape if store_g else (0,)),
            bias.new_empty((a.shape[-1],) if sum_dbias else (0,)))


def bias_gelu(a: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GELU_tanh(a + bias), a: (..., H), bias: (H,); in a's dtype. No autograd (see the module)."""
    _launch.refuse_forward_ad(OP, a=a, bias=bias)
    return bias_gelu_op(a, bias)


def bias_gelu_backward(a: torch.Tensor, bias: torch.Tensor, dg: torch.Tensor, store_g: bool = True,
                       sum_dbias: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(da, g, dbias) of g = GELU_tanh(a + bias) for the upstream gradient dg (see the module)."""
    return bias_gelu_backward_op(a, bias, dg, store_g, sum_dbias)
