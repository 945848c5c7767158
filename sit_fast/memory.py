"""Activation memory: the bytes autograd saves for backward, per image.

Measured, not estimated: every tensor autograd saves during a forward pass goes through
`torch.autograd.graph.saved_tensors_hooks`; each distinct storage is counted once at its full size.
The figure is marginal in the batch size, (S(b2) - S(b1)) / (b2 - b1), so whatever does not grow with
the batch (parameters, their bf16 casts under autocast, the modulation weights' concatenation)
drops out. The forward runs on fake tensors (shapes, dtypes and storages, no data), so even SiT-XL/2
is measured in about a second on a CPU; fused kernels take part through their registered fakes.
"""
from __future__ import annotations

import argparse
import contextlib

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.func import functional_call

from sit_fast.errors import UserError, cli_entry
from sit_fast.models import shapes_only


def saved_bytes(model: torch.nn.Module, batch_size: int, autocast_dtype: torch.dtype | None = None,
                device: str = "cpu", frozen: bool = False) -> int:
    """Bytes of the distinct storages saved for backward by one training-mode forward pass.

    frozen: instead, an eval-mode forward of the model with no parameter requiring grad, differentiated
    with respect to its input x (what sample.py's --likelihood does at every ODE evaluation).
    Only the model's structure and dtypes are used, so it can be built on the meta device.
    """
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    with mode:  # fake copies of the parameters: no data is read, so the model may live on "meta"
        state = {
            name: torch.empty(t.shape, dtype=t.dtype, device=device).requires_grad_(t.requires_grad and not frozen)
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
    with mode, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast, shapes_only():
        x = torch.randn(batch_size, model.in_channels, model.input_size, model.input_size, device=device)
        x.requires_grad_(frozen)
        t = torch.rand(batch_size, device=device)
        y = torch.randint(0, model.num_classes, (batch_size,), device=device)
        was_training = model.training
        model.train(not frozen)
        try:
            functional_call(model, state, (x, t, y))
        finally:
            model.train(was_training)
    return sum(saved.values())


def activation_bytes_per_image(model: torch.nn.Module, autocast_dtype: torch.dtype | None = None,
                               device: str = "cpu", batch_sizes: tuple[int, int] = (2, 4),
                               frozen: bool = False) -> int:
    """Marginal bytes saved for backward per image (parameters and their casts excluded); frozen: of
    the likelihood's input-gradient forward instead of a training step's (see saved_bytes)."""
    b1, b2 = batch_sizes
    s1 = saved_bytes(model, b1, autocast_dtype, device, frozen)
    s2 = saved_bytes(model, b2, autocast_dtype, device, frozen)
    return (s2 - s1) // (b2 - b1)


def training_state_bytes(model: torch.nn.Module, ema: bool = True) -> int:
    """fp32 weights + gradients + AdamW's two moments (+ an fp32 EMA copy): 16 (20) bytes/parameter."""
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return n * (16 + (4 if ema else 0)) + n_frozen * 4 * (2 if ema else 1)


def batch_bound(gpu_bytes: int, state_bytes: int, activation_bytes: int, headroom_bytes: int) -> int:
    """The per-GPU training batch that the saved activations leave room for: an upper estimate
    (temporaries inside a layer, the allocator and workspaces are not counted); 0 if none fits."""
    return max(0, (gpu_bytes - state_bytes - headroom_bytes) // activation_bytes)


@cli_entry
def main(argv=None) -> None:
    """Print per-model memory figures: training state, and measured activation bytes per image;
    with --gpu-gib, the per-GPU batch bound of each variant on GPUs of those sizes."""
    from sit_fast.argtypes import OneLineArgumentParser, positive_float, positive_int
    from sit_fast.models import UPSTREAM_MODELS, SiT_models, model_config

    def gib(value: str) -> float:
        number = float(value)
        if not 0 <= number < float("inf"):  # also refuses nan
            raise argparse.ArgumentTypeError(f"must be 0 or more GiB, got {value}")
        return number

    parser = OneLineArgumentParser(prog="python -m sit_fast.memory", allow_abbrev=False,
                                   description="SiT memory table (parameters, training state, activations).")
    parser.add_argument("--models", nargs="+", choices=list(SiT_models), default=UPSTREAM_MODELS, metavar="MODEL",
                        help="registry names (default: the 12 upstream models, SiT-XL/2 ... SiT-S/8)")
    parser.add_argument("--image-size", type=positive_int, default=256, help="image size (latent = image size / 8)")
    parser.add_argument("--gpu-gib", type=positive_float, nargs="+", default=None,
                        help="also a table of per-GPU batch bounds for GPUs with this much memory (GiB), e.g. 24 40 48 80 141")
    parser.add_argument("--headroom-gib", type=gib, default=4.0,
                        help="memory kept aside in the bounds for the CUDA context, workspaces and temporaries")
    parser.add_argument("--likelihood", action="store_true",
                        help="the activations of sample.py's --likelihood (a frozen model differentiated with "
                             "respect to its input) instead of a training step's")
    args = parser.parse_args(argv)
    for name in args.models:
        patch = model_config(name)["patch_size"]
        if args.image_size % (8 * patch):
            raise UserError(f"--image-size {args.image_size}: {name} needs a multiple of {8 * patch} "
                            f"(the VAE's 8 times the patch size {patch})")
    frozen = args.likelihood
    # Per variant: the reference (math or SDPA attention) or the fast path, and the autocast dtype.
    variants = [("ref_sdpa", None, "ref fp32+sdpa"), ("ref_sdpa", torch.bfloat16, "ref bf16+sdpa"),
                ("fast", torch.bfloat16, "fast bf16")]
    if not frozen:  # sample.py never picks math attention; train.py neither, but the reference has it
        variants.insert(0, ("ref", None, "ref fp32 (math attn)"))
    columns = ["model", "params", "fp32 weights", *([] if frozen else ["train state (w+g+AdamW+EMA)"]),
               *(f"act/img {label}" for _, _, label in variants)]
    print("| " + " | ".join(columns) + " |")
    print("|" + " --- |" * len(columns))
    bounds = []
    for name in args.models:
        with torch.device("meta"):
            models = {"ref": SiT_models[name](input_size=args.image_size // 8),
                      "ref_sdpa": SiT_models[name](input_size=args.image_size // 8, attn_backend="sdpa"),
                      "fast": SiT_models[name](input_size=args.image_size // 8, attn_backend="sdpa",
                                               fused_kernels=True)}
        params = sum(p.numel() for p in models["ref"].parameters())
        fixed = params * 4 if frozen else training_state_bytes(models["ref"])
        activations = [activation_bytes_per_image(models[key], dtype, frozen=frozen) for key, dtype, _ in variants]
        row = [name, f"{params / 1e6:.1f} M", f"{params * 4 / 2**30:.2f} GiB",
               *([] if frozen else [f"{fixed / 2**30:.2f} GiB"]), *(f"{a / 2**20:.0f} MiB" for a in activations)]
        print("| " + " | ".join(row) + " |")
        bounds.append((name, fixed, activations[-3:]))
    if not args.gpu_gib:
        return
    job = "--likelihood" if frozen else "training"
    fixed_label = "fp32 weights" if frozen else "train state"
    print(f"\nPer-GPU {job} batch bounds, {args.image_size}px, (GPU - {fixed_label} - {args.headroom_gib:g} GiB) / "
          f"activations per image; fp32+sdpa / bf16+sdpa / fast bf16:\n")
    print("| model | " + " | ".join(f"{g:g} GiB" for g in args.gpu_gib) + " |")
    print("| --- |" + " --- |" * len(args.gpu_gib))
    for name, fixed, activations in bounds:
        cells = [" / ".join(str(batch_bound(int(g * 2**30), fixed, a, int(args.headroom_gib * 2**30)))
                            for a in activations) for g in args.gpu_gib]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
