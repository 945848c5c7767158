"""Roofline of a training step and a sampling call: the time no GPU run of a variant can beat.

    python -m benchmarks.roofline --copy-gbps 4300 --matmul-tflops 790          # two ceilings, or
    python -m benchmarks.roofline --results benchmarks/results/<run>/results.json   # a run's own

Every aten op of one training step (forward, loss, backward) or one guided sampling call is run on
fake tensors (shapes and dtypes, no data: SiT-XL/2 in seconds on a CPU) and sorted into:
- matrix products and attention (mm, addmm, bmm, convolution, scaled-dot-product attention, and
  their backward): their time is the model's FLOPs (sit_fast.flops, the count MFU uses) at the matmul
  ceiling; their own reads and writes are left inside that time;
- views and allocations: nothing;
- the rest, the memory-bound ops (LayerNorm, modulation, residuals, GELU, casts, the fused kernels):
  their bytes, each input and output counted once as the op sees it (a broadcast vector at its
  stored size; the destination of an op that overwrites it, copy_, fill_, zero_ or a random fill,
  and an out= argument, written, not read; ones_like and its kind read nothing), at the copy
  ceiling. A training step adds AdamW's update, 28 bytes per trainable parameter (fp32 weight,
  gradient and two moments read; weight and moments written).

floor = FLOPs / matmul ceiling + bytes / copy ceiling. The eager reference's bytes are what eager
PyTorch moves; torch.compile fuses some of those ops, so the compiled reference moves fewer, and
`ref / ours` of the floors is an upper estimate of how much faster than the compiled reference the
fast path can be where both run their matrix products equally well. The ops are those the CPU
dispatches (CPU autocast, CPU attention), but for the fast path's choices made by device: its
sampling MLP counts as on CUDA (fc1's GELU in the matmul's epilogue, sit_fast.models.linear_gelu,
unless SIT_FAST_GELU_EPILOGUE=0); on CUDA a few layouts differ (the attention output there needs no
copy back to tokens-first), so the bytes are close, not exact.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import sys
import warnings

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from sit_fast.argtypes import doc_paragraph, positive_float, positive_int, user_path

# Ops whose time is FLOPs at the matmul ceiling (matched on the op name without overload).
COMPUTE_OPS = ("mm", "addmm", "bmm", "baddbmm", "convolution", "convolution_backward", "_addmm_activation")
COMPUTE_PREFIXES = ("_scaled_dot_product", "_flash_attention", "_efficient_attention", "_cudnn_attention")
# Ops that move no data (or only what the next op is counted for).
FREE_OPS = ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "lift_fresh",
            "lift_fresh_copy", "_local_scalar_dense", "alias", "set_", "resize_", "_unsafe_view", "device")
# In-place ops that overwrite their destination without reading it: copy_ reads its source only.
OVERWRITE_OPS = ("copy_", "fill_", "zero_", "normal_", "uniform_", "bernoulli_", "random_", "exponential_")
# Ops that take a tensor for its shape, dtype and device only: they write their output, read nothing.
LIKE_OPS = ("new_zeros", "new_ones", "new_full", "zeros_like", "ones_like", "full_like", "rand_like", "randn_like",
            "randint_like")
ADAMW_BYTES_PER_PARAM = 28  # fp32: read weight, gradient, exp_avg, exp_avg_sq; write weight and both moments


def _op_name(func) -> str:
    return func.overloadpacket.__name__ if hasattr(func, "overloadpacket") else str(func)


def _read_bytes(t: torch.Tensor) -> int:
    """Bytes an op reads of `t`: its elements, or its storage when that is smaller (a broadcast)."""
    view = t.numel() * t.element_size()
    try:
        return min(view, t.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError):
        return view


def _inputs_read(func, args: tuple, kwargs: dict) -> list:
    """The arguments an op reads: all but its out= arguments and the destination of an op that
    overwrites it (OVERWRITE_OPS); none of an op that takes a tensor for its shape only (LIKE_OPS)."""
    name, schema = _op_name(func), getattr(func, "_schema", None)
    if name in LIKE_OPS:
        return []
    if schema is None:
        return [args, kwargs]
    overwrites = name in OVERWRITE_OPS
    read = []
    for index, argument in enumerate(schema.arguments):
        if not (argument.is_out or (overwrites and index == 0)):
            read.append(args[index] if index < len(args) else kwargs.get(argument.name))
    return read


class TrafficCounter(TorchDispatchMode):
    """Bytes of memory-bound ops by op name, and the names of the compute ops seen."""

    def __init__(self):
        super().__init__()
        self.bytes: collections.Counter[str] = collections.Counter()
        self.compute: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from sit_fast.models import COMPOSITE_OPS

        name = _op_name(func)
        if name in COMPOSITE_OPS:  # our custom ops made of aten ops: what they run inside, counted
            with self:
                return COMPOSITE_OPS[name](*args, **(kwargs or {}))
        out = func(*args, **(kwargs or {}))
        if name in COMPUTE_OPS or name.startswith(COMPUTE_PREFIXES):
            self.compute[name] += 1
        elif not (getattr(func, "is_view", False) or name in FREE_OPS):
            reads = sum(_read_bytes(t) for t in tree_leaves(_inputs_read(func, args, kwargs or {}))
                        if isinstance(t, torch.Tensor))
            writes = sum(t.numel() * t.element_size() for t in tree_leaves(out) if isinstance(t, torch.Tensor))
            self.bytes[name] += reads + writes
        return out


def count_traffic(model: torch.nn.Module, batch: int, train: bool, autocast_dtype: torch.dtype | None,
                  cfg: bool = True, device: str = "cpu") -> TrafficCounter:
    """Memory-bound bytes of one training step (forward, transport loss, backward; train=True) or
    one sampling call (a guided forward of 2 x batch images under no_grad; train=False) of `model`,
    which may live on the meta device."""
    from sit_fast.models import shapes_only
    from sit_fast.transport import create_transport

    fake = FakeTensorMode(allow_non_fake_inputs=False)
    with fake:
        state = {name: torch.empty(t.shape, dtype=t.dtype, device=device).requires_grad_(t.requires_grad and train)
                 for name, t in [*model.named_parameters(), *model.named_buffers()]}
    counter = TrafficCounter()
    autocast = (torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype)
                if autocast_dtype is not None else contextlib.nullcontext())
    kw = dict(device=device)
    was_training, was_reusing = model.training, model.reuse_frozen_modulation
    model.train(train)
    # A sampling call reuses the frozen adaLN weights' concatenation, as sit_fast.sampling.ModelForwards
    # sets it up; a training step runs each adaLN layer's own GEMM.
    model.reuse_frozen_modulation = not train
    try:
        with fake, shapes_only(), counter, warnings.catch_warnings():
            # A frozen model keys its adaLN-weight cache on data pointers, which fake tensors only fake.
            warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
            x = torch.randn(batch, model.in_channels, model.input_size, model.input_size, **kw)
            y = torch.randint(0, model.num_classes, (batch,), **kw)
            if train:
                transport = create_transport("Linear", "velocity")

                class Bound(torch.nn.Module):  # the transport calls model(x, t, y=...)
                    def forward(self, x, t, y):
                        return functional_call(model, state, (x, t, y))

                with autocast:
                    loss = transport.training_losses(Bound(), x, dict(y=y))["loss"].mean()
                loss.backward()
            else:
                n = 2 * batch if cfg else batch
                x, t, y = torch.randn(n, *x.shape[1:], **kw), torch.rand(n, **kw), torch.randint(0, 10, (n,), **kw)
                with torch.no_grad(), autocast:
                    for _ in range(2):  # the second call counts: a frozen model reuses the first's
                        counter.bytes.clear()  # concatenation of the adaLN weights
                        counter.compute.clear()
                        functional_call(model, state, (x, t, y))
    finally:
        model.train(was_training)
        model.reuse_frozen_modulation = was_reusing
    return counter


@contextlib.contextmanager
def _gelu_epilogue_on_the_cpu():
    """The fast path's MLP takes its GELU epilogue wherever it would on CUDA (fake tensors: no GELU runs)."""
    from sit_fast import models

    devices = models._GELU_EPILOGUE_DEVICES
    models._GELU_EPILOGUE_DEVICES = (*devices, "cpu")
    try:
        yield
    finally:
        models._GELU_EPILOGUE_DEVICES = devices


def roofline(model_name: str = "SiT-XL/2", image_size: int = 256, train_batch: int = 256,
             sample_batch: int = 256, copy_gbps: float = 0.0, matmul_tflops: float = 0.0) -> list[dict]:
    """One row per (workload, variant): FLOPs, memory-bound bytes, the floor time and images/s."""
    rows = []
    for workload, variant, batch, flops, moved, ops in _counts(model_name, image_size, train_batch, sample_batch):
        gemm_ms = flops / (matmul_tflops * 1e12) * 1e3
        memory_ms = moved / (copy_gbps * 1e9) * 1e3
        rows.append(dict(workload=workload, variant=variant, batch=batch, tflop=flops / 1e12,
                         memory_bound_gb=moved / 1e9, gemm_ms=gemm_ms, memory_ms=memory_ms,
                         floor_ms=gemm_ms + memory_ms, images_per_s=batch / ((gemm_ms + memory_ms) * 1e-3),
                         ops={k: v / 1e9 for k, v in ops}))
    return rows


@functools.lru_cache(maxsize=4)
def _counts(model_name: str, image_size: int, train_batch: int, sample_batch: int) -> tuple[tuple, ...]:
    """(workload, variant, batch, FLOPs, bytes moved, ((op, bytes), ...) largest first) per row: what the
    ceilings divide. Counted once per model and batches (a pass over the model's ops on the meta device,
    seconds for SiT-XL), whatever ceilings they are asked for with."""
    from sit_fast.flops import forward_flops, train_step_flops
    from sit_fast.models import SiT_models

    variants = {"reference+bf16+sdpa": dict(attn_backend="sdpa", fused_kernels=False),
                "ours": dict(attn_backend="sdpa", fused_kernels=True)}
    counts = []
    for variant, kwargs in variants.items():
        with torch.device("meta"):
            model = SiT_models[model_name](input_size=image_size // 8, learn_sigma=True, num_classes=1000, **kwargs)
        params = sum(p.numel() for p in model.parameters() if p.requires_grad)  # AdamW skips pos_embed (frozen)
        for workload, batch, train in (("train_step", train_batch, True), ("sample_call_cfg", sample_batch, False)):
            if not train and variant == "ours":
                model.cast_matmul_weights_(torch.bfloat16)  # as the fast path samples (ModelForwards)
            with _gelu_epilogue_on_the_cpu():
                counter = count_traffic(model, batch, train, torch.bfloat16)
            flops = batch * (train_step_flops(model) if train else 2 * forward_flops(model))
            moved = sum(counter.bytes.values()) + (ADAMW_BYTES_PER_PARAM * params if train else 0)
            counts.append((workload, variant, batch, flops, moved, tuple(counter.bytes.most_common())))
    return tuple(counts)


def figure(x: float, decimals: int = 0) -> str:
    """A figure for the table: `decimals` decimals where that shows three significant figures or more,
    else three significant figures (a CPU's 0.66 TFLOP/s must not print as 1, nor 0.4 images/s as 0)."""
    return f"{x:.{decimals}f}" if abs(x) >= 10 ** (2 - decimals) else f"{x:.3g}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.roofline", description=doc_paragraph(__doc__),
                                     allow_abbrev=False)
    from sit_fast.models import SiT_models, model_config

    parser.add_argument("--results", type=user_path,
                        help="a results.json whose measured ceilings to use (--copy-gbps or --matmul-tflops, "
                             "given, replaces its figure)")
    parser.add_argument("--copy-gbps", type=positive_float, help="device-to-device copy ceiling, GB/s (read + written)")
    parser.add_argument("--matmul-tflops", type=positive_float, help="bf16 matmul ceiling, TFLOP/s")
    parser.add_argument("--model", choices=list(SiT_models), default="SiT-XL/2",
                        help="model size / patch (default: SiT-XL/2)")
    parser.add_argument("--image-size", type=positive_int, default=256,
                        help="image size in pixels, a multiple of 8 x the patch size (latent: image size / 8, "
                             "as through the SD VAE) (default: 256)")
    parser.add_argument("--train-batch", type=positive_int, default=256, help="images per training step (default: 256)")
    parser.add_argument("--sample-batch", type=positive_int, default=256,
                        help="images per sampling call (the model sees 2x) (default: 256)")
    args = parser.parse_args(argv)
    patch = model_config(args.model)["patch_size"]
    if args.image_size % (8 * patch):
        parser.error(f"--image-size {args.image_size}: {args.model} takes a multiple of {8 * patch} "
                     f"(the VAE's 8 x the patch size {patch})")
    copy_gbps, matmul_tflops = args.copy_gbps, args.matmul_tflops
    if args.results:
        with open(args.results) as f:
            document = json.load(f)
        ceilings, environment = document["ceilings"], document.get("environment", {})
        taken = [name for name, given in (("copy", copy_gbps), ("matmul", matmul_tflops)) if not given]
        copy_gbps = copy_gbps or ceilings["copy_gbps"]
        matmul_tflops = matmul_tflops or ceilings["matmul_tflops"]
        if taken and environment.get("device_type") != "cuda":  # both given: none of its figures is used
            its = "its ceilings bound" if len(taken) == 2 else f"its {taken[0]} ceiling bounds"
            print(f"note: {args.results} was measured on {environment.get('device', 'an unnamed device')} "
                  f"({environment.get('device_type', 'no device type')}), not a GPU: {its} "
                  f"nothing a GPU run does", file=sys.stderr)
    if not copy_gbps or not matmul_tflops:
        parser.error("give the two ceilings: --results RESULTS_JSON, or --copy-gbps and --matmul-tflops")
    rows = roofline(args.model, args.image_size, args.train_batch, args.sample_batch, copy_gbps, matmul_tflops)
    print(f"{args.model} at {args.image_size}px, bf16; ceilings: copy {figure(copy_gbps)} GB/s, "
          f"matmul {figure(matmul_tflops)} TFLOP/s")
    print("| workload | variant | batch | TFLOP | memory-bound GB | matmul ms | memory ms | floor ms | images/s "
          "at the floor (a sampling call's: per model call) | largest memory-bound ops (GB) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        ops = ", ".join(f"{k} {figure(v, 2)}" for k, v in list(r["ops"].items())[:6])
        figures = " | ".join(figure(r[k], 1) for k in ("tflop", "memory_bound_gb", "gemm_ms", "memory_ms", "floor_ms"))
        figures += f" | {figure(r['images_per_s'])}"
        print(f"| {r['workload']} | {r['variant']} | {r['batch']} | {figures} | {ops} |")
    for workload in ("train_step", "sample_call_cfg"):
        ref, ours = (next(r for r in rows if r["workload"] == workload and r["variant"] == v)
                     for v in ("reference+bf16+sdpa", "ours"))
        print(f"{workload}: eager reference floor / ours floor = {ref['floor_ms'] / ours['floor_ms']:.2f}")


if __name__ == "__main__":
    main()
