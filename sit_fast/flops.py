"""Analytic FLOP counts for SiT and the peak-throughput table used for MFU.

FLOPs are 2 x multiply-adds of the matrix products (linear layers, the patch-embedding convolution,
Q K^T and attention x V); element-wise work is not counted, as is customary for MFU. A training step
costs 3 x forward (the backward pass computes two products per forward product).

SiT-XL/2 at 256px (latent 32x32, T = 256 tokens, D = 1152) comes to about 237 GFLOP per image
forward, twice the 118.6 "Gflops" (multiply-adds) reported in the DiT and SiT papers.
"""
from __future__ import annotations

import math
import os
import re

import torch

# Dense peak TFLOP/s per device (no sparsity), from the vendors' data sheets (the GeForce cards: the
# architecture whitepapers' figures with FP32 accumulation, which autocast's matmuls use). A key
# matches the device name as whole words ("A10" is not "A100", "A40" not "RTX A4000"); the first
# key that matches wins, so the PCIe and NVL parts come before the SXM ones.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 PCIe": {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2},
    "H100 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "H100": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H200 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "GH200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H800 PCIe": {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2},
    "H800": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H20": {"bf16": 148.0, "fp16": 148.0, "tf32": 74.0, "fp32": 44.0},
    "GB200": {"bf16": 2500.0, "fp16": 2500.0, "tf32": 1250.0, "fp32": 80.0},  # per GPU of a GB200 NVL72
    "B200": {"bf16": 2250.0, "fp16": 2250.0, "tf32": 1100.0, "fp32": 75.0},  # HGX B200
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "A800": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "A40": {"bf16": 149.7, "fp16": 149.7, "tf32": 74.8, "fp32": 37.4},
    "A10": {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2},
    "RTX A6000": {"bf16": 154.8, "fp16": 154.8, "tf32": 77.4, "fp32": 38.7},
    "L40S": {"bf16": 362.05, "fp16": 362.05, "tf32": 183.0, "fp32": 91.6},
    "L40": {"bf16": 181.05, "fp16": 181.05, "tf32": 90.5, "fp32": 90.5},
    "L4": {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3},
    "RTX 4090": {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6},
    "RTX 3090": {"bf16": 71.0, "fp16": 71.0, "tf32": 35.6, "fp32": 35.6},
}
_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def forward_flops(model) -> int:
    """FLOPs of one forward pass for one image (2 x multiply-adds of every matrix product)."""
    D = model.hidden_size
    p = model.patch_size
    T = model.x_embedder.num_patches
    C = model.in_channels
    mlp = int(D * model.mlp_ratio)
    freq = model.t_embedder.frequency_embedding_size

    per_block = (
        T * D * 3 * D  # qkv projection
        + 2 * T * T * D  # Q K^T and attention x V, all heads
        + T * D * D  # output projection
        + 2 * T * D * mlp  # fc1, fc2
        + D * 6 * D  # adaLN modulation (once per image)
    )
    macs = (
        T * C * p * p * D  # patch embedding
        + freq * D + D * D  # timestep MLP
        + model.depth * per_block
        + D * 2 * D  # final adaLN modulation
        + T * D * p * p * model.out_channels  # final linear
    )
    return 2 * macs


def attention_flops(model) -> int:
    """The part of forward_flops that is attention's Q K^T and attention x V (for one image)."""
    T = model.x_embedder.num_patches
    return 2 * model.depth * 2 * T * T * model.hidden_size


def train_step_flops(model) -> int:
    """FLOPs of one training step per image: forward + backward = 3 x forward."""
    return 3 * forward_flops(model)


def peak_tflops(device_name: str, dtype: torch.dtype | str, tf32: bool = False) -> float | None:
    """Dense peak TFLOP/s of a device from PEAK_TFLOPS (None when the device is not listed).

    device_name: e.g. torch.cuda.get_device_name() ("NVIDIA H100 80GB HBM3").
    dtype: the matmul dtype; fp32 with tf32=True looks up the TF32 peak.
    """
    name = _DTYPE_NAMES.get(dtype, dtype) if isinstance(dtype, torch.dtype) else dtype
    if name == "fp32" and tf32:
        name = "tf32"
    key = peak_key(device_name)
    return None if key is None else PEAK_TFLOPS[key].get(name)


def peak_key(device_name: str) -> str | None:
    """The PEAK_TFLOPS entry of a device name (None when none matches)."""
    for key in PEAK_TFLOPS:
        # whole words, and not a variant's name ("RTX 3090 Ti", "RTX 4090 D" are other cards)
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9]| (?:Ti|SUPER|D)\b)", device_name):
            return key
    return None


def mfu(flops_per_second: float, device_name: str, dtype: torch.dtype | str, tf32: bool = False,
        peak: float | None = None) -> float | None:
    """Model FLOPs utilisation: achieved / peak (None when the peak is unknown, e.g. on a CPU).

    peak: TFLOP/s to use in place of the table's (peak_tflops_from_env() in training logs).
    """
    if peak is None:
        peak = peak_tflops(device_name, dtype, tf32)
    return None if peak is None else flops_per_second / (peak * 1e12)


PEAK_ENV = "SIT_FAST_PEAK_TFLOPS"


def peak_tflops_from_env() -> float | None:
    """SIT_FAST_PEAK_TFLOPS, checked; None when unset or empty.

    The dense peak, in TFLOP/s, that train.py's MFU uses in place of PEAK_TFLOPS: for a device the
    table lacks, or one that runs at other clocks than its data sheet's. It is the peak of the run's
    matmul dtype (bf16 for --precision bf16, TF32 for tf32). ValueError for anything but a positive
    finite number.
    """
    text = os.environ.get(PEAK_ENV, "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"{PEAK_ENV}={text}: give the GPU's dense peak in TFLOP/s for the run's matmul dtype, a positive "
            f"number (989.4 for an H100 SXM in bf16), or unset it to use the data-sheet table in sit_fast/flops.py"
        )
    return value
