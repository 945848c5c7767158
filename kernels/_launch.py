"""Host-side helpers shared by the fused adaLN launchers.

Nothing here is a kernel: input validation with messages that quote shapes, the choice of
BLOCK_D / num_warps / token tiling, the check that a CPU tensor can actually run (Triton
interpreter), and the output allocator with the test-only NaN poisoning switch.
"""
import contextlib
import functools
import importlib.metadata
import inspect
import math
import numbers
import os
import re
from collections.abc import Iterator

import torch
from torch.autograd import forward_ad

ACTIVATION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_D = 16384  # BLOCK_D holds a whole row in registers; beyond this it would spill heavily.
# Multiply-adds fused into FMAs (one rounding), as Triton compiled them by default up to 3.9; stated
# at every launch, since Triton 3.10 turns the default off (and 3.9 warns where it is left unsaid).
FP_FUSION = True

INTERPRETER_HINT = (
    "set TRITON_INTERPRET=1 before importing triton (and before importing kernels), "
    "or use fused_kernels=False"
)


@functools.lru_cache(maxsize=1)
def triton_version() -> tuple[int, int]:
    """The installed Triton's (major, minor), read without importing it (the interpreter is chosen at
    import); (0, 0) when it is not installed or its version cannot be read."""
    for distribution in ("triton", "pytorch-triton", "pytorch-triton-rocm"):
        try:
            version = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
        parts = [int(part) for part in re.findall(r"\d+", version)[:2]]
        return (parts[0], parts[1]) if len(parts) == 2 else (0, 0)
    return (0, 0)


def interpreter_requested() -> bool:
    """Whether TRITON_INTERPRET asks for the interpreter, read as the installed Triton reads it: 1,
    true, on, yes or y, in any case, from Triton 3.4 (its knobs); before that, and when the version is
    unknown, 1 only."""
    value = os.environ.get("TRITON_INTERPRET", "")
    if triton_version() < (3, 4):
        return value == "1"
    return value.lower() in ("1", "true", "on", "yes", "y")


def _patch_old_interpreter() -> None:
    """Let triton < 3.7's interpreter run our loops with numpy >= 2.4.

    That interpreter converts a scalar kernel value to a Python int (a `range(t_start, t_end)` bound)
    with int() of a one-element array, which numpy 2.4 refuses ("only 0-dimensional arrays can be
    converted to Python scalars"). triton 3.7 squeezes the array first; do the same for older ones.
    Only the CPU interpreter is touched (Triton 3.6 restores its patches after each kernel; 3.3 and
    older keep them).
    """
    if not interpreter_requested() or triton_version() >= (3, 7):
        return
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "sit_fast_patched", False):
        return

    def index(self):
        return int(self.handle.data.squeeze())

    def patch_lang_tensor(tensor, *scope):  # Triton 3.3 and older take no scope: their patches stay
        original(tensor, *scope)
        if scope:
            scope[0].set_attr(tensor, "__index__", index)
        else:
            tensor.__index__ = index

    patch_lang_tensor.sit_fast_patched = True
    interpreter._patch_lang_tensor = patch_lang_tensor


_patch_old_interpreter()


def bf16_bits_nearest_even(values):
    """fp32 values (a numpy array) -> the bits of the nearest bfloat16, ties to even, as uint16: the
    GPU's conversion (cvt.rn.bf16.f32). Overflow rounds to infinity; a NaN stays a (quiet) NaN."""
    import numpy as np

    values = np.ascontiguousarray(values, dtype=np.float32)
    bits = values.view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    quiet_nan = (bits >> 16) | 0x0040
    return np.where(np.isnan(values), quiet_nan, rounded).astype(np.uint16)


def _patch_interpreter_bf16_rounding() -> None:
    """Make the CPU interpreter convert float32 to bfloat16 as the GPU does: to the nearest value.

    Triton's interpreter (3.6 to 3.9 alike) truncates the low 16 bits, in every implicit cast and in
    a store of fp32 values through a bf16 pointer: half the elements of a bf16 output then land an
    ulp off the GPU's, and the error of every bf16 output is twice what the GPU gives. Under that
    the CPU's bf16 parity tests would judge kernels with a rounding they do not have. Only the
    interpreter is touched, and only its fp32 -> bf16 conversion.
    """
    if not interpreter_requested():
        return
    try:
        import triton.language as tl
        from triton.runtime import interpreter
        builder, handle = interpreter.InterpreterBuilder, interpreter.TensorHandle
    except (ImportError, AttributeError):
        return
    original = getattr(builder, "cast_impl", None)
    if original is None or getattr(original, "sit_fast_patched", False):
        return

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return handle(bf16_bits_nearest_even(src.data).reshape(src.data.shape), dst_type.scalar)
        return original(self, src, dst_type)

    cast_impl.sit_fast_patched = True
    builder.cast_impl = cast_impl


_patch_interpreter_bf16_rounding()


def _patch_interpreter_device_calls() -> None:
    """Let the CPU interpreter patch triton.language once per launch, not at every helper call.

    A launch patches the language module for the interpreter (a scope undone when the launch ends);
    then every call of a @triton.jit helper (kernels._rows) inside it patches the same module again,
    walking its members with inspect: about 2.5 ms a call, 15-45% of an interpreted launch's time at
    the kernel tests' shapes, by kernel and shape. Inside a launch, a helper's call that sees only
    modules patched already in it (by the launch, or by a helper before: those patches stay until the
    launch ends) patches nothing; anywhere else the interpreter's own code runs. What runs is the same.
    """
    if not interpreter_requested():
        return
    try:
        import triton.language as tl
        from triton.runtime import interpreter
        executor, original = interpreter.GridExecutor, interpreter._patch_lang
    except (ImportError, AttributeError):
        return
    if getattr(original, "sit_fast_patched", False):
        return
    launch_call = executor.__call__
    state = {"launch": False, "langs": set()}  # inside a launch; the modules patched in it

    def languages(fn) -> set[int]:
        return {id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)}

    class Patched:  # the launch's scope undoes the patch
        def restore(self) -> None:
            pass

    def patch_lang(fn):
        seen = languages(fn)
        if state["launch"] and seen and seen <= state["langs"]:  # (none seen: the interpreter's own error)
            return Patched()
        scope = original(fn)
        if state["launch"]:
            state["langs"] = state["langs"] | seen
        return scope

    def call(self, *args, **kwargs):
        outer = dict(state)
        state.update(launch=True, langs=set())
        try:
            return launch_call(self, *args, **kwargs)
        finally:
            state.update(outer)

    patch_lang.sit_fast_patched, patch_lang.original = True, original
    interpreter._patch_lang = patch_lang
    executor.__call__ = call


_patch_interpreter_device_calls()

# Default launch per direction: programs per streaming multiprocessor that token_tiling aims for, row
# elements per thread (block_config) and prefetch, as the tuning suite chose them on an H200 at
# D = 1152 (benchmarks/results/2026-12-04-h200: 4 warps, 32 programs per SM and prefetch ran the three
# forwards in 0.48 ms, where the earlier 16 warps without prefetch took 0.76;
# 2026-12-04-h200-host-free-timing: 8 warps, 4 programs per SM and prefetch the three backwards in
# 0.63 ms, where 16 warps, 8 programs per SM and no prefetch took 1.00). The forward kernels have no
# per-tile output, so many short tiles; the backward ones write one fp32 partial row per tile, so
# fewer, longer ones.
PROGRAMS_PER_SLOT = {"fwd": 32, "bwd": 4}
ELEMENTS_PER_THREAD = {"fwd": 16, "bwd": 8}
PREFETCH = {"fwd": 1, "bwd": 1}
# Rows per loop iteration of a program: 1 takes one row at a time; more take a (ROWS, BLOCK_D) tile,
# their reductions side by side (fwd_rows_per_step, bwd_rows_per_step; no GPU run has timed it yet).
ROWS_PER_STEP = {"fwd": 1, "bwd": 1}
ROWS_CHOICES = (1, 2, 4, 8)
# At one row per step: 1 takes the kernels' one-row loop, 0 their tile loop with (1, BLOCK_D) tiles
# (fwd_one_row_loop, bwd_one_row_loop; the tuning suite times both: if the tile loop is as fast, the
# one-row loops are not needed).
ONE_ROW_LOOP = {"fwd": 1, "bwd": 1}
# The MLP's bias + GELU kernels (kernels.bias_gelu; "gelu_fwd" the forward, "gelu_bwd" its backward)
# take (block_rows, block_h) tiles of the (tokens, 4D) hidden activations, several per program; their
# launch is untuned (no GPU run has searched it yet).
GELU_LAUNCH = {"num_warps": 4, "programs_per_slot": 8, "block_rows": 32, "block_h": 128}
GELU_BLOCK_ROWS = (1, 256)  # powers of two in these bounds
GELU_BLOCK_H = (16, 1024)
OVERRIDE_KEYS = ("fwd_num_warps", "bwd_num_warps", "fwd_programs_per_slot", "bwd_programs_per_slot",
                 "fwd_prefetch", "bwd_prefetch", "fwd_rows_per_step", "bwd_rows_per_step",
                 "fwd_one_row_loop", "bwd_one_row_loop",
                 *(f"gelu_{d}_{k}" for d in ("fwd", "bwd") for k in GELU_LAUNCH))
LAUNCH_ENV = "SIT_FAST_KERNEL_LAUNCH"


def _checked_overrides(source: str, overrides: dict) -> dict[str, int]:
    """The overrides that are set (None dropped), each validated; ValueError naming `source` otherwise."""
    checked = {}
    for key, value in overrides.items():
        if key not in OVERRIDE_KEYS:
            raise ValueError(f"{source}: unknown key {key!r}, expected one of {', '.join(OVERRIDE_KEYS)}")
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool):  # 2.0 == 2, but a Triton launch takes ints
            raise ValueError(f"{source}: {key} must be an integer, got {value!r}")
        if key.endswith("num_warps") and value not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"{source}: {key} must be a power of two from 1 to 32, got {value!r}")
        if key.endswith("programs_per_slot") and value < 1:
            raise ValueError(f"{source}: {key} must be an integer >= 1, got {value!r}")
        if key.endswith(("prefetch", "one_row_loop")) and value not in (0, 1):
            raise ValueError(f"{source}: {key} must be 0 or 1, got {value!r}")
        if key.endswith("rows_per_step") and value not in ROWS_CHOICES:
            raise ValueError(f"{source}: {key} must be one of {', '.join(map(str, ROWS_CHOICES))}, got {value!r}")
        for suffix, (low, high) in (("block_rows", GELU_BLOCK_ROWS), ("block_h", GELU_BLOCK_H)):
            if key.endswith(suffix) and not (low <= value <= high and value & (value - 1) == 0):
                raise ValueError(f"{source}: {key} must be a power of two from {low} to {high}, got {value!r}")
        checked[key] = value
    return checked


@functools.lru_cache(maxsize=8)
def _parse_launch_env(text: str) -> dict[str, int]:
    """SIT_FAST_KERNEL_LAUNCH="fwd_num_warps=8,bwd_prefetch=1", parsed and validated (ValueError)."""
    overrides = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not value.strip().isdecimal():  # isdigit() also takes "²", which int() refuses
            raise ValueError(f"{LAUNCH_ENV}={text!r}: expected KEY=INTEGER[,KEY=INTEGER...], e.g. "
                             f"fwd_num_warps=8,bwd_programs_per_slot=4; keys: {', '.join(OVERRIDE_KEYS)}")
        overrides[key.strip()] = int(value)
    return _checked_overrides(f"{LAUNCH_ENV}={text!r}", overrides)


def launch_settings() -> dict[str, int]:
    """The launch parameters set now: SIT_FAST_KERNEL_LAUNCH (from `python -m benchmarks tuning` on
    one's own GPU; read at every launch, so a bad value fails the first launch, not the import),
    with `launch_overrides` on top. Empty: the defaults. ValueError when the variable is malformed."""
    text = os.environ.get(LAUNCH_ENV, "").strip()
    if not text:
        return _overrides
    return {**_parse_launch_env(text), **_overrides}


_overrides: dict[str, int] = {}  # launch_overrides' settings


@contextlib.contextmanager
def launch_overrides(**overrides: int | None) -> Iterator[None]:
    """Launch with other num_warps / programs per SM while the context is active (kernel tuning).

    Keys: fwd_num_warps, bwd_num_warps (a power of two, 1 to 32), fwd_programs_per_slot,
    bwd_programs_per_slot (>= 1), fwd_prefetch, bwd_prefetch (0 or 1: load row t + 1 while row t is
    reduced), fwd_rows_per_step, bwd_rows_per_step (1, 2, 4 or 8 rows per loop iteration),
    fwd_one_row_loop, bwd_one_row_loop (0 or 1: at one row per step, the one-row loop or a tile loop
    of (1, BLOCK_D) tiles); for the bias + GELU kernels gelu_fwd_* and gelu_bwd_* with * one of
    num_warps, programs_per_slot, block_rows (a power of two, 1 to 256) and block_h (a power of two,
    16 to 1024); None keeps the current value. Results do not depend on them beyond float32 summation order.
    SIT_FAST_KERNEL_LAUNCH sets them for a whole process.
    """
    global _overrides
    checked = _checked_overrides("launch_overrides", overrides)
    previous = _overrides
    _overrides = {**previous, **checked}
    try:
        yield
    finally:
        _overrides = previous


def launch_params(D: int, direction: str) -> tuple[int, int, int, int]:
    """(num_warps, programs per SM, prefetch, rows per step) a launch of row size D uses now ("fwd" or
    "bwd")."""
    per_slot = launch_settings().get(f"{direction}_programs_per_slot") or PROGRAMS_PER_SLOT[direction]
    return block_config(D, direction)[1], per_slot, prefetch(direction), rows_per_step(direction)


def gelu_launch(direction: str) -> dict[str, int]:
    """The bias + GELU kernels' launch ("fwd" or "bwd"): GELU_LAUNCH, with SIT_FAST_KERNEL_LAUNCH's and
    `launch_overrides`' gelu_<direction>_* settings on top."""
    settings = launch_settings()
    return {key: settings.get(f"gelu_{direction}_{key}", value) for key, value in GELU_LAUNCH.items()}


def rows_per_step(direction: str) -> int:
    """Rows a program takes per loop iteration (ROWS_PER_STEP; `launch_overrides`)."""
    return launch_settings().get(f"{direction}_rows_per_step", ROWS_PER_STEP[direction])


def one_row_loop(direction: str) -> bool:
    """Whether one row per step takes the kernels' one-row loop (ONE_ROW_LOOP; `launch_overrides`)."""
    return bool(launch_settings().get(f"{direction}_one_row_loop", ONE_ROW_LOOP[direction]))


def row_loop(direction: str) -> dict[str, int | bool]:
    """The kernels' loop constexprs: ROWS (rows_per_step) and ONE_ROW_LOOP (one_row_loop)."""
    return {"ROWS": rows_per_step(direction), "ONE_ROW_LOOP": one_row_loop(direction)}


def prefetch(direction: str) -> bool:
    """Whether the kernels load row t + 1 before reducing row t (PREFETCH; `launch_overrides`)."""
    return bool(launch_settings().get(f"{direction}_prefetch", PREFETCH[direction]))


# Test-only: when True, every buffer a launcher allocates for a kernel to write is filled with NaN
# first, so an element the kernel forgets to write shows up as a NaN instead of stale memory.
_poison_outputs = False


@contextlib.contextmanager
def poison_outputs(enabled: bool = True) -> Iterator[None]:
    """Fill kernel output buffers with NaN before launch while the context is active (tests)."""
    global _poison_outputs
    previous, _poison_outputs = _poison_outputs, enabled
    try:
        yield
    finally:
        _poison_outputs = previous


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty for a buffer the kernel writes completely (NaN-filled under poison_outputs)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if _poison_outputs:
        out.fill_(float("nan"))
    return out


def check_activation(op: str, name: str, t: torch.Tensor, ref_shape: torch.Size | None = None) -> None:
    """A (B, T, D) activation: 3-D, fp32/bf16/fp16, and the same shape as `ref_shape` if given."""
    if t.dim() != 3:
        raise ValueError(f"{op}: {name} must be 3-D (B, T, D), got shape {tuple(t.shape)}")
    if ref_shape is not None and t.shape != ref_shape:
        raise ValueError(f"{op}: {name} must have the shape of x {tuple(ref_shape)}, got {tuple(t.shape)}")
    if t.dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"{op}: {name} must be float32, bfloat16 or float16, got {t.dtype} "
                         f"(shape {tuple(t.shape)})")
    D = t.shape[-1]
    if not 1 <= D <= MAX_D:
        raise ValueError(f"{op}: feature size D must be in [1, {MAX_D}], got {name} shape {tuple(t.shape)}")


def check_eps(op: str, eps: float) -> None:
    """ValueError unless eps is a finite number >= 0 (a negative one makes rsqrt(var + eps) NaN). Skipped
    while torch.compile traces, which may take eps as a symbol (dynamic=True, or after a second value)
    that the check cannot read without breaking the graph: the ops check it again as they run (here it
    still sees the caller's value, a bool too, which the ops' schema turns into a float)."""
    if torch.compiler.is_compiling():
        return
    if not (isinstance(eps, numbers.Real) and not isinstance(eps, bool) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{op}: eps must be a finite number >= 0, got {eps!r}")


def check_out_dtype(op: str, name: str, dtype: torch.dtype | None, x: torch.Tensor) -> torch.dtype:
    """An optional output dtype: None means x's dtype; otherwise float32, bfloat16 or float16."""
    if dtype is None:
        return x.dtype
    if dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"{op}: {name} must be None, torch.float32, torch.bfloat16 or torch.float16, "
                         f"got {dtype}")
    return dtype


def check_modulation(
    op: str, name: str, t: torch.Tensor, x: torch.Tensor, extra: dict[str, torch.dtype] | None = None
) -> None:
    """A per-sample (B, D) modulation vector: in x's dtype or in float32 (the autocast case), or in
    the dtype of another activation named in `extra` (e.g. {"y": y.dtype, "h": h_dtype})."""
    B, _, D = x.shape
    if t.dim() != 2 or t.shape[0] != B or t.shape[1] != D:
        raise ValueError(f"{op}: {name} must have shape (B, D) = ({B}, {D}) to match x {tuple(x.shape)}, "
                         f"got {tuple(t.shape)}")
    allowed = {x.dtype: "x's dtype"}
    for other, dtype in (extra or {}).items():
        allowed.setdefault(dtype, f"{other}'s dtype")
    if t.dtype not in allowed and t.dtype != torch.float32:
        listing = [f"{dtype} ({why})" for dtype, why in allowed.items()]
        if torch.float32 not in allowed:
            listing.append("torch.float32")
        listing = ", ".join(listing[:-1]) + " or " + listing[-1] if len(listing) > 1 else listing[0]
        raise ValueError(f"{op}: {name} must be {listing}, got {t.dtype} "
                         f"(x {tuple(x.shape)} {x.dtype}, {name} {tuple(t.shape)})")


def check_same_device(op: str, **tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} {tuple(tensors[n].shape)} on {d}" for n, d in devices.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {listing}")


def check_runnable(op: str, device: torch.device, kernel: object) -> None:
    """The kernels run on CUDA, or on CPU when they were built by the Triton interpreter."""
    if device.type == "cuda":
        return
    if device.type != "cpu":
        raise ValueError(f"{op}: tensors must be on a CUDA device (or CPU under the Triton interpreter), "
                         f"got {device}")
    from triton.runtime.interpreter import InterpretedFunction

    if not interpreter_requested():
        raise RuntimeError(f"{op}: got CPU tensors but the Triton interpreter is not enabled; {INTERPRETER_HINT}")
    if not isinstance(kernel, InterpretedFunction):
        raise RuntimeError(f"{op}: got CPU tensors and TRITON_INTERPRET={os.environ['TRITON_INTERPRET']}, but the "
                           f"kernels were compiled before it was set, so they cannot run on the CPU; "
                           f"{INTERPRETER_HINT}")


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Make a CUDA `device` current for a launch, when it is not already: Triton launches on the
    current device and its stream, and a tensor on another GPU would be read from the wrong one."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def block_config(D: int, direction: str = "fwd") -> tuple[int, int]:
    """(BLOCK_D, num_warps): one whole row per block, masked up to the next power of two.

    ELEMENTS_PER_THREAD[direction] row elements per thread (2 to 32 warps): 16 in the forwards (4
    warps at D = 1152), 8 in the backwards (8 warps). Checked with ptxas for sm_90, compiled as
    launched (contiguous rows, sizes divisible by 16): at BLOCK_D = 2048 (D = 1152) the fused backward needs
    64 registers with 16 warps, 96 with 8, 168 with 4 (103, 165, 240 with prefetch), spilling only at
    2 warps; BLOCK_D = 8192 and 16384 (32 warps, 8 and 16 elements per thread) spill a little in the
    backward kernels. A program taking R rows per step (rows_per_step) gets R times the warps, up to
    32. `launch_overrides` (the kernel tuning benchmark) replaces num_warps per direction ("fwd" or
    "bwd").
    """
    block_d = next_power_of_2(D)
    lanes = block_d * rows_per_step(direction)  # a program taking several rows a step holds them all
    default = min(max(lanes // (32 * ELEMENTS_PER_THREAD[direction]), 2), 32)
    num_warps = launch_settings().get(f"{direction}_num_warps") or default
    return block_d, num_warps


def next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1


def _program_slots(device: torch.device) -> int:
    """How many programs keep the device busy: streaming multiprocessors on CUDA, a few on CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def token_tiling(B: int, T: int, device: torch.device, direction: str) -> tuple[int, int]:
    """Split each sample's T tokens into tiles, one program per (sample, tile).

    Returns (rows_per_program, n_tiles) with n_tiles * rows_per_program >= T and every tile non-empty.
    A program loads its sample's modulation vectors once and loops over its rows; backward kernels
    also keep one fp32 partial sum per tile, so fewer, longer tiles mean less partial traffic. The
    target is PROGRAMS_PER_SLOT[direction] programs per streaming multiprocessor ("fwd" or "bwd"),
    unless `launch_overrides` says otherwise.
    """
    if T == 0:
        return 1, 0
    per_slot = launch_settings().get(f"{direction}_programs_per_slot") or PROGRAMS_PER_SLOT[direction]
    target_programs = _program_slots(device) * per_slot
    n_tiles = min(T, max(1, math.ceil(target_programs / max(B, 1))))
    rows_per_program = math.ceil(T / n_tiles)
    n_tiles = math.ceil(T / rows_per_program)
    return rows_per_program, n_tiles


def needs_backward(*tensors: torch.Tensor) -> bool:
    """Whether autograd will record this call (grad mode on and some input requires grad)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def refuse_forward_ad(op: str, **tensors: torch.Tensor) -> None:
    """Forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) has no formula here: a custom op
    would drop the tangents and return zeros, so a dual input is refused instead. Skipped while
    torch.compile traces: the check is eager bookkeeping, kept out of the graph."""
    if torch.compiler.is_compiling():
        return
    for name, t in tensors.items():
        if forward_ad.unpack_dual(t).tangent is not None:
            raise NotImplementedError(
                f"{op}: forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) is not supported by the "
                f"fused kernels, only backward; {name} {tuple(t.shape)} carries a tangent. Use the reference "
                "ops: SiT(..., fused_kernels=False), or --fused-kernels off"
            )


def refuse_double_backward(op: str):
    """The autograd formula of a `*_backward` op: a second derivative (autograd.grad(..., create_graph=
    True), then a backward through it) has no kernels here, and says so instead of torch's "no autograd
    formula was registered"."""

    def backward(ctx, *grads):
        raise NotImplementedError(
            f"{op}: a second derivative (a backward through a gradient taken with create_graph=True) is not "
            "supported by the fused kernels, only first derivatives. Use the reference ops: SiT(..., "
            "fused_kernels=False), or --fused-kernels off"
        )

    return backward


def check_saved_for_backward(op: str, x_hat: torch.Tensor, grad: torch.Tensor) -> None:
    if x_hat.shape[-1] != grad.shape[-1]:
        raise RuntimeError(
            f"{op}: backward through a forward that ran without saving for backward "
            "(inputs did not require grad when it ran)"
        )
