"""Parity harness: the same weights, inputs and loss through two model configurations.

Compares the outputs, the loss and every parameter's gradient and returns a table. The tests and
the benchmark suite both use it, with the tolerances in TOLERANCES. Errors are norm-wise relative:
||candidate - reference|| / ||reference||, plus the max absolute difference.

    python -m sit_fast.parity --model SiT-S/2 --image-size 64 --dtype bf16 --compile
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
import os

from sit_fast.errors import quiet_ctrl_c_while_loading

quiet_ctrl_c_while_loading(__name__)  # python -m: a Ctrl-C while torch loads ends it, quietly

import torch
import torch.nn.functional as F

# Relative-error bounds of a candidate against the fp32 eager reference ("fp32": the candidate in
# fp32; "bf16": the candidate under bf16 autocast).
TOLERANCES: dict[str, dict[str, float]] = {
    "fp32": {"output": 1e-5, "output_compiled": 1e-4, "loss": 1e-5, "grad": 1e-4},
    "bf16": {"output": 2e-2, "output_compiled": 2e-2, "loss": 2e-2, "grad": 1e-1},
}

# bf16 rounding alone moves a gradient by about 1%, so an absolute bound that never fails on rounding
# also lets a 5% bug through. The yardstick is the reference itself run in the candidate's precision
# (same weights, inputs and loss): each of the candidate's errors must stay within FACTOR times the
# yardstick's error for that tensor, plus FLOOR. The parity table shows both errors side by side;
# tests/test_fast_path.py shows a 5% error in one gradient failing.
# The loss, a single number, is left to the absolute bound: its rounding error is too noisy to scale.
YARDSTICK_FACTOR = 3.0
YARDSTICK_FLOOR = 1e-3


@dataclasses.dataclass
class ParityReport:
    rows: list[dict]  # {"tensor", "max_abs", "rel_err"}, outputs and loss first, then gradients
    dtype: str
    compiled: bool
    # tensor -> relative error of the reference itself in the candidate's precision (None: not run)
    yardstick: dict[str, float] | None = None

    def _row(self, name: str) -> dict:
        return next(r for r in self.rows if r["tensor"] == name)

    @property
    def output_rel_err(self) -> float:
        """The output's error; with an output_no_grad row (compare(no_grad=True)), the larger of the
        two, NaN when either is."""
        errors = [r["rel_err"] for r in self.rows if r["tensor"] in ("output", "output_no_grad")]
        return math.nan if any(math.isnan(e) for e in errors) else max(errors)

    @property
    def loss_rel_err(self) -> float:
        return self._row("loss")["rel_err"]

    @property
    def grad_rel_err_max(self) -> float:
        """The largest gradient error, NaN when any is (max() keeps a NaN only where it comes first)."""
        return self.worst["rel_err"] if any(r["tensor"].startswith("grad:") for r in self.rows) else 0.0

    @property
    def worst(self) -> dict:
        """The gradient row with the largest relative error, or the first NaN one."""
        grads = [r for r in self.rows if r["tensor"].startswith("grad:")]
        if not grads:
            return self._row("output")
        return next((r for r in grads if math.isnan(r["rel_err"])), None) or max(grads, key=lambda r: r["rel_err"])

    def tolerances(self) -> dict[str, float]:
        tol = dict(TOLERANCES[self.dtype])
        if self.compiled:
            tol["output"] = tol["output_compiled"]
        return tol

    def failures(self) -> list[str]:
        """One line per figure over its tolerance (empty when the candidate passes)."""
        tol = self.tolerances()
        out = []
        for name, value in (("output", self.output_rel_err), ("loss", self.loss_rel_err),
                            ("grad", self.grad_rel_err_max)):
            if not value <= tol[name]:  # NaN fails too
                where = f" (worst: {self.worst['tensor']})" if name == "grad" else ""
                out.append(f"{name} relative error {value:.3g} > {tol[name]:.0e}{where}")
        return out + self.yardstick_failures()

    def yardstick_failures(self) -> list[str]:
        """One line per output or gradient whose error exceeds YARDSTICK_FACTOR x the reference's own
        error in this precision + YARDSTICK_FLOOR (empty without a yardstick)."""
        if self.yardstick is None:
            return []
        out = []
        for r in self.rows:
            if r["tensor"] == "loss":
                continue
            bound = YARDSTICK_FACTOR * self.yardstick[r["tensor"]] + YARDSTICK_FLOOR
            if not r["rel_err"] <= bound:
                out.append(f"{r['tensor']}: relative error {r['rel_err']:.3g} > {bound:.3g} "
                           f"({YARDSTICK_FACTOR:g} x the reference's own {self.yardstick[r['tensor']]:.3g} "
                           f"in {self.dtype} + {YARDSTICK_FLOOR:.0e})")
        return out

    def ok(self) -> bool:
        return not self.failures()

    def yardstick_summary(self) -> str | None:
        """The errors against the reference's own in this precision, tensor by tensor (the loss left
        out, as in yardstick_failures): the median and the largest ratio, and the reference's own output
        and largest gradient error; None without a yardstick."""
        if self.yardstick is None:
            return None
        ratios = [r["rel_err"] / self.yardstick[r["tensor"]] for r in self.rows
                  if r["tensor"] != "loss" and self.yardstick[r["tensor"]] > 0]
        nan = sum(math.isnan(ratio) for ratio in ratios)
        ratios = sorted(ratio for ratio in ratios if not math.isnan(ratio))
        if not ratios:
            return None if not nan else f"against the reference's own error in {self.dtype}: every row NaN"
        middle = len(ratios) // 2
        median = ratios[middle] if len(ratios) % 2 else (ratios[middle - 1] + ratios[middle]) / 2
        grads = [value for name, value in self.yardstick.items() if name.startswith("grad:")]
        own = f"output {self.yardstick['output']:.3g}" + (f", gradients up to {max(grads):.3g}" if grads else "")
        return (f"against the reference's own error in {self.dtype}, tensor by tensor ({len(ratios)} rows, the loss "
                f"left out{f', and {nan} NaN' if nan else ''}): median {median:.2f}x, at most {ratios[-1]:.2f}x; the "
                f"reference's own: {own}")

    def to_markdown(self, max_rows: int = 12) -> str:
        tol = self.tolerances()
        lines = [
            f"parity ({self.dtype}{', compiled' if self.compiled else ''}): output {self.output_rel_err:.3g} "
            f"(tol {tol['output']:.0e}), loss {self.loss_rel_err:.3g} (tol {tol['loss']:.0e}), "
            f"max grad {self.grad_rel_err_max:.3g} (tol {tol['grad']:.0e}), worst {self.worst['tensor']}: "
            + ("PASS" if self.ok() else "FAIL"),
        ]
        summary = self.yardstick_summary()
        if summary is not None:
            lines.append(summary)
        lines.append("")
        own = self.yardstick
        if own is None:
            lines += ["| tensor | max abs err | rel err |", "| --- | --- | --- |"]
        else:
            lines += [f"| tensor | max abs err | rel err | reference's own in {self.dtype} |",
                      "| --- | --- | --- | --- |"]
        ordered = self.rows[:2] + sorted(self.rows[2:], key=lambda r: -r["rel_err"])
        for r in ordered[:max_rows]:
            extra = "" if own is None else f" {own[r['tensor']]:.3g} |"
            lines.append(f"| {r['tensor']} | {r['max_abs']:.3g} | {r['rel_err']:.3g} |{extra}")
        if len(ordered) > max_rows:
            lines.append(f"| ... {len(ordered) - max_rows} more | | |" + ("" if own is None else " |"))
        return "\n".join(lines)


def _errors(name: str, candidate: torch.Tensor, reference: torch.Tensor) -> dict:
    c, r = candidate.detach().double(), reference.detach().double()
    diff = (c - r).norm().item()
    norm = r.norm().item()
    rel = diff / norm if norm > 0 else (0.0 if diff == 0 else math.inf)
    max_abs = (c - r).abs().max().item() if c.numel() else 0.0
    return {"tensor": name, "max_abs": max_abs, "rel_err": rel}


def randomize_zero_init_(model: torch.nn.Module, std: float = 0.02, seed: int | None = None) -> torch.nn.Module:
    """Fill the parameters that adaLN-Zero initialises to zero with N(0, std^2) noise.

    A freshly initialised SiT outputs zeros and most of its gradients vanish, which would make any
    comparison pass; parity needs weights that exercise every path.
    """
    generator = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, ()).item()))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and torch.count_nonzero(p) == 0:
                # device="cpu": the generator is a CPU one, also under a `with torch.device("cuda")`
                # default (benchmarks.common.ModelFactory), where randn would otherwise be a CUDA call.
                p.copy_(torch.randn(p.shape, generator=generator, device="cpu") * std)
    return model


def random_inputs(model, batch_size: int, device, generator: torch.Generator):
    x = torch.randn(batch_size, model.in_channels, model.input_size, model.input_size, generator=generator)
    t = torch.rand(batch_size, generator=generator)
    y = torch.randint(0, model.num_classes, (batch_size,), generator=generator)
    target = torch.randn(batch_size, model.in_channels, model.input_size, model.input_size, generator=generator)
    return x.to(device), t.to(device), y.to(device), target.to(device)


def compare(reference: torch.nn.Module, candidate: torch.nn.Module, batch_size: int = 4,
            autocast_dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
            seed: int | None = None, cfg_scale: float | None = None, compiled: bool = False,
            yardstick: bool = False, no_grad: bool = False) -> ParityReport:
    """Run reference (fp32, eager) and candidate on the same weights, inputs and loss.

    The candidate gets the reference's weights. Both run in eval mode (no label dropout) with
    gradients on, each module's training flag and each parameter's .grad given back as they were on
    return; the loss is the mean squared error against a random target. cfg_scale: compare
    forward_with_cfg instead of forward. compiled: only selects the compiled output tolerance.
    yardstick: with an autocast dtype, also run a copy of the reference under it and bound each of
    the candidate's errors by that copy's (see YARDSTICK_FACTOR).
    no_grad: also compare an output computed without gradients (the row output_no_grad, held to the
    output's tolerance): the path sampling takes, where the fast path's MLP and adaLN GEMMs differ
    from training's. A compiled candidate compiles once more for it.
    """
    if autocast_dtype not in (None, torch.float32, torch.bfloat16):  # TOLERANCES bound these only
        raise ValueError(f"autocast_dtype must be None, torch.float32 or torch.bfloat16, got {autocast_dtype}")
    device = torch.device(device)
    candidate.load_state_dict(reference.state_dict())
    reference.to(device)
    candidate.to(device)
    with kept_modes_and_grads(reference, candidate):
        reference.eval()
        candidate.eval()
        return _compare(reference, candidate, batch_size, autocast_dtype, device, seed, cfg_scale, compiled,
                        yardstick, no_grad)


@contextlib.contextmanager
def kept_modes_and_grads(*models: torch.nn.Module):
    """Each module's training flag and each parameter's .grad (a tensor, or None) given back on exit."""
    modes = [(module, module.training) for model in models for module in model.modules()]
    grads = [(p, p.grad) for model in models for p in model.parameters()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
        for p, grad in grads:
            p.grad = grad


def _compare(reference: torch.nn.Module, candidate: torch.nn.Module, batch_size: int,
             autocast_dtype: torch.dtype | None, device: torch.device, seed: int | None, cfg_scale: float | None,
             compiled: bool, yardstick: bool, no_grad: bool) -> ParityReport:
    generator = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, ()).item()))
    x, t, y, target = random_inputs(reference, batch_size, device, generator)
    if cfg_scale is not None:
        half = batch_size // 2
        x = torch.cat([x[:half], x[:half]])
        t = torch.cat([t[:half], t[:half]])
        y = torch.cat([y[:half], torch.full_like(y[:half], reference.num_classes)])
        target = target[: 2 * half]

    def run(model, autocast):
        model.zero_grad(set_to_none=True)
        ctx = torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext()
        forward = model if cfg_scale is None else functools.partial(model.forward_with_cfg, cfg_scale=cfg_scale)
        with ctx:
            out = forward(x, t, y)
        loss = F.mse_loss(out.float(), target)
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        out_no_grad = None
        if no_grad:
            with torch.no_grad(), ctx:
                out_no_grad = forward(x, t, y)
        return out.detach(), loss.detach(), grads, out_no_grad

    def error_rows(out, loss, grads, out_no_grad):
        rows = [_errors("output", out, ref_out), _errors("loss", loss, ref_loss)]
        if no_grad:
            rows.append(_errors("output_no_grad", out_no_grad, ref_out_no_grad))
        for name, g in ref_grads.items():
            if name not in grads:
                rows.append({"tensor": f"grad:{name}", "max_abs": math.inf, "rel_err": math.inf})
            else:
                rows.append(_errors(f"grad:{name}", grads[name], g))
        return rows

    ref_out, ref_loss, ref_grads, ref_out_no_grad = run(reference, None)
    rows = error_rows(*run(candidate, autocast_dtype))
    dtype = "fp32" if autocast_dtype in (None, torch.float32) else "bf16"
    yardstick_errors = None
    if yardstick and dtype != "fp32":
        own = error_rows(*run(copy.deepcopy(reference), autocast_dtype))
        yardstick_errors = {r["tensor"]: r["rel_err"] for r in own}
    return ParityReport(rows=rows, dtype=dtype, compiled=compiled, yardstick=yardstick_errors)


def main(argv=None) -> int:
    from sit_fast.argtypes import OneLineArgumentParser, positive_int, random_seed, torch_device
    from sit_fast.errors import UserError
    from sit_fast.attention import ATTN_BACKENDS, select_backend
    from sit_fast.models import SiT_models, fused_kernels_flag, model_config

    parser = OneLineArgumentParser(prog="python -m sit_fast.parity", allow_abbrev=False,
                                   description="Compare a fast SiT configuration against the reference.")
    parser.add_argument("--model", default="SiT-S/2", choices=list(SiT_models), help="model configuration")
    parser.add_argument("--image-size", type=positive_int, default=64, help="image size; latents are image-size / 8")
    parser.add_argument("--num-classes", type=positive_int, default=1000, help="number of classes")
    parser.add_argument("--batch-size", type=positive_int, default=4, help="batch size of the comparison")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="candidate precision")
    parser.add_argument("--attn-backend", default="auto", choices=list(ATTN_BACKENDS),
                        help="candidate attention backend")
    parser.add_argument("--fused-kernels", choices=["auto", "on", "off"], default="auto",
                        help="candidate fused kernels")
    parser.add_argument("--compile", action="store_true", help="compile the candidate's blocks")
    parser.add_argument("--device", type=torch_device, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device")
    parser.add_argument("--seed", type=random_seed, default=None,
                        help="seed of the weights and inputs (random when omitted)")
    args = parser.parse_args(argv)
    patch = model_config(args.model)["patch_size"]
    if args.image_size % (8 * patch):
        raise UserError(f"--image-size {args.image_size}: {args.model} needs a multiple of {8 * patch} "
                        f"(the VAE's 8 times the patch size {patch})")

    fused, _ = fused_kernels_flag(args.fused_kernels, torch.device(args.device), auto_on_cpu=True)
    common = dict(input_size=args.image_size // 8, num_classes=args.num_classes)
    if args.seed is None:  # drawn, and said, so that a failing comparison can be run again
        args.seed = int.from_bytes(os.urandom(4), "little")
        print(f"seed {args.seed} (--seed {args.seed} compares the same weights and inputs again)", flush=True)
    torch.manual_seed(args.seed)  # the initial weights
    reference = randomize_zero_init_(SiT_models[args.model](**common), seed=args.seed)
    try:  # a backend that cannot run here: one line saying why
        candidate = SiT_models[args.model](attn_backend=args.attn_backend, fused_kernels=fused, **common)
        select_backend(args.attn_backend, torch.device(args.device),
                       torch.bfloat16 if args.dtype == "bf16" else torch.float32, candidate.blocks[0].attn.head_dim)
    except ValueError as err:
        raise UserError(f"--attn-backend {args.attn_backend}: {err}") from None
    if args.compile:
        candidate.compile_blocks()
    report = compare(reference, candidate, args.batch_size,
                     torch.bfloat16 if args.dtype == "bf16" else None, args.device, args.seed, compiled=args.compile,
                     yardstick=True)
    print(report.to_markdown())
    return 0 if report.ok() else 1


if __name__ == "__main__":
    from sit_fast.errors import cli_entry

    raise SystemExit(cli_entry(main)())
