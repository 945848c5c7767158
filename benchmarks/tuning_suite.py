"""Launch parameters of the fused kernels: num_warps and token tiles per SM, searched on the device.

The kernels hold one whole row (BLOCK_D = D rounded up to a power of two) per program and loop over
a tile of tokens; two launch parameters are free: the warps per program, and how many programs per
streaming multiprocessor the token tiling aims for (`kernels._launch.token_tiling`). Their defaults
(`kernels._launch.block_config`, `PROGRAMS_PER_SLOT`) were set from register counts, not timings;
this suite times the alternatives at the kernels suite's shapes (SiT-XL/2: B=256, T=256, D=1152,
bf16), forward and backward separately, so one GPU run says which to choose.

Search, per op and direction: every warp count at the default tiling, then every tiling at the best
warp count, then every warp count at the best tiling (a coordinate search: ~15 launches instead of
35). Each configuration is checked against the eager reference first, its outputs NaN-filled before
the launch: one whose error exceeds twice the default configuration's (plus 1e-5), or is NaN, is
recorded as `parity_failed` and never chosen. On the CPU
(Triton interpreter) only the default and a one-program-per-sample tiling run: the dry run proves
the path, and warps mean nothing there.

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


def run(ctx) -> None:
    import kernels
    from kernels import _launch, reference

    device = ctx.device
    cfg = ks.SIZES[ctx.size.name]
    if not kernels.kernels_available(device):
        raise RuntimeError(f"the fused kernels cannot run on {device} here")
    cuda = device.type == "cuda"
    block_d, _ = _launch.block_config(cfg.D)
    shapes = {"B": cfg.B, "T": cfg.T, "D": cfg.D}
    dtype_name = ks.DTYPE_NAMES[cfg.dtype]
    for op in ks.OPS:
        ours, ref = getattr(kernels, op), getattr(reference, op)
        for direction in ("fwd", "bwd"):
            default = _launch.launch_params(cfg.D, direction)  # SIT_FAST_KERNEL_LAUNCH included
            warps = warp_choices(block_d) if cuda else [default[0]]
            tilings = list(PROGRAMS_PER_SLOT) if cuda else [default[1], 1]
            args = ks.make_inputs(op, cfg.B, cfg.T, cfg.D, cfg.dtype, device, requires_grad=direction == "bwd")
            grads_out = None
            if direction == "bwd":
                with torch.no_grad():
                    grads_out = [torch.randn_like(o) for o in ks._as_tuple(ref(*args))]
            expected = ks._make_step(ref, args, direction, grads_out)()
            bytes_moved = ks.minimum_bytes(op, direction, cfg.B, cfg.T, cfg.D, cfg.dtype)
            measured: dict[tuple[int, int], dict] = {}
            limit = [None]  # the parity limit, set once the default configuration has run

            def measure(w: int, p: int) -> None:
                if (w, p) in measured:
                    return
                name = f"{op}.{direction}"
                variant = f"ours w={w} p={p}" + (" (default)" if (w, p) == default else "")
                extra = {"num_warps": w, "programs_per_slot": p, "default": (w, p) == default, "best": False}
                common = dict(dtype=dtype_name, shapes=shapes, bytes_moved=bytes_moved, extra=extra)
                if not ctx.budget.allows(2.0 if cuda else 1.0):
                    measured[(w, p)] = ctx.record(SUITE, name, variant, status="skipped", note=(
                        f"time box: {max(ctx.budget.remaining(), 0):.0f} s left of {ctx.budget.seconds:.0f} s"),
                        **common)
                    return
                overrides = {f"{direction}_num_warps": w, f"{direction}_programs_per_slot": p}
                try:
                    with _launch.launch_overrides(**overrides):
                        step = ks._make_step(ours, args, direction, grads_out)
                        with _launch.poison_outputs():  # an element a launch leaves unwritten reads NaN
                            error = ks._max_abs_err(step(), expected)
                        if direction == "bwd":
                            timing = ks._time_backward(ours, args, grads_out, device,
                                                       CUDA_BWD_REPS if cuda else CPU_REPS)
                        elif cuda:
                            from triton.testing import do_bench

                            timing = do_bench(step, warmup=5, rep=25, quantiles=[0.5, 0.2, 0.8])
                        else:
                            timing = ks._time_cpu(step, CPU_REPS)
                except Exception as failure:  # noqa: BLE001 -- a configuration that fails is an answer
                    measured[(w, p)] = ctx.record(SUITE, name, variant, **ks._failure_row(failure), **common)
                    return
                median, p20, p80 = timing
                gbps = bytes_moved / (median * 1e-3) / 1e9
                status, note = "ok", None
                if limit[0] is not None and not error <= limit[0]:  # NaN fails too
                    status, note = "parity_failed", (f"max abs err {error:.3g} > {limit[0]:.3g} (twice the default "
                                                     f"configuration's + {TOLERANCE_FLOOR:g})")
                measured[(w, p)] = ctx.record(
                    SUITE, name, variant, median_ms=median, p20_ms=p20, p80_ms=p80, gbps=gbps,
                    fraction_of_copy_bw=gbps / ctx.ceilings["copy_gbps"], parity_max_abs_err=error,
                    status=status, note=note, **common)

            def best() -> tuple[int, int]:
                ok = {k: r for k, r in measured.items() if r["status"] == "ok"}
                return min(ok, key=lambda k: ok[k]["median_ms"]) if ok else default

            measure(*default)
            if measured[default]["status"] == "ok":
                limit[0] = TOLERANCE_FACTOR * measured[default]["parity_max_abs_err"] + TOLERANCE_FLOOR
            for w in warps:
                measure(w, default[1])
            best_w = best()[0]
            for p in tilings:
                measure(best_w, p)
            best_p = best()[1]
            for w in warps:
                measure(w, best_p)

            chosen = best()
            if chosen in measured and measured[chosen]["status"] == "ok":
                measured[chosen]["extra"]["best"] = True
                base = measured[default]
                speedup = base["median_ms"] / measured[chosen]["median_ms"] if base["status"] == "ok" else None
                ks_note = f"{speedup:.2f}x the default" if speedup else "default did not run"
                print(f"[{SUITE}] {op}.{direction}: best w={chosen[0]} p={chosen[1]} "
                      f"{measured[chosen]['gbps']:.3g} GB/s ({ks_note})", flush=True)
            for record in sorted(measured.values(), key=lambda r: (r["extra"]["num_warps"],
                                                                    r["extra"]["programs_per_slot"])):
                ctx.emit(record)
            del args, grads_out, expected
