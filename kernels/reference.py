"""Readable PyTorch references for the fused adaLN ops; tests and benchmarks import these.

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
