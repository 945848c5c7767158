"""Interpolation paths ("plans") between noise x0 ~ N(0, I) at t = 0 and data x1 at t = 1.

Every plan defines x_t = alpha_t * x1 + sigma_t * x0 (SiT, Ma et al. 2024, eq. 1) and the
conversions between the three things a model may predict at (x_t, t):

    velocity  v   = E[d/dt x_t | x_t] = alpha'_t x1_hat + sigma'_t x0_hat
    noise     eps = E[x0 | x_t]
    score     s   = grad log p_t(x_t) = -eps / sigma_t

Two derived coefficients appear throughout (all of them are positive on (0, 1)):

    beta_t = sigma_t^2 alpha'_t / alpha_t - sigma_t sigma'_t   ("drift_var"; v = alpha'_t/alpha_t x_t + beta_t s)
    D_t    = alpha'_t sigma_t - alpha_t sigma'_t               (the determinant of (x_t, v) in (x1, x0))

Upstream divides by alpha'_t when it turns a velocity into a noise or score; alpha'_t is 0 at t = 1
on the GVP path. Here those conversions divide by D_t instead, which never vanishes, so they stay
finite on the closed interval; only sigma_t = 0 (the score at t = 1) and alpha_t = 0 (anything
built from a score or noise at t = 0) are singular, as the maths says they must be.

Every method takes t either of shape (B,) (it is reshaped against x where x is an argument) or
already broadcastable against the data; coefficients come back broadcastable against x.
"""
import math

import torch

from sit_fast.transport.utils import check_choice

DIFFUSION_FORMS = ("constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing")


def expand_t_like_x(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape t of shape (B,) (or already (B, 1, ...)) to (B, 1, ..., 1) so it broadcasts over x."""
    return t.reshape(t.shape[0], *([1] * (x.dim() - 1)))


class ICPlan:
    """Linear interpolant: alpha_t = t, sigma_t = 1 - t (SiT's "Linear" path)."""

    def __init__(self, sigma=0.0):
        self.sigma = sigma  # upstream's constructor argument, which no formula reads: kept for code written for it

    def compute_alpha_t(self, t):
        """Data coefficient and its time derivative: (alpha_t, alpha'_t)."""
        return t, torch.ones_like(t)

    def compute_sigma_t(self, t):
        """Noise coefficient and its time derivative: (sigma_t, sigma'_t)."""
        return 1 - t, -torch.ones_like(t)

    def compute_d_alpha_alpha_ratio_t(self, t):
        """alpha'_t / alpha_t (infinite at t = 0, where alpha_t = 0)."""
        return 1 / t

    def compute_drift(self, x, t):
        """Score-parametrised probability-flow drift, v = -drift_mean + beta_t * score.

        Returns (drift_mean, beta_t) with drift_mean = -(alpha'_t / alpha_t) x.
        """
        t = expand_t_like_x(t, x)
        ratio = self.compute_d_alpha_alpha_ratio_t(t)
        sigma_t, d_sigma_t = self.compute_sigma_t(t)
        beta_t = ratio * sigma_t**2 - sigma_t * d_sigma_t
        return -ratio * x, beta_t

    def compute_diffusion(self, x, t, form="constant", norm=1.0):
        """Diffusion coefficient w_t of the SDE dx = [v + w_t s] dt + sqrt(2 w_t) dW (SiT eq. 4).

        form: "constant" (norm), "SBDM" (norm * beta_t, the score-based diffusion-model choice),
        "sigma" (norm * sigma_t), "linear" (norm * (1 - t)), "decreasing"
        (0.25 * (norm * cos(pi t) + 1)^2), "increasing-decreasing" (norm * sin(pi t)^2).
        """
        check_choice("diffusion_form", form, DIFFUSION_FORMS)
        t = expand_t_like_x(t, x)
        if form == "constant":
            return torch.full_like(t, norm)
        if form == "SBDM":
            return norm * self.compute_drift(x, t)[1]
        if form == "sigma":
            return norm * self.compute_sigma_t(t)[0]
        if form == "linear":
            return norm * (1 - t)
        if form == "decreasing":
            return 0.25 * (norm * torch.cos(math.pi * t) + 1) ** 2
        return norm * torch.sin(math.pi * t) ** 2

    def compute_diffusion_over_sigma(self, x, t, form="constant", norm=1.0):
        """w_t / sigma_t, the factor that turns a noise prediction into the SDE's score term.

        w_t * score = -(w_t / sigma_t) * eps. For "SBDM" this is norm * D_t / alpha_t and for
        "sigma" it is norm, both finite at sigma_t = 0; the other forms divide by sigma_t.
        """
        check_choice("diffusion_form", form, DIFFUSION_FORMS)
        t = expand_t_like_x(t, x)
        if form == "SBDM":
            sigma_t, d_sigma_t = self.compute_sigma_t(t)
            return norm * (sigma_t * self.compute_d_alpha_alpha_ratio_t(t) - d_sigma_t)  # beta_t / sigma_t
        if form == "sigma":
            return torch.full_like(t, norm)
        return self.compute_diffusion(x, t, form=form, norm=norm) / self.compute_sigma_t(t)[0]

    def _determinant(self, t):
        """D_t = alpha'_t sigma_t - alpha_t sigma'_t, positive for every t in [0, 1]."""
        alpha_t, d_alpha_t = self.compute_alpha_t(t)
        sigma_t, d_sigma_t = self.compute_sigma_t(t)
        return d_alpha_t * sigma_t - alpha_t * d_sigma_t

    def get_noise_from_velocity(self, velocity, x, t):
        """eps = (alpha'_t x - alpha_t v) / D_t: finite for every t in [0, 1]."""
        t = expand_t_like_x(t, x)
        alpha_t, d_alpha_t = self.compute_alpha_t(t)
        return (d_alpha_t * x - alpha_t * velocity) / self._determinant(t)

    def get_score_from_velocity(self, velocity, x, t):
        """score = -eps / sigma_t = (alpha_t v - alpha'_t x) / (sigma_t D_t) (SiT eq. 9)."""
        t = expand_t_like_x(t, x)
        alpha_t, d_alpha_t = self.compute_alpha_t(t)
        sigma_t, _ = self.compute_sigma_t(t)
        return (alpha_t * velocity - d_alpha_t * x) / (sigma_t * self._determinant(t))

    def get_velocity_from_score(self, score, x, t):
        """v = (alpha'_t / alpha_t) x + beta_t * score."""
        drift_mean, beta_t = self.compute_drift(x, t)
        return beta_t * score - drift_mean

    def get_velocity_from_noise(self, noise, x, t):
        """v = alpha'_t x1_hat + sigma'_t eps, with x1_hat = (x - sigma_t eps) / alpha_t."""
        t = expand_t_like_x(t, x)
        sigma_t, d_sigma_t = self.compute_sigma_t(t)
        return self.compute_d_alpha_alpha_ratio_t(t) * (x - sigma_t * noise) + d_sigma_t * noise

    def get_data_from_noise(self, noise, x, t):
        """Tweedie's denoised estimate x1_hat = E[x1 | x_t] = (x - sigma_t eps) / alpha_t."""
        t = expand_t_like_x(t, x)
        alpha_t, _ = self.compute_alpha_t(t)
        sigma_t, _ = self.compute_sigma_t(t)
        return (x - sigma_t * noise) / alpha_t

    def compute_mu_t(self, t, x0, x1):
        """Mean of the path at t given its two ends: alpha_t x1 + sigma_t x0."""
        t = expand_t_like_x(t, x1)
        alpha_t, _ = self.compute_alpha_t(t)
        sigma_t, _ = self.compute_sigma_t(t)
        return alpha_t * x1 + sigma_t * x0

    def compute_xt(self, t, x0, x1):
        """A point of the path at time t (deterministic given x0, x1)."""
        return self.compute_mu_t(t, x0, x1)

    def compute_ut(self, t, x0, x1, xt):
        """Conditional velocity, the regression target of a velocity model: alpha'_t x1 + sigma'_t x0."""
        t = expand_t_like_x(t, x1)
        _, d_alpha_t = self.compute_alpha_t(t)
        _, d_sigma_t = self.compute_sigma_t(t)
        return d_alpha_t * x1 + d_sigma_t * x0

    def plan(self, t, x0, x1):
        """Return (t, x_t, u_t) for training."""
        xt = self.compute_xt(t, x0, x1)
        ut = self.compute_ut(t, x0, x1, xt)
        return t, xt, ut


class VPCPlan(ICPlan):
    """Variance-preserving path of score-based diffusion (VP-SDE with a linear beta schedule).

    alpha_t = exp(m(t)), sigma_t = sqrt(1 - alpha_t^2), with log-mean coefficient
    m(t) = -(1 - t)^2 (sigma_max - sigma_min) / 4 - (1 - t) sigma_min / 2. The names sigma_min and
    sigma_max are upstream's for beta_min = 0.1 and beta_max = 20 of the VP-SDE.
    """

    def __init__(self, sigma_min=0.1, sigma_max=20.0):
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def log_mean_coeff(self, t):
        """m(t) = log alpha_t."""
        return -0.25 * (1 - t) ** 2 * (self.sigma_max - self.sigma_min) - 0.5 * (1 - t) * self.sigma_min

    def d_log_mean_coeff(self, t):
        """m'(t) = alpha'_t / alpha_t = beta(1 - t) / 2."""
        return 0.5 * (1 - t) * (self.sigma_max - self.sigma_min) + 0.5 * self.sigma_min

    def compute_alpha_t(self, t):
        alpha_t = torch.exp(self.log_mean_coeff(t))
        return alpha_t, alpha_t * self.d_log_mean_coeff(t)

    def compute_sigma_t(self, t):
        two_m = 2 * self.log_mean_coeff(t)
        sigma_t = torch.sqrt(-torch.expm1(two_m))  # sqrt(1 - alpha_t^2), accurate as alpha_t -> 1
        d_sigma_t = -torch.exp(two_m) * self.d_log_mean_coeff(t) / sigma_t
        return sigma_t, d_sigma_t

    def compute_d_alpha_alpha_ratio_t(self, t):
        return self.d_log_mean_coeff(t)

    def compute_drift(self, x, t):
        """Closed form of the parent's formula: beta_t = m'(t), drift_mean = -m'(t) x."""
        t = expand_t_like_x(t, x)
        beta_t = self.sigma_min + (1 - t) * (self.sigma_max - self.sigma_min)
        return -0.5 * beta_t * x, beta_t / 2


class GVPCPlan(ICPlan):
    """Generalised variance-preserving path: alpha_t = sin(pi t / 2), sigma_t = cos(pi t / 2).

    cos(pi t / 2) is evaluated as sin(pi (1 - t) / 2) so that sigma_t and alpha'_t are exactly 0
    at t = 1 in floating point.
    """

    def compute_alpha_t(self, t):
        return torch.sin(0.5 * math.pi * t), 0.5 * math.pi * torch.sin(0.5 * math.pi * (1 - t))

    def compute_sigma_t(self, t):
        return torch.sin(0.5 * math.pi * (1 - t)), -0.5 * math.pi * torch.sin(0.5 * math.pi * t)

    def compute_d_alpha_alpha_ratio_t(self, t):
        return 0.5 * math.pi * torch.sin(0.5 * math.pi * (1 - t)) / torch.sin(0.5 * math.pi * t)
