"""Training step: images/s, TFLOP/s, MFU, peak memory, at the largest batch that fits each variant.

One step is what train.py does per batch: the Linear/velocity transport loss (sit_fast.transport)
under the variant's autocast, backward, AdamW (lr 1e-4, no weight decay, fused on CUDA) and
zero_grad. The EMA update is left out (a memory-bound lerp over the parameters, the same for every
variant). FLOPs per image: sit_fast.flops.train_step_flops (3 x forward). After the first
(compiling) step and size.warmup more, size.iters steps are timed twice, back to back
(common.time_twice): the figures are over both windows, window_spread says how far apart they were.

Batch search (CUDA): size.train_batches, largest first; the first batch whose first step, warm-up
and timed steps all run is reported, with every attempt in extra["batch_search"]. A batch whose
predicted memory (16 bytes per parameter for weights, gradients and AdamW state, plus batch x
sit_fast.memory.activation_bytes_per_image) exceeds 1.25 x the device's memory is not tried: each
out-of-memory attempt of a compiled variant costs a compilation (where that count failed, every
batch is tried).
"""
from __future__ import annotations

import time

import torch

from benchmarks.common import (
    LINKED_PARITY, SUITE_FIELDS, RunContext, Variant, expected_cost_s, free_memory, is_oom, model_inputs, peak_memory,
    reset_peak_memory, set_tf32, synchronize, throughput_fields, time_twice,
)

SUITE = "train"
NAME = "train_step"
PREDICTED_OOM_FACTOR = 1.25
OPTIMIZER_BYTES_PER_PARAM = 16  # fp32 weight, gradient, AdamW exp_avg and exp_avg_sq


def run(ctx: RunContext) -> None:
    from sit_fast.transport import create_transport

    set_tf32(ctx.device, True)
    transport = create_transport("Linear", "velocity")
    for variant in ctx.measurement_order():
        needed = expected_cost_s(ctx.size, variant)
        common = dict(model=ctx.size.model_name, shapes={}, batch_size=None)
        if not ctx.budget.allows(needed):
            ctx.skip(SUITE, NAME, variant, needed, **common)
            continue
        try:
            measure(ctx, variant, transport)
        except Exception as error:  # noqa: BLE001 -- recorded, and the run goes on
            ctx.fail(SUITE, NAME, variant, error, **common)
        finally:
            free_memory(ctx.device)


def make_step(model, optimizer, transport, x1: torch.Tensor, y: torch.Tensor, variant: Variant, device):
    """One training step on a fixed batch (the transport draws fresh t and noise on the device)."""

    def step():
        with variant.autocast(device):
            loss = transport.training_losses(model, x1, dict(y=y))["loss"].mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure(ctx: RunContext, variant: Variant, transport) -> None:
    from sit_fast.flops import train_step_flops

    device, size = ctx.device, ctx.size
    kw = size.model_kwargs
    model = ctx.models.build(variant, compile=False)
    activation_bytes = ctx.models.activation_bytes_per_image(model, variant)
    if variant.compile is not None:
        ctx.models.compile(model, variant)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0, fused=device.type == "cuda")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    static_bytes = OPTIMIZER_BYTES_PER_PARAM * trainable
    total_bytes = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None

    search: list[dict] = []
    result = None
    for B in size.train_batches:
        if search and not ctx.budget.allows(expected_cost_s(size, variant)):
            search.append({"batch": B, "result": "not tried: time box"})
            break
        predicted = None if activation_bytes is None else static_bytes + B * activation_bytes
        if total_bytes is not None and predicted is not None and predicted > PREDICTED_OOM_FACTOR * total_bytes:
            search.append({"batch": B, "result": f"not tried: predicted {predicted / 2**30:.0f} GiB > "
                                                 f"{PREDICTED_OOM_FACTOR} x {total_bytes / 2**30:.0f} GiB"})
            continue
        oom = False
        try:
            result = _time_batch(ctx, model, optimizer, transport, variant, B)
        except Exception as error:  # noqa: BLE001 -- out of memory is an answer; anything else is re-raised
            if not is_oom(error):
                raise
            oom = True
        if oom:  # outside the except block, so the traceback's activations are gone
            optimizer.zero_grad(set_to_none=True)
            free_memory(device)
            search.append({"batch": B, "result": "out of memory"})
            continue
        search.append({"batch": B, "result": "fits"})
        break

    config = ctx.models.variant_config(variant)
    extra = {"batch_search": search, "optimizer": "AdamW(lr=1e-4, weight_decay=0, fused on CUDA)",
             "loss": "sit_fast.transport Linear / velocity", "trainable_parameters": trainable}
    if activation_bytes is None:
        extra["activation_count_error"] = ctx.models.activation_count_errors.get(variant.name)
    if result is None:
        status, note = no_fit(search)
        ctx.emit(ctx.record(SUITE, NAME, variant.name, status=status, dtype=variant.dtype_name,
                            note=note, model=size.model_name, shapes={},
                            batch_size=None, activation_bytes_per_image=activation_bytes, variant_config=config,
                            extra=extra))
        return
    B, timing, windows, peak, first_step_s = result
    parity, parity_source = ctx.linked_parity(variant, SUITE_FIELDS[SUITE] & LINKED_PARITY)
    images_per_s = B / (timing.median_ms * 1e-3)
    ctx.emit(ctx.record(
        SUITE, NAME, variant.name, dtype=variant.dtype_name, model=size.model_name,
        shapes={"x": [B, kw["in_channels"], kw["input_size"], kw["input_size"]], "y": [B]}, batch_size=B,
        **timing.fields(), window_spread=windows["window_spread"],
        **throughput_fields(ctx, variant, train_step_flops(model), images_per_s),
        peak_memory_bytes=peak, activation_bytes_per_image=activation_bytes, **parity, variant_config=config,
        extra=dict(extra, first_step_s=first_step_s, window_medians_ms=windows["window_medians_ms"],
                   parity_source=parity_source),
    ))


def no_fit(search: list[dict]) -> tuple[str, str]:
    """(status, note) of a batch search that timed no batch: "oom" naming only the batches that ran
    out of memory, the others (predicted too large, cut by the time box) named as not tried; "skipped"
    when none was tried, since a prediction is not a measurement."""
    failed = [a["batch"] for a in search if a["result"] == "out of memory"]
    untried = "; ".join(f"{a['batch']} {a['result']}" for a in search if a["result"] != "out of memory")
    if not failed:
        return "skipped", f"no batch tried: {untried}"
    return "oom", f"no batch of {failed} fits" + (f"; {untried}" if untried else "")


def _time_batch(ctx: RunContext, model, optimizer, transport, variant: Variant, B: int):
    """(B, timing, window_fields, peak memory, seconds of the first step, compilation included) at batch B:
    the steps after the first and the warm-up are timed twice (common.time_twice)."""
    device, size = ctx.device, ctx.size
    x1, y = model_inputs(ctx.size, device, B)
    step = make_step(model, optimizer, transport, x1, y, variant, device)
    start = time.perf_counter()
    step()  # compiles where the variant compiles
    synchronize(device)
    first_step_s = time.perf_counter() - start
    reset_peak_memory(device)
    timing, windows = time_twice(step, device, warmup=size.warmup, iters=size.iters)
    return B, timing, windows, peak_memory(device), first_step_s
