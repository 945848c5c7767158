"""tests/headroom.py, the plugin that reports how near each tolerance check comes to failing."""
import json
import os
import subprocess
import sys
import textwrap

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHECKS = """
import pytest
import torch

from sit_fast.parity import TOLERANCES, ParityReport


def test_half_the_bound():
    torch.testing.assert_close(torch.tensor([1.0, 2.0], dtype=torch.float64),
                               torch.tensor([1.0, 2.0005], dtype=torch.float64), atol=1e-3, rtol=0)


def test_three_times_the_bound_fails():
    with pytest.raises(AssertionError):
        torch.testing.assert_close(torch.tensor([0.0]), torch.tensor([3e-3]), atol=1e-3, rtol=0)


def test_a_quarter_of_the_parity_tolerances():
    tol = TOLERANCES["fp32"]
    rows = [{"tensor": name, "max_abs": 0.0, "rel_err": tol[key] / 4}
            for name, key in (("output", "output"), ("loss", "loss"), ("grad:w", "grad"))]
    assert ParityReport(rows, "fp32", compiled=False).ok()
"""


def test_headroom_reports_each_checks_error_over_its_bound(tmp_path):
    (tmp_path / "test_checks.py").write_text(textwrap.dedent(CHECKS))
    out = tmp_path / "headroom.jsonl"
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.headroom", "--headroom-out", str(out),
         "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path / "test_checks.py")],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    ratios = {(r["test"].split("::")[-1], r["check"]): r["ratio"] for r in records}
    assert len(records) == 5, records
    assert abs(ratios["test_half_the_bound", "assert_close"] - 0.5) < 1e-6
    assert abs(ratios["test_three_times_the_bound_fails", "assert_close"] - 3.0) < 1e-6
    for name in ("output", "loss", "grad"):
        assert abs(ratios["test_a_quarter_of_the_parity_tolerances", f"parity {name}"] - 0.25) < 1e-9
    summary = proc.stdout[proc.stdout.index("headroom"):]
    assert "5 tolerance checks" in summary
    lines = [line for line in summary.splitlines() if "test_checks.py::" in line]
    assert lines[0].split()[:2] == ["3.000", "assert_close"], summary  # the nearest (here over) first
