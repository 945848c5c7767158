"""Attention backends for SiT blocks.

Every backend computes the same function, softmax(Q K^T / sqrt(d)) V over all tokens (no mask, no
dropout), on q, k, v of shape (B, H, T, d) and returns (B, H, T, d). Each backend declares what it
supports; selection and the tests read those declarations instead of an if-chain.

    "math"        explicit matmul + softmax in the input dtype: the parity reference.
    "sdpa"        torch.nn.functional.scaled_dot_product_attention. PyTorch picks flash, cuDNN or
                  memory-efficient kernels itself; set SIT_FAST_SDPA_BACKEND=flash|cudnn|efficient|math
                  (or pass sdpa_backend=) to force one.
    "flash_attn"  the flash-attn package (CUDA, fp16/bf16, head dim <= 256, multiple of 8).
    "auto"        the first available of flash_attn, sdpa, math for the device and dtype.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import logging
import math
import os
import re
from typing import Callable

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

ATTN_BACKENDS = ("math", "sdpa", "flash_attn", "auto")
SDPA_BACKENDS = ("flash", "cudnn", "efficient", "math")


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V, written out. q, k, v: (B, H, T, d)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    attn = (q * scale) @ k.transpose(-2, -1)  # (B, H, T, T)
    attn = attn.softmax(dim=-1)
    return attn @ v  # (B, H, T, d)


def _sdpa_backend_enum(name: str):
    from torch.nn.attention import SDPBackend

    return {
        "flash": SDPBackend.FLASH_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }[name]


SDPA_VARIABLE = "SIT_FAST_SDPA_BACKEND"  # forces one of PyTorch's kernels under --attn-backend sdpa


def sdpa_arithmetic(backend: str) -> dict:
    """What a run records of SDPA_VARIABLE beside the resolved --attn-backend (its value, or "unset"):
    under sdpa it picks the kernel, and so the rounding; {} for any other backend."""
    return {SDPA_VARIABLE: sdpa_backend_from_env() or "unset"} if backend == "sdpa" else {}


def sdpa_backend_from_env() -> str | None:
    """SIT_FAST_SDPA_BACKEND, checked: ValueError for a value that is not one of SDPA_BACKENDS."""
    value = os.environ.get(SDPA_VARIABLE) or None
    if value is not None and value not in SDPA_BACKENDS:
        raise ValueError(f"SIT_FAST_SDPA_BACKEND={value}: choose one of {', '.join(SDPA_BACKENDS)}, or unset it")
    return value


def _dtype_names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


# Where a forced SDPA kernel runs (device type -> dtypes; a device missing: none there). The CPU has
# PyTorch's own flash kernel for every float dtype; on CUDA flash and cuDNN take half precision only.
_HALF = (torch.float16, torch.bfloat16)
FORCED_SDPA_SUPPORT: dict[str, dict[str, tuple[torch.dtype, ...] | None]] = {
    "flash": {"cpu": None, "cuda": _HALF},
    "cudnn": {"cuda": _HALF},
    "efficient": {"cuda": (torch.float32, torch.float16, torch.bfloat16)},
    "math": {"cpu": None, "cuda": None},
}


def forced_sdpa_problem(name: str, device: torch.device | str, dtype: torch.dtype) -> str | None:
    """Why PyTorch's SDPA kernel `name` (one of SDPA_BACKENDS) cannot run on this device and dtype
    (FORCED_SDPA_SUPPORT; None there: any dtype), or None where it can."""
    device_type = torch.device(device).type
    support = FORCED_SDPA_SUPPORT[name]
    if device_type not in support:
        return f"it does not run on {device_type}"
    if support[device_type] is not None and dtype not in support[device_type]:
        return f"on {device_type} it takes {_dtype_names(support[device_type])}, got {_dtype_names([dtype])}"
    return None


def check_forced_sdpa(device: torch.device | str, dtype: torch.dtype) -> None:
    """ValueError when SIT_FAST_SDPA_BACKEND names a kernel that cannot run on this device and dtype,
    rather than PyTorch's "no available kernel" at the first forward."""
    forced = sdpa_backend_from_env()
    if forced is None:
        return
    reason = forced_sdpa_problem(forced, device, dtype)
    if reason is None:
        return
    usable = [n for n in SDPA_BACKENDS if forced_sdpa_problem(n, device, dtype) is None]
    raise ValueError(f"SIT_FAST_SDPA_BACKEND={forced}: {reason}; choose one of {', '.join(usable)}, or unset it")


def make_sdpa_attention(sdpa_backend: str | None = None) -> Callable:
    sdpa_backend = sdpa_backend or sdpa_backend_from_env()
    if sdpa_backend is None:
        return F.scaled_dot_product_attention
    if sdpa_backend not in SDPA_BACKENDS:
        raise ValueError(
            f"unknown SDPA backend {sdpa_backend!r}; choose one of {', '.join(SDPA_BACKENDS)}"
        )
    from torch.nn.attention import sdpa_kernel

    backend = _sdpa_backend_enum(sdpa_backend)

    def sdpa_forced(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)

    return sdpa_forced


def flash_attn_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from flash_attn import flash_attn_func

    # flash-attn takes (B, T, H, d).
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


@dataclasses.dataclass(frozen=True)
class AttentionBackend:
    name: str
    devices: tuple[str, ...] | None  # None: any (plain torch ops)
    dtypes: tuple[torch.dtype, ...]
    max_head_dim: int | None = None
    head_dim_multiple: int = 1
    needs_module: str | None = None
    min_cuda_capability: tuple[int, int] | None = None

    def unsupported_reason(self, device: torch.device | str, dtype: torch.dtype, head_dim: int) -> str | None:
        """None when this backend can run these inputs, else a short reason."""
        device_type = torch.device(device).type
        if self.needs_module and _OPTIONAL_MODULES.get(self.needs_module) is not None:
            return _OPTIONAL_MODULES[self.needs_module]
        if self.devices is not None and device_type not in self.devices:
            return f"needs a {' or '.join(self.devices)} device, got {device_type}"
        if device_type == "cuda" and self.min_cuda_capability is not None:
            # get_device_properties: constant-folded by torch.compile, so selection stays graph-break free
            properties = torch.cuda.get_device_properties(torch.device(device))
            if (properties.major, properties.minor) < self.min_cuda_capability:
                wanted = ".".join(map(str, self.min_cuda_capability))
                return (f"needs a GPU of compute capability {wanted} or later, got {properties.major}."
                        f"{properties.minor} ({properties.name})")
        if dtype not in self.dtypes:
            return f"supports dtypes {_dtype_names(self.dtypes)}, got {_dtype_names([dtype])}"
        if self.max_head_dim is not None and head_dim > self.max_head_dim:
            return f"supports head dim <= {self.max_head_dim}, got {head_dim}"
        if head_dim % self.head_dim_multiple:
            return f"needs a head dim multiple of {self.head_dim_multiple}, got {head_dim}"
        return None


def optional_module_problem(name: str, distribution: str, minimum: tuple[int, int]) -> str | None:
    """Why the optional package `name` cannot be used (not installed, older than `minimum`, or failing
    to import: a build for another torch or CUDA), or None."""
    install = f"pip install '{distribution}>={minimum[0]}.{minimum[1]}' --no-build-isolation"
    if importlib.util.find_spec(name) is None:
        return f"the {name} package is not installed ({install})"
    try:
        version = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:  # importable without metadata (a source tree): no version
        version = None
    if version is not None and tuple(int(part) for part in re.findall(r"\d+", version)[:2]) < minimum:
        return (f"{name} {version} is older than {'.'.join(map(str, minimum))}, the first whose kernels are "
                f"torch custom ops that torch.compile traces (pip install -U flash-attn)")
    try:  # found is not importable: its compiled extension may be built against another torch
        importlib.import_module(name)
    except Exception as err:  # noqa: BLE001 - an ImportError, or an OSError of a shared library
        lines = str(err).strip().splitlines()
        return (f"{name} is installed but does not import ({type(err).__name__}: {lines[0] if lines else ''}): "
                f"rebuild it against this torch ({install} --force-reinstall)")
    return None


# Looked up once at import, so that selection inside a compiled region is pure Python: name -> None
# when usable, else why not.
_OPTIONAL_MODULES = {"flash_attn": optional_module_problem("flash_attn", "flash-attn", (2, 7))}


_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

BACKENDS: dict[str, AttentionBackend] = {
    "flash_attn": AttentionBackend(
        "flash_attn", devices=("cuda",), dtypes=(torch.float16, torch.bfloat16),
        max_head_dim=256, head_dim_multiple=8, needs_module="flash_attn",
        min_cuda_capability=(8, 0),  # flash-attn 2: Ampere or later
    ),
    "sdpa": AttentionBackend("sdpa", devices=None, dtypes=_FLOATS),
    "math": AttentionBackend("math", devices=None, dtypes=_FLOATS),
}
AUTO_ORDER = ("flash_attn", "sdpa", "math")


_RESOLVED: dict[tuple, str] = {}


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype, head_dim: int,
                    sdpa_chosen: bool = False) -> str:
    """select_backend, memoised per (name, device, dtype, head dim, sdpa_chosen); logs what "auto"
    chose. The device with its index: two GPUs of one machine may differ in what they run.

    Plain Python over constants, so torch.compile traces it without a graph break. A compiled caller
    does not read the memo: its code would be guarded on the memo's contents, and compiled again once
    an eager call (a sample grid of the EMA model) had filled it in.
    """
    key = (name, torch.device(device), dtype, head_dim, sdpa_chosen)
    if torch.compiler.is_compiling():
        return select_backend(name, key[1], dtype, head_dim, sdpa_chosen)
    chosen = _RESOLVED.get(key)
    if chosen is None:
        chosen = _RESOLVED[key] = select_backend(name, key[1], dtype, head_dim, sdpa_chosen)
        if name == "auto":
            logger.info("attention backend auto -> %s (%s, %s, head dim %d)", chosen, key[1], dtype, head_dim)
    return chosen


def select_backend(name: str, device: torch.device | str, dtype: torch.dtype, head_dim: int,
                   sdpa_chosen: bool = False) -> str:
    """Resolve a backend name for inputs on `device` of `dtype` and `head_dim`.

    "auto" returns the first supported backend of AUTO_ORDER; an explicit name that cannot run
    raises ValueError saying why and which backends can, as does a malformed SIT_FAST_SDPA_BACKEND
    when the choice is "sdpa", unless sdpa_chosen (the caller picks PyTorch's kernel itself, as
    SiT.set_attn_backend's sdpa_backend does, and the variable is not read).
    """
    if name not in ATTN_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(ATTN_BACKENDS)}")
    if name == "auto":
        for candidate in AUTO_ORDER:
            if BACKENDS[candidate].unsupported_reason(device, dtype, head_dim) is None:
                if candidate == "sdpa" and not sdpa_chosen:
                    check_forced_sdpa(device, dtype)
                return candidate
        raise AssertionError("the math backend supports every float dtype")
    if name == "sdpa" and not sdpa_chosen:
        check_forced_sdpa(device, dtype)
    reason = BACKENDS[name].unsupported_reason(device, dtype, head_dim)
    if reason is not None:
        usable = [n for n in AUTO_ORDER if BACKENDS[n].unsupported_reason(device, dtype, head_dim) is None]
        raise ValueError(
            f"attention backend {name!r} cannot run here: {reason}; usable: {', '.join(usable)}"
        )
    return name


def attention_fn(backend: str, sdpa_backend: str | None = None) -> Callable:
    """The attention function of a resolved (non-"auto") backend."""
    if backend == "math":
        return math_attention
    if backend == "sdpa":
        return make_sdpa_attention(sdpa_backend)
    if backend == "flash_attn":
        return flash_attn_attention
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(ATTN_BACKENDS)}")
