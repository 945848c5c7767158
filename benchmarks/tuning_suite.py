"""Launch parameters of the fused kernels, searched on the device: warps, token tiles, prefetch.

The kernels hold one whole row (BLOCK_D = D rounded up to a power of two) per program and loop over
a tile of tokens; three launch parameters are free, per direction: the warps per program, how many
programs per streaming multiprocessor the token tiling aims for (`kernels._launch.token_tiling`),
and whether each program loads row t + 1 before reducing row t (prefetch). Their defaults
(`kernels._launch.block_config`, `PROGRAMS_PER_SLOT`, prefetch off) were set from register counts,
not timings; this suite times the alternatives at the kernels suite's shapes (SiT-XL/2: B=256,
T=256, D=1152, bf16), forward and backward separately, so one GPU run says which to choose.

Search, per op and direction, a coordinate search from the default launch: every warp count, then
every tiling at the best so far, then prefetch on and off, then every warp count again (at D = 1152
at most 16 launches of the 70 combinations of 5 warp counts, 7 tilings and 2 prefetch settings).
Each launch is checked against the eager reference first, its outputs NaN-filled: one whose error
exceeds twice the default launch's (plus 1e-5), or is NaN, is recorded as `parity_failed` and
never chosen. On the CPU (Triton interpreter) only the default, a one-program-per-sample tiling
and the other prefetch setting run: the dry run proves each path, and warps mean nothing there.
The best launch prints as SIT_FAST_KERNEL_LAUNCH settings.

    python -m benchmarks tuning --device cuda --out DIR      # alone; `all` runs it last, in the time left
"""
from __future__ import annotations

import torch

from benchmarks import kernels_suite as ks

SUITE = "tuning"
PROGRAMS_PER_SLOT = (1, 2, 4, 8, 16, 32, 64)
TOLERANCE_FACTOR, TOLERANCE_FLOOR = 2.0, 1e-5
CUDA_BWD_REPS, CPU_REPS = 10, 2


def warp_choices(block_d: int) -> list[int]:
    """Warp counts giving 1 to 32 row elements per thread (at most 32 warps)."""
    return [w for w in (1, 2, 4, 8, 16, 32) if 1 <= block_d // (32 * w) <= 32] or [1]


KEYS = ("num_warps", "programs_per_slot", "prefetch")  # one launch: a value of each, per direction


def run(ctx) -> None:
    import kernels
    from kernels import _launch, reference

    device = ctx.device
    cfg = ks.SIZES[ctx.size.name]
    if not kernels.kernels_available(device):
        raise RuntimeError(f"the fused kernels cannot run on {device} here")
    cuda = device.type == "cuda"
    block_d, _ = _launch.block_config(cfg.D)
    for op in ks.OPS:
        for direction in ("fwd", "bwd"):
            default = _launch.launch_params(cfg.D, direction)  # SIT_FAST_KERNEL_LAUNCH included
            if cuda:
                choices = (warp_choices(block_d), list(PROGRAMS_PER_SLOT), [0, 1])
            else:  # the interpreter: prove each path once (warps mean nothing there)
                choices = ([default[0]], [default[1], 1], [default[2], 1 - default[2]])
            tune_one(ctx, op, direction, tuple(int(v) for v in default), choices)


def tune_one(ctx, op: str, direction: str, default: tuple, choices: tuple) -> None:
    """Coordinate search over KEYS for one op and direction; emits one record per launch tried."""
    import kernels
    from kernels import _launch, reference

    device, cfg = ctx.device, ks.SIZES[ctx.size.name]
    cuda = device.type == "cuda"
    ours, ref = getattr(kernels, op), getattr(reference, op)
    args = ks.make_inputs(op, cfg.B, cfg.T, cfg.D, cfg.dtype, device, requires_grad=direction == "bwd")
    grads_out = None
    if direction == "bwd":
        with torch.no_grad():
            grads_out = [torch.randn_like(o) for o in ks._as_tuple(ref(*args))]
    expected = ks._make_step(ref, args, direction, grads_out)()
    bytes_moved = ks.minimum_bytes(op, direction, cfg.B, cfg.T, cfg.D, cfg.dtype)
    name = f"{op}.{direction}"
    measured: dict[tuple, dict] = {}
    limit = None  # the parity limit, set once the default launch has run

    def measure(launch: tuple) -> bool:
        """Measure one launch (once) and write its record; False when the time box is out (recorded
        as skipped). Written at once, so a run stopped part way through a search keeps its launches."""
        if launch in measured:
            return True
        fits = measure_one(launch)
        ctx.emit(measured[launch])
        return fits

    def measure_one(launch: tuple) -> bool:
        settings = dict(zip(KEYS, launch))
        variant = "ours " + " ".join(f"{k}={v}" for k, v in settings.items())
        extra = {**settings, "default": launch == default, "best": False}
        common = dict(dtype=ks.DTYPE_NAMES[cfg.dtype], shapes={"B": cfg.B, "T": cfg.T, "D": cfg.D},
                      bytes_moved=bytes_moved, extra=extra)
        if not ctx.budget.allows(2.0 if cuda else 1.0):
            measured[launch] = ctx.record(SUITE, name, variant, status="skipped", note=(
                f"time box: {max(ctx.budget.remaining(), 0):.0f} s left of {ctx.budget.seconds:.0f} s; "
                f"the search of {name} stops here"), **common)
            return False
        try:
            with _launch.launch_overrides(**{f"{direction}_{k}": v for k, v in settings.items()}):
                step = ks._make_step(ours, args, direction, grads_out)
                with _launch.poison_outputs():  # an element a launch leaves unwritten reads NaN
                    error = ks._max_abs_err(step(), expected)
                if direction == "bwd":
                    timing = ks._time_backward(ours, args, grads_out, device, CUDA_BWD_REPS if cuda else CPU_REPS)
                elif cuda:
                    from triton.testing import do_bench

                    timing = do_bench(step, warmup=5, rep=25, quantiles=[0.5, 0.2, 0.8])
                else:
                    timing = ks._time_cpu(step, CPU_REPS)
        except Exception as failure:  # noqa: BLE001 -- a launch that fails is an answer
            measured[launch] = ctx.record(SUITE, name, variant, **ks._failure_row(failure), **common)
            return True
        median, p20, p80 = timing
        gbps = bytes_moved / (median * 1e-3) / 1e9
        status, note = "ok", None
        if limit is not None and not error <= limit:  # NaN fails too
            status, note = "parity_failed", (f"max abs err {error:.3g} > {limit:.3g} (twice the default "
                                             f"launch's + {TOLERANCE_FLOOR:g})")
        measured[launch] = ctx.record(
            SUITE, name, variant, median_ms=median, p20_ms=p20, p80_ms=p80, gbps=gbps,
            fraction_of_copy_bw=gbps / ctx.ceilings["copy_gbps"], parity_max_abs_err=error,
            status=status, note=note, **common)
        return True

    def best() -> tuple:
        ok = {k: r for k, r in measured.items() if r["status"] == "ok"}
        return min(ok, key=lambda k: ok[k]["median_ms"]) if ok else default

    searching = measure(default)
    if measured[default]["status"] == "ok":
        limit = TOLERANCE_FACTOR * measured[default]["parity_max_abs_err"] + TOLERANCE_FLOOR
    for axis in (0, 1, 2, 0):  # warps, tiling, prefetch, then warps again at the best of the others
        current = best()
        for value in choices[axis]:
            searching = searching and measure(current[:axis] + (value,) + current[axis + 1:])

    chosen = best()
    if measured[chosen]["status"] == "ok":
        measured[chosen]["extra"]["best"] = True
        base = measured[default]
        speedup = f"{base['median_ms'] / measured[chosen]['median_ms']:.2f}x the default" \
            if base["status"] == "ok" else "the default did not run"
        settings = ",".join(f"{direction}_{k}={v}" for k, v in zip(KEYS, chosen))
        print(f"[{SUITE}] {name}: best {settings} {measured[chosen]['gbps']:.3g} GB/s ({speedup})", flush=True)
        ctx.results.write()  # the best launch's mark
