"""Encode an image dataset once with the VAE, so that training runs with no VAE in the loop.

    python -m sit_fast.latent_cache --data-path /data/imagenet/train --image-size 256 --vae ema --out /data/in256-latents
    torchrun --nproc_per_node=8 -m sit_fast.latent_cache ...        # the shards split over the GPUs
    torchrun --nproc_per_node=8 train.py --latent-cache /data/in256-latents --model SiT-XL/2

Each image is center-cropped (ADM) and encoded as it is and mirrored; the posterior's mean and std
(already multiplied by the VAE scaling factor) are stored, so training draws a fresh posterior
sample each time, as upstream's `latent_dist.sample()` does. Layout of DIR:

    index.json          {"format", "version", "vae", "scaling_factor", "latent_channels", "latent_size",
                         "image_size", "num_images", "num_classes", "classes", "dtype", "shards": [
                         {"file", "start", "count"}, ...]}
    shard-00000.pt      {"mean": (n, 2, C, h, w), "std": (n, 2, C, h, w), "labels": (n,) int64}
                        axis 1: 0 = as is, 1 = mirrored; read with torch.load(weights_only=True, mmap=True)

Shards are written atomically and skipped when present, so an interrupted run resumes.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from sit_fast.data import CACHE_FORMAT, CACHE_INDEX, CACHE_VERSION, ImageFolderDataset, make_loader
from sit_fast.distributed import barrier, cleanup, init_distributed
from sit_fast.errors import UserError, cli_entry
from sit_fast.training.checkpointing import atomic_torch_save
from sit_fast.training.args import OneLineArgumentParser
from sit_fast.vae import load_vae

STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m sit_fast.latent_cache")
    parser.add_argument("--data-path", type=str, required=True, help="ImageFolder root: DIR/<class>/<image>")
    parser.add_argument("--out", type=str, required=True, help="output directory of the cache")
    parser.add_argument("--image-size", type=int, default=256, help="center-crop size in pixels")
    parser.add_argument("--vae", type=str, default="ema",
                        help="VAE: ema, mse (stabilityai/sd-vae-ft-*), a hub id or a local directory")
    parser.add_argument("--vae-precision", choices=["fp32", "bf16"], default="fp32",
                        help="autocast dtype of the VAE encoder")
    parser.add_argument("--batch-size", type=int, default=64, help="images per encoder call, per process")
    parser.add_argument("--shard-size", type=int, default=4096, help="images per shard file")
    parser.add_argument("--dtype", choices=list(STORAGE_DTYPES), default="float16",
                        help="storage dtype of the mean and std")
    parser.add_argument("--num-workers", type=int, default=4, help="image decoding workers per process")
    return parser


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.pt"


def build_cache(args: argparse.Namespace) -> dict | None:
    """Encode the dataset into args.out; returns the index on rank 0 (None on other ranks)."""
    dist_info = init_distributed()
    device = dist_info.device
    dataset = ImageFolderDataset(args.data_path, args.image_size)
    vae_dtype = torch.bfloat16 if args.vae_precision == "bf16" else torch.float32
    codec = load_vae(args.vae, device, dtype=vae_dtype)
    if codec is None:
        raise UserError("a latent cache needs a VAE: --vae none makes no sense here")
    if args.image_size % codec.downsample:
        raise UserError(f"--image-size {args.image_size} is not divisible by the VAE's downsampling factor {codec.downsample}")
    if args.shard_size < 1 or args.batch_size < 1:
        raise UserError("--shard-size and --batch-size must be positive")
    os.makedirs(args.out, exist_ok=True)
    storage = STORAGE_DTYPES[args.dtype]
    n = len(dataset)
    shards = [(k, start, min(args.shard_size, n - start)) for k, start in enumerate(range(0, n, args.shard_size))]
    started = time.time()
    for k, start, count in shards[dist_info.rank:: dist_info.world_size]:
        path = os.path.join(args.out, shard_name(k))
        if os.path.exists(path):
            continue
        keys = [(i, 0) for i in range(start, start + count)]
        batches = [keys[b: b + args.batch_size] for b in range(0, count, args.batch_size)]
        means, stds, labels = [], [], []
        for images, y in make_loader(dataset, batches, args.num_workers, device.type == "cuda", seed=k):
            images = images.to(device, non_blocking=True)
            mean, std = codec.encode(torch.cat([images, images.flip(-1)]))  # (2B, C, h, w) each
            b = images.shape[0]
            means.append(torch.stack([mean[:b], mean[b:]], dim=1).to(storage).cpu())  # (B, 2, C, h, w)
            stds.append(torch.stack([std[:b], std[b:]], dim=1).to(storage).cpu())
            labels.append(torch.as_tensor(y, dtype=torch.int64))
        atomic_torch_save({"mean": torch.cat(means), "std": torch.cat(stds), "labels": torch.cat(labels)}, path)
        if dist_info.is_main:
            print(f"rank 0: wrote {path} ({count} images, {time.time() - started:.0f}s)", flush=True)
    barrier()
    index = None
    if dist_info.is_main:
        latent_size = args.image_size // codec.downsample
        index = {
            "format": CACHE_FORMAT, "version": CACHE_VERSION,
            "vae": os.path.abspath(args.vae) if os.path.isdir(args.vae) else args.vae,  # usable from any folder
            "scaling_factor": codec.scaling_factor, "latent_channels": codec.latent_channels,
            "latent_size": latent_size, "image_size": args.image_size, "num_images": n,
            "num_classes": dataset.num_classes, "classes": dataset.classes, "dtype": args.dtype,
            "data_path": os.path.abspath(args.data_path),
            "shards": [{"file": shard_name(k), "start": start, "count": count} for k, start, count in shards],
        }
        tmp = os.path.join(args.out, f".{CACHE_INDEX}.tmp")
        with open(tmp, "w") as f:
            json.dump(index, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(args.out, CACHE_INDEX))
        print(f"latent cache: {n} images x 2 flips, latents {codec.latent_channels}x{latent_size}x{latent_size}, "
              f"{len(shards)} shard(s) in {args.out}", flush=True)
    barrier()
    cleanup()
    return index


@cli_entry
def main(argv: list[str] | None = None) -> dict | None:
    return build_cache(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
