"""Launch parameters of the fused kernels, searched on the device: warps, token tiles, prefetch, rows.

The kernels hold one whole row (BLOCK_D = D rounded up to a power of two) per program and loop over
a tile of tokens; three launch parameters are free, per direction: the warps per program, how many
programs per streaming multiprocessor the token tiling aims for (`kernels._launch.token_tiling`),
and whether each program loads row t + 1 before reducing row t (prefetch), and how many rows each
loop step takes (rows_per_step). Their defaults
(`kernels._launch.PROGRAMS_PER_SLOT`, `ELEMENTS_PER_THREAD`, `PREFETCH`) are this suite's choice on
an H200; it times the alternatives at the kernels suite's shapes (SiT-XL/2: B=256, T=256, D=1152,
bf16), forward and backward separately, so one GPU run says which to choose on another GPU.

Search, per op and direction, a coordinate search from the default launch: prefetch on and off,
then 1, 2 and 4 rows per step, the warps scaled with the rows, then every warp count at the best
so far, then every tiling, then every warp count again, then the fastest launch at one row a step
through the other of the kernels' two loops (one row a step, or (1, BLOCK_D) tiles: `one_row_loop`),
printed as the two loops' times at equal settings (at D = 1152 at most 19 launches of the 420
combinations of 5 warp counts, 7 tilings, 2 prefetch settings, 3 row counts and 2 loops). The MLP's two
bias + GELU kernels (`kernels.bias_gelu`, forward and backward, each one call at (B*T, 4D)) are
searched the same way over their own launch (`kernels._launch.GELU_LAUNCH`: tiles of block_rows x
block_h, programs per SM, warps): tile width, tile height, warps, tiling, warps again (at most 17
launches each). The eight searches go breadth first, each step for all of them before the next, so
a time box that stops the run early leaves the same comparisons for every op and direction.
Each launch is checked first, its outputs NaN-filled, against the reference computed in float32
with the kernel tests' bounds (`kernels_suite.parity_failure`): one outside them, or NaN, is
recorded as `parity_failed` and never chosen. On the CPU (Triton interpreter) only the default, a
one-program-per-sample tiling, the other prefetch setting and two rows per step run (for the GELU
kernels another tiling, tile height and tile width): the dry run proves each path, and warps mean
nothing there.
Each op's best launch is then timed on the other ops of its direction, and each op's best prints as
SIT_FAST_KERNEL_LAUNCH settings, then the one setting for all ops: per direction, the launch with the
least time summed over the three ops (the GELU kernels: each its own best), unless it gains less on
the default than the default's own p20-p80 spread (summed over the ops): timing noise, and the
default stands.

    python -m benchmarks tuning --device cuda --out DIR      # alone; `all` runs it last, in the time left
"""
from __future__ import annotations

import torch

from benchmarks import kernels_suite as ks

SUITE = "tuning"
PROGRAMS_PER_SLOT = (1, 2, 4, 8, 16, 32, 64)
# The MLP's bias + GELU kernels (kernels.bias_gelu), searched the same way over their own launch
# (kernels._launch.GELU_LAUNCH): op -> the settings' prefix (gelu_fwd_*, gelu_bwd_*); each is timed as
# one call, as the kernels suite's bias_gelu.fwd and bias_gelu_backward.fwd rows.
GELU_OPS = {"bias_gelu": "gelu_fwd", "bias_gelu_backward": "gelu_bwd"}
GELU_KEYS = ("num_warps", "programs_per_slot", "block_rows", "block_h")
GELU_CHOICES = ((2, 4, 8, 16), PROGRAMS_PER_SLOT, (8, 16, 32, 64), (64, 128, 256, 512))
GELU_AXES = (3, 2, 0, 1, 0)  # tile columns, tile rows, warps, tiling, warps again
# Tiles of more elements a thread are not tried: they spill registers (ptxas for sm_90: 256 a thread
# spilled 11-24 KB and took 6-42 s to compile, past the time box's per-launch margin; 128 spilled at
# most 0.6 KB), so cannot be the fastest.
GELU_MOST_PER_THREAD = 128
CUDA_REPS, CPU_REPS = 30, 2  # timed calls per launch (forward, or backward after its own forward)


def warp_choices(block_d: int) -> list[int]:
    """Warp counts giving 1 to 32 row elements per thread (at most 32 warps)."""
    return [w for w in (1, 2, 4, 8, 16, 32) if 1 <= block_d // (32 * w) <= 32] or [1]


KEYS = ("num_warps", "programs_per_slot", "prefetch", "rows_per_step", "one_row_loop")  # a launch: a value of each
ROWS_AXIS = 3
ONE_ROW_AXIS = 4  # one row a step through the one-row loop (1) or the tile loop (0)
ROWS_CHOICES = (1, 2, 4)  # rows per loop step tried


def settings_of(launch: tuple, keys: tuple[str, ...] = KEYS) -> dict[str, int]:
    """A launch tuple as {parameter: value}."""
    return dict(zip(keys, launch))


def gelu_tile_fits(launch: tuple) -> bool:
    """Whether a bias + GELU launch's tile is at most GELU_MOST_PER_THREAD elements a thread."""
    settings = settings_of(launch, GELU_KEYS)
    return settings["block_rows"] * settings["block_h"] <= GELU_MOST_PER_THREAD * 32 * settings["num_warps"]


def run(ctx) -> None:
    import kernels
    from kernels import _launch

    device = ctx.device
    cfg = ks.SIZES[ctx.size.name]
    if not kernels.kernels_available(device):
        raise RuntimeError(f"the fused kernels cannot run on {device} here")
    cuda = device.type == "cuda"
    block_d, _ = _launch.block_config(cfg.D)
    searches = []
    for op in ks.OPS:
        for direction in ("fwd", "bwd"):
            # SIT_FAST_KERNEL_LAUNCH included
            default = (*_launch.launch_params(cfg.D, direction), int(_launch.one_row_loop(direction)))
            if cuda:
                choices = (warp_choices(block_d), list(PROGRAMS_PER_SLOT), [0, 1], list(ROWS_CHOICES), [1, 0])
            else:  # the interpreter: prove each path once (warps mean nothing there)
                choices = ([default[0]], [default[1], 1], [default[2], 1 - default[2]],
                           [default[3], 2 if default[3] == 1 else 1], [1, 0])
            searches.append(LaunchSearch(ctx, op, direction, tuple(int(v) for v in default), choices))
    for op, prefix in GELU_OPS.items():
        launch = _launch.gelu_launch(prefix.removeprefix("gelu_"))  # SIT_FAST_KERNEL_LAUNCH included
        default = tuple(launch[k] for k in GELU_KEYS)
        if cuda:
            choices = GELU_CHOICES
        else:  # the interpreter: one other tiling, tile height and width (warps mean nothing there)
            warps, per_slot, rows, cols = default
            choices = ([warps], [per_slot, 1 if per_slot != 1 else 2], [rows, 16 if rows != 16 else 8],
                       [cols, 64 if cols != 64 else 128])
        searches.append(LaunchSearch(ctx, op, prefix, default, choices, keys=GELU_KEYS, axes=GELU_AXES,
                                     timing="fwd"))
    # Breadth first: each step of the search for every op and direction before the next step, so a
    # time box that ends the run early leaves the same comparisons for all of them.
    for search in searches:
        search.start()
    for index in range(max(len(search.axes) for search in searches)):
        for search in searches:
            if index < len(search.axes):
                search.step(search.axes[index])
    for other in searches:  # each op's best tried on the other ops (SIT_FAST_KERNEL_LAUNCH is one setting for
        for search in searches:  # all), breadth first as above
            if other.direction == search.direction and other is not search:
                search.measure(other.best())
    for search in searches:
        search.finish()
    print(f"[{SUITE}] {one_setting(searches)}", flush=True)


def one_setting(searches: list["LaunchSearch"]) -> str:
    """SIT_FAST_KERNEL_LAUNCH for all ops: per direction (fwd, bwd; gelu_fwd, gelu_bwd: one kernel
    each), the launch with the least time summed over the ops, among those every op ran within the
    kernel tests' bounds."""
    parts, notes = [], []
    for direction in dict.fromkeys(s.direction for s in searches):
        group = [s for s in searches if s.direction == direction]
        ok = [{k for k, r in s.measured.items() if r["status"] == "ok"} for s in group]
        common = set.intersection(*ok) if ok else set()
        if not common:
            notes.append(f"{direction}: no launch ran every op")
            continue
        total = {launch: sum(s.measured[launch]["median_ms"] for s in group) for launch in common}
        chosen = min(total, key=total.get)
        default = group[0].default
        noise = ""
        if chosen != default and default in total:
            spreads = [s.measured[default].get("p80_ms", 0.0) - s.measured[default].get("p20_ms", 0.0)
                       for s in group if s.measured[default].get("p20_ms") is not None]
            if spreads and total[default] - total[chosen] <= sum(spreads):  # a gain timing noise could make
                noise = (f"; the best, {total[chosen]:.3g} ms, gains less than the default's p20-p80 spread "
                         f"({sum(spreads):.3g} ms summed): the default stands")
                chosen = default
        parts += [f"{direction}_{k}={v}" for k, v in settings_of(chosen, getattr(group[0], "keys", KEYS)).items()]
        versus = (f"{total[default] / total[chosen]:.2f}x the default's {total[default]:.3g} ms{noise}"
                  if default in total else "the default did not run every op")
        ops = f"the {len(group)} ops" if len(group) > 1 else group[0].op if hasattr(group[0], "op") else "the op"
        notes.append(f"{direction}: {total[chosen]:.3g} ms for {ops}, {versus}")
    setting = f"SIT_FAST_KERNEL_LAUNCH={','.join(parts)}" if parts else "no SIT_FAST_KERNEL_LAUNCH setting"
    return f"all ops: {setting} ({'; '.join(notes)})"


# The coordinate search's steps: prefetch (one launch to try), rows per step (warps scaled with the
# rows), warps, tiling, then warps again at the best of the others, then the best launch at one row a
# step through the other loop (one launch: see LaunchSearch.step); indices into KEYS.
AXES = (2, ROWS_AXIS, 0, 1, 0, ONE_ROW_AXIS)


class LaunchSearch:
    """Coordinate search over `keys` for one op and direction; emits one record per launch tried.

    direction: the settings' prefix ("fwd", "bwd"; "gelu_fwd", "gelu_bwd"), and the kernels suite's
    direction the launch is timed in unless `timing` says otherwise (the bias + GELU ops: one call)."""

    def __init__(self, ctx, op: str, direction: str, default: tuple, choices: tuple, keys: tuple[str, ...] = KEYS,
                 axes: tuple[int, ...] | None = None, timing: str | None = None):
        self.ctx, self.direction, self.default, self.choices = ctx, direction, default, choices
        self.keys, self.axes, self.timing = keys, AXES if axes is None else axes, timing or direction
        self.cfg = cfg = ks.SIZES[ctx.size.name]
        self.cuda = ctx.device.type == "cuda"
        self.op, self.ours, ref = op, ks.ours_op(op), ks.reference_op(op)
        timing = self.timing
        self.args = ks.make_inputs(op, cfg.B, cfg.T, cfg.D, cfg.dtype, ctx.device, requires_grad=timing == "bwd")
        self.grads_out = None
        if timing == "bwd":
            with torch.no_grad():
                self.grads_out = [torch.randn_like(o) for o in ks._as_tuple(ref(*self.args))]
        self.expected = ks.expected_outputs(ref, self.args, timing, self.grads_out)
        self.bytes_moved = ks.minimum_bytes(op, timing, cfg.B, cfg.T, cfg.D, cfg.dtype)
        self.name = f"{op}.{timing}"
        self.measured: dict[tuple, dict] = {}
        self.searching = True  # False once the time box has cut this search

    def measure(self, launch: tuple) -> None:
        """Measure one launch (once) and write its record. Written at once, so a run stopped part way
        through a search keeps its launches; the first launch the time box leaves no room for is
        recorded as skipped and ends this search."""
        if not self.searching or launch in self.measured:
            return
        self.searching = self.measure_one(launch)
        self.ctx.emit(self.measured[launch])

    def measure_one(self, launch: tuple) -> bool:
        from kernels import _launch

        ctx, cfg, direction, timing = self.ctx, self.cfg, self.direction, self.timing
        settings = settings_of(launch, self.keys)
        variant = "ours " + " ".join(f"{k}={v}" for k, v in settings.items())
        extra = {**settings, "default": launch == self.default, "best": False}
        common = dict(dtype=ks.DTYPE_NAMES[cfg.dtype], shapes={"B": cfg.B, "T": cfg.T, "D": cfg.D},
                      bytes_moved=self.bytes_moved, extra=extra)
        if not ctx.budget.allows(2.0 if self.cuda else 1.0):
            self.measured[launch] = ctx.record(SUITE, self.name, variant, status="skipped", note=(
                f"time box: {max(ctx.budget.remaining(), 0):.0f} s left of {ctx.budget.seconds:.0f} s; "
                f"the search of {self.name} stops here"), **common)
            return False
        try:
            with _launch.launch_overrides(**{f"{direction}_{k}": v for k, v in settings.items()}):
                step = ks._make_step(self.ours, self.args, timing, self.grads_out)
                with _launch.poison_outputs():  # an element a launch leaves unwritten reads NaN
                    results = step()
                error = ks._max_abs_err(results, self.expected)
                failed = ks.parity_failure(self.op, self.ours, self.args, results, self.cfg.dtype, timing,
                                           self.grads_out)
                results = None
                if timing == "bwd":
                    times = ks._times_backward(self.ours, self.args, self.grads_out, ctx.device,
                                               CUDA_REPS if self.cuda else CPU_REPS)
                elif self.cuda:
                    times = ks._times_cuda(lambda _: step(), CUDA_REPS)
                else:
                    times = ks._times_cpu(step, CPU_REPS)
                host_bound = times.host_bound
                timing = ks.quantiles_ms(times.times_ms)
        except Exception as failure:  # noqa: BLE001 -- a launch that fails is an answer
            self.measured[launch] = ctx.record(SUITE, self.name, variant, **ks._failure_row(failure), **common)
            return True
        median, p20, p80 = timing
        gbps = self.bytes_moved / (median * 1e-3) / 1e9
        status, note = ("parity_failed", failed) if failed else ("ok", None)
        if host_bound and not failed:
            note = f"{host_bound} of {CUDA_REPS} timed calls may include host time"
        extra["host_bound_reps"] = host_bound
        self.measured[launch] = ctx.record(
            SUITE, self.name, variant, median_ms=median, p20_ms=p20, p80_ms=p80, gbps=gbps,
            fraction_of_copy_bw=gbps / ctx.ceilings["copy_gbps"], parity_max_abs_err=error,
            status=status, note=note, **common)
        return True

    def best(self) -> tuple:
        ok = {k: r for k, r in self.measured.items() if r["status"] == "ok"}
        return min(ok, key=lambda k: ok[k]["median_ms"]) if ok else self.default

    def start(self) -> None:
        """The default launch, the search's starting point."""
        self.measure(self.default)

    def step(self, axis: int) -> None:
        """Every value of one launch parameter, the others at the best launch so far. The one-row-loop
        axis: the best launch at one row a step, through the loop it did not take (one launch), so
        that each search times the two loops at the same settings."""
        current = self.best()
        if axis == ONE_ROW_AXIS and self.keys == KEYS:
            one_row = {k: r for k, r in self.measured.items() if k[ROWS_AXIS] == 1 and r["status"] == "ok"}
            if one_row:
                launch = min(one_row, key=lambda k: one_row[k]["median_ms"])
                self.measure(launch[:ONE_ROW_AXIS] + (1 - launch[ONE_ROW_AXIS],) + launch[ONE_ROW_AXIS + 1:])
            return
        for value in self.choices[axis]:
            launch = current[:axis] + (value,) + current[axis + 1:]
            if axis == ROWS_AXIS and self.keys == KEYS and self.cuda:  # warps scaled with the rows (as many
                # row elements per thread)
                warps = current[0] * value // current[ROWS_AXIS]
                if warps in self.choices[0]:
                    launch = (warps,) + launch[1:]
            if self.keys == GELU_KEYS and not gelu_tile_fits(launch):
                continue
            self.measure(launch)

    def loops_at_one_row(self) -> str:
        """The one-row loop against the tile loop at one row a step, the other settings equal: the
        fastest such pair measured."""
        pairs = []
        for launch, record in self.measured.items():
            other = launch[:ONE_ROW_AXIS] + (1 - launch[ONE_ROW_AXIS],) + launch[ONE_ROW_AXIS + 1:]
            if launch[ROWS_AXIS] == 1 and launch[ONE_ROW_AXIS] == 1 and other in self.measured:
                if record["status"] == "ok" and self.measured[other]["status"] == "ok":
                    pairs.append((record["median_ms"], self.measured[other]["median_ms"], launch))
        if not pairs:
            return "one row a step: the two loops were not both timed at one launch"
        one_row_ms, tile_ms, launch = min(pairs)
        at = ",".join(f"{k}={v}" for k, v in settings_of(launch[:ONE_ROW_AXIS]).items())
        return (f"one row a step ({at}): the one-row loop {one_row_ms:.4g} ms, the tile loop {tile_ms:.4g} ms "
                f"({tile_ms / one_row_ms:.3f}x)")

    def finish(self) -> None:
        """Mark the best launch and print it as SIT_FAST_KERNEL_LAUNCH settings."""
        chosen = self.best()
        if self.measured[chosen]["status"] != "ok":
            return
        self.measured[chosen]["extra"]["best"] = True
        base = self.measured[self.default]
        speedup = f"{base['median_ms'] / self.measured[chosen]['median_ms']:.2f}x the default" \
            if base["status"] == "ok" else "the default did not run"
        settings = ",".join(f"{self.direction}_{k}={v}" for k, v in settings_of(chosen, self.keys).items())
        print(f"[{SUITE}] {self.name}: best {settings} {self.measured[chosen]['gbps']:.3g} GB/s ({speedup})",
              flush=True)
        if self.keys == KEYS:
            print(f"[{SUITE}] {self.name}: {self.loops_at_one_row()}", flush=True)
        self.ctx.results.write()  # the best launch's mark
