"""Sample images from a SiT: a PNG grid, many images for FID across GPUs, or likelihoods of data.

    python sample.py ODE|SDE [flags]                     a grid of --class-labels -> --out (sample.png)
    torchrun --nproc_per_node=G sample.py ODE|SDE --num-fid-samples N [--sample-dir DIR]
                                                         N numbered PNGs in DIR and DIR.npz (ADM format)
    {python|torchrun ...} sample.py ODE --likelihood --data PATH [--out BPD.npz]
                                                         bits per dimension of given data (--out
                                                         keeps them; needed under torchrun)
    {python|torchrun ...} sample.py ODE --reverse --data PATH
                                                         data -> noise (the ODE run backwards) -> --out .pt

`sample_ddp.py` is this script with upstream sample_ddp.py's defaults (the FID job with 50,000
images, --vae ema, --cfg-scale 1, and --run-folder: DIR/<name from the settings>/ and
DIR/<name>.npz, upstream's layout); both accept upstream's flags, and unknown flags are errors.

Checkpoints: without --ckpt, the upstream SiT-XL/2 256x256 release (downloaded once into
$SIT_FAST_CACHE or ~/.cache/sit_fast; offline, pass --ckpt PATH). With --ckpt: an upstream release
file, a train.py checkpoint (EMA weights; --use-raw for the raw ones; without --vae, the latent space
it records: pixels = --vae none, else its VAE) or a .safetensors file. The
architecture, learn_sigma, input size and channels are read from the weights, so --model,
--image-size, --num-classes and --in-channels may be left out (given, they must agree with it: a
--num-classes other than the checkpoint's is refused, as its label table would be random).

FID job (--num-fid-samples N): image i gets noise and label from seed (--seed, i), whatever the
world size. The index range is cut into chunks of --per-proc-batch-size; ranks take the unfinished
chunks in turn, write PNGs atomically, and a rerun (after a kill, or with a larger N) samples only
the chunks with missing PNGs, giving the same images. The folder's settings.json refuses a resume
with settings that change the images (once it holds one); one with another --fused-kernels,
--attn-backend or --compile, which change their rounding only, is warned of. Exactly N images end up
in the .npz.

Guidance: --cfg-scale 1 runs no unconditional pass at all; --cfg-interval LOW HIGH guides only the
model calls with LOW <= t <= HIGH (t = 0 noise, t = 1 data) and runs the doubled batch only there.

Likelihood (SiT sec. 3, from the probability-flow ODE): the data x is carried to noise z by the ODE
and log p(x) = log N(z; 0, I) - int div v dt (Hutchinson's estimate; --exact-divergence for small
data). bpd = -log p(x) / (D ln 2), D the number of dimensions of the model's space:
  - images with a VAE: the density of the scaled latents the model sees (the posterior means
    times the VAE's scaling factor s; the unscaled latents' bpd is this minus log2(s), or minus
    the mean over channels of log2(s / latents_std) for a VAE with per-channel statistics);
  - images without a VAE (pixel space): 8-bit data y in {0..255}^D is dequantised uniformly,
    x = (y + u) / 128 - 1 with u ~ U[0, 1)^D, and bpd = -log p(x) / (D ln 2) + 7 is the discrete
    8-bit bound (log2 of the 1/128 Jacobian is -7);
  - --dataset digits (scikit-learn's 8x8 digits, gray levels k in {0..16}, for a model trained with
    train.py --dataset digits): x = (k + u) * 2/17 - 1, and + log2(17/2) = 3.09 bits likewise;
  - float data (.pt / float .npz): taken as model inputs as they are (continuous bpd).
Noise is never decoded: the ODE runs from the given data. With --out (--reverse always has one),
each batch's results are written to OUT.parts/ as it finishes, with the settings in settings.json;
under torchrun the processes take the batches in turn, and the main one, which then waits for the
others' batches, ends with one line (the batches finished kept) where another left word that it
failed, or gave no heartbeat for 5 minutes (one killed on another node, of which nothing else tells
it). The same command, with any number of processes, computes only the batches not there (batch k's
seeds come from --seed, k and the batch size), joins them into OUT and removes the folder. A
finished likelihood --out is read, not recomputed; --reverse does not overwrite an OUT that exists
(the noise records no settings). Under --compile or --cuda-graphs, a job of more than one batch
fills its short last batch to the batch size with copies of its own items, their results dropped, so
that the one compiled shape serves every batch.
"""
from __future__ import annotations

from sit_fast.errors import quiet_ctrl_c_while_loading

quiet_ctrl_c_while_loading(__name__)  # a Ctrl-C while the libraries load (seconds) ends it, quietly

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import sys
import time
import zipfile
from fractions import Fraction

import numpy as np
import torch

from sit_fast.argtypes import (
    OneLineArgumentParser, doc_paragraph, finite_float, integer, positive_int, random_seed, user_path,
)
from sit_fast.checkpoint import file_kind, infer_config, read_checkpoint, recorded_model_config, weights_only_refusal
from sit_fast.distributed import (
    DistInfo, Liveness, agree, barrier, check_same_file, check_shared_path, cleanup, file_fingerprint, heartbeat,
    init_distributed, local_path_on_main_first, on_main, peer_ended, peer_failed, speaks_for, stop_words,
    unlike_rank_0,
)
from sit_fast.errors import (
    PeerFailed, UserError, allocation_past_device, cli_entry, first_line, is_out_of_memory,
    log_warnings_on_stderr, memory_kind,
)
from sit_fast.files import (
    WRITE_REFUSED, FileLock, FolderLock, atomic_torch_save, atomic_write, make_writable_folder, read_fix, refusal,
    remove_locked_folder, unfinished_writes, write_failed, written_kept,
)
from sit_fast.interrupts import exit_status, start_resource_tracker, stop_signals_raise, what_stopped, winding_down
from sit_fast.models import SiT_models, fused_kernels_flag
from sit_fast.progress import progress
from sit_fast.attention import ATTN_BACKENDS, SDPA_VARIABLE, sdpa_arithmetic, select_backend
from sit_fast.sampling import (
    PRECISIONS, PRETRAINED_MODEL, Denoiser, ModelForwards, ModelRequest, PNGWriter, add_arithmetic, build_model,
    build_npz, check_settings, checkpoint_preference, default_cfg_channels, foreign_npz,
    check_training_args, derived_seed, images_in, index_noise, model_call_times, pending_chunks,
    pretrained_checkpoint_for, npz_array, release_or_path, settings_differences, to_rgb_uint8,
)
from sit_fast.transport import (PATH_TYPES, PREDICTIONS, SAMPLE_EPS_DEFAULT, Sampler, add_ode_args, add_sde_args,
                                add_transport_args, create_transport, in_flag_words)
from sit_fast.transport.integrators import StepSizeUnderflow, adaptive_ode_method, ode_method_uses_tolerances
from sit_fast.vae import VAE_ALIASES, recorded_vae_spec, same_encoder


MODES = ("ODE", "SDE")
UPSTREAM_CLASS_LABELS = [207, 360, 387, 974, 88, 979, 417, 279]  # upstream sample.py's grid
GRID_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # --out of a grid, where PIL writes them
FID_BATCH_SIZE = 32
LIKELIHOOD_BATCH_SIZE = 16

PARTS_POLL_S = 2.0  # how often the main process of --likelihood/--reverse looks for the others' batches
DEFAULT_OUT = {"grid": "sample.png", "reverse": "noise.pt"}  # --out of the jobs that always write a file

# Defaults of sample.py; sample_ddp.py overrides them with upstream sample_ddp.py's.
SAMPLE_DEFAULTS = dict(vae="mse", num_fid_samples=None, run_folder=False)
SAMPLE_DDP_DEFAULTS = dict(vae="ema", num_fid_samples=50_000, run_folder=True)

# Flags of the other jobs, which sample_ddp.py (the FID job) refuses: left out of its --help.
NOT_FID_FLAGS = {"likelihood", "reverse", "data", "dataset", "exact_divergence", "class_labels"}

# Flags that do not change the images an FID folder holds (speed paths, where things go, how many).
NOT_IMAGE_SETTINGS = {"sample_dir", "run_folder", "out", "compile", "cuda_graphs", "num_fid_samples", "attn_backend",
                      "fused_kernels", "tf32", "data", "dataset", "likelihood", "exact_divergence", "class_labels",
                      "vae_explicit", "transport_explicit", "prog",
                      "batch_size_flag", "seed_flag",  # the names those were given under (StoreNamed)
                      "use_raw",  # the weights it picks are recorded as "weights" (a file of one set has no others)
                      "loss_weight", "train_eps"}  # training's alone: sampling and likelihoods take sample_eps

# The transport flags taken from a checkpoint that records its training flags, when not given; else these.
TRANSPORT_DEFAULTS = {"path_type": "Linear", "prediction": "velocity"}


#################################################################################
#                                     Flags                                      #
#################################################################################

def add_sampling_args(parser: argparse.ArgumentParser, defaults: dict) -> None:
    model = parser.add_argument_group("Model and checkpoint")
    model.add_argument("--model", type=str, choices=list(SiT_models), default=None,
                       help="architecture (default: the checkpoint's; SiT-XL/2 for the release)")
    model.add_argument("--ckpt", type=user_path, default=None,
                       help="checkpoint: an upstream release file, a train.py checkpoint or .safetensors, or "
                            "a release by name, SiT-XL-2-256x256.pt, taken from ./pretrained_models, else "
                            "$SIT_FAST_CACHE (~/.cache/sit_fast), else downloaded there (default: that release)")
    model.add_argument("--use-raw", action="store_true",
                       help="a train.py checkpoint's raw weights instead of its EMA weights")
    model.add_argument("--image-size", type=positive_int, default=None,
                       help="image height = width, a multiple of VAE factor x patch size "
                            "(default: the checkpoint's)")
    model.add_argument("--num-classes", type=positive_int, default=None,
                       help="number of classes (default: the checkpoint's, the only count it samples)")
    model.add_argument("--in-channels", type=positive_int, default=None,
                       help="image channels with --vae none, e.g. 1 or 3 (default: the checkpoint's)")
    model.add_argument("--vae", type=user_path, default=None,
                       help="ema | mse (stabilityai/sd-vae-ft-*), a hub id, a local diffusers AutoencoderKL "
                            "directory, or none (pixel space) (default: the latent space the checkpoint records, as "
                            f"train.py's and their .safetensors exports do, else {defaults['vae']})")
    # resolve_args: args.vae and args.run_folder when not given
    parser.set_defaults(vae_fallback=defaults["vae"], run_folder_fallback=defaults["run_folder"])

    guidance = parser.add_argument_group("Classifier-free guidance")
    guidance.add_argument("--cfg-scale", type=finite_float, default=None,
                          help="guidance scale w; 1 runs no unconditional pass (default: 4.0 for a grid, "
                               "1.0 for --num-fid-samples and --likelihood, as upstream)")
    guidance.add_argument("--cfg-channels", type=str, choices=["3", "all"], default=None,
                          help="channels guided: upstream's first 3, or all (default: 3 for a model of up to 4 "
                               "channels, as upstream; all for a latent space of more)")
    guidance.add_argument("--cfg-interval", type=finite_float, nargs=2, metavar=("LOW", "HIGH"), default=None,
                          help="guide only model calls with LOW <= t <= HIGH (t=0 noise, t=1 data)")
    guidance.add_argument("--class-labels", type=integer, nargs="+", default=None,
                          help="labels of the grid (default: upstream's 8 ImageNet classes; 0 to 7, cycling, for "
                               "a model of another class count), or of the --likelihood data "
                               "(one for all or one per item; default: the null class, unconditional)")

    run = parser.add_argument_group("Sampling")
    run.add_argument("--num-sampling-steps", type=integer, default=250,
                     help="steps of a fixed-step solver (the SDE's count includes the last step; an ODE takes N "
                          "steps, where upstream's N grid points were N - 1)")
    run.add_argument("--seed", "--global-seed", dest="seed", type=random_seed, default=0, action=StoreNamed,
                     help="global seed; image i's starting noise and label come from (seed, i); an SDE's "
                          "per-step noise comes from (seed, batch) and an adaptive ODE's steps are chosen for "
                          "the whole batch, so their images also depend on --batch-size")
    run.add_argument("--batch-size", "--per-proc-batch-size", dest="batch_size", type=positive_int, default=None,
                     action=StoreNamed,
                     help=f"images per process per batch (default: the whole grid; {FID_BATCH_SIZE} for "
                          f"--num-fid-samples, {LIKELIHOOD_BATCH_SIZE} for --likelihood and --reverse)")
    run.add_argument("--out", type=user_path, default=None,
                     help="output: the grid PNG (sample.png), the .npz of --num-fid-samples (SAMPLE_DIR.npz), "
                          "per-item bpd of --likelihood (.npz), the noise of --reverse (noise.pt); both "
                          "keep their batches in OUT.parts/ until complete, and the same command resumes")

    speed = parser.add_argument_group("Speed")
    speed.add_argument("--precision", choices=PRECISIONS, default=None,
                       help="model arithmetic: fp32, tf32 (TF32 matmuls and convolutions; default, as upstream), or "
                            "bf16 autocast")
    speed.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=None,
                       help="upstream sample_ddp.py's flag: --tf32 = --precision tf32, --no-tf32 = fp32")
    speed.add_argument("--vae-precision", choices=("fp32", "bf16"), default="fp32",
                       help="VAE decode / encode arithmetic")
    speed.add_argument("--compile", action="store_true", help="torch.compile the model forwards")
    speed.add_argument("--cuda-graphs", action="store_true",
                       help="replay each model forward from a CUDA graph (CUDA only)")
    speed.add_argument("--attn-backend", choices=ATTN_BACKENDS, default="auto", help="attention implementation")
    speed.add_argument("--fused-kernels", choices=("auto", "on", "off"), default="auto",
                       help="fused Triton adaLN kernels (auto: on for CUDA, off on the CPU, where `on` runs them "
                            "through the Triton interpreter, with TRITON_INTERPRET=1 set: very slow, for tests)")

    fid = parser.add_argument_group("Many images for FID (sample_ddp.py's job)")
    fid.add_argument("--num-fid-samples", type=positive_int, default=defaults["num_fid_samples"],
                     help="write this many numbered PNGs and one .npz (switches to the FID job)")
    fid.add_argument("--sample-dir", type=user_path, default=None,
                     help="folder of the PNGs (with --run-folder, the folder that holds the run's folder; "
                          "default: samples)")
    fid.add_argument("--run-folder", action=argparse.BooleanOptionalAction, default=None,
                     help="as upstream sample_ddp.py: the PNGs in SAMPLE_DIR/<model>-<ckpt>-cfg-<scale>-<batch>-"
                          "<mode>-<steps>-<method>[-<diffusion form>-<last step>-<last step size>], the .npz "
                          "beside that folder (default: on for sample_ddp.py, off for sample.py)")
    fid.add_argument("--class-balanced", action="store_true",
                     help="label of image i is i mod num_classes (default: random per image)")

    data = parser.add_argument_group("Data (ODE --likelihood / --reverse)")
    data.add_argument("--data", type=user_path, default=None,
                      help="a folder of images (and its sub-folders: an ImageFolder root too), an .npz "
                           "(uint8 N x H x W x C images, or float latents) "
                           "or a .pt (.pth) tensor of model inputs (N, C, h, w)")
    data.add_argument("--dataset", choices=("digits",), default=None,
                      help="in place of --data: scikit-learn's bundled 8x8 digits (all 1,797; 17 gray levels, "
                           "dequantised), for a model trained with train.py --dataset digits at 8 px")
    data.add_argument("--exact-divergence", action="store_true",
                      help="exact trace instead of Hutchinson's estimate (one backward per dimension)")


FID_ONLY_DESCRIPTION = "Many images for FID (upstream sample_ddp.py's job): numbered PNGs and one .npz in ADM's format."


class StoreNamed(argparse.Action):
    """Stores the value, and in `DEST_flag` the name it was given under (of a flag with an alias, as
    --batch-size's --per-proc-batch-size, upstream sample_ddp.py's), for the messages to name."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        setattr(namespace, f"{self.dest}_flag", option_string)


# The names upstream's sample_ddp.py gives the flags with an alias: sample_ddp.py's messages use them.
UPSTREAM_DDP_FLAGS = {"batch_size": "--per-proc-batch-size", "seed": "--global-seed"}


def given_flag(args: argparse.Namespace, dest: str) -> str:
    """The flag of `dest` as given (StoreNamed), else the script's name for it (sample_ddp.py's:
    upstream's)."""
    if given := getattr(args, f"{dest}_flag", None):
        return given
    if getattr(args, "prog", None) == "sample_ddp.py" and dest in UPSTREAM_DDP_FLAGS:
        return UPSTREAM_DDP_FLAGS[dest]
    return "--" + dest.replace("_", "-")


def batch_flag(args: argparse.Namespace) -> str:
    return given_flag(args, "batch_size")


def setting_flags(args: argparse.Namespace) -> dict[str, str]:
    """The flag of each setting a resumed job compares that a flag sets (as given: given_flag), for
    its message to name what to pass; the others (`ckpt_digest`, say) keep their keys."""
    dests = {action.dest for mode in build_parser()._subparsers._group_actions[0].choices.values()
             for action in mode._actions if "--" + action.dest.replace("_", "-") in action.option_strings}
    return {dest: given_flag(args, dest) for dest in dests}


def build_parser(defaults: dict | None = None, prog: str | None = None) -> argparse.ArgumentParser:
    defaults = {**SAMPLE_DEFAULTS, **(defaults or {})}
    fid_only = defaults["num_fid_samples"] is not None  # sample_ddp.py
    description = FID_ONLY_DESCRIPTION if fid_only else doc_paragraph(__doc__)
    parser = OneLineArgumentParser(prog=prog, description=description, allow_abbrev=False)
    modes = parser.add_subparsers(dest="mode", metavar="{ODE,SDE}", required=True,
                                  help="ODE: probability-flow ODE; SDE: reverse SDE")
    for mode, add_solver_args in (("ODE", add_ode_args), ("SDE", add_sde_args)):
        # allow_abbrev=False: a mistyped or shortened flag is an error
        sub = modes.add_parser(mode, help=f"sample with the {mode}", allow_abbrev=False)
        add_sampling_args(sub, defaults)
        add_transport_args(sub)
        for key, value in TRANSPORT_DEFAULTS.items():  # resolve_args and Setup: the checkpoint's, else value
            action = sub._option_string_actions["--" + key.replace("_", "-")]
            action.default = None
            action.help += f" (default: the checkpoint's training flag where it records one, else {value})"
        sub._option_string_actions["--sample-eps"].default = None  # resolve_args: given or not, then the default
        sub._option_string_actions["--sample-eps"].help += f" (default: {SAMPLE_EPS_DEFAULT:g})"
        add_solver_args(sub)
        if fid_only:  # sample_ddp.py: its help shows the FID job's flags alone
            for action in sub._actions:
                if action.dest in NOT_FID_FLAGS:
                    action.help = argparse.SUPPRESS
            sub._option_string_actions["--cfg-scale"].help = (
                "guidance scale w; 1 runs no unconditional pass (default: 1.0, as upstream)")
            sub._option_string_actions["--out"].help = ("the .npz of the samples (default: beside the run's "
                                                        "folder, SAMPLE_DIR/<run folder>.npz)")
            sub._option_string_actions["--batch-size"].help = "images per process per batch (default: 32)"
            sub._option_string_actions["--num-fid-samples"].help = "write this many numbered PNGs and one .npz"
    return parser


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Per-job defaults and the checks that span several flags (UserError, one line)."""
    likelihood = getattr(args, "likelihood", False)
    reverse = getattr(args, "reverse", False)
    args.job = ("likelihood" if likelihood else "reverse" if reverse
                else "fid" if args.num_fid_samples is not None else "grid")
    if likelihood and reverse:
        raise UserError("--likelihood and --reverse are two jobs: pass one")
    if args.job in ("likelihood", "reverse"):
        if getattr(args, "prog", None) == "sample_ddp.py":  # whose --num-fid-samples has a default
            raise UserError(f"sample_ddp.py samples images for FID (--num-fid-samples, 50000 unless given): "
                            f"run --{args.job} with sample.py")
        if args.data is None and args.dataset is None:
            raise UserError(f"--{args.job} runs the ODE from data to noise: pass the data with --data PATH "
                            f"(or --dataset digits)")
        if args.data is not None and args.dataset is not None:
            raise UserError(f"--data and --dataset {args.dataset} are two sources of data: pass one")
        if args.cfg_scale not in (None, 1.0):
            raise UserError(f"--{args.job} runs without guidance: drop --cfg-scale (or pass 1)")
        if args.num_fid_samples is not None:
            raise UserError(f"--{args.job} and --num-fid-samples are two jobs: pass one")
    elif args.data is not None or args.dataset is not None:
        raise UserError(f"{'--data' if args.data is not None else '--dataset'} is read by ODE --likelihood or "
                        f"--reverse only")
    if args.exact_divergence and not likelihood:
        raise UserError("--exact-divergence applies to --likelihood only")
    scale_given = args.cfg_scale is not None
    if args.cfg_scale is None:
        args.cfg_scale = 4.0 if args.job == "grid" else 1.0
    for flag, value in (("--cfg-interval", args.cfg_interval), ("--cfg-channels", args.cfg_channels)):
        if value is not None and args.cfg_scale == 1.0:  # no unconditional pass: nothing to guide
            job = "--num-fid-samples" if args.job == "fid" else f"--{args.job}"
            owner = ("sample_ddp.py's default" if getattr(args, "prog", None) == "sample_ddp.py"  # its only job
                     else f"the default of {job}")
            default = "" if scale_given else f" ({owner})"
            fix = "drop it" if args.job in ("likelihood", "reverse") else "drop it, or pass a --cfg-scale other than 1"
            raise UserError(f"{flag} has no effect with --cfg-scale 1{default}: {fix}")
    if args.cfg_interval is not None:
        low, high = args.cfg_interval
        if not (0 <= low <= 1 and 0 <= high <= 1):
            raise UserError(f"--cfg-interval {low} {high}: LOW and HIGH are times in [0, 1] (t=0 noise, t=1 data)")
        if low > high:
            raise UserError(f"--cfg-interval {low} {high}: LOW must not exceed HIGH")
    if args.mode == "SDE" and args.last_step is not None and args.last_step_size == 0:
        raise UserError(f"--last-step {args.last_step} takes a step of --last-step-size in (0, 1) to t = 1, got 0: "
                        f"pass a size (default 0.04), or --last-step None")
    least_steps = 2 if args.mode == "SDE" else 1
    if args.num_sampling_steps < least_steps:
        raise UserError(f"--num-sampling-steps must be at least {least_steps}"
                        f"{' for an SDE (it counts the last step)' if args.mode == 'SDE' else ''}, "
                        f"got {args.num_sampling_steps}")
    if args.out is not None:
        check_out_path(args.job, args.out)
    elif args.job in DEFAULT_OUT:  # e.g. sample.png in a read-only working folder: said now, not after the work
        check_out_path(args.job, DEFAULT_OUT[args.job])
    if args.job == "fid":
        if args.class_labels is not None:
            raise UserError("--class-labels sets a grid's labels; --num-fid-samples draws them "
                            "(random, or --class-balanced)")
    else:
        given = [flag for flag, value in (("--class-balanced", args.class_balanced or None),
                                           ("--sample-dir", args.sample_dir),
                                           ("--run-folder" if args.run_folder else "--no-run-folder", args.run_folder))
                 if value is not None]
        if given:
            raise UserError(f"{given[0]} applies to --num-fid-samples only")
    if args.sample_dir is None:
        args.sample_dir = "samples"
    if args.run_folder is None:
        args.run_folder = getattr(args, "run_folder_fallback", SAMPLE_DEFAULTS["run_folder"])
    if hasattr(args, "run_folder_fallback"):
        del args.run_folder_fallback
    if args.batch_size is None:
        args.batch_size = {"fid": FID_BATCH_SIZE, "likelihood": LIKELIHOOD_BATCH_SIZE,
                           "reverse": LIKELIHOOD_BATCH_SIZE}.get(args.job)
    if args.tf32 is not None:
        implied = "tf32" if args.tf32 else "fp32"
        if args.precision not in (None, implied):
            raise UserError(f"--{'' if args.tf32 else 'no-'}tf32 contradicts --precision {args.precision}")
        args.precision = implied
    if args.precision is None:
        args.precision = "tf32"
    if args.cuda_graphs and args.job == "likelihood":
        raise UserError("--cuda-graphs replays forwards without gradients; --likelihood needs them")
    if args.cuda_graphs and not torch.cuda.is_available():  # before the checkpoint and the VAE load
        raise UserError("--cuda-graphs needs a CUDA device, and torch sees none")
    if args.cfg_channels is not None:  # else the model's (Setup: default_cfg_channels)
        args.cfg_channels = "all" if args.cfg_channels == "all" else int(args.cfg_channels)
    args.transport_explicit = sorted(key for key in (*TRANSPORT_DEFAULTS, "sample_eps")
                                     if getattr(args, key) is not None)
    if args.sample_eps is None:
        args.sample_eps = SAMPLE_EPS_DEFAULT
    for key, value in TRANSPORT_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.vae_explicit = args.vae is not None
    if args.vae is None:
        args.vae = getattr(args, "vae_fallback", SAMPLE_DEFAULTS["vae"])
    if hasattr(args, "vae_fallback"):
        del args.vae_fallback
    return args


def check_out_path(job: str, path: str) -> None:
    """--out names the file a job writes: refuse, before any work, one the job would not write, and
    make its folder (or say why it cannot be made)."""
    extension = os.path.splitext(path)[1].lower()
    if job == "grid":
        check_image_path(path)
    elif job == "fid" and extension != ".npz":
        raise UserError(f"--out {path}: --num-fid-samples writes ADM's .npz; give the file the extension .npz")
    elif job == "reverse" and extension not in (".pt", ".pth"):
        raise UserError(f"--out {path}: --reverse saves the noise with torch.save; give the file the extension .pt")
    elif job == "likelihood" and extension not in ("", ".npz"):  # no extension: np.savez's .npz is added
        raise UserError(f"--out {path}: --likelihood saves the bits per dimension with np.savez; give the file the "
                        f"extension .npz")
    if os.path.isdir(path):
        raise UserError(f"--out {path} is a folder: name the file to write")
    make_writable_folder(os.path.dirname(os.path.abspath(path)), f"--out {path}")


def check_image_path(path: str) -> None:
    """--out of a grid: an image extension PIL can write (UserError before any sampling otherwise)."""
    from PIL import Image

    writable = Image.registered_extensions()
    extensions = [e for e in GRID_EXTENSIONS if writable.get(e) in Image.SAVE]
    if os.path.splitext(path)[1].lower() not in extensions:
        raise UserError(f"--out {path}: the grid is an image; give the file one of the extensions "
                        f"{', '.join(extensions)}")


def checkpoint_latent_space(path: str) -> str | None:
    """The latent space ("pixels" or a VAE spec) a train.py checkpoint (or a .safetensors file of
    `python -m sit_fast.export`) records; None when it records none (a release file)."""
    space = (recorded_model_config(path) or {}).get("latent_space")
    return space if isinstance(space, str) and space else None


def adopt_training_transport(args: argparse.Namespace, trained: dict | None, dist: DistInfo) -> None:
    """--path-type and --prediction not given: those the checkpoint was trained with, where it records
    them (train.py's and upstream's training checkpoints do, and .safetensors exports of them), as
    sampling a VP or noise-predicting model with the Linear velocity maths gives meaningless images.
    Given ones stay (Setup warns)."""
    if not isinstance(trained, dict):
        return
    taken = []
    for key in TRANSPORT_DEFAULTS:
        value = trained.get(key)
        choices = PATH_TYPES if key == "path_type" else PREDICTIONS
        if (key not in args.transport_explicit and isinstance(value, str) and value in choices
                and value != getattr(args, key)):
            setattr(args, key, value)
            taken.append(f"--{key.replace('_', '-')} {value}")
    if taken and dist.is_main:
        print(f"using {', '.join(taken)}: the checkpoint's training flag{'s' if len(taken) > 1 else ''}")


def resolve_vae(args: argparse.Namespace, ckpt: str, dist: DistInfo) -> str:
    """--vae, or the checkpoint's latent space when --vae was not given; a contradiction is a UserError."""
    space = checkpoint_latent_space(ckpt)
    if space is None:
        return args.vae
    if args.vae_explicit:
        if space == "pixels" and args.vae != "none":
            raise UserError(f"{ckpt} is a pixel-space model (latent space: pixels), but --vae {args.vae} was "
                            f"given: drop --vae or pass --vae none")
        if space != "pixels" and args.vae == "none":
            raise UserError(f"{ckpt} was trained on the latents of the VAE {space}, but --vae none was given: "
                            f"drop --vae or pass --vae {space}")
        if space != "pixels" and not same_encoder(recorded_vae_spec(args.vae), space) and dist.is_main:
            logging.getLogger("sit_fast.sample").warning(
                f"{ckpt} was trained on the latents of the VAE {space}; they are decoded with --vae {args.vae}: "
                f"unless the two share an encoder, the images are not the model's (drop --vae to use the recorded one)")
        return args.vae
    vae = "none" if space == "pixels" else space
    if dist.is_main:
        print(f"using --vae {vae}: the latent space recorded in the checkpoint ({space})")
    return vae


#################################################################################
#                        Shared setup: model, VAE, sampler                       #
#################################################################################

class NonFinite(UserError):
    """Samples, or images decoded from them, with NaN or inf."""


class Setup:
    """Everything a job needs: device, codec, model, sampler function, guided denoiser."""

    def __init__(self, args: argparse.Namespace, dist: DistInfo):
        from sit_fast.vae import load_vae

        self.args = args
        self.dist = dist
        self.device = device = dist.device
        set_matmul_precision(args.precision)
        self.autocast_dtype = torch.bfloat16 if args.precision == "bf16" else None

        # The release is fetched (or found missing) first: offline, that is the message to see.
        if args.ckpt is not None:  # a file, or a release by name as upstream (found or downloaded)
            ckpt = local_path_on_main_first(lambda: release_or_path(args.ckpt), dist)
        else:
            ckpt = local_path_on_main_first(lambda: pretrained_checkpoint_for(args), dist)
        # One model for every process: a node's own file at rank 0's path (another run's NNNNNNN.pt on its
        # local disk) would sample other images into the same folder, unseen by the folder's record.
        check_same_file(ckpt, f"--ckpt {args.ckpt}" if args.ckpt else f"the release {os.path.basename(ckpt)}", dist)
        loaded = None
        if args.ckpt is not None:
            # read once, here: what is wrong with the file comes before anything about the VAE
            loaded = read_checkpoint(ckpt, prefer=checkpoint_preference(args.use_raw))
            in_channels = infer_config(loaded[0])["in_channels"]
            args.vae = resolve_vae(args, ckpt, dist)
            if (not args.vae_explicit and args.vae in VAE_ALIASES and checkpoint_latent_space(ckpt) is None
                    and in_channels != 4):
                raise UserError(f"{ckpt} takes {in_channels}-channel inputs, not the 4-channel latents of the "
                                f"default --vae {args.vae}: pass --vae none for a model trained in pixel space, or "
                                f"the --vae it was trained with")
            adopt_training_transport(args, loaded[1].get("args"), dist)
        # The sampler from the flags: a combination it refuses is said before the VAE loads (or downloads).
        try:
            transport = create_transport(args.path_type, args.prediction, args.loss_weight, args.train_eps,
                                         args.sample_eps)
            sampler = Sampler(transport)
            self.call_times = None
            if args.job == "likelihood":
                self.sample_fn = sampler.sample_ode_likelihood(
                    sampling_method=args.sampling_method, num_steps=args.num_sampling_steps, atol=args.atol,
                    rtol=args.rtol, exact_divergence=args.exact_divergence)
            elif args.mode == "ODE":
                self.sample_fn = sampler.sample_ode(
                    sampling_method=args.sampling_method, num_steps=args.num_sampling_steps, atol=args.atol,
                    rtol=args.rtol, reverse=args.reverse)
                self.call_times = model_call_times(
                    "ODE", transport, sampling_method=args.sampling_method, num_steps=args.num_sampling_steps,
                    reverse=args.reverse)
            else:
                self.sample_fn = sampler.sample_sde(
                    sampling_method=args.sampling_method, diffusion_form=args.diffusion_form,
                    diffusion_norm=args.diffusion_norm, last_step=args.last_step,
                    last_step_size=args.last_step_size, num_steps=args.num_sampling_steps)
                self.call_times = model_call_times(
                    "SDE", transport, sampling_method=args.sampling_method, num_steps=args.num_sampling_steps,
                    diffusion_form=args.diffusion_form, last_step=args.last_step,
                    last_step_size=args.last_step_size)
        except ValueError as err:
            if isinstance(err, UserError):
                raise
            raise UserError(in_flag_words(err)) from None
        sde = args.mode == "SDE"
        interval = (dict(sde=True, diffusion_form=args.diffusion_form,
                         last_step_size=0.0 if args.last_step is None else args.last_step_size) if sde else {})
        if "sample_eps" in args.transport_explicit and not transport.eps_matters(eval=True, **interval):
            t0, t1 = transport.check_interval(transport.train_eps, transport.sample_eps, eval=True, **interval)
            logging.getLogger("sit_fast.sample").warning(
                f"--sample-eps {args.sample_eps:g} has no effect here: with a {args.path_type} {args.prediction} model "
                f"this {'SDE' if sde else 'ODE'} runs over [{t0:g}, {t1:g}] whatever it is (as upstream)")

        vae_dtype = torch.bfloat16 if args.vae_precision == "bf16" else torch.float32
        self.codec = load_vae(args.vae, device, dtype=vae_dtype, purpose="sample")
        if self.codec is not None and args.in_channels is not None:
            raise UserError("--in-channels is for pixel space (--vae none); "
                            "with a VAE the latent channels are the VAE's")
        downsample = self.codec.downsample if self.codec is not None else 1
        fused_kernels, fused_on = fused_kernels_flag(args.fused_kernels, device)
        request = ModelRequest(
            ckpt=ckpt, model=args.model, image_size=args.image_size, num_classes=args.num_classes,
            in_channels=self.codec.latent_channels if self.codec is not None else args.in_channels,
            downsample=downsample, use_raw=args.use_raw, attn_backend=args.attn_backend,
            fused_kernels=fused_kernels,
        )
        self.model, self.info = build_model(request, device, loaded)
        del loaded  # the model holds the weights now
        try:  # an attention backend (or SIT_FAST_SDPA_BACKEND) that cannot run here: one line, before sampling
            backend = select_backend(args.attn_backend, device, self.autocast_dtype or torch.float32,
                                     self.model.blocks[0].attn.head_dim)
        except ValueError as err:
            raise UserError(f"--attn-backend {args.attn_backend}: {err}") from None
        # What sets the rounding of the results, not what they are, as resolved here ("auto" differs by
        # device), in the flags' words: recorded in a resumable job's folder (see arithmetic_note).
        self.arithmetic = {"attn_backend": backend, "fused_kernels": "on" if fused_on else "off",
                           "compile": "on" if args.compile else "off", **sdpa_arithmetic(backend)}
        self.num_classes = self.model.num_classes
        self.input_size = self.model.input_size
        self.image_size = self.info["image_size"]
        self.in_channels = self.model.in_channels
        if args.cfg_channels is None:
            args.cfg_channels = default_cfg_channels(self.in_channels)
        self.latent_shape = (self.in_channels, self.input_size, self.input_size)
        if self.codec is None and self.in_channels not in (1, 3) and args.job in ("grid", "fid"):
            raise UserError(f"pixel-space sampling (--vae none) writes 1- or 3-channel images; the model has "
                            f"{self.in_channels} channels: pass the VAE it was trained with")
        check_training_args(self.info, {k: getattr(args, k) for k in ("path_type", "prediction")})

        self.forwards = ModelForwards(self.model, cfg_scale=args.cfg_scale, cfg_channels=args.cfg_channels,
                                      autocast_dtype=self.autocast_dtype, cast_weights=True, compile=args.compile,
                                      cuda_graphs=args.cuda_graphs)
        self.denoiser = Denoiser(self.forwards, cfg_scale=args.cfg_scale,
                                 cfg_interval=tuple(args.cfg_interval) if args.cfg_interval else None,
                                 call_times=self.call_times)

    def sample(self, noise: torch.Tensor, labels: torch.Tensor, batch_seed: int) -> torch.Tensor:
        """Noise (B, C, h, w) and labels (B,) from the host -> final model-space samples on the device.

        One host-to-device copy per batch; the global generator (the SDE's per-step noise, drawn on
        the device) is seeded per batch. The copies are inference tensors, as everything the sampler
        makes from them: a compiled forward sees one kind of tensor from its first call on (a normal
        one first compiled it again).
        """
        torch.manual_seed(batch_seed)
        with torch.inference_mode():
            z = noise.to(self.device, non_blocking=True, copy=True)
            y = labels.to(self.device, non_blocking=True, copy=True)
            model_fn = self.denoiser.for_labels(y)
            samples = self.sample_fn(z, model_fn)[-1]
        model_fn.check_finished()
        return samples

    def to_images(self, samples: torch.Tensor, first: int = 0) -> torch.Tensor:
        """Model-space samples of images first, first + 1, ... -> images in [-1, 1] (the VAE decodes in
        batches of its own). NaN or inf, in the samples (a sampler that diverged) or the decoded images
        (a VAE that overflowed), is a UserError: as pixels it would pass unnoticed, black or white,
        into a grid or an FID."""
        self.check_finite(samples, first, "the sampler diverged: {} came out NaN or inf", self.divergence_advice())
        if self.codec is None:
            return samples.float().clamp(-1, 1)
        with torch.inference_mode():
            images = self.codec.decode(samples)
        # in fp32, latents far out of the VAE's range: a sampler close to diverging
        advice = "--vae-precision fp32" if self.args.vae_precision != "fp32" else self.divergence_advice()
        self.check_finite(images, first, "the VAE overflowed: {} decoded to NaN or inf", advice)
        return images

    @staticmethod
    def check_finite(x: torch.Tensor, first: int, what: str, advice: str, noun: str = "image") -> None:
        """UserError `what` (naming the images, or other `noun`s) unless every element of x (B, ...) is
        finite."""
        bad = ~torch.isfinite(x.flatten(1) if x.dim() > 1 else x[:, None]).all(1)  # (B,); one host read per batch
        if bool(bad.any()):
            rows = bad.nonzero().flatten().tolist()
            more = f" (and {len(rows) - 1} more of {noun}s {first}..{first + len(x) - 1})" if len(rows) > 1 else ""
            name = f"{noun} {first + rows[0]}{more}"
            raise NonFinite(f"{what.format(name)}; nothing of its batch is written: try {advice}")

    def divergence_advice(self) -> str:
        """The flags that make a sampler that diverged converge, those not in use already."""
        args = self.args
        if args.mode == "ODE" and adaptive_ode_method(args.sampling_method):
            fixes = ["smaller --atol and --rtol"]
        else:
            fixes = [f"more --num-sampling-steps (now {args.num_sampling_steps})"]
            if args.mode == "ODE":
                fixes.append("--sampling-method dopri5 (adaptive)")
        if args.mode == "SDE" and args.diffusion_form != "sigma":
            fixes.append("--diffusion-form sigma (upstream's default)")
        if args.mode == "SDE" and args.diffusion_norm > 1:
            fixes.append(f"a smaller --diffusion-norm (now {args.diffusion_norm:g}; upstream's is 1)")
        if args.precision == "bf16":
            fixes.append("--precision tf32")
        if args.cfg_scale > 1:
            fixes.append(f"a smaller --cfg-scale (now {args.cfg_scale:g})")
        return ", ".join(fixes[:-1]) + (" or " if len(fixes) > 1 else "") + fixes[-1]


def set_matmul_precision(precision: str) -> None:
    """tf32: TF32 matmuls and convolutions on Ampere+ (upstream's setting); fp32 and bf16: full fp32."""
    tf32 = precision == "tf32"
    # The same pair of calls as training's: mixing torch.backends.cuda.matmul.allow_tf32 with
    # set_float32_matmul_precision in one process makes get_float32_matmul_precision raise, and
    # inductor calls it when it tunes matmuls.
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = tf32


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(count: int, elapsed: float, first: tuple[int, float | None], args: argparse.Namespace,
         processes: int = 1) -> str:
    """`R images/s` of `count` images in `elapsed` s (on `processes` processes: also the average per
    process). Under --compile or --cuda-graphs the first batch compiles the model or captures its
    graphs, which can take minutes: given `first` (the images of every process's first batch, and the
    seconds this process's took), the rate is the later batches', the first's time said beside it, as
    train.py leaves its compiling step out of its throughput; a job of no later batch says that its
    rate counts that time."""
    first_count, first_s = first
    done = [(args.compile, "compiled the model (--compile)", "compiling the model (--compile)"),
            (args.cuda_graphs, "captured its CUDA graphs (--cuda-graphs)", "capturing its CUDA graphs (--cuda-graphs)")]
    what = " and ".join(word for flag, word, _ in done if flag)
    doing = " and ".join(word for flag, _, word in done if flag)
    later = bool(what) and first_s is not None and first_count < count and first_s < elapsed
    if later:
        count, elapsed = count - first_count, elapsed - first_s
    words = f"{count / elapsed:.2f} images/s"
    if processes > 1:
        words += f" ({count / elapsed / processes:.2f} per process on average)"
    if later:
        return f"{words} after the first batch, which {what} in {first_s:.1f} s"
    return f"{words}, counting the first batch's time {doing}" if what and first_s is not None else words


#################################################################################
#                                      Jobs                                      #
#################################################################################

def run_grid(setup: Setup) -> str:
    """Sample the labels of --class-labels into one PNG grid."""
    args = setup.args
    labels = args.class_labels
    if labels is None:
        labels = UPSTREAM_CLASS_LABELS if setup.num_classes == 1000 else [i % setup.num_classes for i in range(8)]
    bad = [label for label in labels if not 0 <= label < setup.num_classes]
    if bad:
        raise UserError(f"--class-labels {bad[0]} is outside 0 .. {setup.num_classes - 1}: the model has "
                        f"{setup.num_classes} classes")
    out = args.out or DEFAULT_OUT["grid"]
    batch_size = min(args.batch_size or len(labels), len(labels))
    start = time.perf_counter()
    images = []
    first_batch = (min(batch_size, len(labels)), None)
    for first in range(0, len(labels), batch_size):
        # Every batch of batch_size, the last padded past the labels (its padding's images dropped), so
        # that a compiled forward or a CUDA graph serves them all: a short one would compile again.
        indices = range(first, first + batch_size)
        kept = min(batch_size, len(labels) - first)
        noise, _ = index_noise(args.seed, indices, setup.latent_shape, setup.num_classes)
        batch_labels = torch.tensor([labels[i % len(labels)] for i in indices], dtype=torch.long)
        samples = setup.sample(noise, batch_labels, derived_seed(args.seed, first, batch_size))
        images.append(setup.to_images(samples[:kept], first).cpu())
        first_batch = (first_batch[0], first_batch[1] or time.perf_counter() - start)
    elapsed = time.perf_counter() - start
    from sit_fast.images import save_image_grid

    try:
        save_image_grid(torch.cat(images), out, nrow=min(4, len(labels)))
    except OSError as err:  # refused (a full disk), or failed (a failing disk's EIO)
        raise write_failed(out, err, "", "run it again") from None
    print(f"sampled {len(labels)} images in {elapsed:.1f} s: {rate(len(labels), elapsed, first_batch, args)} "
          f"-> {out}")
    return out


def settings_ignored(args: argparse.Namespace) -> set[str]:
    """The flags this sampler ignores: the step count of an adaptive ODE solver (its end state does
    not depend on it), the tolerances of a fixed-step one (but implicit_adams / fixed_adams), the
    size of an SDE's last step when it takes none, the guidance's channels and interval without
    guidance, and --vae-precision without a VAE."""
    # Without guidance (--cfg-scale 1, the FID default) no channel is guided, in no interval.
    unguided = {"cfg_channels", "cfg_interval"} if getattr(args, "cfg_scale", None) == 1 else set()
    if getattr(args, "vae", None) == "none":  # pixel space: no VAE decodes or encodes at that precision
        unguided |= {"vae_precision"}
    if args.mode != "ODE":
        return unguided | ({"last_step_size"} if args.last_step is None else set())
    ignored = unguided | ({"num_sampling_steps"} if adaptive_ode_method(args.sampling_method) else set())
    return ignored if ode_method_uses_tolerances(args.sampling_method) else ignored | {"atol", "rtol"}


def image_settings(args: argparse.Namespace, setup: Setup) -> dict:
    """The settings that decide the images of an FID folder (compared when resuming)."""
    settings = {k: v for k, v in vars(args).items() if k not in NOT_IMAGE_SETTINGS | settings_ignored(args)}
    settings.update(ckpt=os.path.abspath(setup.info["path"]), weights=setup.info["weights"],
                    model=setup.info["model"], image_size=setup.image_size, num_classes=setup.num_classes,
                    in_channels=setup.in_channels)
    if isinstance(vae := settings.get("vae"), str):
        vae = recorded_vae_spec(vae)  # an alias's hub id as the alias
        # a local VAE by its real path: `vae` typed in another folder is another VAE, `/x/vae/` the same one
        settings["vae"] = os.path.realpath(vae) if os.path.isabs(vae) else vae
    return json.loads(json.dumps(settings))




def arithmetic_note(recorded: list[dict] | None, now: dict, args: argparse.Namespace, kept: str,
                    flag: str) -> str | None:
    """A line when a job resumed in a folder computes with another arithmetic (Setup.arithmetic) than
    the one its record holds for the `kept` results already there, or when those were computed with
    several (an earlier resume's): --fused-kernels, --attn-backend (and SIT_FAST_SDPA_BACKEND under
    sdpa) and --compile change the rounding only, so the folder mixes results a rounding apart (in
    8-bit images, a grey level here and there).
    None when they agree, or the record (an older one) holds none."""
    if not recorded or (len(recorded) == 1 and recorded[0] == now):
        return None

    def named(key: str) -> str:
        return key if key == SDPA_VARIABLE else "--" + key.replace("_", "-")

    if len(recorded) > 1:  # a resume took another arithmetic already: no flags give a uniform set now
        every = [*recorded, now]
        values = {key: list(dict.fromkeys(str(entry[key]) for entry in every if key in entry)) for key in now}
        used = ", ".join(f"{named(key)} {' and '.join(values[key])}" for key in now if len(values[key]) > 1)
        return (f"{kept} came from other arithmetics in turn (with those computed now: {used}), which "
                f"round differently: the results mix them; for a uniform set, pass another {flag}, or delete it to "
                f"start over")
    old = recorded[0]
    changed = [key for key in now if key in old and old[key] != now[key]]

    def given(key: str) -> str:
        auto = key in ("attn_backend", "fused_kernels") and getattr(args, key, None) == "auto"
        return f"{now[key]} (auto here)" if auto else now[key]

    flags = ", ".join(f"{named(key)} {old[key]} -> {given(key)}" for key in changed)
    flag_values = " ".join(f"{named(key)} {old[key]}" for key in changed if key not in ("compile", SDPA_VARIABLE))
    fixes = [f"pass {flag_values}" if flag_values else "",
             ("add --compile" if old["compile"] == "on" else "drop --compile") if "compile" in changed else "",
             "" if SDPA_VARIABLE not in changed else f"unset {SDPA_VARIABLE}" if old[SDPA_VARIABLE] == "unset"
             else f"set {SDPA_VARIABLE}={old[SDPA_VARIABLE]}"]
    return (f"{flags}: {kept} came from the former, which rounds differently, and those computed now "
            f"take the latter, so the two mix; for a uniform set, {' and '.join(fix for fix in fixes if fix)} "
            f"(Ctrl-C now leaves the folder as it was), or pass another {flag}")


def checkpoint_digest(path: str) -> str:
    """A short digest of what a checkpoint holds, so that a folder's record tells apart two files
    written to one path (a run retrained into the same results folder): of its file_fingerprint (a
    zip archive's entries' CRC-32s, read from its index; else blocks sampled over the file)."""
    return hashlib.sha256(repr(file_fingerprint(path)).encode()).hexdigest()[:16]


def run_folder_name(args: argparse.Namespace, model: str) -> str:
    """Upstream sample_ddp.py's name for a run's folder, so sweeps land side by side as there, e.g.
    SiT-XL-2-pretrained-cfg-1.5-32-ODE-250-dopri5 or ...-SDE-250-Euler-sigma-Mean-0.04."""
    ckpt = "pretrained"
    if args.ckpt:
        stem, extension = os.path.splitext(os.path.basename(args.ckpt))
        ckpt = stem if extension.lower() in (".pt", ".pth", ".safetensors") else os.path.basename(args.ckpt)
    name = (f"{model.replace('/', '-')}-{ckpt}-cfg-{float(args.cfg_scale)}-{args.batch_size}-"
            f"{args.mode}-{args.num_sampling_steps}-{args.sampling_method}")
    if args.mode == "SDE":
        name += f"-{args.diffusion_form}-{args.last_step}-{args.last_step_size}"
    return name


def longest_name(folder: str) -> int:
    """The longest file name, in bytes, that the filesystem of `folder` (or of the nearest folder above
    it that exists) takes: 255 on most."""
    path = os.path.abspath(folder)
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        return os.pathconf(path, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # not said by this filesystem, or no pathconf (Windows)
        return 255


def run_fid(setup: Setup) -> str:
    """N numbered PNGs in --sample-dir (resumable, any world size) and the ADM .npz of all N. Rank 0
    holds the folder's lock from before its record is read (from before the model loads, where
    lock_outputs took it) until the .npz is written."""
    sample_dir = fid_folder(setup.args, setup.info["model"])
    lock = _taken.pop(sample_dir, None) or FolderLock(sample_dir, "--sample-dir")
    with lock:
        return fid_job(setup, sample_dir, lock)


def fid_folder(args: argparse.Namespace, model: str) -> str:
    """The FID job's folder of PNGs: --sample-dir, or the run folder in it named after the settings and
    `model`, the model's registry name."""
    sample_dir = os.path.normpath(args.sample_dir)
    if args.run_folder:
        check_run_folder_name(args, model)
        sample_dir = os.path.join(sample_dir, run_folder_name(args, model))
    elif args.out is None:
        base = os.path.basename(sample_dir)
        longest = longest_name(os.path.dirname(sample_dir) or ".")
        if len(os.fsencode(base)) <= longest < len(os.fsencode(f"{base}.npz")):
            raise UserError(f"--sample-dir {args.sample_dir}: the .npz beside the folder, {base[:48]}....npz, "
                            f"would be a name longer than a file name may be there ({longest} bytes): pass a "
                            f"shorter --sample-dir, or --out FILE.npz")
    return sample_dir


def check_run_folder_name(args: argparse.Namespace, model: str | None) -> None:
    """Refuse a run folder's name (or its .npz's) longer than a file name may be in --sample-dir: said
    before any work, not as --sample-dir's fault (or after all of it, for the .npz). `model` None (a
    checkpoint not loaded yet, no --model): the shortest registry name stands for it, so that a name
    too long for every model is refused before the load."""
    sample_dir = os.path.normpath(args.sample_dir)
    name = run_folder_name(args, model or min(SiT_models, key=len))
    longest = longest_name(sample_dir)
    too_long = [n for n in (name, None if args.out else f"{name}.npz") if n and len(os.fsencode(n)) > longest]
    if not too_long:
        return
    what = "" if too_long[0] == name else ".npz "
    shown = too_long[0] if model else run_folder_name(args, "<model>") + too_long[0][len(name):]
    size = f"{'' if model else 'at least '}{len(os.fsencode(too_long[0]))} bytes"
    raise UserError(f"the run folder's {what}name made from the settings, {shown[:48]}... ({size}, the checkpoint's "
                    f"file name in it), is longer than a file name may be in {sample_dir} ({longest} bytes), "
                    f"whatever --sample-dir: give the checkpoint a shorter file name (a link to it will do), "
                    f"{'pass --out FILE.npz, ' if what else ''}or pass --no-run-folder and name the folder with "
                    f"--sample-dir")


_taken: dict[str, FolderLock] = {}  # the FID folder's lock, by path, where lock_outputs took it (run_fid's then)


def output_file(args: argparse.Namespace) -> str | None:
    """The file a job writes (its --out, or the default one), or None: none (--likelihood without --out),
    or the FID job's .npz beside its folder, which the folder's lock guards."""
    if args.job in DEFAULT_OUT:
        return args.out or DEFAULT_OUT[args.job]
    if args.job == "likelihood":
        return likelihood_out(args)
    return args.out


def lock_outputs(args: argparse.Namespace, dist: DistInfo) -> None:
    """Rank 0 locks what the job writes before the model and the VAE load (seconds to minutes), held to
    the job's end (main's release_all): the file it writes (FileLock), so that a second job given the same
    --out is refused at once instead of overwriting it at the end, and the FID job's folder where it
    exists and its path is known without the model (--no-run-folder, --model, or the release; a folder
    not there yet is locked as it is made, after the load); a run folder's name too long for any model is
    refused here too (check_run_folder_name)."""
    def lock() -> None:
        if (out := output_file(args)) is not None:
            FileLock(out, "--out").acquire()
        model = args.model or (PRETRAINED_MODEL if args.ckpt is None else None)
        if args.job == "fid" and (model is not None or not args.run_folder):
            folder = fid_folder(args, model or "")
            if os.path.isdir(folder):
                _taken[folder] = FolderLock(folder, "--sample-dir")
                _taken[folder].acquire()
        elif args.job == "fid":  # the run folder's name waits for the model's, but may be too long for any
            check_run_folder_name(args, None)

    on_main(lock, dist)


def fid_job(setup: Setup, sample_dir: str, lock: FolderLock) -> str:
    args, dist = setup.args, setup.dist
    total, chunk = args.num_fid_samples, args.batch_size
    if args.out is None and os.path.basename(sample_dir) in (".", ".."):  # no name of its own to give the .npz
        sample_dir = os.path.abspath(sample_dir)
    if args.out is None and os.path.dirname(sample_dir) == sample_dir:
        raise UserError(f"--sample-dir {args.sample_dir}: the .npz goes beside the folder, named after it, and "
                        f"{sample_dir} has neither: pass --out FILE.npz")
    npz_path = args.out or f"{sample_dir}.npz"
    settings = image_settings(args, setup)

    def prepare():
        if why := foreign_npz(npz_path):  # one of this job's (an earlier run's) is replaced
            raise UserError(f"{npz_path} exists and {why}, where this job writes its samples' .npz: "
                            f"{'pass another --out' if args.out else 'pass --out FILE.npz'}, or move it away")
        if args.out is None:  # the .npz goes beside the folder of PNGs, locked as a job given it as --out locks it
            make_writable_folder(os.path.dirname(os.path.abspath(npz_path)), f"--sample-dir {args.sample_dir}")
            FileLock(npz_path, "--sample-dir").acquire()
        if note := mixed_folders(sample_dir, args.run_folder):
            logging.getLogger("sit_fast.sample").warning(note)
        recorded = check_settings(sample_dir, dict(settings, ckpt_digest=checkpoint_digest(setup.info["path"])),
                                  lock=lock, arithmetic=setup.arithmetic, flags=setting_flags(args))
        if leftovers := unfinished_writes(sample_dir, r"\d{6}\.png", "PNG", "a sampling job", lock):
            logging.getLogger("sit_fast.sample").warning(leftovers)
        npz_folder, npz_name = os.path.split(os.path.abspath(npz_path))
        # removed only beside the locked folder (--out elsewhere may be another job's, writing it now)
        npz_lock = lock if args.out is None else None
        if leftovers := unfinished_writes(npz_folder, re.escape(npz_name), ".npz", "a sampling job", npz_lock):
            logging.getLogger("sit_fast.sample").warning(leftovers)
        names = set(os.listdir(sample_dir))
        present = sum(f"{i:06d}.png" in names for i in range(total))
        pending = pending_chunks(sample_dir, total, chunk, names)
        written = images_in(sample_dir, names)
        note = None
        if pending and (note := arithmetic_note(recorded, setup.arithmetic, args,
                                                f"the {written} image{'s' if written > 1 else ''} in {sample_dir}",
                                                "--sample-dir")):
            logging.getLogger("sit_fast.sample").warning(note)
        return pending, present, note is not None

    pending, present, other_arithmetic = on_main(prepare, dist)
    check_shared_path(sample_dir, f"--sample-dir {args.sample_dir}", dist)
    todo = sum(min(chunk, total - k * chunk) for k in pending)
    if dist.is_main:
        redone = (f" ({todo - (total - present)} of them present: a batch with a missing image is redone whole)"
                  if todo > total - present else "")
        print(f"{present} of {total} images already in {sample_dir}; sampling {todo}{redone} on "
              f"{dist.world_size} process(es), {batches(len(pending))} of {chunk}" if todo else
              f"all {total} images already in {sample_dir}: nothing to sample")
    writer = PNGWriter(sample_dir)
    bar = progress(todo, "sampling", "img", disable=not dist.is_main or not todo)
    # a second Ctrl-C while the queued PNGs are finished, or the line below is said
    again = (f"interrupted again, stopping at once: the images written are kept, any being written are left "
             f"unfinished under temporary names (which the next run removes): run the same command again to "
             f"sample the rest into {sample_dir} and write {npz_path}")

    def stopped(err: KeyboardInterrupt, doing: str = "") -> SystemExit:
        """Said once per node (a signal may reach one node's processes only): the PNGs are written whole
        (atomically) and the queued ones finished, so all are kept; the exit to raise."""
        winding_down(again)
        bar.close()
        if (said := stop_words(err, dist, per_node=True)) is not None:  # its local rank 0, or one in its place
            names = set(os.listdir(sample_dir))
            written = sum(f"{i:06d}.png" in names for i in range(total))
            rest = f"write {npz_path}" if written == total else f"sample the rest into {sample_dir}"
            print(f"\n{said}{doing}; {written} of {total} images are written, and kept: run the same "
                  f"command again to {rest}", file=sys.stderr)
        return SystemExit(exit_status(err))

    # the first batch of each process (compiling side by side under --compile): its images, and its time here
    first_batch = (sum(min(chunk, total - k * chunk) for k in pending[: dist.world_size]), None)
    start = time.perf_counter()
    try:
        with writer:  # the queued PNGs finished on the way out, after a Ctrl-C's winding_down below
            try:
                for k in pending[dist.rank::dist.world_size]:
                    indices = range(k * chunk, (k + 1) * chunk)  # the last chunk is padded past N: same batch always
                    noise, labels = index_noise(args.seed, indices, setup.latent_shape, setup.num_classes,
                                                class_balanced=args.class_balanced)
                    samples = setup.sample(noise, labels, derived_seed(args.seed, k, chunk))
                    kept = [i for i in indices if i < total]
                    try:  # the padding is neither decoded nor judged: it is not written
                        images = to_rgb_uint8(setup.to_images(samples[: len(kept)], k * chunk))  # (B, H, W, 3)
                    except NonFinite as error:  # a resume redraws the same noise: it would diverge again
                        raise NonFinite(f"{error} (the same settings draw the same noise again)") from None
                    if other_arithmetic:  # before this job's first image: the record says the folder mixes them
                        try:
                            add_arithmetic(sample_dir, setup.arithmetic)
                        except OSError as err:  # refused (a full disk), or failed (a failing disk's EIO)
                            written = written_kept(images_in(sample_dir), "image")
                            raise write_failed(err.filename or sample_dir, err, written,
                                               "run the same command again to sample the rest") from None
                        other_arithmetic = False
                    first_batch = (first_batch[0], first_batch[1] or time.perf_counter() - start)
                    writer.write(images, kept)
                    bar.update(min(len(kept) * dist.world_size, todo - bar.n))
            except KeyboardInterrupt:
                winding_down(again)  # the queued PNGs are finished first
                raise
    except UserError:  # e.g. a full disk: the error on a line of its own, after the bar
        bar.close()
        raise
    except KeyboardInterrupt as err:
        raise stopped(err) from None
    try:
        synchronize(setup.device)
        barrier()
    except KeyboardInterrupt as err:  # waiting for the other processes' shares
        raise stopped(err) from None
    except RuntimeError as err:  # gloo's error: a process (of another node, stopped by a signal to it alone) ended
        if not peer_ended(err):
            raise
        bar.close()
        raise peer_failed(err, " before its share was sampled", f"the images written are kept: run the same command "
                          f"again to sample the rest into {sample_dir}") from None
    elapsed = time.perf_counter() - start
    bar.update(todo - bar.n)
    bar.close()
    if dist.is_main:
        if todo:
            print(f"sampled {todo} images in {elapsed:.1f} s: "
                  f"{rate(todo, elapsed, first_batch, args, dist.world_size)}")
        try:
            shape = build_npz(sample_dir, total, npz_path)  # the other ranks are done: no barrier to time out
        except KeyboardInterrupt as err:  # the .npz is written whole or not at all
            raise stopped(err, f" while writing {npz_path}") from None
        except OSError as err:  # refused (a full disk), or failed (a failing disk's EIO): every image is kept
            raise write_failed(err.filename or npz_path, err, written_kept(images_in(sample_dir), "image"),
                               "run the same command again to finish") from None
        print(f"saved {npz_path} [arr_0: {'x'.join(map(str, shape))} uint8]")
    return npz_path


def mixed_folders(sample_dir: str, run_folder: bool) -> str | None:
    """A line when this FID job's images would lie among another's: a run folder inside a folder that
    holds a job's images without one (its settings.json; sample.py's default), or images without a run
    folder beside run folders (sample_ddp.py's default); both write to samples/ unless told."""
    if run_folder:
        parent = os.path.dirname(sample_dir) or "."
        if os.path.isfile(os.path.join(parent, "settings.json")):
            return (f"{parent} holds the images of another FID job (its settings.json); this job's folder "
                    f"{sample_dir} and .npz go among them: another --sample-dir keeps the two apart")
        return None
    if not os.path.isdir(sample_dir):
        return None
    runs = sorted(entry.name for entry in os.scandir(sample_dir)
                  if entry.is_dir() and os.path.isfile(os.path.join(entry.path, "settings.json")))
    if runs:
        return (f"{sample_dir} holds the run folders of other FID jobs ({runs[0]}/{', ...' if len(runs) > 1 else ''}); "
                f"this job's images go beside them: another --sample-dir, or --run-folder, keeps them apart")
    return None


def job_data(setup: Setup):
    """The data of --likelihood and --reverse: --dataset digits, else --data (see load_data), which
    every process must read alike (check_same_data)."""
    if setup.args.dataset == "digits":
        return load_digits(setup)
    data = agree(lambda: load_data(setup, setup.args.data), setup.dist)  # one unreadable: every process stops
    check_same_data(setup.args.data, data[0], setup.dist)
    return data


def names_digest(images: ImageFiles) -> str:
    """The sha256 of a folder's image names, in order (names any bytes a filesystem allows)."""
    return hashlib.sha256("\n".join(images.names).encode("utf-8", "surrogateescape")).hexdigest()


def check_same_data(path: str, x, dist: DistInfo) -> None:
    """Under torchrun each process reads --data itself: a file must be rank 0's (file_fingerprint), a
    folder hold the images rank 0's does, by name (a node's own copy with an image fewer, or others,
    would give batches of other images under the same item numbers)."""
    if dist.world_size == 1:
        return
    if os.path.isfile(path):
        check_same_file(path, f"--data {path}", dist)
        return
    other, (_, main_count), _ = unlike_rank_0((names_digest(x.images), len(x)), dist)
    if other:
        rank, host, (_, count) = other[0]
        raise UserError(f"--data {path}: rank {rank} (on {host}) finds other images there than rank 0 does ({count} "
                        f"there, {main_count} on rank 0, or other names): every process must read the same data "
                        f"(a shared filesystem, or identical copies)")


def load_digits(setup: Setup):
    """scikit-learn's digits, gray levels k in {0 .. 16}, dequantised uniformly into the [-1, 1] that
    train.py's k / 8 - 1 spans: x = (k + u) * 2 / 17 - 1, u ~ U[0, 1)^D, and the bpd offset is
    log2(17 / 2) (the Jacobian 2 / 17), as 8-bit pixels get 7 = log2(256 / 2)."""
    from sklearn.datasets import load_digits as sklearn_digits

    if setup.codec is not None or setup.latent_shape != (1, 8, 8):
        space = "a VAE's latents" if setup.codec is not None else f"inputs {setup.latent_shape}"
        raise UserError(f"--dataset digits is 8x8 gray pixels; this model takes {space}: pass a model trained "
                        f"with train.py --dataset digits at 8 px (--vae none), or other data with --data PATH")
    levels = sklearn_digits().images.astype(np.uint8)[..., None]  # (1797, 8, 8, 1), 0 .. 16
    return (DequantizedImages(levels, 17, setup.args.seed), math.log2(17 / 2),
            "17-level digits, uniform dequantization")


def load_data(setup: Setup, path: str):
    """--data -> (model inputs (N, C, h, w) fp32 on the CPU, indexed by slices, bpd offset, what the
    density is of). Images are read, dequantised or encoded when a batch asks for them (x[a:b]):
    a process holds only its batches, not the whole of --data."""
    if not os.path.exists(path):
        raise UserError(f"--data {path} does not exist")
    wanted = setup.in_channels if setup.codec is None else 3
    if os.path.isdir(path):
        if wanted not in (1, 3):
            raise UserError(f"--data {path}: images are read as gray or RGB, the model takes {wanted} channels: pass "
                            f"its inputs as a .pt or a float .npz")
        images = ImageFiles(path, setup.image_size, wanted)
    elif path.lower().endswith(".npz"):
        try:
            with np.load(path) as archive:
                names = list(archive.keys())
            key = "arr_0" if "arr_0" in names else names[0] if len(names) == 1 else None
            if key is None:
                raise UserError(f"{path} holds {', '.join(names)}: store the data as arr_0")
            array = npz_array(path, key)
        except UserError:
            raise
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:  # not an .npz, or damaged
            # numpy takes a file that is no zip for a pickle, and suggests allow_pickle: not here
            reason = "not an .npz archive" if "pickled" in str(err) else first_line(err)
            raise UserError(f"cannot read {path} ({reason}): --data takes an .npz of arrays") from None
        if array.ndim == 0 or len(array) == 0:
            raise UserError(f"--data {path} holds no items{' (a single number)' if array.ndim == 0 else ''}")
        if array.dtype.kind in "iub" and array.dtype != np.uint8:  # 8-bit images stored wider, say: no model inputs
            raise UserError(f"--data {path} holds {array.dtype} values: give images as uint8 (N, H, W, C) "
                            f"(array.astype(np.uint8) for 0..255 values) or model inputs as floats")
        if array.dtype != np.uint8:
            return check_model_inputs(setup, torch.from_numpy(np.array(array, dtype=np.float32)), path)
        images = check_image_array(array, setup.image_size, wanted, path, vae=setup.codec is not None)
    elif path.lower().endswith((".pt", ".pth")):  # --reverse writes either
        try:
            tensor = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 -- torch.load raises many types for bad files
            raise UserError(f"cannot read {path} ({torch_load_failure(path, err)}): --data takes a tensor of model "
                            f"inputs saved by torch.save, an .npz or a folder of images") from None
        if not isinstance(tensor, torch.Tensor):
            raise UserError(f"{path} holds a {type(tensor).__name__}, not a tensor of model inputs (N, C, h, w)")
        if not tensor.is_floating_point():
            raise UserError(f"--data {path} holds {str(tensor.dtype).replace('torch.', '')} values: model inputs "
                            f"(N, C, h, w) are floats (images go in a folder or a uint8 .npz)")
        return check_model_inputs(setup, tensor.float(), path)
    else:
        raise UserError(f"--data {path}: expected a folder of images, an .npz or a .pt (.pth) file")
    if setup.codec is not None:
        return EncodedImages(setup.codec, images), 0.0, "scaled VAE latents (posterior means)"
    return DequantizedImages(images, 256, setup.args.seed), 7.0, \
        "8-bit pixels, uniform dequantization"


def check_image_array(images: np.ndarray, image_size: int, channels: int, path: str, vae: bool = False) -> np.ndarray:
    """(N, H, W, C) or gray (N, H, W) uint8 of --data, checked against the model (through the VAE, which
    takes RGB, where vae): (N, H, W, C)."""
    if images.ndim == 3:  # grayscale N x H x W
        images = images[..., None]
    if images.ndim == 4 and images.shape[-1] == 3 and channels == 1 and all(
            (chunk == chunk[..., :1]).all() for chunk in (images[k: k + 1024] for k in range(0, len(images), 1024))):
        images = images[..., :1]  # gray stored as RGB (the FID .npz of a 1-channel model)
    if images.ndim != 4 or images.shape[1] != images.shape[2] or images.shape[1] != image_size:
        raise UserError(f"{path}: images of shape {images.shape[1:]} do not match the model's image size "
                        f"{image_size} (expected N x {image_size} x {image_size} x C uint8)")
    if images.shape[-1] != channels:
        raise UserError(f"{path}: images with {images.shape[-1]} channels, "
                        f"{'the VAE encodes RGB images' if vae else f'the model takes {channels}'}")
    return images


class ImageFiles:
    """The images of a folder and its sub-folders (an ImageFolder root too), sorted by relative path:
    files[a:b] reads those, ADM center-cropped to image_size, as (b - a, H, W, C) uint8. Left out, with a
    warning, as train.py's --data-path leaves them out: hidden files (macOS's ._NAME beside a copied
    image is none), the root's hidden folders (.ipynb_checkpoints/), and a linked folder reached again
    (a link loop, or a second link to one folder)."""

    def __init__(self, path: str, image_size: int, channels: int):
        from sit_fast.data import IMG_EXTENSIONS, _holds_images, walk_each_folder_once  # as train.py's --data-path

        self.path, self.image_size, self.channels = path, image_size, channels

        def shown(folder: str) -> bool:  # not in one of the root's hidden folders, whose files are left out
            relative = os.path.relpath(folder, path)
            return relative == os.curdir or not relative.split(os.sep)[0].startswith(".")

        names, hidden, skipped = [], [], []
        try:  # --data itself, said as train.py's --data-path is (a sub-folder's line says to move it out of --data)
            with os.scandir(path):
                pass
        except OSError as err:
            raise UserError(f"cannot read --data {path} ({refusal(err)}): {read_fix(err)}") from None
        for folder, files in walk_each_folder_once(path, skipped, set(), "--data", keep=shown):
            relative = os.path.relpath(folder, path)
            for n in files:
                if n.lower().endswith(IMG_EXTENSIONS):
                    name = os.path.normpath(os.path.join(relative, n))
                    (hidden if n.startswith(".") else names).append(name)
        repeated = [folder for folder in skipped if shown(folder)]
        # a hidden folder that cannot be read (another user's .Trash-1000) is no error: its images are left out
        hidden += [os.path.relpath(folder, path) for folder in skipped if not shown(folder) and _holds_images(folder)]
        self.names = sorted(names)
        log = logging.getLogger("sit_fast.sample")
        for left_out, what in ((sorted(hidden), "hidden file(s) or hidden folder(s) holding images"),
                               (repeated, "linked folder(s) reached again (a link loop, or a second link to one "
                                          "folder), whose images are taken once,")):
            if left_out:
                log.warning(f"--data {path}: {len(left_out)} {what} left out ({left_out[0]}"
                            f"{' and more' if len(left_out) > 1 else ''}), as train.py's --data-path leaves them")
        if not self.names:
            raise UserError(f"--data {path}: no images ({', '.join(IMG_EXTENSIONS)}) in the folder or its "
                            f"sub-folders")

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, items: slice) -> np.ndarray:
        from sit_fast.data import gray_channel, read_image

        arrays = []
        for index in range(len(self))[items]:
            array = np.asarray(read_image(os.path.join(self.path, self.names[index]), self.image_size, "RGB"))
            if self.channels == 1:  # gray images, stored as gray or as RGB (a 1-channel model's FID PNGs)
                array = gray_channel(array)
                if array is None:
                    raise UserError(f"--data {self.path}: {self.names[index]} is in colour, the model takes gray "
                                    f"(1-channel) images: convert them to gray first")
            arrays.append(array)
        return np.stack(arrays)

    def check(self, indices: list[int]) -> None:
        """Open the images `indices` (their headers only), so that a file that is no image stops a run
        before its work, not in the middle (a floating-point image, which no run reads, as well)."""
        from sit_fast.data import open_image, refuse_float_pixels

        with progress(len(indices), "checking images", "img", disable=len(indices) < 1000) as bar:
            for index in indices:
                path = os.path.join(self.path, self.names[index])
                with open_image(path) as image:
                    refuse_float_pixels(image, path)
                bar.update()


class DequantizedImages:
    """Images of `levels` gray levels per channel ((N, H, W, C) integers 0 .. levels - 1, an array or
    ImageFiles) as model inputs, dequantised uniformly when a batch asks for them: x[a:b] is
    (k + u) * 2 / levels - 1, (b - a, C, H, W) fp32, with item i's u ~ U[0, 1)^D drawn from its own
    generator (seed (--seed, -1, i)), whichever batch or process reads it."""

    def __init__(self, images, levels: int, seed: int):
        self.images, self.levels, self.seed = images, levels, seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, items: slice) -> torch.Tensor:
        k = torch.from_numpy(np.array(self.images[items])).permute(0, 3, 1, 2).float()  # a copy: maps are read-only
        u = torch.empty_like(k)
        for row, i in enumerate(range(len(self))[items]):
            u[row] = torch.rand(k.shape[1:], generator=torch.Generator().manual_seed(derived_seed(self.seed, -1, i)))
        return (k + u) * (2 / self.levels) - 1


class EncodedImages:
    """(N, H, W, 3) uint8 images (an array or ImageFiles) read as the VAE's latents: x[a:b] encodes
    those images then, so a likelihood or --reverse process encodes only its own batches, as they come."""

    def __init__(self, codec, images):
        self.codec, self.images = codec, images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, items: slice) -> torch.Tensor:
        return encode_images(self.codec, self.images[items], show_progress=False)


def fill_to(args: argparse.Namespace, items: int) -> int:
    """The rows a short last batch of a job over `items` data items is filled to (see filled):
    --batch-size under --compile or --cuda-graphs, where a batch of another shape would compile, or
    capture, again; 0 (not filled) otherwise, and for a job of one batch."""
    return args.batch_size if (args.compile or args.cuda_graphs) and items > args.batch_size else 0


def filled(t: torch.Tensor, size: int) -> torch.Tensor:
    """t (n, ...) with copies of its own rows, in turn, after them up to `size` rows."""
    return t if len(t) >= size else torch.cat([t, t[torch.arange(size - len(t)) % len(t)]])


def check_items(x, batches: list[int], batch_size: int) -> None:
    """The images of these batches, where --data is a folder (see ImageFiles.check)."""
    images = getattr(x, "images", None)
    if isinstance(images, ImageFiles):
        images.check([i for k in batches for i in range(k * batch_size, min((k + 1) * batch_size, len(x)))])


def encode_images(codec, images: np.ndarray, show_progress: bool = True) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> the VAE's posterior means (N, C, h, w), fp32 on the CPU; the images are
    converted to floats one encoder batch at a time, not all at once (50,000 at 256px would be 39 GB)."""
    means = []
    step = codec.batch_size
    with progress(len(images), "encoding", "img", disable=not show_progress or len(images) <= step) as bar:
        for first in range(0, len(images), step):
            chunk = torch.from_numpy(np.array(images[first: first + step])).permute(0, 3, 1, 2).float()
            means.append(codec.encode(chunk / 127.5 - 1)[0].cpu())
            bar.update(len(chunk))
    return torch.cat(means)


def check_model_inputs(setup: Setup, x: torch.Tensor, path: str) -> tuple[torch.Tensor, float, str]:
    if x.dim() == 0 or len(x) == 0:
        raise UserError(f"--data {path} holds no items{' (a single number)' if x.dim() == 0 else ''}")
    if tuple(x.shape[1:]) != setup.latent_shape:
        raise UserError(f"{path}: data of shape {tuple(x.shape)}, the model takes (N, "
                        f"{', '.join(map(str, setup.latent_shape))})")
    finite = torch.isfinite(x.flatten(1)).all(1)
    if not finite.all():  # the ODE would carry NaN to noise: a bpd of nan
        first = int((~finite).nonzero()[0])
        raise UserError(f"{path}: {int((~finite).sum())} of {len(x)} items hold NaN or inf (the first: item {first})")
    return x, 0.0, "the given model inputs (continuous)"


def data_labels(setup: Setup, count: int) -> torch.Tensor:
    labels = setup.args.class_labels
    if labels is None:
        return torch.full((count,), setup.num_classes, dtype=torch.long)  # the null class: unconditional
    if len(labels) not in (1, count):
        raise UserError(f"--class-labels: give one label for all {count} items or one per item, not {len(labels)}")
    bad = [label for label in labels if not 0 <= label <= setup.num_classes]
    if bad:
        raise UserError(f"--class-labels {bad[0]} is outside 0 .. {setup.num_classes} ({setup.num_classes}: null)")
    return torch.tensor(labels * count if len(labels) == 1 else labels, dtype=torch.long)


def batches(count: int) -> str:
    """"1 batch", "2 batches"."""
    return f"{count} batch{'' if count == 1 else 'es'}"


def torch_load_failure(path: str, err: Exception) -> str:
    """Why torch.load(weights_only=True) could not read `path`: what the file is, where its first bytes
    say, or torch's reason; not torch's advice to load it unsafely."""
    kind, (unsafe, reason) = file_kind(path), weights_only_refusal(err)
    return (f"it is {kind}" if kind else f"it holds objects other than tensors ({unsafe})" if unsafe
            else f"not torch.save's or damaged: {reason}" if reason else first_line(err) or type(err).__name__)


def items_in(batches: list[int], total: int, batch_size: int) -> int:
    """How many of `total` items the batches (indices) of `batch_size` hold."""
    return sum(min(batch_size, total - k * batch_size) for k in batches)


def over_batches(desc: str, total: int, batch_size: int, step, pending: list[int] | None = None,
                 dist: DistInfo | None = None, wait=None,
                 parts: BatchParts | None = None) -> tuple[list[torch.Tensor], KeyboardInterrupt | None]:
    """step(k, first) for the batches k of `total` items in `pending` (default: all) that are this
    process's (every world_size-th from its rank), with a progress bar on the main process over the
    items of all pending batches, then wait(bar) if given (the main process waiting for the others):
    (this process's results, the Ctrl-C or stop signal that stopped it, or None). A stop keeps the
    batches finished (in `parts`, if given); a second Ctrl-C while they are read and reported ends the
    job at once (winding_down)."""
    pending = list(range(math.ceil(total / batch_size))) if pending is None else pending
    rank, world, main = (0, 1, True) if dist is None else (dist.rank, dist.world_size, dist.is_main)
    todo = items_in(pending, total, batch_size)
    results = []
    try:
        with progress(todo, desc, "item", disable=not main or todo <= batch_size) as bar:
            for k in pending[rank::world]:
                results.append(step(k, k * batch_size))
                bar.update(min(len(results[-1]) * world, todo - bar.n))
            if wait is not None:
                wait(bar)
    except KeyboardInterrupt as err:
        kept = (f"the results of the batches finished are kept in {parts.folder}: run the same command again to "
                f"compute the rest" if parts is not None else "nothing is kept (--out FILE keeps the batches as "
                "they are finished)")
        winding_down(f"interrupted again, stopping at once: {kept}")
        return results, err
    return results, None


def data_job_batches(job: str, setup: Setup, total: int, step, pending: list[int],
                     parts: BatchParts | None) -> tuple[list[torch.Tensor], KeyboardInterrupt | None, float]:
    """over_batches for --likelihood and --reverse (job) over `total` items: (this process's results,
    the stop that stopped it or None, the seconds taken). A process other than the main one says its
    stop and exits there if stopped."""
    args, dist = setup.args, setup.dist
    start = time.perf_counter()
    wait = parts.wait if parts is not None and dist.is_main and dist.world_size > 1 else None
    with unused_parts_removed(parts, dist), heartbeat(dist) as done:  # for the main process, waiting
        results, interrupted = over_batches(job, total, args.batch_size, step, pending, dist, wait, parts)
        if interrupted is None:
            done()
    elapsed = time.perf_counter() - start
    if not dist.is_main:
        stopped_word(parts, interrupted, dist)
        exit_if_interrupted(interrupted, kept_in_place_of_main(parts, interrupted, total, dist), total, dist)
    return results, interrupted, elapsed


def exit_if_interrupted(interrupted: KeyboardInterrupt | None, done: int, total: int, dist: DistInfo) -> None:
    """After the finished batches are reported: one line (from the main process), exit status 130
    (Ctrl-C) or 128 + the stop signal's number."""
    if interrupted is not None:
        if (said := stop_words(interrupted, dist)) is not None:  # rank 0, or one in its place
            print(f"\n{said} after {done} of {total} items"
                  f"{'' if done else ': nothing finished'}", file=sys.stderr)
        raise SystemExit(exit_status(interrupted))


def data_job_settings(setup: Setup, x) -> dict:
    """What decides the per-item results of --likelihood and --reverse (compared when resuming)."""
    args = setup.args
    settings = {**image_settings(args, setup), "data": None if args.data is None else os.path.abspath(args.data),
                "dataset": args.dataset, "exact_divergence": args.exact_divergence,
                "class_labels": args.class_labels, "items": len(x),
                "ckpt_digest": checkpoint_digest(setup.info["path"]), "data_digest": data_digest(args.data, x)}
    if isinstance(x, DequantizedImages):  # noise drawn per item: a run that drew it otherwise differs
        settings["dequantization"] = "per item"
    return settings


def data_digest(path: str | None, x) -> str | None:
    """A short digest of what --data holds, so that a record tells apart two data sets written to one
    path: a file's file_fingerprint (see checkpoint_digest: an .npz made again), a folder's image names
    (another set of images; not their bytes, so that an image that stopped the run, truncated, can be
    mended and the run resumed); None for --dataset."""
    if path is None:
        return None
    images = getattr(x, "images", None)
    if not isinstance(images, ImageFiles):
        return checkpoint_digest(path)
    return names_digest(images)[:16]


FAILED = re.compile(r"failed-rank-(\d+)\.txt")  # BatchParts.failed's word


def batches_kept(folder: str, batches: int | None = None) -> str:
    """What OUT.parts keeps, for the line of a failed write: "the 3 batches written are kept in
    OUT.parts", "nothing was written yet", or, where the folder cannot be listed, nothing (batches: only
    those of the job's first `batches` count)."""
    try:
        present = os.listdir(folder)
    except FileNotFoundError:
        present = []
    except OSError:
        return ""
    count = sum(1 for name in present
                if re.fullmatch(r"\d{6,}\.pt", name) and (batches is None or int(name[:-3]) < batches))
    said = written_kept(count, "batch", "batches")
    return f"{said} in {folder}" if count else said


class BatchParts:
    """The per-batch results of --likelihood or --reverse, kept as they come in OUT.parts/: one file
    per batch, each written whole (atomically), beside settings.json, the settings that made them.
    Any number of processes share the batches, and the same command, with any number of processes,
    computes only the batches not there: each batch's seeds depend on its index, not on the run.
    When every batch is in, the main process joins them into OUT and removes the folder."""

    def __init__(self, out: str, settings: dict, total: int, batch_size: int, dist: DistInfo,
                 setup: Setup | None = None):
        self.folder, self.total, self.batch_size = f"{out}.parts", total, batch_size
        self.batches = math.ceil(total / batch_size)
        lock = FolderLock(self.folder, "--out")  # held by the main process until the job ends (main's release_all)
        arithmetic = None if setup is None else setup.arithmetic

        def pending() -> list[int]:
            recorded = check_settings(self.folder, settings, holds="the results of a stopped run", flag="--out",
                                      outputs=r"\d{6}\.pt", lock=lock, arithmetic=arithmetic,
                                      flags=None if setup is None else setting_flags(setup.args))
            present = set(os.listdir(self.folder))
            for name in present:  # an earlier run's word of a process that failed
                if FAILED.fullmatch(name):
                    os.remove(os.path.join(self.folder, name))
            left = [k for k in range(self.batches) if self.name(k) not in present]
            done, note = self.batches - len(left), None
            if left and setup is not None and (note := arithmetic_note(
                    recorded, arithmetic, setup.args,
                    f"the results of the {done} batch{'es' if done > 1 else ''} in {self.folder}", "--out")):
                logging.getLogger("sit_fast.sample").warning(note)
            return left, note is not None

        self.pending, self.other_arithmetic = on_main(pending, dist)
        self.arithmetic = arithmetic
        self.liveness = Liveness(dist)  # the other processes' heartbeats, for the main process's wait
        check_shared_path(self.folder, f"--out {out}", dist)

    @staticmethod
    def name(k: int) -> str:
        return f"{k:06d}.pt"

    def write(self, k: int, result: torch.Tensor) -> torch.Tensor:
        path = os.path.join(self.folder, self.name(k))
        try:
            if self.other_arithmetic:  # before this job's first batch: the record says the folder mixes them
                add_arithmetic(self.folder, self.arithmetic)
                self.other_arithmetic = False
            atomic_torch_save(result, path)
        except OSError as err:  # refused (a full disk), or failed (a failing disk's EIO): the batches there are whole
            raise write_failed(err.filename or path, err, self.kept(), "run the same command again to finish") \
                from None
        return result

    def kept(self) -> str:
        return batches_kept(self.folder, self.batches)

    def read(self, every: bool = False) -> list[torch.Tensor]:
        """The results of the batches in the folder now, in batch order (`every`: all must be there)."""
        present = set(os.listdir(self.folder)) if os.path.isdir(self.folder) else set()
        results = []
        for k in range(self.batches):
            if self.name(k) not in present:
                if every:  # a process that stopped without a word, or a file removed meanwhile
                    raise UserError(f"{self.folder} lacks the results of batch {k} ({self.name(k)}): run the same "
                                    f"command again to compute it")
                continue
            path = os.path.join(self.folder, self.name(k))
            try:
                results.append(torch.load(path, map_location="cpu", weights_only=True))
            except Exception as err:  # noqa: BLE001 -- torch.load raises many types for bad files
                raise UserError(f"cannot read {path} ({torch_load_failure(path, err)}): delete it, and "
                                f"the same command computes its batch again") from None
        return results

    def failed(self, rank: int, err: BaseException) -> None:
        """Leave word, for the main process waiting for this one's batches, that rank `rank` failed, or
        was stopped (a stop signal sent to its node alone)."""
        if isinstance(err, KeyboardInterrupt):
            line = f"was {what_stopped(err)}"
        elif isinstance(err, StepSizeUnderflow):  # in the flags' words, as the main process says its own
            line = "failed: " + step_size_underflow_words(err)
        else:
            line = "failed: " + (str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {first_line(err)}")
        with contextlib.suppress(OSError):
            atomic_write(os.path.join(self.folder, f"failed-rank-{rank}.txt"),
                         lambda f: f.write(" ".join(line.split()).encode()))

    def wait(self, bar) -> None:
        """Until every pending batch is in the folder (the main process, after its own, waits so for the
        others' instead of at a barrier, whose timeout a slow batch elsewhere could outlast), the bar
        counting; a UserError if another process left word that it failed, or ended without one (its
        heartbeat stopped: Liveness)."""
        while True:
            present = set(os.listdir(self.folder))
            failures = sorted(name for name in present if FAILED.fullmatch(name))
            if failures:
                with open(os.path.join(self.folder, failures[0])) as f:
                    said = f.read()
                then = "once that is fixed" if said.startswith("failed:") else "to compute the rest"
                raise PeerFailed(f"rank {FAILED.fullmatch(failures[0]).group(1)} {said}; the batches finished are "
                                 f"kept in {self.folder}: run the same command again {then}")
            missing = [k for k in self.pending if self.name(k) not in present]
            bar.update(max(0, bar.total - items_in(missing, self.total, self.batch_size) - bar.n))
            if not missing:
                return
            if (ended := self.liveness.ended()) is not None:
                raise PeerFailed(f"{ended}; the batches finished are kept in {self.folder}: run the same command "
                                 f"again to compute the rest")
            time.sleep(PARTS_POLL_S)

    def remove(self) -> None:
        remove_locked_folder(self.folder)  # held by the main process, the one that removes it


def announce(parts: BatchParts | None, total: int, batch_size: int, dist: DistInfo) -> None:
    """The items already in OUT.parts/, if any, and how the processes share the others."""
    if not dist.is_main:
        return
    pending = list(range(math.ceil(total / batch_size))) if parts is None else parts.pending
    left = items_in(pending, total, batch_size)
    if parts is not None and len(pending) < parts.batches:
        print(f"{total - left} of {total} items already in {parts.folder}; "
              f"{f'computing the other {left}' if left else 'nothing left to compute'}")
    if dist.world_size > 1 and left:
        print(f"{batches(len(pending))} of {batch_size} on {dist.world_size} processes, taken in turn")


@contextlib.contextmanager
def unused_parts_removed(parts: BatchParts | None, dist: DistInfo):
    """An error (a bad image, a colour one for a gray model) before the first result leaves no OUT.parts/
    holding settings.json alone."""
    try:
        yield
    except Exception as err:
        if parts is not None and not dist.is_main:  # for the main process, which waits for this one's batches
            parts.failed(dist.rank, err)
        if parts is not None and dist.is_main and os.path.isdir(parts.folder) \
                and set(os.listdir(parts.folder)) <= {"settings.json", FolderLock.NAME}:
            parts.remove()
        raise


def stopped_word(parts: BatchParts | None, interrupted: KeyboardInterrupt | None, dist: DistInfo) -> None:
    """A process other than the main one, stopped before its batches were done: word for the main one,
    which waits for them (a stop signal may reach one node's processes only)."""
    if parts is not None and interrupted is not None and not dist.is_main:
        parts.failed(dist.rank, interrupted)


def kept_in_place_of_main(parts: BatchParts | None, interrupted: KeyboardInterrupt | None, total: int,
                          dist: DistInfo) -> int:
    """A process other than the main one, stopped where the main one was killed (torchrun stops the others
    once one has ended) and that says so in its place (speaks_for): the items whose results are kept in
    OUT.parts/, said as the main one says them; else 0 (the main one says it)."""
    if parts is None or interrupted is None or not speaks_for(dist):
        return 0
    return say_kept(parts, sum(len(r) for r in parts.read()), total)


def say_kept(parts: BatchParts, count: int, total: int) -> int:
    """The line on the `count` items whose results a stopped job keeps in OUT.parts/ (none: no line); all
    of them there (a stop after the last batch), the rerun only writes OUT."""
    if count:
        then = f"write {parts.folder.removesuffix('.parts')}" if count >= total else "compute the rest"
        print(f"the results of {count} of {total} items are kept in {parts.folder}: run the same command again "
              f"to {then}")
    return count


def read_bpd(path: str) -> tuple[dict | None, np.ndarray]:
    with np.load(path) as archive:
        recorded = json.loads(str(archive["settings"])) if "settings" in archive else None
        return recorded, np.asarray(archive["bpd"], dtype=np.float64)


def write_bpd(path: str, bpd: np.ndarray, settings: dict) -> None:
    text = json.dumps(settings, sort_keys=True)
    atomic_write(path, lambda f: np.savez(f, bpd=bpd, settings=np.array(text)))


def finished_bpd(out: str, settings: dict, flags: dict[str, str] | None = None) -> np.ndarray | None:
    """The per-item bpd in --out when it holds a finished run of these settings; None when it does not
    exist. Any other file there is refused (it is not overwritten), naming the settings that differ by
    their `flags` (setting_flags)."""
    if not os.path.exists(out):
        return None
    try:
        recorded, bpd = read_bpd(out)
    except Exception as err:  # noqa: BLE001 -- np.load raises many types for bad files
        # its own words suggest loading it unsafely: only a failure to read the file is said
        reason = f" ({err.strerror})" if isinstance(err, OSError) and err.strerror else ""
        raise UserError(f"--out {out} exists and cannot be read as the results of a likelihood run{reason}: "
                        f"pass another --out, or delete it") from None
    if not isinstance(recorded, dict) or recorded.get("items") != len(bpd):
        raise UserError(f"--out {out} exists and records no settings of a finished likelihood run: pass another "
                        f"--out, or delete it")
    differ = settings_differences(recorded, settings, flags=flags)
    if differ:
        raise UserError(f"--out {out} holds the results of a run with other settings ({differ}): pass another "
                        f"--out, or delete it to start over")
    return bpd


def bpd_summary(bpd: np.ndarray, of: str) -> str:
    if len(bpd) > 1:  # with the standard error of the mean
        return f"bpd {bpd.mean():.4f} +- {bpd.std(ddof=1) / math.sqrt(len(bpd)):.4f} over {of}"
    return f"bpd {bpd[0]:.4f} of {of}"


def likelihood_out(args: argparse.Namespace) -> str | None:
    """--likelihood's --out, with the extension .npz that np.savez gives it (None: no --out)."""
    return None if args.out is None else args.out if args.out.lower().endswith(".npz") else f"{args.out}.npz"


def run_likelihood(setup: Setup) -> np.ndarray:
    """Bits per dimension of --data under the model (probability-flow ODE, data -> noise).

    With --out, the per-batch results are kept in OUT.parts/ as they come (BatchParts), the batches
    are shared by the processes under torchrun, and the same command resumes with the batches left:
    the Hutchinson probes depend on (--seed, the batch index and the batch size), so the results are
    those of an uninterrupted run with the same flags (--compile or --cuda-graphs, not among the
    settings compared, fill a short last batch (fill_to): on CUDA its items then draw other probes,
    another estimate as good). A finished --out is read, not recomputed. Returns the bpd (on the
    main process; the other processes return an empty array)."""
    args, dist = setup.args, setup.dist
    out = likelihood_out(args)
    x, offset, space = job_data(setup)
    labels = data_labels(setup, len(x))
    dims = math.prod(setup.latent_shape)
    settings = None if out is None else data_job_settings(setup, x)
    detail = f"{space}{dequantization_note(offset)}; D = {dims}; {args.sampling_method}"
    finished = None if out is None else on_main(lambda: finished_bpd(out, settings, setting_flags(args)), dist)
    if finished is not None:
        if dist.is_main:
            remove_stale_parts(out)
            print(f"{bpd_summary(finished, f'{len(finished)} items')} ({detail}; all {len(finished)} from {out}, "
                  f"nothing left to compute)")
        return finished if dist.is_main else np.zeros(0)
    parts = None if out is None else BatchParts(out, settings, len(x), args.batch_size, dist, setup)
    announce(parts, len(x), args.batch_size, dist)
    pending = list(range(math.ceil(len(x) / args.batch_size))) if parts is None else parts.pending
    with unused_parts_removed(parts, dist):
        check_items(x, pending[dist.rank::dist.world_size], args.batch_size)

    def step(index: int, first: int) -> torch.Tensor:
        batch = x[first: first + args.batch_size]
        items, size = len(batch), fill_to(args, len(x))
        batch = filled(batch, size).to(setup.device)
        y = filled(labels[first: first + args.batch_size], size).to(setup.device)
        torch.manual_seed(derived_seed(args.seed, index, args.batch_size))  # Hutchinson probes

        def model_fn(x_t, t):
            return setup.forwards.conditional(x_t, t, y)

        with torch.no_grad():
            logp, _ = setup.sample_fn(batch, model_fn)
        bpd = (-logp[:items] / (dims * math.log(2)) + offset).double().cpu()  # bpd = -log p(x) / (D ln 2) (+ 7)
        if not bool(bpd.isfinite().all()):  # saved, NaN would be read back as finished; a resume draws the same probes
            Setup.check_finite(bpd, first, "the likelihood ODE diverged: the bpd of {} came out NaN or inf",
                               f"{setup.divergence_advice()} (the same settings diverge again)", noun="item")
        return bpd if parts is None else parts.write(index, bpd)

    new, interrupted, elapsed = data_job_batches("likelihood", setup, len(x), step, pending, parts)
    if not dist.is_main:
        return np.zeros(0)
    results = new if parts is None else parts.read(every=interrupted is None)
    bpd = torch.cat(results).numpy() if results else np.zeros(0)
    if len(bpd):
        if interrupted is None:
            of = f"{len(bpd)} items" if len(bpd) > 1 else "1 item"
        else:  # with --out, those in the folder: a run resumed, or other processes', need not be the first
            of = f"{'the first ' if parts is None else ''}{len(bpd)} of {len(x)} items"
        resumed = parts is not None and len(parts.pending) < parts.batches and interrupted is None
        computed = f" for the {items_in(parts.pending, len(x), args.batch_size)} computed now" if resumed else ""
        print(f"{bpd_summary(bpd, of)} ({detail}, {elapsed:.1f} s{computed})")
    if parts is not None:
        if interrupted is None:
            try:
                write_bpd(out, bpd, settings)
            except OSError as err:  # every batch is in OUT.parts/: only OUT is left to write
                raise write_failed(out, err, parts.kept(), "run the same command again to finish") from None
            parts.remove()
            print(f"saved per-item bpd to {out}")
        else:
            say_kept(parts, len(bpd), len(x))
    exit_if_interrupted(interrupted, len(bpd), len(x), dist)
    return bpd


def remove_stale_parts(out: str) -> None:
    """OUT.parts/ beside a finished OUT (a stop between writing OUT and removing the folder): nothing
    reads it again, so it goes, unless a job holds it now."""
    folder = f"{out}.parts"
    if not os.path.isdir(folder):
        return
    try:
        with FolderLock(folder, "--out") as lock:
            lock.acquire()
            remove_locked_folder(folder)
    except UserError:  # another job's, or a folder that cannot be written: left as it is
        pass


def dequantization_note(offset: float) -> str:
    """The bits a uniform dequantization of L levels into [-1, 1] adds to the bpd, log2(L / 2), and its
    Jacobian 2 / L: " (+7 bits: the 1/128 Jacobian)" for 8-bit pixels; "" for continuous data."""
    if not offset:
        return ""
    return f" (+{offset:.3g} bits: the {Fraction(2, round(2 ** (offset + 1)))} Jacobian)"


def check_not_written(out: str) -> None:
    """--reverse's OUT is a plain tensor that records no settings: one there before a run (the run
    before this one's, or another's) is not overwritten. With OUT.parts/ beside it, it is this run's,
    written just before a stop."""
    if os.path.exists(out) and not os.path.isdir(f"{out}.parts"):
        raise UserError(f"--out {out} exists (an earlier --reverse's noise?): --reverse does not overwrite it; "
                        f"pass another --out, or delete it")


def run_reverse(setup: Setup) -> str:
    """--data carried to noise by the ODE (t from 1 to 0) and saved as a .pt tensor.

    The per-batch noise is kept in OUT.parts/ as it comes (BatchParts), the batches are shared by the
    processes under torchrun, and the same command resumes with the batches left."""
    args, dist = setup.args, setup.dist
    out = args.out or DEFAULT_OUT["reverse"]
    x, _, space = job_data(setup)
    labels = data_labels(setup, len(x))
    on_main(lambda: check_not_written(out), dist)
    parts = BatchParts(out, data_job_settings(setup, x), len(x), args.batch_size, dist, setup)
    announce(parts, len(x), args.batch_size, dist)
    with unused_parts_removed(parts, dist):
        check_items(x, parts.pending[dist.rank::dist.world_size], args.batch_size)

    def step(index: int, first: int) -> torch.Tensor:
        batch, size = x[first: first + args.batch_size], fill_to(args, len(x))
        noise = setup.sample(filled(batch, size), filled(labels[first: first + args.batch_size], size),
                             derived_seed(args.seed, first))[:len(batch)].cpu()
        if len(batch) < size:  # on the CPU a view of the filled batch: saved, it would take all of it
            noise = noise.clone()
        setup.check_finite(noise, first, "the ODE diverged: the noise of {} came out NaN or inf",
                           f"{setup.divergence_advice()} (the same settings diverge again)", noun="item")
        return parts.write(index, noise)

    _, interrupted, elapsed = data_job_batches("reverse", setup, len(x), step, parts.pending, parts)
    if not dist.is_main:
        return out
    if interrupted is not None:
        exit_if_interrupted(interrupted, say_kept(parts, sum(len(r) for r in parts.read()), len(x)), len(x), dist)
    noise = torch.cat(parts.read(every=True))
    try:
        atomic_torch_save(noise, out)  # a full disk is the OSError (torch.save's own writer hides it)
    except OSError as err:  # every batch is in OUT.parts/: only OUT is left to write
        raise write_failed(out, err, parts.kept(), "run the same command again to finish") from None
    resumed = len(parts.pending) < parts.batches
    computed = f" for the {items_in(parts.pending, len(x), args.batch_size)} computed now" if resumed else ""
    parts.remove()
    print(f"encoded {len(noise)} items ({space}) to noise of mean {noise.mean():.3f}, std {noise.std():.3f} -> {out} "
          f"({elapsed:.1f} s{computed})")
    return out


#################################################################################
#                                      main                                      #
#################################################################################

def mode_first(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """The sampler leads, as upstream has it (`sample.py ODE --ckpt ...`); `ode` and `sde` are taken
    for ODE and SDE, and flags before any sampler are refused saying so, not as an invalid choice."""
    if argv and argv[0].upper() in MODES:
        return [argv[0].upper(), *argv[1:]]
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        given = sampler_among_flags(argv, parser)
        rest = [arg for i, arg in enumerate(argv) if i != given]
        mode = "ODE" if given is None else argv[given].upper()
        prog = parser.prog
        raise UserError(f"the sampler comes first: {prog} ODE|SDE [flags], e.g. {prog} {mode} {' '.join(rest)} "
                        f"(see {prog} --help)")
    return argv


def sampler_among_flags(argv: list[str], parser: argparse.ArgumentParser) -> int | None:
    """Where ODE or SDE stands in `argv` as a word of its own, not as a flag's value (--sample-dir
    sde): each flag's values are stepped over, as many as it takes (none for --use-raw)."""
    subparsers = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    options = {flag: action for sub in subparsers.choices.values()
               for flag, action in sub._option_string_actions.items()}
    i = 0
    while i < len(argv):
        if argv[i].upper() in MODES:
            return i
        action = options.get(argv[i])  # --flag=value, and flags of neither sampler, take no more words
        i += 1
        if action is None or action.nargs == 0:
            continue
        if isinstance(action.nargs, int) or action.nargs is None:
            i += action.nargs or 1
        else:  # "?", "*", "+": the words up to the next flag (a negative number is a value)
            while (i < len(argv) and argv[i].upper() not in MODES
                   and (not argv[i].startswith("-") or is_number(argv[i]))):
                i += 1
    return None


def is_number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True


@cli_entry
def main(argv: list[str] | None = None, defaults: dict | None = None, prog: str | None = None):
    parser = build_parser(defaults, prog)
    args = parser.parse_args(mode_first(list(sys.argv[1:] if argv is None else argv), parser))
    args.prog = prog
    args = resolve_args(args)
    dist = init_distributed()
    with stop_signals_raise():  # to the end: a stop signal sent again while the process group is left is dropped
        try:
            start_resource_tracker()
            return run_job(args, dist)
        finally:
            FolderLock.release_all()  # the folders a job held (the FID job's, OUT.parts/) and its --out: another
            _taken.clear()  # job may take them now
            cleanup()


def run_job(args: argparse.Namespace, dist: DistInfo):
    log_warnings_on_stderr(dist.is_main)
    if dist.world_size > 1 and args.job == "grid":
        raise UserError("a grid is sampled by one process: run it with python (torchrun runs --num-fid-samples, "
                        "--likelihood --out and --reverse)")
    if dist.world_size > 1 and args.job == "likelihood" and args.out is None:
        raise UserError("under torchrun, --likelihood needs --out FILE.npz: the processes' results meet in "
                        "FILE.npz.parts/")
    try:
        lock_outputs(args, dist)
        setup = Setup(args, dist)
        job = {"grid": run_grid, "fid": run_fid, "likelihood": run_likelihood, "reverse": run_reverse}[args.job]
        try:
            return job(setup)
        except OSError as err:  # a write refused that its job does not name (settings.json's record brought up
            if err.errno not in WRITE_REFUSED:  # to date, say): an error of another kind may be a read's
                raise
            out = output_file(args)
            kept = ("" if args.job == "grid" or (args.job != "fid" and out is None)
                    else batches_kept(f"{out}.parts") if args.job != "fid"
                    else written_kept(images_in(fid_folder(args, setup.info["model"])), "image"))
            again = "run it again" if args.job == "grid" else "run the same command again to finish"
            raise write_failed(err.filename or out or args.sample_dir, err, kept, again) from None
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 -- out of memory only (also wrapped by torch.compile), or a peer's end
        if is_out_of_memory(err):  # in a job, or in its setup (the model moved to the GPU, CUDA graphs captured)
            raise UserError(allocation_past_device(err, dist.device, size_flags(args))
                            or out_of_memory_advice(args, dist.device, memory_kind(err))) from None
        if isinstance(err, StepSizeUnderflow):  # tolerances the state's precision cannot meet: the flags' to change
            raise UserError(step_size_underflow_words(err)) from None
        if dist.world_size == 1 or not isinstance(err, RuntimeError) or not peer_ended(err):  # gloo's word at a
            raise  # collective that a process (failed in its setup, say) ended
        raise peer_failed(err) from None
    except KeyboardInterrupt as err:  # before a job's own loop (which keeps its results), or in a grid
        winding_down(f"interrupted again, stopping at once{': no grid written' if args.job == 'grid' else ''}")
        if (said := stop_words(err, dist)) is not None:  # rank 0, or one in its place
            print(f"\n{said}", file=sys.stderr)
        raise SystemExit(exit_status(err)) from None


def step_size_underflow_words(err: StepSizeUnderflow) -> str:
    """The adaptive solver's message with its method and tolerances named as the flags that set them."""
    message = str(err).replace(f"{err.method}: ", f"--sampling-method {err.method}: ", 1)
    tolerances = f"atol {err.atol:g} / rtol {err.rtol:g}"
    message = message.replace(tolerances, tolerances.replace("atol", "--atol").replace("rtol", "--rtol"), 1)
    return message.replace("a fixed-step method (euler, heun)", "a fixed-step --sampling-method (euler, heun)")


def images_per_batch(args: argparse.Namespace) -> int:
    """Images per batch: --batch-size, or the whole grid of --class-labels (upstream's by default)."""
    return args.batch_size or len(args.class_labels or UPSTREAM_CLASS_LABELS)


def size_flags(args: argparse.Namespace) -> str:
    """The flags that set how much a sampling run allocates, with their values."""
    image = f", --image-size {args.image_size}" if args.image_size is not None else ""
    return f"--num-sampling-steps {args.num_sampling_steps}, {batch_flag(args)} {images_per_batch(args)}{image}"


def out_of_memory_advice(args: argparse.Namespace, device: torch.device, memory: str = "GPU memory") -> str:
    """What ran out of `memory` ("GPU memory", or the CPU's "memory"), and the flags that make it fit
    (those not in use already)."""
    batch = images_per_batch(args)
    fixes = [f"{batch_flag(args)} {max(1, batch // 2)}" if batch > 1 else None,
             "--precision bf16" if args.precision != "bf16" else None,
             "--vae-precision bf16" if args.vae != "none" and args.vae_precision != "bf16" else None]
    fixes = [f for f in fixes if f]
    folder = "a new folder" if args.run_folder else "another --sample-dir"
    why = ("it fixes the SDE's noise" if args.mode == "SDE" else "it changes results in the last bits"
           if not adaptive_ode_method(args.sampling_method) else "it steers the adaptive solver's steps")
    kept = (f" (the images written so far stay; another batch size samples into {folder}, since {why})"
            if args.job == "fid" else "")
    guided = " (guidance doubles the batch the model sees)" if args.cfg_scale != 1 else ""
    return (f"out of {memory} on {device} sampling batches of {batch}{guided}: "
            f"{'try ' + ', '.join(fixes) if fixes else 'this model does not fit this GPU at batch size 1'}{kept}")


if __name__ == "__main__":
    main()
