"""What every suite shares: the record schema, the variants, the sizes, timing, ceilings, the results files.

A record is a flat dict with exactly the keys of FIELDS. A field is null only where it cannot exist:
`SUITE_FIELDS` says which fields a suite fills, `CPU_NULL` which of those have no meaning on a CPU
(peak memory, MFU against a GPU peak table), and a record whose status is not "ok" (out of memory,
skipped for time, failed) may leave its measurements null and says why in `note`.
`validate_record` applies these rules; the CI dry run checks every record with it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from typing import Callable

import numpy as np
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA_VERSION = 2  # 2: window_spread

#################################################################################
#                                 Record schema                                 #
#################################################################################

FIELDS: dict[str, str] = {
    "suite": "kernels | parity | train | sample | memory | profile | tuning",
    "name": "what was measured: train_step, ode_euler_50_cfg4, sde_euler_250_cfg4, forward_backward, activations, "
            "a kernel and direction (layernorm_modulate.fwd), sample_call (profile)",
    "variant": "reference | reference+bf16+sdpa | reference+bf16+sdpa+compile | ours (kernels: the kernel suite's; "
               "tuning: ours and its launch settings)",
    "status": "ok | oom | skipped | error | parity_failed",
    "note": "why a figure is missing, or what else to know (null when there is nothing to say)",
    "device": "device name: torch.cuda.get_device_name(), or the CPU model",
    "device_type": "cuda | cpu",
    "dtype": "compute precision: fp32 (TF32 matmuls on CUDA outside the parity suite) | bf16 (autocast)",
    "model": "model configuration (SiT-XL/2 for --size full)",
    "shapes": "input shapes of the measurement",
    "batch_size": "images per step or per sampling batch (kernels: B)",
    "median_ms": "median time per step / kernel call / full sample of the batch (sampling: extrapolated)",
    "p20_ms": "20th percentile of the same",
    "p80_ms": "80th percentile of the same",
    "iterations": "timed repetitions (warm-up and compilation excluded)",
    "window_spread": "the version timed twice, back to back: |a - b| / min(a, b) of the two windows' medians "
                     "(extra.window_medians_ms); a difference between versions smaller than this is noise",
    "timer": "cuda_events (per repetition; kernels: with the device held while the host queues each call, "
             "extra.host_bound_reps counting those it may not have covered) | perf_counter",
    "steps_timed": "sampling: model calls timed per repetition; median_ms scales them to the full sampler",
    "images_per_s": "batch_size / median time",
    "flops_per_image": "model FLOPs per image (sit_fast.flops: train 3 x forward; sampling 2 x forward per call, CFG)",
    "tflops": "achieved model TFLOP/s at the median time",
    "peak_tflops": "dense peak TFLOP/s of the device for this dtype, from sit_fast.flops.PEAK_TFLOPS",
    "peak_tflops_source": "which table entry gave peak_tflops",
    "mfu": "tflops / peak_tflops",
    "fraction_of_matmul_ceiling": "tflops / the bf16 matmul ceiling measured at the start of the run (bf16 variants; "
                                  "null for fp32)",
    "bytes_moved": "kernels: bytes read + written per call",
    "gbps": "kernels: bytes_moved / median time, GB/s",
    "fraction_of_copy_bw": "kernels: gbps / the copy ceiling measured at the start of the run",
    "peak_memory_bytes": "torch.cuda.max_memory_allocated over the timed steps (parameters and optimizer included)",
    "activation_bytes_per_image": "bytes saved for backward per image (sit_fast.memory, fake tensors, eager maths)",
    "measured_activation_bytes_per_image": "memory: (peak(b2) - peak(b1)) / (b2 - b1) of forward + backward",
    "parity_output_rel_err": "||out - ref|| / ||ref|| against the fp32 eager reference (sit_fast.parity)",
    "parity_loss_rel_err": "the same for the loss",
    "parity_grad_rel_err_max": "the largest over all parameter gradients",
    "parity_max_abs_err": "largest absolute difference of the output (kernels, tuning: of every output and input "
                          "gradient, against the reference computed in float32; NaN if any is NaN)",
    "parity_ok": "every parity figure within sit_fast.parity.TOLERANCES",
    "parity_tolerances": "the tolerances applied (the parity tests' own)",
    "variant_config": "how the variant was built: attention backend, fused kernels, autocast, compile, CUDA graphs",
    "extra": "suite-specific details (batch search, per-call times, ...)",
    "torch_version": "torch.__version__",
    "triton_version": "triton.__version__ (null when triton is missing)",
    "cuda_version": "torch.version.cuda (null for a CPU build of torch)",
    "python_version": "platform.python_version()",
    "git_commit": "git rev-parse HEAD (+dirty), or $SIT_FAST_GIT_COMMIT where the tree has no .git",
    "date": "UTC time of the record, ISO 8601",
}

# Who the record is and where it ran: never null (triton_version, cuda_version: null without them).
IDENTITY = {
    "suite", "name", "variant", "status", "device", "device_type", "extra", "torch_version", "triton_version",
    "cuda_version", "python_version", "git_commit", "date",
}
_COMMON = {"dtype", "shapes"}
_TIMING = {"median_ms", "p20_ms", "p80_ms", "iterations", "timer"}
_THROUGHPUT = {"images_per_s", "flops_per_image", "tflops", "peak_tflops", "peak_tflops_source", "mfu",
               "fraction_of_matmul_ceiling"}
_PARITY = {"parity_output_rel_err", "parity_loss_rel_err", "parity_grad_rel_err_max", "parity_max_abs_err",
           "parity_ok", "parity_tolerances"}
_MODEL = {"model", "batch_size", "variant_config"}
# Fields each suite fills in an ok record; every other field of its records is null.
SUITE_FIELDS: dict[str, set[str]] = {
    "kernels": _COMMON | _TIMING | {"window_spread", "bytes_moved", "gbps", "fraction_of_copy_bw",
                                    "parity_max_abs_err"},
    "tuning": _COMMON | _TIMING | {"bytes_moved", "gbps", "fraction_of_copy_bw", "parity_max_abs_err"},
    "train": _COMMON | _MODEL | _TIMING | _THROUGHPUT | _PARITY | {"window_spread", "peak_memory_bytes",
                                                                   "activation_bytes_per_image"},
    "sample": _COMMON | _MODEL | _TIMING | _THROUGHPUT | {"window_spread", "steps_timed", "peak_memory_bytes",
                                                           "parity_output_rel_err", "parity_max_abs_err", "parity_ok",
                                                           "parity_tolerances"},
    "parity": _COMMON | _MODEL | _PARITY,
    "memory": _COMMON | _MODEL | {"peak_memory_bytes", "activation_bytes_per_image",
                                  "measured_activation_bytes_per_image"},
    "profile": _COMMON | _MODEL,  # its figures are in extra (benchmarks/profile_suite.py)
}
# Train and sample records copy their parity figures from the parity suite of the same run.
LINKED_PARITY = _PARITY
# Figures that do not exist on a CPU: GPU memory and the GPU peak table.
CPU_NULL = {"peak_memory_bytes", "measured_activation_bytes_per_image", "peak_tflops", "peak_tflops_source", "mfu"}
ALWAYS_NULLABLE = {"note", "triton_version", "cuda_version"}
# Fields the kernel suite's rows may not carry (its shapes say what ran; its timer is its own).
OPTIONAL = {"kernels": {"batch_size", "iterations", "timer"}, "tuning": {"batch_size", "iterations", "timer"}}


def interpreter_on_cuda(device_type: str) -> str | None:
    """The refusal of a CUDA run whose TRITON_INTERPRET asks for Triton's interpreter (its times would be
    recorded as the CUDA kernels'), or None. Imports kernels (and so triton): call it once the variable is set."""
    if device_type != "cuda":
        return None
    from kernels import interpreter_requested

    if not interpreter_requested():
        return None
    return f"TRITON_INTERPRET={os.environ['TRITON_INTERPRET']} would run the CUDA kernels in the interpreter; unset it"


def validate_record(record: dict, parity_ran: bool = True) -> list[str]:
    """Problems with a record under the rules above (empty when it is well formed)."""
    problems = []
    missing = [k for k in FIELDS if k not in record]
    unknown = [k for k in record if k not in FIELDS]
    if missing:
        problems.append(f"missing fields {missing}")
    if unknown:
        problems.append(f"unknown fields {unknown}")
    suite = record.get("suite")
    if suite not in SUITE_FIELDS:
        return problems + [f"unknown suite {suite!r}"]
    optional = OPTIONAL.get(suite, set())
    ok = record.get("status") == "ok"
    for key in FIELDS:
        value = record.get(key)
        if key not in IDENTITY | SUITE_FIELDS[suite] | optional | ALWAYS_NULLABLE:
            if value is not None:
                problems.append(f"{key} should be null in a {suite} record, got {value!r}")
        elif value is not None or key in ALWAYS_NULLABLE or key in optional:
            continue
        elif key in IDENTITY:
            problems.append(f"{key} is null")
        elif not ok:
            continue  # out of memory, skipped or failed: the note says why
        elif record.get("device_type") == "cpu" and key in CPU_NULL:
            continue
        elif key == "fraction_of_matmul_ceiling" and record.get("dtype") != "bf16":
            continue  # the ceiling is a bf16 one
        elif suite in ("train", "sample") and key in LINKED_PARITY and not parity_ran:
            continue
        else:
            problems.append(f"{key} is null in an ok {suite} record")
    if not ok and not record.get("note"):
        problems.append(f"status {record.get('status')!r} without a note")
    return problems


#################################################################################
#                                Variants, sizes                                #
#################################################################################

@dataclasses.dataclass(frozen=True)
class Variant:
    """One way of running the same model on the same weights and inputs."""

    name: str
    attn_backend: str
    """sit_fast.attention backend name: "math" (reference), "sdpa", "auto"."""
    fused_kernels: bool | str
    """SiT(fused_kernels=...): False (reference ops) or "auto" (Triton on CUDA / the interpreter on CPU)."""
    autocast_dtype: torch.dtype | None
    """None: fp32 (TF32 matmuls on CUDA); torch.bfloat16: bf16 autocast."""
    compile: str | None
    """None; "model": torch.compile of the whole forward (nn.Module.compile); "blocks": SiT.compile_blocks."""
    cuda_graphs: bool
    """Sampling on CUDA: replay each model forward from a CUDA graph (sit_fast.sampling.ModelForwards)."""
    cast_weights: bool = False
    """Sampling under autocast: matmul weights stored in the autocast dtype (SiT.cast_matmul_weights_)."""

    @property
    def dtype_name(self) -> str:
        return "bf16" if self.autocast_dtype == torch.bfloat16 else "fp32"

    def autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)


VARIANTS: tuple[Variant, ...] = (
    # fp32 as upstream runs: its timm Attention takes SDPA (timm >= 0.9), memory-efficient in fp32 on CUDA
    Variant("reference", "sdpa", False, None, None, False),
    Variant("reference+bf16+sdpa", "sdpa", False, torch.bfloat16, None, False),
    # Regional compilation (every block through one compiled graph, fullgraph=True), as a user would
    # compile upstream's blocks; a whole-model compile of SiT-XL/2 costs 60-120 s per shape and would
    # not fit the GPU suite's 8 minutes. compile="model" remains available.
    Variant("reference+bf16+sdpa+compile", "sdpa", False, torch.bfloat16, "blocks", False),
    Variant("ours", "auto", "auto", torch.bfloat16, "blocks", True, cast_weights=True),
)
VARIANTS_BY_NAME = {v.name: v for v in VARIANTS}
# What the parity suite compares every variant with: the upstream maths written out (softmax(QK^T/sqrt(d))V
# in fp32), no library kernel in between.
PARITY_REFERENCE = Variant("reference", "math", False, None, None, False)
SUITE_LEVEL = Variant("-", "-", False, None, None, False)  # names no variant: a whole suite that failed


@dataclasses.dataclass(frozen=True)
class SizeConfig:
    """Everything --size changes."""

    name: str
    model_name: str
    model_kwargs: dict
    """SiT(...) arguments (the variant adds attn_backend and fused_kernels)."""
    train_batches: tuple[int, ...]
    """Batch sizes tried for the training step, largest first; the first that fits is timed."""
    warmup: int
    """Untimed steps after the first (compiling) call."""
    iters: int
    """Timed steps."""
    sample_batches: tuple[int, ...]
    steps_timed: int
    """Model calls per timed sampling run (the full sampler's time is extrapolated from them)."""
    latency_steps_timed: int
    """The same at a batch of 16 or fewer (the latency figures), whose calls are short enough that a
    few more cost little and steady the figure."""
    sample_iters: int
    parity_batch: int
    memory_batches: tuple[int, int]
    """Two batch sizes whose peak-memory difference gives the measured activation bytes per image."""
    budgets_s: dict
    """Default share of the time of each suite, seconds (the leftover of a suite flows on); 0: the
    suite gets whatever the others left (tuning, which runs last)."""
    deadline_s: float
    """Default time for the whole run."""
    copy_bytes: int
    matmul_n: int


def _xl2_kwargs() -> dict:
    from sit_fast.models import model_config

    return dict(model_config("SiT-XL/2"), input_size=32, in_channels=4, num_classes=1000, learn_sigma=True)


SIZES: dict[str, Callable[[], SizeConfig]] = {
    "tiny": lambda: SizeConfig(
        # 4 tokens: on the CPU the fused kernels run in the Triton interpreter, whose cost grows with
        # the number of rows (B x T); head dim 72 keeps a size that is not a power of two.
        name="tiny", model_name="SiT-tiny (depth 2, hidden 72, 1 head of 72, patch 2, 4x4x4 latent, 10 classes)",
        model_kwargs=dict(input_size=4, patch_size=2, in_channels=4, hidden_size=72, depth=2, num_heads=1,
                          num_classes=10, learn_sigma=True),
        train_batches=(2,), warmup=0, iters=2, sample_batches=(1,), steps_timed=2,
        latency_steps_timed=2, sample_iters=1,
        parity_batch=2, memory_batches=(1, 2),
        # The interpreter makes the kernels and the launch search the slowest suites here (about 11 s
        # and 15 s on two idle cores, of a whole run of about 45 s), and since the kernels keep to
        # their box, the deadline is sized for a machine several times as slow.
        budgets_s={"kernels": 70, "parity": 25, "train": 25, "sample": 25, "memory": 10, "profile": 15,
                   "tuning": 0},
        deadline_s=480,
        copy_bytes=16 << 20, matmul_n=256,
    ),
    "full": lambda: SizeConfig(
        name="full", model_name="SiT-XL/2 (256px: latent 32x32x4, 1000 classes)", model_kwargs=_xl2_kwargs(),
        train_batches=(256, 128, 64, 32), warmup=2, iters=5, sample_batches=(8, 256), steps_timed=3,
        latency_steps_timed=12, sample_iters=3,
        parity_batch=4, memory_batches=(8, 16),
        # 400 s of measurements, plus start-up and at most one compilation running over its estimate:
        # under the GPU suite's 8-minute budget. Training and sampling, where the goals are, get the
        # largest shares; gpu_session.sh also runs the parity tests natively after the suite. Parity's
        # share holds its first case, ours compiled (expected_cost_s: 40 s), also at gpu_session.sh's
        # 370 s, where every box is about 0.7 of its share, even if every suite before takes its whole box
        # (tested): the train and sample records quote it.
        # The profile suite would take all the time left if tuning's share were 0 (the others' leftover):
        # its 12 keeps a sixth of what profile starts with for the launch search after it. The kernels
        # suite's 85 (about 58 s at 370): the first H200 run took 35.6 s for 27 rows, 9 of them compiled,
        # and 53.7 s for the same rows with the timer of since (the host queues each call while the device
        # sleeps), about 2 s a row; it has 46 rows now, 12 compiled: about 90 s, so at 370 the box holds
        # the adaLN ops' rows and the MLP's, which decide a default (attention's in part, fwd_bwd last).
        # Its share came out of tuning's (30 before): the suites between keep their worst-case boxes.
        budgets_s={"kernels": 85, "parity": 60, "train": 150, "sample": 120, "memory": 25, "profile": 60,
                   "tuning": 12},
        deadline_s=400,
        copy_bytes=1 << 30, matmul_n=8192,
    ),
}


#################################################################################
#                          Environment and ceilings                             #
#################################################################################

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    """$SIT_FAST_GIT_COMMIT when set (the device's copy of the tree has no .git), else HEAD (with
    "+dirty" when tracked files changed)."""
    if os.environ.get("SIT_FAST_GIT_COMMIT"):
        return os.environ["SIT_FAST_GIT_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git; set SIT_FAST_GIT_COMMIT)"
    return head + ("+dirty" if dirty else "")


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {
        "device": device_name(device),
        "device_type": device.type,
        "torch_version": torch.__version__,
        "triton_version": triton_version,
        "cuda_version": torch.version.cuda,
        "python_version": platform.python_version(),
        "git_commit": git_commit(),
        "date": utc_now(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
        "cpu_count": os.cpu_count(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(total_memory_bytes=props.total_memory, multiprocessors=props.multi_processor_count,
                   compute_capability=f"{props.major}.{props.minor}")
    return env


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def measure_ceilings(device: torch.device, size: SizeConfig) -> dict:
    """The two ceilings every figure is read against: device-to-device copy GB/s, bf16 matmul TFLOP/s.

    Copy: dst.copy_(src) of size.copy_bytes of fp32, counting bytes read + written. Matmul: an n x n
    by n x n bf16 product, 2 n^3 FLOPs. Both on random data (never zeros). On CUDA each runs for half
    a second before it is timed (the first measurements of a run: an idle GPU's clocks ramp up under
    load, and a ceiling measured low would flatter every fraction of it), then 100 times.
    """
    cuda = device.type == "cuda"
    iters = 100 if cuda else 20
    src = torch.randn(size.copy_bytes // 4, device=device)
    dst = torch.empty_like(src)
    if cuda:
        keep_busy(functools.partial(dst.copy_, src), device, 0.5)
    copy = time_fn(functools.partial(dst.copy_, src), device, warmup=3, iters=iters)
    copy_bytes = 2 * src.numel() * src.element_size()
    del src, dst
    n = size.matmul_n
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    c = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    if cuda:
        keep_busy(functools.partial(torch.mm, a, b, out=c), device, 0.5)
    matmul = time_fn(functools.partial(torch.mm, a, b, out=c), device, warmup=3, iters=iters)
    del a, b, c
    free_memory(device)
    return {
        "copy_gbps": copy_bytes / (copy.median_ms * 1e-3) / 1e9,
        "copy_bytes": copy_bytes,
        "copy_median_ms": copy.median_ms,
        "matmul_tflops": 2 * n**3 / (matmul.median_ms * 1e-3) / 1e12,
        "matmul_shape": [n, n, n],
        "matmul_dtype": "bf16",
        "matmul_median_ms": matmul.median_ms,
        "timer": copy.timer,
    }


#################################################################################
#                                    Timing                                     #
#################################################################################

@dataclasses.dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    iterations: int
    timer: str

    @classmethod
    def from_times(cls, times_ms: list[float], timer: str) -> "Timing":
        p20, median, p80 = np.percentile(np.asarray(times_ms), [20, 50, 80])
        return cls(float(median), float(p20), float(p80), len(times_ms), timer)

    def scaled(self, factor: float) -> "Timing":
        return dataclasses.replace(self, median_ms=self.median_ms * factor, p20_ms=self.p20_ms * factor,
                                   p80_ms=self.p80_ms * factor)

    def fields(self) -> dict:
        return dict(median_ms=self.median_ms, p20_ms=self.p20_ms, p80_ms=self.p80_ms, iterations=self.iterations,
                    timer=self.timer)


def keep_busy(fn: Callable[[], object], device: torch.device, seconds: float) -> None:
    """Run fn, in groups of 10, until `seconds` of wall time have passed."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(10):
            fn()
        synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> Timing:
    """Run fn warmup times untimed, then iters times, each timed on its own.

    CUDA: a pair of events around each call (device time; the host may run ahead), one synchronize at
    the end. CPU: perf_counter around each call.
    """
    for _ in range(warmup):
        fn()
    return Timing.from_times(*_times_ms(fn, device, iters))


def _times_ms(fn: Callable[[], object], device: torch.device, iters: int) -> tuple[list[float], str]:
    """Milliseconds of each of iters calls of fn, and the timer."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        for start, end in zip(starts, ends):
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) for s, e in zip(starts, ends)], "cuda_events"
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times, "perf_counter"


def time_twice(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> tuple[Timing, dict]:
    """fn timed in two windows of iters calls, back to back, after warmup untimed calls: the Timing of
    both windows' calls together (2 x iters), and window_fields of the two windows' medians."""
    for _ in range(warmup):
        fn()
    first, timer = _times_ms(fn, device, iters)
    second, _ = _times_ms(fn, device, iters)
    # each window's median as the pooled one is taken (np.percentile), so that it lies between them
    return Timing.from_times(first + second, timer), window_fields(Timing.from_times(first, timer).median_ms,
                                                                   Timing.from_times(second, timer).median_ms)


def window_fields(first_ms: float, second_ms: float) -> dict:
    """The fields of a version timed twice, back to back: window_spread (|a - b| / min(a, b); a
    difference between versions smaller than it is noise) and, for extra, window_medians_ms [a, b]."""
    low = min(first_ms, second_ms)
    spread = abs(first_ms - second_ms) / low if low > 0 else None
    return {"window_spread": spread, "window_medians_ms": [first_ms, second_ms]}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Once a measurement of a variant has run, the next one that compiles the same model again (caches
# warm) is expected to take at most this many times as long, rather than expected_cost_s's guess.
OBSERVED_MARGIN = 1.5


def expected_cost_s(size: SizeConfig, variant: Variant) -> float:
    """Rough seconds a measurement of this variant needs (compilation dominates at full size)."""
    if size.name == "tiny":
        return 0.0
    return {"model": 90.0, "blocks": 40.0, None: 10.0}[variant.compile]


def error_note(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip().splitlines()[0]
    return text if len(text) <= 300 else text[:297] + "..."


class Budget:
    """A suite's time box: measurements that would not fit in what is left are skipped and recorded so."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.start = time.monotonic()

    def remaining(self) -> float:
        return self.seconds - (time.monotonic() - self.start)

    def allows(self, needed_s: float) -> bool:
        return self.remaining() >= needed_s


#################################################################################
#                                Memory helpers                                 #
#################################################################################

def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def device_lost(device: torch.device) -> str | None:
    """What went wrong when the process's CUDA context no longer works (a sticky error such as an
    illegal memory access fails every later call), else None. Always None on the CPU."""
    if device.type != "cuda":
        return None
    try:
        torch.cuda.synchronize(device)
        torch.ones(1, device=device).add_(1).item()
    except Exception as error:  # noqa: BLE001 -- whatever the driver raises, the answer is the same
        return error_note(error)
    return None


# nvidia-smi's names for what the GPU is doing now; the reasons for lowered clocks are
# clocks_event_reasons.active in recent drivers, clocks_throttle_reasons.active in older ones.
DEVICE_STATE_FIELDS = ("clocks.sm", "clocks.mem", "clocks.max.sm", "power.draw", "temperature.gpu")
CLOCK_REASON_FIELDS = ("clocks_event_reasons.active", "clocks_throttle_reasons.active")


def device_state(device: torch.device, run=subprocess.run) -> list[dict] | None:
    """Each GPU's clocks (MHz), power (W), temperature (C) and the reasons its clocks are held down
    (a bit mask; 0x0 or 0x1, idle, is none), as nvidia-smi reads them now: a run whose clocks fell
    (heat, power cap) says so beside its figures. None on the CPU; [{"error": ...}] where nvidia-smi
    cannot say."""
    if device.type != "cuda":
        return None
    problem = "no answer"
    for reason_field in (*CLOCK_REASON_FIELDS, None):
        fields = ("index", *DEVICE_STATE_FIELDS, *([reason_field] if reason_field else []))
        try:
            proc = run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"],
                       capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError) as error:
            return [{"error": error_note(error)}]
        if proc.returncode != 0:  # a field this driver does not know: ask without it
            lines = (proc.stdout + proc.stderr).strip().splitlines()
            problem = lines[-1] if lines else f"exit status {proc.returncode}"
            continue
        states = []
        for line in proc.stdout.strip().splitlines():
            values = [v.strip() for v in line.split(",")]
            state = {}
            for field, value in zip(fields, values):
                key = "clock_reasons" if field == reason_field else field.replace(".", "_")
                try:
                    state[key] = value if key == "clock_reasons" else int(value) if key == "index" else float(value)
                except ValueError:  # [N/A], [Not Supported]
                    state[key] = None
            states.append(state)
        return states
    return [{"error": f"nvidia-smi: {problem}"}]


def is_oom(error: BaseException) -> bool:
    """An out-of-memory error, also when torch.compile wrapped it in its own exception."""
    from sit_fast.errors import is_out_of_memory

    return is_out_of_memory(error)


#################################################################################
#                        Models: same weights, each variant                     #
#################################################################################

def model_inputs(size: SizeConfig, device: torch.device, B: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A timed batch of latents and labels, the same for every variant at this batch (drawn on the
    host from a generator of their own, whatever the global RNG has drawn before)."""
    kw = size.model_kwargs
    generator = torch.Generator().manual_seed(B)
    x = torch.randn(B, kw["in_channels"], kw["input_size"], kw["input_size"], generator=generator)
    y = torch.randint(0, kw["num_classes"], (B,), generator=generator)
    return x.to(device), y.to(device)


def set_tf32(device: torch.device, enabled: bool) -> None:
    """TF32 matmuls and convolutions for fp32 on CUDA (the reference's "fp32 (TF32)"); off for parity."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high" if enabled else "highest")
        torch.backends.cudnn.allow_tf32 = enabled


class ModelFactory:
    """Builds each variant's SiT on the device, all with the same (seeded, randomised) weights.

    The weights are a fresh SiT with its adaLN-Zero parameters filled with N(0, 0.02^2) noise
    (sit_fast.parity.randomize_zero_init_): a fresh SiT outputs zeros, and zeros are no test and no
    fair timing. They are kept on the host (pinned on CUDA) and copied into each variant's model.
    """

    def __init__(self, size: SizeConfig, device: torch.device, compile_backend: str, seed: int = 0):
        from sit_fast.models import SiT
        from sit_fast.parity import randomize_zero_init_

        self.size = size
        self.device = device
        self.compile_backend = compile_backend
        torch.manual_seed(seed)
        with torch.device(device):  # initialising SiT-XL/2 is quicker on the GPU
            reference = randomize_zero_init_(SiT(**size.model_kwargs), seed=seed)
        state = {k: v.detach().to("cpu", copy=True) for k, v in reference.state_dict().items()}
        if device.type == "cuda":
            state = {k: v.pin_memory() for k, v in state.items()}
        self.state = state
        self.forward_flops = _forward_flops(reference)
        self.head_dim = reference.hidden_size // reference.num_heads
        self._activation_bytes: dict[tuple, int | None] = {}
        self.activation_count_errors: dict[str, str] = {}  # variant name -> why its count failed
        del reference
        free_memory(device)

    def build(self, variant: Variant, compile: bool = True, **model_kwargs):
        """The variant's model, with the shared weights, in train mode; compiled as the variant says."""
        from sit_fast.models import SiT

        torch._dynamo.reset()  # fresh compile caches: no stale graphs, no recompile limit from earlier suites
        with torch.device("meta"):
            model = SiT(**self.size.model_kwargs, attn_backend=variant.attn_backend,
                        fused_kernels=variant.fused_kernels, **model_kwargs)
        model.to_empty(device=self.device)
        model.load_state_dict(self.state)
        model.train()
        if compile and variant.compile is not None:
            self.compile(model, variant)
        return model

    def activation_bytes_per_image(self, model, variant: Variant) -> int | None:
        """sit_fast.memory.activation_bytes_per_image of the variant's eager maths (call before compiling).

        On a GPU the count runs fake CUDA tensors through the real module, a path no CPU run takes: where
        it fails, the figure is None (null in the records, the reason in activation_count_errors and the
        log) rather than a failure of every training and memory measurement. On the CPU it raises."""
        from sit_fast.memory import activation_bytes_per_image

        key = (variant.attn_backend, variant.fused_kernels, variant.autocast_dtype)
        if key not in self._activation_bytes:
            try:
                self._activation_bytes[key] = activation_bytes_per_image(model, variant.autocast_dtype,
                                                                         device=str(self.device))
            except Exception as error:  # noqa: BLE001 -- a figure lost, not the measurements
                if self.device.type == "cpu":
                    raise
                self._activation_bytes[key] = None
                self.activation_count_errors[variant.name] = error_note(error)
                log(f"[memory] {variant.name}: the activation count failed, its figure is left out: "
                    f"{error_note(error)}")
        if self._activation_bytes[key] is None:
            self.activation_count_errors.setdefault(variant.name, "the count failed for an identical variant")
        return self._activation_bytes[key]

    def compile(self, model, variant: Variant) -> None:
        options = dict(backend=self.compile_backend, dynamic=False)
        if variant.compile == "model":
            model.compile(**options)  # torch.compile of the module's forward, in place
        elif variant.compile == "blocks":
            if not hasattr(model, "compile_blocks"):
                raise RuntimeError("variant 'ours' needs SiT.compile_blocks (sit_fast.models)")
            model.compile_blocks(**options)
        else:
            raise ValueError(f"unknown compile mode {variant.compile!r}")

    def variant_config(self, variant: Variant, sampling: bool = False) -> dict:
        from sit_fast.attention import select_backend
        from sit_fast.models import resolve_fused_kernels

        dtype = variant.autocast_dtype or torch.float32
        return {
            "attn_backend": variant.attn_backend,
            "attn_backend_resolved": select_backend(variant.attn_backend, self.device, dtype, self.head_dim),
            "fused_kernels": variant.fused_kernels,
            "fused_kernels_resolved": resolve_fused_kernels(variant.fused_kernels, self.device),
            "autocast": None if variant.autocast_dtype is None else variant.dtype_name,
            "tf32": self.device.type == "cuda" and variant.autocast_dtype is None,
            "compile": variant.compile,
            "compile_backend": self.compile_backend if variant.compile else None,
            "cuda_graphs": sampling and variant.cuda_graphs and self.device.type == "cuda",
            "cast_weights": sampling and variant.cast_weights and variant.autocast_dtype is not None,
        }


def _forward_flops(model) -> int:
    from sit_fast.flops import forward_flops

    return forward_flops(model)


def throughput_fields(ctx: "RunContext", variant: Variant, flops_per_image: float, images_per_s: float) -> dict:
    """images/s -> TFLOP/s, the device's peak for the variant's dtype, MFU and the fraction of the matmul ceiling."""
    from sit_fast import flops

    tflops = flops_per_image * images_per_s / 1e12
    dtype = variant.autocast_dtype or torch.float32
    tf32 = ctx.device.type == "cuda" and variant.autocast_dtype is None
    peak = flops.peak_tflops(ctx.environment["device"], dtype, tf32=tf32) if ctx.device.type == "cuda" else None
    source = None
    if peak is not None:
        key = flops.peak_key(ctx.environment["device"])
        entry = "tf32" if tf32 else variant.dtype_name
        source = f"sit_fast.flops.PEAK_TFLOPS[{key!r}][{entry!r}] (dense, data sheet)"
    return dict(
        images_per_s=images_per_s, flops_per_image=flops_per_image, tflops=tflops, peak_tflops=peak,
        peak_tflops_source=source, mfu=None if peak is None else tflops / peak,
        # the ceiling is a bf16 matmul's: an fp32 (TF32) variant's fraction of it would compare unlike rates
        fraction_of_matmul_ceiling=tflops / ctx.ceilings["matmul_tflops"] if variant.dtype_name == "bf16" else None,
    )


#################################################################################
#                              Results and context                              #
#################################################################################

class Results:
    """Collects records and rewrites results.json and results.md as they come (a timeout keeps them):
    at most every WRITE_EVERY_S seconds, after each suite and on a stop (benchmarks/__main__.py), as a rewrite
    of the whole document costs tens of milliseconds by the end of a run, which the tuning suite's
    hundred records a box would pay in measuring time."""

    WRITE_EVERY_S = 2.0

    def __init__(self, out_dir: str, environment: dict, command: list[str]):
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir = out_dir
        self.environment = environment
        self.command = command
        self.ceilings: dict | None = None
        self.records: list[dict] = []
        self.suites_run: list[str] = []
        self.continued_by: list[list[str]] = []  # the commands that added to a first run's results
        self.setup: dict = {}  # what the records measured (size, variants, compile backend): a continued run's too
        self.device_states: list[dict] = []  # the GPU's clocks, power, temperature: at the start, after each suite
        self.written_at = -math.inf  # time.monotonic() of the last write

    def continue_from_disk(self, suites: list[str]) -> str | None:
        """Take up the results already in out_dir (ceilings, records, suites run) to add `suites` to them.
        Returns what forbids it, or None."""
        path = os.path.join(self.out_dir, "results.json")
        try:
            with open(path, encoding="utf-8") as f:
                document = json.load(f)
        except FileNotFoundError:
            return f"{path} does not exist: nothing to continue (leave out --continue to start a run)"
        except (OSError, ValueError) as error:
            return f"{path} cannot be read ({error})"
        if document.get("schema_version") != SCHEMA_VERSION:
            return f"{path} has schema version {document.get('schema_version')}, this suite writes {SCHEMA_VERSION}"
        before = document.get("environment") or {}
        for key in ("device", "git_commit", "torch_version"):
            if before.get(key) != self.environment[key]:
                return (f"{path} was measured with {key} {before.get(key)!r}, this run has {self.environment[key]!r}: "
                        f"its figures and these would not compare; write to another --out")
        for key, value in self.setup.items():
            if document.get("setup", {}).get(key) != value:
                return (f"{path} was measured with {key} {document.get('setup', {}).get(key)!r}, this run has "
                        f"{value!r}: give the first run's settings")
        again = [s for s in suites if s in document["suites_run"]]
        if again:
            return f"{path} has the {', '.join(again)} suite's records already: continue with the suites left"
        self.continued_by = document.get("continued_by", []) + [self.command]
        self.command = document["command"]
        self.ceilings = document["ceilings"]
        self.records = document["records"]
        self.suites_run = document["suites_run"]
        self.device_states = document.get("device_states", [])
        return None

    def add(self, record: dict) -> None:
        unknown = set(record) - set(FIELDS)
        if unknown:
            raise KeyError(f"record has fields outside the schema: {sorted(unknown)}")
        self.records.append(record)
        if time.monotonic() - self.written_at >= self.WRITE_EVERY_S:
            self.write()
        print(console_line(record), flush=True)

    def note_device_state(self, device: torch.device, when: str) -> None:
        """Adds the GPU's state now (device_state), as measured `when` ("start", "after train"), and logs
        it; nothing on the CPU."""
        states = device_state(device)
        if states is None:
            return
        self.device_states.append({"when": when, "time": datetime.datetime.now().isoformat(timespec="seconds"),
                                   "gpus": states})
        self.write()
        shown = "; ".join(", ".join(f"{k} {v}" for k, v in state.items()) for state in states)
        log(f"device state ({when}): {shown}")

    def write(self) -> None:
        from benchmarks.goals import evaluate

        document = {
            "schema_version": SCHEMA_VERSION,
            "command": self.command,
            "continued_by": self.continued_by,
            "setup": self.setup,
            "environment": self.environment,
            "ceilings": self.ceilings,
            "suites_run": self.suites_run,
            "device_states": self.device_states,
            "fields": FIELDS,
            "records": self.records,
        }
        document["goals"] = evaluate(document)
        text = json.dumps(_finite(document), indent=1, default=_json_default, allow_nan=False)
        write_text(os.path.join(self.out_dir, "results.json"), text)
        write_text(os.path.join(self.out_dir, "results.md"), to_markdown(document))
        self.written_at = time.monotonic()


def _finite(value):
    """value with every NaN or infinite float as the string "NaN", "Infinity" or "-Infinity" (strict JSON
    has no such numbers; Python's float() reads the strings back)."""
    if isinstance(value, np.floating):
        value = float(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def figures_read(value):
    """_finite undone, for figures read back from results.json: "NaN", "Infinity" and "-Infinity"
    are floats again (within lists and dicts too)."""
    if value in ("NaN", "Infinity", "-Infinity"):
        return float(value)
    if isinstance(value, dict):
        return {key: figures_read(item) for key, item in value.items()}
    if isinstance(value, list):
        return [figures_read(item) for item in value]
    return value


def _json_default(value):
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


def write_text(path: str, text: str) -> None:
    from sit_fast.files import atomic_write

    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


@dataclasses.dataclass
class RunContext:
    """What a suite needs: the device, the size, the shared weights, the results, its time box."""

    device: torch.device
    size: SizeConfig
    results: Results
    environment: dict
    ceilings: dict
    compile_backend: str
    variants: tuple[Variant, ...] = VARIANTS
    budget: Budget = dataclasses.field(default_factory=lambda: Budget(math.inf))
    seed: int | None = None
    """Parity inputs' seed (random when None, and recorded)."""
    parity: dict = dataclasses.field(default_factory=dict)
    """(variant name, dtype) -> the parity fields of that variant, filled by the parity suite."""
    _models: ModelFactory | None = None

    @property
    def models(self) -> ModelFactory:
        if self._models is None:
            self._models = ModelFactory(self.size, self.device, self.compile_backend)
        return self._models

    def measurement_order(self) -> list[Variant]:
        """The variants the goals compare first: `ours`, then the compiled reference (the goals are the
        ratios of the two, and the MFU of `ours`), then the eager references, bf16 before fp32 (the
        roofline's baseline before the slowest). A time box then cuts an eager reference, which
        decides no goal, before either of them, and the fp32 one first."""
        rank = {"ours": 0, "reference": 3}
        return sorted(self.variants, key=lambda v: rank.get(v.name, 1 if v.compile is not None else 2))

    def record(self, suite: str, name: str, variant: str, **fields) -> dict:
        """A record with every field of the schema: the environment stamp, then `fields`, the rest null."""
        record = dict.fromkeys(FIELDS)
        for key in ("device", "device_type", "torch_version", "triton_version", "cuda_version", "python_version",
                    "git_commit"):
            record[key] = self.environment[key]
        record.update(suite=suite, name=name, variant=variant, status="ok", extra={}, date=utc_now())
        unknown = set(fields) - set(FIELDS)
        if unknown:
            raise KeyError(f"fields outside the schema: {sorted(unknown)}")
        record.update(fields)
        return record

    def skip(self, suite: str, name: str, variant: Variant, needed_s: float, **fields) -> dict:
        """Record a measurement the time box left out."""
        note = (f"time box: {max(self.budget.remaining(), 0):.0f} s left of this suite's {self.budget.seconds:.0f} s, "
                f"needs about {needed_s:.0f} s")
        fields.setdefault("dtype", variant.dtype_name)
        return self.emit(self.record(suite, name, variant.name, status="skipped", note=note, **fields))

    def fail(self, suite: str, name: str, variant: Variant, error: BaseException, **fields) -> dict:
        """Record a measurement that raised (the traceback goes to stderr)."""
        traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
        status = "oom" if is_oom(error) else "error"
        fields.setdefault("dtype", variant.dtype_name)
        return self.emit(self.record(suite, name, variant.name, status=status, note=error_note(error), **fields))

    def emit(self, record: dict) -> dict:
        self.results.add(record)
        return record

    def linked_parity(self, variant: Variant, fields: set[str]) -> tuple[dict, str]:
        """Parity fields for a train / sample record, copied from this run's parity suite.

        Returns (fields, where they came from). The reference is its own yardstick: zero error by
        definition (on CUDA its timed steps use TF32, which the parity suite does not measure).
        """
        from sit_fast.parity import TOLERANCES

        if variant.name == "reference":
            zero = {"parity_output_rel_err": 0.0, "parity_loss_rel_err": 0.0, "parity_grad_rel_err_max": 0.0,
                    "parity_max_abs_err": 0.0, "parity_ok": True, "parity_tolerances": TOLERANCES["fp32"]}
            return {k: zero[k] for k in fields}, "the reference itself"
        found = self.parity.get((variant.name, variant.dtype_name))
        if found is None:
            return {}, "none: the parity suite did not measure this variant in this run"
        return {k: v for k, v in found.items() if k in fields}, found["source"]


#################################################################################
#                           Console and markdown views                          #
#################################################################################

def _fmt(value, spec: str = ".3g", scale: float = 1.0, suffix: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, (int, float)):
        return f"{value * scale:{spec}}{suffix}"
    return str(value)


def _gib(value) -> str:
    return _fmt(value, ".2f", 1 / 2**30, " GiB")


def _mib(value) -> str:
    return _fmt(value, ".2f", 1 / 2**20, " MiB")


def _percent(value) -> str:
    return _fmt(value, ".1f", 100, "%")


def _ms(record) -> str:
    if record.get("median_ms") is None:
        return "-"
    return f"{record['median_ms']:.4g} ({record['p20_ms']:.4g}-{record['p80_ms']:.4g})"


def _status(record) -> str:
    status = record["status"]
    return status if not record.get("note") else f"{status}: {record['note']}"


def _peak(record) -> str:
    """The data-sheet peak a row's MFU divides by, and its dtype (TF32 for the fp32 reference)."""
    entry = "tf32" if record.get("dtype") == "fp32" else record.get("dtype")  # throughput_fields' choice on CUDA
    return "-" if record.get("peak_tflops") is None else f"{record['peak_tflops']:.4g} ({entry})"


def _of_matmul_ceiling(record) -> str:
    """Only bf16 rows are held to the bf16 matmul ceiling measured at the start (fp32 rows: n/a)."""
    return _percent(record["fraction_of_matmul_ceiling"]) if record.get("dtype") == "bf16" else "n/a"


def _linked_parity(text: Callable[[dict], str]) -> Callable[[dict], str]:
    """A train / sample row's parity figure, "n/a" for the reference (its own yardstick)."""
    return lambda r: "n/a (reference)" if r["variant"] == "reference" and r["status"] == "ok" else text(r)


# MFU against which peak: the data sheet's dense peak for the dtype (TF32 for the fp32 reference on
# CUDA), and the bf16 matmul ceiling measured at the start of the run.
THROUGHPUT_COLUMNS = [
    ("MFU (data-sheet peak)", lambda r: _percent(r["mfu"])), ("peak TFLOP/s (dtype)", _peak),
    ("of measured bf16 matmul ceiling", _of_matmul_ceiling),
]

# Each version is timed in two windows, back to back: how far apart their medians were.
WINDOWS_COLUMN = ("two windows apart", lambda r: _percent(r["window_spread"]))

# Said under a suite's table in results.md: what its figures count and leave out.
NOTES = {
    "train": "One step: forward, backward, AdamW (no EMA; no data loading or VAE: inputs on the device). "
             "MFU: model FLOPs (3 x forward, forward = 2 x multiply-adds) over the data sheet's dense "
             "peak of the row's dtype. Each variant at the largest batch that fits (the batch column). "
             "act/img: the eager maths' activations (fake tensors), for compiled variants too. "
             "Parity: from the parity suite of this run.",
    "profile": "torch.profiler over a few calls after warm-up: device ms/call sums the kernels' own times "
               "(on the CPU, the operators' own CPU time); device busy (CUDA only) = device / wall time, where "
               "the wall time is taken without the profiler: under 100%, the device waited. Kinds by kernel name "
               "(benchmarks/profile_suite.py KINDS); the 15 that took longest in results.json (extra.top). "
               "TFLOP/s: the FLOPs the matmul and attention kernels execute per call (training: the linear "
               "layers' 3 x forward, attention's 3.5 x, its backward recomputing Q K^T; sampling: one forward "
               "of 2 x batch) over their kinds' time.",
    "sample": "Model sampling only: the VAE decode is not timed. The model sees 2 x batch (guidance). "
              "ms/batch: the run of `steps timed` model calls, scaled to the full sampler's calls "
              "(extrapolated; every call costs the same). Variants as configured: ours replays CUDA graphs "
              "on a GPU (at batch 8 much of its lead is launch overhead saved), the compiled reference "
              "compiles its blocks without them. Parity: from the parity suite of this run (its forwards "
              "are not the sampling ones: no graphs, weights not cast).",
}


def _profile_rates(record) -> str:
    """A profile row's achieved TFLOP/s: the matmul kernels' (and their fraction of the measured bf16
    matmul ceiling), the attention kernels'."""
    rates = record["extra"].get("tflops_by_kind") or {}
    matmul, attention = rates.get("matmul"), rates.get("attention")
    fraction = record["extra"].get("matmul_fraction_of_ceiling")
    return (f"{_fmt(matmul, '.3g')} ({_percent(fraction)}), {_fmt(attention, '.3g')}"
            if rates else "-")


COLUMNS: dict[str, list[tuple[str, Callable[[dict], str]]]] = {
    "kernels": [
        ("kernel", lambda r: r["name"]), ("variant", lambda r: r["variant"]), ("dtype", lambda r: r["dtype"]),
        ("shapes", lambda r: _fmt(r["shapes"])), ("ms median (p20-p80)", _ms), WINDOWS_COLUMN,
        ("GB/s", lambda r: _fmt(r["gbps"], ".3g")), ("of copy BW", lambda r: _percent(r["fraction_of_copy_bw"])),
        ("TFLOP/s", lambda r: _fmt((r.get("extra") or {}).get("tflops"), ".3g")),  # the products' rows
        ("max abs err", lambda r: _fmt(r["parity_max_abs_err"], ".2g")), ("status", _status),
    ],
    "tuning": [
        ("kernel", lambda r: r["name"]), ("warps", lambda r: _fmt(r["extra"].get("num_warps"))),
        ("programs/SM", lambda r: _fmt(r["extra"].get("programs_per_slot"))),
        ("prefetch", lambda r: _fmt(r["extra"].get("prefetch"))),
        ("rows/step", lambda r: _fmt(r["extra"].get("rows_per_step"))),
        ("one-row loop", lambda r: _fmt(r["extra"].get("one_row_loop"))),
        ("tile", lambda r: f"{r['extra']['block_rows']}x{r['extra']['block_h']}" if "block_h" in r["extra"] else "-"),
        ("", lambda r: " ".join(m for m, k in (("best", "best"), ("default", "default")) if r["extra"].get(k))),
        ("ms median (p20-p80)", _ms), ("GB/s", lambda r: _fmt(r["gbps"], ".3g")),
        ("of copy BW", lambda r: _percent(r["fraction_of_copy_bw"])),
        ("max abs err", lambda r: _fmt(r["parity_max_abs_err"], ".2g")), ("status", _status),
    ],
    "parity": [
        ("variant", lambda r: r["variant"]), ("dtype", lambda r: r["dtype"]),
        ("batch", lambda r: _fmt(r["batch_size"])), ("output rel", lambda r: _fmt(r["parity_output_rel_err"], ".2e")),
        ("loss rel", lambda r: _fmt(r["parity_loss_rel_err"], ".2e")),
        ("max grad rel", lambda r: _fmt(r["parity_grad_rel_err_max"], ".2e")),
        ("worst", lambda r: _fmt(r["extra"].get("worst"))),
        ("tolerances (out/loss/grad)", lambda r: "-" if not r["parity_tolerances"] else
         "/".join(f"{r['parity_tolerances'][k]:.0e}" for k in ("output", "loss", "grad"))),
        ("ok", lambda r: _fmt(r["parity_ok"])), ("status", _status),
    ],
    "train": [
        ("variant", lambda r: r["variant"]), ("dtype", lambda r: r["dtype"]),
        ("batch", lambda r: _fmt(r["batch_size"])), ("ms/step median (p20-p80)", _ms), WINDOWS_COLUMN,
        ("img/s", lambda r: _fmt(r["images_per_s"], ".4g")),
        ("TFLOP/s", lambda r: _fmt(r["tflops"], ".3g")), *THROUGHPUT_COLUMNS,
        ("peak mem", lambda r: _gib(r["peak_memory_bytes"])),
        ("act/img", lambda r: _mib(r["activation_bytes_per_image"])),
        ("parity out/grad", _linked_parity(lambda r: f"{_fmt(r['parity_output_rel_err'], '.1e')}/"
                                                     f"{_fmt(r['parity_grad_rel_err_max'], '.1e')}")),
        ("status", _status),
    ],
    "sample": [
        ("sampler", lambda r: r["name"]), ("variant", lambda r: r["variant"]),
        ("batch", lambda r: _fmt(r["batch_size"])),
        ("steps timed", lambda r: _fmt(r["steps_timed"])), ("ms/batch median (p20-p80)", _ms), WINDOWS_COLUMN,
        ("img/s", lambda r: _fmt(r["images_per_s"], ".3g")), ("TFLOP/s", lambda r: _fmt(r["tflops"], ".3g")),
        *THROUGHPUT_COLUMNS, ("peak mem", lambda r: _gib(r["peak_memory_bytes"])),
        ("parity out", _linked_parity(lambda r: _fmt(r["parity_output_rel_err"], ".1e"))), ("status", _status),
    ],
    "profile": [
        ("what", lambda r: r["name"]), ("variant", lambda r: r["variant"]), ("batch", lambda r: _fmt(r["batch_size"])),
        ("wall ms/call", lambda r: _fmt(r["extra"].get("wall_ms_per_call"), ".4g")),
        ("device ms/call", lambda r: _fmt(r["extra"].get("device_ms_per_call"), ".4g")),
        ("device busy", lambda r: _percent(r["extra"].get("device_busy"))),
        ("ms/call by kind", lambda r: ", ".join(f"{k} {v:.3g}" for k, v in
                                                 (r["extra"].get("ms_per_call_by_kind") or {}).items()) or "-"),
        ("TFLOP/s matmul (of ceiling), attention", _profile_rates),
        ("top 3 (share)", lambda r: "; ".join(f"{t['name'][:60].replace('|', '/')} ({_percent(t['share'])})"
                                              for t in (r["extra"].get("top") or [])[:3]) or "-"),
        ("status", _status),
    ],
    "memory": [
        ("variant", lambda r: r["variant"]), ("dtype", lambda r: r["dtype"]),
        ("act/img (fake tensors)", lambda r: _mib(r["activation_bytes_per_image"])),
        ("act/img (measured)", lambda r: _mib(r["measured_activation_bytes_per_image"])),
        ("batch", lambda r: _fmt(r["batch_size"])), ("peak mem", lambda r: _gib(r["peak_memory_bytes"])),
        ("status", _status),
    ],
}


def to_markdown(document: dict) -> str:
    env = document["environment"]
    lines = [
        f"# sit_fast benchmarks: {env['device']}",
        "",
        f"torch {env['torch_version']}, triton {env['triton_version']}, CUDA {env['cuda_version']}, "
        f"python {env['python_version']}, commit {env['git_commit']}, {env['date']}",
        "",
        "command: `" + " ".join(document["command"]) + "`",
        "",
    ]
    ceilings = document.get("ceilings")
    if ceilings:
        lines += [
            f"Ceilings measured here: copy {ceilings['copy_gbps']:.0f} GB/s "
            f"({ceilings['copy_bytes'] / 2**20:.0f} MiB read + written), "
            f"bf16 matmul {ceilings['matmul_tflops']:.3g} TFLOP/s ({'x'.join(map(str, ceilings['matmul_shape']))}).",
            "",
        ]
    for suite, columns in COLUMNS.items():
        records = [r for r in document["records"] if r["suite"] == suite]
        if not records:
            continue
        lines += [f"## {suite}", "", "| " + " | ".join(h for h, _ in columns) + " |",
                  "|" + " --- |" * len(columns)]
        for r in records:
            cells = (fn(r) for _, fn in columns)  # None (a whole suite's failure has no dtype) shows as "-"
            lines.append("| " + " | ".join("-" if c is None else str(c).replace("|", "/") for c in cells) + " |")
        lines.append("")
        if suite in NOTES:
            lines += [NOTES[suite], ""]
    states = document.get("device_states")
    if states:
        lines += ["## device state", "", "| when | GPU | SM clock MHz (max) | memory clock MHz | power W | "
                  "temperature C | clock reasons |", "|" + " --- |" * 7]
        for entry in states:
            for gpu in entry["gpus"]:
                if "error" in gpu:
                    lines.append(f"| {entry['when']} | {gpu['error']} |")
                    continue
                lines.append(f"| {entry['when']} | {gpu.get('index')} | {gpu.get('clocks_sm')} "
                             f"({gpu.get('clocks_max_sm')}) | {gpu.get('clocks_mem')} | {gpu.get('power_draw')} | "
                             f"{gpu.get('temperature_gpu')} | {gpu.get('clock_reasons', 'n/a')} |")
        lines += ["", "Clock reasons: nvidia-smi's bit mask (0x1 idle, 0x4 the power cap, 0x8/0x20/0x40 "
                  "slowdown for heat; `nvidia-smi -q -d PERFORMANCE` names them).", ""]
    lines += goals_markdown(document)
    return "\n".join(lines)


def goals_markdown(document: dict) -> list[str]:
    """results.md's goals section (benchmarks.goals), once a suite with goals has started."""
    if not {"kernels", "train", "sample"} & set(document.get("suites_run") or []):
        return []
    lines = ["## goals", "", "| suite | goal | batch | figure | target | noise (two windows) | verdict |",
             "|" + " --- |" * 7]
    for row in document.get("goals") or []:
        if row["kind"] == "fraction":
            figure, target = _percent(row["figure"]), _percent(row["target"])
        else:
            figure, target = _fmt(row["figure"], ".3f", suffix="x"), f"{row['target']:.2f}x"
        cells = [row["suite"], row["goal"], _fmt(row["batch"]), figure, target, _percent(row["noise"]),
                 row["verdict"]]
        lines.append("| " + " | ".join(cell.replace("|", "/") for cell in cells) + " |")
    return lines + ["", "Noise: the two windows' relative difference (window_spread) of the records compared, "
                        "summed for a ratio; a figure that close to its target could fall on the other side "
                        "in another run.", ""]


def console_line(record: dict) -> str:
    parts = [f"[{record['suite']}]", record["name"], record["variant"], record["dtype"] or ""]
    if record.get("batch_size") is not None:
        parts.append(f"B={record['batch_size']}")
    if record.get("median_ms") is not None:
        parts.append(f"{record['median_ms']:.4g} ms")
    for key, label, spec in (("images_per_s", "img/s", ".4g"), ("tflops", "TFLOP/s", ".3g"), ("gbps", "GB/s", ".3g")):
        if record.get(key) is not None:
            parts.append(f"{record[key]:{spec}} {label}")
    if record.get("mfu") is not None:
        parts.append(f"MFU {record['mfu'] * 100:.1f}%")
    if record.get("peak_memory_bytes") is not None:
        parts.append(f"peak {record['peak_memory_bytes'] / 2**30:.2f} GiB")
    if record.get("activation_bytes_per_image") is not None:
        parts.append(f"act {record['activation_bytes_per_image'] / 2**20:.2f} MiB/img")
    if record.get("parity_output_rel_err") is not None:
        parts.append(f"out rel {record['parity_output_rel_err']:.2e}")
    if record.get("parity_ok") is not None:
        parts.append("parity ok" if record["parity_ok"] else "PARITY FAIL")
    parts.append(record["status"] + (f" ({record['note']})" if record.get("note") else ""))
    return " ".join(p for p in parts if p)


def log(message: str) -> None:
    print(message, flush=True, file=sys.stdout)
