"""Fused Triton kernels for SiT's adaLN sublayer seams, registered as torch custom ops.

    layernorm_modulate(x, shift, scale, eps=1e-6, out_dtype=None) -> y
        y = LN(x) * (1 + scale[:, None, :]) + shift[:, None, :]          op sit_fast::layernorm_modulate
    gated_residual(x, gate, y) -> out
        out = x + gate[:, None, :] * y                                    op sit_fast::gated_residual
    gated_residual_layernorm_modulate(x, gate, y, shift, scale, eps=1e-6, h_dtype=None) -> (x_out, h)
        x_out = x + gate * y; h = layernorm_modulate(x_out, shift, scale)
                                                    op sit_fast::gated_residual_layernorm_modulate

These functions are the API. Each calls its custom op (named at the right), whose schema is an
internal one (every argument explicit, and what backward needs returned beside the outputs): call the
functions, not torch.ops.sit_fast.* directly.
Each backward is its own custom op (`sit_fast::<name>_backward`), so `torch.compile(fullgraph=True)`
traces models that use these without a graph break. Autograd is reverse mode, first derivatives
only: an input carrying a forward-mode tangent (torch.func.jvp, torch.autograd.forward_ad) raises
NotImplementedError, as the custom ops would otherwise drop the tangent, and so does a backward
through a gradient taken with create_graph=True. torch.func's transforms (grad, vjp, vmap) are not
supported either: grad and vjp fail inside torch; the reference ops (fused_kernels=False) support all.

Dtypes: activations (x, y) float32, bfloat16 or float16, y in x's dtype, except that a float32 x
may take a narrower y (the bf16-autocast layout: fp32 residual stream, bf16 sublayer output);
per-sample vectors (shift, scale, gate) in x's dtype, float32, or the dtype of y / of the normalised
output. Outputs have x's dtype, except the normalised output (layernorm_modulate's y, and h), whose
dtype is out_dtype / h_dtype when given (e.g. bf16 for the next Linear under autocast). Every
gradient has its own input's dtype. Arithmetic and LayerNorm statistics are float32.

Devices: CUDA, or CPU through the Triton interpreter (TRITON_INTERPRET=1, or true/on/yes as Triton
reads it, set before triton and this package are imported). Importing this package never requires
triton; without it the ops raise.

And, for the MLP's training step (no autograd of their own: sit_fast.models' MLP op calls them):

    bias_gelu(a, bias) -> g = GELU_tanh(a + bias)                       op sit_fast::bias_gelu
    bias_gelu_backward(a, bias, dg) -> (da, g, dbias), one pass          op sit_fast::bias_gelu_backward

`reference` holds the plain PyTorch versions that tests and benchmarks compare against.

Naming note: each op lives in a submodule of the same name, and the package attribute is the
function (`kernels.layernorm_modulate` is the op, not the module); reach a submodule with
`importlib.import_module("kernels.layernorm_modulate")`.
"""

import torch

from . import reference
from ._launch import interpreter_requested, launch_settings

SIT_FAST_KERNELS = True  # sit_fast.models checks it: Hugging Face's `kernels` package has this import name too

try:
    import triton  # noqa: F401
except ImportError as error:
    _TRITON_IMPORT_ERROR: ImportError | None = error
else:
    _TRITON_IMPORT_ERROR = None

if _TRITON_IMPORT_ERROR is None:
    from .bias_gelu import bias_gelu, bias_gelu_backward
    from .gated_residual import gated_residual
    from .gated_residual_layernorm_modulate import gated_residual_layernorm_modulate
    from .layernorm_modulate import layernorm_modulate
else:

    def _triton_missing(*args, **kwargs):
        raise RuntimeError(
            f"sit_fast kernels need triton, which failed to import ({_TRITON_IMPORT_ERROR}); "
            "install triton or use fused_kernels=False"
        )

    layernorm_modulate = gated_residual = gated_residual_layernorm_modulate = _triton_missing
    bias_gelu = bias_gelu_backward = _triton_missing

__all__ = [
    "bias_gelu",
    "bias_gelu_backward",
    "gated_residual",
    "gated_residual_layernorm_modulate",
    "interpreter_requested",
    "kernels_available",
    "launch_settings",
    "layernorm_modulate",
    "reference",
    "saved_bytes_per_token",
]


def triton_imported() -> bool:
    """Whether triton imported (else every op raises, naming the import's error)."""
    return _TRITON_IMPORT_ERROR is None


def kernels_available(device: torch.device | str) -> bool:
    """Whether the fused ops can run on `device`.

    True on a CUDA device when triton imports; on CPU only when TRITON_INTERPRET=1 and the kernels
    were built by the interpreter (that is, the variable was set before this package was imported).
    """
    if _TRITON_IMPORT_ERROR is not None:
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    if device.type == "cpu":
        if not interpreter_requested():
            return False
        from triton.runtime.interpreter import InterpretedFunction

        from .layernorm_modulate import _layernorm_modulate_fwd_kernel

        return isinstance(_layernorm_modulate_fwd_kernel, InterpretedFunction)
    return False


def saved_bytes_per_token(
    op_name: str,
    D: int,
    dtype: torch.dtype,
    out_dtype: torch.dtype | None = None,
    y_dtype: torch.dtype | None = None,
    vectors_grad: bool = True,
) -> dict[str, int]:
    """Bytes each op keeps alive for backward per token, {"ours": ..., "reference": ...}.

    Counts tensors of size T per sample (the (B, D) modulation vectors are per sample, not per
    token, and are left out). e = bytes per element of `dtype` (x's), e_out of `out_dtype` (the
    normalised output: layernorm_modulate's y / h; default x's dtype), e_y of `y_dtype` (default x's
    dtype). The eager reference computes in float32, so the tensors autograd saves there are float32
    whatever the activation dtypes:

        op                                   ours                reference (eager, kernels.reference)
        layernorm_modulate                   e_out*D + 4         8*D + 8   (fp32 x copy, fp32 x_hat, mean, rstd)
        gated_residual                       e_y*D               4*D       (fp32 y copy)
        gated_residual_layernorm_modulate    (e_out+e_y)*D + 4   12*D + 8  (fp32 y, x_out, x_hat; mean, rstd)

    Ours saves x_hat (the normalised row, computed in fp32, stored in the output's dtype) and a
    float32 rstd per row; the gated ops also save y in its own dtype. At D = 1152: bfloat16
    layernorm_modulate 2308 vs 9224, gated_residual 2304 vs 4608, gated_residual_layernorm_modulate
    4612 vs 13832; float32 4612 vs 9224, 4608 vs 4608, 9220 vs 13832; the bf16-autocast layout
    (x float32, y and h bfloat16) gated_residual_layernorm_modulate 4612 vs 13832 (x_out float32 and
    mean saved instead would be 6920).

    vectors_grad=False: the modulation vectors need no gradient (a frozen model differentiated with
    respect to its input, as in the likelihood's divergence). The gated ops then keep no y, and the
    reference keeps neither its fp32 y copy nor the x_hat it multiplies by (1 + scale):

        layernorm_modulate                   e_out*D + 4         4*D + 8
        gated_residual                       0                   0
        gated_residual_layernorm_modulate    e_out*D + 4         4*D + 8   (fp32 x_out; mean, rstd)

    tests/test_kernels.py checks these against what autograd actually saves.
    """
    def size(d: torch.dtype | None) -> int:
        return torch.empty((), dtype=dtype if d is None else d).element_size()

    e_out, e_y = size(out_dtype), size(y_dtype)  # e (x's) enters only through the defaults
    rstd = 4  # fp32 rstd per row (ours); the reference also keeps the mean
    if vectors_grad:
        table = {
            "layernorm_modulate": (e_out * D + rstd, 8 * D + 8),
            "gated_residual": (e_y * D, 4 * D),
            "gated_residual_layernorm_modulate": ((e_out + e_y) * D + rstd, 12 * D + 8),
        }
    else:
        table = {
            "layernorm_modulate": (e_out * D + rstd, 4 * D + 8),
            "gated_residual": (0, 0),
            "gated_residual_layernorm_modulate": (e_out * D + rstd, 4 * D + 8),
        }
    if op_name not in table:
        raise ValueError(f"saved_bytes_per_token: unknown op {op_name!r}, expected one of {sorted(table)}")
    ours, ref = table[op_name]
    return {"ours": ours, "reference": ref}
