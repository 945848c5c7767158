"""argparse groups for the transport, ODE and SDE options, with upstream SiT's flags and defaults.

The ODE and SDE groups both define --sampling-method (with different defaults); a script adds one
of them, as upstream's sample.py does per mode.
"""
import argparse

from sit_fast.argtypes import end_margin, fraction_below_one, nonnegative_float
from sit_fast.transport.integrators import ODE_METHODS, SDE_METHODS
from sit_fast.transport.path import DIFFUSION_FORMS


def none_or_str(value):
    """argparse type: "None" (or "none", as --grad-clip and --max-steps take it) becomes None, anything
    else stays a string."""
    return None if value.lower() == "none" else value


SAMPLE_EPS_DEFAULT = 1e-3  # upstream's


def in_flag_words(err: ValueError) -> str:
    """A transport error's message with the eps or last_step_size it starts with (Transport.check_interval's
    train_eps, sample_eps or an SDE's last_step_size), and an SDE's last_step_size after an eps, named as the
    flags that set them: --train-eps, --sample-eps, --last-step-size."""
    message = str(err)
    for which in ("sample_eps", "train_eps", "last_step_size"):
        if message.startswith(which):
            message = f"--{which.replace('_', '-')}{message[len(which):]}"
            return message.replace(" and last_step_size ", " and --last-step-size ", 1)
    return message


def add_transport_args(parser: argparse.ArgumentParser, train_eps_default: float | None = 1e-5,
                       train_eps_help: str | None = None):
    """Add --path-type, --prediction, --loss-weight, --sample-eps, --train-eps; returns the group.

    train_eps_default None: decided later (train.py: by path and prediction), as train_eps_help says."""
    group = parser.add_argument_group("Transport arguments")
    group.add_argument("--path-type", type=str, default="Linear", choices=["Linear", "GVP", "VP"],
                       help="interpolant between noise (t=0) and data (t=1)")
    group.add_argument("--prediction", type=str, default="velocity", choices=["velocity", "score", "noise"],
                       help="what the model predicts")
    group.add_argument("--loss-weight", type=none_or_str, default=None, choices=[None, "velocity", "likelihood"],
                       help="time weighting of score / noise losses (None: unweighted)")
    group.add_argument("--sample-eps", type=end_margin, default=SAMPLE_EPS_DEFAULT,
                       help="distance kept from the singular ends of [0, 1] when sampling")
    group.add_argument("--train-eps", type=end_margin, default=train_eps_default,
                       help="distance kept from the singular ends of [0, 1] when training"
                            + (f" (default: {train_eps_help})" if train_eps_help else ""))
    return group


def add_ode_args(parser: argparse.ArgumentParser):
    """Add --sampling-method, --atol, --rtol, --reverse, --likelihood; returns the group."""
    group = parser.add_argument_group("ODE arguments")
    group.add_argument("--sampling-method", type=str, default="dopri5", choices=list(ODE_METHODS),
                       help="ODE solver: our fixed-step euler / heun or a torchdiffeq method")
    group.add_argument("--atol", type=nonnegative_float, default=1e-6,
                       help="absolute tolerance of adaptive solvers (and of implicit_adams' corrector); "
                            "0 with a positive --rtol: relative error only")
    group.add_argument("--rtol", type=nonnegative_float, default=1e-3,
                       help="relative tolerance of adaptive solvers (and of implicit_adams' corrector)")
    group.add_argument("--reverse", action="store_true", help="integrate from data to noise")
    group.add_argument("--likelihood", action="store_true", help="compute the log-likelihood of the data")
    return group


def add_sde_args(parser: argparse.ArgumentParser):
    """Add --sampling-method, --diffusion-form, --diffusion-norm, --last-step, --last-step-size."""
    group = parser.add_argument_group("SDE arguments")
    group.add_argument("--sampling-method", type=str, default="Euler", choices=list(SDE_METHODS),
                       help="SDE solver: Euler-Maruyama or stochastic Heun")
    group.add_argument("--diffusion-form", type=str, default="sigma", choices=list(DIFFUSION_FORMS),
                       help="form of the diffusion coefficient w_t of the SDE (default: sigma, as upstream's CLI; "
                            "Sampler.sample_sde's is SBDM, as upstream's)")
    group.add_argument("--diffusion-norm", type=nonnegative_float, default=1.0,
                       help="magnitude of the diffusion coefficient")
    group.add_argument("--last-step", type=none_or_str, default="Mean", choices=[None, "Mean", "Tweedie", "Euler"],
                       help="form of the last, noise-free step taken to t=1 (None: no last step)")
    group.add_argument("--last-step-size", type=fraction_below_one, default=0.04,
                       help="size of the last step (in (0, 1); with --last-step None it is not used)")
    return group
