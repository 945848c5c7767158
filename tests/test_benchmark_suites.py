"""The benchmark suite's parts, one at a time on the CPU with tiny sizes: parity and tuning reports,
batch searches, time boxes, the roofline, goal verdicts, the profile suite, and gpu_session.sh's
handling of test shards and lost CUDA contexts. The whole suite, end to end, is the dry run of
test_benchmarks_dry_run.py (a file of its own, so that the two run side by side under pytest-xdist).
Nothing here asserts anything about speed.
"""
import json
import math
import os
import re
import subprocess
import sys

import pytest

from benchmarks.common import FIELDS, LINKED_PARITY, SCHEMA_VERSION, SUITE_FIELDS, VARIANTS, validate_record
from tests.test_benchmarks_dry_run import _tail, check_profile_records

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parity_suite_reports_a_broken_kernel(tmp_path, monkeypatch):
    """A fused op that is 10% off must come out as parity_failed, with a failing exit status."""
    import sit_fast.models
    from benchmarks.__main__ import main

    working_ops = sit_fast.models.fused_ops

    def broken_ops(*args, **kwargs):
        ops = dict(working_ops(*args, **kwargs))
        fused = ops["gated_residual_layernorm_modulate"]

        def wrong(*op_args, **op_kwargs):
            x_out, h = fused(*op_args, **op_kwargs)
            return x_out, h * 1.1

        ops["gated_residual_layernorm_modulate"] = wrong
        return ops

    monkeypatch.setattr(sit_fast.models, "fused_ops", broken_ops)
    status = main(["parity", "--device", "cpu", "--size", "tiny", "--out", str(tmp_path),
                   "--variants", "reference,ours,reference+bf16+sdpa"])
    records = json.loads((tmp_path / "results.json").read_text())["records"]
    ours = [r for r in records if r["variant"] == "ours"]
    assert status == 1
    assert sorted(r["dtype"] for r in ours) == ["bf16", "fp32"]
    for record in ours:
        assert record["status"] == "parity_failed" and record["parity_ok"] is False, record
        assert "relative error" in record["note"], record["note"]
        assert not validate_record(record)
    untouched = [r for r in records if r["variant"] == "reference+bf16+sdpa"]
    assert untouched and all(r["status"] == "ok" for r in untouched)


def check_broken_tiling_never_best(records: list[dict]) -> None:
    """Tuning records where the launches with one program per SM broke the kernel: those are
    parity_failed, the others ok, and each kernel's best is one of the others."""
    for record in records:
        assert not validate_record(record), record
        broken = record["extra"]["programs_per_slot"] == 1
        assert record["status"] == ("parity_failed" if broken else "ok"), record
        assert not (broken and record["extra"]["best"]), record
    for name in {r["name"] for r in records}:
        assert sum(r["extra"]["best"] for r in records if r["name"] == name) == 1, name


def test_tuning_reports_a_launch_that_breaks_the_kernel(tmp_path, monkeypatch):
    """A token tiling that skips rows must come out as parity_failed, never as the best launch."""
    from benchmarks import kernels_suite, tuning_suite
    from benchmarks.__main__ import main
    from kernels import _launch

    real = _launch.token_tiling

    def tiling(B, T, device, direction):
        rows, tiles = real(B, T, device, direction)
        if _launch._overrides.get(f"{direction}_programs_per_slot") == 1:
            return max(rows - 1, 1), tiles  # the last rows of each sample are never written
        return rows, tiles

    monkeypatch.setattr(_launch, "token_tiling", tiling)
    monkeypatch.setattr(kernels_suite, "OPS", kernels_suite.OPS[:1])  # one op (the dry run tunes them all)
    monkeypatch.setattr(tuning_suite, "GELU_OPS", {})
    status = main(["tuning", "--device", "cpu", "--size", "tiny", "--out", str(tmp_path)])
    records = json.loads((tmp_path / "results.json").read_text())["records"]
    assert status == 1
    assert len(records) == 10  # 2 directions x 5 launches (default, a tiling, prefetch, rows, the other loop)
    check_broken_tiling_never_best(records)


def test_validate_record_catches_gaps():
    """The schema check itself can fail: a missing field, a null figure, a figure that cannot exist."""
    record = dict.fromkeys(FIELDS)
    record.update(suite="train", name="train_step", variant="ours", status="ok", device="H100", device_type="cuda",
                  extra={}, torch_version="2", triton_version="3", cuda_version="13", python_version="3.12",
                  git_commit="abc", date="today")
    problems = "\n".join(validate_record(record))
    assert "mfu is null" in problems and "peak_memory_bytes is null" in problems
    assert "fraction_of_matmul_ceiling is null" in "\n".join(validate_record(dict(record, dtype="bf16")))
    assert "fraction_of_matmul_ceiling" not in "\n".join(validate_record(dict(record, dtype="fp32")))
    cpu = dict(record, device_type="cpu")
    assert "mfu is null" not in "\n".join(validate_record(cpu))
    assert "gbps should be null" in "\n".join(validate_record(dict(cpu, gbps=1.0)))
    del record["note"]
    assert "missing fields ['note']" in "\n".join(validate_record(record))


def test_validate_record_names_each_problem_a_record_can_have():
    from benchmarks.common import IDENTITY, OPTIONAL

    record = dict.fromkeys(FIELDS)
    record.update({key: 1 for key in IDENTITY | SUITE_FIELDS["train"]}, suite="train", status="ok", dtype="bf16")
    assert validate_record(record) == []
    assert validate_record(dict(record, speed=1.0)) == ["unknown fields ['speed']"]
    missing = {k: v for k, v in record.items() if k not in ("note", "date")}
    assert validate_record(missing) == ["missing fields ['note', 'date']", "date is null"]
    # a suite no rule knows: its fields cannot be judged, and only that is added
    assert validate_record(dict(record, suite="bogus", speed=1.0, median_ms=None)) == ["unknown fields ['speed']",
                                                                                       "unknown suite 'bogus'"]
    assert validate_record(dict(record, git_commit=None)) == ["git_commit is null"]
    # a record that did not measure: its figures may be null, its note says why, and must be there
    failed = dict(record, status="error", median_ms=None, images_per_s=None)
    assert validate_record(failed) == ["status 'error' without a note"]
    assert validate_record(dict(failed, note="")) == ["status 'error' without a note"]
    assert validate_record(dict(failed, note="RuntimeError: boom")) == []
    assert validate_record(dict(record, median_ms=None)) == ["median_ms is null in an ok train record"]
    # the parity figures a train record copies are null where the parity suite did not run
    unlinked = dict(record, **dict.fromkeys(LINKED_PARITY))
    assert validate_record(unlinked, parity_ran=False) == []
    assert sorted(validate_record(unlinked)) == sorted(f"{k} is null in an ok train record" for k in LINKED_PARITY)
    # the fields a kernel row may leave out
    kernel = dict.fromkeys(FIELDS)
    kernel.update({key: 1 for key in IDENTITY | SUITE_FIELDS["kernels"]}, suite="kernels", status="ok")
    assert validate_record(dict(kernel, **dict.fromkeys(OPTIONAL["kernels"]))) == []
    assert validate_record(dict(kernel, model="SiT-XL/2")) == ["model should be null in a kernels record, got "
                                                               "'SiT-XL/2'"]


def test_device_state_reads_nvidia_smi_and_asks_older_drivers_without_the_new_field(tmp_path, monkeypatch):
    """Clocks, power, temperature and the clock-lowering reasons per GPU; a driver that does not know
    clocks_event_reasons is asked for clocks_throttle_reasons, and one that knows neither for the rest."""
    import torch

    from benchmarks import common

    def smi(known):
        def run(cmd, **kwargs):
            fields = cmd[1].split("=", 1)[1].split(",")
            unknown = [f for f in fields if f not in known]
            if unknown:
                return subprocess.CompletedProcess(cmd, 2, "", f'Field "{unknown[0]}" is not a valid field to query.\n')
            values = {"index": "0", "clocks.sm": "1980", "clocks.mem": "3201", "clocks.max.sm": "1980",
                      "power.draw": "[N/A]", "temperature.gpu": "41"}
            values.update(dict.fromkeys(common.CLOCK_REASON_FIELDS, "0x0000000000000004"))
            return subprocess.CompletedProcess(cmd, 0, ", ".join(values[f] for f in fields) + "\n", "")
        return run

    cuda = torch.device("cuda")
    base = {"index", *common.DEVICE_STATE_FIELDS}
    for known, reasons in ((base | {"clocks_event_reasons.active"}, "0x0000000000000004"),
                           (base | {"clocks_throttle_reasons.active"}, "0x0000000000000004"), (base, None)):
        (state,) = common.device_state(cuda, run=smi(known))
        assert state.pop("clock_reasons", None) == reasons
        assert state == {"index": 0, "clocks_sm": 1980.0, "clocks_mem": 3201.0, "clocks_max_sm": 1980.0,
                         "power_draw": None, "temperature_gpu": 41.0}
    assert common.device_state(cuda, run=smi(set())) == [
        {"error": 'nvidia-smi: Field "index" is not a valid field to query.'}]

    def missing(cmd, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", "nvidia-smi")

    assert "No such file" in common.device_state(cuda, run=missing)[0]["error"]
    assert common.device_state(torch.device("cpu")) is None

    # recorded in results.json and shown in results.md; a CPU run records none
    results = common.Results(str(tmp_path), common.environment(torch.device("cpu")), ["test"])
    results.note_device_state(torch.device("cpu"), "start")
    assert results.device_states == []
    real = common.device_state
    monkeypatch.setattr(common, "device_state", lambda device: real(device, run=smi(base)))
    results.note_device_state(cuda, "after train")
    with open(tmp_path / "results.json") as f:
        (entry,) = json.load(f)["device_states"]
    assert entry["when"] == "after train" and entry["gpus"][0]["clocks_sm"] == 1980.0
    with open(tmp_path / "results.md") as f:
        assert "| after train | 0 | 1980.0 (1980.0) | 3201.0 | None | 41.0 | n/a |" in f.read()


def test_the_schema_names_every_suite():
    """results.json's `fields` describe the records it holds: every suite's name is among the suite field's values."""
    values = [v.strip() for v in FIELDS["suite"].split("|")]
    assert sorted(values) == sorted(SUITE_FIELDS), FIELDS["suite"]
    assert "tuning" in FIELDS["variant"], FIELDS["variant"]


def test_results_json_is_strict_json(tmp_path):
    """A NaN or infinite figure (a parity run gone wrong) is written as a string, so strict readers
    parse results.json; numbers stay numbers."""
    import numpy as np

    ctx = _context(tmp_path)
    ctx.results.add(ctx.record("kernels", "op", "ours", status="parity_failed", dtype="bf16",
                               parity_max_abs_err=float("nan"), gbps=np.float32("inf"),
                               extra={"errors": [-math.inf, 0.5]}, median_ms=1.25, p20_ms=1.0, p80_ms=1.5))

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    (record,) = json.loads((tmp_path / "results.json").read_text(), parse_constant=refuse)["records"]
    assert record["parity_max_abs_err"] == "NaN" and record["gbps"] == "Infinity", record
    assert record["extra"]["errors"] == ["-Infinity", 0.5] and record["median_ms"] == 1.25, record
    assert math.isnan(float(record["parity_max_abs_err"]))


def test_results_are_written_at_most_every_few_seconds_and_after_each_suite(tmp_path, monkeypatch):
    """A rewrite of the whole document per record cost the tuning suite seconds of its box: records
    between two writes are written by the next one (benchmarks/__main__.py writes after each suite)."""
    ctx = _context(tmp_path)
    monkeypatch.setattr(type(ctx.results), "WRITE_EVERY_S", 3600.0)

    def written():
        return len(json.loads((tmp_path / "results.json").read_text())["records"])

    for n in range(3):
        ctx.results.add(ctx.record("kernels", f"op{n}", "ours", dtype="bf16", median_ms=1.0, p20_ms=1.0, p80_ms=1.0))
    assert written() == 1  # the first, then none within the hour
    ctx.results.write()
    assert written() == 3


def _frozen_budget(seconds: float):
    """A time box whose clock stands still: what fits is decided by the seconds the stubs spend alone, not by
    how long a loaded machine takes to run the suite around them."""
    from benchmarks import common

    budget = common.Budget(seconds)
    budget.remaining = lambda: budget.seconds
    return budget


def _context(tmp_path, **size_changes):
    import dataclasses

    import torch

    from benchmarks import common

    device = torch.device("cpu")
    size = dataclasses.replace(common.SIZES["tiny"](), **size_changes)
    environment = common.environment(device)
    results = common.Results(str(tmp_path), environment, ["test"])
    return common.RunContext(device=device, size=size, results=results, environment=environment,
                             ceilings=common.measure_ceilings(device, size), compile_backend="eager",
                             variants=(common.VARIANTS_BY_NAME["reference"],))


@pytest.mark.parametrize("mode", ["model", "blocks"])
def test_a_compiled_variants_model_runs_compiled_code(tmp_path, mode):
    """The compiled reference and ours are measured compiled: after ModelFactory.compile, a forward
    compiles a graph (a variant that ran eagerly would flatter ours against its baseline)."""
    import dataclasses

    import torch
    from torch._dynamo.utils import counters

    from benchmarks import common
    from sit_fast.models import SiT

    factory = _context(tmp_path).models
    model = SiT(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    variant = dataclasses.replace(common.VARIANTS_BY_NAME["reference+bf16+sdpa+compile"], compile=mode)
    torch._dynamo.reset()
    counters.clear()
    factory.compile(model, variant)
    model(torch.randn(2, 4, 4, 4), torch.rand(2), torch.tensor([1, 2]))
    assert counters["stats"]["unique_graphs"] >= 1


def test_batch_search_steps_down_on_out_of_memory(tmp_path, monkeypatch):
    """The GPU batch search, with out-of-memory raised by hand for the batches above 2."""
    import torch

    from benchmarks import train_suite

    real = train_suite._time_batch

    def time_batch(ctx, model, optimizer, transport, variant, B):
        if B > 2:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {B} GiB")
        return real(ctx, model, optimizer, transport, variant, B)

    monkeypatch.setattr(train_suite, "_time_batch", time_batch)
    ctx = _context(tmp_path, train_batches=(8, 4, 2))
    train_suite.run(ctx)
    (record,) = ctx.results.records
    assert record["status"] == "ok" and record["batch_size"] == 2, record
    assert [a["result"] for a in record["extra"]["batch_search"]] == ["out of memory", "out of memory", "fits"]
    assert not validate_record(record, parity_ran=False)

    ctx = _context(tmp_path, train_batches=(8, 4))
    train_suite.run(ctx)
    (record,) = ctx.results.records
    assert record["status"] == "oom" and "no batch of [8, 4] fits" in record["note"], record
    assert not validate_record(record, parity_ran=False)


def test_batch_search_names_only_the_batches_it_tried(tmp_path, monkeypatch):
    """A batch the search did not try (the time box cut it, or it was predicted too large) is not
    reported as out of memory: the record claims only what ran."""
    import torch

    from benchmarks import common, train_suite

    def time_batch(ctx, model, optimizer, transport, variant, B):
        ctx.budget = common.Budget(-1.0)  # the time box runs out during this attempt
        raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {B} GiB")

    monkeypatch.setattr(train_suite, "_time_batch", time_batch)
    ctx = _context(tmp_path, train_batches=(8, 4))
    train_suite.run(ctx)
    (record,) = ctx.results.records
    assert [a["result"] for a in record["extra"]["batch_search"]] == ["out of memory", "not tried: time box"]
    assert record["status"] == "oom" and "no batch of [8] fits" in record["note"], record
    assert "4 not tried: time box" in record["note"], record
    assert not validate_record(record, parity_ran=False)

    predicted = [{"batch": 8, "result": "not tried: predicted 200 GiB > 1.25 x 80 GiB"}]
    status, note = train_suite.no_fit(predicted)
    assert status == "skipped" and "no batch tried" in note and "8 not tried: predicted" in note


def test_memory_record_built_in_eager_form_does_not_claim_compilation(tmp_path, monkeypatch):
    """A compiled variant whose two compilations do not fit the memory suite's time box is measured in
    its eager form; its record's variant_config says so (compile None), as extra.measured_form does."""
    import dataclasses
    import types

    from benchmarks import common, memory_suite

    ctx = _context(tmp_path)
    ctx.size = dataclasses.replace(ctx.size, name="tiny-costed")  # expected_cost_s: 40 s compiled, 10 s eager
    ctx.variants = (common.VARIANTS_BY_NAME["reference+bf16+sdpa+compile"],)
    ctx.models  # built on the CPU; the suite then takes the CUDA branch with the peaks stubbed
    ctx.device = types.SimpleNamespace(type="cuda")
    compiled = []
    monkeypatch.setattr(ctx.models, "compile", lambda model, variant: compiled.append(variant.name))
    monkeypatch.setattr(memory_suite, "forward_backward_peak", lambda ctx, model, variant, B: 1000 * B)
    monkeypatch.setattr(memory_suite, "free_memory", lambda device: None)
    ctx.budget = _frozen_budget(50.0)  # room for the eager form (10 s), not for two compilations (80 s)
    memory_suite.run(ctx)
    (record,) = ctx.results.records
    assert record["status"] == "ok" and not compiled, record
    assert record["extra"]["measured_form"].startswith("eager"), record["extra"]
    assert record["variant_config"]["compile"] is None and record["variant_config"]["compile_backend"] is None

    ctx.results.records.clear()
    ctx.budget = _frozen_budget(500.0)  # room for both compilations: measured compiled, and said so
    memory_suite.run(ctx)
    (record,) = ctx.results.records
    assert compiled and record["extra"]["measured_form"] == "compiled"
    assert record["variant_config"]["compile"] == "blocks"


def test_time_box_skips_and_says_so(tmp_path):
    from benchmarks import common, train_suite

    ctx = _context(tmp_path)
    ctx.budget = common.Budget(-1.0)
    train_suite.run(ctx)
    (record,) = ctx.results.records
    assert record["status"] == "skipped" and record["note"].startswith("time box"), record
    assert not validate_record(record)


def test_goal_variants_are_measured_before_the_eager_references(tmp_path):
    """A time box cuts the last variants of a suite: those must be the eager references, not `ours` or the
    compiled reference whose ratio the goals are; the fp32 one (the slowest) first, not the bf16
    baseline."""
    import dataclasses

    ctx = dataclasses.replace(_context(tmp_path), variants=VARIANTS)
    order = [v.name for v in ctx.measurement_order()]
    assert order == ["ours", "reference+bf16+sdpa+compile", "reference+bf16+sdpa", "reference"], order


# the default's rows (None) are in the dry run too
@pytest.mark.parametrize("epilogue", [pytest.param(None, marks=pytest.mark.slow),
                                      pytest.param("tanh", marks=pytest.mark.slow), "erf"])
def test_kernel_suite_times_the_mlp_input_layer(tmp_path, monkeypatch, epilogue):
    """linear_gelu (and bias_gelu_backward, bias_gelu), one call each, after the adaLN ops' rows: linear_gelu's
    ours is sit_fast.models.linear_gelu (on the CPU F.linear then F.gelu; with the epilogue stood in
    for, as on CUDA, the row says so), judged against the float32 reference: an epilogue with the erf
    GELU (torch._addmm_activation's CPU form) fails. Rows carry TFLOP/s and validate as kernel
    records."""
    import torch

    import sit_fast.models as models
    from benchmarks import kernels_suite
    from benchmarks.__main__ import kernel_record
    from benchmarks.common import validate_record

    if epilogue is not None:
        def addmm_gelu(bias, mat1, mat2):
            return torch.nn.functional.gelu(torch.addmm(bias, mat1, mat2), approximate=epilogue.replace("erf", "none"))
        monkeypatch.setattr(models, "_GELU_EPILOGUE_DEVICES", ("cpu",))
        monkeypatch.setattr(models, "_addmm_gelu", addmm_gelu)
    monkeypatch.setattr(kernels_suite, "OPS", ("gated_residual",))
    monkeypatch.setattr(kernels_suite, "DIRECTIONS", ("fwd", "bwd"))
    monkeypatch.setattr(kernels_suite, "ATTENTION_OPS", ())
    rows = kernels_suite.run("cpu", "tiny")
    assert [(r["name"], r["variant"]) for r in rows] == [
        (name, variant) for name in ("gated_residual.fwd", "gated_residual.bwd", "linear_gelu.fwd",
                                     "bias_gelu_backward.fwd", "bias_gelu.fwd")
        for variant in ("ours", "reference+compile", "reference")]
    for row in rows[-6:]:  # the training step's fused GELU passes, against their maths in PyTorch ops
        assert row.get("status", "ok") == "ok" and row["median_ms"] > 0, row
    assert rows[-3]["bytes_moved"] == kernels_suite.minimum_bytes("bias_gelu", "fwd", 2, 16, 72, torch.float32) \
        == (2 * 2 * 16 * 288 + 288) * 4
    by_variant = {r["variant"]: r for r in rows if r["name"] == "linear_gelu.fwd"}
    ours = by_variant["ours"]
    assert ours["gelu_epilogue"] is (epilogue is not None)
    assert ours.get("status", "ok") == ("parity_failed" if epilogue == "erf" else "ok"), ours
    D = kernels_suite.SIZES["tiny"].D
    assert ours["bytes_moved"] == kernels_suite.minimum_bytes("linear_gelu", "fwd", 2, 16, D, torch.float32)
    ctx = _context(tmp_path)
    for row in by_variant.values():
        assert row["tflops"] > 0 and row["median_ms"] > 0, row
        record = kernel_record(ctx, row)
        assert not validate_record(record), validate_record(record)
        assert record["extra"]["tflops"] == row["tflops"]


def test_the_kernel_suite_alone_defaults_as_python_m_benchmarks(monkeypatch, capsys):
    """python -m benchmarks.kernels_suite: cuda and the full size when CUDA is there, else cpu and tiny
    (the full size on cuda unless --size, not tiny); --device takes cpu or cuda; the help gives the defaults."""
    import torch

    from benchmarks import kernels_suite

    calls = []
    monkeypatch.setattr(kernels_suite, "run", lambda device, size: calls.append((device, size)) or [{"op": 1}])
    for cuda, argv, expected in ((True, [], ("cuda", "full")), (True, ["--size", "tiny"], ("cuda", "tiny")),
                                 (False, [], ("cpu", "tiny")), (False, ["--size", "full"], ("cpu", "full")),
                                 (True, ["--device", "cpu"], ("cpu", "tiny"))):
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # main() sets it for the cpu; undone after the test
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        assert kernels_suite.main(argv) == 0
        assert calls.pop() == expected and capsys.readouterr().out == '{"op": 1}\n'
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for argv, error in ((["--device", "gpu"], "argument --device: invalid choice: 'gpu' (choose from"),
                        (["--device", "cuda"], "error: --device cuda but torch sees no CUDA device")):
        with pytest.raises(SystemExit) as info:
            kernels_suite.main(argv)
        assert info.value.code == 2 and error in capsys.readouterr().err and not calls
    with pytest.raises(SystemExit):
        kernels_suite.main(["--help"])
    usage = " ".join(capsys.readouterr().out.split())
    assert "--device {cpu,cuda}" in usage and "default: cuda when available, else cpu" in usage, usage
    assert "Default: full on cuda, tiny on cpu" in usage, usage


@pytest.mark.parametrize("value", ["1", "true"])
def test_the_kernel_suite_alone_refuses_the_interpreter_on_cuda(value, monkeypatch, capsys):
    """As `python -m benchmarks`: TRITON_INTERPRET on a CUDA device would record the interpreter's times
    as the kernels'; refused before any run."""
    import torch

    from benchmarks import kernels_suite
    from kernels._launch import triton_version

    if value == "true" and triton_version() < (3, 4):
        pytest.skip("this Triton reads TRITON_INTERPRET=1 only")
    calls = []
    monkeypatch.setattr(kernels_suite, "run", lambda device, size: calls.append((device, size)) or [{"op": 1}])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", value)
    for argv in ([], ["--device", "cuda"]):
        with pytest.raises(SystemExit) as info:
            kernels_suite.main(argv)
        err = capsys.readouterr().err
        assert info.value.code == 2 and not calls, err
        assert f"error: TRITON_INTERPRET={value} would run the CUDA kernels in the interpreter; unset it" in err, err
    assert kernels_suite.main(["--device", "cpu"]) == 0 and calls == [("cpu", "tiny")]


@pytest.mark.parametrize("broken", [False, True])
def test_kernel_suite_times_attention_against_each_sdpa_kernel(tmp_path, monkeypatch, capsys, broken):
    """Attention rows, forward and backward: the fast path's call, each SDPA kernel forced (those that
    do not run on the CPU a skipped row saying so), the eager reference; q, k, v strided as a block's
    qkv gives them; TFLOP/s; and every variant but the reference judged. Ours 2% off (forward, hence
    its gradients) is parity_failed, the others stay ok; one summary line follows the rows."""
    import torch

    from benchmarks import kernels_suite
    from benchmarks.__main__ import kernel_record
    from benchmarks.common import validate_record

    seen = []
    real = kernels_suite.fast_path_attention

    def ours(q, k, v):
        seen.append((q.shape, q.stride()))
        out = real(q, k, v)
        return out * 1.02 if broken else out

    monkeypatch.setattr(kernels_suite, "fast_path_attention", ours)
    monkeypatch.setattr(kernels_suite, "OPS", ())
    monkeypatch.setattr(kernels_suite, "MLP_OPS", ())
    rows = kernels_suite.run("cpu", "tiny")
    expected_order = ["ours", "sdpa:flash", "reference", "sdpa:cudnn", "sdpa:efficient"]
    assert [(r["name"], r["variant"]) for r in rows] == [
        (f"attention.{d}", v) for d in ("fwd", "bwd") for v in expected_order]
    B, T, D = (kernels_suite.SIZES["tiny"].B, kernels_suite.SIZES["tiny"].T, kernels_suite.SIZES["tiny"].D)
    assert seen[0] == ((B, 1, T, D), (T * 3 * D, D, 3 * D, 1))  # one head of 72: a view of (B, T, 3, 1, 72)
    ctx = _context(tmp_path)
    for row in rows:
        direction = row["name"].split(".")[1]
        assert row["bytes_moved"] == kernels_suite.minimum_bytes("attention", direction, B, T, D, torch.float32)
        if row["variant"] in ("sdpa:cudnn", "sdpa:efficient"):
            assert row["status"] == "skipped" and row["note"].endswith("it does not run on cpu"), row
        elif row["variant"] == "ours" and broken:
            assert row["status"] == "parity_failed" and "relative error 0.02" in row["note"], row
        else:
            assert row.get("status", "ok") == "ok" and row["parity_max_abs_err"] < 1e-5, row
        if row.get("median_ms") is not None:
            flops = kernels_suite.attention_call_flops(direction, B, T, D)
            assert row["tflops"] == pytest.approx(flops / (row["median_ms"] * 1e-3) / 1e12), row
        record = kernel_record(ctx, row)
        assert not validate_record(record), validate_record(record)
    ours_rows = [r for r in rows if r["variant"] == "ours"]
    assert all(r["attention_backend"] == "sdpa" and r["sdpa_choice"] == "flash" for r in ours_rows), ours_rows
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[kernels] attention: ")]
    assert len(lines) == 1 and "ours runs PyTorch's flash kernel" in lines[0], lines
    assert "sdpa:cudnn: fwd skipped, bwd skipped;" in lines[0], lines
    if broken:
        assert "ours: fwd parity_failed, bwd parity_failed;" in lines[0] and "no comparison" in lines[0], lines
    else:
        assert "fastest forward + backward: sdpa:flash (SIT_FAST_SDPA_BACKEND=flash)" in lines[0], lines


@pytest.mark.parametrize("lost", [False, True])
def test_a_forced_sdpa_kernel_refusing_in_its_own_words_is_a_skipped_row(monkeypatch, lost):
    """cuDNN's frontend refuses some inputs with its own RuntimeError, not PyTorch's "No available
    kernel": a skipped row quoting it, not an error that fails the run; ours failing stays an error,
    and so does the device failing under a forced kernel (torch.AcceleratorError: an illegal access)."""
    import torch

    from benchmarks import kernels_suite
    from sit_fast import attention

    real = attention.make_sdpa_attention

    def make(kernel):
        if kernel != "flash":
            return real(kernel)

        def refusing(q, k, v):
            if lost:
                raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
            raise RuntimeError("cuDNN Frontend error: [cudnn_frontend] Error: No execution plans support the graph.")
        return refusing

    monkeypatch.setattr(attention, "make_sdpa_attention", make)
    monkeypatch.setattr(kernels_suite, "OPS", ())
    monkeypatch.setattr(kernels_suite, "MLP_OPS", ())
    monkeypatch.setattr(kernels_suite, "ATTENTION_DIRECTIONS", ("fwd",))
    rows = {r["variant"]: r for r in kernels_suite.run("cpu", "tiny") if r["name"] == "attention.fwd"}
    if lost:
        assert rows["sdpa:flash"]["status"] == "error" and "illegal memory access" in rows["sdpa:flash"]["note"], rows
        return
    assert rows["sdpa:flash"]["status"] == "skipped" and rows["sdpa:flash"]["note"] == (
        "sdpa:flash refuses these inputs here: cuDNN Frontend error: [cudnn_frontend] Error: No execution plans "
        "support the graph."), rows["sdpa:flash"]
    assert rows["ours"].get("status", "ok") == "ok" and rows["reference"].get("status", "ok") == "ok", rows


def test_attention_summary_names_the_fastest_kernel_and_the_step_it_saves():
    """Forced kernels' forward + backward against ours, times 28 blocks; the kernel ours already runs
    is not a saving, nor a gain within the rows' window spread; a variant missing a direction is left
    out."""
    from benchmarks.kernels_suite import attention_summary

    def row(direction, variant, ms, **more):
        return {"name": f"attention.{direction}", "variant": variant, "median_ms": ms, **more}

    rows = [row("fwd", "ours", 1.0, sdpa_choice="cudnn"), row("fwd", "sdpa:flash", 0.8),
            row("fwd", "sdpa:cudnn", 1.0), row("fwd", "sdpa:efficient", 0.1),
            row("bwd", "ours", 2.0, sdpa_choice="cudnn"), row("bwd", "sdpa:flash", 1.7),
            row("bwd", "sdpa:cudnn", 2.0), row("bwd", "sdpa:efficient", None, status="skipped", note="time box")]
    line = attention_summary(rows)
    assert line.startswith("attention: ours runs PyTorch's cudnn kernel; ours: fwd 1 ms, bwd 2 ms; "), line
    assert "sdpa:efficient: fwd 0.1 ms, bwd skipped;" in line, line
    assert line.endswith("fastest forward + backward: sdpa:flash (SIT_FAST_SDPA_BACKEND=flash), 2.5 ms against "
                         "ours' 3 ms: 14 ms saved a training step of 28 blocks"), line
    rows[1]["median_ms"] = rows[5]["median_ms"] = 5.0
    assert attention_summary(rows).endswith("sdpa:cudnn (SIT_FAST_SDPA_BACKEND=cudnn), 3 ms against ours' 3 ms: "
                                            "the kernel ours runs")
    rows[1]["median_ms"], rows[5]["median_ms"] = 0.98, 1.99  # 1% faster, the windows 2% apart: noise
    rows[5]["window_spread"] = 0.02
    assert attention_summary(rows).endswith("sdpa:flash (SIT_FAST_SDPA_BACKEND=flash), 2.97 ms against ours' 3 ms: "
                                            "1.0% faster, within the windows' spread (2.0%): noise")
    assert attention_summary(rows[:4]).endswith("no comparison: ours, or every forced kernel, lacks a forward "
                                                "or a backward time")


@pytest.mark.parametrize("break_h", ["scaled", "nan"])
def test_kernel_suite_judges_our_parity(monkeypatch, break_h):
    """Ours with its second output 10% off, or NaN (an unwritten tensor), is parity_failed: the suite
    recorded any error as ok, and its max() over outputs dropped a NaN that was not first."""
    import torch

    import kernels
    from benchmarks import kernels_suite

    fused = kernels.gated_residual_layernorm_modulate

    def broken(*args, **kwargs):
        x_out, h = fused(*args, **kwargs)
        return x_out, (h * 1.1 if break_h == "scaled" else torch.full_like(h, float("nan")))

    monkeypatch.setattr(kernels, "gated_residual_layernorm_modulate", broken)
    monkeypatch.setattr(kernels_suite, "OPS", ("gated_residual_layernorm_modulate",))
    monkeypatch.setattr(kernels_suite, "MLP_OPS", ())
    monkeypatch.setattr(kernels_suite, "ATTENTION_OPS", ())
    monkeypatch.setattr(kernels_suite, "DIRECTIONS", ("fwd",))
    by_variant = {r["variant"]: r for r in kernels_suite.run("cpu", "tiny")}
    ours = by_variant["ours"]
    assert ours["status"] == "parity_failed" and ours["note"].startswith("output 1: "), ours
    assert math.isnan(ours["parity_max_abs_err"]) == (break_h == "nan"), ours
    for variant in ("reference", "reference+compile"):
        assert by_variant[variant].get("status", "ok") == "ok", by_variant[variant]
        assert by_variant[variant]["parity_max_abs_err"] < 1e-5


@pytest.mark.parametrize("op", ["layernorm_modulate", "gated_residual", "gated_residual_layernorm_modulate"])
def test_kernel_suite_passes_correct_bf16_kernels(op):
    """The GPU run's dtype: correct kernels pass the suite's parity check in every direction. Against
    the float32 reference as computed, without the kernel tests' two allowances (h of x_out as
    stored, gradients of x_hat as stored), the fused op's h failed on thousands of elements at the
    SiT-XL/2 shapes, and with it every row and tuning launch of that op."""
    import torch

    import kernels
    from benchmarks import kernels_suite as ks

    B, T, D, dtype = 2, 32, 1152, torch.bfloat16
    ours = getattr(kernels, op)
    for direction in ks.DIRECTIONS:
        args = ks.make_inputs(op, B, T, D, dtype, "cpu", requires_grad=direction != "fwd")
        grads_out = None
        if direction != "fwd":
            with torch.no_grad():
                grads_out = [torch.randn_like(o) for o in ks._as_tuple(ours(*args))]
        results = ks._make_step(ours, args, direction, grads_out)()
        assert ks.parity_failure(op, ours, args, results, dtype, direction, grads_out) is None, (op, direction)
        if op == "gated_residual_layernorm_modulate" and direction == "fwd":  # the case the allowance is for
            expected = ks.expected_outputs(getattr(kernels.reference, op), args, direction, grads_out)
            atol, rtol = ks.PARITY_TOL[dtype]["fwd"]
            assert not torch.allclose(results[1].float(), expected[1], atol=atol, rtol=rtol)


def test_an_activation_count_that_fails_on_a_gpu_loses_the_figure_not_the_measurements(monkeypatch, capsys):
    """The count on fake CUDA tensors runs only on a GPU: where it raises there, the figure is None
    and the reason kept (the training and memory records carry it); on the CPU it raises."""
    import types

    import torch

    import sit_fast.memory
    from benchmarks import common

    def broken(*args, **kwargs):
        raise RuntimeError("no fake kernel for this op")

    monkeypatch.setattr(sit_fast.memory, "activation_bytes_per_image", broken)
    ours = common.VARIANTS_BY_NAME["ours"]
    gpu = types.SimpleNamespace(device=torch.device("cuda"), _activation_bytes={}, activation_count_errors={})
    assert common.ModelFactory.activation_bytes_per_image(gpu, None, ours) is None
    assert gpu.activation_count_errors == {"ours": "RuntimeError: no fake kernel for this op"}
    assert "ours: the activation count failed" in capsys.readouterr().out
    cpu = types.SimpleNamespace(device=torch.device("cpu"), _activation_bytes={}, activation_count_errors={})
    with pytest.raises(RuntimeError, match="no fake kernel"):
        common.ModelFactory.activation_bytes_per_image(cpu, None, ours)


def test_kernel_variant_that_raises_is_recorded_and_the_others_measured(monkeypatch):
    """A kernel variant that fails (a Triton compile error on a new GPU, out of memory) is one error
    row; the suite goes on instead of losing every kernel record."""
    import torch

    from benchmarks import kernels_suite

    def broken_compile(fn, *args, **kwargs):
        def call(*call_args):
            raise RuntimeError("compiled reference broke")
        return call

    monkeypatch.setattr(kernels_suite, "OPS", ("gated_residual",))
    monkeypatch.setattr(kernels_suite, "MLP_OPS", ())
    monkeypatch.setattr(kernels_suite, "ATTENTION_OPS", ())
    monkeypatch.setattr(kernels_suite, "DIRECTIONS", ("fwd",))
    monkeypatch.setattr(torch, "compile", broken_compile)
    rows = kernels_suite.run("cpu", "tiny")
    by_variant = {r["variant"]: r for r in rows}
    assert by_variant["reference"].get("status", "ok") == "ok" and by_variant["reference"]["median_ms"] > 0
    broken = by_variant["reference+compile"]
    assert broken["status"] == "error" and "compiled reference broke" in broken["note"], broken


def test_kernel_inputs_that_fail_are_recorded_and_the_next_op_measured(monkeypatch):
    """Inputs or an expected result that cannot be made (out of memory) fail that op and direction for
    every variant, and the next is measured; rows come one at a time, so a killed run keeps them."""
    from benchmarks import kernels_suite

    real = kernels_suite.make_inputs

    def make_inputs(op, *args, **kwargs):
        if op == "gated_residual":
            raise RuntimeError("no memory for the inputs")
        return real(op, *args, **kwargs)

    monkeypatch.setattr(kernels_suite, "OPS", ("gated_residual", "layernorm_modulate"))
    monkeypatch.setattr(kernels_suite, "MLP_OPS", ())
    monkeypatch.setattr(kernels_suite, "ATTENTION_OPS", ())
    monkeypatch.setattr(kernels_suite, "DIRECTIONS", ("fwd",))
    monkeypatch.setattr(kernels_suite, "make_inputs", make_inputs)
    rows = kernels_suite.rows("cpu", "tiny")
    first = next(rows)  # a generator: the first row exists before the rest are measured
    rows = [first, *rows]
    failed = [r for r in rows if r["name"] == "gated_residual.fwd"]
    assert {r["variant"] for r in failed} == {"reference", "reference+compile", "ours"}
    assert all(r["status"] == "error" and "no memory for the inputs" in r["note"] for r in failed), failed
    measured = [r for r in rows if r["name"] == "layernorm_modulate.fwd"]
    assert len(measured) == 3 and all(r.get("status", "ok") == "ok" and r["median_ms"] > 0 for r in measured)


def test_sampling_variant_that_raises_is_recorded_and_the_next_measured(tmp_path, monkeypatch):
    """An exception outside the per-sampler try (building the config, the inputs) is one error record,
    and the sample suite goes on to the next variant instead of ending."""
    from benchmarks import common, sample_suite

    real = sample_suite.measure

    def measure(ctx, variant, transport, sampler, batch):
        if variant.name == "reference":
            raise RuntimeError("broken before sampling")
        return real(ctx, variant, transport, sampler, batch)

    monkeypatch.setattr(sample_suite, "measure", measure)
    ctx = _context(tmp_path)
    ctx.variants = (common.VARIANTS_BY_NAME["reference"], common.VARIANTS_BY_NAME["reference+bf16+sdpa"])
    sample_suite.run(ctx)
    failed = [r for r in ctx.results.records if r["variant"] == "reference"]
    assert [r["status"] for r in failed] == ["error"] and "broken before sampling" in failed[0]["note"]
    assert not validate_record(failed[0])
    measured = [r for r in ctx.results.records if r["variant"] == "reference+bf16+sdpa"]
    assert measured and all(r["status"] == "ok" for r in measured)


def test_sampling_measures_the_goals_pairs_first_and_a_time_box_cuts_whole_comparisons(tmp_path, monkeypatch):
    """Ours and the compiled reference are measured at batch 256 before either at batch 8, and both
    pairs before the eager references: a box that holds two compilations yields the batch-256
    comparison and the eager baselines, not ours alone at both batches."""
    from benchmarks import common, sample_suite

    calls = []
    monkeypatch.setattr(sample_suite, "expected_cost_s", lambda size, variant: 100.0 if variant.compile else 0.0)

    def measure(ctx, variant, transport, sampler, batch):  # a compiled variant's measurement takes 100 s
        calls.append((variant.name, batch))
        ctx.budget.seconds -= 100.0 if variant.compile else 0.0

    monkeypatch.setattr(sample_suite, "measure", measure)
    ctx = _context(tmp_path, sample_batches=(8, 256))
    ctx.variants = tuple(common.VARIANTS_BY_NAME[n] for n in
                         ("reference", "reference+bf16+sdpa", "reference+bf16+sdpa+compile", "ours"))
    ctx.budget = _frozen_budget(250.0)  # two compilations, not three
    sample_suite.run(ctx)
    # the goals' pairs first, the largest batch first; the eager references, which decide no goal, last
    assert calls == [("ours", 256), ("reference+bf16+sdpa+compile", 256), ("reference+bf16+sdpa", 256),
                     ("reference", 256), ("reference+bf16+sdpa", 8), ("reference", 8)], calls
    skipped = {(r["variant"], r["batch_size"]) for r in ctx.results.records if r["status"] == "skipped"}
    assert skipped == {("ours", 8), ("reference+bf16+sdpa+compile", 8)}


def test_sampling_judges_what_fits_by_the_compilations_it_timed(tmp_path, monkeypatch):
    """A compiled variant's cost is guessed (100 s here) until it has been timed at another batch:
    compilations of 30 s let both batches' goal pairs into a box of 150 s, where the guess left out
    batch 8's."""
    from benchmarks import common, sample_suite

    calls = []
    monkeypatch.setattr(sample_suite, "expected_cost_s", lambda size, variant: 100.0 if variant.compile else 0.0)

    def measure(ctx, variant, transport, sampler, batch):
        calls.append((variant.name, batch))
        ctx.budget.seconds -= 30.0 if variant.compile else 0.0
        ctx.emit(ctx.record("sample", "ode_euler_50_cfg4", variant.name, status="ok" if batch == 256 or
                            variant.name == "ours" else "error", batch_size=batch))

    monkeypatch.setattr(sample_suite, "measure", measure)
    ctx = _context(tmp_path, sample_batches=(8, 256))
    ctx.variants = tuple(common.VARIANTS_BY_NAME[n] for n in ("reference+bf16+sdpa+compile", "ours"))
    ctx.budget = _frozen_budget(150.0)
    sample_suite.run(ctx)
    assert calls == [("ours", 256), ("reference+bf16+sdpa+compile", 256), ("ours", 8),
                     ("reference+bf16+sdpa+compile", 8)], calls


def test_sampling_judges_the_next_batch_by_the_compilation_and_the_calls(tmp_path, monkeypatch):
    """Of a 50 s measurement at batch 256 whose first sampler run (compiling) took 20 s, batch 8 is
    expected to need 1.5 x 20 s + the other 30 s (its smaller batch runs no longer), so it fits in the
    65 s left; 1.5 x the whole measurement (75 s) would have left out the batch-8 latency, a goal."""
    from benchmarks import common, sample_suite

    calls = []

    def measure(ctx, variant, transport, sampler, batch):
        calls.append((variant.name, batch))
        ctx.budget.seconds -= 50.0 if batch == 256 else 30.0
        ctx.emit(ctx.record("sample", "ode_euler_50_cfg4", variant.name, batch_size=batch,
                            extra={"first_run_s": 20.0}))

    monkeypatch.setattr(sample_suite, "expected_cost_s", lambda size, variant: 40.0)
    monkeypatch.setattr(sample_suite, "measure", measure)
    ctx = _context(tmp_path, sample_batches=(8, 256))
    ctx.variants = (common.VARIANTS_BY_NAME["ours"],)
    ctx.budget = _frozen_budget(115.0)
    sample_suite.run(ctx)
    assert calls == [("ours", 256), ("ours", 8)], calls
    # The other way, batch 8 (12 calls timed) then 256 (3 calls), the 30 s not compiling scale by 8.
    full = common.SIZES["full"]()
    assert sample_suite.expected_from((50.0, 20.0, 8, full.latency_steps_timed), full, 256) == \
        1.5 * 20.0 + 30.0 * (256 * full.steps_timed) / (8 * full.latency_steps_timed)
    assert sample_suite.expected_from((50.0, 20.0, 256, full.steps_timed), full, 8) == 1.5 * 20.0 + 30.0


def test_sampling_time_box_learns_nothing_from_a_failed_measurement(tmp_path, monkeypatch):
    """A measurement that failed after 20 s says nothing of what a whole one costs: the next batch is
    judged by the guess (50 s, more than the 40 s left), not by 1.5 x 20 s."""
    from benchmarks import common, sample_suite

    calls = []
    monkeypatch.setattr(sample_suite, "expected_cost_s", lambda size, variant: 50.0)

    def measure(ctx, variant, transport, sampler, batch):
        calls.append((variant.name, batch))
        ctx.budget.seconds -= 20.0
        ctx.emit(ctx.record("sample", "ode_euler_50_cfg4", variant.name, status="error", batch_size=batch))

    monkeypatch.setattr(sample_suite, "measure", measure)
    ctx = _context(tmp_path, sample_batches=(8, 256))
    ctx.variants = (common.VARIANTS_BY_NAME["ours"],)
    ctx.budget = _frozen_budget(60.0)
    sample_suite.run(ctx)
    assert calls == [("ours", 256)], calls
    assert [(r["variant"], r["batch_size"]) for r in ctx.results.records if r["status"] == "skipped"] == \
        [("ours", 8)] * len(sample_suite.SAMPLERS)


def SiT_S4():
    import torch

    from sit_fast.models import SiT_models

    with torch.device("meta"):
        return SiT_models["SiT-S/4"](input_size=8, learn_sigma=True, num_classes=1000)


def test_roofline_counts_the_fast_path(capsys):
    """The roofline's byte count sees the fused ops, leaves matrix products to the FLOP term, and
    finds the fast path moving fewer bytes than the eager reference (training and sampling)."""
    from benchmarks.roofline import main, roofline

    rows = roofline("SiT-S/4", 64, train_batch=4, sample_batch=2, copy_gbps=1000.0, matmul_tflops=100.0)
    by = {(r["workload"], r["variant"]): r for r in rows}
    for workload in ("train_step", "sample_call_cfg"):
        ref, ours = by[(workload, "reference+bf16+sdpa")], by[(workload, "ours")]
        assert ref["tflop"] == ours["tflop"] > 0
        assert 0 < ours["memory_bound_gb"] < ref["memory_bound_gb"], (ref, ours)
        for r in (ref, ours):
            assert r["floor_ms"] == pytest.approx(r["tflop"] / 100.0 * 1e3 + r["memory_bound_gb"] / 1000.0 * 1e3)
            # matrix products only in the FLOP term, ours' MLP op (sit_fast::gelu_linear) seen inside
            assert not {"mm", "addmm", "bmm", "convolution", "matmul", "linear", "gelu_linear",
                        "gelu_linear_backward"} & set(r["ops"]), r["ops"]
    assert by[("train_step", "ours")]["ops"]["gated_residual_layernorm_modulate_backward"] > 0
    assert by[("sample_call_cfg", "ours")]["ops"]["gated_residual_layernorm_modulate"] > 0
    # ours samples with the GELU in fc1's epilogue, as on CUDA; trains with it in its own kernels
    assert "gelu" not in by[("sample_call_cfg", "ours")]["ops"], by[("sample_call_cfg", "ours")]["ops"]
    assert by[("sample_call_cfg", "reference+bf16+sdpa")]["ops"]["gelu"] > 0
    train_ops = by[("train_step", "ours")]["ops"]
    assert train_ops["bias_gelu"] > 0 and train_ops["bias_gelu_backward"] > 0 and "gelu" not in train_ops, train_ops
    # sampling with bf16 matmul weights casts no weight per call; the reference casts every one
    weights_gb = sum(p.numel() for p in SiT_S4().parameters()) * 6 / 1e9  # read fp32, write bf16
    assert by[("sample_call_cfg", "reference+bf16+sdpa")]["ops"]["_to_copy"] > 0.9 * weights_gb
    assert by[("sample_call_cfg", "ours")]["ops"].get("_to_copy", 0) < 0.1 * weights_gb
    main(["--model", "SiT-S/4", "--image-size", "64", "--train-batch", "4", "--sample-batch", "2",
          "--copy-gbps", "1000", "--matmul-tflops", "100"])
    out = capsys.readouterr().out
    assert "train_step: eager reference floor / ours floor" in out and out.count("| ours |") == 2


def test_roofline_of_a_cpu_run_says_so(tmp_path, capsys):
    """--results of a CPU dry run applies a CPU's ceilings to SiT-XL/2: a note says it was no GPU, unless
    --copy-gbps and --matmul-tflops, both given, replace both of its figures."""
    from benchmarks.roofline import main

    argv = ["--model", "SiT-S/4", "--image-size", "64", "--train-batch", "4", "--sample-batch", "2"]
    for device_type, device in (("cpu", "AMD EPYC"), ("cuda", "NVIDIA H100")):
        path = tmp_path / f"{device_type}.json"
        path.write_text(json.dumps({"ceilings": {"copy_gbps": 5.0, "matmul_tflops": 0.5},
                                    "environment": {"device": device, "device_type": device_type}}))
        main(argv + ["--results", str(path)])
        err = capsys.readouterr().err
        assert ("measured on AMD EPYC (cpu), not a GPU: its ceilings bound" in err) == (device_type == "cpu"), err
    # both ceilings typed: no figure of the file is used, and no note; one typed: the other's note
    for given, note in ((["--copy-gbps", "1000", "--matmul-tflops", "100"], ""),
                        (["--copy-gbps", "1000"], "its matmul ceiling bounds nothing a GPU run does"),
                        (["--matmul-tflops", "100"], "its copy ceiling bounds nothing a GPU run does")):
        main(argv + ["--results", str(tmp_path / "cpu.json"), *given])
        err = capsys.readouterr().err
        assert (note in err and "not a GPU" in err) if note else "not a GPU" not in err, (given, err)


def test_roofline_ceilings_given_replace_those_of_results(tmp_path, capsys):
    """--copy-gbps or --matmul-tflops given with --results replaces that figure of the file, not the other."""
    from benchmarks.roofline import main

    path = tmp_path / "results.json"
    path.write_text(json.dumps({"ceilings": {"copy_gbps": 5.0, "matmul_tflops": 0.5},
                                "environment": {"device": "NVIDIA H100", "device_type": "cuda"}}))
    argv = ["--model", "SiT-S/4", "--image-size", "64", "--train-batch", "4", "--sample-batch", "2",
            "--results", str(path)]
    for given, ceilings in (([], "copy 5 GB/s, matmul 0.5 TFLOP/s"),
                            (["--copy-gbps", "1000"], "copy 1000 GB/s, matmul 0.5 TFLOP/s"),
                            (["--matmul-tflops", "100"], "copy 5 GB/s, matmul 100 TFLOP/s")):
        main(argv + given)
        assert f"ceilings: {ceilings}\n" in capsys.readouterr().out, given


@pytest.mark.parametrize("flags, words", [
    (["--model", "SiT-Q/2"], "argument --model: invalid choice: 'SiT-Q/2'"),
    (["--model", "SiT-S/4", "--image-size", "48"], "--image-size 48: SiT-S/4 takes a multiple of 32"),
    (["--image-size", "100"], "--image-size 100: SiT-XL/2 takes a multiple of 16"),
])
def test_roofline_refuses_a_model_or_image_size_it_cannot_count(flags, words, capsys):
    """An unknown --model, or an --image-size whose latent the patches do not tile, is a usage error
    (exit status 2), not a traceback nor the roofline of a smaller image."""
    from benchmarks.roofline import main

    with pytest.raises(SystemExit) as stopped:
        main(flags + ["--copy-gbps", "1000", "--matmul-tflops", "100"])
    assert stopped.value.code == 2
    assert words in capsys.readouterr().err


def test_roofline_help_gives_every_flag_and_default(capsys):
    """python -m benchmarks.roofline --help describes each flag, with its default where it has one."""
    from benchmarks.roofline import main

    with pytest.raises(SystemExit):
        main(["--help"])
    entries = capsys.readouterr().out.split("options:")[1].split("\n  -")  # one per flag
    helps = {entry.split()[0]: " ".join(entry.split()[2:]) for entry in entries[1:]}
    assert all(helps.values()), helps
    for flag, default in (("-model", "SiT-XL/2"), ("-image-size", "256"), ("-train-batch", "256"),
                          ("-sample-batch", "256")):
        assert helps[flag].endswith(f"(default: {default})"), (flag, helps[flag])


def test_roofline_prints_small_figures_to_three_significant_figures(capsys):
    """On a slow device (a CPU's ceilings) every figure in the table keeps three significant figures:
    a 0.66 TFLOP/s ceiling is not printed as 1, nor 0.4 images/s at the floor as 0."""
    from benchmarks.roofline import main, roofline

    argv = ["--model", "SiT-S/4", "--image-size", "64", "--train-batch", "4", "--sample-batch", "2"]
    main(argv + ["--copy-gbps", "1.5", "--matmul-tflops", "0.66"])
    out = capsys.readouterr().out
    assert "ceilings: copy 1.5 GB/s, matmul 0.66 TFLOP/s" in out, out
    rows = roofline("SiT-S/4", 64, train_batch=4, sample_batch=2, copy_gbps=1.5, matmul_tflops=0.66)
    table = [line.split(" | ") for line in out.splitlines() if line.startswith("| train_step") or
             line.startswith("| sample_call_cfg")]
    assert len(table) == len(rows) == 4
    for cells, r in zip(table, rows):
        for cell, key in zip(cells[3:9], ("tflop", "memory_bound_gb", "gemm_ms", "memory_ms", "floor_ms",
                                          "images_per_s")):
            assert float(cell) == pytest.approx(r[key], rel=5e-3), (key, cell, r[key])


def test_roofline_counts_an_overwritten_destination_as_written_only():
    """copy_ reads its source and writes its destination; fill_ and an out= argument are written, not
    read; an in-place add reads and writes its destination; ones_like reads nothing."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from benchmarks.roofline import TrafficCounter

    counter = TrafficCounter()
    size = 1000 * 4  # bytes of one tensor below
    with FakeTensorMode(), counter:
        a, b = torch.empty(1000), torch.empty(1000)
        a.copy_(b)
        a.fill_(1.0)
        torch.mul(a, b, out=a)
        a.add_(b)
        torch.ones_like(a)
    assert dict(counter.bytes) == {"copy_": 2 * size, "fill_": size, "mul": 3 * size, "add_": 3 * size,
                                   "ones_like": size}


def test_roofline_copies_no_adaln_weights():
    """A sampling call, as ModelForwards runs it, reuses the frozen model's concatenated adaLN weights,
    and a training step runs each adaLN layer's own GEMM: the roofline counts no copy of them."""
    from benchmarks.roofline import roofline

    model = SiT_S4()
    adaln = model.modulation_linears()
    concat_gb = sum(p.numel() for lin in adaln for p in lin.parameters()) * 4 * 2 / 1e9  # fp32, read + written
    rows = roofline("SiT-S/4", 64, train_batch=4, sample_batch=2, copy_gbps=1000.0, matmul_tflops=100.0)
    by = {(r["workload"], r["variant"]): r for r in rows}
    for variant in ("reference+bf16+sdpa", "ours"):
        assert by[("sample_call_cfg", variant)]["ops"].get("cat", 0) < 0.1 * concat_gb, by[("sample_call_cfg", variant)]
        assert by[("train_step", variant)]["ops"].get("cat", 0) < 0.1 * concat_gb, by[("train_step", variant)]


def test_roofline_counts_adamw_for_the_trainable_parameters_only():
    """AdamW updates the parameters that get gradients: the frozen positional embedding is not read
    or written by the optimizer step, so the roofline's 28 bytes per parameter leave it out."""
    from benchmarks.roofline import ADAMW_BYTES_PER_PARAM, roofline

    model = SiT_S4()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable < sum(p.numel() for p in model.parameters())  # pos_embed is frozen
    rows = roofline("SiT-S/4", 64, train_batch=4, sample_batch=2, copy_gbps=1000.0, matmul_tflops=100.0)
    for r in rows:
        if r["workload"] == "train_step":
            optimizer_bytes = r["memory_bound_gb"] * 1e9 - sum(r["ops"].values()) * 1e9
            assert optimizer_bytes == pytest.approx(ADAMW_BYTES_PER_PARAM * trainable, abs=100), r["variant"]


def test_roofline_rows_are_the_counts_over_the_ceilings():
    """A training step is batch x 3 forwards of FLOPs, a guided sampling call batch x 2 forwards; the
    floor's images/s is the batch over the floor; a sampling call has no optimizer bytes: its
    memory-bound bytes are its ops' alone."""
    from benchmarks.roofline import roofline
    from sit_fast.flops import forward_flops

    forward = forward_flops(SiT_S4())
    rows = roofline("SiT-S/4", 64, train_batch=4, sample_batch=2, copy_gbps=500.0, matmul_tflops=50.0)
    assert len(rows) == 4
    for r in rows:
        passes = 4 * 3 if r["workload"] == "train_step" else 2 * 2
        assert r["tflop"] * 1e12 == pytest.approx(passes * forward), r
        assert r["gemm_ms"] == pytest.approx(r["tflop"] / 50.0 * 1e3), r
        assert r["memory_ms"] == pytest.approx(r["memory_bound_gb"] / 500.0 * 1e3), r
        assert r["images_per_s"] == pytest.approx(r["batch"] / (r["floor_ms"] / 1e3)), r
        if r["workload"] == "sample_call_cfg":
            assert r["memory_bound_gb"] == pytest.approx(sum(r["ops"].values())), r


def test_roofline_adamw_moves_seven_fp32_words_per_parameter():
    """Weight, gradient and both moments read, weight and both moments written, all fp32."""
    from benchmarks.roofline import ADAMW_BYTES_PER_PARAM

    assert ADAMW_BYTES_PER_PARAM == (4 + 3) * 4


def test_roofline_counts_a_broadcast_at_its_stored_size_and_views_as_free():
    """A vector broadcast over a row is read once (its storage, not the view's elements); views and
    reshapes move nothing."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from benchmarks.roofline import TrafficCounter

    counter = TrafficCounter()
    with FakeTensorMode(), counter:
        a, v = torch.empty(1000), torch.empty(1)
        torch.add(a, v.expand(1000))
        a.view(10, 100).t()
    assert dict(counter.bytes) == {"add": 1000 * 4 + 4 + 1000 * 4}


def test_roofline_sampling_call_counts_the_guided_doubled_batch():
    """With guidance the model sees 2 x the batch: the bytes of a guided call of 2 images are those of
    an unguided call of 4."""
    import torch

    from benchmarks.roofline import count_traffic

    # a model each: a sampling call keeps the adaLN weights' concatenation, made of that call's fake tensors
    guided = count_traffic(SiT_S4(), 2, train=False, autocast_dtype=torch.bfloat16, cfg=True)
    plain = count_traffic(SiT_S4(), 4, train=False, autocast_dtype=torch.bfloat16, cfg=False)
    half = count_traffic(SiT_S4(), 2, train=False, autocast_dtype=torch.bfloat16, cfg=False)
    assert dict(guided.bytes) == dict(plain.bytes) and sum(half.bytes.values()) < sum(plain.bytes.values())


def test_roofline_cli_reads_a_runs_ceilings_and_prints_the_floors_ratio(tmp_path, capsys):
    """--results takes the copy and matmul ceilings from the run's results.json; the last lines give
    the eager reference's floor over ours; without ceilings the CLI refuses in a usage error."""
    from benchmarks.roofline import main, roofline

    argv = ["--model", "SiT-S/4", "--image-size", "64", "--train-batch", "4", "--sample-batch", "2"]
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"ceilings": {"copy_gbps": 700.0, "matmul_tflops": 20.0},
                                "environment": {"device": "NVIDIA H100", "device_type": "cuda"}}))
    main(argv + ["--results", str(path)])
    out = capsys.readouterr().out
    assert "ceilings: copy 700 GB/s, matmul 20 TFLOP/s" in out, out
    rows = roofline("SiT-S/4", 64, train_batch=4, sample_batch=2, copy_gbps=700.0, matmul_tflops=20.0)
    for workload in ("train_step", "sample_call_cfg"):
        ref, ours = (next(r for r in rows if (r["workload"], r["variant"]) == (workload, v))
                     for v in ("reference+bf16+sdpa", "ours"))
        assert f"{workload}: eager reference floor / ours floor = {ref['floor_ms'] / ours['floor_ms']:.2f}\n" in out
    with pytest.raises(SystemExit) as info:
        main(argv + ["--copy-gbps", "700"])
    assert info.value.code == 2 and "give the two ceilings" in capsys.readouterr().err


def test_sampling_goes_on_without_cuda_graphs_that_fail(tmp_path, monkeypatch):
    """A CUDA graph that cannot be captured costs ours its graphs, not its figures: every sampling
    record is still measured, without graphs, and says so."""
    import benchmarks.common
    import benchmarks.sample_suite as sample_suite
    from benchmarks.__main__ import main

    class FailingGraph:  # stands in for CUDAGraphForward on the CPU
        def __init__(self, fn):
            self.fn = fn

        def __call__(self, *args):
            raise RuntimeError("operation not permitted when stream is capturing")

    real_build, real_config = sample_suite.build_forwards, benchmarks.common.ModelFactory.variant_config

    def build(models, variant):
        model, denoiser = real_build(models, variant)
        denoiser.forwards.guided = FailingGraph(denoiser.forwards.guided)
        return model, denoiser

    def config(self, variant, sampling=False):
        return dict(real_config(self, variant, sampling), cuda_graphs=sampling)

    monkeypatch.setattr(sample_suite, "build_forwards", build)
    monkeypatch.setattr(benchmarks.common.ModelFactory, "variant_config", config)
    assert main(["sample", "--device", "cpu", "--size", "tiny", "--out", str(tmp_path), "--variants", "ours"]) == 0
    records = json.loads((tmp_path / "results.json").read_text())["records"]
    assert len(records) == 2
    for record in records:
        assert record["status"] == "ok" and record["median_ms"] > 0, record
        assert record["note"].startswith("measured without CUDA graphs, which failed: RuntimeError"), record["note"]
        assert record["variant_config"]["cuda_graphs"] is False and record["images_per_s"] > 0


def test_kernel_rows_keep_to_the_time_box(monkeypatch):
    """Once less is left of the box than a variant's last measurement took, its next ones are skipped rows;
    `ours` and the compiled reference are measured before the eager reference, every fwd before any bwd."""
    from benchmarks import kernels_suite

    monkeypatch.setattr(kernels_suite, "OPS", ("gated_residual", "layernorm_modulate"))
    monkeypatch.setattr(kernels_suite, "MLP_OPS", ())
    monkeypatch.setattr(kernels_suite, "ATTENTION_OPS", ())
    monkeypatch.setattr(kernels_suite, "DIRECTIONS", ("fwd", "bwd"))
    calls = []

    def time_left():  # plenty for the first two measurements, then nothing
        calls.append(None)
        return 1e9 if len(calls) <= 3 else 0.0

    rows = kernels_suite.run("cpu", "tiny", time_left=time_left)
    assert [(r["name"], r["variant"]) for r in rows] == [  # every op's fwd before any bwd
        (f"{op}.{direction}", v) for direction in ("fwd", "bwd") for op in ("gated_residual", "layernorm_modulate")
        for v in ("ours", "reference+compile", "reference")]
    assert [r.get("status", "ok") for r in rows] == ["ok", "ok"] + ["skipped"] * 10, rows
    assert all(r["note"].startswith("time box: 0 s left") for r in rows[2:]), rows
    assert all(r["median_ms"] > 0 for r in rows[:2])


def test_a_spent_kernel_box_skips_the_rows_in_the_order_of_their_worth():
    """The rows in the order a time box cuts from the end: the adaLN ops' forward and backward (the
    goals), the MLP's forward (a default hangs on it), attention (a possible default), fwd_bwd."""
    from benchmarks import kernels_suite

    rows = list(kernels_suite.run("cpu", "tiny", time_left=lambda: 0.0))
    assert all(r["status"] == "skipped" for r in rows), rows
    names = list(dict.fromkeys(r["name"] for r in rows))
    ops, mlp = kernels_suite.OPS, kernels_suite.MLP_OPS
    assert names == ([f"{op}.fwd" for op in ops] + [f"{op}.bwd" for op in ops] + [f"{op}.fwd" for op in mlp]
                     + ["attention.fwd", "attention.bwd"] + [f"{op}.fwd_bwd" for op in ops]), names


def test_kernel_time_box_judges_each_variant_by_its_own_last_measurement(monkeypatch):
    """With 0.3 s left, our kernels (slowed to 0.1 s a call here: 0.7 s a measurement) are skipped
    after their first measurement, while the eager reference (milliseconds) goes on being measured."""
    import time

    import kernels
    from benchmarks import kernels_suite

    for op in ("gated_residual", "layernorm_modulate"):
        def slowed(*args, _op=getattr(kernels, op)):
            time.sleep(0.1)
            return _op(*args)
        monkeypatch.setattr(kernels, op, slowed)
    monkeypatch.setattr(kernels_suite, "OPS", ("gated_residual", "layernorm_modulate"))
    monkeypatch.setattr(kernels_suite, "MLP_OPS", ())
    monkeypatch.setattr(kernels_suite, "ATTENTION_OPS", ())
    monkeypatch.setattr(kernels_suite, "DIRECTIONS", ("fwd",))
    rows = kernels_suite.run("cpu", "tiny", time_left=lambda: 0.3)
    status = {(r["name"].split(".")[0], r["variant"]): r.get("status", "ok") for r in rows}
    assert status["gated_residual", "ours"] == status["gated_residual", "reference"] == "ok", rows
    assert status["layernorm_modulate", "ours"] == "skipped", rows
    assert status["layernorm_modulate", "reference"] == "ok", rows


def test_a_kernels_suite_that_cannot_be_imported_is_an_error_record_and_the_other_suites_run(tmp_path, monkeypatch):
    import benchmarks
    from benchmarks import common, parity_suite
    from benchmarks.__main__ import main

    for name in ("kernels_suite", "tuning_suite"):  # imported afresh: the kernels suite's import fails
        monkeypatch.delattr(benchmarks, name, raising=False)
        monkeypatch.delitem(sys.modules, f"benchmarks.{name}", raising=False)
    monkeypatch.setitem(sys.modules, "benchmarks.kernels_suite", None)
    monkeypatch.setattr(common, "measure_ceilings", lambda device, size: {
        "copy_gbps": 1.0, "copy_bytes": 1, "matmul_tflops": 1.0, "matmul_shape": [1, 1, 1]})
    ran = []
    monkeypatch.setattr(parity_suite, "run", lambda ctx: ran.append("parity"))
    status = main(["kernels,tuning,parity", "--device", "cpu", "--size", "tiny", "--out", str(tmp_path)])
    records = json.loads((tmp_path / "results.json").read_text())["records"]
    assert status == 1 and ran == ["parity"]
    assert [(r["suite"], r["name"], r["status"]) for r in records] == [("kernels", "suite", "error"),
                                                                       ("tuning", "suite", "error")]
    for record in records:
        assert "import of benchmarks.kernels_suite halted" in record["note"], record["note"]
        assert not validate_record(record), validate_record(record)


def _full_size_boxes(tmp_path, monkeypatch, deadline_s: float, startup_s: float, kernels_overrun_s: float) -> dict:
    """Each suite's time box in `python -m benchmarks all --size full --deadline-s deadline_s`, on a fake
    clock: start-up (environment, ceilings) takes startup_s, the kernels suite its whole box and
    kernels_overrun_s more, every other suite its whole box. Nothing is built or measured."""
    import types

    import benchmarks.__main__ as bench_main
    from benchmarks import common, memory_suite, parity_suite, profile_suite, sample_suite, train_suite, tuning_suite

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # as main() sets it for --device cpu, undone after the test
    now = [0.0]
    clock = types.SimpleNamespace(monotonic=lambda: now[0], perf_counter=lambda: now[0])
    monkeypatch.setattr(bench_main, "time", clock)
    monkeypatch.setattr(common, "time", clock)

    def ceilings(device, size):
        now[0] += startup_s
        return {"copy_gbps": 1.0, "copy_bytes": 1, "matmul_tflops": 1.0, "matmul_shape": [1, 1, 1]}

    boxes = {}

    def runner(suite, overrun_s=0.0):
        def run(ctx):
            boxes[suite] = ctx.budget.seconds
            now[0] += ctx.budget.seconds + overrun_s
        return run

    monkeypatch.setattr(common, "measure_ceilings", ceilings)
    monkeypatch.setattr(bench_main, "run_kernels", runner("kernels", kernels_overrun_s))
    for module in (parity_suite, train_suite, sample_suite, memory_suite, profile_suite, tuning_suite):
        monkeypatch.setattr(module, "run", runner(module.SUITE))
    assert bench_main.main(["all", "--device", "cpu", "--size", "full", "--deadline-s", str(deadline_s),
                            "--out", str(tmp_path)]) == 0
    return boxes


@pytest.mark.parametrize("deadline_s", ["gpu_session.sh", 400])
def test_full_size_boxes_hold_the_goal_measurements(tmp_path, monkeypatch, deadline_s):
    """At the GPU session's deadline (and the full size's default), after 20 s of start-up and a
    kernels suite that overruns its box by 5 s, each suite's box holds what its first measurements
    are estimated to need: parity of ours compiled (the figure the train and sample records quote),
    the training steps of ours and of the compiled reference, ours and the compiled reference sampled
    at the first batch (a compilation each), and an eager form's activation memory; and the kernels
    suite's holds the adaLN ops' rows and the MLP's (about 2 s a row on the H200: 53.7 s for 27)."""
    import re

    from benchmarks import common

    if deadline_s == "gpu_session.sh":
        with open(os.path.join(REPO_ROOT, "benchmarks", "gpu_session.sh"), encoding="utf-8") as f:
            deadline_s = int(re.search(r"BENCH_DEADLINE_S:-(\d+)", f.read()).group(1))
    boxes = _full_size_boxes(tmp_path, monkeypatch, deadline_s, startup_s=20.0, kernels_overrun_s=5.0)
    full = common.SIZES["full"]()
    ours = common.VARIANTS_BY_NAME["ours"]
    compiled_reference = common.VARIANTS_BY_NAME["reference+bf16+sdpa+compile"]
    eager = common.VARIANTS_BY_NAME["reference+bf16+sdpa"]
    assert boxes["parity"] >= common.expected_cost_s(full, ours), boxes
    assert boxes["train"] >= (common.expected_cost_s(full, ours)
                              + common.expected_cost_s(full, compiled_reference)), boxes
    assert boxes["sample"] >= (common.expected_cost_s(full, ours)
                               + common.expected_cost_s(full, compiled_reference)), boxes
    assert boxes["memory"] >= common.expected_cost_s(full, eager), boxes
    assert boxes["profile"] >= common.expected_cost_s(full, ours), boxes  # at least ours' training step
    assert boxes["kernels"] >= 2.0 * (6 * 3 + 3 * 3), boxes  # (3 ops x 2 directions + 3 MLP ops) x 3 variants


def test_a_deadline_passed_before_a_suite_starts_gives_it_no_time_not_negative_time(tmp_path, monkeypatch):
    boxes = _full_size_boxes(tmp_path, monkeypatch, 10, startup_s=20.0, kernels_overrun_s=0.0)
    assert boxes == dict.fromkeys(("kernels", "parity", "train", "sample", "memory", "profile", "tuning"), 0.0), boxes


def test_results_on_disk_list_a_suite_as_soon_as_it_starts(tmp_path, monkeypatch):
    from benchmarks import memory_suite
    from benchmarks.__main__ import main

    listed = []
    monkeypatch.setattr(memory_suite, "run", lambda ctx: listed.append(
        json.loads((tmp_path / "results.json").read_text())["suites_run"]))
    assert main(["memory", "--device", "cpu", "--size", "tiny", "--out", str(tmp_path)]) == 0
    assert listed == [["memory"]]


def test_tuning_reports_a_gelu_launch_that_breaks_the_kernel(tmp_path, monkeypatch):
    """The bias + GELU kernels' search: a tiling that leaves the last rows of each program unwritten
    comes out as parity_failed (the outputs are NaN-filled first), never as the best launch."""
    import importlib

    from benchmarks import kernels_suite
    from benchmarks.__main__ import main

    module = importlib.import_module("kernels.bias_gelu")
    real = module._tiling

    def tiling(N, H, device, launch):
        block_h, rows_per_program, programs = real(N, H, device, launch)
        if launch["programs_per_slot"] == 1:
            return block_h, rows_per_program // 2, programs  # half the rows left to no program
        return block_h, rows_per_program, programs

    monkeypatch.setattr(module, "_tiling", tiling)
    monkeypatch.setattr(kernels_suite, "OPS", ())
    status = main(["tuning", "--device", "cpu", "--size", "tiny", "--out", str(tmp_path)])
    records = json.loads((tmp_path / "results.json").read_text())["records"]
    assert status == 1
    assert sorted({r["name"] for r in records}) == ["bias_gelu.fwd", "bias_gelu_backward.fwd"] and len(records) == 8
    check_broken_tiling_never_best(records)
    table = (tmp_path / "results.md").read_text()
    assert "| 32x128 |" in table, table


@pytest.mark.parametrize("stop", ["ctrl-c", "SIGTERM"])
def test_tuning_writes_each_launch_as_it_is_measured(tmp_path, monkeypatch, capsys, stop):
    """A tuning run stopped in the middle of a search (Ctrl-C, or the SIGTERM of the session's timeout)
    keeps the launches it measured, also those measured since results.json was last rewritten."""
    import signal

    from benchmarks import common, kernels_suite
    from benchmarks.__main__ import main

    real, calls = kernels_suite._times_cpu, []

    def times_cpu(step, reps, warmup=1):
        calls.append(1)
        if len(calls) == 2:
            if stop == "SIGTERM":
                os.kill(os.getpid(), signal.SIGTERM)  # raises where the run is, from its handler
            raise KeyboardInterrupt
        return real(step, reps, warmup)

    monkeypatch.setattr(kernels_suite, "_times_cpu", times_cpu)
    monkeypatch.setattr(common.Results, "WRITE_EVERY_S", math.inf)  # the records only at the suite's start and stop
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        main(["tuning", "--device", "cpu", "--size", "tiny", "--out", str(tmp_path)])
    assert signal.getsignal(signal.SIGTERM) == handler  # put back
    stopped = "stopped by SIGTERM" if stop == "SIGTERM" else "interrupted"
    assert f"{stopped} in the tuning suite: its 2 records are in {tmp_path / 'results.json'}" in capsys.readouterr().out
    # Breadth first: the default launches of the first op's two directions, then the stop at the next one's
    records = json.loads((tmp_path / "results.json").read_text())["records"]
    first = kernels_suite.OPS[0]
    assert [r["name"] for r in records] == [f"{first}.fwd", f"{first}.bwd"], records
    for record in records:
        assert record["suite"] == "tuning" and record["status"] == "ok" and record["extra"]["default"], record
    assert f"| {first}.fwd |" in (tmp_path / "results.md").read_text()


def test_one_launch_setting_for_all_ops_is_the_least_total_time():
    """The ops disagree on their best launch: the one setting is the launch with the least time summed
    over the ops, among those each op ran within bounds (a parity failure, or one op not run, rules a
    launch out)."""
    from types import SimpleNamespace

    from benchmarks.tuning_suite import one_setting

    def search(direction, **times):  # launch "w,s,p" -> median ms; None: failed parity
        measured = {tuple(int(v) for v in k[1:].split("_")): {"status": "ok" if ms is not None else "parity_failed",
                                                              "median_ms": ms} for k, ms in times.items()}
        return SimpleNamespace(direction=direction, measured=measured, default=(4, 2, 0))

    searches = [
        search("fwd", l4_2_0=1.0, l8_2_0=0.7, l8_4_1=0.9),   # op 1's best: 8,2,0
        search("fwd", l4_2_0=1.0, l8_2_0=0.95, l8_4_1=0.6),  # op 2's best: 8,4,1, the least in total
        search("fwd", l4_2_0=1.0, l8_2_0=0.5, l8_4_1=0.55, l2_1_0=0.1),  # 2,1,0 ran on this op alone
        search("bwd", l4_2_0=2.0, l4_8_1=1.0),
        search("bwd", l4_2_0=2.0, l4_8_1=None),  # fails here: not chosen, however fast elsewhere
        search("bwd", l4_2_0=2.0, l4_8_1=1.0),
    ]
    line = one_setting(searches)
    assert line.startswith("all ops: SIT_FAST_KERNEL_LAUNCH=fwd_num_warps=8,fwd_programs_per_slot=4,fwd_prefetch=1,"
                           "bwd_num_warps=4,bwd_programs_per_slot=2,bwd_prefetch=0 ("), line
    assert "fwd: 2.05 ms for the 3 ops, 1.46x the default's 3 ms; bwd: 6 ms for the 3 ops, 1.00x" in line, line

    # a gain within the default's own spread is noise: the default stands
    for spread, chosen in ((0.3, "fwd_num_warps=8,fwd_programs_per_slot=4,fwd_prefetch=1"),
                           (0.4, "fwd_num_warps=4,fwd_programs_per_slot=2,fwd_prefetch=0")):
        for s in searches[:3]:
            s.measured[(4, 2, 0)].update(p20_ms=1.0 - spread / 2, p80_ms=1.0 + spread / 2)
        line = one_setting(searches[:3])
        assert line.startswith(f"all ops: SIT_FAST_KERNEL_LAUNCH={chosen} ("), line
        assert ("the default stands" in line) == (spread == 0.4), line


def test_session_test_args_take_quoted_words(tmp_path):
    """gpu_session.sh's TEST_ARGS split as a command line: -k 'a and b' is one expression. The suite
    part only prints its help here."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # SESSION_S - TEST_MIN_S for the suite's --help: 50 s was too short on a loaded 2-core machine
    env.update(OUT=str(tmp_path), PYTHON=sys.executable, SESSION_S="300", TEST_MIN_S="100", BENCH_ARGS="--help",
               TEST_ARGS="tests/test_kernels.py -k 'rejects_bad_inputs and int64' -p no:cacheprovider")
    proc = subprocess.run(["bash", os.path.join("benchmarks", "gpu_session.sh")], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300, env=env)
    test_log = (tmp_path / "log_tests").read_text()
    assert proc.returncode == 0, _tail(proc)
    assert "test_kernel_rejects_bad_inputs[" in test_log and " deselected" in test_log, test_log[-2000:]


def test_session_quick_tests_name_tests_that_exist_and_run_first():
    """gpu_session.sh's QUICK_TESTS are node ids: one renamed or removed would stop pytest before any
    test runs ("not found"), losing the GPU's test time. Each collects here, and they run first, in their
    order, before the files named after them (which conftest.py otherwise puts longest first)."""
    with open(os.path.join(REPO_ROOT, "benchmarks", "gpu_session.sh"), encoding="utf-8") as f:
        quick = re.search(r'^QUICK_TESTS="([^"]*)"', f.read(), re.M).group(1).replace("\\\n", " ").split()
    assert len(quick) >= 4 and all("::" in node for node in quick), quick
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_ADDOPTS", "SIT_FAST_TEST_SHARD")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "", *quick,
                           "tests/test_upstream_parity.py"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, _tail(proc)
    collected = [line.partition("[")[0] for line in proc.stdout.splitlines() if "::" in line]
    named = [node for node in collected if node in quick]
    assert set(collected) - set(named) and all(node.startswith("tests/test_upstream_parity.py::")
                                               for node in set(collected) - set(named)), proc.stdout[-2000:]
    assert collected[:len(named)] == named and list(dict.fromkeys(named)) == quick, proc.stdout[-2000:]


def test_test_shards_split_the_selection_into_contiguous_parts(monkeypatch):
    """SIT_FAST_TEST_SHARD=I/N (conftest.py's hook): the N shards together hold every selected test once,
    in order, in near-equal contiguous runs, so gpu_session.sh's side-by-side pytest processes run the
    whole selection; the others are reported as deselected. (test_session_runs_test_shards_side_by_side
    runs it for real.)"""
    import types

    import conftest

    def shard(spec, items, args=()):
        deselected = []
        config = types.SimpleNamespace(args=list(args), hook=types.SimpleNamespace(
            pytest_deselected=lambda items: deselected.extend(items)))
        monkeypatch.setenv("SIT_FAST_TEST_SHARD", spec)
        items = list(items)
        conftest.pytest_collection_modifyitems(config, items)
        return items, deselected

    class Item(str):  # a test id, marked "spread" when it ends with "!"
        def get_closest_marker(self, name):
            return name if name == "spread" and self.endswith("!") else None

    tests = [Item(f"test_{i}") for i in range(11)]
    for count in (1, 2, 3, 4, 11, 12):
        parts = [shard(f"{index}/{count}", tests) for index in range(count)]
        assert [test for kept, _ in parts for test in kept] == tests
        assert max(len(kept) for kept, _ in parts) - min(len(kept) for kept, _ in parts) <= 1
        assert all(sorted(kept + deselected) == sorted(tests) for kept, deselected in parts)
    # the costly ones (marked spread) are dealt out in turn, first in each shard; the rest contiguous
    tests = [Item(name) for name in ("a", "b!", "c!", "d", "e", "f!", "g", "h")]
    assert [shard(f"{index}/2", tests)[0] for index in range(2)] == [["b!", "f!", "a", "d"], ["c!", "e", "g", "h"]]
    # tests named one by one on the command line (a test's cases too) are dealt out in turn before them all
    class Case(Item):
        path = "tests/test_q.py"

        @property
        def nodeid(self):
            return f"{self.path}::{self.rstrip('!')}"

    tests = [Case(name) for name in ("a", "b!", "q2[x]", "c", "q1", "q2[y]")]
    args = ["tests/test_q.py::q1", "tests/test_q.py::q2"]
    assert [shard(f"{index}/2", tests, args)[0] for index in range(2)] == [["q1", "q2[y]", "b!", "a"],
                                                                           ["q2[x]", "c"]]
    monkeypatch.delenv("SIT_FAST_TEST_SHARD")
    assert shard("", tests, args)[0] == ["q1", "q2[x]", "q2[y]", "a", "b!", "c"]
    assert shard("", tests) == (tests, [])  # unset: everything
    for bad in ("3/3", "-1/2", "1", "a/b"):
        with pytest.raises(pytest.UsageError, match=f"SIT_FAST_TEST_SHARD='{bad}': expected I/N"):
            shard(bad, tests)


def test_session_runs_test_shards_side_by_side(tmp_path):
    """TEST_SHARDS=2: two pytest processes, each on its
    shard; log_tests has both logs and a line per shard, the failures are named on stdout, and the exit
    status is the failing shard's."""
    tests = tmp_path / "tests"
    tests.mkdir()
    # The repository's conftest.py (the shard hook), for test files outside the repository.
    (tests / "conftest.py").write_text(f"exec(open({os.path.join(REPO_ROOT, 'conftest.py')!r}).read())\n")
    (tests / "test_three.py").write_text(
        "def test_one():\n    pass\n\n\ndef test_two():\n    assert 1 == 2\n\n\ndef test_three():\n    pass\n")
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OUT=str(out), PYTHON=sys.executable, SESSION_S="300", TEST_MIN_S="100", BENCH_ARGS="--help",
               TEST_SHARDS="2", TEST_ARGS=f"{tests / 'test_three.py'} -p no:cacheprovider")
    proc = subprocess.run(["bash", os.path.join("benchmarks", "gpu_session.sh")], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 1, _tail(proc)  # the suite (--help) exited 0; the tests' status is the failure
    assert "gpu_session: shard 0/2 exit 0: " in proc.stdout and "gpu_session: shard 1/2 exit 1: " in proc.stdout
    assert "FAILED " in proc.stdout and "test_three.py::test_two" in proc.stdout, _tail(proc)
    assert "gpu_session: suite exit 0, tests exit 1" in proc.stdout, _tail(proc)
    (together,) = [line for line in proc.stdout.splitlines() if "the shards' tests together:" in line]
    assert "2 passed" in together and "1 failed" in together, together
    test_log = (out / "log_tests").read_text()
    assert "=== shard 0/2" in test_log and "=== shard 1/2" in test_log, test_log[-2000:]
    for name, result in (("one", "PASSED"), ("two", "FAILED"), ("three", "PASSED")):
        assert test_log.count(f"::test_{name} {result}") == 1, test_log[-2000:]
    assert sorted(os.listdir(out)) == ["log", "log_tests"], os.listdir(out)


def test_a_lost_cuda_context_stops_the_run_and_a_new_process_continues_it(tmp_path, monkeypatch):
    """After each suite the device is checked: lost (a sticky CUDA error), the run stops with exit 75 and
    names the suites left; `--continue` measures them into the same results, reusing the ceilings and
    linking the parity suite's figures. The device's loss is simulated: the CPU has no CUDA context."""
    from benchmarks import __main__ as entry
    from benchmarks import common, memory_suite, parity_suite, train_suite

    def parity_run(ctx):  # ours failed with NaN (a broken kernel: when a device is lost), as results.json keeps it
        fields = dict(parity_output_rel_err=math.nan, parity_loss_rel_err=2e-4, parity_grad_rel_err_max=math.inf,
                      parity_max_abs_err=math.nan, parity_ok=False,
                      parity_tolerances={"output": 0.02, "loss": 0.01, "grad": 0.05})
        ctx.emit(ctx.record("parity", "forward_backward", "ours", status="parity_failed", batch_size=3,
                            dtype="bf16", extra={"seed": 11}, **fields))
        ctx.emit(ctx.record("parity", "forward_backward", "reference+bf16+sdpa", status="error", batch_size=3,
                            dtype="bf16", note="RuntimeError: CUDA error"))

    linked = []

    def train_run(ctx):  # links ours' parity figures into a record, as the train suite does
        linked.append(dict(ctx.parity))
        fields, _ = ctx.linked_parity(VARIANTS[-1], LINKED_PARITY)
        ctx.emit(ctx.record("train", "train_step", "ours", status="error", note="stands in", dtype="bf16", **fields))

    monkeypatch.setattr(parity_suite, "run", parity_run)
    monkeypatch.setattr(train_suite, "run", train_run)
    monkeypatch.setattr(memory_suite, "run", lambda ctx: linked.append("memory"))
    monkeypatch.setattr(common, "device_lost", lambda device: "AcceleratorError: CUDA error: an illegal memory access")
    args = ["--device", "cpu", "--size", "tiny", "--out", str(tmp_path)]
    assert entry.main(["parity,train,memory", *args]) == entry.DEVICE_LOST == 75
    assert (tmp_path / "suites_left").read_text() == "train,memory\n"
    first = json.loads((tmp_path / "results.json").read_text())
    assert first["suites_run"] == ["parity"] and linked == []

    monkeypatch.setattr(common, "device_lost", lambda device: None)
    assert entry.main(["train,memory", *args, "--continue"]) == 1  # the first process's parity failure counts
    document = json.loads((tmp_path / "results.json").read_text())
    assert document["suites_run"] == ["parity", "train", "memory"]
    assert document["records"][:2] == first["records"] and document["ceilings"] == first["ceilings"]
    (train_record,) = document["records"][2:]
    assert train_record["parity_output_rel_err"] == "NaN" and train_record["parity_grad_rel_err_max"] == "Infinity"
    assert document["command"] == first["command"] and len(document["continued_by"]) == 1
    assert "--continue" in document["continued_by"][0]
    (links,), rest = linked[:1], linked[1:]
    assert rest == ["memory"] and list(links) == [("ours", "bf16")], linked  # the error record links nothing
    ours = links["ours", "bf16"]
    assert math.isnan(ours["parity_output_rel_err"]) and ours["parity_grad_rel_err_max"] == math.inf
    assert ours["parity_ok"] is False and ours["source"] == "parity suite: batch 3, seed 11, bf16"
    assert not (tmp_path / "suites_left").exists()


def test_an_out_folder_that_cannot_be_made_is_a_one_line_error(tmp_path, capsys):
    """--out naming a file (results.json, say) or a path under one: one line and status 2, not a traceback."""
    from benchmarks.__main__ import main

    (tmp_path / "results.json").write_text("{}")
    for out in (tmp_path / "results.json", tmp_path / "results.json" / "bench"):
        assert main(["memory", "--device", "cpu", "--size", "tiny", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --out {out}: cannot make the folder (") and err.count("\n") == 1, err
        assert "Errno" not in err and str(out) not in err.partition(": cannot")[2], err  # the reason, said once
    assert (tmp_path / "results.json").read_text() == "{}"


def run_benchmarks_with(patch: str, out) -> subprocess.CompletedProcess:
    """`python -m benchmarks memory --device cpu --size tiny --out OUT` in a process of its own, after the
    line `patch` (run with signal imported: a stub that raises a stop signal, say)."""
    code = ("import os, runpy, signal, sys\n"
            "os.environ.setdefault('TRITON_INTERPRET', '1')\n"
            f"{patch}\n"
            "sys.argv = ['benchmarks', *sys.argv[1:]]\n"
            "runpy.run_module('benchmarks', run_name='__main__')\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, "-c", code, "memory", "--device", "cpu", "--size", "tiny", "--out",
                           str(out)], cwd=root, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": root})


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGINT"])
def test_a_stopped_run_ends_with_its_line_and_the_signals_status_not_a_traceback(tmp_path, stop):
    """python -m benchmarks stopped in a suite (the session's timeout, Ctrl-C): the line naming the records
    kept, then the shell's status for the signal (143, 130), without a traceback."""
    import signal

    done = run_benchmarks_with(f"from benchmarks import memory_suite; "
                               f"memory_suite.run = lambda ctx: signal.raise_signal(signal.{stop})", tmp_path)
    said = "stopped by SIGTERM" if stop == "SIGTERM" else "interrupted"
    assert done.returncode == 128 + getattr(signal, stop), (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert f"{said} in the memory suite: its 0 records are in {tmp_path / 'results.json'}" in done.stdout, done.stdout
    assert said not in done.stderr, done.stderr[-2000:]  # said once, on stdout


def test_a_run_interrupted_before_its_suites_says_so_once_with_status_130(tmp_path):
    """Ctrl-C before any suite starts (measuring the ceilings): one line on stderr and status 130, no traceback."""
    done = run_benchmarks_with("from benchmarks import common; "
                               "common.measure_ceilings = lambda device, size: signal.raise_signal(signal.SIGINT)",
                               tmp_path)
    assert done.returncode == 130 and "Traceback" not in done.stderr, (done.returncode, done.stderr[-2000:])
    assert done.stderr.splitlines().count("interrupted") == 1 and "interrupted" not in done.stdout, done.stderr


def test_continue_refuses_results_it_cannot_add_to(tmp_path, monkeypatch, capsys):
    from benchmarks.__main__ import main

    args = ["memory", "--device", "cpu", "--size", "tiny", "--out", str(tmp_path), "--continue"]
    assert main(args) == 2
    assert "results.json does not exist: nothing to continue" in capsys.readouterr().err
    (tmp_path / "results.json").write_text('{"schema_version": ')
    assert main(args) == 2
    assert f"{tmp_path / 'results.json'} cannot be read (Expecting value" in capsys.readouterr().err
    (tmp_path / "results.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION - 1}))
    assert main(args) == 2
    assert (f"{tmp_path / 'results.json'} has schema version {SCHEMA_VERSION - 1}, this suite writes {SCHEMA_VERSION}"
            in capsys.readouterr().err)
    (tmp_path / "results.json").write_text(json.dumps(
        {"schema_version": SCHEMA_VERSION, "environment": {"device": "cpu", "git_commit": "0123abc",
                                                           "torch_version": "2.0"}}))
    assert main(args) == 2
    assert "was measured with " in capsys.readouterr().err
    assert main(["memory", "--device", "cpu", "--size", "tiny", "--out", str(tmp_path)]) == 0  # a first run
    assert main(args) == 2
    assert "has the memory suite's records already: continue with the suites left" in capsys.readouterr().err
    assert main(["train", "--device", "cpu", "--size", "tiny", "--variants", "ours", "--out", str(tmp_path),
                 "--continue"]) == 2
    assert "was measured with variants ['reference', " in capsys.readouterr().err


def test_a_device_or_variants_it_cannot_run_are_refused_before_any_suite(tmp_path, monkeypatch, capsys):
    import torch

    from benchmarks.__main__ import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["memory", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "error: --device cuda but torch sees no CUDA device\n"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert main(["memory", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == ("error: TRITON_INTERPRET=1 would run the CUDA kernels in the interpreter; "
                                       "unset it\n")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["memory", "--device", "cpu", "--size", "tiny", "--variants", "ours,fast", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: unknown variants ['fast']; choose from ['reference', ")
    for empty in ("", "ours,"):  # no variant named: refused, not all four measured
        assert main(["memory", "--device", "cpu", "--size", "tiny", "--variants", empty, "--out", str(tmp_path)]) == 2
        assert capsys.readouterr().err.startswith("error: unknown variants ['']; choose from ['reference', ")
    assert os.listdir(tmp_path) == []


def test_session_runs_the_suites_left_after_a_lost_cuda_context(tmp_path):
    """gpu_session.sh: the suite's exit 75 with suites_left starts a new process on those suites with
    --continue and the time left, and the session's suite status is a failure though it went on."""
    out = tmp_path / "out"
    fake = tmp_path / "python"
    fake.write_text(
        "#!/bin/bash\n"
        f'echo "$*" >> {tmp_path}/calls\n'
        'if [ "$2" = benchmarks ] && [ ! -e "$OUT/lost_once" ]; then\n'
        '    touch "$OUT/lost_once"; echo "sample,memory" > "$OUT/suites_left"; exit 75\n'
        "fi\n")
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OUT=str(out), PYTHON=str(fake), SESSION_S="150", TEST_MIN_S="50", TEST_SHARDS="1",
               BENCH_ARGS="all --device cpu --size tiny", BENCH_DEADLINE_S="90.5", TEST_ARGS="tests/none.py")
    proc = subprocess.run(["bash", os.path.join("benchmarks", "gpu_session.sh")], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60, env=env)
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[0] == f"-m benchmarks all --device cpu --size tiny --deadline-s 90.5 --out {out}", calls
    second = re.fullmatch(rf"-m benchmarks sample,memory --device cpu --size tiny --deadline-s (\d+) --out {out} "
                          r"--continue", calls[1])
    assert second and 80 <= int(second.group(1)) <= 90, calls
    assert calls[2].startswith("-m pytest ") and len(calls) == 3, calls
    assert "the suites left (sample,memory) in a new process" in proc.stdout, _tail(proc)
    assert proc.returncode == 1 and "gpu_session: suite exit 1, tests exit 0" in proc.stdout, _tail(proc)


def test_time_twice_pools_two_windows_and_says_how_far_apart_they_were(monkeypatch):
    """Calls of 1 ms, then 3 ms, ...: the two windows' medians, their spread, and the figures over both."""
    import types

    import torch

    from benchmarks import common

    durations = iter([9.0, 1.0, 1.0, 1.0, 3.0, 3.0, 2.0])  # ms: warm-up, then two windows of 3
    now = [0.0]
    monkeypatch.setattr(common, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))

    def fn():
        now[0] += next(durations) / 1e3

    timing, windows = common.time_twice(fn, torch.device("cpu"), warmup=1, iters=3)
    assert windows["window_medians_ms"] == pytest.approx([1.0, 3.0])
    assert windows["window_spread"] == pytest.approx(2.0)
    assert timing.iterations == 6 and timing.median_ms == pytest.approx(1.5)
    assert common.window_fields(4.0, 5.0)["window_spread"] == pytest.approx(0.25)


def test_throughput_fields_turn_images_per_s_into_tflops_mfu_and_the_ceilings_fraction():
    """TFLOP/s = FLOPs per image x images/s; MFU against the data sheet's peak of the variant's dtype (TF32
    for the fp32 reference on CUDA); the fraction of the measured bf16 matmul ceiling for bf16 rows only;
    on a CPU no peak and no MFU."""
    import types

    import torch

    from benchmarks.common import VARIANTS_BY_NAME, throughput_fields
    from sit_fast.flops import PEAK_TFLOPS

    ours, reference = VARIANTS_BY_NAME["ours"], VARIANTS_BY_NAME["reference"]
    gpu = types.SimpleNamespace(device=torch.device("cuda"), environment={"device": "NVIDIA H100 80GB HBM3"},
                                ceilings={"matmul_tflops": 800.0})
    fields = throughput_fields(gpu, ours, 2e12, 300.0)
    assert fields["tflops"] == pytest.approx(600.0) and fields["peak_tflops"] == PEAK_TFLOPS["H100"]["bf16"]
    assert fields["mfu"] == pytest.approx(600.0 / PEAK_TFLOPS["H100"]["bf16"])
    assert fields["fraction_of_matmul_ceiling"] == pytest.approx(0.75)
    assert fields["peak_tflops_source"] == "sit_fast.flops.PEAK_TFLOPS['H100']['bf16'] (dense, data sheet)"
    fields = throughput_fields(gpu, reference, 2e12, 50.0)
    assert fields["peak_tflops"] == PEAK_TFLOPS["H100"]["tf32"] and "['tf32']" in fields["peak_tflops_source"]
    assert fields["mfu"] == pytest.approx(100.0 / PEAK_TFLOPS["H100"]["tf32"])
    assert fields["fraction_of_matmul_ceiling"] is None
    cpu = types.SimpleNamespace(device=torch.device("cpu"), environment={"device": "NVIDIA H100 80GB HBM3"},
                                ceilings={"matmul_tflops": 0.5})
    fields = throughput_fields(cpu, ours, 1e9, 100.0)
    assert fields["mfu"] is None and fields["peak_tflops"] is None
    assert fields["tflops"] == pytest.approx(0.1) and fields["fraction_of_matmul_ceiling"] == pytest.approx(0.2)


def test_ceilings_count_the_copy_read_and_written_and_a_products_2n3_flops(monkeypatch):
    """Copy: the source's bytes read plus the destination's written, over the median time; matmul:
    2 n^3 FLOPs over the median time."""
    import torch

    from benchmarks import common

    monkeypatch.setattr(common, "time_fn", lambda fn, device, warmup, iters: common.Timing(2.0, 1.5, 2.5, iters,
                                                                                           "perf_counter"))
    size = common.SIZES["tiny"]()
    ceilings = common.measure_ceilings(torch.device("cpu"), size)
    copied = 2 * (size.copy_bytes // 4) * 4
    assert ceilings["copy_bytes"] == copied and ceilings["copy_gbps"] == pytest.approx(copied / 2e-3 / 1e9)
    assert ceilings["matmul_tflops"] == pytest.approx(2 * size.matmul_n ** 3 / 2e-3 / 1e12)
    assert ceilings["copy_median_ms"] == ceilings["matmul_median_ms"] == 2.0


def test_timing_keeps_the_20th_and_80th_percentiles_and_scales_all_three():
    """Sampling scales the timed calls to the full sampler's: the median and both percentiles alike."""
    from benchmarks.common import Timing

    timing = Timing.from_times([float(ms) for ms in range(10, 0, -1)], "perf_counter")
    assert (timing.p20_ms, timing.median_ms, timing.p80_ms) == pytest.approx((2.8, 5.5, 8.2))
    scaled = timing.scaled(10.0)
    assert (scaled.p20_ms, scaled.median_ms, scaled.p80_ms) == pytest.approx((28.0, 55.0, 82.0))
    assert scaled.iterations == 10 and scaled.fields()["p80_ms"] == pytest.approx(82.0)


def test_figures_written_as_strings_read_back_as_floats():
    """_finite writes NaN and the infinities as strings for strict JSON; figures_read turns each back
    into its float, within lists and dicts, and leaves other strings alone."""
    from benchmarks.common import _finite, figures_read

    written = _finite({"a": [math.nan, math.inf, -math.inf, 1.5], "b": {"c": math.inf}, "d": "ours"})
    assert written == {"a": ["NaN", "Infinity", "-Infinity", 1.5], "b": {"c": "Infinity"}, "d": "ours"}
    read = figures_read(written)
    assert math.isnan(read["a"][0]) and read["a"][1:] == [math.inf, -math.inf, 1.5]
    assert read["b"] == {"c": math.inf} and read["d"] == "ours"


def test_a_window_of_zero_milliseconds_gives_no_spread():
    """|a - b| / min(a, b) has no value when a window's median is 0 (a timer's resolution): the noise is
    unknown, not zero."""
    from benchmarks.common import window_fields

    assert window_fields(0.0, 1.0) == {"window_spread": None, "window_medians_ms": [0.0, 1.0]}
    assert window_fields(2.0, 1.0)["window_spread"] == pytest.approx(1.0)


def test_console_and_markdown_show_the_records_figures():
    """The log line's MFU is a percentage; results.md's timing column is median (p20-p80); a goal's
    ratio shows the figure against its target; the reference's linked parity is its own: zero, ok."""
    import types

    from benchmarks.common import VARIANTS_BY_NAME, RunContext, _ms, console_line, goals_markdown

    record = dict.fromkeys(FIELDS)
    record.update(suite="train", name="train_step", variant="ours", dtype="bf16", status="ok", mfu=0.456,
                  median_ms=12.5, p20_ms=12.0, p80_ms=13.25)
    assert "MFU 45.6%" in console_line(record) and _ms(record) == "12.5 (12-13.25)"
    row = dict(goal="training >= 1.25x", suite="train", kind="ratio", target=1.25, batch=None,
               figure=1.3, noise=0.02, verdict="met")
    lines = goals_markdown(dict(suites_run=["train"], goals=[row]))
    assert "| train | training >= 1.25x | - | 1.300x | 1.25x | 2.0% | met |" in lines, lines
    fields, source = RunContext.linked_parity(types.SimpleNamespace(parity={}), VARIANTS_BY_NAME["reference"],
                                              LINKED_PARITY)
    assert source == "the reference itself" and fields["parity_ok"] is True
    assert fields["parity_output_rel_err"] == fields["parity_grad_rel_err_max"] == 0.0


def _goal_records(ours: dict, compiled: dict, suite="train", name="train_step", batch=256) -> list[dict]:
    base = dict(suite=suite, name=name, batch_size=batch, status="ok", note=None)
    reference = "reference+compile" if suite == "kernels" else "reference+bf16+sdpa+compile"
    return [dict(base, variant="ours", **ours), dict(base, variant=reference, **compiled)]


@pytest.mark.parametrize("ours_ips, spreads, verdict", [
    (1300.0, (0.01, 0.01), "met"),
    (1200.0, (0.01, 0.01), "missed"),
    (1260.0, (0.01, 0.01), "met, within noise"),     # 1.26x against 1.25x: 0.8% from the target, noise 2%
    (1240.0, (0.005, 0.005), "missed, within noise"),
])
def test_goal_verdicts_weigh_the_figure_against_the_noise(ours_ips, spreads, verdict):
    from benchmarks.goals import Goal, judge

    goal = Goal("training >= 1.25x", "train", "train_step", 1.25)
    records = _goal_records(dict(images_per_s=ours_ips, window_spread=spreads[0]),
                            dict(images_per_s=1000.0, window_spread=spreads[1]))
    row = judge(goal, records, "full", judged=True)
    assert row["figure"] == pytest.approx(ours_ips / 1000.0) and row["noise"] == pytest.approx(sum(spreads))
    assert row["verdict"] == verdict


def test_goals_read_the_right_records():
    """The kernels' ratio is of times against the ops' compiled reference; sampling's latency goal reads
    the smallest batch of the size; a fraction goal reads ours alone; what did not run says why."""
    from benchmarks.goals import Goal, judge

    kernel = Goal("faster", "kernels", "layernorm_modulate.bwd", 1.0)
    records = _goal_records(dict(median_ms=2.0, window_spread=0.0), dict(median_ms=3.0, window_spread=0.0),
                            suite="kernels", name="layernorm_modulate.bwd", batch=256)
    assert judge(kernel, records, "full", True)["figure"] == pytest.approx(1.5)

    latency = Goal("latency", "sample", "sde_euler_250_cfg4", 1.5, batch="latency")
    records = (_goal_records(dict(images_per_s=10.0, window_spread=0.0), dict(images_per_s=5.0, window_spread=0.0),
                             suite="sample", name="sde_euler_250_cfg4", batch=8)
               + _goal_records(dict(images_per_s=100.0, window_spread=0.0),
                               dict(images_per_s=90.0, window_spread=0.0), suite="sample",
                               name="sde_euler_250_cfg4", batch=256))
    row = judge(latency, records, "full", True)
    assert (row["batch"], row["figure"], row["verdict"]) == (8, pytest.approx(2.0), "met")

    mfu = Goal("mfu", "train", "train_step", 0.55, "mfu")
    records = _goal_records(dict(mfu=0.5, window_spread=0.02), dict(mfu=None, status="oom", note="no batch fits"))
    assert judge(mfu, records, "full", True)["verdict"] == "missed"

    ratio = Goal("ratio", "train", "train_step", 1.25)
    row = judge(ratio, records, "full", True)
    assert row["verdict"] == "not measured: reference+bf16+sdpa+compile: oom (no batch fits)", row
    assert judge(ratio, records[:1], "full", True)["verdict"] == \
        "not measured: reference+bf16+sdpa+compile: no record"
    unknown = judge(mfu, [dict(records[0], window_spread=None)], "full", True)
    assert unknown["verdict"] == "missed (noise unknown: a record without window_spread)"


def test_goals_judge_only_a_full_size_inductor_gpu_run_and_survive_odd_records():
    """Only a full-size CUDA run compiled by Inductor is judged; a figure read back from results.json as
    "NaN" or "Infinity" is not measured; the log shows the goals of every suite that ran, even one
    that recorded nothing of ours; results.md's table keeps its columns whatever a note says."""
    from benchmarks.common import goals_markdown
    from benchmarks.goals import NOT_JUDGED, console_lines, evaluate

    records = _goal_records(dict(images_per_s=1300.0, mfu=0.6, window_spread=0.01),
                            dict(images_per_s=1000.0, window_spread=0.01))
    setup = dict(size="full", compile_backend="inductor")
    cuda = {"device_type": "cuda"}

    def rows(records, environment=cuda, **changes):
        return {r["goal"]: r for r in evaluate(dict(environment=environment, setup=dict(setup, **changes),
                                                    records=records))}

    ratio, mfu = "training >= 1.25x the compiled reference's images/s", "training step >= 55% MFU"
    assert rows(records)[ratio]["verdict"] == "met" and rows(records)[mfu]["verdict"] == "met"
    assert rows(records, compile_backend="eager")[ratio]["verdict"] == NOT_JUDGED
    assert rows(records, size="tiny")[ratio]["verdict"] == NOT_JUDGED
    assert rows(records, environment={"device_type": "cpu"})[ratio]["verdict"] == NOT_JUDGED
    odd = [dict(records[0], mfu="Infinity", images_per_s="NaN"), records[1]]
    assert rows(odd)[mfu]["verdict"] == "not measured: no mfu in the record"
    assert rows(odd)[ratio]["verdict"] == "not measured: no time in the record"

    failed = [dict(suite="train", name="suite", variant="-", status="error", note="a | b")]
    document = dict(environment=cuda, setup=setup, records=failed, suites_run=["train"])
    lines = console_lines(evaluate(document), ["train"])
    assert len(lines) == 2 and all("not measured: ours: no record" in line for line in lines), lines
    noted = [dict(records[0], status="error", note="bad | worse"), records[1]]
    document = dict(document, records=noted)
    document["goals"] = evaluate(document)
    table = [line for line in goals_markdown(document) if line.startswith("| train |")]
    assert len(table) == 2 and all(line.count(" | ") == 6 for line in table), table


@pytest.mark.parametrize("ours_ips, spreads, verdict", [
    (1300.0, (0.02, 0.025), "met, within noise"),  # 1.3x: 4% of the target from it (0.05x), noise 4.5%
    (1250.0, (0.0, 0.0), "met, within noise"),     # exactly on the target: met, and no run is that exact
])
def test_goal_noise_is_a_fraction_of_the_target_and_the_target_itself_is_met(ours_ips, spreads, verdict):
    from benchmarks.goals import Goal, judge

    goal = Goal("training >= 1.25x", "train", "train_step", 1.25)
    records = _goal_records(dict(images_per_s=ours_ips, window_spread=spreads[0]),
                            dict(images_per_s=1000.0, window_spread=spreads[1]))
    assert judge(goal, records, "full", judged=True)["verdict"] == verdict


def test_goals_read_the_last_record_of_a_measurement_run_twice():
    """A suite rerun in the same results (a retry after a failure) appends its record: the goal reads
    the newest one, not the first."""
    from benchmarks.goals import Goal, judge

    goal = Goal("ratio", "train", "train_step", 1.25)
    first = _goal_records(dict(images_per_s=900.0, window_spread=0.0), dict(images_per_s=1000.0, window_spread=0.0))
    again = _goal_records(dict(images_per_s=1500.0, window_spread=0.0), dict(images_per_s=1000.0, window_spread=0.0))
    row = judge(goal, first + again[:1], "full", True)
    assert row["figure"] == pytest.approx(1.5) and row["verdict"] == "met", row


def test_each_goal_holds_the_target_its_text_states_at_the_batch_it_names():
    """The goals' numbers: a fraction goal's target is the percentage in its text, a speed-up goal's
    the factor in its text (1.0: faster than); sampling's latency goals read the size's smallest
    batch, its throughput goals the largest, for the SDE and the ODE alike."""
    from benchmarks.common import SIZES
    from benchmarks.goals import evaluate, goals

    for goal in goals():
        if goal.field:
            assert f">= {goal.target:.0%} " in goal.text, goal
        elif goal.target != 1.0:
            assert f">= {goal.target:g}x " in goal.text, goal
        else:
            assert " faster than torch.compile of the reference" in goal.text, goal
    for size in SIZES:  # judged or not, the row names the batch it reads
        batches = SIZES[size]().sample_batches
        rows = evaluate(dict(environment={"device_type": "cuda"}, setup=dict(size=size, compile_backend="inductor")))
        sampling = [r for r in rows if r["suite"] == "sample"]
        assert len(sampling) == 5 and all(r["verdict"].startswith("not measured: ours: no record") for r in sampling)
        for row in sampling:
            assert "throughput batch" in row["goal"] or "latency batch" in row["goal"], row
            assert row["batch"] == (min(batches) if "latency batch" in row["goal"] else max(batches)), (size, row)


def test_cuda_kernel_timer_holds_the_device_while_the_host_queues(monkeypatch):
    """_times_cuda's logic with torch.cuda's events and sleep kernel stood in for (CPU): warm-up calls
    untimed, the sleep before each call at least twice the longest host time seen, and a call whose
    start event the device had passed before the host finished queueing counted as host-bound."""
    import time

    import torch

    from benchmarks import kernels_suite

    sleeps, passed = [], iter([True, False, False, False, True, False])  # the events' query() answers

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing

        def record(self):
            pass

        def query(self):
            return next(passed)

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return 0.25

    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, device=None, **k: real_empty(*a, **k))  # no CUDA here
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "_sleep", sleeps.append)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(kernels_suite, "_sleep_cycles_per_ms", lambda index: 1000.0)
    setups, calls = [], []
    result = kernels_suite._times_cuda(lambda state: (calls.append(state), time.sleep(0.004)), 3,
                                       setup=lambda: setups.append(1) or len(setups), warmup=3)
    assert calls == [1, 2, 3, 4, 5, 6]  # each call gets its own setup's result
    assert result.times_ms == [0.25] * 3 and result.host_bound == 1  # only the timed calls' answers count
    assert sleeps[0] == 250  # 0.25 ms at first
    assert all(cycles >= 2 * 4 * 1000 for cycles in sleeps[1:]), sleeps  # then twice the 4 ms the host took
    # a host that takes 30 ms: the sleep stops at its cap
    sleeps.clear()
    passed = iter([False] * 3)
    kernels_suite._times_cuda(lambda state: time.sleep(0.03), 2, warmup=1)
    assert sleeps[1:] == [kernels_suite.SLEEP_CAP_MS * 1000] * 2, sleeps


@pytest.mark.parametrize("name, kind", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1_execute_segment_k_off", "matmul"),
    ("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNN", "matmul"),
    ("aten::mm", "matmul"), ("aten::addmm", "matmul"), ("aten::bmm", "matmul"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<72, 128, 64, 4, false>, true>(Flash_fwd_params)",
     "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64_4x1x1", "attention"),
    ("aten::_scaled_dot_product_flash_attention", "attention"),
    ("_gated_residual_layernorm_modulate_bwd_kernel", "ours"), ("sit_fast::layernorm_modulate", "ours"),
    ("_bias_gelu_bwd_kernel", "ours"), ("_bias_gelu_fwd_kernel", "ours"),
    ("triton_per_fused_native_layer_norm_0", "inductor"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", "other"),
    ("aten::copy_", "other"),
])
def test_profile_kinds_of_kernels(name, kind):
    from benchmarks.profile_suite import kind_of

    assert kind_of(name) == kind


def test_profile_calls_adds_up_on_the_cpu():
    """The operators' own times make up the device time, each kind's share of it, and the calls per call."""
    import torch

    from benchmarks.profile_suite import profile_calls

    a, b = torch.randn(256, 256), torch.randn(256, 256)

    def fn():
        return (a @ b) @ b + 1

    figures = profile_calls(fn, torch.device("cpu"), calls=2, warmup=1, top=50)
    top = figures["top"]
    assert figures["calls"] == 2 and figures["wall_ms_per_call"] > 0
    assert figures["device_ms_per_call"] == pytest.approx(sum(t["ms_per_call"] for t in top))
    assert sum(figures["ms_per_call_by_kind"].values()) == pytest.approx(figures["device_ms_per_call"])
    assert sum(t["share"] for t in top) == pytest.approx(1.0)
    assert [t["ms_per_call"] for t in top] == sorted((t["ms_per_call"] for t in top), reverse=True)
    mm = [t for t in top if t["name"] in ("aten::mm", "aten::matmul") and t["kind"] == "matmul"]
    assert any(t["calls_per_call"] == 2 for t in mm), top  # two products per call
    assert figures["device_busy"] is None  # CUDA only


@pytest.mark.slow  # the dry run's records are checked the same way (test_benchmarks_dry_run.py)
def test_profile_suite_dry_run_follows_the_train_suite(tmp_path):
    """`train,profile` on the CPU: the profile's training step at the batch the train suite fitted, a
    sampling call per batch, for ours and the compiled reference, well-formed records and a table."""
    from benchmarks.__main__ import main

    assert main(["train,profile", "--device", "cpu", "--size", "tiny", "--out", str(tmp_path),
                 "--variants", "ours,reference+bf16+sdpa+compile,reference"]) == 0
    check_profile_records(json.loads((tmp_path / "results.json").read_text()), (tmp_path / "results.md").read_text())


def test_profile_flops_by_kind_of_sit_xl2():
    """The matmul and attention kernels' FLOPs per call, SiT-XL/2 at 256px: training at batch 256,
    175.7 TFLOP of linear layers (3 x forward) and 7.58 of attention (3.5 x: 4 T^2 D x 28 blocks
    forward); a guided sampling call at batch 256 is one forward of 512 images."""
    import torch

    from benchmarks.common import SIZES
    from benchmarks.profile_suite import achieved_tflops, flops_by_kind
    from sit_fast.flops import forward_flops
    from sit_fast.models import SiT

    kwargs = SIZES["full"]().model_kwargs
    train, sample = flops_by_kind(kwargs, "train_step", 256), flops_by_kind(kwargs, "sample_call", 256)
    attention = 4 * 256**2 * 1152 * 28  # one image, forward
    assert train["attention"] == 3.5 * attention * 256 == pytest.approx(7.576e12, rel=1e-3)
    with torch.device("meta"):
        forward = forward_flops(SiT(**kwargs))
    assert train["matmul"] == 3 * (forward - attention) * 256 == pytest.approx(175.7e12, rel=1e-3)
    assert sample == {"matmul": (forward - attention) * 512, "attention": attention * 512}
    assert achieved_tflops(train, {"matmul": 250.0, "other": 3.0}) == {"matmul": pytest.approx(702.9, rel=1e-3)}


def test_profile_trains_at_the_batch_the_train_suite_fitted():
    import types

    from benchmarks import common
    from benchmarks.profile_suite import train_batch

    records = [{"suite": "train", "variant": "ours", "status": "ok", "batch_size": 128},
               {"suite": "train", "variant": "reference+bf16+sdpa+compile", "status": "oom", "batch_size": None},
               {"suite": "sample", "variant": "reference+bf16+sdpa+compile", "status": "ok", "batch_size": 256}]
    ctx = types.SimpleNamespace(results=types.SimpleNamespace(records=records), size=common.SIZES["full"]())
    assert train_batch(ctx, common.VARIANTS_BY_NAME["ours"]) == 128
    # no training figure for it in this run: the smallest batch the size tries
    assert train_batch(ctx, common.VARIANTS_BY_NAME["reference+bf16+sdpa+compile"]) == 32


def test_tuning_launch_settings_are_launch_overrides():
    """A tuning launch's settings, named per direction, are valid launch_overrides and
    SIT_FAST_KERNEL_LAUNCH keys, and launch as they say; rows per step left unset by the warps scale
    the default warps with them."""
    from benchmarks.tuning_suite import settings_of
    from kernels import _launch

    fwd, bwd = settings_of((4, 32, 1, 2, 1)), settings_of((8, 4, 1, 1, 0))
    assert fwd == {"num_warps": 4, "programs_per_slot": 32, "prefetch": 1, "rows_per_step": 2, "one_row_loop": 1}
    named = {**{f"fwd_{k}": v for k, v in fwd.items()}, **{f"bwd_{k}": v for k, v in bwd.items()}}
    assert _launch._parse_launch_env(",".join(f"{k}={v}" for k, v in named.items())) == named
    with _launch.launch_overrides(**named):
        assert _launch.launch_params(1152, "fwd") == (4, 32, True, 2)  # warps as set, not scaled with the rows
        assert _launch.launch_params(1152, "bwd") == (8, 4, True, 1)
        assert _launch.row_loop("bwd") == {"ROWS": 1, "ONE_ROW_LOOP": False}  # one row, through the tile loop
    one_row = {d: _launch.launch_params(1152, d) for d in ("fwd", "bwd")}
    with _launch.launch_overrides(fwd_rows_per_step=4, bwd_rows_per_step=2):  # warps left unset
        assert _launch.launch_params(1152, "fwd") == (min(4 * one_row["fwd"][0], 32), *one_row["fwd"][1:3], 4)
        assert _launch.launch_params(1152, "bwd") == (min(2 * one_row["bwd"][0], 32), *one_row["bwd"][1:3], 2)


def test_parity_cases_put_ours_in_fp32_before_the_compiled_others():
    """The parity suite's order, which a time box cuts from the end: ours in bf16, the eager bf16
    reference, ours in fp32 (the kernels where the tolerance is tight), then the compiled reference;
    never the fp32 reference itself, the yardstick."""
    from benchmarks import common
    from benchmarks.parity_suite import cases

    order = [(v.name, "fp32" if dtype is None else "bf16") for v, dtype in cases(common.VARIANTS)]
    assert order == [("ours", "bf16"), ("reference+bf16+sdpa", "bf16"), ("ours", "fp32"),
                     ("reference+bf16+sdpa+compile", "bf16")], order


def test_parity_box_expects_later_compiled_cases_to_cost_what_the_first_took(tmp_path, monkeypatch):
    """At full size a compiled case is first expected to take expected_cost_s (40 s); once one has run,
    a later one is expected to take 1.5 times the longest so far: in a 50 s box whose first compiled
    case took 15 s, ours in fp32 runs (34 s left, 22.5 needed; 40 before), the compiled reference not
    (19 s left). Nothing is built: compare and the clock are stood in for."""
    import types

    import torch

    import sit_fast.parity
    from benchmarks import common, parity_suite

    now = [0.0]
    monkeypatch.setattr(parity_suite, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    monkeypatch.setattr(common, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    compared = []

    class Report:
        output_rel_err = loss_rel_err = grad_rel_err_max = 0.0
        rows = [{"max_abs": 0.0, "tensor": "output", "rel_err": 0.0}] * 2
        yardstick = None
        worst = {"tensor": "output"}

        def failures(self):
            return []

        def tolerances(self):
            return {"output": 1e-3, "loss": 1e-3, "grad": 1e-3}

    compiled_s = [15.0]  # each compiled case's seconds, the last repeated

    def compare(reference, candidate, autocast_dtype=None, compiled=False, **kwargs):
        compared.append((candidate, autocast_dtype))
        now[0] += (compiled_s.pop(0) if len(compiled_s) > 1 else compiled_s[0]) if compiled else 1.0
        return Report()

    monkeypatch.setattr(sit_fast.parity, "compare", compare)
    emitted = []
    ctx = types.SimpleNamespace(
        seed=0, size=common.SIZES["full"](), variants=common.VARIANTS, device=torch.device("cpu"),
        budget=common.Budget(50.0), parity={}, emit=emitted.append,
        models=types.SimpleNamespace(build=lambda variant: variant.name, variant_config=lambda variant: {}),
        record=lambda suite, name, variant, **fields: dict(name=name, variant=variant, **fields),
    )
    ctx.skip = lambda suite, name, variant, needed, **fields: emitted.append(
        dict(variant=variant.name, status="skipped", needed=needed, **fields))
    parity_suite.run(ctx)
    assert [(r["variant"], r["dtype"], r["status"]) for r in emitted] == [
        ("ours", "bf16", "ok"), ("reference+bf16+sdpa", "bf16", "ok"), ("ours", "fp32", "ok"),
        ("reference+bf16+sdpa+compile", "bf16", "skipped")], emitted
    assert emitted[-1]["needed"] == pytest.approx(22.5)

    # the longest compiled case so far, not the last: after 15 s and then 5 s, 22.5 s more than the 19 left
    compiled_s[:] = [15.0, 5.0]
    emitted.clear()
    ctx.budget = common.Budget(40.0)
    parity_suite.run(ctx)
    assert [r["status"] for r in emitted] == ["ok", "ok", "ok", "skipped"], emitted
    assert emitted[-1]["needed"] == pytest.approx(22.5)


def test_help_states_each_sizes_default_deadline(capsys):
    from benchmarks.__main__ import parse_args
    from benchmarks.common import SIZES

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name, size in SIZES.items():
        assert f"{size().deadline_s:g} s {name}" in text, (name, text)


def test_kernel_bytes_count_each_tensor_once_at_its_size():
    """The yardstick of every GB/s: each (B, T, D) tensor read or written once, each (B, D) vector
    once, fwd_bwd the sum of the two; the MLP's ops at their hidden width 4D, one call each."""
    import torch

    from benchmarks.kernels_suite import minimum_bytes

    B, T, D = 3, 5, 7
    act, vec, hidden = B * T * D, B * D, 4 * D
    counts = {"layernorm_modulate": ((2, 2), (3, 3)), "gated_residual": ((3, 1), (3, 2)),
              "gated_residual_layernorm_modulate": ((4, 3), (6, 5)), "attention": ((4, 0), (8, 0))}
    for dtype, element in ((torch.float32, 4), (torch.bfloat16, 2)):
        for op, ((fwd_act, fwd_vec), (bwd_act, bwd_vec)) in counts.items():
            assert minimum_bytes(op, "fwd", B, T, D, dtype) == (fwd_act * act + fwd_vec * vec) * element, op
            assert minimum_bytes(op, "bwd", B, T, D, dtype) == (bwd_act * act + bwd_vec * vec) * element, op
            assert minimum_bytes(op, "fwd_bwd", B, T, D, dtype) == \
                ((fwd_act + bwd_act) * act + (fwd_vec + bwd_vec) * vec) * element, op
        # x read, the (B, T, 4D) output written, W (4D, D) and b read
        assert minimum_bytes("linear_gelu", "fwd", B, T, D, dtype) == \
            (act + B * T * hidden + hidden * D + hidden) * element
        # a and dg read, da and g written, bias read and dbias written
        assert minimum_bytes("bias_gelu_backward", "fwd", B, T, D, dtype) == (4 * B * T * hidden + 2 * hidden) * element
        assert minimum_bytes("bias_gelu", "fwd", B, T, D, dtype) == (2 * B * T * hidden + hidden) * element
    for op in ("linear_gelu", "bias_gelu_backward", "bias_gelu"):
        with pytest.raises(ValueError, match="one call"):
            minimum_bytes(op, "bwd", B, T, D, torch.float32)


def test_kernel_rows_give_gb_per_s_of_the_minimum_bytes_and_the_copy_ceilings_fraction(tmp_path, monkeypatch):
    """On given timings: median, p20 and p80 over both windows, GB/s the minimum bytes over the
    median, the windows' spread, and as a record the GB/s as a fraction of the copy ceiling."""
    import random

    from benchmarks import kernels_suite
    from benchmarks.__main__ import kernel_record

    windows = iter([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]] * 3)  # one pair per variant
    monkeypatch.setattr(kernels_suite, "_times_cpu", lambda step, reps: kernels_suite.Times(next(windows), None))
    monkeypatch.setattr(kernels_suite, "OPS", ("gated_residual",))
    monkeypatch.setattr(kernels_suite, "MLP_OPS", ())
    monkeypatch.setattr(kernels_suite, "ATTENTION_OPS", ())
    monkeypatch.setattr(kernels_suite, "DIRECTIONS", ("fwd",))
    rows = kernels_suite.run("cpu", "tiny", compile_backend="eager")
    assert [r["variant"] for r in rows] == ["ours", "reference+compile", "reference"], rows
    size = kernels_suite.SIZES["tiny"]
    expected_bytes = (3 * size.B * size.T * size.D + size.B * size.D) * 4
    ctx = _context(tmp_path)
    copy_gbps = random.uniform(1.0, 100.0)
    ctx.ceilings = dict(ctx.ceilings, copy_gbps=copy_gbps)
    for row in rows:
        assert row.get("status", "ok") == "ok" and row["iterations"] == 6, row
        assert (row["median_ms"], row["p20_ms"], row["p80_ms"]) == pytest.approx((3.5, 2.0, 5.0)), row
        assert row["window_medians_ms"] == [2.0, 5.0] and row["window_spread"] == pytest.approx(1.5), row
        assert row["bytes_moved"] == expected_bytes
        assert row["gbps"] == pytest.approx(expected_bytes / 3.5e-3 / 1e9), row
        record = kernel_record(ctx, row)
        assert record["gbps"] == row["gbps"] and record["batch_size"] == size.B and record["dtype"] == "fp32"
        assert record["fraction_of_copy_bw"] == pytest.approx(row["gbps"] / copy_gbps), record


def _stub_search(default: tuple, choices: tuple, cost, cuda: bool = True, **keywords):
    """A tuning_suite.LaunchSearch whose measurements are cost(launch): median ms, or None for a launch
    outside the kernels' bounds (parity_failed); the launches in the order measured in `tried`."""
    from types import SimpleNamespace

    from benchmarks import tuning_suite

    class Search(tuning_suite.LaunchSearch):
        def __init__(self):  # no inputs, no device: only the search
            self.direction, self.default, self.choices, self.cuda, self.op = "fwd", default, choices, cuda, "op"
            self.keys = keywords.get("keys", tuning_suite.KEYS)
            self.axes = keywords.get("axes", tuning_suite.AXES)
            self.name, self.measured, self.searching, self.tried = "op.fwd", {}, True, []
            self.ctx = SimpleNamespace(emit=lambda record: None, results=SimpleNamespace(write=lambda: None))

        def measure_one(self, launch):
            self.tried.append(launch)
            ms = cost(launch)
            self.measured[launch] = {"status": "ok" if ms is not None else "parity_failed", "median_ms": ms,
                                     "gbps": 1.0, "extra": {"best": False}}
            return True

    return Search()


def test_tuning_coordinate_search_follows_the_best_launch_and_never_chooses_a_parity_failure():
    """The search's steps on given timings (CUDA's choices): prefetch, rows per step with the warps
    scaled with them, warps, tiling, warps again, each at the best launch so far; then the best
    launch at one row a step through the other loop. The fastest tiling fails parity: never the
    best, and no later step starts from it. finish() marks the best launch only."""
    from benchmarks import tuning_suite

    warps = {2: 0.5, 4: 0.3, 8: 0.2, 16: 0.25, 32: 0.4}
    tiling = {1: None, 2: 0.3, 4: 0.2, 8: 0.25, 16: 0.35, 32: 0.4, 64: 0.45}  # 1: outside the bounds
    rows = {1: 0.3, 2: 0.1, 4: 0.2}

    def cost(launch):
        w, s, p, r, loop = launch
        return None if tiling[s] is None else warps[w] + tiling[s] + 0.1 * p + rows[r] + 0.05 * (1 - loop)

    choices = ([2, 4, 8, 16, 32], list(tuning_suite.PROGRAMS_PER_SLOT), [0, 1], [1, 2, 4], [1, 0])
    search = _stub_search((4, 8, 1, 1, 1), choices, cost)
    search.start()
    for axis in search.axes:
        search.step(axis)
    assert search.tried == [
        (4, 8, 1, 1, 1),  # the default
        (4, 8, 0, 1, 1),  # prefetch off
        (8, 8, 0, 2, 1), (16, 8, 0, 4, 1),  # rows per step, the warps scaled with them
        (2, 8, 0, 2, 1), (4, 8, 0, 2, 1), (16, 8, 0, 2, 1), (32, 8, 0, 2, 1),  # warps
        (8, 1, 0, 2, 1), (8, 2, 0, 2, 1), (8, 4, 0, 2, 1), (8, 16, 0, 2, 1), (8, 32, 0, 2, 1), (8, 64, 0, 2, 1),
        (2, 4, 0, 2, 1), (4, 4, 0, 2, 1), (16, 4, 0, 2, 1), (32, 4, 0, 2, 1),  # warps again, at the best tiling
        (4, 8, 0, 1, 0),  # the fastest at one row a step, through the other loop
    ], search.tried
    assert search.best() == (8, 4, 0, 2, 1)
    search.finish()
    assert [launch for launch, r in search.measured.items() if r["extra"]["best"]] == [(8, 4, 0, 2, 1)]

    # every launch outside the bounds: the default is the answer, and none is marked
    failing = _stub_search((4, 8, 1, 1, 1), choices, lambda launch: None)
    failing.start()
    failing.step(0)
    assert failing.best() == (4, 8, 1, 1, 1)
    failing.finish()
    assert not any(r["extra"]["best"] for r in failing.measured.values())


def test_tuning_search_stops_at_the_first_launch_the_time_box_cuts():
    """A launch the time box leaves no room for is recorded and ends that search: no later step
    measures anything; the GELU kernels' search steps over its own axes without the warps scaling."""
    from benchmarks import tuning_suite

    search = _stub_search((4, 8, 1, 1, 1), ([4, 8], [8, 16], [0, 1], [1, 2], [1, 0]), lambda launch: 1.0)
    real = search.measure_one
    search.measure_one = lambda launch: real(launch) and len(search.tried) < 3
    search.start()
    for axis in search.axes:
        search.step(axis)
    assert search.tried == [(4, 8, 1, 1, 1), (4, 8, 0, 1, 1), (8, 8, 1, 2, 1)], search.tried

    gelu = _stub_search((4, 8, 32, 128), ([4, 8], [8, 1], [32, 16], [128, 256]), lambda launch: sum(launch) / 100,
                        keys=tuning_suite.GELU_KEYS, axes=tuning_suite.GELU_AXES)
    gelu.start()
    for axis in gelu.axes:
        gelu.step(axis)
    assert gelu.tried == [(4, 8, 32, 128), (4, 8, 32, 256), (4, 8, 16, 128), (8, 8, 16, 128), (4, 1, 16, 128),
                          (8, 1, 16, 128)], gelu.tried
    assert gelu.best() == (4, 1, 16, 128)


def test_tuning_gelu_search_tries_no_tile_past_its_elements_a_thread():
    """On CUDA's choices, with the largest tiles the fastest, the GELU search never launches a tile of
    more than GELU_MOST_PER_THREAD elements a thread (they spill registers and take up to 40 s to
    compile), yet goes as far as the bound allows."""
    from benchmarks import tuning_suite

    def per_thread(launch):
        warps, _, rows, cols = launch
        return rows * cols / (32 * warps)

    gelu = _stub_search((4, 8, 32, 128), tuning_suite.GELU_CHOICES, lambda launch: 1 / (1 + per_thread(launch)),
                        keys=tuning_suite.GELU_KEYS, axes=tuning_suite.GELU_AXES)
    gelu.start()
    for axis in gelu.axes:
        gelu.step(axis)
    assert max(map(per_thread, gelu.tried)) == tuning_suite.GELU_MOST_PER_THREAD, gelu.tried
    assert (4, 8, 32, 512) in gelu.tried and (4, 8, 64, 512) not in gelu.tried, gelu.tried
    assert per_thread(gelu.best()) == tuning_suite.GELU_MOST_PER_THREAD


def test_tuning_runs_every_search_breadth_first_and_tries_each_best_on_its_directions_other_ops(
        tmp_path, monkeypatch, capsys):
    """run()'s schedule, searches stood in for: an adaLN search per op and direction from the default
    launch (the interpreter's choices: the default, one other tiling, prefetch and row count), a GELU
    search per kernel over its own launch; every start, then each step for every search before the
    next step; each op's best measured on the other ops of its direction only; every search
    finished; then the one setting for all ops."""
    from benchmarks import kernels_suite, tuning_suite
    from kernels import _launch

    log, made = [], {}

    class Search:
        def __init__(self, ctx, op, direction, default, choices, keys=tuning_suite.KEYS, axes=None, timing=None):
            self.op, self.direction, self.default, self.choices, self.keys = op, direction, default, choices, keys
            self.axes, self.timing = tuning_suite.AXES if axes is None else axes, timing or direction
            self.measured = {default: {"status": "ok", "median_ms": 1.0}}
            log.append(("new", op, direction))
            made[op, direction] = self

        def start(self):
            log.append(("start", self.op, self.direction))

        def step(self, axis):
            log.append(("step", self.op, self.direction, axis))

        def best(self):
            return f"best of {self.op}"

        def measure(self, launch):
            log.append(("measure", self.op, self.direction, launch))

        def finish(self):
            log.append(("finish", self.op, self.direction))

    monkeypatch.setattr(tuning_suite, "LaunchSearch", Search)
    tuning_suite.run(_context(tmp_path))

    adaln = [(op, d) for op in kernels_suite.OPS for d in ("fwd", "bwd")]
    gelu = [(op, prefix) for op, prefix in tuning_suite.GELU_OPS.items()]
    searches = adaln + gelu
    assert [entry[1:] for entry in log if entry[0] == "new"] == searches
    D = kernels_suite.SIZES["tiny"].D
    for op, direction in adaln:
        search = made[op, direction]
        default = (*_launch.launch_params(D, direction), int(_launch.one_row_loop(direction)))
        assert search.default == tuple(int(v) for v in default) and search.timing == direction
        warps, per_slot, prefetch, rows, _ = search.default
        assert search.choices == ([warps], [per_slot, 1], [prefetch, 1 - prefetch], [rows, 2 if rows == 1 else 1],
                                  [1, 0]), search.choices
    for op, prefix in gelu:
        search = made[op, prefix]
        launch = _launch.gelu_launch(prefix.removeprefix("gelu_"))
        assert search.default == tuple(launch[k] for k in tuning_suite.GELU_KEYS) and search.timing == "fwd"
        assert search.keys == tuning_suite.GELU_KEYS and search.axes == tuning_suite.GELU_AXES
    steps = [("step", *s, axis) for i in range(len(tuning_suite.AXES)) for s in searches
             if i < len(made[s].axes) for axis in [made[s].axes[i]]]
    cross = [("measure", *s, f"best of {other[0]}") for other in searches for s in searches
             if s != other and s[1] == other[1]]
    assert log[len(searches):] == [("start", *s) for s in searches] + steps + cross + [("finish", *s) for s in searches]
    assert len(cross) == 2 * len(kernels_suite.OPS) * (len(kernels_suite.OPS) - 1)  # none for a GELU kernel
    out = capsys.readouterr().out
    assert "[tuning] all ops: SIT_FAST_KERNEL_LAUNCH=fwd_num_warps=" in out, out


def test_tuning_launch_records_gb_per_s_of_the_kernels_bytes_and_the_time_box_ends_a_search(tmp_path, monkeypatch):
    """A launch's record on given timings: the median and percentiles of its calls, GB/s of the
    kernels suite's minimum bytes, the fraction of the copy ceiling, the launch's settings and whether
    it is the default. With less left of the box than a launch needs, the launch is a skipped record
    and its search ends."""
    import random

    from benchmarks import common, kernels_suite, tuning_suite
    from kernels import _launch

    times = [random.uniform(1.0, 2.0) for _ in range(tuning_suite.CPU_REPS)]
    monkeypatch.setattr(kernels_suite, "_times_cpu", lambda step, reps: kernels_suite.Times(list(times), None))
    ctx = _context(tmp_path)
    op, D = "layernorm_modulate", kernels_suite.SIZES["tiny"].D
    default = (*_launch.launch_params(D, "fwd"), int(_launch.one_row_loop("fwd")))
    default = tuple(int(v) for v in default)
    search = tuning_suite.LaunchSearch(ctx, op, "fwd", default, ([default[0]],) * 5)
    other = (default[0], 1 if default[1] != 1 else 2, *default[2:])
    search.start()
    search.measure(other)
    size = kernels_suite.SIZES["tiny"]
    expected_bytes = kernels_suite.minimum_bytes(op, "fwd", size.B, size.T, size.D, size.dtype)
    median, p20, p80 = kernels_suite.quantiles_ms(times)
    records = ctx.results.records
    assert [r["extra"]["default"] for r in records] == [True, False], records
    assert records[1]["extra"]["programs_per_slot"] == other[1] and records[1]["variant"].startswith("ours ")
    for record in records:
        assert record["status"] == "ok" and record["name"] == f"{op}.fwd" and record["bytes_moved"] == expected_bytes
        assert (record["median_ms"], record["p20_ms"], record["p80_ms"]) == pytest.approx((median, p20, p80))
        assert record["gbps"] == pytest.approx(expected_bytes / (median * 1e-3) / 1e9), record
        assert record["fraction_of_copy_bw"] == pytest.approx(record["gbps"] / ctx.ceilings["copy_gbps"]), record

    ctx.budget = common.Budget(0.5)  # less than a launch needs on the CPU (1 s)
    cut = (default[0], default[1], 1 - default[2], *default[3:])
    search.measure(cut)
    assert records[-1]["status"] == "skipped" and "the search of layernorm_modulate.fwd stops here" in \
        records[-1]["note"], records[-1]
    assert records[-1]["extra"]["prefetch"] == cut[2] and not search.searching
    ctx.budget = common.Budget(1e9)
    search.measure((default[0], 1 if other[1] != 1 else 4, *default[2:]))
    assert len(records) == 3  # the search ended: nothing more measured


def test_suites_run_in_the_order_all_runs_them_and_unknown_names_are_refused():
    import argparse

    from benchmarks.__main__ import SUITES, suite_list

    assert suite_list("all") == list(SUITES)
    assert suite_list("tuning,kernels,train") == ["kernels", "train", "tuning"]
    with pytest.raises(argparse.ArgumentTypeError, match="choose all or from"):
        suite_list("kernels,bogus")


def _boxes_on_a_fake_clock(tmp_path, monkeypatch, argv: list[str], raising: str | None = None) -> tuple[int, dict]:
    """(exit status, each suite's time box) of `python -m benchmarks` argv on a fake clock where each
    suite takes half its box; the suite `raising` raises instead. Nothing is built or measured."""
    import types

    import benchmarks.__main__ as bench_main
    from benchmarks import common, memory_suite, parity_suite, profile_suite, sample_suite, train_suite, tuning_suite

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # as main() sets it for --device cpu, undone after the test
    now = [0.0]
    clock = types.SimpleNamespace(monotonic=lambda: now[0], perf_counter=lambda: now[0])
    monkeypatch.setattr(bench_main, "time", clock)
    monkeypatch.setattr(common, "time", clock)
    monkeypatch.setattr(common, "measure_ceilings", lambda device, size: {
        "copy_gbps": 1.0, "copy_bytes": 1, "matmul_tflops": 1.0, "matmul_shape": [1, 1, 1]})
    boxes = {}

    def runner(suite):
        def run(ctx):
            boxes[suite] = ctx.budget.seconds
            if suite == raising:
                raise RuntimeError(f"{suite} broke")
            now[0] += ctx.budget.seconds / 2
        return run

    monkeypatch.setattr(bench_main, "run_kernels", runner("kernels"))
    for module in (parity_suite, train_suite, sample_suite, memory_suite, profile_suite, tuning_suite):
        monkeypatch.setattr(module, "run", runner(module.SUITE))
    status = bench_main.main([*argv, "--device", "cpu", "--size", "tiny", "--out", str(tmp_path)])
    return status, boxes


def test_a_run_whose_console_goes_away_keeps_its_records(tmp_path, monkeypatch):
    """The suite's console piped through a `tee` that died (gpu_session.sh's): the lines are lost, the run
    goes on and writes its records (it ended at its first line with a BrokenPipeError, nothing written)."""
    import errno
    import json

    class Gone:
        def write(self, text):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stdout", Gone())
    status, boxes = _boxes_on_a_fake_clock(tmp_path, monkeypatch, ["memory"])
    assert status == 0 and set(boxes) == {"memory"}
    with open(tmp_path / "results.json") as f:
        assert json.load(f)["environment"]["device"]


def test_an_explicit_budget_is_a_suites_box_within_what_is_left_of_the_deadline(tmp_path, monkeypatch):
    """--budget-s SUITE=SECONDS replaces that suite's share, but no box outlasts the deadline; the
    others share what is left by their weights; a new process continuing the run gets the same flags."""
    from benchmarks.__main__ import continuation_flags, parse_args
    from benchmarks.common import SIZES

    weights = SIZES["tiny"]().budgets_s
    argv = ["kernels,train,memory", "--deadline-s", "100", "--budget-s", "train=30", "--budget-s", "memory=500"]
    status, boxes = _boxes_on_a_fake_clock(tmp_path, monkeypatch, argv)
    assert status == 0
    kernels = 100 * weights["kernels"] / (weights["kernels"] + weights["train"] + weights["memory"])
    assert boxes == {"kernels": pytest.approx(kernels), "train": 30.0,
                     "memory": pytest.approx(100 - kernels / 2 - 15)}, boxes
    flags = continuation_flags(parse_args(argv), "cpu", "tiny")
    assert " ".join(flags).count("--budget-s") == 2 and "train=30" in flags and "memory=500" in flags, flags
    for bad in ("bogus=5", "train=", "train=abc", "train=-5", "train=nan"):
        assert _boxes_on_a_fake_clock(tmp_path, monkeypatch, ["memory", "--budget-s", bad])[0] == 2


def test_a_budget_of_a_suite_not_run_is_a_usage_error_unless_a_continued_run_ran_it(tmp_path, monkeypatch, capsys):
    """--budget-s train=5 with the memory suite alone boxes nothing: refused, naming the suites run. A
    --continue run repeats the first run's flags (gpu_session.sh): a box of a suite that run ran is taken."""
    status, boxes = _boxes_on_a_fake_clock(tmp_path, monkeypatch, ["memory,profile", "--budget-s", "train=5"])
    assert (status, boxes) == (2, {})
    assert capsys.readouterr().err == ("error: --budget-s train=5: the train suite is not run here (only memory, "
                                       "profile): drop it, or add train to the suites\n")
    assert not (tmp_path / "results.json").exists()
    argv = ["--budget-s", "kernels=5", "--budget-s", "memory=3"]
    assert _boxes_on_a_fake_clock(tmp_path, monkeypatch, ["kernels", *argv]) == (2, {})
    assert _boxes_on_a_fake_clock(tmp_path, monkeypatch, ["kernels", "--budget-s", "kernels=5"]) == (0, {"kernels": 5})
    assert _boxes_on_a_fake_clock(tmp_path, monkeypatch, ["memory", *argv, "--continue"]) == (0, {"memory": 3})
    capsys.readouterr()
    assert _boxes_on_a_fake_clock(tmp_path, monkeypatch, ["profile", "--budget-s", "train=5", "--continue"]) == (2, {})
    assert capsys.readouterr().err.startswith("error: --budget-s train=5: the train suite is not run here (only "
                                              "profile)")


@pytest.mark.parametrize("suite", ["kernels", "parity", "train", "sample", "memory", "profile", "tuning"])
def test_a_suite_that_fails_is_an_error_record_the_next_suite_runs_and_the_exit_status_is_1(tmp_path, monkeypatch,
                                                                                             suite):
    """Whichever suite fails as a whole, its error record (no dtype, no variant of its own) goes into
    results.json and results.md, and the next suite runs."""
    from benchmarks.__main__ import SUITES

    after = SUITES[(SUITES.index(suite) + 1) % len(SUITES)]
    status, boxes = _boxes_on_a_fake_clock(tmp_path, monkeypatch, [f"{suite},{after}"], raising=suite)
    assert status == 1 and set(boxes) == {suite, after}, boxes
    (record,) = json.loads((tmp_path / "results.json").read_text())["records"]
    assert (record["suite"], record["status"]) == (suite, "error") and f"{suite} broke" in record["note"], record
    assert f"{suite} broke" in (tmp_path / "results.md").read_text()


def test_sampling_timed_steps_switch_to_the_latency_count_at_16_images_or_fewer():
    from benchmarks import common, sample_suite

    full = common.SIZES["full"]()
    assert full.latency_steps_timed != full.steps_timed
    assert [sample_suite.timed_steps(full, B) for B in (1, 16, 17, 256)] == \
        [full.latency_steps_timed] * 2 + [full.steps_timed] * 2


def test_memory_measures_the_bytes_per_image_between_the_two_batches(tmp_path, monkeypatch):
    """(peak at b2 - peak at b1) / (b2 - b1): the weights and gradients, in both peaks, drop out."""
    import random
    import types

    from benchmarks import common, memory_suite

    ctx = _context(tmp_path)
    ctx.variants = (common.VARIANTS_BY_NAME["reference+bf16+sdpa"],)
    ctx.models  # built on the CPU; the suite then takes the CUDA branch with the peaks stubbed
    ctx.device = types.SimpleNamespace(type="cuda")
    fixed, per_image = random.randint(10**6, 10**7), random.randint(1000, 10**5)
    monkeypatch.setattr(memory_suite, "forward_backward_peak", lambda ctx, model, variant, B: fixed + per_image * B)
    monkeypatch.setattr(memory_suite, "free_memory", lambda device: None)
    memory_suite.run(ctx)
    (record,) = ctx.results.records
    b1, b2 = ctx.size.memory_batches
    assert record["status"] == "ok" and record["measured_activation_bytes_per_image"] == per_image, record
    assert record["peak_memory_bytes"] == fixed + per_image * b2 and record["batch_size"] == b2, record
    assert record["extra"]["peak_b1_bytes"] == fixed + per_image * b1 and record["extra"]["measured_form"] == "eager"


def test_train_record_gives_images_per_s_of_the_batch_that_fits(tmp_path, monkeypatch):
    """On a given timing: images/s the fitted batch over the median step time, the TFLOP/s from it."""
    import random

    from benchmarks import common, train_suite
    from sit_fast.flops import train_step_flops

    median = random.uniform(10.0, 20.0)
    timing = common.Timing(median, median - 1, median + 1, 10, "perf_counter")
    windows = {"window_spread": 0.05, "window_medians_ms": [median, median * 1.05]}
    monkeypatch.setattr(train_suite, "_time_batch", lambda ctx, model, optimizer, transport, variant, B: (
        B, timing, windows, None, 1.0))
    ctx = _context(tmp_path, train_batches=(6, 3))
    train_suite.run(ctx)
    (record,) = ctx.results.records
    assert record["status"] == "ok" and record["batch_size"] == 6 and record["median_ms"] == median, record
    assert record["images_per_s"] == pytest.approx(6 / (median * 1e-3)), record
    model = ctx.models.build(common.VARIANTS_BY_NAME["reference"], compile=False)
    assert record["tflops"] == pytest.approx(train_step_flops(model) * record["images_per_s"] / 1e12), record
    assert record["window_spread"] == 0.05 and record["extra"]["batch_search"] == [{"batch": 6, "result": "fits"}]


def test_profile_time_box_expects_a_variants_next_profile_to_cost_what_its_last_took(tmp_path, monkeypatch):
    """Training steps of ours and the compiled reference, then a sampling call of each at every batch,
    the largest first; after a variant's first profile (its compilation) its next is expected to take
    OBSERVED_MARGIN times that one, not the first guess: a box of 150 s holds all six at 20 s each."""
    import types

    from benchmarks import common, profile_suite

    ctx = _context(tmp_path, sample_batches=(8, 256))
    calls, now = [], [0.0]
    clock = types.SimpleNamespace(monotonic=lambda: now[0], perf_counter=lambda: now[0])
    monkeypatch.setattr(profile_suite, "time", clock)
    monkeypatch.setattr(common, "time", clock)
    monkeypatch.setattr(common, "expected_cost_s", lambda size, variant: 100.0)

    def profiled(name):
        def run(ctx, variant, *more):
            calls.append((name, variant.name, *[B for B in more if isinstance(B, int)]))
            now[0] += 20.0
        return run

    monkeypatch.setattr(profile_suite, "profile_train", profiled("train_step"))
    monkeypatch.setattr(profile_suite, "profile_sample", profiled("sample_call"))
    ctx.variants = tuple(common.VARIANTS_BY_NAME[n] for n in
                         ("reference", "reference+bf16+sdpa+compile", "reference+bf16+sdpa", "ours"))
    ctx.budget = common.Budget(150.0)
    profile_suite.run(ctx)
    compiled = "reference+bf16+sdpa+compile"
    assert calls == [("train_step", "ours"), ("train_step", compiled), ("sample_call", "ours", 256),
                     ("sample_call", compiled, 256), ("sample_call", "ours", 8), ("sample_call", compiled, 8)], calls
    assert not ctx.results.records  # the stand-ins record nothing, and nothing was skipped
    assert profile_suite.expected_cost_s(ctx.size, VARIANTS[0], 10.0) == common.OBSERVED_MARGIN * 10.0
    assert profile_suite.expected_cost_s(ctx.size, VARIANTS[0], 1000.0) == 100.0


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16", "float16"])
def test_kernel_parity_holds_a_forward_to_the_forward_bounds_not_the_wider_backward_ones(dtype_name):
    """Every element just inside atol + rtol |ref| of the forward's PARITY_TOL passes; just outside it
    fails, though within the backward's wider bounds."""
    import torch

    from benchmarks import kernels_suite as ks

    dtype = getattr(torch, dtype_name)
    op = "gated_residual"
    args = ks.make_inputs(op, 2, 8, 16, torch.float32, "cpu")
    (expected,) = ks.expected_outputs(ks.reference_op(op), args, "fwd", None)
    atol, rtol = ks.PARITY_TOL[dtype]["fwd"]
    sign = torch.where(torch.rand_like(expected) < 0.5, -1.0, 1.0)
    bound = atol + rtol * expected.abs()
    assert ks.parity_failure(op, None, args, (expected + 0.9 * sign * bound,), dtype, "fwd") is None
    failure = ks.parity_failure(op, None, args, (expected + 1.1 * sign * bound,), dtype, "fwd")
    assert failure is not None and failure.startswith(f"output 0: {expected.numel()}/{expected.numel()} elements"), \
        failure


def test_kernel_rows_without_the_fused_kernels_still_time_ours_where_it_needs_none(monkeypatch):
    """Where the fused kernels cannot run, an op whose `ours` is a Triton kernel has rows for the two
    references only; linear_gelu's ours (PyTorch ops off CUDA) is still timed."""
    import kernels
    from benchmarks import kernels_suite

    monkeypatch.setattr(kernels, "kernels_available", lambda device: False)
    monkeypatch.setattr(kernels_suite, "OPS", ("gated_residual",))
    monkeypatch.setattr(kernels_suite, "MLP_OPS", ("linear_gelu", "bias_gelu"))
    monkeypatch.setattr(kernels_suite, "ATTENTION_OPS", ())
    monkeypatch.setattr(kernels_suite, "DIRECTIONS", ("fwd",))
    rows = kernels_suite.run("cpu", "tiny", compile_backend="eager")
    assert [(r["name"], r["variant"]) for r in rows] == [
        ("gated_residual.fwd", "reference+compile"), ("gated_residual.fwd", "reference"),
        ("linear_gelu.fwd", "ours"), ("linear_gelu.fwd", "reference+compile"), ("linear_gelu.fwd", "reference"),
        ("bias_gelu.fwd", "reference+compile"), ("bias_gelu.fwd", "reference")], rows
    assert all(r.get("status", "ok") == "ok" for r in rows), rows


def test_train_tries_the_first_batch_of_a_variant_the_time_box_admitted(tmp_path, monkeypatch):
    """The box is judged once per variant before it is built; its largest batch is then tried even if
    the build used up the box (a record of a tried batch, not a skipped variant); the next batch is
    not tried."""
    import torch

    from benchmarks import common, train_suite

    class Box(common.Budget):  # room for the variant, none left once it is built
        def allows(self, needed_s):
            self.asked = getattr(self, "asked", 0) + 1
            return self.asked == 1

    def time_batch(ctx, model, optimizer, transport, variant, B):
        raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {B} GiB")

    monkeypatch.setattr(train_suite, "_time_batch", time_batch)
    ctx = _context(tmp_path, train_batches=(8, 4))
    ctx.budget = Box(100.0)
    train_suite.run(ctx)
    (record,) = ctx.results.records
    assert [a["result"] for a in record["extra"]["batch_search"]] == ["out of memory", "not tried: time box"], record
    assert record["status"] == "oom", record


def test_sampling_judges_the_next_batch_by_the_longest_measurement_not_the_last(tmp_path, monkeypatch):
    """Ours at 256 took 50 s (20 s its first run), then at 64 only 20 s (2 s): batch 8 is judged by
    the 50 s measurement, which does not fit in the 55 s left, not by the shorter last one."""
    from benchmarks import common, sample_suite

    calls = []
    took = {256: (50.0, 20.0), 64: (20.0, 2.0), 8: (1.0, 0.5)}

    def measure(ctx, variant, transport, sampler, batch):
        calls.append(batch)
        seconds, first_run_s = took[batch]
        ctx.budget.seconds -= seconds
        ctx.emit(ctx.record("sample", "ode_euler_50_cfg4", variant.name, batch_size=batch,
                            extra={"first_run_s": first_run_s}))

    monkeypatch.setattr(sample_suite, "expected_cost_s", lambda size, variant: 40.0)
    monkeypatch.setattr(sample_suite, "measure", measure)
    ctx = _context(tmp_path, sample_batches=(8, 64, 256))
    ctx.variants = (common.VARIANTS_BY_NAME["ours"],)
    ctx.budget = common.Budget(125.0)
    longest = sample_suite.expected_from((50.0, 20.0, 256, sample_suite.timed_steps(ctx.size, 256)), ctx.size, 8)
    last = sample_suite.expected_from((20.0, 2.0, 64, sample_suite.timed_steps(ctx.size, 64)), ctx.size, 8)
    assert last < 55.0 < longest  # the case: only the longest measurement leaves batch 8 out
    sample_suite.run(ctx)
    assert calls == [256, 64], calls


def test_sampling_record_scales_the_timed_calls_to_the_full_sampler(tmp_path, monkeypatch):
    """On a given timing of k model calls: median, p20 and p80 scaled by the full sampler's calls / k,
    images/s from the scaled median, and two forwards per image per call (guidance) in the FLOPs."""
    import random

    from benchmarks import common, sample_suite
    from sit_fast.flops import forward_flops
    from sit_fast.sampling import model_call_times
    from sit_fast.transport import Sampler, create_transport

    median = random.uniform(5.0, 10.0)
    timing = common.Timing(median, median - 1, median + 1, 4, "perf_counter")
    monkeypatch.setattr(sample_suite, "time_twice", lambda fn, device, warmup, iters: (
        timing, {"window_spread": 0.1, "window_medians_ms": [median, median * 1.1]}))
    ctx = _context(tmp_path)
    transport = create_transport("Linear", "velocity")
    variant = common.VARIANTS_BY_NAME["reference"]
    B = ctx.size.sample_batches[0]
    sample_suite.measure(ctx, variant, transport, Sampler(transport), B)
    records = {r["name"]: r for r in ctx.results.records}
    assert set(records) == {name for name, *_ in sample_suite.SAMPLERS}, records
    k = sample_suite.timed_steps(ctx.size, B)
    flops = forward_flops(ctx.models.build(variant, compile=False))
    for name, kind, method, steps in sample_suite.SAMPLERS:
        record = records[name]
        calls_timed = len(model_call_times(kind, transport, sampling_method=method, num_steps=k))
        factor = len(model_call_times(kind, transport, sampling_method=method, num_steps=steps)) / calls_timed
        assert record["status"] == "ok" and record["steps_timed"] == calls_timed, record
        assert (record["median_ms"], record["p20_ms"], record["p80_ms"]) == pytest.approx(
            (median * factor, (median - 1) * factor, (median + 1) * factor)), record
        assert record["images_per_s"] == pytest.approx(B / (median * factor * 1e-3)), record
        assert record["flops_per_image"] == pytest.approx(2 * flops * calls_timed * factor), record
        assert record["extra"]["window_medians_ms"] == pytest.approx([median * factor, median * 1.1 * factor])


def test_profile_calls_give_each_kernels_time_per_call(monkeypatch):
    """The profiler's totals over the profiled calls, divided by the calls: per call, as the wall time."""
    import types

    import torch
    import torch.profiler

    from benchmarks.profile_suite import profile_calls

    events = [types.SimpleNamespace(key="aten::mm", count=6, self_cpu_time_total=9000.0),
              types.SimpleNamespace(key="aten::add", count=3, self_cpu_time_total=3000.0)]

    class Profile:
        def __init__(self, activities):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def key_averages(self):
            return events

    monkeypatch.setattr(torch.profiler, "profile", Profile)
    figures = profile_calls(lambda: None, torch.device("cpu"), calls=3, warmup=0)
    assert figures["device_ms_per_call"] == pytest.approx(4.0)
    assert [(t["name"], t["calls_per_call"], t["ms_per_call"]) for t in figures["top"]] == [
        ("aten::mm", 2.0, pytest.approx(3.0)), ("aten::add", 1.0, pytest.approx(1.0))]
    assert figures["ms_per_call_by_kind"] == {"matmul": pytest.approx(3.0), "other": pytest.approx(1.0)}
    assert [t["share"] for t in figures["top"]] == [pytest.approx(0.75), pytest.approx(0.25)]
    # On CUDA: the device's events alone, and not a user annotation's span over kernels counted already
    from benchmarks import profile_suite

    cuda = torch.autograd.DeviceType.CUDA
    events[:] = [types.SimpleNamespace(key="nvjet_hsh_128x256", count=3, device_type=cuda,
                                       self_device_time_total=3000.0, is_user_annotation=False),
                 types.SimpleNamespace(key="Optimizer.step#AdamW.step", count=3, device_type=cuda,
                                       self_device_time_total=3000.0, is_user_annotation=True),
                 types.SimpleNamespace(key="aten::mm", count=3, device_type=torch.autograd.DeviceType.CPU,
                                       self_device_time_total=0.0, is_user_annotation=False)]
    monkeypatch.setattr(profile_suite, "synchronize", lambda device: None)
    figures = profile_calls(lambda: None, torch.device("cuda"), calls=3, warmup=0)
    assert figures["device_ms_per_call"] == pytest.approx(1.0)
    assert [t["name"] for t in figures["top"]] == ["nvjet_hsh_128x256"]
