"""What a checkpoint holds, and its weights alone in a small file to share or to sample from.

    python -m sit_fast.export CKPT                          describe it: format, model, step, latent space
    python -m sit_fast.export CKPT --out ema.pt            the EMA weights as a raw state_dict
    python -m sit_fast.export CKPT --out ema.safetensors   the same as .safetensors, with its model_config
    python -m sit_fast.export CKPT --out w.pt --weights model --dtype bf16
    python -m sit_fast.export CKPT --out ema.pt --force     replace an existing ema.pt

A .pt file is a plain state_dict in the upstream key layout, the format of the upstream release
(`SiT-XL-2-256x256.pt`): upstream's sample.py and ours load it. It records no latent space nor
transport, so sample it with --vae, --path-type and --prediction as trained. A .safetensors file
also carries the checkpoint's model_config (architecture, latent space) and training transport
(path type, prediction) as metadata, which sample.py reads as it reads a train.py checkpoint's. A
train.py checkpoint of SiT-XL/2 (weights, EMA, AdamW moments) is 4x the EMA weights alone, 2.7 GB
in fp32. Files are written atomically.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys

from sit_fast.errors import quiet_ctrl_c_while_loading

quiet_ctrl_c_while_loading(__name__)  # python -m: a Ctrl-C while torch loads ends it, quietly

import torch

from sit_fast.checkpoint import infer_config, read_checkpoint, recorded_model_config, training_transport
from sit_fast.errors import UserError, cli_entry

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EXTENSIONS = (".pt", ".pth", ".safetensors")


def describe(path: str, weights: str = "ema", loaded: tuple[dict, dict] | None = None) -> dict:
    """What `path` holds: {"format", "weights", "step", "model", "config", "model_config", "transport",
    "parameters", "dtypes", "bytes", "not_finite"} (model: the registry name, None for an architecture
    outside it; transport: the training run's transport flags, None where the file records none;
    not_finite: the names of the tensors holding NaN or inf).
    loaded: read_checkpoint(path, prefer=weights)'s result when the caller has it already."""
    from sit_fast.models import registry_name

    state_dict, info = loaded or read_checkpoint(path, prefer=weights)
    config = infer_config(state_dict)
    floats = {k: v for k, v in state_dict.items() if v.is_floating_point()}
    finite = torch.stack([torch.isfinite(v).all() for v in floats.values()]).tolist() if floats else []
    return {
        "format": info["format"], "weights": info["weights"], "step": info["step"],
        "model": registry_name(config["depth"], config["hidden_size"], config["patch_size"]),
        "config": config, "model_config": recorded_model_config(path),
        "transport": training_transport(info["args"]) or None,
        "parameters": sum(v.numel() for v in state_dict.values()),  # the fixed pos_embed too, as upstream counts
        "dtypes": sorted({str(v.dtype).replace("torch.", "") for v in state_dict.values()}),
        "bytes": os.path.getsize(path),
        "not_finite": [k for k, ok in zip(floats, finite) if not ok],  # a diverged run's weights
    }


def check_out(path: str, out: str, force: bool = False) -> None:
    """UserError unless `out` can take the export of `path`: a known extension, not the source itself
    (through links too), not a folder, an existing file only with force, a folder that can be written."""
    extension = os.path.splitext(out)[1].lower()
    if extension not in EXTENSIONS:
        raise UserError(f"--out {out}: give it one of the extensions {', '.join(EXTENSIONS)}")
    if os.path.realpath(out) == os.path.realpath(path):
        raise UserError(f"--out {out} is the checkpoint being read: pass another path")
    if os.path.isdir(out):
        raise UserError(f"--out {out} is a folder: pass a file path")
    if os.path.exists(out) and not force:
        raise UserError(f"--out {out} exists: pass --force to replace it, or another path")
    parent = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as err:
        raise UserError(f"--out {out}: cannot create {parent} ({err.strerror})") from None
    if not os.access(parent, os.W_OK):
        raise UserError(f"--out {out}: {parent} is not writable")


def export_weights(path: str, out: str, weights: str = "ema", dtype: str | None = None, force: bool = False,
                   loaded: tuple[dict, dict] | None = None) -> dict:
    """Write one set of weights of `path` to `out` (.pt: a raw state_dict; .safetensors: with the
    model_config as metadata), cast to `dtype` if given; returns describe(out). loaded: as for describe."""
    from sit_fast.files import atomic_write, refusal

    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    check_out(path, out, force)
    state_dict, info = loaded or read_checkpoint(path, prefer=weights)
    if dtype is not None:  # the fixed sin-cos table stays as it is: small, and exact is what the model was trained with
        state_dict = {k: v.to(DTYPES[dtype]) if v.is_floating_point() and k != "pos_embed" else v
                      for k, v in state_dict.items()}
    state_dict = {k: v.contiguous() for k, v in state_dict.items()}
    if os.path.splitext(out)[1].lower() == ".safetensors":
        from safetensors.torch import save

        metadata = {"format": "pt", "weights": info["weights"]}
        model_config = recorded_model_config(path)
        if model_config is not None:
            metadata["model_config"] = json.dumps(model_config)
        if info["step"] is not None:
            metadata["step"] = str(int(info["step"]))
        transport = training_transport(info["args"])
        if transport:
            metadata["transport"] = json.dumps(transport)
        data = save(state_dict, metadata=metadata)
        write = lambda f: f.write(data)  # noqa: E731
    else:
        buffer = io.BytesIO()
        torch.save(state_dict, buffer)
        write = lambda f: f.write(buffer.getbuffer())  # noqa: E731
    try:
        atomic_write(out, write)
    except OSError as err:
        raise UserError(f"cannot write {out}: {refusal(err)}") from None
    return describe(out)


def weights_note(found: dict, wanted: str, asked: bool = True) -> str | None:
    """A line when the file cannot give the --weights asked for (asked: given on the command line,
    not the default), else None."""
    if found["weights"] == wanted:
        return None
    if found["format"] == "pickle" and found["weights"] == "model":  # a checkpoint dict without an EMA entry
        return "note: it has no EMA weights; these are its model weights"
    if not asked:  # one set of weights, and no --weights asked of it: nothing to say
        return None
    held = "" if found["weights"] == "raw" else f" ({found['weights']})"
    return f"note: it holds one set of weights{held}; --weights {wanted} does not apply"


def summary(path: str, found: dict) -> str:
    """describe()'s dict as a few lines for a person."""
    config = found["config"]
    space = (found["model_config"] or {}).get("latent_space")
    lines = [
        f"{path}: {found['format']} file, {found['bytes'] / 2**20:,.1f} MiB, "
        f"{'a plain state_dict' if found['weights'] == 'raw' else found['weights'] + ' weights'}"
        f"{'' if found['step'] is None else ', step ' + str(found['step'])}",
        f"  model      {found['model'] or 'not in the registry'} (depth {config['depth']}, hidden "
        f"{config['hidden_size']}, patch {config['patch_size']}), {found['parameters'] / 1e6:,.1f} M parameters, "
        f"{'/'.join(found['dtypes'])}",
        f"  inputs     {config['in_channels']} x {config['input_size']} x {config['input_size']}, "
        f"{config['num_classes']} classes, learn_sigma {config['learn_sigma']}",
        f"  latents    {space or 'not recorded (sample with --vae as trained)'}",
        f"  transport  {transport_words(found['transport'])}",
    ]
    if found["not_finite"]:
        bad = found["not_finite"]
        lines.append(f"  warning    {len(bad)} tensor(s) hold NaN or inf, e.g. {bad[0]}, as a diverged run saves them: "
                     f"its samples would be NaN (sample.py refuses them)")
    return "\n".join(lines)


def transport_words(transport: dict | None) -> str:
    """The training transport as sample.py's flags, or how to do without it."""
    if not transport or not transport.get("path_type") and not transport.get("prediction"):
        return "not recorded (sample with --path-type and --prediction as trained)"
    return " ".join(f"--{key.replace('_', '-')} {transport[key]}" for key in ("path_type", "prediction")
                    if transport.get(key) is not None)


def transport_note(found: dict, out: str) -> str | None:
    """A line when a .pt export leaves out what its sampler then has to be told: a training transport
    other than the default (Linear, velocity), the latent space the checkpoint records (--vae: without
    it sample.py would decode with its default VAE); else None."""
    transport = found["transport"] or {}
    other = {k: transport[k] for k, default in (("path_type", "Linear"), ("prediction", "velocity"))
             if transport.get(k) not in (None, default)}
    space = (found.get("model_config") or {}).get("latent_space")
    if not (other or space) or os.path.splitext(out)[1].lower() == ".safetensors":
        return None
    flags = ([transport_words(other)] if other else []) + ([f"--vae {'none' if space == 'pixels' else space}"]
                                                            if space else [])
    left_out = " nor ".join(what for what, kept in (("transport", other), ("latent space", space)) if kept)
    return (f"note: {out} is a plain state_dict and records no {left_out}; the model was trained with "
            f"{' '.join(flags)}: pass those to sample.py (or export to .safetensors, which keeps them)")


def build_parser() -> argparse.ArgumentParser:
    from sit_fast.argtypes import OneLineArgumentParser, doc_paragraph, user_path

    parser = OneLineArgumentParser(prog="python -m sit_fast.export", description=doc_paragraph(__doc__),
                                   allow_abbrev=False)
    parser.add_argument("ckpt", type=user_path,
                        help="a train.py checkpoint, an upstream release file or a .safetensors file")
    parser.add_argument("--out", type=user_path, default=None,
                        help="write the weights here (.pt, .pth or .safetensors)")
    parser.add_argument("--weights", choices=("ema", "model"), default=None,
                        help="a train.py checkpoint's EMA or raw weights (default: ema)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="cast the weights, all but the fixed pos_embed table (default: as stored); with --out")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    return parser


@cli_entry
def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    asked, args.weights = args.weights is not None, args.weights or "ema"
    if args.out is None and (args.dtype is not None or args.force):
        raise UserError(f"{'--dtype' if args.dtype is not None else '--force'} applies to the file that --out writes: "
                        f"pass --out PATH")
    from sit_fast.files import first_missing_folder, remove_empty_folders
    from sit_fast.interrupts import exit_status, stop_signals_raise, what_stopped

    folder = os.path.dirname(os.path.abspath(args.out)) if args.out is not None else None
    made = first_missing_folder(folder) if folder is not None else None  # the outermost folder made for --out
    before = identity(args.out)  # a file --force replaces; the atomic write's rename makes another
    try:
        with stop_signals_raise():  # a stop signal raises where the export is: its partial file is removed
            return export(args, asked)
    except BaseException as err:  # a checkpoint that cannot be read, say: the folders made for --out are not left
        if made is not None:
            remove_empty_folders(folder, made)
        if not isinstance(err, KeyboardInterrupt):
            raise
        where = ("" if args.out is None else f"; {args.out} written whole, its summary not printed"
                 if identity(args.out) not in (None, before) else f"; {args.out} not written")
        print(f"\n{what_stopped(err)}{where}", file=sys.stderr)
        raise SystemExit(exit_status(err)) from None


def identity(path: str | None) -> tuple[int, int, int] | None:
    """(device, inode, modification time) of the file at `path`, None where there is none."""
    try:
        st = os.stat(path)
    except (OSError, TypeError):
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns


def export(args: argparse.Namespace, asked: bool) -> dict:
    if args.out is not None:  # before reading a checkpoint of gigabytes
        check_out(args.ckpt, args.out, args.force)
    from sit_fast.sampling import release_or_path

    named = args.ckpt
    # upstream's release by name: the file found or downloaded
    args.ckpt = release_or_path(args.ckpt, given_as="python -m sit_fast.export PATH")
    if args.out is not None and args.ckpt != named:
        check_out(args.ckpt, args.out, args.force)
    loaded = read_checkpoint(args.ckpt, prefer=args.weights)  # once, for the summary and the export
    found = describe(args.ckpt, args.weights, loaded)
    print(summary(args.ckpt, found))
    note = weights_note(found, args.weights, asked)  # also when only describing: the summary is of other weights
    if note:
        print(note)
    if args.out is None:
        return found
    written = export_weights(args.ckpt, args.out, args.weights, args.dtype, args.force, loaded)
    print(summary(args.out, written))
    note = transport_note(found, args.out)
    if note:
        print(note)
    return written


if __name__ == "__main__":
    main()
