"""Training data: ImageFolder images, scikit-learn's bundled digits, and a VAE latent cache.

Every dataset is indexed by a key (index, flip): the sampler decides both, from (seed, epoch) alone,
so the data order and the flips are the same for a run and for its resumption, whatever the number
of loader workers. Datasets return (x, y) batches with x in [-1, 1] for images, or (mean, std, y)
for a latent cache, whose posterior is sampled on the device by the training loop.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import stat
import warnings
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sit_fast.errors import UserError, first_line
from sit_fast.files import FolderLock, is_inside, read_fix, refusal
from sit_fast.images import center_crop_arr
from sit_fast.interrupts import start_resource_tracker

logger = logging.getLogger("sit_fast")

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CACHE_FORMAT = "sit_fast-latent-cache"
CACHE_VERSION = 1
CACHE_INDEX = "index.json"


class DataError(UserError):
    """The data cannot be used as given (missing, empty, malformed); the message says what to do."""


Key = tuple[int, int]  # (sample index, flip: 0 or 1)


#################################################################################
#                                   Samplers                                    #
#################################################################################

class EpochSampler:
    """Deterministic, resumable distributed batches of keys (index, flip).

    As torch's DistributedSampler: a permutation seeded by seed + epoch, padded by wrapping so that
    every rank gets ceil(N / world_size) samples, rank r taking positions r, r + W, ...; then cut
    into local batches with the incomplete last batch dropped. Flips (when enabled) are drawn from
    the same per-epoch generator, so the pair (epoch, step in epoch) fixes the data exactly.
    """

    def __init__(self, num_samples: int, local_batch_size: int, rank: int, world_size: int, seed: int,
                 flip: bool):
        self.num_samples = num_samples
        self.local_batch_size = local_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.flip = flip
        self.samples_per_rank = math.ceil(num_samples / world_size)
        self.steps_per_epoch = self.samples_per_rank // local_batch_size
        if self.steps_per_epoch == 0:
            raise DataError(
                f"the dataset has {num_samples} samples, fewer than one local batch of {local_batch_size} per "
                f"rank over {world_size} rank(s): lower --global-batch-size"
            )

    def batches(self, epoch: int, start_step: int = 0) -> list[list[Key]]:
        """The local batches of `epoch` from step `start_step` on."""
        generator = torch.Generator().manual_seed((self.seed + epoch) % 2**64)  # any integer seed
        perm = torch.randperm(self.num_samples, generator=generator)
        flips = (torch.randint(0, 2, (self.num_samples,), generator=generator) if self.flip
                 else torch.zeros(self.num_samples, dtype=torch.int64))
        total = self.samples_per_rank * self.world_size
        if total > self.num_samples:  # repeated as often as it takes: more ranks than twice the samples too
            perm = perm.repeat(math.ceil(total / self.num_samples))[:total]
        local = perm[self.rank: total: self.world_size].tolist()
        local_flips = flips[perm[self.rank: total: self.world_size]].tolist()
        b = self.local_batch_size
        return [
            list(zip(local[s * b: (s + 1) * b], local_flips[s * b: (s + 1) * b]))
            for s in range(start_step, self.steps_per_epoch)
        ]


class RunBatches:
    """The local batches of the rest of a run: `num_steps` of them from step `step_in_epoch` of
    `epoch` on, epoch after epoch. One loader iterates them all, so its workers start once per run
    rather than once per epoch (seconds each under spawn or forkserver), and the prefetch runs on
    across the epoch boundary instead of draining there."""

    def __init__(self, sampler: EpochSampler, epoch: int, step_in_epoch: int, num_steps: int):
        self.sampler, self.epoch, self.step_in_epoch = sampler, epoch, step_in_epoch
        self.num_steps = max(num_steps, 0)

    def __len__(self) -> int:
        return self.num_steps

    def __iter__(self) -> Iterator[list[Key]]:
        epoch, start, left = self.epoch, self.step_in_epoch, self.num_steps
        while left > 0:  # every epoch has at least one step (EpochSampler checks it)
            batches = self.sampler.batches(epoch, start)[:left]
            yield from batches
            left -= len(batches)
            epoch, start = epoch + 1, 0


def _as_is(batch):
    return batch


def make_loader(dataset, batches: Iterable[list[Key]], num_workers: int, pin_memory: bool, seed: int,
                worker_init_fn=None) -> Iterator:
    """Iterate over `batches` of keys; datasets with __getitems__ build whole batches at once.

    The loader gets its own generator (seeded by the caller from seed, epoch and rank), so creating
    it never draws from the global torch RNG that the training step uses.
    """
    in_memory = getattr(dataset, "in_memory", False)
    if num_workers > 0 and not in_memory:
        start_resource_tracker()  # now, not as the workers start: see start_resource_tracker
    return iter(torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=0 if in_memory else num_workers,
        collate_fn=_as_is if hasattr(dataset, "__getitems__") else None,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed % 2**64),
        worker_init_fn=worker_init_fn,
    ))


_RERUN = "run python -m sit_fast.latent_cache again with the same flags (it encodes only the missing shards)"
_REENCODE = f"delete it and {_RERUN}"


def close_loader(loader: Iterator) -> None:
    """Stop a loader's worker processes now (a no-op without workers), rather than when the
    iterator is collected: an exception's traceback can keep it alive until the process exits."""
    shutdown = getattr(loader, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def worker_error(err: UserError) -> UserError:
    """A UserError raised in a loader worker comes back as "Caught X in DataLoader worker process N.
    Original Traceback ...": the same error with the original message alone."""
    text = str(err)
    if not (text.startswith("Caught ") and "Original Traceback" in text):
        return err
    marker = f"\n{type(err).__module__}.{type(err).__qualname__}: "  # the traceback's last entry, to the end
    if marker in text:
        return type(err)(text[text.rindex(marker) + len(marker):].strip())
    last = text.rstrip().splitlines()[-1]
    return type(err)(last.split(": ", 1)[1] if ": " in last else last)


#################################################################################
#                                   Datasets                                    #
#################################################################################

class DigitsDataset(torch.utils.data.Dataset):
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes; no download), grayscale in [-1, 1].

    image_size > 8 upsamples bilinearly. Flips are ignored (a mirrored digit is another glyph).
    """

    in_memory = True
    flip = False
    channels = 1
    num_classes = 10

    def __init__(self, image_size: int = 8):
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.from_numpy(digits.images.astype(np.float32)).unsqueeze(1) / 16.0 * 2 - 1  # (N, 1, 8, 8)
        if image_size != 8:
            images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
        self.images = images.clamp(-1, 1).contiguous()
        self.labels = torch.from_numpy(digits.target.astype(np.int64))
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, keys: list[Key]):
        index = torch.tensor([k[0] for k in keys], dtype=torch.int64)
        return self.images[index], self.labels[index]

    def __getitem__(self, key: Key):
        return self.images[key[0]], self.labels[key[0]]


def find_images(root: str) -> tuple[list[tuple[str, int]], list[str]]:
    """ImageFolder layout: root/<class>/**/<image>; classes sorted by name, labels 0..K-1, and the images
    in torchvision's order (each class's folders sorted by path, their files by name)."""
    if not root:
        raise DataError("--data-path is required for --dataset imagefolder (or use --latent-cache DIR)")
    if not os.path.isdir(root):
        raise DataError(f"--data-path {root} does not exist or is not a directory")
    try:
        folders = sorted(e.name for e in os.scandir(root) if e.is_dir())
    except OSError as err:  # not readable by this user, say
        raise DataError(f"cannot read --data-path {root} ({refusal(err)}): {read_fix(err)}") from None
    classes = [name for name in folders if not name.startswith(".")]
    hidden = [name for name in folders if name.startswith(".") and _holds_images(os.path.join(root, name))]
    if hidden:
        logger.warning(
            f"--data-path {root}: hidden folders ({', '.join(hidden)}) hold images but are not taken as classes; "
            "torchvision's ImageFolder counts them, so class labels here differ from a run that used it")
    if not classes and os.path.isfile(os.path.join(root, CACHE_INDEX)):
        raise DataError(f"--data-path {root} is a latent cache (python -m sit_fast.latent_cache's), not an image "
                        f"folder: train.py reads it with --latent-cache {root}")
    if not classes:
        raise DataError(f"--data-path {root} has no class sub-folders (expected root/<class>/<image>, as ImageFolder)")
    samples, empty, hidden_files, repeated = [], [], [], []
    real_root = os.path.realpath(root)
    # where each class's folder is on disk: a real one in the root, or a link's target (a root made of links)
    homes = {name for name in classes if not os.path.islink(os.path.join(root, name))}
    linked = {name: os.path.realpath(os.path.join(root, name)) for name in classes if name not in homes}

    def home(folder: str) -> str | None:
        """The class whose folder holds `folder` on disk, a real class folder before a linked one (the
        innermost of those); "" the root itself; None outside every class."""
        real = os.path.realpath(folder)
        relative = os.path.relpath(real, real_root)
        if relative == os.curdir:
            return ""
        if (first := relative.split(os.sep, 1)[0]) in homes:
            return first
        owners = [name for name, top in linked.items() if is_inside(real, top, resolved=True)]
        return max(owners, key=lambda name: len(linked[name])) if owners else None

    seen = set()  # folders walked, in any class: a folder linked from two classes is taken in the first
    for label, name in enumerate(classes):
        count = len(samples)
        # a folder that lies in another class, or the root, is that one's (a link to it, or a class folder
        # that is a link to it, would take its images twice, under two labels)
        for dirpath, filenames in walk_each_folder_once(os.path.join(root, name), repeated, seen, "--data-path",
                                                        keep=lambda folder, name=name: home(folder) in (None, name)):
            for filename in sorted(filenames):
                if filename.lower().endswith(IMG_EXTENSIONS):
                    if filename.startswith("."):  # macOS's ._x.jpg beside x.jpg, say: no image, a crash later
                        hidden_files.append(os.path.join(dirpath, filename))
                        continue
                    samples.append((os.path.join(dirpath, filename), label))
        if len(samples) == count:
            empty.append(name)
    if repeated:
        logger.warning(
            f"--data-path {root}: {len(repeated)} linked folder{'s' if len(repeated) > 1 else ''} "
            f"({repeated[0]}{' and more' if len(repeated) > 1 else ''}) left out: a link back to the root or into "
            "another class's folder, or to a folder walked already (a loop, or a second link to one folder), so that "
            "no image is taken twice or under another class; torchvision's ImageFolder follows them (a loop's images "
            "again at each level, up to the system's link limit)")
    if hidden_files:
        logger.warning(
            f"--data-path {root}: {len(hidden_files)} hidden file{'s' if len(hidden_files) > 1 else ''} with an image "
            f"extension ({hidden_files[0]}{' and more' if len(hidden_files) > 1 else ''}) left out (macOS writes "
            f"._NAME files of metadata beside copied images); torchvision's ImageFolder would take them")
    if not samples:
        raise DataError(f"--data-path {root} holds no images ({', '.join(IMG_EXTENSIONS)}) in its class sub-folders")
    if empty:
        listed = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        logger.warning(
            f"--data-path {root}: {len(empty)} class folder{'s' if len(empty) > 1 else ''} ({listed}) "
            f"{'hold' if len(empty) > 1 else 'holds'} no images "
            f"({', '.join(IMG_EXTENSIONS)}) but count as classes, shifting the labels after them; torchvision's "
            "ImageFolder refuses such folders: remove them unless they are meant as classes")
    return samples, classes


def folder_id(path: str) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def walk_each_folder_once(top: str, repeated: list[str], seen: set, flag: str,
                          keep=None) -> list[tuple[str, list[str]]]:
    """(folder, file names) for each folder under top, links followed, sorted by path. A folder reached
    again (a link to an ancestor, or a second link to one folder) is walked at its first path only (in
    sorted order), folders whose folder_id is in `seen` (which the walk adds to) not at all, nor those
    for which keep(path) is false (os.walk lists it before: one that cannot be listed is no error); the
    paths left out are appended to `repeated`. Any other folder that cannot be listed (no permission, a
    failing disk's EIO) is a DataError naming it and `flag` (the option that gave top's root), not a
    folder left out unsaid (its images would drop out of the dataset)."""

    def unreadable(err: OSError) -> None:
        if err.errno in (errno.ENOENT, errno.ENOTDIR):  # gone meanwhile, as folder_id's None below
            return
        if keep is not None and not keep(err.filename):  # left out unlisted, as below had it been listed
            repeated.append(err.filename)
            return
        raise DataError(f"cannot read the folder {err.filename} ({refusal(err)}), whose images would be left out: "
                        f"{read_fix(err)}, or move it out of {flag}")

    found = []
    for dirpath, dirnames, filenames in os.walk(top, onerror=unreadable, followlinks=True):
        dirnames.sort()  # top-down in name order: which path of a folder comes first does not depend on the disk
        key = folder_id(dirpath)
        if key is None or key in seen or (keep is not None and not keep(dirpath)):  # None: gone meanwhile
            repeated += [dirpath] if key else []
            dirnames[:] = []
            continue
        seen.add(key)
        found.append((dirpath, filenames))
    return sorted(found)


def _holds_images(folder: str) -> bool:
    return any(name.lower().endswith(IMG_EXTENSIONS)
               for _, _, filenames in os.walk(folder, followlinks=True) for name in filenames)


# Damaged, not an image, or past PIL's pixel limit: PIL raises SyntaxError for a chunk it cannot parse
# once past the header ("broken PNG file"), DecompressionBombError (no OSError) past the pixel limit, and
# ValueError for a PPM header that is no number or a PNG's metadata (text, ICC profile) past its size limit.
UNREADABLE_IMAGE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class UnreadableImage(DataError):
    """An image that cannot be read: damaged, not an image, or past PIL's pixel limit."""


def unreadable_image(path: str, err: Exception) -> DataError:
    """The one line for an image that cannot be read: a damaged file (PIL's error), or the OS's error
    reading it, named as files.refusal names it (a failing disk's EIO: the disk to fix first)."""
    if not isinstance(err, OSError) or err.errno is None:
        return UnreadableImage(f"cannot read image {path} ({first_line(err)}): remove or replace it")
    fix = "" if err.errno in (errno.ENOENT, errno.ENOTDIR) else f"{read_fix(err)}, or "
    return UnreadableImage(f"cannot read image {path} ({refusal(err)}): {fix}remove or replace it")


def open_image(path: str) -> Image.Image:
    """Image.open(path) (its header read); an UnreadableImage naming it where PIL cannot open it, or where
    it is no regular file (a named pipe with an image's name: its read would wait for a writer, for ever)."""
    try:
        image = Image.open(path) if stat.S_ISREG(os.stat(path).st_mode) else None
    except UNREADABLE_IMAGE as err:
        raise unreadable_image(path, err) from None
    if image is None:
        raise UnreadableImage(f"cannot read image {path} (not a regular file: a named pipe, a socket or a device): "
                              f"remove or replace it")
    warn_past_pixel_limit(image, path)
    return image


_SIZE_WARNED: set[str] = set()  # the images warn_past_pixel_limit has named, in this process


def warn_past_pixel_limit(image: Image.Image, path: str) -> None:
    """PIL's DecompressionBombWarning, for an image past its pixel limit but within twice it (read all
    the same), names no file: said again naming it, once per image in a process (not at every epoch).
    PIL's own is left as it is: catching it would set the process's warning filters at every image,
    which resets every module's record of the warnings already shown once."""
    limit, pixels = Image.MAX_IMAGE_PIXELS, image.width * image.height
    if limit is None or pixels <= limit or path in _SIZE_WARNED:
        return
    _SIZE_WARNED.add(path)
    warnings.warn(f"image {path} has {pixels} pixels, past PIL's limit of {limit} (PIL.Image.MAX_IMAGE_PIXELS, "
                  f"whose DecompressionBombWarning names no file): read all the same; PIL refuses an image past "
                  f"twice the limit", Image.DecompressionBombWarning, stacklevel=3)


# One-channel modes holding more than 8 bits: PIL's convert to "L" or "RGB" clips their values to 255
# (a 16-bit grayscale PNG comes out white); read_image scales them to 8 bits instead.
HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def tiff_bits(image: Image.Image) -> int | None:
    """The bits per sample a TIFF's header gives (its BitsPerSample tag); None for other files."""
    bits = getattr(image, "tag_v2", {}).get(258)
    bits = bits[0] if isinstance(bits, tuple) and bits else bits
    return bits if isinstance(bits, int) else None


def to_8_bits(image: Image.Image, path: str) -> Image.Image:
    """A 16-bit (or 32-bit integer) one-channel image as 8-bit "L", 0..65535 to 0..255 (values past
    65535 count as 65535; a 12-bit TIFF, which PIL reads as "I;16" holding 0..4095, 0..4095 to 0..255);
    gray with premultiplied alpha ("La", a TIFF's associated alpha, which PIL converts to nothing else) as
    "LA", its gray values divided by their alpha, as PIL's "RGBa" to "RGB" does; CIELAB ("LAB", a TIFF's,
    which PIL converts to "RGB" alone) as "RGB"; other modes as they are. A floating-point image ("F": no
    fixed range) is a DataError naming it."""
    if image.mode in ("La", "LAB"):
        return image.convert({"La": "LA", "LAB": "RGB"}[image.mode])
    if image.mode in HIGH_DEPTH_MODES:
        top = 4095 if image.mode == "I;16" and tiff_bits(image) == 12 else 65535
        values = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.clip(np.rint(values / (top / 255)), 0, 255).astype(np.uint8), "L")
    refuse_float_pixels(image, path)
    return image


def refuse_float_pixels(image: Image.Image, path: str) -> None:
    """A DataError naming `path` where its pixels are floating-point (PIL mode F, no fixed range): its
    header says so, before its pixels are read."""
    if image.mode == "F":
        raise DataError(f"image {path} holds floating-point pixels (PIL mode F), which have no fixed range: "
                        "convert it to an 8- or 16-bit image")


def read_image(path: str, image_size: int, mode: str = "RGB") -> Image.Image:
    """The image at `path` in `mode` ("RGB" or "L"), ADM center-cropped to image_size (16-bit
    grayscale scaled to 8 bits first; transparency dropped); a file PIL cannot read (a truncated one too:
    its header read, its pixels not) is a DataError naming it."""
    try:
        with open_image(path) as image:
            if image.mode == "P" and "transparency" in image.info:
                # The palette's colours, as a convert from "P" gives them; through RGBA, PIL does not warn (once per
                # data loader worker, naming no file) that a palette's per-entry alpha has no place in RGB or L.
                return center_crop_arr(image.convert("RGBA").convert(mode), image_size)
            return center_crop_arr(to_8_bits(image, path).convert(mode), image_size)
    except DataError:  # open_image's and to_8_bits's (ValueErrors too): their messages name the image
        raise
    except UNREADABLE_IMAGE as err:
        raise unreadable_image(path, err) from None


def gray_channel(array: np.ndarray) -> np.ndarray | None:
    """The one channel, (H, W, 1), of an (H, W, 3) image read as RGB whose channels are equal (gray,
    stored as gray or as RGB); None for an image in colour."""
    return array[..., :1] if (array == array[..., :1]).all() else None


class ImageFolderDataset(torch.utils.data.Dataset):
    """root/<class>/<image> as upstream's ImageFolder + ADM center crop; RGB in [-1, 1], flip per key.
    channels=1: gray images (stored as gray or as RGB), one channel, for a gray model in pixel space;
    an image in colour is a DataError naming it."""

    in_memory = False
    flip = True

    def __init__(self, root: str, image_size: int, channels: int = 3):
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, not {channels}")
        self.root, self.channels = root, channels
        self.samples, self.classes = find_images(root)
        self.num_classes = len(self.classes)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int, flip: int) -> torch.Tensor:
        image = read_image(self.samples[index][0], self.image_size)
        if flip:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        array = np.asarray(image, dtype=np.float32)  # (H, W, 3) in [0, 255]
        if self.channels == 1:
            array = gray_channel(array)
            if array is None:
                raise DataError(f"image {self.samples[index][0]} is in colour; --in-channels 1 trains on gray images: "
                                f"convert them to gray first, or leave --in-channels out")
        return torch.from_numpy(array).permute(2, 0, 1).div(127.5).sub(1)  # (C, H, W) in [-1, 1]

    def __getitem__(self, key: Key):
        index, flip = key
        return self.load(index, flip), self.samples[index][1]


def data_fingerprint(dataset: torch.utils.data.Dataset) -> str:
    """A sha256 of what a training run reads: an image folder's (path, label) list, a latent cache's
    index (its images' list, shards and latent space), else the dataset's kind, size and classes.
    The processes of a run compare theirs: each reads its own copy (a node's local disk, say)."""
    digest = hashlib.sha256()
    if isinstance(dataset, ImageFolderDataset):
        prefix = len(os.path.join(dataset.root, ""))  # every path is under ROOT/: relative ones, wherever the copy is
        for path, label in dataset.samples:
            # surrogateescape: a name that is not UTF-8 (an archive unpacked from another system) as its bytes
            digest.update(f"{path[prefix:]}\t{label}\n".encode("utf-8", "surrogateescape"))
    elif isinstance(dataset, LatentCacheDataset):
        digest.update(json.dumps(dataset.index, sort_keys=True).encode())
    else:
        digest.update(f"{type(dataset).__name__} {len(dataset)} {dataset.num_classes}".encode())
    return digest.hexdigest()


class LatentCacheDataset(torch.utils.data.Dataset):
    """A latent cache written by sit_fast.latent_cache: posterior (mean, std) of both flips per image.

    Shards are memory-mapped; a batch is gathered shard by shard. Returns (mean, std, labels) with
    mean and std of shape (B, C, h, w) in fp32.
    """

    in_memory = False
    flip = True  # selects the stored mirrored posterior

    def __init__(self, root: str):
        self.root = root
        self.index = read_cache_index(root)
        self.channels = self.index["latent_channels"]
        self.latent_size = self.index["latent_size"]
        self.image_size = self.index["image_size"]
        self.num_classes = self.index["num_classes"]
        self.starts = [s["start"] for s in self.index["shards"]]
        self._shards = None  # opened lazily, so that worker processes open their own maps

    def shards(self) -> list[dict]:
        if self._shards is None:
            self._shards = [load_cache_shard(self.root, shard, self.index) for shard in self.index["shards"]]
        return self._shards

    def __getstate__(self) -> dict:
        """Pickled (loader workers started by spawn or forkserver, Python 3.14's default) without the
        opened maps, which would be copied whole: each worker maps the shards itself."""
        return {**self.__dict__, "_shards": None}

    def __len__(self) -> int:
        return self.index["num_images"]

    def __getitems__(self, keys: list[Key]):
        shards = self.shards()
        index = np.array([k[0] for k in keys], dtype=np.int64)
        flips = torch.tensor([k[1] for k in keys], dtype=torch.int64)
        shard_of = np.searchsorted(self.starts, index, side="right") - 1
        shape = (len(keys), self.channels, self.latent_size, self.latent_size)
        mean, std = torch.empty(shape), torch.empty(shape)
        labels = torch.empty(len(keys), dtype=torch.int64)
        for s in np.unique(shard_of):
            rows = torch.from_numpy(np.nonzero(shard_of == s)[0])
            local = torch.from_numpy(index[rows.numpy()] - self.starts[s])
            data = shards[s]
            mean[rows] = data["mean"][local, flips[rows]].float()
            std[rows] = data["std"][local, flips[rows]].float()
            labels[rows] = data["labels"][local]
        return mean, std, labels

    def __getitem__(self, key: Key):
        mean, std, labels = self.__getitems__([key])
        return mean[0], std[0], labels[0]


def load_cache_shard(root: str, shard: dict, index: dict) -> dict:
    """The memory-mapped contents of one shard of the latent cache at `root` (`shard`: its entry in the
    cache's `index`); DataError, saying what to do, unless it holds the shapes the index gives (the
    error's `fault`: what is wrong with the shard, without the path and the advice)."""
    path = os.path.join(root, shard["file"])

    def fault(what: str, fix: str = _REENCODE) -> DataError:
        error = DataError(f"latent cache shard {path} {what}; {fix}")
        error.fault = what
        return error

    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise fault("is missing", _RERUN) from None
    except Exception as err:  # torch.load raises several types for a damaged file
        raise fault(f"cannot be read ({first_line(err)})") from None
    if not (isinstance(data, dict) and all(isinstance(data.get(k), torch.Tensor) for k in ("mean", "std", "labels"))):
        raise fault("does not hold mean, std and labels")
    if data["mean"].shape[0] != shard["count"]:
        raise fault(f"holds {data['mean'].shape[0]} images, the index says {shard['count']}")
    size = index["latent_size"]
    expected = (shard["count"], 2, index["latent_channels"], size, size)  # both flips
    found = [tuple(data[k].shape) for k in ("mean", "std")]
    if found != [expected] * 2 or tuple(data["labels"].shape) != (shard["count"],):
        raise fault(f"holds latents of shape {found[0]} (std {found[1]}, labels {tuple(data['labels'].shape)}), the "
                    f"index says {expected}")
    return data


def read_cache_index(root: str, flag: str = "--latent-cache") -> dict:
    """The index of the finished latent cache at `root` (given as `flag`); DataError saying what to do."""
    path = os.path.join(root, CACHE_INDEX)
    if not os.path.isfile(path):
        if os.path.isdir(root) and (holder := FolderLock.holder(root)) is not None:  # a build at work: not to be rerun
            raise DataError(f"{flag} {root} is being built now ({holder}; {CACHE_INDEX}, the last file written, is "
                            f"not there yet): wait for that build to end, then run this again")
        if "dataset_sha256" in (latent_cache_settings(root) or {}):  # written first, the index last
            raise DataError(f"{flag} {root} is unfinished (no {CACHE_INDEX} yet, the last file written): "
                            f"to finish it, {_RERUN}")
        what = (f"has no {CACHE_INDEX}" if os.path.isdir(root) else "is a file, not a folder" if os.path.exists(root)
                else "does not exist")
        raise DataError(f"{flag} {root} {what}; build it with python -m sit_fast.latent_cache")
    try:
        with open(path) as f:
            index = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"cannot read {path} ({first_line(err)}); {_REENCODE}") from None
    if not isinstance(index, dict) or index.get("format") != CACHE_FORMAT or index.get("version") != CACHE_VERSION:
        raise DataError(f"{path} is not a version-{CACHE_VERSION} sit_fast latent cache; rebuild it")
    return index


def latent_cache_settings(root: str) -> dict | None:
    """The settings.json in root (a latent cache's, python -m sit_fast.latent_cache's, where it holds
    "dataset_sha256"), or None where there is none to read."""
    try:
        with open(os.path.join(root, "settings.json")) as f:
            settings = json.load(f)
    except (OSError, ValueError):
        return None
    return settings if isinstance(settings, dict) else None


DATASETS = ("imagefolder", "digits")


def build_dataset(name: str, data_path: str | None, image_size: int, latent_cache: str | None = None,
                  channels: int = 3):
    """The dataset for train.py's --dataset / --data-path / --latent-cache (an image folder's images
    with `channels` 1 or 3)."""
    if latent_cache:
        return LatentCacheDataset(latent_cache)
    if name == "digits":
        return DigitsDataset(image_size)
    if name == "imagefolder":
        return ImageFolderDataset(data_path, image_size, channels)
    raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
