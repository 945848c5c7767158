"""SiT's transport: interpolant paths, training losses and ODE / SDE samplers (upstream API).

    transport = create_transport("Linear", "velocity")
    loss = transport.training_losses(model, x1, dict(y=y))["loss"].mean()
    sample_fn = Sampler(transport).sample_ode(sampling_method="dopri5")
    samples = sample_fn(z, model, **model_kwargs)[-1]
"""
from sit_fast.transport import path
from sit_fast.transport.args import (SAMPLE_EPS_DEFAULT, add_ode_args, add_sde_args, add_transport_args, in_flag_words,
                                     none_or_str)
from sit_fast.transport.integrators import ODE_METHODS, SDE_METHODS
from sit_fast.transport.path import DIFFUSION_FORMS, GVPCPlan, ICPlan, VPCPlan, expand_t_like_x
from sit_fast.transport.transport import LAST_STEPS, ModelType, PathType, Sampler, Transport, WeightType
from sit_fast.transport.utils import check_choice, mean_flat

PATH_TYPES = {"Linear": PathType.LINEAR, "GVP": PathType.GVP, "VP": PathType.VP}
PREDICTIONS = {"velocity": ModelType.VELOCITY, "score": ModelType.SCORE, "noise": ModelType.NOISE}
LOSS_WEIGHTS = {None: WeightType.NONE, "velocity": WeightType.VELOCITY, "likelihood": WeightType.LIKELIHOOD}


def create_transport(path_type="Linear", prediction="velocity", loss_weight=None, train_eps=None, sample_eps=None):
    """Build a Transport from upstream's string options.

    path_type: "Linear", "GVP" or "VP".
    prediction: what the model predicts, "velocity", "score" or "noise".
    loss_weight: None, "velocity" or "likelihood"; weights the score / noise losses only.
    train_eps, sample_eps: distance kept from the singular ends of [0, 1] when training and
        sampling (see Transport.check_interval). Defaults: VP 1e-5 / 1e-3; Linear and GVP with a
        score or noise model 1e-3 / 1e-3; Linear and GVP velocity models train on all of [0, 1]
        (train_eps 0) and use sample_eps = 1e-3 only where an SDE needs it (the SBDM start and a
        run without a last step). Where the interval has an end eps would move, the value passed in
        is used (upstream's replaced some by 0 or 1e-3); Linear and GVP velocity models train, and solve
        ODEs, on the whole [0, 1] whatever is passed, as upstream (Transport.eps_matters says where).
        An unknown option raises ValueError.
    """
    check_choice("path_type", path_type, tuple(PATH_TYPES))
    check_choice("prediction", prediction, tuple(PREDICTIONS))
    check_choice("loss_weight", loss_weight, tuple(LOSS_WEIGHTS))
    path_kind, model_type = PATH_TYPES[path_type], PREDICTIONS[prediction]
    if path_kind == PathType.VP:
        default_train_eps = 1e-5
    elif model_type != ModelType.VELOCITY:
        default_train_eps = 1e-3
    else:
        default_train_eps = 0.0
    return Transport(
        model_type=model_type,
        path_type=path_kind,
        loss_type=LOSS_WEIGHTS[loss_weight],
        train_eps=default_train_eps if train_eps is None else train_eps,
        sample_eps=SAMPLE_EPS_DEFAULT if sample_eps is None else sample_eps,
    )


__all__ = [
    "create_transport", "Transport", "Sampler", "ModelType", "PathType", "WeightType", "mean_flat", "check_choice",
    "path", "ICPlan", "VPCPlan", "GVPCPlan", "expand_t_like_x", "DIFFUSION_FORMS", "LAST_STEPS", "ODE_METHODS",
    "SDE_METHODS", "SAMPLE_EPS_DEFAULT", "PATH_TYPES", "PREDICTIONS", "LOSS_WEIGHTS", "add_transport_args",
    "add_ode_args", "add_sde_args", "none_or_str", "in_flag_words",
]
