"""Readable PyTorch references for the fused ops; tests and benchmarks import these.

In a SiT block each sublayer reads

    h     = LayerNorm(x) * (1 + scale) + shift      # LayerNorm without affine, eps = 1e-6
    x_out = x + gate * sublayer(h)                  # gated residual

with shift, scale, gate of shape (B, D), broadcast over the T tokens of each sample.

Arithmetic runs in float32, or in the inputs' dtype when that is wider (float64 gives the exact
ground truth the tests compare against); results come back in x's dtype, as the kernels do.
"""
import torch
import torch.nn.functional as F


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def layernorm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """y = LN(x) * (1 + scale[:, None, :]) + shift[:, None, :]; x (B, T, D), shift/scale (B, D)."""
    acc = _compute_dtype(x)
    x_hat = F.layer_norm(x.to(acc), x.shape[-1:], eps=eps)  # (B, T, D), statistics in acc
    y = x_hat * (1 + scale.to(acc)[:, None, :]) + shift.to(acc)[:, None, :]
    return y.to(x.dtype)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + gate[:, None, :] * y; x, y (B, T, D), gate (B, D)."""
    acc = _compute_dtype(x)
    return (x.to(acc) + gate.to(acc)[:, None, :] * y.to(acc)).to(x.dtype)


def gated_residual_layernorm_modulate(
    x: torch.Tensor,
    gate: torch.Tensor,
    y: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_out, h) with x_out = x + gate * y and h = layernorm_modulate(x_out, shift, scale).

    h is computed from x_out as stored (rounded to x's dtype), exactly as the unfused pair would.
    """
    x_out = gated_residual(x, gate, y)
    return x_out, layernorm_modulate(x_out, shift, scale, eps)


def bias_gelu(a: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GELU_tanh(a + bias); a (..., H), bias (H,)."""
    acc = _compute_dtype(a)
    return F.gelu(a.to(acc) + bias.to(acc), approximate="tanh").to(a.dtype)


def bias_gelu_backward(a: torch.Tensor, bias: torch.Tensor, dg: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(da, g, dbias) of g = bias_gelu(a, bias) for the upstream gradient dg, by autograd."""
    acc = _compute_dtype(a)
    a_, bias_ = a.detach().to(acc).requires_grad_(), bias.detach().to(acc).requires_grad_()
    with torch.enable_grad():
        g = F.gelu(a_ + bias_, approximate="tanh")
        da, dbias = torch.autograd.grad(g, (a_, bias_), dg.to(acc))
    return da.to(a.dtype), g.detach().to(a.dtype), dbias.to(bias.dtype)


# ---------------------------------------------------------------------------------------------------
# What a correct kernel may differ from these by, beyond rounding its outputs (tests and benchmarks).

# Unit error of x_hat stored for backward in the normalised output's dtype, rounded to nearest (on a
# GPU, and in the Triton interpreter as kernels._launch makes it round): bf16 2**-8 relative, fp16
# 2**-11, given 2**-10.
X_HAT_STORAGE_ERROR = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10}


def fused_from_stored(
    x: torch.Tensor,
    gate: torch.Tensor,
    y: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    x_out_stored: torch.Tensor,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """gated_residual_layernorm_modulate, with h the normalisation of x_out as a kernel stored it.

    The fused op defines h from x_out rounded to x's dtype; computed in a wider dtype, the reference
    would normalise x_out unrounded and differ from a correct kernel by that rounding times
    rstd * (1 + scale). Here the rounding (x_out_stored - x_out) enters as a constant
    (straight-through), so h matches the kernel's and the gradients stay those of the exact function.
    """
    x_out = gated_residual(x, gate, y)
    x_out_kept = x_out + (x_out_stored.detach().to(x_out.dtype) - x_out).detach()
    return x_out, layernorm_modulate(x_out_kept, shift, scale, eps)


def x_hat_rounding_bounds(
    op: str, inputs: dict[str, torch.Tensor], x_out: torch.Tensor | None, dh: torch.Tensor, eps: float,
    norm_dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """Worst-case first-order error of each input gradient from backward reading x_hat stored in
    norm_dtype (the normalised output's dtype), by input name; empty where x_hat is kept exactly.
    The store's relative error is X_HAT_STORAGE_ERROR's.

    inputs: the op's arguments by name (x, shift, scale; gate, y), in a wide dtype; x_out: the fused
    op's x_out (the tensor it normalises; None for layernorm_modulate); dh: the normalised output's
    upstream gradient. With |e| <= u |x_hat| elementwise, g = dh (1 + scale), M = mean_D(g x_hat):
        dscale  error <= u * sum_t |dh x_hat|
        d_res   error <= u * rstd * |x_hat| * (|M| + mean_D |g x_hat|)
    d_res is dx; the fused op's dy = d_res * gate and dgate = sum_t d_res * y carry it along.
    """
    u = X_HAT_STORAGE_ERROR.get(norm_dtype)
    if u is None or op == "gated_residual":
        return {}
    with torch.no_grad():
        acc = _compute_dtype(inputs["x"])
        x_norm = (inputs["x"] if op == "layernorm_modulate" else x_out).detach().to(acc)
        dh = dh.detach().to(acc)
        scale = inputs["scale"].detach().to(acc)
        centred = x_norm - x_norm.mean(-1, keepdim=True)
        rstd = ((centred * centred).mean(-1, keepdim=True) + eps).rsqrt()
        x_hat = centred * rstd
        g_x_hat = dh * (1 + scale[:, None, :]) * x_hat
        d_res = u * rstd * x_hat.abs() * (g_x_hat.mean(-1, keepdim=True).abs() + g_x_hat.abs().mean(-1, keepdim=True))
        bounds = {"scale": u * (dh * x_hat).abs().sum(1), "x": d_res}
        if op == "gated_residual_layernorm_modulate":
            bounds["y"] = d_res * inputs["gate"].detach().to(acc).abs()[:, None, :]
            bounds["gate"] = (d_res * inputs["y"].detach().to(acc).abs()).sum(1)
    return bounds
