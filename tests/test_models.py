"""The SiT model: upstream maths, upstream state_dict, attention backends."""
import inspect
import logging
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sit_fast.models as models
from sit_fast.attention import math_attention, select_backend
from sit_fast.errors import first_line
from sit_fast.models import SiT, SiT_models, UPSTREAM_MODELS, get_2d_sincos_pos_embed, model_config, registry_name


def tiny_sit(**kwargs):
    cfg = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=48, depth=2, num_heads=4, num_classes=10)
    cfg.update(kwargs)
    return SiT(**cfg)


def randomize_(model: torch.nn.Module, std: float = 0.1):
    """Random weights everywhere (adaLN-Zero init would make most of the network the identity)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.normal_(0, std)
    return model


def upstream_forward(model: SiT, x, t, y):
    """Upstream SiT.forward, op for op: each block's own forward, then the final layer."""
    h = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y, model.training)
    for block in model.blocks:
        h = block(h, c)
    h = model.final_layer(h, c)
    out = model.unpatchify(h)
    if model.learn_sigma:
        out, _ = out.chunk(2, dim=1)
    return out


def inputs(model, n=3):
    x = torch.randn(n, model.in_channels, model.input_size, model.input_size)
    t = torch.rand(n)
    y = torch.randint(0, model.num_classes, (n,))
    return x, t, y


def expected_keys(depth, hidden, patch, in_ch, learn_sigma, num_classes, input_size, dropout=0.1, mlp_ratio=4.0):
    """Upstream SiT's state_dict, key by key and shape by shape (written from its layout)."""
    out_ch = 2 * in_ch if learn_sigma else in_ch
    mlp = int(hidden * mlp_ratio)
    keys = {
        "pos_embed": (1, (input_size // patch) ** 2, hidden),
        "x_embedder.proj.weight": (hidden, in_ch, patch, patch),
        "x_embedder.proj.bias": (hidden,),
        "t_embedder.mlp.0.weight": (hidden, 256),
        "t_embedder.mlp.0.bias": (hidden,),
        "t_embedder.mlp.2.weight": (hidden, hidden),
        "t_embedder.mlp.2.bias": (hidden,),
        "y_embedder.embedding_table.weight": (num_classes + int(dropout > 0), hidden),
        "final_layer.linear.weight": (patch * patch * out_ch, hidden),
        "final_layer.linear.bias": (patch * patch * out_ch,),
        "final_layer.adaLN_modulation.1.weight": (2 * hidden, hidden),
        "final_layer.adaLN_modulation.1.bias": (2 * hidden,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        keys.update({
            b + "attn.qkv.weight": (3 * hidden, hidden),
            b + "attn.qkv.bias": (3 * hidden,),
            b + "attn.proj.weight": (hidden, hidden),
            b + "attn.proj.bias": (hidden,),
            b + "mlp.fc1.weight": (mlp, hidden),
            b + "mlp.fc1.bias": (mlp,),
            b + "mlp.fc2.weight": (hidden, mlp),
            b + "mlp.fc2.bias": (hidden,),
            b + "adaLN_modulation.1.weight": (6 * hidden, hidden),
            b + "adaLN_modulation.1.bias": (6 * hidden,),
        })
    return keys


def test_registry_has_the_twelve_upstream_configs():
    assert set(UPSTREAM_MODELS) <= set(SiT_models)
    assert len(UPSTREAM_MODELS) == 12
    assert model_config("SiT-XL/2") == dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2)
    assert model_config("SiT-S/8") == dict(depth=12, hidden_size=384, num_heads=6, patch_size=8)
    with pytest.raises(ValueError, match="unknown model"):
        model_config("SiT-XXL/2")


def test_registry_sizes_are_upstreams(monkeypatch):
    """Depth, hidden size and heads of upstream's SiT-S/B/L/XL, written out here: the layout test takes
    its sizes from the registry itself, and the heads leave no trace in the state_dict."""
    upstream = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}
    monkeypatch.setattr(models, "SiT", lambda **kwargs: kwargs)  # what each constructor builds SiT with
    for name in UPSTREAM_MODELS:
        size, patch = name[len("SiT-"):].split("/")
        depth, hidden, heads = upstream[size]
        want = dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=int(patch))
        assert model_config(name) == want
        assert SiT_models[name](learn_sigma=False) == dict(want, learn_sigma=False), name
    # beside them only the tiny test model, in every patch size
    assert sorted(set(SiT_models) - set(UPSTREAM_MODELS)) == ["SiT-T/1", "SiT-T/2", "SiT-T/4", "SiT-T/8"]


def test_registry_name_matches_depth_hidden_size_and_patch():
    assert registry_name(28, 1152, 2) == "SiT-XL/2"
    assert registry_name(12, 384, 8) == "SiT-S/8"
    assert registry_name(4, 128, 1) == "SiT-T/1"
    assert registry_name(27, 1152, 2) is None  # XL's width at another depth is no registry model
    assert registry_name(12, 1152, 2) is None
    assert registry_name(28, 1152, 3) is None


def test_upstream_constructor_names():
    """Upstream's models.py defines SiT_XL_2 ... SiT_S_8 beside the registry; scripts import them."""
    import sit_fast.models as models

    for name in UPSTREAM_MODELS:
        attribute = name.replace("SiT-", "SiT_").replace("/", "_")
        assert getattr(models, attribute) is SiT_models[name]


@pytest.mark.parametrize("name", ["SiT-S/2", "SiT-B/4", "SiT-L/8", "SiT-XL/2"])
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_state_dict_is_upstream_layout(name, learn_sigma):
    cfg = model_config(name)
    with torch.device("meta"):
        model = SiT_models[name](learn_sigma=learn_sigma)
    want = expected_keys(cfg["depth"], cfg["hidden_size"], cfg["patch_size"], 4, learn_sigma, 1000, 32)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == want


def test_constructor_defaults_match_upstream():
    import inspect

    params = inspect.signature(SiT).parameters
    defaults = {k: params[k].default for k in (
        "input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "mlp_ratio",
        "class_dropout_prob", "num_classes", "learn_sigma")}
    assert defaults == dict(input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                            mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True)


def test_label_table_rows_follow_class_dropout():
    assert tiny_sit(class_dropout_prob=0.1).y_embedder.embedding_table.weight.shape[0] == 11
    assert tiny_sit(class_dropout_prob=0.0).y_embedder.embedding_table.weight.shape[0] == 10


def test_initialisation_is_adaln_zero():
    model = tiny_sit()
    for block in model.blocks:
        assert block.adaLN_modulation[1].weight.abs().max() == 0
        assert block.adaLN_modulation[1].bias.abs().max() == 0
    assert model.final_layer.linear.weight.abs().max() == 0
    x, t, y = inputs(model)
    assert model(x, t, y).abs().max() == 0  # zero output layer
    assert not model.pos_embed.requires_grad
    # xavier-uniform bound for the qkv projection
    w = model.blocks[0].attn.qkv.weight
    bound = math.sqrt(6 / (w.shape[0] + w.shape[1]))
    assert w.abs().max() <= bound and w.abs().max() > 0.5 * bound


def test_initialisation_is_upstreams():
    """Upstream's initialize_weights: every Linear xavier-uniform with a zero bias, the patch embedding's
    convolution as a Linear of its C * p * p inputs, N(0, 0.02) label table and timestep MLP weights,
    and zeros in the final layer's adaLN and linear map."""
    model = tiny_sit(hidden_size=64, num_classes=100)

    def assert_xavier_uniform(w, name):
        w = w.reshape(w.shape[0], -1)  # (fan_out, fan_in)
        bound = math.sqrt(6 / (w.shape[0] + w.shape[1]))
        assert 0.9 * bound < w.abs().max() <= bound, name

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert module.bias.abs().max() == 0, name
    for i, block in enumerate(model.blocks):
        for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            assert_xavier_uniform(block.get_submodule(name).weight, f"blocks.{i}.{name}")
    assert_xavier_uniform(model.x_embedder.proj.weight, "x_embedder.proj")
    assert model.x_embedder.proj.bias.abs().max() == 0
    for name in ("y_embedder.embedding_table.weight", "t_embedder.mlp.0.weight", "t_embedder.mlp.2.weight"):
        w = model.get_parameter(name)
        assert abs(w.mean().item()) < 0.002 and 0.017 < w.std().item() < 0.023, name
    for name in ("final_layer.adaLN_modulation.1.weight", "final_layer.linear.weight"):
        assert model.get_parameter(name).abs().max() == 0, name


def test_pos_embed_is_2d_sincos():
    # (9, 8); as upstream (meshgrid with w first), the first half encodes the column, the second the row
    emb = get_2d_sincos_pos_embed(8, 3)
    assert emb.shape == (9, 8)
    # token 5 is (row 1, col 2); channel 0 of each half is sin(position * 1)
    assert emb[5, 0] == pytest.approx(math.sin(2.0))
    assert emb[5, 4] == pytest.approx(math.sin(1.0))
    assert emb[0, 2] == pytest.approx(1.0) and emb[0, 0] == 0
    # upstream's signature: extra_tokens zero rows first when cls_token, else none
    with_cls = get_2d_sincos_pos_embed(8, 3, cls_token=True, extra_tokens=2)
    assert with_cls.shape == (11, 8) and not with_cls[:2].any()
    np.testing.assert_array_equal(with_cls[2:], emb)
    np.testing.assert_array_equal(get_2d_sincos_pos_embed(8, 3, cls_token=False, extra_tokens=2), emb)


@pytest.mark.parametrize("dim", [6, 9])
def test_pos_embed_refuses_a_width_without_sin_cos_halves_per_axis(dim):
    """9 has no equal halves per axis, 6 has halves of 3 with no sin and cos halves: either would make
    a table narrower than asked."""
    with pytest.raises(ValueError, match="needs an even dimension"):
        get_2d_sincos_pos_embed(dim, 3)


def test_the_residual_stream_enters_block_0_contiguous(monkeypatch):
    """The patch embedding's (N, T, D) view has rows of stride T; the stream that block 0's first op
    (a fused kernel on the fast path) reads is contiguous, at no copy of its own."""
    model = SiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=3)
    real, seen = models.REFERENCE_OPS["layernorm_modulate"], []

    def recording(x, shift, scale):
        seen.append(x.is_contiguous())
        return real(x, shift, scale)

    monkeypatch.setitem(models.REFERENCE_OPS, "layernorm_modulate", recording)
    model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 1]))
    assert seen and seen[0], seen


@pytest.mark.parametrize("learn_sigma", [True, False])
@pytest.mark.parametrize("train", [False, True])
def test_forward_equals_upstream_op_order(learn_sigma, train):
    """With gradients (each adaLN layer's own GEMM) and without (one GEMM over the concatenated adaLN
    weights, taken apart: sampling's path), the forward is upstream's."""
    model = randomize_(tiny_sit(learn_sigma=learn_sigma)).double()
    model.train(train)
    x, t, y = (v.double() if v.is_floating_point() else v for v in inputs(model))
    torch.manual_seed(0)
    ours = model(x, t, y)
    torch.manual_seed(0)
    ref = upstream_forward(model, x, t, y)
    assert ours.shape == (3, 4, 8, 8)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    torch.manual_seed(0)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), ref, rtol=1e-12, atol=1e-12)


def test_one_gemm_modulation_equals_per_block():
    model = randomize_(tiny_sit()).double()
    c = torch.randn(3, model.hidden_size, dtype=torch.float64)
    mods = model.modulation(c)
    for i, block in enumerate(model.blocks):
        torch.testing.assert_close(mods[:, 6 * i: 6 * i + 6].reshape(3, -1), block.adaLN_modulation(c))
    torch.testing.assert_close(mods[:, -2:].reshape(3, -1), model.final_layer.adaLN_modulation(c))


@pytest.mark.parametrize("cfg_channels", [3, "all"])
def test_forward_with_cfg(cfg_channels):
    model = randomize_(tiny_sit()).double().eval()
    x, t, _ = inputs(model, 2)
    x = torch.cat([x, x]).double()
    t = torch.cat([t, t]).double()
    y = torch.tensor([1, 2, 10, 10])  # conditional labels, then the null class
    scale = 4.0
    out = model.forward_with_cfg(x, t, y, scale, cfg_channels=cfg_channels)
    raw = model(x, t, y)
    n = 4 if cfg_channels == "all" else 3
    guided = raw[2:, :n] + scale * (raw[:2, :n] - raw[2:, :n])
    torch.testing.assert_close(out[:2, :n], guided)
    torch.testing.assert_close(out[2:, :n], guided)
    torch.testing.assert_close(out[:, n:], raw[:, n:])
    # upstream's default: only 3 channels are guided
    default = model.forward_with_cfg(x, t, y, scale)
    torch.testing.assert_close(default[:, 3:], raw[:, 3:])


def test_forward_with_cfg_takes_the_first_half_of_the_batch_for_both_passes():
    """As upstream: the conditional and unconditional passes both see the first half's latents, so a
    second half that has drifted apart (an SDE sampler's noise on [x, x]) does not change the output."""
    model = randomize_(tiny_sit()).double().eval()
    x, t, y = inputs(model, 2)
    x, t = x.double(), t.double()
    t, y = torch.cat([t, t]), torch.cat([y, torch.full_like(y, model.num_classes)])
    with torch.no_grad():
        same = model.forward_with_cfg(torch.cat([x, x]), t, y, 4.0)
        drifted = model.forward_with_cfg(torch.cat([x, torch.randn_like(x)]), t, y, 4.0)
    torch.testing.assert_close(drifted, same, rtol=0, atol=0)


def test_forward_with_cfg_runs_a_model_compiled_in_place_compiled():
    """model.compile() compiles the module's call: forward_with_cfg's pass goes through it (a call of
    self.forward ran the whole guided forward eagerly, no graph compiled), with the eager result."""
    from torch._dynamo.utils import counters

    model = randomize_(tiny_sit()).eval()
    x, t, y = inputs(model, 2)
    x, t, y = torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, model.num_classes)])
    with torch.no_grad():
        eager = model.forward_with_cfg(x, t, y, 4.0)
        torch._dynamo.reset()
        counters.clear()
        model.compile(backend="eager", fullgraph=True)
        try:
            compiled = model.forward_with_cfg(x, t, y, 4.0)
            assert counters["stats"]["unique_graphs"] == 1
        finally:
            torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


def test_grad_checkpointing_gives_same_gradients(monkeypatch):
    """The same gradients, with each block's step run again in the backward (what checkpointing is), in
    training only."""
    torch.manual_seed(1)
    model = randomize_(tiny_sit(class_dropout_prob=0.0)).train()
    real, calls = models._block_step, []

    def counted(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(models, "_block_step", counted)
    x, t, y = inputs(model)
    model(x, t, y).square().mean().backward()
    assert len(calls) == len(model.blocks)
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.grad_checkpointing = True
    calls.clear()
    model(x, t, y).square().mean().backward()
    assert len(calls) == 2 * len(model.blocks)  # forward, and again in the backward
    for k, p in model.named_parameters():
        if k in grads:
            torch.testing.assert_close(p.grad, grads[k], rtol=1e-5, atol=1e-6)
    # in eval mode a model with gradients (the likelihood's input gradient) keeps its activations
    calls.clear()
    model.eval()
    model(x.requires_grad_(), t, y).square().mean().backward()
    assert x.grad is not None and len(calls) == len(model.blocks)
    # the constructor's flag is the attribute's
    assert tiny_sit(grad_checkpointing=True).grad_checkpointing and not tiny_sit().grad_checkpointing


def test_backward_makes_one_gradient_per_modulation_gemm():
    """Each adaLN layer's vectors come from one (N, k, D) tensor: its gradient is one stack of the
    vectors' gradients, not a zero-filled full-size tensor per vector's slice, summed; and no
    (N, 6 * depth + 2, D) tensor of all blocks' vectors is made while training."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Made(TorchDispatchMode):
        def __init__(self, shapes):
            super().__init__()
            self.shapes, self.made = shapes, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.shape in self.shapes and not func._schema.is_mutable \
                    and "view" not in func.__name__:
                self.made.append((tuple(out.shape[1:2]), func.__name__))
            return out

    depth = 4
    model = randomize_(tiny_sit(depth=depth)).train()
    x, t, y = inputs(model)
    shapes = [torch.Size([len(x), k, model.hidden_size]) for k in (6, 2, 6 * depth + 2)]
    flat = [torch.Size([len(x), k * model.hidden_size]) for k in (6, 2, 6 * depth + 2)]
    with Made(flat) as forward:
        loss = model(x, t, y).square().mean()
    d = model.hidden_size
    assert sorted(forward.made) == [((2 * d,), "addmm.default")] + [((6 * d,), "addmm.default")] * depth, forward.made
    with Made(shapes) as backward:
        loss.backward()
    assert sorted(backward.made) == [((2,), "stack.default")] + [((6,), "stack.default")] * depth, backward.made


def test_compiled_block_step_is_compiled_once_for_every_block():
    """The last block's step takes the final layer's shift and scale, whose strides differ from a
    block's: the compiled step sees contiguous copies, so all blocks share one graph per mode (one
    graph, not none: the blocks run the compiled step)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = randomize_(tiny_sit(depth=3)).train().compile_blocks(backend="eager")
    x, t, y = inputs(model)
    with torch._dynamo.config.patch(error_on_recompile=True):
        model(x, t, y).square().mean().backward()
    assert counters["stats"]["unique_graphs"] == 1
    model.eval().requires_grad_(False)
    with torch.no_grad():
        model(x, t, y)  # sampling's vectors, from one GEMM: a graph of its own, compiled once
        with torch._dynamo.config.patch(error_on_recompile=True):
            model(x, t, y)
    assert counters["stats"]["unique_graphs"] == 2


def test_a_blocks_adaln_gradients_are_whole_once_the_backward_has_passed_it():
    """While training, the last block's adaLN weight gradient is accumulated before the first
    block's attention weights get theirs: DDP can all-reduce it while the backward goes on."""
    model = randomize_(tiny_sit(depth=4)).train()
    order = []
    named = {"first block's qkv": model.blocks[0].attn.qkv.weight,
             "last block's adaLN": model.blocks[-1].adaLN_modulation[1].weight,
             "first block's adaLN": model.blocks[0].adaLN_modulation[1].weight}
    for name, param in named.items():
        param.register_post_accumulate_grad_hook(lambda _, name=name: order.append(name))
    x, t, y = inputs(model)
    model(x, t, y).square().mean().backward()
    assert order.index("last block's adaLN") < order.index("first block's qkv"), order
    assert order.index("first block's qkv") < order.index("first block's adaLN"), order


def _attention_cases():
    """(backend, forced SDPA kernel, device) for every attention this machine can run in half
    precision: math, SDPA as PyTorch picks and each kernel that runs on the device forced, flash_attn
    where it is installed (CUDA)."""
    from sit_fast.attention import BACKENDS, FORCED_SDPA_SUPPORT

    cases = []
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        cases += [("math", None, device), ("sdpa", None, device)]
        cases += [("sdpa", kernel, device) for kernel, support in FORCED_SDPA_SUPPORT.items() if device in support]
        if BACKENDS["flash_attn"].unsupported_reason(device, torch.bfloat16, 64) is None:
            cases.append(("flash_attn", None, device))
    return cases


@pytest.mark.parametrize("head_dim", [72, 64])  # 72: SiT-XL's (1152 / 16), which the fused kernels pad
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend,kernel,device", _attention_cases())
def test_every_attention_backend_in_half_precision_is_attention(backend, kernel, device, dtype, head_dim):
    """Each attention the half-precision paths may take (flash_attn and the fused SDPA kernels run only
    there) against float64 attention, at the op, where a small error in it is not hidden by the rest of
    the model, forward and backward (training runs the kernel SIT_FAST_SDPA_BACKEND forces): correct
    kernels are within 1% forward (about 0.4% in bf16) and 2% backward (about 0.6% on the CPU in bf16);
    a 5% error in the softmax scale is 6%, a gradient that is not passed on 100%."""
    from sit_fast.attention import attention_fn

    q, k, v = (torch.randn(2, 3, 77, head_dim, dtype=torch.float64, requires_grad=True) for _ in range(3))
    expected = math_attention(q, k, v)
    ours = [t.detach().to(device, dtype).requires_grad_() for t in (q, k, v)]
    try:
        got = attention_fn(backend, kernel)(*ours)
    except RuntimeError as error:  # a forced CUDA kernel this GPU or build does not have; any other error fails
        if device == "cpu" or kernel in (None, "math") or "No available kernel" not in str(error):
            raise
        pytest.skip(f"SDPA kernel {kernel}: {first_line(error)}")
    error = (got.double().cpu() - expected).norm() / expected.norm()
    assert error < 1e-2, f"{backend} {kernel} {dtype}: relative error {error:.2e}"
    cotangent = torch.randn_like(expected)
    grads = torch.autograd.grad(got, ours, cotangent.to(device, dtype))
    for name, grad, ref in zip("qkv", grads, torch.autograd.grad(expected, (q, k, v), cotangent)):
        error = (grad.double().cpu() - ref).norm() / ref.norm()
        assert error < 2e-2, f"{backend} {kernel} {dtype}: d{name} relative error {error:.2e}"


def test_math_attention_is_softmax_qkt_v():
    q, k, v = (torch.randn(2, 3, 5, 8, dtype=torch.float64) for _ in range(3))
    weights = torch.exp(q @ k.transpose(-1, -2) / math.sqrt(8))
    ref = (weights / weights.sum(-1, keepdim=True)) @ v
    torch.testing.assert_close(math_attention(q, k, v), ref)


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_fast_attention_split_gives_the_same_results_with_one_pass_fewer(backend):
    """Attention(fast=True) splits qkv along its "3" axis (then transposes) where upstream permutes
    first: the same output and gradients, to the bit, and in backward the three gradients are stacked
    straight into qkv's layout, where upstream's form stacks them and then copies the stack."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from sit_fast.models import Attention

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else None
            self.names.append((func.overloadpacket.__name__, shape))
            return out

    attn = Attention(48, 4, backend)
    x = torch.randn(2, 7, 48)
    cotangent = torch.randn(2, 7, 48)
    results = {}
    for fast in (False, True):
        leaf = x.clone().requires_grad_()
        out = attn(leaf, fast)
        ops = Ops()
        with ops:
            grads = torch.autograd.grad(out, [leaf, *attn.parameters()], cotangent)
        results[fast] = (out, *grads)
        stacked = [shape for name, shape in ops.names if name == "stack"]
        assert stacked == [(2, 7, 3, 4, 12) if fast else (3, 2, 4, 7, 12)], ops.names
        # upstream's form copies the stacked gradient into qkv's layout; the fast one has nothing to copy
        assert ops.names.count(("clone", (2, 7, 3, 4, 12))) == (0 if fast else 1), ops.names
    for ref, got in zip(results[False], results[True]):
        assert torch.equal(got, ref)


def test_sdpa_backend_matches_math():
    model = randomize_(tiny_sit(num_heads=2, hidden_size=144))  # head dim 72, as SiT-XL
    x, t, y = inputs(model)
    model.eval()
    ref = model(x, t, y)
    assert model.attn_backend == "math"
    model.set_attn_backend("sdpa")
    assert model.attn_backend == "sdpa"
    torch.testing.assert_close(model(x, t, y), ref, rtol=1e-5, atol=1e-5)
    model.set_attn_backend("auto")
    torch.testing.assert_close(model(x, t, y), ref, rtol=1e-5, atol=1e-5)
    model.set_attn_backend("sdpa", sdpa_backend="math")
    torch.testing.assert_close(model(x, t, y), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown SDPA backend 'efficent'; choose one of flash, cudnn"):
        model.set_attn_backend("sdpa", sdpa_backend="efficent")  # refused when set, not at the forward


def test_an_sdpa_kernel_chosen_in_code_is_not_overruled_by_the_variable(monkeypatch):
    """SIT_FAST_SDPA_BACKEND=cudnn (no CPU kernel) refused set_attn_backend("sdpa", sdpa_backend="math")
    on the CPU, though the variable is not read then."""
    from sit_fast import attention

    monkeypatch.setattr(attention, "_RESOLVED", {})  # resolved afresh, as in a new process
    model = randomize_(tiny_sit(num_heads=2, hidden_size=144)).eval()
    x, t, y = inputs(model)
    ref = model(x, t, y)
    monkeypatch.setenv("SIT_FAST_SDPA_BACKEND", "cudnn")
    model.set_attn_backend("sdpa", sdpa_backend="math")
    torch.testing.assert_close(model(x, t, y), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="SIT_FAST_SDPA_BACKEND=cudnn: it does not run on cpu"):
        select_backend("sdpa", "cpu", torch.float32, 72)  # the variable's choice is checked as before


def test_backend_selection_explains_itself():
    assert select_backend("auto", "cpu", torch.float32, 72) in ("sdpa", "math")
    with pytest.raises(ValueError, match="flash_attn.*cannot run here.*usable: sdpa, math"):
        select_backend("flash_attn", "cpu", torch.float32, 72)
    with pytest.raises(ValueError, match="unknown attention backend 'flash'; choose one of"):
        select_backend("flash", "cpu", torch.float32, 72)
    with pytest.raises(ValueError, match="unknown attention backend"):
        tiny_sit(attn_backend="fast")


@pytest.mark.parametrize("forced", ["flash", "cudnn", "efficient", "math"])
def test_forced_sdpa_kernel_is_checked_against_device_and_dtype(forced, monkeypatch):
    """SIT_FAST_SDPA_BACKEND naming a kernel that cannot run here is one ValueError saying why, not
    PyTorch's "no available kernel" at the first forward; on the CPU the table agrees with PyTorch."""
    from torch.nn.attention import sdpa_kernel

    from sit_fast.attention import _sdpa_backend_enum

    monkeypatch.setenv("SIT_FAST_SDPA_BACKEND", forced)
    # CUDA, checked without a GPU: flash and cuDNN take half precision only.
    if forced in ("flash", "cudnn"):
        with pytest.raises(ValueError, match=rf"SIT_FAST_SDPA_BACKEND={forced}: on cuda it takes float16, "
                                             r"bfloat16, got float32; choose one of efficient, math, or unset"):
            select_backend("sdpa", "cuda", torch.float32, 72)
    assert select_backend("sdpa", "cuda", torch.bfloat16, 72) == "sdpa"
    q = torch.randn(1, 2, 4, 8)
    for dtype in (torch.float32, torch.bfloat16):
        try:
            with sdpa_kernel(_sdpa_backend_enum(forced)):
                F.scaled_dot_product_attention(q.to(dtype), q.to(dtype), q.to(dtype))
            runs = True
        except RuntimeError:
            runs = False
        if runs:
            assert select_backend("auto", "cpu", dtype, 72) == "sdpa"
        else:
            with pytest.raises(ValueError, match=rf"SIT_FAST_SDPA_BACKEND={forced}: it does not run on cpu; "
                                                 r"choose one of flash, math, or unset it"):
                select_backend("sdpa", "cpu", dtype, 72)


def test_wrong_input_size_is_a_clear_error():
    model = tiny_sit()
    with pytest.raises(ValueError, match="input_size=16"):
        model(torch.randn(1, 4, 16, 16), torch.rand(1), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(8, 16\) does not match the model's input_size \(8, 8\); the model "
                                         r"takes square inputs"):
        model(torch.randn(1, 4, 8, 16), torch.rand(1), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(16, 8\) does not match .*square inputs"):  # the width right
        model(torch.randn(1, 4, 16, 8), torch.rand(1), torch.zeros(1, dtype=torch.long))


def test_sizes_that_do_not_divide_are_refused_when_the_model_is_built():
    """Refused up front, not an output of another size (a patch grid that leaves pixels out) or a
    reshape error at the first forward."""
    with pytest.raises(ValueError, match="input_size 10 is not divisible by patch_size 4"):
        tiny_sit(input_size=10, patch_size=4)
    with pytest.raises(ValueError, match="hidden_size 48 is not divisible by num_heads 5"):
        tiny_sit(num_heads=5)


def test_hidden_size_not_a_multiple_of_4_is_named():
    with pytest.raises(ValueError, match=r"hidden_size must be a multiple of 4 .*, got 130"):
        tiny_sit(hidden_size=130, num_heads=2)


@pytest.mark.parametrize("args, error, needle", [
    (lambda x, t, y: (x, t[:, None], y), ValueError, r"t must have shape \(N,\) = \(3,\).*got \(3, 1\)"),
    (lambda x, t, y: (x, t, y[:, None]), ValueError, r"y must have shape \(N,\) = \(3,\).*got \(3, 1\)"),
    (lambda x, t, y: (x, t[0], y), ValueError, r"t must have shape .*got \(\)"),
    (lambda x, t, y: (x, t[:2], y), ValueError, r"t must have shape .*got \(2,\)"),
    (lambda x, t, y: (x, t, None), TypeError, r"y must be a tensor, got NoneType \(the null class.* is label 10\)"),
    (lambda x, t, y: (x, 0.5, y), TypeError, r"t must be a tensor, got float"),
    (lambda x, t, y: (x, t, y.float()), TypeError, r"y must hold integer class labels .*float32"),
    (lambda x, t, y: (x[:, :3], t, y), ValueError, r"x must have shape \(N, 4, 8, 8\), got \(3, 3, 8, 8\)"),
    (lambda x, t, y: (x[0], t, y), ValueError, r"x must have shape \(N, 4, 8, 8\), got \(4, 8, 8\)"),
    (lambda x, t, y: (x, t.to("meta"), y), ValueError, r"t is on meta, x on cpu"),
    (lambda x, t, y: (x.double(), t, y), TypeError, r"x is torch.float64, the model's weights torch.float32: pass "
                                                    r"x.to\(torch.float32\), or call the model under torch.autocast"),
    (lambda x, t, y: (x.long(), t, y), TypeError, r"x is torch.int64, the model's weights torch.float32"),
])
def test_wrong_inputs_are_clear_errors(args, error, needle):
    """A t or y of shape (N, 1) would broadcast against the (N, D) embeddings into a wrong
    conditioning without an error; these are refused before the model runs, naming the argument."""
    model = tiny_sit()
    with pytest.raises(error, match=needle):
        model(*args(*inputs(model)))


def test_inputs_of_another_float_dtype_run_under_autocast():
    """x's dtype is checked against the weights' outside autocast only: autocast casts it (bf16 x into
    an fp32 model, as a bf16 data pipeline gives)."""
    model = tiny_sit()
    x, t, y = inputs(model)
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        assert model(x.bfloat16(), t, y).shape == x.shape
    with pytest.raises(TypeError, match=r"x is torch.bfloat16, the model's weights torch.float32"):
        model(x.bfloat16(), t, y)
    model.cast_matmul_weights_(torch.bfloat16)  # for autocast alone: x.to(bfloat16) would not do
    with pytest.raises(TypeError, match=r"^x is torch.float32, the model's matmul weights torch.bfloat16 "
                                        r"\(cast_matmul_weights_\): call the model under torch.autocast to "
                                        r"torch.bfloat16$"):
        model(x, t, y)
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        assert model(x, t, y).shape == x.shape


def test_speed_options_set_after_construction_are_checked_as_the_constructors():
    """fused_kernels and attn_backend assigned on a built model: "off" (truthy) was taken for True and ran
    the kernels; attn_backend had no setter. Both go through the constructor's checks."""
    model = tiny_sit()
    for bad in ("off", "on", 1, None):
        with pytest.raises(ValueError, match=rf"fused_kernels must be True, False or 'auto', got {bad!r}"):
            model.fused_kernels = bad
    assert model.fused_kernels is False
    model.fused_kernels = "auto"
    assert model.fused_kernels == "auto"
    model.attn_backend = "sdpa"
    assert {block.attn.attn_backend for block in model.blocks} == {"sdpa"}
    with pytest.raises(ValueError, match="unknown attention backend 'fast'"):
        model.attn_backend = "fast"
    # a model pickled whole when fused_kernels was a plain attribute loads with it
    state = model.__getstate__()
    state["fused_kernels"] = state.pop("_fused_kernels")
    old = SiT.__new__(SiT)
    old.__setstate__(state)
    assert old.fused_kernels == "auto" and "fused_kernels" not in vars(old)


def test_registry_constructors_show_the_arguments_left_to_give():
    """help(SiT_models["SiT-XL/2"]) lists SiT's arguments but those its name fixes, not (**kwargs)."""
    import inspect

    parameters = inspect.signature(SiT_models["SiT-XL/2"]).parameters
    assert list(parameters)[:3] == ["input_size", "in_channels", "mlp_ratio"] and "depth" not in parameters
    assert parameters["num_classes"].default == 1000 and "fused_kernels" in parameters


def test_int32_labels_give_the_int64_labels_outputs():
    model = randomize_(tiny_sit()).eval()
    x, t, y = inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y.int()), model(x, t, y), rtol=0, atol=0)


def test_an_empty_batch_gives_an_empty_output():
    """As upstream's model: (0, C, H, W) in, (0, C, H, W) out (the adaLN vectors' view inferred its
    size from 0 elements and failed)."""
    model = tiny_sit()
    x, t, y = inputs(model, 0)
    assert model(x, t, y).shape == (0, *model(*inputs(model, 1)).shape[1:])


def test_forward_with_cfg_refuses_an_odd_batch():
    model = tiny_sit()
    x, t, y = inputs(model, 3)
    with pytest.raises(ValueError, match="batch must be even, got 3"):
        model.forward_with_cfg(x, t, y, 4.0)


def test_forward_with_cfg_refuses_a_model_without_a_null_class():
    model = tiny_sit(class_dropout_prob=0.0)  # a label table of num_classes rows: no unconditional label
    x, t, y = inputs(model, 4)
    with pytest.raises(ValueError, match="needs the null class .label 10.*class_dropout_prob=0"):
        model.forward_with_cfg(x, t, y, 4.0)


def test_the_samplers_guidance_refuses_a_model_without_a_null_class():
    """The same ValueError from the sampling engine's guidance, as it is built (not an IndexError from
    the label table at the first guided call); unguided, such a model samples."""
    from sit_fast.sampling import Denoiser, ModelForwards

    model = tiny_sit(class_dropout_prob=0.0).eval()
    x, t, y = inputs(model, 4)
    with pytest.raises(ValueError, match=r"^guidance \(cfg_scale 4\) needs the null class \(label 10\).*=0$"):
        ModelForwards(model, cfg_scale=4.0)
    assert Denoiser(ModelForwards(model)).for_labels(y)(x, t).shape == x.shape


def test_sampling_forwards_of_a_model_in_training_mode_warn_of_its_label_dropout():
    """A model left in training mode drops labels at random while it samples (upstream's label dropout,
    10% by default): said as the sampling forwards are built; not for a model in eval mode, nor one
    without label dropout."""
    import warnings

    from sit_fast.sampling import ModelForwards

    model = tiny_sit()  # in training mode, as built
    with pytest.warns(UserWarning, match=r"^the model is in training mode, where its label dropout gives 10% of the "
                                         r"labels at every call the null class .*: call model.eval\(\) before"):
        ModelForwards(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ModelForwards(model.eval())
        ModelForwards(tiny_sit(class_dropout_prob=0.0))


@pytest.mark.parametrize("bad", ["All", "3", 0, True, 2.0])
def test_cfg_channels_are_all_or_a_positive_int(bad):
    from sit_fast.sampling import ModelForwards

    model = randomize_(tiny_sit()).eval()
    x, t, y = inputs(model, 4)
    with pytest.raises(ValueError, match=f"cfg_channels must be 'all' or a positive int .*got {bad!r}"):
        model.forward_with_cfg(x, t, y, 4.0, cfg_channels=bad)
    with pytest.raises(ValueError, match="cfg_channels must be"):
        ModelForwards(model, cfg_scale=4.0, cfg_channels=bad)


def test_cfg_channels_beyond_the_model_s_guide_them_all():
    model = randomize_(tiny_sit()).eval()  # 4 channels
    x, t, y = inputs(model, 4)
    with torch.no_grad():
        every = model.forward_with_cfg(x, t, y, 4.0, cfg_channels="all")
        torch.testing.assert_close(model.forward_with_cfg(x, t, y, 4.0, cfg_channels=9), every, rtol=0, atol=0)
        torch.testing.assert_close(model.forward_with_cfg(x, t, y, 4.0, cfg_channels=np.int64(4)), every, rtol=0,
                                   atol=0)  # any integer type
        assert not torch.equal(model.forward_with_cfg(x, t, y, 4.0, cfg_channels=3), every)


def test_frozen_model_reuses_modulation_weights_until_they_change():
    model = randomize_(tiny_sit()).eval()
    x, t, y = inputs(model)
    with torch.no_grad():
        ref = model(x, t, y)
    model.requires_grad_(False)
    model.reuse_frozen_modulation = True  # as sit_fast.sampling.ModelForwards sets it
    with torch.no_grad():
        first = model(x, t, y)
        cached = model._modulation_cache
        second = model(x, t, y)
    assert cached is not None and model._modulation_cache is cached  # reused, not rebuilt
    torch.testing.assert_close(first, ref, rtol=0, atol=0)
    torch.testing.assert_close(second, ref, rtol=0, atol=0)
    # an in-place change (load_state_dict copies in place) invalidates the cached concatenation
    other = randomize_(tiny_sit())
    model.load_state_dict(other.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), other.eval()(x, t, y), rtol=0, atol=0)
    # trainable again: no cache, gradients reach every block's adaLN parameters
    model.requires_grad_(True)
    model(x, t, y).square().mean().backward()
    assert model._modulation_cache is None
    assert all(b.adaLN_modulation[1].weight.grad is not None for b in model.blocks)


def test_a_frozen_model_sees_weights_written_through_data():
    """p.data.copy_ moves no version counter (diffusers' EMAModel.copy_to writes so): by default a
    frozen model concatenates its adaLN weights anew each call, so it computes with the new ones."""
    model = randomize_(tiny_sit()).eval().requires_grad_(False)
    other = randomize_(tiny_sit()).eval()
    x, t, y = inputs(model)
    with torch.no_grad():
        model(x, t, y)
        for mine, theirs in zip(model.parameters(), other.parameters()):
            mine.data.copy_(theirs.data)
        torch.testing.assert_close(model(x, t, y), other(x, t, y), rtol=0, atol=0)


def test_sampling_forwards_reuse_the_frozen_modulation_weights():
    from sit_fast.sampling import ModelForwards

    model = tiny_sit().eval().requires_grad_(False)
    assert not model.reuse_frozen_modulation
    ModelForwards(model, cfg_scale=4.0)
    assert model.reuse_frozen_modulation


def test_compiled_sampling_forwards_take_the_kept_modulation_weights():
    """ModelForwards(compile=True) concatenates the frozen adaLN weights outside the compiled code,
    once, and passes them in: the graph holds no concatenation, and the results are the eager ones."""
    from sit_fast.sampling import ModelForwards

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model = randomize_(tiny_sit()).eval().requires_grad_(False)
    x, t, y = inputs(model)
    with torch.no_grad():
        expected = model(x, t, y)
        forwards = ModelForwards(model, compile=True, compile_backend=backend)
        out = forwards.conditional(x, t, y)
        kept = model._modulation_cache
        again = forwards.conditional(x, t, y)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(again, expected, rtol=0, atol=0)
    assert kept is not None and model._modulation_cache is kept
    assert len(graphs) == 1
    inputs_read = [node.name for node in graphs[0].graph.nodes if node.op == "placeholder"]
    assert inputs_read and not [name for name in inputs_read if "adaln" in name.lower()], inputs_read


@pytest.mark.parametrize("inference", [True, False], ids=["inference_mode", "no_grad"])
def test_compiled_sampling_forwards_compile_once_for_inputs_of_either_kind(inference):
    """A sampler under inference mode whose latents were made outside it calls the forward first with a
    normal tensor, then with inference tensors (under no_grad, the other way round, latents made under
    inference mode): ModelForwards(compile=True) hands the compiled code one kind, so it compiles once
    (it compiled twice, guarded on the kind), with the eager results."""
    from torch._dynamo.utils import counters

    from sit_fast.sampling import ModelForwards

    model = randomize_(tiny_sit()).eval().requires_grad_(False)
    x, t, y = inputs(model)
    y_pair = torch.cat([y, torch.full_like(y, model.num_classes)])
    mode = torch.inference_mode if inference else torch.no_grad
    with torch.inference_mode(not inference):
        first = x.clone()  # the other kind of tensor than those made in `mode`
    with mode():
        expected = [model(x, t, y), ModelForwards(model, cfg_scale=2.0).guided(x, t, y_pair)]
        torch._dynamo.reset()
        counters.clear()
        forwards = ModelForwards(model, cfg_scale=2.0, compile=True, compile_backend="eager")
        try:
            with torch._dynamo.config.patch(error_on_recompile=True):
                outs = [forwards.conditional(first, t, y), forwards.guided(first, t, y_pair)]
                later = x.clone()  # made in `mode`, as a sampler's later states are
                outs += [forwards.conditional(later, t.clone(), y.clone()), forwards.guided(later, t, y_pair.clone())]
            assert counters["stats"]["unique_graphs"] == 2  # one per forward
        finally:
            torch._dynamo.reset()
    for out, want in zip(outs, expected * 2):
        torch.testing.assert_close(out, want, rtol=0, atol=0)


def test_compiled_sampling_forwards_of_one_process_do_not_share_a_recompile_limit():
    """Each ModelForwards(compile=True) counts its own recompilations: guarded on the model and the
    guidance scale, the forwards of a sweep over scales (or models) in one process were compiled from
    one code object, and past Dynamo's limit ran eager without a word. A model dropped after its
    forwards is freed."""
    import gc
    import weakref

    from sit_fast.sampling import ModelForwards

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model = randomize_(tiny_sit()).eval().requires_grad_(False)
    kept = weakref.ref(model)
    x, t, y = inputs(model)
    y_pair = torch.cat([y, torch.full_like(y, model.num_classes)])
    with torch._dynamo.config.patch(recompile_limit=2):  # 8: the same, with twice the forwards
        for scale in (1.5, 2.0, 3.0, 4.0):
            forwards = ModelForwards(model, cfg_scale=scale, compile=True, compile_backend=backend)
            with torch.no_grad():
                forwards.guided(x, t, y_pair)
    assert len(graphs) == 4  # one per forwards: none ran eager past the limit
    del model, forwards
    gc.collect()
    assert kept() is None


def test_a_model_made_under_inference_mode_samples_with_its_modulation_reused():
    """Inference tensors keep no version counter, which the reused concatenation is keyed on: a model
    made under inference_mode raised at its first forward once ModelForwards had set the reuse."""
    from sit_fast.sampling import ModelForwards

    with torch.inference_mode():
        model = randomize_(tiny_sit()).eval().requires_grad_(False)
        x, t, y = inputs(model)
        expected = model(x, t, y)
        forwards = ModelForwards(model)
        torch.testing.assert_close(forwards.conditional(x, t, y), expected, rtol=0, atol=0)


@pytest.mark.parametrize("dim", [256, 7])
def test_timestep_embedding_against_the_formula(dim):
    """Written out in float64 per element: entry i < dim // 2 is cos(t f_i), then sin(t f_i),
    f_i = 10000^(-i / (dim // 2)); an odd dim ends with a zero."""
    from sit_fast.models import TimestepEmbedder

    t = torch.rand(5) * 1000
    got = TimestepEmbedder.timestep_embedding(t, dim)
    half = dim // 2
    expected = torch.zeros(5, dim, dtype=torch.float64)
    for n in range(5):
        for i in range(half):
            angle = float(t[n]) * 10000.0 ** (-i / half)
            expected[n, i], expected[n, half + i] = math.cos(angle), math.sin(angle)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=2e-4)  # fp32 arguments up to 1000


def test_compile_blocks_compiles_the_full_graph_unless_told_otherwise(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)  # the arguments alone are checked here
    model = tiny_sit()
    assert model.compile_blocks() is model
    assert model._compiled_step.compile_kwargs == {"fullgraph": True}
    assert model.compile_blocks(fullgraph=False, dynamic=False)._compiled_step.compile_kwargs == {
        "fullgraph": False, "dynamic": False}


def test_cast_matmul_weights_stores_the_linears_and_the_patch_embedding_in_the_dtype():
    """The Linears' and the patch embedding's weights, what autocast would cast on every call, and
    nothing else: the results under autocast to that dtype stay the same, bit for bit."""
    model = randomize_(tiny_sit()).eval().requires_grad_(False)
    x, t, y = inputs(model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(x, t, y)
        model.cast_matmul_weights_(torch.bfloat16)
        got = model(x, t, y)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            assert module.weight.dtype == module.bias.dtype == torch.bfloat16, name
    assert model.pos_embed.dtype == model.y_embedder.embedding_table.weight.dtype == torch.float32


def test_compiled_block_steps_of_many_models_do_not_share_a_recompile_limit():
    """Each compile_blocks model counts its own recompilations: five models, each compiled for a
    training step and a no-grad call (two entries each), exceed Dynamo's limit of 8 per code object
    if they share one, which fullgraph=True turns into a hard failure. A model dropped after its
    compilation is freed, weights and all."""
    import gc
    import weakref

    torch._dynamo.reset()
    weights = []
    for hidden in (16, 24, 32, 40, 48):
        model = randomize_(tiny_sit(hidden_size=hidden)).compile_blocks(backend="eager")
        x, t, y = inputs(model)
        model(x, t, y).square().mean().backward()
        with torch.no_grad():
            model(x, t, y)
        weights.append(weakref.ref(model.blocks[0].mlp.fc1.weight))
    config = torch._dynamo.config
    limit = getattr(config, "recompile_limit", None) or config.cache_size_limit  # (the older name)
    assert limit <= 8  # the limit the five would have exceeded together
    del model
    gc.collect()
    assert [weight() is None for weight in weights] == [True] * 5


def _recording_backend(graphs: list):
    """A Dynamo backend that runs each graph as it is and keeps a weak reference to it in `graphs`."""
    import weakref

    def backend(gm, example_inputs):
        graphs.append(weakref.ref(gm))
        return gm.forward

    return backend


def test_what_was_compiled_for_dropped_sampling_forwards_is_freed():
    """The graphs Dynamo compiled for a ModelForwards(compile=True), and the globals it put into
    sit_fast.sampling to call them, are freed with it: Dynamo's map from the code it compiled to the
    code it compiled it from, which that code's cache entries hold, is a cycle the garbage collector
    does not see, and kept them for good (a sweep over models or scales in one process, each one's)."""
    import gc

    import sit_fast.sampling as sampling
    from sit_fast.sampling import ModelForwards

    graphs, names = [], set(vars(sampling))  # Dynamo's names for the modules it imports stay: one per module
    model = randomize_(tiny_sit()).eval().requires_grad_(False)
    x, t, y = inputs(model)
    forwards = ModelForwards(model, cfg_scale=2.0, compile=True, compile_backend=_recording_backend(graphs))
    with torch.no_grad():
        forwards.conditional(x, t, y)
        forwards.guided(x, t, forwards.label_pair(y))
    assert len(graphs) == 2 and set(vars(sampling)) > names
    del model, forwards
    gc.collect()
    assert [graph() is None for graph in graphs] == [True, True]
    assert not [name for name in set(vars(sampling)) - names if not inspect.ismodule(vars(sampling)[name])]


def test_what_was_compiled_for_a_dropped_model_s_blocks_is_freed():
    """compile_blocks' graphs (a training step's and a no-grad call's), and the globals Dynamo put into
    sit_fast.models to call them, are freed with the model (and its EMA copy, which shares them)."""
    import copy
    import gc

    graphs, names = [], set(vars(models))
    model = randomize_(tiny_sit()).compile_blocks(backend=_recording_backend(graphs))
    ema = copy.deepcopy(model).requires_grad_(False)
    x, t, y = inputs(model)
    model(x, t, y).square().mean().backward()
    with torch.no_grad():
        ema(x, t, y)
    assert len(graphs) == 2 and set(vars(models)) > names
    del model
    gc.collect()
    assert [graph() is None for graph in graphs] == [False, False]  # the EMA copy's still
    del ema
    gc.collect()
    assert [graph() is None for graph in graphs] == [True, True]
    assert not [name for name in set(vars(models)) - names if not inspect.ismodule(vars(models)[name])]


def test_a_dropped_compiled_copy_does_not_wait_for_a_compile_lock_another_thread_holds():
    """The garbage collector may drop a with_own_code copy in any thread while another compiles: waiting
    there for Dynamo's compile lock blocked that thread (a deadlock where it held a lock the compiler
    needs). The code waits in _PENDING_CODE, and the next with_own_code call frees what was compiled."""
    import gc
    import threading

    from torch._dynamo import convert_frame

    import sit_fast.sampling as sampling
    from sit_fast.sampling import ModelForwards

    graphs, names = [], set(vars(sampling))
    model = randomize_(tiny_sit()).eval().requires_grad_(False)
    x, t, y = inputs(model)
    forwards = ModelForwards(model, cfg_scale=2.0, compile=True, compile_backend=_recording_backend(graphs))
    with torch.no_grad():
        forwards.conditional(x, t, y)
    assert len(graphs) == 1 and not getattr(models, "_PENDING_CODE", [])
    held, release = threading.Event(), threading.Event()

    def hold():
        with convert_frame.compile_lock:
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    try:
        assert held.wait(30)
        dropped = [model, forwards]  # dropped in the collector's thread: a del here may free them at once
        del model, forwards

        def drop():
            dropped.clear()
            gc.collect()

        collector = threading.Thread(target=drop, daemon=True)
        collector.start()
        collector.join(10)
        assert not collector.is_alive()  # not blocked on the lock
        assert models._PENDING_CODE and graphs[0]() is not None
    finally:
        release.set()
        holder.join(30)
    models.with_own_code(lambda: None)
    gc.collect()
    assert not models._PENDING_CODE and graphs[0]() is None
    assert not [name for name in set(vars(sampling)) - names if not inspect.ismodule(vars(sampling)[name])]


def test_an_eager_call_does_not_make_the_compiled_model_compile_again(monkeypatch):
    """The attention backend's memo, filled in by an eager call (train.py's sample grid of the EMA model
    between compiled training steps), was read by the compiled code, which was guarded on it."""
    from sit_fast import attention

    monkeypatch.setattr(attention, "_RESOLVED", {})
    torch._dynamo.reset()
    model = randomize_(tiny_sit())
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x, t, y = inputs(model)
    compiled(x, t, y)
    model(x, t, y)
    assert attention._RESOLVED  # the eager call memoised its choice
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled(x, t, y)


def test_a_compiled_model_with_fused_kernels_compiles_once(monkeypatch):
    """The fused ops' memo per dtype, filled in by the first compiled call, was read by the compiled
    code, which was guarded on it: every compiled model traced again on its second call."""
    from sit_fast import models

    monkeypatch.setattr(models, "_FUSED_OPS", {})
    torch._dynamo.reset()
    model = randomize_(tiny_sit(fused_kernels=True))
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x, t, y = inputs(model)
    compiled(x, t, y)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled(x, t, y)


def test_model_with_compiled_blocks_pickles_and_deepcopies():
    """torch.save(model) after compile_blocks: the compiled step pickles as its arguments; an EMA
    deepcopy shares it."""
    import copy
    import io

    model = randomize_(tiny_sit()).eval().compile_blocks(backend="eager")
    x, t, y = inputs(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)
    assert restored._compiled_step.compile_kwargs == {"backend": "eager", "fullgraph": True}
    assert copy.deepcopy(model)._compiled_step is model._compiled_step
    with torch.no_grad():
        torch.testing.assert_close(restored(x, t, y), model(x, t, y), rtol=0, atol=0)


def test_flash_attn_older_than_2_7_is_not_used(monkeypatch):
    """flash-attn's kernels became torch custom ops (traceable by torch.compile) in 2.7: an older one
    broke the compiled fast path and the fake-tensor memory count, so it is reported unusable."""
    import importlib.metadata
    import importlib.util

    from sit_fast.attention import optional_module_problem

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(importlib, "import_module", lambda name: object())
    for version, usable in (("2.6.3", False), ("2.7.0", True), ("2.8.3.post1", True), ("3.0.0b1", True)):
        monkeypatch.setattr(importlib.metadata, "version", lambda name, v=version: v)
        problem = optional_module_problem("flash_attn", "flash-attn", (2, 7))
        assert (problem is None) == usable, (version, problem)
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "2.5.9")
    assert optional_module_problem("flash_attn", "flash-attn", (2, 7)).startswith("flash_attn 2.5.9 is older than 2.7")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert "not installed" in optional_module_problem("flash_attn", "flash-attn", (2, 7))


def test_flash_attn_that_does_not_import_is_not_used(tmp_path, monkeypatch):
    """A flash-attn found but failing to import (its extension built for another torch): "auto" must not
    pick it, or every forward would raise; the reason names the error (its first line) and the way out."""
    from sit_fast.attention import optional_module_problem

    package = tmp_path / "flash_attn"
    package.mkdir()
    (package / "__init__.py").write_text(
        'raise ImportError("flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda\\n(from the CUDA extension)")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    try:
        assert optional_module_problem("flash_attn", "flash-attn", (2, 7)) == (
            "flash_attn is installed but does not import (ImportError: flash_attn_2_cuda.so: undefined symbol: "
            "_ZN3c104cuda): rebuild it against this torch (pip install 'flash-attn>=2.7' --no-build-isolation "
            "--force-reinstall)")
        (package / "__init__.py").write_text("")
        assert optional_module_problem("flash_attn", "flash-attn", (2, 7)) is None  # a source tree: no version
    finally:  # the stand-in imported above must not outlive the test
        sys.modules.pop("flash_attn", None)


def test_auto_attention_on_another_device_is_pytorch_attention():
    """SDPA and the math backend are plain torch: "auto" takes SDPA on any device (an Apple GPU, say)."""
    from sit_fast.attention import select_backend

    for device in ("mps", "xpu", "meta"):
        assert select_backend("auto", device, torch.float16, 72) == "sdpa"
        assert select_backend("math", device, torch.float32, 72) == "math"


def test_auto_attention_passes_over_flash_attn_on_a_gpu_older_than_ampere(monkeypatch):
    """flash-attn 2 refuses GPUs before compute capability 8.0 (a T4, a V100) at its first call: "auto"
    takes SDPA there, and asking for flash_attn says why not."""
    import types

    from sit_fast import attention

    monkeypatch.setitem(attention._OPTIONAL_MODULES, "flash_attn", None)  # as if installed and importable
    for (major, minor), chosen in (((7, 5), "sdpa"), ((8, 0), "flash_attn"), ((9, 0), "flash_attn")):
        gpu = types.SimpleNamespace(major=major, minor=minor, name=f"GPU {major}.{minor}")
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device, gpu=gpu: gpu)
        assert attention.select_backend("auto", "cuda", torch.bfloat16, 72) == chosen
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(
        major=7, minor=5, name="GPU 7.5"))
    with pytest.raises(ValueError, match=r"attention backend 'flash_attn' cannot run here: needs a GPU of compute "
                                         r"capability 8.0 or later, got 7.5 \(GPU 7.5\); usable: sdpa, math"):
        attention.select_backend("flash_attn", "cuda", torch.bfloat16, 72)


def _a_hopper_gpu_with_flash_attn(monkeypatch):
    """sit_fast.attention as on a compute capability 9.0 GPU with flash-attn importable."""
    import types

    from sit_fast import attention

    monkeypatch.setitem(attention._OPTIONAL_MODULES, "flash_attn", None)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: types.SimpleNamespace(major=9, minor=0, name="GPU 9.0"))
    return attention


def test_auto_takes_flash_attn_only_where_flash_attn_runs(monkeypatch):
    """flash-attn 2: half precision, head dims up to 256 in multiples of 8; elsewhere "auto" takes SDPA
    (flash-attn would fail at the first forward)."""
    attention = _a_hopper_gpu_with_flash_attn(monkeypatch)
    for dtype, head_dim, chosen in ((torch.bfloat16, 256, "flash_attn"), (torch.bfloat16, 264, "sdpa"),
                                    (torch.float16, 72, "flash_attn"), (torch.bfloat16, 12, "sdpa"),
                                    (torch.bfloat16, 4, "sdpa"),
                                    (torch.float32, 72, "sdpa")):
        assert attention.select_backend("auto", "cuda", dtype, head_dim) == chosen, (dtype, head_dim)
    with pytest.raises(ValueError, match="supports dtypes float16, bfloat16, got float32; usable: sdpa, math"):
        attention.select_backend("flash_attn", "cuda", torch.float32, 72)


def test_flash_attn_not_installed_is_passed_over_and_asking_for_it_says_so(monkeypatch):
    """On a GPU flash-attn runs on, without the package: "auto" takes SDPA, and --attn-backend flash_attn
    is refused with the package's problem, which names the install command."""
    attention = _a_hopper_gpu_with_flash_attn(monkeypatch)
    problem = "the flash_attn package is not installed (pip install 'flash-attn>=2.7' --no-build-isolation)"
    monkeypatch.setitem(attention._OPTIONAL_MODULES, "flash_attn", problem)
    assert attention.select_backend("auto", "cuda", torch.bfloat16, 72) == "sdpa"
    with pytest.raises(ValueError, match=re.escape(f"attention backend 'flash_attn' cannot run here: {problem}; "
                                                   f"usable: sdpa, math")):
        attention.select_backend("flash_attn", "cuda", torch.bfloat16, 72)


def test_a_backend_that_cannot_run_is_said_in_its_words_by_compiled_blocks_too():
    """compile_blocks(): an attention backend that cannot run on the inputs (flash_attn on the CPU) is the
    same ValueError as without compiling, not Dynamo's report of an exception it found while tracing."""
    model = tiny_sit(attn_backend="flash_attn")
    with pytest.raises(ValueError) as eager:
        model(*inputs(model))
    model.compile_blocks(backend="eager")
    with pytest.raises(ValueError) as compiled:
        model(*inputs(model))
    assert str(compiled.value) == str(eager.value)
    assert "attention backend 'flash_attn' cannot run here" in str(eager.value)


def test_flash_attn_installed_is_not_taken_off_the_gpu(monkeypatch):
    attention = _a_hopper_gpu_with_flash_attn(monkeypatch)
    assert attention.select_backend("auto", "cpu", torch.bfloat16, 64) == "sdpa"
    with pytest.raises(ValueError, match=r"attention backend 'flash_attn' cannot run here: needs a cuda device, "
                                         r"got cpu"):
        attention.select_backend("flash_attn", "cpu", torch.bfloat16, 64)


def test_what_auto_chose_is_logged_once(monkeypatch, caplog):
    from sit_fast import attention

    monkeypatch.setattr(attention, "_RESOLVED", {})
    with caplog.at_level(logging.INFO, logger="sit_fast.attention"):
        for _ in range(2):
            assert attention.resolve_backend("auto", torch.device("cpu"), torch.float32, 72) == "sdpa"
            assert attention.resolve_backend("math", torch.device("cpu"), torch.float32, 72) == "math"
    logged = [r.getMessage() for r in caplog.records]
    assert logged == ["attention backend auto -> sdpa (cpu, torch.float32, head dim 72)"]


def test_a_backend_resolved_with_the_sdpa_kernel_chosen_is_not_taken_for_one_resolved_without(monkeypatch):
    """The memo keeps sdpa_chosen apart: SIT_FAST_SDPA_BACKEND, not read where the caller chose the kernel,
    is still checked where it did not."""
    from sit_fast import attention

    monkeypatch.setattr(attention, "_RESOLVED", {})
    monkeypatch.setenv("SIT_FAST_SDPA_BACKEND", "cudnn")
    cpu = torch.device("cpu")
    assert attention.resolve_backend("sdpa", cpu, torch.float32, 72, sdpa_chosen=True) == "sdpa"
    with pytest.raises(ValueError, match="^SIT_FAST_SDPA_BACKEND=cudnn: it does not run on cpu"):
        attention.resolve_backend("sdpa", cpu, torch.float32, 72)


def test_resolved_backend_is_memoised_per_dtype(monkeypatch):
    attention = _a_hopper_gpu_with_flash_attn(monkeypatch)
    monkeypatch.setattr(attention, "_RESOLVED", {})
    cuda = torch.device("cuda")
    assert attention.resolve_backend("auto", cuda, torch.float32, 72) == "sdpa"
    assert attention.resolve_backend("auto", cuda, torch.bfloat16, 72) == "flash_attn"
    assert attention.resolve_backend("auto", cuda, torch.float32, 72) == "sdpa"


def test_sdpa_attention_runs_the_kernel_the_variable_forces(monkeypatch):
    import torch.nn.attention as nn_attention
    from torch.nn.attention import SDPBackend

    from sit_fast.attention import attention_fn

    seen, real = [], nn_attention.sdpa_kernel

    def recording(backends, *args, **kwargs):
        seen.append(backends)
        return real(backends, *args, **kwargs)

    monkeypatch.setattr(nn_attention, "sdpa_kernel", recording)
    monkeypatch.setenv("SIT_FAST_SDPA_BACKEND", "math")
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    out = attention_fn("sdpa")(q, k, v)
    assert seen == [SDPBackend.MATH]
    torch.testing.assert_close(out, math_attention(q, k, v))


@pytest.mark.parametrize("kernel", ["flash", "cudnn", "efficient", "math"])
def test_each_sdpa_kernel_name_forces_that_kernel(kernel, monkeypatch):
    import contextlib

    import torch.nn.attention as nn_attention
    from torch.nn.attention import SDPBackend

    from sit_fast.attention import attention_fn

    seen = []
    monkeypatch.setattr(nn_attention, "sdpa_kernel", lambda backends: seen.append(backends) or contextlib.nullcontext())
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    torch.testing.assert_close(attention_fn("sdpa", kernel)(q, k, v), math_attention(q, k, v))
    assert seen == [{"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                     "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[kernel]]
    with pytest.raises(ValueError, match=r"^unknown SDPA backend 'efficent'; choose one of flash, cudnn, efficient, "
                                         r"math$"):
        attention_fn("sdpa", "efficent")


def test_each_resolved_backend_name_gives_its_own_attention():
    """"math" is the written-out reference (not PyTorch's SDPA, whose kernels it is compared with)."""
    from sit_fast.attention import attention_fn, flash_attn_attention

    assert attention_fn("math") is math_attention
    assert attention_fn("flash_attn") is flash_attn_attention
    with pytest.raises(ValueError, match=r"^unknown attention backend 'auto'; choose one of"):
        attention_fn("auto")  # resolved first (select_backend)


def test_an_empty_sdpa_backend_variable_is_unset(monkeypatch):
    """SIT_FAST_SDPA_BACKEND= (set, empty) leaves the choice to PyTorch, as when it is not set."""
    from sit_fast.attention import attention_fn, check_forced_sdpa, sdpa_backend_from_env

    monkeypatch.setenv("SIT_FAST_SDPA_BACKEND", "")
    assert sdpa_backend_from_env() is None
    check_forced_sdpa("cpu", torch.float32)
    assert select_backend("sdpa", "cpu", torch.float32, 72) == "sdpa"
    assert attention_fn("sdpa") is F.scaled_dot_product_attention


def test_auto_checks_the_forced_sdpa_kernel_where_it_takes_sdpa(monkeypatch):
    """"auto" that takes SDPA runs the kernel SIT_FAST_SDPA_BACKEND forces: one that cannot run here is
    refused at the choice, as for --attn-backend sdpa."""
    monkeypatch.setenv("SIT_FAST_SDPA_BACKEND", "cudnn")
    with pytest.raises(ValueError, match=r"^SIT_FAST_SDPA_BACKEND=cudnn: it does not run on cpu; choose one of flash, "
                                         r"math, or unset it$"):
        select_backend("auto", "cpu", torch.float32, 72)
    assert select_backend("auto", "cpu", torch.float32, 72, sdpa_chosen=True) == "sdpa"


def test_training_drops_labels_to_the_null_class_at_class_dropout_prob():
    from sit_fast.models import LabelEmbedder

    embedder = LabelEmbedder(10, 8, 0.5)
    null = embedder.embedding_table.weight[10]
    labels = torch.randint(0, 10, (4000,))
    dropped = (embedder(labels, train=True) == null).all(dim=1).float().mean().item()
    assert 0.45 < dropped < 0.55  # 6 standard deviations either side of 0.5
    assert not (embedder(labels, train=False) == null).all(dim=1).any()


def test_forced_label_drops_follow_force_drop_ids():
    """Upstream's force_drop_ids: 1 drops the label (to the null class), 0 keeps it, whatever the mode."""
    from sit_fast.models import LabelEmbedder

    embedder = LabelEmbedder(10, 8, 0.1)
    out = embedder(torch.tensor([1, 2, 3, 4]), train=False, force_drop_ids=torch.tensor([1, 0, 1, 0]))
    torch.testing.assert_close(out, embedder.embedding_table(torch.tensor([10, 2, 10, 4])))


def test_the_package_names_load_on_first_use():
    """`import sit_fast` loads no torch (a `python -m sit_fast.<module>` can first make a Ctrl-C quiet);
    each public name is there on first use, and an unknown one is an AttributeError."""
    code = """
import sys
import sit_fast
assert "torch" not in sys.modules, "import sit_fast loaded torch"
from sit_fast import SiT, Sampler
import sit_fast.models, sit_fast.transport
assert SiT is sit_fast.models.SiT and Sampler is sit_fast.transport.Sampler
assert all(getattr(sit_fast, name) is not None for name in sit_fast.__all__)
assert set(sit_fast.__all__) <= set(dir(sit_fast))
assert sit_fast.transport.create_transport is sit_fast.create_transport  # a submodule, imported or not
assert sit_fast.export.main is sys.modules["sit_fast.export"].main
try:
    sit_fast.not_a_name
except AttributeError as err:
    assert "not_a_name" in str(err)
else:
    raise AssertionError("no AttributeError")
"""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stderr[-2000:]


def test_resolved_backend_is_memoised_per_device_not_per_device_type(monkeypatch):
    """Two GPUs of one machine, one too old for flash-attn: each resolves "auto" for itself."""
    import types

    attention = _a_hopper_gpu_with_flash_attn(monkeypatch)
    monkeypatch.setattr(attention, "_RESOLVED", {})
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(
        major=9 if device.index == 0 else 7, minor=0 if device.index == 0 else 5, name=f"GPU {device.index}"))
    assert attention.resolve_backend("auto", torch.device("cuda", 0), torch.bfloat16, 72) == "flash_attn"
    assert attention.resolve_backend("auto", torch.device("cuda", 1), torch.bfloat16, 72) == "sdpa"
    with pytest.raises(ValueError, match=r"needs a GPU of compute capability 8\.0 or later, got 7\.5 \(GPU 1\)"):
        attention.resolve_backend("flash_attn", torch.device("cuda", 1), torch.bfloat16, 72)
