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


def test_another_kernels_package_found_first_is_named_in_one_error(tmp_path):
    """Hugging Face's `kernels`, found before ours on the path (an editable install's finder comes after
    site-packages), stops sit_fast's model at import with the clash named, not an AttributeError in
    models.py (`import sit_fast` alone loads neither: its names load on first use)."""
    import os
    import subprocess
    import sys

    other = tmp_path / "kernels"
    other.mkdir()
    (other / "__init__.py").write_text("def get_kernel(name):\n    return name\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO_ROOT)])}
    result = subprocess.run([sys.executable, "-c", "from sit_fast import SiT"], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=300)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last == (f"ImportError: the `kernels` package imported ({other / '__init__.py'}) is not sit_fast's: "
                    f"Hugging Face's `kernels` package (pip's `kernels`) has the same import name, and one environment "
                    f"holds only one of them; uninstall it (pip uninstall kernels) and reinstall sit_fast (pip install "
                    f"-e .), or use another environment"), result.stderr


def test_a_kernels_folder_without_init_found_first_is_named(tmp_path):
    """A project's own kernels/ folder without __init__.py (CUDA sources, say), imported as a namespace
    package before sit_fast's (an editable install's finder comes after the folders on the path): the
    error names that folder, not Hugging Face's package."""
    import os
    import subprocess
    import sys

    (tmp_path / "kernels").mkdir()
    code = ("import importlib.machinery, os, sys\n"
            "class Late:\n"  # as an editable install's finder: after the folders on the path
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if path is None and name in ('sit_fast', 'kernels'):\n"
            f"            return importlib.machinery.PathFinder.find_spec(name, [{str(REPO_ROOT)!r}])\n"
            "sys.meta_path.insert(sys.meta_path.index(importlib.machinery.PathFinder) + 1, Late())\n"
            # only Late finds the clone, also where an older pip's editable install put it on the path, where
            # its `kernels` package would win over the folder (a package on the path beats a namespace)
            f"sys.path[:] = ['.'] + [p for p in sys.path if os.path.realpath(p) != {str(REPO_ROOT)!r}]\n"
            "from sit_fast import SiT\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                            timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"ImportError: the `kernels` imported is the folder {tmp_path / 'kernels'} (no __init__.py), found before "
        f"sit_fast's `kernels` package: run from another folder, or rename that one"), result.stderr
