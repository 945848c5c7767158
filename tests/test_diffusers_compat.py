"""Our top-level `kernels` package must not be mistaken for Hugging Face's `kernels` by diffusers.

diffusers probes `importlib.util.find_spec("kernels")` and then asks for the installed distribution's
version; our package has no `kernels` distribution, so diffusers must report it unavailable and
keep working (the VAE is how SiT latents are decoded).
"""
import importlib.util
from pathlib import Path

import torch

import kernels

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_kernels_resolves_to_this_repository():
    spec = importlib.util.find_spec("kernels")
    assert spec is not None and Path(spec.origin).resolve() == REPO_ROOT / "kernels" / "__init__.py"
    assert Path(kernels.__file__).resolve() == REPO_ROOT / "kernels" / "__init__.py"


def test_diffusers_does_not_take_our_kernels_for_hf_kernels():
    import diffusers.utils
    from diffusers import AutoencoderKL  # noqa: F401  (the import itself must work)

    assert diffusers.utils.is_kernels_available() is False


def test_tiny_autoencoder_round_trip_with_our_kernels_importable():
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=16,
    ).eval()
    image = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        latents = vae.encode(image).latent_dist.sample()
        decoded = vae.decode(latents).sample
    assert latents.shape == (1, 4, 8, 8)
    assert decoded.shape == image.shape
    assert torch.isfinite(decoded).all()
