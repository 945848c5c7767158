"""The benchmark suite's CPU dry run: `python -m benchmarks all --device cpu --size tiny` runs end to
end and writes complete records (its parts, one at a time, are tested in test_benchmark_suites.py).
Nothing here asserts anything about speed.

So that the suite works the first time it meets a GPU, CI runs the whole
suite on the tiny model, the fused kernels going through the Triton interpreter, and checks the
files, every field of every record, and that a broken fast path is reported as a parity failure.
"""
import json
import math
import os
import re
import subprocess
import sys

import pytest

from benchmarks.common import (
    CPU_NULL, FIELDS, LINKED_PARITY, NOTES, SUITE_FIELDS, VARIANTS, validate_record,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The suite takes about 100 s alone on two cores (the kernels 26 s and the launch search 42 s in the
# Triton interpreter), the session with its pytest step about 120 s beside the other tests in `make
# test`, and stops when it is done: the deadline gives each suite a time box of its share, many times
# what it takes, only to keep a slower machine from cutting it (the suite's time boxes skip rows,
# which fails the checks below).
DRY_RUN_DEADLINE_S = 480
DRY_RUN_TIMEOUT_S = DRY_RUN_DEADLINE_S + 120
SESSION_TESTS = "tests/test_kernels.py::test_kernel_rejects_bad_inputs"  # the session's pytest step, quickly
VARIANT_NAMES = [v.name for v in VARIANTS]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """benchmarks/gpu_session.sh, the GPU session's one command, with the CPU's tiny sizes: the suite
    (`python -m benchmarks all --device cpu --size tiny`), then one quick test file's worth of pytest."""
    out = tmp_path_factory.mktemp("bench")
    # Without TRITON_INTERPRET, as the command typed by hand: the entry point chooses the interpreter itself.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OUT=str(out), PYTHON=sys.executable, SESSION_S=str(DRY_RUN_TIMEOUT_S - 20),
               TEST_MIN_S="40", BENCH_ARGS="all --device cpu --size tiny", BENCH_DEADLINE_S=str(DRY_RUN_DEADLINE_S),
               TEST_ARGS=f"{SESSION_TESTS} -p no:cacheprovider")
    proc = subprocess.run(["bash", os.path.join("benchmarks", "gpu_session.sh")], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=DRY_RUN_TIMEOUT_S, env=env)
    document = None
    if (out / "results.json").exists():
        document = json.loads((out / "results.json").read_text())
    return proc, out, document


def _tail(proc) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"


def test_dry_run_exits_cleanly(dry_run):
    proc, _, _ = dry_run
    assert proc.returncode == 0, _tail(proc)


def test_dry_run_writes_json_and_markdown(dry_run):
    proc, out, document = dry_run
    assert (out / "results.json").is_file(), _tail(proc)
    assert (out / "results.md").is_file(), _tail(proc)
    markdown = (out / "results.md").read_text()
    for suite in ("kernels", "parity", "train", "sample", "memory", "profile", "tuning"):
        assert f"## {suite}" in markdown, f"results.md has no {suite} table"
    # the kernels table's TFLOP/s: the products' rows (attention, the MLP's input layer) only
    kernels = [line.split(" | ") for line in markdown.split("## kernels\n\n", 1)[1].split("\n\n", 1)[0].splitlines()]
    column = kernels[0].index("TFLOP/s")
    rates = {row[0].lstrip("| "): row[column] for row in kernels[2:] if row[1] == "ours"}
    assert all((rate != "-") == name.startswith(("attention.", "linear_gelu.")) for name, rate in rates.items()), rates
    for suite in ("train", "sample"):  # MFU says against which peak; the measured ceiling's fraction beside it
        header = markdown.split(f"## {suite}\n\n", 1)[1].splitlines()[0]
        assert "MFU (data-sheet peak)" in header and "of measured bf16 matmul ceiling" in header, header
        table = markdown.split(f"## {suite}\n\n", 1)[1].split("\n\n", 1)
        assert NOTES[suite] == table[1].split("\n\n", 1)[0]  # what the figures count, under the table
        # the fp32 reference: no parity against itself, no fraction of the bf16 ceiling
        reference = [line for line in table[0].splitlines() if "reference" in line.split(" | ")[:2]
                     or line.startswith("| reference |")]
        assert reference and all("| n/a (reference) |" in line and "| n/a |" in line for line in reference), reference
    assert document["suites_run"] == ["kernels", "parity", "train", "sample", "memory", "profile", "tuning"]


def test_every_timed_version_was_timed_twice(dry_run):
    """Kernels, training and sampling time each version in two windows: window_spread is how far apart
    their medians were, and the figures count both windows' repetitions."""
    _, _, document = dry_run
    timed = [r for r in document["records"] if r["suite"] in ("kernels", "train", "sample") and r["status"] == "ok"]
    assert {r["suite"] for r in timed} == {"kernels", "train", "sample"}
    for record in timed:
        first, second = record["extra"]["window_medians_ms"]
        assert record["window_spread"] == pytest.approx(abs(first - second) / min(first, second)), record
        assert min(first, second) * (1 - 1e-9) <= record["median_ms"] <= max(first, second) * (1 + 1e-9), record
        assert record["iterations"] % 2 == 0 and record["iterations"] >= 2, record


def test_dry_run_lists_the_goals_without_judging_them(dry_run):
    """results.json and results.md carry every goal with its figure from the records; a CPU run's
    figures say nothing of a GPU's, so none is judged met or missed."""
    from benchmarks.goals import NOT_JUDGED, goals

    _, out, document = dry_run
    rows = document["goals"]
    assert [row["goal"] for row in rows] == [goal.text for goal in goals()]
    for row in rows:
        if row["figure"] is not None:
            assert row["verdict"] == NOT_JUDGED and row["noise"] is not None, row
        else:  # a CPU has no data-sheet peak: no MFU
            assert row["verdict"] == "not measured: no mfu in the record", row
    assert sum(row["figure"] is not None for row in rows) == 12 + 1 + 3  # kernels, train ratio, sampling ratios
    markdown = (out / "results.md").read_text()
    assert markdown.count(NOT_JUDGED) == 16 and "## goals" in markdown


def test_session_runs_the_tests_after_the_suite(dry_run):
    """The session script's second part ran pytest, and its logs and summary line came back."""
    proc, out, _ = dry_run
    assert (out / "log").is_file() and (out / "log_tests").is_file(), _tail(proc)
    suite_log, test_log = (out / "log").read_text(), (out / "log_tests").read_text()
    assert "== tuning done" in suite_log, suite_log[-2000:]
    setting = re.search(r"\[tuning\] all ops: SIT_FAST_KERNEL_LAUNCH=(\S+) ", suite_log)
    assert setting, suite_log[-2000:]
    from kernels import _launch

    assert set(_launch._parse_launch_env(setting.group(1))) == {
        *(f"{d}_{k}" for d in ("fwd", "bwd")
          for k in ("num_warps", "programs_per_slot", "prefetch", "rows_per_step", "one_row_loop")),
        *(f"gelu_{d}_{k}" for d in ("fwd", "bwd") for k in ("num_warps", "programs_per_slot", "block_rows", "block_h"))}
    assert " passed" in test_log and "failed" not in test_log, test_log[-2000:]
    assert "gpu_session: suite exit 0, tests exit 0" in proc.stdout, _tail(proc)


def test_environment_and_ceilings_come_first(dry_run):
    proc, _, document = dry_run
    env = document["environment"]
    for key in ("device", "torch_version", "triton_version", "python_version", "git_commit", "date"):
        assert env.get(key), f"environment lacks {key}: {env}"
    ceilings = document["ceilings"]
    assert ceilings["copy_gbps"] > 0 and ceilings["matmul_tflops"] > 0, ceilings
    lines = proc.stdout.splitlines()
    first_record = next(i for i, line in enumerate(lines) if line.startswith("["))
    header = "\n".join(lines[:first_record])
    for needle in ("device:", "torch_version:", "triton_version:", "cuda_version:", "ceiling copy:",
                   "ceiling bf16 matmul:"):
        assert needle in header, f"{needle!r} is not printed before the first record:\n{header}"


def test_every_record_has_every_field(dry_run):
    _, _, document = dry_run
    records = document["records"]
    assert records
    for record in records:
        assert set(record) == set(FIELDS), (record["suite"], record["name"], set(record) ^ set(FIELDS))
        problems = validate_record(record)
        assert not problems, f"{record['suite']} {record['name']} {record['variant']}: {problems}"


def test_nulls_only_where_a_cpu_has_no_figure(dry_run):
    """Every ok record fills its suite's fields; the only nulls are GPU figures (peak memory, MFU).
    Every record is ok but the attention rows of PyTorch's CUDA kernels forced, skipped saying why."""
    _, _, document = dry_run
    for record in document["records"]:
        if record["name"].startswith("attention.") and record["variant"] in ("sdpa:cudnn", "sdpa:efficient"):
            assert record["status"] == "skipped" and record["note"].endswith("it does not run on cpu"), record
            continue
        if record["status"] == "skipped" and record["note"].startswith("time box"):
            pytest.fail(f"{record['suite']} {record['name']} {record['variant']}: {record['note']}: this machine "
                        f"is too slow for the dry run's {DRY_RUN_DEADLINE_S} s (DRY_RUN_DEADLINE_S in {__file__})")
        assert record["status"] == "ok", (record["suite"], record["name"], record["variant"], record["note"])
        nulls = {k for k in SUITE_FIELDS[record["suite"]] if record[k] is None}
        if record["suite"] in ("kernels", "tuning"):
            nulls -= {"iterations", "timer"}  # the kernel suite's rows do not report these
        if record["suite"] in ("train", "sample"):  # a fraction of the bf16 matmul ceiling: bf16 variants only
            assert ("fraction_of_matmul_ceiling" in nulls) == (record["dtype"] != "bf16"), record
            nulls.discard("fraction_of_matmul_ceiling")
        assert nulls <= CPU_NULL, (record["suite"], record["name"], record["variant"], nulls - CPU_NULL)
        for key in ("median_ms", "p20_ms", "p80_ms", "images_per_s", "tflops", "gbps"):
            value = record[key]
            if value is not None:
                assert math.isfinite(value) and value > 0, (record["suite"], record["name"], key, value)
        if record["median_ms"] is not None:
            assert record["p20_ms"] <= record["median_ms"] <= record["p80_ms"], record


def test_every_suite_measures_every_variant(dry_run):
    _, _, document = dry_run
    records = document["records"]

    def variants(suite, name=None):
        return sorted(r["variant"] for r in records if r["suite"] == suite and (name is None or r["name"] == name))

    assert variants("train") == sorted(VARIANT_NAMES)
    assert variants("memory") == sorted(VARIANT_NAMES)
    for sampler in ("ode_euler_50_cfg4", "sde_euler_250_cfg4"):
        assert variants("sample", sampler) == sorted(VARIANT_NAMES)
    # every variant but the reference itself, ours also in fp32
    parity = sorted((r["variant"], r["dtype"]) for r in records if r["suite"] == "parity")
    assert parity == sorted([("ours", "fp32"), ("ours", "bf16"), ("reference+bf16+sdpa", "bf16"),
                             ("reference+bf16+sdpa+compile", "bf16")])
    assert all(r["parity_ok"] for r in records if r["suite"] == "parity")
    # ours runs the fused kernels (in the Triton interpreter) wherever it has a model
    ours = [r for r in records if r["variant"] == "ours" and r["variant_config"] is not None]
    assert ours and all(r["variant_config"]["fused_kernels_resolved"] for r in ours), ours
    kernels = [r for r in records if r["suite"] == "kernels"]
    assert kernels and {"ours", "reference"} <= {r["variant"] for r in kernels}
    assert {r["name"].split(".")[1] for r in kernels} == {"fwd", "bwd", "fwd_bwd"}
    # attention: the fast path's call, the kernels forced that run on the CPU, the reference; then one line
    attention = {(r["name"], r["variant"]): r["status"] for r in kernels if r["name"].startswith("attention.")}
    assert attention == {(f"attention.{d}", v): "skipped" if v in ("sdpa:cudnn", "sdpa:efficient") else "ok"
                         for d in ("fwd", "bwd") for v in ("ours", "sdpa:flash", "reference", "sdpa:cudnn",
                                                           "sdpa:efficient")}, attention
    assert dry_run[0].stdout.count("[kernels] attention: ours runs PyTorch's flash kernel;") == 1
    # tuning: per op and direction, the default launch, another tiling, the other prefetch, two rows a
    # step, one row through the other loop; for the GELU kernels another tiling, tile height and width;
    # one best
    tuning = [r for r in records if r["suite"] == "tuning"]
    groups = {r["name"] for r in tuning}
    gelu = {"bias_gelu.fwd", "bias_gelu_backward.fwd"}
    assert len(groups) == 8 and gelu <= groups, groups
    # breadth first: every group's default launch, then every group's first step (prefetch; tile width)
    assert all(r["extra"]["default"] for r in tuning[:8]) and len({r["name"] for r in tuning[:8]}) == 8, tuning
    assert [r["extra"]["prefetch"] for r in tuning[8:14]] == [1 - r["extra"]["prefetch"] for r in tuning[:6]]
    assert [r["extra"]["block_h"] for r in tuning[14:16]] == [64, 64], tuning[14:16]
    for name in gelu:
        group = [r for r in tuning if r["name"] == name]
        assert len(group) == 4 and sum(r["extra"]["default"] for r in group) == 1, group
        for key, values in (("block_h", {128, 64}), ("block_rows", {32, 16}), ("programs_per_slot", {8, 1})):
            assert {r["extra"][key] for r in group} == values, (key, group)
        assert sum(r["extra"]["best"] for r in group) == 1, group
    for name in groups - gelu:
        group = [r for r in tuning if r["name"] == name]
        # the search's five, then the other ops' (of this direction) best launches this op had not run: as
        # many as two, which of them depends on timing
        others = {r["name"] for r in tuning} - gelu - {name}
        others = {other for other in others if other.split(".")[1] == name.split(".")[1]}
        assert len(others) == 2, others
        assert 5 <= len(group) <= 5 + len(others) and sum(r["extra"]["default"] for r in group) == 1, group
        variants = {r["variant"] for r in group}
        assert len(variants) == len(group), group  # each launch once
        for other in others:  # each other op's best was tried on this op
            best = [r["variant"] for r in tuning if r["name"] == other and r["extra"]["best"]]
            assert len(best) == 1 and best[0] in variants, (other, best, group)
        assert {r["extra"]["prefetch"] for r in group} == {0, 1}, group
        assert {r["extra"]["rows_per_step"] for r in group} == {1, 2}, group
        assert {r["extra"]["one_row_loop"] for r in group if r["extra"]["rows_per_step"] == 1} == {0, 1}, group
        assert sum(r["extra"]["best"] for r in group) == 1, group


def test_sampling_records_say_how_they_extrapolate(dry_run):
    _, _, document = dry_run
    for record in (r for r in document["records"] if r["suite"] == "sample"):
        assert record["steps_timed"] >= 1
        full = record["extra"]["model_calls_full"]
        assert full == (50 if record["name"].startswith("ode") else 250)
        per_call = record["extra"]["ms_per_model_call"]
        assert record["median_ms"] == pytest.approx(per_call * full, rel=1e-6)


def test_the_profile_follows_the_train_suite(dry_run):
    _, out, document = dry_run
    check_profile_records(document, (out / "results.md").read_text())


def check_profile_records(document: dict, table: str) -> None:
    """The profile suite's records after the train suite's: a training step at the batch the train
    suite fitted and a sampling call, for ours and the compiled reference (never the eager one), with
    the time by kind of kernel and the matmuls' TFLOP/s against the measured ceiling; a table."""
    records = document["records"]
    profiles = [r for r in records if r["suite"] == "profile"]
    assert [(r["name"], r["variant"]) for r in profiles] == [
        ("train_step", "ours"), ("train_step", "reference+bf16+sdpa+compile"),
        ("sample_call", "ours"), ("sample_call", "reference+bf16+sdpa+compile")]
    trained = {r["variant"]: r["batch_size"] for r in records if r["suite"] == "train"}
    for record in profiles:
        assert record["status"] == "ok" and not validate_record(record), record
        if record["name"] == "train_step":
            assert record["batch_size"] == trained[record["variant"]]
        assert record["extra"]["top"] and record["extra"]["device_ms_per_call"] > 0
    ours_train = profiles[0]["extra"]["ms_per_call_by_kind"]
    assert ours_train.get("ours", 0) > 0 and "ours" not in profiles[1]["extra"]["ms_per_call_by_kind"]
    for record in profiles:  # the matmuls' TFLOP/s from their FLOPs and time, against the measured ceiling
        extra = record["extra"]
        ms = extra["ms_per_call_by_kind"]["matmul"]
        assert extra["tflops_by_kind"]["matmul"] == pytest.approx(extra["flops_by_kind"]["matmul"] / ms / 1e9)
        assert extra["matmul_fraction_of_ceiling"] == pytest.approx(
            extra["tflops_by_kind"]["matmul"] / document["ceilings"]["matmul_tflops"])
    assert "## profile" in table


def test_parity_links_rebuilt_from_records_match_what_the_run_linked(dry_run):
    """What `--continue` rebuilds from the parity records is what the train and sample records of one
    process linked."""
    from benchmarks.parity_suite import links

    _, _, document = dry_run
    found = links(document["records"])
    assert found
    checked = 0
    for record in document["records"]:
        if record["suite"] in ("train", "sample") and record["variant"] != "reference":
            link = found[(record["variant"], record["dtype"])]
            linked = SUITE_FIELDS[record["suite"]] & LINKED_PARITY
            assert {k: record[k] for k in linked} == {k: link[k] for k in linked}, record
            assert record["extra"]["parity_source"] == link["source"], record["extra"]
            checked += 1
    assert checked
