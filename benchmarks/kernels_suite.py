"""Fused adaLN kernels vs the eager and compiled PyTorch reference: time, GB/s and parity.

For each op (kernels.reference is the one reference) and each direction ("fwd": forward only;
"bwd": backward only, of every input from fixed upstream gradients, each time after a fresh untimed
forward; "fwd_bwd": forward, then backward, as in training), three variants:

    ours                the fused Triton custom ops
    reference+compile   torch.compile(kernels.reference)
    reference           eager kernels.reference

Parity: each variant's largest absolute error against the reference computed in float32 from the
same inputs (`expected_outputs`); ours must also be within the kernel tests' elementwise bounds
(PARITY_TOL, widened as those tests widen them for h of the stored x_out and gradients of the stored
x_hat: `parity_failure`), else its row is `parity_failed`.

GB/s divides the MINIMUM bytes the op must move (each (B, T, D) tensor read or written once, the
(B, D) vectors once; see `minimum_bytes`) by the median time, so every variant is measured against the
same yardstick. Timing: on CUDA, CUDA events around each call, the L2 cache overwritten before it and
the device held in a sleep kernel while the host queues it, so that host time (autograd, a compiled
graph's wrappers) stays out (`_times_cuda`; the backward alone, each pass after its own untimed
forward); on the CPU a time.perf_counter loop after warm-up
(the Triton interpreter there makes "ours" slow by design: CPU numbers only prove the suite runs).
Each variant is timed twice, back to back: median_ms, p20_ms, p80_ms are over both windows' times,
window_spread is how far apart the two windows' medians were (window_medians_ms).

Three more ops of the MLP, each timed as one call, after the backwards and attention (below):
"linear_gelu", the fast path's MLP input layer when sampling, GELU_tanh(x W^T + b) with W (4D, D),
as sit_fast.models.linear_gelu computes it (on CUDA one matmul with the bias and GELU in its
epilogue; `gelu_epilogue` in the row says whether it was) against F.linear then F.gelu, eager and
compiled, its row also giving `tflops`; and "bias_gelu_backward", the training step's pass over
fc1's output a (B, T, 4D) and the GELU's gradient dg (kernels.bias_gelu_backward: da, the recomputed
GELU and fc1's bias gradient) against the same maths in PyTorch ops (reference_bias_gelu_backward),
eager and compiled; and "bias_gelu", the training step's forward pass over fc1's output
(kernels.bias_gelu: GELU_tanh(a + bias)) against F.gelu(a + bias).

Attention ("attention.fwd", "attention.bwd"; after the backwards, before the MLP's ops) at the
blocks' shapes (heads of ATTENTION_HEAD_DIM: SiT-XL/2's 16 of 72), q, k and v strided views of one
(B, T, 3, H, d) tensor as the blocks make them: `ours` is the fast path's attention (PyTorch's SDPA,
its own choice of kernel unless SIT_FAST_SDPA_BACKEND forces one: `sdpa_choice` in the row names
it), against each SDPA kernel forced (`sdpa:flash`, `sdpa:cudnn`, `sdpa:efficient`; a kernel that
does not run on the device, or refuses the inputs, is a skipped row) and the eager reference
(softmax(QK^T / sqrt(d))V written out). Each row also gives `tflops` (forward 4 B T^2 D, backward
2.5 times that); every variant but the reference is judged against it (`attention_parity_failure`),
and one line after the rows names the fastest kernel and what it would save a training step
(`attention_summary`).

    from benchmarks.kernels_suite import run
    records = run("cuda", "full")     # B=256, T=256, D=1152, bf16 (SiT-XL/2 at 256 px)
    records = run("cpu", "tiny")      # B=2, T=16, D=72, fp32; needs TRITON_INTERPRET=1 for "ours"

    python -m benchmarks.kernels_suite --device cpu --size tiny    # JSON lines on stdout

Importable without CUDA or triton: torch is the only import at module level.
"""
import datetime
import functools
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

SUITE = "kernels"
REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Size:
    B: int
    T: int
    D: int
    dtype: torch.dtype
    cpu_reps: int = 2  # timed iterations of the CPU loop (the interpreter is slow; CPU numbers are a dry run)


SIZES = {
    "tiny": Size(B=2, T=16, D=72, dtype=torch.float32),
    "full": Size(B=256, T=256, D=1152, dtype=torch.bfloat16),
}

# Positional arguments of each op, in order; "x"/"y" are (B, T, D), the rest (B, D).
OP_ARGS = {
    "layernorm_modulate": ("x", "shift", "scale"),
    "gated_residual": ("x", "gate", "y"),
    "gated_residual_layernorm_modulate": ("x", "gate", "y", "shift", "scale"),
    "linear_gelu": ("x", "weight", "bias"),  # forward only
    "bias_gelu_backward": ("a", "bias", "dg"),  # a, dg (B, T, 4D); one call
    "bias_gelu": ("a", "bias"),  # forward only
    "attention": ("q", "k", "v"),  # (B, H, T, d) views of one (B, T, 3, H, d) tensor
}
# The fused op first in each direction: the largest memory-bound op of a block (roofline), so a time
# box that runs short cuts the others first.
OPS = ("gated_residual_layernorm_modulate", "layernorm_modulate", "gated_residual")
DIRECTIONS = ("fwd", "bwd", "fwd_bwd")
# The MLP's ops, each timed as one call (direction "fwd"), after every adaLN op's fwd and bwd rows
MLP_OPS = ("linear_gelu", "bias_gelu_backward", "bias_gelu")
MLP_RATIO = 4  # the MLP's hidden width: MLP_RATIO * D, as in every SiT
NEEDS_KERNELS = (*OPS, "bias_gelu_backward", "bias_gelu")  # ops whose `ours` is a Triton kernel
# Attention, forward and backward, after every op's bwd and before the MLP's ops (no goal; it decides
# SIT_FAST_SDPA_BACKEND; nothing to compile, so a short box still holds it): the fast path's SDPA call
# against each of PyTorch's kernels forced, then the eager reference
ATTENTION_OPS = ("attention",)
ATTENTION_DIRECTIONS = ("fwd", "bwd")
ATTENTION_HEAD_DIM = 72  # SiT-XL's (1152 / 16 heads); the tiny size's D = 72 is one head
FORCED_SDPA = ("flash", "cudnn", "efficient")  # variant "sdpa:<kernel>"
ATTENTION_PARITY = {  # dtype -> (forward, backward): |result - reference| / |reference| (Frobenius), at most
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (1e-2, 2e-2),  # as tests/test_models.py's half-precision attention test
    torch.float16: (1e-2, 2e-2),
}
SIT_XL_DEPTH = 28  # blocks, each one attention call: attention_summary's training step
VARIANTS = ("ours", "reference+compile", "reference")  # the order they are measured in
CUDA_REPS = 50  # timed calls per window on CUDA (a backward each after its own forward)
SLEEP_CAP_MS = 50.0  # _times_cuda's sleep at most: one slow host call (a collection pause) must not slow the rest
L2_FLUSH_BYTES = 256 * 2**20  # larger than any GPU's L2 (H100: 50 MB), as triton.testing.do_bench uses
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}  # as the other suites


def reference_linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The MLP's input layer as upstream computes it: F.linear, then the GELU in its tanh form."""
    return torch.nn.functional.gelu(torch.nn.functional.linear(x, weight, bias), approximate="tanh")


def reference_bias_gelu(a: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GELU_tanh(a + bias) in PyTorch ops, as the MLP's eager forward computes it after fc1's matmul."""
    return torch.nn.functional.gelu(a + bias, approximate="tanh")


def reference_bias_gelu_backward(a: torch.Tensor, bias: torch.Tensor, dg: torch.Tensor
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(da, g, dbias) in PyTorch ops, as the MLP's eager backward computes them: the GELU of a + bias
    (recomputed), its backward, and the bias gradient summed over tokens."""
    x = a + bias
    da = torch.ops.aten.gelu_backward(dg, x, approximate="tanh")
    return da, torch.nn.functional.gelu(x, approximate="tanh"), da.sum(dim=tuple(range(da.dim() - 1)))


def reference_op(op: str) -> Callable:
    """The plain PyTorch form of op: kernels.reference's, the MLP's, or attention written out."""
    if op == "attention":
        from sit_fast.attention import math_attention

        return math_attention
    if op == "linear_gelu":
        return reference_linear_gelu
    if op == "bias_gelu_backward":
        return reference_bias_gelu_backward
    if op == "bias_gelu":
        return reference_bias_gelu
    from kernels import reference

    return getattr(reference, op)


def fast_path_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention as the fast path's blocks run it: backend "auto" (SDPA where flash-attn is absent;
    SIT_FAST_SDPA_BACKEND read at each call)."""
    from sit_fast.attention import attention_fn, resolve_backend

    return attention_fn(resolve_backend("auto", q.device, q.dtype, q.shape[-1]))(q, k, v)


def ours_op(op: str) -> Callable:
    if op == "attention":
        return fast_path_attention
    if op == "linear_gelu":
        from sit_fast.models import linear_gelu

        return linear_gelu
    import kernels

    if op == "bias_gelu_backward":
        return functools.partial(kernels.bias_gelu_backward, store_g=True, sum_dbias=True)

    return getattr(kernels, op)


def make_inputs(op: str, B: int, T: int, D: int, dtype: torch.dtype, device: str | torch.device,
                requires_grad: bool = False) -> list[torch.Tensor]:
    """Random arguments for `op`, all in `dtype`: activations (B, T, D) and modulation vectors (B, D);
    linear_gelu's weight (4D, D), scaled so that its outputs have unit variance, and bias (4D);
    bias_gelu(_backward)'s a and dg (B, T, 4D) and bias (4D); attention's q, k, v (B, H, T, d) with d =
    ATTENTION_HEAD_DIM, strided views of one (B, T, 3, H, d) tensor, as a block's qkv projection gives them."""
    if op == "attention":
        heads = attention_heads(D)
        qkv = torch.randn(B, T, 3, heads, D // heads, device=device, dtype=dtype)
        return [qkv[:, :, i].transpose(1, 2).requires_grad_(requires_grad) for i in range(3)]
    args = []
    for name in OP_ARGS[op]:
        if name in ("x", "y"):
            t = torch.randn(B, T, D, device=device, dtype=dtype)
        elif name in ("a", "dg"):
            t = torch.randn(B, T, MLP_RATIO * D, device=device, dtype=dtype)
        elif name == "weight":
            t = torch.randn(MLP_RATIO * D, D, device=device, dtype=dtype) / math.sqrt(D)
        elif name == "bias":
            t = 0.5 * torch.randn(MLP_RATIO * D, device=device, dtype=dtype)
        else:
            t = 0.5 * torch.randn(B, D, device=device, dtype=dtype)
        args.append(t.requires_grad_(requires_grad))
    return args


def minimum_bytes(op: str, direction: str, B: int, T: int, D: int, dtype: torch.dtype) -> int:
    """Bytes the op cannot avoid moving: each (B, T, D) tensor read or written once, plus the (B, D) vectors.

    act = B*T*D elements, vec = B*D elements (vectors in the activation dtype here):
      layernorm_modulate                 fwd: read x, write y (2 act) + read shift, scale (2 vec)
                                         bwd: read dy, x, write dx (3 act) + read scale, write dshift, dscale (3 vec)
      gated_residual                     fwd: read x, y, write out (3 act) + read gate (1 vec)
                                         bwd: read dout, y, write dy (3 act; dx is dout itself) + gate, dgate (2 vec)
      gated_residual_layernorm_modulate  fwd: read x, y, write x_out, h (4 act) + gate, shift, scale (3 vec)
                                         bwd: read dx_out, dh, x_out, y, write dx, dy (6 act)
                                              + read gate, scale, write dgate, dshift, dscale (5 vec)
    The per-row statistics our kernels keep are not counted: they could be recomputed.
    fwd_bwd is the sum of the two.
      linear_gelu                        fwd: read x, write out (4D per token), read W, b
      bias_gelu_backward                 one call: read a, dg, write da, g (4D per token each), read
                                         bias, write dbias
      bias_gelu                          fwd: read a, write g (4D per token each), read bias
      attention                          fwd: read q, k, v, write o (4 act); bwd: read q, k, v, o, do,
                                         write dq, dk, dv (8 act); the per-row softmax statistics not counted
    """
    element = torch.empty((), dtype=dtype).element_size()
    if op in MLP_OPS:
        if direction != "fwd":
            raise ValueError(f"{op} is timed as one call (direction fwd) only")
        hidden = MLP_RATIO * D
        if op == "bias_gelu_backward":
            return (4 * B * T * hidden + 2 * hidden) * element
        if op == "bias_gelu":
            return (2 * B * T * hidden + hidden) * element
        return (B * T * D + B * T * hidden + hidden * D + hidden) * element
    counts = {  # (activation tensors, vector tensors) per direction
        "layernorm_modulate": {"fwd": (2, 2), "bwd": (3, 3)},
        "gated_residual": {"fwd": (3, 1), "bwd": (3, 2)},
        "gated_residual_layernorm_modulate": {"fwd": (4, 3), "bwd": (6, 5)},
        "attention": {"fwd": (4, 0), "bwd": (8, 0)},
    }[op]
    parts = ("fwd", "bwd") if direction == "fwd_bwd" else (direction,)
    n_act = sum(counts[p][0] for p in parts)
    n_vec = sum(counts[p][1] for p in parts)
    return (n_act * B * T * D + n_vec * B * D) * element


def _as_tuple(out) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def _make_step(fn: Callable, args: list[torch.Tensor], direction: str,
               grads_out: list[torch.Tensor] | None) -> Callable[[], tuple[torch.Tensor, ...]]:
    """A zero-argument callable running one iteration; returns the outputs (and input gradients)."""
    if direction == "fwd":
        def step():
            with torch.no_grad():
                return _as_tuple(fn(*args))
        return step
    if direction == "bwd":
        def step():
            return torch.autograd.grad(_as_tuple(fn(*args)), args, grads_out)
        return step

    def step():
        outs = _as_tuple(fn(*args))
        grads = torch.autograd.grad(outs, args, grads_out)
        return (*(o.detach() for o in outs), *grads)
    return step


def quantiles_ms(times_ms: list[float]) -> tuple[float, float, float]:
    """Median, 20th and 80th percentile (linear interpolation, as do_bench's quantiles) of times in ms."""
    if len(times_ms) == 1:
        return times_ms[0], times_ms[0], times_ms[0]
    deciles = statistics.quantiles(times_ms, n=10, method="inclusive")
    return statistics.median(times_ms), deciles[1], deciles[7]


@dataclass
class Times:
    """Milliseconds of each timed repetition, and (CUDA) how many of them the host may have held up."""
    times_ms: list[float]
    host_bound: int | None  # repetitions whose start event the device reached before the host had queued
    # them; None on the CPU


@functools.lru_cache(maxsize=None)
def _sleep_cycles_per_ms(device_index: int) -> float:
    """Clock cycles of torch.cuda._sleep per millisecond on this device, timed once with events."""
    with torch.cuda.device(device_index):
        torch.cuda._sleep(1000)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(10_000_000)
        end.record()
        end.synchronize()
        return 10_000_000 / start.elapsed_time(end)


def _times_cuda(timed: Callable, reps: int, setup: Callable | None = None, warmup: int = 3) -> Times:
    """Device time of each of reps calls of timed(setup()) (setup untimed), CUDA events around each.

    Before each timed call the L2 cache is overwritten (as triton.testing.do_bench does), then the
    device is held in a sleep kernel while the host queues the call: a backward through autograd (and
    a compiled graph's runtime wrappers) can take the host longer to queue than the device takes to
    run, and events around work the device waits for would time the host. The sleep starts at
    0.25 ms and grows to twice the longest host time seen (at most SLEEP_CAP_MS); a repetition whose
    start event the device had passed before the host finished queueing counts as host_bound (its
    time may include waiting).
    """
    device = torch.cuda.current_device()
    flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")
    cycles_per_ms = _sleep_cycles_per_ms(device)
    sleep_ms = 0.25
    times_ms, host_bound = [], 0
    for rep in range(warmup + reps):
        state = setup() if setup is not None else None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        flush.zero_()
        torch.cuda._sleep(int(sleep_ms * cycles_per_ms))
        start.record()
        began = time.perf_counter()
        timed(state)
        queued_ms = (time.perf_counter() - began) * 1e3
        end.record()
        late = start.query()  # the device already past the start: it may have waited for the host
        end.synchronize()
        sleep_ms = min(max(sleep_ms, 2 * queued_ms), SLEEP_CAP_MS)
        if rep >= warmup:
            times_ms.append(start.elapsed_time(end))
            host_bound += late
    return Times(times_ms, host_bound)


def _times_backward(fn: Callable, args: list[torch.Tensor], grads_out: list[torch.Tensor], device: torch.device,
                    reps: int, warmup: int = 2) -> Times:
    """Each of reps backward passes alone: each repetition runs a fresh forward untimed, then times
    torch.autograd.grad (on CUDA through _times_cuda; on the CPU with perf_counter).

    A graph cannot simply be kept and run backward again: torch.compile's backward frees the
    buffers it saved (donated buffers), so every repetition needs its own forward, as in training.
    """
    if device.type == "cuda":
        return _times_cuda(lambda outs: torch.autograd.grad(outs, args, grads_out), reps,
                           setup=lambda: _as_tuple(fn(*args)), warmup=warmup)

    def once() -> float:
        outs = _as_tuple(fn(*args))
        begin = time.perf_counter()
        torch.autograd.grad(outs, args, grads_out)
        return (time.perf_counter() - begin) * 1e3

    for _ in range(warmup):
        once()
    return Times([once() for _ in range(reps)], None)


def _times_cpu(step: Callable, reps: int, warmup: int = 1) -> Times:
    """Milliseconds of each of reps calls (perf_counter), after warmup untimed ones."""
    for _ in range(warmup):
        step()
    times_ms = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        times_ms.append((time.perf_counter() - start) * 1e3)
    return Times(times_ms, None)


# Ours against the reference computed in float32 from the same inputs: the kernel tests' bounds
# (tests/test_kernels.py, there against float64), elementwise |ours - ref| <= atol + rtol |ref|, widened
# where the fused ops' own definitions make a correct kernel differ more (see parity_failure). The
# kernels compute in fp32 and round once on store; bf16 has two of its ulps.
PARITY_TOL = {  # dtype -> {"fwd" | "bwd": (atol, rtol)}; fwd_bwd takes the backward's
    torch.float32: {"fwd": (1e-5, 1e-5), "bwd": (2e-5, 2e-5)},
    torch.bfloat16: {"fwd": (1e-3, 1.6e-2), "bwd": (2e-3, 1.6e-2)},
    torch.float16: {"fwd": (2e-4, 2e-3), "bwd": (5e-4, 2e-3)},
}


def expected_outputs(reference: Callable, args: list[torch.Tensor], direction: str,
                     grads_out: list[torch.Tensor] | None) -> tuple[torch.Tensor, ...]:
    """The reference's outputs (and input gradients) in float32, from float32 copies of the inputs."""
    args32 = [a.detach().float().requires_grad_(a.requires_grad) for a in args]
    grads32 = None if grads_out is None else [g.float() for g in grads_out]
    return _make_step(reference, args32, direction, grads32)()


def _max_abs_err(results: tuple[torch.Tensor, ...], expected: tuple[torch.Tensor, ...]) -> float:
    """The largest |result - expected| over every output, NaN when any holds a NaN (Python's max()
    would drop a NaN that is not first: an unwritten element of a later output went unseen)."""
    errors = [float((r.float() - e.float()).abs().max()) for r, e in zip(results, expected)]
    return math.nan if any(math.isnan(e) for e in errors) else max(errors)


def parity_failure(op: str, ours: Callable, args: list[torch.Tensor], results: tuple[torch.Tensor, ...],
                   dtype: torch.dtype, direction: str, grads_out: list[torch.Tensor] | None = None) -> str | None:
    """None when every element of every result of ours (one _make_step of `ours` on args) is within
    PARITY_TOL of the reference computed in float32 from the same inputs; else a line naming the
    first output that is not. As in the kernel tests, two things a correct kernel does are allowed for:
    the fused op's h normalises x_out as stored, rounded to x's dtype (the reference takes ours'
    x_out: kernels.reference.fused_from_stored), and backward reads x_hat stored in the activation
    dtype (each gradient's bound is widened by kernels.reference.x_hat_rounding_bounds)."""
    from kernels import reference

    names = OP_ARGS[op]
    ref, x_out = reference_op(op), None
    if op == "gated_residual_layernorm_modulate":
        if direction == "bwd":  # the results are gradients only: ours' x_out from its forward
            with torch.no_grad():
                x_out = ours(*args)[0]
        else:
            x_out = results[0]
        ref = functools.partial(reference.fused_from_stored, x_out_stored=x_out)
    expected = expected_outputs(ref, args, direction, grads_out)
    extra = [None] * len(expected)
    if direction != "fwd":
        inputs = {name: a.detach().float() for name, a in zip(names, args)}
        bounds = reference.x_hat_rounding_bounds(op, inputs, x_out, grads_out[-1], 1e-6, dtype)
        first_grad = len(expected) - len(names)
        for i, name in enumerate(names):
            extra[first_grad + i] = bounds.get(name)
    atol, rtol = PARITY_TOL[dtype]["fwd" if direction == "fwd" else "bwd"]
    for i, (r, e, more) in enumerate(zip(results, expected, extra)):
        err = (r.float() - e.float()).abs()
        allowed = atol + rtol * e.float().abs() + (0 if more is None else more)
        bad = ~(err <= allowed)  # NaN is bad
        if bad.any():
            worst = "NaN" if err.isnan().any() else f"{float(err.max()):.3g}"
            widened = "" if more is None else " + x_hat's rounding"
            return (f"output {i}: {int(bad.sum())}/{bad.numel()} elements beyond {atol:g} + {rtol:g} |ref|{widened} of "
                    f"the float32 reference (max abs err {worst})")
    return None


def _matmul_fields(variant: str, args: list[torch.Tensor], median_ms: float) -> dict:
    """A linear_gelu row's TFLOP/s (2 per multiply-add) and, for ours, whether the epilogue ran."""
    x, weight, bias = args
    fields = {"tflops": 2 * x.numel() * weight.shape[0] / (median_ms * 1e-3) / 1e12}
    if variant == "ours":
        from sit_fast.models import gelu_epilogue_applies

        with torch.no_grad():
            fields["gelu_epilogue"] = gelu_epilogue_applies(x, weight, bias)
    return fields


def attention_heads(D: int) -> int:
    """Heads of ATTENTION_HEAD_DIM in a width of D (at least one)."""
    return max(D // ATTENTION_HEAD_DIM, 1)


def attention_call_flops(direction: str, B: int, T: int, D: int) -> float:
    """FLOPs of attention over B x T tokens of width D (2 per multiply-add): forward Q K^T and P V,
    4 B T^2 D; backward 2.5 times that (Q K^T again, then dV, dP, dQ and dK)."""
    forward = 4 * B * T * T * D
    return {"fwd": forward, "bwd": 2.5 * forward, "fwd_bwd": 3.5 * forward}[direction]


def attention_variants(device: torch.device, dtype: torch.dtype) -> tuple[dict[str, Callable], dict[str, str]]:
    """The attention rows' variants ({name: fn}, in measuring order) and those that cannot run here
    ({name: why}): ours, each of PyTorch's SDPA kernels forced, the eager reference."""
    from sit_fast.attention import forced_sdpa_problem, make_sdpa_attention

    variants, unsupported = {"ours": ours_op("attention")}, {}
    for kernel in FORCED_SDPA:
        problem = forced_sdpa_problem(kernel, device, dtype)
        if problem is None:
            variants[f"sdpa:{kernel}"] = make_sdpa_attention(kernel)
        else:
            unsupported[f"sdpa:{kernel}"] = f"PyTorch's {kernel} kernel: {problem}"
    variants["reference"] = reference_op("attention")
    return variants, unsupported


def sdpa_choice(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """The SDPA kernel PyTorch picks for these inputs when none is forced (torch._fused_sdp_choice, a
    private call: None where it is missing or fails)."""
    try:
        from torch.nn.attention import SDPBackend

        return SDPBackend(torch._fused_sdp_choice(q, k, v)).name.lower().removesuffix("_attention")
    except Exception:  # noqa: BLE001 -- a name for the record only
        return None


def attention_parity_failure(results: tuple[torch.Tensor, ...], expected: tuple[torch.Tensor, ...],
                             dtype: torch.dtype, direction: str) -> str | None:
    """None when every output (or input gradient) is within ATTENTION_PARITY of the float32 reference
    (relative Frobenius error), else a line naming the first that is not. Elementwise bounds do not
    suit attention in half precision: the fused kernels round the softmax's probabilities to it."""
    bound = ATTENTION_PARITY[dtype][0 if direction == "fwd" else 1]
    for i, (r, e) in enumerate(zip(results, expected)):
        e = e.float()
        error = float((r.float() - e).norm() / e.norm().clamp_min(1e-30))
        if not error <= bound:  # NaN fails
            return f"output {i}: relative error {error:.3g} of the float32 reference, beyond {bound:g}"
    return None


def attention_summary(rows: list[dict], depth: int = SIT_XL_DEPTH) -> str:
    """One line from the attention rows: what PyTorch picks, each variant's forward and backward, and
    the fastest of PyTorch's kernels forward + backward against ours, per training step of `depth`
    blocks (one attention call each, forward and backward), unless its gain is within the rows' window
    spread."""
    timed = {(r["name"].split(".")[1], r["variant"]): r["median_ms"] for r in rows
             if r.get("status", "ok") == "ok" and r.get("median_ms") is not None}
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    choice = next((r["sdpa_choice"] for r in rows if r["variant"] == "ours" and r.get("sdpa_choice")), None)
    parts = [f"ours runs PyTorch's {choice} kernel" if choice else "PyTorch's choice of kernel unknown"]
    for variant in variants:
        times = [f"{d} {timed[d, variant]:.4g} ms" for d in ATTENTION_DIRECTIONS if (d, variant) in timed]
        times += [f"{d} {r['status']}" for r in rows if r["variant"] == variant and r.get("status", "ok") != "ok"
                  for d in [r["name"].split(".")[1]]]
        parts.append(f"{variant}: {', '.join(times)}")
    both = {v: sum(timed[d, v] for d in ATTENTION_DIRECTIONS) for v in variants
            if v.startswith("sdpa:") and all((d, v) in timed for d in ATTENTION_DIRECTIONS)}
    ours = sum(timed[d, "ours"] for d in ATTENTION_DIRECTIONS) if all((d, "ours") in timed
                                                                     for d in ATTENTION_DIRECTIONS) else None
    if both and ours is not None:
        best = min(both, key=both.get)
        fastest = (f"fastest forward + backward: {best} (SIT_FAST_SDPA_BACKEND={best.removeprefix('sdpa:')}), "
                   f"{both[best]:.4g} ms against ours' {ours:.4g} ms")
        # the two windows' spread, the largest of the four rows compared: a smaller gain is noise
        noise = max((r.get("window_spread") or 0.0) for r in rows if r["variant"] in (best, "ours"))
        if best == f"sdpa:{choice}":
            fastest += ": the kernel ours runs"
        elif both[best] >= ours:
            fastest += ": none faster than ours"
        elif ours / both[best] - 1 <= noise:
            fastest += f": {ours / both[best] - 1:.1%} faster, within the windows' spread ({noise:.1%}): noise"
        else:
            fastest += f": {(ours - both[best]) * depth:.3g} ms saved a training step of {depth} blocks"
        parts.append(fastest)
    else:
        parts.append("no comparison: ours, or every forced kernel, lacks a forward or a backward time")
    return "attention: " + "; ".join(parts)


def _attention_fields(variant: str, args: list[torch.Tensor], direction: str, median_ms: float) -> dict:
    """An attention row's TFLOP/s (attention_call_flops) and, for ours, its backend and SDPA kernel (the one
    SIT_FAST_SDPA_BACKEND forces, else PyTorch's pick)."""
    from sit_fast.attention import resolve_backend, sdpa_backend_from_env

    q = args[0]
    B, heads, T, head_dim = q.shape
    fields = {"tflops": attention_call_flops(direction, B, T, heads * head_dim) / (median_ms * 1e-3) / 1e12}
    if variant == "ours":
        fields["attention_backend"] = backend = resolve_backend("auto", q.device, q.dtype, head_dim)
        if backend == "sdpa":
            fields["sdpa_choice"] = sdpa_backend_from_env() or sdpa_choice(*args)
    return fields


def _failure_row(error: BaseException) -> dict:
    """status and note of a variant that raised: "oom" for out of memory, else "error"."""
    from sit_fast.errors import is_out_of_memory

    oom = is_out_of_memory(error)
    text = f"{type(error).__name__}: {error}".strip().splitlines()[0]
    return {"status": "oom" if oom else "error", "note": text if len(text) <= 300 else text[:297] + "..."}


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu (Triton interpreter)" if device.type == "cpu" else str(device)


def run(device: str, size: str, time_left: Callable[[], float] | None = None,
        compile_backend: str = "inductor") -> list[dict]:
    """Benchmark every op x direction x variant on `device` at `size` ("tiny" or "full")."""
    return list(rows(device, size, time_left, compile_backend))


def rows(device: str, size: str, time_left: Callable[[], float] | None = None,
         compile_backend: str = "inductor") -> Iterator[dict]:
    """run()'s rows, each yielded as soon as it is measured (so a run stopped part way keeps them);
    after the attention rows, attention_summary's line on stdout."""
    attention = []
    for row in _rows(device, size, time_left, compile_backend):
        if row["name"].split(".")[0] in ATTENTION_OPS:
            attention.append(row)
        elif attention:
            print(f"[{SUITE}] {attention_summary(attention)}", flush=True)
            attention = []
        yield row
    if attention:
        print(f"[{SUITE}] {attention_summary(attention)}", flush=True)


def _rows(device: str, size: str, time_left: Callable[[], float] | None = None,
          compile_backend: str = "inductor") -> Iterator[dict]:
    """rows() without the summary line.

    compile_backend: torch.compile's backend for the compiled reference ("eager" in the CPU dry run).
    time_left: seconds left of a time box, or None for none. A measurement is skipped (a row with
    status "skipped") when what is left is less than the last one of the same variant took, compiling
    included (each op and direction is a new compilation; the first one also warms the compiler up).
    Every op's fwd, then every op's bwd, then fwd_bwd; within each op and direction `ours` goes first,
    then the compiled reference (the goal compares the two), so a box cuts the eager reference first.
    """
    import kernels
    from benchmarks.common import window_fields
    from kernels import _launch

    if size not in SIZES:
        raise ValueError(f"kernels suite: unknown size {size!r}, expected one of {sorted(SIZES)}")
    dev = torch.device(device)
    cfg = SIZES[size]
    ours_available = kernels.kernels_available(dev)
    stamp = {
        "suite": SUITE,
        "device": _device_name(dev),
        "commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "size": size,
        "dtype": DTYPE_NAMES[cfg.dtype],
        "shapes": {"B": cfg.B, "T": cfg.T, "D": cfg.D},
    }

    needed_s: dict[str, float] = {}  # variant -> how long its last measurement took

    def fits(variant: str) -> bool:
        if time_left is None:
            return True
        left = time_left()
        return left > 0 and left >= needed_s.get(variant, 0.0)

    def skipped(name: str, variant: str, bytes_moved: int) -> dict:
        note = f"time box: {max(time_left(), 0):.0f} s left, needs about {needed_s.get(variant, 0.0):.0f} s"
        return {**stamp, "name": name, "variant": variant, "bytes_moved": bytes_moved, "status": "skipped",
                "note": note}

    by_op, unsupported = {}, {}
    for op in OPS + MLP_OPS:  # linear_gelu needs no kernel: plain PyTorch where the epilogue does not apply
        by_op[op] = {"ours": ours_op(op)} if ours_available or op not in NEEDS_KERNELS else {}
        by_op[op]["reference+compile"] = torch.compile(reference_op(op), backend=compile_backend)
        by_op[op]["reference"] = reference_op(op)
    for op in ATTENTION_OPS:
        by_op[op], unsupported[op] = attention_variants(dev, cfg.dtype)
    # Direction by direction, so that a time box cuts fwd_bwd (no goal) before any op's fwd or bwd;
    # the MLP ops (no goal either, but their rows decide whether the GELU epilogue stays on by default)
    # and attention (whether another SDPA kernel is worth making the default) before fwd_bwd, the MLP
    # first: its rows are the cheaper, and at the GPU session's deadline the box may not hold both.
    schedule = [(direction, op) for direction in DIRECTIONS if direction != "fwd_bwd" for op in OPS]
    schedule += [("fwd", op) for op in MLP_OPS if "fwd" in DIRECTIONS]
    schedule += [(direction, op) for op in ATTENTION_OPS for direction in ATTENTION_DIRECTIONS]
    schedule += [("fwd_bwd", op) for op in OPS if "fwd_bwd" in DIRECTIONS]
    for direction, op in schedule:
        variants = by_op[op]
        needs_grad = direction != "fwd"
        bytes_moved = minimum_bytes(op, direction, cfg.B, cfg.T, cfg.D, cfg.dtype)
        if not any(fits(v) for v in variants):
            for variant in variants:
                yield skipped(f"{op}.{direction}", variant, bytes_moved)
            continue
        failure = None
        try:
            args = make_inputs(op, cfg.B, cfg.T, cfg.D, cfg.dtype, dev, requires_grad=needs_grad)
            grads_out = None
            if needs_grad:
                with torch.no_grad():
                    grads_out = [torch.randn_like(o) for o in _as_tuple(variants["reference"](*args))]
            expected = expected_outputs(variants["reference"], args, direction, grads_out)
        except Exception as error:  # noqa: BLE001 -- the inputs or the expected result: every variant fails
            traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
            failure = _failure_row(error)
        if failure is not None:
            args = grads_out = expected = None
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            for variant in variants:
                yield {**stamp, "name": f"{op}.{direction}", "variant": variant, "bytes_moved": bytes_moved,
                       **failure}
            continue
        for variant, fn in variants.items():
            if not fits(variant):
                yield skipped(f"{op}.{direction}", variant, bytes_moved)
                continue
            failure = parity_failed = None
            began = time.monotonic()
            try:
                step = _make_step(fn, args, direction, grads_out)
                with _launch.poison_outputs():  # what our launchers leave unwritten reads NaN
                    results = step()  # also the first (compiling) call
                parity = _max_abs_err(results, expected)
                if op in ATTENTION_OPS and variant != "reference":  # every kernel a candidate
                    parity_failed = attention_parity_failure(results, expected, cfg.dtype, direction)
                elif variant == "ours":  # the references' own error is a yardstick, not judged
                    parity_failed = parity_failure(op, fn, args, results, cfg.dtype, direction, grads_out)
                results = None
                windows = []  # timed twice, back to back: a difference smaller than theirs is noise
                host_bound = 0
                for _ in range(2):
                    if direction == "bwd":
                        times = _times_backward(fn, args, grads_out, dev,
                                                CUDA_REPS if dev.type == "cuda" else cfg.cpu_reps)
                    elif dev.type == "cuda":
                        times = _times_cuda(lambda _: step(), CUDA_REPS)
                    else:
                        times = _times_cpu(step, cfg.cpu_reps)
                    host_bound += times.host_bound or 0
                    windows.append(times.times_ms)
                median, p20, p80 = quantiles_ms(windows[0] + windows[1])
                repeat = window_fields(statistics.median(windows[0]), statistics.median(windows[1]))
            except Exception as error:  # noqa: BLE001 -- one variant's failure must not lose the others
                # a forced kernel refusing: PyTorch's word for it, or the kernel's own (cuDNN's frontend);
                # not the device failing (an illegal access: the context is lost, an error for the device check)
                if op in ATTENTION_OPS and ("No available kernel" in str(error) or (
                        variant.startswith("sdpa:") and isinstance(error, RuntimeError)
                        and not isinstance(error, (torch.cuda.OutOfMemoryError, torch.AcceleratorError)))):
                    failure = {"status": "skipped", "note": f"{variant} refuses these inputs here: "
                                                            f"{str(error).strip().splitlines()[0]}"}
                else:
                    traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
                    failure = _failure_row(error)
            needed_s[variant] = time.monotonic() - began
            if failure is not None:  # outside the except block, so the traceback's tensors are gone
                step = None
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                yield {**stamp, "name": f"{op}.{direction}", "variant": variant, "bytes_moved": bytes_moved,
                       **failure}
                continue
            yield {
                **stamp,
                "name": f"{op}.{direction}",
                "variant": variant,
                "median_ms": median,
                "p20_ms": p20,
                "p80_ms": p80,
                "iterations": len(windows[0]) + len(windows[1]),
                "timer": "cuda_events" if dev.type == "cuda" else "perf_counter",
                **({"host_bound_reps": host_bound} if dev.type == "cuda" else {}),
                **repeat,
                "bytes_moved": bytes_moved,
                "gbps": bytes_moved / (median * 1e-3) / 1e9,
                **(_matmul_fields(variant, args, median) if op == "linear_gelu" else {}),
                **(_attention_fields(variant, args, direction, median) if op in ATTENTION_OPS else {}),
                "parity_max_abs_err": parity,
                **({"status": "parity_failed", "note": parity_failed} if parity_failed else
                   {"note": f"{host_bound} of {2 * CUDA_REPS} timed calls may include host time (the device "
                            "had reached the call before the host had queued it)"} if host_bound else {}),
            }
        for variant, why in unsupported.get(op, {}).items():
            yield {**stamp, "name": f"{op}.{direction}", "variant": variant, "bytes_moved": bytes_moved,
                   "status": "skipped", "note": why}
        del args, grads_out, expected


def main(argv: list[str] | None = None) -> int:
    """python -m benchmarks.kernels_suite: one JSON record per line on stdout, with the device and size
    defaults of `python -m benchmarks`."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernels_suite", allow_abbrev=False,
                                     description="Fused adaLN kernel benchmarks (one JSON record per line).")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when available, else cpu (fused kernels through the Triton interpreter)")
    parser.add_argument("--size", choices=sorted(SIZES), default=None,
                        help=f"tiny: B={SIZES['tiny'].B}, T={SIZES['tiny'].T}, D={SIZES['tiny'].D}, fp32 (dry run); "
                             f"full: B={SIZES['full'].B}, T={SIZES['full'].T}, D={SIZES['full'].D}, bf16 "
                             f"(SiT-XL/2 at 256 px). Default: full on cuda, tiny on cpu")
    cli = parser.parse_args(argv)
    device = cli.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernels (and triton) are imported in run()
    else:
        from benchmarks.common import interpreter_on_cuda  # the variable is the user's: triton may import

        if (refusal := interpreter_on_cuda(device)) is not None:
            parser.error(refusal)
    for record in run(device, cli.size or ("full" if device == "cuda" else "tiny")):
        print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
