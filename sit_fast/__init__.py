"""sit_fast: SiT (Scalable Interpolant Transformers) with upstream maths and fused fast paths.

The names below load on first use, so `python -m sit_fast.<module>` and the scripts start with no
torch import of the package's own: a Ctrl-C while torch loads ends them quietly (errors.py)."""
import importlib
import importlib.util

__version__ = "0.1.0"
_HOMES = {
    "SiT": "sit_fast.models", "SiT_models": "sit_fast.models",
    "CheckpointError": "sit_fast.checkpoint", "read_checkpoint": "sit_fast.checkpoint",
    "load_checkpoint": "sit_fast.checkpoint", "load_into_model": "sit_fast.checkpoint",
    "infer_config": "sit_fast.checkpoint",
    "create_transport": "sit_fast.transport", "Sampler": "sit_fast.transport",
}
__all__ = list(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        value = getattr(importlib.import_module(_HOMES[name]), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"sit_fast.{name}") is not None:
        value = importlib.import_module(f"sit_fast.{name}")  # `import sit_fast; sit_fast.models.SiT`, as before
    else:
        raise AttributeError(f"module 'sit_fast' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))
