"""sit_fast's SiT against an independent model built as upstream builds it (tests/upstream_sit.py).

The other model tests compare the fast path with sit_fast's own reference modules; these compare
both with a model that shares no code with sit_fast, so a mistake made the same way in both of
sit_fast's paths (the position table, the unpatchify order, the timestep features, the label
table, the guidance mix) still fails here.
"""
import pytest
import torch

from sit_fast.models import SiT, get_2d_sincos_pos_embed
from sit_fast.parity import compare, randomize_zero_init_

# The independent model is built from timm's modules (the dev extra installs it): without timm these
# tests are skipped, not a collection error that would stop the whole run.
pytest.importorskip("timm", reason="the independent upstream model is built from timm's modules: pip install timm")
from tests.test_fast_path import FP32_BOUNDS  # noqa: E402
from tests.upstream_sit import UpstreamSiT, position_table  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

CONFIGS = {
    # grid 6 (not a power of two), learn_sigma, head dim 12
    "p2-sigma": dict(input_size=12, patch_size=2, hidden_size=48, depth=2, num_heads=4, num_classes=10,
                     learn_sigma=True),
    # patch 4, no sigma, 7 classes, head dim 16
    "p4-nosigma": dict(input_size=8, patch_size=4, hidden_size=32, depth=3, num_heads=2, num_classes=7,
                       learn_sigma=False),
    # no label dropout: no null row in the table
    "no-null-row": dict(input_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=5,
                        learn_sigma=True, class_dropout_prob=0.0),
}


def random_weights_(model: torch.nn.Module) -> torch.nn.Module:
    """Every trainable parameter N(0, 0.1^2) (the position table stays the fixed one)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    return model


def inputs(cfg, n, dtype=torch.float64):
    x = torch.randn(n, cfg.get("in_channels", 4), cfg["input_size"], cfg["input_size"], dtype=dtype)
    t = torch.rand(n, dtype=dtype)
    y = torch.randint(0, cfg["num_classes"], (n,))
    return x, t, y


@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_dicts_load_both_ways_strictly(name):
    cfg = CONFIGS[name]
    upstream, ours = UpstreamSiT(**cfg), SiT(**cfg)
    assert {k: v.shape for k, v in upstream.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    ours.load_state_dict(upstream.state_dict(), strict=True)
    upstream.load_state_dict(ours.state_dict(), strict=True)


@pytest.mark.parametrize("dim,grid", [(48, 6), (32, 2), (1152, 16), (384, 32)])
def test_position_table_equals_independent_one(dim, grid):
    ours = torch.as_tensor(get_2d_sincos_pos_embed(dim, grid))
    torch.testing.assert_close(ours, torch.as_tensor(position_table(dim, grid)), rtol=1e-12, atol=1e-12)
    model = SiT(input_size=grid * 2, patch_size=2, hidden_size=dim, depth=0, num_heads=1, num_classes=3)
    torch.testing.assert_close(model.pos_embed[0].double(), ours, rtol=0, atol=1e-7)  # stored in fp32


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("train", [False, True])
def test_forward_and_gradients_equal_upstream_in_float64(name, train):
    cfg = CONFIGS[name]
    upstream = random_weights_(UpstreamSiT(**cfg)).double().train(train)
    ours = SiT(**cfg).double().train(train)
    ours.load_state_dict(upstream.state_dict())
    x, t, y = inputs(cfg, 5)
    target = torch.randn_like(x)
    results = []
    for model in (upstream, ours):
        torch.manual_seed(1)  # the same label-dropout draws in train mode
        out = model(x, t, y)
        ((out - target) ** 2).mean().backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (ref, ref_grads), (out, grads) = results
    assert out.shape == (5, 4, cfg["input_size"], cfg["input_size"])
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    assert grads.keys() == ref_grads.keys()
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-9, atol=1e-12, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("name", ["p2-sigma", "p4-nosigma"])
def test_guided_forward_equals_upstream_in_float64(name):
    cfg = CONFIGS[name]
    upstream = random_weights_(UpstreamSiT(**cfg)).double().eval()
    ours = SiT(**cfg).double().eval()
    ours.load_state_dict(upstream.state_dict())
    x, t, y = inputs(cfg, 3)
    x, t = torch.cat([x, x]), torch.cat([t, t])
    y = torch.cat([y, torch.full_like(y, cfg["num_classes"])])
    torch.testing.assert_close(ours.forward_with_cfg(x, t, y, 4.0), upstream.forward_with_cfg(x, t, y, 4.0),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["p2-sigma", "p4-nosigma"])
def test_fast_path_fp32_matches_upstream(name):
    """Fused kernels (the Triton interpreter on the CPU) and SDPA, forward and every gradient."""
    upstream = randomize_zero_init_(UpstreamSiT(**CONFIGS[name]))
    fast = SiT(**CONFIGS[name], attn_backend="sdpa", fused_kernels=True)
    report = compare(upstream, fast, batch_size=4, device=DEVICE)
    assert report.ok(), "\n".join(report.failures()) + "\n" + report.to_markdown()
    tol = FP32_BOUNDS  # tighter than TOLERANCES["fp32"] on the CPU
    assert report.output_rel_err <= tol["output"] and report.grad_rel_err_max <= tol["grad"], report.to_markdown()


def test_fast_path_bf16_guided_matches_upstream():
    """Under bf16 autocast with guidance: within 3x upstream's own bf16 error, tensor by tensor."""
    upstream = randomize_zero_init_(UpstreamSiT(**CONFIGS["p2-sigma"]))
    fast = SiT(**CONFIGS["p2-sigma"], attn_backend="sdpa", fused_kernels=True)
    report = compare(upstream, fast, batch_size=4, autocast_dtype=torch.bfloat16, device=DEVICE, cfg_scale=4.0,
                     yardstick=True)
    assert report.yardstick is not None
    assert report.ok(), "\n".join(report.failures()) + "\n" + report.to_markdown()
