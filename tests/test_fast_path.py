"""The fast SiT path (fused kernels, SDPA, one-GEMM modulation, torch.compile) against the reference.

On the CPU the fused kernels run through the Triton interpreter (conftest.py switches it on);
with CUDA the same tests run natively.
"""
import functools
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import sit_fast.models as models
from sit_fast.flops import (attention_flops, forward_flops, mfu, peak_key, peak_tflops, peak_tflops_from_env,
                            train_step_flops)
from sit_fast.memory import activation_bytes_per_image
from sit_fast.models import SiT, SiT_models
from sit_fast.parity import TOLERANCES, _errors, compare, random_inputs, randomize_zero_init_

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_SLOW_ON_CPU = () if DEVICE == "cuda" else (pytest.mark.slow,)
slow_on_cpu = pytest.mark.slow if DEVICE != "cuda" else (lambda test: test)

# The fp32 tests' bounds on the CPU, tighter than TOLERANCES["fp32"] (which also serves SiT-XL on a GPU,
# and the benchmark suite): these small models' rounding errors stay below 2e-7 (outputs) and 5e-7
# (gradients), and a LayerNorm eps of 1e-5 for 1e-6 in the fast path's ops moves them to 4e-6 and 1e-5
# and more, inside TOLERANCES["fp32"] (test_a_wrong_layernorm_eps_fails_fp32_parity).
FP32_BOUNDS = {"output": 1e-6, "grad": 5e-6} if DEVICE == "cpu" else TOLERANCES["fp32"]

CONFIGS = {
    # head dim 72 as in SiT-XL; learn_sigma both ways; patch 2 and 4
    "hd72-sigma": dict(input_size=8, patch_size=2, hidden_size=144, depth=2, num_heads=2, learn_sigma=True),
    "hd16-nosigma": dict(input_size=8, patch_size=4, hidden_size=64, depth=3, num_heads=4, learn_sigma=False),
}


def pair(config, zero_init_std=0.02, **fast):
    reference = randomize_zero_init_(SiT(num_classes=10, **CONFIGS[config]), std=zero_init_std)
    options = dict(attn_backend="sdpa", fused_kernels=True)
    options.update(fast)
    candidate = SiT(num_classes=10, **CONFIGS[config], **options)
    return reference, candidate


def check(report):
    assert report.ok(), "\n".join(report.failures()) + "\n" + report.to_markdown()


@pytest.mark.parametrize("config", list(CONFIGS))
def test_fast_fp32_matches_reference(config):
    reference, candidate = pair(config)
    report = compare(reference, candidate, batch_size=3, device=DEVICE, no_grad=True)
    check(report)
    tol = FP32_BOUNDS
    assert report.output_rel_err <= tol["output"] and report.grad_rel_err_max <= tol["grad"], report.to_markdown()


def test_compare_gives_back_the_models_training_flags_and_gradients():
    """compare() left both models in eval mode and their .grad filled with its own loss's gradients: each
    module's flag and each parameter's .grad (a tensor, or None) are as they were."""
    reference, candidate = pair(next(iter(CONFIGS)))
    reference.train()
    candidate.train()
    candidate.blocks[0].eval()  # a submodule's own flag, not the model's
    marker = torch.full_like(reference.x_embedder.proj.weight, 7.0)
    reference.x_embedder.proj.weight.grad = marker
    report = compare(reference, candidate, batch_size=2, device=DEVICE)
    assert report.rows and reference.training and candidate.training and not candidate.blocks[0].training
    assert all(module.training for module in reference.modules())
    assert reference.x_embedder.proj.weight.grad is marker and bool((marker == 7.0).all())
    assert [n for n, p in reference.named_parameters() if p.grad is not None] == ["x_embedder.proj.weight"]
    assert all(p.grad is None for p in candidate.parameters())


def test_compare_refuses_a_precision_it_has_no_bounds_for():
    """fp16 autocast is not bf16: held to bf16's bounds (about 20 times fp16's rounding) and labelled
    bf16, a 4% gradient error passed."""
    reference, candidate = pair(list(CONFIGS)[0])
    with pytest.raises(ValueError, match=r"^autocast_dtype must be None, torch.float32 or torch.bfloat16, got "
                                         r"torch.float16$"):
        compare(reference, candidate, batch_size=2, autocast_dtype=torch.float16, device=DEVICE)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_fast_bf16_autocast_close_to_fp32_reference(config):
    """Within the absolute bf16 bounds, and each error within 3x the reference's own in bf16."""
    reference, candidate = pair(config, zero_init_std=0.3)  # blocks most of the output (0.02: 3%)
    report = compare(reference, candidate, batch_size=3, autocast_dtype=torch.bfloat16, device=DEVICE, yardstick=True,
                     no_grad=True)
    assert report.yardstick is not None and report.yardstick["output"] > 0
    assert report.yardstick["output_no_grad"] > 0
    check(report)


def test_bf16_yardstick_catches_what_the_absolute_bound_lets_through():
    """A backward bug of 5% in one gradient: inside the bf16 absolute bound (1e-1), outside the
    yardstick's (3x the reference's own bf16 error, about 1%, + 1e-3)."""
    reference, candidate = pair("hd16-nosigma")
    candidate.blocks[1].attn.qkv.weight.register_hook(lambda g: g * 1.05)
    report = compare(reference, candidate, batch_size=3, autocast_dtype=torch.bfloat16, device=DEVICE, yardstick=True)
    assert report.grad_rel_err_max <= TOLERANCES["bf16"]["grad"]
    assert [f.split(":")[1] for f in report.failures()] == ["blocks.1.attn.qkv.weight"], report.failures()
    assert "reference's own" in report.to_markdown()


def test_fast_forward_with_cfg():
    reference, candidate = pair("hd72-sigma")
    check(compare(reference, candidate, batch_size=4, cfg_scale=4.0, device=DEVICE, no_grad=True))


def _tanh_gelu_addmm(calls):
    """torch._addmm_activation's CUDA maths (GELU in its tanh form) for the CPU, counting calls."""
    def addmm_gelu(bias, mat1, mat2):
        calls.append((tuple(mat1.shape), tuple(mat2.shape), mat1.dtype))
        return torch.nn.functional.gelu(torch.addmm(bias, mat1, mat2), approximate="tanh")
    return addmm_gelu


@pytest.mark.parametrize("autocast_dtype", [None, pytest.param(torch.bfloat16, marks=_SLOW_ON_CPU)],
                         ids=["fp32", "bf16"])
def test_gelu_epilogue_runs_where_no_gradient_flows(monkeypatch, autocast_dtype):
    """The fast path's MLP takes fc1's GELU in the matmul epilogue exactly where no gradient goes
    through fc1: once per block in a no-grad forward, never while training, nor for the likelihood's
    input gradient; its output matches the reference's. On the CPU the epilogue is stood in for
    (torch._addmm_activation's CPU GELU is the erf form): this checks the plumbing (shapes, casts,
    where it applies); test_gelu_epilogue_on_cuda_is_the_tanh_gelu checks the CUDA matmul."""
    calls = []
    monkeypatch.setattr(models, "_GELU_EPILOGUE_DEVICES", ("cpu", "cuda"))
    monkeypatch.setattr(models, "_addmm_gelu", _tanh_gelu_addmm(calls))
    reference, candidate = pair("hd72-sigma", zero_init_std=0.3)
    report = compare(reference, candidate, batch_size=3, autocast_dtype=autocast_dtype, device=DEVICE,
                     yardstick=autocast_dtype is not None, no_grad=True)
    check(report)
    depth, hidden = candidate.depth, candidate.blocks[0].mlp.fc1.out_features
    tokens = 3 * candidate.x_embedder.num_patches
    assert calls == [((tokens, candidate.hidden_size), (candidate.hidden_size, hidden),
                      autocast_dtype or torch.float32)] * depth
    calls.clear()
    candidate.requires_grad_(False)
    x, t, y, _ = random_inputs(candidate, 3, DEVICE, torch.Generator().manual_seed(0))
    torch.autograd.grad(candidate(x.requires_grad_(), t, y).sum(), x)  # the likelihood's case
    assert calls == []
    with torch.no_grad():
        candidate(x, t, y)
    assert len(calls) == depth
    monkeypatch.setattr(models, "_GELU_EPILOGUE", False)  # SIT_FAST_GELU_EPILOGUE=0
    with torch.no_grad():
        candidate(x, t, y)
    assert len(calls) == depth


def test_gelu_epilogue_setting_is_checked(monkeypatch):
    monkeypatch.setattr(models, "_TRITON_INTERPRET", True)
    monkeypatch.setattr(models, "_GELU_EPILOGUE", None)
    monkeypatch.setenv("SIT_FAST_GELU_EPILOGUE", "yes")
    with pytest.raises(ValueError, match="SIT_FAST_GELU_EPILOGUE='yes': set 1 .* or 0"):
        models.resolve_fused_kernels("auto", torch.device("cpu"))
    assert models.resolve_fused_kernels(False, torch.device("cpu")) is False  # nothing to set without the kernels
    for fused in (True, "auto"):  # a model built in Python, not through the scripts' flag, says it too
        with pytest.raises(ValueError, match="SIT_FAST_GELU_EPILOGUE='yes': set 1 .* or 0"):
            SiT(input_size=4, patch_size=2, in_channels=1, hidden_size=16, depth=1, num_heads=2, num_classes=2,
                fused_kernels=fused)
    SiT(input_size=4, patch_size=2, in_channels=1, hidden_size=16, depth=1, num_heads=2, num_classes=2)


def test_gelu_epilogue_s_own_code_on_the_cpu_is_the_linear_and_its_gelu():
    """linear_gelu_epilogue's real body (not the stand-in above): the linear layer with its bias and a
    GELU, on the CPU the erf form, which torch._addmm_activation takes there (float64, exact to
    round-off); whether CUDA's is the tanh form, the next test says where there is a GPU."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 12, generator=generator, dtype=torch.float64)
    weight = torch.randn(20, 12, generator=generator, dtype=torch.float64)
    bias = torch.randn(20, generator=generator, dtype=torch.float64)
    out = models.linear_gelu_epilogue(x, weight.float(), bias.float())  # cast to x's dtype, as autocast would
    assert out.shape == (2, 5, 20) and out.dtype == torch.float64
    linear = torch.nn.functional.linear(x, weight.float().double(), bias.float().double())
    torch.testing.assert_close(out, torch.nn.functional.gelu(linear), atol=1e-12, rtol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the cuBLASLt epilogue runs on CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gelu_epilogue_on_cuda_is_the_tanh_gelu(monkeypatch, dtype):
    """linear_gelu_epilogue on CUDA against F.gelu(F.linear(...), approximate="tanh") in float64,
    at SiT-S's width and a prime token count (each within the unfused form's own error, bf16: x2)."""
    frozen = torch.nn.Linear(2, 2).cuda().requires_grad_(False)
    assert models.gelu_epilogue_applies(torch.empty(1, device="cuda"), frozen.weight, frozen.bias) is (
        models._GELU_EPILOGUE is not False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # fp32: the erf form (up to 5e-4 off) fails
    x = torch.randn(3, 67, 384, device="cuda", dtype=dtype)
    weight = torch.randn(1536, 384, device="cuda", dtype=dtype) / 384 ** 0.5
    bias = torch.randn(1536, device="cuda", dtype=dtype)
    expected = torch.nn.functional.gelu(torch.nn.functional.linear(x.double(), weight.double(), bias.double()),
                                        approximate="tanh")
    unfused = torch.nn.functional.gelu(torch.nn.functional.linear(x, weight, bias), approximate="tanh")
    out = models.linear_gelu_epilogue(x, weight, bias)
    assert out.shape == expected.shape and out.dtype == dtype
    own = (unfused.double() - expected).abs().max().item()
    err = (out.double() - expected).abs().max().item()
    assert err <= (2 * own if dtype == torch.bfloat16 else 1e-4), (err, own)


def test_fast_with_grad_checkpointing():
    config = dict(CONFIGS["hd16-nosigma"], class_dropout_prob=0.0)  # training mode without label dropout
    reference = randomize_zero_init_(SiT(num_classes=10, **config))
    candidate = SiT(num_classes=10, attn_backend="sdpa", fused_kernels=True, grad_checkpointing=True, **config)
    candidate.eval = lambda: candidate  # checkpointing applies in training mode: keep it inside compare()
    candidate.train()
    check(compare(reference, candidate, batch_size=2, device=DEVICE))


_ONE_PER_AXIS = _SLOW_ON_CPU  # 20-30 s each on the CPU: by default two cases
# there, which still take each way of compiling and each dtype once; all four on CUDA and with -m slow


@pytest.mark.spread
@pytest.mark.parametrize("whole_model, autocast_dtype", [
    pytest.param(False, None, id="blocks-fp32"),
    pytest.param(False, torch.bfloat16, id="blocks-bf16", marks=_ONE_PER_AXIS),
    pytest.param(True, None, id="model-fp32", marks=_ONE_PER_AXIS),
    pytest.param(True, torch.bfloat16, id="model-bf16"),
])
def test_compiled_fast_path_fullgraph(whole_model, autocast_dtype):
    """fullgraph=True raises on any graph break, so passing proves there are none (where a graph was
    compiled at all: counted). bf16: as train.py and sample.py run it (compiled under autocast), held
    to the yardstick."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    reference, candidate = pair("hd72-sigma")
    if whole_model:
        compiled = torch.compile(candidate, fullgraph=True)
        candidate_for_compare = _CompiledView(candidate, compiled)
    else:
        candidate_for_compare = candidate.compile_blocks()
    check(compare(reference, candidate_for_compare, batch_size=2, device=DEVICE, compiled=True,
                  autocast_dtype=autocast_dtype, yardstick=True))
    assert counters["stats"]["unique_graphs"] >= 1


class _CompiledView(torch.nn.Module):
    """Runs a compiled callable while exposing the original module's parameters and attributes."""

    def __init__(self, module, compiled):
        super().__init__()
        self.module = module
        self._compiled = compiled

    def forward(self, x, t, y):
        return self._compiled(x, t, y)

    def load_state_dict(self, state_dict, strict=True):
        return self.module.load_state_dict(state_dict, strict)

    def named_parameters(self, *args, **kwargs):
        return self.module.named_parameters(*args, **kwargs)


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=[pytest.mark.spread, *_SLOW_ON_CPU])])
def test_frozen_model_input_gradient_matches_reference(compiled):
    """The likelihood's divergence: a frozen model (sample.py's, no parameter needs a gradient)
    differentiated with respect to its input, eager and compiled (30 s on the CPU: slow; the kernel
    tests compile a frozen block by default). The fused gated ops then skip dgate and keep no sublayer
    output for backward; the vector-Jacobian product is still the reference's."""
    torch._dynamo.reset()
    # gates of 0.3, not 0.02: with small gates the residual's identity path dominates the input
    # gradient, and a wrong GELU derivative in the MLP's backward stayed inside the tolerance
    reference, candidate = pair("hd72-sigma", zero_init_std=0.3)
    candidate.load_state_dict(reference.state_dict())
    for model in (reference, candidate):
        model.to(DEVICE).eval().requires_grad_(False)
    forward = torch.compile(candidate, fullgraph=True) if compiled else candidate
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
    x, t, y, _ = random_inputs(reference, 3, DEVICE, generator)
    probe = torch.randint(0, 2, x.shape, generator=generator).to(DEVICE) * 2.0 - 1  # the output's shape
    vjps, outs = [], []
    for model in (reference, forward):
        x_in = x.clone().requires_grad_()
        out = model(x_in, t, y)
        (vjp,) = torch.autograd.grad(out, x_in, probe)
        outs.append(out.detach())
        vjps.append(vjp)
    tol = TOLERANCES["fp32"]
    output_err = _errors("output", outs[1], outs[0])["rel_err"]
    vjp_err = _errors("vjp", vjps[1], vjps[0])["rel_err"]
    assert output_err <= tol["output_compiled" if compiled else "output"], output_err
    assert vjp_err <= tol["grad"], vjp_err


def test_fast_likelihood_matches_reference():
    """The likelihood (probability-flow ODE with Hutchinson's divergence, 3 Euler steps) of a frozen
    fast model equals the reference's, from the same weights, data and probe."""
    from sit_fast.transport import Sampler, create_transport

    reference, candidate = pair("hd16-nosigma")
    candidate.load_state_dict(reference.state_dict())
    for model in (reference, candidate):
        model.to(DEVICE).eval().requires_grad_(False)
    likelihood = Sampler(create_transport("Linear", "velocity")).sample_ode_likelihood(
        sampling_method="euler", num_steps=3)
    x, y = torch.randn(2, 4, 8, 8, device=DEVICE), torch.randint(0, 10, (2,), device=DEVICE)
    seed = int(torch.randint(0, 2**31, ()).item())
    results = []
    for model in (reference, candidate):
        # the same probe, and the global generators (the probe's device's among them) left as they were
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if DEVICE == "cuda" else []):
            torch.manual_seed(seed)
            results.append(likelihood(x, model, y=y))
    (logp_ref, z_ref), (logp, z) = results
    torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logp, logp_ref, rtol=1e-5, atol=1e-3)  # log p of 256 dims: about -400


@pytest.mark.parametrize("trainable", [("a", "bias_a", "weight", "bias"), ("a",), ("bias_a",), ("weight",), ("bias",),
                                       ("a", "bias"), ("bias_a", "weight")])
def test_gelu_linear_computes_only_the_gradients_asked_for(trainable):
    """gelu_linear (the fast path's MLP after fc1's matmul, GELU recomputed in backward) against
    fc2(GELU(a + bias_a)) in float64: each gradient asked for matches, and backward runs only the
    GEMMs those need: a frozen MLP (the likelihood's case) one, not two."""
    N, hidden, out_features = 10, 16, 8
    inputs = {"a": torch.randn(2, N // 2, hidden, device=DEVICE), "bias_a": torch.randn(hidden, device=DEVICE),
              "weight": torch.randn(out_features, hidden, device=DEVICE),
              "bias": torch.randn(out_features, device=DEVICE)}
    ours = {name: t.clone().requires_grad_(name in trainable) for name, t in inputs.items()}
    ref = {name: t.double().requires_grad_(name in trainable) for name, t in inputs.items()}
    out = models.gelu_linear(*ours.values())
    grad_out = torch.randn_like(out)
    with FlopCounterMode(display=False) as counter:
        grads = torch.autograd.grad(out, [ours[name] for name in trainable], grad_out)
    ref_out = torch.nn.functional.linear(torch.nn.functional.gelu(ref["a"] + ref["bias_a"], approximate="tanh"),
                                         ref["weight"], ref["bias"])
    ref_grads = torch.autograd.grad(ref_out, [ref[name] for name in trainable], grad_out.double())
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    for name, grad, ref_grad in zip(trainable, grads, ref_grads):
        torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-5, msg=f"d{name}")
    # grad_out @ w for da and dbias_a; grad_out^T @ GELU(a + bias_a) for dw
    gemms = ("a" in trainable or "bias_a" in trainable) + ("weight" in trainable)
    assert counter.get_total_flops() == gemms * 2 * N * out_features * hidden


@pytest.mark.parametrize("mode", ["func.jvp", "forward_ad"])
def test_the_fast_mlp_refuses_forward_mode_ad(mode):
    """A tangent into the fast path's MLP (its custom ops have no forward-mode formula) is refused, as the
    adaLN ops refuse theirs, rather than dropped: a whole model's JVP with tangents on the MLPs' weights
    alone came back zero."""
    import kernels

    mlp = models.Mlp(16, 64).to(DEVICE)
    x = torch.randn(2, 3, 16, device=DEVICE, requires_grad=True)  # a gradient flows: no GELU epilogue on CUDA
    weight, tangent = mlp.fc1.weight.detach(), torch.randn_like(mlp.fc1.weight)

    def fast(w):
        return torch.func.functional_call(mlp, {"fc1.weight": w}, (x,), {"fast": True})

    with pytest.raises(NotImplementedError, match=r"^gelu_linear: forward-mode AD .* a \(2, 3, 64\) carries a "):
        if mode == "func.jvp":
            torch.func.jvp(fast, (weight,), (tangent,))
        else:
            with torch.autograd.forward_ad.dual_level():
                fast(torch.autograd.forward_ad.make_dual(weight, tangent))
    a, bias = torch.randn(4, 64, device=DEVICE), torch.randn(64, device=DEVICE)
    with pytest.raises(NotImplementedError, match=r"^bias_gelu: forward-mode AD .* bias \(64,\) carries a "):
        torch.func.jvp(lambda b: kernels.bias_gelu(a, b), (bias,), (torch.randn_like(bias),))
    reference = torch.func.jvp(lambda w: torch.func.functional_call(mlp, {"fc1.weight": w}, (x,)), (weight,),
                               (tangent,))[1]
    assert reference.abs().max() > 0  # the reference MLP carries it


@pytest.mark.parametrize("frozen", [False, True], ids=["trained", "frozen"])
def test_fast_backward_does_the_references_matmuls(frozen):
    """Backward FLOPs (GEMMs and attention) of the fast path equal the reference's, for a training
    step and for the likelihood's frozen model differentiated with respect to its input, where
    neither may compute a parameter gradient."""
    flops = []
    for options in (dict(attn_backend="sdpa"), dict(attn_backend="sdpa", fused_kernels=True)):
        model = randomize_zero_init_(SiT(num_classes=10, **CONFIGS["hd72-sigma"], **options))
        model.to(DEVICE).eval().requires_grad_(not frozen)
        x = torch.randn(1, 4, 8, 8, device=DEVICE, requires_grad=True)
        out = model(x, torch.rand(1, device=DEVICE), torch.randint(0, 10, (1,), device=DEVICE))
        wrt = [x] + [p for p in model.parameters() if p.requires_grad]
        with FlopCounterMode(display=False) as counter:
            torch.autograd.grad(out, wrt, torch.randn_like(out), allow_unused=True)
        flops.append(counter.get_total_flops())
    reference, fast = flops
    assert fast == reference > 0, flops


def test_upstream_checkpoint_gives_same_outputs_in_fast_and_reference(tmp_path):
    from sit_fast.checkpoint import load_checkpoint

    source = randomize_zero_init_(SiT(num_classes=10, **CONFIGS["hd72-sigma"]))
    torch.save(source.state_dict(), tmp_path / "upstream.pt")
    reference, candidate = pair("hd72-sigma")
    load_checkpoint(reference, tmp_path / "upstream.pt")
    load_checkpoint(candidate, tmp_path / "upstream.pt")
    for model in (reference, candidate):
        model.to(DEVICE).eval()
    x = torch.randn(2, 4, 8, 8, device=DEVICE)
    t, y = torch.rand(2, device=DEVICE), torch.tensor([3, 7], device=DEVICE)
    with torch.no_grad():
        ref, out = reference(x, t, y), candidate(x, t, y)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel <= FP32_BOUNDS["output"], rel


def test_a_wrong_layernorm_eps_fails_fp32_parity(monkeypatch):
    """The fast path's ops with a LayerNorm eps of 1e-5 (the reference's is 1e-6, as upstream's): within
    TOLERANCES["fp32"], outside the fp32 tests' bounds."""
    reference, candidate = pair("hd72-sigma")
    broken = {name: functools.partial(op, eps=1e-5) if "layernorm" in name else op
              for name, op in models.fused_ops(torch.float32).items()}
    monkeypatch.setattr(models, "fused_ops", lambda dtype: broken)
    report = compare(reference, candidate, batch_size=3, device=DEVICE)
    assert report.output_rel_err > FP32_BOUNDS["output"] or report.grad_rel_err_max > FP32_BOUNDS["grad"], \
        report.to_markdown()


def test_broken_candidate_fails_parity(monkeypatch):
    """The harness must catch a real bug: here a LayerNorm eps of 1e-1 in the candidate's ops."""
    reference, candidate = pair("hd16-nosigma")
    broken = dict(models.REFERENCE_OPS)
    good = broken["gated_residual_layernorm_modulate"]
    broken["gated_residual_layernorm_modulate"] = lambda x, g, y, sh, sc: good(x, g, y, sh, sc, eps=1e-1)
    monkeypatch.setattr(models, "fused_ops", lambda dtype: broken)  # the candidate runs fused_kernels=True
    report = compare(reference, candidate, batch_size=2, device=DEVICE)
    assert not report.ok()
    assert any(f.startswith("output") for f in report.failures())


def test_randomize_zero_init_ignores_the_default_device():
    """benchmarks.common.ModelFactory calls it under `with torch.device("cuda")`, where a bare
    randn(..., generator=<CPU generator>) is a CUDA call and raises; "meta" shows the same here."""
    model = SiT(num_classes=10, **CONFIGS["hd16-nosigma"])
    expected = randomize_zero_init_(SiT(num_classes=10, **CONFIGS["hd16-nosigma"]), seed=3)
    with torch.device("meta"):
        randomize_zero_init_(model, seed=3)
    final = model.final_layer.linear.weight
    assert final.device.type == "cpu" and torch.count_nonzero(final) > 0
    assert torch.equal(final, expected.final_layer.linear.weight)


def test_activation_memory_fast_path_xl2():
    """bf16 autocast, SiT-XL/2 at 256px: the fast path saves <= 60% of the reference's bytes."""
    with torch.device("meta"):
        reference = SiT_models["SiT-XL/2"](attn_backend="sdpa")
        fast = SiT_models["SiT-XL/2"](attn_backend="sdpa", fused_kernels=True)
    ref_bytes = activation_bytes_per_image(reference, torch.bfloat16)
    fast_bytes = activation_bytes_per_image(fast, torch.bfloat16)
    assert ref_bytes > 300e6  # ~400 MB per image: the measurement sees the whole network
    assert fast_bytes <= 0.60 * ref_bytes, (fast_bytes / 1e6, ref_bytes / 1e6)


def _saved_bytes_per_image(model, batch_sizes=(2, 4)) -> float:
    """Bytes of the distinct storages autograd keeps for backward per image, measured on a real
    training step under bf16 autocast (parameters excluded), from two batch sizes."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    totals = []
    for batch in batch_sizes:
        saved = {}

        def pack(t):
            if t.untyped_storage()._cdata not in params:
                saved[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
            return t

        x, t, y, _ = random_inputs(model, batch, DEVICE, torch.Generator().manual_seed(batch))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast(DEVICE, dtype=torch.bfloat16):
            out = model(x, t, y)
        out.float().sum().backward()
        totals.append(sum(saved.values()))
    return (totals[1] - totals[0]) / (batch_sizes[1] - batch_sizes[0])


@pytest.mark.spread
@slow_on_cpu  # 70 s on two cores
def test_compiled_fast_path_saves_what_its_count_says():
    """The fast path's blocks compiled (AOTAutograd's min-cut partitioner, as Inductor uses it) keep
    for backward what they keep eager, which on the CPU is the count sit_fast.memory gives, not more:
    traced through an autograd.Function, the MLP's GELU recompute was merged with the forward's GELU
    and its output saved as well, one (T, 4D) tensor per block and image beyond the count (on an H200,
    301.6 MB per image measured for SiT-XL/2 against a count of 233.4)."""
    torch._dynamo.reset()
    model = SiT(num_classes=10, attn_backend="sdpa", fused_kernels=True, **CONFIGS["hd72-sigma"]).to(DEVICE).train()
    eager = _saved_bytes_per_image(model)
    model.compile_blocks(backend="aot_eager_decomp_partition")
    _saved_bytes_per_image(model, (1, 2))  # compiles
    assert _saved_bytes_per_image(model) == eager
    if DEVICE == "cpu":  # the count is of the CPU's ops (CUDA's attention kernels save other tensors)
        with torch.device("meta"):
            counted = activation_bytes_per_image(
                SiT(num_classes=10, attn_backend="sdpa", fused_kernels=True, **CONFIGS["hd72-sigma"]),
                torch.bfloat16)
        assert eager == counted


def test_likelihood_activation_memory():
    """The likelihood's forward (frozen model, gradient with respect to the input) saves less than a
    training step's, and the fast path less than the reference: the gated kernels keep no y there."""
    with torch.device("meta"):
        reference = SiT_models["SiT-S/2"](attn_backend="sdpa")
        fast = SiT_models["SiT-S/2"](attn_backend="sdpa", fused_kernels=True)
    figures = {(name, frozen): activation_bytes_per_image(model, torch.bfloat16, frozen=frozen)
               for name, model in (("reference", reference), ("fast", fast)) for frozen in (False, True)}
    assert 0 < figures["fast", True] < figures["fast", False], figures
    assert 0 < figures["reference", True] < figures["reference", False], figures
    # 23 vs 28 MiB: one (B, T, D) bf16 tensor less per gated op than when the kernels kept y (27.5 MiB)
    assert figures["fast", True] <= 0.9 * figures["reference", True], figures


def test_flops_follow_the_mlp_ratio():
    model = SiT(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4, num_classes=10, mlp_ratio=2.0)
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.randint(0, 10, (2,)))
    assert counter.get_total_flops() == 2 * forward_flops(model)


def test_flops_match_flop_counter():
    for config in CONFIGS.values():
        model = SiT(num_classes=10, **config)
        x = torch.randn(3, 4, config["input_size"], config["input_size"])
        with FlopCounterMode(display=False) as counter:
            model(x, torch.rand(3), torch.randint(0, 10, (3,)))
        assert counter.get_total_flops() == 3 * forward_flops(model)
        # attention's products: whatever the counter saw beyond the linear layers and the convolution
        linear = {torch.ops.aten.addmm, torch.ops.aten.mm, torch.ops.aten.convolution}
        counts = counter.get_flop_counts()["Global"]
        assert sum(n for op, n in counts.items() if op not in linear) == 3 * attention_flops(model) > 0, counts
    with torch.device("meta"):
        xl = SiT_models["SiT-XL/2"]()
    assert forward_flops(xl) == pytest.approx(237e9, rel=0.01)
    assert train_step_flops(xl) == 3 * forward_flops(xl)
    # the dense peaks of NVIDIA's data sheets (H100 SXM, H100 PCIe, H200 SXM, H200 NVL), retyped from there
    assert peak_tflops("NVIDIA H100 80GB HBM3", torch.bfloat16) == pytest.approx(989.4)
    assert peak_tflops("NVIDIA H100 PCIe", torch.bfloat16) == pytest.approx(756.5)
    assert peak_tflops("NVIDIA H200", torch.float32, tf32=True) == pytest.approx(494.7)
    assert peak_tflops("NVIDIA H200", torch.float32) == pytest.approx(66.9)
    for dtype in (torch.bfloat16, torch.float16):  # tf32 changes the fp32 peak only
        assert peak_tflops("NVIDIA H100 80GB HBM3", dtype, tf32=True) == pytest.approx(989.4)
    assert peak_tflops("NVIDIA H200 NVL", torch.bfloat16) == pytest.approx(835.5)
    assert mfu(494.7e12, "NVIDIA H100 80GB HBM3", torch.bfloat16) == pytest.approx(0.5)
    assert mfu(1e12, "cpu", torch.float32) is None
    # whole-word names: a model number inside another, or a variant of it, is not that card
    names = {"NVIDIA A100-SXM4-80GB": "A100", "NVIDIA A10": "A10", "NVIDIA A40": "A40", "NVIDIA RTX A4000": None,
             "NVIDIA L40S": "L40S", "NVIDIA L40": "L40", "NVIDIA L4": "L4", "NVIDIA GH200 480GB": "GH200",
             "NVIDIA GeForce RTX 4090": "RTX 4090", "NVIDIA GeForce RTX 4090 D": None,
             "NVIDIA GeForce RTX 3090 Ti": None, "Tesla V100-SXM2-32GB": None, "NVIDIA H20": "H20",
             "NVIDIA H800 PCIe": "H800 PCIe", "NVIDIA H800": "H800", "NVIDIA A800-SXM4-80GB": "A800",
             "NVIDIA B200": "B200", "NVIDIA GB200": "GB200"}
    assert {name: peak_key(name) for name in names} == names


@pytest.mark.parametrize("value,expected", [(None, None), ("", None), ("  ", None), (" 312 ", 312.0), ("1.5e2", 150.0),
                                            ("0", ValueError), ("-5", ValueError), ("nan", ValueError),
                                            ("inf", ValueError), ("fast", ValueError)])
def test_peak_from_the_environment(monkeypatch, value, expected):
    """SIT_FAST_PEAK_TFLOPS: MFU for a GPU the table lacks; anything but a positive number is refused."""
    if value is None:
        monkeypatch.delenv("SIT_FAST_PEAK_TFLOPS", raising=False)
    else:
        monkeypatch.setenv("SIT_FAST_PEAK_TFLOPS", value)
    if expected is ValueError:
        with pytest.raises(ValueError, match=rf"SIT_FAST_PEAK_TFLOPS={value.strip()}: give the GPU's dense peak"):
            peak_tflops_from_env()
    else:
        assert peak_tflops_from_env() == expected
    # a given peak wins over the table, and gives an MFU where the table has none
    assert mfu(100e12, "NVIDIA H100 80GB HBM3", torch.bfloat16, peak=400.0) == pytest.approx(0.25)
    assert mfu(100e12, "NVIDIA RTX 6000 Ada Generation", torch.bfloat16) is None
    assert mfu(100e12, "NVIDIA RTX 6000 Ada Generation", torch.bfloat16, peak=364.25) == pytest.approx(100 / 364.25)


def test_fused_kernels_resolution(monkeypatch):
    cpu = torch.device("cpu")
    assert models._TRITON_IMPORTED  # triton is installed here
    monkeypatch.setattr(models, "_TRITON_INTERPRET", False)
    assert models.resolve_fused_kernels("auto", cpu) is False
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        models.resolve_fused_kernels(True, cpu)
    monkeypatch.setattr(models, "_TRITON_INTERPRET", True)
    assert models.resolve_fused_kernels("auto", cpu) is True
    assert models.resolve_fused_kernels("auto", torch.device("cuda")) is True
    monkeypatch.setattr(models, "_TRITON_IMPORTED", False)  # "auto" without triton: the reference ops
    assert models.resolve_fused_kernels("auto", torch.device("cuda")) is False
    assert models.resolve_fused_kernels("auto", cpu) is False
    # on, where they cannot run: said now, not at the first forward (after a checkpoint and a VAE loaded)
    monkeypatch.setattr(models.kernels, "_TRITON_IMPORT_ERROR", ImportError("No module named 'triton'"))
    with pytest.raises(ValueError, match=r"^fused_kernels=True: the kernels need triton, which failed to import \(No "
                                         r"module named 'triton'\): install triton, or use fused_kernels=False$"):
        models.resolve_fused_kernels(True, torch.device("cuda"))
    monkeypatch.setattr(models, "_TRITON_IMPORTED", True)
    for other in ("mps", "xpu"):
        with pytest.raises(ValueError, match=rf"^fused_kernels=True: the kernels run on CUDA GPUs \(and on the CPU "
                                             rf"through the Triton interpreter\), not on {other}: use"):
            models.resolve_fused_kernels(True, torch.device(other))
        assert models.resolve_fused_kernels("auto", torch.device(other)) is False
    for setting in ("yes", 1, 0):  # 1 == True, but the checks above ask `is True`
        with pytest.raises(ValueError, match="fused_kernels must be"):
            SiT(num_classes=10, fused_kernels=setting, **CONFIGS["hd16-nosigma"])


def test_fused_kernels_flag_auto_is_off_on_the_cpu_unless_the_caller_takes_it(monkeypatch):
    """The scripts' --fused-kernels auto leaves the CPU to the reference ops even where the Triton
    interpreter could run the kernels (a test tool, far slower), unless auto_on_cpu (the parity CLI)."""
    from sit_fast.errors import UserError

    cpu = torch.device("cpu")
    monkeypatch.setattr(models, "_TRITON_INTERPRET", True)
    assert models.fused_kernels_flag("auto", cpu) == (False, False)
    assert models.fused_kernels_flag("auto", cpu, auto_on_cpu=True) == ("auto", True)
    assert models.fused_kernels_flag("on", cpu) == (True, True)
    assert models.fused_kernels_flag("off", cpu) == (False, False)
    monkeypatch.setattr(models, "_TRITON_INTERPRET", False)
    assert models.fused_kernels_flag("auto", cpu, auto_on_cpu=True) == ("auto", False)
    with pytest.raises(UserError, match=r"^--fused-kernels on: on the CPU the kernels need the Triton "
                                        r"interpreter: .*, or use --fused-kernels off$"):
        models.fused_kernels_flag("on", cpu)


def test_auto_fused_kernels_leave_float64_to_the_reference_ops():
    """The kernels take fp32/bf16/fp16: a float64 model with "auto" runs the reference ops (the
    float64 checks of the maths); True refuses it, naming the way out."""
    generator = torch.Generator().manual_seed(0)
    auto = SiT(num_classes=10, fused_kernels="auto", **CONFIGS["hd16-nosigma"])
    auto = randomize_zero_init_(auto, seed=1).double().eval()
    reference = SiT(num_classes=10, fused_kernels=False, **CONFIGS["hd16-nosigma"]).double().eval()
    reference.load_state_dict(auto.state_dict())
    x = torch.randn(2, auto.in_channels, auto.input_size, auto.input_size, dtype=torch.float64, generator=generator)
    t, y = torch.rand(2, dtype=torch.float64, generator=generator), torch.tensor([1, 2])
    torch.testing.assert_close(auto(x, t, y), reference(x, t, y), rtol=0, atol=0)
    auto.fused_kernels = True
    with pytest.raises(ValueError, match="float64: use fused_kernels='auto'"):
        auto(x, t, y)


def test_activation_memory_needs_no_interpreter(monkeypatch):
    """Fake tensors never run a kernel: the fast path is measured on a CPU without the interpreter."""
    monkeypatch.setattr(models, "_TRITON_INTERPRET", False)
    with torch.device("meta"):
        fast = SiT(num_classes=10, attn_backend="sdpa", fused_kernels=True, **CONFIGS["hd16-nosigma"])
        reference = SiT(num_classes=10, attn_backend="sdpa", **CONFIGS["hd16-nosigma"])
    assert 0 < activation_bytes_per_image(fast, torch.bfloat16) < activation_bytes_per_image(reference, torch.bfloat16)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):  # outside the measurement, as before
        models.resolve_fused_kernels(True, torch.device("cpu"))


def test_memory_table_cli(capsys):
    """`python -m sit_fast.memory`: one row per model, every column filled, the columns in order."""
    from sit_fast.memory import main

    main(["--models", "SiT-S/2", "SiT-S/4"])
    lines = capsys.readouterr().out.strip().splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")] for line in lines[2:]}
    assert set(rows) == {"SiT-S/2", "SiT-S/4"} and all(len(row) == len(header) == 8 for row in rows.values())
    acts = [[float(cell.split()[0]) for cell in row[4:]] for row in rows.values()]
    for math_fp32, sdpa_fp32, sdpa_bf16, fast_bf16 in acts:  # each route saves less than the one before
        assert math_fp32 >= sdpa_fp32 > sdpa_bf16 > fast_bf16 > 0, acts


def test_memory_table_small_models_read_as_figures_and_one_row_per_model(capsys):
    """A small model's figures keep two significant digits (none reads as 0 MiB or 0.00 GiB), and a model
    named twice is one row."""
    from sit_fast.memory import main, size_text

    assert [size_text(n, "MiB") for n in (0, 0.25 * 2**20, 4.26 * 2**20, 12.4 * 2**20)] == ["0", "0.25", "4.3", "12"]
    assert [size_text(n, "GiB") for n in (0.0052 * 2**30, 0.083 * 2**30, 2.444 * 2**30)] == ["0.0052", "0.083", "2.44"]
    main(["--models", "SiT-T/2", "SiT-T/2", "--image-size", "16", "--gpu-gib", "24"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("|")[1].strip() for line in lines if line.startswith("| SiT-")] == ["SiT-T/2"] * 2  # two tables
    row = [c.strip() for c in lines[2].strip("|").split("|")]
    assert all(float(cell.split()[0]) > 0 for cell in row[2:]), row
    assert all(f > 0 for f in _bounds_row(lines[-1])[0]), lines[-1]


def _bounds_row(line: str) -> tuple[list[float], list[list[int]]]:
    """A bounds table row -> (fixed GiB per variant, [bounds per variant] per GPU size)."""
    cells = [c.strip() for c in line.strip("|").split("|")]
    fixed = [float(v) for v in cells[1].removesuffix(" GiB").split("/")]
    return fixed, [[int(b) for b in cell.split("/")] for cell in cells[2:]]


def test_memory_batch_bounds(capsys):
    """--gpu-gib: (GPU - fixed - headroom) // activations, per variant, from the same figures as the
    table; fixed: the train state and what is saved for backward whatever the batch."""
    from sit_fast.memory import batch_bound, main

    gib = 2**30
    assert batch_bound(80 * gib, 12 * gib, gib // 4, 4 * gib) == 256  # (80 - 12 - 4) GiB / 0.25 GiB
    assert batch_bound(16 * gib, 13 * gib, gib, 4 * gib) == 0
    main(["--models", "SiT-S/2", "--gpu-gib", "24", "80", "--headroom-gib", "2"])
    lines = capsys.readouterr().out.strip().splitlines()
    row = [c.strip() for c in lines[2].strip("|").split("|")]
    state_gib = float(row[3].split()[0])
    acts_mib = [float(cell.split()[0]) for cell in row[5:]]  # fp32+sdpa, bf16+sdpa, fast bf16
    assert lines[-3].startswith("| model | fixed | 24 GiB | 80 GiB |") and lines[-1].startswith("| SiT-S/2 |")
    fixed, per_gpu = _bounds_row(lines[-1])
    assert all(state_gib <= f < state_gib + 0.1 for f in fixed), (state_gib, fixed)
    assert fixed[0] < fixed[1] == fixed[2], fixed  # bf16: the weights' casts; fp32 saves the parameters themselves
    for gpu, bounds in zip((24, 80), per_gpu):
        expected = [(gpu - 2 - f) * 1024 / a for f, a in zip(fixed, acts_mib)]  # the table's rounded figures
        assert all(abs(b - e) <= 0.02 * e + 1 for b, e in zip(bounds, expected)), (gpu, bounds, expected)
        assert bounds[0] < bounds[1] < bounds[2]


def test_memory_counts_what_is_saved_whatever_the_batch():
    """Beside the per-image slope, the bytes saved at any batch: in fp32 none (the parameters are
    saved themselves; no concatenation of the adaLN weights is made while training), under bf16
    autocast the bf16 casts of the weights (all but those whose input needs no gradient: the
    timestep MLP's first layer)."""
    from torch import nn

    from sit_fast.memory import activation_bytes

    with torch.device("meta"):
        model = SiT_models["SiT-S/2"](input_size=32, attn_backend="sdpa")
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    assert activation_bytes(model, None)[1] == 0
    casts = activation_bytes(model, torch.bfloat16)[1]
    assert 0.99 * 2 * matmul < casts <= 2 * matmul, (casts, 2 * matmul)


def test_memory_counts_each_saved_storage_once_at_its_full_size():
    """Two halves of one tensor saved for backward hold its whole storage: counted once, all of it; the
    parameters are not counted. Here per image: x (saved for w's gradient) and h, 16 floats each."""
    from torch import nn

    from sit_fast.memory import activation_bytes, saved_bytes

    class Halves(nn.Module):
        in_channels, input_size, num_classes = 1, 4, 2

        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def forward(self, x, t, y):
            h = x * self.w  # (B, 1, 4, 4)
            a, b = h.chunk(2, dim=-1)  # views of h, both saved by the product
            return a * b

    assert activation_bytes(Halves(), None) == (2 * 16 * 4, 0)
    assert saved_bytes(Halves(), 3) == 3 * 2 * 16 * 4


def test_training_state_is_weights_gradients_adamw_moments_and_an_ema():
    """16 bytes per trainable parameter (fp32 weight, gradient, two AdamW moments) and 4 for the EMA's
    copy; a frozen parameter (pos_embed) has its weight and its EMA copy alone."""
    from sit_fast.memory import training_state_bytes

    with torch.device("meta"):
        model = SiT_models["SiT-S/8"](input_size=8)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = model.pos_embed.numel()
    assert not model.pos_embed.requires_grad and frozen > 0
    assert training_state_bytes(model) == 20 * trainable + 8 * frozen
    assert training_state_bytes(model, ema=False) == 16 * trainable + 4 * frozen


def test_memory_bounds_take_no_headroom_when_asked(capsys):
    """--headroom-gib 0 is allowed: the bounds are then the GPU's memory less the fixed bytes."""
    from sit_fast.memory import main

    main(["--models", "SiT-S/8", "--image-size", "64", "--gpu-gib", "24", "--headroom-gib", "0"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert "(GPU - fixed - 0 GiB) / activations per image" in lines[4], lines[4]
    _, ((*bounds,),) = _bounds_row(lines[-1])
    assert all(bound > 0 for bound in bounds), bounds


def test_memory_likelihood_table(capsys):
    """--likelihood: the frozen model's activations (three SDPA variants), and bounds after the
    weights as sample.py holds them: fp32, or with the matmul weights in bf16, and in both the adaLN
    weights' concatenation; a frozen model saves no weight for backward."""
    from sit_fast.memory import main

    main(["--models", "SiT-S/2", "--likelihood", "--gpu-gib", "24", "--headroom-gib", "2"])
    lines = capsys.readouterr().out.strip().splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header == ["model", "params", "fp32 weights", "act/img ref fp32+sdpa", "act/img ref bf16+sdpa",
                      "act/img fast bf16"], header
    row = [c.strip() for c in lines[2].strip("|").split("|")]
    weights_gib = float(row[2].split()[0])
    acts_mib = [float(cell.split()[0]) for cell in row[3:]]
    assert acts_mib[0] > acts_mib[1] > acts_mib[2] > 0, acts_mib
    assert "--likelihood batch bounds" in lines[4] and "the weights as sample.py holds them" in lines[4], lines[4]
    fixed, ((*bounds,),) = _bounds_row(lines[-1])
    with torch.device("meta"):
        model = SiT_models["SiT-S/2"](input_size=32)
    adaln = sum(p.numel() for linear in model.modulation_linears() for p in linear.parameters())
    assert abs(fixed[0] - weights_gib - adaln * 4 / 2**30) < 0.01, fixed  # fp32 weights + their concatenation
    assert fixed[1] == fixed[2] and 0.45 * fixed[0] < fixed[1] < 0.55 * fixed[0], fixed  # mostly bf16
    expected = [(24 - 2 - f) * 1024 / a for f, a in zip(fixed, acts_mib)]
    assert all(abs(b - e) <= 0.03 * e + 1 for b, e in zip(bounds, expected)), (bounds, expected)


def test_memory_table_with_gradient_checkpointing(capsys):
    """--grad-checkpointing: per variant, what the checkpointed model saves (the blocks' inputs) and a
    depth-th of what the blocks save beyond that otherwise (the block recomputed in backward): far
    below the plain figure, above the checkpointed model's own count; the bounds from the same."""
    from sit_fast.memory import activation_bytes, main

    main(["--models", "SiT-S/2", "--gpu-gib", "24"])
    plain = capsys.readouterr().out.strip().splitlines()
    main(["--models", "SiT-S/2", "--gpu-gib", "24", "--grad-checkpointing"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].endswith("| act/img fast bf16 (grad ckpt) |") and "training (--grad-checkpointing)" in lines[4]

    def acts(table):
        return [float(cell.split()[0]) for cell in table[2].strip("|").split("|")[4:]]

    with torch.device("meta"):
        full = SiT_models["SiT-S/2"](input_size=32, attn_backend="sdpa")
        checkpointed = SiT_models["SiT-S/2"](input_size=32, attn_backend="sdpa", grad_checkpointing=True)
    whole, kept = activation_bytes(full)[0], activation_bytes(checkpointed)[0]
    assert kept < 0.2 * whole
    assert acts(lines)[1] == round((kept + (whole - kept) // 12) / 2**20), (acts(lines), kept, whole)
    assert all(0 < c < 0.3 * p for c, p in zip(acts(lines), acts(plain))), (acts(lines), acts(plain))
    assert all(c > p for c, p in zip(_bounds_row(lines[-1])[1][0], _bounds_row(plain[-1])[1][0]))


@pytest.mark.parametrize("argv,message", [
    (["--likelihood", "--grad-checkpointing"], "--grad-checkpointing is a training option"),
    (["--models", "SiT-XXL/2"], "invalid choice: 'SiT-XXL/2'"),
    (["--models", "SiT-S/8", "--image-size", "100"], "--image-size 100: SiT-S/8 needs a multiple of 64"),
    (["--models", "SiT-S/8", "--image-size", "32"], "--image-size 32: SiT-S/8 needs a multiple of 64"),
    (["--image-size", "0"], "--image-size: must be a positive integer"),
    (["--gpu-gib", "nan"], "--gpu-gib: must be a positive number"),
    (["--gpu-gib", "-5"], "--gpu-gib: must be a positive number"),
    (["--gpu-gib", "24", "--headroom-gib", "-100"], "--headroom-gib: must be 0 or more GiB"),
    (["--gpu", "24"], "unrecognized arguments: --gpu 24"),
])
def test_memory_cli_errors_are_one_line(capsys, argv, message):
    from sit_fast.memory import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_parity_cli_error_is_one_line():
    """Fused kernels on the CPU without the interpreter: the parity CLI says so in one line."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "sit_fast.parity", "--model", "SiT-S/4", "--image-size", "32",
                             "--device", "cpu", "--fused-kernels", "on"], capture_output=True, text=True, env=env,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip() == ("error: --fused-kernels on: on the CPU the kernels need the Triton interpreter: "
                                     "set TRITON_INTERPRET=1 before triton is imported, or use --fused-kernels off")
    result = subprocess.run([sys.executable, "-m", "sit_fast.parity", "--batch-size", "0"], capture_output=True,
                            text=True, env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 2 and result.stderr == (
        "error: argument --batch-size: must be a positive integer, got 0 (see python -m sit_fast.parity --help)\n")


@pytest.mark.parametrize("argv,message", [
    (["--image-size", "60"], "--image-size 60: SiT-S/2 needs a multiple of 16 (the VAE's 8 times the patch size 2)"),
    (["--model", "SiT-S/8", "--image-size", "32"], "--image-size 32: SiT-S/8 needs a multiple of 64"),
    (["--attn-backend", "flash_attn", "--device", "cpu", "--fused-kernels", "off"],
     "--attn-backend flash_attn: attention backend 'flash_attn' cannot run here"),
])
def test_parity_cli_refuses_what_cannot_run_in_one_line(argv, message):
    """These ended in tracebacks from the reference's constructor or the first forward."""
    from sit_fast.errors import UserError
    from sit_fast.parity import main

    with pytest.raises(UserError) as info:
        main(argv)
    assert str(info.value).startswith(message), info.value


def test_parity_cli_seed_fixes_the_figures(capsys):
    """--seed fixes the weights as well as the inputs: the same report twice; another seed, another."""
    import re

    from sit_fast.parity import main

    reports = []
    for seed in (3, 3, 4):
        assert main(["--model", "SiT-T/4", "--image-size", "64", "--num-classes", "10", "--batch-size", "2",
                     "--attn-backend", "sdpa", "--fused-kernels", "off", "--device", "cpu", "--seed", str(seed)]) == 0
        reports.append(capsys.readouterr().out)
    assert reports[0] == reports[1] != reports[2]
    # without --seed, one is drawn and said: given, it gives the same report again
    argv = ["--model", "SiT-T/4", "--image-size", "64", "--num-classes", "10", "--batch-size", "2",
            "--attn-backend", "sdpa", "--fused-kernels", "off", "--device", "cpu"]
    assert main(argv) == 0
    said, drawn = capsys.readouterr().out.split("\n", 1)
    seed = re.fullmatch(r"seed (\d+) \(--seed \1 compares the same weights and inputs again\)", said).group(1)
    assert main(argv + ["--seed", seed]) == 0
    assert capsys.readouterr().out == drawn


def test_a_nan_gradient_anywhere_fails_the_parity_report():
    """grad_rel_err_max was Python's max() over the gradients, which drops a NaN unless it comes first:
    a fused backward leaving dshift unwritten (NaN in the adaLN gradients) passed in fp32."""
    from sit_fast.parity import ParityReport

    rows = [{"tensor": "output", "max_abs": 1e-7, "rel_err": 1e-7}, {"tensor": "loss", "max_abs": 0, "rel_err": 0},
            {"tensor": "grad:a", "max_abs": 1e-7, "rel_err": 1e-7},
            {"tensor": "grad:b", "max_abs": math.nan, "rel_err": math.nan},
            {"tensor": "grad:c", "max_abs": 2e-7, "rel_err": 2e-7}]
    report = ParityReport(rows=rows, dtype="fp32", compiled=False)
    assert math.isnan(report.grad_rel_err_max) and report.worst["tensor"] == "grad:b"
    assert not report.ok() and "(worst: grad:b)" in report.failures()[0]
    finite = ParityReport(rows=rows[:3] + rows[4:], dtype="fp32", compiled=False)
    assert finite.grad_rel_err_max == 2e-7 and finite.worst["tensor"] == "grad:c" and finite.ok()


def _report(dtype="fp32", compiled=False, yardstick=None, **errors):
    """A ParityReport whose rows have the given relative errors (output, loss, grad:w by default 0)."""
    from sit_fast.parity import ParityReport

    errors = {"output": 0.0, "loss": 0.0, "grad:w": 0.0, **errors}
    rows = [{"tensor": name, "max_abs": err, "rel_err": err} for name, err in errors.items()]
    return ParityReport(rows=rows, dtype=dtype, compiled=compiled, yardstick=yardstick)


def test_parity_errors_are_relative_to_the_reference():
    """||candidate - reference|| / ||reference||, and the largest absolute difference whichever its sign;
    against a zero reference, 0 where the candidate is zero too and infinite otherwise."""
    reference = torch.randn(64, device=DEVICE) + 3.0
    candidate = 2 * reference
    errors = _errors("x", candidate, reference)
    assert errors["rel_err"] == pytest.approx(1.0)  # relative to the candidate's norm it would be 0.5
    assert errors["max_abs"] == pytest.approx(reference.abs().max().item())
    errors = _errors("x", -candidate, reference)  # every difference negative: -3 x reference
    assert errors["rel_err"] == pytest.approx(3.0)
    assert errors["max_abs"] == pytest.approx(3 * reference.abs().max().item())
    zero = torch.zeros(8, device=DEVICE)
    assert _errors("x", zero, zero)["rel_err"] == 0.0
    assert _errors("x", torch.full((8,), 1e-9, device=DEVICE), zero)["rel_err"] == math.inf


def test_parity_report_holds_each_figure_to_its_own_tolerance():
    """The output without gradients counts as the output (the larger error, NaN when either is); the
    loss has a bound of its own; a compiled candidate's output is held to the compiled tolerance."""
    tol = TOLERANCES["fp32"]
    assert _report(output=1e-7, output_no_grad=10 * tol["output"]).output_rel_err == 10 * tol["output"]
    assert not _report(output=1e-7, output_no_grad=10 * tol["output"]).ok()
    assert math.isnan(_report(output=1e-7, output_no_grad=math.nan).output_rel_err)
    failures = _report(loss=10 * tol["loss"]).failures()
    assert len(failures) == 1 and failures[0].startswith("loss relative error"), failures
    between = (tol["output"] + tol["output_compiled"]) / 2
    assert _report(output=between, compiled=True).ok() and not _report(output=between, compiled=False).ok()
    assert _report(compiled=True).tolerances()["output"] == tol["output_compiled"]
    forward_only = _report(output=5e-6)
    forward_only.rows = forward_only.rows[:2]  # no gradient rows: no gradient error, the output is the worst
    assert forward_only.grad_rel_err_max == 0.0 and forward_only.worst["tensor"] == "output"


def test_parity_yardstick_bound_is_factor_times_the_references_own_error_plus_the_floor():
    """Each output and gradient within YARDSTICK_FACTOR x the reference's own bf16 error + YARDSTICK_FLOOR;
    the loss is left to its absolute bound however its error compares with the reference's."""
    from sit_fast.parity import YARDSTICK_FACTOR, YARDSTICK_FLOOR

    own = {"output": 2e-3, "loss": 1e-5, "grad:w": 0.0}
    bound = YARDSTICK_FACTOR * own["output"] + YARDSTICK_FLOOR
    # the loss 1000 x the reference's own error, within its absolute bound (2e-2)
    assert _report("bf16", yardstick=own, output=0.99 * bound, loss=1e-2, **{"grad:w": 0.99 * YARDSTICK_FLOOR}).ok()
    failures = _report("bf16", yardstick=own, output=1.01 * bound, **{"grad:w": 1.01 * YARDSTICK_FLOOR}).failures()
    assert [f.split(":")[0] for f in failures] == ["output", "grad"], failures
    # a reference whose own bf16 error is NaN bounds nothing: the row fails rather than passing unchecked
    assert not _report("bf16", yardstick=dict(own, output=math.nan)).ok()


def test_parity_fails_a_candidate_whose_parameter_gets_none():
    """A parameter the reference trains but the candidate leaves without a gradient is an infinite
    error, not a row left out."""
    reference, candidate = pair("hd16-nosigma", fused_kernels=False)  # the harness is under test, not the kernels
    candidate.final_layer.linear.weight.requires_grad_(False)
    report = compare(reference, candidate, batch_size=2, device=DEVICE)
    assert report.worst["tensor"] == "grad:final_layer.linear.weight" and report.grad_rel_err_max == math.inf
    assert not report.ok()


def test_parity_guided_forward_gets_the_null_class_for_its_second_half(monkeypatch):
    """compare(cfg_scale=...) runs forward_with_cfg on the guidance batch: the first half's labels, then
    the same images with the null class (num_classes)."""
    reference, candidate = pair("hd16-nosigma", fused_kernels=False)
    seen = []
    real = SiT.forward_with_cfg

    def forward_with_cfg(self, x, t, y, cfg_scale):
        seen.append((x.clone(), y.clone()))
        return real(self, x, t, y, cfg_scale)

    monkeypatch.setattr(SiT, "forward_with_cfg", forward_with_cfg)
    check(compare(reference, candidate, batch_size=4, cfg_scale=4.0, device=DEVICE))
    for x, y in seen:
        assert torch.equal(x[:2], x[2:]) and (y[:2] < 10).all() and y[2:].tolist() == [10, 10], y


def test_randomize_zero_init_fills_with_the_given_std():
    """The adaLN-Zero parameters get N(0, std^2), the std asked for (the bf16 tests ask for 0.3)."""
    model = randomize_zero_init_(SiT(num_classes=10, **CONFIGS["hd72-sigma"]), std=0.5)
    weight = model.final_layer.linear.weight
    assert 0.45 < weight.std().item() < 0.55, weight.std()


def test_parity_markdown_lists_the_worst_gradients_first_and_says_fail():
    """Output and loss, then the gradients from the largest error down, as many as max_rows allows."""
    report = _report(**{"grad:a": 1e-6, "grad:b": 2e-3, "grad:c": 1e-5})
    table = report.to_markdown(max_rows=4)
    assert table.splitlines()[0].endswith("FAIL") and _report().to_markdown().splitlines()[0].endswith("PASS")
    rows = [line.split(" | ")[0].lstrip("| ") for line in table.splitlines()[4:]]
    assert rows == ["output", "loss", "grad:b", "grad:c", "... 2 more"], rows


def test_parity_markdown_sums_up_the_errors_against_the_reference_in_its_precision():
    """With a yardstick, a line under the verdict: ours over the reference's own error per tensor (the
    loss left out, as the yardstick's bounds do; a tensor the reference rounds exactly too), its median
    and largest, and the reference's own output and largest gradient errors."""
    yardstick = {"output": 4e-3, "loss": 1e-9, "grad:w": 1e-2, "grad:a": 2e-2, "grad:b": 0.0}
    report = _report(dtype="bf16", yardstick=yardstick, output=2e-3, loss=1e-3, **{"grad:w": 1.5e-2, "grad:a": 2e-2})
    lines = report.to_markdown().splitlines()
    assert lines[1] == ("against the reference's own error in bf16, tensor by tensor (3 rows, the loss left out): "
                        "median 1.00x, at most 1.50x; the reference's own: output 0.004, gradients up to 0.02"), lines
    assert lines[2] == "" and lines[3].startswith("| tensor |")
    assert _report().to_markdown().splitlines()[1] == ""  # no yardstick, no line
    nan = _report(dtype="bf16", yardstick=yardstick, output=2e-3, **{"grad:w": float("nan"), "grad:a": 2e-2})
    assert nan.to_markdown().splitlines()[1].startswith("against the reference's own error in bf16, tensor by tensor "
                                                        "(2 rows, the loss left out, and 1 NaN): median 0.75x, at "
                                                        "most 1.00x;"), nan.to_markdown()


def test_parity_cli_compares_in_the_precision_it_is_given_and_exits_1_on_a_failure(monkeypatch, capsys):
    """--dtype bf16 runs the candidate under bf16 autocast, with the yardstick; --compile selects the
    compiled tolerance; a report that fails is exit status 1."""
    from sit_fast import parity

    calls = []

    def fake_compare(reference, candidate, batch_size, autocast_dtype, device, seed, compiled, yardstick):
        calls.append(dict(batch_size=batch_size, autocast_dtype=autocast_dtype, compiled=compiled, yardstick=yardstick))
        return _report("bf16", compiled=compiled, yardstick={"output": 0.0, "loss": 0.0, "grad:w": 0.0}, output=0.5)

    monkeypatch.setattr(parity, "compare", fake_compare)
    argv = ["--model", "SiT-T/4", "--image-size", "32", "--num-classes", "10", "--batch-size", "3",
            "--attn-backend", "sdpa", "--fused-kernels", "off", "--device", "cpu", "--seed", "1"]
    assert parity.main(argv + ["--dtype", "bf16", "--compile"]) == 1
    assert calls == [dict(batch_size=3, autocast_dtype=torch.bfloat16, compiled=True, yardstick=True)]
    assert "parity (bf16, compiled)" in capsys.readouterr().out


# autocast to float32 is no autocast at all: torch warns that it disables itself
@pytest.mark.filterwarnings("ignore:In .*autocast, but the target dtype is not supported")
def test_parity_in_fp32_has_no_yardstick_whichever_way_fp32_is_asked_for():
    """An fp32 candidate (no autocast, or autocast to float32) is held to the fp32 tolerances; the
    yardstick is the bf16 one and is not run for it."""
    for autocast_dtype in (None, torch.float32):
        reference, candidate = pair("hd16-nosigma", fused_kernels=False)
        report = compare(reference, candidate, batch_size=2, autocast_dtype=autocast_dtype, device=DEVICE,
                         yardstick=True)
        assert report.dtype == "fp32" and report.yardstick is None, autocast_dtype
        check(report)


def test_parity_reference_compared_again_starts_from_fresh_gradients():
    """One reference against a second candidate: the gradients of its first comparison are not added in."""
    reference, candidate = pair("hd16-nosigma", fused_kernels=False)
    check(compare(reference, candidate, batch_size=2, device=DEVICE))
    again = SiT(num_classes=10, **CONFIGS["hd16-nosigma"], attn_backend="sdpa", fused_kernels=False)
    report = compare(reference, again, batch_size=2, device=DEVICE)
    check(report)
    assert report.grad_rel_err_max <= FP32_BOUNDS["grad"], report.to_markdown()
