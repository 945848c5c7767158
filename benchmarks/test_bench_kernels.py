"""pytest-benchmark timings of each fused op's forward vs the eager reference, on tiny shapes.

    pytest benchmarks/test_bench_kernels.py                 # CPU: "ours" runs in the Triton interpreter
    pytest benchmarks/test_bench_kernels.py --benchmark-only

Shapes and inputs come from benchmarks.kernels_suite, the reference from kernels.reference.
"""
import pytest
import torch

import kernels
from benchmarks.kernels_suite import OPS, SIZES, make_inputs
from kernels import reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TINY = SIZES["tiny"]


def _synchronized(fn):
    def call(*args):
        out = fn(*args)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return out
    return call


@pytest.mark.parametrize("variant", ["reference", "ours"])
@pytest.mark.parametrize("op", OPS)
def test_bench_kernel_fwd(benchmark, op, variant):
    if variant == "ours" and not kernels.kernels_available(DEVICE):
        pytest.skip(f"fused kernels cannot run on {DEVICE} (CPU needs TRITON_INTERPRET=1)")
    fn = getattr(kernels if variant == "ours" else reference, op)
    args = make_inputs(op, TINY.B, TINY.T, TINY.D, TINY.dtype, DEVICE)
    benchmark.group = f"{op}.fwd"
    with torch.no_grad():
        out = benchmark(_synchronized(fn), *args)
        expected = getattr(reference, op)(*(a.double() for a in args))  # float64: the reference is checked too
    outs = out if isinstance(out, tuple) else (out,)
    expected = expected if isinstance(expected, tuple) else (expected,)
    for o, e in zip(outs, expected):
        torch.testing.assert_close(o.double(), e, atol=1e-5, rtol=1e-5)
