"""pytest-benchmark timings of one training step and one sampling step of the tiny model, per variant.

    pytest benchmarks/test_bench_steps.py --benchmark-only     # CPU: "ours" runs in the Triton interpreter
    pytest benchmarks --benchmark-only                          # with the kernel microbenchmarks

The steps are the suites' own: benchmarks.train_suite.make_step (transport loss, backward, AdamW)
and one Euler ODE step through sample.py's guided forward (benchmarks.sample_suite.build_forwards),
on the shared weights of benchmarks.common.ModelFactory. The whole-model figures (SiT-XL/2, MFU,
memory) come from `python -m benchmarks`; these are for quick before/after comparisons.
"""
import pytest
import torch

from benchmarks.common import SIZES, VARIANTS, ModelFactory, synchronize
from benchmarks.sample_suite import CFG_SCALE, build_forwards
from benchmarks.train_suite import make_step

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TINY = SIZES["tiny"]()
BATCH = 2
ROUNDS = 20 if DEVICE.type == "cuda" else 3  # the interpreter makes a CPU "ours" step take about a second


@pytest.fixture(scope="module")
def models():
    return ModelFactory(TINY, DEVICE, compile_backend="inductor" if DEVICE.type == "cuda" else "eager")


def _inputs():
    kw = TINY.model_kwargs
    x = torch.randn(BATCH, kw["in_channels"], kw["input_size"], kw["input_size"], device=DEVICE)
    y = torch.randint(0, kw["num_classes"], (BATCH,), device=DEVICE)
    return x, y


def _synchronized(fn):
    def call():
        out = fn()
        synchronize(DEVICE)
        return out

    return call


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_bench_train_step(benchmark, models, variant):
    from sit_fast.transport import create_transport

    model = models.build(variant)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0, fused=DEVICE.type == "cuda")
    x1, y = _inputs()
    step = make_step(model, optimizer, create_transport("Linear", "velocity"), x1, y, variant, DEVICE)
    before = model.final_layer.linear.weight.detach().clone()
    benchmark.group = "train_step (tiny)"
    benchmark.pedantic(_synchronized(step), rounds=ROUNDS, warmup_rounds=1)  # warm-up: compilation
    assert not torch.equal(before, model.final_layer.linear.weight), "the optimizer step changed nothing"


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_bench_sampling_step(benchmark, models, variant):
    """One Euler step of the probability-flow ODE with guidance: one guided forward over 2 x BATCH."""
    from sit_fast.transport import Sampler, create_transport

    _, denoiser = build_forwards(models, variant)
    sample_fn = Sampler(create_transport("Linear", "velocity")).sample_ode(sampling_method="euler", num_steps=1)
    z, y = _inputs()

    def sampling_step():
        with torch.no_grad():
            return sample_fn(z, denoiser.for_labels(y))[-1]

    benchmark.group = f"sampling_step cfg {CFG_SCALE} (tiny)"
    out = benchmark.pedantic(_synchronized(sampling_step), rounds=ROUNDS, warmup_rounds=1)
    assert out.shape == z.shape and torch.isfinite(out).all()
