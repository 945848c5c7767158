"""Parity: each variant against the fp32 eager reference, forward and backward.

sit_fast.parity.compare gives the candidate the reference's weights, runs both on the same random
inputs and the same loss, and compares the output, the loss and every parameter gradient; the
tolerances are sit_fast.parity.TOLERANCES, the parity tests' own, and in bf16 the yardstick (each
error within 3x the reference's own in bf16, sit_fast.parity.YARDSTICK_FACTOR). TF32 is off here on
CUDA, so "fp32" means fp32.

Cases, most important first: ours in its own precision (bf16 autocast; the train and sample
records quote it), the eager non-reference variants in bf16 (cheap: nothing to compile), ours in
fp32 (the fused kernels alone, where the tolerance is tight), then the compiled others in bf16 (the
compiled reference's train and sample records quote its parity). At the GPU session's deadline the
parity box is sized for the first compiled case (expected_cost_s); a later compiled case is
expected to take at most OBSERVED_MARGIN times what the longest one before it took (its compiled
graphs and kernels cached by then), so the box holds more of them than the first estimate would
allow. Train and sample records of the same run copy these figures (RunContext.parity).
"""
from __future__ import annotations

import dataclasses
import random
import time

import torch

from benchmarks.common import (
    LINKED_PARITY, OBSERVED_MARGIN, PARITY_REFERENCE, RunContext, Variant, expected_cost_s, figures_read,
    free_memory, set_tf32,
)

SUITE = "parity"
NAME = "forward_backward"


def cases(variants: tuple[Variant, ...]) -> list[tuple[Variant, torch.dtype | None]]:
    """(variant, autocast dtype or None for fp32) in the order a time box should cut them last-first:
    fused-kernel variants in their own precision, then the eager others (no compilation: cheap),
    then the fused kernels in fp32, then the compiled others."""
    out = []
    for variant in variants:
        if variant.name == "reference":
            continue
        fused = variant.fused_kernels is not False
        out.append((0 if fused else 1 if variant.compile is None else 3, variant, variant.autocast_dtype))
        if fused and variant.autocast_dtype is not None:
            out.append((2, variant, None))  # the kernels in fp32, where the tolerance is tight
    return [(variant, dtype) for _, variant, dtype in sorted(out, key=lambda case: case[0])]


def run(ctx: RunContext) -> None:
    from sit_fast.parity import compare

    set_tf32(ctx.device, False)
    try:
        reference_variant = PARITY_REFERENCE
        seed = ctx.seed if ctx.seed is not None else random.randrange(2**31)
        B = ctx.size.parity_batch
        kw = ctx.size.model_kwargs
        shapes = {"x": [B, kw["in_channels"], kw["input_size"], kw["input_size"]], "t": [B], "y": [B]}
        compiled_took = None  # seconds of the longest compiled case so far
        for variant, autocast_dtype in cases(ctx.variants):
            dtype_name = "fp32" if autocast_dtype is None else "bf16"
            common = dict(model=ctx.size.model_name, shapes=shapes, batch_size=B, dtype=dtype_name)
            needed = expected_cost_s(ctx.size, variant)
            if variant.compile is not None and compiled_took is not None:
                needed = min(needed, OBSERVED_MARGIN * compiled_took)
            if not ctx.budget.allows(needed):
                ctx.skip(SUITE, NAME, variant, needed, **common)
                continue
            fp32_variant = variant if autocast_dtype is not None else _as_fp32(variant)
            began = time.monotonic()
            try:
                reference = ctx.models.build(reference_variant)
                candidate = ctx.models.build(variant)
                report = compare(reference, candidate, batch_size=B, autocast_dtype=autocast_dtype,
                                 device=ctx.device, seed=seed, compiled=variant.compile is not None,
                                 yardstick=True)
            except Exception as error:  # noqa: BLE001 -- recorded, and the run goes on
                ctx.fail(SUITE, NAME, variant, error, **common)
                continue
            finally:
                reference = candidate = None
                free_memory(ctx.device)
            if variant.compile is not None:
                compiled_took = max(compiled_took or 0.0, time.monotonic() - began)
            failures = report.failures()
            output_row = report.rows[0]
            fields = dict(
                parity_output_rel_err=report.output_rel_err, parity_loss_rel_err=report.loss_rel_err,
                parity_grad_rel_err_max=report.grad_rel_err_max, parity_max_abs_err=output_row["max_abs"],
                parity_ok=not failures, parity_tolerances=report.tolerances(),
            )
            worst = sorted(report.rows[2:], key=lambda r: -r["rel_err"])[:5]
            if report.yardstick is not None:  # bf16: the reference's own error beside each
                worst = [dict(r, reference_own_rel_err=report.yardstick[r["tensor"]]) for r in worst]
            ctx.emit(ctx.record(
                SUITE, NAME, variant.name, status="ok" if not failures else "parity_failed",
                note="; ".join(failures) or None, **common, **fields,
                variant_config=dict(ctx.models.variant_config(fp32_variant), tf32=False),
                extra={"seed": seed, "worst": report.worst["tensor"], "worst_rows": worst,
                       "compared_with": "fp32, eager, math attention, reference ops (PARITY_REFERENCE)"},
            ))
            ctx.parity[(variant.name, dtype_name)] = dict(fields, source=_source(B, seed, dtype_name))
    finally:
        set_tf32(ctx.device, True)


def links(records: list[dict]) -> dict:
    """RunContext.parity as this suite fills it, from its records: for a run continued in a new
    process (`--continue`), whose train and sample records link to the figures the first one measured."""
    found = {}
    for record in records:
        if record["suite"] == SUITE and record["status"] in ("ok", "parity_failed"):
            fields = {k: figures_read(record[k]) for k in LINKED_PARITY}
            found[(record["variant"], record["dtype"])] = dict(
                fields, source=_source(record["batch_size"], record["extra"]["seed"], record["dtype"]))
    return found


def _source(batch_size: int, seed: int, dtype_name: str) -> str:
    return f"parity suite: batch {batch_size}, seed {seed}, {dtype_name}"


def _as_fp32(variant: Variant) -> Variant:
    """The same variant with autocast off (for variant_config of an fp32 case)."""
    return dataclasses.replace(variant, autocast_dtype=None)
