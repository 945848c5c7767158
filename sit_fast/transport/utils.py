"""Small helpers shared by the transport modules."""
import torch


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension except the batch: (B, ...) -> (B,)."""
    return x.mean(dim=tuple(range(1, x.dim())))


def check_choice(name: str, value, choices) -> None:
    """Raise a one-line ValueError naming the valid choices when `value` is not one of them."""
    if value not in choices:
        listed = ", ".join(repr(choice) for choice in choices)
        raise ValueError(f"unknown {name} {value!r}; valid choices: {listed}")
