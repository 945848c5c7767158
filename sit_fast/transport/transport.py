"""Transport (training objective) and Sampler (ODE / SDE / likelihood) of SiT.

Time runs from t = 0 (noise x0 ~ N(0, I)) to t = 1 (data x1); x_t = alpha_t x1 + sigma_t x0.
A model is called as model(x, t, **model_kwargs) with t of shape (B,) and returns a tensor shaped
like x: a velocity, a score or a noise prediction, per the transport's ModelType.
"""
import enum
import math

import torch

from sit_fast.transport import path
from sit_fast.transport.integrators import (
    ODE_METHODS,
    SDE_METHODS,
    check_tolerances,
    integrate_ode,
    ode_method_uses_tolerances,
    sde_euler_maruyama,
    sde_heun,
    time_grid,
)
from sit_fast.transport.utils import check_choice, mean_flat

LAST_STEPS = (None, "Mean", "Tweedie", "Euler")


class ModelType(enum.Enum):
    """What the model predicts."""

    NOISE = enum.auto()  # eps, the noise x0 that produced x_t
    SCORE = enum.auto()  # grad log p_t(x_t)
    VELOCITY = enum.auto()  # v(x_t, t) = d/dt x_t


class PathType(enum.Enum):
    """Which interpolant connects noise and data."""

    LINEAR = enum.auto()
    GVP = enum.auto()
    VP = enum.auto()


class WeightType(enum.Enum):
    """How the score / noise losses are weighted over time (velocity losses are never weighted)."""

    NONE = enum.auto()
    VELOCITY = enum.auto()  # (beta_t / sigma_t)^2: the noise loss becomes a velocity-space loss
    LIKELIHOOD = enum.auto()  # beta_t / sigma_t^2: the maximum-likelihood weighting


PATH_PLANS = {PathType.LINEAR: path.ICPlan, PathType.GVP: path.GVPCPlan, PathType.VP: path.VPCPlan}


class Transport:
    """An interpolant path plus what the model predicts; owns the training loss and the drift maths.

    train_eps / sample_eps keep training times and sampling grids off the singular ends of the
    interval; see check_interval for where each one is used.
    """

    def __init__(self, *, model_type, path_type, loss_type, train_eps, sample_eps):
        self.model_type = model_type
        self.path_type = path_type
        self.loss_type = loss_type
        self.path_sampler = PATH_PLANS[path_type]()
        for name, eps in (("train_eps", train_eps), ("sample_eps", sample_eps)):
            if not 0 <= eps < 0.5:  # [eps, 1 - eps] must be an interval; nan fails too
                raise ValueError(f"{name} must be in [0, 0.5), got {eps}")
        self.train_eps = train_eps
        self.sample_eps = sample_eps

    def prior_logp(self, z):
        """log N(z; 0, I) per sample: (B, ...) -> (B,)."""
        dims = z[0].numel()
        return -0.5 * dims * math.log(2 * math.pi) - 0.5 * z.flatten(1).pow(2).sum(1)

    def check_interval(self, train_eps, sample_eps, *, diffusion_form="SBDM", sde=False, reverse=False,
                       eval=False, last_step_size=0.0):
        """Time interval (t0, t1) to train on or integrate over (upstream's rules, with a guard).

        eps = sample_eps when eval else train_eps.
        - VP: t1 = 1 - eps, or 1 - last_step_size for an SDE that takes a last step; t = 1 (sigma_t = 0)
          is refused for sampling with a noise model, or an SDE whose diffusion is not the sigma form,
          and for training a score or noise model with a loss weight.
        - Linear / GVP with a score or noise model, or any SDE: t0 = eps for score / noise models
          and for the SBDM diffusion (whose beta_t is infinite at t = 0), else 0; t1 as for VP.
        - Linear / GVP velocity models outside SDEs use the whole [0, 1].
        reverse swaps the direction: (1 - t0, 1 - t1).
        Raises ValueError where eps = 0 would put a singular end inside the interval (sampling a Linear
        or GVP score or noise model, or a VP noise model, a loss weight, SBDM's diffusion at t = 0, an
        SDE's diffusion term at t = 1 but for the sigma and SBDM forms' off the VP path), where a
        sampling end 1 - eps or 1 - last_step_size that a float32 grid holds as 1 (a margin under 3e-8)
        is singular as t = 1 is (for a float64 state's grid as well: the state's dtype is not known
        here), and where the interval would be empty or reversed (an SDE's last step longer than what
        is left after eps).
        """
        t0, t1 = 0.0, 1.0
        eps = sample_eps if eval else train_eps
        t1_inside = 1 - eps if (not sde or last_step_size == 0) else 1 - last_step_size
        which = "sample_eps" if eval else "train_eps"
        # A sampling grid is float32 (for any state but a float64 one), where 1 - m is 1 for a margin m < 3e-8
        at_one = float(torch.tensor(t1_inside, dtype=torch.float32)) == 1
        margin, margin_name = (last_step_size, "last_step_size") if sde and last_step_size else (eps, which)
        at_one_refused = (f"{which} must be > 0 here" if margin == 0 else
                          f"{margin_name} {margin:g} must be at least 3e-08 here (a float32 time grid holds "
                          f"1 - {margin:g} as 1)")
        if self.path_type == PathType.VP:
            t1 = t1_inside
            if eval and at_one and (self.model_type == ModelType.NOISE or (sde and diffusion_form != "sigma")):
                what = ("the velocity from a noise model is singular" if self.model_type == ModelType.NOISE else
                        f"the SDE's drift with the {diffusion_form} diffusion is singular (with the sigma "
                        f"diffusion it is not)")
                default = ("upstream's default for VP is 1e-3" if margin_name == "sample_eps" else
                           "upstream's default is 0.04")
                raise ValueError(f"{at_one_refused}: the VP path has sigma_t = 0 at t = 1, where {what}; {default}")
            if not eval and t1 == 1 and self.model_type != ModelType.VELOCITY and self.loss_type != WeightType.NONE:
                raise ValueError(f"train_eps must be > 0 here: the VP path has sigma_t = 0 at t = 1, where the "
                                 f"{self.loss_type.name.lower()} loss weight is infinite")
        elif self.model_type != ModelType.VELOCITY or sde:
            needs_t0 = (sde and diffusion_form == "SBDM") or self.model_type != ModelType.VELOCITY
            t0 = eps if needs_t0 else 0.0
            t1 = t1_inside
            if eps <= 0 and (needs_t0 or t1 == 1):
                why = []
                if self.model_type != ModelType.VELOCITY:
                    path = {"LINEAR": "Linear"}.get(self.path_type.name, self.path_type.name)  # as --path-type
                    what = f"the {path} path with a {self.model_type.name.lower()} model"
                    if eval:  # its velocity divides by alpha_t (0 at t = 0) and its score by sigma_t (0 at t = 1)
                        why.append(f"{what} is singular at t = 0 and t = 1")
                    elif self.loss_type != WeightType.NONE:  # unweighted, the loss is finite at both ends
                        why.append(f"{what} has a {self.loss_type.name.lower()} loss weight that is infinite or "
                                   f"undefined at t = 0 and t = 1")
                elif needs_t0:
                    why.append("the SBDM diffusion is infinite at t = 0 (another diffusion form is not)")
                if why:
                    raise ValueError(f"{which} must be > 0 here: " + "; ".join(why))
            if sde and at_one and diffusion_form not in ("sigma", "SBDM"):  # their w_t / sigma_t is finite at t = 1
                score = ("the score an SDE takes from a velocity model" if self.model_type == ModelType.VELOCITY else
                         "the model's score")
                raise ValueError(f"{at_one_refused}: the {diffusion_form} diffusion's term, w_t times {score}, is "
                                 f"singular at t = 1 (a last step stops short of it; the sigma and SBDM diffusions "
                                 f"are finite there)")
        if not t0 < t1:  # e.g. an SDE's last step from before its first time
            last = f" and last_step_size {last_step_size}" if sde and last_step_size else ""
            raise ValueError(f"{which} {eps}{last} leave no time to integrate over: the interval would be "
                             f"[{t0:g}, {t1:g}]")
        if reverse:
            t0, t1 = 1 - t0, 1 - t1
        return t0, t1

    def eps_matters(self, *, eval=False, **interval) -> bool:
        """Whether check_interval's interval (its keyword arguments: sde, diffusion_form, ...) depends on
        eps, train_eps or with eval sample_eps. It does not for Linear and GVP velocity models, which
        train, and solve ODEs, on the whole [0, 1] whatever eps is (as upstream)."""
        try:
            return len({self.check_interval(eps, eps, eval=eval, **interval) for eps in (1e-3, 2e-3)}) > 1
        except ValueError:  # an interval too short for the probes: eps is what shortens it
            return True

    def sample(self, x1):
        """Draw (t, x0, x1) for training: x0 ~ N(0, I) in x1's dtype, t ~ U[t0, t1] in float32 at least
        (bf16 holds about 1400 times in [0, 1), none between 0.9961 and 1), both on x1's device."""
        x0 = torch.randn_like(x1)
        t0, t1 = self.check_interval(self.train_eps, self.sample_eps)
        dtype = torch.promote_types(x1.dtype, torch.float32)
        t = torch.rand(x1.shape[0], device=x1.device, dtype=dtype) * (t1 - t0) + t0
        return t, x0, x1

    def training_losses(self, model, x1, model_kwargs=None):
        """Per-sample loss for a batch of data x1.

        velocity: |v_theta - (alpha'_t x1 + sigma'_t x0)|^2
        noise:    weight_t |eps_theta - x0|^2
        score:    weight_t |sigma_t s_theta + x0|^2
        with weight_t = 1, (beta_t / sigma_t)^2 or beta_t / sigma_t^2 (WeightType NONE, VELOCITY,
        LIKELIHOOD), each averaged over the non-batch dimensions. t, the path's coefficients, the
        weights and the loss are in float32 at least (a bf16 or fp16 x1's dtype is the model's input's:
        (beta_t / sigma_t)^2, about 1e6 near t = 1e-3 on VP, is past fp16's range).
        Returns {"loss": (B,), "pred": model output}.
        """
        model_kwargs = {} if model_kwargs is None else model_kwargs
        if not isinstance(model_kwargs, dict):
            raise TypeError(f"model_kwargs is a dict of the model's keyword arguments, e.g. dict(y=labels), got a "
                            f"{type(model_kwargs).__name__}")
        if not x1.is_floating_point():
            raise TypeError(f"x1 must be floating point (images scaled to [-1, 1], or latents), got {x1.dtype}")
        t, x0, x1 = self.sample(x1)
        t, xt, ut = self.path_sampler.plan(t, x0, x1)
        model_output = model(xt.to(x1.dtype), t, **model_kwargs)
        if model_output.shape != xt.shape:
            raise ValueError(f"model output shape {tuple(model_output.shape)} != input shape {tuple(xt.shape)}")

        terms = {"pred": model_output}
        dtype = torch.promote_types(model_output.dtype, ut.dtype)  # float32 at least, as t
        model_output, x0 = model_output.to(dtype), x0.to(dtype)
        if self.model_type == ModelType.VELOCITY:
            terms["loss"] = mean_flat((model_output - ut) ** 2)
            return terms
        _, beta_t = self.path_sampler.compute_drift(xt, t)
        sigma_t, _ = self.path_sampler.compute_sigma_t(path.expand_t_like_x(t, xt))
        if self.loss_type == WeightType.VELOCITY:
            weight = (beta_t / sigma_t) ** 2
        elif self.loss_type == WeightType.LIKELIHOOD:
            weight = beta_t / sigma_t**2
        else:
            weight = 1.0
        if self.model_type == ModelType.NOISE:
            terms["loss"] = mean_flat(weight * (model_output - x0) ** 2)
        else:
            terms["loss"] = mean_flat(weight * (model_output * sigma_t + x0) ** 2)
        return terms

    def velocity_and_noise(self, model_output, x, t):
        """Convert a model output at (x, t) into (velocity, noise prediction eps)."""
        plan = self.path_sampler
        if self.model_type == ModelType.VELOCITY:
            return model_output, plan.get_noise_from_velocity(model_output, x, t)
        if self.model_type == ModelType.NOISE:
            return plan.get_velocity_from_noise(model_output, x, t), model_output
        sigma_t, _ = plan.compute_sigma_t(path.expand_t_like_x(t, x))
        return plan.get_velocity_from_score(model_output, x, t), -sigma_t * model_output

    def get_drift(self):
        """drift(x, t, model, **model_kwargs): the probability-flow ODE velocity, one model call."""
        def drift(x, t, model, **model_kwargs):
            model_output = model(x, t, **model_kwargs)
            if self.model_type == ModelType.VELOCITY:
                return model_output
            return self.velocity_and_noise(model_output, x, t)[0]

        return drift

    def get_score(self):
        """score(x, t, model, **model_kwargs): grad log p_t(x), one model call."""
        plan = self.path_sampler

        def score(x, t, model, **model_kwargs):
            model_output = model(x, t, **model_kwargs)
            if self.model_type == ModelType.SCORE:
                return model_output
            if self.model_type == ModelType.NOISE:
                return -model_output / plan.compute_sigma_t(path.expand_t_like_x(t, x))[0]
            return plan.get_score_from_velocity(model_output, x, t)

        return score


class Sampler:
    """Builds sampling functions fn(x, model, **model_kwargs) for a Transport.

    sample_ode and sample_sde return functions giving a list whose last element is the final
    sample (upstream usage: sample_fn(z, model, **model_kwargs)[-1]); sample_ode_likelihood returns
    a function giving (logp, prior sample).
    """

    def __init__(self, transport):
        self.transport = transport
        self.drift = transport.get_drift()
        self.score = transport.get_score()

    def _sde_drift_and_diffusion(self, diffusion_form, diffusion_norm):
        """SDE dx = [v + w_t s] dt + sqrt(2 w_t) dW (SiT eq. 4); one model call per drift."""
        plan = self.transport.path_sampler

        def sde_drift(x, t, model, **model_kwargs):
            velocity, noise = self.transport.velocity_and_noise(model(x, t, **model_kwargs), x, t)
            # w_t s = -(w_t / sigma_t) eps, finite at sigma_t = 0 for the SBDM and sigma forms
            return velocity - plan.compute_diffusion_over_sigma(x, t, diffusion_form, diffusion_norm) * noise

        def diffusion(x, t):
            return plan.compute_diffusion(x, t, form=diffusion_form, norm=diffusion_norm)

        return sde_drift, diffusion

    def _last_step_fn(self, sde_drift, last_step, last_step_size):
        """The final step from t1 to 1, taken without noise: last_step_fn(x, t, model, **kwargs)."""
        plan = self.transport.path_sampler
        if last_step is None:
            return lambda x, t, model, **model_kwargs: x
        if last_step == "Mean":  # one Euler step of the SDE drift, no noise
            return lambda x, t, model, **model_kwargs: x + sde_drift(x, t, model, **model_kwargs) * last_step_size
        if last_step == "Euler":  # one Euler step of the probability-flow ODE
            return lambda x, t, model, **model_kwargs: x + self.drift(x, t, model, **model_kwargs) * last_step_size

        def tweedie(x, t, model, **model_kwargs):  # E[x1 | x_t] = (x + sigma_t^2 s) / alpha_t
            noise = self.transport.velocity_and_noise(model(x, t, **model_kwargs), x, t)[1]
            return plan.get_data_from_noise(noise, x, t)

        return tweedie

    def sample_sde(self, *, sampling_method="Euler", diffusion_form="SBDM", diffusion_norm=1.0, last_step="Mean",
                   last_step_size=0.04, num_steps=250, trajectory=False):
        """Return fn(x, model, **model_kwargs) solving the SDE from noise x at t0 to data.

        sampling_method: "Euler" (Euler-Maruyama) or "Heun" (stochastic Heun).
        diffusion_form / diffusion_norm: w_t, see path.ICPlan.compute_diffusion. On Linear / GVP,
            SBDM's w_t grows like 1/t, so its grid starts at t0 = sample_eps (1e-3 by default, for
            velocity models too) and its first steps are stiff: Euler-Maruyama recovers from them
            with ~100 or more steps (upstream's 250 are fine); short schedules want "sigma".
        last_step: None, "Mean" (noise-free SDE step), "Tweedie" (denoise with E[x1 | x_t]) or
            "Euler" (probability-flow ODE step), taken from t1 = 1 - last_step_size to 1.
        num_steps: counts the last step, as upstream: num_steps - 1 stochastic steps over an even
            grid of num_steps points from t0 to t1, then the last step. Model calls: Euler
            num_steps - 1, Heun 2 (num_steps - 1), plus 1 unless last_step is None.
        trajectory: False returns [x_final]; True returns num_steps + 1 states: the start, the
            state after each stochastic step, and the last step's output (with last_step=None the
            last two are the same tensor).
        Runs under torch.no_grad(); noise is drawn with torch.randn_like on x's device.
        """
        check_choice("sampling_method", sampling_method, SDE_METHODS)
        check_choice("diffusion_form", diffusion_form, path.DIFFUSION_FORMS)
        check_choice("last_step", last_step, LAST_STEPS)
        if num_steps < 2:
            raise ValueError(f"num_steps must be at least 2 for an SDE (it counts the last step), got {num_steps}")
        if not diffusion_norm >= 0:  # w_t = norm * form(t) >= 0: sqrt(2 w_t) of a negative norm is NaN
            raise ValueError(f"diffusion_norm must be 0 or more, got {diffusion_norm}")
        if last_step is None:
            last_step_size = 0.0
        elif not 0 < last_step_size < 1:
            raise ValueError(f"last_step_size must lie in (0, 1), got {last_step_size}")
        t0, t1 = self.transport.check_interval(
            self.transport.train_eps, self.transport.sample_eps, diffusion_form=diffusion_form, sde=True,
            eval=True, reverse=False, last_step_size=last_step_size)
        sde_drift, diffusion = self._sde_drift_and_diffusion(diffusion_form, diffusion_norm)
        last_step_fn = self._last_step_fn(sde_drift, last_step, last_step_size)
        integrate = sde_euler_maruyama if sampling_method == "Euler" else sde_heun

        def sample(x, model, **model_kwargs):
            def drift(x, t):
                return sde_drift(x, t, model, **model_kwargs)

            with torch.no_grad():
                t_grid = time_grid(t0, t1, num_steps, x)
                states = integrate(drift, diffusion, x, t_grid, trajectory)
                x_final = last_step_fn(states[-1], t_grid[-1].expand(x.shape[0]), model, **model_kwargs).to(x.dtype)
            return states + [x_final] if trajectory else [x_final]

        return sample

    def sample_ode(self, *, sampling_method="dopri5", num_steps=50, atol=1e-6, rtol=1e-3, reverse=False,
                   trajectory=False):
        """Return fn(x, model, **model_kwargs) solving the probability-flow ODE dx/dt = v(x, t).

        sampling_method: "euler" / "heun" (ours: fixed steps, exactly num_steps resp. 2 * num_steps
            model calls, the last step included) or any torchdiffeq method ("dopri5", "rk4", ...).
        num_steps: number of integration steps for fixed-grid methods (unlike upstream, where it
            counted grid points); for adaptive methods only the number of intervals of a returned
            trajectory.
        atol, rtol: tolerances of adaptive methods (and of implicit_adams' corrector).
        reverse: integrate data -> noise instead, over the same interval from t1 back to t0, as the
            likelihood does (upstream reflected it to (1 - t0, 1 - t1), which for VP starts at t = 1,
            where sigma_t = 0 and a score or noise model is singular; for Linear and GVP the two agree).
        trajectory: False returns [x_final]; True returns the num_steps + 1 states on an even grid.
        """
        check_choice("sampling_method", sampling_method, ODE_METHODS)
        check_tolerances(sampling_method, atol, rtol)
        t0, t1 = self.transport.check_interval(
            self.transport.train_eps, self.transport.sample_eps, sde=False, eval=True, reverse=False,
            last_step_size=0.0)
        if reverse:
            t0, t1 = t1, t0

        def sample(x, model, **model_kwargs):
            def drift(x, t):
                return self.drift(x, t, model, **model_kwargs)

            return integrate_ode(drift, x, t0, t1, method=sampling_method, num_steps=num_steps, atol=atol,
                                 rtol=rtol, trajectory=trajectory)

        return sample

    def sample_ode_likelihood(self, *, sampling_method="dopri5", num_steps=50, atol=1e-6, rtol=1e-3,
                              exact_divergence=False):
        """Return fn(x, model, **model_kwargs) -> (logp, z): log-likelihood of data x and its prior sample z.

        Integrates the probability-flow ODE from data (t1) back to noise (t0) together with
        int div v dt, so log p(x) = log N(z; 0, I) - int_{t0}^{t1} div v(x_t, t) dt; z keeps x's
        dtype, and logp is in float32 for bf16 / fp16 data (a sum over every dimension).
        The divergence is Hutchinson's estimate eps^T (dv/dx) eps with one Rademacher eps per
        sample, drawn once per call so the adaptive solver sees a smooth right-hand side (upstream
        drew a new eps at every evaluation), or with exact_divergence=True the exact trace, one
        backward pass per data dimension (for small data only). Arguments as for sample_ode, but
        atol must be positive for a method that uses it: the integral's state starts at 0, where a
        relative tolerance alone allows no error.
        """
        check_choice("sampling_method", sampling_method, ODE_METHODS)
        check_tolerances(sampling_method, atol, rtol)
        if atol == 0 and ode_method_uses_tolerances(sampling_method):
            raise ValueError(f"atol 0: the likelihood integrates the divergence from 0, where a relative tolerance "
                             f"alone allows no error and {sampling_method} cannot step; give atol > 0 (default 1e-6)")
        t0, t1 = self.transport.check_interval(
            self.transport.train_eps, self.transport.sample_eps, sde=False, eval=True, reverse=False,
            last_step_size=0.0)

        def likelihood(x, model, **model_kwargs):
            if torch.is_inference_mode_enabled():
                raise RuntimeError("the likelihood differentiates the model (the divergence of its drift): call it "
                                   "outside torch.inference_mode(); torch.no_grad() is fine")
            # e.g. latents or labels made under inference_mode: autograd cannot record them
            x = x.clone() if x.is_inference() else x
            model_kwargs = {k: v.clone() if isinstance(v, torch.Tensor) and v.is_inference() else v
                            for k, v in model_kwargs.items()}
            probe = None if exact_divergence else torch.randint_like(x, 2) * 2 - 1

            def augmented_drift(state, t):
                x, _ = state
                with torch.enable_grad():
                    x = x.detach().requires_grad_(True)
                    velocity = self.drift(x, t, model, **model_kwargs)
                    divergence = _divergence(velocity, x, probe)
                return velocity.detach(), -divergence.detach()  # the second state gathers int div v dt

            # the log-density sums over every dimension: kept in float32 at least (bf16 was ~6 nats off at 768)
            state = (x, torch.zeros(x.shape[0], device=x.device, dtype=torch.promote_types(x.dtype, torch.float32)))
            z, delta_logp = integrate_ode(augmented_drift, state, t1, t0, method=sampling_method,
                                          num_steps=num_steps, atol=atol, rtol=rtol)[-1]
            return self.transport.prior_logp(z.to(delta_logp.dtype)) - delta_logp, z

        return likelihood


def _divergence(velocity, x, probe):
    """div_x v per sample: Hutchinson's probe^T J probe, or the exact trace when probe is None."""
    total = torch.promote_types(x.dtype, torch.float32)  # a sum over every dimension
    if probe is not None:
        (vjp,) = torch.autograd.grad(velocity, x, grad_outputs=probe)
        return (vjp * probe).flatten(1).sum(1, dtype=total)
    flat = velocity.flatten(1)
    divergence = torch.zeros(x.shape[0], device=x.device, dtype=total)
    for i in range(flat.shape[1]):
        (grad,) = torch.autograd.grad(flat[:, i].sum(), x, retain_graph=True)
        divergence = divergence + grad.flatten(1)[:, i]
    return divergence
