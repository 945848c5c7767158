"""Tests of sit_fast.transport against a Gaussian toy problem with closed-form answers.

Data x1 ~ N(MU, diag(STD^2)) in two dimensions, noise x0 ~ N(0, I), x_t = alpha_t x1 + sigma_t x0.
Then x_t ~ N(alpha_t MU, var_t) with var_t = alpha_t^2 STD^2 + sigma_t^2, and the optimal
predictors are affine in x:
    x1_hat = MU + alpha_t STD^2 (x - alpha_t MU) / var_t,   x0_hat = sigma_t (x - alpha_t MU) / var_t,
    score = -(x - alpha_t MU) / var_t,                       velocity = alpha'_t x1_hat + sigma'_t x0_hat.
The paths' coefficients are written out again here, independently of sit_fast.transport.path.
"""
import argparse
import math
import re

import pytest
import torch

from sit_fast.transport import (
    DIFFUSION_FORMS,
    LAST_STEPS,
    ModelType,
    PathType,
    SDE_METHODS,
    Sampler,
    WeightType,
    add_ode_args,
    add_sde_args,
    add_transport_args,
    create_transport,
    in_flag_words,
    mean_flat,
)

MU = torch.tensor([1.5, -0.5])
STD = torch.tensor([0.5, 1.2])
PATHS = ("Linear", "GVP", "VP")
PREDICTIONS = ("velocity", "score", "noise")
SDE_SAMPLES = 8192
SDE_STEPS = 100


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """The toy tensors are tiny: one thread is faster and immune to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# Reference maths
# ---------------------------------------------------------------------------------------------

def ref_coefficients(path_type, t):
    """(alpha_t, alpha'_t, sigma_t, sigma'_t) of each path."""
    if path_type == "Linear":
        return t, torch.ones_like(t), 1 - t, -torch.ones_like(t)
    if path_type == "GVP":
        half_pi = math.pi / 2
        return (torch.sin(half_pi * t), half_pi * torch.cos(half_pi * t),
                torch.cos(half_pi * t), -half_pi * torch.sin(half_pi * t))
    log_alpha = -0.25 * (1 - t) ** 2 * (20.0 - 0.1) - 0.5 * (1 - t) * 0.1
    d_log_alpha = 0.5 * (1 - t) * (20.0 - 0.1) + 0.5 * 0.1
    alpha = torch.exp(log_alpha)
    sigma = torch.sqrt(1 - alpha**2)
    return alpha, alpha * d_log_alpha, sigma, -alpha**2 * d_log_alpha / sigma


def ref_posterior(path_type, x, t):
    """Closed-form (x1_hat, x0_hat, score, velocity) at x, t (t broadcastable against x)."""
    alpha, d_alpha, sigma, d_sigma = ref_coefficients(path_type, t)
    mu, std = MU.to(x), STD.to(x)
    var = alpha**2 * std**2 + sigma**2
    centred = (x - alpha * mu) / var
    x1_hat = mu + alpha * std**2 * centred
    x0_hat = sigma * centred
    return x1_hat, x0_hat, -centred, d_alpha * x1_hat + d_sigma * x0_hat


def closed_form_model(path_type, prediction):
    """The optimal model of `prediction` type, called as model(x, t) with t of shape (B,)."""
    index = {"velocity": 3, "score": 2, "noise": 1}[prediction]

    def model(x, t):
        return ref_posterior(path_type, x, t.reshape(-1, 1).to(x.dtype))[index]

    return model


def ref_diffusion(path_type, form, t, norm=1.0):
    """w_t of each diffusion form."""
    alpha, d_alpha, sigma, d_sigma = ref_coefficients(path_type, t)
    return {
        "constant": norm * torch.ones_like(t),
        "SBDM": norm * (sigma**2 * d_alpha / alpha - sigma * d_sigma),
        "sigma": norm * sigma,
        "linear": norm * (1 - t),
        "decreasing": 0.25 * (norm * torch.cos(math.pi * t) + 1) ** 2,
        "increasing-decreasing": norm * torch.sin(math.pi * t) ** 2,
    }[form]


def marginal(path_type, t):
    """Mean and variance of x_t per dimension (float64)."""
    t = torch.tensor(t, dtype=torch.float64)
    alpha, _, sigma, _ = ref_coefficients(path_type, t)
    return alpha * MU.double(), alpha**2 * STD.double() ** 2 + sigma**2


def exact_flow(path_type, x, t_from, t_to):
    """The probability-flow ODE map from time t_from to t_to: it keeps (x - mean_t) / std_t fixed."""
    mean_from, var_from = marginal(path_type, t_from)
    mean_to, var_to = marginal(path_type, t_to)
    return (mean_to + torch.sqrt(var_to / var_from) * (x.double() - mean_from)).to(x.dtype)


def expected_sde_output(path_type, form, last_step, last_step_size, sample_eps=1e-3):
    """Mean and std of the SDE sampler's output: the marginal at t1 pushed through the last step.

    Every last step is affine in x for the toy problem, so F(mean) and |F(mean + std) - F(mean)|
    are the output's mean and std.
    """
    t1 = 1 - last_step_size if last_step is not None else 1 - sample_eps
    mean, var = marginal(path_type, t1)
    t = torch.tensor(t1, dtype=torch.float64)

    def last_step_map(x):
        x1_hat, _, score, velocity = ref_posterior(path_type, x, t)
        if last_step is None:
            return x
        if last_step == "Tweedie":
            return x1_hat
        if last_step == "Euler":
            return x + last_step_size * velocity
        return x + last_step_size * (velocity + ref_diffusion(path_type, form, t) * score)

    out_mean = last_step_map(mean)
    return out_mean, (last_step_map(mean + var.sqrt()) - out_mean).abs()


def assert_moments(samples, expected_mean, expected_std, mean_tol, std_tol, label):
    """Sample mean within mean_tol expected stds of its target; sample std within std_tol relative."""
    samples = samples.double()
    mean_err = ((samples.mean(0) - expected_mean) / expected_std).abs().max().item()
    std_err = (samples.std(0) / expected_std - 1).abs().max().item()
    assert torch.isfinite(samples).all(), f"{label}: non-finite samples"
    assert mean_err < mean_tol and std_err < std_tol, (
        f"{label}: mean {samples.mean(0).tolist()} vs {expected_mean.tolist()} (err {mean_err:.3f} std units, "
        f"tol {mean_tol}); std {samples.std(0).tolist()} vs {expected_std.tolist()} (rel err {std_err:.3f}, "
        f"tol {std_tol})")


class CountingModel:
    """Wraps a model and counts its calls."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, x, t, **model_kwargs):
        self.calls += 1
        return self.model(x, t)


# ---------------------------------------------------------------------------------------------
# Paths and intervals
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path_type", PATHS)
def test_path_coefficients_match_reference(path_type):
    plan = create_transport(path_type).path_sampler
    t = torch.linspace(0.01, 0.99, 37, dtype=torch.float64)
    got = plan.compute_alpha_t(t) + plan.compute_sigma_t(t)
    for name, value, expected in zip(("alpha", "d_alpha", "sigma", "d_sigma"), got, ref_coefficients(path_type, t)):
        torch.testing.assert_close(value, expected, msg=f"{path_type} {name}")
    x = torch.randn(37, 2, dtype=torch.float64)
    _, beta = plan.compute_drift(x, t)
    torch.testing.assert_close(beta[:, 0], ref_diffusion(path_type, "SBDM", t), msg=f"{path_type} beta_t")
    for form in DIFFUSION_FORMS:
        w = plan.compute_diffusion(x, t, form=form, norm=0.7)
        torch.testing.assert_close(w[:, 0], ref_diffusion(path_type, form, t, norm=0.7), msg=f"{path_type} {form}")
        w_over_sigma = plan.compute_diffusion_over_sigma(x, t, form=form, norm=0.7)
        torch.testing.assert_close(w_over_sigma[:, 0], w[:, 0] / ref_coefficients(path_type, t)[2])


@pytest.mark.parametrize("path_type", PATHS)
def test_prediction_conversions_agree(path_type):
    plan = create_transport(path_type).path_sampler
    t = torch.linspace(0.02, 0.98, 25, dtype=torch.float64)
    x = torch.randn(25, 2, dtype=torch.float64) * 2
    x1_hat, x0_hat, score, velocity = ref_posterior(path_type, x, t[:, None])
    torch.testing.assert_close(plan.get_score_from_velocity(velocity, x, t), score)
    torch.testing.assert_close(plan.get_noise_from_velocity(velocity, x, t), x0_hat)
    torch.testing.assert_close(plan.get_velocity_from_score(score, x, t), velocity)
    torch.testing.assert_close(plan.get_velocity_from_noise(x0_hat, x, t), velocity)
    torch.testing.assert_close(plan.get_data_from_noise(x0_hat, x, t), x1_hat)


@pytest.mark.parametrize("path_type", ("Linear", "GVP"))
def test_velocity_conversions_are_finite_at_both_ends(path_type):
    """Upstream divided by alpha'_t, which is 0 at t = 1 on GVP; the noise must stay finite there."""
    plan = create_transport(path_type).path_sampler
    t = torch.tensor([0.0, 1.0])
    x = torch.randn(2, 2)
    noise = plan.get_noise_from_velocity(ref_posterior(path_type, x, t[:, None])[3], x, t)
    assert torch.isfinite(noise).all()
    torch.testing.assert_close(noise[0], x[0])  # at t = 0, x_t is the noise itself
    for form in ("SBDM", "sigma"):
        assert torch.isfinite(plan.compute_diffusion_over_sigma(x, t[1:].expand(2), form=form)).all()


def test_gvp_coefficients_are_exactly_0_at_the_ends():
    """sigma_t and alpha'_t are exactly 0 at t = 1 (alpha_t and sigma'_t at t = 0) in float32 too, so the
    singular end is where the maths puts it: cos(pi / 2) in float32 is -4.4e-8, a negative sigma_t that
    gives a finite score of the wrong sign."""
    plan = create_transport("GVP").path_sampler
    ends = torch.tensor([0.0, 1.0])
    (alpha, d_alpha), (sigma, d_sigma) = plan.compute_alpha_t(ends), plan.compute_sigma_t(ends)
    assert alpha[0] == 0 and d_sigma[0] == 0 and sigma[1] == 0 and d_alpha[1] == 0
    assert alpha[1] == 1 and sigma[0] == 1 and d_alpha[0] == -d_sigma[1] == math.pi / 2


def test_vp_sigma_t_keeps_its_precision_in_float32_near_t_1():
    """sigma_t = sqrt(1 - alpha_t^2) with alpha_t -> 1: computed as 1 - exp(2 m(t)) in float32 it would be
    0.5% off at t = 1 - 1e-5 (VP's default train_eps, where the loss weights divide by sigma_t^2)."""
    plan = create_transport("VP").path_sampler
    t = torch.tensor([1 - 1e-5, 1 - 1e-4, 0.999, 0.99]) - 1e-6 * torch.rand(4)
    _, _, ref_sigma, ref_d_sigma = ref_coefficients("VP", t.double())
    sigma, d_sigma = plan.compute_sigma_t(t)
    assert sigma.dtype == d_sigma.dtype == torch.float32
    torch.testing.assert_close(sigma.double(), ref_sigma, rtol=1e-6, atol=0)
    torch.testing.assert_close(d_sigma.double(), ref_d_sigma, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "path_type, prediction, kwargs, expected",
    [
        ("Linear", "velocity", dict(), (0.0, 1.0)),
        ("Linear", "velocity", dict(sde=True, diffusion_form="constant", last_step_size=0.04), (0.0, 0.96)),
        ("Linear", "velocity", dict(sde=True, diffusion_form="SBDM", last_step_size=0.04), (1e-3, 0.96)),
        ("GVP", "velocity", dict(sde=True, diffusion_form="sigma"), (0.0, 1 - 1e-3)),
        ("Linear", "score", dict(), (1e-3, 1 - 1e-3)),
        ("GVP", "noise", dict(reverse=True), (1 - 1e-3, 1e-3)),
        ("VP", "velocity", dict(), (0.0, 1 - 1e-3)),
        ("VP", "noise", dict(sde=True, last_step_size=0.04), (0.0, 0.96)),
        ("VP", "velocity", dict(reverse=True), (1.0, 1e-3)),  # upstream's reflection (1 - t0, 1 - t1)
    ],
)
def test_check_interval(path_type, prediction, kwargs, expected):
    transport = create_transport(path_type, prediction)
    t0, t1 = transport.check_interval(transport.train_eps, transport.sample_eps, eval=True, **kwargs)
    assert (t0, t1) == pytest.approx(expected)


def test_eps_defaults_and_overrides():
    """Upstream tested train_eps when defaulting sample_eps; here each default follows its own argument."""
    assert create_transport("VP", train_eps=1e-4).sample_eps == 1e-3
    assert create_transport("VP").train_eps == 1e-5
    assert create_transport("Linear", "score", train_eps=1e-4).sample_eps == 1e-3
    assert create_transport("Linear", "score", sample_eps=1e-2).train_eps == 1e-3
    assert create_transport("GVP", "noise", None, 2e-2, 3e-2).sample_eps == 3e-2
    assert create_transport("Linear", "velocity", sample_eps=5e-3).sample_eps == 5e-3


def test_zero_eps_at_a_singular_end_is_refused():
    """Each refusal names what is singular: the diffusion, the velocity's score, the model, the loss weight."""
    with pytest.raises(ValueError, match="sample_eps must be > 0 here: the SBDM diffusion is infinite at t = 0") as err:
        Sampler(create_transport("GVP", sample_eps=0.0)).sample_sde(diffusion_form="SBDM")
    with pytest.raises(ValueError, match="the SBDM diffusion is infinite at t = 0") as at_both_ends:
        Sampler(create_transport("Linear", sample_eps=0.0)).sample_sde(diffusion_form="SBDM", last_step=None)
    for refusal in (err, at_both_ends):  # its term is finite at t = 1: t = 0 is what is singular
        assert "t = 1" not in str(refusal.value), refusal.value
    with pytest.raises(ValueError, match="> 0 here: the linear diffusion's term, w_t times the score an SDE takes from "
                                         "a velocity model, is singular at t = 1"):
        Sampler(create_transport("Linear", sample_eps=0.0)).sample_sde(diffusion_form="linear", last_step=None)
    with pytest.raises(ValueError, match="sample_eps must be > 0 here: the Linear path with a noise model is singular"):
        Sampler(create_transport("Linear", "noise", sample_eps=0.0)).sample_ode()
    for path_type in ("Linear", "GVP", "VP"):
        for prediction in ("noise", "score"):
            for weight in ("velocity", "likelihood"):
                with pytest.raises(ValueError, match=f"train_eps must be > 0 here: .* {weight} loss weight .*infinite"):
                    create_transport(path_type, prediction, weight, train_eps=0.0).sample(torch.zeros(2, 2))


@pytest.mark.parametrize("path_type", ["Linear", "GVP", "VP"])
@pytest.mark.parametrize("prediction", ["noise", "score"])
def test_zero_train_eps_trains_an_unweighted_score_or_noise_model_on_all_of_0_1(path_type, prediction, monkeypatch):
    """Unweighted, the noise and score losses are finite at both ends (as upstream, which ran them)."""
    transport, x1 = create_transport(path_type, prediction, train_eps=0.0), torch.randn(3, 4)
    assert transport.check_interval(transport.train_eps, transport.sample_eps) == (0.0, 1.0)
    for end in (0.0, 1.0):
        monkeypatch.setattr(torch, "rand", lambda *shape, **kwargs: torch.full(shape, end, **kwargs))
        assert transport.training_losses(lambda x, t: torch.tanh(x), x1)["loss"].isfinite().all()


@pytest.mark.parametrize("path_type", ["Linear", "GVP"])
def test_a_velocity_model_s_sigma_form_sde_runs_to_t_1(path_type):
    """w_t / sigma_t of the sigma form is finite at t = 1: sample_eps = 0 and no last step run there (as VP)."""
    def model(x, t):
        return torch.tanh(x) * (0.5 + t[:, None])

    sampler, x = Sampler(create_transport(path_type, sample_eps=0.0)), torch.randn(3, 4)
    for method in ("Euler", "Heun"):  # Heun calls the model at t = 1
        sample = sampler.sample_sde(sampling_method=method, diffusion_form="sigma", last_step=None, num_steps=4)
        assert sample(x, model)[-1].isfinite().all()


@pytest.mark.parametrize("prediction", ["noise", "score", "velocity"])
def test_vp_sampling_to_t_1_is_refused_where_it_is_singular(prediction):
    """VP's sigma_t is 0 at t = 1: sample_eps = 0 takes a noise model's velocity and an SDE's drift
    there (inf / NaN samples). What stays finite still runs: checked on a model that is finite everywhere."""
    def model(x, t):
        return torch.tanh(x) * (0.5 + t[:, None])

    sampler, x = Sampler(create_transport("VP", prediction, sample_eps=0.0)), torch.randn(3, 4)
    for form in ("constant", "SBDM", "linear", "decreasing", "increasing-decreasing"):
        with pytest.raises(ValueError, match="sample_eps must be > 0 here: the VP path has sigma_t = 0 at t = 1"):
            sampler.sample_sde(diffusion_form=form, last_step=None)
    finite = [lambda: sampler.sample_sde(sampling_method="Heun", diffusion_form="sigma", last_step=None, num_steps=4),
              lambda: sampler.sample_ode(sampling_method="heun", num_steps=4)]
    if prediction == "noise":
        for make in finite:
            with pytest.raises(ValueError, match="where the velocity from a noise model is singular"):
                make()
    else:
        for make in finite:
            assert make()(x, model)[-1].isfinite().all()
        assert sampler.sample_ode_likelihood(sampling_method="heun", num_steps=4)(x, model)[0].isfinite().all()
    # a last step stops short of t = 1
    assert sampler.sample_sde(sampling_method="Heun", last_step="Mean", num_steps=4)(x, model)[-1].isfinite().all()


@pytest.mark.parametrize("path_type,prediction,form", [("Linear", "velocity", "SBDM"), ("GVP", "velocity", "SBDM"),
                                                      ("Linear", "score", "sigma"), ("GVP", "noise", "linear")])
def test_an_sde_last_step_that_leaves_no_interval_is_refused(path_type, prediction, form):
    """t0 = sample_eps (1e-3) here and t1 = 1 - last_step_size: a last step of 0.9995 leaves nothing (the
    grid ran backwards and the noise's sqrt(2 w dt) became NaN). VP starts at t0 = 0: never empty."""
    sampler = Sampler(create_transport(path_type, prediction))
    with pytest.raises(ValueError, match=r"leave no time to integrate over: the interval would be \[0.001, 0.0005\]"):
        sampler.sample_sde(diffusion_form=form, last_step="Mean", last_step_size=0.9995, num_steps=4)
    sampler.sample_sde(diffusion_form=form, last_step="Mean", last_step_size=0.99, num_steps=4)  # [0.001, 0.01]


def test_an_sde_interval_of_zero_length_is_refused():
    """t0 = sample_eps = 0.25 and t1 = 1 - last_step_size = 0.25: no time for the stochastic steps, which
    would leave the last step alone to turn the noise into a sample."""
    sampler = Sampler(create_transport("Linear", "score", sample_eps=0.25))
    with pytest.raises(ValueError, match=r"leave no time to integrate over: the interval would be \[0.25, 0.25\]"):
        sampler.sample_sde(diffusion_form="sigma", last_step="Mean", last_step_size=0.75, num_steps=4)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(sample_eps=-1e-3), "sample_eps must be in [0, 0.5), got -0.001"),
    (dict(sample_eps=0.5), "sample_eps must be in [0, 0.5), got 0.5"),
    (dict(train_eps=0.7), "train_eps must be in [0, 0.5), got 0.7"),
    (dict(train_eps=float("nan")), "train_eps must be in [0, 0.5), got nan"),
])
def test_eps_outside_half_the_interval_is_refused(kwargs, needle):
    """[eps, 1 - eps] must be an interval inside [0, 1], whichever path or prediction uses it."""
    with pytest.raises(ValueError, match=re.escape(needle)):
        create_transport("Linear", "velocity", **kwargs)


@pytest.mark.parametrize("add,argv,needle", [
    (add_transport_args, ["--sample-eps", "-1"], "argument --sample-eps: must be in [0, 0.5), got -1"),
    (add_transport_args, ["--train-eps", "0.5"], "argument --train-eps: must be in [0, 0.5), got 0.5"),
    (add_ode_args, ["--atol", "-0.5"], "argument --atol: must be 0 or a positive number, got -0.5"),
    (add_ode_args, ["--rtol", "nan"], "argument --rtol: must be 0 or a positive number, got nan"),
    (add_sde_args, ["--diffusion-norm", "-1"], "argument --diffusion-norm: must be 0 or a positive number, got -1"),
    (add_sde_args, ["--last-step-size", "-0.04"], "argument --last-step-size: must be in [0, 1), got -0.04"),
])
def test_argparse_helpers_refuse_values_out_of_range(add, argv, needle, capsys):
    parser = argparse.ArgumentParser()
    add(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(argv)
    assert needle in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# ODE sampling
# ---------------------------------------------------------------------------------------------

# max |error| / data std over 4096 samples, 50 steps (dopri5 at rtol 1e-5)
ODE_TOLERANCES = {"euler": 0.15, "heun": 1e-2, "dopri5": 5e-3}


@pytest.mark.parametrize("path_type", PATHS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("method", tuple(ODE_TOLERANCES))
def test_ode_follows_the_exact_flow(path_type, prediction, method):
    transport = create_transport(path_type, prediction)
    t0, t1 = transport.check_interval(transport.train_eps, transport.sample_eps, eval=True)
    torch.manual_seed(0)
    z = torch.randn(4096, 2)
    samples = Sampler(transport).sample_ode(sampling_method=method, num_steps=50, rtol=1e-5)(
        z, closed_form_model(path_type, prediction))[-1]
    expected = exact_flow(path_type, z, t0, t1)
    error = ((samples - expected) / STD).abs().max().item()
    assert error < ODE_TOLERANCES[method], f"{method}: max error {error:.4f} std units"
    mean, var = marginal(path_type, t1)
    assert_moments(samples, mean, var.sqrt(), 0.06, 0.04 if method == "euler" else 0.03, f"{path_type} {method}")


@pytest.mark.parametrize("method", ("rk4", "midpoint", "heun2", "bosh3", "adaptive_heun"))
def test_ode_other_torchdiffeq_methods(method):
    transport = create_transport("GVP", "velocity")
    torch.manual_seed(0)
    z = torch.randn(512, 2)
    sample_fn = Sampler(transport).sample_ode(sampling_method=method, num_steps=20)
    samples = sample_fn(z, closed_form_model("GVP", "velocity"))
    assert len(samples) == 1
    error = ((samples[-1] - exact_flow("GVP", z, 0.0, 1.0)) / STD).abs().max().item()
    assert error < 1e-2, f"{method}: max error {error:.4f}"


def test_euler_converges_at_first_order():
    model = closed_form_model("Linear", "velocity")
    sampler = Sampler(create_transport("Linear", "velocity"))
    z = torch.randn(256, 2, dtype=torch.float64)
    expected = exact_flow("Linear", z, 0.0, 1.0)
    errors = [(sampler.sample_ode(sampling_method="euler", num_steps=n)(z, model)[-1] - expected).abs().max().item()
              for n in (20, 40)]
    assert 1.7 < errors[0] / errors[1] < 2.3, errors


@pytest.mark.parametrize("path_type, prediction", [("Linear", "velocity"), ("GVP", "noise"), ("VP", "score"),
                                                   ("VP", "noise")])
def test_reverse_ode_maps_data_to_noise(path_type, prediction):
    """From t1 back to t0, the likelihood's interval (a VP noise model is singular at t = 1)."""
    transport = create_transport(path_type, prediction)
    sampler = Sampler(transport)
    model = closed_form_model(path_type, prediction)
    t0, t1 = transport.check_interval(transport.train_eps, transport.sample_eps, eval=True)
    torch.manual_seed(0)
    x1 = MU + STD * torch.randn(1024, 2)
    z = sampler.sample_ode(reverse=True, sampling_method="heun", num_steps=100)(x1, model)[-1]
    torch.testing.assert_close(z, exact_flow(path_type, x1, t1, t0), atol=2e-3, rtol=0)
    back = sampler.sample_ode(sampling_method="heun", num_steps=100)(z, model)[-1]
    torch.testing.assert_close(back, x1, atol=2e-3, rtol=0)


@pytest.mark.parametrize("path_type", PATHS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("reverse", [False, True])
def test_an_adaptive_ode_calls_the_model_inside_its_interval_only(path_type, prediction, reverse):
    """dopri5's first-step guess probes the drift at t0 + h0, with h0 = 0.01 |x| / |drift| unbounded:
    with a drift near 0 (here a noise prediction equal to x) that was t = 350 (and VP's sigma_t is NaN
    past 1). Every model call stays in [t0, t1]."""
    transport = create_transport(path_type, prediction)
    t0, t1 = transport.check_interval(transport.train_eps, transport.sample_eps, eval=True)  # sample_ode's
    times = []

    def model(x, t):
        times.append(t)
        return (x if prediction == "noise" else 1e-3 * x).clone()

    torch.manual_seed(0)
    Sampler(transport).sample_ode(sampling_method="dopri5", reverse=reverse)(torch.randn(4, 2), model)
    times = torch.cat(times)
    assert len(times) > 2 and min(t0, t1) <= times.min() and times.max() <= max(t0, t1), (times.min(), times.max())


def test_adaptive_methods_land_on_the_end_time():
    """The adaptive methods integrate a drift quadratic in t exactly while every stage lies inside [t0, t1].
    A last step past t1, its stages taken at t1 (where the drift's time is clamped), would end 0.13 off on
    [0, 0.999] with dopri5. Forwards and backwards, in float64."""
    from sit_fast.transport.integrators import integrate_ode

    x = torch.randn(4, 2, dtype=torch.float64)

    def drift(x, t):
        return (3 * t**2)[:, None].expand_as(x)

    for method in ("dopri5", "dopri8", "bosh3"):
        for t0, t1 in ((0.0, 0.999), (0.3, 0.7), (0.999, 0.001)):
            out = integrate_ode(drift, x, t0, t1, method=method, num_steps=5)[-1]
            torch.testing.assert_close(out, x + (t1**3 - t0**3), rtol=0, atol=1e-10,
                                       msg=lambda m: f"{method} over [{t0}, {t1}]: {m}")


# ---------------------------------------------------------------------------------------------
# SDE sampling
# ---------------------------------------------------------------------------------------------

def run_sde_case(path_type, prediction, method, form, last_step):
    transport = create_transport(path_type, prediction)
    sample_fn = Sampler(transport).sample_sde(sampling_method=method, diffusion_form=form, last_step=last_step,
                                              num_steps=SDE_STEPS)
    torch.manual_seed(0)
    samples = sample_fn(torch.randn(SDE_SAMPLES, 2), closed_form_model(path_type, prediction))[-1]
    mean, std = expected_sde_output(path_type, form, last_step, 0.04)
    assert_moments(samples, mean, std, 0.05, 0.04, f"{path_type}/{prediction}/{method}/{form}/{last_step}")


def _covering_sde_cases():
    """Every path x method x (form, last step) pair, the prediction cycling so that each prediction
    meets every form and every last step on every path."""
    pairs = [(form, last_step) for form in DIFFUSION_FORMS for last_step in LAST_STEPS]
    return [(path_type, PREDICTIONS[i % 3], method, form, last_step)
            for path_type in PATHS for method in ("Euler", "Heun") for i, (form, last_step) in enumerate(pairs)]


@pytest.mark.parametrize("path_type, prediction, method, form, last_step", _covering_sde_cases())
def test_sde_samples_have_the_right_moments(path_type, prediction, method, form, last_step):
    run_sde_case(path_type, prediction, method, form, last_step)


@pytest.mark.slow
@pytest.mark.parametrize("path_type", PATHS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("method", ("Euler", "Heun"))
@pytest.mark.parametrize("form", DIFFUSION_FORMS)
@pytest.mark.parametrize("last_step", LAST_STEPS)
def test_sde_samples_have_the_right_moments_full_grid(path_type, prediction, method, form, last_step):
    run_sde_case(path_type, prediction, method, form, last_step)


@pytest.mark.parametrize("path_type", ("Linear", "GVP"))
def test_sde_upstream_defaults_with_velocity_model(path_type):
    """Upstream's defaults (Euler, SBDM, Mean, 250 steps) gave NaN for velocity models: t0 was 0, where
    beta_t is infinite."""
    sample_fn = Sampler(create_transport(path_type)).sample_sde()
    torch.manual_seed(0)
    samples = sample_fn(torch.randn(4096, 2), closed_form_model(path_type, "velocity"))[-1]
    mean, std = expected_sde_output(path_type, "SBDM", "Mean", 0.04)
    assert_moments(samples, mean, std, 0.07, 0.05, f"{path_type} defaults")


def one_sde_step(path_type, prediction, method, form, norm):
    """One step of the SDE sampler (no last step) on fresh x: (x, the step's result, its noise z,
    t0, t1, the SDE drift f(x, t) = v + w s of the reference)."""
    transport = create_transport(path_type, prediction)
    sample_fn = Sampler(transport).sample_sde(sampling_method=method, diffusion_form=form, diffusion_norm=norm,
                                              last_step=None, num_steps=2)
    t0, t1 = transport.check_interval(transport.train_eps, transport.sample_eps, diffusion_form=form, sde=True,
                                      eval=True)
    x = torch.randn(64, 2, dtype=torch.float64)
    torch.manual_seed(7)
    stepped = sample_fn(x, closed_form_model(path_type, prediction))[-1]
    torch.manual_seed(7)
    z = torch.randn_like(x)

    def drift(x, t):
        t = torch.full((x.shape[0], 1), t, dtype=torch.float64)
        _, _, score, velocity = ref_posterior(path_type, x, t)
        return velocity + ref_diffusion(path_type, form, t, norm=norm) * score

    return x, stepped, z, t0, t1, drift


@pytest.mark.parametrize("path_type, prediction, form", [("Linear", "velocity", "sigma"), ("VP", "noise", "linear"),
                                                         ("GVP", "score", "increasing-decreasing")])
@pytest.mark.parametrize("norm", [0.5, 2.0])
def test_sde_step_uses_the_diffusion_norm(path_type, prediction, form, norm):
    """One Euler-Maruyama step against x + (v + w s) dt + sqrt(2 w dt) z with the reference w_t
    of that norm: the moments alone cannot see the norm (an exact model gives them for any w)."""
    x, stepped, z, t0, t1, drift = one_sde_step(path_type, prediction, "Euler", form, norm)
    w = ref_diffusion(path_type, form, torch.tensor(t0, dtype=torch.float64), norm=norm)
    expected = x + drift(x, t0) * (t1 - t0) + torch.sqrt(2 * w * (t1 - t0)) * z
    torch.testing.assert_close(stepped, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("path_type, prediction, form", [("Linear", "velocity", "sigma"), ("GVP", "noise", "linear"),
                                                        ("VP", "score", "SBDM")])
def test_sde_heun_step_is_upstreams(path_type, prediction, form):
    """One Heun step against upstream's: noise first, x_hat = x + sqrt(2 w(t0) dt) z, then the trapezoid
    of the SDE drift f = v + w s from x_hat: x_hat + dt / 2 (f(x_hat, t0) + f(x_hat + dt f(x_hat, t0), t1))."""
    x, stepped, z, t0, t1, drift = one_sde_step(path_type, prediction, "Heun", form, 0.7)
    dt = t1 - t0
    w0 = ref_diffusion(path_type, form, torch.tensor(t0, dtype=torch.float64), norm=0.7)
    x_hat = x + torch.sqrt(2 * w0 * dt) * z
    k1 = drift(x_hat, t0)
    expected = x_hat + dt / 2 * (k1 + drift(x_hat + dt * k1, t1))
    torch.testing.assert_close(stepped, expected, rtol=1e-9, atol=1e-9)


def test_sde_noise_is_fresh_per_call_and_seeded():
    sample_fn = Sampler(create_transport()).sample_sde(num_steps=5)
    model = closed_form_model("Linear", "velocity")
    z = torch.randn(8, 2)
    torch.manual_seed(3)
    first = sample_fn(z, model)[-1]
    second = sample_fn(z, model)[-1]
    torch.manual_seed(3)
    again = sample_fn(z, model)[-1]
    assert not torch.equal(first, second)
    assert torch.equal(first, again)


def test_sde_sampling_keeps_no_autograd_graph():
    """sample_sde runs under torch.no_grad(): a model with trainable weights (sampling during training)
    must not make it hold a graph through every step and the last step."""
    scale = torch.nn.Parameter(torch.ones(()))
    base = closed_form_model("Linear", "velocity")
    for last_step in LAST_STEPS:
        sample_fn = Sampler(create_transport()).sample_sde(last_step=last_step, num_steps=5, trajectory=True)
        states = sample_fn(torch.randn(4, 2), lambda x, t: scale * base(x, t))
        assert not any(state.requires_grad for state in states), last_step


# ---------------------------------------------------------------------------------------------
# Model-call counts, return conventions, upstream-style usage
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, calls_per_step", [("euler", 1), ("heun", 2)])
@pytest.mark.parametrize("num_steps", [1, 7])
def test_fixed_step_ode_model_calls(method, calls_per_step, num_steps):
    model = CountingModel(closed_form_model("Linear", "velocity"))
    Sampler(create_transport()).sample_ode(sampling_method=method, num_steps=num_steps)(torch.randn(4, 2), model)
    assert model.calls == num_steps * calls_per_step


def test_step_counts_and_last_step_sizes_that_cannot_sample_are_refused():
    """An ODE needs a step and an SDE two (the last step counts): with fewer, the noise would come back as
    the sample, or the SDE's last step start from t0. A last step of size 0, 1 or more is no step to t = 1."""
    sampler, model = Sampler(create_transport()), closed_form_model("Linear", "velocity")
    for method in ("euler", "heun"):
        with pytest.raises(ValueError, match="^num_steps must be at least 1, got 0$"):
            sampler.sample_ode(sampling_method=method, num_steps=0)(torch.randn(4, 2), model)
    for method in SDE_METHODS:
        with pytest.raises(ValueError, match=r"^num_steps must be at least 2 for an SDE \(it counts the last step\)"):
            sampler.sample_sde(sampling_method=method, num_steps=1)
    for size in (0.0, 1.0, 1.5, -0.04):
        with pytest.raises(ValueError, match=rf"^last_step_size must lie in \(0, 1\), got {size}$"):
            sampler.sample_sde(last_step="Mean", last_step_size=size)


@pytest.mark.parametrize("method", ["euler", "heun", "rk4", "explicit_adams", "implicit_adams", "fixed_adams",
                                    "dopri5", "bosh3"])
def test_the_tolerances_flags_are_said_to_matter_where_they_change_the_result(method):
    """ode_method_uses_tolerances (sample.py leaves the flags it denies out of a folder's settings, so
    a resume with other values is taken) against what each method computes with other tolerances."""
    from sit_fast.transport.integrators import ode_method_uses_tolerances

    model = closed_form_model("Linear", "velocity")
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sampler = Sampler(create_transport())
    ends = [sampler.sample_ode(sampling_method=method, num_steps=5, atol=tol, rtol=tol)(x, model)[-1]
            for tol in (1e-4, 0.5)]
    assert ode_method_uses_tolerances(method) == (not torch.equal(*ends)), method


@pytest.mark.parametrize("method, calls_per_step", [("Euler", 1), ("Heun", 2)])
@pytest.mark.parametrize("last_step", LAST_STEPS)
def test_sde_model_calls(method, calls_per_step, last_step):
    """num_steps counts the last step: num_steps - 1 stochastic steps, then the last step (1 call)."""
    model = CountingModel(closed_form_model("Linear", "velocity"))
    num_steps = 9
    Sampler(create_transport()).sample_sde(sampling_method=method, last_step=last_step, num_steps=num_steps)(
        torch.randn(4, 2), model)
    assert model.calls == (num_steps - 1) * calls_per_step + (last_step is not None)


def test_upstream_style_usage_with_model_kwargs():
    """sample.py's pattern: sample_fn(z, model.forward_with_cfg, **model_kwargs)[-1]."""
    seen = {}
    base = closed_form_model("Linear", "velocity")

    def forward_with_cfg(x, t, y, cfg_scale):
        seen["y"], seen["cfg_scale"], seen["t_shape"] = y, cfg_scale, tuple(t.shape)
        return base(x, t)

    sampler = Sampler(create_transport("Linear", "velocity", None, 1e-5, 1e-3))
    z = torch.randn(6, 2)
    model_kwargs = dict(y=torch.arange(6), cfg_scale=4.0)
    sample_fns = (sampler.sample_ode(), sampler.sample_ode(sampling_method="heun"), sampler.sample_sde(num_steps=20))
    for sample_fn in sample_fns:
        samples = sample_fn(z, forward_with_cfg, **model_kwargs)[-1]
        assert samples.shape == z.shape and torch.isfinite(samples).all()
        assert seen["cfg_scale"] == 4.0 and torch.equal(seen["y"], model_kwargs["y"]) and seen["t_shape"] == (6,)


def test_misused_arguments_say_what_they_take():
    """Labels passed where model_kwargs go, uint8 images, a negative diffusion norm: a one-line
    error saying what the argument takes (not the model's repr, a kernel's dtype, or NaN samples)."""
    transport = create_transport("Linear", "velocity")
    model = closed_form_model("Linear", "velocity")
    with pytest.raises(TypeError, match=r"^model_kwargs is a dict of the model's keyword arguments, e\.g\. "
                                        r"dict\(y=labels\), got a Tensor$"):
        transport.training_losses(model, torch.randn(4, 2), torch.arange(4))
    with pytest.raises(TypeError, match=r"^x1 must be floating point .*, got torch\.uint8$"):
        transport.training_losses(model, torch.zeros(4, 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"^diffusion_norm must be 0 or more, got -1\.0$"):
        Sampler(transport).sample_sde(diffusion_norm=-1.0)
    samples = Sampler(transport).sample_sde(diffusion_norm=0.0, num_steps=4)(torch.randn(4, 2), model)[-1]
    assert torch.isfinite(samples).all()  # no noise: the SDE's drift alone


@pytest.mark.parametrize("path_type", ["Linear", "VP"])
@pytest.mark.parametrize("prediction", ["velocity", "score"])
def test_samplers_keep_a_bf16_state_in_bf16(path_type, prediction):
    """A model with bf16 weights takes bf16 inputs only; the float32 grid's coefficients must not
    promote the state (score conversions, SDE noise scales, the last step) to float32."""
    base = closed_form_model(path_type, prediction)

    def bf16_model(x, t):
        assert x.dtype == torch.bfloat16, x.dtype
        return base(x.float(), t).to(torch.bfloat16)

    sampler = Sampler(create_transport(path_type, prediction))
    # fresh draws: dopri5 on the bf16 state itself ended in "underflow in dt" for 15 seeds in 300 (VP
    # velocity); it integrates a float32 copy now (0 in 600 over the four cases)
    z = torch.randn(8, 2, dtype=torch.bfloat16)
    sample_fns = [sampler.sample_ode(sampling_method=m, num_steps=4) for m in ("euler", "heun", "dopri5", "rk4")]
    sample_fns += [sampler.sample_sde(sampling_method=m, last_step=last, num_steps=4)
                   for m in SDE_METHODS for last in LAST_STEPS]
    for sample_fn in sample_fns:
        out = sample_fn(z, bf16_model)[-1]
        assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


@pytest.mark.parametrize("method", ["rk4", "dopri5"])
def test_torchdiffeq_takes_a_bf16_states_times_in_float32(method):
    """torchdiffeq casts its times to the state's dtype: on a bf16 state rk4 called the model at t = 1.0
    (0.999 rounded), where VP's noise model is inf. The model sees float32 times inside [0, 0.999]."""
    base, times = closed_form_model("VP", "velocity"), []

    def model(x, t):
        times.append(t)
        assert x.dtype == torch.bfloat16, x.dtype
        return base(x.float(), t).to(torch.bfloat16)

    sampler = Sampler(create_transport("VP", "velocity"))  # sample_eps 1e-3: t1 = 0.999
    out = sampler.sample_ode(sampling_method=method, num_steps=3)(torch.randn(4, 2, dtype=torch.bfloat16), model)
    assert out[-1].dtype == torch.bfloat16 and out[-1].float().isfinite().all()
    assert all(t.dtype == torch.float32 for t in times)
    seen = torch.cat(times)
    assert seen.min() >= 0 and 0.9985 < seen.max() <= torch.tensor(0.999), seen.max()  # in bf16: 1.0
    noise_fn = Sampler(create_transport("VP", "noise")).sample_ode(sampling_method=method, num_steps=3)
    assert noise_fn(torch.randn(4, 2, dtype=torch.bfloat16), lambda x, t: torch.tanh(x))[-1].float().isfinite().all()


@pytest.mark.parametrize("dtype, advice", [(torch.float32, "check the model's outputs are finite, loosen"),
                                           (torch.bfloat16, "check the model's outputs are finite \\(a torch.bfloat16 "
                                                            "model's drift is coarse")])
def test_an_adaptive_step_that_underflows_says_what_to_do(dtype, advice):
    """torchdiffeq's bare AssertionError("underflow in dt 0.0") becomes a message with the way out."""
    sample_fn = Sampler(create_transport()).sample_ode(sampling_method="dopri5")
    with pytest.raises(RuntimeError, match=rf"^dopri5: the adaptive step size fell to 0 \(underflow in dt \S+\): "
                                           rf".* on this {dtype} state; {advice}"):
        sample_fn(torch.randn(4, 2, dtype=dtype), lambda x, t: torch.full_like(x, float("nan")))


@pytest.mark.parametrize("method", ("euler", "heun", "dopri5", "rk4"))
def test_ode_trajectory(method):
    """A trajectory's states lie on the even grid t_i = i / 10, within each method's error there (the
    largest of 300 seeds' 64 samples: Euler 0.13, Heun 0.020, RK4 3e-5, dopri5 at tolerances 1e-5
    8e-5). A state one grid step off is at least 0.04 away (100 seeds): Heun, RK4 and dopri5 see it;
    Euler's own error hides it, so Euler's states are also held to its recurrence on that grid,
    x_(i+1) = x_i + v(x_i, t_i) / 10. dopri5 at its default rtol of 1e-3 strays up to 0.036 in single
    elements (its error control is a norm over all of them): 8% of seeds failed the 2e-2 it had."""
    model = closed_form_model("GVP", "velocity")
    sampler = Sampler(create_transport("GVP"))
    z = torch.randn(64, 2)
    options = {"atol": 1e-5, "rtol": 1e-5} if method == "dopri5" else {}
    final = sampler.sample_ode(sampling_method=method, num_steps=10, **options)(z, model)
    states = sampler.sample_ode(sampling_method=method, num_steps=10, trajectory=True, **options)(z, model)
    assert len(final) == 1 and len(states) == 11
    assert torch.equal(states[0], z)
    torch.testing.assert_close(states[-1], final[-1], atol=1e-4, rtol=0)
    tol = {"euler": 0.2, "heun": 3e-2, "rk4": 1e-3, "dopri5": 1e-3}[method]
    for i in (3, 10):
        torch.testing.assert_close(states[i], exact_flow("GVP", z, 0.0, i / 10), atol=tol, rtol=0)
    if method == "euler":
        x = z
        for i in range(10):
            x = x + model(x, torch.full((len(z),), i / 10)) / 10
            torch.testing.assert_close(states[i + 1], x, atol=1e-5, rtol=1e-5, msg=lambda m: f"state {i + 1}: {m}")


@pytest.mark.parametrize("last_step", ("Mean", None))
def test_sde_trajectory(last_step):
    sampler = Sampler(create_transport())
    model = closed_form_model("Linear", "velocity")
    z = torch.randn(16, 2)
    torch.manual_seed(1)
    final = sampler.sample_sde(num_steps=12, last_step=last_step)(z, model)
    torch.manual_seed(1)
    states = sampler.sample_sde(num_steps=12, last_step=last_step, trajectory=True)(z, model)
    assert len(final) == 1 and len(states) == 13
    assert torch.equal(states[0], z) and torch.equal(states[-1], final[-1])


@pytest.mark.parametrize("path_type", PATHS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_fixed_step_samplers_never_read_values_on_the_host(path_type, prediction):
    """On the meta device any .item(), bool(tensor), print or host copy raises, so passing means the
    fixed-step samplers, conversions and last steps never read a value back to the host."""
    sampler = Sampler(create_transport(path_type, prediction))
    model = closed_form_model(path_type, prediction)
    z = torch.randn(4, 2, device="meta")
    for method in ("euler", "heun"):
        assert sampler.sample_ode(sampling_method=method, num_steps=3)(z, model)[-1].device.type == "meta"
    for method in ("Euler", "Heun"):
        for i, form in enumerate(DIFFUSION_FORMS):  # every form and every last step with each method
            sample_fn = sampler.sample_sde(sampling_method=method, diffusion_form=form,
                                           last_step=LAST_STEPS[i % len(LAST_STEPS)], num_steps=3)
            assert sample_fn(z, model)[-1].shape == (4, 2)


@pytest.mark.cuda
@pytest.mark.spread
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ("ode", "sde"))
def test_fixed_step_samplers_capture_in_a_cuda_graph(kind):
    """A whole fixed-step sampling call is captured once and replayed."""
    mu, std = MU.cuda(), STD.cuda()

    def model(x, t):  # the Linear path's closed-form velocity, with its constants already on the GPU
        t = t[:, None]
        centred = (x - t * mu) / (t**2 * std**2 + (1 - t) ** 2)
        return mu + t * std**2 * centred - (1 - t) * centred

    sampler = Sampler(create_transport())
    if kind == "ode":
        sample_fn = sampler.sample_ode(sampling_method="heun", num_steps=16)
    else:
        sample_fn = sampler.sample_sde(sampling_method="Heun", diffusion_form="sigma", num_steps=16)
    static_z = torch.randn(4096, 2, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture
        eager = sample_fn(static_z, model)[-1]
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = sample_fn(static_z, model)[-1]
    graph.replay()
    first = static_out.clone()
    graph.replay()
    if kind == "ode":
        torch.testing.assert_close(first, eager)
        torch.testing.assert_close(static_out, eager)
    else:  # each replay draws fresh noise
        assert not torch.equal(first, static_out)
        mean, out_std = expected_sde_output("Linear", "sigma", "Mean", 0.04)
        assert_moments(first.cpu(), mean, out_std, 0.1, 0.08, "graph-replayed SDE")


# ---------------------------------------------------------------------------------------------
# Likelihood
# ---------------------------------------------------------------------------------------------

def expected_logp(path_type, x, t0, t1):
    """What the likelihood ODE computes exactly: log N(z; 0, I) + log |dz/dx| with z the flow of x to t0."""
    z = exact_flow(path_type, x.double(), t1, t0)
    _, var_0 = marginal(path_type, t0)
    _, var_1 = marginal(path_type, t1)
    log_prior = (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).sum(1)
    return log_prior + 0.5 * torch.log(var_0 / var_1).sum(), z


def data_logp(x):
    x = x.double()
    return (-0.5 * ((x - MU.double()) / STD.double()) ** 2 - torch.log(STD.double())
            - 0.5 * math.log(2 * math.pi)).sum(1)


@pytest.mark.parametrize("path_type", PATHS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("method, exact", [("dopri5", False), ("heun", True)])
def test_likelihood_matches_closed_form(path_type, prediction, method, exact):
    transport = create_transport(path_type, prediction)
    t0, t1 = transport.check_interval(transport.train_eps, transport.sample_eps, eval=True)
    torch.manual_seed(0)
    x = MU + STD * torch.randn(128, 2)
    likelihood_fn = Sampler(transport).sample_ode_likelihood(sampling_method=method, num_steps=100,
                                                             rtol=1e-5, atol=1e-6, exact_divergence=exact)
    with torch.no_grad():  # as in sample.py: the divergence must switch gradients back on itself
        logp, z = likelihood_fn(x, closed_form_model(path_type, prediction))
    assert logp.shape == (128,) and z.shape == x.shape
    expected, expected_z = expected_logp(path_type, x, t0, t1)
    torch.testing.assert_close(z.double(), expected_z, atol=5e-3, rtol=0)
    torch.testing.assert_close(logp.double(), expected, atol=5e-3, rtol=0)
    # and the true data density, up to the O(eps) ends of the interval
    torch.testing.assert_close(logp.double(), data_logp(x), atol=0.05, rtol=0)


@pytest.mark.parametrize("method", ["heun", "dopri5"])
def test_a_bf16_likelihood_sums_in_float32(method):
    """log p sums over every dimension: accumulated in bf16 it was 6-7 nats off at 768 dimensions (log p
    about -560), on a Gaussian whose Linear-path velocity is c(t) x; now within 1.4 of float32 (10 draws)."""
    s = 0.5

    def model(x, t):  # computes in float32, answers in x's dtype, as a bf16 model would
        t = t.float().reshape(-1, 1)
        return ((t * s**2 - (1 - t)) / (t**2 * s**2 + (1 - t) ** 2) * x.float()).to(x.dtype)

    x = s * torch.randn(16, 768)
    likelihood_fn = Sampler(create_transport("Linear")).sample_ode_likelihood(sampling_method=method, num_steps=20)
    logp, z = likelihood_fn(x.bfloat16(), model)
    assert logp.dtype == torch.float32 and z.dtype == torch.bfloat16
    torch.testing.assert_close(logp, likelihood_fn(x, model)[0], atol=3.0, rtol=0)


def test_likelihood_of_image_shaped_data_counts_every_element():
    """log N(z; 0, I) and the divergence sum over all of a (B, C, H, W) sample, not only its channels:
    checked against the density of N(0, s^2 I) data, whose Linear-path velocity is c(t) x."""
    s = 0.5

    def model(x, t):
        t = t.reshape(-1, 1, 1, 1)
        return (t * s**2 - (1 - t)) / (t**2 * s**2 + (1 - t) ** 2) * x

    x = s * torch.randn(4, 3, 4, 4, dtype=torch.float64)
    transport = create_transport("Linear")
    logp, z = Sampler(transport).sample_ode_likelihood(sampling_method="heun", num_steps=100)(x, model)
    assert logp.shape == (4,) and z.shape == x.shape
    expected = torch.distributions.Normal(0.0, s).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(logp, expected, atol=1e-2, rtol=0)  # Heun's error here: about 2e-3 at most
    prior = torch.distributions.Normal(0.0, 1.0).log_prob(z).flatten(1).sum(1)
    torch.testing.assert_close(transport.prior_logp(z), prior)


def test_likelihood_and_inference_mode():
    """Data made under torch.inference_mode (latents encoded there) is taken; a call inside it, where
    nothing can be differentiated, is refused saying to use torch.no_grad()."""
    transport = create_transport("Linear", "velocity")
    likelihood_fn = Sampler(transport).sample_ode_likelihood(sampling_method="heun", num_steps=4)
    model = closed_form_model("Linear", "velocity")
    torch.manual_seed(0)
    x = MU + STD * torch.randn(8, 2)
    with torch.inference_mode():
        made_there = x.clone()
    with torch.no_grad():
        expected, _ = likelihood_fn(x, model)
        logp, _ = likelihood_fn(made_there, model)
    # a diagonal Jacobian: Hutchinson's estimate with Rademacher probes is exact, whatever the probes
    torch.testing.assert_close(logp, expected, rtol=0, atol=0)
    # labels made there too, taken by a model whose own weights are trained (a likelihood during training)
    embedding = torch.nn.Embedding(4, 2)
    with torch.inference_mode():
        y = torch.zeros(8, dtype=torch.long)
    with torch.no_grad():
        labelled, _ = likelihood_fn(made_there, lambda x, t, y: model(x, t) + 0 * embedding(y), y=y)
    torch.testing.assert_close(labelled, expected, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=r"outside torch\.inference_mode\(\); torch\.no_grad\(\) is fine"):
        with torch.inference_mode():
            likelihood_fn(x, model)


def test_likelihood_hutchinson_is_unbiased_for_a_mixing_field():
    """A field coupling the two dimensions has a symmetric off-diagonal Jacobian: Hutchinson's estimate
    is then noisy per sample, but its average over samples is the exact divergence."""
    transport = create_transport("Linear", "velocity")
    base = closed_form_model("Linear", "velocity")
    coupling = torch.tensor([[0.0, 0.5], [0.5, 0.0]])  # trace 0: the divergence is the base field's

    def model(x, t):
        return base(x, t) + x @ coupling
    torch.manual_seed(0)
    x = (MU + STD * torch.randn(1, 2)).expand(2048, 2).contiguous()
    sampler = Sampler(transport)
    exact, _ = sampler.sample_ode_likelihood(sampling_method="heun", num_steps=40, exact_divergence=True)(x[:1], model)
    estimate, _ = sampler.sample_ode_likelihood(sampling_method="heun", num_steps=40)(x, model)
    assert estimate.std() > 1e-3  # the probe noise is there
    assert abs(estimate.mean().item() - exact.item()) < 4 * estimate.std().item() / math.sqrt(2048)


# ---------------------------------------------------------------------------------------------
# Training losses
# ---------------------------------------------------------------------------------------------

def recording_model(path_type, prediction, record):
    model = closed_form_model(path_type, prediction)

    def forward(x, t, **model_kwargs):
        record.update(x=x, t=t, kwargs=model_kwargs)
        return model(x, t)

    return forward


@pytest.mark.parametrize("path_type", PATHS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("loss_weight", (None, "velocity", "likelihood"))
def test_training_loss_formula(path_type, prediction, loss_weight):
    """Recover x0 from the x_t the model saw and recompute each loss from the reference formulas."""
    transport = create_transport(path_type, prediction, loss_weight)
    record = {}
    torch.manual_seed(0)
    x1 = (MU + STD * torch.randn(512, 2)).double()
    terms = transport.training_losses(recording_model(path_type, prediction, record), x1, dict(y=3))
    assert terms["loss"].shape == (512,) and record["kwargs"] == dict(y=3)
    t, xt = record["t"], record["x"]
    t0, t1 = transport.check_interval(transport.train_eps, transport.sample_eps)
    assert t.shape == (512,) and t0 <= t.min() and t.max() <= t1
    alpha, d_alpha, sigma, d_sigma = ref_coefficients(path_type, t[:, None])
    x0 = (xt - alpha * x1) / sigma
    pred = terms["pred"]
    torch.testing.assert_close(pred, closed_form_model(path_type, prediction)(xt, t))
    beta = sigma**2 * d_alpha / alpha - sigma * d_sigma
    weight = {None: 1.0, "velocity": (beta / sigma) ** 2, "likelihood": beta / sigma**2}[loss_weight]
    if prediction == "velocity":
        expected = ((pred - (d_alpha * x1 + d_sigma * x0)) ** 2).mean(1)
    elif prediction == "noise":
        expected = (weight * (pred - x0) ** 2).mean(1)
    else:
        expected = (weight * (sigma * pred + x0) ** 2).mean(1)
    torch.testing.assert_close(terms["loss"], expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_a_model_output_of_another_shape_is_refused(prediction):
    """A learn_sigma model returns twice the channels, a wrong head maybe one: the loss must not broadcast
    either against x_t (a one-channel output would broadcast silently) but name both shapes."""
    transport = create_transport("GVP", prediction)
    x1 = torch.randn(4, 3, 2, 2)
    for model, shape in ((lambda x, t: torch.cat([x, x], 1), "(4, 6, 2, 2)"), (lambda x, t: x[:, :1], "(4, 1, 2, 2)")):
        with pytest.raises(ValueError, match=re.escape(f"model output shape {shape} != input shape (4, 3, 2, 2)")):
            transport.training_losses(model, x1)


@pytest.mark.parametrize("path_type", PATHS)
@pytest.mark.parametrize("prediction, train_eps", [("velocity", None), ("noise", 0.2)])
def test_training_times_are_uniform_on_the_interval(path_type, prediction, train_eps):
    """t ~ U[t0, t1]: the quartiles of (t - t0) / (t1 - t0) at 1/4, 1/2, 3/4 (40000 draws: a quartile's
    standard error is about 0.002), not only t within its bounds; with t0 > 0 too (a noise model's train_eps
    on Linear and GVP: [0.2, 0.8])."""
    transport = create_transport(path_type, prediction, train_eps=train_eps)
    t0, t1 = transport.check_interval(transport.train_eps, transport.sample_eps)
    t, x0, x1 = transport.sample(torch.zeros(40000, 2, dtype=torch.float64))
    assert t.dtype == torch.float64 and x0.shape == x1.shape == (40000, 2) and x0.std() > 0.9
    u = (t - t0) / (t1 - t0)
    quartiles = torch.quantile(u, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    torch.testing.assert_close(quartiles, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64), rtol=0, atol=0.015)
    assert 0 <= u.min() and u.max() <= 1


@pytest.mark.parametrize("path_type", PATHS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_get_score_is_the_score_for_every_prediction(path_type, prediction):
    """Transport.get_score() (upstream's API) turns each kind of model output into grad log p_t(x)."""
    transport = create_transport(path_type, prediction)
    x = torch.randn(32, 2, dtype=torch.float64)
    t = torch.rand(32, dtype=torch.float64) * 0.9 + 0.05
    score = transport.get_score()(x, t, closed_form_model(path_type, prediction))
    torch.testing.assert_close(score, ref_posterior(path_type, x, t[:, None])[2], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("path_type", PATHS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("loss_weight", (None, "velocity", "likelihood"))
def test_expected_loss_is_minimal_at_the_closed_form_predictor(path_type, prediction, loss_weight):
    """Perturb the closed-form predictor f* to f* + d g. With the same draws each sample's loss is a
    parabola in d, l_i(d) = l_i(0) + 2 d c_i + d^2 q_i, so the expected loss has slope 2 E[c] at
    d = 0. It must be 0 within the Monte-Carlo error (a z-test on the c_i) with positive curvature,
    while the same test run around a predictor biased by 0.5 must see the slope."""
    transport = create_transport(path_type, prediction, loss_weight)
    optimal = closed_form_model(path_type, prediction)
    x1 = MU + STD * torch.randn(65536, 2, generator=torch.Generator().manual_seed(0))
    directions = {"shift x": lambda x, f: torch.tensor([1.0, 0.0]).expand_as(f),
                  "shift y": lambda x, f: torch.tensor([0.0, 1.0]).expand_as(f),
                  "scale": lambda x, f: f,
                  "input": lambda x, f: x}
    h = 0.05

    def slope_z_score(bias, direction):
        losses = []
        for d in (-h, 0.0, h):
            torch.manual_seed(1)
            model = lambda x, t: optimal(x, t) + (bias + d) * direction(x, optimal(x, t))  # noqa: E731
            losses.append(transport.training_losses(model, x1)["loss"].double())
        slope = (losses[2] - losses[0]) / (4 * h)  # c_i
        curvature = (losses[2] + losses[0] - 2 * losses[1]) / (2 * h**2)  # q_i
        return slope.mean() / (slope.std() / math.sqrt(slope.numel())), curvature.mean()

    for name, direction in directions.items():
        z_score, curvature = slope_z_score(0.0, direction)
        assert curvature > 0 and abs(z_score) < 4, f"{name}: slope z-score {z_score:.2f}, curvature {curvature:.3g}"
        z_biased, _ = slope_z_score(0.5, direction)
        assert z_biased > 4, f"{name}: a predictor biased by 0.5 went unnoticed (z-score {z_biased:.2f})"


def test_velocity_loss_ignores_the_weight_like_upstream():
    x1 = MU + STD * torch.randn(64, 2)
    model = closed_form_model("Linear", "velocity")
    losses = []
    for loss_weight in (None, "velocity", "likelihood"):
        torch.manual_seed(0)
        losses.append(create_transport("Linear", "velocity", loss_weight).training_losses(model, x1)["loss"])
    assert torch.equal(losses[0], losses[1]) and torch.equal(losses[0], losses[2])


def test_mean_flat():
    x = torch.arange(24.0).reshape(2, 3, 4)
    torch.testing.assert_close(mean_flat(x), x.reshape(2, -1).mean(1))


# ---------------------------------------------------------------------------------------------
# Names and flags
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "build, listed",
    [
        (lambda: create_transport("Quadratic"), "'Linear', 'GVP', 'VP'"),
        (lambda: create_transport(prediction="eps"), "'velocity', 'score', 'noise'"),
        (lambda: create_transport(loss_weight="snr"), "None, 'velocity', 'likelihood'"),
        (lambda: Sampler(create_transport()).sample_ode(sampling_method="rk45"), "'euler', 'heun', 'dopri8'"),
        (lambda: Sampler(create_transport()).sample_ode_likelihood(sampling_method="Euler"), "'dopri5'"),
        (lambda: Sampler(create_transport()).sample_sde(sampling_method="euler"), "'Euler', 'Heun'"),
        (lambda: Sampler(create_transport()).sample_sde(diffusion_form="inccreasing-decreasing"),
         "'constant', 'SBDM', 'sigma', 'linear', 'decreasing', 'increasing-decreasing'"),
        (lambda: Sampler(create_transport()).sample_sde(last_step="Median"), "None, 'Mean', 'Tweedie', 'Euler'"),
        (lambda: create_transport().path_sampler.compute_diffusion(torch.zeros(1, 1), torch.zeros(1), "cosine"),
         "'SBDM'"),
    ],
)
def test_unknown_names_raise_value_error_listing_choices(build, listed):
    with pytest.raises(ValueError) as info:
        build()
    message = str(info.value)
    assert "\n" not in message and "valid choices" in message and listed in message, message


def test_tolerances_an_ode_solver_cannot_meet_are_refused():
    sampler = Sampler(create_transport())
    for build in (sampler.sample_ode, sampler.sample_ode_likelihood):
        with pytest.raises(ValueError, match="atol and rtol are both 0"):
            build(atol=0, rtol=0)
        with pytest.raises(ValueError, match="must be 0 or more"):
            build(atol=1e-6, rtol=-1e-3)
        build(atol=1e-6, rtol=0)
    sampler.sample_ode(atol=0, rtol=1e-3)
    with pytest.raises(ValueError, match="atol 0: the likelihood integrates the divergence from 0"):
        sampler.sample_ode_likelihood(atol=0, rtol=1e-3)  # its second state starts at 0: no step could pass
    sampler.sample_ode(sampling_method="euler", atol=0, rtol=0)  # fixed steps: no tolerance to meet
    sampler.sample_ode_likelihood(sampling_method="euler", atol=0, rtol=0)


def test_enums_and_factory_types():
    transport = create_transport("GVP", "score", "likelihood")
    assert transport.path_type == PathType.GVP
    assert transport.model_type == ModelType.SCORE
    assert transport.loss_type == WeightType.LIKELIHOOD
    assert type(transport.path_sampler).__name__ == "GVPCPlan"


def test_path_plans_take_upstreams_constructor_arguments():
    """Code written for upstream's transport.path builds its plans with their (unused) sigma argument."""
    from sit_fast.transport import path

    t = torch.rand(5, dtype=torch.float64)
    for plan in (path.ICPlan(sigma=0.0), path.GVPCPlan(0.0), path.VPCPlan(sigma_min=0.1, sigma_max=20.0)):
        assert torch.equal(plan.compute_alpha_t(t)[0], type(plan)().compute_alpha_t(t)[0])
    assert path.ICPlan(0.0).sigma == path.GVPCPlan(sigma=0.0).sigma == 0.0


def test_argparse_helpers_parse_upstream_flags():
    parser = argparse.ArgumentParser()
    add_transport_args(parser)
    add_sde_args(parser)
    args = parser.parse_args(
        "--path-type GVP --prediction noise --loss-weight likelihood --sample-eps 0.01 --train-eps 0.002 "
        "--sampling-method Heun --diffusion-form increasing-decreasing --diffusion-norm 0.5 --last-step None "
        "--last-step-size 0.02".split())
    assert (args.path_type, args.prediction, args.loss_weight) == ("GVP", "noise", "likelihood")
    assert (args.sample_eps, args.train_eps) == (0.01, 0.002)
    assert (args.sampling_method, args.diffusion_form, args.diffusion_norm) == ("Heun", "increasing-decreasing", 0.5)
    assert args.last_step is None and args.last_step_size == 0.02
    transport = create_transport(args.path_type, args.prediction, args.loss_weight, args.train_eps, args.sample_eps)
    Sampler(transport).sample_sde(sampling_method=args.sampling_method, diffusion_form=args.diffusion_form,
                                  diffusion_norm=args.diffusion_norm, last_step=args.last_step,
                                  last_step_size=args.last_step_size, num_steps=10)

    # "none" as the other flags taking None (--grad-clip, --max-steps) take it
    args = parser.parse_args("--loss-weight none --last-step none".split())
    assert args.loss_weight is None and args.last_step is None

    defaults = argparse.ArgumentParser()
    add_transport_args(defaults)
    add_sde_args(defaults)
    args = defaults.parse_args([])
    assert (args.path_type, args.prediction, args.loss_weight) == ("Linear", "velocity", None)
    # upstream's CLI default is "sigma" (its Sampler.sample_sde default is "SBDM")
    assert (args.sampling_method, args.diffusion_form, args.last_step, args.last_step_size) == (
        "Euler", "sigma", "Mean", 0.04)

    ode = argparse.ArgumentParser()
    add_ode_args(ode)
    args = ode.parse_args("--sampling-method heun --atol 1e-5 --rtol 1e-4 --reverse --likelihood".split())
    assert (args.sampling_method, args.atol, args.rtol, args.reverse, args.likelihood) == (
        "heun", 1e-5, 1e-4, True, True)
    args = ode.parse_args([])
    assert (args.sampling_method, args.atol, args.rtol, args.reverse, args.likelihood) == (
        "dopri5", 1e-6, 1e-3, False, False)
    for group_parser in (parser, ode):
        for action in group_parser._actions:
            assert action.help, f"{action.option_strings} has no help text"
    with pytest.raises(SystemExit):
        ode.parse_args(["--sampling-method", "rk45"])


@pytest.mark.parametrize("ours, theirs", [("euler", "euler"), ("heun", "heun2")])
@pytest.mark.parametrize("t0, t1", [(0.0, 1.0), (0.999, 0.001)])
def test_fixed_step_ode_methods_step_as_torchdiffeqs_do(ours, theirs, t0, t1):
    """Our euler and heun against torchdiffeq's euler and heun2 on the same grid, in float64, with a
    drift that is nonlinear, couples the dimensions and depends on time: equal to round-off at every
    grid point (an off-by-one time, a predictor at the wrong point, would be far outside), also for
    a tuple state (the likelihood's (x, log-density))."""
    from torchdiffeq import odeint

    from sit_fast.transport.integrators import integrate_ode, time_grid

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, generator=g, dtype=torch.float64)
    mix = torch.randn(4, 4, generator=g, dtype=torch.float64) / 2

    def drift(x, t):  # t: (B,)
        return torch.tanh(x @ mix) * (1 + 3 * t[:, None] ** 2) - x * torch.cos(4 * t[:, None])

    def pair_drift(state, t):
        x, logp = state
        return drift(x, t), -(x ** 2).sum(1) * t

    num_steps = 7
    grid = time_grid(t0, t1, num_steps + 1, x)
    mine = integrate_ode(drift, x, t0, t1, method=ours, num_steps=num_steps, trajectory=True)
    reference = odeint(lambda t, x: drift(x, t.expand(x.shape[0])), x, grid, method=theirs)
    torch.testing.assert_close(torch.stack(mine), reference, rtol=1e-13, atol=1e-13)
    state = (x, torch.zeros(3, dtype=torch.float64))
    mine = integrate_ode(pair_drift, state, t0, t1, method=ours, num_steps=num_steps)[-1]
    reference = odeint(lambda t, s: pair_drift(s, t.expand(x.shape[0])), state, grid, method=theirs)
    for a, b in zip(mine, reference):
        torch.testing.assert_close(a, b[-1], rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_low_precision_data_trains_on_float32_times_and_weights(dtype):
    """A bf16 or fp16 x1 is the model's input's dtype, not the times' nor the loss's: t takes float32's
    values (bf16 has none between 0.9961 and 1), and a VP noise model's velocity weight, (beta / sigma)^2,
    about 1e6 near t = 1e-3, stays finite where fp16 overflows."""
    transport = create_transport("VP", "noise", "velocity")
    record = {}
    torch.manual_seed(0)
    x1 = torch.randn(4096, 2).to(dtype)

    def model(x, t):
        record.update(x=x, t=t)
        return torch.zeros_like(x)

    torch.manual_seed(1)
    terms = transport.training_losses(model, x1)
    assert record["x"].dtype == dtype and record["t"].dtype == torch.float32
    assert record["t"].unique().numel() > 4000 and record["t"].max() > 0.999
    assert terms["loss"].dtype == torch.float32 and torch.isfinite(terms["loss"]).all()
    torch.manual_seed(1)
    x0 = torch.randn_like(x1).double()  # the same draw
    alpha, d_alpha, sigma, d_sigma = ref_coefficients("VP", record["t"].double()[:, None])
    weight = (sigma**2 * d_alpha / alpha - sigma * d_sigma) ** 2 / sigma**2
    inner = record["t"] < 0.9  # away from t = 1, where sigma_t = sqrt(1 - alpha_t^2) cancels in float32
    torch.testing.assert_close(terms["loss"].double()[inner], (weight * x0**2).mean(1)[inner], rtol=1e-5, atol=0)


def test_the_readmes_python_sampling_example_runs_as_written():
    """README.md's upstream-style sampling from Python, run as written but for the model's size (SiT-T/2
    for SiT-XL/2, random weights): guided samples of the labels' count come out."""
    import pathlib

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = [block for block in re.findall(r"```python\n(.*?)```", readme, re.S) if ".sample_ode(" in block]
    assert len(blocks) == 1, blocks
    code = blocks[0].replace('SiT_models["SiT-XL/2"]', 'SiT_models["SiT-T/2"]')
    assert code != blocks[0]
    namespace = {}
    torch.manual_seed(0)
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["latents"].shape == (4, 4, 32, 32) and torch.isfinite(namespace["latents"]).all()


def test_the_package_exports_the_transport_entry_points():
    """`from sit_fast import create_transport, Sampler`, beside SiT_models and load_checkpoint."""
    import sit_fast

    assert sit_fast.create_transport is create_transport and sit_fast.Sampler is Sampler
    assert {"create_transport", "Sampler", "SiT_models", "load_checkpoint"} <= set(sit_fast.__all__)


def test_a_sampling_end_a_float32_grid_holds_as_1_is_refused_where_t_1_is_singular():
    """1 - m is 1 in float32 for a margin m under 3e-8: such a sample_eps or last_step_size put the grid's end
    at t = 1 and gave NaN samples where t = 1 is singular; refused as a margin of 0 is, in the flags' words.
    6e-8 (float32's spacing below 1) stays off t = 1 and runs."""
    def model(x, t):
        return torch.tanh(x) * (0.5 + t[:, None])

    x = torch.randn(3, 4)
    for eps in (1e-9, 2e-8):
        with pytest.raises(ValueError, match=rf"^sample_eps {eps:g} must be at least 3e-08 here .* the VP path has "
                                             rf"sigma_t = 0 at t = 1, where the velocity from a noise model"):
            Sampler(create_transport("VP", "noise", sample_eps=eps)).sample_ode(sampling_method="heun", num_steps=4)
    for path_type in ("Linear", "GVP", "VP"):
        with pytest.raises(ValueError, match=r"^last_step_size 1e-08 must be at least 3e-08 here") as err:
            Sampler(create_transport(path_type)).sample_sde(diffusion_form="constant", last_step_size=1e-8)
        assert in_flag_words(err.value).startswith("--last-step-size 1e-08 must be at least 3e-08 here")
        # the default named is the flag's own: a last step's for a last_step_size, sample_eps's for VP's eps
        assert str(err.value).endswith("upstream's default is 0.04" if path_type == "VP" else
                                       "the sigma and SBDM diffusions are finite there)"), err.value
    with pytest.raises(ValueError, match=r"default for VP is 1e-3$"):
        Sampler(create_transport("VP", sample_eps=1e-8)).sample_sde(diffusion_form="linear", last_step=None)
    for margin in (3e-8, 5e-8):  # held as 1 - 2**-24 in float32, not 1: the message's least value runs
        Sampler(create_transport("VP", "noise", sample_eps=margin)).sample_ode(sampling_method="heun", num_steps=4)
    with pytest.raises(ValueError, match=r"^sample_eps 1e-08 must be at least 3e-08 here"):
        Sampler(create_transport("Linear", "score", sample_eps=1e-8)).sample_sde(diffusion_form="linear",
                                                                                 last_step=None)
    runs = [Sampler(create_transport("VP", "noise", sample_eps=6e-8)).sample_ode(sampling_method="heun", num_steps=4),
            Sampler(create_transport("VP", "noise", sample_eps=6e-8)).sample_sde(sampling_method="Heun", last_step=None,
                                                                                num_steps=4),
            Sampler(create_transport("Linear")).sample_sde(diffusion_form="constant", last_step_size=6e-8, num_steps=4),
            Sampler(create_transport("VP")).sample_sde(diffusion_form="SBDM", last_step_size=6e-8, num_steps=4),
            # where t = 1 is finite a tiny margin is taken as it was: an ODE of a score model, the sigma diffusion,
            # SBDM's off the VP path
            Sampler(create_transport("Linear", "score", sample_eps=1e-9)).sample_ode(sampling_method="heun",
                                                                                    num_steps=4),
            Sampler(create_transport("GVP")).sample_sde(sampling_method="Heun", diffusion_form="sigma",
                                                        last_step_size=1e-9, num_steps=4),
            Sampler(create_transport("Linear")).sample_sde(diffusion_form="SBDM", last_step_size=1e-9, num_steps=4)]
    for sample in runs:
        torch.manual_seed(0)
        assert sample(x, model)[-1].isfinite().all()
