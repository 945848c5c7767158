"""train.py's command line: upstream SiT's flags and defaults, plus the performance and resume options."""
from __future__ import annotations

import argparse
import os
import sys

from sit_fast.argtypes import (
    OneLineArgumentParser, default_workers, finite_float, fraction, nonnegative_int, or_none, positive_float,
    positive_int, random_seed, user_path,
)
from sit_fast.data import DATASETS
from sit_fast.errors import UserError
from sit_fast.models import SiT_models
from sit_fast.transport import add_transport_args

# Arguments that define the model and the training objective: a resumed run must keep them.
IDENTITY_KEYS = ("model", "image_size", "num_classes", "in_channels", "path_type", "prediction", "loss_weight",
                 "train_eps")
# Identity arguments for which None is a setting (no loss weighting), not a value left unresolved.
# train_eps None, in the checkpoints of runs that began with train_eps_of_a_new_run's defaults not yet
# resolved: create_transport's default for the path, which those runs trained with and keep.
NONE_IS_A_VALUE = ("loss_weight", "train_eps")
# Arguments that are never taken from a checkpoint.
NOT_INHERITED = ("resume", "exp_dir", "ckpt", "use_raw", "no_progress", "num_workers")


def command_name() -> str:
    """How this process was started, for --help and the errors: train.py, or the package's __main__
    (`python -m sit_fast.training`, which a non-editable install has in place of train.py)."""
    if os.path.normpath(sys.argv[0]).endswith(os.path.join("sit_fast", "training", "__main__.py")):
        return "python -m sit_fast.training"
    return "train.py"


def build_parser() -> argparse.ArgumentParser:
    prog = command_name()
    alone = prog if prog.startswith("python ") else f"python {prog}"
    parser = OneLineArgumentParser(
        prog=prog, description=f"Train SiT with DDP (torchrun) or in one process ({alone}).", allow_abbrev=False)

    data = parser.add_argument_group("Data")
    data.add_argument("--data-path", type=user_path, default=None,
                      help="ImageFolder root (DIR/<class>/<image>), for --dataset imagefolder")
    data.add_argument("--dataset", choices=DATASETS, default="imagefolder",
                      help="imagefolder: --data-path; digits: scikit-learn's bundled 8x8 digits (no download)")
    data.add_argument("--latent-cache", type=or_none(user_path), default=None,
                      help="train from a latent cache made by python -m sit_fast.latent_cache (no VAE in the loop; "
                           "none: the images, where a resumed run had a cache)")
    data.add_argument("--image-size", type=positive_int, default=256,
                      help="image size in pixels (latent size = image size / 8 with a VAE); "
                           "--dataset digits: 8 unless given")
    data.add_argument("--num-classes", type=positive_int, default=None,
                      help="class labels of the model (default: the dataset's class count)")
    data.add_argument("--vae", type=user_path, default="ema",
                      help="VAE: ema, mse (stabilityai/sd-vae-ft-*), a hub id, a local directory, or none "
                           "for pixel-space training; --dataset digits (grayscale): none unless given")
    data.add_argument("--vae-precision", choices=["fp32", "bf16"], default="fp32",
                      help="VAE arithmetic: fp32 (as upstream) or bf16 autocast, for encoding each batch and "
                           "decoding sample grids (python -m sit_fast.latent_cache has the same option)")
    data.add_argument("--in-channels", type=positive_int, default=None,
                      help="model input channels (default: the VAE's latent channels, or the image channels "
                           "with --vae none); must agree with the data (with --vae none, 1 reads an image folder "
                           "as gray)")
    data.add_argument("--num-workers", type=nonnegative_int, default=default_workers(),
                      help="data loader worker processes per rank (default: 4, or the CPUs usable if fewer)")

    model = parser.add_argument_group("Model")
    model.add_argument("--model", type=str, choices=list(SiT_models), default="SiT-XL/2", help="model size / patch")
    model.add_argument("--attn-backend", choices=["auto", "math", "sdpa", "flash_attn"], default="auto",
                       help="attention implementation (auto: the fastest that runs here)")
    model.add_argument("--fused-kernels", choices=["auto", "on", "off"], default="auto",
                       help="fused Triton adaLN kernels (auto: on for CUDA, off on the CPU, where `on` runs them "
                            "through the Triton interpreter, with TRITON_INTERPRET=1 set: very slow, for tests)")
    model.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=False,
                       help="recompute each block in the backward pass to save activation memory")
    model.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                       help="torch.compile the model")
    model.add_argument("--ckpt", type=user_path, default=None,
                       help="start from these weights (upstream release file, train.py checkpoint or "
                            ".safetensors; EMA weights preferred; learn_sigma as in them) at step 0; use --resume "
                            "to continue a run. The release by name, SiT-XL-2-256x256.pt, is taken from "
                            "./pretrained_models, else $SIT_FAST_CACHE (~/.cache/sit_fast), else downloaded there")
    model.add_argument("--use-raw", action="store_true",
                       help="with --ckpt, a train.py checkpoint's raw weights instead of its EMA weights")

    optim = parser.add_argument_group("Optimisation")
    optim.add_argument("--epochs", type=positive_int, default=1400, help="epochs to train (upper bound)")
    optim.add_argument("--max-steps", type=or_none(positive_int), default=None,
                       help="stop after this many optimizer steps in total (counted from step 0; none: when "
                            "--epochs end)")
    optim.add_argument("--global-batch-size", type=positive_int, default=256, help="batch size summed over ranks")
    optim.add_argument("--grad-accum-steps", "--gradient-accumulation-steps", dest="grad_accum_steps",
                       type=positive_int, default=1,
                       help="split each rank's batch into this many micro-batches, run one at a time, and "
                            "take one optimizer step on their summed gradients: the same global batch in "
                            "less memory (the data order is that of one pass)")
    optim.add_argument("--global-seed", "--seed", dest="global_seed", type=random_seed, default=0,
                       help="seed; rank r uses global_seed * world_size + r")
    optim.add_argument("--lr", type=positive_float, default=1e-4, help="AdamW learning rate (constant, as upstream)")
    optim.add_argument("--ema-decay", type=fraction, default=0.9999, help="EMA decay per step, in [0, 1]")
    optim.add_argument("--grad-clip", type=or_none(positive_float), default=None,
                       help="clip the global gradient norm to this value (none: no clipping)")
    optim.add_argument("--precision", choices=["auto", "fp32", "tf32", "bf16"], default="auto",
                       help="fp32; tf32 matmuls (upstream's setting); bf16 autocast with fp32 master weights "
                            "(auto: bf16 on CUDA, fp32 on the CPU)")
    optim.add_argument("--skip-nonfinite", action=argparse.BooleanOptionalAction, default=False,
                       help="skip steps whose gradients are not finite and count them, instead of stopping "
                            "(on CUDA on the device, by fused AdamW; on the CPU one host read per step); the run "
                            "stops at the log line that ends 100 or more skipped steps in a row (whole "
                            "--log-every windows of skipped steps)")

    run = parser.add_argument_group("Logging, sampling and checkpoints")
    run.add_argument("--results-dir", type=user_path, default="results", help="parent of the experiment directories")
    run.add_argument("--exp-dir", type=user_path, default=None,
                     help="experiment directory to use as is (default: RESULTS_DIR/NNN-<model>-<transport>); "
                          "one holding checkpoints is continued with --resume, never overwritten by another run")
    run.add_argument("--resume", type=user_path, default=None,
                     help="PATH (a checkpoint or an experiment directory) or auto (the latest valid checkpoint "
                          "of --exp-dir, or of the newest run in --results-dir of this --model and transport whose "
                          "--dataset, --global-batch-size, --global-seed, --lr, --ema-decay and --grad-clip are "
                          "those given; a new run if there is none)")
    run.add_argument("--log-every", type=positive_int, default=100, help="steps between log lines")
    run.add_argument("--ckpt-every", type=positive_int, default=50_000, help="steps between checkpoints")
    run.add_argument("--ckpt-keep", type=or_none(positive_int), default=None,
                     help="keep the newest N checkpoints of the run: each older one is deleted once a newer "
                          "checkpoint is written whole (none: keep them all, as upstream)")
    run.add_argument("--ckpt-keep-every", type=or_none(positive_int), default=None,
                     help="with --ckpt-keep, keep the checkpoints at the multiples of this step too (milestones, "
                          "e.g. for FID; none: only the newest)")
    run.add_argument("--sample-every", type=or_none(positive_int), default=10_000,
                     help="steps between EMA sample grids (none: no grids)")
    run.add_argument("--cfg-scale", type=finite_float, default=4.0,
                     help="classifier-free guidance of the sample grids (1: unguided; below 1 guides, as in sample.py)")
    run.add_argument("--sample-method", choices=["euler", "heun"], default="heun",
                     help="fixed-step ODE solver of the sample grids")
    run.add_argument("--sample-steps", type=positive_int, default=16, help="ODE steps of the sample grids")
    run.add_argument("--num-sample-images", type=positive_int, default=16, help="images in a sample grid")
    run.add_argument("--wandb", action=argparse.BooleanOptionalAction, default=False,
                     help="log to Weights & Biases (entity and project from $ENTITY / $PROJECT, as upstream)")
    run.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=False,
                     help="write TensorBoard scalars to EXP_DIR/tensorboard")
    run.add_argument("--no-progress", action="store_true",
                     help="no tqdm progress bar (there is none when stderr is not a terminal: "
                          "the log lines show progress)")

    add_transport_args(parser, train_eps_default=None, train_eps_help=(
        "1e-5, as upstream's train.py; velocity models on Linear and GVP train on all of [0, 1] (0)"))
    return parser


def train_eps_of_a_new_run(path_type: str, prediction: str) -> float:
    """--train-eps when not given, upstream train.py's: its flag's 1e-5, which upstream's create_transport
    replaces by 0 for velocity models on the Linear and GVP paths (their loss is finite on all of [0, 1])."""
    return 0.0 if path_type in ("Linear", "GVP") and prediction == "velocity" else 1e-5


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, set[str]]:
    """(args, names of the arguments given explicitly on the command line)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.use_raw and args.ckpt is None:
        parser.error("--use-raw picks the raw weights of --ckpt's checkpoint: pass --ckpt too")
    shadow = build_parser()
    for action in shadow._actions:
        action.default = argparse.SUPPRESS
    explicit = set(vars(shadow.parse_args(argv)))
    return args, explicit


def merge_resumed_args(args: argparse.Namespace, explicit: set[str], saved: dict, source: str) -> argparse.Namespace:
    """The checkpoint's arguments, overridden by those given now; a changed model or transport is refused."""
    for key in IDENTITY_KEYS:
        known = saved.get(key) is not None or key in NONE_IS_A_VALUE  # None elsewhere: not recorded
        if key in explicit and key in saved and known and getattr(args, key) != saved[key]:
            was = "not given: the path's default" if key == "train_eps" and saved[key] is None else saved[key]
            raise UserError(
                f"--{key.replace('_', '-')} {getattr(args, key)} differs from the run being resumed "
                f"({source}: {was}); a resumed run keeps its model and transport: start a new run "
                f"(without --resume, or with --ckpt to start from its weights)"
            )
    merged = dict(vars(args))
    for key, value in saved.items():
        if key in merged and key not in explicit and key not in NOT_INHERITED:
            merged[key] = value
    return argparse.Namespace(**merged)
