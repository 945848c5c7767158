"""Image helpers shared by training and sampling: the ADM center crop, uint8 conversion, PNG grids."""
from __future__ import annotations

import math
import os

import numpy as np
import torch
from PIL import Image

from sit_fast.files import atomic_write


def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """ADM's center crop (guided-diffusion image_datasets.py), as upstream DiT/SiT train.py uses it.

    Halve with a box filter while the short side is at least twice the target, resize the short side
    to `image_size` with a bicubic filter, then crop the center square.
    """
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size])


def to_uint8(images: torch.Tensor, rounding: str = "save_image") -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8 numpy, rounding as torchvision's save_image does
    (the grids'), or with rounding="sample_ddp" as upstream's sample_ddp.py makes its FID samples:
    clamp(127.5 x + 128, 0, 255) in fp32, truncated. The two are floor((x + 1) 127.5 + 0.5) in exact
    arithmetic and differ by the fp32 roundings of their forms (about 4 values in a million, a level apart).

    NaN comes out black (0), not whatever the cast to uint8 makes of it; callers that must refuse NaN
    check for it first (sample.py does)."""
    if images.dim() != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got {tuple(images.shape)}")
    x = images.detach().float().nan_to_num(nan=-1.0)
    if rounding == "sample_ddp":
        x = (127.5 * x + 128.0).clamp(0, 255)
    elif rounding == "save_image":
        x = x.clamp(-1, 1).add(1).mul(127.5).add(0.5).clamp(0, 255)
    else:
        raise ValueError(f"rounding must be 'save_image' or 'sample_ddp', got {rounding!r}")
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> one (rows * H', nrow * W', C) uint8 array, nrow images per row (at
    most N); one image is returned as it is, without padding (both as torchvision's make_grid)."""
    arr = to_uint8(images)  # (N, H, W, C)
    n, h, w, c = arr.shape
    if n == 1:
        return arr[0]
    nrow = max(1, min(nrow or math.ceil(math.sqrt(n)), n))
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y0, x0 = padding + r * (h + padding), padding + col * (w + padding)
        grid[y0: y0 + h, x0: x0 + w] = arr[i]
    return grid


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None, scale: int = 1) -> str:
    """Write (N, C, H, W) images in [-1, 1] (C = 1 or 3) as one PNG grid; returns the path.

    scale > 1 enlarges the grid by pixel repetition (for tiny images such as 8x8 digits).
    """
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected (N, 1 or 3, H, W) images, got {tuple(images.shape)}")
    grid = make_grid(images, nrow=nrow)
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    mode_array = grid[..., 0] if grid.shape[-1] == 1 else grid
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    image = Image.fromarray(np.ascontiguousarray(mode_array))
    image_format = Image.registered_extensions().get(os.path.splitext(path)[1].lower())
    if image_format is None:
        raise ValueError(f"{path}: not an image file name PIL knows (.png, .jpg, ...)")
    # whole or not at all: a stop while saving left a cut-short file in place of the earlier grid
    atomic_write(path, lambda f: image.save(f, format=image_format))
    return path
