"""Reading SiT checkpoints safely and loading them into a model.

Formats: an upstream release file (a raw state_dict), a train.py checkpoint (a dict with "model",
"ema", "opt", "args", ...; EMA weights preferred) and a .safetensors file. Pickled files are always
read with torch.load(weights_only=True): a checkpoint can never run code.
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import math
import os
import re
import zipfile

import torch

from sit_fast.errors import ANSI, UserError, first_line

logger = logging.getLogger("sit_fast")

LABEL_TABLE_KEY = "y_embedder.embedding_table.weight"
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(UserError):
    """A checkpoint that cannot be read or does not fit the model; the message says what to do."""


DIT_NOTE = ("DiT predicts DDPM noise at integer times 0..999, not what SiT's transports (times in [0, 1]) expect: "
            "sampled as it is, it gives meaningless images (as weights to train from, it serves)")


def read_checkpoint(path: str | os.PathLike, prefer: str = "ema") -> tuple[dict[str, torch.Tensor], dict]:
    """Return (state_dict, info) from any supported checkpoint file, or from upstream's release by name
    (SiT-XL-2-256x256.pt, where no such file is here: ./pretrained_models, the cache, or a download).

    prefer: "ema" takes a train.py checkpoint's EMA weights when present, "model" its raw weights.
    info: {"format", "weights" ("ema" | "model" | "raw"), "args", "step", "optimizer"} (None where
    unknown; optimizer: whether it is a training checkpoint with an optimizer state, upstream's or ours;
    args of a .safetensors file that python -m sit_fast.export wrote: the training transport flags alone).
    """
    if prefer not in ("ema", "model"):
        raise ValueError(f"prefer must be 'ema' or 'model', got {prefer!r}")
    check_path_argument("read_checkpoint", path)
    path = os.fspath(path)
    if not os.path.exists(path):  # a release by name, as upstream's find_model takes it
        from sit_fast.sampling import PRETRAINED_URLS, pretrained_checkpoint  # here: sampling imports this module

        if path in PRETRAINED_URLS:
            path = pretrained_checkpoint(path, given_as="the path argument")
    check_checkpoint_file(path)
    # DiT's checkpoints have SiT's keys and shapes, so nothing in the weights tells them apart: a
    # release by its name, a training checkpoint by its args
    dit_named = os.path.basename(path).startswith("DiT-")
    if dit_named:
        logger.warning(f"{path} is named as one of DiT's releases: {DIT_NOTE}")
    info = {"format": "pickle", "weights": "raw", "args": None, "step": None, "optimizer": False}
    if is_safetensors(path):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                metadata = f.metadata() or {}
                obj = {key: f.get_tensor(key) for key in f.keys()}
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read {path}: {first_line(err)} "
                                  "(corrupt or not a safetensors file)") from None
        # python -m sit_fast.export records which weights of which step the file holds, and the
        # transport flags of the training run, which stand in for its args
        step = metadata.get("step", "")
        info.update(format="safetensors", weights=metadata.get("weights", "raw"),
                    step=int(step) if step.isdigit() else None, args=recorded_transport_metadata(metadata))
    else:
        obj = safe_torch_load(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state_dict or a checkpoint dict")

    if "model" in obj or "ema" in obj:
        key = "ema" if (prefer == "ema" and isinstance(obj.get("ema"), dict)) else "model"
        if key not in obj:
            only_ema = (" (it holds EMA weights alone: take those: prefer='ema', sample.py without --use-raw, or "
                        "export's --weights ema)" if "ema" in obj else "")
            raise CheckpointError(f"{path} has no {key!r} entry (keys: {', '.join(sorted(map(str, obj)))}){only_ema}")
        if not isinstance(obj[key], dict):
            raise CheckpointError(f"{path}: its {key!r} entry is a {type(obj[key]).__name__}, not a state_dict")
        args = obj.get("args")
        step = obj.get("step")
        info.update(weights=key, args=vars(args) if isinstance(args, argparse.Namespace) else args,
                    step=step if isinstance(step, int) and not isinstance(step, bool) else None,
                    optimizer="opt" in obj)
        obj = obj[key]
        model = info["args"].get("model") if isinstance(info["args"], dict) else None
        if isinstance(model, str) and model.startswith("DiT-") and not dit_named:
            logger.warning(f"{path} is a checkpoint of DiT's training (its args: --model {model}): {DIT_NOTE}")
    return checked_state_dict(obj, path), info


# The training flags that say what a model's outputs are and how to sample it; none is in its weights.
TRANSPORT_FLAGS = ("path_type", "prediction", "loss_weight", "train_eps", "sample_eps")


def training_transport(args: dict | None) -> dict:
    """The transport flags among a checkpoint's args (TRANSPORT_FLAGS, those recorded), as plain values."""
    if not isinstance(args, dict):
        return {}
    return {k: args[k] for k in TRANSPORT_FLAGS
            if k in args and (args[k] is None or isinstance(args[k], str | int | float))}


def recorded_transport_metadata(metadata: dict) -> dict | None:
    """The training transport that `python -m sit_fast.export` put in a .safetensors file's metadata
    ("transport", JSON), else None."""
    try:
        transport = json.loads(metadata.get("transport", "null"))
    except ValueError:
        return None
    return training_transport(transport) or None


def checked_state_dict(obj: dict, source: str) -> dict[str, torch.Tensor]:
    """obj with wrapper prefixes stripped; CheckpointError unless its keys are names and its values tensors."""
    if not all(isinstance(k, str) for k in obj):
        raise CheckpointError(f"{source} holds a dict with keys that are not parameter names (strings)")
    state_dict = strip_wrapper_prefixes(obj, source)
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{source}: entries that are not tensors: {', '.join(bad[:5])}")
    return state_dict


def is_safetensors(path: str) -> bool:
    return path.lower().endswith(".safetensors")


def check_path_argument(function: str, path) -> None:
    """TypeError naming load_into_model when a loader that takes a path is handed something else."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{function} takes the path of a checkpoint file, got a {type(path).__name__}; a "
                        f"state_dict in memory loads with load_into_model(model, state_dict)")


def check_checkpoint_file(path: str) -> None:
    """CheckpointError unless `path` is a regular file, saying what to pass instead of a folder."""
    if os.path.isfile(path):
        try:  # unreadable (another user's copy, mode 000; a bad sector): one line, and --resume auto skips it
            with open(path, "rb") as f:
                f.read(4)
        except OSError as err:
            raise CheckpointError(f"cannot read {path} ({err.strerror or err})") from None
        return
    if os.path.isdir(path):
        found = []
        for folder in (os.path.join(path, "checkpoints"), path):
            found = [f for pattern in ("*.pt", "*.safetensors") for f in glob.glob(os.path.join(folder, pattern))
                     if not re.fullmatch(r"shard-\d+\.pt", os.path.basename(f))]  # a latent cache's shards
            if found:
                break
        if not found and glob.glob(os.path.join(path, "shard-*.pt")):
            raise CheckpointError(f"{path} is a folder of latent-cache shards (python -m sit_fast.latent_cache), "
                                  f"not of checkpoints: pass a checkpoint file (train.py reads the cache with "
                                  f"--latent-cache {path})")
        hint = f" (the newest here: {max(found, key=os.path.getmtime)})" if found else ""
        raise CheckpointError(f"{path} is a folder: pass a checkpoint file{hint}")
    if os.path.exists(path):  # /dev/null, a named pipe (whose read waits for a writer), a socket
        raise CheckpointError(f"{path} is not a regular file (a device, a named pipe or a socket): pass a "
                              f"checkpoint file")
    raise CheckpointError(f"checkpoint not found: {path}")


def check_not_cut_short(path: str) -> None:
    """CheckpointError if `path` starts as a zip archive (torch.save's format) but has no index at its
    end: a copy or a save that was cut short."""
    with open(path, "rb") as f:
        if f.read(4) == b"PK\x03\x04" and not zipfile.is_zipfile(path):
            raise CheckpointError(f"cannot read {path}: a zip archive (torch.save's format) without the index "
                                  f"at its end: truncated or damaged; copy or save it again")


def weights_only_refusal(err: Exception) -> tuple[str | None, str | None]:
    """What torch.load(weights_only=True) said in `err`: the global it refused to unpickle, and its
    reason where the bytes are no pickle it reads (torch's words, not its advice); None for each
    where it said no such thing."""
    text = ANSI.sub("", str(err))
    # torch words the refusal "Unsupported global: GLOBAL x.y" or "unsupported GLOBAL x.y whose module x is blocked"
    unsafe = re.search(r"unsupported (?:global: )?GLOBAL (\S+)", text, flags=re.IGNORECASE)
    # torch puts the reason on a line of its own, after blank lines
    reason = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    return (unsafe.group(1) if unsafe else None), (reason.group(1).strip() if reason else None)


def safe_torch_load(path: str) -> object:
    """torch.load(weights_only=True), memory-mapped when the file allows it, with one-line errors.

    Besides tensors and plain containers it accepts argparse.Namespace: upstream's train.py stores its
    arguments as one, and rebuilding one sets attributes only, so no code can run."""
    mmap = zipfile.is_zipfile(path)  # torch.save's format; older files load without mmap
    if not mmap:
        check_not_cut_short(path)
    elif is_torchscript_archive(path):  # said here: torch.load would warn that it hands the file to torch.jit.load
        raise CheckpointError(f"cannot read {path}: it is a TorchScript archive (torch.jit.save), not a state_dict; "
                              f"if you trust the file, load it with torch.jit.load and torch.save its state_dict()")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # a damaged or foreign file raises many types (KeyError, IndexError, EOFError, ...)
        unsafe, reason = weights_only_refusal(err)
        if unsafe:
            raise CheckpointError(
                f"refused to read {path}: it pickles {unsafe}, which is neither a tensor nor a plain "
                f"container, and unpickling that could run code; if you trust the file, load it once with "
                f"torch.load(weights_only=False) and save its state_dict"
            ) from None
        kind = file_kind(path)
        if kind is not None:
            raise CheckpointError(f"cannot read {path}: it is {kind}, not a checkpoint") from None
        raise CheckpointError(f"cannot read {path}: {reason or first_line(err)} "
                              f"(corrupt, truncated, or not a checkpoint written by torch.save "
                              f"or safetensors?)") from None


def is_torchscript_archive(path: str) -> bool:
    """Whether the zip file at `path` is one torch.jit.save wrote (its records hold constants.pkl, as torch.load
    tells them apart); False where it cannot be listed (torch.load says why)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.partition("/")[2] == "constants.pkl" for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


# The first bytes of files that are given for a checkpoint by mistake (an image, an archive, a text file)
MAGIC = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
         (b"\x1f\x8b", "a gzip file (unpack it first?)"), (b"BZh", "a bzip2 file (unpack it first?)"),
         (b"\xfd7zXZ", "an xz file (unpack it first?)"), (b"\x93NUMPY", "a NumPy .npy array"),
         (b"\x89HDF", "an HDF5 file (Keras or h5py?)"), (b"{", "a JSON or text file"), (b"<", "an HTML or XML file"))


def file_kind(path: str) -> str | None:
    """What a file that is no checkpoint is, by its first bytes, where they say (else None)."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return None
    if len(head) == 9 and head[8:] == b"{" and int.from_bytes(head[:8], "little") < size:  # its header's length
        return "a safetensors file under another extension (name it .safetensors)"
    return next((kind for magic, kind in MAGIC if head.startswith(magic)), None)


def infer_config(state_dict: dict[str, torch.Tensor]) -> dict:
    """Model constructor arguments that the weights determine.

    input_size, patch_size, in_channels, hidden_size, depth, learn_sigma, and num_classes assuming
    the label table has the extra "null" row that class dropout adds (as every released SiT has).
    A wrapper's state_dict (keys "module." / "_orig_mod.") is read as load_into_model reads it.
    The head count is not among them (the weights fit any count that divides hidden_size): build the
    model from its SiT_models entry (sit_fast.models.registry_name(depth, hidden_size, patch_size)
    names it), not as SiT(**infer_config(...)), which takes SiT's default of 16 heads.
    """
    state_dict = given_state_dict(state_dict, "state_dict", "infer_config", "read_checkpoint(path)[0]")
    try:
        proj = state_dict["x_embedder.proj.weight"]  # (D, C, p, p)
        final = state_dict["final_layer.linear.weight"]  # (p * p * out_channels, D)
        pos = state_dict["pos_embed"]  # (1, T, D)
        table = state_dict[LABEL_TABLE_KEY]  # (num_classes + 1, D)
    except KeyError as err:
        raise CheckpointError(f"not a SiT state_dict: key {err.args[0]!r} is missing") from None
    for key, tensor, ndim in (("x_embedder.proj.weight", proj, 4), ("final_layer.linear.weight", final, 2),
                              ("pos_embed", pos, 3), (LABEL_TABLE_KEY, table, 2)):
        if tensor.ndim != ndim:
            raise CheckpointError(f"not a SiT state_dict: {key} has shape {tuple(tensor.shape)}, "
                                  f"not {ndim} dimensions")
    hidden_size, in_channels, patch_size = proj.shape[0], proj.shape[1], proj.shape[2]
    out_channels = final.shape[0] // (patch_size * patch_size)
    grid = math.isqrt(pos.shape[1])
    depth = 1 + max(
        (int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.") and k.split(".")[1].isdigit()),
        default=-1,
    )
    return dict(
        input_size=grid * patch_size,
        patch_size=patch_size,
        in_channels=in_channels,
        hidden_size=hidden_size,
        depth=depth,
        learn_sigma=out_channels == 2 * in_channels,
        num_classes=table.shape[0] - 1,
    )


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside torch.compile / DistributedDataParallel / DataParallel / AveragedModel wrappers,
    however nested (an AveragedModel's: the averaged copy it holds)."""
    from torch.optim.swa_utils import AveragedModel

    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel | torch.nn.DataParallel | AveragedModel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def given_state_dict(state_dict, source: str, function: str, file_function: str) -> dict[str, torch.Tensor]:
    """A state_dict handed to `function` in memory, checked (checked_state_dict: wrappers' prefixes
    stripped); TypeError for a path (a file goes to `file_function`) or something else, CheckpointError
    for a whole training checkpoint, naming its entry to pass."""
    if isinstance(state_dict, (str, os.PathLike)):
        raise TypeError(f"{function} takes a state_dict, got the path {os.fspath(state_dict)!r}: a file loads "
                        f"with {file_function}")
    if not isinstance(state_dict, dict):
        raise TypeError(f"{function} takes a state_dict (a dict of tensors), got a {type(state_dict).__name__}")
    entries = [k for k in ("ema", "model") if isinstance(state_dict.get(k), dict)]
    if entries:  # a whole training checkpoint (train.py's or upstream's), not its weights
        raise CheckpointError(f"{source} is a training checkpoint (entries {', '.join(map(str, state_dict))}), not a "
                              f"state_dict: pass its [{entries[0]!r}] entry, or load the file with "
                              f"load_checkpoint / read_checkpoint, which take the EMA weights from it")
    return checked_state_dict(state_dict, source)


def load_into_model(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> dict:
    """Load strictly; when only the class count differs, redraw the label table's class rows and keep
    the checkpoint's null row (its last) as the model's (but a class-free model, class_dropout_prob=0,
    takes a table of its classes and a null row without the null row).

    Any other difference raises CheckpointError naming the keys and shapes and the likely fix.
    A model wrapped by torch.compile, DistributedDataParallel, DataParallel or AveragedModel is loaded
    through the wrapper into the model it holds (an AveragedModel's count of averages, n_averaged, is
    left as it is), and such a wrapper's state_dict (keys "module." / "_orig_mod.") loads as
    read_checkpoint's would. Returns {"label_table_reinitialised": bool}.
    """
    state_dict = given_state_dict(state_dict, source, "load_into_model", "load_checkpoint(model, path)")
    model = unwrap_model(model)
    own = model.state_dict()
    missing = sorted(own.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - own.keys())
    mismatched = sorted(k for k in own.keys() & state_dict.keys() if own[k].shape != state_dict[k].shape)
    table, own_table = state_dict.get(LABEL_TABLE_KEY), own.get(LABEL_TABLE_KEY)
    # Another class count: a table of other rows, as wide as the model's. Any other shape is a mismatch.
    reinit = (not missing and not unexpected and mismatched == [LABEL_TABLE_KEY] and table.dim() == own_table.dim() == 2
              and table.shape[1] == own_table.shape[1])
    embedder = getattr(model, "y_embedder", None)
    class_free = embedder is not None and getattr(embedder, "dropout_prob", None) == 0
    if reinit and class_free and table.shape[0] == own_table.shape[0] + 1:
        # A model without the null row (class_dropout_prob=0) from a checkpoint with one: the same
        # classes, and the last row the null label's, which this model has no use for.
        logger.info("%s: its label table's last row (the null label of guidance) is left out: the model has "
                    "class_dropout_prob=0", source)
        state_dict = {**state_dict, LABEL_TABLE_KEY: table[:-1]}
        reinit = False
    elif reinit:
        rows_ckpt, rows_model = table.shape[0], own_table.shape[0]
        # The null row (class dropout's label, the unconditional half of guidance) means the same
        # whatever the classes: kept, so the unconditional model works from the first step of a
        # fine-tune. The checkpoint's last row is taken as its null row, as infer_config does.
        keep_null = embedder is not None and getattr(embedder, "dropout_prob", 0) > 0 and rows_ckpt > 0
        null_row = table[-1] if keep_null else None
        # One row fewer is also what a checkpoint of the model's classes trained without class dropout
        # (no null row) has: its last row is then a class, taken here for the null label
        class_free_hint = (f" (a checkpoint of {rows_ckpt} classes trained without class dropout has no null row: "
                           f"its last row is a class; to keep its table whole, load it in Python into a model built "
                           f"with class_dropout_prob=0: train.py's models have the null row of class dropout)"
                           if keep_null and rows_ckpt == rows_model - 1 else "")
        logger.warning(
            "%s has a label table of %d rows, the model %d (num_classes=%d): the label table is "
            "re-initialised%s%s; class-conditional outputs are meaningless until it is trained",
            source, rows_ckpt, rows_model, getattr(model, "num_classes", rows_model),
            " but for its last row, the null label of guidance, kept" if keep_null else "", class_free_hint,
        )
        state_dict = {**state_dict, LABEL_TABLE_KEY: own_table}
    elif missing or unexpected or mismatched:
        raise CheckpointError(_mismatch_message(model, state_dict, own, missing, unexpected, mismatched, source))
    model.load_state_dict(state_dict, strict=True)
    if reinit:  # as at initialisation (the model's table may have been trained or loaded before)
        table = model.get_parameter(LABEL_TABLE_KEY)
        # drawn from the caller's generator without moving it on: loading draws no numbers of its own
        with torch.random.fork_rng(devices=[table.device] if table.device.type == "cuda" else []), torch.no_grad():
            torch.nn.init.normal_(table, std=0.02)
            if keep_null:
                table[-1].copy_(null_row)
    return {"label_table_reinitialised": reinit}


def _mismatch_message(model, state_dict, own, missing, unexpected, mismatched, source) -> str:
    parts = [f"{source} does not fit the model"]
    if missing:
        parts.append(f"missing keys {_abbrev(missing)}")
    if unexpected:
        parts.append(f"unexpected keys {_abbrev(unexpected)}")
    if mismatched:
        shapes = [f"{k} {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}" for k in mismatched[:4]]
        parts.append("shape mismatch: " + "; ".join(shapes) + (" ..." if len(mismatched) > 4 else ""))
    hint = "wrong model or image size (--model, --image-size)?"
    try:
        from sit_fast.models import registry_name

        cfg = infer_config(state_dict)
        name = registry_name(cfg["depth"], cfg["hidden_size"], cfg["patch_size"])
        hint = (
            f"the checkpoint looks like {name + ': ' if name else ''}depth {cfg['depth']}, "
            f"hidden {cfg['hidden_size']}, patch "
            f"{cfg['patch_size']}, input size {cfg['input_size']} ({cfg['input_size']}px images in pixel space, "
            f"{cfg['input_size'] * 8}px through an 8x VAE), learn_sigma={cfg['learn_sigma']}: {_likely_fix(model, cfg)}"
        )
    except CheckpointError:
        pass
    return ": ".join(parts[:1]) + ": " + ", ".join(parts[1:]) + f" ({hint})"


def _likely_fix(model, cfg: dict) -> str:
    """The model's settings to change: --model / --image-size when its architecture or input size
    differs from the checkpoint's, else the channels or learn_sigma, which no such flag changes."""
    differ = [k for k in ("depth", "hidden_size", "patch_size", "input_size", "in_channels", "learn_sigma")
              if getattr(model, k, cfg[k]) != cfg[k]]
    if not differ or set(differ) & {"depth", "hidden_size", "patch_size", "input_size"}:
        return "wrong model or image size (--model, --image-size)?"
    labels = getattr(model, "y_embedder", None)  # a label table of other rows too: else a re-initialised one next
    if getattr(labels, "dropout_prob", 0) > 0 and labels.embedding_table.weight.shape[0] != cfg["num_classes"] + 1:
        differ.append("num_classes")
    return "build the model with " + ", ".join(f"{k}={cfg[k]}" for k in differ)


def _abbrev(keys: list[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def strip_wrapper_prefixes(state_dict: dict, source: str = "checkpoint") -> dict:
    """The state_dict with the wrappers' key prefixes ("module.", "_orig_mod.") removed, in a new dict,
    and an averaging wrapper's count left out (torch.optim.swa_utils.AveragedModel, an EMA: "module."
    keys and "n_averaged"); CheckpointError when two keys name one parameter once they are removed."""
    out, original = {}, {}
    averaged = "n_averaged" in state_dict and any(key.startswith("module.") for key in state_dict)
    for key, value in state_dict.items():
        if averaged and key == "n_averaged":
            continue
        name = _strip_prefixes(key)
        if name in out:
            first, second = sorted((original[name], key))
            raise CheckpointError(f"{source}: {first} and {second} are one parameter once the wrappers' prefixes "
                                  f"({', '.join(_WRAPPER_PREFIXES)}) are removed: keep one of them")
        out[name], original[name] = value, key
    return out


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def recorded_model_config(path: str | os.PathLike) -> dict | None:
    """The model_config a file records, else None: a train.py checkpoint's "model_config" entry, or
    the "model_config" metadata (JSON) of a .safetensors file that `python -m sit_fast.export` wrote.
    Holds "latent_space" ("pixels" or a VAE spec) among others. An unreadable file gives None here;
    read_checkpoint says what is wrong with it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        return None
    try:
        if is_safetensors(path):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                text = (f.metadata() or {}).get("model_config")
            config = json.loads(text) if text else None
        else:  # memory-mapped where it can be: the pickle is read, the tensors are not
            obj = safe_torch_load(path)  # upstream-style args (a Namespace) beside a model_config too
            config = obj.get("model_config") if isinstance(obj, dict) else None
    except Exception:  # torch.load and safetensors raise many types; read_checkpoint reports them
        return None
    return config if isinstance(config, dict) else None


def load_checkpoint(model: torch.nn.Module, path: str | os.PathLike, prefer: str = "ema") -> dict:
    """read_checkpoint + load_into_model; returns the info dict of both."""
    check_path_argument("load_checkpoint", path)
    state_dict, info = read_checkpoint(path, prefer=prefer)
    info.update(load_into_model(model, state_dict, source=os.fspath(path)))
    return info
