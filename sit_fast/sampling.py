"""Library code behind sample.py: models from checkpoints, guided denoisers, fast forwards, the FID writer.

    model, info = build_model(ModelRequest(...), device)       checkpoint -> eval-mode SiT, config from the weights
    forwards = ModelForwards(model, cfg_scale=4.0, ...)        the conditional and the guided forward, each
                                                               optionally torch.compile'd / CUDA-graph captured
    denoiser = Denoiser(forwards, cfg_scale, cfg_interval, call_times)
    samples = sample_fn(z, denoiser.for_labels(y))[-1]         what the transport's samplers call

Classifier-free guidance (Ho & Salimans 2022) with scale w mixes a conditional and an unconditional
prediction, out = u + w (c - u), on the first `cfg_channels` channels (upstream SiT guides 3 of the 4
latent channels; "all" guides every channel). The unconditional pass uses the "null" label
`num_classes`. Guidance costs a doubled batch, so it is run only where it applies: never at
w = 1, and with an interval [low, high] only at the model calls whose time t lies inside it.
Deciding "inside" must not read t back from the GPU at every step; for our fixed-step samplers the
times of all model calls are known ahead (`model_call_times`), so the decision is a host-side
lookup by call index. Adaptive solvers (dopri5, ...) choose their times on the fly and already
synchronise with the host at every step to do so; there the time is read from t itself.

Determinism: the initial noise and the label of image `index` come from a generator seeded with
(seed, index) on the CPU (`index_noise`), so an image does not depend on the device, the world size,
or which process drew it. Solvers whose steps depend on the whole batch (adaptive step-size control,
the SDE's per-step noise, drawn from the global generator seeded per batch) give the same images
for the same batch composition, which the FID job fixes by cutting the index range into chunks
of --per-proc-batch-size.
"""
from __future__ import annotations

import dataclasses
import http.client
import json
import logging
import math
import os
import re
import urllib.error
import urllib.request
import warnings
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import nullcontext
from typing import Callable, Sequence

import numpy as np
import torch

from sit_fast.checkpoint import CheckpointError, infer_config, load_into_model, read_checkpoint
from sit_fast.errors import UserError, first_line
from sit_fast.files import (WRITE_REFUSED, FolderLock, atomic_write, make_writable_folder, refusal,
                            write_failed, written_kept)
from sit_fast.models import SiT, SiT_models, with_own_code, check_cfg_channels, model_config, registry_name
from sit_fast.progress import progress as progress_display
from sit_fast.transport import PATH_TYPES, PREDICTIONS
from sit_fast.transport.integrators import time_grid

logger = logging.getLogger("sit_fast")

# The upstream release (willisma/SiT download.py): SiT-XL/2, 256x256 images, 1000 classes, learn_sigma.
PRETRAINED_URLS = {
    "SiT-XL-2-256x256.pt": "https://www.dl.dropboxusercontent.com/scl/fi/as9oeomcbub47de5g4be0/SiT-XL-2-256.pt"
                           "?rlkey=uxzxmpicu46coq3msb17b9ofa&dl=0",
}
PRETRAINED_MODEL = "SiT-XL/2"
PRETRAINED_IMAGE_SIZE = 256
PRETRAINED_NUM_CLASSES = 1000
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "sit_fast")
UPSTREAM_CACHE_DIR = "pretrained_models"  # where upstream's download.py keeps the release file

PRECISIONS = ("fp32", "tf32", "bf16")


#################################################################################
#                          Checkpoints and the model                             #
#################################################################################

def cache_dir() -> str:
    """Where downloaded checkpoints live: $SIT_FAST_CACHE, else ~/.cache/sit_fast."""
    return os.path.expanduser(os.environ.get("SIT_FAST_CACHE") or DEFAULT_CACHE_DIR)


def pretrained_checkpoint(name: str = "SiT-XL-2-256x256.pt", timeout_s: float = 30.0,
                          given_as: str = "--ckpt PATH") -> str:
    """Path of a released checkpoint: found in ./pretrained_models (upstream's place) or the cache,
    else downloaded into the cache. Raises UserError (one line, naming `given_as`, how the command
    takes a local checkpoint) when offline."""
    if name not in PRETRAINED_URLS:
        raise UserError(f"no released checkpoint named {name!r} (released: {', '.join(PRETRAINED_URLS)})")
    for folder in (UPSTREAM_CACHE_DIR, cache_dir()):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    path = os.path.join(cache_dir(), name)
    partial = f"{path}.{os.getpid()}.partial"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    except OSError as err:  # under a file, or not writable
        raise UserError(f"cannot make the folder {os.path.dirname(path)} for the released checkpoint {name} "
                        f"({err.strerror}): set SIT_FAST_CACHE to a folder that can be made, or copy the file to "
                        f"{os.path.join(UPSTREAM_CACHE_DIR, name)}") from None
    try:
        with urllib.request.urlopen(PRETRAINED_URLS[name], timeout=timeout_s) as response, open(partial, "wb") as f:
            length = response.headers.get("Content-Length")
            expected = int(length) if length and length.isdigit() else None
            with progress_display(math.ceil((expected or 0) / 2**20), f"downloading {name}", "MiB") as bar:
                while chunk := response.read(1 << 22):
                    f.write(chunk)
                    bar.update(f.tell() // 2**20 - bar.n)
                bar.update(math.ceil(f.tell() / 2**20) - bar.n)
            received = f.tell()
        if expected is not None and received != expected:
            raise OSError(f"the connection closed after {received} of {expected} bytes")
        if not looks_like_a_checkpoint(partial):
            raise OSError("what came is not a checkpoint file (a web page in its place?)")
        os.replace(partial, path)
    except BaseException as err:  # a stop signal or Ctrl-C too: no partial file left in the cache
        if os.path.exists(partial):
            os.remove(partial)
        if not isinstance(err, urllib.error.URLError | http.client.HTTPException | OSError):
            raise
        if isinstance(err, OSError) and err.errno in WRITE_REFUSED:  # the cache's disk full, say
            raise UserError(
                f"cannot write the released checkpoint {name} into {os.path.dirname(path)} ({refusal(err)}): make "
                f"room there, set SIT_FAST_CACHE to a folder that can take it, or copy the file to "
                f"{os.path.join(UPSTREAM_CACHE_DIR, name)}"
            ) from None
        reason = getattr(err, "reason", None) or err
        raise UserError(
            f"cannot download the released checkpoint {name} ({reason}); without a network, copy it to "
            f"{os.path.join(UPSTREAM_CACHE_DIR, name)} or {path}, or pass a local checkpoint's path instead "
            f"({given_as})"
        ) from None
    return path


def looks_like_a_checkpoint(path: str) -> bool:
    """Whether the file starts as torch.save's files do: a zip archive, or (before torch 1.6) a pickle."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head == b"PK\x03\x04" or head[:1] == b"\x80"


def release_or_path(ckpt: str, given_as: str = "--ckpt PATH") -> str:
    """--ckpt read as upstream's find_model reads it: the name of a release (SiT-XL-2-256x256.pt) that
    is not a file here means that release (pretrained_checkpoint: ./pretrained_models, the cache or a
    download); anything else is a path, returned as given. given_as: how the command takes a path."""
    if ckpt in PRETRAINED_URLS and not os.path.exists(ckpt):
        return pretrained_checkpoint(ckpt, given_as=given_as)
    return ckpt


@dataclasses.dataclass
class ModelRequest:
    """What the user asked for; None fields are taken from the checkpoint."""

    ckpt: str
    """Checkpoint path (pretrained_checkpoint_for gives the upstream release's)."""
    model: str | None = None
    """Registry name (SiT-XL/2, ...); None: the checkpoint's architecture."""
    image_size: int | None = None
    """Image height = width; None: the size the checkpoint was trained at."""
    num_classes: int | None = None
    """Number of classes; None: the checkpoint's (another count is refused: its label table would be random)."""
    in_channels: int | None = None
    """Channels the model sees (latent channels with a VAE, image channels without)."""
    downsample: int = 8
    """Image size / model input size: the VAE's factor, 1 in pixel space."""
    use_raw: bool = False
    """Load a train.py checkpoint's raw weights instead of its EMA."""
    attn_backend: str = "auto"
    fused_kernels: bool | str = "auto"


def pretrained_checkpoint_for(args) -> str:
    """The upstream release for a run without --ckpt (SiT-XL/2, 256x256): its local path.

    args needs .model and .image_size (None: the release's). UserError when other ones are asked for.
    """
    wrong = []
    if args.model not in (None, PRETRAINED_MODEL):
        wrong.append(f"--model {args.model}")
    if args.image_size not in (None, PRETRAINED_IMAGE_SIZE):
        wrong.append(f"--image-size {args.image_size}")
    if wrong:
        raise UserError(
            f"only {PRETRAINED_MODEL} at {PRETRAINED_IMAGE_SIZE}x{PRETRAINED_IMAGE_SIZE} is released, but "
            f"{' and '.join(wrong)} was asked for: pass your checkpoint with --ckpt PATH"
        )
    return pretrained_checkpoint(f"SiT-XL-2-{PRETRAINED_IMAGE_SIZE}x{PRETRAINED_IMAGE_SIZE}.pt")


def checkpoint_preference(use_raw: bool) -> str:
    """read_checkpoint's `prefer` for --use-raw (the raw weights) or not (the EMA)."""
    return "model" if use_raw else "ema"


def build_model(request: ModelRequest, device: torch.device,
                loaded: tuple[dict, dict] | None = None) -> tuple[SiT, dict]:
    """An eval-mode, frozen SiT on `device` with the checkpoint's weights.

    Architecture, learn_sigma, input size, channels and classes come from the weights (infer_config);
    the user's --model / --image-size / --in-channels / --num-classes must agree with them (one-line
    UserError naming the right value otherwise: another class count would sample from a label table
    drawn at random, which nothing here trains).
    loaded: read_checkpoint(request.ckpt, prefer=...)'s result when the caller has read it already.
    Returns (model, info) with info = read_checkpoint's info plus "path", "model", "image_size",
    "num_classes", "learn_sigma", "label_table_reinitialised".
    """
    path = request.ckpt
    state_dict, info = loaded or read_checkpoint(path, prefer=checkpoint_preference(request.use_raw))
    if request.use_raw and info["weights"] != "model":
        logger.warning("--use-raw: %s holds a single set of weights (%s); using them", path,
                       "its metadata says ema" if info["weights"] == "ema" else "no 'model'/'ema' entries")
    config = infer_config(state_dict)
    found = registry_name(config["depth"], config["hidden_size"], config["patch_size"])
    arch = f"depth {config['depth']}, hidden {config['hidden_size']}, patch {config['patch_size']}"
    name = request.model or found
    if name is None:
        raise CheckpointError(f"{path}: no registry model has {arch}")
    if name not in SiT_models:
        raise UserError(f"unknown model {name!r}; choose one of {', '.join(SiT_models)}")
    wanted = model_config(name)
    if (wanted["depth"], wanted["hidden_size"], wanted["patch_size"]) != (
            config["depth"], config["hidden_size"], config["patch_size"]):
        hint = f"pass --model {found}" if found else "no registry model matches it"
        raise CheckpointError(f"{path} is a {found or 'SiT'} ({arch}), not a {name}: {hint}")

    in_channels = request.in_channels if request.in_channels is not None else config["in_channels"]
    if in_channels != config["in_channels"]:
        what = "the VAE's latents have" if request.downsample > 1 else "--in-channels says"
        fix = ("use the VAE it was trained with (or --vae none for a pixel-space model)" if request.downsample > 1
               else f"pass --in-channels {config['in_channels']}")
        raise CheckpointError(f"{path} takes {config['in_channels']}-channel inputs but {what} {in_channels}: {fix}")
    input_size = config["input_size"]
    if request.image_size is not None:
        step = request.downsample * config["patch_size"]
        if request.image_size % step:
            raise UserError(
                f"--image-size {request.image_size} is not a multiple of {step} (the "
                f"{'VAE factor ' + str(request.downsample) + ' x ' if request.downsample > 1 else ''}"
                f"patch size {config['patch_size']})"
            )
        if request.image_size // request.downsample != input_size:
            raise CheckpointError(
                f"{path} was trained at model input size {input_size}, i.e. --image-size "
                f"{input_size * request.downsample} here, not {request.image_size}"
            )
    num_classes = config["num_classes"]
    if request.num_classes is not None and request.num_classes != num_classes:
        raise CheckpointError(f"{path} has {num_classes} classes, not {request.num_classes}: its label table would be "
                              f"re-initialised at random, and samples of random labels are meaningless; drop "
                              f"--num-classes (or pass {num_classes})")
    with torch.random.fork_rng(devices=[]):  # the random init, overwritten below, leaves the caller's RNG alone
        model = SiT_models[name](
            input_size=input_size,
            in_channels=in_channels,
            num_classes=num_classes,
            learn_sigma=config["learn_sigma"],
            attn_backend=request.attn_backend,
            fused_kernels=request.fused_kernels,
        )
    loaded = load_into_model(model, state_dict, source=path)
    model = model.to(device).eval().requires_grad_(False)
    floats = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    finite = torch.stack([torch.isfinite(v).all() for v in floats.values()]).tolist()  # one host sync
    not_finite = [k for k, ok in zip(floats, finite) if not ok]
    if not_finite:  # a diverged run's weights: samples of NaN (black images), or an adaptive solver's assertion
        raise CheckpointError(f"{path} holds weights that are not finite (NaN or inf) in {len(not_finite)} tensor(s), "
                              f"e.g. {not_finite[0]}, as a diverged run saves them: its samples would be NaN; use an "
                              f"earlier checkpoint"
                              f"{' (or --use-raw for its raw weights)' if info['weights'] == 'ema' else ''}")
    info.update(loaded)
    info.update(path=path, model=name, image_size=input_size * request.downsample, num_classes=num_classes,
                learn_sigma=config["learn_sigma"])
    return model, info


def check_training_args(info: dict, transport_args: dict, source: str = "the checkpoint",
                        advice: str = "pass the same to sample from it") -> None:
    """Warn (one line) when a checkpoint that records its training flags (train.py's, or upstream's
    args) was trained with other transport settings than this run's. A recorded value sit_fast does not
    implement (a path or prediction of another codebase) cannot be passed: the warning says so instead
    of advising it."""
    trained = info.get("args")
    if not isinstance(trained, dict):
        return
    differ = [k for k, v in transport_args.items() if k in trained and trained[k] != v]
    if not differ:
        return
    known = {"path_type": PATH_TYPES, "prediction": PREDICTIONS}
    unknown = [k for k in differ if k in known and trained[k] not in known[k]]
    flags = ", ".join(f"--{k.replace('_', '-')} {trained[k]} (this run: {transport_args[k]})" for k in differ)
    if unknown:
        names = " or ".join(f"--{k.replace('_', '-')} {trained[k]}" for k in unknown)
        advice = f"sit_fast has no {names}, so this run's transport is not the one the model was trained with"
    logger.warning("%s was trained with %s; %s", source, flags, advice)


#################################################################################
#                 Forwards: conditional, guided; compiled / CUDA graphs          #
#################################################################################

def default_cfg_channels(in_channels: int) -> int | str:
    """The channels guidance mixes unless told: upstream's first 3 for a model of up to 4 channels (SD
    latents: published numbers reproduce; pixels: all of them), every channel for a latent space of
    more (a VAE of 16 channels, say), where 3 of them would be a quirk, not upstream's maths."""
    return 3 if in_channels <= 4 else "all"


def apply_guidance(cond: torch.Tensor, uncond: torch.Tensor, cfg_scale: float, cfg_channels: int | str) -> torch.Tensor:
    """u + w (c - u) on the first cfg_channels channels ("all": every channel); the rest stays c."""
    guided = cond.shape[1] if cfg_channels == "all" else min(cfg_channels, cond.shape[1])
    mixed = uncond[:, :guided] + cfg_scale * (cond[:, :guided] - uncond[:, :guided])  # (B, g, H, W)
    if guided == cond.shape[1]:
        return mixed
    return torch.cat([mixed, cond[:, guided:]], dim=1)  # (B, C, H, W)


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """Autocast to dtype (None: none). No weight-cast cache: each weight is cast once per forward
    anyway, and a cache must not outlive a CUDA graph capture."""
    return torch.autocast(device.type, dtype=dtype, cache_enabled=False) if dtype is not None else nullcontext()


class CUDAGraphForward:
    """Replays a CUDA graph of fn(*tensors) per input signature (shapes and dtypes).

    The first call with a new signature warms fn up on a side stream (Triton autotuning, cuBLAS
    workspaces, lazy init), then captures it; every call copies its inputs into the graph's static
    inputs, replays, and returns a clone of the static output (callers such as Heun and dopri5 keep
    earlier outputs alive, which the next replay would overwrite). The graphs share one memory pool:
    they never run concurrently, and each output is cloned as soon as it is replayed. So fn must keep
    nothing it makes while captured (a cache first built then would sit in the pool, overwritten by
    the other graphs' replays: the model's frozen-modulation cache is built in the warm-up). CUDA
    only; fn must not synchronise with the host.
    """

    def __init__(self, fn: Callable[..., torch.Tensor], warmup_calls: int = 2):
        self.fn = fn
        self.warmup_calls = warmup_calls
        self.graphs: dict[tuple, tuple] = {}
        self.pool = None

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        key = tuple((tuple(x.shape), x.dtype) for x in inputs)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._capture(inputs)
        graph, static_inputs, static_output = entry
        for static, x in zip(static_inputs, inputs):
            static.copy_(x)
        graph.replay()
        return static_output.clone()

    def _capture(self, inputs):
        if not all(x.is_cuda for x in inputs):
            raise RuntimeError("CUDAGraphForward needs CUDA tensors")
        static_inputs = [x.clone() for x in inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup_calls):
                self.fn(*static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            static_output = self.fn(*static_inputs)
        return graph, static_inputs, static_output


def _given_modulation_weights(model: SiT, fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """fn(*inputs, model's adaLN weights' concatenation), the concatenation made or reused eagerly.

    Each input is handed over as an inference tensor under inference mode and as a normal one outside
    it (a copy where it is the other kind): compiled code is guarded on the kind, and a sampler run
    under inference mode from latents made outside it calls the model first with a normal tensor,
    then with inference tensors only, which compiled the forward twice."""
    def call(*inputs: torch.Tensor) -> torch.Tensor:
        inference = torch.is_inference_mode_enabled()
        inputs = tuple(x if x.is_inference() == inference else x.clone() for x in inputs)
        return fn(*inputs, model._modulation_weights())

    return call


class ModelForwards:
    """The two forwards sampling needs, built once and reused for every batch.

    conditional(x, t, y) -> (B, C, H, W): the model's prediction for labels y.
    guided(x, t, y_pair) -> (B, C, H, W): one pass over the doubled batch [x, x] with labels
        y_pair = [y, null], mixed by apply_guidance (fp32 maths; same result as forward_with_cfg).
    Both return fp32. autocast_dtype (bf16) runs the model under autocast; cast_weights also stores
    the model's matmul weights in that dtype (SiT.cast_matmul_weights_: the same results, no cast
    of every weight on every call; the model is then for these forwards only); compile wraps each
    forward in torch.compile (with compile_backend), its compilations counted apart from other
    ModelForwards' against Dynamo's recompile limit (what was compiled is freed with the forwards,
    as SiT.compile_blocks' with the model, but for what torch keeps of every compilation: its guards,
    generated source and code caches, some MB each); cuda_graphs replays each from a CUDA graph
    (CUDA only). The model's frozen adaLN weights are concatenated once and reused
    (SiT.reuse_frozen_modulation, which stays set on the model: weights written into it later
    through `.data` are not seen until it is unset).
    """

    def __init__(self, model: SiT, *, cfg_scale: float = 1.0, cfg_channels: int | str = 3,
                 autocast_dtype: torch.dtype | None = None, cast_weights: bool = False, compile: bool = False,
                 cuda_graphs: bool = False, compile_backend: str = "inductor"):
        device = next(model.parameters()).device
        if cuda_graphs and device.type != "cuda":
            raise UserError("--cuda-graphs needs a CUDA device")
        check_cfg_channels(cfg_channels)
        if cfg_scale != 1.0:
            model.check_null_class(f"guidance (cfg_scale {cfg_scale:g})")
        if model.training and model.y_embedder.dropout_prob > 0:  # upstream's sample.py calls model.eval()
            warnings.warn(f"the model is in training mode, where its label dropout gives "
                          f"{model.y_embedder.dropout_prob:.0%} of the labels at every call the null class "
                          f"(unguided samples): call model.eval() before sampling", stacklevel=2)
        if cast_weights and autocast_dtype is not None:
            model.cast_matmul_weights_(autocast_dtype)
        model.reuse_frozen_modulation = True  # the weights are fixed while these forwards sample
        self.model = model
        self.device = device
        self.cfg_scale = cfg_scale
        self.cfg_channels = cfg_channels
        self.null_label = model.num_classes

        def conditional(x, t, y, modulation_weights=None):
            with autocast_context(device, autocast_dtype):
                return model(x, t, y, modulation_weights).float()  # (B, C, H, W)

        def guided(x, t, y_pair, modulation_weights=None):
            with autocast_context(device, autocast_dtype):
                out = model(torch.cat([x, x]), torch.cat([t, t]), y_pair, modulation_weights)  # (2B, C, H, W)
            cond, uncond = out.float().chunk(2)
            return apply_guidance(cond, uncond, cfg_scale, cfg_channels)  # (B, C, H, W)

        if compile:
            # Compiled code would concatenate the adaLN weights again on every call: the concatenation
            # is taken (and kept) outside it, and passed in. Each forward is compiled from a code object
            # of its own (with_own_code): the closures of every ModelForwards share their code, on which
            # Dynamo guards the model and cfg_scale, so that the ninth of a process (another model, or
            # another scale) found Dynamo's recompile limit reached and ran eager, unsaid.
            conditional, guided = (_given_modulation_weights(model, torch.compile(with_own_code(fn),
                                                                                  backend=compile_backend,
                                                                                  dynamic=False))
                                   for fn in (conditional, guided))
        if cuda_graphs:
            conditional, guided = CUDAGraphForward(conditional), CUDAGraphForward(guided)
        self.conditional = conditional
        self.guided = guided

    def label_pair(self, y: torch.Tensor) -> torch.Tensor:
        """[y, null]: the labels of a doubled guidance batch, built once per batch."""
        return torch.cat([y, torch.full_like(y, self.null_label)])


def model_call_times(sampler_kind: str, transport, *, sampling_method: str, num_steps: int, reverse: bool = False,
                     diffusion_form: str = "SBDM", last_step: str | None = "Mean",
                     last_step_size: float = 0.04) -> list[float] | None:
    """The time of every model call a fixed-step sampler of sit_fast.transport makes, in order.

    ODE euler: t_i for i < n; ODE heun: t_i, t_{i+1} per step (grid of n + 1 points);
    SDE Euler: t_i per stochastic step, SDE Heun: t_i, t_{i+1}, over a grid of n points; then one
    call at the grid's end for the last step (none when last_step is None). The grids are built by
    the transport's own time_grid on the CPU. None for every other ODE method (torchdiffeq's adaptive
    ones choose their own times; the others are not counted here).
    """
    like = torch.empty(0)
    if sampler_kind == "ODE":
        if sampling_method not in ("euler", "heun"):
            return None
        t0, t1 = transport.check_interval(transport.train_eps, transport.sample_eps, sde=False, eval=True,
                                          reverse=False, last_step_size=0.0)
        if reverse:  # as Sampler.sample_ode: the same interval backwards, not reflected
            t0, t1 = t1, t0
        grid = time_grid(t0, t1, num_steps + 1, like).tolist()
        if sampling_method == "euler":
            return grid[:-1]
        return [t for i in range(num_steps) for t in (grid[i], grid[i + 1])]
    if sampler_kind == "SDE":
        size = 0.0 if last_step is None else last_step_size
        t0, t1 = transport.check_interval(transport.train_eps, transport.sample_eps, diffusion_form=diffusion_form,
                                          sde=True, eval=True, reverse=False, last_step_size=size)
        grid = time_grid(t0, t1, num_steps, like).tolist()
        if sampling_method == "Euler":
            times = grid[:-1]
        else:
            times = [t for i in range(num_steps - 1) for t in (grid[i], grid[i + 1])]
        return times + ([] if last_step is None else [grid[-1]])
    raise ValueError(f"unknown sampler kind {sampler_kind!r}")


INTERVAL_SLACK = 1e-6  # some float32 roundings near 1 (whose spacing there is 6e-8)


class Denoiser:
    """Chooses, per model call, the plain conditional forward or the guided one.

    cfg_scale == 1: always conditional (no doubled batch). cfg_interval=(low, high): guided only
    for low <= t <= high, decided from call_times (host floats, see model_call_times) when given,
    else from t itself (one host read per call; adaptive solvers synchronise per step anyway).
    """

    def __init__(self, forwards: ModelForwards, cfg_scale: float = 1.0,
                 cfg_interval: tuple[float, float] | None = None, call_times: Sequence[float] | None = None):
        if cfg_interval is not None and cfg_interval[0] > cfg_interval[1]:
            raise UserError(f"--cfg-interval {cfg_interval[0]} {cfg_interval[1]}: LOW must not exceed HIGH")
        self.forwards = forwards
        self.guidance = cfg_scale != 1.0
        self.cfg_interval = cfg_interval if self.guidance else None
        self.inside = None
        if self.cfg_interval is not None and call_times is not None:
            self.inside = [self._in_interval(t) for t in call_times]
            if call_times and not any(self.inside):
                raise UserError(f"--cfg-interval {cfg_interval[0]:g} {cfg_interval[1]:g}: none of the sampler's "
                                f"{len(call_times)} model calls (at t from {min(call_times):g} to "
                                f"{max(call_times):g}) falls inside it, so nothing would be guided: widen it, or "
                                f"pass --cfg-scale 1")

    def _in_interval(self, t: float) -> bool:
        low, high = self.cfg_interval
        # The times are float32 (a grid's t = 0.7 is 0.69999999): an end within INTERVAL_SLACK is inside
        return low - INTERVAL_SLACK <= t <= high + INTERVAL_SLACK

    def for_labels(self, y: torch.Tensor) -> "LabelledDenoiser":
        """The model_fn for one batch with labels y (the samplers call it as fn(x, t))."""
        return LabelledDenoiser(self, y)


class LabelledDenoiser:
    """model_fn(x, t) for one batch; counts its calls to look up the precomputed guidance decision."""

    def __init__(self, denoiser: Denoiser, y: torch.Tensor):
        self.denoiser = denoiser
        self.y = y
        self.y_pair = denoiser.forwards.label_pair(y) if denoiser.guidance else None
        self.calls = 0
        self.guided_calls = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        denoiser = self.denoiser
        call = self.calls
        self.calls += 1
        if not denoiser.guidance:
            guided = False
        elif denoiser.cfg_interval is None:
            guided = True
        elif denoiser.inside is not None:
            if call >= len(denoiser.inside):
                raise RuntimeError(
                    f"the sampler made more model calls ({call + 1}) than model_call_times predicted "
                    f"({len(denoiser.inside)}): sit_fast.transport changed, update model_call_times"
                )
            guided = denoiser.inside[call]
        else:
            guided = denoiser._in_interval(float(t[0]))
        if guided:
            self.guided_calls += 1
            return denoiser.forwards.guided(x, t, self.y_pair)
        return denoiser.forwards.conditional(x, t, self.y)

    def check_finished(self) -> None:
        """After a batch: the sampler made exactly the calls model_call_times predicted."""
        inside = self.denoiser.inside
        if inside is not None and self.calls != len(inside):
            raise RuntimeError(
                f"the sampler made {self.calls} model calls, model_call_times predicted {len(inside)}: "
                f"sit_fast.transport changed, update model_call_times"
            )


#################################################################################
#                           Seeds, noise and labels                              #
#################################################################################

def derived_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy's SeedSequence), e.g. (seed, index)."""
    return int(np.random.SeedSequence([v & 0xFFFFFFFFFFFFFFFF for v in values]).generate_state(1, np.uint64)[0]
               & 0x7FFFFFFFFFFFFFFF)


def index_noise(seed: int, indices: Sequence[int], shape: tuple[int, ...], num_classes: int,
                class_balanced: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial noise (N, *shape) and labels (N,) of images `indices`, each from its own CPU generator.

    Labels: index % num_classes with class_balanced, else uniform draws from the same generator.
    """
    noise = torch.empty(len(indices), *shape)
    labels = torch.empty(len(indices), dtype=torch.long)
    generator = torch.Generator()
    for row, index in enumerate(indices):
        generator.manual_seed(derived_seed(seed, index))
        noise[row] = torch.randn(shape, generator=generator)
        labels[row] = index % num_classes if class_balanced else torch.randint(num_classes, (), generator=generator)
    return noise, labels


#################################################################################
#                      FID samples: PNG folder -> ADM .npz                       #
#################################################################################

def png_path(sample_dir: str, index: int) -> str:
    return os.path.join(sample_dir, f"{index:06d}.png")


def pending_chunks(sample_dir: str, num_samples: int, chunk_size: int, names: set[str] | None = None) -> list[int]:
    """Chunks k (images k*chunk_size ... , below num_samples) with at least one PNG missing (`names`:
    the folder's, where the caller has listed it)."""
    present = names if names is not None else set(os.listdir(sample_dir)) if os.path.isdir(sample_dir) else set()
    pending = []
    for k in range(math.ceil(num_samples / chunk_size)):
        stop = min((k + 1) * chunk_size, num_samples)
        if any(f"{i:06d}.png" not in present for i in range(k * chunk_size, stop)):
            pending.append(k)
    return pending


# Settings recorded only since a later version: a record without them is compared on the rest.
RECORDED_LATER = frozenset({"ckpt_digest", "data_digest"})

# A setting recorded beside a digest of the file it names: where the record and the settings hold the
# same digest and the file named now is a zip archive (torch.save's format, whose digest is of every
# entry's CRC-32), the same checkpoint under another path (moved, copied, or reached through a link) is
# not a difference. Any other file's digest samples blocks of it, and a data folder's is of its image
# names alone, so those keep their path.
NAMED_BY_DIGEST = {"ckpt": "ckpt_digest"}

# The record's entries of what sets the outputs' rounding (check_settings: kept, not compared): that
# of its first outputs, and the others a resumed job computed with since (add_arithmetic).
ARITHMETIC, ARITHMETIC_LATER = "arithmetic", "arithmetic_later"


def settings_differences(recorded: dict, settings: dict, most: int = 3, flags: dict[str, str] | None = None) -> str:
    """The first `most` settings whose recorded value differs, "key: old there, new now; ...", or "";
    a key in `flags` is named by its flag there (--seed for seed), what the user changes to match.
    A setting the record lacks (written before it was kept) is "not recorded"; None, "none" (unset);
    one of NAMED_BY_DIGEST is compared by its digest where both hold it and it names a zip archive."""
    def word(value) -> str:
        return "none" if value is None else repr(value)

    def same_file(k: str) -> bool:
        digest = NAMED_BY_DIGEST.get(k)
        return (digest is not None and recorded.get(digest) is not None and recorded.get(digest) == settings.get(digest)
                and isinstance(settings.get(k), str) and zipfile.is_zipfile(settings[k]))

    flags = flags or {}
    differ = [f"{flags.get(k, k)}: {word(recorded[k]) if k in recorded else 'not recorded'} there, {word(v)} now"
              for k, v in settings.items()
              if recorded.get(k) != v and (k in recorded or k not in RECORDED_LATER) and not same_file(k)]
    return "; ".join(differ[:most]) + (" ..." if len(differ) > most else "")


def is_foreign_record(recorded: dict, settings: dict, holds: str) -> bool:
    """Whether a settings record is another kind of folder's (an FID folder's given as a latent cache's
    --out, say), not an earlier record of this kind (an FID run stopped before its first image, then
    started with the other sampler, whose flags differ in part). Records say what they are for since
    "holds" was added; an older one is another kind's when most of its keys are not this kind's."""
    if isinstance(recorded.get("holds"), str):
        return recorded["holds"] != holds
    extra = set(recorded) - set(settings) - RECORDED_LATER - {ARITHMETIC, ARITHMETIC_LATER}
    return bool(extra) and len(extra) >= len(set(recorded) & set(settings))


def check_settings(sample_dir: str, settings: dict, holds: str = "samples", flag: str = "--sample-dir",
                   outputs: str = r"\d{6}\.png", lock: FolderLock | None = None,
                   arithmetic: dict | None = None, flags: dict[str, str] | None = None) -> list[dict] | None:
    """Refuse to resume a folder written with other output-changing settings; record them otherwise.
    `holds` and `flag` name what the folder holds and the flag that picks another one, for the message,
    which names a setting by its flag in `flags` where it has one (settings_differences);
    files matching `outputs` in a folder without settings.json (another program's, or the record lost)
    are refused too, as their settings are unknown. A folder that holds no outputs yet (a run stopped
    before its first one: out of memory at the first batch, say) takes the new settings. `lock` is
    acquired before the record is read (a job running on the folder now is refused), and held on.

    `arithmetic`, what sets the outputs' rounding but not what they are (the attention backend, say),
    is recorded beside the settings and not compared: a folder resumed returns those its record holds
    (that of its first outputs, then those add_arithmetic added), for the caller to tell of a change;
    None for a folder started now, or one recorded before the arithmetic was kept."""
    path = os.path.join(sample_dir, "settings.json")
    if os.path.exists(sample_dir) and not os.path.isdir(sample_dir):
        raise UserError(f"{flag} {sample_dir} is a file: pass a folder")
    make_writable_folder(sample_dir, f"{flag} {sample_dir}")
    if lock is not None:
        lock.acquire()
    present = [n for n in os.listdir(sample_dir) if re.fullmatch(outputs, n)]
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder, where the settings of the {holds} in {sample_dir} are recorded: move "
                        f"it, or pass another {flag}")
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                recorded = json.load(f)
            problem = None if isinstance(recorded, dict) else "not a dict"
        except (OSError, ValueError) as err:
            problem = str(err)
        if not present and problem is None and is_foreign_record(recorded, settings, holds):
            extra = sorted(set(recorded) - set(settings) - {"holds"})
            raise UserError(f"{path} records the settings of something else ({', '.join(extra[:3])}"
                            f"{', ...' if len(extra) > 3 else ''}), not of {holds}: pass another {flag}")
    if os.path.isfile(path) and present:  # outputs of ours: the record must be readable, and the same
        if problem is not None:
            raise UserError(f"cannot read {path} ({problem}): it records the settings of the {holds} in "
                            f"{sample_dir}; restore it, or pass another {flag}")
        differ = settings_differences(recorded, settings, flags=flags)
        if differ:
            raise UserError(f"{sample_dir} holds {holds} made with other settings ({differ}): pass another {flag}, "
                            f"or delete it to start over")
        kept = recorded_arithmetic(recorded)
        if not RECORDED_LATER & settings.keys() <= recorded.keys():  # a record from before they were kept
            record_settings(path, settings, holds, kept)
        return kept
    if present:
        count = f"{len(present)} file{'s' if len(present) > 1 else ''} like {min(present)}"
        raise UserError(f"{sample_dir} holds {holds} ({count}) but no settings.json, so what made them is "
                        f"unknown: pass another {flag}, or delete them to start over")
    try:
        record_settings(path, settings, holds, arithmetic)
    except OSError as err:  # before the job's first output: there is none to keep
        raise write_failed(path, err, "nothing was computed yet", "run the same command again") from None
    return None


def recorded_arithmetic(recorded: dict) -> list[dict] | None:
    """The arithmetics a settings record holds, its first outputs' first; None where it has none."""
    first, later = recorded.get(ARITHMETIC), recorded.get(ARITHMETIC_LATER, [])
    if not isinstance(first, dict) or not isinstance(later, list):
        return None
    return [first, *(entry for entry in later if isinstance(entry, dict))]


def record_settings(path: str, settings: dict, holds: str, arithmetic: dict | list[dict] | None = None) -> None:
    """settings.json: the settings, what the folder holds and the arithmetic(s) of its outputs (none
    of them compared with the settings: not one of them)."""
    arithmetic = [arithmetic] if isinstance(arithmetic, dict) else arithmetic or []
    extra = {"holds": holds, **({ARITHMETIC: arithmetic[0]} if arithmetic else {}),
             **({ARITHMETIC_LATER: arithmetic[1:]} if len(arithmetic) > 1 else {})}
    text = json.dumps({**settings, **extra}, indent=1, sort_keys=True) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def add_arithmetic(sample_dir: str, arithmetic: dict) -> None:
    """Record in the folder's settings.json that outputs are now computed with `arithmetic` too (a job
    resumed with another one than the record's), so that a later resume knows the folder mixes them."""
    path = os.path.join(sample_dir, "settings.json")
    with open(path, encoding="utf-8") as f:
        recorded = json.load(f)
    kept = recorded_arithmetic(recorded)
    if kept is None or arithmetic in kept:
        return
    recorded[ARITHMETIC_LATER] = [*kept[1:], arithmetic]
    text = json.dumps(recorded, indent=1, sort_keys=True) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


class PNGWriter:
    """Writes numbered PNGs on background threads (PNG compression releases the GIL), atomically:
    each file is written under a temporary name and renamed, so a killed run leaves no torn PNG."""

    def __init__(self, sample_dir: str, max_workers: int = 2):
        self.sample_dir = sample_dir
        self.pool = ThreadPoolExecutor(max_workers=max_workers)
        self.futures: list[Future] = []

    def write(self, images: np.ndarray, indices: Sequence[int]) -> None:
        """images: (N, H, W, 3) uint8. Waits, if need be, until at most one earlier batch is still
        queued: a sampler faster than the writes holds two batches of images in memory, not its share."""
        running = []
        for future in self.futures:
            if future.done():
                self.result(future)  # re-raise a failed write now rather than at the end
            else:
                running.append(future)
        self.futures = running
        while len(self.futures) > len(indices):
            self.result(self.futures[0])  # a Ctrl-C meanwhile leaves it listed: close() waits for it
            self.futures.pop(0)
        for image, index in zip(images, indices):
            self.futures.append(self.pool.submit(_write_png, image, png_path(self.sample_dir, index)))

    def close(self) -> None:
        """Wait for every PNG; re-raise the first error."""
        try:
            for future in self.futures:
                self.result(future)
        finally:
            self.shutdown()

    def __enter__(self) -> PNGWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """close(); where the block raised, its error is the one raised: a failed write's, said by close(),
        does not take its place (a Ctrl-C stays a stop, whose line counts the PNGs kept)."""
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except Exception:  # noqa: BLE001 -- the block's own error goes on
            pass

    def result(self, future: Future) -> None:
        """A PNG's write done; a write that failed, refused (a full disk) or not (a failing disk's EIO), is
        one line, said once the writes in flight are done (each whole or absent) and the PNGs counted."""
        try:
            _wait_awake([future])
            future.result()
        except OSError as err:
            self.shutdown()
            raise write_failed(err.filename or self.sample_dir, err, written_kept(images_in(self.sample_dir), "image"),
                               "run the same command again to sample the rest") from None

    def shutdown(self) -> None:
        """The writes in flight finished, then the threads ended."""
        _wait_awake(self.futures)
        self.pool.shutdown(wait=True)


def _wait_awake(futures: Sequence[Future]) -> None:
    """Until every future is done, in waits of 0.2 s: a signal the kernel gave another thread than the main
    one (Ctrl-C's, where one of our writers or a library's thread took it) has its handler run by the main
    thread between two waits, not once the write in flight ends (one long wait sees none: a second Ctrl-C
    that stops at once would wait for it)."""
    pending = set(futures)
    while pending:
        pending = wait(pending, timeout=0.2).not_done


def _write_png(image: np.ndarray, path: str) -> None:
    from PIL import Image

    # fsynced and renamed, under a name of this process's own (another job on the folder); an OSError names `path`
    atomic_write(path, lambda f: Image.fromarray(image).save(f, format="PNG"))


def images_in(sample_dir: str, names: Sequence[str] | None = None) -> int:
    """How many numbered PNGs the folder holds (names: its listing, where taken; 0 where it cannot be
    listed)."""
    try:
        names = os.listdir(sample_dir) if names is None else names
    except OSError:
        return 0
    return sum(re.fullmatch(r"\d{6}\.png", name) is not None for name in names)


def foreign_npz(path: str) -> str | None:
    """Why a file at `path` is not to be replaced by build_npz's archive (arr_0 alone), or None: there is
    none, or it is one (an earlier run's)."""
    if not os.path.lexists(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return "is no .npz archive"
    if names == ["arr_0.npy"]:
        return None
    others = [os.path.splitext(name)[0] for name in names if name != "arr_0.npy"]
    if not others:
        return "holds no arr_0"
    held = f"holds {', '.join(others[:4])}{' and more' if len(others) > 4 else ''}"
    return f"{held} beside arr_0 (an ADM reference batch?)" if "arr_0.npy" in names else f"{held}, not arr_0"


def build_npz(sample_dir: str, num_samples: int, npz_path: str, progress: bool = True) -> tuple[int, ...]:
    """Stack PNGs 000000 ... num_samples - 1 into npz_path as arr_0, (N, H, W, 3) uint8 (ADM's format).

    The array is streamed into the archive an image at a time (np.savez's layout: an uncompressed
    arr_0.npy, which ADM's evaluator also reads in batches), so memory holds one image, not all N
    (50,000 at 512px are 39 GB); written whole or not at all (atomic_write). Returns the shape.
    """
    from PIL import Image

    def read(index: int) -> np.ndarray:
        path = png_path(sample_dir, index)
        try:
            with Image.open(path) as image:
                return np.asarray(image.convert("RGB"))
        except FileNotFoundError:  # written by a process that sees another folder, or deleted meanwhile
            record = os.path.join(sample_dir, "settings.json")
            if not os.path.exists(record):  # the job's record gone with it
                raise UserError(f"{path} is missing, and so is {record}: the folder was deleted or emptied while "
                                f"the job ran; delete it and run the command again") from None
            raise UserError(f"{path} is missing, which a process of this job wrote: is the folder on a "
                            f"filesystem every process sees? The same command samples it again") from None
        except (OSError, SyntaxError) as err:  # PIL's errors for a damaged or cut-short file
            raise UserError(f"{path} cannot be read ({first_line(err)}): delete it, and the same command "
                            f"samples it again") from None

    first = read(0)
    shape = (num_samples, *first.shape)
    header = {"descr": np.lib.format.dtype_to_descr(first.dtype), "fortran_order": False, "shape": shape}

    def write(f) -> None:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive, \
                archive.open("arr_0.npy", "w", force_zip64=True) as member, \
                progress_display(num_samples, "building .npz", "img", disable=not progress) as bar:
            np.lib.format.write_array_header_1_0(member, header)
            for i in range(num_samples):
                image = first if i == 0 else read(i)
                if image.shape != first.shape:
                    raise UserError(f"{png_path(sample_dir, i)} is {image.shape[1]}x{image.shape[0]}, image 0 "
                                    f"{first.shape[1]}x{first.shape[0]}: delete it, and the same command samples "
                                    f"it again")
                member.write(np.ascontiguousarray(image).tobytes())
                bar.update()

    atomic_write(npz_path, write)
    return shape


def npz_array(path: str, key: str = "arr_0") -> np.ndarray:
    """Array `key` of the .npz at `path`, memory-mapped where the archive stores it uncompressed (as
    np.savez and build_npz do): the pages are read from disk as the array is indexed, and shared by
    the processes of one machine, so a process holds only what it reads. A compressed member
    (np.savez_compressed), or a header numpy's public readers do not parse, is read whole."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(f"{key}.npy")
        mapped = None
        if info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 0x1:  # 0x1: encrypted
            with archive.open(info) as member:
                version = np.lib.format.read_magic(member)
                read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                               (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                if read_header is not None:
                    shape, fortran_order, dtype = read_header(member)
                    mapped = (shape, fortran_order, dtype, member.tell())
    if mapped is not None:
        shape, fortran_order, dtype, header_size = mapped
        if not dtype.hasobject and math.prod(shape) > 0:
            with open(path, "rb") as f:  # the member's data follows its local header, whose extra field
                f.seek(info.header_offset)  # (zip64 sizes) may differ in length from the directory's
                local = f.read(30)
            name_size, extra_size = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
            offset = info.header_offset + 30 + name_size + extra_size + header_size
            return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape,
                             order="F" if fortran_order else "C")
    with np.load(path) as archive:
        return archive[key]


def to_rgb_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 1 or 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8 (grey repeated to RGB): the FID samples,
    rounded as upstream's sample_ddp.py rounds them (images.to_uint8's "sample_ddp"), so the .npz is
    upstream's byte for byte for the same decoded images."""
    from sit_fast.images import to_uint8

    arr = to_uint8(images, rounding="sample_ddp")  # (N, H, W, C)
    return np.repeat(arr, 3, axis=-1) if arr.shape[-1] == 1 else arr
