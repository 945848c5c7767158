"""Where the device time goes: torch.profiler over training steps and guided sampling calls.

The throughput suites say how fast; this one says where the time went, for the next change to aim at.
For `ours` and the compiled reference (the two the goals compare), in this order, each while the
suite's time box allows:

    train_step    at the batch the train suite fitted for the variant in this run (else the size's
                  smallest), forward, backward and AdamW, as the train suite times it
    sample_call   one guided model call (the model sees 2 x batch) at each sampling batch, largest
                  first, as the sample suite makes it (ours replays CUDA graphs on a GPU)

Each: warm-up calls (compiling, capturing), CALLS calls timed without the profiler (wall ms per
call, the device synchronised), then CALLS calls under torch.profiler. The record keeps, per call:
the wall time, the device time (kernels' time summed; on the CPU, operators' own CPU time), their
ratio (device_busy, CUDA only: under 1, the device waited, for the host or for launches), the time per kind of
kernel (matmul, attention, our Triton kernels, Inductor's, other) and the TOP kernels by time, each
with its calls and share; and (`tflops_by_kind`) the TFLOP/s the matmul and the attention kernels
reached, from the FLOPs they execute per call (`flops_by_kind`), the matmuls' also as a fraction of
the bf16 matmul ceiling measured at the start of the run: whether the matmuls, most of a step's
time, run at the ceiling the roofline assumes.

    python -m benchmarks profile --device cuda --out DIR      # alone; `all` runs it after memory
"""
from __future__ import annotations

import re
import time

import torch

from benchmarks import common
from benchmarks.common import RunContext, free_memory, set_tf32, synchronize

SUITE = "profile"
CALLS = {"tiny": 1, "full": 3}  # calls timed, then calls profiled, per size
WARMUP = {"tiny": 1, "full": 2}
TOP = 15  # kernels kept per record
PROFILED = ("ours", "reference+bf16+sdpa+compile")
# Kinds of kernel, by name, first match wins (our Triton kernels before Inductor's, which are named triton_*).
KINDS = (
    ("attention", re.compile(r"flash|fmha|attention|sdpa|softmax", re.I)),
    ("matmul", re.compile(r"gemm|matmul|xmma|cutlass|nvjet|cublas|\b[ab]?mm\b|addmm", re.I)),
    ("ours", re.compile(r"layernorm_modulate|gated_residual|bias_gelu", re.I)),
    ("inductor", re.compile(r"^triton_", re.I)),
)


def kind_of(name: str) -> str:
    """The kind of a kernel (or, on the CPU, operator) from its name: one of KINDS' or "other"."""
    for kind, pattern in KINDS:
        if pattern.search(name):
            return kind
    return "other"


def expected_cost_s(size, variant, took_s: float | None = None) -> float:
    """Rough seconds one profile of this variant takes: its compilation, mostly, until one has run
    (later ones find Inductor's caches warm from the same graphs in this run's other suites)."""
    if took_s is not None:
        return min(common.OBSERVED_MARGIN * took_s, common.expected_cost_s(size, variant))
    return common.expected_cost_s(size, variant)


def run(ctx: RunContext) -> None:
    from sit_fast.transport import create_transport

    set_tf32(ctx.device, True)
    transport = create_transport("Linear", "velocity")
    variants = [v for v in ctx.measurement_order() if v.name in PROFILED]
    plan = [("train_step", v, None) for v in variants]
    plan += [("sample_call", v, B) for B in sorted(ctx.size.sample_batches, reverse=True) for v in variants]
    took: dict[str, float] = {}  # variant name -> seconds its last profile took
    for name, variant, B in plan:
        needed = expected_cost_s(ctx.size, variant, took.get(variant.name))
        common_fields = dict(model=ctx.size.model_name, shapes={}, batch_size=B)
        if not ctx.budget.allows(needed):
            ctx.skip(SUITE, name, variant, needed, **common_fields)
            continue
        began = time.monotonic()
        try:
            if name == "train_step":
                profile_train(ctx, variant, transport)
            else:
                profile_sample(ctx, variant, B)
            took[variant.name] = time.monotonic() - began
        except Exception as error:  # noqa: BLE001 -- recorded, and the run goes on
            ctx.fail(SUITE, name, variant, error, **common_fields)
        finally:
            free_memory(ctx.device)


def train_batch(ctx: RunContext, variant) -> int:
    """The batch the train suite fitted for the variant in this run, else the size's smallest."""
    for record in ctx.results.records:
        if (record["suite"], record["variant"], record["status"]) == ("train", variant.name, "ok"):
            return record["batch_size"]
    return min(ctx.size.train_batches)


def profile_train(ctx: RunContext, variant, transport) -> None:
    from benchmarks.train_suite import make_step

    size, device = ctx.size, ctx.device
    kw = size.model_kwargs
    B = train_batch(ctx, variant)
    model = ctx.models.build(variant)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0, fused=device.type == "cuda")
    x1 = torch.randn(B, kw["in_channels"], kw["input_size"], kw["input_size"], device=device)
    y = torch.randint(0, kw["num_classes"], (B,), device=device)
    step = make_step(model, optimizer, transport, x1, y, variant, device)
    shapes = {"x": list(x1.shape), "y": [B]}
    emit(ctx, "train_step", variant, B, shapes, step, ctx.models.variant_config(variant))


def profile_sample(ctx: RunContext, variant, B: int) -> None:
    from benchmarks.sample_suite import build_forwards, model_inputs

    z, y = model_inputs(ctx.size, ctx.device, B)
    _, denoiser = build_forwards(ctx.models, variant)
    labelled = denoiser.for_labels(y)
    t = torch.full((B,), 0.5, device=ctx.device)

    def call():
        with torch.no_grad():
            return labelled(z, t)

    shapes = {"z": list(z.shape), "y": [B], "model_batch": 2 * B}
    emit(ctx, "sample_call", variant, B, shapes, call, ctx.models.variant_config(variant, sampling=True))


def flops_by_kind(model_kwargs: dict, name: str, B: int) -> dict[str, float]:
    """FLOPs per call that the matmul and the attention kernels execute, for a SiT of model_kwargs:
    train_step (B images): the linear layers' 3 x forward (forward, then two products each backward),
    attention's 3.5 x (its backward recomputes Q K^T: 2.5 x forward); sample_call: one forward of
    2 x B (guidance)."""
    from sit_fast.flops import attention_flops, forward_flops
    from sit_fast.models import SiT

    with torch.device("meta"):
        model = SiT(**model_kwargs)
    forward, attention = forward_flops(model), attention_flops(model)
    if name == "train_step":
        return {"matmul": 3.0 * (forward - attention) * B, "attention": 3.5 * attention * B}
    return {"matmul": float(forward - attention) * 2 * B, "attention": float(attention) * 2 * B}


def achieved_tflops(flops: dict[str, float], ms_by_kind: dict[str, float]) -> dict[str, float]:
    """TFLOP/s of each kind of kernel with FLOPs and a time."""
    return {kind: n / (ms_by_kind[kind] * 1e-3) / 1e12 for kind, n in flops.items() if ms_by_kind.get(kind, 0) > 0}


def emit(ctx: RunContext, name: str, variant, B: int, shapes: dict, fn, config: dict) -> None:
    """Warm fn up, time it, profile it, and record where its time went."""
    figures = profile_calls(fn, ctx.device, CALLS[ctx.size.name], WARMUP[ctx.size.name])
    figures["flops_by_kind"] = flops = flops_by_kind(ctx.size.model_kwargs, name, B)
    figures["tflops_by_kind"] = tflops = achieved_tflops(flops, figures["ms_per_call_by_kind"])
    figures["matmul_fraction_of_ceiling"] = (tflops["matmul"] / ctx.ceilings["matmul_tflops"]
                                             if "matmul" in tflops else None)
    note = None if figures["top"] else "the profiler saw no kernels (CUDA graph replays can hide them from it)"
    ctx.emit(ctx.record(SUITE, name, variant.name, dtype=variant.dtype_name, model=ctx.size.model_name,
                        shapes=shapes, batch_size=B, variant_config=config, note=note, extra=figures))
    busy = figures["device_busy"]
    kinds = ", ".join(f"{k} {v:.3g}" for k, v in figures["ms_per_call_by_kind"].items())
    rates = ", ".join(f"{k} {v:.3g}" for k, v in tflops.items())
    common.log(f"[{SUITE}] {name} {variant.name} B={B}: {figures['wall_ms_per_call']:.4g} ms/call wall, "
               f"{figures['device_ms_per_call']:.4g} device ({'-' if busy is None else f'{busy:.0%}'} busy); "
               f"by kind, ms: {kinds}; TFLOP/s: {rates or '-'}")


def profile_calls(fn, device: torch.device, calls: int = 3, warmup: int = 2, top: int = TOP) -> dict:
    """Wall and device time per call of fn, and the kernels (CPU: operators) that took the device's.

    The wall time is taken apart from the profile (the profiler slows the host); the device time is
    the sum of the profiled kernels' own times (on the CPU the operators' own CPU time, which the
    profiler slows: no busy figure there)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    wall_ms = (time.perf_counter() - start) * 1e3 / calls

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        synchronize(device)
    rows = []
    for event in prof.key_averages():
        if cuda:  # a user annotation (record_function, e.g. the optimizer's step) also has a span on the GPU's
            # timeline, over the kernels inside it: counted, they would count twice (PyTorch's own total skips it)
            if (event.device_type != torch.autograd.DeviceType.CUDA or event.self_device_time_total <= 0
                    or getattr(event, "is_user_annotation", False)):
                continue
            us = event.self_device_time_total
        else:
            if event.self_cpu_time_total <= 0:
                continue
            us = event.self_cpu_time_total
        rows.append((event.key, event.count, us / 1e3 / calls))
    rows.sort(key=lambda row: -row[2])
    device_ms = sum(ms for _, _, ms in rows)
    by_kind: dict[str, float] = {}
    for key, _, ms in rows:
        by_kind[kind_of(key)] = by_kind.get(kind_of(key), 0.0) + ms
    return {
        "calls": calls,
        "wall_ms_per_call": wall_ms,
        "device_ms_per_call": device_ms,
        "device_busy": device_ms / wall_ms if cuda and wall_ms > 0 else None,  # the CPU: profiled op times
                                                                                # run slower than the wall's
        "ms_per_call_by_kind": dict(sorted(by_kind.items(), key=lambda item: -item[1])),
        "top": [{"name": key if len(key) <= 120 else key[:117] + "...", "kind": kind_of(key),
                 "calls_per_call": count / calls, "ms_per_call": ms,
                 "share": ms / device_ms if device_ms > 0 else None}
                for key, count, ms in rows[:top]],
        "timer": "torch.profiler (kernels' own device time)" if cuda else "torch.profiler (operators' own CPU time)",
    }
