"""sample.py and sit_fast.sampling on the CPU: grids, the FID job under torchrun, checkpoints, guidance, likelihood.

Everything runs a tiny SiT-T/2 on 8 x 8 model inputs: in pixel space (3 channels), or behind a tiny
AutoencoderKL (2 block levels: downsample 2, so 16 x 16 images) built and saved by the fixtures.
"""
import argparse
import contextlib
import errno
import functools
import json
import logging
import math
import os
import shutil
import re
import signal
import socket
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import sit_fast.progress
from sit_fast.files import FolderLock
from sit_fast.images import to_uint8
from sit_fast.models import SiT, SiT_models
from sit_fast.sampling import (
    CUDAGraphForward, Denoiser, ModelForwards, ModelRequest, build_model, index_noise, model_call_times, npz_array,
    pending_chunks, png_path, settings_differences, to_rgb_uint8,
)
from sit_fast.transport import Sampler, create_transport
from tests.oserrors import fail_listing
from tests.test_interrupts import signalled_child
from tests.torchrun_output import says_the_others_were_stopped, without_gloo_lines

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 10
FAST = ["--fused-kernels", "off", "--attn-backend", "math"]


@pytest.fixture(autouse=True)
def no_folder_left_locked():
    """Tests that build a job's parts directly (not through sample.main) leave their folder's lock held."""
    yield
    FolderLock.release_all()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops on a shared 2-core machine: one intra-op thread is many times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_sit(in_channels, learn_sigma, num_classes=NUM_CLASSES, seed=0, depth=None):
    """SiT-T/2 on 8 x 8 inputs with every trainable weight random (adaLN-Zero would make outputs 0);
    depth: fewer blocks, for tests through the interpreted kernels (about 1 s per block and call in bf16)."""
    torch.manual_seed(seed)
    kwargs = dict(input_size=8, in_channels=in_channels, num_classes=num_classes, learn_sigma=learn_sigma)
    if depth is None:
        model = SiT_models["SiT-T/2"](**kwargs)
    else:
        model = SiT(depth=depth, hidden_size=128, patch_size=2, num_heads=4, **kwargs)
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from diffusers.models import AutoencoderKL

    root = tmp_path_factory.mktemp("sample")
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8, latent_channels=4,
                  sample_size=16, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2).save_pretrained(root / "vae")
    # Upstream layout: a raw state_dict, learn_sigma=True (8 output channels for 4 latent channels).
    torch.save(random_sit(4, learn_sigma=True).state_dict(), root / "latent.pt")
    torch.save(random_sit(3, learn_sigma=False).state_dict(), root / "pixel.pt")
    return {"root": root, "vae": str(root / "vae"), "latent": str(root / "latent.pt"), "pixel": str(root / "pixel.pt")}


def run(argv):
    """sample.main in this process; returns its result (SystemExit propagates)."""
    return sample.main([str(a) for a in argv])


def read_png(path):
    return np.asarray(Image.open(path))


#################################################################################
#                                 Grids                                          #
#################################################################################

def test_grid_with_tiny_vae_is_deterministic(files, tmp_path):
    common = ["ODE", "--ckpt", files["latent"], "--vae", files["vae"], "--sampling-method", "euler",
              "--num-sampling-steps", 3, "--cfg-scale", 2.0, *FAST]
    run(common + ["--out", tmp_path / "a.png"])
    run(common + ["--out", tmp_path / "b.png", "--batch-size", 3])  # batching does not change euler images
    run(common + ["--out", tmp_path / "c.png", "--seed", 1])
    a, b, c = (read_png(tmp_path / f"{n}.png") for n in "abc")
    assert a.shape == (2 * 18 + 2, 4 * 18 + 2, 3)  # 8 images of 16 x 16, 4 per row, 2 px padding
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_guidance_mixes_every_channel_of_a_latent_space_wider_than_sds(files, tmp_path):
    """--cfg-channels unset: upstream's first 3 for SD's 4 latent channels, all of a VAE's 8."""
    from diffusers.models import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8, latent_channels=8,
                  sample_size=16, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2).save_pretrained(tmp_path / "vae8")
    torch.save(random_sit(8, learn_sigma=False).state_dict(), tmp_path / "latent8.pt")
    for ckpt, vae, same_as, other in ((files["latent"], files["vae"], "3", "all"),
                                      (tmp_path / "latent8.pt", tmp_path / "vae8", "all", "3")):
        common = ["ODE", "--ckpt", ckpt, "--vae", vae, "--sampling-method", "euler", "--num-sampling-steps", 2,
                  "--cfg-scale", 4.0, "--class-labels", 1, 2, *FAST]
        grids = {}
        for channels in (None, same_as, other):
            out = tmp_path / f"{os.path.basename(str(ckpt))}-{channels}.png"
            run(common + ["--out", out] + (["--cfg-channels", channels] if channels else []))
            grids[channels] = read_png(out)
        np.testing.assert_array_equal(grids[None], grids[same_as])
        assert not np.array_equal(grids[None], grids[other])


def test_grid_pixel_space_sde_and_bf16(files, tmp_path, capsys):
    out = tmp_path / "grid.png"
    argv = ["SDE", "--ckpt", files["pixel"], "--vae", "none", "--in-channels", 3, "--num-sampling-steps", 4,
            "--class-labels", 1, 2, 3, *FAST]
    run(argv + ["--out", out])
    # the FID job's line, with the grid's path
    assert re.search(rf"^sampled 3 images in [0-9.]+ s: [0-9.]+ images/s -> {re.escape(str(out))}$",
                     capsys.readouterr().out, re.M)
    first = read_png(out)
    run(argv + ["--out", out])
    np.testing.assert_array_equal(first, read_png(out))  # SDE noise is seeded per batch
    assert first.shape == (12, 3 * 10 + 2, 3)  # 3 images of 8 x 8 in one row, 2 px padding
    run(argv + ["--out", tmp_path / "bf16.png", "--precision", "bf16"])
    difference = np.abs(read_png(tmp_path / "bf16.png").astype(int) - first).mean()
    assert 0 < difference < 8  # bf16 arithmetic: close, not the same


@pytest.mark.parametrize("job", ["grid", "fid"])
def test_the_batch_that_compiles_is_left_out_of_the_rate(files, tmp_path, monkeypatch, capsys, job):
    """--compile: the first batch's compilation, minutes long, made a short job's images/s a fraction of
    its rate; the rate is the later batches', that batch's time said beside it (as train.py leaves its
    compiling step out), and a job of one batch says that its rate counts it. Without --compile, every
    batch counts."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)  # what compiling costs is the clock's
    clock = [100.0]
    monkeypatch.setattr(sample.time, "perf_counter", lambda: clock[0])
    real = sample.Setup.sample

    def timed(self, *args):
        clock[0] += 30.0 if clock[0] == start else 1.0  # the first batch compiles, then 1 s each
        return real(self, *args)

    monkeypatch.setattr(sample.Setup, "sample", timed)
    common = ["ODE", "--ckpt", files["pixel"], "--vae", "none", "--sampling-method", "euler", "--num-sampling-steps",
              2, *FAST]
    lines = {}
    for images, flags in ((6, ["--compile"]), (2, ["--compile"]), (6, [])):
        if job == "grid":
            argv = common + ["--class-labels", *range(images), "--batch-size", 2, "--out", tmp_path / f"{images}.png"]
        else:
            argv = common + ["--num-fid-samples", images, "--per-proc-batch-size", 2, "--sample-dir",
                             tmp_path / f"{images}{flags}"]
        start = clock[0] = clock[0] + 1000.0
        run(argv + flags)
        lines[images, bool(flags)] = re.search(r"^sampled .*images/s.*$", capsys.readouterr().out, re.M).group(0)
    suffix = f" -> {tmp_path}/{{}}.png" if job == "grid" else ""
    assert lines[6, True] == ("sampled 6 images in 32.0 s: 2.00 images/s after the first batch, which compiled the "
                              "model (--compile) in 30.0 s" + suffix.format(6))  # 4 images in 2 s
    assert lines[2, True] == ("sampled 2 images in 30.0 s: 0.07 images/s, counting the first batch's time compiling "
                              "the model (--compile)" + suffix.format(2))
    assert lines[6, False] == "sampled 6 images in 32.0 s: 0.19 images/s" + suffix.format(6)


def test_a_grid_batch_size_past_its_label_count_is_its_label_count(files, tmp_path):
    """--batch-size above the number of grid labels samples one batch of those labels: the same images,
    an SDE's per-batch noise included, as --batch-size equal to the count."""
    common = ["SDE", "--ckpt", files["pixel"], "--vae", "none", "--num-sampling-steps", 3, "--class-labels", 1, 2, 3,
              *FAST]
    run(common + ["--batch-size", 3, "--out", tmp_path / "a.png"])
    run(common + ["--batch-size", 64, "--out", tmp_path / "b.png"])
    np.testing.assert_array_equal(read_png(tmp_path / "a.png"), read_png(tmp_path / "b.png"))


def test_compiled_forwards_compile_once(files, tmp_path, monkeypatch):
    """--compile: the forward compiles once, for a grid whose last batch is short too (padded to the
    batch size, the padding's images dropped). Once, where the first batch's latents were a normal
    tensor and every later model call's an inference tensor, it had compiled twice (Dynamo's eager
    backend here, for time)."""
    from torch._dynamo.utils import counters

    compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: compile(fn, **{**kwargs, "backend": "eager"}))
    torch._dynamo.reset()
    counters.clear()
    argv = ["ODE", "--ckpt", files["pixel"], "--vae", "none", "--in-channels", 3, "--sampling-method", "euler",
            "--num-sampling-steps", 3, "--class-labels", 1, 2, 3, "--cfg-scale", 2.0, *FAST]
    with torch._dynamo.config.patch(error_on_recompile=True):
        run(argv + ["--batch-size", 2, "--compile", "--out", tmp_path / "grid.png"])
    assert counters["stats"]["unique_graphs"] >= 1  # compiled, not run eagerly
    assert read_png(tmp_path / "grid.png").shape == (12, 3 * 10 + 2, 3)  # 3 images of 8 x 8 in one row
    run(argv + ["--out", tmp_path / "one_batch.png"])  # a fixed-step ODE's images do not depend on their batch
    assert np.abs(read_png(tmp_path / "grid.png").astype(int) - read_png(tmp_path / "one_batch.png")).max() <= 1


@pytest.mark.parametrize("job", ["--likelihood", "--reverse"])
def test_compiled_likelihood_and_reverse_compile_once(job, files, tmp_path, monkeypatch):
    """--compile: the forward of --likelihood or --reverse compiles once, the short last batch filled
    with copies of its items (their results dropped); the items' results are those of a run without
    --compile, whose last batch is not filled (a fixed-step ODE's, the exact divergence's: no
    random probes to depend on the batch)."""
    compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: compile(fn, **{**kwargs, "backend": "eager"}))
    torch._dynamo.reset()
    argv, out, saved = data_job(job, 3, files, tmp_path)
    argv = argv + (["--exact-divergence"] if job == "--likelihood" else [])
    alone, real_save = [], sample.atomic_torch_save  # a batch's file holds its items' results alone
    monkeypatch.setattr(sample, "atomic_torch_save", lambda t, path: alone.append(
        t.untyped_storage().nbytes() == t.numel() * t.element_size()) or real_save(t, path))
    from torch._dynamo.utils import counters

    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        run(argv + ["--compile"])
    assert counters["stats"]["unique_graphs"] >= 1  # compiled, not run eagerly
    assert len(alone) >= 2 and all(alone), alone
    compiled = saved()
    os.remove(out)
    run(argv)
    assert compiled.shape[0] == 3 and np.allclose(compiled, saved(), rtol=1e-5, atol=1e-5)


def test_a_stopped_grid_is_one_line(files, tmp_path, capsys, monkeypatch, stop):
    """Nothing to keep: the line says what stopped it, the status says how (130, or 128 + the signal)."""
    monkeypatch.setattr(sample.Setup, "sample", lambda self, *args: stop())
    with pytest.raises(SystemExit) as exit_info:
        run(["ODE", "--ckpt", files["pixel"], "--vae", "none", "--out", tmp_path / "grid.png", *FAST])
    assert exit_info.value.code == stop.status and capsys.readouterr().err.endswith(f"\n{stop.words}\n")
    assert not (tmp_path / "grid.png").exists()


def test_a_stop_signal_sent_again_while_the_job_leaves_its_process_group_is_dropped(files, tmp_path, capsys,
                                                                                    monkeypatch):
    """SIGTERM, then SIGTERM again as the stopped job releases its folders and leaves the process group
    (SLURM signals every process, torchrun passes it on): dropped, not handed to the handler from before
    the job (by default the process's end by SIGTERM, its folder locks and process group left behind)."""
    import time

    left = []

    def signalled_again():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)  # the handler runs here
        left.append(True)

    monkeypatch.setattr(sample.Setup, "sample", lambda self, *args: os.kill(os.getpid(), signal.SIGTERM))
    monkeypatch.setattr(sample, "cleanup", signalled_again)
    before_the_job = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: before_the_job.append(signum))
    try:
        with pytest.raises(SystemExit) as exit_info:
            run(["ODE", "--ckpt", files["pixel"], "--vae", "none", "--out", tmp_path / "grid.png", *FAST])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert exit_info.value.code == 128 + signal.SIGTERM and left == [True] and before_the_job == []
    assert capsys.readouterr().err.endswith("\nstopped by SIGTERM\n")


#################################################################################
#                      Checkpoints and one-line errors                           #
#################################################################################

def test_a_checkpoint_of_another_transport_is_sampled_with_its_flags(files, tmp_path, capsys):
    """Upstream's training checkpoint records its args: --path-type and --prediction not given are its
    own (said on stdout), the same images as passing them; another one given warns, naming its own."""
    weights = torch.load(files["pixel"], weights_only=True)
    torch.save({"model": weights, "ema": weights, "args": argparse.Namespace(path_type="VP", prediction="score")},
               tmp_path / "vp.pt")
    argv = ["ODE", "--ckpt", tmp_path / "vp.pt", "--vae", "none", "--sampling-method", "euler",
            "--num-sampling-steps", 2, *FAST]
    run(argv + ["--out", tmp_path / "a.png"])
    out, err = capsys.readouterr()
    assert "using --path-type VP, --prediction score: the checkpoint's training flags" in out and not err, (out, err)
    run(argv + ["--out", tmp_path / "b.png", "--path-type", "VP", "--prediction", "score"])
    out, err = capsys.readouterr()
    assert "training flag" not in out and "was trained with" not in err
    np.testing.assert_array_equal(read_png(tmp_path / "a.png"), read_png(tmp_path / "b.png"))
    run(argv + ["--out", tmp_path / "c.png", "--path-type", "Linear"])
    out, err = capsys.readouterr()
    assert "using --prediction score: the checkpoint's training flag\n" in out, out
    assert ("warning: the checkpoint was trained with --path-type VP (this run: Linear); pass the same to sample "
            "from it") in err, err


def test_a_recorded_transport_flag_of_no_known_value_is_not_taken(files, tmp_path, capsys):
    """A checkpoint recording a --path-type this sampler does not know: the known --prediction is taken,
    the path stays the default, with a warning naming the recorded one; recorded defaults are not announced."""
    weights = torch.load(files["pixel"], weights_only=True)
    torch.save({"model": weights, "ema": weights, "args": argparse.Namespace(path_type="Cosine", prediction="noise")},
               tmp_path / "cosine.pt")
    run(["ODE", "--ckpt", tmp_path / "cosine.pt", "--vae", "none", "--sampling-method", "euler",
         "--num-sampling-steps", 2, "--out", tmp_path / "a.png", *FAST])
    out, err = capsys.readouterr()
    assert "using --prediction noise: the checkpoint's training flag\n" in out, out
    assert ("the checkpoint was trained with --path-type Cosine (this run: Linear); sit_fast has no --path-type "
            "Cosine, so this run's transport is not the one the model was trained with") in err, err
    assert "pass the same" not in err  # advice no flag can follow
    assert (tmp_path / "a.png").is_file()
    defaults = argparse.Namespace(path_type="Linear", prediction="velocity")  # nothing to take, nothing said
    torch.save({"model": weights, "ema": weights, "args": defaults}, tmp_path / "linear.pt")
    run(["ODE", "--ckpt", tmp_path / "linear.pt", "--vae", "none", "--sampling-method", "euler",
         "--num-sampling-steps", 2, "--out", tmp_path / "b.png", *FAST])
    out, err = capsys.readouterr()
    assert "training flag" not in out and not err, (out, err)


def test_an_exported_checkpoint_keeps_its_transport(files, tmp_path, capsys):
    """python -m sit_fast.export: a .safetensors file carries the training transport, which sample.py
    takes as from the checkpoint; a .pt file cannot, and the export says which flags to pass."""
    from sit_fast import export

    weights = torch.load(files["pixel"], weights_only=True)
    torch.save({"model": weights, "ema": weights, "opt": {}, "step": 7,
                "args": {"path_type": "VP", "prediction": "score", "loss_weight": None, "model": "SiT-T/2"}},
               tmp_path / "vp.pt")
    found = export.main([str(tmp_path / "vp.pt"), "--out", str(tmp_path / "vp.safetensors")])
    assert found["transport"] == {"path_type": "VP", "prediction": "score", "loss_weight": None}
    out = capsys.readouterr().out
    assert out.count("  transport  --path-type VP --prediction score\n") == 2 and "note" not in out, out
    argv = ["ODE", "--vae", "none", "--sampling-method", "euler", "--num-sampling-steps", 2, *FAST]
    run(argv + ["--ckpt", tmp_path / "vp.safetensors", "--out", tmp_path / "a.png"])
    out, err = capsys.readouterr()
    assert "using --path-type VP, --prediction score: the checkpoint's training flags" in out and not err, (out, err)
    run(argv + ["--ckpt", tmp_path / "vp.pt", "--out", tmp_path / "b.png"])
    np.testing.assert_array_equal(read_png(tmp_path / "a.png"), read_png(tmp_path / "b.png"))

    export.main([str(tmp_path / "vp.pt"), "--out", str(tmp_path / "vp-ema.pt")])
    out = capsys.readouterr().out
    assert out.endswith(f"note: {tmp_path / 'vp-ema.pt'} is a plain state_dict and records no transport; the model "
                        f"was trained with --path-type VP --prediction score: pass those to sample.py (or export to "
                        f".safetensors, which keeps them)\n"), out
    assert "transport  not recorded (sample with --path-type and --prediction as trained)" in out
    export.main([files["pixel"], "--out", str(tmp_path / "plain.safetensors")])  # nothing recorded: nothing to say
    out = capsys.readouterr().out
    assert "note" not in out and out.count("transport  not recorded") == 2, out


@pytest.mark.parametrize("fid", [False, True])
def test_samples_that_are_not_finite_are_refused_not_written(files, tmp_path, capsys, monkeypatch, fid):
    """A sampler that diverged (here, image 1 of each batch made NaN) would turn NaN into black pixels,
    unnoticed in an FID: one line naming the image and the flags that help; nothing of the batch written."""
    real = sample.Setup.sample

    def diverging(self, noise, labels, seed):
        samples = real(self, noise, labels, seed).clone()
        samples[1, 0, 0, 0] = float("nan")
        return samples

    monkeypatch.setattr(sample.Setup, "sample", diverging)
    argv = ["SDE", "--ckpt", files["pixel"], "--vae", "none", "--num-sampling-steps", 3, "--diffusion-form", "SBDM",
            *FAST]
    argv += ["--num-fid-samples", 3, "--batch-size", 2, "--sample-dir", tmp_path / "s"] if fid else [
        "--out", tmp_path / "g.png"]
    with pytest.raises(SystemExit) as exit_info:
        run(argv)
    assert exit_info.value.code == 2
    assert one_line_error(capsys) == ("error: the sampler diverged: image 1 came out NaN or inf; nothing of its batch "
                                      "is written: try more --num-sampling-steps (now 3), --diffusion-form sigma "
                                      "(upstream's default) or a smaller --cfg-scale (now 4)" if not fid else
                                      "error: the sampler diverged: image 1 came out NaN or inf; nothing of its batch "
                                      "is written: try more --num-sampling-steps (now 3) or --diffusion-form sigma "
                                      "(upstream's default) (the same settings draw the same noise again)")
    assert not os.path.exists(tmp_path / "g.png") and not os.path.exists(tmp_path / "s.npz")
    if fid:
        assert not [name for name in os.listdir(tmp_path / "s") if name.endswith(".png")]


@pytest.mark.parametrize("argv,advice", [
    (["ODE", "--precision", "bf16", "--cfg-scale", "1"], "smaller --atol and --rtol or --precision tf32"),
    (["SDE", "--diffusion-form", "sigma", "--precision", "bf16"],
     "more --num-sampling-steps (now 250), --precision tf32 or a smaller --cfg-scale (now 4)"),
    (["ODE", "--sampling-method", "euler", "--cfg-scale", "1"],
     "more --num-sampling-steps (now 250) or --sampling-method dopri5 (adaptive)"),
    (["SDE", "--diffusion-norm", "1e30", "--cfg-scale", "1"],
     "more --num-sampling-steps (now 250) or a smaller --diffusion-norm (now 1e+30; upstream's is 1)"),
    (["SDE", "--diffusion-norm", "1", "--cfg-scale", "1"], "more --num-sampling-steps (now 250)"),
])
def test_divergence_advice_names_only_the_flags_not_in_use(argv, advice, tmp_path):
    """What helps a sampler that diverged: the adaptive solver's tolerances or more fixed steps, the SDE's
    default diffusion, tf32 under bf16 and a smaller guidance scale, each only where it changes something."""
    setup = object.__new__(sample.Setup)
    setup.args = sample.resolve_args(sample.build_parser().parse_args(argv + ["--out", str(tmp_path / "g.png")]))
    assert setup.divergence_advice() == advice


def test_images_the_vae_overflowed_on_are_refused_not_written(files, tmp_path, capsys, monkeypatch):
    """A decoder output of inf (an overflow) was clamped into white pixels; it is refused as NaN is."""
    from sit_fast import vae

    real = vae.LatentCodec.decode

    def overflowing(self, latents):
        real_decode = self.vae.decode

        def decode(z):
            out = real_decode(z)
            out.sample[1:2] = float("inf")
            return out

        self.vae.decode = decode
        try:
            return real(self, latents)
        finally:
            self.vae.decode = real_decode

    monkeypatch.setattr(vae.LatentCodec, "decode", overflowing)
    argv = ["ODE", "--ckpt", files["latent"], "--vae", files["vae"], "--sampling-method", "euler",
            "--num-sampling-steps", 2, "--vae-precision", "bf16", "--out", tmp_path / "g.png", *FAST]
    with pytest.raises(SystemExit) as exit_info:
        run(argv)
    assert exit_info.value.code == 2
    assert one_line_error(capsys) == ("error: the VAE overflowed: image 1 decoded to NaN or inf; nothing of its batch "
                                      "is written: try --vae-precision fp32")
    assert not os.path.exists(tmp_path / "g.png")


@pytest.mark.parametrize("job", ["--likelihood", "--reverse"])
def test_likelihoods_and_noise_that_are_not_finite_are_refused_not_kept(files, tmp_path, capsys, monkeypatch, job):
    """An ODE that diverged gave bpd NaN, saved in the .npz and read back later as a finished result
    (--reverse: NaN noise): one line naming the item; the batches before it are kept to resume from."""
    calls = []
    torch.save(torch.rand(4, 3, 8, 8) * 2 - 1, tmp_path / "x.pt")
    out = tmp_path / ("bpd.npz" if job == "--likelihood" else "z.pt")
    argv = ["ODE", job, "--ckpt", files["pixel"], "--vae", "none", "--data", tmp_path / "x.pt", "--batch-size", 2,
            "--sampling-method", "euler", "--num-sampling-steps", 2, "--out", out, *FAST]
    original = sample.Setup.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        sample_fn = self.sample_fn

        def diverging(x, model_fn):
            result = sample_fn(x, model_fn)
            calls.append(len(x))
            if len(calls) == 2:  # the second batch: items 2 and 3, item 3 NaN (the bpd's log p, or the noise)
                result = [r.clone() for r in result]
                result[0 if job == "--likelihood" else -1][1] = float("nan")
            return result

        self.sample_fn = diverging

    monkeypatch.setattr(sample.Setup, "__init__", init)
    with pytest.raises(SystemExit) as exit_info:
        run(argv)
    assert exit_info.value.code == 2
    what = "likelihood ODE diverged: the bpd" if job == "--likelihood" else "ODE diverged: the noise"
    assert one_line_error(capsys) == (f"error: the {what} of item 3 came out NaN or inf; nothing of its batch is "
                                      f"written: try more --num-sampling-steps (now 2) or --sampling-method dopri5 "
                                      f"(adaptive) (the same settings diverge again)")
    assert not out.exists() and sorted(os.listdir(f"{out}.parts")) == [".lock", "000000.pt", "settings.json"]


def test_a_batch_with_several_images_not_finite_names_the_first_and_counts_the_others():
    x = torch.zeros(4, 3, 2, 2)
    x[1, 0, 0, 0], x[3, 2, 1, 1] = float("nan"), float("inf")
    with pytest.raises(sample.NonFinite) as error:
        sample.Setup.check_finite(x, 4, "the sampler diverged: {} came out NaN or inf", "more steps")
    assert str(error.value) == ("the sampler diverged: image 5 (and 1 more of images 4..7) came out NaN or inf; "
                                "nothing of its batch is written: try more steps")
    sample.Setup.check_finite(x[::2], 0, "{}", "", noun="item")  # all finite: nothing said


def test_a_padding_image_that_is_not_finite_is_not_judged(files, tmp_path, monkeypatch):
    """The last batch of an FID job is padded past N (a fixed batch); the padding is never written, so
    NaN there (an image 3 of 3) must not stop the job."""
    real, calls = sample.Setup.sample, []

    def diverging_padding(self, noise, labels, seed):
        samples = real(self, noise, labels, seed).clone()
        calls.append(len(samples))
        if len(calls) == 2:  # the batch of images 2 and 3, 3 being the padding
            samples[1] = float("nan")
        return samples

    monkeypatch.setattr(sample.Setup, "sample", diverging_padding)
    run(["ODE", "--ckpt", files["pixel"], "--vae", "none", "--num-sampling-steps", 2, "--sampling-method", "euler",
         *FAST, "--num-fid-samples", 3, "--batch-size", 2, "--sample-dir", tmp_path / "s"])
    assert calls == [2, 2]
    assert sorted(name for name in os.listdir(tmp_path / "s") if name.endswith(".png")) == [
        f"{i:06d}.png" for i in range(3)]
    assert np.load(tmp_path / "s.npz")["arr_0"].shape[0] == 3


def test_upstream_learn_sigma_checkpoint_loads_with_inferred_config(files):
    request = ModelRequest(ckpt=files["latent"], downsample=2, in_channels=4, attn_backend="math",
                           fused_kernels=False)
    model, info = build_model(request, torch.device("cpu"))
    assert model.learn_sigma and info["model"] == "SiT-T/2" and info["image_size"] == 16
    assert info["num_classes"] == NUM_CLASSES and not info["label_table_reinitialised"]
    reference = torch.load(files["latent"], weights_only=True)
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())


def test_train_checkpoint_prefers_ema_and_use_raw_and_safetensors(files, tmp_path):
    from safetensors.torch import save_file

    ema, raw = random_sit(3, False, seed=1).state_dict(), random_sit(3, False, seed=2).state_dict()
    path = tmp_path / "0000100.pt"
    torch.save({"model": {"module." + k: v for k, v in raw.items()}, "ema": ema, "opt": {},
                "args": {"model": "SiT-T/2", "prediction": "velocity"}, "step": 100}, path)
    save_file(ema, tmp_path / "ema.safetensors")
    for ckpt, use_raw, expected, weights in [(path, False, ema, "ema"), (path, True, raw, "model"),
                                             (tmp_path / "ema.safetensors", False, ema, "raw")]:
        request = ModelRequest(ckpt=str(ckpt), downsample=1, use_raw=use_raw, attn_backend="math",
                               fused_kernels=False)
        model, info = build_model(request, torch.device("cpu"))
        assert info["weights"] == weights and not model.learn_sigma
        assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())


def test_what_disagrees_with_the_checkpoint_is_named_with_the_value_that_fits(files, tmp_path):
    """build_model's refusals: the message names the flag, the checkpoint's value, and what to pass instead."""
    from sit_fast.checkpoint import CheckpointError
    from sit_fast.errors import UserError

    latent, pixel, shallow = files["latent"], files["pixel"], str(tmp_path / "shallow.pt")
    torch.save(random_sit(3, learn_sigma=False, depth=2).state_dict(), shallow)
    cases = [
        (dict(ckpt=latent, downsample=2, image_size=18), UserError,
         "--image-size 18 is not a multiple of 4 (the VAE factor 2 x patch size 2)"),
        (dict(ckpt=pixel, downsample=1, image_size=9), UserError,
         "--image-size 9 is not a multiple of 2 (the patch size 2)"),
        (dict(ckpt=latent, downsample=2, image_size=32), CheckpointError,
         f"{latent} was trained at model input size 8, i.e. --image-size 16 here, not 32"),
        (dict(ckpt=pixel, downsample=1, in_channels=1), CheckpointError,
         f"{pixel} takes 3-channel inputs but --in-channels says 1: pass --in-channels 3"),
        (dict(ckpt=pixel, downsample=2, in_channels=4), CheckpointError,
         f"{pixel} takes 3-channel inputs but the VAE's latents have 4: use the VAE it was trained with (or --vae none "
         f"for a pixel-space model)"),
        (dict(ckpt=pixel, downsample=1, model="SiT-Q/2"), UserError,
         f"unknown model 'SiT-Q/2'; choose one of {', '.join(SiT_models)}"),
        (dict(ckpt=shallow, downsample=1), CheckpointError, f"{shallow}: no registry model has depth 2, hidden 128, "
                                                            f"patch 2"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error) as info:
            build_model(ModelRequest(attn_backend="math", fused_kernels=False, **kwargs), torch.device("cpu"))
        assert str(info.value) == message


def test_use_raw_on_a_checkpoint_of_one_set_of_weights_warns_and_uses_them(files, tmp_path, caplog):
    """--use-raw asks for a train.py checkpoint's raw weights: a file of one set of weights has no other,
    so it is used, with a warning saying so; a checkpoint that holds raw weights gives none."""
    import logging

    raw = random_sit(3, False, seed=2).state_dict()
    torch.save({"model": raw, "ema": random_sit(3, False, seed=1).state_dict(), "args": {"model": "SiT-T/2"}},
               tmp_path / "train.pt")
    for ckpt, warned in ((files["pixel"], True), (tmp_path / "train.pt", False)):
        request = ModelRequest(ckpt=str(ckpt), downsample=1, use_raw=True, attn_backend="math", fused_kernels=False)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="sit_fast"):
            build_model(request, torch.device("cpu"))
        expected = [f"--use-raw: {ckpt} holds a single set of weights (no 'model'/'ema' entries); using them"]
        assert [r.getMessage() for r in caplog.records] == (expected if warned else [])


def one_line_error(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("fid", [False, True])
def test_class_count_mismatch_is_refused_in_one_line(files, tmp_path, capsys, fid):
    """Another --num-classes than the checkpoint's would sample from a random label table (a whole FID
    run of meaningless samples): refused, naming the count the checkpoint has; its own count runs."""
    argv = ["ODE", "--ckpt", files["pixel"], "--vae", "none", "--sampling-method", "euler",
            "--num-sampling-steps", 2, *FAST]
    argv += ["--num-fid-samples", 2, "--sample-dir", tmp_path / "s"] if fid else ["--out", tmp_path / "g.png"]
    with pytest.raises(SystemExit) as exit_info:
        run(argv + ["--num-classes", NUM_CLASSES + 1])
    assert exit_info.value.code == 2
    assert one_line_error(capsys) == (f"error: {files['pixel']} has {NUM_CLASSES} classes, not {NUM_CLASSES + 1}: its "
                                      f"label table would be re-initialised at random, and samples of random labels "
                                      f"are meaningless; drop --num-classes (or pass {NUM_CLASSES})")
    assert not os.path.exists(tmp_path / "g.png") and not os.path.exists(tmp_path / "s.npz")
    run(argv + ["--num-classes", NUM_CLASSES])
    assert "warning" not in capsys.readouterr().err


def test_building_the_model_leaves_the_callers_rng_alone(files):
    """The model's random init (overwritten by the checkpoint) draws from a forked RNG."""
    request = ModelRequest(ckpt=files["pixel"], downsample=1, attn_backend="math", fused_kernels=False)
    torch.manual_seed(2)
    build_model(request, torch.device("cpu"))
    after = torch.rand(1)
    torch.manual_seed(2)
    assert torch.equal(after, torch.rand(1))


def test_a_checkpoint_with_nan_weights_is_refused_in_one_line(tmp_path, capsys):
    """A diverged run's weights gave black images (fixed-step solvers) or dopri5's AssertionError."""
    state = random_sit(3, learn_sigma=False).state_dict()
    state["final_layer.linear.bias"][0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(SystemExit) as exit_info:
        run(["ODE", "--ckpt", tmp_path / "nan.pt", "--vae", "none", "--class-labels", 1, "--out", tmp_path / "g.png",
             *FAST])
    assert exit_info.value.code == 2
    err = one_line_error(capsys)
    assert err.startswith(f"error: {tmp_path / 'nan.pt'} holds weights that are not finite (NaN or inf) "
                          "in 1 tensor(s), e.g. final_layer.linear.bias"), err
    assert not (tmp_path / "g.png").exists()


def test_nan_ema_weights_point_to_the_raw_ones_and_nan_raw_weights_do_not(tmp_path):
    """A diverged EMA may have finite raw weights beside it (--use-raw); a file of one set of weights has none."""
    from sit_fast.checkpoint import CheckpointError

    state = random_sit(3, learn_sigma=False).state_dict()
    state["final_layer.linear.bias"][0] = float("nan")
    torch.save({"model": random_sit(3, learn_sigma=False).state_dict(), "ema": state}, tmp_path / "train.pt")
    torch.save(state, tmp_path / "raw.pt")
    for name, hint in (("train.pt", " (or --use-raw for its raw weights)"), ("raw.pt", "")):
        request = ModelRequest(ckpt=str(tmp_path / name), downsample=1, attn_backend="math", fused_kernels=False)
        with pytest.raises(CheckpointError) as info:
            build_model(request, torch.device("cpu"))
        assert str(info.value).endswith(f"its samples would be NaN; use an earlier checkpoint{hint}"), info.value


@pytest.mark.parametrize("argv,needle", [
    (["--model", "SiT-S/2"], "pass --model SiT-T/2"),
    (["--image-size", 32], "--image-size 8"),
    (["--image-size", 9], "not a multiple of 2"),
    (["--in-channels", 1], "--in-channels 3"),
    (["--class-labels", 10], "outside 0 .. 9"),
    (["--cfg-interval", 0.2, 0.5, "--cfg-scale", 1], "no effect"),
    (["--cfg-channels", "all", "--cfg-scale", 1], "error: --cfg-channels has no effect with --cfg-scale 1"),
    (["--cfg-interval", 2, 3], "in [0, 1]"),
    (["--cfg-interval", -0.5, 0.5], "in [0, 1]"),
    (["--cfg-interval", 0.6, 0.4], "LOW must not exceed HIGH"),
    (["--cfg-interval", 0.8, 1, "--sampling-method", "euler", "--num-sampling-steps", 4],
     "none of the sampler's 4 model calls (at t from 0 to 0.75) falls inside it"),
    (["--num-sampling-steps", 0], "--num-sampling-steps must be at least 1"),
    (["--prediction", "noise", "--sample-eps", 0], "error: --sample-eps must be > 0 here: the Linear path with a noise "
                                                    "model is singular at t = 0 and t = 1"),
    (["--out", "zz"], "--out zz"),
    (["--num-fid-samples", 4, "--out", "fid.png"], "--out fid.png: --num-fid-samples writes ADM's .npz"),
    (["--sample-dir", "somewhere"], "--sample-dir applies to --num-fid-samples only"),
    (["--no-run-folder"], "--no-run-folder applies to --num-fid-samples only"),
    (["--class-balanced"], "--class-balanced applies to --num-fid-samples only"),
    (["--tf32", "--precision", "bf16"], "--tf32 contradicts --precision bf16"),
    (["--no-tf32", "--precision", "tf32"], "--no-tf32 contradicts --precision tf32"),
    (["--reverse", "--data", "images", "--out", "noise.png"], "--out noise.png: --reverse saves the noise"),
    (["--cuda-graphs"], "CUDA"),
    (["--likelihood"], "--data"),
    (["--likelihood", "--data", "x.pt", "--out", "bpd.txt"], "--out bpd.txt: --likelihood saves the bits per "
                                                             "dimension with np.savez; give the file the extension"),
    (["--likelihood", "--dataset", "digits", "--data", "x.pt"], "two sources of data: pass one"),
    (["--dataset", "digits"], "--dataset is read by ODE --likelihood or --reverse only"),
    (["--likelihood", "--dataset", "digits", "--out", "bpd.npz"], "this model takes inputs (3, 8, 8)"),
])
def test_misuse_is_a_one_line_error(files, tmp_path, capsys, monkeypatch, argv, needle):
    if "--cuda-graphs" in argv and torch.cuda.is_available():
        pytest.skip("CUDA present")
    monkeypatch.chdir(tmp_path)  # relative --out and --data paths, were one let through, land here
    with pytest.raises(SystemExit) as exit_info:
        run(["ODE", "--ckpt", files["pixel"], "--vae", "none", "--out", tmp_path / "g.png", *FAST, *argv])
    assert exit_info.value.code == 2
    err = one_line_error(capsys)
    assert err.startswith("error:") and needle in err, err


@pytest.mark.parametrize("argv,error", [
    (["ODE", "--atol", 0, "--rtol", 0], "error: atol and rtol are both 0: dopri5 could not meet them"),
    (["SDE", "--last-step", "Tweedie", "--last-step-size", 0],
     "error: --last-step Tweedie takes a step of --last-step-size in (0, 1) to t = 1, got 0"),
    (["ODE", "--atol", 0], None),  # relative error alone, as torchdiffeq takes it (so upstream did)
    (["ODE", "--sampling-method", "euler", "--atol", 0, "--rtol", 0], None),  # fixed steps use no tolerance
    (["SDE", "--last-step", "None", "--last-step-size", 0], None),  # no last step: its size unused
    (["SDE", "--diffusion-form", "SBDM", "--last-step-size", 0.9995],
     "error: --sample-eps 0.001 and --last-step-size 0.9995 leave no time to integrate over"),
    # 1 - 1e-8 is 1 in float32: the last step's drift would be taken at t = 1, where it is singular (NaN images)
    (["SDE", "--diffusion-form", "constant", "--last-step-size", 1e-8],
     "error: --last-step-size 1e-08 must be at least 3e-08 here (a float32 time grid holds 1 - 1e-08 as 1)"),
])
def test_zero_tolerances_and_last_step_sizes(files, tmp_path, capsys, argv, error):
    """What upstream took, taken: one tolerance 0, a last-step size 0 without a last step; what no
    sampler can use, refused in one line."""
    argv = [*argv, "--ckpt", files["pixel"], "--vae", "none", "--out", tmp_path / "g.png", *FAST]
    if error is None:
        run(argv)
        assert (tmp_path / "g.png").exists()
        return
    with pytest.raises(SystemExit):
        run(argv)
    assert one_line_error(capsys).startswith(error)


@pytest.mark.parametrize("job", [[], ["--likelihood", "--data", "inputs.pt"]])
def test_tolerances_an_adaptive_solver_cannot_meet_are_a_one_line_error(job, files, tmp_path, capsys, monkeypatch):
    """An adaptive step size that falls to 0 (tolerances below what a float32 state can meet) names the
    flags to change, in one line, not a traceback."""
    monkeypatch.chdir(tmp_path)
    torch.save(torch.zeros(2, 3, 8, 8), tmp_path / "inputs.pt")
    with pytest.raises(SystemExit) as exit_info:
        run(["ODE", "--ckpt", files["pixel"], "--vae", "none", "--sampling-method", "dopri5", "--atol", 1e-30,
             "--rtol", 2e-30, *FAST, *job])
    assert exit_info.value.code == 2
    err = one_line_error(capsys)
    assert err.startswith("error: --sampling-method dopri5: the adaptive step size fell to 0 (underflow in dt"), err
    assert "never met --atol 1e-30 / --rtol 2e-30 on this torch.float32 state" in err, err
    assert err.endswith("or take a fixed-step --sampling-method (euler, heun)"), err


def test_sde_step_count_error_names_the_flag(files, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run(["SDE", "--ckpt", files["pixel"], "--vae", "none", "--num-sampling-steps", 1,
             "--out", tmp_path / "g.png", *FAST])
    err = one_line_error(capsys)
    assert "--num-sampling-steps must be at least 2 for an SDE" in err, err


def test_bad_grid_extension_is_refused_before_sampling(files, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(["ODE", "--ckpt", files["pixel"], "--vae", "none", "--sampling-method", "euler",
             "--num-sampling-steps", 2, "--out", tmp_path / "zz", *FAST])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert "sampled" not in captured.out
    err = " ".join(captured.err.split())
    assert len(captured.err.strip().splitlines()) == 1 and err.startswith("error: --out") and ".png" in err, err
    assert not os.path.exists(tmp_path / "zz")
    run(["ODE", "--ckpt", files["pixel"], "--vae", "none", "--sampling-method", "euler",
         "--num-sampling-steps", 2, "--out", tmp_path / "g.JPG", *FAST])  # any case of a known extension
    assert read_png(tmp_path / "g.JPG").shape == (2 * 10 + 2, 4 * 10 + 2, 3)


def train_checkpoint(path, in_channels, learn_sigma, latent_space):
    """A train.py-style checkpoint (model / ema / model_config) recording its latent space."""
    ema = random_sit(in_channels, learn_sigma).state_dict()
    torch.save({"model": ema, "ema": ema, "opt": {}, "args": {"model": "SiT-T/2"}, "step": 1,
                "model_config": {"model": "SiT-T/2", "input_size": 8, "in_channels": in_channels,
                                 "num_classes": NUM_CLASSES, "learn_sigma": learn_sigma,
                                 "latent_space": latent_space}}, path)
    return path


def test_train_checkpoint_latent_space_chooses_the_vae(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the default --vae mse would fail at once, not download
    pixel = train_checkpoint(tmp_path / "pixel.pt", 3, False, "pixels")
    latent = train_checkpoint(tmp_path / "latent.pt", 4, True, files["vae"])
    common = ["ODE", "--sampling-method", "euler", "--num-sampling-steps", 2, "--class-labels", 1, 2, *FAST]

    run(common + ["--ckpt", pixel, "--out", tmp_path / "p.png"])  # no --vae: pixel space, as recorded
    assert "using --vae none: the latent space recorded in the checkpoint (pixels)" in capsys.readouterr().out
    assert read_png(tmp_path / "p.png").shape == (12, 2 * 10 + 2, 3)  # 8 x 8 images: no VAE
    run(common + ["--ckpt", latent, "--out", tmp_path / "l.png"])  # no --vae: the recorded VAE directory
    assert f"using --vae {files['vae']}:" in capsys.readouterr().out
    assert read_png(tmp_path / "l.png").shape == (20, 2 * 18 + 2, 3)  # 16 x 16 images: decoded by the VAE
    run(common + ["--ckpt", pixel, "--vae", "none", "--out", tmp_path / "e.png"])  # explicit and agreeing
    assert "using --vae" not in capsys.readouterr().out
    np.testing.assert_array_equal(read_png(tmp_path / "e.png"), read_png(tmp_path / "p.png"))
    run(common + ["--ckpt", latent, "--vae", files["vae"], "--out", tmp_path / "s.png"])  # the recorded one, given
    assert "trained on the latents of the VAE" not in capsys.readouterr().err
    copy = shutil.copytree(files["vae"], tmp_path / "vae_copy")  # another folder: maybe another VAE
    run(common + ["--ckpt", latent, "--vae", copy, "--out", tmp_path / "c.png"])  # decoded as asked, and said
    err = capsys.readouterr().err
    assert (f"{latent} was trained on the latents of the VAE {files['vae']}; they are decoded with --vae {copy}: "
            f"unless the two share an encoder") in err, err
    np.testing.assert_array_equal(read_png(tmp_path / "c.png"), read_png(tmp_path / "l.png"))

    for ckpt, vae, needle in [(pixel, files["vae"], f"{pixel} is a pixel-space model (latent space: pixels), but "
                                                    f"--vae {files['vae']} was given: drop --vae or pass --vae none"),
                              (latent, "none", "--vae none was given")]:
        with pytest.raises(SystemExit) as exit_info:
            run(common + ["--ckpt", ckpt, "--vae", vae, "--out", tmp_path / "x.png"])
        assert exit_info.value.code == 2
        err = one_line_error(capsys)
        assert err.startswith("error:") and needle in err, err


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")
def test_checkpoint_problems_come_before_the_vae(files, tmp_path, capsys, monkeypatch):
    """Offline with a VAE that is not cached, a bad --ckpt is still the message; a 3-channel release-format
    file (no recorded latent space) under the default SD VAE says to pass --vae none."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    cases = [(["--ckpt", tmp_path / "missing.pt"], "checkpoint not found"),
             (["--ckpt", tmp_path / "text.pt"], "cannot read"),
             (["--ckpt", files["pixel"]], "takes 3-channel inputs, not the 4-channel latents of the default --vae "
                                          "mse: pass --vae none"),
             # flags no sampler takes: said before the VAE, which may be a download of minutes
             (["--ckpt", files["latent"], "--vae", "stabilityai/not-cached", "--atol", 0, "--rtol", 0],
              "atol and rtol are both 0")]
    for argv, needle in cases:
        with pytest.raises(SystemExit):
            run(["ODE", *argv, "--out", tmp_path / "x.png", *FAST])
        err = one_line_error(capsys)
        assert needle in err and "cannot load the VAE" not in err, err
    with pytest.raises(SystemExit):  # and when the VAE is what fails, the advice is about sampling
        run(["ODE", "--ckpt", files["latent"], "--vae", "stabilityai/not-cached", "--out", tmp_path / "x.png", *FAST])
    err = one_line_error(capsys)
    assert "cannot load the VAE" in err and "--vae none for a model trained in pixel space" in err, err
    assert "latent cache" not in err


@pytest.mark.parametrize("argv,env,needle", [
    (["--attn-backend", "flash_attn"], None, "--attn-backend flash_attn: attention backend 'flash_attn' cannot run"),
    (["--attn-backend", "auto"], "bogus", "--attn-backend auto: SIT_FAST_SDPA_BACKEND=bogus: choose one of flash"),
])
def test_attention_that_cannot_run_is_one_line(files, tmp_path, capsys, monkeypatch, argv, env, needle):
    if env is not None:
        monkeypatch.setenv("SIT_FAST_SDPA_BACKEND", env)
    with pytest.raises(SystemExit):
        run(["ODE", "--ckpt", files["pixel"], "--vae", "none", "--out", tmp_path / "g.png", "--fused-kernels", "off",
             *argv])
    err = one_line_error(capsys)
    assert err.startswith(f"error: {needle}"), err
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("compiled", [False, True], ids=["", "last-batch-filled"])
def test_likelihood_bits_per_dim_against_a_closed_form_density(tmp_path, compiled):
    """run_likelihood with the exact velocity of a Gaussian (test_transport's closed form): the flow is
    exact, so log p(x) = log N(x; MU, STD^2) and bpd = -log p / (D ln 2), + 7 for dequantised 8-bit
    pixels (the 1/128 Jacobian). As under --compile, the short last batch (2 of 4) filled with copies
    of its items: the adaptive solver's steps, taken for the whole batch, give them the same bpd."""
    import types

    from sit_fast.distributed import DistInfo
    from sit_fast.transport import Sampler, create_transport
    from tests.test_transport import MU, STD, closed_form_model

    velocity = closed_form_model("Linear", "velocity")
    images = np.random.default_rng(0).integers(0, 256, (6, 1, 1, 2), dtype=np.uint8)  # N x H x W x C, C = 2
    np.savez(tmp_path / "pixels.npz", arr_0=images)
    setup = types.SimpleNamespace(
        args=types.SimpleNamespace(data=str(tmp_path / "pixels.npz"), dataset=None, seed=0, batch_size=4,
                                   class_labels=None, sampling_method="dopri5", out=None, compile=compiled,
                                   cuda_graphs=False),
        image_size=1, in_channels=2, codec=None, latent_shape=(2, 1, 1), num_classes=NUM_CLASSES, device="cpu",
        dist=DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_main=True),
        forwards=types.SimpleNamespace(conditional=lambda x, t, y: velocity(x.flatten(1), t).view_as(x)),
        sample_fn=Sampler(create_transport("Linear", "velocity")).sample_ode_likelihood(
            exact_divergence=True, atol=1e-9, rtol=1e-9))
    data, offset, _ = sample.load_data(setup, setup.args.data)
    x = data[:]  # the dequantised pixels run_likelihood reads
    assert offset == 7.0
    log_density = torch.distributions.Normal(MU.double(), STD.double()).log_prob(x.flatten(1).double()).sum(1)
    expected = (-log_density / (2 * math.log(2))).numpy()
    np.testing.assert_allclose(sample.run_likelihood(setup), expected + 7, rtol=1e-4)
    torch.save(x, tmp_path / "x.pt")  # the same values as float model inputs: continuous bpd, no offset
    setup.args.data = str(tmp_path / "x.pt")
    np.testing.assert_allclose(sample.run_likelihood(setup), expected, rtol=1e-4)


def test_bad_kernel_launch_variable_is_one_line(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SIT_FAST_KERNEL_LAUNCH", "bwd_prefetch=2")
    with pytest.raises(SystemExit) as exit_info:
        run(["ODE", "--ckpt", files["pixel"], "--vae", "none", "--out", tmp_path / "g.png", *FAST,
             "--fused-kernels", "on"])
    assert exit_info.value.code == 2
    err = one_line_error(capsys)
    assert err.startswith("error: --fused-kernels on: SIT_FAST_KERNEL_LAUNCH") and "0 or 1" in err, err


def test_fused_kernels_auto_is_off_on_the_cpu(files, tmp_path, monkeypatch):
    """As in train.py: auto means CUDA; on the CPU the interpreter runs them only when asked (on)."""
    asked = []
    real = sample.build_model

    def build_model(request, device, loaded=None):
        asked.append(request.fused_kernels)
        return real(request, device, loaded)

    monkeypatch.setattr(sample, "build_model", build_model)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for choice in ("auto", "off"):
        run(["ODE", "--ckpt", files["pixel"], "--vae", "none", "--out", tmp_path / "g.png", "--attn-backend", "math",
             "--num-sampling-steps", "2", "--class-labels", "1", "--fused-kernels", choice])
    assert asked == [False, False]


@pytest.fixture
def restore_matmul_precision():
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    yield
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cudnn.allow_tf32 = saved[1]


def test_precision_settings_mix_with_trainings_in_one_process(restore_matmul_precision):
    """Sampling after training in one process (the tests, a notebook) leaves a state inductor can read:
    set_float32_matmul_precision mixed with the legacy allow_tf32 flag makes the getter raise."""
    from sit_fast.training.loop import configure_matmul

    for train_precision, sample_precision, expected in [("bf16", "fp32", "highest"), ("fp32", "tf32", "high"),
                                                         ("tf32", "bf16", "highest")]:
        configure_matmul(train_precision)
        sample.set_matmul_precision(sample_precision)
        assert torch.get_float32_matmul_precision() == expected
        assert torch.backends.cudnn.allow_tf32 == (expected == "high")


def test_sampling_after_training_in_one_process_logs_to_stderr_not_the_runs_log(tmp_path, capsys):
    import logging

    from sit_fast.errors import log_warnings_on_stderr
    from sit_fast.training.loop import open_log_file, setup_logging as setup_training_logging

    setup_training_logging(True)
    open_log_file(str(tmp_path))
    log_warnings_on_stderr(True)
    logging.getLogger("sit_fast").warning("a sampling warning")
    with open(tmp_path / "log.txt") as f:
        assert f.read() == ""
    assert capsys.readouterr().err == "warning: a sampling warning\n"


def test_warnings_on_stderr_are_one_line_each_and_from_rank_0_only(capsys):
    import logging

    from sit_fast.errors import log_warnings_on_stderr

    logger = logging.getLogger("sit_fast")
    saved = logger.handlers[:], logger.level, logger.propagate
    try:
        log_warnings_on_stderr(True)
        logger.warning("a warning\n  that a library wrapped")
        assert capsys.readouterr().err == "warning: a warning that a library wrapped\n"
        log_warnings_on_stderr(False)  # other ranks: errors only, not rank 0's warnings again
        logger.warning("said by rank 0")
        logger.error("a rank's own failure")
        assert capsys.readouterr().err == "error: a rank's own failure\n"
    finally:  # the logger as other tests left it (caplog needs records to propagate)
        logger.handlers[:], logger.level, logger.propagate = saved


@pytest.mark.parametrize("mode,flag,meant", [("ODE", "--cfg-scal", "--cfg-scale"), ("ODE", "--bogus", None),
                                            ("SDE", "--sampling-steps", "--num-sampling-steps"),
                                            ("SDE", "--diffusion-forms=linear", "--diffusion-form"),
                                            # shortened, as upstream's argparse took them: the flags they begin
                                            ("SDE", "--num-sampl", "--num-sampling-steps"),
                                            ("SDE", "--last-step-s", "--last-step-size"),
                                            ("ODE", "--sampling", "--sampling-method")])
def test_mistyped_flag_is_refused(mode, flag, meant, capsys):
    """One line naming the flag, the mode's flags it may mean (the ones it begins, else the closest in
    spelling, if one is close), and the help to see."""
    with pytest.raises(SystemExit) as exit_info:
        run([mode, flag, "2"])
    assert exit_info.value.code == 2
    err = one_line_error(capsys)  # not argparse's usage block
    # the help that lists the flags is the mode's (sample.py --help lists ODE and SDE alone)
    hint = f"did you mean {meant}? " if meant else ""
    assert (err.startswith(f"error: unrecognized arguments: {flag} 2 ({hint}see ")
            and err.endswith(f" {mode} --help)")), err
    assert meant or "did you mean" not in err


@pytest.mark.parametrize("argv,names", [
    (["ODE", "--seed", "3", "--global-seed", "4"], "--seed and --global-seed"),
    (["SDE", "--per-proc-batch-size=2", "--batch-size", "2"], "--per-proc-batch-size and --batch-size"),
])
def test_a_flag_under_two_of_its_names_is_refused(argv, names, capsys):
    """Which of two names' values was meant is unclear: one line naming both (one name given twice is
    argparse's last-wins override, and a switch's --no- form is left to it too)."""
    with pytest.raises(SystemExit) as exit_info:
        run(argv)
    assert exit_info.value.code == 2
    err = one_line_error(capsys)
    assert err.startswith(f"error: {names} are two names of one flag: give it once (see ")
    assert err.endswith(f" {argv[0]} --help)"), err
    args = sample.build_parser().parse_args(["ODE", "--seed", "3", "--seed", "4", "--tf32", "--no-tf32"])
    assert args.seed == 4 and args.tf32 is False


@pytest.mark.parametrize("flag", ["--ckpt", "--vae", "--out", "--sample-dir", "--data"])
def test_an_empty_path_is_refused_not_read_as_the_flag_not_given(flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(["ODE", flag, ""])
    assert exit_info.value.code == 2
    assert one_line_error(capsys).startswith(f"error: argument {flag}: must be a path or a name, got an empty string")


def test_a_path_given_with_a_leading_tilde_is_in_the_home_folder(files, tmp_path, monkeypatch):
    """`--sample-dir '~/samples'` (quoted, or `--out=~/x`: the shell leaves the ~) means the home folder's
    samples/, as the shell would have it, not a folder named ~ in the working folder; so for every path
    flag of sample.py, train.py, python -m sit_fast.latent_cache, sit_fast.export, sit_fast.demo and the
    benchmarks."""
    import sit_fast.demo
    import sit_fast.export
    import sit_fast.latent_cache
    import sit_fast.training.args

    home = tmp_path / "home"
    home.mkdir()
    (tmp_path / "work").mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path / "work")
    shutil.copy(files["pixel"], home / "pixel.pt")
    run(["ODE", "--ckpt", "~/pixel.pt", "--vae", "none", "--sampling-method", "euler", "--num-sampling-steps", 1,
         "--batch-size", 1, "--num-fid-samples", 1, "--sample-dir", "~/samples", *FAST])
    assert sorted(os.listdir(home / "samples")) == [".lock", "000000.png", "settings.json"]
    assert os.path.isfile(home / "samples.npz") and os.listdir(tmp_path / "work") == []
    parsers = {"sample.py": (sample.build_parser(), ["ODE"], ["--ckpt", "--vae", "--out", "--sample-dir", "--data"]),
               "train.py": (sit_fast.training.args.build_parser(), [],
                            ["--data-path", "--latent-cache", "--vae", "--ckpt", "--results-dir", "--exp-dir",
                             "--resume"]),
               "latent_cache": (sit_fast.latent_cache.build_parser(), ["--data-path", "x", "--out", "x"],
                                ["--data-path", "--out", "--vae"]),
               "export": (sit_fast.export.build_parser(), ["x"], ["--out"]),
               "demo": (sit_fast.demo.build_parser(), [], ["--out"])}
    for name, (parser, required, flags) in parsers.items():
        for flag in flags:
            args = parser.parse_args([*required, flag, "~/a/b"])
            assert getattr(args, flag[2:].replace("-", "_")) == str(home / "a" / "b"), (name, flag)
    assert sit_fast.export.build_parser().parse_args(["~/c.pt"]).ckpt == str(home / "c.pt")
    from benchmarks.__main__ import parse_args as benchmark_args
    from benchmarks.roofline import main as roofline

    assert benchmark_args(["kernels", "--out", "~/a/b"]).out == str(home / "a" / "b")
    with pytest.raises(FileNotFoundError) as missing:
        roofline(["--results", "~/results.json"])
    assert missing.value.filename == str(home / "results.json")
    # a ~ elsewhere in a path, and names that are no paths, are as given
    args = sample.build_parser().parse_args(["ODE", "--sample-dir", "a/~b", "--vae", "ema"])
    assert args.sample_dir == "a/~b" and args.vae == "ema"


def test_flag_meant_lists_the_flags_a_shortened_one_begins():
    from sit_fast.argtypes import flag_meant

    flags = ["--cfg-scale", "--cfg-channels", "--cfg-interval", "--num-classes", "--num-fid-samples",
             "--num-sampling-steps", "--no-tf32", "--seed"]
    assert flag_meant("--cfg", flags) == ["--cfg-scale", "--cfg-channels", "--cfg-interval"]
    assert flag_meant("--n", flags) == ["--num-classes", "--num-fid-samples", "--num-sampling-steps", "..."]
    assert flag_meant("--num-sampl", flags) == ["--num-sampling-steps"]  # not --num-fid-samples, closer in spelling
    assert flag_meant("--seeed", flags) == ["--seed"]  # a typo: the closest
    assert flag_meant("--bogus", flags) == []


@pytest.mark.parametrize("module,argv", [("sample", ["ODE", "--help"]), ("sit_fast.export", ["--help"]),
                                         ("sit_fast.latent_cache", ["--help"]), ("sit_fast.demo", ["--help"]),
                                         ("benchmarks.roofline", ["--help"]), ("benchmarks.__main__", ["--help"])])
def test_help_works_without_docstrings(module, argv, monkeypatch, capsys):
    """python -OO drops docstrings (a module's __doc__ is None): the command lines whose description is a
    paragraph of theirs still parse, with no description."""
    import importlib

    mod = importlib.import_module(module)
    monkeypatch.setattr(mod, "__doc__", None)
    entry = {"benchmarks.roofline": "main", "benchmarks.__main__": "parse_args"}.get(module)
    parse = getattr(mod, entry) if entry else mod.build_parser().parse_args
    with pytest.raises(SystemExit) as ended:
        parse(argv)
    assert ended.value.code == 0 and "--help" in capsys.readouterr().out


@pytest.mark.parametrize("module,paragraph", [("sample", 0), ("sit_fast.export", 0), ("sit_fast.latent_cache", 0),
                                              ("sit_fast.demo", 0), ("benchmarks.roofline", 0),
                                              ("benchmarks.__main__", 1)])
def test_help_describes_the_command_with_a_paragraph_of_its_docstring(module, paragraph, capsys, monkeypatch):
    """With docstrings, --help's description is the docstring's first paragraph (python -m benchmarks's
    second: its first is the usage)."""
    import importlib

    # argparse wraps to the terminal's width, and breaks a line after a hyphen (scikit-learn, time-box), which
    # joining the words again does not undo: a width that wraps nothing, whatever the terminal
    monkeypatch.setenv("COLUMNS", "100000")
    mod = importlib.import_module(module)
    entry = {"benchmarks.roofline": "main", "benchmarks.__main__": "parse_args"}.get(module)
    parse = getattr(mod, entry) if entry else mod.build_parser().parse_args
    with pytest.raises(SystemExit) as ended:
        parse(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    described = mod.__doc__.split("\n\n")
    assert ended.value.code == 0 and " ".join(described[paragraph].split()) in out
    assert not [other for i, other in enumerate(described) if i != paragraph and " ".join(other.split()) in out]


@pytest.mark.parametrize("kind,value", [("positive_float", "inf"), ("finite_float", "inf"), ("finite_float", "-inf"),
                                        ("nonnegative_float", "inf"), ("fraction", "-0.1"), ("fraction", "1.01"),
                                        ("positive_int", "0"), ("nonnegative_int", "-1"), ("end_margin", "-0.1"),
                                        ("fraction_below_one", "-0.1"), ("random_seed", str(2**63)),
                                        ("random_seed", str(-2**63)), ("integer", str(2**63)),
                                        ("integer", str(-2**63 - 1)), ("positive_int", str(2**63)),
                                        ("nonnegative_int", str(2**70))])
def test_argument_types_refuse_infinity_and_values_past_their_ends(kind, value):
    from sit_fast import argtypes

    with pytest.raises(argparse.ArgumentTypeError, match=f", got {value}$") as error:
        getattr(argtypes, kind)(value)
    if kind in ("positive_int", "nonnegative_int"):  # the end passed, not int64's whole range
        below = {"positive_int": "a positive integer", "nonnegative_int": "0 or more"}[kind]
        assert str(error.value) == f"must be {below if int(value) < 2**63 else 'at most 2**63 - 1'}, got {value}"


def test_the_int64_refusals_name_their_own_range():
    """A seed's range leaves out -2**63 (torch's seed modulo 2**64): its refusal of 2**63 says so, not int64's."""
    from sit_fast import argtypes

    for convert, low in ((argtypes.random_seed, "-(2**63 - 1)"), (argtypes.integer, "-2**63")):
        with pytest.raises(argparse.ArgumentTypeError) as refused:
            convert(str(2**63))
        assert str(refused.value) == f"must be an integer between {low} and 2**63 - 1, got {2**63}", refused.value


def test_argument_types_take_the_ends_of_their_ranges_and_none_in_any_case():
    from sit_fast import argtypes

    ends = [(argtypes.fraction, "0"), (argtypes.fraction, "1"), (argtypes.fraction_below_one, "0"),
            (argtypes.end_margin, "0"), (argtypes.nonnegative_float, "0"), (argtypes.nonnegative_int, "0"),
            (argtypes.positive_int, "1"), (argtypes.finite_float, "-1e300"), (argtypes.random_seed, str(2**63 - 1)),
            (argtypes.random_seed, str(1 - 2**63)), (argtypes.integer, str(-2**63)),
            (argtypes.positive_int, str(2**63 - 1))]
    assert [convert(value) for convert, value in ends] == [0, 1, 0, 0, 0, 0, 1, -1e300, 2**63 - 1, 1 - 2**63, -2**63,
                                                           2**63 - 1]
    unset = argtypes.or_none(argtypes.positive_int)
    assert [unset(value) for value in ("none", "None", "NONE", "3")] == [None, None, None, 3]


def test_minus_zero_is_zero_in_every_number_flag():
    """--cfg-scale -0 named its FID folder cfg--0.0, another than --cfg-scale 0's: -0 reads as 0."""
    from sit_fast import argtypes

    for convert in (argtypes.finite_float, argtypes.nonnegative_float, argtypes.end_margin, argtypes.fraction,
                    argtypes.fraction_below_one):
        assert math.copysign(1.0, convert("-0")) == 1.0 and math.copysign(1.0, convert("-0.0e5")) == 1.0, convert
    parser = sample.build_parser(sample.SAMPLE_DDP_DEFAULTS, "sample_ddp.py")
    names = []
    for scale, size in (("-0", "-0"), ("0", "0")):
        args = parser.parse_args(["SDE", "--cfg-scale", scale, "--last-step", "None", "--last-step-size", size])
        args.prog = "sample_ddp.py"
        names.append(sample.run_folder_name(sample.resolve_args(args), "SiT-XL/2"))
    assert names[0] == names[1] == "SiT-XL-2-pretrained-cfg-0.0-32-SDE-250-Euler-sigma-None-0.0", names


def test_a_device_flag_takes_the_devices_this_machine_has(capsys):
    """cpu, cuda and cuda:N of a GPU that is there; any other name, or a GPU that is not, in one line
    (python -m sit_fast.parity --device gpu was a traceback)."""
    from sit_fast import argtypes, parity
    from sit_fast.errors import cli_entry

    assert argtypes.torch_device("cpu") == "cpu"
    for value in ("gpu", "mps", "cuda:x"):
        with pytest.raises(argparse.ArgumentTypeError, match=rf"^must be cpu, cuda or cuda:N, got '{value}'$"):
            argtypes.torch_device(value)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    absent = f"cuda:{count}" if count else "cuda"
    with pytest.raises(argparse.ArgumentTypeError, match=rf"^{absent}: this machine has "):
        argtypes.torch_device(absent)
    if count:
        assert argtypes.torch_device(f"cuda:{count - 1}") == f"cuda:{count - 1}"
    with pytest.raises(SystemExit) as exit_info:
        cli_entry(parity.main)(["--device", "gpu"])
    assert exit_info.value.code == 2
    assert one_line_error(capsys).startswith("error: argument --device: must be cpu, cuda or cuda:N, got 'gpu'")


def test_default_workers_are_four_or_the_usable_cpus_if_fewer(monkeypatch):
    from sit_fast.argtypes import default_workers

    for cpus, workers in ((1, 1), (2, 2), (16, 4)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, cpus=cpus: set(range(cpus)), raising=False)
        assert default_workers() == workers, cpus
    assert default_workers(most=8) == 8


@pytest.mark.parametrize("mode,flag,other", [("SDE", "--atol", "ODE"), ("SDE", "--likelihood", "ODE"),
                                             ("ODE", "--diffusion-form=sigma", "SDE")])
def test_a_flag_of_the_other_sampler_is_named_so(mode, flag, other, capsys):
    """Upstream ignored unknown flags, so a sweep passing an ODE flag to SDE ran; here it is refused
    saying whose flag it is."""
    with pytest.raises(SystemExit) as exit_info:
        run([mode, flag])
    assert exit_info.value.code == 2
    prog = sample.build_parser().prog
    assert one_line_error(capsys) == (f"error: {flag.split('=')[0]} is a flag of {prog} {other}, not of {prog} {mode}: "
                                      f"drop it, or run {prog} {other}")


def test_the_sampler_comes_first_in_either_case(capsys):
    """Flags before the sampler are refused saying where it goes (not as an invalid sampler named
    after the flag's value), in one line; `ode` and `sde` are taken for ODE and SDE."""
    prog = sample.build_parser().prog  # sample.py as a script; the runner's name here
    with pytest.raises(SystemExit) as exit_info:
        run(["--ckpt", "model.pt", "--cfg-scale", "4"])
    assert exit_info.value.code == 2
    assert one_line_error(capsys) == (f"error: the sampler comes first: {prog} ODE|SDE [flags], e.g. {prog} ODE "
                                      f"--ckpt model.pt --cfg-scale 4 (see {prog} --help)")
    with pytest.raises(SystemExit):  # the sampler given after a flag: the example puts that one first
        run(["--ckpt", "model.pt", "sde", "--num-sampling-steps", "10"])
    assert one_line_error(capsys) == (f"error: the sampler comes first: {prog} ODE|SDE [flags], e.g. {prog} SDE "
                                      f"--ckpt model.pt --num-sampling-steps 10 (see {prog} --help)")
    with pytest.raises(SystemExit):  # a flag's value spelled like a sampler is a value
        run(["--sample-dir", "sde", "ODE", "--cfg-scale", "4"])
    assert one_line_error(capsys) == (f"error: the sampler comes first: {prog} ODE|SDE [flags], e.g. {prog} ODE "
                                      f"--sample-dir sde --cfg-scale 4 (see {prog} --help)")
    # flags that take no value, a negative value, and flags of several values are stepped over as such
    for argv, example in ((["--use-raw", "SDE", "--ckpt", "x.pt"], "SDE --use-raw --ckpt x.pt"),
                          (["--cfg-scale", "-1", "sde"], "SDE --cfg-scale -1"),
                          (["--cfg-interval", "0.1", "0.9", "SDE", "--tf32"], "SDE --cfg-interval 0.1 0.9 --tf32"),
                          (["--class-labels", "1", "-2", "SDE"], "SDE --class-labels 1 -2"),
                          (["--likelihood", "--data=ode", "--cfg-scale=2", "ode"],
                           "ODE --likelihood --data=ode --cfg-scale=2"),
                          (["--bogus", "sde"], "SDE --bogus")):
        with pytest.raises(SystemExit):
            run(argv)
        assert one_line_error(capsys) == (f"error: the sampler comes first: {prog} ODE|SDE [flags], e.g. {prog} "
                                          f"{example} (see {prog} --help)")
        if "--bogus" not in argv:  # the example parses
            sample.build_parser().parse_args(example.split())
    for mode in ("ode", "sde"):
        with pytest.raises(SystemExit):
            run([mode, "--bogus"])
        assert one_line_error(capsys).endswith(f" {mode.upper()} --help)")  # parsed as that sampler
    with pytest.raises(SystemExit):
        run([])
    assert one_line_error(capsys) == f"error: the following arguments are required: {{ODE,SDE}} (see {prog} --help)"


@pytest.mark.parametrize("argv,needle", [
    (["ODE", "--atol", "-1"], "argument --atol: must be 0 or a positive number, got -1"),
    (["ODE", "--rtol", "-0.1"], "argument --rtol: must be 0 or a positive number, got -0.1"),
    (["SDE", "--last-step-size", "1"], "argument --last-step-size: must be in [0, 1), got 1"),
    (["SDE", "--diffusion-norm", "-0.5"], "argument --diffusion-norm: must be 0 or a positive number"),
    (["ODE", "--per-proc-batch-size", "0"], "argument --batch-size/--per-proc-batch-size: must be a positive integer"),
    (["ODE", "--num-fid-samples", "0"], "argument --num-fid-samples: must be a positive integer, got 0"),
    (["ODE", "--image-size", "-8"], "argument --image-size: must be a positive integer, got -8"),
    (["ODE", "--cfg-scale", "nan"], "argument --cfg-scale: must be a finite number, got nan"),
    (["ODE", "--cfg-scale", "abc"], "argument --cfg-scale: must be a number, got 'abc'"),
    (["SDE", "--num-sampling-steps", "2.5"], "argument --num-sampling-steps: must be an integer, got '2.5'"),
])
def test_out_of_range_values_are_refused_naming_the_flag(argv, needle, capsys):
    """Refused while parsing, before any checkpoint is read: the flag as typed and the range."""
    with pytest.raises(SystemExit) as exit_info:
        run(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert needle in err, err


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_asked_before_the_sampler_is_shown(flag, capsys):
    """`sample.py --help` (no sampler yet) prints the help and exits 0, not the sampler-comes-first error."""
    with pytest.raises(SystemExit) as exit_info:
        run([flag])
    assert exit_info.value.code == 0
    captured = capsys.readouterr()
    assert "{ODE,SDE}" in captured.out and "comes first" not in captured.out + captured.err, captured


def test_offline_without_ckpt_says_how_to_pass_one(monkeypatch, tmp_path, capsys):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    monkeypatch.setenv("SIT_FAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run(["ODE"])
    assert exit_info.value.code == 2
    err = one_line_error(capsys)
    assert "SiT-XL-2-256x256.pt" in err and "--ckpt PATH" in err


def test_without_ckpt_another_model_or_image_size_than_the_releases_asks_for_one(monkeypatch):
    """A run without --ckpt samples upstream's release (SiT-XL/2, 256x256): --model and --image-size may
    name it, and anything else is refused, naming what was asked for."""
    import types

    from sit_fast import sampling
    from sit_fast.errors import UserError

    monkeypatch.setattr(sampling, "pretrained_checkpoint", lambda name: f"cache/{name}")
    for model, size in ((None, None), ("SiT-XL/2", 256)):
        args = types.SimpleNamespace(model=model, image_size=size)
        assert sampling.pretrained_checkpoint_for(args) == "cache/SiT-XL-2-256x256.pt"
    for model, size, asked in (("SiT-B/2", None, "--model SiT-B/2"), (None, 512, "--image-size 512"),
                               ("SiT-B/2", 512, "--model SiT-B/2 and --image-size 512")):
        with pytest.raises(UserError) as info:
            sampling.pretrained_checkpoint_for(types.SimpleNamespace(model=model, image_size=size))
        assert str(info.value) == (f"only SiT-XL/2 at 256x256 is released, but {asked} was asked for: pass your "
                                   f"checkpoint with --ckpt PATH")


def test_ckpt_names_a_release_as_upstream(files, monkeypatch, tmp_path, capsys):
    """--ckpt SiT-XL-2-256x256.pt, upstream's way of asking for the release: found in
    ./pretrained_models (where upstream downloads it), else downloaded; offline, the download's message,
    not "not found". A file of that name in the working folder is read as a path."""
    import shutil

    fetched = []

    def offline(*args, **kwargs):
        fetched.append(args[0])
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    monkeypatch.setenv("SIT_FAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    argv = ["ODE", "--ckpt", "SiT-XL-2-256x256.pt", "--vae", files["vae"], "--num-sampling-steps", 2, *FAST]
    with pytest.raises(SystemExit) as exit_info:
        run(argv + ["--out", tmp_path / "none.png"])
    assert exit_info.value.code == 2
    err = one_line_error(capsys)
    assert "cannot download the released checkpoint SiT-XL-2-256x256.pt" in err and "--ckpt PATH" in err, err
    # the two places it is read from: upstream's folder, and the cache
    assert (f"copy it to pretrained_models/SiT-XL-2-256x256.pt or {tmp_path / 'cache' / 'SiT-XL-2-256x256.pt'}, "
            f"or pass") in err, err
    assert len(fetched) == 1
    (tmp_path / "pretrained_models").mkdir()
    shutil.copy(files["latent"], tmp_path / "pretrained_models" / "SiT-XL-2-256x256.pt")
    run(argv + ["--out", tmp_path / "release.png"])
    run(["ODE", "--ckpt", files["latent"], "--vae", files["vae"], "--num-sampling-steps", 2, *FAST,
         "--out", tmp_path / "path.png"])
    np.testing.assert_array_equal(read_png(tmp_path / "release.png"), read_png(tmp_path / "path.png"))
    shutil.copy(files["pixel"], tmp_path / "SiT-XL-2-256x256.pt")  # a file of that name here wins
    run(["ODE", "--ckpt", "SiT-XL-2-256x256.pt", "--vae", "none", "--in-channels", 3, "--num-sampling-steps", 2,
         *FAST, "--out", tmp_path / "local.png"])
    assert read_png(tmp_path / "local.png").shape[-1] == 3 and len(fetched) == 1


def test_a_release_path_is_found_again_on_a_rank_whose_node_lacks_rank_0s(monkeypatch, tmp_path):
    """Rank 0's path is taken where it exists; a rank on a node with its own cache looks for (or
    downloads) the release itself."""
    import sit_fast.distributed as distributed

    calls = []

    def fetch():
        calls.append(1)
        return str(tmp_path / "mine.pt")

    shared = tmp_path / "shared.pt"
    shared.write_bytes(b"")
    other_rank = distributed.DistInfo(rank=1, world_size=2, local_rank=0, device=torch.device("cpu"), is_main=False)
    monkeypatch.setattr(distributed, "on_main", lambda fn, info: str(shared))
    assert distributed.local_path_on_main_first(fetch, other_rank) == str(shared) and not calls
    monkeypatch.setattr(distributed, "on_main", lambda fn, info: str(tmp_path / "on_node_0.pt"))
    assert distributed.local_path_on_main_first(fetch, other_rank) == str(tmp_path / "mine.pt") and calls == [1]


def test_sample_ddp_defaults():
    args = sample.resolve_args(sample.build_parser(sample.SAMPLE_DDP_DEFAULTS).parse_args(["SDE"]))
    assert (args.job, args.num_fid_samples, args.vae, args.cfg_scale, args.run_folder) == (
        "fid", 50_000, "ema", 1.0, True)
    args = sample.resolve_args(sample.build_parser().parse_args(["ODE", "--global-seed", "3", "--no-tf32"]))
    assert (args.job, args.vae, args.cfg_scale, args.seed, args.precision, args.run_folder) == (
        "grid", "mse", 4.0, 3, "fp32", False)


#################################################################################
#                                  Guidance                                      #
#################################################################################

def test_guided_forward_equals_forward_with_cfg():
    model = random_sit(4, learn_sigma=True).eval()
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([1, 2, 3])
    # the conditional half first, then the null label: the label table's extra row
    assert ModelForwards(model, cfg_scale=2.5).label_pair(y).tolist() == [1, 2, 3] + [model.num_classes] * 3
    for channels in (3, "all"):
        forwards = ModelForwards(model, cfg_scale=2.5, cfg_channels=channels)
        expected = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), forwards.label_pair(y), 2.5,
                                          cfg_channels=channels)[:3]
        torch.testing.assert_close(forwards.guided(x, t, forwards.label_pair(y)), expected, rtol=0, atol=0)
    torch.testing.assert_close(forwards.conditional(x, t, y), model(x, t, y), rtol=0, atol=0)


@pytest.mark.parametrize("fused", [False, True])
def test_bf16_weights_give_the_same_samples(fused):
    """cast_weights (matmul weights stored in bf16) is exactly bf16 autocast's own per-call cast."""
    import copy

    model = random_sit(4, learn_sigma=True, depth=1 if fused else None).eval().requires_grad_(False)
    model.fused_kernels = fused
    cast = copy.deepcopy(model)
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))  # fresh inputs each run
    plain = ModelForwards(model, cfg_scale=2.5, autocast_dtype=torch.bfloat16)
    fast = ModelForwards(cast, cfg_scale=2.5, autocast_dtype=torch.bfloat16, cast_weights=True)
    weights = [m.weight for m in cast.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert weights and all(w.dtype == torch.bfloat16 for w in weights)
    # without cast_weights, autocast alone leaves the model's weights as they were
    assert all(m.weight.dtype == torch.float32 for m in model.modules() if isinstance(m, (torch.nn.Linear,
                                                                                        torch.nn.Conv2d)))
    assert cast.y_embedder.embedding_table.weight.dtype == torch.float32  # not a matmul weight
    # The second call reuses the cached adaLN concatenation (once is enough with the interpreted kernels: slow)
    for _ in range(1 if fused else 2):
        x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([1, 2, 3])
        pair = plain.label_pair(y)
        torch.testing.assert_close(fast.guided(x, t, pair), plain.guided(x, t, pair), rtol=0, atol=0)
        torch.testing.assert_close(fast.conditional(x, t, y), plain.conditional(x, t, y), rtol=0, atol=0)


def test_forwards_return_fp32_under_bf16_autocast():
    """The samplers integrate in fp32 whatever the model's precision: both forwards' outputs are fp32."""
    model = random_sit(3, learn_sigma=False, depth=1).eval().requires_grad_(False)
    forwards = ModelForwards(model, cfg_scale=2.0, autocast_dtype=torch.bfloat16)
    x, t, y = torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([1, 2])
    with torch.inference_mode():
        assert forwards.conditional(x, t, y).dtype == torch.float32
        assert forwards.guided(x, t, forwards.label_pair(y)).dtype == torch.float32


def test_cuda_graphs_are_refused_off_cuda_in_one_line():
    """--cuda-graphs on a model on the CPU is a UserError naming the flag, and a graph forward given CPU
    tensors says it needs CUDA ones (rather than failing inside the CUDA runtime)."""
    from sit_fast.errors import UserError

    with pytest.raises(UserError, match=r"^--cuda-graphs needs a CUDA device$"):
        ModelForwards(random_sit(3, learn_sigma=False, depth=1).eval(), cuda_graphs=True)
    with pytest.raises(RuntimeError, match=r"^CUDAGraphForward needs CUDA tensors$"):
        CUDAGraphForward(lambda x: 2 * x)(torch.zeros(2))


def batch_sizes_of_calls(model, cfg_scale, cfg_interval, method="euler", steps=4, schedule=True):
    """Sample 2 images; return (batch size of each model forward, final samples).

    schedule=False decides the interval from t itself, as for adaptive solvers."""
    sizes = []
    hook = model.register_forward_pre_hook(lambda module, inputs: sizes.append(inputs[0].shape[0]))
    transport = create_transport()
    sample_fn = Sampler(transport).sample_ode(sampling_method=method, num_steps=steps)
    call_times = model_call_times("ODE", transport, sampling_method=method, num_steps=steps) if schedule else None
    denoiser = Denoiser(ModelForwards(model, cfg_scale=cfg_scale), cfg_scale=cfg_scale, cfg_interval=cfg_interval,
                        call_times=call_times)
    noise, _ = index_noise(0, range(2), (3, 8, 8), NUM_CLASSES)
    model_fn = denoiser.for_labels(torch.tensor([1, 2]))
    with torch.inference_mode():
        samples = sample_fn(noise, model_fn)[-1]
    model_fn.check_finished()
    hook.remove()
    return sizes, samples


def test_cfg_scale_one_does_not_double_the_batch():
    model = random_sit(3, learn_sigma=False).eval()
    assert batch_sizes_of_calls(model, 1.0, None)[0] == [2] * 4
    assert batch_sizes_of_calls(model, 1.0, None, method="heun")[0] == [2] * 8
    assert batch_sizes_of_calls(model, 4.0, None)[0] == [4] * 4
    assert batch_sizes_of_calls(model, 0.5, None)[0] == [4] * 4  # a scale below 1 guides too (towards unconditional)


def test_each_image_has_its_own_noise_and_label_whatever_its_batch():
    """index_noise: image i's noise and label come from (seed, i) alone: other images differ, and image 2
    alone is row 2 of images 0 to 3; class-balanced labels are i % classes."""
    noise, labels = index_noise(0, range(4), (3, 8, 8), 10)
    assert len({tuple(row.flatten()[:4].tolist()) for row in noise}) == 4
    alone, label = index_noise(0, [2], (3, 8, 8), 10)
    assert torch.equal(alone[0], noise[2]) and label[0] == labels[2]
    assert not torch.equal(index_noise(1, [2], (3, 8, 8), 10)[0][0], noise[2])  # another seed
    assert index_noise(0, range(12), (3, 8, 8), 10, class_balanced=True)[1].tolist() == [i % 10 for i in range(12)]


def test_derived_seeds_are_63_bit_for_any_integers_and_seed_each_images_noise():
    """derived_seed gives a non-negative 63-bit seed for any integers, negative ones too; image `index`
    of seed `seed` draws its noise first from a generator seeded with derived_seed(seed, index)."""
    from sit_fast.sampling import derived_seed

    seeds = [derived_seed(seed, index) for seed in (-1, 0, 1, 7) for index in range(16)]
    assert all(0 <= s < 2**63 for s in seeds) and len(set(seeds)) == len(seeds)
    generator = torch.Generator().manual_seed(derived_seed(3, 5))
    assert torch.equal(index_noise(3, [5], (3, 8, 8), 10)[0][0], torch.randn((3, 8, 8), generator=generator))


def upstream_fid_uint8(images: torch.Tensor) -> np.ndarray:
    """upstream sample_ddp.py's conversion of decoded samples, (N, C, H, W) -> (N, H, W, C) uint8."""
    return torch.clamp(127.5 * images + 128.0, 0, 255).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8).numpy()


def test_grey_images_are_repeated_to_rgb():
    grey = torch.rand(2, 1, 4, 4) * 2 - 1
    rgb = to_rgb_uint8(grey)
    assert rgb.shape == (2, 4, 4, 3) and rgb.dtype == np.uint8
    assert (rgb == rgb[..., :1]).all() and rgb.std() > 10
    assert np.array_equal(rgb[..., 0], upstream_fid_uint8(grey)[..., 0])
    colour = torch.rand(2, 3, 4, 4) * 2 - 1
    assert np.array_equal(to_rgb_uint8(colour), upstream_fid_uint8(colour))  # RGB as it is


def test_fid_samples_are_rounded_as_upstreams_sample_ddp_byte_for_byte():
    """Values within ulps of a half level, where 127.5 x + 128 (upstream's FID conversion) and
    (x + 1) 127.5 + 0.5 (the grids', torchvision's) round apart in fp32 (x = -0.6745098233222961:
    42 and 41), and out of range ones, come out as upstream's .npz has them."""
    levels = torch.arange(256, dtype=torch.float64)
    near = ((levels + 0.5) / 127.5 - 1).float()  # the half levels, then their neighbours a few ulps away
    x = torch.cat([near + k * torch.finfo(torch.float32).eps * near.abs().clamp(min=1e-3) for k in range(-4, 5)])
    x = torch.cat([x, torch.tensor([-0.6745098233222961, -1.5, 1.5, -1.0, 1.0, 0.0])]).reshape(1, 1, 1, -1)
    ours = to_rgb_uint8(x)
    assert np.array_equal(ours[..., 0], upstream_fid_uint8(x)[..., 0])
    assert ours[0, 0, -6:, 0].tolist() == [42, 0, 255, 0, 255, 128]
    assert (ours[..., 0] != to_uint8(x)[..., 0]).any()  # the grids' rounding differs there
    with pytest.raises(ValueError, match="rounding must be 'save_image' or 'sample_ddp', got 'nearest'"):
        to_uint8(x, rounding="nearest")


@pytest.mark.parametrize("n,nrow", [(1, 4), (3, 2), (3, 4), (5, 2), (8, 4), (8, 10)])
def test_grids_are_torchvision_s(n, nrow):
    """make_grid + to_uint8 against upstream's save_image(normalize=True, value_range=(-1, 1)): the same
    layout (at most n per row; one image unpadded), padding and pixels (within one level: the two round x = -1..1 by
    different float operations)."""
    from torchvision.utils import make_grid as torchvision_grid

    from sit_fast.images import make_grid

    images = torch.rand(n, 3, 5, 7) * 2.2 - 1.1  # a little outside [-1, 1]: clamped by both
    theirs = torchvision_grid(images, nrow=nrow, normalize=True, value_range=(-1, 1))
    theirs = theirs.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to(torch.uint8).numpy()
    ours = make_grid(images, nrow=nrow)
    assert ours.shape == theirs.shape
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1


def test_cfg_interval_doubles_only_inside_and_full_interval_equals_plain_guidance(files, tmp_path):
    model = random_sit(3, learn_sigma=False).eval()
    sizes, _ = batch_sizes_of_calls(model, 4.0, (0.5, 1.0))  # euler times 0, .25, .5, .75
    assert sizes == [2, 2, 4, 4]
    for schedule in (True, False):  # (0, .25) (.25, .5) (.5, .75) (.75, 1)
        sizes, _ = batch_sizes_of_calls(model, 4.0, (0.3, 0.6), method="heun", schedule=schedule)
        assert sizes == [2, 2, 2, 4, 4, 2, 2, 2]
    _, plain = batch_sizes_of_calls(model, 4.0, None)
    _, full = batch_sizes_of_calls(model, 4.0, (0.0, 1.0))
    torch.testing.assert_close(full, plain, rtol=0, atol=0)

    common = ["SDE", "--ckpt", files["pixel"], "--vae", "none", "--num-sampling-steps", 4, *FAST]
    run(common + ["--out", tmp_path / "plain.png"])
    run(common + ["--out", tmp_path / "interval.png", "--cfg-interval", 0, 1])
    np.testing.assert_array_equal(read_png(tmp_path / "plain.png"), read_png(tmp_path / "interval.png"))


@pytest.mark.parametrize("kind,kwargs", [
    ("ODE", dict(sampling_method="euler", num_steps=5)),
    ("ODE", dict(sampling_method="heun", num_steps=3)),
    ("ODE", dict(sampling_method="heun", num_steps=3, reverse=True)),
    ("SDE", dict(sampling_method="Euler", num_steps=5, last_step="Mean", last_step_size=0.04)),
    ("SDE", dict(sampling_method="Heun", num_steps=4, last_step=None)),
    ("SDE", dict(sampling_method="Euler", num_steps=3, last_step="Tweedie", diffusion_form="sigma")),
])
def test_model_call_times_are_the_samplers_times(kind, kwargs):
    """The host-side schedule behind --cfg-interval equals the t the transport's samplers pass."""
    transport = create_transport()
    sampler = Sampler(transport)
    if kind == "ODE":
        sample_fn = sampler.sample_ode(**kwargs)
    else:
        sample_fn = sampler.sample_sde(**kwargs)
    seen = []

    def model_fn(x, t):
        seen.append(t.tolist())
        return -x

    sample_fn(torch.randn(2, 3, 4, 4), model_fn)
    expected = model_call_times(kind, transport, **kwargs)
    assert [times[0] for times in seen] == expected
    assert all(len(set(times)) == 1 for times in seen)
    assert model_call_times("ODE", transport, sampling_method="dopri5", num_steps=5) is None


@pytest.mark.parametrize("path_type", ["VP", "GVP"])
def test_model_call_times_of_a_reverse_ode_on_other_paths(path_type):
    """--reverse runs the sampling interval backwards (t1 -> t0); on VP, where that interval is not
    symmetric, its reflection (1 - t0 -> 1 - t1) gives other times."""
    transport = create_transport(path_type, "velocity")
    seen = []

    def model_fn(x, t):
        seen.append(t[0].item())
        return -x

    Sampler(transport).sample_ode(sampling_method="heun", num_steps=3, reverse=True)(torch.randn(2, 3), model_fn)
    assert model_call_times("ODE", transport, sampling_method="heun", num_steps=3, reverse=True) == seen


#################################################################################
#                          FID job: torchrun, resume                             #
#################################################################################

def torchrun_run(script, argv, tmp_path, nproc=2):
    """`script` (sample.py, or one that patches it) under torchrun, its CompletedProcess; torchrun's log
    folder and error files go in tmp_path, not /tmp."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, TRITON_INTERPRET="0", TMPDIR=str(tmp_path))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(script), *map(str, argv)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)


def torchrun(argv, tmp_path, nproc=2):
    """sample.py under torchrun, to its end; its stdout."""
    result = torchrun_run(os.path.join(REPO, "sample.py"), argv, tmp_path, nproc)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_fid_job_two_processes_exact_count_and_resume(files, tmp_path, capsys):
    """7 images, batches of 2 on 2 processes (7 is not a multiple of 4); SDE: per-step noise too."""
    sample_dir = tmp_path / "samples"
    argv = ["SDE", "--ckpt", files["pixel"], "--vae", "none", "--num-sampling-steps", 3, "--cfg-scale", 2.0,
            "--num-fid-samples", 7, "--per-proc-batch-size", 2, "--sample-dir", sample_dir, *FAST]
    out = torchrun(argv, tmp_path)
    assert "sampling 7 on 2 process(es)" in out and " per process on average)" in out
    assert re.search(r"^sampled 7 images in [0-9.]+ s: [0-9.]+ images/s \(", out, re.M), out  # as a grid's line
    with np.load(f"{sample_dir}.npz") as archive:
        first = archive["arr_0"]
    assert first.shape == (7, 8, 8, 3) and first.dtype == np.uint8
    assert sorted(os.listdir(sample_dir)) == [".lock"] + [f"{i:06d}.png" for i in range(7)] + ["settings.json"]
    np.testing.assert_array_equal(read_png(sample_dir / "000004.png"), first[4])

    # A killed run: some PNGs missing (one chunk entirely, one partly), a torn temporary file, no .npz.
    for i in (2, 3, 5, 6):
        os.remove(sample_dir / f"{i:06d}.png")
    (sample_dir / "000005.png.tmp").write_bytes(b"torn")
    os.remove(f"{sample_dir}.npz")
    out = torchrun(argv, tmp_path)
    assert "3 of 7 images already in" in out, out
    assert "sampling 5 (1 of them present: a batch with a missing image is redone whole)" in out, out
    with np.load(f"{sample_dir}.npz") as archive:
        np.testing.assert_array_equal(archive["arr_0"], first)

    # One process, another folder: the same images (noise per index, chunks fixed by the batch size).
    single = tmp_path / "single"
    run([a if a != sample_dir else single for a in argv])
    with np.load(f"{single}.npz") as archive:
        np.testing.assert_array_equal(archive["arr_0"], first)

    # Resuming with settings that change the images is refused.
    capsys.readouterr()
    with pytest.raises(SystemExit):
        changed = list(argv)
        changed[argv.index("--cfg-scale") + 1] = 3.0
        run(changed)
    assert "other settings" in one_line_error(capsys)
    # A folder whose run stopped before its first image (out of memory, say) takes the new settings.
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    recorded = json.loads((sample_dir / "settings.json").read_text())
    (stopped / "settings.json").write_text(json.dumps({**recorded, "cfg_scale": 9.0}))
    run([a if a != sample_dir else stopped for a in argv])
    assert json.loads((stopped / "settings.json").read_text()) == recorded
    with np.load(f"{stopped}.npz") as archive:
        np.testing.assert_array_equal(archive["arr_0"], first)


def test_the_npz_is_streamed_in_the_layout_adms_evaluator_reads(tmp_path, capsys):
    """build_npz writes one image at a time: np.load and ADM's reader (the zip member arr_0.npy,
    its header, then batches of rows) get the stacked PNGs; a PNG of another size is named."""
    import zipfile

    from sit_fast.errors import UserError
    from sit_fast.sampling import build_npz, npz_array, png_path

    images = np.random.default_rng().integers(0, 256, (5, 6, 4, 3), dtype=np.uint8)  # H 6, W 4
    for i, image in enumerate(images):
        Image.fromarray(image).save(png_path(str(tmp_path), i))
    npz = tmp_path / "s.npz"
    assert build_npz(str(tmp_path), 5, str(npz), progress=False) == (5, 6, 4, 3)
    with np.load(npz) as archive:
        assert archive.files == ["arr_0"]
        np.testing.assert_array_equal(archive["arr_0"], images)
    mapped = npz_array(str(npz))  # as --likelihood --data reads it: behind the zip64 local header
    assert isinstance(mapped, np.memmap)
    np.testing.assert_array_equal(mapped, images)
    with zipfile.ZipFile(npz) as archive, archive.open("arr_0.npy") as member:  # as ADM's open_npz_array
        assert np.lib.format.read_magic(member) == (1, 0)
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
        assert (shape, fortran, dtype) == ((5, 6, 4, 3), False, np.uint8)
        row = 6 * 4 * 3
        batches = [np.frombuffer(member.read(2 * row), np.uint8) for _ in range(3)]
    np.testing.assert_array_equal(np.concatenate(batches).reshape(shape), images)
    Image.fromarray(images[3, :4]).save(png_path(str(tmp_path), 3))  # 4x4
    with pytest.raises(UserError) as error:
        build_npz(str(tmp_path), 5, str(npz), progress=False)
    assert str(error.value) == (f"{png_path(str(tmp_path), 3)} is 4x4, image 0 4x6: delete it, and the same "
                                f"command samples it again")
    with np.load(npz) as archive:  # the finished archive is kept
        np.testing.assert_array_equal(archive["arr_0"], images)
    assert sorted(os.listdir(tmp_path)) == [f"{i:06d}.png" for i in range(5)] + ["s.npz"]
    open(png_path(str(tmp_path), 2), "wb").close()  # emptied by a crash: a traceback on every rerun
    with pytest.raises(UserError, match=rf"^{re.escape(png_path(str(tmp_path), 2))} cannot be read \(.*\): "
                                        r"delete it, and the same command samples it again$"):
        build_npz(str(tmp_path), 5, str(npz), progress=False)
    os.remove(png_path(str(tmp_path), 2))  # written where this process does not see it
    (tmp_path / "settings.json").write_text("{}")
    with pytest.raises(UserError, match=rf"^{re.escape(png_path(str(tmp_path), 2))} is missing, which a process "
                                        r"of this job wrote: is the folder on a filesystem every process sees\?"):
        build_npz(str(tmp_path), 5, str(npz), progress=False)
    os.remove(tmp_path / "settings.json")  # the folder deleted while the job ran (its record too): a rerun is refused
    with pytest.raises(UserError, match=rf"^{re.escape(png_path(str(tmp_path), 2))} is missing, and so is "
                                        rf"{re.escape(str(tmp_path / 'settings.json'))}: the folder was deleted or "
                                        r"emptied while the job ran; delete it and run the command again$"):
        build_npz(str(tmp_path), 5, str(npz), progress=False)

    # Memory: a few images at a time, not the N x H x W x 3 array (np.stack of all would hold it)
    import tracemalloc

    many = np.random.default_rng().integers(0, 256, (200, 32, 32, 3), dtype=np.uint8)
    (tmp_path / "many").mkdir()
    for i, image in enumerate(many):
        Image.fromarray(image).save(png_path(str(tmp_path / "many"), i))
    tracemalloc.start()
    try:
        build_npz(str(tmp_path / "many"), 200, str(npz), progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < many.nbytes / 2, (peak, many.nbytes)
    with np.load(npz) as archive:
        np.testing.assert_array_equal(archive["arr_0"], many)


def test_a_png_damaged_past_its_header_is_named_with_how_to_resample_it(tmp_path):
    """A PNG whose header reads but whose second data chunk is garbage (PIL raises SyntaxError, no OSError,
    reading its pixels) is named in one line, as one emptied by a crash, and no .npz is written."""
    from sit_fast.errors import UserError
    from sit_fast.sampling import build_npz, png_path

    pixels = np.random.default_rng(0).integers(0, 256, (2, 256, 256, 3), dtype=np.uint8)
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(png_path(str(tmp_path), i))
    damaged = Path(png_path(str(tmp_path), 1))
    data = bytearray(damaged.read_bytes())
    second = data.index(b"IDAT", data.index(b"IDAT") + 4)  # PIL writes 64 KiB a chunk: a second one exists
    data[second: second + 4] = b"\x00\x01\x02\x03"
    damaged.write_bytes(bytes(data))
    with pytest.raises(UserError, match=rf"^{re.escape(str(damaged))} cannot be read \(.+\): delete it, and the "
                                        r"same command samples it again$"):
        build_npz(str(tmp_path), 2, str(tmp_path / "s.npz"), progress=False)
    assert not (tmp_path / "s.npz").exists()


def test_fid_job_class_balanced_grows_n(files, tmp_path, capsys):
    """Image i of the FID job is the grid's image of label i % classes (class-balanced) from the same
    seed: its noise, label and pixels. Growing N keeps the images sampled."""
    sample_dir = tmp_path / "s"
    argv = ["ODE", "--ckpt", files["pixel"], "--vae", "none", "--sampling-method", "euler",
            "--num-sampling-steps", 2, "--cfg-scale", 1.5, *FAST]
    fid = argv + ["--per-proc-batch-size", 3, "--sample-dir", sample_dir, "--class-balanced"]
    run(fid + ["--num-fid-samples", 4])
    out = capsys.readouterr().out
    assert "sampling 4 on 1 process(es), 2 batches of 3" in out and "per process" not in out, out
    with np.load(f"{sample_dir}.npz") as archive:
        four = archive["arr_0"]
    run(argv + ["--class-labels", 0, 1, 2, 3, "--out", tmp_path / "grid.png"])
    grid = read_png(tmp_path / "grid.png").astype(int)  # one row of 4 images of 8 x 8, 2 px apart
    cells = np.stack([grid[2:10, 2 + 10 * i: 10 + 10 * i] for i in range(4)])
    assert np.abs(cells - four).max() <= 1 and four.std() > 10
    argv = fid
    run(argv + ["--num-fid-samples", 5])  # index 4 shares chunk 1 with index 3: same batch as before
    assert "sampling 2 (1 of them present: a batch with a missing image is redone whole) on 1 process(es), 1 batch " \
           "of 3" in capsys.readouterr().out
    with np.load(f"{sample_dir}.npz") as archive:
        five = archive["arr_0"]
    assert five.shape == (5, 8, 8, 3)
    np.testing.assert_array_equal(five[:4], four)


def test_fid_job_interrupted_keeps_the_images_and_says_how_to_finish(files, tmp_path, capsys, monkeypatch, stop):
    """Ctrl-C or a stop signal in the FID job: the PNGs written stay, the message says to rerun, and the
    rerun samples the rest."""
    sample_dir = tmp_path / "s"
    argv = ["ODE", "--ckpt", files["pixel"], "--vae", "none", "--sampling-method", "euler", "--num-sampling-steps", 2,
            "--num-fid-samples", 5, "--per-proc-batch-size", 2, "--sample-dir", sample_dir, *FAST]
    real, calls = sample.Setup.sample, []

    def interrupted(self, *args):
        calls.append(1)
        if len(calls) == 2:
            stop()
        return real(self, *args)

    monkeypatch.setattr(sample.Setup, "sample", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        run(argv)
    assert exit_info.value.code == stop.status
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"{stop.words}; 2 of 5 images are written, and kept: run the same command " \
                                      f"again" in err, err
    assert sorted(os.listdir(sample_dir)) == [".lock", "000000.png", "000001.png", "settings.json"]
    monkeypatch.setattr(sample.Setup, "sample", real)
    run(argv)
    assert "2 of 5 images already in" in capsys.readouterr().out
    with np.load(f"{sample_dir}.npz") as archive:
        assert archive["arr_0"].shape == (5, 8, 8, 3)


def test_fid_job_stopped_while_it_writes_the_npz_says_the_images_are_kept(files, tmp_path, capsys, monkeypatch, stop):
    """A stop while the .npz of 50,000 images is being written (minutes), or while the processes wait
    for each other's shares: the same line as during sampling, naming what the rerun does."""
    sample_dir = tmp_path / "s"
    argv = ["ODE", "--ckpt", files["pixel"], "--vae", "none", "--sampling-method", "euler", "--num-sampling-steps", 2,
            "--num-fid-samples", 3, "--per-proc-batch-size", 2, "--sample-dir", sample_dir, *FAST]
    for name, doing in (("build_npz", f" while writing {sample_dir}.npz"), ("barrier", "")):
        real = getattr(sample, name)
        if name == "barrier":
            (sample_dir / "000002.png").unlink()  # sampled again, before the barrier

        def stopped(*args, real=real, **kwargs):
            stop()
            return real(*args, **kwargs)

        monkeypatch.setattr(sample, name, stopped)
        with pytest.raises(SystemExit) as exit_info:
            run(argv)
        monkeypatch.setattr(sample, name, real)
        assert exit_info.value.code == stop.status
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.endswith(
            f"{stop.words}{doing}; 3 of 3 images are written, and kept: run the same command again to write "
            f"{sample_dir}.npz\n"), err
        assert not os.path.exists(f"{sample_dir}.npz") and os.listdir(tmp_path) == ["s"]
    run(argv)
    assert "all 3 images already in" in capsys.readouterr().out
    with np.load(f"{sample_dir}.npz") as archive:
        assert archive["arr_0"].shape == (3, 8, 8, 3)


def as_rank_1_of_2(monkeypatch, local_rank: int = 1) -> None:
    """sample.py in this process as rank 1 of a two-process job on the CPU, its collectives answered
    as rank 0 would answer them."""
    from sit_fast.distributed import DistInfo

    monkeypatch.setattr(sample, "on_main", lambda fn, info: fn())
    monkeypatch.setattr(sample, "local_path_on_main_first", lambda fn, info: fn())
    monkeypatch.setattr(sample, "check_same_file", lambda *a, **k: None)
    monkeypatch.setattr(sample, "check_shared_path", lambda *a, **k: None)
    monkeypatch.setattr(sample, "init_distributed", lambda: DistInfo(
        rank=1, world_size=2, local_rank=local_rank, device=torch.device("cpu"), is_main=False))


# Each PNG's bytes are written, then 30 s pass before its rename ("writing"); "teardown" as the PNGs queued
# when the job was stopped are finished. The markers are written in one call each: the PNG writer's thread
# prints while the main thread may say its line (print's text and its newline are two writes).
SLOW_PNG_WRITES = """
import os, runpy, sys, time
from sit_fast import sampling
real_write, real_close = sampling.atomic_write, sampling.PNGWriter.close

def slow_write(path, write):
    def then_wait(f):
        write(f)
        f.flush()
        os.write(2, b"writing\\n")
        time.sleep(30)
    real_write(path, then_wait if path.endswith(".png") else write)

def close(self):
    os.write(2, b"teardown\\n")
    real_close(self)

sampling.atomic_write, sampling.PNGWriter.close = slow_write, close
script, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""


@pytest.mark.parametrize("script", ["sample.py", "sample_ddp.py"])
def test_a_second_ctrl_c_while_the_queued_pngs_are_finished_stops_at_once(script, files, tmp_path):
    """Ctrl-C, then Ctrl-C again while the PNGs queued are finished (seconds each at 512 px): the job ends
    at once, exit 130, with one line on what is kept and what is left unfinished, not after every queued
    write with the first stop's count; a PNG cut short stays under its temporary name, which the next
    run removes, and that run finishes the job."""
    sample_dir = tmp_path / "s"
    argv = ["ODE", "--ckpt", files["pixel"], "--vae", "none", "--sampling-method", "euler", "--num-sampling-steps", 2,
            "--num-fid-samples", 6, "--per-proc-batch-size", 2, "--sample-dir", sample_dir, "--no-run-folder", *FAST]
    status, err, after = signalled_child(SLOW_PNG_WRITES, [script, *argv],
                                         {"writing": signal.SIGINT, "teardown": signal.SIGINT})
    assert status == 130 and "Traceback" not in err, err
    # another PNG writer's thread may mark its write between the line and the exit
    said = [line for line in err.splitlines() if line not in ("writing", "")]
    assert said[-1] == (f"interrupted again, stopping at once: the images written are kept, any being written are "
                        f"left unfinished under temporary names (which the next run removes): run the same command "
                        f"again to sample the rest into {sample_dir} and write {sample_dir}.npz"), err
    assert after < 20, f"{after:.1f} s from the second Ctrl-C to the exit"  # the queued writes take 60 s
    names = os.listdir(sample_dir)
    for name in names:  # under its own name, a PNG is whole
        if re.fullmatch(r"\d{6}\.png", name):
            read_png(sample_dir / name)
        else:
            assert name in (".lock", "settings.json") or re.fullmatch(r"\.\d{6}\.png\.tmp-\d+", name), names
    run(argv)
    assert not [name for name in os.listdir(sample_dir) if ".tmp-" in name]
    with np.load(f"{sample_dir}.npz") as archive:
        assert archive["arr_0"].shape == (6, 8, 8, 3)


def test_an_fid_job_stopped_on_another_node_says_so_there(files, tmp_path, capsys, monkeypatch):
    """A stop may reach one node's processes only: the first process of each node (rank 1 of 2 here,
    local rank 0) says that the images written are kept."""
    as_rank_1_of_2(monkeypatch, local_rank=0)

    def interrupted(self, *args):
        raise KeyboardInterrupt

    monkeypatch.setattr(sample.Setup, "sample", interrupted)
    sample_dir = tmp_path / "s"
    with pytest.raises(SystemExit) as exit_info:
        run(["ODE", "--ckpt", files["pixel"], "--vae", "none", "--sampling-method", "euler", "--num-sampling-steps", 2,
             "--num-fid-samples", 3, "--per-proc-batch-size", 1, "--sample-dir", sample_dir, *FAST])
    assert exit_info.value.code == 130
    err = capsys.readouterr().err
    assert f"interrupted; 0 of 3 images are written, and kept: run the same command again to sample the rest into " \
           f"{sample_dir}" in err, err


def test_fid_job_outlives_its_console(files, tmp_path, monkeypatch):
    """The console went away (`| head`, a `| tee` that died): its lines are lost, the images are not."""
    from tests.test_interrupts import Gone

    sample_dir = tmp_path / "s"
    monkeypatch.setattr(sys, "stdout", Gone())
    monkeypatch.setattr(sys, "stderr", Gone())
    run(["ODE", "--ckpt", files["pixel"], "--vae", "none", "--sampling-method", "euler", "--num-sampling-steps", 2,
         "--num-fid-samples", 3, "--per-proc-batch-size", 2, "--sample-dir", sample_dir, *FAST])
    with np.load(f"{sample_dir}.npz") as archive:
        assert archive["arr_0"].shape == (3, 8, 8, 3)


def test_fid_job_whose_peer_ended_is_one_line(files, tmp_path, capsys, monkeypatch):
    """The processes of one node stopped by a signal sent to them alone: the others, done with their
    share, find them gone at the last barrier; one line says so, and how to finish (was gloo's traceback)."""
    def gone():
        raise torch.distributed.DistBackendError("[gloo] Connection closed by peer [10.0.0.2]:29500")

    monkeypatch.setattr(sample, "barrier", gone)
    sample_dir = tmp_path / "s"
    with pytest.raises(SystemExit) as exit_info:
        run(["ODE", "--ckpt", files["pixel"], "--vae", "none", "--sampling-method", "euler", "--num-sampling-steps",
             2, "--num-fid-samples", 2, "--sample-dir", sample_dir, "--no-run-folder", *FAST])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: another process of the job ended before its share was sampled (Connection closed by peer "
        f"[10.0.0.2]:29500); the images written are kept: run the same command again to sample the rest into "
        f"{sample_dir}")

    def timed_out():  # not a peer's end: not called one
        raise torch.distributed.DistBackendError("[gloo] Timed out waiting 21600000ms for recv operation")

    monkeypatch.setattr(sample, "barrier", timed_out)
    with pytest.raises(torch.distributed.DistBackendError):
        run(["ODE", "--ckpt", files["pixel"], "--vae", "none", "--sampling-method", "euler", "--num-sampling-steps",
             2, "--num-fid-samples", 3, "--sample-dir", sample_dir, "--no-run-folder", *FAST])


def test_a_peer_that_ended_in_its_setup_is_one_line(files, tmp_path, capsys, monkeypatch):
    """A process of another node that failed setting up (its checkpoint or VAE unreadable there) ends;
    the others meet gloo's error at their first collective: one line sends them to torchrun's summary
    (was gloo's traceback). Another error at that collective is raised as it is."""
    from sit_fast.distributed import DistInfo

    monkeypatch.setattr(sample, "init_distributed", lambda: DistInfo(rank=0, world_size=2, local_rank=0,
                                                                     device=torch.device("cpu"), is_main=True))

    def gone(*args, **kwargs):
        raise torch.distributed.DistBackendError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection "
                                                 "closed by peer [10.0.0.2]:29500")

    monkeypatch.setattr(sample, "check_shared_path", gone)
    argv = ["ODE", "--ckpt", files["pixel"], "--vae", "none", "--sampling-method", "euler", "--num-sampling-steps", 2,
            "--num-fid-samples", 2, "--sample-dir", tmp_path / "s", *FAST]
    with pytest.raises(SystemExit) as exit_info:
        run(argv)
    assert exit_info.value.code == 2
    assert one_line_error(capsys) == ("error: another process of the job ended (Connection closed by peer "
                                      "[10.0.0.2]:29500); its error is in the torchrun summary of its node")

    def timed_out(*args, **kwargs):
        raise torch.distributed.DistBackendError("[gloo] Timed out waiting 21600000ms for recv operation")

    monkeypatch.setattr(sample, "check_shared_path", timed_out)
    with pytest.raises(torch.distributed.DistBackendError):
        run(argv)


def test_torchrun_names_the_process_that_failed_in_its_setup_as_the_root_cause(files, tmp_path):
    """Rank 1 cannot read its checkpoint (another node's disk); rank 0 meets its end at the first
    collective. torchrun's summary names rank 1's error as the root cause (it named rank 0's 'another
    process ended', of the same second), and rank 0 says that in one line, not gloo's traceback."""
    script = tmp_path / "failing_rank_1.py"
    script.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {REPO!r})\n"
        "import sample\n"
        "from sit_fast.errors import UserError\n"
        "if os.environ['RANK'] == '1':\n"
        "    def setup(*args, **kwargs):\n"
        "        raise UserError('--ckpt x.pt: no such file on this node')\n"
        "    sample.Setup.__init__ = setup\n"
        "sample.main()\n")
    result = torchrun_run(script, ["ODE", "--ckpt", files["pixel"], "--vae", "none", "--num-fid-samples", "2",
                                   "--sample-dir", tmp_path / "s", *FAST], tmp_path)
    assert result.returncode != 0
    root_cause = result.stderr.split("Root Cause (first observed failure):")[1]
    assert "rank      : 1 (local_rank: 1)" in root_cause, result.stderr[-3000:]
    assert "traceback : error: --ckpt x.pt: no such file on this node" in root_cause, result.stderr[-3000:]
    assert "error: another process of the job ended (Connection" in result.stderr, result.stderr[-3000:]
    assert result.stderr.count("Traceback (most recent call last)") == 1, result.stderr[-3000:]  # torchrun's own


@pytest.mark.slow  # --likelihood's case runs by default (test_likelihood_whose_rank_0_was_killed_...)
def test_fid_job_whose_rank_0_was_killed_says_so_once_from_the_process_left(files, tmp_path):
    """Rank 0 killed (SIGKILL) while sampling: torchrun stops rank 1 (SIGTERM), which, on rank 0's node,
    says in its place, once, that rank 0 ended and the images written are kept (it exited 143 without a
    word: rank 0, which says so for each node, was gone)."""
    script = tmp_path / "killed_rank_0.py"
    script.write_text(
        "import os, signal, sys\n"
        f"sys.path.insert(0, {REPO!r})\n"
        "import sample\n"
        "if os.environ['RANK'] == '0':\n"
        "    real, calls = sample.Setup.sample, []\n"
        "    def killed(self, *args, **kwargs):\n"
        "        calls.append(1)\n"
        "        if len(calls) == 3:\n"
        "            os.kill(os.getpid(), signal.SIGKILL)\n"
        "        return real(self, *args, **kwargs)\n"
        "    sample.Setup.sample = killed\n"
        "sample.main()\n")
    sample_dir = tmp_path / "s"
    result = torchrun_run(script, ["ODE", "--ckpt", files["pixel"], "--vae", "none", "--sampling-method", "euler",
                                   "--num-sampling-steps", 2, "--num-fid-samples", 100000, "--per-proc-batch-size", 2,
                                   "--sample-dir", sample_dir, *FAST], tmp_path)
    assert result.returncode != 0
    said = [line for line in result.stderr.splitlines() if "images are written, and kept" in line]
    assert len(said) == 1, result.stderr[-3000:]
    assert re.fullmatch(rf"rank 0 \(on {re.escape(socket.gethostname())}\) ended \(its node's torchrun summary says "
                        rf"how\), and the others were stopped by SIGTERM; \d+ of 100000 images are written, and kept: "
                        rf"run the same command again to sample the rest into {re.escape(str(sample_dir))}",
                        said[0]), said
    assert says_the_others_were_stopped(result.stderr), result.stderr[-3000:]  # rank 1, stopped by torchrun
    assert result.stderr.count("Traceback (most recent call last)") == 1, result.stderr[-3000:]  # torchrun's own


def test_fid_job_on_a_full_disk_is_one_line_and_keeps_the_images(files, tmp_path, capsys, monkeypatch):
    from PIL import Image as PILImage

    sample_dir = tmp_path / "s"
    argv = ["ODE", "--ckpt", files["pixel"], "--vae", "none", "--sampling-method", "euler", "--num-sampling-steps", 2,
            "--num-fid-samples", 4, "--per-proc-batch-size", 2, "--sample-dir", sample_dir, *FAST]
    real_save, calls = PILImage.Image.save, []

    def full_disk_save(self, fp, *args, **kwargs):
        calls.append(fp)
        if os.path.basename(getattr(fp, "name", str(fp))).startswith(".000002.png.tmp-"):  # atomic_write's file
            fp.write(b"part")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(PILImage.Image, "save", full_disk_save)
    with pytest.raises(SystemExit) as exit_info:
        sample.main([str(a) for a in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # below the progress bar
    assert err == (f"error: cannot write {sample_dir / '000002.png'} (No space left on device): the 3 images written "
                   f"are kept: make room (or make the folder writable) and run the same command again to sample "
                   f"the rest"), err
    assert not [n for n in os.listdir(sample_dir) if ".tmp" in n] and "000000.png" in os.listdir(sample_dir)
    # A job killed mid-write leaves its temporary file: the next run removes it, as train.py its checkpoints'.
    (sample_dir / ".000003.png.tmp-999").write_bytes(b"cut short")
    monkeypatch.setattr(PILImage.Image, "save", real_save)
    sample.main([str(a) for a in argv])
    assert (f"warning: removed 1 unfinished PNG write (.000003.png.tmp-999; 9 bytes) from {sample_dir}, left by a "
            f"sampling job killed while writing") in capsys.readouterr().err
    assert not (sample_dir / ".000003.png.tmp-999").exists()


LIMIT = "File too large: past the file size limit of the process (`ulimit -f`) or of the filesystem (FAT32's 4 GiB)"
DISK = "fix the disk (the system log says what failed), or write onto another filesystem"  # a failing disk's EIO


@pytest.mark.parametrize("failing, code, said", [
    ("g.png", errno.EFBIG, f"({LIMIT}): raise the file size limit (or write onto another filesystem) and run it again"),
    ("000001.png", errno.EFBIG, f"({LIMIT}): the 1 image written is kept: raise the file size limit (or write onto "
                                f"another filesystem) and run the same command again to sample the rest"),
    ("s.npz", errno.ENOSPC, "(No space left on device): the 4 images written are kept: make room (or make the folder "
                            "writable) and run the same command again to finish"),
    ("s.npz", errno.EFBIG, f"({LIMIT}): the 4 images written are kept: raise the file size limit (or write onto "
                           f"another filesystem) and run the same command again to finish"),
    ("settings.json", errno.ENOSPC, "(No space left on device): nothing was computed yet: make room (or make the "
                                    "folder writable) and run the same command again"),
    ("g.png", errno.ENOSPC, "(No space left on device): make room (or make the folder writable) and run it again"),
    ("g.png", errno.EIO, f"(Input/output error, EIO): {DISK} and run it again"),
    ("s.npz", errno.EIO, f"(Input/output error, EIO): the 4 images written are kept: {DISK} and run the same command "
                         f"again to finish"),
])
def test_a_grid_or_fid_file_the_filesystem_refuses_is_one_line_and_the_fid_job_finishes_later(
        failing, code, said, files, tmp_path, capsys, monkeypatch):
    """A file grown past a size limit (`ulimit -f`, a job scheduler's, FAT32's 4 GiB) fails with EFBIG (Python
    ignores SIGXFSZ), which was not taken for a write the filesystem refused: a traceback, where a full disk is
    one line. The FID job's .npz on a full disk said no more than the error, not that the images are kept nor
    what to do. Each is one line saying both; no temporary file is left, and the same command, once the file
    can be written, finishes with the .npz of an uninterrupted run. settings.json, written before the first
    image, said that the images written are kept where there were none yet: it says that nothing was."""
    import builtins

    from sit_fast import files as file_helpers

    common = ["ODE", "--ckpt", files["pixel"], "--vae", "none", "--sampling-method", "euler", "--num-sampling-steps",
              2, *FAST]
    grid = failing == "g.png"
    argv = common + (["--class-labels", 1, 2, "--out", tmp_path / "g.png"] if grid else
                     ["--num-fid-samples", 4, "--batch-size", 2, "--sample-dir", tmp_path / "s"])
    real_open = builtins.open

    def refused_for(path, mode="r", *args, **kwargs):
        if os.path.basename(path).startswith(f".{failing}.tmp-"):
            raise OSError(code, os.strerror(code))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(file_helpers, "open", refused_for, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        run(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # below the progress bar
    folder = "s" if failing in ("000001.png", "settings.json") else ""
    assert err == f"error: cannot write {tmp_path / folder / failing} {said}", err
    assert not [n for _, _, names in os.walk(tmp_path) for n in names if ".tmp-" in n]
    assert not (tmp_path / failing).exists()
    monkeypatch.setattr(file_helpers, "open", real_open, raising=False)
    run(argv)
    if not grid:  # the same archive as an uninterrupted run's
        run(common + ["--num-fid-samples", 4, "--batch-size", 2, "--sample-dir", tmp_path / "straight"])
        assert (tmp_path / "s.npz").read_bytes() == (tmp_path / "straight.npz").read_bytes()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
def test_a_png_that_cannot_be_written_says_how_many_images_are_kept_or_that_none_was(code, files, tmp_path, capsys,
                                                                                       monkeypatch):
    """The FID job's first PNG refused (a full disk) said that "the images written are kept" where none was,
    and an I/O error (a failing disk's EIO, not a refusal) was a traceback. Each is one line naming the file,
    the OS's error, how many images are kept (or that nothing was written yet) and what to do; no temporary
    file is left."""
    import builtins

    from sit_fast import files as file_helpers

    argv = ["ODE", "--ckpt", files["pixel"], "--vae", "none", "--sampling-method", "euler", "--num-sampling-steps",
            2, "--num-fid-samples", 4, "--batch-size", 2, *FAST]
    real_open = builtins.open
    said = {errno.ENOSPC: "No space left on device", errno.EIO: "Input/output error, EIO"}[code]
    fix = {errno.ENOSPC: "make room (or make the folder writable)",
           errno.EIO: "fix the disk (the system log says what failed), or write onto another filesystem"}[code]
    for failing, kept in ((("000000", "000001"), "nothing was written yet"),
                          (("000002", "000003"), "the 2 images written are kept")):  # the batch's both images

        def refused(path, mode="r", *args, **kwargs):
            if os.path.basename(path).startswith(tuple(f".{name}.png.tmp-" for name in failing)):
                raise OSError(code, os.strerror(code))
            return real_open(path, mode, *args, **kwargs)

        monkeypatch.setattr(file_helpers, "open", refused, raising=False)
        sample_dir = tmp_path / failing[0]
        with pytest.raises(SystemExit) as exit_info:
            run(argv + ["--sample-dir", sample_dir])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]  # below the progress bar
        assert err == (f"error: cannot write {sample_dir / f'{failing[0]}.png'} ({said}): {kept}: {fix} and run "
                       f"the same command again to sample the rest"), err
        assert not [n for n in os.listdir(sample_dir) if ".tmp-" in n]


def test_a_refused_write_its_job_does_not_name_says_how_many_images_are_kept(files, tmp_path, capsys, monkeypatch):
    """A refused write that reaches run_job's own line (settings.json's record brought up to date as an FID
    job resumes, on a full disk) said that "the images written are kept" whether there were any or not: it
    says how many are, as the PNGs' and the .npz's lines do (files.write_failed's line)."""
    import builtins

    from sit_fast import files as file_helpers

    sample_dir = tmp_path / "fid"
    argv = ["ODE", "--ckpt", files["pixel"], "--vae", "none", "--sampling-method", "euler", "--num-sampling-steps",
            1, "--num-fid-samples", 2, "--batch-size", 2, "--sample-dir", sample_dir, *FAST]
    run(argv)
    os.remove(f"{sample_dir}.npz")
    record = json.loads((sample_dir / "settings.json").read_text())
    del record["ckpt_digest"]  # a record from before it was kept: brought up to date on resuming
    (sample_dir / "settings.json").write_text(json.dumps(record))
    real_open = builtins.open

    def full(path, mode="r", *args, **kwargs):
        if "w" in mode and os.path.basename(path).startswith(".settings.json.tmp-"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(file_helpers, "open", full, raising=False)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: cannot write {sample_dir / 'settings.json'} (No space left on device): the 2 images written are "
        f"kept: make room (or make the folder writable) and run the same command again to finish")
    monkeypatch.undo()
    monkeypatch.setattr(sample, "fid_job", lambda *args: (_ for _ in ()).throw(
        OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), str(tmp_path / "new" / "settings.json"))))
    with pytest.raises(SystemExit):
        run(argv[:-len(FAST) - 2] + ["--sample-dir", tmp_path / "new", *FAST])
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: cannot write {tmp_path / 'new' / 'settings.json'} (Disk quota exceeded): nothing was written yet: "
        f"make room (or make the folder writable) and run the same command again to finish")


@pytest.mark.parametrize("job", ["--likelihood", "--reverse"])
def test_a_refused_write_a_batch_job_does_not_name_says_how_many_batches_are_kept(files, tmp_path, capsys,
                                                                                 monkeypatch, job):
    """--likelihood / --reverse: a refused write reaching run_job's own line said that "the batches computed
    are kept" whether there were any or not: it counts those in OUT.parts, as a batch's own write does (OUT:
    --likelihood's --out with the .npz np.savez adds, --reverse's default noise.pt)."""
    torch.save(torch.rand(4, 3, 8, 8) * 2 - 1, tmp_path / "x.pt")
    monkeypatch.chdir(tmp_path)
    out = "bpd.npz" if job == "--likelihood" else "noise.pt"
    argv = ["ODE", job, "--ckpt", files["pixel"], "--vae", "none", "--data", tmp_path / "x.pt", "--batch-size", 2,
            "--sampling-method", "euler", "--num-sampling-steps", 1, *(["--out", "bpd"] if job == "--likelihood"
                                                                     else []), *FAST]
    settings = f"{out}.parts/settings.json"
    refused = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), settings)
    monkeypatch.setattr(sample, "run_likelihood" if job == "--likelihood" else "run_reverse",
                        lambda setup: (_ for _ in ()).throw(refused))
    for batches, kept in ((0, "nothing was written yet"), (1, f"the 1 batch written is kept in {out}.parts")):
        if batches:
            torch.save(torch.zeros(2), f"{out}.parts/000000.pt")
        with pytest.raises(SystemExit) as exit_info:
            run(argv)
        assert exit_info.value.code == 2
        assert one_line_error(capsys) == (f"error: cannot write {settings} (No space left on device): {kept}: make "
                                          f"room (or make the folder writable) and run the same command again to "
                                          f"finish")
        os.makedirs(f"{out}.parts", exist_ok=True)


def test_batches_kept_counts_every_batch_file_and_says_nothing_of_a_folder_it_cannot_list(tmp_path, monkeypatch):
    """A million batches and more have 7-digit names (BatchParts.name), counted too; a folder that cannot be
    listed is not said to hold none."""
    parts = tmp_path / "out.npz.parts"
    parts.mkdir()
    for name in ("000000.pt", "1000000.pt", "settings.json", ".lock"):
        (parts / name).write_bytes(b"")
    assert sample.batches_kept(str(parts)) == f"the 2 batches written are kept in {parts}"
    assert sample.batches_kept(str(parts), 1) == f"the 1 batch written is kept in {parts}"
    assert sample.batches_kept(str(tmp_path / "none.parts")) == "nothing was written yet"
    real = os.listdir
    monkeypatch.setattr(sample.os, "listdir", lambda path: (_ for _ in ()).throw(
        OSError(errno.EIO, os.strerror(errno.EIO), path)) if str(path) == str(parts) else real(path))
    assert sample.batches_kept(str(parts)) == ""


def test_an_fid_job_among_another_jobs_images_is_named(files, tmp_path, capsys):
    """sample.py's FID job writes into --sample-dir itself and sample_ddp.py's into a run folder in it,
    both samples/ by default: the second of the two says its images lie among the first's."""
    common = ["ODE", "--ckpt", files["pixel"], "--vae", "none", "--sampling-method", "euler", "--num-sampling-steps", 1,
              "--num-fid-samples", 2, "--batch-size", 2, *FAST]
    for first, second in (("--run-folder", "--no-run-folder"), ("--no-run-folder", "--run-folder")):
        sample_dir = tmp_path / first.strip("-")
        run(common + ["--sample-dir", sample_dir, first])
        assert "warning" not in capsys.readouterr().err
        run(common + ["--sample-dir", sample_dir, second])
        err = capsys.readouterr().err
        if second == "--no-run-folder":
            assert (f"warning: {sample_dir} holds the run folders of other FID jobs (SiT-T-2-pixel-cfg-1.0-2-ODE-1-"
                    f"euler/); this job's images go beside them") in err, err
        else:
            assert f"warning: {sample_dir} holds the images of another FID job (its settings.json)" in err, err


def test_the_names_flags_were_given_under_are_no_image_settings():
    """Every flag with an alias records the name it was given under (StoreNamed: DEST_flag); that
    name is left out of the settings a folder records, or a resume under the alias would be refused."""
    modes = sample.build_parser()._subparsers._group_actions[0].choices.values()
    named = {f"{action.dest}_flag" for mode in modes for action in mode._actions
             if isinstance(action, sample.StoreNamed)}
    assert {"batch_size_flag", "seed_flag"} <= named
    assert named <= sample.NOT_IMAGE_SETTINGS, named - sample.NOT_IMAGE_SETTINGS


def test_a_folder_refused_for_other_settings_names_them_by_their_flags_as_given(files, tmp_path, capsys):
    """The settings that differ are named by the flags that set them, under the names given (upstream
    sample_ddp.py's --global-seed and --per-proc-batch-size, which sample_ddp.py also names by default);
    what no flag sets keeps its key. A flag given under its alias is the same setting."""
    common = ["ODE", "--ckpt", files["pixel"], "--vae", "none", "--sampling-method", "euler", "--num-sampling-steps", 1,
              "--num-fid-samples", 2, "--sample-dir", tmp_path / "s", "--no-run-folder", *FAST]
    run(common + ["--batch-size", 2, "--seed", 1])
    os.remove(png_path(str(tmp_path / "s"), 1))
    capsys.readouterr()
    run(common + ["--per-proc-batch-size", 2, "--global-seed", 1])
    assert f"1 of 2 images already in {tmp_path / 's'}; sampling 2 (1 of them present" in capsys.readouterr().out

    def refused(argv, main=run):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        return one_line_error(capsys)

    os.remove(png_path(str(tmp_path / "s"), 1))
    err = refused(common + ["--per-proc-batch-size", 1, "--global-seed", 2])
    assert "(--global-seed: 1 there, 2 now; --per-proc-batch-size: 2 there, 1 now)" in err, err
    err = refused(common + ["--batch-size", 1, "--seed", 2])
    assert "(--seed: 1 there, 2 now; --batch-size: 2 there, 1 now)" in err, err
    ddp = functools.partial(sample.main, defaults=sample.SAMPLE_DDP_DEFAULTS, prog="sample_ddp.py")
    err = refused([str(arg) for arg in common], main=ddp)  # the defaults: seed 0, batch size 32
    assert "(--global-seed: 1 there, 0 now; --per-proc-batch-size: 2 there, 32 now)" in err, err
    torch.save(random_sit(3, learn_sigma=False).state_dict(), tmp_path / "other.pt")
    err = refused([tmp_path / "other.pt" if arg == files["pixel"] else arg for arg in common]
                  + ["--batch-size", 2, "--seed", 1])
    assert "(--ckpt: " in err and "; ckpt_digest: " in err, err


def test_out_folders_are_made_before_the_work_or_refused(files, tmp_path, capsys):
    """--out in a folder that does not exist yet: made up front for every job (it failed after all the
    sampling for the .npz, the likelihood and --reverse); a file in the way is a one-line error."""
    common = ["ODE", "--ckpt", files["pixel"], "--vae", "none", "--sampling-method", "euler", "--num-sampling-steps", 2,
              *FAST]
    npz = tmp_path / "new" / "deeper" / "fid.npz"
    assert run(common + ["--num-fid-samples", 2, "--sample-dir", tmp_path / "s", "--out", npz]) == str(npz)
    torch.save(torch.randn(2, 3, 8, 8).clamp(-1, 1), tmp_path / "x.pt")
    noise = tmp_path / "other" / "z.pth"
    assert run(common + ["--reverse", "--data", tmp_path / "x.pt", "--out", noise]) == str(noise)
    # what --reverse writes, --data reads, .pth as .pt
    assert run(common + ["--reverse", "--data", noise, "--out", tmp_path / "z2.pt"]) == str(tmp_path / "z2.pt")
    (tmp_path / "a_file").write_text("")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run(common + ["--likelihood", "--data", tmp_path / "x.pt", "--out", tmp_path / "a_file" / "bpd.npz"])
    assert exit_info.value.code == 2
    assert one_line_error(capsys) == (f"error: --out {tmp_path / 'a_file' / 'bpd.npz'}: {tmp_path / 'a_file'} "
                                      "is a file: pass a folder")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc, where no file can be made")
def test_folders_that_cannot_be_written_are_one_line_errors(files, tmp_path, capsys, monkeypatch):
    """An --out in a folder no file can be written into was a traceback after the sampling; a
    --sample-dir that cannot be made (a file in its path, a read-only place) was a traceback."""
    common = ["ODE", "--ckpt", files["pixel"], "--vae", "none", "--sampling-method", "euler", "--num-sampling-steps", 2,
              *FAST]
    (tmp_path / "a_file").write_text("")
    cases = [
        (["--out", "/proc/g.png"], "error: --out /proc/g.png: cannot write into the folder /proc ("),
        (["--num-fid-samples", 2, "--sample-dir", tmp_path / "s", "--out", "/proc/fid.npz"],
         "error: --out /proc/fid.npz: cannot write into the folder /proc ("),
        (["--num-fid-samples", 2, "--sample-dir", "/proc/samples"],
         "error: --sample-dir /proc/samples: cannot write into the folder /proc ("),  # where the .npz goes
        (["--num-fid-samples", 2, "--sample-dir", tmp_path / "a_file" / "s"],
         f"error: --sample-dir {tmp_path / 'a_file' / 's'}: {tmp_path / 'a_file'} is a file: pass a folder"),
    ]
    for argv, needle in cases:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            run(common + argv)
        assert exit_info.value.code == 2
        err = one_line_error(capsys)
        assert err.startswith(needle), err
    assert not (tmp_path / "s").exists()
    # the default outputs (sample.png, noise.pt, SAMPLE_DIR.npz) in a working folder that cannot be written
    torch.save(torch.zeros(1, 3, 8, 8), tmp_path / "x.pt")
    monkeypatch.chdir("/proc")
    for argv, needle in [([], "error: --out sample.png: cannot write into the folder /proc ("),
                         (["--reverse", "--data", tmp_path / "x.pt"], "error: --out noise.pt: cannot write into"),
                         (["--num-fid-samples", 2],
                          "error: --sample-dir samples: cannot write into the folder /proc (")]:
        with pytest.raises(SystemExit):
            run(common + argv)
        err = one_line_error(capsys)
        assert err.startswith(needle), err


@pytest.mark.parametrize("run_folder,said", [("--no-run-folder", "{0}"), ("--run-folder", "{0}: {0}")])
def test_a_sample_dir_naming_a_file_is_one_line_and_leaves_the_file(files, tmp_path, capsys, run_folder, said):
    a_file = tmp_path / "a_file"
    a_file.write_text("kept")
    with pytest.raises(SystemExit) as exit_info:
        run(["ODE", "--ckpt", files["pixel"], "--vae", "none", "--sampling-method", "euler", "--num-sampling-steps", 2,
             "--num-fid-samples", 2, "--sample-dir", a_file, run_folder, *FAST])
    assert exit_info.value.code == 2
    assert one_line_error(capsys) == f"error: --sample-dir {said.format(a_file)} is a file: pass a folder"
    assert a_file.read_text() == "kept" and os.listdir(tmp_path) == ["a_file"]


def test_pngs_without_a_settings_record_are_not_taken_over(files, tmp_path, capsys):
    """Numbered PNGs with no settings.json (upstream's sample_ddp.py writes the same names): their
    settings are unknown, so they are not counted as done; an empty folder or other files are fine."""
    argv = ["ODE", "--ckpt", files["pixel"], "--vae", "none", "--sampling-method", "euler", "--num-sampling-steps", 2,
            "--num-fid-samples", 2, *FAST]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(foreign / "000000.png")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run(argv + ["--sample-dir", foreign])
    assert one_line_error(capsys) == (f"error: {foreign} holds samples (1 file like 000000.png) but no settings.json, "
                                      "so what made them is unknown: pass another --sample-dir, or delete them to "
                                      "start over")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("")
    run(argv + ["--sample-dir", tmp_path / "mine"])
    assert sorted(os.listdir(tmp_path / "mine")) == [".lock", "000000.png", "000001.png", "notes.txt", "settings.json"]


def test_a_second_job_on_an_fid_folder_in_use_is_refused(files, tmp_path, capsys):
    """Two jobs started on one folder mixed their images (the second took over settings.json before
    the first wrote a PNG): the folder is locked while a job runs on it. The lock is held here as
    another process would hold it (flock: another open file conflicts, in this process too)."""
    sample_dir = tmp_path / "s"
    sample_dir.mkdir()
    argv = ["ODE", "--ckpt", files["pixel"], "--vae", "none", "--sampling-method", "euler", "--num-sampling-steps", 2,
            "--num-fid-samples", 2, "--sample-dir", sample_dir, *FAST]
    other = FolderLock(str(sample_dir), "--sample-dir")
    other.acquire()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run(argv)
    assert exit_info.value.code == 2
    assert one_line_error(capsys) == (f"error: another job is writing into {sample_dir} now (process {os.getpid()} on "
                                      f"{socket.gethostname()}): wait for it to end, or pass another --sample-dir")
    assert sorted(os.listdir(sample_dir)) == [".lock"]  # no settings recorded by the refused job
    other.release()
    run(argv)
    run(argv)  # a job's lock ends with the job
    assert (tmp_path / "s.npz").is_file()


def test_a_folder_lock_that_cannot_say_who_holds_it_is_held_and_released(tmp_path, monkeypatch):
    """Writing the holder's name into .lock failed (a full disk) after the lock was taken: the lock
    was kept by a descriptor release() did not know, and the next job was refused."""
    from sit_fast import files as files_module

    def full_disk(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    lock = FolderLock(str(tmp_path), "--sample-dir")
    with monkeypatch.context() as patched:
        patched.setattr(files_module.os, "pwrite", full_disk)
        lock.acquire()
    lock.acquire()  # held already: not refused by itself
    lock.release()
    with FolderLock(str(tmp_path), "--sample-dir") as again:
        again.acquire()
        assert again.fd is not None
    assert again.fd is None


def test_an_fid_folder_tells_apart_two_checkpoints_written_to_one_path(files, tmp_path, capsys):
    """A checkpoint replaced at the same path (a retrained run's NNNNNNN.pt) was resumed into, mixing
    two models' images; a folder recorded before the digest existed still resumes."""
    ckpt = tmp_path / "0000100.pt"
    shutil.copy(files["pixel"], ckpt)
    sample_dir = tmp_path / "s"
    argv = ["ODE", "--ckpt", ckpt, "--vae", "none", "--sampling-method", "euler", "--num-sampling-steps", 2,
            "--per-proc-batch-size", 2, "--sample-dir", sample_dir, *FAST]
    run(argv + ["--num-fid-samples", 2])
    recorded = json.loads((sample_dir / "settings.json").read_text())
    assert re.fullmatch(r"[0-9a-f]{16}", recorded["ckpt_digest"]), recorded
    torch.save(random_sit(3, learn_sigma=False, seed=1).state_dict(), ckpt)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run(argv + ["--num-fid-samples", 4])
    err = one_line_error(capsys)
    assert "holds samples made with other settings (ckpt_digest: " in err, err
    shutil.copy(files["pixel"], ckpt)  # the first checkpoint back
    digest = recorded.pop("ckpt_digest")
    (sample_dir / "settings.json").write_text(json.dumps(recorded))
    run(argv + ["--num-fid-samples", 4])  # an older record: compared on what it has, then completed
    assert "2 of 4 images already in" in capsys.readouterr().out
    assert json.loads((sample_dir / "settings.json").read_text())["ckpt_digest"] == digest


def test_an_fid_folder_resumes_with_its_checkpoint_named_from_another_folder(files, tmp_path, monkeypatch, capsys):
    """The folder records the checkpoint by its absolute path: the same file, named relative to another
    working folder, resumes the job."""
    shutil.copy(files["pixel"], tmp_path / "pixel.pt")
    (tmp_path / "elsewhere").mkdir()
    argv = ["ODE", "--vae", "none", "--sampling-method", "euler", "--num-sampling-steps", 2, "--batch-size", 2,
            "--sample-dir", tmp_path / "s", *FAST]
    monkeypatch.chdir(tmp_path)
    run(argv + ["--ckpt", "pixel.pt", "--num-fid-samples", 2])
    monkeypatch.chdir(tmp_path / "elsewhere")
    capsys.readouterr()
    run(argv + ["--ckpt", os.path.join("..", "pixel.pt"), "--num-fid-samples", 3])
    assert f"2 of 3 images already in {tmp_path / 's'}; sampling 1" in capsys.readouterr().out
    assert len(np.load(tmp_path / "s.npz")["arr_0"]) == 3
    os.remove(tmp_path / "s.npz")  # every image there: the .npz alone to build, no empty bar
    run(argv + ["--ckpt", os.path.join("..", "pixel.pt"), "--num-fid-samples", 3])
    out, err = capsys.readouterr()
    assert f"all 3 images already in {tmp_path / 's'}: nothing to sample" in out and "sampling:" not in err, (out, err)
    assert len(np.load(tmp_path / "s.npz")["arr_0"]) == 3


def test_an_fid_folder_resumes_with_its_checkpoint_moved_or_linked(files, tmp_path, capsys):
    """The record's digest tells the checkpoint: the same file moved elsewhere, or reached through a
    link, resumes the job; another file at the first path is still refused."""
    first, moved = tmp_path / "a" / "0000100.pt", tmp_path / "b" / "0000100.pt"
    first.parent.mkdir()
    moved.parent.mkdir()
    shutil.copy(files["pixel"], first)
    argv = ["ODE", "--vae", "none", "--sampling-method", "euler", "--num-sampling-steps", 2, "--batch-size", 2,
            "--sample-dir", tmp_path / "s", *FAST]
    run(argv + ["--ckpt", first, "--num-fid-samples", 2])
    os.replace(first, moved)
    capsys.readouterr()
    run(argv + ["--ckpt", moved, "--num-fid-samples", 4])
    assert f"2 of 4 images already in {tmp_path / 's'}; sampling 2" in capsys.readouterr().out
    os.symlink(moved, tmp_path / "link.pt")
    run(argv + ["--ckpt", tmp_path / "link.pt", "--num-fid-samples", 6])
    assert f"4 of 6 images already in {tmp_path / 's'}; sampling 2" in capsys.readouterr().out
    torch.save(random_sit(3, learn_sigma=False, seed=1).state_dict(), first)  # another model at the first path
    with pytest.raises(SystemExit):
        run(argv + ["--ckpt", first, "--num-fid-samples", 8])
    assert "holds samples made with other settings (ckpt_digest: " in one_line_error(capsys)


def test_an_fid_folder_resumes_under_flags_that_pick_nothing_else(files, tmp_path, capsys):
    """--use-raw on a file of one set of weights picks the same weights (recorded as such),
    --vae-precision in pixel space decodes nothing, and --loss-weight and --train-eps are training's
    alone: a resume with any is not refused; a --vae-precision that decodes the images is."""
    argv = ["ODE", "--ckpt", files["pixel"], "--vae", "none", "--sampling-method", "euler", "--num-sampling-steps", 2,
            "--batch-size", 2, "--sample-dir", tmp_path / "s", *FAST]
    run(argv + ["--num-fid-samples", 2])
    capsys.readouterr()
    run(argv + ["--num-fid-samples", 3, "--use-raw", "--vae-precision", "bf16", "--loss-weight", "likelihood",
                "--train-eps", 0.01])
    assert f"2 of 3 images already in {tmp_path / 's'}; sampling 1" in capsys.readouterr().out
    latent = ["ODE", "--ckpt", files["latent"], "--vae", files["vae"], "--sampling-method", "euler",
              "--num-sampling-steps", 2, "--batch-size", 2, "--sample-dir", tmp_path / "v", *FAST]
    run(latent + ["--num-fid-samples", 2])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run(latent + ["--num-fid-samples", 3, "--vae-precision", "bf16"])
    assert "(--vae-precision: 'fp32' there, 'bf16' now)" in one_line_error(capsys)


def test_an_fid_folder_resumed_with_other_arithmetic_says_so_and_records_it(files, tmp_path, capsys):
    """--fused-kernels, --attn-backend and --compile change the images' rounding, not what is sampled: a
    resume with others is not refused, but said, with the flags that sampled the images there; the
    folder's record then keeps that it mixes them. A record without the arithmetic (an older one) resumes
    saying nothing."""
    sample_dir = tmp_path / "s"
    argv = ["ODE", "--ckpt", files["pixel"], "--vae", "none", "--sampling-method", "euler", "--num-sampling-steps", 1,
            "--batch-size", 1, "--sample-dir", sample_dir, "--fused-kernels", "off"]
    run(argv + ["--attn-backend", "math", "--num-fid-samples", 2])
    recorded = json.loads((sample_dir / "settings.json").read_text())
    assert recorded["arithmetic"] == {"attn_backend": "math", "fused_kernels": "off", "compile": "off"}, recorded
    capsys.readouterr()
    run(argv + ["--attn-backend", "math", "--num-fid-samples", 3])  # the same arithmetic: nothing to say
    assert "warning" not in capsys.readouterr().err
    run(argv + ["--attn-backend", "sdpa", "--num-fid-samples", 4])
    err = capsys.readouterr().err
    assert err.startswith(f"warning: --attn-backend math -> sdpa: the 3 images in {sample_dir} came from "
                          f"the former, which rounds differently"), err
    assert "for a uniform set, pass --attn-backend math (Ctrl-C now" in err and len(err.splitlines()) == 1, err
    recorded = json.loads((sample_dir / "settings.json").read_text())
    assert recorded["arithmetic"]["attn_backend"] == "math", recorded
    assert [a["attn_backend"] for a in recorded["arithmetic_later"]] == ["sdpa"], recorded
    # the flags of the first images no longer make a uniform set: the folder mixes the two
    run(argv + ["--attn-backend", "math", "--fused-kernels", "on", "--num-fid-samples", 5])  # and another now
    err = capsys.readouterr().err
    assert ("came from other arithmetics in turn (with those computed now: --attn-backend math and sdpa, "
            "--fused-kernels off and on)") in err, err
    assert "for a uniform set, pass another --sample-dir" in err, err
    os.remove(f"{sample_dir}.npz")
    run(argv + ["--attn-backend", "sdpa", "--num-fid-samples", 5])  # nothing to sample: nothing mixed now
    out, err = capsys.readouterr()
    assert "all 5 images already in" in out and "warning" not in err, (out, err)
    # under sdpa, the kernel SIT_FAST_SDPA_BACKEND forces is part of it
    forced = tmp_path / "forced"
    forced_argv = [*argv, "--attn-backend", "sdpa", "--sample-dir", forced]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SIT_FAST_SDPA_BACKEND", "math")
        run(forced_argv + ["--num-fid-samples", 1])
    capsys.readouterr()
    run(forced_argv + ["--num-fid-samples", 2])
    err = capsys.readouterr().err
    assert err.startswith(f"warning: SIT_FAST_SDPA_BACKEND math -> unset: the 1 image in {forced} came from the "
                          f"former"), err
    assert "for a uniform set, set SIT_FAST_SDPA_BACKEND=math (Ctrl-C now" in err, err
    # a record written before the arithmetic was kept: resumed, unchecked, and left so
    older = {k: v for k, v in recorded.items() if not k.startswith("arithmetic")}
    (sample_dir / "settings.json").write_text(json.dumps(older))
    run(argv + ["--attn-backend", "sdpa", "--num-fid-samples", 6])
    out, err = capsys.readouterr()
    assert "5 of 6 images already in" in out and "warning" not in err, (out, err)
    assert "arithmetic" not in json.loads((sample_dir / "settings.json").read_text())


def test_likelihood_parts_resumed_with_other_arithmetic_say_so(tmp_path, caplog):
    """OUT.parts/ of --likelihood and --reverse records the arithmetic of its batches as the FID folder
    does, and a resume with another is said once, then kept in the record at the first batch written."""
    import types

    from sit_fast.distributed import DistInfo

    single = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_main=True)

    def setup(fused):
        return types.SimpleNamespace(args=argparse.Namespace(attn_backend="math", fused_kernels="auto"),
                                     arithmetic={"attn_backend": "math", "fused_kernels": fused, "compile": "off"})

    out = str(tmp_path / "z.pt")
    parts = sample.BatchParts(out, {"seed": 0}, total=4, batch_size=2, dist=single, setup=setup("off"))
    parts.write(0, torch.zeros(2))
    FolderLock.release_all()  # the job ends
    with caplog.at_level(logging.WARNING, logger="sit_fast.sample"):
        again = sample.BatchParts(out, {"seed": 0}, total=4, batch_size=2, dist=single, setup=setup("on"))
    assert again.pending == [1]
    said = [r.getMessage() for r in caplog.records if r.name == "sit_fast.sample"]
    assert len(said) == 1 and said[0].startswith(f"--fused-kernels off -> on (auto here): the results of the 1 batch "
                                                 f"in {out}.parts came from the former"), said
    assert "pass --fused-kernels off" in said[0] and "or pass another --out" in said[0], said
    record = json.loads(open(f"{out}.parts/settings.json").read())
    assert "arithmetic_later" not in record  # nothing of the new arithmetic written yet
    again.write(1, torch.zeros(2))
    record = json.loads(open(f"{out}.parts/settings.json").read())
    assert [a["fused_kernels"] for a in [record["arithmetic"], *record["arithmetic_later"]]] == ["off", "on"]


def test_every_process_must_read_the_checkpoint_rank_0_reads(files, tmp_path, monkeypatch, capsys):
    """Under torchrun a node's own file at rank 0's --ckpt path (another run's checkpoint on its local
    disk) sampled from other weights into the same folder; the processes' files are compared first
    (check_same_file, tested with processes in test_distributed.py), before any sampling."""
    from sit_fast.errors import UserError

    seen = []

    def another_file_on_rank_1(path, flag, dist):
        seen.append((path, flag))
        raise UserError(f"{flag}: rank 1 (on b) reads another file at {path} than rank 0 does, or none")

    monkeypatch.setattr(sample, "check_same_file", another_file_on_rank_1)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run(["ODE", "--ckpt", files["pixel"], "--vae", "none", "--num-fid-samples", 2, "--sample-dir", tmp_path / "s",
             "--sampling-method", "euler", "--num-sampling-steps", 2, *FAST])
    assert seen == [(files["pixel"], f"--ckpt {files['pixel']}")]
    assert one_line_error(capsys).startswith(f"error: --ckpt {files['pixel']}: rank 1 (on b) reads another file")
    assert not (tmp_path / "s").exists()


def test_an_fid_folder_with_no_name_of_its_own_puts_the_npz_beside_it(files, tmp_path, monkeypatch, capsys):
    """--sample-dir . wrote a hidden '..npz'; now the .npz is named after the folder, beside it (so too for
    --sample-dir ..); the root, with no name and nothing beside it, asks for --out."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    argv = ["ODE", "--ckpt", files["pixel"], "--vae", "none", "--sampling-method", "euler", "--num-sampling-steps", 2,
            "--num-fid-samples", 2, *FAST]
    assert run(argv + ["--sample-dir", "."]) == str(tmp_path / "work.npz")
    assert (tmp_path / "work.npz").is_file() and not (work / "..npz").exists()
    inner = work / "inner"
    inner.mkdir()
    monkeypatch.chdir(inner)
    assert run(argv + ["--sample-dir", ".."]) == str(tmp_path / "work.npz")  # the same folder, named so
    assert os.listdir(inner) == []
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run(argv + ["--sample-dir", "/"])
    assert one_line_error(capsys) == ("error: --sample-dir /: the .npz goes beside the folder, named after it, and / "
                                      "has neither: pass --out FILE.npz")


def test_an_fid_job_replaces_its_own_npz_only(files, tmp_path, capsys):
    """--out (or DIR.npz beside --sample-dir) naming an ADM reference batch (arr_0 beside mu, sigma...) or a
    file that is no archive is refused before any sampling, the file kept; an earlier run's .npz (arr_0
    alone) is replaced."""
    from sit_fast.sampling import foreign_npz

    argv = ["ODE", "--ckpt", files["pixel"], "--vae", "none", "--sampling-method", "euler", "--num-sampling-steps", 2,
            "--num-fid-samples", 2, *FAST]
    reference, notes = tmp_path / "ref.npz", tmp_path / "DIR.npz"
    np.savez(reference, arr_0=np.zeros((3, 8, 8, 3), np.uint8), mu=np.zeros(4), sigma=np.eye(4))
    notes.write_text("not an archive")
    assert foreign_npz(str(tmp_path / "none.npz")) is None
    np.savez(tmp_path / "bpd.npz", bpd=np.zeros(3))  # no arr_0 at all: not said to be beside one
    assert foreign_npz(str(tmp_path / "bpd.npz")) == "holds bpd, not arr_0"
    np.savez(tmp_path / "empty.npz")
    assert foreign_npz(str(tmp_path / "empty.npz")) == "holds no arr_0"
    for out, extra, why, fix in ((reference, ["--out", str(reference)], "holds mu, sigma beside arr_0 (an ADM "
                                  "reference batch?)", "pass another --out"),
                                 (notes, [], "is no .npz archive", "pass --out FILE.npz")):
        before = out.read_bytes()
        with pytest.raises(SystemExit):
            run(argv + ["--sample-dir", str(tmp_path / "DIR"), *extra])
        assert one_line_error(capsys) == (f"error: {out} exists and {why}, where this job writes its samples' .npz: "
                                          f"{fix}, or move it away")
        assert out.read_bytes() == before and not (tmp_path / "DIR").exists()
    notes.unlink()
    assert run(argv + ["--sample-dir", str(tmp_path / "DIR")]) == str(notes)
    assert run(argv + ["--sample-dir", str(tmp_path / "DIR"), "--num-fid-samples", "3"]) == str(notes)
    assert np.load(notes)["arr_0"].shape == (3, 8, 8, 3)


def test_an_fid_folder_named_with_a_trailing_slash_puts_the_npz_beside_it(files, tmp_path):
    """--sample-dir DIR/ is DIR: the .npz is DIR.npz beside the folder, not a hidden .npz inside it."""
    argv = ["ODE", "--ckpt", files["pixel"], "--vae", "none", "--sampling-method", "euler", "--num-sampling-steps", 2,
            "--num-fid-samples", 2, "--sample-dir", f"{tmp_path / 's'}{os.sep}", *FAST]
    assert run(argv) == str(tmp_path / "s.npz")
    assert (tmp_path / "s.npz").is_file() and not (tmp_path / "s" / ".npz").exists()


def test_an_npz_write_cut_short_is_removed_by_the_next_run(files, tmp_path, capsys):
    """A job killed while writing the .npz leaves its temporary file (up to the .npz's size: 10 GB for
    50,000 images at 256px): the next run, holding the folder's lock, removes it and says so."""
    sample_dir = tmp_path / "s"
    (tmp_path / ".s.npz.tmp-4242").write_bytes(b"\0" * 2048)
    run(["ODE", "--ckpt", files["pixel"], "--vae", "none", "--sampling-method", "euler", "--num-sampling-steps", 2,
         "--num-fid-samples", 2, "--sample-dir", sample_dir, *FAST])
    assert (f"warning: removed 1 unfinished .npz write (.s.npz.tmp-4242; 2 KiB) from {tmp_path}, left by a sampling "
            f"job killed while writing") in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["s", "s.npz"]
    # --out names a file outside the locked folder, which another job (another --sample-dir) may be writing now
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".fid.npz.tmp-4242").write_bytes(b"\0" * 2048)
    run(["ODE", "--ckpt", files["pixel"], "--vae", "none", "--sampling-method", "euler", "--num-sampling-steps", 2,
         "--num-fid-samples", 2, "--sample-dir", sample_dir, "--out", tmp_path / "out" / "fid.npz", *FAST])
    assert (f"warning: {tmp_path / 'out'} holds 1 unfinished .npz write (.fid.npz.tmp-4242; 2 KiB), left by a "
            f"sampling job killed while writing") in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "out")) == [".fid.npz.tmp-4242", "fid.npz"]


@pytest.mark.parametrize("left_beside", [False, True])
def test_a_parts_folder_loses_its_lock_file_last(files, tmp_path, monkeypatch, left_beside):
    """OUT.parts/ was removed by shutil.rmtree, in the folder's listing order, its lock held: where the
    lock file went before the batches, a job started then took a new lock beside them, and was refused
    for batches without settings.json, or counted them as done before they went. The lock file goes
    last: whoever opens it meanwhile finds it held, and once it is gone no batch is left. So as a job
    ends, and where a job stopped between writing OUT and removing OUT.parts/ left the folder beside the
    finished file (left_beside), as the next job on OUT removes it."""
    torch.save(torch.randn(4, 3, 8, 8).clamp(-1, 1), tmp_path / "x.pt")
    out, parts = tmp_path / "bpd.npz", tmp_path / "bpd.npz.parts"
    argv = ["ODE", "--ckpt", files["pixel"], "--vae", "none", "--likelihood", "--data", tmp_path / "x.pt",
            "--batch-size", 2, "--out", out, "--sampling-method", "euler", "--num-sampling-steps", 2, *FAST]
    if left_beside:
        run(argv)
        parts.mkdir()  # as the stopped job left it: its lock file, its settings, its batches
        (parts / FolderLock.NAME).write_text("process 1 on host-a\n")
        (parts / "settings.json").write_text("{}")
        for k in range(2):
            torch.save(torch.zeros(2), parts / f"{k:06d}.pt")
    left = []  # what the folder held as its lock file went
    unlink, remove = os.unlink, os.remove

    def watched(real):
        def removing(path, *args, **kwargs):
            real(path, *args, **kwargs)
            if os.path.basename(path) == FolderLock.NAME:
                left.append(sorted(os.listdir(parts)) if parts.is_dir() else None)
        return removing

    monkeypatch.setattr(os, "unlink", watched(unlink))
    monkeypatch.setattr(os, "remove", watched(remove))
    run(argv)  # left_beside: finished, nothing computed, the folder removed
    assert out.is_file() and not parts.exists()
    assert left == [[]]


def test_a_second_likelihood_job_on_the_same_out_is_refused(files, tmp_path, capsys):
    """OUT.parts/ is locked as the FID folder is: two jobs with one --out mixed their batches."""
    torch.save(torch.randn(2, 3, 8, 8).clamp(-1, 1), tmp_path / "x.pt")
    out = tmp_path / "bpd.npz"
    (tmp_path / "bpd.npz.parts").mkdir()
    other = FolderLock(str(tmp_path / "bpd.npz.parts"), "--out")
    other.acquire()
    argv = ["ODE", "--ckpt", files["pixel"], "--vae", "none", "--likelihood", "--data", tmp_path / "x.pt",
            "--out", out, "--sampling-method", "euler", "--num-sampling-steps", 2, *FAST]
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit):
            run(argv)
        assert one_line_error(capsys).startswith(f"error: another job is writing into {out}.parts now (process ")
    finally:
        other.release()
    run(argv)
    run(argv)  # the first job's lock ended with it (a finished file is read, not recomputed)
    assert out.is_file() and not (tmp_path / "bpd.npz.parts").exists()


def refused_while_another_writes(path, argv, flag: str, capsys) -> None:
    """sample.py with argv ends in one line, exit 2, while another job (this process, as another would)
    holds the FileLock of `path`: wait, or pass another `flag`."""
    from sit_fast.files import FileLock

    other = FileLock(str(path), "--out")
    other.acquire()
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit) as exit_info:
            run(argv)
        assert exit_info.value.code == 2
        assert one_line_error(capsys) == (f"error: another job is writing {path} now (process {os.getpid()} on "
                                          f"{socket.gethostname()}): wait for it to end, or pass another {flag}")
    finally:
        other.release()


def test_a_second_job_given_the_same_out_file_is_refused_before_the_model_loads(files, tmp_path, capsys, monkeypatch):
    """Two jobs given one --out (FID jobs of two checkpoints or settings, each with its own --sample-dir, or
    an FID job and a --likelihood job) both wrote it, the last one silently: the file is locked from before
    the model loads (.NAME.lock beside it, removed with the lock), and the second job is refused at once.
    The lock is held here as another process would hold it."""
    torch.save(torch.randn(2, 3, 8, 8).clamp(-1, 1), tmp_path / "x.pt")
    out = tmp_path / "out.npz"
    common = ["ODE", "--ckpt", files["pixel"], "--vae", "none", "--sampling-method", "euler", "--num-sampling-steps", 2,
              "--out", out, *FAST]
    fid = common + ["--num-fid-samples", 2, "--sample-dir", tmp_path / "b"]
    likelihood = common + ["--likelihood", "--data", tmp_path / "x.pt"]
    loads = []
    real_setup = sample.Setup
    monkeypatch.setattr(sample, "Setup", lambda *a: loads.append(1) or real_setup(*a))
    for argv in (fid, likelihood):
        refused_while_another_writes(out, argv, "--out", capsys)
    assert not loads and sorted(os.listdir(tmp_path)) == ["x.pt"]  # refused before any work
    run(fid)
    assert sorted(os.listdir(tmp_path)) == ["b", "out.npz", "x.pt"]  # the lock's file goes with the lock


def test_an_fid_jobs_npz_beside_its_folder_is_refused_while_a_job_given_it_as_out_writes_it(files, tmp_path,
                                                                                            capsys):
    """The .npz an FID job writes beside its folder (no --out) is the file another job may be given as
    --out: each locks it, so that the second is refused instead of the last one's overwriting it."""
    npz = tmp_path / "s.npz"
    argv = ["ODE", "--ckpt", files["pixel"], "--vae", "none", "--sampling-method", "euler", "--num-sampling-steps", 2,
            "--num-fid-samples", 2, "--sample-dir", tmp_path / "s", *FAST]
    refused_while_another_writes(npz, argv, "--sample-dir", capsys)  # as a job given --out s.npz would hold it
    assert not npz.exists()
    run(argv)
    assert npz.is_file() and not [name for name in os.listdir(tmp_path) if name.endswith(".lock")]


@pytest.mark.parametrize("run_folder", [False, True])
def test_a_second_job_on_an_fid_folder_in_use_is_refused_before_the_model_loads(files, tmp_path, capsys, monkeypatch,
                                                                                run_folder):
    """The FID folder's lock was taken after the model and the VAE loaded (seconds to minutes): a job
    started on a folder in use was refused only then. Its path is known before (--sample-dir, and the run
    folder's name with --model), so it is refused before."""
    argv = ["ODE", "--ckpt", files["pixel"], "--vae", "none", "--sampling-method", "euler", "--num-sampling-steps", 2,
            "--num-fid-samples", 2, "--sample-dir", tmp_path, *FAST]
    if run_folder:
        argv += ["--run-folder", "--model", "SiT-T/2"]
    sample_dir = tmp_path / "s"
    if run_folder:
        sample_dir = tmp_path / "SiT-T-2-pixel-cfg-1.0-32-ODE-2-euler"
    else:
        argv += ["--sample-dir", sample_dir]
    sample_dir.mkdir()
    loads = []
    real_setup = sample.Setup
    monkeypatch.setattr(sample, "Setup", lambda *a: loads.append(1) or real_setup(*a))
    other = FolderLock(str(sample_dir), "--sample-dir")
    other.acquire()
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit):
            run(argv)
    finally:
        other.release()
    assert one_line_error(capsys).startswith(f"error: another job is writing into {sample_dir} now (process ")
    assert not loads
    run(argv)
    assert loads == [1] and (tmp_path / f"{sample_dir.name}.npz").is_file()


def test_png_writer_holds_at_most_two_batches(tmp_path, monkeypatch):
    """A sampler faster than its PNG writes queued every image of its share in memory: now write()
    waits until at most one earlier batch is queued."""
    import time

    from sit_fast import sampling

    written = []
    monkeypatch.setattr(sampling, "_write_png", lambda image, path: (time.sleep(0.01), written.append(path)))
    writer = sampling.PNGWriter(str(tmp_path), max_workers=1)
    queued = []
    for k in range(10):
        writer.write(np.zeros((4, 8, 8, 3), np.uint8), range(4 * k, 4 * k + 4))
        queued.append(sum(not f.done() for f in writer.futures))
    writer.close()
    assert len(written) == 40 and max(queued) <= 8 and max(queued) > 4, queued  # the writes lag, within bounds


def test_png_writer_raises_a_failed_write_at_the_next_batch(tmp_path, monkeypatch):
    """A write that failed stops the job at the next batch, not after sampling every other one."""
    from sit_fast import sampling

    def fail(image, path):
        raise OSError("disk gone")

    monkeypatch.setattr(sampling, "_write_png", fail)
    writer = sampling.PNGWriter(str(tmp_path), max_workers=1)
    writer.write(np.zeros((1, 8, 8, 3), np.uint8), [0])
    writer.futures[0].exception()  # waits for it
    with pytest.raises(OSError, match="disk gone"):
        writer.write(np.zeros((1, 8, 8, 3), np.uint8), [1])
    writer.pool.shutdown(wait=True)


def test_png_writer_as_a_context_finishes_its_writes_and_leaves_the_blocks_error_in_place(tmp_path, monkeypatch):
    """`with PNGWriter(...)` closes the writer on the way out: every queued PNG written, a failed write said
    (one line) where the block ended well; where the block raised, its error is the one raised, not the
    failed write's in its place."""
    from sit_fast import sampling
    from sit_fast.errors import UserError

    with sampling.PNGWriter(str(tmp_path), max_workers=1) as writer:
        writer.write(np.zeros((3, 8, 8, 3), np.uint8), range(3))
    assert sorted(os.listdir(tmp_path)) == ["000000.png", "000001.png", "000002.png"]
    assert writer.pool._shutdown

    def full(image, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(sampling, "_write_png", full)
    with pytest.raises(UserError, match=r"^cannot write \S+000003\.png \(No space left on device\): the 3 images "):
        with sampling.PNGWriter(str(tmp_path), max_workers=1) as writer:
            writer.write(np.zeros((1, 8, 8, 3), np.uint8), [3])
    for stop in (KeyboardInterrupt(), sample.NonFinite("non-finite samples")):
        with pytest.raises(type(stop)) as raised:
            with sampling.PNGWriter(str(tmp_path), max_workers=1) as writer:
                writer.write(np.zeros((1, 8, 8, 3), np.uint8), [4])
                writer.futures[0].exception()  # the write has failed
                raise stop
        assert raised.value is stop and writer.pool._shutdown


@pytest.mark.parametrize("waiting_in", ["close", "write", "a failed write"])
def test_png_writer_runs_a_signal_given_to_its_thread_while_a_write_is_in_flight(waiting_in, tmp_path, monkeypatch):
    """The kernel may give Ctrl-C to any thread that does not block it: given to a PNG writer's thread while
    the main thread waited for a write, its handler (a second Ctrl-C's ends the job at once) ran only once that
    write ended. Now the main thread runs it within a fraction of a second, while the write is still held;
    and a write waited for in write() when a first Ctrl-C came is still waited for by close(), where a
    second Ctrl-C is handled as promptly (it was no longer listed: close() waited for it unawake)."""
    import threading
    import time

    from sit_fast import sampling

    started, release, writers, handled = threading.Event(), threading.Event(), [], []
    held_index = 1 if waiting_in == "a failed write" else 0
    signals = 2 if waiting_in == "write" else 1

    class Handled(Exception):
        pass

    def handler(signum, frame):
        handled.append(release.is_set())  # False: the write was still held
        if len(handled) == signals:
            release.set()  # the writes left end at once
        raise Handled

    def held(image, path):
        index = int(os.path.basename(path)[:6])
        if index == 0 and waiting_in == "a failed write":  # fails at once; close() waits for the second
            raise OSError(errno.EIO, os.strerror(errno.EIO), path)
        if index == held_index:
            writers.append(threading.get_ident())
            started.set()
            release.wait(60)
        elif index == 1:
            time.sleep(0.5)  # ends after the first signal, before the second

    def signal_the_writer():
        assert started.wait(60)
        for wait in (0.3, 1.5)[:signals]:
            time.sleep(wait)  # the main thread waits by then
            signal.pthread_kill(writers[0], signal.SIGUSR1)
        release.wait(10)  # set sooner where the test has ended
        release.set()

    monkeypatch.setattr(sampling, "_write_png", held)
    previous = signal.signal(signal.SIGUSR1, handler)
    writer = sampling.PNGWriter(str(tmp_path), max_workers=2)
    kill = threading.Thread(target=signal_the_writer)
    try:
        writer.write(np.zeros((2, 8, 8, 3), np.uint8), [0, 1])
        kill.start()
        begun = time.monotonic()
        if waiting_in == "write":  # waits until at most one earlier batch (one image) is queued
            with pytest.raises(Handled):
                writer.write(np.zeros((1, 8, 8, 3), np.uint8), [2])
        with pytest.raises(Handled):
            writer.close()
        took = time.monotonic() - begun
        assert handled == [False] * signals, f"a handler ran once the write had ended ({took:.1f} s in)"
    finally:
        release.set()
        if kill.is_alive():
            kill.join()
        signal.signal(signal.SIGUSR1, previous)
        writer.pool.shutdown(wait=True)


def test_sample_ddp_offers_no_flag_its_help_leaves_out(capsys):
    """sample_ddp.py's hidden flags (of the jobs it refuses) are not offered as a fix: not as the other
    sampler's flag, nor as the flag meant."""
    for argv in (["SDE", "--likelihood"], ["ODE", "--likelyhood"]):
        with pytest.raises(SystemExit):
            sample.main(argv, defaults=sample.SAMPLE_DDP_DEFAULTS, prog="sample_ddp.py")
        assert one_line_error(capsys) == (f"error: unrecognized arguments: {argv[1]} (see sample_ddp.py {argv[0]} "
                                          f"--help)")


@pytest.mark.parametrize("data", [["--data", "x.npz"], []])
@pytest.mark.parametrize("job", ["--likelihood", "--reverse"])
def test_sample_ddp_sends_the_ode_jobs_to_sample_py(job, data, capsys):
    """Before anything else about the job (upstream's README ran --likelihood with sample_ddp.py and no data)."""
    with pytest.raises(SystemExit):
        sample.main(["ODE", job, *data], defaults=sample.SAMPLE_DDP_DEFAULTS, prog="sample_ddp.py")
    assert one_line_error(capsys) == (f"error: sample_ddp.py samples images for FID (--num-fid-samples, 50000 unless "
                                      f"given): run {job} with sample.py")


@pytest.mark.parametrize("mode", ["ODE", "SDE"])
def test_sample_ddp_help_shows_the_fid_job_alone(mode, capsys):
    """sample_ddp.py --help leaves out the flags of the jobs it refuses and gives its own defaults;
    sample.py's lists them all."""
    for defaults, prog in ((sample.SAMPLE_DDP_DEFAULTS, "sample_ddp.py"), (None, "sample.py")):
        with pytest.raises(SystemExit):
            sample.main([mode, "--help"], defaults=defaults, prog=prog)
        text = " ".join(capsys.readouterr().out.split())
        others = ["--data ", "--dataset ", "--class-labels "] + (["--likelihood", "--reverse", "--exact-divergence"]
                                                                  if mode == "ODE" else [])
        if prog == "sample_ddp.py":
            assert not [flag for flag in others if flag in text], text
            assert "(default: 1.0, as upstream)" in text and "for a grid" not in text
            assert "images per process per batch (default: 32)" in text
            assert "(default: beside the run's folder, SAMPLE_DIR/<run folder>.npz)" in text
        else:
            assert all(flag in text for flag in others) and "4.0 for a grid" in text


def test_the_sample_ddp_script_is_sample_py_with_upstreams_defaults(monkeypatch, capsys):
    """`python sample_ddp.py ODE --help`: the FID job's flags and defaults, under its own name."""
    import runpy

    monkeypatch.setattr(sys, "argv", ["sample_ddp.py", "ODE", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(os.path.join(REPO, "sample_ddp.py"), run_name="__main__")
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert text.startswith("usage: sample_ddp.py ODE") and "--likelihood" not in text, text
    assert "(default: 1.0, as upstream)" in text and "images per process per batch (default: 32)" in text, text


def test_sample_ddp_puts_each_run_in_upstreams_folder(files, tmp_path):
    """sample_ddp.py, as upstream's: SAMPLE_DIR/<name from the settings>/ and <name>.npz beside it, so
    a sweep over guidance scales or samplers needs no --sample-dir per run."""
    def sample_ddp(*argv):
        argv = [*argv, "--ckpt", files["pixel"], "--vae", "none", "--num-sampling-steps", 2,
                "--num-fid-samples", 3, "--per-proc-batch-size", 2, "--sample-dir", tmp_path, *FAST]
        return sample.main([str(a) for a in argv], defaults=sample.SAMPLE_DDP_DEFAULTS, prog="sample_ddp.py")

    runs = {"SiT-T-2-pixel-cfg-1.0-2-ODE-2-euler": ("ODE", "--sampling-method", "euler"),
            "SiT-T-2-pixel-cfg-1.5-2-ODE-2-euler": ("ODE", "--sampling-method", "euler", "--cfg-scale", 1.5),
            "SiT-T-2-pixel-cfg-1.0-2-SDE-2-Euler-sigma-Mean-0.04": ("SDE",)}
    for name, argv in runs.items():
        npz = sample_ddp(*argv)
        assert npz == str(tmp_path / f"{name}.npz")
        assert sorted(os.listdir(tmp_path / name)) == [".lock", "000000.png", "000001.png", "000002.png",
                                                       "settings.json"]
        with np.load(npz) as archive:
            assert archive["arr_0"].shape == (3, 8, 8, 3)
    assert sample.run_folder_name(argparse.Namespace(  # the checkpoint's name without .pt, .pth or .safetensors
        ckpt="a/my.pth", cfg_scale=1, batch_size=4, mode="ODE", num_sampling_steps=2, sampling_method="euler"),
        "SiT-XL/2") == "SiT-XL-2-my-cfg-1.0-4-ODE-2-euler"
    for ckpt, stem in (("b/ema.SafeTensors", "ema"), ("c/0400000.pt", "0400000"), ("d/weights.bin", "weights.bin")):
        assert sample.run_folder_name(argparse.Namespace(
            ckpt=ckpt, cfg_scale=4.0, batch_size=4, mode="ODE", num_sampling_steps=2, sampling_method="euler"),
            "SiT-XL/2").startswith(f"SiT-XL-2-{stem}-cfg-4.0")
    # --no-run-folder: SAMPLE_DIR itself, as sample.py does
    assert sample_ddp("ODE", "--sampling-method", "euler", "--no-run-folder") == f"{tmp_path}.npz"
    assert "000002.png" in os.listdir(tmp_path)


def test_a_run_folder_name_too_long_for_the_filesystem_is_said_so_before_sampling(files, tmp_path, capsys,
                                                                                  monkeypatch):
    """The run folder's name (or its .npz's) grows with the checkpoint's file name: past the longest file
    name the filesystem takes, that is said before any work, not blamed on --sample-dir (which a
    shorter value does not mend), nor, for the .npz, a traceback after all the sampling. Without --model
    (the model's name is read from the checkpoint) it is said before the model loads too, where the name
    is too long for every registry model's name."""
    sample_dir = tmp_path / "samples"
    argv = ["ODE", "--vae", "none", "--sampling-method", "euler", "--num-sampling-steps", 1, "--batch-size", 1,
            "--num-fid-samples", 1, "--sample-dir", sample_dir, "--run-folder", *FAST]
    long_name = tmp_path / f"{'c' * 250}.pt"  # SiT-T-2-<250 bytes>-cfg-1.0-1-ODE-1-euler: 280 bytes
    npz_too_long = tmp_path / f"{'d' * 223}.pt"  # 253 bytes: the folder fits, its .npz (257) does not
    for ckpt in (long_name, npz_too_long):
        shutil.copy(files["pixel"], ckpt)
    loads, real_setup = [], sample.Setup
    monkeypatch.setattr(sample, "Setup", lambda *a: loads.append(1) or real_setup(*a))
    capsys.readouterr()
    for model, said in (([], "<model>-ccc"), (["--model", "SiT-T/2"], "SiT-T-2-ccc")):
        with pytest.raises(SystemExit):
            run(argv + model + ["--ckpt", long_name])
        err = one_line_error(capsys)
        assert err.startswith(f"error: the run folder's name made from the settings, {said}"), err
        size = "at least 280 bytes" if not model else "280 bytes"
        assert f"({size}, the checkpoint's file name in it)" in err and "whatever --sample-dir" in err, err
        assert "give the checkpoint a shorter file name" in err and "--no-run-folder" in err, err
        with pytest.raises(SystemExit):
            run(argv + model + ["--ckpt", npz_too_long])
        err = one_line_error(capsys)
        assert err.startswith(f"error: the run folder's .npz name made from the settings, {said[:-4]}-ddd"), err
        assert f"({'at least ' if not model else ''}257 bytes" in err and "--out FILE.npz" in err, err
        assert not loads  # refused before the model loads
    assert not sample_dir.exists()  # nothing sampled, no folder made
    monkeypatch.undo()
    # --no-run-folder: the folder is --sample-dir's, whose .npz beside it is said to be too long likewise
    folder = tmp_path / ("e" * 253)
    no_run_folder = [a for a in argv if a != "--run-folder"] + ["--no-run-folder", "--ckpt", files["pixel"]]
    with pytest.raises(SystemExit):
        run([a if a != sample_dir else folder for a in no_run_folder])
    err = one_line_error(capsys)
    assert err.startswith(f"error: --sample-dir {folder}: the .npz beside the folder") and "--out FILE.npz" in err
    assert not folder.exists()
    run([a if a != sample_dir else folder for a in no_run_folder] + ["--out", tmp_path / "e.npz"])
    assert np.load(tmp_path / "e.npz")["arr_0"].shape == (1, 8, 8, 3)


def test_out_of_gpu_memory_names_the_flags_that_fit(files, tmp_path, capsys, monkeypatch):
    def run_grid(setup):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(sample, "run_grid", run_grid)
    with pytest.raises(SystemExit) as exit_info:
        run(["ODE", "--ckpt", files["latent"], "--vae", files["vae"], "--out", tmp_path / "g.png", *FAST])
    assert exit_info.value.code == 2
    err = one_line_error(capsys)
    assert "out of GPU memory" in err and "batches of 8 (guidance doubles" in err
    assert "--batch-size 4" in err and "--precision bf16" in err and "--vae-precision bf16" in err


@pytest.mark.parametrize("mode", ["ODE", "SDE"])
def test_a_step_count_past_all_memory_is_told_as_a_size_far_too_large(mode, files, tmp_path, capsys):
    """10^14 steps ask for more memory than any device has (their time grid alone: 400 TB): one line
    naming the step count, whether it fails building the sampler or sampling."""
    steps = str(10**14)
    with pytest.raises(SystemExit) as exit_info:
        run([mode, "--ckpt", files["latent"], "--vae", files["vae"], "--out", tmp_path / "g.png",
             "--num-sampling-steps", steps, "--batch-size", "2", *FAST])
    assert exit_info.value.code == 2
    err = one_line_error(capsys)
    assert re.fullmatch(r"error: out of (GPU )?memory on \S+: one allocation asked for \d+\.\d TiB, more than the "
                        rf"[\d.]+ [GT]iB it has in all: a size given is far too large \(check --num-sampling-steps "
                        rf"{steps}, --batch-size 2\)", err), err
    assert not (tmp_path / "g.png").exists()


def test_a_batch_size_near_2_to_the_63_is_told_as_a_size_far_too_large(files, tmp_path, capsys):
    """A batch whose noise is 2**63 bytes or more: torch's RuntimeError ("Storage size calculation overflowed")
    was a traceback, where a smaller size past all memory is a line naming the flags."""
    from sit_fast.errors import amount, device_bytes

    size = str(2**63 - 1)
    with pytest.raises(SystemExit) as exit_info:
        run(["ODE", "--ckpt", files["pixel"], "--vae", "none", "--sample-dir", tmp_path / "s", "--no-run-folder",
             "--num-fid-samples", 4, "--per-proc-batch-size", size, "--num-sampling-steps", 2, *FAST])
    assert exit_info.value.code == 2
    assert one_line_error(capsys) == (
        f"error: out of memory on cpu: one allocation asked for 2**63 bytes or more, more than the "
        f"{amount(device_bytes(torch.device('cpu')))} it has in all: a size given is far too large (check "
        f"--num-sampling-steps 2, --per-proc-batch-size {size})")  # the flag as given


#################################################################################
#                                 Likelihood                                     #
#################################################################################

def test_likelihood_gives_finite_bpd_for_images_and_latents(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sit_fast.progress, "LOG_INTERVAL", 0.0)  # a progress line per batch in a log
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    common = ["ODE", "--likelihood", "--sampling-method", "euler", "--num-sampling-steps", 3, *FAST]

    bpd = run(common + ["--ckpt", files["pixel"], "--vae", "none", "--data", folder, "--batch-size", 2])
    assert bpd.shape == (3,) and np.all(np.isfinite(bpd))
    captured = capsys.readouterr()
    out = captured.out
    progress = [line.split(",")[0].split(" in ")[0] for line in captured.err.splitlines()
                if line.startswith("likelihood: ")]  # 3 items in batches of 2: a line, then the closing line
    assert progress == ["likelihood: 2/3 item (67%)", "likelihood: 3/3 item (100%)"], captured.err
    assert "(8-bit pixels, uniform dequantization (+7 bits: the 1/128 Jacobian); D = 192; euler" in out, out
    assert re.search(r"^bpd \d+\.\d{4} \+- \d+\.\d{4} over 3 items \(", out, re.M), out
    one = tmp_path / "one"
    one.mkdir()
    Image.open(folder / "0.png").save(one / "0.png")
    assert run(common + ["--ckpt", files["pixel"], "--vae", "none", "--data", one]).shape == (1,)
    out = capsys.readouterr().out
    assert re.search(r"^bpd \d+\.\d{4} of 1 item \(", out, re.M) and "nan" not in out, out  # no spread of one
    # bf16: the matmul weights are stored in bf16 (cast_weights), and the divergence's gradients
    # still flow through them
    bpd_bf16 = run(common + ["--ckpt", files["pixel"], "--vae", "none", "--data", folder, "--batch-size", 2,
                             "--precision", "bf16"])
    assert bpd_bf16.shape == (3,) and np.all(np.isfinite(bpd_bf16))
    np.testing.assert_allclose(bpd_bf16, bpd, rtol=0.05)

    np.savez(tmp_path / "images.npz", arr_0=rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8))
    bpd = run(common + ["--ckpt", files["latent"], "--vae", files["vae"], "--data", tmp_path / "images.npz",
                        "--class-labels", 3, "--out", tmp_path / "bpd.npz"])
    assert bpd.shape == (2,) and np.all(np.isfinite(bpd))
    with np.load(tmp_path / "bpd.npz") as archive:
        np.testing.assert_array_equal(archive["bpd"], bpd)
    capsys.readouterr()
    bpd = run(common + ["--ckpt", files["pixel"], "--vae", "none", "--data", folder, "--out", tmp_path / "noext"])
    assert f"saved per-item bpd to {tmp_path / 'noext.npz'}\n" in capsys.readouterr().out  # the file written
    with np.load(tmp_path / "noext.npz") as archive:
        np.testing.assert_array_equal(archive["bpd"], bpd)

    torch.save(torch.randn(2, 4, 8, 8), tmp_path / "latents.pt")
    bpd = run(common + ["--ckpt", files["latent"], "--vae", files["vae"], "--data", tmp_path / "latents.pt"])
    assert np.all(np.isfinite(bpd))
    assert 0.5 < bpd.mean() < 5  # a sanity range: N(0, I) data has 2.05 bits per dimension of entropy


def test_images_are_encoded_a_batch_at_a_time(files):
    """Likelihood data through a VAE: uint8 images become floats one encoder batch at a time, with
    the same latents as one call on all of them."""
    from sit_fast.vae import load_vae

    codec = load_vae(files["vae"], "cpu")
    codec.batch_size = 2
    seen = []
    encode = codec.vae.encode
    codec.vae.encode = lambda x: seen.append(len(x)) or encode(x)
    images = np.random.default_rng().integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    latents = sample.encode_images(codec, images)
    assert seen == [2, 2, 1]
    whole = codec.encode(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1)[0]
    torch.testing.assert_close(latents, whole, rtol=0, atol=0)


def test_unreadable_or_empty_data_is_a_one_line_error(files, tmp_path, capsys):
    (tmp_path / "text.npz").write_text("garbage")
    np.savez(tmp_path / "empty.npz", arr_0=np.zeros((0, 8, 8, 3), np.uint8))
    torch.save(torch.zeros(0, 3, 8, 8), tmp_path / "empty.pt")
    np.savez(tmp_path / "number.npz", arr_0=np.float32(3))
    torch.save(torch.tensor(3.0), tmp_path / "number.pt")
    np.savez(tmp_path / "two.npz", a=np.zeros(2), b=np.zeros(2))
    nan = np.zeros((3, 3, 8, 8), np.float32)
    nan[1, 0, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", arr_0=nan)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "zero.png").write_bytes(b"")
    torch.save({"x": torch.zeros(2, 3, 8, 8)}, tmp_path / "dict.pt")
    np.savez(tmp_path / "int64.npz", arr_0=np.zeros((2, 8, 8, 3), np.int64))  # 8-bit images stored wider
    torch.save(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), tmp_path / "uint8.pt")
    (tmp_path / "no_images").mkdir()
    (tmp_path / "no_images" / "notes.txt").write_text("not an image")
    (tmp_path / "text.pt").write_text("garbage")
    (tmp_path / "json.pt").write_text('{"x": 1}')
    torch.save(np.zeros((2, 3, 8, 8), np.float32), tmp_path / "numpy.pt")  # torch.save's, but no tensor
    (tmp_path / "data.txt").write_text("0 1 2")
    cases = {
        "missing.npz": "error: --data {} does not exist",
        "text.npz": "error: cannot read {} (not an .npz archive): --data takes an .npz of arrays",
        "empty.npz": "error: --data {} holds no items",
        "empty.pt": "error: --data {} holds no items",
        "number.npz": "error: --data {} holds no items (a single number)",
        "number.pt": "error: --data {} holds no items (a single number)",
        "two.npz": "error: {} holds a, b: store the data as arr_0",
        "nan.npz": "error: {}: 1 of 3 items hold NaN or inf (the first: item 1)",
        "images": "error: cannot read image {}/zero.png (cannot identify image file",
        "dict.pt": "error: {} holds a dict, not a tensor of model inputs (N, C, h, w)",
        "int64.npz": "error: --data {} holds int64 values: give images as uint8 (N, H, W, C) (array.astype(np.uint8) "
                     "for 0..255 values) or model inputs as floats",
        "uint8.pt": "error: --data {} holds uint8 values: model inputs (N, C, h, w) are floats (images go in a folder "
                    "or a uint8 .npz)",
        "no_images": "error: --data {}: no images (.jpg,",
        "text.pt": "error: cannot read {} (not torch.save's or damaged: ",  # torch's reason, not its advice
        "numpy.pt": "error: cannot read {} (it holds objects other than tensors (numpy.",
        "json.pt": "error: cannot read {} (it is a JSON or text file): --data takes a tensor of model inputs saved by "
                   "torch.save, an .npz or a folder of images",
        "data.txt": "error: --data {}: expected a folder of images, an .npz or a .pt (.pth) file",
    }
    for job in ("--likelihood", "--reverse"):
        for name, expected in cases.items():
            path = tmp_path / name
            with pytest.raises(SystemExit) as exit_info:
                run(["ODE", job, "--ckpt", files["pixel"], "--vae", "none", "--data", path, "--out",
                     tmp_path / ("bpd.npz" if job == "--likelihood" else "z.pt"), *FAST])
            assert exit_info.value.code == 2
            assert one_line_error(capsys).startswith(expected.format(path)), name
    with pytest.raises(SystemExit):  # 4 input channels: no image is read as those
        run(["ODE", "--likelihood", "--ckpt", files["latent"], "--vae", "none", "--data", tmp_path / "images", *FAST])
    assert one_line_error(capsys) == (f"error: --data {tmp_path / 'images'}: images are read as gray or RGB, the "
                                      f"model takes 4 channels: pass its inputs as a .pt or a float .npz")


def test_model_inputs_of_another_shape_are_refused_in_one_line(files, tmp_path, capsys):
    """A .pt or float .npz whose items are not the model's (C, h, w) is refused before any work, naming
    both shapes, and leaves no OUT.parts/."""
    torch.save(torch.zeros(2, 3, 16, 16), tmp_path / "big.pt")
    np.savez(tmp_path / "wide.npz", arr_0=np.zeros((2, 4, 8, 8), np.float32))
    for name, shape, job, out in (("big.pt", "(2, 3, 16, 16)", "--likelihood", "bpd.npz"),
                                  ("wide.npz", "(2, 4, 8, 8)", "--reverse", "z.pt")):
        with pytest.raises(SystemExit) as exit_info:
            run(["ODE", job, "--ckpt", files["pixel"], "--vae", "none", "--data", tmp_path / name,
                 "--out", tmp_path / out, "--num-sampling-steps", 2, "--sampling-method", "euler", *FAST])
        assert exit_info.value.code == 2
        assert one_line_error(capsys) == (f"error: {tmp_path / name}: data of shape {shape}, the model takes "
                                          f"(N, 3, 8, 8)")
    assert sorted(os.listdir(tmp_path)) == ["big.pt", "wide.npz"]


def test_likelihood_reads_gray_arrays_and_image_folder_roots(tmp_path):
    """A gray N x H x W .npz, the same gray stored as RGB (a 1-channel model's FID .npz) and an
    ImageFolder root (images in class sub-folders) all give the same bits per dimension."""
    torch.save(random_sit(1, learn_sigma=False).state_dict(), tmp_path / "gray.pt")
    gray = np.random.default_rng(1).integers(0, 256, (2, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "gray.npz", arr_0=gray)
    np.savez(tmp_path / "rgb.npz", arr_0=np.repeat(gray[..., None], 3, axis=-1))
    for c in range(2):
        (tmp_path / "root" / f"class{c}").mkdir(parents=True)
        Image.fromarray(gray[c]).save(tmp_path / "root" / f"class{c}" / "0.png")
    common = ["ODE", "--likelihood", "--ckpt", tmp_path / "gray.pt", "--vae", "none", "--sampling-method", "euler",
              "--num-sampling-steps", 3, *FAST]
    bpd = [run(common + ["--data", tmp_path / name]) for name in ("gray.npz", "rgb.npz", "root")]
    assert bpd[0].shape == (2,) and np.all(np.isfinite(bpd[0]))
    np.testing.assert_array_equal(bpd[1], bpd[0])
    np.testing.assert_array_equal(bpd[2], bpd[0])


def test_image_arrays_are_checked_against_the_models_image_size_and_channels():
    """Gray stored as RGB stays RGB for an RGB model (it is taken as gray for a gray one); images that
    are not square, or not of the model's size, are refused naming their shape, and images of other
    channels naming their count."""
    from sit_fast.errors import UserError

    gray_as_rgb = np.repeat(np.random.default_rng(0).integers(0, 256, (2, 8, 8, 1), dtype=np.uint8), 3, axis=-1)
    assert sample.check_image_array(gray_as_rgb, 8, 3, "x.npz").shape == (2, 8, 8, 3)
    assert sample.check_image_array(gray_as_rgb, 8, 1, "x.npz").shape == (2, 8, 8, 1)
    for shape in ((2, 8, 6, 3), (2, 6, 8, 3), (2, 4, 4, 3)):
        with pytest.raises(UserError, match=re.escape(f"x.npz: images of shape {shape[1:]} do not match the model's "
                                                      f"image size 8")):
            sample.check_image_array(np.zeros(shape, np.uint8), 8, 3, "x.npz")
    colour = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    with pytest.raises(UserError, match=re.escape("x.npz: images with 3 channels, the model takes 1")):
        sample.check_image_array(colour, 8, 1, "x.npz")
    with pytest.raises(UserError, match=re.escape("x.npz: images with 1 channels, the VAE encodes RGB images")):
        sample.check_image_array(colour[..., :1], 8, 3, "x.npz", vae=True)
    with pytest.raises(UserError, match=re.escape("x.npz: images with 1 channels, the model takes 3")):
        sample.check_image_array(colour[..., :1], 8, 3, "x.npz")  # an RGB model in pixel space


def test_the_headers_of_every_image_of_a_processs_batches_are_checked(tmp_path):
    """Batches of 2 of 5 images, 3.png no image: batch 1 (images 2 and 3) is refused, batches 0 and 2 are not."""
    from sit_fast.errors import UserError

    for i in range(5):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "3.png").write_bytes(b"not an image")
    x = sample.DequantizedImages(sample.ImageFiles(str(tmp_path), 8, 3), 256, 0)
    sample.check_items(x, [0, 2], 2)
    with pytest.raises(UserError, match=re.escape(f"cannot read image {tmp_path / '3.png'}")):
        sample.check_items(x, [1], 2)


def test_likelihood_labels_are_one_for_all_items_or_one_per_item():
    import types

    def labels(given, count):
        args = argparse.Namespace(class_labels=given)
        return sample.data_labels(types.SimpleNamespace(args=args, num_classes=NUM_CLASSES), count).tolist()

    assert labels(None, 2) == [NUM_CLASSES] * 2 and labels([3], 3) == [3] * 3 and labels([1, 2, 3], 3) == [1, 2, 3]
    for given in ([1, 2], [1, 2, 3, 4]):
        with pytest.raises(sample.UserError, match=f"give one label for all 3 items or one per item, not {len(given)}"):
            labels(given, 3)
    assert labels([0, NUM_CLASSES], 2) == [0, NUM_CLASSES]  # the null class may be given
    for bad in (-1, NUM_CLASSES + 1):
        with pytest.raises(sample.UserError, match=rf"^--class-labels {bad} is outside 0 \.\. {NUM_CLASSES} "
                                                   rf"\({NUM_CLASSES}: null\)$"):
            labels([1, bad], 2)


def test_an_image_folder_is_read_a_batch_at_a_time(files, tmp_path, capsys, monkeypatch):
    """--data FOLDER: the headers of the pending batches' images are read before any work (a file that
    is no image stops the run with nothing computed, nor left), the pixels as each batch comes: a resume reads
    only the images of the batches left, and a truncated image stops the run in its batch, the batches
    before it kept. The bpd are those of the same images in an .npz."""
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    folder, out, parts = tmp_path / "images", tmp_path / "bpd.npz", tmp_path / "bpd.npz.parts"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i}.png")
    np.savez(tmp_path / "images.npz", arr_0=images)
    common = ["ODE", "--likelihood", "--ckpt", files["pixel"], "--vae", "none", "--batch-size", 2,
              "--sampling-method", "euler", "--num-sampling-steps", 3, *FAST]
    whole = run(common + ["--data", tmp_path / "images.npz"])
    argv = common + ["--data", folder, "--out", out]
    good = (folder / "4.png").read_bytes()
    read, real = [], sample.ImageFiles.__getitem__
    monkeypatch.setattr(sample.ImageFiles, "__getitem__",
                        lambda self, items: read.append(range(len(self))[items]) or real(self, items))
    capsys.readouterr()
    for damaged, reason, kept in ((b"not an image", "cannot identify image file", []),
                                  (good[: len(good) // 2], "image file is truncated", ["000000.pt", "000001.pt"])):
        (folder / "4.png").write_bytes(damaged)
        with pytest.raises(SystemExit) as exit_info:
            run(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"error: cannot read image {folder / '4.png'} ({reason}"), err
        if kept:
            assert sorted(os.listdir(parts)) == [".lock"] + kept + ["settings.json"]
        else:  # nothing computed: no OUT.parts/ left holding settings.json alone
            assert not parts.exists()
    assert read == [range(0, 2), range(2, 4), range(4, 5)]
    (folder / "4.png").write_bytes(good)
    read.clear()
    np.testing.assert_array_equal(run(argv), whole)
    assert read == [range(4, 5)]


def test_a_data_folder_holds_the_images_train_py_reads(tmp_path):
    """--data FOLDER takes the files of an ImageFolder root that train.py's --data-path takes: every
    extension it reads, and class folders that are symbolic links."""
    from sit_fast.data import IMG_EXTENSIONS, find_images

    images = np.random.default_rng().integers(0, 256, (len(IMG_EXTENSIONS), 8, 8, 3), dtype=np.uint8)
    for i, (extension, image) in enumerate(zip(IMG_EXTENSIONS, images)):
        folder = tmp_path / ("root" if i < 2 else "elsewhere") / f"class{i}"
        folder.mkdir(parents=True)
        Image.fromarray(image[..., 0] if extension == ".pgm" else image).save(folder / f"{i}{extension.upper()}")
        if i >= 2:
            (tmp_path / "root" / f"class{i}").symlink_to(folder)
    root = tmp_path / "root"
    files = sample.ImageFiles(str(root), 8, 3)
    assert [str(root / name) for name in files.names] == [path for path, _ in find_images(str(root))[0]]
    read = files[:]
    lossless = [i for i, e in enumerate(IMG_EXTENSIONS) if e in (".png", ".ppm", ".bmp", ".tif", ".tiff")]
    np.testing.assert_array_equal(read[lossless], images[lossless])


def test_a_data_folder_leaves_out_hidden_files_hidden_folders_and_link_loops_with_warnings(tmp_path, caplog):
    """As train.py's --data-path: macOS's ._NAME (no image: it would stop the run), a copy under the root's
    .ipynb_checkpoints/ (an extra item in the bpd), and a link back to the root (every image again at each
    level) are left out, each kind named in one warning."""
    for name in ("a.png", ".ipynb_checkpoints/a-checkpoint.png", "sub/b.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    (tmp_path / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (tmp_path / "sub" / "up").symlink_to(tmp_path)
    with caplog.at_level(logging.WARNING, logger="sit_fast"):
        files = sample.ImageFiles(str(tmp_path), 8, 3)
    assert files.names == ["a.png", os.path.join("sub", "b.png")] and files[:].shape == (2, 8, 8, 3)
    assert [r.getMessage() for r in caplog.records] == [
        f"--data {tmp_path}: 2 hidden file(s) or hidden folder(s) holding images left out ("
        "._a.png and more), as train.py's --data-path leaves them",
        f"--data {tmp_path}: 1 linked folder(s) reached again (a link loop, or a second link to one folder), whose "
        f"images are taken once, left out ({tmp_path / 'sub' / 'up'}), as train.py's --data-path leaves them"]


def test_a_data_sub_folder_that_cannot_be_listed_is_named_not_left_out(tmp_path, monkeypatch):
    """A sub-folder of --data that cannot be listed (no permission) was left out unsaid: its images were
    missing from the bpd's items. One line naming it, as train.py's --data-path."""
    from sit_fast.errors import UserError

    for name in ("a.png", "sub/b.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    fail_listing(monkeypatch, tmp_path / "sub", errno.EACCES)
    with pytest.raises(UserError) as info:
        sample.ImageFiles(str(tmp_path), 8, 3)
    assert str(info.value) == (f"cannot read the folder {tmp_path / 'sub'} (Permission denied), whose images would "
                               f"be left out: make it readable, or move it out of --data")


def test_a_hidden_data_folder_that_cannot_be_listed_is_left_out_as_its_images_are(tmp_path, monkeypatch, caplog):
    """A hidden folder of --data's root (another user's .Trash-1000) is not listed, its images being left out
    anyway: one that cannot be read is no error; the warning names it where it can be seen to hold images."""
    for name in ("a.png", ".Trash-1000/x.png", ".seen/y.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    fail_listing(monkeypatch, tmp_path / ".Trash-1000", errno.EACCES)
    with caplog.at_level(logging.WARNING, logger="sit_fast"):
        files = sample.ImageFiles(str(tmp_path), 8, 3)
    assert files.names == ["a.png"]
    assert [r.getMessage() for r in caplog.records] == [
        f"--data {tmp_path}: 1 hidden file(s) or hidden folder(s) holding images left out (.seen), "
        "as train.py's --data-path leaves them"]


def test_an_image_past_pils_pixel_limit_is_named(tmp_path, monkeypatch):
    from sit_fast.errors import UserError

    Image.fromarray(np.zeros((24, 20, 3), np.uint8)).save(tmp_path / "0.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # the 20x24 image is past twice the limit
    with pytest.raises(UserError, match=r"cannot read image \S+0.png \(Image size \(480 pixels\) exceeds .*\): "
                                        r"remove or replace it"):
        sample.ImageFiles(str(tmp_path), 8, 3).check([0])


def test_a_floating_point_image_is_named_by_the_check_before_any_is_read(tmp_path, monkeypatch):
    """Its pixels have no fixed range: the header check refuses it as reading it would, and reads no pixels."""
    from sit_fast.data import DataError

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "0.png")
    Image.fromarray(np.zeros((8, 8), np.float32), "F").save(tmp_path / "1.tiff")
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("pixels read"))
    files = sample.ImageFiles(str(tmp_path), 8, 3)
    files.check([0])
    with pytest.raises(DataError, match=r"^image \S+1\.tiff holds floating-point pixels \(PIL mode F\)"):
        files.check([0, 1])


def test_an_image_whose_header_pil_refuses_with_a_value_error_is_named(tmp_path):
    """A PPM whose header holds no number: PIL's ValueError, no OSError, named in one line."""
    from sit_fast.errors import UserError

    (tmp_path / "0.ppm").write_bytes(b"P6\n2x 4\n255\n" + bytes(24))
    with pytest.raises(UserError, match=r"^cannot read image \S+0.ppm \(invalid literal .*\): remove or replace it$"):
        sample.ImageFiles(str(tmp_path), 8, 3).check([0])


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes")
def test_a_named_pipe_with_an_image_name_is_named_by_the_check_not_opened(tmp_path):
    """Opening a named pipe waits for a writer: the check refuses it, naming it, without opening it."""
    from sit_fast.errors import UserError
    from tests.oserrors import errors_of_a_read_of_a_pipe

    os.mkfifo(tmp_path / "0.png")
    outcome = errors_of_a_read_of_a_pipe(lambda: sample.ImageFiles(str(tmp_path), 8, 3).check([0]),
                                         tmp_path / "0.png", UserError)
    assert outcome == [f"cannot read image {tmp_path / '0.png'} (not a regular file: a named pipe, a socket or a "
                       f"device): remove or replace it"]


def test_the_check_reads_a_linked_image_and_names_one_removed_after_the_listing(tmp_path):
    """A file that is a link to an image is that image, checked and read; an image removed after the
    listing is named in one line, as one PIL refuses is."""
    from sit_fast.errors import UserError

    images = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    (tmp_path / "store").mkdir()
    (tmp_path / "data").mkdir()
    Image.fromarray(images[0]).save(tmp_path / "store" / "a.png")
    os.symlink(tmp_path / "store" / "a.png", tmp_path / "data" / "0.png")
    Image.fromarray(images[1]).save(tmp_path / "data" / "1.png")
    files = sample.ImageFiles(str(tmp_path / "data"), 8, 3)
    files.check([0, 1])
    np.testing.assert_array_equal(files[:], images)
    os.remove(tmp_path / "data" / "1.png")
    with pytest.raises(UserError, match=r"^cannot read image \S+1.png \(No such file or directory, ENOENT\): "
                                        r"remove or replace it$"):
        files.check([1])


def test_npz_data_is_memory_mapped_where_it_is_stored_uncompressed(tmp_path):
    """np.savez's archives (and the FID job's) are mapped, not read: a process reads only the rows it
    indexes; np.savez_compressed's are read whole. Both give the array."""
    images = np.random.default_rng().integers(0, 256, (4, 6, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "stored.npz", labels=np.arange(4), arr_0=images)
    np.savez_compressed(tmp_path / "compressed.npz", arr_0=images)
    mapped = npz_array(str(tmp_path / "stored.npz"))
    assert isinstance(mapped, np.memmap)
    np.testing.assert_array_equal(mapped, images)
    np.testing.assert_array_equal(npz_array(str(tmp_path / "stored.npz"), "labels"), np.arange(4))
    read = npz_array(str(tmp_path / "compressed.npz"))
    assert not isinstance(read, np.memmap)
    np.testing.assert_array_equal(read, images)


def test_a_fortran_ordered_npz_array_is_mapped_in_its_own_order(tmp_path):
    """An array saved column-major (np.asfortranarray, or a transpose) maps as saved, not scrambled."""
    images = np.asfortranarray(np.random.default_rng().integers(0, 256, (2, 3, 4, 3), dtype=np.uint8))
    np.savez(tmp_path / "f.npz", arr_0=images)
    mapped = npz_array(str(tmp_path / "f.npz"))
    assert isinstance(mapped, np.memmap)
    np.testing.assert_array_equal(mapped, images)


def test_random_labels_cover_every_class():
    """Uniform labels (not class-balanced) reach the last class too; one class gives only it."""
    _, labels = index_noise(0, range(300), (1,), 3)
    assert set(labels.tolist()) == {0, 1, 2}
    assert index_noise(0, range(5), (1,), 1)[1].tolist() == [0] * 5


def test_pending_chunks_stop_at_the_sample_count(tmp_path):
    """The last chunk ends at the sample count: a folder holding them all has none pending."""
    folder = str(tmp_path)
    for i in range(7):
        open(png_path(folder, i), "wb").close()
    assert pending_chunks(folder, 7, 2) == []
    os.remove(png_path(folder, 6))
    os.remove(png_path(folder, 2))
    assert pending_chunks(folder, 7, 2) == [1, 3]
    assert pending_chunks(str(tmp_path / "none"), 7, 2) == [0, 1, 2, 3]


def test_settings_differences_name_a_setting_the_record_lacks(tmp_path):
    """Only the settings recorded since a later version (the checkpoint's digest) may be missing."""
    assert settings_differences({"seed": 0}, {"seed": 0, "cfg_scale": 4.0}) == "cfg_scale: not recorded there, 4.0 now"
    assert settings_differences({"vae": None}, {"vae": "ema"}) == "vae: none there, 'ema' now"
    assert settings_differences({"vae": "ema"}, {"vae": None}) == "vae: 'ema' there, none now"
    assert settings_differences({"seed": 0}, {"seed": 0, "ckpt_digest": "ab"}) == ""
    assert settings_differences({"ckpt_digest": "ab"}, {"ckpt_digest": "cd"}) == "ckpt_digest: 'ab' there, 'cd' now"
    # a checkpoint by its digest where both hold one and it is a zip archive (torch.save's): the same
    # file elsewhere is the same, another is not; a file of another format (its digest sampled) by its path
    archive, other = str(tmp_path / "b.pt"), str(tmp_path / "b.safetensors")
    torch.save({"w": torch.zeros(1)}, archive)
    with open(other, "wb") as f:
        f.write(b"\0" * 64)
    assert settings_differences({"ckpt": "/a.pt", "ckpt_digest": "ab"}, {"ckpt": archive, "ckpt_digest": "ab"}) == ""
    assert settings_differences({"ckpt": "/a.pt", "ckpt_digest": "ab"}, {"ckpt": other, "ckpt_digest": "ab"}) == (
        f"ckpt: '/a.pt' there, {other!r} now")
    assert settings_differences({"ckpt": "/a.pt", "ckpt_digest": "ab"}, {"ckpt": "/b.pt", "ckpt_digest": "cd"}) == (
        "ckpt: '/a.pt' there, '/b.pt' now; ckpt_digest: 'ab' there, 'cd' now")
    assert settings_differences({"ckpt": "/a.pt"}, {"ckpt": "/b.pt", "ckpt_digest": "ab"}) == (
        "ckpt: '/a.pt' there, '/b.pt' now")  # a record without the digest: by the path
    assert settings_differences({"ckpt": "/a.pt"}, {"ckpt": "/b.pt"}) == "ckpt: '/a.pt' there, '/b.pt' now"
    # a data folder's digest is of its image names alone: another folder of those names is other data
    assert settings_differences({"data": "/a", "data_digest": "ab"}, {"data": "/b", "data_digest": "ab"}) == (
        "data: '/a' there, '/b' now")


def test_settings_differences_name_the_first_three_and_mark_more():
    three = {"a": 1, "b": 2, "c": 3}
    named = "a: not recorded there, 1 now; b: not recorded there, 2 now; c: not recorded there, 3 now"
    assert settings_differences({}, three) == named
    assert settings_differences({}, {**three, "d": 4}) == named + " ..."


def test_settings_differences_name_a_setting_by_its_flag_where_one_sets_it():
    flags = {"seed": "--seed", "batch_size": "--per-proc-batch-size"}
    assert settings_differences({"seed": 0, "batch_size": 2, "ckpt_digest": "ab"},
                                {"seed": 1, "batch_size": 4, "ckpt_digest": "cd"}, flags=flags) == (
        "--seed: 0 there, 1 now; --per-proc-batch-size: 2 there, 4 now; ckpt_digest: 'ab' there, 'cd' now")


def test_a_folder_whose_run_stopped_before_its_first_output_takes_the_new_settings(tmp_path):
    """settings.json beside no outputs yet (out of memory at the first batch, say) is no reason to refuse a
    run with other settings: they are recorded instead."""
    from sit_fast.sampling import check_settings

    folder = tmp_path / "samples"
    check_settings(str(folder), {"seed": 0, "cfg_scale": 4.0})
    check_settings(str(folder), {"seed": 1, "cfg_scale": 4.0})
    assert json.loads((folder / "settings.json").read_text()) == {"seed": 1, "cfg_scale": 4.0, "holds": "samples"}


def test_a_folder_holding_another_kinds_record_is_refused_not_taken_over(tmp_path):
    """A settings.json of another kind of folder (an FID folder given as a latent cache's --out, its
    images not there yet) is refused, where it was replaced; one written before records said what they
    are for is told by its keys; a folder in place of settings.json is one line."""
    from sit_fast.errors import UserError
    from sit_fast.sampling import check_settings

    fid, cache = {"seed": 0, "cfg_scale": 1.5, "num_sampling_steps": 250, "vae": "ema"}, {"vae": "ema", "dtype": "f"}
    folder = tmp_path / "samples"
    check_settings(str(folder), fid)
    with pytest.raises(UserError) as info:
        check_settings(str(folder), cache, holds="latents", flag="--out", outputs=r"shard-\d{5}\.pt")
    assert str(info.value) == (f"{folder / 'settings.json'} records the settings of something else (cfg_scale, "
                               f"num_sampling_steps, seed), not of latents: pass another --out")
    older = dict(fid)  # no "holds": most of its keys are not the cache's
    (folder / "settings.json").write_text(json.dumps(older))
    with pytest.raises(UserError, match="records the settings of something else"):
        check_settings(str(folder), cache, holds="latents", flag="--out", outputs=r"shard-\d{5}\.pt")
    check_settings(str(folder), {**fid, "atol": 1e-6})  # the same kind's, with a flag of the other sampler
    (tmp_path / "odd" / "settings.json").mkdir(parents=True)
    with pytest.raises(UserError, match=r"settings.json is a folder, where the settings of the samples in .* are "
                                        r"recorded: move it, or pass another --sample-dir"):
        check_settings(str(tmp_path / "odd"), fid)


def test_outputs_without_a_settings_record_are_counted_naming_the_first(tmp_path):
    from sit_fast.errors import UserError
    from sit_fast.sampling import check_settings

    folder = tmp_path / "samples"
    folder.mkdir()
    for index in (3, 1):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(png_path(str(folder), index))
    with pytest.raises(UserError) as info:
        check_settings(str(folder), {"seed": 0})
    assert str(info.value) == (f"{folder} holds samples (2 files like 000001.png) but no settings.json, so what "
                               f"made them is unknown: pass another --sample-dir, or delete them to start over")


def test_a_settings_record_that_is_not_a_dict_is_named_with_how_to_go_on(tmp_path):
    from sit_fast.errors import UserError
    from sit_fast.sampling import check_settings

    folder = tmp_path / "samples"
    folder.mkdir()
    (folder / "settings.json").write_text("[1, 2]\n")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "000000.png")
    with pytest.raises(UserError) as info:
        check_settings(str(folder), {"seed": 0})
    assert str(info.value) == (f"cannot read {folder / 'settings.json'} (not a dict): it records the settings of "
                               f"the samples in {folder}; restore it, or pass another --sample-dir")


def test_a_sampler_that_makes_other_calls_than_predicted_is_caught():
    """--cfg-interval's host-side schedule holds only if the sampler calls the model at the predicted
    times: fewer calls, or more, are errors, not a guidance schedule off by some steps."""
    import types

    forwards = types.SimpleNamespace(label_pair=lambda y: torch.cat([y, y]), conditional=lambda x, t, y: x,
                                     guided=lambda x, t, y_pair: -x)
    denoiser = Denoiser(forwards, cfg_scale=4.0, cfg_interval=(0.5, 1.0), call_times=[0.0, 0.25, 0.5, 0.75])
    fn = denoiser.for_labels(torch.tensor([1]))
    x = torch.ones(1, 3, 2, 2)
    for t in (0.0, 0.25, 0.5):
        fn(x, torch.full((1,), t))
    with pytest.raises(RuntimeError, match="made 3 model calls, model_call_times predicted 4"):
        fn.check_finished()
    fn(x, torch.full((1,), 0.75))
    fn.check_finished()
    assert fn.guided_calls == 2
    with pytest.raises(RuntimeError, match="more model calls"):
        fn(x, torch.ones(1))


def test_cfg_interval_takes_in_its_bounds_and_a_scale_of_one_guides_nothing():
    """Calls at t = LOW and t = HIGH are guided, decided from the schedule or from t alike; at --cfg-scale 1
    no call is guided and the interval is not checked against the schedule."""
    import types

    forwards = types.SimpleNamespace(label_pair=lambda y: torch.cat([y, y]), conditional=lambda x, t, y: x,
                                     guided=lambda x, t, y_pair: -x)
    times, x = [0.0, 0.25, 0.5, 0.75], torch.ones(1, 3, 2, 2)
    for call_times in (times, None):
        fn = Denoiser(forwards, cfg_scale=4.0, cfg_interval=(0.25, 0.5), call_times=call_times).for_labels(
            torch.tensor([1]))
        assert [fn(x, torch.full((1,), t))[0, 0, 0, 0].item() for t in times] == [1.0, -1.0, -1.0, 1.0]
        assert fn.guided_calls == 2
    denoiser = Denoiser(forwards, cfg_scale=1.0, cfg_interval=(0.9, 1.0), call_times=times)
    fn = denoiser.for_labels(torch.tensor([1]))
    assert [fn(x, torch.full((1,), t))[0, 0, 0, 0].item() for t in times] == [1.0] * 4
    assert fn.guided_calls == 0 and fn.y_pair is None and denoiser.cfg_interval is None


def test_cfg_interval_ends_take_in_the_grid_times_that_float32_rounds_past_them():
    """A 10-step Euler grid's t = 0.3 and 0.7 are float32 (0.30000001, 0.69999999): --cfg-interval 0.7 1
    guides the calls at 0.7, 0.8 and 0.9, and 0 0.3 those at 0, 0.1, 0.2 and 0.3, decided from the schedule or
    from t alike."""
    import types

    forwards = types.SimpleNamespace(label_pair=lambda y: torch.cat([y, y]), conditional=lambda x, t, y: x,
                                     guided=lambda x, t, y_pair: -x)
    times = model_call_times("ODE", create_transport(), sampling_method="euler", num_steps=10)
    assert len(times) == 10 and times[7] != 0.7 and times[3] != 0.3
    for interval, guided in (((0.7, 1.0), 3), ((0.0, 0.3), 4)):
        for call_times in (times, None):
            fn = Denoiser(forwards, cfg_scale=4.0, cfg_interval=interval, call_times=call_times).for_labels(
                torch.tensor([1]))
            for t in times:
                fn(torch.ones(1, 3, 2, 2), torch.full((1,), t))
            assert fn.guided_calls == guided, (interval, call_times)


def test_a_guided_call_passes_the_labels_and_the_null_label_an_unguided_one_the_labels():
    import types

    seen = []
    forwards = types.SimpleNamespace(label_pair=lambda y: torch.cat([y, torch.full_like(y, 10)]),
                                     conditional=lambda x, t, y: seen.append(("conditional", y.tolist())) or x,
                                     guided=lambda x, t, y_pair: seen.append(("guided", y_pair.tolist())) or -x)
    x, t = torch.ones(2, 3, 2, 2), torch.zeros(2)
    for scale in (4.0, 1.0):
        Denoiser(forwards, cfg_scale=scale).for_labels(torch.tensor([1, 2]))(x, t)
    assert seen == [("guided", [1, 2, 10, 10]), ("conditional", [1, 2])]


def test_an_interval_whose_low_exceeds_its_high_is_refused_and_one_of_a_single_time_guides_it():
    import types

    from sit_fast.errors import UserError

    forwards = types.SimpleNamespace(label_pair=lambda y: torch.cat([y, y]), conditional=lambda x, t, y: x,
                                     guided=lambda x, t, y_pair: -x)
    with pytest.raises(UserError, match=r"^--cfg-interval 0\.6 0\.4: LOW must not exceed HIGH$"):
        Denoiser(forwards, cfg_scale=4.0, cfg_interval=(0.6, 0.4))
    denoiser = Denoiser(forwards, cfg_scale=4.0, cfg_interval=(0.5, 0.5), call_times=[0.25, 0.5])
    fn = denoiser.for_labels(torch.tensor([1]))
    x = torch.ones(1, 3, 2, 2)
    assert [fn(x, torch.full((1,), t))[0, 0, 0, 0].item() for t in (0.25, 0.5)] == [1.0, -1.0]


def test_model_call_times_refuses_an_unknown_sampler_kind():
    with pytest.raises(ValueError, match="unknown sampler kind 'ode'"):
        model_call_times("ode", create_transport(), sampling_method="euler", num_steps=4)


def test_likelihood_of_the_digits_dequantises_their_17_levels(tmp_path):
    """--dataset digits: every one of the 1,797 digits, each value in its level's bin of width 2/17
    (train.py's k / 8 - 1 spans the same [-1, 1]), and bpd = that of the same values as float model
    inputs + log2(17 / 2)."""
    import types

    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    model = SiT_models["SiT-T/4"](input_size=8, in_channels=1, num_classes=NUM_CLASSES, learn_sigma=False)
    for p in model.parameters():
        if p.requires_grad:  # not the fixed position table
            p.data.normal_(0, 0.05)  # nor adaLN-Zero's zeros, which would make the velocity 0
    torch.save(model.state_dict(), tmp_path / "gray.pt")
    common = ["ODE", "--likelihood", "--ckpt", tmp_path / "gray.pt", "--vae", "none", "--sampling-method", "euler",
              "--num-sampling-steps", 2, "--batch-size", 1024, *FAST]
    bpd = run(common + ["--dataset", "digits"])
    args = sample.resolve_args(sample.build_parser().parse_args(["ODE", "--likelihood", "--dataset", "digits"]))
    setup = types.SimpleNamespace(args=args, codec=None, latent_shape=(1, 8, 8))
    data, offset, _ = sample.job_data(setup)
    x = data[:]
    torch.testing.assert_close(data[5:9], x[5:9], rtol=0, atol=0)  # an item's noise is its own, in any batch
    levels = torch.from_numpy(load_digits().images).float().unsqueeze(1)
    assert x.shape == (1797, 1, 8, 8) and offset == pytest.approx(math.log2(8.5))
    torch.testing.assert_close(torch.floor((x + 1) * 17 / 2), levels, rtol=0, atol=0)
    torch.save(x, tmp_path / "x.pt")
    continuous = run(common + ["--data", tmp_path / "x.pt"])
    assert bpd.shape == (1797,) and np.all(np.isfinite(bpd))
    np.testing.assert_allclose(bpd, continuous + math.log2(8.5), rtol=0, atol=1e-6)


def test_the_digits_are_refused_for_a_model_of_other_inputs():
    """--dataset digits is 8x8 gray pixels: a model of other pixels, or of a VAE's latents, is refused naming
    what it takes."""
    import types

    from sit_fast.errors import UserError

    args = sample.resolve_args(sample.build_parser().parse_args(["ODE", "--likelihood", "--dataset", "digits"]))
    for codec, shape, takes in ((None, (3, 8, 8), "inputs (3, 8, 8)"), (None, (1, 16, 16), "inputs (1, 16, 16)"),
                                (object(), (4, 8, 8), "a VAE's latents")):
        setup = types.SimpleNamespace(args=args, codec=codec, latent_shape=shape)
        with pytest.raises(UserError, match=re.escape(f"--dataset digits is 8x8 gray pixels; this model takes "
                                                      f"{takes}: pass a model trained with train.py --dataset")):
            sample.job_data(setup)


def test_a_gray_model_reads_gray_images_and_refuses_colour_ones(tmp_path, capsys):
    """--data FOLDER for a 1-channel model: gray images, stored as gray or as RGB with equal channels (a
    1-channel model's FID PNGs), give the same bpd; a colour image is refused, not turned gray."""
    torch.save(random_sit(1, learn_sigma=False).state_dict(), tmp_path / "gray.pt")
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (2, 8, 8), dtype=np.uint8)
    for name, mode in (("as_gray", "L"), ("as_rgb", "RGB")):
        (tmp_path / name).mkdir()
        for i, image in enumerate(gray):
            Image.fromarray(image).convert(mode).save(tmp_path / name / f"{i}.png")
    argv = ["ODE", "--likelihood", "--ckpt", tmp_path / "gray.pt", "--vae", "none", "--sampling-method", "euler",
            "--num-sampling-steps", 2, *FAST]
    np.testing.assert_array_equal(run(argv + ["--data", tmp_path / "as_gray"]),
                                  run(argv + ["--data", tmp_path / "as_rgb"]))
    capsys.readouterr()
    colour = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(colour).save(tmp_path / "as_rgb" / "2.png")
    with pytest.raises(SystemExit) as exit_info:
        run(argv + ["--data", tmp_path / "as_rgb", "--out", tmp_path / "bpd.npz"])
    assert exit_info.value.code == 2
    assert not os.path.exists(tmp_path / "bpd.npz.parts")  # its first batch failed: nothing to keep
    assert one_line_error(capsys).endswith(f"error: --data {tmp_path / 'as_rgb'}: 2.png is in colour, the model takes "
                                           f"gray (1-channel) images: convert them to gray first")


def test_bpd_summary_gives_the_mean_and_its_standard_error():
    assert sample.bpd_summary(np.array([1.0, 2.0, 3.0]), "3 items") == "bpd 2.0000 +- 0.5774 over 3 items"
    assert sample.bpd_summary(np.array([1.5]), "1 item") == "bpd 1.5000 of 1 item"


def test_dequantization_note_names_the_bits_and_the_jacobian():
    assert sample.dequantization_note(7.0) == " (+7 bits: the 1/128 Jacobian)"
    assert sample.dequantization_note(math.log2(17 / 2)) == " (+3.09 bits: the 2/17 Jacobian)"
    assert sample.dequantization_note(0.0) == ""


def test_the_flags_reach_the_transport_and_its_samplers(files, tmp_path, monkeypatch):
    """Each transport and sampler flag is passed on: create_transport and the Sampler's methods are
    called with them (what those do with them, test_transport.py tests)."""
    calls = []
    real_transport = sample.create_transport
    monkeypatch.setattr(sample, "create_transport", lambda *a: calls.append(("transport", a)) or real_transport(*a))
    for name in ("sample_ode", "sample_sde"):
        monkeypatch.setattr(sample.Sampler, name, lambda self, _real=getattr(sample.Sampler, name), _name=name, **kw:
                            calls.append((_name, kw)) or _real(self, **kw))
    common = ["--ckpt", files["pixel"], "--vae", "none", "--class-labels", 1, 2, *FAST]
    run(["SDE", *common, "--path-type", "GVP", "--prediction", "noise", "--loss-weight", "likelihood",
         "--train-eps", 0.003, "--sample-eps", 0.002, "--sampling-method", "Heun", "--diffusion-form", "linear",
         "--diffusion-norm", 0.5, "--last-step", "Euler", "--last-step-size", 0.02, "--num-sampling-steps", 5,
         "--out", tmp_path / "sde.png"])
    assert calls == [("transport", ("GVP", "noise", "likelihood", 0.003, 0.002)),
                     ("sample_sde", dict(sampling_method="Heun", diffusion_form="linear", diffusion_norm=0.5,
                                         last_step="Euler", last_step_size=0.02, num_steps=5))]
    calls.clear()
    run(["ODE", *common, "--path-type", "VP", "--prediction", "score", "--sampling-method", "dopri5",
         "--atol", 1e-5, "--rtol", 1e-4, "--out", tmp_path / "ode.png"])
    assert calls == [("transport", ("VP", "score", None, 1e-5, 1e-3)),
                     ("sample_ode", dict(sampling_method="dopri5", num_steps=250, atol=1e-5, rtol=1e-4, reverse=False))]
    calls.clear()
    torch.save(torch.randn(2, 3, 8, 8).clamp(-1, 1), tmp_path / "x.pt")
    run(["ODE", "--reverse", "--ckpt", files["pixel"], "--vae", "none", "--data", tmp_path / "x.pt",
         "--sampling-method", "euler", "--num-sampling-steps", 3, "--out", tmp_path / "z.pt", *FAST])
    assert calls[-1] == ("sample_ode", dict(sampling_method="euler", num_steps=3, atol=1e-6, rtol=1e-3, reverse=True))


def test_a_sample_eps_that_changes_nothing_is_said(files, tmp_path, capsys):
    """A Linear velocity model's ODE, its SDE with a last step but for SBDM, and any VP SDE with a last
    step keep no distance from t = 0 or t = 1: a --sample-eps given there is said to do nothing; where
    it is used, nothing is said."""
    common = ["--ckpt", files["pixel"], "--vae", "none", "--class-labels", 1, *FAST]
    needle = "has no effect here: with a Linear velocity model this"
    run(["ODE", *common, "--sampling-method", "euler", "--num-sampling-steps", 2, "--sample-eps", 0.01,
         "--out", tmp_path / "ode.png"])
    assert "--sample-eps 0.01 " + needle + " ODE runs over [0, 1] whatever it is" in capsys.readouterr().err
    run(["SDE", *common, "--num-sampling-steps", 3, "--diffusion-form", "sigma", "--sample-eps", 0.01,
         "--out", tmp_path / "sde.png"])
    assert "--sample-eps 0.01 " + needle + " SDE runs over [0, 0.96] whatever it is" in capsys.readouterr().err
    run(["SDE", *common, "--num-sampling-steps", 3, "--path-type", "VP", "--prediction", "noise", "--sample-eps",
         0.01, "--out", tmp_path / "vp.png"])  # VP starts at 0, and its last step ends it
    assert ("--sample-eps 0.01 has no effect here: with a VP noise model this SDE runs over [0, 0.96]"
            in capsys.readouterr().err)
    for argv in (["SDE", "--num-sampling-steps", 3, "--diffusion-form", "SBDM", "--sample-eps", 0.01],  # t0 = eps
                 ["SDE", "--num-sampling-steps", 3, "--diffusion-form", "sigma", "--last-step", "None",
                  "--sample-eps", 0.01],  # ends at 1 - sample_eps
                 ["ODE", "--sampling-method", "euler", "--num-sampling-steps", 2]):  # not given
        run([*argv, *common, "--out", tmp_path / "used.png"])
        assert "has no effect" not in capsys.readouterr().err


def test_reverse_carries_data_to_noise(files, tmp_path, capsys):
    torch.save(torch.randn(2, 3, 8, 8).clamp(-1, 1), tmp_path / "x.pt")
    argv = ["ODE", "--reverse", "--ckpt", files["pixel"], "--vae", "none", "--data", tmp_path / "x.pt",
            "--sampling-method", "euler", "--num-sampling-steps", 3, "--out", tmp_path / "z.pt", *FAST]
    out = Path(run(argv))
    said = capsys.readouterr().out
    assert "encoded 2 items (the given model inputs (continuous)) to noise" in said, said
    assert re.search(rf"-> {re.escape(str(out))} \(\d+\.\d s\)$", said.strip()), said  # whole: no "computed now"
    z = torch.load(out, weights_only=True)
    assert z.shape == (2, 3, 8, 8) and torch.isfinite(z).all()
    before = out.stat().st_mtime_ns
    with pytest.raises(SystemExit) as exit_info:  # the noise records no settings: not overwritten
        run(argv)
    assert exit_info.value.code == 2
    assert one_line_error(capsys) == (f"error: --out {out} exists (an earlier --reverse's noise?): --reverse does not "
                                      f"overwrite it; pass another --out, or delete it")
    assert out.stat().st_mtime_ns == before and not os.path.exists(f"{out}.parts")
    # 8-bit images: dequantised, with no word of the likelihood's added bits
    np.savez(tmp_path / "images.npz", arr_0=np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8))
    run([a if a != tmp_path / "x.pt" else tmp_path / "images.npz" for a in argv[:-len(FAST) - 2]]
        + ["--out", tmp_path / "z_images.pt", *FAST])
    assert "encoded 2 items (8-bit pixels, uniform dequantization) to noise" in capsys.readouterr().out



def data_job(job: str, items: int, files, tmp_path):
    """`job` (--likelihood or --reverse) on `items` random pixel items in batches of 2: (argv, its
    --out, a function reading the results there as an array)."""
    torch.save(torch.randn(items, 3, 8, 8).clamp(-1, 1), tmp_path / "x.pt")
    out = tmp_path / ("bpd.npz" if job == "--likelihood" else "z.pt")
    argv = ["ODE", job, "--ckpt", files["pixel"], "--vae", "none", "--data", tmp_path / "x.pt", "--batch-size", 2,
            "--sampling-method", "euler", "--num-sampling-steps", 3, "--out", out, *FAST]

    def saved():
        if job == "--likelihood":
            with np.load(out) as archive:
                return archive["bpd"]
        return torch.load(out, weights_only=True).numpy()

    return argv, out, saved


@pytest.mark.parametrize("job", ["--likelihood", "--reverse"])
def test_interrupted_likelihood_and_reverse_keep_the_finished_batches(job, files, tmp_path, capsys, monkeypatch,
                                                                      stop):
    """Ctrl-C or a stop signal during the third batch: the first two batches' results are reported and
    kept in OUT.parts/ (exit 130, or 128 + the signal's number), and the same command computes the
    third and gives a whole run's results."""
    argv, out, saved = data_job(job, 5, files, tmp_path)
    parts = tmp_path / f"{out.name}.parts"
    run(argv)
    whole = saved()
    assert len(whole) == 5 and not parts.exists()
    out.unlink()
    batches = stop_at_batch(monkeypatch, 3, stop)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run(argv)
    assert exit_info.value.code == stop.status and not out.exists()
    assert sorted(os.listdir(parts)) == [".lock", "000000.pt", "000001.pt", "settings.json"]
    captured = capsys.readouterr()
    assert f"of 4 of 5 items are kept in {parts}: run the same command again to compute the rest" in captured.out, \
        captured.out
    assert ("bpd " in captured.out and "over 4 of 5 items" in captured.out) == (job == "--likelihood"), captured.out
    assert f"{stop.words} after 4 of 5 items" in captured.err, captured.err
    batches.append(None)  # no stop this time
    run(argv)
    np.testing.assert_array_equal(saved(), whole)
    assert len(batches) == 5 and not parts.exists()  # the third batch only
    # Stopped in the first batch of a new run: nothing finished, no OUT
    out.unlink()
    batches.clear()
    batches.extend([None, None])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run(argv)
    assert exit_info.value.code == stop.status and not out.exists()
    assert sorted(os.listdir(parts)) == [".lock", "settings.json"]
    captured = capsys.readouterr()
    assert f"{stop.words} after 0 of 5 items: nothing finished" in captured.err
    assert "kept" not in captured.out, captured.out


@pytest.mark.parametrize("job", ["--likelihood", "--reverse"])
def test_a_job_stopped_after_its_last_batch_says_the_rerun_writes_out(job, files, tmp_path, capsys, monkeypatch):
    """A stop that comes once the last batch's results are in OUT.parts/ (under torchrun, while the main
    process waits for the others'): every item is kept, and the rerun only joins them into OUT, which
    the line says (not "to compute the rest", of which there is none)."""
    argv, out, saved = data_job(job, 5, files, tmp_path)
    real = sample.BatchParts.write

    def write(self, k, result):
        written = real(self, k, result)
        if k == self.batches - 1:
            raise KeyboardInterrupt
        return written

    monkeypatch.setattr(sample.BatchParts, "write", write)
    with pytest.raises(SystemExit) as exit_info:
        run(argv)
    assert exit_info.value.code == 130 and not out.exists()
    captured = capsys.readouterr()
    assert (f"the results of 5 of 5 items are kept in {out}.parts: run the same command again to write {out}\n"
            in captured.out), captured.out
    monkeypatch.setattr(sample.BatchParts, "write", real)
    run(argv)
    assert "5 of 5 items already in" in capsys.readouterr().out and len(saved()) == 5
    assert not os.path.exists(f"{out}.parts")


# Each batch's results, once in OUT.parts/, are followed by 2 s of nothing ("batch"); "teardown" as a
# stopped job reads the batches finished, 30 s before it does.
SLOW_PARTS = """
import sys, time
import sample
real_write, real_read = sample.BatchParts.write, sample.BatchParts.read

def write(self, k, result):
    result = real_write(self, k, result)
    print("batch", file=sys.stderr, flush=True)
    time.sleep(2)
    return result

def read(self, every=False):
    if not every:
        print("teardown", file=sys.stderr, flush=True)
        time.sleep(30)
    return real_read(self, every)

sample.BatchParts.write, sample.BatchParts.read = write, read
sys.argv = sys.argv[1:]
sample.main()
"""


@pytest.mark.parametrize("job", ["--likelihood", "--reverse"])
def test_a_second_ctrl_c_while_a_stopped_data_job_reports_ends_it_saying_what_is_kept(job, files, tmp_path):
    """Ctrl-C, then Ctrl-C again while the batches finished are read and reported: the job ends at once,
    exit 130, with one line saying that they are kept in OUT.parts/ (not a bare "interrupted"), and
    the same command computes the rest."""
    argv, out, saved = data_job(job, 5, files, tmp_path)
    parts = tmp_path / f"{out.name}.parts"
    status, err, after = signalled_child(SLOW_PARTS, ["sample.py", *argv],
                                         {"batch": signal.SIGINT, "teardown": signal.SIGINT})
    assert status == 130 and "Traceback" not in err, err
    assert err.splitlines()[-1] == (f"interrupted again, stopping at once: the results of the batches finished are "
                                    f"kept in {parts}: run the same command again to compute the rest"), err
    assert after < 20, f"{after:.1f} s from the second Ctrl-C to the exit"  # the teardown takes 30 s
    assert not out.exists() and "000000.pt" in os.listdir(parts)
    run(argv)
    assert len(saved()) == 5 and not parts.exists()


def test_a_likelihood_without_out_stopped_reports_the_first_items(files, tmp_path, capsys, monkeypatch):
    """Without --out the batches run in order: a stop during the third reports the bpd of the first 4 of 5
    items, keeps nothing and exits 130."""
    argv, _, _ = data_job("--likelihood", 5, files, tmp_path)
    argv = argv[:argv.index("--out")] + argv[argv.index("--out") + 2:]
    stop_at_batch(monkeypatch, 3, ctrl_c)
    with pytest.raises(SystemExit) as exit_info:
        run(argv)
    assert exit_info.value.code == 130
    captured = capsys.readouterr()
    assert re.search(r"^bpd \S+ \+- \S+ over the first 4 of 5 items \(", captured.out, re.M), captured.out
    assert "interrupted after 4 of 5 items" in captured.err, captured.err
    assert sorted(os.listdir(tmp_path)) == ["x.pt"]


def stop_at_batch(monkeypatch, number: int, stop) -> list:
    """stop() (a Ctrl-C, a stop signal, a crash) as batch `number` (from 1) starts. Returns the list of
    derived_seed's calls, one per batch as it starts: stop() comes with entry `number`."""
    real, batches = sample.derived_seed, []

    def derived_seed(*args):
        batches.append(args)
        if len(batches) == number:
            stop()
        return real(*args)

    monkeypatch.setattr(sample, "derived_seed", derived_seed)
    return batches


def ctrl_c():
    raise KeyboardInterrupt


def crash_in_the_third_batch(monkeypatch) -> list:
    """A crash (no handler keeps anything then) as the third batch starts: stop_at_batch's list."""
    def crash():
        raise RuntimeError("the machine went away")

    return stop_at_batch(monkeypatch, 3, crash)


def test_likelihood_resumes_its_out_after_a_crash(files, tmp_path, capsys, monkeypatch):
    """--likelihood --out keeps each batch's bpd in OUT.parts/ as it finishes, with the settings that made
    them. After a crash the same command computes only the batches left, and the bpd are an
    uninterrupted run's; a finished file is read, not recomputed. Other settings, other data or a file
    that records no settings are refused in one line, naming the settings by their flags; the batch
    size given under its alias, upstream sample_ddp.py's --per-proc-batch-size, is the same setting."""
    torch.save(torch.randn(5, 3, 8, 8).clamp(-1, 1), tmp_path / "x.pt")
    out, parts = tmp_path / "bpd.npz", tmp_path / "bpd.npz.parts"
    argv = ["ODE", "--likelihood", "--ckpt", files["pixel"], "--vae", "none", "--data", tmp_path / "x.pt",
            "--batch-size", 2, "--sampling-method", "euler", "--num-sampling-steps", 3, "--out", out, *FAST]
    whole = run(argv)
    assert "computed now" not in capsys.readouterr().out  # a run of its own: nothing resumed
    out.unlink()
    batches = crash_in_the_third_batch(monkeypatch)
    with pytest.raises(RuntimeError, match="went away"):
        run(argv)
    assert not out.exists()
    np.testing.assert_array_equal(torch.cat([torch.load(parts / f"00000{k}.pt", weights_only=True)
                                             for k in (0, 1)]).numpy(), whole[:4])

    def refused(argv_now, start, needle):
        with pytest.raises(SystemExit) as exit_info:
            run(argv_now)
        assert exit_info.value.code == 2
        err = one_line_error(capsys)
        assert err.startswith(f"error: {start} ") and needle in err, err

    capsys.readouterr()
    refused(argv + ["--seed", 1], parts, "holds the results of a stopped run made with other settings (--seed: 0 "
                                         "there, 1 now)")
    alias = ["--per-proc-batch-size" if arg == "--batch-size" else arg for arg in argv]
    batches.clear()
    batches.append(None)  # no crash this time: the third call is a fourth
    np.testing.assert_array_equal(run(alias), whole)
    assert batches[1:] == [(0, 2, 2)], batches  # only the last batch (index 2, seed 0, batch size 2)
    captured = capsys.readouterr().out
    assert f"4 of 5 items already in {parts}; computing the other 1" in captured, captured
    assert "for the 1 computed now" in captured and f"saved per-item bpd to {out}" in captured, captured
    assert not parts.exists()
    with np.load(out) as archive:
        np.testing.assert_array_equal(archive["bpd"], whole)
    batches.clear()
    np.testing.assert_array_equal(run(argv), whole)  # finished: nothing computed
    assert not batches and "nothing left to compute" in capsys.readouterr().out
    np.testing.assert_array_equal(run(alias), whole)
    assert not batches and "nothing left to compute" in capsys.readouterr().out
    parts.mkdir()  # a stop between writing OUT and removing OUT.parts/: the folder goes at the next run
    (parts / "000000.pt").write_bytes(b"")
    np.testing.assert_array_equal(run(argv), whole)
    assert not batches and not parts.exists()
    refused(argv + ["--seed", 1], f"--out {out}", "holds the results of a run with other settings (--seed: 0 there, "
                                                  "1 now)")
    refused(argv + ["--class-labels", 1], f"--out {out}", "(--class-labels: none there, [1] now)")
    torch.save(torch.randn(6, 3, 8, 8).clamp(-1, 1), tmp_path / "x.pt")
    refused(argv, f"--out {out}", "(items: 5 there, 6 now; data_digest: ")
    np.savez(out, bpd=whole)
    refused(argv, f"--out {out}", "records no settings of a finished likelihood run")
    out.write_bytes(b"not an npz")  # without np.load's advice to load it unsafely
    refused(argv, f"--out {out}", "exists and cannot be read as the results of a likelihood run: pass another --out")

    def unreadable(path):  # a failure to read the file is said in the system's words
        raise OSError(errno.EIO, "Input/output error", path)

    monkeypatch.setattr(sample, "read_bpd", unreadable)
    refused(argv, f"--out {out}", "exists and cannot be read as the results of a likelihood run (Input/output "
                                  "error): pass another --out")
    assert not batches and not parts.exists()


def test_a_resumed_likelihood_counts_the_items_computed_now(files, tmp_path, capsys, monkeypatch):
    """A resumed run reports the items it computed, not its batches: here batches 1 and 2, 3 of the 5 items."""
    argv, _, saved = data_job("--likelihood", 5, files, tmp_path)
    parts = tmp_path / "bpd.npz.parts"
    batches = crash_in_the_third_batch(monkeypatch)
    with pytest.raises(RuntimeError, match="went away"):
        run(argv)
    (parts / "000001.pt").unlink()
    batches.append(None)  # no crash this time
    capsys.readouterr()
    run(argv)
    captured = capsys.readouterr().out
    assert f"2 of 5 items already in {parts}; computing the other 3" in captured, captured
    assert "for the 3 computed now" in captured and len(saved()) == 5, captured


def test_a_likelihood_out_whose_pixels_were_dequantised_otherwise_is_refused(files, tmp_path, capsys):
    """8-bit data draw their dequantization noise per item: a finished --out that does not record so
    (another way of drawing it) is not taken as this run's results."""
    np.savez(tmp_path / "images.npz", arr_0=np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8))
    out = tmp_path / "bpd.npz"
    argv = ["ODE", "--likelihood", "--ckpt", files["pixel"], "--vae", "none", "--data", tmp_path / "images.npz",
            "--sampling-method", "euler", "--num-sampling-steps", 2, "--out", out, *FAST]
    bpd = run(argv)
    settings, _ = sample.read_bpd(out)
    assert settings["dequantization"] == "per item"
    del settings["dequantization"]
    sample.write_bpd(out, bpd, settings)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run(argv)
    assert "(dequantization: not recorded there, 'per item' now)" in one_line_error(capsys)


def test_a_finished_likelihood_out_records_its_data_by_path_and_its_divergence(files, tmp_path, monkeypatch, capsys):
    """A finished --out records --data by its absolute path, so the same file named from another folder
    reads the results; the divergence estimator is among its settings, so --exact-divergence is refused."""
    argv, out, saved = data_job("--likelihood", 3, files, tmp_path)
    data = argv.index("--data") + 1
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    whole = run(argv[:data] + ["x.pt"] + argv[data + 1:])
    monkeypatch.chdir(tmp_path / "elsewhere")
    capsys.readouterr()
    np.testing.assert_array_equal(run(argv[:data] + [os.path.join("..", "x.pt")] + argv[data + 1:]), whole)
    assert "nothing left to compute" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        run(argv + ["--exact-divergence"])
    assert one_line_error(capsys) == (f"error: --out {out} holds the results of a run with other settings "
                                      f"(--exact-divergence: False there, True now): pass another --out, or delete "
                                      f"it to start over")
    np.testing.assert_array_equal(saved(), whole)


def test_a_likelihood_out_holding_fewer_results_than_it_records_is_refused(tmp_path):
    out = str(tmp_path / "bpd.npz")
    sample.write_bpd(out, np.zeros(4), {"items": 5})
    with pytest.raises(sample.UserError, match="records no settings of a finished likelihood run"):
        sample.finished_bpd(out, {"items": 5})
    sample.write_bpd(out, np.zeros(5), {"items": 5})
    np.testing.assert_array_equal(sample.finished_bpd(out, {"items": 5}), np.zeros(5))


def test_a_resume_ignores_the_flags_its_solver_ignores(files, tmp_path, capsys):
    """dopri5's bpd do not depend on --num-sampling-steps, nor euler's on --atol/--rtol: a finished
    likelihood file is read under such a change, and a change the solver uses is refused."""
    torch.save(torch.randn(2, 3, 8, 8).clamp(-1, 1), tmp_path / "x.pt")
    common = ["ODE", "--likelihood", "--ckpt", files["pixel"], "--vae", "none", "--data", tmp_path / "x.pt", *FAST]
    adaptive = common + ["--sampling-method", "dopri5", "--atol", 1e-3, "--rtol", 1e-2]
    whole = run(adaptive + ["--num-sampling-steps", 3])
    np.testing.assert_array_equal(run(adaptive + ["--num-sampling-steps", 7]), whole)  # computed again: the same
    out = tmp_path / "bpd.npz"
    run(adaptive + ["--num-sampling-steps", 3, "--out", out])
    capsys.readouterr()
    np.testing.assert_array_equal(run(adaptive + ["--num-sampling-steps", 7, "--out", out]), whole)
    assert "nothing left to compute" in capsys.readouterr().out
    fixed = common + ["--sampling-method", "euler", "--num-sampling-steps", 3, "--out", tmp_path / "euler.npz"]
    whole = run(fixed)
    capsys.readouterr()
    np.testing.assert_array_equal(run(fixed + ["--atol", 1e-2, "--rtol", 0.5]), whole)
    assert "nothing left to compute" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        run(fixed + ["--num-sampling-steps", 4])
    assert "(--num-sampling-steps: 3 there, 4 now)" in one_line_error(capsys)


def test_a_data_job_tells_apart_checkpoints_and_data_written_to_one_path(files, tmp_path, capsys, monkeypatch):
    """--likelihood's finished --out and --reverse's OUT.parts/ record what the checkpoint and --data hold, not
    their paths alone: either made again at its path (a retrained run's checkpoint, a regenerated .npz, a
    folder of other images) is refused, where the old bpd were returned or two models' batches mixed."""
    ckpt = tmp_path / "0000100.pt"
    shutil.copy(files["pixel"], ckpt)
    argv, out, _ = data_job("--likelihood", 4, files, tmp_path)
    argv[argv.index("--ckpt") + 1] = ckpt
    run(argv)
    torch.save(torch.randn(4, 3, 8, 8).clamp(-1, 1), tmp_path / "x.pt")  # other data: same path, same count
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run(argv)
    assert f"--out {out} holds the results of a run with other settings (data_digest: " in one_line_error(capsys)

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    argv, out, _ = data_job("--reverse", 4, files, tmp_path)
    argv[argv.index("--ckpt") + 1] = ckpt
    argv[argv.index("--data") + 1] = folder
    parts = tmp_path / "z.pt.parts"
    write = sample.BatchParts.write

    def stop_after_the_first(parts_now, k, result):  # Ctrl-C as the second batch's noise is written
        if k:
            raise KeyboardInterrupt
        return write(parts_now, k, result)

    with monkeypatch.context() as patched, pytest.raises(SystemExit):
        patched.setattr(sample.BatchParts, "write", stop_after_the_first)
        run(argv)
    assert sorted(os.listdir(parts)) == [".lock", "000000.pt", "settings.json"]
    torch.save(random_sit(3, learn_sigma=False, seed=1).state_dict(), ckpt)  # retrained into the same file
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run(argv)
    assert "holds the results of a stopped run made with other settings (ckpt_digest: " in one_line_error(capsys)
    shutil.copy(files["pixel"], ckpt)
    (folder / "3.png").rename(folder / "9.png")  # another image set of the same count
    with pytest.raises(SystemExit):
        run(argv)
    assert "(data_digest: " in one_line_error(capsys)


def test_reverse_resumes_from_its_parts_after_a_crash(files, tmp_path, capsys, monkeypatch):
    """--reverse keeps each batch's noise in OUT.parts/ as it finishes; after a crash the same command
    computes only the batches left, gives an uninterrupted run's noise and removes the folder. A part
    that cannot be read is named in one line."""
    torch.save(torch.randn(5, 3, 8, 8).clamp(-1, 1), tmp_path / "x.pt")
    out, parts = tmp_path / "z.pt", tmp_path / "z.pt.parts"
    argv = ["ODE", "--reverse", "--ckpt", files["pixel"], "--vae", "none", "--data", tmp_path / "x.pt",
            "--batch-size", 2, "--sampling-method", "euler", "--num-sampling-steps", 3, "--out", out, *FAST]
    whole = torch.load(run(argv), weights_only=True)
    out.unlink()
    batches = crash_in_the_third_batch(monkeypatch)
    with pytest.raises(RuntimeError, match="went away"):
        run(argv)
    assert not out.exists()
    torch.testing.assert_close(torch.load(parts / "000001.pt", weights_only=True), whole[2:4], rtol=0, atol=0)
    batches.clear()
    batches.append(None)  # no crash this time
    torch.testing.assert_close(torch.load(run(argv), weights_only=True), whole, rtol=0, atol=0)
    assert batches[1:] == [(0, 4)], batches  # only the last batch, the one starting at item 4
    said = capsys.readouterr().out
    assert f"4 of 5 items already in {parts}; computing the other 1" in said, said
    assert re.search(r"encoded 5 items .* s for the 1 computed now\)$", said.strip()), said
    assert not parts.exists()
    out.unlink()
    batches.clear()
    with pytest.raises(RuntimeError, match="went away"):
        run(argv)
    (parts / "000000.pt").write_bytes(b"not a torch file")  # no torch.load advice to load it unsafely
    with pytest.raises(SystemExit):
        run(argv)
    err = one_line_error(capsys)
    assert err.startswith(f"error: cannot read {parts / '000000.pt'} (not torch.save's or damaged: ") and err.endswith(
        "): delete it, and the same command computes its batch again") and "weights_only" not in err, err
    # A batch missing when the results are joined (a process that stopped without a word) is named
    shutil.rmtree(parts)
    write = sample.BatchParts.write
    monkeypatch.setattr(sample.BatchParts, "write",
                        lambda self, k, result: result if k == 1 else write(self, k, result))
    batches.extend([None, None])  # no crash
    with pytest.raises(SystemExit):
        run(argv)
    assert one_line_error(capsys) == (f"error: {parts} lacks the results of batch 1 (000001.pt): run the same command "
                                      f"again to compute it")


@pytest.mark.parametrize("job", ["--likelihood", "--reverse"])
def test_likelihood_and_reverse_share_their_batches_among_torchrun_processes(job, files, tmp_path, monkeypatch):
    """A run stopped after 2 of 4 batches (one process) is finished by 2 processes, which take the
    other 2 in turn: the results are the uninterrupted single-process run's, to the bit."""
    argv, out, saved = data_job(job, 7, files, tmp_path)
    run(argv)
    whole = saved()
    out.unlink()
    crash_in_the_third_batch(monkeypatch)
    with pytest.raises(RuntimeError, match="went away"):
        run(argv)
    printed = torchrun(argv, tmp_path)
    assert "4 of 7 items already in" in printed and "computing the other 3" in printed, printed
    assert "2 batches of 2 on 2 processes, taken in turn" in printed, printed
    np.testing.assert_array_equal(saved(), whole)
    assert not os.path.exists(f"{out}.parts")


def test_likelihood_whose_rank_0_was_killed_is_said_once_from_the_process_left(files, tmp_path):
    """Rank 0 killed (SIGKILL) after its first batch: torchrun stops rank 1 (SIGTERM), which says in its
    place how many items' results are kept in OUT.parts/, and how to go on (it exited 143 without a word)."""
    argv, out, _ = data_job("--likelihood", 40, files, tmp_path)
    script = tmp_path / "killed_rank_0.py"
    script.write_text(
        "import os, signal, sys, time\n"
        f"sys.path.insert(0, {REPO!r})\n"
        "import sample\n"
        "real = sample.BatchParts.write\n"
        "def write(self, k, result):\n"
        "    result = real(self, k, result)\n"
        "    if os.environ['RANK'] == '0':\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    time.sleep(0.3)  # rank 1 is still at work when torchrun stops it\n"
        "    return result\n"
        "sample.BatchParts.write = write\n"
        "sample.main()\n")
    result = torchrun_run(script, argv, tmp_path)
    assert result.returncode != 0
    # 2 items a batch: rank 0's first, and those rank 1 finished before torchrun stopped it (none or more)
    kept = sum(re.fullmatch(r"\d{6}\.pt", name) is not None for name in os.listdir(f"{out}.parts"))
    assert kept >= 1, os.listdir(f"{out}.parts")
    assert (f"the results of {2 * kept} of 40 items are kept in {out}.parts: run the same command again to compute "
            f"the rest\n") in result.stdout, result.stdout[-3000:]
    said = [line for line in result.stderr.splitlines() if " of 40 items" in line]
    assert said == [f"rank 0 (on {socket.gethostname()}) ended (its node's torchrun summary says how), and the "
                    f"others were stopped by SIGTERM after {2 * kept} of 40 items"], result.stderr[-3000:]
    assert result.stderr.count("Traceback (most recent call last)") == 1, result.stderr[-3000:]  # torchrun's own


@pytest.mark.slow
def test_likelihood_whose_process_on_another_node_was_killed_ends_when_its_heartbeat_stops(files, tmp_path):
    """Two torchrun launchers (--nnodes=2, one process each; the first holds the store): rank 1 killed
    (SIGKILL) after its first batch leaves no word on rank 0's node, whose torchrun goes on. Rank 0, waiting
    for rank 1's batches, takes its stopped heartbeat as its end (after PEER_SILENT_S, short here) and says so
    in one line, the batches finished kept. Not killed, rank 1, slower than PEER_SILENT_S, is waited for."""
    from tests.test_train import free_port

    argv, out, saved = data_job("--likelihood", 8, files, tmp_path)
    script = tmp_path / "two_nodes.py"
    script.write_text(
        "import os, signal, sys, time\n"
        f"sys.path.insert(0, {REPO!r})\n"
        "import sample\n"
        "from sit_fast import distributed\n"
        "distributed.HEARTBEAT_S, distributed.PEER_SILENT_S = 0.2, 5.0\n"
        "real = sample.BatchParts.write\n"
        "def write(self, k, result):\n"
        "    if os.environ['RANK'] == '1' and k == 3:\n"
        "        time.sleep(7)  # rank 1's last batch outlasts PEER_SILENT_S, its heartbeat going on\n"
        "    result = real(self, k, result)\n"
        "    if os.environ['RANK'] == '1' and os.environ.get('KILL_RANK_1'):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return result\n"
        "sample.BatchParts.write = write\n"
        "sample.main()\n")

    def two_nodes(**env):
        endpoint = f"--rdzv_endpoint=127.0.0.1:{free_port()}"
        nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                                   "--rdzv_id=sit", "--rdzv_backend=c10d", endpoint, f"--rdzv_conf=is_host={host}",
                                   str(script), *map(str, argv)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO,
                                                      TRITON_INTERPRET="0", TMPDIR=str(tmp_path), **env))
                 for host in (1, 0)]
        try:
            results = [(node.communicate(timeout=240), node.returncode) for node in nodes]
            return [((without_gloo_lines(out), err), rc) for (out, err), rc in results]
        finally:
            for node in nodes:  # torchrun stops its process (in a session of its own) on SIGTERM, not on SIGKILL
                node.terminate()
            for node in nodes:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    node.wait(timeout=60)
                node.kill()

    ((stdout, stderr), rc), ((other_out, other_err), other_rc) = two_nodes()
    assert (rc, other_rc) == (0, 0), stderr[-3000:] + other_err[-3000:]
    assert stdout.endswith(f"saved per-item bpd to {out}\n") and not stderr and not other_out and not other_err, \
        (stdout, stderr, other_out, other_err)
    assert len(saved()) == 8
    out.unlink()
    ((stdout, stderr), rc), ((_, other_err), other_rc) = two_nodes(KILL_RANK_1="1")
    assert rc != 0 and other_rc != 0 and "exitcode  : -9" in other_err, other_err[-3000:]
    kept = sorted(name for name in os.listdir(f"{out}.parts") if name.endswith(".pt"))
    assert kept == ["000000.pt", "000001.pt", "000002.pt"], kept
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert lines == [f"error: rank 1 (on {socket.gethostname()}) ended without a word (no heartbeat for 5 s: killed, "
                     f"or its node lost?); the batches finished are kept in {out}.parts: run the same command again "
                     f"to compute the rest"], stderr[-3000:]
    # rank 0 ended with its line (exit status 2), no abort; the one traceback is torchrun's own
    assert "exitcode  : 2 " in stderr and stderr.count("Traceback (most recent call last)") == 1, stderr[-3000:]
    assert stdout == "4 batches of 2 on 2 processes, taken in turn\n", stdout


@pytest.mark.slow  # the same check in training: test_train.py's test_a_node_whose_copy_of_the_data_differs_is_refused
def test_likelihood_under_torchrun_refuses_a_node_whose_copy_of_the_data_differs(files, tmp_path):
    """--data read by each process itself (a relative path: each node's own copy): a folder with an image
    fewer, or another .npz, on rank 1 stops every process with one line, before any batch (rank 1's
    batches were of other items under the same item numbers)."""
    rng = np.random.default_rng(0)
    for node in ("node0", "node1"):
        (tmp_path / node / "images").mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) if node == "node0" else
                            np.asarray(Image.open(tmp_path / "node0" / "images" / f"{i}.png"))).save(
                tmp_path / node / "images" / f"{i}.png")
        np.savez(tmp_path / node / "x.npz", rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8))
    (tmp_path / "node1" / "images" / "4.png").unlink()
    script = tmp_path / "node_local_sample.py"
    script.write_text("import os, sys\n"
                      f"sys.path.insert(0, {REPO!r})\n"
                      f"os.chdir(os.path.join({str(tmp_path)!r}, 'node' + os.environ['RANK']))\n"
                      "import sample\n"
                      "sample.main()\n")
    for data, needle in (("images", "--data images: rank 1 (on {host}) finds other images there than rank 0 does (4 "
                                    "there, 5 on rank 0, or other names): every process must read the same data"),
                         ("x.npz", "--data x.npz: rank 1 (on {host}) reads another file at x.npz than rank 0 does")):
        result = torchrun_run(script, ["ODE", "--likelihood", "--ckpt", files["pixel"], "--vae", "none", "--data", data,
                                       "--batch-size", 2, "--sampling-method", "euler", "--num-sampling-steps", 2,
                                       "--out", tmp_path / f"bpd_{data}.npz", *FAST], tmp_path)
        assert result.returncode != 0
        lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert lines, result.stderr[-3000:]
        assert needle.format(host=socket.gethostname()) in lines[0], result.stderr[-3000:]
        assert not os.path.exists(tmp_path / f"bpd_{data}.npz.parts" / "settings.json"), data


def test_reverse_stopped_after_writing_its_out_finishes_on_the_next_run(files, tmp_path, capsys, monkeypatch):
    """A stop between writing --reverse's OUT and removing OUT.parts/ leaves an OUT of this run: the same
    command joins the parts again, computing nothing, instead of refusing OUT as an earlier run's."""
    argv, out, saved = data_job("--reverse", 3, files, tmp_path)
    parts = tmp_path / "z.pt.parts"

    def stopped(self):
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(sample.BatchParts, "remove", stopped)
        with pytest.raises(SystemExit) as exit_info:
            run(argv)
    assert exit_info.value.code == 130 and out.exists() and parts.is_dir()
    whole = saved()
    calls = []
    monkeypatch.setattr(sample, "derived_seed", lambda *args: calls.append(args))
    capsys.readouterr()
    assert run(argv) == str(out)
    assert calls == [] and not parts.exists()
    np.testing.assert_array_equal(saved(), whole)
    assert f"3 of 3 items already in {parts}; nothing left to compute" in capsys.readouterr().out


def test_a_job_of_one_batch_shows_no_progress_bar(monkeypatch):
    """A bar (tqdm on a terminal) for more than one batch only, and on the main process only."""
    from sit_fast.distributed import DistInfo

    shown = []
    monkeypatch.setattr(sample, "progress", lambda total, desc, unit, disable: shown.append(not disable)
                        or sit_fast.progress.progress(total, desc, unit, disable=True))
    other = DistInfo(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"), is_main=False)
    for total, dist in ((2, None), (3, None), (5, other)):
        results, interrupted = sample.over_batches("x", total, 2, lambda index, first: [index], dist=dist)
        assert interrupted is None
    assert shown == [False, True, False]


def test_the_main_processs_bar_counts_its_batches_once_per_process(monkeypatch):
    """Under torchrun the main process's bar counts each batch of its own once per process (the others take
    as many meanwhile), never past the items of the job."""
    from sit_fast.distributed import DistInfo

    counts = []

    class Bar:
        n = 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, count):
            counts.append(count)
            self.n += count

    monkeypatch.setattr(sample, "progress", lambda total, desc, unit, disable: Bar())
    main = DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"), is_main=True)
    results, interrupted = sample.over_batches("x", 7, 2, lambda index, first: torch.zeros(min(2, 7 - first)),
                                               dist=main)
    assert interrupted is None and [len(r) for r in results] == [2, 2]  # batches 0 and 2 of 0 .. 3
    assert counts == [4, 3]


def test_the_items_done_and_the_batches_left_are_announced_once(capsys):
    import types

    from sit_fast.distributed import DistInfo

    main, other = (DistInfo(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"), is_main=rank == 0)
                   for rank in (0, 1))
    parts = types.SimpleNamespace(pending=[0, 1, 2], batches=3, folder="z.pt.parts")
    expected = [([0, 1, 2], "3 batches of 2 on 2 processes, taken in turn\n"),  # a new run
                ([2], "4 of 5 items already in z.pt.parts; computing the other 1\n"
                      "1 batch of 2 on 2 processes, taken in turn\n"),
                ([], "5 of 5 items already in z.pt.parts; nothing left to compute\n")]
    for pending, said in expected:
        parts.pending = pending
        sample.announce(parts, 5, 2, main)
        sample.announce(parts, 5, 2, other)
        assert capsys.readouterr().out == said


def test_the_main_process_waits_for_the_other_processes_batches(tmp_path, monkeypatch):
    """Under torchrun, rank 0 polls OUT.parts/ until every pending batch is there, the bar counting
    the items of those that came."""
    import threading
    import types

    from sit_fast.distributed import DistInfo

    monkeypatch.setattr(sample, "PARTS_POLL_S", 0.05)
    single = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_main=True)
    parts = sample.BatchParts(str(tmp_path / "z.pt"), {"seed": 0}, total=5, batch_size=2, dist=single)
    assert parts.pending == [0, 1, 2]
    parts.write(0, torch.zeros(2))
    bar = types.SimpleNamespace(total=5, n=0)
    bar.update = lambda count: setattr(bar, "n", bar.n + count)
    late = [threading.Timer(0.2, parts.write, args=(2, torch.zeros(1))),
            threading.Timer(0.4, parts.write, args=(1, torch.zeros(2)))]
    for timer in late:
        timer.start()
    parts.wait(bar)
    for timer in late:
        timer.join()
    assert bar.n == 5 and [len(r) for r in parts.read(every=True)] == [2, 2, 1]


def test_the_main_process_waits_without_a_bar_when_one_batch_is_left(tmp_path, monkeypatch):
    """The rerun of a stopped torchrun job whose last batch is all that is left (no bar shown for one
    batch) waits for it as for many."""
    from sit_fast.distributed import DistInfo

    monkeypatch.setattr(sample, "PARTS_POLL_S", 0.05)
    two = DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"), is_main=True)
    first = sample.BatchParts(str(tmp_path / "z.pt"), {"seed": 0}, total=4, batch_size=2, dist=two)
    first.write(0, torch.zeros(2))
    FolderLock.release_all()  # the stopped run ended
    parts = sample.BatchParts(str(tmp_path / "z.pt"), {"seed": 0}, total=4, batch_size=2, dist=two)
    assert parts.pending == [1]
    results, interrupted = sample.over_batches("bits/dim", 4, 2, lambda k, first: parts.write(k, torch.ones(2)),
                                               parts.pending, two, wait=parts.wait)
    assert interrupted is None and [r.tolist() for r in results] == [[1.0, 1.0]]
    assert [r.tolist() for r in parts.read(every=True)] == [[0.0, 0.0], [1.0, 1.0]]


def polls_bounded(monkeypatch, limit: int, what: str) -> None:
    """sample.py's time module, but for its sleeps, which are counted: past `limit` (a wait that polls on and
    on), an AssertionError saying `what` fails the test, which would otherwise hang."""
    real = sample.time

    class Clock:
        polls = 0

        def __getattr__(self, name):
            return getattr(real, name)

        def sleep(self, seconds):
            Clock.polls += 1
            assert Clock.polls < limit, what
            real.sleep(seconds)

    monkeypatch.setattr(sample, "time", Clock())


def test_the_main_process_hears_that_another_process_failed(tmp_path, monkeypatch):
    """A process of another node that fails (a damaged image in its share) leaves word in OUT.parts/:
    rank 0, waiting for its batches, says so in one line (it polled for ever); a rerun clears the word."""
    import types

    from sit_fast.distributed import DistInfo
    from sit_fast.errors import UserError

    monkeypatch.setattr(sample, "PARTS_POLL_S", 0.05)
    polls_bounded(monkeypatch, 100, "rank 0 polled on without hearing of rank 3's end")
    dist = {r: DistInfo(rank=r, world_size=1, local_rank=0, device=torch.device("cpu"), is_main=r == 0) for r in (0, 3)}
    parts = sample.BatchParts(str(tmp_path / "z.pt"), {"seed": 0}, total=5, batch_size=2, dist=dist[0])
    with pytest.raises(UserError):
        with sample.unused_parts_removed(parts, dist[3]):  # rank 3's share
            raise UserError("cannot read image /data/003.png (truncated)")
    bar = types.SimpleNamespace(total=5, n=0, update=lambda count: None)
    with pytest.raises(UserError) as error:
        parts.wait(bar)
    assert str(error.value) == (f"rank 3 failed: cannot read image /data/003.png (truncated); the batches finished "
                                f"are kept in {parts.folder}: run the same command again once that is fixed")
    FolderLock.release_all()  # the first run ended (sample.main's end)
    again = sample.BatchParts(str(tmp_path / "z.pt"), {"seed": 0}, total=5, batch_size=2, dist=dist[0])
    assert sorted(os.listdir(again.folder)) == [".lock", "settings.json"]

    # A stop signal sent to rank 3's node alone: word too (rank 0 polled for ever).
    from sit_fast.interrupts import Stopped

    sample.stopped_word(again, Stopped(signal.SIGTERM), dist[3])
    with pytest.raises(UserError) as error:
        again.wait(bar)
    assert str(error.value) == (f"rank 3 was stopped by SIGTERM; the batches finished are kept in {parts.folder}: "
                                f"run the same command again to compute the rest")
    sample.stopped_word(again, Stopped(signal.SIGTERM), dist[0])  # the main process: no word, it waits for none
    sample.stopped_word(again, None, dist[3])  # not stopped: no word
    assert sorted(os.listdir(again.folder)) == [".lock", "failed-rank-3.txt", "settings.json"]

    # An adaptive solver's step size fallen to 0 there: said in the flags' words, as rank 0 says its own.
    from sit_fast.transport.integrators import StepSizeUnderflow

    os.remove(os.path.join(again.folder, "failed-rank-3.txt"))
    underflow = StepSizeUnderflow("dopri5: the adaptive step size fell to 0 (underflow in dt 0.0): the error estimate "
                                  "never met atol 1e-30 / rtol 1e-30", "dopri5", 1e-30, 1e-30)
    with pytest.raises(StepSizeUnderflow):
        with sample.unused_parts_removed(again, dist[3]):
            raise underflow
    with pytest.raises(UserError) as error:
        again.wait(bar)
    assert str(error.value).startswith("rank 3 failed: --sampling-method dopri5: the adaptive step size fell to 0 "
                                       "(underflow in dt 0.0): the error estimate never met --atol 1e-30 / --rtol "
                                       "1e-30; the batches finished are kept in "), str(error.value)
    import pickle

    copy = pickle.loads(pickle.dumps(underflow))  # pickled with its arguments
    assert (str(copy), copy.method, copy.atol, copy.rtol) == (str(underflow), "dopri5", 1e-30, 1e-30)


def test_the_main_process_ends_its_wait_when_another_process_heartbeat_stops(tmp_path, monkeypatch):
    """A process killed on another node leaves no word in OUT.parts/: rank 0, waiting for its batches, ends
    when its heartbeat has stopped (Liveness), the batches finished kept; one that beats on is waited for."""
    import threading
    import types

    import torch.distributed as torch_dist

    from sit_fast import distributed
    from sit_fast.distributed import DistInfo
    from sit_fast.errors import PeerFailed

    store = torch_dist.HashStore()
    monkeypatch.setattr(distributed, "_store", lambda: store)
    monkeypatch.setattr(distributed, "PEER_SILENT_S", 1.0)  # many polls and beats: a loaded machine's pauses
    monkeypatch.setattr(distributed, "_joined", [])  # no hosts known: ranks named by number
    monkeypatch.setattr(sample, "PARTS_POLL_S", 0.02)
    polls_bounded(monkeypatch, 500, "rank 0 polled on without taking rank 1's silence as its end")
    two = DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"), is_main=True)
    parts = sample.BatchParts(str(tmp_path / "z.pt"), {"seed": 0}, total=4, batch_size=2, dist=two)
    parts.write(0, torch.zeros(2))
    bar = types.SimpleNamespace(total=4, n=0, update=lambda count: None)
    beating = threading.Event()

    def beat():  # rank 1 alive past PEER_SILENT_S, then its batch
        for _ in range(100):
            store.add("sit_fast/heartbeat/1", 1)
            beating.wait(0.02)
        parts.write(1, torch.zeros(2))

    late = threading.Thread(target=beat)
    late.start()
    parts.wait(bar)
    late.join()
    assert [len(r) for r in parts.read(every=True)] == [2, 2]
    FolderLock.release_all()  # that run ended
    os.remove(os.path.join(parts.folder, "000001.pt"))
    parts = sample.BatchParts(str(tmp_path / "z.pt"), {"seed": 0}, total=4, batch_size=2, dist=two)
    assert parts.pending == [1]
    with pytest.raises(PeerFailed) as error:  # rank 1's count no longer moves: no batch will come
        parts.wait(bar)
    assert str(error.value) == (f"rank 1 ended without a word (no heartbeat for 1 s: killed, or its node lost?); "
                                f"the batches finished are kept in {parts.folder}: run the same command again to "
                                f"compute the rest")


@pytest.mark.parametrize("job", ["--likelihood", "--reverse"])
def test_likelihood_and_reverse_leave_their_done_mark_only_when_their_batches_are_computed(job, files, tmp_path,
                                                                                          monkeypatch):
    """A process's heartbeat block gets its done mark (heartbeat's done) once its share is computed, so that
    the main process, waiting for other batches, takes its silence as no end (Liveness); not when Ctrl-C
    stopped it (the word it leaves says so)."""
    marks = []

    @contextlib.contextmanager
    def heartbeat(dist):
        marks.append("beats")
        yield lambda: marks.append("done")
        marks.append("stopped")

    monkeypatch.setattr(sample, "heartbeat", heartbeat)
    argv, out, saved = data_job(job, 3, files, tmp_path)
    run(argv)
    assert marks == ["beats", "done", "stopped"] and len(saved()) == 3
    out.unlink()
    marks.clear()
    stop_at_batch(monkeypatch, 2, ctrl_c)  # Ctrl-C in the second batch
    with pytest.raises(SystemExit) as exit_info:
        run(argv)
    assert exit_info.value.code == 130 and marks == ["beats", "stopped"]


def test_torchrun_refuses_a_grid_and_a_likelihood_without_out(files, tmp_path, capsys, monkeypatch):
    from sit_fast.distributed import DistInfo

    monkeypatch.setattr(sample, "init_distributed", lambda: DistInfo(rank=0, world_size=2, local_rank=0,
                                                                     device=torch.device("cpu"), is_main=True))
    for argv, message in ((["ODE"], "error: a grid is sampled by one process: run it with python"),
                          (["ODE", "--likelihood", "--data", tmp_path / "x.pt"],
                           "error: under torchrun, --likelihood needs --out FILE.npz")):
        with pytest.raises(SystemExit):
            run([*argv, "--ckpt", files["pixel"], "--vae", "none", *FAST])
        assert one_line_error(capsys).startswith(message)


def test_likelihood_takes_npz_files_whatever_the_case_of_their_extension(files, tmp_path, capsys):
    """--data X.NPZ is read as an .npz (here uint8 images), --out Y.NPZ is written as named, as a .npz
    extension of any case is elsewhere; an --out without the extension gets .npz."""
    images = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    with open(tmp_path / "X.NPZ", "wb") as f:
        np.savez(f, images)
    argv = ["ODE", "--likelihood", "--ckpt", files["pixel"], "--vae", "none", "--data", tmp_path / "X.NPZ",
            "--sampling-method", "euler", "--num-sampling-steps", 2, *FAST]
    bpd = run(argv + ["--out", tmp_path / "Y.NPZ"])
    assert sorted(os.listdir(tmp_path)) == ["X.NPZ", "Y.NPZ"] and len(bpd) == 2
    with np.load(tmp_path / "Y.NPZ") as archive:
        np.testing.assert_array_equal(archive["bpd"], bpd)
    run(argv + ["--out", tmp_path / "Z"])
    assert (tmp_path / "Z.npz").is_file()


def test_what_a_parts_folder_keeps_is_counted_from_one_listing(tmp_path, monkeypatch):
    """BatchParts.kept, said as a write fails (a full disk, a failing one): the batches there counted from one
    listing of the folder, not one per batch of the job (tens of thousands, on the disk that fails)."""
    import types

    folder = tmp_path / "out.pt.parts"
    folder.mkdir()
    for k in (0, 2):
        (folder / sample.BatchParts.name(k)).write_bytes(b"x")
    (folder / "settings.json").write_text("{}")
    parts = types.SimpleNamespace(folder=str(folder), batches=1000, name=sample.BatchParts.name)
    listings = []
    real_listdir = os.listdir
    monkeypatch.setattr(sample.os, "listdir", lambda path: listings.append(path) or real_listdir(path))
    assert sample.BatchParts.kept(parts) == f"the 2 batches written are kept in {folder}"
    assert listings == [str(folder)]
    monkeypatch.undo()
    folder_empty = types.SimpleNamespace(folder=str(tmp_path / "gone.parts"), batches=3, name=sample.BatchParts.name)
    assert sample.BatchParts.kept(folder_empty) == "nothing was written yet"


@pytest.mark.parametrize("job", ["--likelihood", "--reverse"])
def test_a_full_disk_writing_likelihood_or_reverse_results_is_one_line(job, files, tmp_path, capsys, monkeypatch):
    import builtins

    from sit_fast import files as file_helpers

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    torch.save(torch.randn(2, 3, 8, 8).clamp(-1, 1), tmp_path / "x.pt")
    out = tmp_path / ("bpd.npz" if job == "--likelihood" else "z.pt")
    argv = ["ODE", job, "--ckpt", files["pixel"], "--vae", "none", "--data", tmp_path / "x.pt", "--out", out,
            "--sampling-method", "euler", "--num-sampling-steps", 2, *FAST]
    real_open = builtins.open
    for failing in ("settings.json", "000000.pt", out.name):  # each file the job writes, in turn

        def full_disk_for(path, mode="r", *args, **kwargs):
            if os.path.basename(path).startswith(f".{failing}.tmp-"):
                full()
            return real_open(path, mode, *args, **kwargs)

        monkeypatch.setattr(file_helpers, "open", full_disk_for, raising=False)
        with pytest.raises(SystemExit) as exit_info:
            run(argv)
        assert exit_info.value.code == 2
        path = out if failing == out.name else tmp_path / f"{out.name}.parts" / failing
        kept = ("nothing was computed yet" if failing == "settings.json"  # written before the first batch
                else "nothing was written yet" if failing == "000000.pt"  # the first batch: none is kept
                else f"the 1 batch written is kept in {out}.parts")
        done = "" if failing == "settings.json" else " to finish"
        assert one_line_error(capsys) == (f"error: cannot write {path} (No space left on device): {kept}: make room "
                                          f"(or make the folder writable) and run the same command again{done}")
    # the batch is kept: only OUT is left to write
    assert sorted(os.listdir(tmp_path / f"{out.name}.parts")) == [".lock", "000000.pt", "settings.json"]

    def failing_disk(path, mode="r", *args, **kwargs):  # an error not of a refused write: not called one
        if os.path.basename(path).startswith(f".{out.name}.tmp-"):
            raise OSError(errno.EIO, "Input/output error")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(file_helpers, "open", failing_disk, raising=False)
    with pytest.raises(SystemExit) as exit_info:  # one line too, not a traceback
        run(argv)
    assert exit_info.value.code == 2
    assert one_line_error(capsys) == (f"error: cannot write {out} (Input/output error, EIO): the 1 batch written is "
                                      f"kept in {out}.parts: fix the disk (the system log says what failed), or "
                                      f"write onto another filesystem and run the same command again to finish")
    assert not [n for _, _, names in os.walk(tmp_path) for n in names if ".tmp-" in n]


@pytest.mark.parametrize("job", ["--likelihood", "--reverse"])
def test_a_failing_disk_writing_the_first_batch_is_one_line_saying_nothing_was_written(job, files, tmp_path, capsys,
                                                                                        monkeypatch):
    """An I/O error (a failing disk's EIO, not a write the filesystem refused) writing a batch of OUT.parts/
    was a traceback; the first batch refused said that "the batches computed are kept", where none was.
    One line naming the file, the OS's error, that nothing was written yet and what to do; no temporary
    file left."""
    import builtins

    from sit_fast import files as file_helpers

    torch.save(torch.randn(2, 3, 8, 8).clamp(-1, 1), tmp_path / "x.pt")
    out = tmp_path / ("bpd.npz" if job == "--likelihood" else "z.pt")
    argv = ["ODE", job, "--ckpt", files["pixel"], "--vae", "none", "--data", tmp_path / "x.pt", "--out", out,
            "--sampling-method", "euler", "--num-sampling-steps", 2, "--batch-size", 1, *FAST]
    real_open = builtins.open

    def failing_disk(path, mode="r", *args, **kwargs):
        if os.path.basename(path).startswith((".000000.pt.tmp-", ".000001.pt.tmp-")):
            raise OSError(errno.EIO, "Input/output error")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(file_helpers, "open", failing_disk, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        run(argv)
    assert exit_info.value.code == 2
    parts = tmp_path / f"{out.name}.parts"
    assert one_line_error(capsys) == (f"error: cannot write {parts / '000000.pt'} (Input/output error, EIO): nothing "
                                      f"was written yet: fix the disk (the system log says what failed), or write "
                                      f"onto another filesystem and run the same command again to finish")
    assert not [n for _, _, names in os.walk(tmp_path) for n in names if ".tmp-" in n]
    assert "cannot write" not in capsys.readouterr().err

#################################################################################
#                                   CUDA                                         #
#################################################################################

def _cuda_graph_model(config: str):
    """(model, ModelForwards kwargs) for the CUDA-graph tests. "reference": fp32, math attention,
    no fused kernels, trainable weights; "sample.py": what sample.py builds on CUDA (frozen, attention
    and fused kernels "auto", i.e. SDPA and the Triton kernels, bf16 autocast with bf16 weights)."""
    model = random_sit(4, learn_sigma=True).cuda().eval()
    if config == "reference":
        return model, {}
    model.requires_grad_(False)
    model.set_attn_backend("auto")
    model.fused_kernels = "auto"
    return model, dict(autocast_dtype=torch.bfloat16, cast_weights=True)


@pytest.mark.cuda
@pytest.mark.spread
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compile, config", [(False, "reference"), (False, "sample.py"), (True, "sample.py")])
def test_cuda_graph_forwards_match_eager(compile, config):
    """Replays match the calls they captured and eager calls, for new inputs at every call, the
    conditional and the guided graphs interleaved, and (uncompiled: each batch size is a compilation)
    a second batch size, another pair of graphs in the shared pool, and back. A replay is the same
    kernels as the function it captured: a tight bound. Against eager in bf16 (compiled code rounds
    elsewhere; guidance's 3c - 2u triples a rounding), a norm-wise one."""
    model, kwargs = _cuda_graph_model(config)
    eager = ModelForwards(model, cfg_scale=3.0, **kwargs)
    fast = ModelForwards(model, cfg_scale=3.0, compile=compile, cuda_graphs=True, **kwargs)
    assert isinstance(fast.guided, CUDAGraphForward)

    def check(graph, eager_fn, *inputs):
        out = graph(*inputs)
        torch.testing.assert_close(out, graph.fn(*inputs), rtol=1e-4, atol=1e-4)  # the captured function
        expected = eager_fn(*inputs)
        if config == "reference":
            torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
        else:
            rel = ((out - expected).norm() / expected.norm()).item()
            assert rel < 2e-2, f"{graph.fn}: norm-wise relative error {rel:.2e} against eager"

    with torch.inference_mode():
        for B in (5, 5) if compile else (5, 3, 5, 5):
            x, t = torch.randn(B, 4, 8, 8, device="cuda"), torch.rand(B, device="cuda")
            y = torch.randint(NUM_CLASSES, (B,), device="cuda")
            check(fast.guided, eager.guided, x, t, fast.label_pair(y))
            check(fast.conditional, eager.conditional, x, t, y)
    graphs = 1 if compile else 2
    assert len(fast.guided.graphs) == graphs and len(fast.conditional.graphs) == graphs


@pytest.mark.cuda
@pytest.mark.spread
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("config", ["reference", "sample.py"])
def test_cuda_graph_sde_sampling_matches_eager(config):
    """A guided SDE run with --cfg-interval through Denoiser: the per-step noise is drawn outside the
    graphs from the seeded global generator, so graphs change neither it nor the samples."""
    model, kwargs = _cuda_graph_model(config)
    transport = create_transport()
    sample_fn = Sampler(transport).sample_sde(sampling_method="Euler", diffusion_form="sigma", num_steps=8)
    times = model_call_times("SDE", transport, sampling_method="Euler", num_steps=8, diffusion_form="sigma")
    z = torch.randn(3, 4, 8, 8, device="cuda")
    y = torch.randint(NUM_CLASSES, (3,), device="cuda")
    samples = []
    for cuda_graphs in (False, True):
        forwards = ModelForwards(model, cfg_scale=3.0, cuda_graphs=cuda_graphs, **kwargs)
        denoiser = Denoiser(forwards, cfg_scale=3.0, cfg_interval=(0.0, 0.5), call_times=times)
        torch.manual_seed(7)
        with torch.inference_mode():
            fn = denoiser.for_labels(y)
            samples.append(sample_fn(z, fn)[-1])
        fn.check_finished()
        assert 0 < fn.guided_calls < fn.calls
        if cuda_graphs:  # both forwards replayed from graphs, one batch size each
            assert len(forwards.guided.graphs) == len(forwards.conditional.graphs) == 1
    tol = dict(rtol=1e-4, atol=1e-4) if config == "reference" else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(samples[1], samples[0], **tol)


def test_an_fid_folder_records_a_local_vae_by_its_real_path(tmp_path, monkeypatch):
    """`--vae vae` typed in two folders is two VAEs, `/x/vae/` and `/x/vae` one: the recorded setting was
    the text as typed, so a resume from another folder mixed two VAEs' images into one FID folder."""
    import argparse
    import types

    (tmp_path / "a" / "vae").mkdir(parents=True)
    (tmp_path / "b" / "vae").mkdir(parents=True)
    setup = types.SimpleNamespace(info={"path": "m.pt", "weights": "ema", "model": "SiT-T/2"}, image_size=8,
                                  num_classes=10, in_channels=4)

    def recorded(vae, folder):
        monkeypatch.chdir(folder)
        args = argparse.Namespace(mode="ODE", sampling_method="euler", vae=vae, cfg_scale=4.0)
        return sample.image_settings(args, setup)["vae"]

    assert recorded("vae", tmp_path / "a") != recorded("vae", tmp_path / "b")
    assert recorded("vae", tmp_path / "a") == recorded(str(tmp_path / "a" / "vae") + "/", tmp_path) \
        == os.path.realpath(tmp_path / "a" / "vae")
    os.symlink(tmp_path / "a" / "vae", tmp_path / "link")  # a link to the folder: the same VAE
    assert recorded(str(tmp_path / "link"), tmp_path) == recorded("vae", tmp_path / "a")
    assert recorded("ema", tmp_path) == "ema"  # an alias, and a hub id, stay as they are
    assert recorded("owner/vae", tmp_path) == "owner/vae"
    assert recorded("stabilityai/sd-vae-ft-ema", tmp_path) == "ema"  # but an alias's hub id is the alias


def test_a_stop_while_saving_a_grid_keeps_the_earlier_one(tmp_path, monkeypatch):
    """A stop signal (a KeyboardInterrupt, which PIL does not clean up after) while a grid was saved
    left a cut-short PNG in place of the earlier grid; grids and FID PNGs are written whole or not at all."""
    from PIL import Image as PILImage

    from sit_fast.images import save_image_grid
    from sit_fast.sampling import _write_png

    path = tmp_path / "grid.png"
    save_image_grid(torch.zeros(2, 3, 8, 8), path)
    before = path.read_bytes()
    real_save = PILImage.Image.save

    def stopped_mid_save(self, fp, *args, **kwargs):
        real_save(self, fp, *args, **kwargs)
        fp.truncate(10)  # half written
        raise KeyboardInterrupt

    monkeypatch.setattr(PILImage.Image, "save", stopped_mid_save)
    with pytest.raises(KeyboardInterrupt):
        save_image_grid(torch.ones(4, 3, 8, 8), path)
    with pytest.raises(KeyboardInterrupt):
        _write_png(np.zeros((8, 8, 3), np.uint8), str(tmp_path / "000000.png"))
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["grid.png"]
    monkeypatch.setattr(PILImage.Image, "save", real_save)
    assert save_image_grid(torch.ones(4, 3, 8, 8), tmp_path / "g.JPG") == str(tmp_path / "g.JPG")
    assert read_png(tmp_path / "g.JPG").shape == (2 * 10 + 2, 2 * 10 + 2, 3)


@pytest.mark.parametrize("mode, method, last_step, ignored", [
    ("ODE", "dopri5", None, {"num_sampling_steps"}), ("ODE", "euler", None, {"atol", "rtol"}),
    ("ODE", "rk4", None, {"atol", "rtol"}), ("ODE", "implicit_adams", None, set()),
    ("ODE", "fixed_adams", None, set()), ("SDE", "Euler", "Mean", set()), ("SDE", "Heun", None, {"last_step_size"})])
def test_a_folders_settings_leave_out_only_the_flags_its_sampler_ignores(mode, method, last_step, ignored):
    """implicit_adams is fixed-step, yet its corrector iterates to atol/rtol: a resume with other
    tolerances would mix two samplers' images in one folder. An SDE without a last step has no use
    for its size."""
    args = argparse.Namespace(mode=mode, sampling_method=method, cfg_scale=4.0, last_step=last_step)
    assert sample.settings_ignored(args) == ignored
    # unguided, the guidance's channels and interval decide nothing (nor, so, a folder written before
    # --cfg-channels followed the model)
    args.cfg_scale = 1.0
    assert sample.settings_ignored(args) == ignored | {"cfg_channels", "cfg_interval"}


@pytest.mark.parametrize("mode, method, why", [
    ("SDE", "Euler", "it fixes the SDE's noise"), ("ODE", "dopri5", "it steers the adaptive solver's steps"),
    ("ODE", "euler", "it changes results in the last bits")])
def test_out_of_memory_advice_says_why_a_batch_size_needs_a_new_folder(mode, method, why):
    args = argparse.Namespace(batch_size=64, class_labels=None, precision="tf32", vae="ema", vae_precision="fp32",
                              run_folder=True, job="fid", cfg_scale=1.5, mode=mode, sampling_method=method)
    assert sample.out_of_memory_advice(args, torch.device("cuda:0")) == (
        "out of GPU memory on cuda:0 sampling batches of 64 (guidance doubles the batch the model sees): try "
        "--batch-size 32, --precision bf16, --vae-precision bf16 (the images written so far stay; another batch "
        f"size samples into a new folder, since {why})")


@pytest.mark.parametrize("given, advice", [
    (dict(batch_size=1, vae="none", cfg_scale=1.0), "batches of 1: try --precision bf16"),
    (dict(class_labels=[1, 2, 3], precision="bf16", vae_precision="bf16"),
     "batches of 3 (guidance doubles the batch the model sees): try --batch-size 1"),
    (dict(batch_size=1, precision="bf16", cfg_scale=1.0), "batches of 1: try --vae-precision bf16"),
    (dict(batch_size=1, precision="bf16", vae_precision="bf16", cfg_scale=1.0),
     "batches of 1: this model does not fit this GPU at batch size 1"),
])
def test_out_of_memory_advice_names_only_the_flags_that_change_something(given, advice):
    """No --batch-size under 1, no --vae-precision without a VAE, no word of guidance without it."""
    args = argparse.Namespace(**{**dict(batch_size=None, class_labels=None, precision="tf32", vae="ema",
                                        vae_precision="fp32", run_folder=False, job="grid", cfg_scale=4.0, mode="ODE",
                                        sampling_method="euler"), **given})
    assert sample.out_of_memory_advice(args, torch.device("cuda:0")) == f"out of GPU memory on cuda:0 sampling {advice}"


@pytest.mark.parametrize("prog, given, named", [
    (None, ["--per-proc-batch-size", 64], "--per-proc-batch-size"), (None, ["--batch-size", 64], "--batch-size"),
    (None, [], "--batch-size"), ("sample_ddp.py", [], "--per-proc-batch-size"),
    ("sample_ddp.py", ["--batch-size=64"], "--batch-size")])
def test_out_of_memory_advice_names_the_batch_size_as_given(prog, given, named):
    """Upstream sample_ddp.py's --per-proc-batch-size, given (or sample_ddp.py's batch, not given), is
    what the advice names, not its alias --batch-size."""
    parser = sample.build_parser(sample.SAMPLE_DDP_DEFAULTS if prog else None, prog)
    args = parser.parse_args(["ODE", "--ckpt", "x.pt", "--num-fid-samples", "100", *map(str, given)])
    args.prog = prog
    args = sample.resolve_args(args)
    args.precision, args.vae_precision = "bf16", "bf16"
    assert sample.out_of_memory_advice(args, torch.device("cuda:0")).endswith(
        f"sampling batches of {args.batch_size}: try {named} {args.batch_size // 2} (the images written so far "
        f"stay; another batch size samples into {'a new folder' if prog else 'another --sample-dir'}, since it "
        "steers the adaptive solver's steps)")
    assert sample.size_flags(args) == f"--num-sampling-steps {args.num_sampling_steps}, {named} {args.batch_size}"


def test_a_class_label_outside_the_models_classes_names_its_count(files, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run(["ODE", "--ckpt", files["pixel"], "--vae", "none", "--class-labels", 1, NUM_CLASSES, "--out",
             tmp_path / "grid.png", *FAST])
    assert one_line_error(capsys) == (f"error: --class-labels {NUM_CLASSES} is outside 0 .. {NUM_CLASSES - 1}: the "
                                      f"model has {NUM_CLASSES} classes")


def test_fid_and_data_jobs_default_batch_sizes_are_upstreams():
    """sample_ddp.py's --per-proc-batch-size defaults to upstream's 32 (it names the run folder and
    decides SDE / adaptive images); --likelihood and --reverse to 16."""
    args = sample.resolve_args(sample.build_parser(sample.SAMPLE_DDP_DEFAULTS).parse_args(["SDE"]))
    assert (args.batch_size, args.num_sampling_steps, args.seed) == (32, 250, 0)
    args = sample.resolve_args(sample.build_parser().parse_args(["ODE", "--num-fid-samples", "10"]))
    assert args.batch_size == 32
    for job in ("--likelihood", "--reverse"):
        args = sample.resolve_args(sample.build_parser().parse_args(["ODE", job, "--data", "x.pt"]))
        assert args.batch_size == 16, job


def test_fid_ranks_take_disjoint_chunks_in_turn(files, tmp_path, monkeypatch):
    """Rank r of W samples chunks r, r + W, ...: with 7 images in chunks of 2 on 2 ranks, rank 1 writes
    images 2, 3, 6 only (no chunk sampled twice, none skipped), and they are a single process's."""
    argv = ["ODE", "--ckpt", files["pixel"], "--vae", "none", "--sampling-method", "euler",
            "--num-sampling-steps", 2, "--num-fid-samples", 7, "--per-proc-batch-size", 2, *FAST]
    run(argv + ["--sample-dir", tmp_path / "single"])
    with np.load(f"{tmp_path / 'single'}.npz") as archive:
        single = archive["arr_0"]
    # one process of a two-process job, in this process: the collectives are rank 0's answers
    as_rank_1_of_2(monkeypatch)
    sample_dir = tmp_path / "two"
    run(argv + ["--sample-dir", sample_dir])
    assert sorted(n for n in os.listdir(sample_dir) if n.endswith(".png")) == [f"{i:06d}.png" for i in (2, 3, 6)]
    monkeypatch.undo()  # one process finishes the folder (chunks 0 and 2) and writes the .npz
    run(argv + ["--sample-dir", sample_dir])
    with np.load(f"{sample_dir}.npz") as archive:
        np.testing.assert_array_equal(archive["arr_0"], single)


def test_sde_per_step_noise_differs_between_batches(files, tmp_path, monkeypatch):
    """An SDE's per-step noise is drawn per batch (seed, batch): two batches of the same starting
    noise and label give different images, in a grid and in the FID job."""
    real_index_noise = sample.index_noise
    monkeypatch.setattr(sample, "index_noise",  # every image: image 0's noise and label
                        lambda seed, indices, *a, **k: real_index_noise(seed, [0] * len(indices), *a, **k))
    common = ["SDE", "--ckpt", files["pixel"], "--vae", "none", "--num-sampling-steps", 3, "--cfg-scale", 1.0,
              "--batch-size", 1, *FAST]
    run(common + ["--class-labels", 1, 1, "--out", tmp_path / "g.png"])
    grid = read_png(tmp_path / "g.png")  # 2 images of 8 x 8, 2 px apart
    assert not np.array_equal(grid[2:10, 2:10], grid[2:10, 12:20])
    run(common + ["--num-fid-samples", 2, "--sample-dir", tmp_path / "s"])
    assert not np.array_equal(read_png(tmp_path / "s" / "000000.png"), read_png(tmp_path / "s" / "000001.png"))


def test_likelihood_without_labels_is_the_null_class_which_may_also_be_given(files, tmp_path):
    """--likelihood without --class-labels conditions on the null class (num_classes, unconditional):
    the same bpd as --class-labels NUM_CLASSES given, other than the last real class's."""

    torch.save(torch.randn(2, 3, 8, 8).clamp(-1, 1), tmp_path / "x.pt")
    argv = ["ODE", "--likelihood", "--ckpt", files["pixel"], "--vae", "none", "--data", tmp_path / "x.pt",
            "--sampling-method", "euler", "--num-sampling-steps", 2, *FAST]
    default = run(argv)
    np.testing.assert_array_equal(run(argv + ["--class-labels", NUM_CLASSES]), default)
    assert not np.array_equal(run(argv + ["--class-labels", NUM_CLASSES - 1]), default)


def test_data_job_ranks_take_disjoint_batches_in_turn(files, tmp_path, monkeypatch):
    """Rank r of W computes batches r, r + W, ... of --likelihood --out: rank 1 of 2, on 7 items in
    batches of 2, writes batches 1 and 3 alone."""
    argv, out, _ = data_job("--likelihood", 7, files, tmp_path)
    as_rank_1_of_2(monkeypatch)
    run(argv)
    assert sorted(n for n in os.listdir(f"{out}.parts") if n.endswith(".pt")) == ["000001.pt", "000003.pt"]


def test_guidance_and_cfg_interval_flags_of_the_data_jobs_and_equal_bounds():
    """--likelihood and --reverse refuse a --cfg-scale other than 1; --cfg-interval LOW == HIGH is allowed
    (LOW must not exceed HIGH)."""
    from sit_fast.errors import UserError

    parse = sample.build_parser().parse_args
    for job in ("--likelihood", "--reverse"):
        with pytest.raises(UserError, match="runs without guidance"):
            sample.resolve_args(parse(["ODE", job, "--data", "x.pt", "--cfg-scale", "4"]))
        assert sample.resolve_args(parse(["ODE", job, "--data", "x.pt", "--cfg-scale", "1"])).cfg_scale == 1.0
    args = sample.resolve_args(parse(["ODE", "--cfg-scale", "4", "--cfg-interval", "0.5", "0.5"]))
    assert args.cfg_interval == [0.5, 0.5]


def test_cfg_channels_and_cfg_interval_without_guidance_are_refused():
    """--cfg-channels, as --cfg-interval, decides nothing at --cfg-scale 1 (typed, or the FID and data jobs'
    default): refused in one line; left unset, the FID job runs unguided."""
    from sit_fast.errors import UserError

    parse = sample.build_parser().parse_args
    for flag, values in (("--cfg-channels", ["all"]), ("--cfg-interval", ["0.2", "0.5"])):
        with pytest.raises(UserError, match=rf"^{flag} has no effect with --cfg-scale 1: drop it, or pass a "
                                            r"--cfg-scale other than 1$"):
            sample.resolve_args(parse(["ODE", flag, *values, "--cfg-scale", "1"]))
        with pytest.raises(UserError, match=rf"^{flag} has no effect with --cfg-scale 1 \(the default of "
                                            r"--num-fid-samples\): drop it, or pass"):
            sample.resolve_args(parse(["ODE", flag, *values, "--num-fid-samples", "8"]))
        with pytest.raises(UserError, match=rf"^{flag} has no effect with --cfg-scale 1 \(the default of "
                                            r"--likelihood\): drop it$"):
            sample.resolve_args(parse(["ODE", flag, *values, "--likelihood", "--data", "x.pt"]))
    args = sample.resolve_args(parse(["ODE", "--num-fid-samples", "8"]))
    assert (args.cfg_scale, args.cfg_channels, args.cfg_interval) == (1.0, None, None)
    args = sample.resolve_args(parse(["ODE", "--num-fid-samples", "8", "--cfg-scale", "1.5", "--cfg-channels", "3"]))
    assert (args.cfg_scale, args.cfg_channels) == (1.5, 3)
    assert sample.resolve_args(parse(["ODE", "--cfg-channels", "all"])).cfg_channels == "all"  # a grid: 4.0


@pytest.mark.parametrize("given", [[], ["--num-fid-samples", "8"]])
@pytest.mark.parametrize("flag,values", [("--cfg-channels", ["all"]), ("--cfg-interval", ["0.2", "0.5"])])
def test_sample_ddp_names_its_own_default_cfg_scale(flag, values, given, capsys):
    """sample_ddp.py's --cfg-scale 1 is its own default (its --num-fid-samples need not be typed)."""
    with pytest.raises(SystemExit):
        sample.main(["ODE", flag, *values, *given], defaults=sample.SAMPLE_DDP_DEFAULTS, prog="sample_ddp.py")
    assert one_line_error(capsys) == (f"error: {flag} has no effect with --cfg-scale 1 (sample_ddp.py's default): "
                                      f"drop it, or pass a --cfg-scale other than 1")


@pytest.mark.parametrize("argv,needle", [
    (["--likelihood", "--reverse", "--data", "x.pt"], "--likelihood and --reverse are two jobs: pass one"),
    (["--likelihood", "--data", "x.pt", "--num-fid-samples", "4"],
     "--likelihood and --num-fid-samples are two jobs: pass one"),
    (["--reverse", "--data", "x.pt", "--num-fid-samples", "4"], "--reverse and --num-fid-samples are two jobs"),
    (["--reverse", "--data", "x.pt", "--exact-divergence"], "--exact-divergence applies to --likelihood only"),
    (["--exact-divergence"], "--exact-divergence applies to --likelihood only"),
    (["--likelihood", "--data", "x.pt", "--cuda-graphs"], "--likelihood needs them"),  # with or without CUDA
])
def test_flags_of_two_jobs_at_once_are_refused_before_any_work(argv, needle):
    from sit_fast.errors import UserError

    with pytest.raises(UserError) as error:
        sample.resolve_args(sample.build_parser().parse_args(["ODE", *argv]))
    assert needle in str(error.value), error.value


@pytest.mark.parametrize("job,name", [([], "grid.png"), (["--num-fid-samples", "2"], "fid.npz"),
                                      (["--reverse", "--data", "x.pt"], "noise.pt")])
def test_an_out_that_is_a_folder_is_refused_before_any_work(job, name, tmp_path):
    from sit_fast.errors import UserError

    (tmp_path / name).mkdir()
    with pytest.raises(UserError, match=f"--out .*{name} is a folder: name the file to write"):
        sample.resolve_args(sample.build_parser().parse_args(["ODE", *job, "--out", str(tmp_path / name)]))


def test_precision_defaults_to_upstreams_tf32():
    for parser in (sample.build_parser(), sample.build_parser(sample.SAMPLE_DDP_DEFAULTS)):
        assert sample.resolve_args(parser.parse_args(["ODE"])).precision == "tf32"


def test_an_fid_folder_refuses_a_resume_that_changes_how_labels_are_drawn(files, tmp_path, capsys):
    """--class-balanced changes every image's label: a folder sampled without it is not resumed with it."""

    argv = ["ODE", "--ckpt", files["pixel"], "--vae", "none", "--sampling-method", "euler",
            "--num-sampling-steps", 2, "--per-proc-batch-size", 2, "--sample-dir", tmp_path / "s", *FAST]
    run(argv + ["--num-fid-samples", 2])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run(argv + ["--num-fid-samples", 4, "--class-balanced"])
    assert "other settings" in one_line_error(capsys)


def test_double_precision_model_inputs_are_read_as_float(files, tmp_path):
    """A float64 .pt of model inputs is taken as fp32: the same noise as the fp32 tensor gives."""
    x = torch.randn(2, 3, 8, 8).clamp(-1, 1)
    torch.save(x, tmp_path / "x32.pt")
    torch.save(x.double(), tmp_path / "x64.pt")
    common = ["ODE", "--reverse", "--ckpt", files["pixel"], "--vae", "none", "--sampling-method", "euler",
              "--num-sampling-steps", 2, *FAST]
    single = torch.load(run(common + ["--data", tmp_path / "x32.pt", "--out", tmp_path / "z32.pt"]), weights_only=True)
    double = torch.load(run(common + ["--data", tmp_path / "x64.pt", "--out", tmp_path / "z64.pt"]), weights_only=True)
    assert double.dtype == torch.float32
    torch.testing.assert_close(double, single, rtol=0, atol=0)


def test_reverse_is_the_samplers_reverse_ode(files, tmp_path):
    """--reverse's noise is Sampler.sample_ode(reverse=True) of the data under the model (null label,
    no guidance): data -> noise, not the sampling direction."""
    from sit_fast.models import SiT_models
    from sit_fast.transport import Sampler, create_transport

    x = torch.randn(2, 3, 8, 8).clamp(-1, 1)
    torch.save(x, tmp_path / "x.pt")
    out = run(["ODE", "--reverse", "--ckpt", files["pixel"], "--vae", "none", "--data", tmp_path / "x.pt",
               "--sampling-method", "euler", "--num-sampling-steps", 3, "--out", tmp_path / "z.pt", *FAST])
    model = SiT_models["SiT-T/2"](input_size=8, in_channels=3, num_classes=NUM_CLASSES, learn_sigma=False)
    model.load_state_dict(torch.load(files["pixel"], weights_only=True))
    model.eval()
    y = torch.full((2,), NUM_CLASSES)
    sample_fn = Sampler(create_transport()).sample_ode(sampling_method="euler", num_steps=3, reverse=True)
    with torch.no_grad():
        expected = sample_fn(x, lambda x_t, t: model(x_t, t, y))[-1]
    torch.testing.assert_close(torch.load(out, weights_only=True), expected, rtol=1e-4, atol=1e-4)


def test_cfg_interval_reaches_the_sampler(files, tmp_path):
    """--cfg-interval guides only the model calls inside it: with euler's 2 calls at t = 0 and 0.5,
    [0.4, 1] guides the second alone (images neither unguided nor fully guided), [0, 1] both (plain guidance)."""
    common = ["ODE", "--ckpt", files["pixel"], "--vae", "none", "--sampling-method", "euler",
              "--num-sampling-steps", 2, "--class-labels", 1, 2, *FAST]
    run(common + ["--cfg-scale", 1, "--out", tmp_path / "unguided.png"])
    run(common + ["--cfg-scale", 4, "--out", tmp_path / "guided.png"])
    run(common + ["--cfg-scale", 4, "--cfg-interval", 0.4, 1.0, "--out", tmp_path / "late.png"])
    run(common + ["--cfg-scale", 4, "--cfg-interval", 0.0, 1.0, "--out", tmp_path / "all.png"])
    unguided, guided, late, every = (read_png(tmp_path / f"{n}.png") for n in ("unguided", "guided", "late", "all"))
    assert not np.array_equal(late, unguided) and not np.array_equal(late, guided)
    np.testing.assert_array_equal(every, guided)


def test_class_labels_are_refused_by_the_fid_job():
    from sit_fast.errors import UserError

    with pytest.raises(UserError, match="--class-labels sets a grid's labels"):
        sample.resolve_args(sample.build_parser().parse_args(["ODE", "--num-fid-samples", "4", "--class-labels", "1"]))


def test_each_grid_image_is_sampled_with_its_own_label(files, tmp_path):
    """--class-labels 1 2 and 1 1: the same first image (same noise and label), another second one."""
    common = ["ODE", "--ckpt", files["pixel"], "--vae", "none", "--sampling-method", "euler",
              "--num-sampling-steps", 1, "--cfg-scale", 4, *FAST]
    run(common + ["--class-labels", 1, 2, "--out", tmp_path / "12.png"])
    run(common + ["--class-labels", 1, 1, "--out", tmp_path / "11.png"])
    a, b = read_png(tmp_path / "12.png"), read_png(tmp_path / "11.png")  # 2 images of 8 x 8, 2 px apart
    np.testing.assert_array_equal(a[2:10, 2:10], b[2:10, 2:10])
    assert not np.array_equal(a[2:10, 12:20], b[2:10, 12:20])


def test_a_gray_pixel_model_samples_a_gray_grid_and_other_channel_counts_are_refused(tmp_path, capsys):
    common = ["ODE", "--vae", "none", "--sampling-method", "euler", "--num-sampling-steps", 1, "--class-labels", 1, 2,
              *FAST]
    torch.save(random_sit(1, learn_sigma=False).state_dict(), tmp_path / "gray.pt")
    run(common + ["--ckpt", tmp_path / "gray.pt", "--out", tmp_path / "gray.png"])
    assert read_png(tmp_path / "gray.png").shape == (12, 2 * 10 + 2)  # 2 gray images of 8 x 8, 2 px apart
    torch.save(random_sit(2, learn_sigma=False).state_dict(), tmp_path / "two.pt")
    with pytest.raises(SystemExit) as exit_info:
        run(common + ["--ckpt", tmp_path / "two.pt", "--out", tmp_path / "two.png"])
    assert exit_info.value.code == 2
    assert one_line_error(capsys) == ("error: pixel-space sampling (--vae none) writes 1- or 3-channel images; the "
                                      "model has 2 channels: pass the VAE it was trained with")


def test_in_channels_with_a_vae_is_refused(files, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(["ODE", "--ckpt", files["latent"], "--vae", files["vae"], "--in-channels", 4, "--num-sampling-steps", 1,
             "--out", tmp_path / "g.png", *FAST])
    assert exit_info.value.code == 2
    assert one_line_error(capsys) == ("error: --in-channels is for pixel space (--vae none); with a VAE the latent "
                                      "channels are the VAE's")
    assert not (tmp_path / "g.png").exists()


def test_a_1000_class_grid_defaults_to_upstreams_labels(tmp_path):
    """Without --class-labels, a 1000-class model's grid is upstream sample.py's 8 ImageNet classes."""

    torch.save(random_sit(3, learn_sigma=False, num_classes=1000).state_dict(), tmp_path / "in1k.pt")
    common = ["ODE", "--ckpt", tmp_path / "in1k.pt", "--vae", "none", "--sampling-method", "euler",
              "--num-sampling-steps", 1, "--cfg-scale", 4, *FAST]
    run(common + ["--out", tmp_path / "default.png"])
    run(common + ["--class-labels", 207, 360, 387, 974, 88, 979, 417, 279, "--out", tmp_path / "upstream.png"])
    np.testing.assert_array_equal(read_png(tmp_path / "default.png"), read_png(tmp_path / "upstream.png"))


def test_a_run_folder_name_that_fits_the_checkpoints_model_is_sampled_into(files, tmp_path):
    """Without --model the run folder's name is checked before the load with the shortest registry model's
    name standing for the checkpoint's: a name that fits SiT-T/2 (as short as any) but would not fit
    SiT-XL/2's is not refused, and the job samples into it."""
    sample_dir, out = tmp_path / "samples", tmp_path / "s.npz"
    settings = argparse.Namespace(ckpt="x.pt", cfg_scale=1.0, batch_size=1, mode="ODE", num_sampling_steps=1,
                                  sampling_method="euler")
    fixed = len(sample.run_folder_name(settings, "SiT-T/2")) - len("x")
    ckpt = tmp_path / f"{'c' * (sample.longest_name(str(tmp_path)) - fixed)}.pt"
    shutil.copy(files["pixel"], ckpt)
    run(["ODE", "--vae", "none", "--sampling-method", "euler", "--num-sampling-steps", 1, "--batch-size", 1,
         "--num-fid-samples", 1, "--sample-dir", sample_dir, "--run-folder", "--out", out, "--ckpt", ckpt, *FAST])
    [folder] = os.listdir(sample_dir)
    assert folder.startswith("SiT-T-2-ccc") and len(os.fsencode(folder)) == sample.longest_name(str(tmp_path))
    assert out.exists()


def test_a_data_folder_that_cannot_be_listed_itself_is_said_so_with_its_fix(tmp_path, monkeypatch):
    """--data itself that cannot be listed (refused, or a failing disk's EIO) is said as train.py's --data-path
    is, with its fix: not as a sub-folder is, to be moved out of --data."""
    from sit_fast.errors import UserError

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    for code, said in ((errno.EACCES, "Permission denied): make it readable"),
                       (errno.EIO, "Input/output error, EIO): fix the disk (the system log says what failed)")):
        fail_listing(monkeypatch, tmp_path, code)
        with pytest.raises(UserError) as info:
            sample.ImageFiles(str(tmp_path), 8, 3)
        assert str(info.value) == f"cannot read --data {tmp_path} ({said}"


def test_a_refused_write_of_no_named_file_names_the_sample_dir(files, tmp_path, capsys, monkeypatch):
    """A refused write whose OS error names no file, in the FID job: the line names --sample-dir, not None."""
    monkeypatch.setattr(sample, "fid_job", lambda *args: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    with pytest.raises(SystemExit):
        run(["ODE", "--ckpt", files["pixel"], "--vae", "none", "--sampling-method", "euler", "--num-sampling-steps", 1,
             "--num-fid-samples", 2, "--batch-size", 2, "--sample-dir", tmp_path / "new", *FAST])
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: cannot write {tmp_path / 'new'} (No space left on device): nothing was written yet: make room (or "
        f"make the folder writable) and run the same command again to finish")
