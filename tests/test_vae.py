"""sit_fast.vae (with a tiny AutoencoderKL saved by the test), sit_fast.images and sit_fast.distributed."""
import numpy as np
import pytest
import torch
from PIL import Image

from sit_fast.distributed import barrier, init_distributed
from sit_fast.errors import UserError
from sit_fast.images import center_crop_arr, save_image_grid, to_uint8
from sit_fast.vae import VAEError, check_image_size, load_vae


def save_tiny_vae(path, latent_channels: int = 4, scaling_factor: float = 0.18215) -> None:
    from diffusers.models import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8, latent_channels=latent_channels,
        sample_size=16, scaling_factor=scaling_factor,
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
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(latents, mean + std * noise)  # mean + std * noise, the noise of the generator
    decoded = codec.decode(latents)
    assert decoded.shape == (5, 3, 16, 16) and decoded.abs().max() <= 1
    expected = codec.vae.decode(latents / codec.scaling_factor).sample.clamp(-1, 1)
    torch.testing.assert_close(decoded, expected, atol=1e-5, rtol=1e-5)
    # an overflow of the decoder stays visible (NaN), where clamping made it a white pixel; NaN stays NaN
    real_decode = codec.vae.decode

    def overflowing(z):
        out = real_decode(z)
        out.sample[z.abs().amax((1, 2, 3)) > 100, 0, 0, 0] = float("inf")
        return out

    codec.vae.decode = overflowing
    latents[1], latents[3, 0, 0, 0] = 1e3, float("nan")
    finite = codec.decode(latents).flatten(1).isfinite().all(1)
    assert finite.tolist() == [True, False, True, False, True]


def test_latents_mean_and_std_normalise_per_channel(tmp_path):
    """A VAE whose config has latents_mean/latents_std (SDXL-derived) is normalised per channel, as
    diffusers' pipelines do: latents = (posterior - mean) * scaling_factor / std, and back."""
    from diffusers.models import AutoencoderKL

    save_tiny_vae(tmp_path)
    means, stds = [0.5, -1.0, 0.25, 2.0], [1.5, 0.5, 2.0, 4.0]
    vae = AutoencoderKL.from_pretrained(str(tmp_path))
    vae.register_to_config(latents_mean=means, latents_std=stds, scaling_factor=0.5)
    vae.save_pretrained(tmp_path)
    codec = load_vae(str(tmp_path), "cpu")
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    mean, std = codec.encode(images)
    posterior = codec.vae.encode(images).latent_dist
    channel_mean, channel_std = torch.tensor(means).view(1, 4, 1, 1), torch.tensor(stds).view(1, 4, 1, 1)
    torch.testing.assert_close(mean, (posterior.mean - channel_mean) * 0.5 / channel_std, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(std, posterior.std * 0.5 / channel_std, atol=1e-5, rtol=1e-5)
    expected = codec.vae.decode(mean * channel_std / 0.5 + channel_mean).sample.clamp(-1, 1)
    torch.testing.assert_close(codec.decode(mean), expected, atol=1e-5, rtol=1e-5)

    # a shift_factor beside them is subtracted too: scaling_factor * (posterior - mean - shift) / std
    vae.register_to_config(shift_factor=0.125)
    vae.save_pretrained(tmp_path)
    mean, _ = load_vae(str(tmp_path), "cpu").encode(images)
    torch.testing.assert_close(mean, (posterior.mean - channel_mean - 0.125) * 0.5 / channel_std, atol=1e-5, rtol=1e-5)
    # latents_mean without latents_std: neither is used, as in diffusers' pipelines
    vae.register_to_config(shift_factor=None, latents_std=None)
    vae.save_pretrained(tmp_path)
    mean, std = load_vae(str(tmp_path), "cpu").encode(images)
    torch.testing.assert_close(mean, posterior.mean * 0.5, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(std, posterior.std * 0.5, atol=1e-5, rtol=1e-5)

    vae.register_to_config(latents_mean=means[:3], latents_std=stds)
    vae.save_pretrained(tmp_path)
    with pytest.raises(VAEError, match=r"latents_mean \(3 values\) and latents_std \(4\) for 4 latent channels"):
        load_vae(str(tmp_path), "cpu")


def test_a_shift_factor_is_subtracted_before_scaling(tmp_path):
    """A VAE whose config has a shift_factor (SD3's, FLUX's): latents = (posterior - shift) * scale, as
    diffusers' pipelines do, and back; the std is scaled alone."""
    from diffusers.models import AutoencoderKL

    save_tiny_vae(tmp_path)
    vae = AutoencoderKL.from_pretrained(str(tmp_path))
    vae.register_to_config(shift_factor=0.0609, scaling_factor=1.5305)
    vae.save_pretrained(tmp_path)
    codec = load_vae(str(tmp_path), "cpu")
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    mean, std = codec.encode(images)
    posterior = codec.vae.encode(images).latent_dist
    torch.testing.assert_close(mean, (posterior.mean - 0.0609) * 1.5305, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(std, posterior.std * 1.5305, atol=1e-5, rtol=1e-5)
    expected = codec.vae.decode(mean / 1.5305 + 0.0609).sample.clamp(-1, 1)
    torch.testing.assert_close(codec.decode(mean), expected, atol=1e-5, rtol=1e-5)


def test_load_vae_none_and_errors(tmp_path):
    assert load_vae("none", "cpu") is None
    with pytest.raises(VAEError, match="--vae none") as info:
        load_vae(str(tmp_path / "no_such_vae"), "cpu")
    assert "\n" not in str(info.value)
    with pytest.raises(VAEError, match="latent-cache"):
        load_vae(str(tmp_path), "cpu")  # an existing directory without a VAE


def test_a_pipeline_folder_points_at_its_vae_subfolder(tmp_path):
    save_tiny_vae(tmp_path / "pipeline" / "vae")  # the layout of a whole diffusers pipeline
    with pytest.raises(VAEError, match=r"holds no loadable AutoencoderKL .*; its VAE looks to be in .*pipeline/vae: "
                                       r"pass that folder") as info:
        load_vae(str(tmp_path / "pipeline"), "cpu")
    assert "\n" not in str(info.value)
    assert load_vae(str(tmp_path / "pipeline" / "vae"), "cpu").latent_channels == 4
    (tmp_path / "other" / "vae").mkdir(parents=True)  # a "vae" folder without a config: no pointer to it
    with pytest.raises(VAEError) as info:
        load_vae(str(tmp_path / "other"), "cpu")
    assert "holds no loadable AutoencoderKL" in str(info.value) and "pass that folder" not in str(info.value)


def test_weights_that_do_not_fill_an_autoencoderkl_are_refused(tmp_path):
    """diffusers (without accelerate) fills weights it does not find with random ones and only warns:
    another kind of autoencoder's folder (TAESD's) or a decoder left out loaded as a random VAE."""
    import os

    from diffusers.models import AutoencoderTiny
    from safetensors.torch import load_file, save_file

    AutoencoderTiny().save_pretrained(tmp_path / "taesd")
    with pytest.raises(VAEError, match=r"taesd does not hold an AutoencoderKL's weights \(\d+ of its tensors missing "
                                       r"or of other shapes, e\.g\. .*\); .*--vae none") as info:
        load_vae(str(tmp_path / "taesd"), "cpu")
    assert "\n" not in str(info.value)
    save_tiny_vae(tmp_path / "cut")
    weights = os.path.join(tmp_path / "cut", "diffusion_pytorch_model.safetensors")
    save_file({k: v for k, v in load_file(weights).items() if not k.startswith("decoder.")}, weights)
    with pytest.raises(VAEError, match=r"e\.g\. decoder\."):
        load_vae(str(tmp_path / "cut"), "cpu")


def test_image_size_must_be_divisible_by_the_vaes_downsampling(tiny_vae_dir):
    with pytest.raises(UserError,
                       match=r"^--image-size 20 is not divisible by 8 \(the VAE's downsampling\); use e\.g\. 16$"):
        check_image_size(20, "ema")  # the SD VAEs: known before loading
    check_image_size(20, tiny_vae_dir)  # another VAE: known once loaded
    codec = load_vae(tiny_vae_dir, "cpu")
    check_image_size(20, tiny_vae_dir, codec)
    with pytest.raises(UserError,
                       match=r"^--image-size 13 is not divisible by 2 \(the VAE's downsampling\); use e\.g\. 12$"):
        check_image_size(13, tiny_vae_dir, codec)
    with pytest.raises(UserError, match=r"^--image-size 4 is not divisible by 8 .*; use e\.g\. 8$"):
        check_image_size(4, "mse")  # below the factor: the factor itself is suggested


def test_images(tmp_path):
    images = torch.linspace(-1, 1, 2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    arr = to_uint8(images)
    assert arr.shape == (2, 4, 5, 3) and arr.dtype == np.uint8 and arr.min() == 0 and arr.max() == 255
    # rounded as torchvision's save_image rounds ((x + 1) / 2 * 255 + 0.5, truncated): 10.6 -> 11, 0 -> 128
    levels = torch.tensor([10.6 / 127.5 - 1, 0.0, 10.4 / 127.5 - 1, -1.5, 1.5]).reshape(1, 1, 1, 5)
    assert to_uint8(levels).flatten().tolist() == [11, 128, 10, 0, 255]
    odd = torch.tensor([float("nan"), float("inf"), -float("inf")]).reshape(1, 1, 1, 3)
    assert to_uint8(odd).flatten().tolist() == [0, 255, 0]  # NaN black, not what the cast makes of it
    for channels in (1, 3):
        path = save_image_grid(torch.rand(7, channels, 8, 8) * 2 - 1, tmp_path / f"grid{channels}.png", nrow=3)
        with Image.open(path) as im:
            assert im.size == (3 * 10 + 2, 3 * 10 + 2) and im.mode == ("L" if channels == 1 else "RGB")
    crop = center_crop_arr(Image.new("RGB", (300, 200)), 64)
    assert crop.size == (64, 64)


def test_center_crop_keeps_adm_s_pixels_where_the_slack_is_odd():
    """ADM's offsets round down: of 65 columns the first 64 are kept, of 67 rows rows 1 to 64 (pixel
    values here are their column, or row, index; at the target's size no resize changes them)."""
    columns = Image.fromarray(np.tile(np.arange(65, dtype=np.uint8), (64, 1)))  # 65 wide, 64 high
    rows = Image.fromarray(np.tile(np.arange(67, dtype=np.uint8)[:, None], (1, 64)))  # 64 wide, 67 high
    assert np.array(center_crop_arr(columns, 64))[0].tolist() == list(range(64))
    assert np.array(center_crop_arr(rows, 64))[:, 0].tolist() == list(range(1, 65))


def test_distributed_single_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = init_distributed()
    assert (info.rank, info.world_size, info.is_main) == (0, 1, True)
    barrier()


def test_save_image_grid_scale(tmp_path):
    path = save_image_grid(torch.zeros(4, 1, 8, 8), tmp_path / "big.png", nrow=2, scale=4)
    with Image.open(path) as im:
        assert im.size == (4 * (2 * 10 + 2), 4 * (2 * 10 + 2))


def test_a_grid_has_the_ceiling_of_the_square_root_of_n_images_per_row_by_default(tmp_path):
    path = save_image_grid(torch.zeros(5, 3, 8, 8), tmp_path / "five.png")  # 3 per row, 2 rows
    with Image.open(path) as im:
        assert im.size == (3 * 10 + 2, 2 * 10 + 2)


def test_images_of_another_shape_or_a_file_name_pil_does_not_know_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"expected images of shape \(N, C, H, W\), got \(3, 8, 8\)"):
        to_uint8(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match=r"expected \(N, 1 or 3, H, W\) images, got \(2, 2, 8, 8\)"):
        save_image_grid(torch.zeros(2, 2, 8, 8), tmp_path / "two.png")
    with pytest.raises(ValueError, match=r"grid\.txt: not an image file name PIL knows"):
        save_image_grid(torch.zeros(2, 3, 8, 8), tmp_path / "grid.txt")
    assert not (tmp_path / "two.png").exists() and not (tmp_path / "grid.txt").exists()


class FromPretrained:
    """Stands in for AutoencoderKL.from_pretrained: records the calls, finds nothing anywhere."""

    def __init__(self):
        self.calls = []

    def __call__(self, source, **kwargs):
        self.calls.append(kwargs.get("local_files_only", False))
        raise OSError(f"{source} does not appear to have a file named config.json")


@pytest.fixture
def hub(monkeypatch):
    """No proxy, no HF_HUB_OFFLINE, a recording from_pretrained and a recording TCP probe that fails."""
    from diffusers.models import AutoencoderKL

    import sit_fast.vae as vae_module

    for name in vae_module.PROXY_VARIABLES + ("HF_HUB_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    loader = FromPretrained()
    monkeypatch.setattr(AutoencoderKL, "from_pretrained", loader)
    probes = []

    def create_connection(address, timeout=None):
        probes.append(address)
        raise OSError(-2, "Name or service not known")

    monkeypatch.setattr(vae_module.socket, "create_connection", create_connection)
    return loader, probes


def test_an_unreachable_hub_fails_at_once_after_the_local_cache(hub):
    loader, probes = hub
    with pytest.raises(VAEError) as info:
        load_vae("ema", "cpu")
    assert loader.calls == [True]  # the local cache only: no download attempt with its retries
    assert probes == [("huggingface.co", 443)]
    assert ("stabilityai/sd-vae-ft-ema is not in the local hub cache and the hub cannot be reached "
            "(huggingface.co:443: Name or service not known); pass a local directory") in str(info.value)


def test_hf_hub_offline_reads_the_local_cache_alone_and_says_so(hub, monkeypatch):
    loader, probes = hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "True")  # any of huggingface_hub's spellings of true
    with pytest.raises(VAEError) as info:
        load_vae("owner/some-vae", "cpu", purpose="sample")
    assert loader.calls == [True] and probes == []
    assert str(info.value).startswith("cannot load the VAE: owner/some-vae is not in the local hub cache and "
                                      "HF_HUB_OFFLINE is set (owner/some-vae does not appear")
    assert str(info.value).endswith("--vae none for a model trained in pixel space")


def test_a_missing_diffusers_package_is_named_with_the_ways_out(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "diffusers.models", None)  # as if not installed
    with pytest.raises(VAEError, match=r"^--vae 'ema' needs the diffusers package \(.*\); install it, or pass a "
                                       r"local directory .*--vae none\)$"):
        load_vae("ema", "cpu")


def test_the_hub_probe_follows_hf_endpoint_and_trusts_a_proxy(hub, monkeypatch):
    loader, probes = hub
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.internal:8080")
    with pytest.raises(VAEError, match=r"cannot be reached \(mirror.internal:8080: "):
        load_vae("owner/some-vae", "cpu")
    assert probes == [("mirror.internal", 8080)]
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    probes.clear()
    loader.calls.clear()
    with pytest.raises(VAEError, match="the hub has no such model or failed"):
        load_vae("owner/some-vae", "cpu")
    assert probes == [] and loader.calls == [True, False]  # with a proxy: no probe, the download is tried
    monkeypatch.delenv("HTTPS_PROXY")
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.internal")  # no port: http's
    with pytest.raises(VAEError, match=r"cannot be reached \(mirror.internal:80: "):
        load_vae("owner/some-vae", "cpu")
    probes.clear()
    monkeypatch.setenv("HF_ENDPOINT", "mirror.internal")  # no host to probe: the download is tried
    with pytest.raises(VAEError, match="the hub has no such model or failed"):
        load_vae("owner/some-vae", "cpu")
    assert probes == []


def test_a_vae_alias_is_recorded_as_loaded_even_beside_a_folder_of_its_name(tmp_path, monkeypatch):
    """load_vae reads an alias (ema, mse) before a folder of that name in the working directory; a run
    and a latent cache record --vae as it was read, so a later load finds the same VAE."""
    from sit_fast.vae import recorded_vae_spec, resolve_vae_spec

    monkeypatch.chdir(tmp_path)
    (tmp_path / "ema").mkdir()
    (tmp_path / "my_vae").mkdir()
    assert resolve_vae_spec("ema") == ("stabilityai/sd-vae-ft-ema", False)
    assert recorded_vae_spec("ema") == "ema"
    assert recorded_vae_spec("my_vae") == str(tmp_path / "my_vae")
    assert resolve_vae_spec(recorded_vae_spec("my_vae")) == (str(tmp_path / "my_vae"), True)
    assert recorded_vae_spec("owner/name") == "owner/name"
    assert recorded_vae_spec("none") == "none"
    (tmp_path / "none").mkdir()  # "none" is pixel space, never a folder (load_vae reads it so)
    assert recorded_vae_spec("none") == "none"
    assert recorded_vae_spec("stabilityai/sd-vae-ft-mse") == "mse"  # one VAE, one spelling
    (tmp_path / "stabilityai" / "sd-vae-ft-mse").mkdir(parents=True)  # but a folder is read first, as load_vae
    assert recorded_vae_spec("stabilityai/sd-vae-ft-mse") == str(tmp_path / "stabilityai" / "sd-vae-ft-mse")


def test_a_vae_spec_that_is_no_alias_folder_or_hub_id_is_refused_naming_the_ways_out(tmp_path, monkeypatch):
    """A hub id is owner/name: a bare name, or a file (a checkpoint, not a diffusers folder), is not sent
    to the hub."""
    from sit_fast.vae import resolve_vae_spec

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "vae.ckpt").write_bytes(b"")
    for spec in ("my-vae", "models/vae.ckpt"):
        with pytest.raises(VAEError) as info:
            resolve_vae_spec(spec, "encode")
        assert str(info.value) == (f"--vae {spec!r} is neither an alias (ema, mse), an existing directory nor a hub id "
                                   "(owner/name): pass a local directory with the VAE (--vae /path/to/vae, a diffusers "
                                   "AutoencoderKL saved with save_pretrained)")
    assert resolve_vae_spec("models/vae") == ("models/vae", False)


def test_the_two_sd_vaes_share_an_encoder_and_other_vaes_do_not():
    """ema and mse (either spelling) are one encoder: resuming or sampling across them is not warned about."""
    from sit_fast.vae import same_encoder

    assert same_encoder("ema", "mse") and same_encoder("mse", "stabilityai/sd-vae-ft-ema")
    assert same_encoder("/vaes/mine", "/vaes/mine")
    assert not same_encoder("ema", "/vaes/mine") and not same_encoder("owner/other-vae", "mse")


def test_center_crop_resizes_as_adm_box_halving_then_bicubic_with_rounded_sizes():
    """ADM's resizing: a short side of at least twice the target is box-halved (each pixel its 2x2
    block's mean); then bicubic to round(side * scale), then the center."""
    rng = np.random.default_rng()
    big = rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)  # H 32 = 2 x 16: one halving, to 16 x 20
    halved = big.reshape(16, 2, 20, 2, 3).astype(np.float64).mean((1, 3))
    crop = np.asarray(center_crop_arr(Image.fromarray(big), 16)).astype(np.float64)
    np.testing.assert_allclose(crop, halved[:, 2:18], rtol=0, atol=1)
    small = rng.integers(0, 256, (20, 22, 3), dtype=np.uint8)  # scale 0.8: width 17.6 rounds to 18, crop x 1
    expected = np.asarray(Image.fromarray(small).resize((18, 16), resample=Image.BICUBIC))[:, 1:17]
    np.testing.assert_array_equal(np.asarray(center_crop_arr(Image.fromarray(small), 16)), expected)
