"""python -m benchmarks {kernels,parity,train,sample,memory,profile,tuning,all} [--device cpu|cuda]
[--size tiny|full] --out DIR

Prints the device, the versions and the two ceilings first, then one line per record, and rewrites
DIR/results.json and DIR/results.md after every record. Exit status 1 when a parity check failed or
a measurement raised (out of memory and time-box skips are answers, not failures).

A CUDA error such as an illegal memory access leaves the process's CUDA context unusable: every later
measurement in it would fail. After each suite the device is checked; when it is lost, the run stops
with exit status 75 (EX_TEMPFAIL), names the suites left in DIR/suites_left, and a new process takes
them on with `python -m benchmarks SUITE,SUITE... --continue --out DIR` (gpu_session.sh does so).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

SUITES = ("kernels", "parity", "train", "sample", "memory", "profile", "tuning")  # "all" runs them in this order
DEVICE_LOST = 75  # exit status: the CUDA context is lost, the suites left need a new process
SUITES_LEFT = "suites_left"  # the file in --out that names them, comma-separated


def use_interpreter_on_cpu(argv: list[str] | None) -> None:
    """TRITON_INTERPRET=1 when the run is on the CPU (--device cpu, or no --device and no CUDA), so that
    `ours` runs the fused kernels in the Triton interpreter. Triton reads the variable once, when it is
    first imported, and anything from sit_fast imports it (sit_fast -> models -> kernels): so this
    runs before the arguments are parsed with sit_fast.argtypes."""
    early = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    early.add_argument("--device", default=None)
    device = early.parse_known_args(argv)[0].device
    if device is None:
        import torch  # does not import triton

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")


def suite_list(text: str) -> list[str]:
    """`all`, a suite, or suites joined by commas (run in the order SUITES gives them)."""
    if text == "all":
        return list(SUITES)
    names = text.split(",")
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        raise argparse.ArgumentTypeError(f"{text!r}: choose all or from {', '.join(SUITES)}, joined by commas")
    return [s for s in SUITES if s in names]


def parse_args(argv: list[str] | None):
    from sit_fast.argtypes import doc_paragraph, positive_float, random_seed, user_path

    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=doc_paragraph(__doc__, 1),
                                     allow_abbrev=False)
    parser.add_argument("suite", type=suite_list, metavar="SUITE",
                        help="which suites to run: all (" + ", ".join(SUITES) + "), one of them, or several "
                             "joined by commas")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when available, else cpu (fused kernels through the Triton interpreter)")
    parser.add_argument("--size", choices=("tiny", "full"), default=None,
                        help="tiny: a depth-2 SiT with head dim 72 on 4x4 latents, 4 tokens (dry run); "
                             "full: SiT-XL/2 at 256px (latent 32x32). Default: full on cuda, tiny on cpu")
    parser.add_argument("--out", type=user_path, default="results/bench",
                        help="folder for results.json and results.md (default: results/bench)")
    parser.add_argument("--deadline-s", type=positive_float, default=None,
                        help="time for the whole run; each suite gets its share of what is left "
                             "(default: 400 s full, 480 s tiny)")
    parser.add_argument("--budget-s", action="append", default=[], metavar="SUITE=SECONDS",
                        help="a suite's own time box instead of its share (repeatable), e.g. --budget-s train=200")
    parser.add_argument("--variants", default=None,
                        help="comma-separated subset of: reference, reference+bf16+sdpa, "
                             "reference+bf16+sdpa+compile, ours (default: all four)")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend (default: inductor on cuda; eager on cpu, where Dynamo "
                             "traces but generates no code, which keeps the dry run short)")
    parser.add_argument("--seed", type=random_seed, default=None,
                        help="parity inputs' seed (default: random, recorded)")
    parser.add_argument("--continue", dest="continue_run", action="store_true",
                        help="add to the results already in --out (same device and commit): their ceilings and "
                             "the parity suite's figures are reused, not measured again. For the suites left "
                             f"after a lost CUDA context (--out's {SUITES_LEFT} names them)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    use_interpreter_on_cpu(argv)  # before anything imports triton (sit_fast's package does)
    from sit_fast.interrupts import console_loss_ignored

    with console_loss_ignored():  # a console that goes away (a dead `| tee`) costs its lines, not the run
        return run(argv)


def run(argv: list[str] | None) -> int:
    args = parse_args(argv)
    import torch  # does not import triton

    device_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    from benchmarks.common import interpreter_on_cuda  # the variable is set by now: triton may import

    if (refusal := interpreter_on_cuda(device_type)) is not None:
        print(f"error: {refusal}", file=sys.stderr)
        return 2

    from benchmarks import common, goals, memory_suite, parity_suite, profile_suite, sample_suite, train_suite
    from sit_fast import interrupts

    runners = {"kernels": run_kernels, "parity": parity_suite.run, "train": train_suite.run,
               "sample": sample_suite.run, "memory": memory_suite.run, "profile": profile_suite.run,
               "tuning": run_tuning}
    device = torch.device(device_type)
    size = common.SIZES[args.size or ("full" if device_type == "cuda" else "tiny")]()
    variants = common.VARIANTS
    if args.variants is not None:  # "" or "ours," names no variant: refused, not read as all four
        unknown = [n for n in args.variants.split(",") if n not in common.VARIANTS_BY_NAME]
        if unknown:
            print(f"error: unknown variants {unknown}; choose from {list(common.VARIANTS_BY_NAME)}", file=sys.stderr)
            return 2
        variants = tuple(common.VARIANTS_BY_NAME[n] for n in args.variants.split(","))
    budgets = dict(size.budgets_s)
    explicit = {}
    from sit_fast.argtypes import positive_float

    for item in args.budget_s:
        suite, _, seconds = item.partition("=")
        try:
            explicit[suite] = positive_float(seconds)
        except argparse.ArgumentTypeError:
            explicit[suite] = None
        if suite not in SUITES or explicit[suite] is None:
            print(f"error: --budget-s {item}: expected SUITE=SECONDS with SUITE one of {SUITES} and SECONDS a "
                  f"positive number", file=sys.stderr)
            return 2
    suites = args.suite
    if not args.continue_run and (problem := budget_not_run(args.budget_s, suites, [])):
        print(problem, file=sys.stderr)
        return 2
    deadline = time.monotonic() + (args.deadline_s if args.deadline_s is not None else size.deadline_s)

    start = time.monotonic()
    environment = common.environment(device)
    for key in ("device", "torch_version", "triton_version", "cuda_version", "python_version", "git_commit"):
        common.log(f"{key}: {environment[key]}")
    common.log(f"TRITON_INTERPRET={environment['triton_interpret']}, size {size.name}: {size.model_name}")
    command = ["python", "-m", "benchmarks", *(argv if argv is not None else sys.argv[1:])]
    try:  # a file there (--out results.json), or a folder that cannot be made: said before anything is measured
        results = common.Results(args.out, environment, command=command)
    except OSError as error:
        print(f"error: --out {args.out}: cannot make the folder ({error.strerror or error}): pass a folder for "
              f"results.json and results.md", file=sys.stderr)
        return 2
    suites_left = os.path.join(args.out, SUITES_LEFT)
    results.setup = {"size": size.name, "variants": [v.name for v in variants],
                     "compile_backend": args.compile_backend or ("inductor" if device_type == "cuda" else "eager")}
    if args.continue_run:
        problem = results.continue_from_disk(suites)
        if problem:
            print(f"error: --continue: {problem}", file=sys.stderr)
            return 2
        # the first run's flags again (gpu_session.sh's): a box of a suite it ran is no mistake
        if problem := budget_not_run(args.budget_s, suites, results.suites_run):
            print(problem, file=sys.stderr)
            return 2
        common.log(f"continuing {os.path.join(args.out, 'results.json')}: {len(results.records)} records of "
                   f"{', '.join(results.suites_run) or 'no suite'}; its ceilings reused")
    else:
        results.ceilings = common.measure_ceilings(device, size)
    results.write()
    results.note_device_state(device, "start" if not args.continue_run else "continued")
    if os.path.exists(suites_left):
        os.remove(suites_left)
    c = results.ceilings
    common.log(f"ceiling copy: {c['copy_gbps']:.1f} GB/s ({c['copy_bytes'] / 2**20:.0f} MiB read + written)")
    common.log(f"ceiling bf16 matmul: {c['matmul_tflops']:.3g} TFLOP/s ({'x'.join(map(str, c['matmul_shape']))})")

    ctx = common.RunContext(device=device, size=size, results=results, environment=environment,
                            ceilings=results.ceilings, compile_backend=results.setup["compile_backend"],
                            variants=variants, seed=args.seed)
    ctx.parity.update(parity_suite.links(results.records))  # a continued run's parity suite, already measured
    # A stop signal (the session's timeout sends SIGTERM) or Ctrl-C ends the run with what it measured
    # written: add() writes at most every Results.WRITE_EVERY_S, and the last records would be lost.
    suite = None
    try:
        with interrupts.stop_signals_raise():
            for i, suite in enumerate(suites):
                left = deadline - time.monotonic()
                weights = sum(budgets[s] for s in suites[i:])
                share = left if budgets[suite] == 0 or weights == 0 else left * budgets[suite] / weights
                ctx.budget = common.Budget(max(min(explicit.get(suite, share), left), 0.0))  # none left: 0 s
                results.suites_run.append(suite)
                results.write()  # a run killed inside this suite still lists it
                common.log(f"== {suite} (time box {ctx.budget.seconds:.0f} s)")
                suite_start = time.monotonic()
                try:
                    runners[suite](ctx)
                except Exception as error:  # noqa: BLE001 -- one suite's failure must not lose the others
                    ctx.fail(suite, "suite", common.SUITE_LEVEL, error, dtype=None)
                common.log(f"== {suite} done in {time.monotonic() - suite_start:.1f} s")
                results.write()  # its last records (add writes at most every Results.WRITE_EVERY_S)
                lost = common.device_lost(device)
                results.note_device_state(device, f"after {suite}")
                if lost and suites[i + 1:]:
                    left = ",".join(suites[i + 1:])
                    common.write_text(suites_left, left + "\n")
                    again = ["python", "-m", "benchmarks", left, *continuation_flags(args, device_type, size.name)]
                    common.log(f"the CUDA context is lost ({lost}): every later measurement in this process would "
                               f"fail. The suites left run in a new process: {' '.join(again)} (exit {DEVICE_LOST}; "
                               f"{suites_left} names them)")
                    return DEVICE_LOST
    except KeyboardInterrupt as err:
        results.write()
        common.log(f"{interrupts.what_stopped(err)} in the {suite} suite: its {len(results.records)} records are "
                   f"in {os.path.join(args.out, 'results.json')}")
        err.stop_noted = True  # said: the program ends with the signal's status, without a traceback
        raise

    document = {"environment": environment, "setup": results.setup, "records": results.records}
    for line in goals.console_lines(goals.evaluate(document), results.suites_run):
        common.log(line)
    statuses: dict[str, int] = {}
    for record in results.records:
        statuses[record["status"]] = statuses.get(record["status"], 0) + 1
    common.log(f"done in {time.monotonic() - start:.1f} s: {len(results.records)} records "
               f"({', '.join(f'{n} {s}' for s, n in sorted(statuses.items()))}); "
               f"{os.path.join(args.out, 'results.json')}, {os.path.join(args.out, 'results.md')}")
    failed = statuses.get("parity_failed", 0) + statuses.get("error", 0)
    return 1 if failed else 0


def budget_not_run(items: list[str], suites: list[str], run_before: list[str]) -> str | None:
    """The usage error of a --budget-s SUITE=SECONDS whose suite this run does not run (nor, continued,
    the run before it), else None."""
    for item in items:
        suite = item.partition("=")[0]
        if suite not in suites and suite not in run_before:
            return (f"error: --budget-s {item}: the {suite} suite is not run here (only {', '.join(suites)}): "
                    f"drop it, or add {suite} to the suites")
    return None


def continuation_flags(args, device_type: str, size_name: str) -> list[str]:
    """The flags that take a run on in a new process: this run's settings, --continue, --out (its
    deadline is the caller's to choose)."""
    flags = ["--device", device_type, "--size", size_name]
    for name, value in (("--variants", args.variants), ("--compile-backend", args.compile_backend),
                        ("--seed", args.seed)):
        if value is not None:
            flags += [name, str(value)]
    for item in args.budget_s:
        flags += ["--budget-s", item]
    return flags + ["--continue", "--out", args.out]


def run_kernels(ctx) -> None:
    """benchmarks.kernels_suite's rows, adapted to the common schema and written as each is measured."""
    from benchmarks.common import SUITE_LEVEL

    try:
        from benchmarks.kernels_suite import rows as kernel_rows
    except ImportError as error:
        ctx.fail("kernels", "suite", SUITE_LEVEL, error, dtype=None)
        return
    for row in kernel_rows(ctx.device.type, ctx.size.name, time_left=ctx.budget.remaining,
                           compile_backend=ctx.compile_backend):
        ctx.emit(kernel_record(ctx, row))


def run_tuning(ctx) -> None:
    """benchmarks.tuning_suite, imported here: it is built on the kernels suite, whose import failing
    costs those two suites (an error record each), not the run."""
    from benchmarks import tuning_suite

    tuning_suite.run(ctx)


KERNEL_ROW_FIELDS = ("name", "variant", "dtype", "shapes", "median_ms", "p20_ms", "p80_ms", "bytes_moved", "gbps",
                     "parity_max_abs_err", "iterations", "timer", "window_spread", "status", "note")


KERNEL_ROW_STAMP = ("suite", "device", "commit", "date")  # the record's own stamp says these


def kernel_record(ctx, row: dict) -> dict:
    """A kernels_suite row (suite, name, variant, dtype, shapes, median_ms, p20_ms, p80_ms, iterations,
    timer, window_spread, bytes_moved, gbps, parity_max_abs_err) as a record: environment stamp,
    fraction of the copy ceiling, the rest of the row's keys under extra."""
    shapes = row.get("shapes") or {}
    dtype = row.get("dtype")
    fields = {k: row[k] for k in KERNEL_ROW_FIELDS if k in row and k not in ("name", "variant")}
    fields["dtype"] = str(dtype).replace("torch.", "") if dtype is not None else None
    gbps = row.get("gbps")
    return ctx.record(
        "kernels", row["name"], row["variant"], **fields,
        batch_size=shapes.get("B") if isinstance(shapes, dict) else None,
        fraction_of_copy_bw=None if gbps is None else gbps / ctx.ceilings["copy_gbps"],
        extra={k: v for k, v in row.items() if k not in KERNEL_ROW_FIELDS + KERNEL_ROW_STAMP},
    )


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as stop:  # Ctrl-C or a stop signal: one line (the records kept), status 130 or 143
        from sit_fast.interrupts import exit_status, what_stopped

        if not getattr(stop, "stop_noted", False):
            print(what_stopped(stop), file=sys.stderr)
        sys.exit(exit_status(stop))
