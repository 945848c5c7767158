"""Activation memory: the bytes autograd saves for backward, per image.

Counted, not estimated from a formula: every tensor autograd saves during a forward pass goes through
`torch.autograd.graph.saved_tensors_hooks`; each distinct storage is counted once at its full size.
The per-image figure is marginal in the batch size, (S(b2) - S(b1)) / (b2 - b1), so whatever does not
grow with the batch (the bf16 casts of the weights under autocast) drops out of it; what is left at
batch 0, S(b1) - b1 x that, is reported beside it, since it is held as long as the activations are.
Parameters themselves are not counted. The forward runs on fake tensors (shapes, dtypes and storages,
no data: nothing is allocated, so these are counts, not measurements of a GPU's memory), so even
SiT-XL/2 takes about a second on a CPU; fused kernels take part through their registered fakes.
"""
from __future__ import annotations

import argparse
import contextlib

from sit_fast.errors import quiet_ctrl_c_while_loading

quiet_ctrl_c_while_loading(__name__)  # python -m: a Ctrl-C while torch loads ends it, quietly

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


def activation_bytes(model: torch.nn.Module, autocast_dtype: torch.dtype | None = None, device: str = "cpu",
                     batch_sizes: tuple[int, int] = (2, 4), frozen: bool = False) -> tuple[int, int]:
    """(per image, batch-independent) bytes saved for backward: the marginal bytes per image, and what
    the saved bytes come to at batch 0 (under autocast chiefly the casts of the weights, about 2 bytes
    per parameter of the Linear layers). frozen: the likelihood's input-gradient forward instead of
    a training step's (see saved_bytes)."""
    b1, b2 = batch_sizes
    s1 = saved_bytes(model, b1, autocast_dtype, device, frozen)
    s2 = saved_bytes(model, b2, autocast_dtype, device, frozen)
    per_image = (s2 - s1) // (b2 - b1)
    return per_image, max(0, s1 - b1 * per_image)


def activation_bytes_per_image(model: torch.nn.Module, autocast_dtype: torch.dtype | None = None,
                               device: str = "cpu", batch_sizes: tuple[int, int] = (2, 4),
                               frozen: bool = False) -> int:
    """Marginal bytes saved for backward per image (activation_bytes' first figure)."""
    return activation_bytes(model, autocast_dtype, device, batch_sizes, frozen)[0]


def checkpointed_activation_bytes(full: torch.nn.Module, checkpointed: torch.nn.Module,
                                  autocast_dtype: torch.dtype | None = None, device: str = "cpu") -> tuple[int, int]:
    """activation_bytes of a model trained with gradient checkpointing (`checkpointed`: the same model
    built with grad_checkpointing=True), with the one block it recomputes at a time in backward: what
    the checkpointed model saves (the blocks' inputs), and a depth-th of what its blocks save beyond
    that without checkpointing (`full`), which that block holds while its gradients are computed.
    An estimate: a block's share is taken as the same for every block."""
    per_image, unbatched = activation_bytes(full, autocast_dtype, device)
    kept, kept_unbatched = activation_bytes(checkpointed, autocast_dtype, device)
    depth = len(checkpointed.blocks)
    return (kept + max(0, per_image - kept) // depth, kept_unbatched + max(0, unbatched - kept_unbatched) // depth)


def weight_bytes(model: torch.nn.Module) -> int:
    """The parameters' bytes as the model stores them."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def sampling_weight_bytes(model: torch.nn.Module) -> int:
    """The weights as sample.py holds them: the parameters, and the concatenation of the adaLN weights
    that it keeps from call to call (SiT.reuse_frozen_modulation, a third of SiT-XL's weights)."""
    return weight_bytes(model) + sum(weight_bytes(linear) for linear in model.modulation_linears())


def training_state_bytes(model: torch.nn.Module, ema: bool = True) -> int:
    """fp32 weights + gradients + AdamW's two moments (+ an fp32 EMA copy): 16 (20) bytes/parameter."""
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return n * (16 + (4 if ema else 0)) + n_frozen * 4 * (2 if ema else 1)


def size_text(n_bytes: float, unit: str) -> str:
    """n_bytes in MiB or GiB as the tables print it: whole MiB and hundredths of a GiB, but two significant
    digits below 10 MiB or 0.1 GiB, so that a small model's figures do not read as 0."""
    value = n_bytes / (2**20 if unit == "MiB" else 2**30)
    small = value < (10 if unit == "MiB" else 0.1)
    return f"{value:.2g}" if small else f"{value:.0f}" if unit == "MiB" else f"{value:.2f}"


def batch_bound(gpu_bytes: int, fixed_bytes: int, activation_bytes: int, headroom_bytes: int) -> int:
    """The per-GPU batch that the saved activations leave room for beside fixed_bytes (training state
    or weights, and the batch-independent saved bytes): an upper estimate (temporaries inside a layer,
    the allocator and workspaces are not counted); 0 if none fits."""
    return max(0, (gpu_bytes - fixed_bytes - headroom_bytes) // activation_bytes)


@cli_entry
def main(argv=None) -> None:
    """Print per-model memory figures: training state, and the activation bytes saved per image;
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
                        help="also a table of per-GPU batch bounds for GPUs with this much memory (GiB), "
                             "e.g. 24 40 48 80 139.8")
    parser.add_argument("--headroom-gib", type=gib, default=4.0,
                        help="memory kept aside in the bounds for the CUDA context, workspaces and temporaries")
    parser.add_argument("--likelihood", action="store_true",
                        help="the activations of sample.py's --likelihood (a frozen model differentiated with "
                             "respect to its input) instead of a training step's")
    parser.add_argument("--grad-checkpointing", action="store_true",
                        help="train.py's --grad-checkpointing: the blocks' inputs, and the one block recomputed at a "
                             "time in backward (an estimate: a depth-th of the blocks' saved bytes)")
    args = parser.parse_args(argv)
    if args.grad_checkpointing and args.likelihood:
        raise UserError("--grad-checkpointing is a training option: sample.py's --likelihood does not take it")
    args.models = list(dict.fromkeys(args.models))  # a model named twice is one row
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
    ckpt = " (grad ckpt)" if args.grad_checkpointing else ""
    columns = ["model", "params", "fp32 weights", *([] if frozen else ["train state (w+g+AdamW+EMA)"]),
               *(f"act/img {label}{ckpt}" for _, _, label in variants)]
    print("| " + " | ".join(columns) + " |")
    print("|" + " --- |" * len(columns))
    kinds = {"ref": {}, "ref_sdpa": {"attn_backend": "sdpa"}, "fast": {"attn_backend": "sdpa", "fused_kernels": True}}
    bounds = []
    for name in args.models:
        figures = []  # per variant: (activation bytes per image, fixed bytes)
        for key, dtype, _ in variants:
            with torch.device("meta"):
                model = SiT_models[name](input_size=args.image_size // 8, **kinds[key])
            if frozen and dtype is not None:  # sample.py keeps the matmul weights in bf16 (ModelForwards)
                model.cast_matmul_weights_(dtype)
            if args.grad_checkpointing:
                with torch.device("meta"):
                    checkpointed = SiT_models[name](input_size=args.image_size // 8, grad_checkpointing=True,
                                                    **kinds[key])
                per_image, unbatched = checkpointed_activation_bytes(model, checkpointed, dtype)
            else:
                per_image, unbatched = activation_bytes(model, dtype, frozen=frozen)
            held = sampling_weight_bytes(model) if frozen else training_state_bytes(model)
            figures.append((per_image, unbatched + held))
        params = sum(p.numel() for p in model.parameters())
        row = [name, f"{params / 1e6:.1f} M", f"{size_text(params * 4, 'GiB')} GiB",
               *([] if frozen else [f"{size_text(training_state_bytes(model), 'GiB')} GiB"]),
               *(f"{size_text(a, 'MiB')} MiB" for a, _ in figures)]
        print("| " + " | ".join(row) + " |")
        bounds.append((name, figures[-3:]))
    if not args.gpu_gib:
        return
    job = "--likelihood" if frozen else "training" + (" (--grad-checkpointing)" if args.grad_checkpointing else "")
    fixed_label = ("the weights as sample.py holds them (matmul weights in bf16 under bf16; the adaLN weights' "
                   "concatenation)" if frozen else "train state") + " + the bytes saved for backward whatever the " \
        "batch (the weights' casts under bf16)"
    print(f"\nPer-GPU {job} batch bounds, {args.image_size}px, (GPU - fixed - {args.headroom_gib:g} GiB) / activations "
          f"per image, fixed = {fixed_label}; fp32+sdpa / bf16+sdpa / fast bf16:\n")
    print("| model | fixed | " + " | ".join(f"{g:g} GiB" for g in args.gpu_gib) + " |")
    print("| --- | --- |" + " --- |" * len(args.gpu_gib))
    for name, figures in bounds:
        cells = [" / ".join(str(batch_bound(int(g * 2**30), fixed, a, int(args.headroom_gib * 2**30)))
                            for a, fixed in figures) for g in args.gpu_gib]
        fixed = " / ".join(size_text(fixed, "GiB") for _, fixed in figures) + " GiB"
        print(f"| {name} | {fixed} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
