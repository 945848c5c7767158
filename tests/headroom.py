"""How close each tolerance check of a test run comes to failing: `pytest -p tests.headroom`.

A check whose error sits near its bound on some draws fails on others: the tests draw fresh random
inputs every run, so a margin seen once is a sample, not a guarantee. With this plugin loaded, every
check below records its ratio, error / bound (above 1 fails), and the run ends with the checks
nearest their bounds:

    torch.testing.assert_close    max |actual - expected| / (atol + rtol |expected|), finite elements
    tests/test_kernels.py         the same for its own assert_close (with its rounding allowance)
    sit_fast.parity.ParityReport  output, loss and largest gradient error / their tolerances, and the
                                  worst tensor's error / its yardstick bound (bf16)

`--headroom-out FILE` also writes every record as a JSON line (test, check, ratio, what), to gather
several runs; `--headroom-top N` sets how many rows the summary shows (default 15). Checks made in
the processes a test starts (torchrun, the CLIs) are not seen, nor plain `assert err < tol` lines.
A test built to fail a check (a broken kernel that parity must catch) records a ratio above 1 and
passes: read the ratios of passing checks against the test's intent.
"""
from __future__ import annotations

import functools
import json
import os

import pytest

_records: list[dict] = []
_current = {"test": None}


def record(check: str, ratio: float, what: str = "") -> None:
    _records.append({"test": _current["test"], "check": check, "ratio": ratio, "what": what})


def closeness(actual, expected, atol: float, rtol: float, extra=None) -> float | None:
    """max |actual - expected| / (atol + rtol |expected| + extra) over the elements where both are
    finite, in float64; None when no element is (or the bound is zero everywhere)."""
    import torch

    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    bound = atol + rtol * e.abs()
    if extra is not None:
        bound = bound + extra.detach().to("cpu", torch.float64)
    keep = torch.isfinite(a) & torch.isfinite(e) & (bound > 0)
    if not keep.any():
        return None
    return float(((a - e).abs() / bound)[keep].max())


def _tensors(value):
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors(item)]
    return []


def _watch_torch_assert_close() -> None:
    import torch.testing
    from torch.testing._comparison import default_tolerances

    original = torch.testing.assert_close

    @functools.wraps(original)
    def assert_close(actual, expected, *args, **kwargs):
        rtol, atol = kwargs.get("rtol"), kwargs.get("atol")
        for a, e in zip(_tensors(actual), _tensors(expected)):
            if not a.is_floating_point() or a.shape != e.shape:
                continue
            r, t = (rtol, atol) if rtol is not None and atol is not None else default_tolerances(a, e)
            ratio = closeness(a, e, t, r)
            if ratio is not None:
                record("assert_close", ratio, f"{a.dtype} {tuple(a.shape)}, atol {t:g}, rtol {r:g}")
        return original(actual, expected, *args, **kwargs)

    torch.testing.assert_close = assert_close


def _watch_parity_reports() -> None:
    from sit_fast import parity

    original = parity.ParityReport.failures

    @functools.wraps(original)
    def failures(self):
        tol = self.tolerances()
        for name, value in (("output", self.output_rel_err), ("loss", self.loss_rel_err),
                            ("grad", self.grad_rel_err_max)):
            record(f"parity {name}", value / tol[name], self.dtype)
        if self.yardstick is not None:
            ratios = [(r["rel_err"] / (parity.YARDSTICK_FACTOR * self.yardstick[r["tensor"]] + parity.YARDSTICK_FLOOR),
                       r["tensor"]) for r in self.rows if r["tensor"] != "loss"]
            ratio, tensor = max(ratios)
            record("parity yardstick", ratio, f"{self.dtype} {tensor}")
        return original(self)

    parity.ParityReport.failures = failures


def _watch_kernel_assert_close(module) -> None:
    original = module.assert_close
    if getattr(original, "_headroom", False):
        return

    @functools.wraps(original)
    def assert_close(what, ours, ref, tol, extra=None):
        ratio = closeness(ours, ref, tol.atol, tol.rtol, extra) if ours.shape == ref.shape else None
        if ratio is not None:
            record("kernel assert_close", ratio, what)
        return original(what, ours, ref, tol, extra)

    assert_close._headroom = True
    module.assert_close = assert_close


def pytest_addoption(parser):
    group = parser.getgroup("headroom")
    group.addoption("--headroom-out", default=None, help="append every check's ratio to this file (JSON lines)")
    group.addoption("--headroom-top", type=int, default=15, help="rows of the closest checks in the summary")


def pytest_configure(config):
    _watch_torch_assert_close()
    _watch_parity_reports()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _current["test"] = item.nodeid
    module = getattr(item, "module", None)
    if module is not None and module.__name__.split(".")[-1] == "test_kernels" and hasattr(module, "assert_close"):
        _watch_kernel_assert_close(module)


def pytest_terminal_summary(terminalreporter, config):
    out = config.getoption("--headroom-out")
    if out:
        with open(out, "a") as f:
            for r in _records:
                f.write(json.dumps(r) + "\n")
    top = config.getoption("--headroom-top")
    closest = sorted(_records, key=lambda r: -r["ratio"])[:top]
    terminalreporter.section("headroom")
    terminalreporter.write_line(f"{len(_records)} tolerance checks; the {len(closest)} nearest their bounds "
                                f"(error / bound; above 1 fails):")
    for r in closest:
        terminalreporter.write_line(f"{r['ratio']:8.3f}  {r['check']:<19} {r['test']}  {r['what']}")
    if out:
        terminalreporter.write_line(f"all {len(_records)} records appended to {os.path.abspath(out)}")
