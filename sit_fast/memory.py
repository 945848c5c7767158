"""Activation memory: the bytes autograd saves for backward, per image.

Measured, not estimated: every tensor autograd saves during a forward pass goes through
`torch.autograd.graph.saved_tensors_hooks`; each distinct storage is counted once at its full size.
The figure is marginal in the batch size, (S(b2) - S(b1)) / (b2 - b1), so whatever does not grow with
the batch (parameters, their bf16 casts under autocast, the modulation weights' concatenation)
drops out. The forward runs on fake tensors (shapes, dtypes and storages, no data), so even SiT-XL/2
is measured in about a second on a CPU; fused kernels take part through their registered fakes.
"""
from __future__ import annotations

import contextlib

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.func import functional_call


def saved_bytes(model: torch.nn.Module, batch_size: int, autocast_dtype: torch.dtype | None = None,
                device: str = "cpu") -> int:
    """Bytes of the distinct storages saved for backward by one training-mode forward pass.

    Only the model's structure and dtypes are used, so it can be built on the meta device.
    """
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    with mode:  # fake copies of the parameters: no data is read, so the model may live on "meta"
        state = {
            name: torch.empty(t.shape, dtype=t.dtype, device=device).requires_grad_(t.requires_grad)
            for name, t in [*model.named_parameters(), *model.named_buffers()]
        }
    param_storages = {v.untyped_storage()._cdata for v in state.values()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in param_storages:
            saved[storage._cdata] = storage.nbytes()
        return t

    autocast = (
        torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype)
        if autocast_dtype is not None else contextlib.nullcontext()
    )
    with mode, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        x = torch.randn(batch_size, model.in_channels, model.input_size, model.input_size, device=device)
        t = torch.rand(batch_size, device=device)
        y = torch.randint(0, model.num_classes, (batch_size,), device=device)
        was_training = model.training
        model.train()
        try:
            functional_call(model, state, (x, t, y))
        finally:
            model.train(was_training)
    return sum(saved.values())


def activation_bytes_per_image(model: torch.nn.Module, autocast_dtype: torch.dtype | None = None,
                               device: str = "cpu", batch_sizes: tuple[int, int] = (2, 4)) -> int:
    """Marginal bytes saved for backward per image (parameters and their casts excluded)."""
    b1, b2 = batch_sizes
    s1 = saved_bytes(model, b1, autocast_dtype, device)
    s2 = saved_bytes(model, b2, autocast_dtype, device)
    return (s2 - s1) // (b2 - b1)
