"""The latent codec: a frozen diffusers AutoencoderKL behind a small, explicit interface.

diffusers is imported here only, and only when a VAE is actually loaded. Latents follow the upstream
convention: encode multiplies by the VAE's scaling factor (0.18215 for the SD VAEs), decode divides
by it; a VAE whose config has a shift_factor (SD3's) or per-channel latents_mean and latents_std
(SDXL-derived ones) is normalised by those too, as diffusers' pipelines do. `encode` returns the
posterior's mean and standard deviation so that callers (the latent cache, train.py) can store the
posterior once and draw a fresh sample each time it is used.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import socket
import urllib.parse
import warnings
from contextlib import nullcontext

import torch

from sit_fast.errors import UserError, first_line

VAE_ALIASES = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
DEFAULT_SCALING_FACTOR = 0.18215
logger = logging.getLogger("sit_fast")

_LOCAL = ("pass a local directory with the VAE (--vae /path/to/vae, a diffusers AutoencoderKL saved with "
          "save_pretrained)")
WAYS_OUT = {
    "train": f"{_LOCAL}, train from a latent cache (--latent-cache DIR, made by python -m sit_fast.latent_cache), "
             f"or train in pixel space (--vae none)",
    "sample": f"{_LOCAL}, or --vae none for a model trained in pixel space",
    "encode": _LOCAL,
}


class VAEError(UserError):
    """The VAE cannot be found or loaded; the message lists the ways out."""


def check_image_size(image_size: int, spec: str, codec: LatentCodec | None = None) -> None:
    """UserError unless the VAE's downsampling divides --image-size: the SD VAEs' (8) is known before
    they load, another VAE's once loaded (`codec`)."""
    factor = codec.downsample if codec is not None else 8 if spec in VAE_ALIASES else 1
    if image_size % factor:
        raise UserError(f"--image-size {image_size} is not divisible by {factor} (the VAE's downsampling); "
                        f"use e.g. {max(factor, image_size // factor * factor)}")


class LatentCodec:
    """Images in [-1, 1] <-> scaled latents, through a frozen AutoencoderKL.

    Attributes:
        scaling_factor: latents = scaling_factor * (posterior - shift_factor), from the VAE config;
            with latents_mean and latents_std in the config, per channel
            latents = scaling_factor * (posterior - latents_mean - shift_factor) / latents_std (no VAE
            known has both: shift_factor is then 0).
        shift_factor: 0 for the SD VAEs.
        latent_channels: channels of a latent (4 for the SD VAEs).
        downsample: image size / latent size (8 for the SD VAEs).
        dtype: the autocast dtype the VAE runs under (float32: no autocast).
        batch_size: the largest batch passed through the VAE at once.
    """

    def __init__(self, vae: torch.nn.Module, device: torch.device, dtype: torch.dtype = torch.float32,
                 batch_size: int = 64):
        config = vae.config
        self.vae = vae
        self.device = torch.device(device)
        self.dtype = dtype
        self.batch_size = batch_size
        self.scaling_factor = float(getattr(config, "scaling_factor", None) or DEFAULT_SCALING_FACTOR)
        self.shift_factor = float(getattr(config, "shift_factor", None) or 0.0)
        self.latent_channels = int(config.latent_channels)
        self.downsample = 2 ** (len(config.block_out_channels) - 1)
        # latents = (posterior - offset) * scale, offset and scale per channel, shaped (1, C, 1, 1)
        latents_mean, latents_std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        channels = (1, self.latent_channels, 1, 1)
        if latents_mean is not None and latents_std is not None:
            if not len(latents_mean) == len(latents_std) == self.latent_channels:
                raise VAEError(f"the VAE's config has latents_mean ({len(latents_mean)} values) and latents_std "
                               f"({len(latents_std)}) for {self.latent_channels} latent channels: fix its config.json")
            self.offset = torch.tensor(latents_mean, dtype=torch.float32).view(channels) + self.shift_factor
            self.scale = self.scaling_factor / torch.tensor(latents_std, dtype=torch.float32).view(channels)
        else:
            self.offset = torch.full(channels, self.shift_factor)
            self.scale = torch.full(channels, self.scaling_factor)
        self.offset, self.scale = self.offset.to(self.device), self.scale.to(self.device)

    def _autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, H, W) in [-1, 1] -> posterior (mean, std), each (N, C, H/d, W/d), fp32, scaled."""
        means, stds = [], []
        for chunk in images.split(self.batch_size):
            with self._autocast():
                posterior = self.vae.encode(chunk.to(self.device)).latent_dist
            means.append((posterior.mean.float() - self.offset) * self.scale)
            stds.append(posterior.std.float() * self.scale)
        # contiguous: the VAE's output may be channels-last (a CPU convolution's), and noise drawn like a
        # channels-last tensor (randn_like in training) falls on other elements than upstream's
        return torch.cat(means).contiguous(), torch.cat(stds).contiguous()

    @staticmethod
    def sample(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One draw from the (scaled) posterior: mean + std * noise."""
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + std * noise

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) scaled latents -> (N, 3, h*d, w*d) images in [-1, 1], fp32; an overflow (inf)
        comes out NaN, not clamped into a white or black pixel, so that a caller's check sees it."""
        images = []
        for chunk in latents.split(self.batch_size):
            z = chunk.to(self.device).float() / self.scale + self.offset
            with self._autocast():
                decoded = self.vae.decode(z).sample.float()
            images.append(decoded.masked_fill_(decoded.isinf(), float("nan")).clamp_(-1, 1))
        return torch.cat(images)


def recorded_vae_spec(spec: str) -> str:
    """--vae as a run or a latent cache records it, read as load_vae reads it (an alias before a folder
    of that name): a local directory made absolute, so the record is usable from any folder; an alias,
    "none" as given, an alias's hub id as the alias (one VAE, one spelling: a resume compares them), another
    hub id as given."""
    if spec in VAE_ALIASES or spec == "none":
        return spec
    expanded = os.path.expanduser(spec)
    if os.path.isdir(expanded):
        return os.path.abspath(expanded)
    return next((alias for alias, hub_id in VAE_ALIASES.items() if hub_id == spec), spec)


def same_encoder(spec: str, other: str) -> bool:
    """Whether two recorded VAE specs (recorded_vae_spec's) encode alike: the same VAE, or the two SD
    VAEs (ema and mse: one encoder, their decoders fine-tuned apart)."""
    sd_vaes = {*VAE_ALIASES, *VAE_ALIASES.values()}
    return spec == other or {spec, other} <= sd_vaes


def resolve_vae_spec(spec: str, purpose: str = "train") -> tuple[str, bool]:
    """(what to pass to from_pretrained, is_local_directory) for an alias, a directory or a hub id."""
    if spec in VAE_ALIASES:
        return VAE_ALIASES[spec], False
    expanded = os.path.expanduser(spec)
    if os.path.isdir(expanded):
        return expanded, True
    looks_like_path = spec.startswith((os.sep, ".", "~")) or os.path.exists(expanded) or spec.count("/") != 1
    if looks_like_path:
        raise VAEError(f"--vae {spec!r} is neither an alias ({', '.join(VAE_ALIASES)}), an existing directory "
                       f"nor a hub id (owner/name): {WAYS_OUT[purpose]}")
    return spec, False


def load_vae(spec: str, device: torch.device | str, dtype: torch.dtype = torch.float32,
             purpose: str = "train") -> LatentCodec | None:
    """A frozen, eval-mode LatentCodec for `spec` ("ema", "mse", a hub id or a local directory).

    "none" returns None (pixel space). A hub id is read from the local cache first and downloaded
    only when it is not there. Raises VAEError with one line when it cannot be loaded, naming the
    ways out for `purpose` ("train", "sample" or "encode": the latent cache).
    """
    if spec is None or spec == "none":
        return None
    ways_out = WAYS_OUT[purpose]
    source, is_local = resolve_vae_spec(spec, purpose)
    try:
        from diffusers.models import AutoencoderKL
    except ImportError as err:
        raise VAEError(f"--vae {spec!r} needs the diffusers package ({err}); install it, or {ways_out}") from None

    vae, info = None, {}
    errors = []
    unreachable = None
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    attempts = [dict(local_files_only=True)] if is_local or offline else [dict(local_files_only=True), {}]
    extra = {} if importlib.util.find_spec("accelerate") else {"low_cpu_mem_usage": False}
    for kwargs in attempts:
        if errors:  # the local cache missed
            unreachable = hub_unreachable()
            if unreachable:  # not worth the hub library's retries (about 25 s)
                break
            logger.warning(f"--vae {spec}: {source} is not in the local hub cache; downloading it")
        try:
            with warnings.catch_warnings():  # diffusers passes huggingface_hub an argument it deprecated
                warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
                vae, info = AutoencoderKL.from_pretrained(source, **kwargs, **extra, output_loading_info=True)
            break
        except Exception as err:  # diffusers/huggingface_hub raise many types (OSError, HTTP, ValueError)
            errors.append(first_line(err))
    if vae is None:
        if is_local:
            reason = f"the directory {source} holds no loadable AutoencoderKL ({errors[-1]})"
            if os.path.isfile(os.path.join(source, "vae", "config.json")):  # a whole diffusers pipeline
                reason += f"; its VAE looks to be in {os.path.join(source, 'vae')}: pass that folder"
        elif offline:
            reason = f"{source} is not in the local hub cache and HF_HUB_OFFLINE is set ({errors[-1]})"
        elif unreachable:
            reason = f"{source} is not in the local hub cache and the hub cannot be reached ({unreachable})"
        else:
            reason = f"{source} is not in the local hub cache and the hub has no such model or failed ({errors[-1]})"
        raise VAEError(f"cannot load the VAE: {reason}; {ways_out}")
    # Without accelerate, diffusers fills the weights it does not find with random ones and only warns
    # (another kind of autoencoder's folder, a decoder left out): such a VAE would encode and decode noise.
    unfilled = [*info.get("missing_keys", []), *(entry[0] for entry in info.get("mismatched_keys", []))]
    if unfilled:
        raise VAEError(f"cannot load the VAE: {source} does not hold an AutoencoderKL's weights ({len(unfilled)} "
                       f"of its tensors missing or of other shapes, e.g. {unfilled[0]}: another kind of autoencoder, "
                       f"or a copy cut short?); {ways_out}")
    vae = vae.to(torch.device(device)).eval().requires_grad_(False)
    return LatentCodec(vae, device, dtype=dtype)


PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def hub_unreachable(timeout_s: float = 3.0) -> str | None:
    """"HOST:PORT: why" when the hub cannot be reached (its host does not resolve, or no TCP connection
    within timeout_s), or None when it can, or when a proxy is configured (the proxy decides; not probed).
    The endpoint is HF_ENDPOINT's, huggingface.co by default."""
    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return None
    endpoint = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = endpoint.hostname, endpoint.port or (80 if endpoint.scheme == "http" else 443)
    if not host:
        return None
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as err:
        return f"{host}:{port}: {err.strerror or err}"
    return None
