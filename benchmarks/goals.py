"""The speed goals of the kernels, training and sampling, judged from a run's records.

Each goal is a figure of `ours` against a target: a fraction of a ceiling (the copy bandwidth, the
data sheet's peak) or how many times faster than the compiled reference it ran. The noise of a
figure is the window_spread of the records it comes from (each version is timed twice, back to back;
a ratio adds the spreads of its two records): where the figure is within that fraction of the
target, the verdict says "within noise", since a second run could fall on the other side.

The goals concern SiT-XL/2 on a GPU (`--size full --device cuda`, compiled by Inductor); other
runs get the figures but no verdict. Sampling's batches are those of the run's size: the smallest
is the latency batch (8 at full size), the largest the throughput batch (256).
"""
from __future__ import annotations

import dataclasses
import math

from benchmarks.common import SIZES, figures_read

# The compiled reference of each suite: the kernels suite compiles the ops' reference alone.
COMPILED_REFERENCE = {"kernels": "reference+compile", "train": "reference+bf16+sdpa+compile",
                      "sample": "reference+bf16+sdpa+compile"}
NOT_JUDGED = "not judged: the goals concern SiT-XL/2 on a GPU (--size full --device cuda, Inductor)"
KERNEL_OPS = ("gated_residual_layernorm_modulate", "layernorm_modulate", "gated_residual")


@dataclasses.dataclass(frozen=True)
class Goal:
    text: str
    suite: str
    name: str
    target: float
    field: str | None = None
    """The figure of ours' record (fraction_of_copy_bw, mfu); None: ours' speed over the compiled
    reference's (images/s where the records have it, else 1 / median_ms)."""
    batch: str | None = None
    """Sampling: "latency" (the size's smallest sample batch) or "throughput" (its largest)."""


def goals() -> list[Goal]:
    found = []
    for op in KERNEL_OPS:
        found += [
            Goal(f"{op} forward >= 85% of the copy bandwidth", "kernels", f"{op}.fwd", 0.85, "fraction_of_copy_bw"),
            Goal(f"{op} backward >= 70% of the copy bandwidth", "kernels", f"{op}.bwd", 0.70, "fraction_of_copy_bw"),
            Goal(f"{op} forward faster than torch.compile of the reference", "kernels", f"{op}.fwd", 1.0),
            Goal(f"{op} backward faster than torch.compile of the reference", "kernels", f"{op}.bwd", 1.0),
        ]
    found += [
        Goal("training step >= 55% MFU", "train", "train_step", 0.55, "mfu"),
        Goal("training >= 1.25x the compiled reference's images/s", "train", "train_step", 1.25),
        Goal("250-step SDE with guidance, latency batch: >= 1.5x the compiled reference's images/s", "sample",
             "sde_euler_250_cfg4", 1.5, batch="latency"),
    ]
    # The batch-256 goals name the SDE; they are read for the 50-step ODE too, and say so.
    for name, sampler in (("sde_euler_250_cfg4", "250-step SDE"), ("ode_euler_50_cfg4", "50-step ODE")):
        also = "" if name.startswith("sde") else " (the SDE's goal, read for the ODE too)"
        found += [
            Goal(f"{sampler} with guidance, throughput batch: >= 1.2x the compiled reference's images/s{also}",
                 "sample", name, 1.2, batch="throughput"),
            Goal(f"{sampler} with guidance, throughput batch: >= 50% MFU{also}", "sample", name, 0.5, "mfu",
                 batch="throughput"),
        ]
    return found


def _find(records: list[dict], goal: Goal, variant: str, batch: int | None) -> dict | None:
    """The last record of `variant` for the goal's measurement (a rerun's replaces an earlier one)."""
    found = None
    for r in records:
        if (r["suite"], r["name"], r["variant"]) == (goal.suite, goal.name, variant) and \
                (batch is None or r.get("batch_size") == batch):
            found = r
    return found


def _number(value) -> float | None:
    """A finite positive-or-zero figure, or None (a record read back from results.json writes NaN and
    infinities as strings: common.figures_read)."""
    value = figures_read(value)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) and value >= 0 else None


def _speed(record: dict) -> float | None:
    """Images/s (training, sampling), or calls per ms (kernels: 1 / median_ms)."""
    if record["suite"] != "kernels":
        return _number(record.get("images_per_s")) or None
    median = _number(record.get("median_ms"))
    return 1.0 / median if median else None


def judge(goal: Goal, records: list[dict], size_name: str | None, judged: bool) -> dict:
    """The goal's row: its figure (a fraction of a ceiling, or a ratio of speeds: `kind`), target, noise
    and verdict; judged False gives the figures without a verdict."""
    batch = None
    if goal.batch is not None and size_name in SIZES:
        batches = SIZES[size_name]().sample_batches
        batch = min(batches) if goal.batch == "latency" else max(batches)
    row = dict(goal=goal.text, suite=goal.suite, kind="fraction" if goal.field else "ratio",
               target=goal.target, batch=batch, figure=None, noise=None, verdict=None)
    variants = ["ours"] if goal.field else ["ours", COMPILED_REFERENCE[goal.suite]]
    found = [_find(records, goal, v, batch) for v in variants]
    missing = [f"{v}: {'no record' if r is None else r['status'] + (' (' + r['note'] + ')' if r.get('note') else '')}"
               for v, r in zip(variants, found) if r is None or r["status"] != "ok"]
    if missing:
        row["verdict"] = "not measured: " + "; ".join(missing)
        return row
    if goal.field:
        figure = _number(found[0].get(goal.field))
    else:
        speeds = [_speed(r) for r in found]
        figure = speeds[0] / speeds[1] if None not in speeds else None
    if figure is None:
        row["verdict"] = f"not measured: no {goal.field or 'time'} in the record"
        return row
    spreads = [_number(r.get("window_spread")) for r in found]
    row["figure"] = figure
    row["noise"] = None if None in spreads else sum(spreads)
    if not judged:
        row["verdict"] = NOT_JUDGED
        return row
    verdict = "met" if figure >= goal.target else "missed"
    if row["noise"] is None:
        verdict += " (noise unknown: a record without window_spread)"
    elif abs(figure / goal.target - 1) <= row["noise"]:
        verdict += ", within noise"
    row["verdict"] = verdict
    return row


def evaluate(document: dict) -> list[dict]:
    """Every goal's row, from a results document (results.json's content)."""
    environment, setup = document.get("environment") or {}, document.get("setup") or {}
    judged = (environment.get("device_type") == "cuda" and setup.get("size") == "full"
              and setup.get("compile_backend") == "inductor")
    return [judge(goal, document.get("records") or [], setup.get("size"), judged) for goal in goals()]


def console_lines(rows: list[dict], suites_run: list[str]) -> list[str]:
    """The goals for the log: those of the suites that ran."""
    shown = [r for r in rows if r["suite"] in suites_run]
    lines = []
    if any(r["verdict"] == NOT_JUDGED for r in shown):
        lines.append(f"[goal] figures only, {NOT_JUDGED}")
    for r in shown:
        fraction = r["kind"] == "fraction"
        figure = "-" if r["figure"] is None else f"{r['figure']:.1%}" if fraction else f"{r['figure']:.3f}x"
        target = f"{r['target']:.0%}" if fraction else f"{r['target']:.2f}x"
        batch = f" (batch {r['batch']})" if r["batch"] is not None else ""
        verdict = "" if r["verdict"] == NOT_JUDGED else f": {r['verdict']}"
        lines.append(f"[goal] {r['suite']}: {r['goal']}{batch}: {figure}, target {target}{verdict}")
    return lines
