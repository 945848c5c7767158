"""SiT: Scalable Interpolant Transformers (Ma et al. 2024), the DiT backbone of arXiv 2401.08740.

The parameters and state_dict are upstream SiT's, key for key and shape for shape, so released
checkpoints load with strict=True. The maths is upstream's; only the route through it can change:

    attn_backend   "math" (reference), "sdpa", "flash_attn" or "auto"    (sit_fast.attention)
    fused_kernels  False (reference), True, or "auto"                    (kernels/, Triton)

A block computes, with c = t_emb + y_emb and (shift, scale, gate) = Linear(SiLU(c)):

    x = x + gate_msa * Attn(LN(x) * (1 + scale_msa) + shift_msa)
    x = x + gate_mlp * MLP(LN(x) * (1 + scale_mlp) + shift_mlp)

The forward loop is written around the seams between sublayers: "gated residual, then LayerNorm +
modulate for the next sublayer" is one step (`gated_residual_layernorm_modulate`), the same maths
whether the step runs as plain PyTorch ops or as one fused kernel.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
import numbers
import os
import sys
import types
import weakref
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.utils.flop_counter import register_flop_formula

import kernels

if getattr(kernels, "SIT_FAST_KERNELS", False) is not True:  # before its submodules are asked for
    if getattr(kernels, "__file__", None) is None:  # a folder named kernels without __init__.py, found first
        # Python 3.10 lists a folder once per path entry that finds it ('.' and '' give ./kernels and /cwd/kernels)
        folders = ", ".join(dict.fromkeys(os.path.abspath(folder) for folder in getattr(kernels, "__path__", [])))
        raise ImportError(f"the `kernels` imported is the folder {folders} (no __init__.py), found before sit_fast's "
                          f"`kernels` package: run from another folder, or rename that one")
    raise ImportError(
        f"the `kernels` package imported ({kernels.__file__}) is not sit_fast's: "
        f"Hugging Face's `kernels` package (pip's `kernels`) has the same import name, and one environment "
        f"holds only one of them; uninstall it (pip uninstall kernels) and reinstall sit_fast (pip install -e .), "
        f"or use another environment")

from kernels import _launch  # noqa: E402
from sit_fast.attention import ATTN_BACKENDS, SDPA_BACKENDS, attention_fn, resolve_backend
from sit_fast.errors import UserError

LN_EPS = 1e-6


#################################################################################
#                 Reference adaLN ops (plain PyTorch, upstream maths)            #
#################################################################################

def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def layernorm_modulate_ref(x, shift, scale, eps: float = LN_EPS):
    """modulate(LayerNorm(x)), LayerNorm without affine parameters."""
    return modulate(F.layer_norm(x, (x.shape[-1],), eps=eps), shift, scale)


def gated_residual_ref(x, gate, y):
    return x + gate.unsqueeze(1) * y


def gated_residual_layernorm_modulate_ref(x, gate, y, shift, scale, eps: float = LN_EPS):
    x = gated_residual_ref(x, gate, y)
    return x, layernorm_modulate_ref(x, shift, scale, eps)


REFERENCE_OPS = {
    "layernorm_modulate": layernorm_modulate_ref,
    "gated_residual": gated_residual_ref,
    "gated_residual_layernorm_modulate": gated_residual_layernorm_modulate_ref,
}


_FUSED_OPS: dict[torch.dtype, dict[str, Callable]] = {}


def fused_ops(compute_dtype: torch.dtype) -> dict[str, Callable]:
    """The fused Triton kernels, under the same names and signatures as REFERENCE_OPS.

    The modulated outputs h come out in compute_dtype (under autocast, the dtype the next Linear
    runs in) while the residual stream keeps its own dtype, as in the reference. One dict per dtype,
    so eager calls see the same objects on every call. A compiled caller does not read the memo: its
    code would be guarded on the memo's contents and compiled again on its second call, once its
    first had filled them in.
    """
    if torch.compiler.is_compiling():
        return _fused_ops_of(compute_dtype)
    if compute_dtype not in _FUSED_OPS:
        _FUSED_OPS[compute_dtype] = _fused_ops_of(compute_dtype)
    return _FUSED_OPS[compute_dtype]


def _fused_ops_of(compute_dtype: torch.dtype) -> dict[str, Callable]:
    return {
        "layernorm_modulate": functools.partial(kernels.layernorm_modulate, out_dtype=compute_dtype),
        "gated_residual": kernels.gated_residual,
        "gated_residual_layernorm_modulate": functools.partial(
            kernels.gated_residual_layernorm_modulate, h_dtype=compute_dtype
        ),
    }


# Triton reads TRITON_INTERPRET once, when it is imported; so do we.
_TRITON_INTERPRET = kernels.interpreter_requested()
_TRITON_IMPORTED = kernels.triton_imported()


def triton_interpreter_enabled() -> bool:
    return _TRITON_INTERPRET


_SHAPES_ONLY = False  # see shapes_only()


@contextlib.contextmanager
def shapes_only():
    """Forward passes inside run on fake tensors (sit_fast.memory): the fused ops' registered fakes
    stand in for the kernels, so fused_kernels=True needs no device or interpreter that runs them."""
    global _SHAPES_ONLY
    previous, _SHAPES_ONLY = _SHAPES_ONLY, True
    try:
        yield
    finally:
        _SHAPES_ONLY = previous


KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the residual stream dtypes the kernels take


def _fused_on(fused_kernels: bool | str, device: torch.device, dtype: torch.dtype | None = None) -> bool:
    """resolve_fused_kernels without the launch settings' check: what forward() asks on every call,
    with the residual stream's dtype ("auto" leaves float64 to the reference ops)."""
    if fused_kernels == "auto":
        if (dtype is not None and dtype not in KERNEL_DTYPES) or not _TRITON_IMPORTED:  # the reference ops
            return False
        return device.type == "cuda" or (device.type == "cpu" and triton_interpreter_enabled())
    if fused_kernels is True and dtype is not None and dtype not in KERNEL_DTYPES:
        raise ValueError(f"fused_kernels=True: the kernels take float32, bfloat16 or float16 activations, got "
                         f"{dtype}: use fused_kernels='auto' (the reference ops for {dtype}) or False")
    if fused_kernels is True and device.type == "cpu" and not (triton_interpreter_enabled() or _SHAPES_ONLY):
        raise ValueError(
            "fused_kernels=True: on the CPU the kernels need the Triton interpreter: set TRITON_INTERPRET=1 "
            "before triton is imported, or use fused_kernels=False"
        )
    if fused_kernels is True and not _SHAPES_ONLY and device.type != "meta":
        if device.type not in ("cuda", "cpu"):
            raise ValueError(f"fused_kernels=True: the kernels run on CUDA GPUs (and on the CPU through the Triton "
                             f"interpreter), not on {device.type}: use fused_kernels=False or 'auto'")
        if not _TRITON_IMPORTED:
            raise ValueError(f"fused_kernels=True: the kernels need triton, which failed to import "
                             f"({kernels._TRITON_IMPORT_ERROR}): install triton, or use fused_kernels=False")
    return bool(fused_kernels)


def resolve_fused_kernels(fused_kernels: bool | str, device: torch.device) -> bool:
    """"auto": on for CUDA, off on the CPU unless the Triton interpreter is enabled. ValueError when
    the kernels are on but cannot run there, or SIT_FAST_KERNEL_LAUNCH or SIT_FAST_GELU_EPILOGUE is
    malformed."""
    fused = _fused_on(fused_kernels, device)
    if fused:
        kernels.launch_settings()  # raises now rather than at the first launch
        check_gelu_epilogue_setting()
    return fused


def fused_kernels_flag(flag: str, device: torch.device, auto_on_cpu: bool = False,
                       origin: str = "") -> tuple[bool | str, bool]:
    """The scripts' --fused-kernels {auto,on,off}: (the model's fused_kernels setting, whether the
    kernels run). "auto" is off on the CPU, where the kernels run only through the Triton interpreter
    (a test tool), unless auto_on_cpu. A setting that cannot run here is a UserError in the flag's words,
    `origin` after the flag (where the value came from, when not the command line)."""
    auto = "auto" if device.type == "cuda" or auto_on_cpu else False
    setting = {"auto": auto, "on": True, "off": False}[flag]
    try:
        return setting, resolve_fused_kernels(setting, device)
    except ValueError as err:
        message = str(err).replace("fused_kernels=True: ", "").replace("fused_kernels=False", "--fused-kernels off")
        raise UserError(f"--fused-kernels {flag}{origin}: {message}") from None


#################################################################################
#               Embedding Layers for Timesteps and Class Labels                 #
#################################################################################

class PatchEmbed(nn.Module):
    """(N, C, H, W) -> (N, H*W/p^2, D) by a stride-p convolution (state_dict: proj.weight, proj.bias)."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.img_size = (input_size, input_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (input_size // patch_size, input_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != self.img_size:
            fix = (f"build the model with input_size={x.shape[-1]}" if x.shape[-2] == x.shape[-1]
                   else "the model takes square inputs")
            raise ValueError(
                f"input of spatial size {tuple(x.shape[-2:])} does not match the model's input_size "
                f"{self.img_size}; {fix}"
            )
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, T, D)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> vectors: sinusoidal frequencies, then a two-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000) -> torch.Tensor:
        """(N,) -> (N, dim): [cos(t * f_i), sin(t * f_i)], f_i = max_period^(-i / (dim/2))."""
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)  # (N, 256), fp32
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # (N, D)


class LabelEmbedder(nn.Module):
    """Class labels -> vectors, with label dropout for classifier-free guidance.

    With dropout, row `num_classes` of the table is the "null" class used for the unconditional pass.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + int(use_cfg_embedding), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None):
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


#################################################################################
#                                 Core SiT Model                                #
#################################################################################

class Attention(nn.Module):
    """Multi-head self-attention (state_dict: qkv.*, proj.*), backend chosen per call."""

    def __init__(self, dim: int, num_heads: int, attn_backend: str = "math"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.attn_backend = attn_backend
        self.sdpa_backend: str | None = None

    def forward(self, x: torch.Tensor, fast: bool = False) -> torch.Tensor:
        """fast: q, k and v taken apart along qkv's own "3" axis, then transposed, where upstream
        permutes first: the same views, but in backward their gradients stack straight into qkv's
        (B, T, 3, H, d) layout, one pass, where upstream's form stacks them head-first and copies
        the stack into that layout (a second pass over 3 D values per token)."""
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim)
        if fast:
            q, k, v = qkv.unbind(2)  # (B, T, H, d) each
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, d) each
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, T, d) each
        backend = resolve_backend(self.attn_backend, q.device, q.dtype, self.head_dim, self.sdpa_backend is not None)
        x = attention_fn(backend, self.sdpa_backend)(q, k, v)  # (B, H, T, d)
        x = x.transpose(1, 2).reshape(B, T, D)
        return self.proj(x)


# The MLP after fc1's matmul, fc2(GELU_tanh(a + bias_a)) with a = x W1^T (fc1 without its bias), as a
# custom op with its own backward op: the fast path's MLP in training (and when sampling where the GELU
# epilogue below does not apply). Backward recomputes the GELU from the saved a: the reference saves
# both fc1's output (for the GELU) and the GELU's (for fc2), 2 x 4D values per token, this one. The GELU
# with fc1's bias (kernels.bias_gelu), and in backward the GELU's recompute, its derivative and fc1's
# bias gradient (kernels.bias_gelu_backward), are one pass each over the (tokens, 4D) activations.
# Opaque ops, so that torch.compile keeps the saving: traced through (an autograd.Function), the
# compiled joint graph merged the recompute with the forward's GELU and saved both again (a (T, 4D)
# tensor per block and image more: 68 MB per image for SiT-XL/2 at 256px).

def gelu_linear_forward(a: torch.Tensor, bias_a: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor) -> torch.Tensor:
    # aten's own mm ops, not F.linear or @ (composites that a counter of aten ops would see whole)
    g = kernels.bias_gelu(a, bias_a)
    return torch.addmm(bias, g.reshape(-1, g.shape[-1]), weight.t()).view(*a.shape[:-1], weight.shape[0])


def gelu_linear_backward(grad_out: torch.Tensor, a: torch.Tensor, bias_a: torch.Tensor, weight: torch.Tensor,
                         needs_a: bool, needs_bias_a: bool, needs_weight: bool, needs_bias: bool
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_a, grad_bias_a, grad_weight, grad_bias); a gradient not asked for is an empty tensor, and
    what only it needs is skipped: a frozen MLP (the likelihood's input gradient) runs one GEMM, not
    two, and neither recomputes the GELU nor sums fc1's bias gradient."""
    grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
    grad_a, grad_bias_a, g = a.new_empty(0), bias_a.new_empty(0), None
    if needs_a or needs_bias_a:
        grad_g = torch.mm(grad_2d, weight).view(a.shape)
        grad_a, g, grad_bias_a = kernels.bias_gelu_backward(a, bias_a, grad_g, needs_weight, needs_bias_a)
    elif needs_weight:
        g = kernels.bias_gelu(a, bias_a)
    grad_weight = torch.mm(grad_2d.t(), g.reshape(-1, g.shape[-1])) if needs_weight else weight.new_empty(0)
    grad_bias = grad_2d.sum(0) if needs_bias else weight.new_empty(0)
    return (grad_a if needs_a else a.new_empty(0)), grad_bias_a, grad_weight, grad_bias


# The custom ops below that call other ops inside, by op name: their bodies, for counters of ops that
# look inside them (benchmarks.roofline).
COMPOSITE_OPS = {"gelu_linear": gelu_linear_forward, "gelu_linear_backward": gelu_linear_backward}


@torch.library.custom_op("sit_fast::gelu_linear", mutates_args=())
def gelu_linear_op(a: torch.Tensor, bias_a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return gelu_linear_forward(a, bias_a, weight, bias)


@gelu_linear_op.register_fake
def _(a, bias_a, weight, bias):
    return a.new_empty((*a.shape[:-1], weight.shape[0]))


@torch.library.custom_op("sit_fast::gelu_linear_backward", mutates_args=())
def gelu_linear_backward_op(grad_out: torch.Tensor, a: torch.Tensor, bias_a: torch.Tensor, weight: torch.Tensor,
                            needs_a: bool, needs_bias_a: bool, needs_weight: bool, needs_bias: bool
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return gelu_linear_backward(grad_out, a, bias_a, weight, needs_a, needs_bias_a, needs_weight, needs_bias)


@gelu_linear_backward_op.register_fake
def _(grad_out, a, bias_a, weight, needs_a, needs_bias_a, needs_weight, needs_bias):
    return (a.new_empty(a.shape if needs_a else (0,)), bias_a.new_empty(bias_a.shape if needs_bias_a else (0,)),
            weight.new_empty(weight.shape if needs_weight else (0,)),
            weight.new_empty((weight.shape[0],) if needs_bias else (0,)))


def _gelu_linear_setup_context(ctx, inputs, output):
    a, bias_a, weight, _bias = inputs
    ctx.save_for_backward(a, bias_a, weight)


def _gelu_linear_backward(ctx, grad_out):
    a, bias_a, weight = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grads = gelu_linear_backward_op(grad_out, a, bias_a, weight, *needs)
    return tuple(grad if need else None for grad, need in zip(grads, needs))


gelu_linear_op.register_autograd(_gelu_linear_backward, setup_context=_gelu_linear_setup_context)
gelu_linear_backward_op.register_autograd(_launch.refuse_double_backward("sit_fast::gelu_linear_backward"))


@register_flop_formula(torch.ops.sit_fast.gelu_linear)
def _gelu_linear_flops(a_shape, bias_a_shape, weight_shape, bias_shape, *args, **kwargs) -> int:
    return 2 * math.prod(a_shape[:-1]) * a_shape[-1] * weight_shape[0]


@register_flop_formula(torch.ops.sit_fast.gelu_linear_backward)
def _gelu_linear_backward_flops(grad_shape, a_shape, bias_a_shape, weight_shape, needs_a, needs_bias_a,
                                needs_weight, *args, **kwargs) -> int:
    gemms = (needs_a or needs_bias_a) + needs_weight
    return gemms * 2 * math.prod(a_shape[:-1]) * a_shape[-1] * weight_shape[0]


def gelu_linear(a: torch.Tensor, bias_a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """fc2(GELU_tanh(a + bias_a)), saving only a (and the vectors) for backward (see gelu_linear_op).
    bias_a, weight and bias are cast to a's dtype (what autocast would do; a is fc1's matmul under
    it); their gradients come back in their own dtype through the cast."""
    _launch.refuse_forward_ad("gelu_linear", a=a, bias_a=bias_a, weight=weight, bias=bias)
    return gelu_linear_op(a, bias_a.to(a.dtype), weight.to(a.dtype), bias.to(a.dtype))


# fc1's bias and GELU in the epilogue of fc1's matmul (cuBLASLt, through torch._addmm_activation), on
# the fast path wherever no gradient flows through fc1 (sampling): the (N, T, 4D) pre-activation is
# neither written nor read again by a separate GELU pass. SIT_FAST_GELU_EPILOGUE=0 turns it off; read
# once, at import, so compiled code sees a constant (resolve_fused_kernels rejects other values).
GELU_EPILOGUE_ENV = "SIT_FAST_GELU_EPILOGUE"
_GELU_EPILOGUE = {"": True, "1": True, "0": False}.get(os.environ.get(GELU_EPILOGUE_ENV, "").strip())
# Where torch._addmm_activation's GELU is the tanh form SiT uses: CUDA builds (on the CPU it is the
# exact erf form, and so is the fallback a non-CUDA build would take).
_GELU_EPILOGUE_DEVICES = ("cuda",) if torch.version.cuda is not None else ()


def check_gelu_epilogue_setting() -> None:
    if _GELU_EPILOGUE is None:
        raise ValueError(f"{GELU_EPILOGUE_ENV}={os.environ.get(GELU_EPILOGUE_ENV)!r}: set 1 (the MLP's GELU in "
                         f"fc1's matmul epilogue when sampling on CUDA, the default) or 0 (a separate GELU), or "
                         f"unset it")


def gelu_epilogue_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether a Linear (weight, bias) and the GELU after it run as one matmul: on a device in
    _GELU_EPILOGUE_DEVICES, with a bias and no gradient to take through them (torch._addmm_activation
    has no backward)."""
    if not _GELU_EPILOGUE or x.device.type not in _GELU_EPILOGUE_DEVICES or bias is None:
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad))


def _addmm_gelu(bias: torch.Tensor, mat1: torch.Tensor, mat2: torch.Tensor) -> torch.Tensor:
    return torch._addmm_activation(bias, mat1, mat2, use_gelu=True)


def linear_gelu_epilogue(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GELU_tanh(x W^T + b) as one matmul with the bias and GELU in its epilogue (CUDA; see
    gelu_epilogue_applies). x: (..., in); the weights are cast to x's dtype, as autocast casts them."""
    out = _addmm_gelu(bias.to(x.dtype), x.reshape(-1, x.shape[-1]), weight.to(x.dtype).t())
    return out.view(*x.shape[:-1], weight.shape[0])


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GELU_tanh(x W^T + b): linear_gelu_epilogue where gelu_epilogue_applies, else F.linear then F.gelu
    (what the fast path's MLP computes before fc2; the kernels benchmark times it)."""
    if gelu_epilogue_applies(x, weight, bias):
        return linear_gelu_epilogue(x, weight, bias)
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")


class Mlp(nn.Module):
    """fc1 -> GELU(tanh) -> fc2 (state_dict: fc1.*, fc2.*).

    fast: the fast path's forms of the same maths. With gradients, gelu_linear (the GELU's output
    recomputed in backward, not saved); without, fc1's GELU in its matmul's epilogue where
    gelu_epilogue_applies.
    """

    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor, fast: bool = False) -> torch.Tensor:
        if fast and gelu_epilogue_applies(x, self.fc1.weight, self.fc1.bias):
            return self.fc2(linear_gelu_epilogue(x, self.fc1.weight, self.fc1.bias))
        if fast:
            return gelu_linear(F.linear(x, self.fc1.weight), self.fc1.bias, self.fc2.weight, self.fc2.bias)
        return self.fc2(self.act(self.fc1(x)))


class SiTBlock(nn.Module):
    """A SiT block with adaptive layer norm zero (adaLN-Zero) conditioning."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, attn_backend: str = "math"):
        super().__init__()
        self.attn = Attention(hidden_size, num_heads, attn_backend)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Upstream's block, op for op (the model's own loop fuses across blocks instead)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = gated_residual_ref(x, gate_msa, self.attn(layernorm_modulate_ref(x, shift_msa, scale_msa)))
        x = gated_residual_ref(x, gate_mlp, self.mlp(layernorm_modulate_ref(x, shift_mlp, scale_mlp)))
        return x


class FinalLayer(nn.Module):
    """LayerNorm + modulate, then a linear map to patch_size^2 * out_channels per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(layernorm_modulate_ref(x, shift, scale))


class SiT(nn.Module):
    """Diffusion/interpolant model with a Transformer backbone.

    Args (upstream's, with upstream defaults):
        input_size: latent (or image) height = width.
        patch_size, in_channels, hidden_size, depth, num_heads, mlp_ratio: the transformer.
        class_dropout_prob: label dropout for classifier-free guidance (adds a "null" class row).
        num_classes: number of class labels.
        learn_sigma: the final layer predicts 2 x in_channels; forward returns the first half.
    Speed options (no effect on the maths or the state_dict):
        attn_backend: "math" | "sdpa" | "flash_attn" | "auto".
        fused_kernels: False | True | "auto" (Triton adaLN kernels from `kernels`).
        grad_checkpointing: recompute each block in backward instead of storing activations.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        attn_backend: str = "math",
        fused_kernels: bool | str = False,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        if hidden_size % 4:  # the 2-d sin-cos position embedding: half per axis, each half sin and cos
            raise ValueError(f"hidden_size must be a multiple of 4 (the 2-d sin-cos position embedding), got "
                             f"{hidden_size}")
        if attn_backend not in ATTN_BACKENDS:
            raise ValueError(f"unknown attention backend {attn_backend!r}; choose one of {', '.join(ATTN_BACKENDS)}")
        self.fused_kernels = fused_kernels  # checked by its setter
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.hidden_size = hidden_size
        self.depth = depth
        self.mlp_ratio = mlp_ratio
        self.input_size = input_size
        self.grad_checkpointing = grad_checkpointing

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        # Fixed sin-cos embedding, stored as a frozen parameter as upstream does.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)

        self.blocks = nn.ModuleList(
            [SiTBlock(hidden_size, num_heads, mlp_ratio, attn_backend) for _ in range(depth)]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self._compiled_step: Callable | None = None
        self._modulation_cache: tuple | None = None  # see _modulation_weights
        # Reuse the frozen adaLN weights' concatenation between calls (see _modulation_weights): for a
        # model whose weights stay fixed, or change only by in-place ops on the parameters themselves.
        self.reuse_frozen_modulation = False
        self.initialize_weights()

    # ------------------------------------------------------------------ options
    def compile_blocks(self, **compile_kwargs) -> "SiT":
        """torch.compile the block step (fullgraph=True), shared by all blocks: one graph, compiled
        once per mode (grad or no grad, autocast dtype, attention backend, ...), which composes with
        DDP, autocast and gradient checkpointing. The model's compiled step is its own (an EMA
        deepcopy shares it): its recompilations do not count against other models' in the process.
        For the whole model use model.compile(fullgraph=True) instead (in place: forward_with_cfg's pass
        runs compiled too, which torch.compile(model)'s wrapper does not). Returns self."""
        compile_kwargs.setdefault("fullgraph", True)
        self._compiled_step = CompiledBlockStep(compile_kwargs)
        return self

    def cast_matmul_weights_(self, dtype: torch.dtype) -> "SiT":
        """Store every Linear's and the patch embedding's weight and bias in `dtype`, for inference
        under autocast to that dtype. Autocast casts them to it on every call anyway (it keeps casts
        only of parameters that require grad), so the results are the same, bit for bit, while each
        call reads half the weight bytes and skips a cast pass over all of them (4 GB of traffic per
        call for SiT-XL; `python -m benchmarks.roofline` puts the rest of a batch-8 guided call's
        memory-bound ops on the fast path at 3.2 GB). Outside such autocast a call fails
        with a dtype mismatch. Not for training: the fp32 weights are replaced. Returns self."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                module.to(dtype)
        self._modulation_cache = None
        return self

    @property
    def fused_kernels(self) -> bool | str:
        """False (the reference ops), True or "auto"; set at any time, checked as the constructor's."""
        return self._fused_kernels

    @fused_kernels.setter
    def fused_kernels(self, fused_kernels: bool | str) -> None:
        if not (isinstance(fused_kernels, bool) or fused_kernels == "auto"):  # 1 == True: not the checks' True
            raise ValueError(f"fused_kernels must be True, False or 'auto', got {fused_kernels!r}")
        if fused_kernels is not False:  # a malformed setting would otherwise turn the epilogue off unsaid
            check_gelu_epilogue_setting()
        self._fused_kernels = fused_kernels

    def __setstate__(self, state: dict) -> None:
        # a model pickled whole before fused_kernels was a property kept it as a plain attribute
        if "fused_kernels" in state:
            state["_fused_kernels"] = state.pop("fused_kernels")
        super().__setstate__(state)

    @property
    def attn_backend(self) -> str:
        """Every block's attention backend; setting it is set_attn_backend(value)."""
        return self.blocks[0].attn.attn_backend if len(self.blocks) else "math"

    @attn_backend.setter
    def attn_backend(self, attn_backend: str) -> None:
        self.set_attn_backend(attn_backend)

    def set_attn_backend(self, attn_backend: str, sdpa_backend: str | None = None) -> None:
        """Every block's attention from now on: attn_backend one of ATTN_BACKENDS, resolved at each
        forward for the inputs' device and dtype, as the constructor's; with "sdpa", sdpa_backend
        forces one of PyTorch's kernels (SDPA_BACKENDS, as SIT_FAST_SDPA_BACKEND does): one that
        cannot run on the inputs' device and dtype fails at the forward, in PyTorch's words."""
        if attn_backend not in ATTN_BACKENDS:
            raise ValueError(f"unknown attention backend {attn_backend!r}; choose one of {', '.join(ATTN_BACKENDS)}")
        if sdpa_backend is not None and sdpa_backend not in SDPA_BACKENDS:
            raise ValueError(f"unknown SDPA backend {sdpa_backend!r}; choose one of {', '.join(SDPA_BACKENDS)}")
        for block in self.blocks:
            block.attn.attn_backend = attn_backend
            block.attn.sdpa_backend = sdpa_backend

    # ------------------------------------------------------------------ init
    def initialize_weights(self) -> None:
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)

        grid = int(self.x_embedder.num_patches ** 0.5)
        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid)
        self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))

        # Patch embedding initialised like nn.Linear rather than nn.Conv2d.
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)

        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # adaLN-Zero: every block starts as the identity.
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    # ------------------------------------------------------------------ forward
    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) -> (N, C, H, W)."""
        c = self.out_channels
        p = self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def modulation(self, c: torch.Tensor, weights: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """All adaLN vectors of all blocks and the final layer in one GEMM.

        Returns (N, depth * 6 + 2, D): per block shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp,
        gate_mlp, then the final layer's shift, scale. Same maths as each block's adaLN_modulation(c);
        the weights stay stored per block. weights: their concatenation (weight, bias) as
        _modulation_weights returns it, made by the caller (ModelForwards' compiled forwards take
        it as an input); None makes or reuses it here.
        """
        weight, bias = weights if weights is not None else self._modulation_weights()
        # weight ((6 * depth + 2) * D, D), bias ((6 * depth + 2) * D,)
        mods = F.linear(F.silu(c), weight, bias)  # (N, (6 * depth + 2) * D)
        return mods.view(c.shape[0], 6 * len(self.blocks) + 2, self.hidden_size)  # N = 0 too

    def modulation_layers(self, c: torch.Tensor, weights: tuple[torch.Tensor, torch.Tensor] | None = None
                          ) -> Iterator[tuple[torch.Tensor, ...]]:
        """Each adaLN layer's vectors in turn, as a tuple of (N, D) views: 6 per block, then the final
        layer's 2, in the order of `modulation`.

        While training (gradients enabled for some adaLN parameter) each layer's GEMM runs when its
        vectors are taken, just before the block that first uses them: the backward then reaches it
        as soon as it has passed that block (autograd runs the most recently made of the ready
        steps first), so DDP all-reduces a block's adaLN gradients while the backward goes on (behind
        one GEMM at the start of the forward they would all wait for its end: a third of SiT-XL's
        gradients), and no concatenated copy of the weights is made or kept for backward.
        Otherwise, one GEMM over the concatenated weights, taken apart."""
        linears = self.modulation_linears()
        n, d = c.shape[0], self.hidden_size
        if weights is None and torch.is_grad_enabled() and any(
                p.requires_grad for linear in linears for p in (linear.weight, linear.bias)):
            self._modulation_cache = None  # weights that train change: a frozen model's cache is dropped
            hidden = F.silu(c)
            for linear in linears:
                yield F.linear(hidden, linear.weight, linear.bias).view(n, linear.out_features // d, d).unbind(1)
            return
        # (N, D) views, taken apart once: their gradients are stacked into one tensor, where an
        # overlapping slice per block made a zero-filled one each, then summed them
        vectors = self.modulation(c, weights).unbind(1)
        for i in range(len(self.blocks)):
            yield vectors[6 * i: 6 * i + 6]
        yield vectors[-2:]

    def modulation_linears(self) -> list[nn.Linear]:
        """The adaLN modulation layers: each block's, in order, then the final layer's."""
        return [block.adaLN_modulation[1] for block in self.blocks] + [self.final_layer.adaLN_modulation[1]]

    def _modulation_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The concatenated adaLN weights and biases.

        Used wherever the adaLN weights take no gradients (see modulation_layers). The concatenation
        is redone every call, unless the model is frozen (requires_grad False) and
        reuse_frozen_modulation is set, as sit_fast.sampling.ModelForwards sets it: then it is kept
        and reused until a parameter changes (its version counter or storage moves), which saves
        copying a third of SiT-XL's weights on every eager sampling step (compile_blocks keeps this
        part eager; inside a whole-model torch.compile the concatenation is redone, so ModelForwards'
        compiled forwards take it from here as an input). A write through
        `.data` (p.data.copy_(...), as some EMA helpers do) moves no version counter: with such
        writes, leave reuse_frozen_modulation off, or the model goes on with the old weights.
        """
        params = [p for lin in self.modulation_linears() for p in (lin.weight, lin.bias)]
        if not self.reuse_frozen_modulation or any(p.requires_grad for p in params):
            self._modulation_cache = None
            return torch.cat(params[0::2], dim=0), torch.cat(params[1::2], dim=0)
        if torch.compiler.is_compiling() or any(p.is_inference() for p in params):
            # Compiled code could not see in-place updates (an EMA copy's weights, say); inference
            # tensors (a model made under inference_mode) keep no version counter to key on: concatenate.
            return torch.cat(params[0::2], dim=0), torch.cat(params[1::2], dim=0)
        cache = self._modulation_cache
        key = tuple((p._version, p.data_ptr(), p.dtype) for p in params)
        if cache is None or cache[0] != key:
            with torch.no_grad():
                cache = (key, torch.cat(params[0::2], dim=0), torch.cat(params[1::2], dim=0))
            self._modulation_cache = cache
        return cache[1], cache[2]

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> None:
        """TypeError / ValueError naming the argument unless x is (N, in_channels, H, W), t (N,)
        and y (N,) integer labels, all three on one device (forward's contract)."""
        for name, value in (("x", x), ("t", t), ("y", y)):
            if not isinstance(value, torch.Tensor):
                null = (f" (the null class, for unconditional outputs, is label {self.num_classes})"
                        if name == "y" else "")
                raise TypeError(f"{name} must be a tensor, got {type(value).__name__}{null}")
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape (N, {self.in_channels}, {self.input_size}, {self.input_size}), "
                             f"got {tuple(x.shape)}")
        n = x.shape[0]
        for name, value in (("t", t), ("y", y)):
            if tuple(value.shape) != (n,):
                raise ValueError(f"{name} must have shape (N,) = ({n},), one entry per sample of x, "
                                 f"got {tuple(value.shape)}")
            if value.device != x.device:
                raise ValueError(f"{name} is on {value.device}, x on {x.device}: put them on one device")
        if y.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"y must hold integer class labels (int64), got {y.dtype}")
        weight = self.x_embedder.proj.weight
        if x.dtype != weight.dtype and not (x.is_floating_point() and torch.is_autocast_enabled(x.device.type)):
            if weight.dtype != self.pos_embed.dtype:  # cast_matmul_weights_: for autocast alone
                raise TypeError(f"x is {x.dtype}, the model's matmul weights {weight.dtype} (cast_matmul_weights_): "
                                f"call the model under torch.autocast to {weight.dtype}")
            raise TypeError(f"x is {x.dtype}, the model's weights {weight.dtype}: pass x.to({weight.dtype}), or call "
                            f"the model under torch.autocast")

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                modulation_weights: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x: (N, C, H, W) latents, t: (N,) times in [0, 1], y: (N,) labels -> (N, C, H, W).

        Labels go from 0 to num_classes - 1, and to num_classes, the null label, in a model that has
        one (class_dropout_prob > 0); their range is not checked (that would cost a host sync per
        call): one outside it is an IndexError on the CPU, a device-side assert on CUDA.
        modulation_weights: the adaLN weights' concatenation, for a frozen model (see modulation)."""
        self._check_inputs(x, t, y)
        x = self.pos_embed + self.x_embedder(x)  # (N, T, D), contiguous (the patches' view has T-strided rows)
        fused = _fused_on(self.fused_kernels, x.device, x.dtype)
        c = self.t_embedder(t) + self.y_embedder(y, self.training)  # (N, D)
        layers = self.modulation_layers(c, modulation_weights)  # the autocast dtype under autocast
        vectors = next(layers)  # block 0's
        ops = fused_ops(vectors[0].dtype) if fused else REFERENCE_OPS

        step = self._compiled_step or _block_step
        if self._compiled_step is not None and len(self.blocks) and not torch.compiler.is_compiling():
            # An attention backend that cannot run here (flash_attn not installed, say) is said in its own
            # words, here: raised inside the compiled step, Dynamo buries the message in its own report.
            device = x.device.type
            dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
            attn = self.blocks[0].attn
            resolve_backend(attn.attn_backend, x.device, dtype, attn.head_dim, attn.sdpa_backend is not None)
        h = ops["layernorm_modulate"](x, vectors[0], vectors[1])  # (N, T, D): input of block 0's attention
        for block in self.blocks:
            following = next(layers)  # the next block's, or the final layer's
            # this block's gates and MLP shift, scale + the next shift, scale
            block_mods = (*vectors[2:6], *following[:2])
            vectors = following
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x, h = torch.utils.checkpoint.checkpoint(step, block, ops, x, h, block_mods, fused, use_reentrant=False)
            else:
                x, h = step(block, ops, x, h, block_mods, fused)
        x = self.final_layer.linear(h)  # (N, T, p * p * out_channels)
        x = self.unpatchify(x)  # (N, out_channels, H, W)
        if self.learn_sigma:
            x, _ = x.chunk(2, dim=1)
        return x

    def check_null_class(self, who: str) -> None:
        """ValueError unless the label table has the null class guidance takes for its unconditional half
        (label num_classes: a model built with class_dropout_prob=0 has none). who: what needs it."""
        if self.y_embedder.embedding_table.num_embeddings == self.num_classes:
            raise ValueError(f"{who} needs the null class (label {self.num_classes}) for the unconditional half, and "
                             f"this model has none: it was built with class_dropout_prob=0")

    def forward_with_cfg(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float, cfg_channels: int | str = 3
    ) -> torch.Tensor:
        """Conditional and unconditional passes in one batch, mixed by classifier-free guidance.

        x holds the same latents twice: [x, x] with labels [y, null]. Upstream guides only the first
        3 channels (cfg_channels=3, kept so published numbers reproduce); cfg_channels="all" guides
        every channel, the standard formulation, as does a count at or above the model's channels
        (3 on a 1-channel pixel model). The pass goes through the module's call, as a plain call of the
        model does: a model compiled in place (model.compile()) runs it compiled, and its hooks run.
        """
        check_cfg_channels(cfg_channels)
        self.check_null_class("forward_with_cfg")
        if len(x) % 2:
            raise ValueError(f"forward_with_cfg takes the latents twice, [x, x] with labels [y, null]: "
                             f"the batch must be even, got {len(x)}")
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)
        model_out = self(combined, t, y)  # not self.forward: that would skip model.compile()'s code
        n_guided = model_out.shape[1] if cfg_channels == "all" else cfg_channels
        eps, rest = model_out[:, :n_guided], model_out[:, n_guided:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        eps = torch.cat([half_eps, half_eps], dim=0)
        return torch.cat([eps, rest], dim=1)


def check_cfg_channels(cfg_channels) -> None:
    """ValueError unless cfg_channels is "all" or a positive int (how many leading channels guidance mixes)."""
    if cfg_channels != "all" and (not isinstance(cfg_channels, numbers.Integral) or isinstance(cfg_channels, bool)
                                  or cfg_channels < 1):
        raise ValueError(f"cfg_channels must be 'all' or a positive int (the first channels guided), got "
                         f"{cfg_channels!r}")


def _block_step(block: SiTBlock, ops: dict, x: torch.Tensor, h: torch.Tensor, mods: Sequence[torch.Tensor],
                fast: bool = False):
    """One block from the modulated attention input h to the next sublayer's modulated input.

    mods: six (N, D) vectors: gate_msa, shift_mlp, scale_mlp, gate_mlp of this block (its shift_msa
    and scale_msa made h), then the shift and scale of whatever LayerNorm comes next (the next
    block's attention or the final layer).
    fast: the MLP's fast forms (Mlp.forward): its GELU recomputed in backward instead of saved, or,
    with no gradient through it, in fc1's matmul epilogue; attention's q, k, v split so that their
    gradients stack into qkv's layout in one pass (Attention.forward).
    """
    gate_msa, shift_mlp, scale_mlp, gate_mlp, shift_next, scale_next = mods
    x, h = ops["gated_residual_layernorm_modulate"](x, gate_msa, block.attn(h, fast), shift_mlp, scale_mlp)
    x, h = ops["gated_residual_layernorm_modulate"](x, gate_mlp, block.mlp(h, fast), shift_next, scale_next)
    return x, h  # (N, T, D) residual stream, (N, T, D) next sublayer input


def with_own_code(fn: Callable) -> Callable:
    """fn with a code object of its own. Dynamo keeps compiled graphs, and counts recompilations
    against torch._dynamo.config.recompile_limit (8), per code object: compiling fn itself for every
    model would make all the models in a process share those 8 (each grad mode, autocast dtype,
    attention backend or batch-shape change takes one), and past them a fullgraph compile fails.
    What Dynamo compiled for the copy is dropped once the copy is collected (forget_compiled)."""
    if _PENDING_CODE:
        _forget_pending()
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__,
                              fn.__closure__)
    copy.__qualname__, copy.__doc__ = fn.__qualname__, fn.__doc__  # no __wrapped__: nothing leads back to fn
    weakref.finalize(copy, forget_compiled, copy.__code__).atexit = False
    return copy


# Codes of collected with_own_code copies whose reset found Dynamo's compile lock held by another thread:
# reset by the next forget_compiled that takes the lock, or the next with_own_code call.
_PENDING_CODE: list[types.CodeType] = []


def forget_compiled(code: types.CodeType) -> None:
    """Drop what Dynamo compiled for `code`, whose function is gone. Dynamo would keep it for good:
    its orig_code_map holds the code from each code compiled from it, which the code's cache entries
    hold in turn, a cycle through the code's extra data that the garbage collector cannot see. So every
    compiled copy's graphs, and the globals Dynamo put into the module to call them, stayed as long as
    the process (1.1 MB of Python objects for SiT-T/4's sampling forward with the eager backend, 1.5 MB
    with Inductor; what torch keeps of every compilation anyway, its guards among them, stays).
    The garbage collector may call this in any thread (a PNG writer's, a pin-memory one's) while another
    compiles: the compile lock is not waited for (that thread might hold a lock the compiler needs), the
    code is kept in _PENDING_CODE for a later call instead."""
    if "torch._dynamo" not in sys.modules:  # nothing was compiled
        return
    _PENDING_CODE.append(code)
    _forget_pending()


def _forget_pending() -> None:
    """Reset the codes of _PENDING_CODE, if Dynamo's compile lock is free now (else they stay)."""
    reset_code = getattr(getattr(torch._C, "_dynamo", None), "eval_frame", None)
    reset_code = getattr(reset_code, "reset_code", None)
    convert_frame = sys.modules.get("torch._dynamo.convert_frame")
    lock = getattr(convert_frame, "compile_lock", None)
    if reset_code is None or lock is None:  # a torch without them: nothing to reset, or no safe way to
        _PENDING_CODE.clear()
        return
    if not lock.acquire(blocking=False):  # reset under it, as torch._dynamo.reset_code_caches does; busy: later
        return
    try:
        while _PENDING_CODE:
            try:
                code = _PENDING_CODE.pop()
            except IndexError:  # another thread took the last one meanwhile
                break
            reset_code(code)
    finally:
        lock.release()


class CompiledBlockStep:
    """torch.compile(_block_step, **compile_kwargs) for one model, which a model holding it can be
    pickled with (torch.save(model)): it pickles as its arguments and compiles again in the process
    that loads it. A deepcopy (an EMA copy) shares it, and so the compiled code; another
    compile_blocks call, on this model or another, makes a new one, whose compilations count apart."""

    def __init__(self, compile_kwargs: dict):
        # what Dynamo compiled for the code copy goes with it (with_own_code), once the model and the
        # copies sharing this step are gone: a process may compile many models (a sweep in a notebook)
        self.compile_kwargs = compile_kwargs
        self.fn = torch.compile(with_own_code(_block_step), **compile_kwargs)

    def __call__(self, block: SiTBlock, ops: dict, x: torch.Tensor, h: torch.Tensor, mods: Sequence[torch.Tensor],
                 fast: bool = False):
        # The six vectors as contiguous copies (6 D values per sample): their strides differ (rows 6 D
        # apart from a training block's own GEMM, 2 D from the final layer's, (6 depth + 2) D from
        # sampling's one GEMM), and the step would be compiled again for each.
        return self.fn(block, ops, x, h, tuple(m.contiguous() for m in mods), fast)

    def __deepcopy__(self, memo) -> "CompiledBlockStep":
        return self

    def __reduce__(self):
        return CompiledBlockStep, (self.compile_kwargs,)


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################

def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int, cls_token: bool = False,
                            extra_tokens: int = 0) -> np.ndarray:
    """(grid_size^2, embed_dim): the first half of the channels encodes the column, the second the row;
    with cls_token, extra_tokens rows of zeros come first (upstream's signature; SiT uses neither).

    (Upstream/MAE build the grid with meshgrid(w, h), so their "emb_h" half is the column index.)
    """
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid_size, grid_size)  # w first
    pos_embed = get_2d_sincos_pos_embed_from_grid(embed_dim, grid)
    if cls_token and extra_tokens > 0:
        pos_embed = np.concatenate([np.zeros([extra_tokens, embed_dim]), pos_embed], axis=0)
    return pos_embed


def get_2d_sincos_pos_embed_from_grid(embed_dim: int, grid: np.ndarray) -> np.ndarray:
    """(2, ...) grid of positions -> (M, embed_dim): grid[0] encoded in the first half, grid[1] in the second."""
    if embed_dim % 2:
        raise ValueError(f"2-d sin-cos embedding needs an even dimension, got {embed_dim}")
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])  # (M, D/2)
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])  # (M, D/2)
    return np.concatenate([emb_h, emb_w], axis=1)


def get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, embed_dim): [sin(pos * w_i), cos(pos * w_i)], w_i = 10000^(-2i/embed_dim)."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {embed_dim}")
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega  # (D/2,)
    out = np.einsum("m,d->md", pos.reshape(-1), omega)  # (M, D/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


#################################################################################
#                                   SiT Configs                                 #
#################################################################################

SIT_CONFIGS = {
    # name: (depth, hidden_size, num_heads)
    "XL": (28, 1152, 16),
    "L": (24, 1024, 16),
    "B": (12, 768, 12),
    "S": (12, 384, 6),
    # Not an upstream size: a tiny model for tests and CPU demos.
    "T": (4, 128, 4),
}


def _make_config(size: str, patch_size: int):
    depth, hidden_size, num_heads = SIT_CONFIGS[size]

    def build(**kwargs) -> SiT:
        return SiT(depth=depth, hidden_size=hidden_size, patch_size=patch_size, num_heads=num_heads, **kwargs)

    build.__name__ = f"SiT_{size}_{patch_size}"
    build.__doc__ = (f"SiT-{size}/{patch_size}: depth {depth}, hidden {hidden_size}, {num_heads} heads; the other "
                     f"arguments are SiT's (help(SiT)).")
    signature = inspect.signature(SiT.__init__)  # help() shows the arguments the name leaves to give
    build.__signature__ = signature.replace(parameters=[
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for name, p in signature.parameters.items()
        if name not in ("self", "depth", "hidden_size", "patch_size", "num_heads")])
    return build


UPSTREAM_MODELS = [f"SiT-{s}/{p}" for s in ("XL", "L", "B", "S") for p in (2, 4, 8)]
SiT_models: dict[str, Callable[..., SiT]] = {
    f"SiT-{s}/{p}": _make_config(s, p) for s in ("XL", "L", "B", "S", "T") for p in (2, 4, 8)
}
SiT_models.update({f"SiT-T/{p}": _make_config("T", p) for p in (1,)})

# Upstream's constructors by name (from models import SiT_XL_2).
SiT_XL_2, SiT_XL_4, SiT_XL_8 = SiT_models["SiT-XL/2"], SiT_models["SiT-XL/4"], SiT_models["SiT-XL/8"]
SiT_L_2, SiT_L_4, SiT_L_8 = SiT_models["SiT-L/2"], SiT_models["SiT-L/4"], SiT_models["SiT-L/8"]
SiT_B_2, SiT_B_4, SiT_B_8 = SiT_models["SiT-B/2"], SiT_models["SiT-B/4"], SiT_models["SiT-B/8"]
SiT_S_2, SiT_S_4, SiT_S_8 = SiT_models["SiT-S/2"], SiT_models["SiT-S/4"], SiT_models["SiT-S/8"]


def model_config(name: str) -> dict:
    """depth, hidden_size, num_heads, patch_size of a registry entry."""
    if name not in SiT_models:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(SiT_models)}")
    size, patch = name[len("SiT-"):].split("/")
    depth, hidden_size, num_heads = SIT_CONFIGS[size]
    return dict(depth=depth, hidden_size=hidden_size, num_heads=num_heads, patch_size=int(patch))


def registry_name(depth: int, hidden_size: int, patch_size: int) -> str | None:
    """The SiT_models entry with this architecture (hidden sizes identify the size), else None."""
    for size, (size_depth, size_hidden, _) in SIT_CONFIGS.items():
        name = f"SiT-{size}/{patch_size}"
        if size_depth == depth and size_hidden == hidden_size and name in SiT_models:
            return name
    return None
