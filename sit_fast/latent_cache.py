r"""Encode an image dataset once with the VAE, so that training runs with no VAE in the loop.

    python -m sit_fast.latent_cache --data-path /data/imagenet/train --image-size 256 --vae ema \
        --out /data/in256-latents
    torchrun --nproc_per_node=8 -m sit_fast.latent_cache ...        # the shards split over the GPUs
    torchrun --nproc_per_node=8 train.py --latent-cache /data/in256-latents --model SiT-XL/2
    python -m sit_fast.latent_cache --verify --out /data/in256-latents   # after a copy: every byte as written?

Each image is center-cropped (ADM) and encoded as it is and mirrored; the posterior's mean and std
(already multiplied by the VAE scaling factor) are stored, so training draws a fresh posterior
sample each time, as upstream's `latent_dist.sample()` does. Layout of DIR:

    index.json          {"format", "version", "vae", "scaling_factor", "latent_channels", "latent_size",
                         "image_size", "num_images", "num_classes", "classes", "dtype", "data_path",
                         "shards": [{"file", "start", "count"}, ...]}
    settings.json       {"image_size", "vae", "vae_precision", "dtype", "shard_size", "num_images",
                         "num_classes", "dataset_sha256", "holds": "latents"}: written first, checked on
                        every resume
    shard-00000.pt      {"mean": (n, 2, C, h, w), "std": (n, 2, C, h, w), "labels": (n,) int64}
                        axis 1: 0 = as is, 1 = mirrored; read with torch.load(weights_only=True, mmap=True)

Shards are written atomically and skipped when present and whole (one cut short or damaged since is
encoded again, with a warning), so an interrupted run resumes (with any number of processes; a
process killed mid-write leaves a hidden .shard-NNNNN.pt.tmp-PID file, which the next run, holding
the folder's lock, removes and names); settings.json records the settings that shape the latents,
and a folder made with other settings is refused. --batch-size is not one of them (a run out of
memory goes on with a smaller one), though the VAE's arithmetic varies with it: a shard encoded at
another batch size may differ from an uninterrupted run's in the last bit of some values.

Training reads a shard's bytes as they are (memory-mapped, unchecked); --verify reads the whole cache
once, each shard's records against the CRC-32 that torch.save wrote beside them, and says which shards
a bad disk or copy has changed since.
"""
from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import re
import shlex
import sys
import zipfile

from sit_fast.errors import quiet_ctrl_c_while_loading

quiet_ctrl_c_while_loading(__name__)  # python -m: a Ctrl-C while torch loads ends it, quietly

import torch

from sit_fast.argtypes import (
    OneLineArgumentParser, default_workers, doc_paragraph, nonnegative_int, positive_int, user_path,
)
from sit_fast.data import (
    CACHE_FORMAT, CACHE_INDEX, CACHE_VERSION, DataError, ImageFolderDataset, UnreadableImage, close_loader,
    data_fingerprint, latent_cache_settings, load_cache_shard, make_loader, read_cache_index, worker_error,
)
from sit_fast.distributed import (agree, barrier, broadcast_object, check_shared_path, cleanup, init_distributed,
                                  is_distributed, on_main, peer_ended, peer_failed, stop_words)
from sit_fast.errors import (
    UserError, allocation_past_device, cli_entry, first_line, is_out_of_memory, log_warnings_on_stderr, memory_kind,
)
from sit_fast.files import (
    WRITE_REFUSED, FolderLock, atomic_torch_save, atomic_write, is_inside, make_writable_folder, read_failed,
    unfinished_writes, write_failed, written_kept,
)
from sit_fast.interrupts import (
    exit_status, ignore_stop_signals, start_resource_tracker, stop_signals_held, stop_signals_raise, winding_down,
)
from sit_fast.progress import progress
from sit_fast.sampling import check_settings
from sit_fast.vae import check_image_size, load_vae, recorded_vae_spec

logger = logging.getLogger("sit_fast")
STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(description=doc_paragraph(__doc__), prog="python -m sit_fast.latent_cache")
    parser.add_argument("--data-path", type=user_path, help="ImageFolder root: DIR/<class>/<image> (required, "
                        "except with --verify)")
    parser.add_argument("--out", type=user_path, required=True, help="output directory of the cache")
    parser.add_argument("--verify", action="store_true",
                        help="encode nothing: read the finished cache in --out whole and check every shard (its "
                             "bytes against their CRC-32, the shapes the index gives, finite values, labels in "
                             "range) and the image folder's file list (--data-path, else the one recorded) against "
                             "the one encoded; exit status 2, naming what fails. --image-size, --vae, "
                             "--vae-precision, --dtype and --shard-size, given, must be those it was built with")
    parser.add_argument("--image-size", type=positive_int, default=256, help="center-crop size in pixels")
    parser.add_argument("--vae", type=user_path, default="ema",
                        help="VAE: ema, mse (stabilityai/sd-vae-ft-*), a hub id or a local directory")
    parser.add_argument("--vae-precision", choices=["fp32", "bf16"], default="fp32",
                        help="autocast dtype of the VAE encoder")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="images per encoder call, per process")
    parser.add_argument("--shard-size", type=positive_int, default=4096, help="images per shard file")
    parser.add_argument("--dtype", choices=list(STORAGE_DTYPES), default="float16",
                        help="storage dtype of the mean and std (float16: half float32's files, the mean rounded "
                             "to 11 significant bits, which may be coarser than a VAE's posterior std; float32 "
                             "keeps both as encoded)")
    parser.add_argument("--num-workers", type=nonnegative_int, default=default_workers(),
                        help="image decoding workers per process (default: 4, or the CPUs usable if fewer)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress display (a bar on a terminal, a line a minute in a log file)")
    return parser


SHARD = re.compile(r"shard-\d{5}\.pt")  # a shard's name (shard_name)


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.pt"


def pending_shards(out: str, shards: list[tuple[int, int, int]],
                   damaged: list[str] | None = None) -> list[tuple[int, int, int]]:
    """The shards (k, start, count) whose file is not yet in `out`, or is there but not whole (cut short
    or damaged since it was written whole: its zip directory, at the end, cannot be read); the names
    of those are appended to `damaged`."""
    present = set(os.listdir(out))
    pending = []
    for shard in shards:
        name = shard_name(shard[0])
        if name in present and whole_archive(os.path.join(out, name)):
            continue
        if name in present and damaged is not None:
            damaged.append(name)
        pending.append(shard)
    return pending


def whole_archive(path: str) -> bool:
    """Whether torch.save's zip archive at `path` ends in a directory that can be read (its tail alone is read)."""
    try:
        with zipfile.ZipFile(path):
            return True
    except (OSError, zipfile.BadZipFile):
        return False


def shards_written(out: str) -> int | None:
    """How many shards `out` holds (whole: a shard is written under a temporary name, then renamed); None
    where the folder cannot be listed."""
    try:
        return sum(SHARD.fullmatch(name) is not None for name in os.listdir(out))
    except OSError:
        return None


def shards_left(out: str) -> tuple[str, str]:
    """What a failed build leaves in `out`, and what the same command then encodes: ("the 3 shards written
    are kept", "the rest"), before the first shard ("no shard was written yet", "every image"), or where the
    folder cannot be listed ("", "the rest")."""
    count = shards_written(out)
    if count is None:
        return "", "the rest"
    return ("no shard was written yet", "every image") if count == 0 else (written_kept(count, "shard"), "the rest")


def shards_kept(out: str) -> tuple[str, str]:
    """shards_left's, said also where the folder cannot be listed ("the shards written are kept")."""
    kept, rest = shards_left(out)
    return kept or "the shards written are kept", rest


def write_refused(what: str, err: OSError, out: str) -> UserError:
    """The one line for a write that failed, refused (full, read-only, ...) or not (a failing disk's EIO):
    shards are whole or absent, and those in `out` are kept (or none was written yet)."""
    kept, rest = shards_left(out)
    return write_failed(what, err, kept, f"run the same command again to encode {rest}")


def refused_read(err: OSError, out: str) -> bool:
    """Whether a refusal (EACCES, EPERM, which a write meets too) came from a read: it names a folder (the
    build writes files only, its folder made by make_writable_folder, which says its own failure: this is
    a listing, --out's say), or a path outside `out` (every write of the build is in `out`: an input's)."""
    path = err.filename
    return err.errno in (errno.EACCES, errno.EPERM) and path is not None and (
        os.path.isdir(path) or not is_inside(path, out))


def failed_write(err: OSError, out: str) -> bool:
    """Whether an OSError, of any errno, came from a write: it names a file in `out` (every write of the build is
    of a file there; its reads there are listings of `out`, which is a folder, or gone: not a file in it)."""
    path = err.filename
    return (path is not None and not os.path.isdir(path) and is_inside(path, out)
            and os.path.realpath(path) != os.path.realpath(out))


def again_words(out: str) -> str:
    """The line of a second Ctrl-C while a stopped build winds down (its workers stopped, its line said)."""
    kept, rest = shards_kept(out)
    return (f"interrupted again, stopping at once: {kept} (a shard is written whole or left under a temporary name, "
            f"which the next run removes): run the same command again to encode {rest} into {out}")


def check_out_folder(args: argparse.Namespace, lock: FolderLock | None = None) -> None:
    """--out is a folder that can be written, outside --data-path (inside, the next run would scan the
    cache as one more class folder of the dataset, and refuse the cache as made from other files);
    `lock`, the folder's, is taken here: another job encoding into it now is refused before the
    dataset's scan and the VAE's load (minutes, for ImageNet), not after them."""
    if is_inside(args.out, args.data_path):
        raise UserError(f"--out {args.out} is inside --data-path {args.data_path}: put the cache elsewhere (in the "
                        f"dataset's folder it would be read as images of a class the next time)")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a file: pass a folder")
    make_writable_folder(args.out, f"--out {args.out}")
    if lock is not None:
        lock.acquire()


def out_of_memory_advice(args: argparse.Namespace, error: BaseException) -> str:
    """What ran out of memory encoding, and the flags that make it fit; what is kept (shards_kept)."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    message = allocation_past_device(error, device, f"--image-size {args.image_size}, --batch-size {args.batch_size}")
    if message is not None:
        return message
    where = (f"out of {memory_kind(error)} on {device} encoding batches of {args.batch_size} image(s) (x 2 flips) at "
             f"--image-size {args.image_size}")
    if args.batch_size == 1:
        return f"{where}: the VAE does not fit this device at that size"
    return f"{where}: run the same command with --batch-size {args.batch_size // 2} ({shards_kept(args.out)[0]})"


def build_cache(args: argparse.Namespace) -> dict | None:
    """Encode the dataset into args.out; returns the index on rank 0 (None on other ranks).

    Resumable: settings.json records what shapes the latents (image size, VAE, storage dtype, shard
    size, the dataset's file list), a folder made with other settings is refused, and the shards still
    missing are shared out among the processes of this run, however many wrote the ones present.
    Rank 0 holds the folder's lock (another job encoding into it now is refused) until the index is written."""
    with FolderLock(args.out, "--out") as lock:
        return encode(args, lock)


def encode(args: argparse.Namespace, lock: FolderLock) -> dict | None:
    dist_info = init_distributed()
    log_warnings_on_stderr(dist_info.is_main)
    device = dist_info.device
    if args.vae is None or args.vae == "none":  # before the dataset's scan, which may take minutes
        raise UserError("a latent cache holds VAE latents: pass --vae ema, mse, a hub id or a local diffusers "
                        "AutoencoderKL folder (to train in pixel space, --vae none in train.py, no cache is needed)")
    on_main(lambda: check_out_folder(args, lock), dist_info)  # before the scan and the VAE's load
    dataset = ImageFolderDataset(args.data_path, args.image_size)
    check_image_size(args.image_size, args.vae)
    vae_dtype = torch.bfloat16 if args.vae_precision == "bf16" else torch.float32
    codec = load_vae(args.vae, device, dtype=vae_dtype, purpose="encode")
    codec.batch_size = args.batch_size  # the most images per encoder call, mirror images included
    check_image_size(args.image_size, args.vae, codec)
    storage = STORAGE_DTYPES[args.dtype]
    n = len(dataset)
    shards = [(k, start, min(args.shard_size, n - start)) for k, start in enumerate(range(0, n, args.shard_size))]
    vae_spec = recorded_vae_spec(args.vae)
    settings = {
        "image_size": args.image_size, "vae": vae_spec, "vae_precision": args.vae_precision, "dtype": args.dtype,
        "shard_size": args.shard_size, "num_images": n, "num_classes": dataset.num_classes,
        "dataset_sha256": data_fingerprint(dataset),  # the images' list, wherever the folder now lives
    }
    if dist_info.world_size > 1:  # each process indexes its own --data-path: another file list mislabels its shards
        main_sha, main_n = broadcast_object((settings["dataset_sha256"], n))

        def same_files() -> None:
            if settings["dataset_sha256"] != main_sha:
                raise UserError(f"--data-path {args.data_path} holds other files on this node than on rank 0's ({n} "
                                f"images here, {main_n} there, or other names or classes): every process must see "
                                f"the same dataset (a shared filesystem, or identical copies)")

        agree(same_files, dist_info)

    def prepare():
        check_settings(args.out, settings, holds="latents", flag="--out", outputs=SHARD.pattern, lock=lock,
                       flags={key: "--" + key.replace("_", "-") for key in settings if key in vars(args)})
        if leftovers := unfinished_writes(args.out, SHARD.pattern, "shard", "a process", lock):
            logger.warning(leftovers)
        damaged = []
        pending = pending_shards(args.out, shards, damaged)
        if damaged:
            logger.warning(f"--out {args.out}: {len(damaged)} shard(s) cut short or damaged ({', '.join(damaged[:3])}"
                           f"{', ...' if len(damaged) > 3 else ''}): encoded again")
        if pending and os.path.exists(index := os.path.join(args.out, CACHE_INDEX)):
            os.remove(index)  # an earlier build's (its shards deleted since): the cache is unfinished until finish()
        return pending

    pending = on_main(prepare, dist_info)
    check_shared_path(args.out, f"--out {args.out}", dist_info)
    mine = pending[dist_info.rank:: dist_info.world_size]
    if dist_info.is_main:
        todo = sum(count for _, _, count in pending)
        print(f"latent cache: {n - todo} of {n} images already in {args.out}; encoding {todo} (x 2 flips) in "
              f"{len(pending)} shard(s) on {dist_info.world_size} process(es)" if todo else
              f"latent cache: all {n} images already in {args.out}: nothing to encode", flush=True)
    bar = progress(sum(count for _, _, count in mine),
                   "encoding (rank 0's shards)" if dist_info.world_size > 1 else "encoding", "img",
                   disable=not dist_info.is_main or args.no_progress or not pending)
    # One loader for all of this process's shards, its batches never crossing a shard's end: the
    # workers keep reading ahead while a finished shard is written, and start once, not per shard.
    batches = [[(i, 0) for i in range(first, min(first + args.batch_size, start + count))]
               for _, start, count in mine for first in range(start, start + count, args.batch_size)]
    loader = iter(())
    try:
        if batches:  # a stop signal held while the workers start is acted on inside the try: they are stopped
            with stop_signals_held():  # workers start holding the stop signals until they ignore them
                loader = make_loader(dataset, batches, args.num_workers, device.type == "cuda", seed=0,
                                     worker_init_fn=ignore_stop_signals)
        for k, start, count in mine:
            means, stds, labels, done = [], [], [], 0
            while done < count:
                try:
                    images, y = next(loader)
                except UserError as err:  # raised in a loader worker: its message, not the worker's traceback
                    err = worker_error(err)
                    written = any(name.startswith("shard-") for name in os.listdir(args.out))
                    if isinstance(err, UnreadableImage) and written:  # the file list's fingerprint: a removal differs
                        err = UnreadableImage(f"{err} (to keep the shards written, replace it with a readable image "
                                              f"of the same name: removing it changes the folder's file list, and "
                                              f"an --out holding shards of the old list is then refused; deleted, "
                                              f"it is encoded again whole)")
                    raise err from None
                images = images.to(device, non_blocking=True)
                mean, std = codec.encode(torch.cat([images, images.flip(-1)]))  # (2B, C, h, w) each
                b = images.shape[0]
                means.append(torch.stack([mean[:b], mean[b:]], dim=1).to(storage).cpu())  # (B, 2, C, h, w)
                stds.append(torch.stack([std[:b], std[b:]], dim=1).to(storage).cpu())
                labels.append(torch.as_tensor(y, dtype=torch.int64))
                bar.update(b)
                done += b
            path = os.path.join(args.out, shard_name(k))
            try:
                atomic_torch_save({"mean": torch.cat(means), "std": torch.cat(stds), "labels": torch.cat(labels)},
                                  path)
            except OSError as err:  # refused (a full disk), or failed (a failing disk's EIO)
                raise write_refused(path, err, args.out) from None
            if dist_info.is_main:
                bar.write(f"rank 0: wrote {path} ({count} images)")
    except KeyboardInterrupt:
        winding_down(lambda: again_words(args.out))  # the loader's workers are stopped first
        raise
    finally:
        close_loader(loader)
    bar.close()
    try:
        barrier()
    except RuntimeError as err:  # gloo's error: another process ended (its error is in torchrun's summary)
        if not peer_ended(err):
            raise
        kept, rest = shards_kept(args.out)
        raise peer_failed(err, " before its shards were written",
                          f"{kept}: run the same command again to encode {rest}") from None

    def finish() -> dict:
        """On rank 0: every shard there (one written by a process that sees another folder, or deleted
        meanwhile, is not), then the index."""
        missing = [shard_name(k) for k, _, _ in shards if not os.path.exists(os.path.join(args.out, shard_name(k)))]
        if missing:
            raise UserError(f"--out {args.out}: {len(missing)} shard(s) written by this job are missing "
                            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): is the folder on a "
                            f"filesystem every process sees? The same command encodes them again")
        latent_size = args.image_size // codec.downsample
        index = {
            "format": CACHE_FORMAT, "version": CACHE_VERSION,
            "vae": vae_spec,
            "scaling_factor": codec.scaling_factor, "latent_channels": codec.latent_channels,
            "latent_size": latent_size, "image_size": args.image_size, "num_images": n,
            "num_classes": dataset.num_classes, "classes": dataset.classes, "dtype": args.dtype,
            "data_path": os.path.abspath(args.data_path),
            "shards": [{"file": shard_name(k), "start": start, "count": count} for k, start, count in shards],
        }
        text = json.dumps(index, indent=1)
        path = os.path.join(args.out, CACHE_INDEX)
        try:
            if read_text(path) != text:  # a finished cache run again: nothing to write (its disk may be full)
                atomic_write(path, lambda f: f.write(text.encode()))
        except OSError as err:  # every shard is written: the index alone is left to write
            raise write_failed(path, err, f"all {len(shards)} shard(s) are written",
                               "run the same command again to write the index") from None
        print(f"latent cache: {n} images x 2 flips, latents {codec.latent_channels}x{latent_size}x{latent_size}, "
              f"{len(shards)} shard(s) in {args.out}", flush=True)
        return index

    index = on_main(finish, dist_info)  # every process ends with rank 0's line, or its error
    return index if dist_info.is_main else None  # main() leaves the process group


def shard_damage(root: str, shard: dict, index: dict) -> str | None:
    """What is wrong with one shard of a finished cache (read whole), or None."""
    path = os.path.join(root, shard["file"])
    try:
        with zipfile.ZipFile(path) as archive:
            changed = archive.testzip()  # each record read against its CRC-32
    except FileNotFoundError:
        return "missing"
    except (OSError, zipfile.BadZipFile) as err:
        return f"unreadable ({first_line(err)})"
    if changed is not None:
        return f"its bytes changed since it was written (record {changed} fails its CRC-32)"
    try:
        data = load_cache_shard(root, shard, index)
    except DataError as err:
        return err.fault
    mean, std, labels = data["mean"], data["std"], data["labels"]
    if not bool(torch.isfinite(mean).all()):
        return "non-finite means"
    if not bool((torch.isfinite(std) & (std >= 0)).all()):
        return "non-finite or negative stds"
    if labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) < index["num_classes"]):
        return f"labels outside 0..{index['num_classes'] - 1}"
    return None


# The flags that shape the latents, recorded in settings.json: --verify takes them only as the cache's own.
ENCODING_FLAGS = ("image_size", "vae", "vae_precision", "dtype", "shard_size")


def verify_cache(args: argparse.Namespace, given: frozenset = frozenset()) -> dict:
    """--verify: every shard of the finished cache in args.out read whole and checked, then the image
    folder's list against the one encoded; UserError naming the damaged shards, with the command that
    encodes them again, or the folder changed since. given: the flags on the command line; an
    ENCODING_FLAGS one other than the cache's is refused first (the cache is checked as it was built)."""
    index = read_cache_index(args.out, "--out")
    recorded = latent_cache_settings(args.out) or {}
    for key in ENCODING_FLAGS:
        value = recorded_vae_spec(args.vae) if key == "vae" else getattr(args, key)
        if key in given and key in recorded and value != recorded[key]:
            flag = f"--{key.replace('_', '-')}"
            raise UserError(f"{flag} {getattr(args, key)}: the cache in --out {args.out} was encoded with {flag} "
                            f"{recorded[key]}; --verify checks it as it was built: drop {flag}")
    shards = index["shards"]
    damaged = []
    bar = progress(index["num_images"], "verifying", "img", disable=args.no_progress)
    for shard in shards:
        if (damage := shard_damage(args.out, shard, index)) is not None:
            damaged.append(f"{shard['file']}: {damage}")
        bar.update(shard["count"])
    bar.close()
    settings = recorded
    folder = args.data_path or index.get("data_path")
    if damaged:
        try:
            flags = " ".join(f"--{key.replace('_', '-')} {shlex.quote(str(settings[key]))}"
                             for key in ("image_size", "vae", "vae_precision", "dtype", "shard_size"))
        except (KeyError, TypeError):
            flags = "the flags that built it"
        raise UserError(f"--out {args.out}: {len(damaged)} of {len(shards)} shard(s) damaged ("
                        f"{'; '.join(damaged[:3])}{'; ...' if len(damaged) > 3 else ''}): delete them, then python "
                        f"-m sit_fast.latent_cache --data-path {shlex.quote(str(folder or 'DIR'))} "
                        f"--out {shlex.quote(args.out)} {flags} encodes them again")
    if "dataset_sha256" not in settings:
        images = "; images not compared (settings.json, which records their list, cannot be read)"
    elif folder and os.path.isdir(folder):  # the images' list (names and classes) against the one encoded
        listed = ImageFolderDataset(folder, index["image_size"])
        if data_fingerprint(listed) != settings["dataset_sha256"]:
            raise UserError(f"--out {args.out}: its shards are whole, but the images in {folder} are no longer those "
                            f"encoded ({len(listed)} there now, {index['num_images']} in the cache, or other names "
                            f"or classes): encode them into a new --out to train on them")
        images = f"; the images in {folder} are still those encoded (names and classes)"
    else:
        images = f"; images not compared ({folder} not found: --data-path says where they are now)"
    print(f"latent cache {args.out}: {len(shards)} shard(s), {index['num_images']} images x 2 flips: every byte "
          f"as written, shapes as indexed, values finite, labels in range{images}", flush=True)
    return index


def read_text(path: str) -> str | None:
    """The file's text, or None where there is none to read."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        return None


@cli_entry
def main(argv: list[str] | None = None) -> dict | None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verify:
        log_warnings_on_stderr(True)  # the folder scan's, as the build says them
        shadow = build_parser()
        for action in shadow._actions:
            action.default = argparse.SUPPRESS
        return verify_cache(args, frozenset(vars(shadow.parse_args(argv))))
    if args.data_path is None:
        parser.error("the following arguments are required: --data-path")
    with stop_signals_raise():
        try:
            start_resource_tracker()
            return build_cache(args)
        except OSError as err:  # a write not said where it failed (a shard's, settings.json's, index.json's are),
            # or a read that failed (a failing disk's EIO listing --out, say; a refused one is a read too)
            if err.errno in WRITE_REFUSED and not refused_read(err, args.out):
                raise write_refused(err.filename or f"in {args.out}", err, args.out) from None
            if err.errno is None or err.filename is None:
                raise
            if failed_write(err, args.out):  # not refused: a failing disk's EIO, say, or a file gone meanwhile
                raise write_refused(err.filename, err, args.out) from None
            kept, rest = shards_left(args.out)
            raise read_failed(err.filename, err, kept, f"run the same command again to encode {rest}") from None
        except (RuntimeError, MemoryError) as err:  # out of memory, or gloo's word at a collective that a
            if is_out_of_memory(err):  # process (failed in its setup, say) ended
                raise UserError(out_of_memory_advice(args, err)) from None
            if not (isinstance(err, RuntimeError) and is_distributed() and peer_ended(err)):
                raise
            raise peer_failed(err) from None
        except KeyboardInterrupt as err:  # shards are written whole (atomically), so nothing is half done
            winding_down(lambda: again_words(args.out))
            if (said := stop_words(err)) is not None:  # rank 0, or one in its place
                kept, rest = shards_kept(args.out)
                print(f"\n{said}; {kept}: run the same command again to encode {rest} into {args.out}",
                      file=sys.stderr)
            raise SystemExit(exit_status(err)) from None
        finally:
            cleanup()  # on an error too: the other processes hear of it now, not when this one has exited


if __name__ == "__main__":
    main()
