"""sit_fast.vae (with a tiny AutoencoderKL saved by the test), sit_fast.images and sit_fast.distributed."""
import numpy as np
import pytest
import torch
from PIL import Image

from sit_fast.distributed import all_reduce_mean, barrier, init_distributed
from sit_fast.images import center_crop_arr, save_image_grid, to_uint8
from sit_fast.vae import VAEError, load_vae


def save_tiny_vae(path) -> None:
    from diffusers.models import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8, latent_channels=4, sample_size=16,
    ).save_pretrained(path)


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_vae")
    save_tiny_vae(path)
    return str(path)


def test_load_vae_shapes_and_scaling(tiny_vae_dir):
    codec = load_vae(tiny_vae_dir, "cpu")
    assert codec.latent_channels == 4 and codec.downsample == 2
    assert codec.scaling_factor == pytest.approx(0.18215)
    assert all(not p.requires_grad for p in codec.vae.parameters()) and not codec.vae.training
    images = torch.rand(5, 3, 16, 16) * 2 - 1
    codec.batch_size = 2  # exercise batching
    mean, std = codec.encode(images)
    assert mean.shape == std.shape == (5, 4, 8, 8) and (std > 0).all()
    posterior = codec.vae.encode(images).latent_dist
    torch.testing.assert_close(mean, posterior.mean * codec.scaling_factor, atol=1e-5, rtol=1e-5)
    latents = codec.sample(mean, std, generator=torch.Generator().manual_seed(0))
    decoded = codec.decode(latents)
    assert decoded.shape == (5, 3, 16, 16) and decoded.abs().max() <= 1
    expected = codec.vae.decode(latents / codec.scaling_factor).sample.clamp(-1, 1)
    torch.testing.assert_close(decoded, expected, atol=1e-5, rtol=1e-5)


def test_load_vae_none_and_errors(tmp_path):
    assert load_vae("none", "cpu") is None
    with pytest.raises(VAEError, match="--vae none") as info:
        load_vae(str(tmp_path / "no_such_vae"), "cpu")
    assert "\n" not in str(info.value)
    with pytest.raises(VAEError, match="latent-cache"):
        load_vae(str(tmp_path), "cpu")  # an existing directory without a VAE


def test_images(tmp_path):
    images = torch.linspace(-1, 1, 2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    arr = to_uint8(images)
    assert arr.shape == (2, 4, 5, 3) and arr.dtype == np.uint8 and arr.min() == 0 and arr.max() == 255
    for channels in (1, 3):
        path = save_image_grid(torch.rand(7, channels, 8, 8) * 2 - 1, tmp_path / f"grid{channels}.png", nrow=3)
        with Image.open(path) as im:
            assert im.size == (3 * 10 + 2, 3 * 10 + 2) and im.mode == ("L" if channels == 1 else "RGB")
    crop = center_crop_arr(Image.new("RGB", (300, 200)), 64)
    assert crop.size == (64, 64)


def test_distributed_single_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = init_distributed()
    assert (info.rank, info.world_size, info.is_main) == (0, 1, True)
    barrier()
    x = torch.tensor([3.0])
    assert all_reduce_mean(x).item() == 3.0


def test_save_image_grid_scale(tmp_path):
    path = save_image_grid(torch.zeros(4, 1, 8, 8), tmp_path / "big.png", nrow=2, scale=4)
    with Image.open(path) as im:
        assert im.size == (4 * (2 * 10 + 2), 4 * (2 * 10 + 2))
