"""Activation memory per image: counted on fake tensors, and on CUDA measured.

activation_bytes_per_image: sit_fast.memory.activation_bytes_per_image, the bytes autograd saves
    for backward per image in the variant's eager maths (attention backend, fused kernels, autocast),
    on fake tensors: cheap on any device, and the same figure for a compiled variant as for its eager
    form (Inductor may save less; the measured figure shows it).
measured_activation_bytes_per_image (CUDA): one forward + backward (MSE loss, no optimizer) at each
    of size.memory_batches (b1, b2) after a warm-up call; (peak(b2) - peak(b1)) / (b2 - b1) of
    torch.cuda.max_memory_allocated, so weights and gradients drop out. A compiled variant is
    measured compiled when the time box has room for its two compilations, else in its eager form
    (extra.measured_form).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from benchmarks.common import RunContext, Variant, expected_cost_s, free_memory, peak_memory, reset_peak_memory

SUITE = "memory"
NAME = "activations"


def run(ctx: RunContext) -> None:
    for variant in ctx.measurement_order():
        b1, b2 = ctx.size.memory_batches
        kw = ctx.size.model_kwargs
        common = dict(model=ctx.size.model_name, batch_size=b2,
                      shapes={"x": [b2, kw["in_channels"], kw["input_size"], kw["input_size"]], "y": [b2]})
        cuda = ctx.device.type == "cuda"
        needed = expected_cost_s(ctx.size, variant) if cuda else 0.0
        compiled = variant.compile is not None
        if compiled:
            needed *= len(ctx.size.memory_batches)  # dynamic=False: one compilation per batch size
            if not ctx.budget.allows(needed):  # measure the eager form rather than nothing
                compiled = False
                needed = expected_cost_s(ctx.size, dataclasses.replace(variant, compile=None)) if cuda else 0.0
        if not ctx.budget.allows(needed):
            ctx.skip(SUITE, NAME, variant, needed, **common)
            continue
        try:
            measure(ctx, variant, common, compiled)
        except Exception as error:  # noqa: BLE001 -- recorded, and the run goes on
            ctx.fail(SUITE, NAME, variant, error, **common)
        finally:
            free_memory(ctx.device)


def forward_backward_peak(ctx: RunContext, model, variant: Variant, B: int) -> int:
    """Peak allocated bytes of one forward + backward at batch B (after one untimed warm-up call)."""
    device = ctx.device
    kw = ctx.size.model_kwargs
    x = torch.randn(B, kw["in_channels"], kw["input_size"], kw["input_size"], device=device)
    t = torch.rand(B, device=device)
    y = torch.randint(0, kw["num_classes"], (B,), device=device)
    target = torch.randn_like(x)

    def step():
        with variant.autocast(device):
            out = model(x, t, y)
        F.mse_loss(out.float(), target).backward()
        model.zero_grad(set_to_none=True)

    step()  # compiles where the variant compiles; its workspace is not an activation
    reset_peak_memory(device)
    step()
    return peak_memory(device)


def measure(ctx: RunContext, variant: Variant, common: dict, compiled: bool) -> None:
    """compiled: measure the variant as compiled (False for a compiled variant: its eager form,
    when the time box has no room for its compilations; extra.measured_form says which)."""
    model = ctx.models.build(variant, compile=False)
    counted = ctx.models.activation_bytes_per_image(model, variant)
    peak = measured = None
    extra = {"fake_tensor_batches": [2, 4]}
    if counted is None:
        extra["activation_count_error"] = ctx.models.activation_count_errors.get(variant.name)
    config = ctx.models.variant_config(variant)
    if ctx.device.type == "cuda":
        if not compiled and variant.compile is not None:  # the record says what was measured: eager
            config = dict(config, compile=None, compile_backend=None)
        extra["measured_form"] = ("compiled" if compiled else "eager" if variant.compile is None
                                  else "eager (its compilations did not fit the time box)")
        if compiled:
            ctx.models.compile(model, variant)
        b1, b2 = ctx.size.memory_batches
        peak1 = forward_backward_peak(ctx, model, variant, b1)
        peak = forward_backward_peak(ctx, model, variant, b2)
        measured = (peak - peak1) // (b2 - b1)
        extra.update(measured_batches=[b1, b2], peak_b1_bytes=peak1)
    ctx.emit(ctx.record(
        SUITE, NAME, variant.name, dtype=variant.dtype_name, **common, peak_memory_bytes=peak,
        activation_bytes_per_image=counted, measured_activation_bytes_per_image=measured,
        variant_config=config, extra=extra,
    ))
