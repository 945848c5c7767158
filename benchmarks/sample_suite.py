"""Sampling: images/s and latency of a 50-step Euler ODE and a 250-step Euler-Maruyama SDE, both with
classifier-free guidance (scale 4.0, upstream sample.py's default), at each batch of size.sample_batches.

The model is driven the way sample.py drives it: sit_fast.sampling.ModelForwards (the guided forward
over the doubled batch [x, x] with labels [y, null]) and Denoiser, called by the transport's own
samplers (sit_fast.transport.Sampler), under torch.no_grad. Variants:

    reference, reference+bf16+sdpa    the forward as it is (autocast for the bf16 one);
    reference+bf16+sdpa+compile       torch.compile of the blocks (regional, as in training);
    ours                              SiT.compile_blocks, fused kernels, and on CUDA the guided forward
                                      replayed from a CUDA graph (sit_fast.sampling.CUDAGraphForward).

The model is frozen (requires_grad False) as sample.py freezes it. peak_memory_bytes is
torch.cuda.max_memory_allocated over the timed runs; for a CUDA-graph variant also over the run that
captured the graph at that batch, since after capture the graph's activations live in its private
pool, which a replay never allocates from again.

Extrapolation, to fit the time box: each timed run is the real sampler with k model calls,
`steps_timed`, or `latency_steps_timed` at a batch of 16 or fewer (ODE euler num_steps=k: k calls;
SDE Euler num_steps=k: k - 1 stochastic steps and the last step), and median_ms / p20_ms / p80_ms
scale that run by (model calls of the full sampler) / k, as counted by sit_fast.sampling.model_call_times.
Every call costs the same, so this is the full sampler's time up to its fixed per-run overhead (building
the time grid and the label pair).
After the first (compiling or capturing) run, `sample_iters` runs are timed twice, back to back
(common.time_twice): the figures are over both windows, window_spread says how far apart they were.
"""
from __future__ import annotations

import time

import torch

from benchmarks import common
from benchmarks.common import (
    LINKED_PARITY, OBSERVED_MARGIN, SUITE_FIELDS, ModelFactory, RunContext, Variant, error_note, expected_cost_s,
    free_memory,
    model_inputs, peak_memory, reset_peak_memory, set_tf32, synchronize, throughput_fields, time_twice,
)

SUITE = "sample"
CFG_SCALE = 4.0
# (record name, sampler kind, method, full number of steps)
SAMPLERS = (
    ("ode_euler_50_cfg4", "ODE", "euler", 50),
    ("sde_euler_250_cfg4", "SDE", "Euler", 250),
)


def plan(batches, variants: list[Variant]) -> list[tuple[int, Variant]]:
    """The (batch, variant) measurements in the order they run: the goals' pairs first (ours, then the
    compiled reference, at each batch, the largest first: its throughput and MFU are the headline),
    then the eager references at each batch, which decide no goal. A time box that cuts the run so
    leaves whole comparisons rather than every variant at the first batch and none at the next."""
    goals = [v for v in variants if v.name == "ours" or v.compile is not None]
    order = sorted(batches, reverse=True)
    return [(B, v) for B in order for v in goals] + [(B, v) for B in order for v in variants if v not in goals]


# Once a variant has been measured at another batch in this run, its next measurement is expected
# to cost OBSERVED_MARGIN times that one's first sampler run (which compiles, or captures, the forward:
# at another batch it may take longer), plus the rest of that measurement (scaled up where the next one
# runs more calls at a larger batch), rather than the fixed guess of expected_cost_s. Another
# variant's time says nothing of its own (another graph).


def timed_steps(size, B: int) -> int:
    """The k of the sampler runs timed at batch B (see the module's docstring)."""
    return size.latency_steps_timed if B <= 16 else size.steps_timed


def expected_from(took: tuple[float, float, int, int], size, B: int) -> float:
    """Seconds a variant's measurement at batch B should take, from one of its measurements:
    took = (its seconds, of which its first sampler run, its batch, its timed steps)."""
    seconds, first_run_s, batch, steps = took
    scale = max(1.0, B * timed_steps(size, B) / (batch * steps))
    return OBSERVED_MARGIN * first_run_s + (seconds - first_run_s) * scale


def run(ctx: RunContext) -> None:
    """The measurements in plan()'s order. Each (variant, batch) builds its model afresh and compiles
    (dynamic=False) or captures anew. Whether one fits the time box is judged by what the variant's
    longest measurement so far took (expected_from), else by expected_cost_s."""
    from sit_fast.transport import Sampler, create_transport

    set_tf32(ctx.device, True)
    transport = create_transport("Linear", "velocity")
    sampler = Sampler(transport)
    took: dict[str, tuple[float, float, int, int]] = {}  # variant name -> its longest successful measurement
    for B, variant in plan(ctx.size.sample_batches, ctx.measurement_order()):
        needed = (expected_from(took[variant.name], ctx.size, B) if variant.name in took
                  else expected_cost_s(ctx.size, variant))
        if not ctx.budget.allows(needed):
            for name, *_ in SAMPLERS:
                ctx.skip(SUITE, name, variant, needed, model=ctx.size.model_name, shapes={}, batch_size=B)
            continue
        before, first_record = ctx.budget.remaining(), len(ctx.results.records)
        try:
            measure(ctx, variant, transport, sampler, B)
        except Exception as error:  # noqa: BLE001 -- recorded, and the run goes on to the next variant
            ctx.fail(SUITE, "sampling", variant, error, model=ctx.size.model_name, shapes={}, batch_size=B)
        finally:
            free_memory(ctx.device)
        ok = [r for r in ctx.results.records[first_record:] if r["status"] == "ok"]  # a failure tells no cost
        seconds = before - ctx.budget.remaining()
        if ok and seconds > took.get(variant.name, (0.0,))[0]:
            # the first sampler's first run compiles; where unknown, all of it is taken as compiling
            first_run_s = min((ok[0].get("extra") or {}).get("first_run_s", seconds), seconds)
            took[variant.name] = (seconds, first_run_s, B, timed_steps(ctx.size, B))


def build_forwards(models: ModelFactory, variant: Variant):
    """sample.py's model and guided denoiser for this variant: (model, Denoiser)."""
    from sit_fast.sampling import Denoiser, ModelForwards

    model = models.build(variant, compile=variant.compile == "blocks").eval().requires_grad_(False)
    # the compile backend follows --compile-backend (the CPU dry run traces without codegen)
    forwards = ModelForwards(model, cfg_scale=CFG_SCALE, autocast_dtype=variant.autocast_dtype,
                             cast_weights=variant.cast_weights, compile=variant.compile == "model",
                             compile_backend=models.compile_backend,
                             cuda_graphs=variant.cuda_graphs and models.device.type == "cuda")
    return model, Denoiser(forwards, cfg_scale=CFG_SCALE)


def measure(ctx: RunContext, variant: Variant, transport, sampler, B: int) -> None:
    """Both samplers of the variant at batch B (the first compiles or captures where the variant does)."""
    from sit_fast.flops import forward_flops
    from sit_fast.sampling import model_call_times

    device, size = ctx.device, ctx.size
    k = timed_steps(size, B)
    z, y = model_inputs(size, device, B)
    shapes = {"z": list(z.shape), "y": [B], "model_batch": 2 * B}
    try:
        model, denoiser = build_forwards(ctx.models, variant)
    except Exception as error:  # noqa: BLE001 -- recorded, and the run goes on
        for name, *_ in SAMPLERS:
            ctx.fail(SUITE, name, variant, error, model=size.model_name, shapes=shapes, batch_size=B)
        return
    config = ctx.models.variant_config(variant, sampling=True)
    parity, parity_source = ctx.linked_parity(variant, SUITE_FIELDS[SUITE] & LINKED_PARITY)
    graphs = bool(config["cuda_graphs"])
    graph_note = None  # set when CUDA graphs failed and the variant goes on without them
    capture_peak: list[int] = []  # the peak of the run that captured the CUDA graph
    for name, kind, method, num_steps in SAMPLERS:
        if kind == "ODE":
            sample_fn = sampler.sample_ode(sampling_method=method, num_steps=k)
        else:
            sample_fn = sampler.sample_sde(sampling_method=method, num_steps=k)
        calls_timed = len(model_call_times(kind, transport, sampling_method=method, num_steps=k))
        calls_full = len(model_call_times(kind, transport, sampling_method=method, num_steps=num_steps))

        def sample():
            with torch.no_grad():
                return sample_fn(z, denoiser.for_labels(y))[-1]

        def run_and_time():
            reset_peak_memory(device)
            start = time.perf_counter()
            sample()  # compiles / captures where the variant does
            synchronize(device)
            first_run_s = time.perf_counter() - start
            if graphs and not capture_peak:
                capture_peak.append(peak_memory(device))
            reset_peak_memory(device)
            timed, windows = time_twice(sample, device, warmup=0, iters=size.sample_iters)
            peak = peak_memory(device)
            if graphs and peak is not None:
                peak = max(peak, capture_peak[0])
            return first_run_s, timed, windows, peak

        failure = None
        try:
            first_run_s, timed, windows, peak = run_and_time()
        except Exception as error:  # noqa: BLE001 -- recorded, and the run goes on
            failure = error
        if failure is not None and graphs:
            # A CUDA graph that fails to capture or replay must not cost the variant's figures:
            # the same compiled model is measured without graphs from here on, and says so.
            graph_note = f"measured without CUDA graphs, which failed: {error_note(failure)}"
            failure = None  # outside the except block, so the traceback's activations can go
            free_memory(device)
            denoiser.forwards.guided = denoiser.forwards.guided.fn
            graphs = False
            config = dict(config, cuda_graphs=False)
            common.log(f"[sample] {variant.name}: {graph_note}")
            try:
                first_run_s, timed, windows, peak = run_and_time()
            except Exception as retry_error:  # noqa: BLE001 -- recorded, and the run goes on
                failure = retry_error
        if failure is not None:
            ctx.fail(SUITE, name, variant, failure, model=size.model_name, shapes=shapes, batch_size=B,
                     steps_timed=calls_timed, variant_config=config)
            failure = None
            free_memory(device)
            continue
        factor = calls_full / calls_timed
        full = timed.scaled(factor)
        window_medians_ms = [m * factor for m in windows["window_medians_ms"]]
        images_per_s = B / (full.median_ms * 1e-3)
        flops_per_image = 2 * forward_flops(model) * calls_full  # CFG: two forwards per image per call
        ctx.emit(ctx.record(
            SUITE, name, variant.name, note=graph_note, dtype=variant.dtype_name, model=size.model_name,
            shapes=shapes, batch_size=B, **full.fields(), window_spread=windows["window_spread"],
            steps_timed=calls_timed,
            **throughput_fields(ctx, variant, flops_per_image, images_per_s),
            peak_memory_bytes=peak, **parity, variant_config=config,
            extra={"sampler": f"{kind} {method}, {num_steps} steps", "model_calls_full": calls_full,
                   "ms_per_model_call": timed.median_ms / calls_timed, "cfg_scale": CFG_SCALE,
                   "extrapolation": f"median_ms = time of {calls_timed} model calls x {calls_full} / "
                                    f"{calls_timed}",
                   "window_medians_ms": window_medians_ms, "first_run_s": first_run_s,
                   "parity_source": parity_source},
        ))
