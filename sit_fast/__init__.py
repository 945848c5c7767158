"""sit_fast: SiT (Scalable Interpolant Transformers) with upstream maths and fused fast paths."""
from sit_fast.checkpoint import CheckpointError, infer_config, load_checkpoint, load_into_model, read_checkpoint
from sit_fast.models import SiT, SiT_models
from sit_fast.transport import Sampler, create_transport

__version__ = "0.1.0"
__all__ = [
    "SiT", "SiT_models", "CheckpointError", "read_checkpoint", "load_checkpoint", "load_into_model",
    "infer_config", "create_transport", "Sampler",
]
