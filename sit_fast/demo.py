"""`make demo`: train a small SiT on scikit-learn's bundled 8x8 digits with DDP, then check it learned.

    python -m sit_fast.demo            # CPU: 2 processes (torchrun, gloo); GPU: one process per GPU (up to 2)

1. torchrun train.py --dataset digits --vae none ... (pixel space: 1x8x8 images, no download).
2. From the final EMA weights, 500 class-conditional digits (50 per class) with an ODE sampler and
   500 with an SDE sampler, saved as PNG grids (one row per class).
3. A classifier fitted on the real digits (scikit-learn SVC on the 64 pixels) labels the generated
   ones; the demo prints, per sampler, the share it assigns to the requested class, and fails
   (exit 1) if that share is below --min-accuracy.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from sit_fast.errors import quiet_ctrl_c_while_loading

quiet_ctrl_c_while_loading(__name__)  # python -m: a Ctrl-C while torch loads ends it, quietly

import torch

from sit_fast.errors import UserError, cli_entry
from sit_fast.files import WRITE_REFUSED, atomic_write, is_inside, make_folder, write_failed

# What a training run writes into its folder: the demo starts afresh over a folder holding these alone
RUN_ENTRIES = {"log.txt", "experiment.json", "checkpoints", "samples", "tensorboard", ".lock"}


def build_parser() -> argparse.ArgumentParser:
    from sit_fast.argtypes import (
        OneLineArgumentParser, doc_paragraph, finite_float, fraction, user_path, positive_float, positive_int,
        random_seed,
    )
    from sit_fast.models import SiT_models

    parser = OneLineArgumentParser(prog="python -m sit_fast.demo", description=doc_paragraph(__doc__))
    parser.add_argument("--out", type=user_path, default="demo_out",
                        help="output directory (its training run is started afresh)")
    parser.add_argument("--model", default="SiT-T/4", choices=list(SiT_models), metavar="MODEL",
                        help="model of the registry (8x8 images: /1, /2, /4 or /8)")
    parser.add_argument("--steps", type=positive_int, default=600, help="training steps")
    parser.add_argument("--global-batch-size", type=positive_int, default=256, help="batch size summed over processes")
    parser.add_argument("--lr", type=positive_float, default=1e-3, help="AdamW learning rate")
    parser.add_argument("--ema-decay", type=fraction, default=0.995,
                        help="EMA decay per step (short run: short memory)")
    parser.add_argument("--nproc", type=positive_int, default=None,
                        help="training processes (default: 2 on the CPU, min(2, GPUs) with CUDA)")
    parser.add_argument("--num-samples", type=positive_int, default=500,
                        help="generated digits per sampler (a multiple of 10)")
    parser.add_argument("--cfg-scale", type=finite_float, default=2.0,
                        help="classifier-free guidance scale when sampling")
    parser.add_argument("--ode-steps", type=positive_int, default=16, help="Heun steps of the ODE sampler")
    parser.add_argument("--sde-steps", type=positive_int, default=50, help="Euler-Maruyama steps of the SDE sampler")
    parser.add_argument("--min-accuracy", type=fraction, default=0.8, help="fail below this share of correct digits")
    parser.add_argument("--seed", type=random_seed, default=0, help="seed of training and sampling")
    parser.add_argument("--skip-training", action="store_true", help="evaluate the run already in OUT")
    return parser


def train(args: argparse.Namespace, exp_dir: str) -> None:
    entry = ["-m", "sit_fast.training"]  # train.py's main, whatever train.py sits beside the package
    on_cuda = torch.cuda.is_available()
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}", *entry,
        "--dataset", "digits", "--image-size", "8", "--vae", "none", "--model", args.model,
        "--max-steps", str(args.steps), "--global-batch-size", str(args.global_batch_size),
        "--lr", str(args.lr), "--ema-decay", str(args.ema_decay), "--global-seed", str(args.seed),
        "--num-workers", "0", "--log-every", str(max(1, args.steps // 10)), "--ckpt-every", str(args.steps),
        "--sample-every", str(args.steps), "--num-sample-images", "100", "--cfg-scale", str(args.cfg_scale),
        "--fused-kernels", "auto" if on_cuda else "off", "--exp-dir", exp_dir,
    ]
    print("$ torchrun " + " ".join(command[3:]), flush=True)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // args.nproc)))
    if not on_cuda:
        env.pop("TRITON_INTERPRET", None)
    # torchrun's per-run folder (its workers' error files) in one removed afterwards, not left in /tmp
    with tempfile.TemporaryDirectory(prefix="sit_fast_demo_torchrun_") as log_dir:
        result = subprocess.run(command[:3] + ["--log-dir", log_dir] + command[3:], env=env)
    if result.returncode != 0:
        log = os.path.join(exp_dir, "log.txt")
        raise UserError(f"training failed with exit status {result.returncode} (see the log above"
                        f"{' and ' + log if os.path.isfile(log) else ''})")


def digit_classifier():
    """An SVC on the 64 pixels (0..16) of three quarters of the real digits, and its accuracy on the
    quarter it never saw: the classifier that judges the samples is the one whose accuracy is printed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.svm import SVC

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(digits.data, digits.target, test_size=0.25, random_state=0)
    classifier = SVC(gamma=0.001).fit(x_train, y_train)
    return classifier, classifier.score(x_test, y_test)


@torch.no_grad()
def evaluate(args: argparse.Namespace, checkpoint: str) -> dict:
    from sit_fast.checkpoint import load_checkpoint, read_checkpoint
    from sit_fast.images import save_image_grid
    from sit_fast.models import SiT_models
    from sit_fast.transport import Sampler, create_transport

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _, info = read_checkpoint(checkpoint, prefer="ema")
    saved = info["args"]
    model = SiT_models[saved["model"]](input_size=saved["image_size"], in_channels=saved["in_channels"],
                                       num_classes=saved["num_classes"], learn_sigma=True, attn_backend="auto",
                                       fused_kernels="auto" if device.type == "cuda" else False)
    load_checkpoint(model, checkpoint, prefer="ema")
    model = model.to(device).eval()
    transport = create_transport(saved["path_type"], saved["prediction"], saved["loss_weight"], saved["train_eps"],
                                 saved["sample_eps"])
    sampler = Sampler(transport)
    samplers = {
        "ODE": sampler.sample_ode(sampling_method="heun", num_steps=args.ode_steps),
        "SDE": sampler.sample_sde(sampling_method="Euler", num_steps=args.sde_steps),
    }
    classifier, held_out = digit_classifier()
    per_class = args.num_samples // 10
    labels = torch.arange(10).repeat_interleave(per_class).to(device)  # (N,)
    n = labels.numel()
    null = torch.full_like(labels, saved["num_classes"])

    def model_fn(x, t, y):
        return model.forward_with_cfg(x, t, y, args.cfg_scale, cfg_channels="all")

    results = {"classifier_held_out_accuracy": held_out, "num_samples": n, "cfg_scale": args.cfg_scale}
    for name, sample_fn in samplers.items():
        generator = torch.Generator().manual_seed(args.seed + (0 if name == "ODE" else 1))
        torch.manual_seed(args.seed + 2)  # the SDE's own noise
        z = torch.randn(n, saved["in_channels"], saved["image_size"], saved["image_size"],
                        generator=generator).to(device)
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            samples = sample_fn(torch.cat([z, z]), model_fn, y=torch.cat([labels, null]))[-1][:n].float()
        seconds = time.perf_counter() - started
        images = samples.clamp(-1, 1).cpu()
        pixels = ((images + 1) * 8).reshape(n, -1).numpy()  # [-1, 1] -> the classifier's 0..16
        predicted = classifier.predict(pixels)
        accuracy = float((predicted == labels.cpu().numpy()).mean())
        grid = images.reshape(10, per_class, *images.shape[1:])[:, :10].reshape(-1, *images.shape[1:])
        path = save_image_grid(grid, os.path.join(args.out, f"samples_{name.lower()}.png"), nrow=min(per_class, 10),
                               scale=4)
        results[name] = {"accuracy": accuracy, "seconds": seconds, "grid": path}
        print(f"{name}: {100 * accuracy:.1f}% of {n} generated digits are classified as the requested digit "
              f"({seconds:.1f}s to sample; grid: {path})", flush=True)
    return results


def clear_previous_run(exp_dir: str) -> None:
    """Remove OUT/train, the demo's training run of an earlier call, so that training starts afresh;
    refuse where it holds anything a training run does not write (--out pointed at a dataset, say)."""
    if os.path.islink(exp_dir) or (os.path.exists(exp_dir) and not os.path.isdir(exp_dir)):
        raise UserError(f"--out: {exp_dir}, where the demo trains, is a {'link' if os.path.islink(exp_dir) else 'file'}"
                        f": pass another --out, or remove it")
    if not os.path.isdir(exp_dir):
        return
    foreign = sorted(set(os.listdir(exp_dir)) - RUN_ENTRIES)
    if foreign:
        listed = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise UserError(f"--out: {exp_dir}, where the demo trains afresh, holds what no training run writes ({listed})"
                        f": pass another --out (the demo removes its earlier run there, and would remove these)")
    shutil.rmtree(exp_dir)


@cli_entry
def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.num_samples % 10:
        raise UserError(f"--num-samples {args.num_samples}: give a multiple of 10 (as many digits of each class), "
                        f"e.g. {max(10, args.num_samples // 10 * 10)}")
    if args.sde_steps < 2:
        raise UserError(f"--sde-steps {args.sde_steps}: give 2 or more (the SDE sampler's count includes its last, "
                        f"noise-free step)")
    if args.nproc is None:
        args.nproc = min(2, torch.cuda.device_count()) if torch.cuda.is_available() else 2
    if not args.skip_training and args.global_batch_size % args.nproc:
        fitting = max(args.nproc, args.global_batch_size // args.nproc * args.nproc)
        raise UserError(f"--global-batch-size {args.global_batch_size} is not divisible by --nproc {args.nproc} (the "
                        f"training processes' equal shares): pass --global-batch-size {fitting}, say")
    started = time.perf_counter()
    exp_dir = os.path.join(args.out, "train")
    if not args.skip_training:
        make_folder(args.out, "--out")
        clear_previous_run(exp_dir)
        train(args, exp_dir)
    trained = time.perf_counter()
    from sit_fast.training.checkpointing import list_checkpoints

    checkpoints = list_checkpoints(os.path.join(exp_dir, "checkpoints"))
    if not checkpoints:
        raise UserError(f"no checkpoint in {exp_dir}/checkpoints: run the demo without --skip-training")
    print(f"evaluating {checkpoints[0]}; classifier: SVC on three quarters of the real digits' pixels", flush=True)
    try:  # the grids and results.json (whole or not at all): a full disk is one line, the training kept
        results = evaluate(args, checkpoints[0])
        results.update(train_seconds=trained - started, total_seconds=time.perf_counter() - started)
        text = json.dumps(results, indent=1)
        atomic_write(os.path.join(args.out, "results.json"), lambda f: f.write(text.encode()))
    except OSError as err:  # refused (a full disk), or a write into --out failed (a failing disk's EIO)
        if err.errno not in WRITE_REFUSED and not (err.errno is not None and err.filename is not None
                                                   and is_inside(err.filename, args.out)):
            raise
        raise write_failed(err.filename or args.out, err, "the run trained is kept",
                           "run the demo again with --skip-training to evaluate it") from None
    print(f"classifier accuracy on held-out real digits: {100 * results['classifier_held_out_accuracy']:.1f}%")
    print(f"demo: ODE {100 * results['ODE']['accuracy']:.1f}%, SDE {100 * results['SDE']['accuracy']:.1f}% "
          f"correct digits; training {results['train_seconds']:.0f}s, total {results['total_seconds']:.0f}s")
    worst = min(results["ODE"]["accuracy"], results["SDE"]["accuracy"])
    if worst < args.min_accuracy:
        print(f"demo FAILED: {100 * worst:.1f}% < {100 * args.min_accuracy:.0f}%", file=sys.stderr)
        sys.exit(1)
    return results


if __name__ == "__main__":
    main()
