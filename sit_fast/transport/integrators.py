"""ODE and SDE integrators as short pure functions over a time grid.

Every function takes `drift(x, t)` (and `diffusion(x, t)` for SDEs) with t of shape (B,), a
start state x (a tensor, or for the ODE functions a tuple of tensors with the batch first), and a
time grid already on x's device. In the fixed-step loops nothing leaves the device: times are
`t_grid[i].expand(B)` views and step sizes are entries of `t_grid.diff()`, so there is no .item(),
no host-built tensor and no host-device copy, and a whole sampling call can be captured in a CUDA
graph (tests/test_transport.py checks this on the meta device, and captures one on a GPU). The
torchdiffeq path is not sync-free: torchdiffeq reads step sizes and errors on the host.

They return a list of states: `[x_final]`, or with trajectory=True every state from the start
state to the final one (len(t_grid) states). Every state keeps the start state's dtype: in bf16 or
fp16 the grid is float32 and coefficients computed from it would promote the state to float32,
which a model whose weights are in the lower precision cannot take.
"""
import torch
from torchdiffeq import odeint
# torchdiffeq's solver registry: used to list every method name and to tell fixed-grid solvers
# (which need a grid even when only the end state is wanted) from adaptive ones.
from torchdiffeq._impl.fixed_adams import AdamsBashforth, AdamsBashforthMoulton
from torchdiffeq._impl.odeint import SOLVERS as TORCHDIFFEQ_SOLVERS
from torchdiffeq._impl.solvers import FixedGridODESolver

# Our own fixed-step methods first; "euler" shadows torchdiffeq's. scipy_solver needs extra options.
FIXED_STEP_ODE_METHODS = ("euler", "heun")
ODE_METHODS = FIXED_STEP_ODE_METHODS + tuple(
    name for name in TORCHDIFFEQ_SOLVERS if name not in FIXED_STEP_ODE_METHODS + ("scipy_solver",)
)
SDE_METHODS = ("Euler", "Heun")


def adaptive_ode_method(method: str) -> bool:
    """Whether the ODE method chooses its own steps (num_steps then only spaces a trajectory, and the
    end state does not depend on it)."""
    return method not in FIXED_STEP_ODE_METHODS and not issubclass(TORCHDIFFEQ_SOLVERS[method], FixedGridODESolver)


def ode_method_uses_tolerances(method: str) -> bool:
    """Whether atol and rtol change what the ODE method computes: adaptive methods, and torchdiffeq's
    implicit Adams (implicit_adams, fixed_adams: fixed steps, each with a corrector iterated until it
    meets the tolerances). Other fixed-step methods ignore them."""
    if adaptive_ode_method(method):
        return True
    solver = TORCHDIFFEQ_SOLVERS.get(method)
    return solver is not None and issubclass(solver, AdamsBashforthMoulton) and not issubclass(solver, AdamsBashforth)


def check_tolerances(method: str, atol: float, rtol: float) -> None:
    """ValueError for tolerances a method that uses them cannot meet: a negative one, or both 0 (each
    error would have to be 0; torchdiffeq takes one 0 with the other positive)."""
    if not ode_method_uses_tolerances(method):
        return
    if not (atol >= 0 and rtol >= 0):
        raise ValueError(f"atol and rtol must be 0 or more, got atol {atol}, rtol {rtol}")
    if atol == rtol == 0:
        raise ValueError(f"atol and rtol are both 0: {method} could not meet them; give at least one a "
                         f"positive value (the defaults are atol 1e-6, rtol 1e-3)")


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def _like(value, x):
    """value in x's dtype, for a tensor or a tuple of tensors."""
    if isinstance(x, tuple):
        return tuple(v.to(a.dtype) for v, a in zip(value, x))
    return value.to(x.dtype)


def _like_dtype(x, dtype):
    """x in `dtype`, for a tensor or a tuple of tensors."""
    if isinstance(x, tuple):
        return tuple(a.to(dtype) for a in x)
    return x.to(dtype)


def _add_scaled(x, h, dx):
    """x + h * dx in x's dtype, for a tensor or a tuple of tensors."""
    if isinstance(x, tuple):
        return tuple((a + h * b).to(a.dtype) for a, b in zip(x, dx))
    return (x + h * dx).to(x.dtype)


def _add(a, b):
    """a + b, for a tensor or a tuple of tensors."""
    if isinstance(a, tuple):
        return tuple(u + v for u, v in zip(a, b))
    return a + b


def time_grid(t0: float, t1: float, num_points: int, like) -> torch.Tensor:
    """num_points times from t0 to t1 on like's device, in float32 (float64 if like is float64)."""
    x = _first(like)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.linspace(t0, t1, num_points, device=x.device, dtype=dtype)


class StepSizeUnderflow(RuntimeError):
    """An adaptive ODE solver's step size fell to 0: its error estimate never met atol / rtol (tolerances
    tighter than the state's precision, or a drift that is not finite). Its message names them."""

    def __init__(self, message: str, method: str, atol: float, rtol: float):
        super().__init__(message)
        self.method, self.atol, self.rtol = method, atol, rtol

    def __reduce__(self):  # pickled (sent between processes) with the arguments __init__ takes
        return type(self), (self.args[0], self.method, self.atol, self.rtol)


def ode_euler(drift, x, t_grid, trajectory=False):
    """Explicit Euler: len(t_grid) - 1 steps, one drift call per step."""
    batch = _first(x).shape[0]
    dt = t_grid.diff()
    states = [x] if trajectory else None
    for i in range(dt.shape[0]):
        x = _add_scaled(x, dt[i], drift(x, t_grid[i].expand(batch)))  # x_{i+1} = x_i + h f(x_i, t_i)
        if trajectory:
            states.append(x)
    return states if trajectory else [x]


def ode_heun(drift, x, t_grid, trajectory=False):
    """Heun's second-order method: len(t_grid) - 1 steps, two drift calls per step (the last included)."""
    batch = _first(x).shape[0]
    dt = t_grid.diff()
    states = [x] if trajectory else None
    for i in range(dt.shape[0]):
        d_cur = drift(x, t_grid[i].expand(batch))
        x_pred = _add_scaled(x, dt[i], d_cur)  # Euler predictor
        d_next = drift(x_pred, t_grid[i + 1].expand(batch))
        x = _add_scaled(x, 0.5 * dt[i], _add(d_cur, d_next))  # trapezoidal corrector
        if trajectory:
            states.append(x)
    return states if trajectory else [x]


def ode_torchdiffeq(drift, x, t_grid, *, method, atol, rtol, trajectory=False):
    """Any torchdiffeq method over t_grid[0] -> t_grid[-1].

    Without a trajectory only the end time is requested (adaptive methods then choose their own
    steps); fixed-grid methods still step over all of t_grid.
    A bf16 or fp16 state is integrated as a float32 copy: torchdiffeq takes its times in the state's
    dtype (bf16 rounds t = 0.999 to 1.0, where VP's sigma_t is 0) and a step too small to change a
    bf16 state stalls its error control. The drift still sees the state, and returns, in its dtype.
    """
    batch, dtype = _first(x).shape[0], _first(x).dtype
    low, high = torch.minimum(t_grid[0], t_grid[-1]), torch.maximum(t_grid[0], t_grid[-1])
    inner = x if dtype in (torch.float32, torch.float64) else _like_dtype(x, torch.float32)

    def func(t, state):  # torchdiffeq passes a 0-dim time
        # An adaptive solver's first-step guess (Hairer et al. II.4) probes the drift at t0 + h0, with h0
        # unbounded (0.01 |x| / |drift|: 350 for a drift near 0); the probe only sizes the first step,
        # so it is taken at the interval's end instead of outside [0, 1]. Every other call is inside.
        t = torch.clamp(t, low.to(t.dtype), high.to(t.dtype))
        return _like(drift(_like(state, x), t.expand(batch)), state)

    times = t_grid if trajectory else t_grid[:: t_grid.shape[0] - 1]  # [t0, t1] as a view
    if adaptive_ode_method(method):
        # Make the adaptive solver land on t1 instead of stepping past it: stages beyond t1 would
        # evaluate the model, and the path (VP's sigma_t is NaN just past t = 1), outside [0, 1].
        options = {"step_t": t_grid[-1:]}
    elif trajectory:
        options = None
    else:
        fractions = (t_grid - t_grid[0]) / (t_grid[-1] - t_grid[0])
        # torchdiffeq's wrapper for a decreasing grid hands this the times as given and negates what it
        # returns; lerp keeps both ends exact
        options = {"grid_constructor": lambda f, y0, t: torch.lerp(t[0].expand_as(fractions),
                                                                   t[-1].expand_as(fractions), fractions)}
    try:
        solution = odeint(func, inner, times, method=method, atol=atol, rtol=rtol, options=options)
    except AssertionError as err:  # torchdiffeq's step-size controller gives up with a bare assertion
        if "underflow in dt" not in str(err):
            raise
        coarse = "" if inner is x else f" (a {dtype} model's drift is coarse: a float32 one under autocast is finer)"
        raise StepSizeUnderflow(f"{method}: the adaptive step size fell to 0 ({err}): the error estimate never "
                                f"met atol {atol:g} / rtol {rtol:g} on this {dtype} state; check the model's outputs "
                                f"are finite{coarse}, loosen the tolerances, or take a fixed-step method (euler, "
                                f"heun)", method, atol, rtol) from None
    if isinstance(solution, tuple):
        indices = range(times.shape[0]) if trajectory else [-1]
        return [_like(tuple(part[i] for part in solution), x) for i in indices]
    return [_like(state, x) for state in (solution.unbind(0) if trajectory else [solution[-1]])]


def integrate_ode(drift, x, t0, t1, *, method, num_steps, atol=1e-6, rtol=1e-3, trajectory=False):
    """Solve dx/dt = drift(x, t) from t0 to t1 (t1 < t0 runs backwards).

    num_steps: the number of integration steps of a fixed-grid method ("euler": num_steps drift
    calls, "heun": 2 * num_steps, torchdiffeq's fixed-grid methods the same grid); for adaptive
    methods it is only the number of intervals of the returned trajectory.
    Returns [x_final], or with trajectory=True the num_steps + 1 states on the uniform grid.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    t_grid = time_grid(t0, t1, num_steps + 1, x)
    if method == "euler":
        return ode_euler(drift, x, t_grid, trajectory)
    if method == "heun":
        return ode_heun(drift, x, t_grid, trajectory)
    return ode_torchdiffeq(drift, x, t_grid, method=method, atol=atol, rtol=rtol, trajectory=trajectory)


def sde_euler_maruyama(drift, diffusion, x, t_grid, trajectory=False):
    """Euler-Maruyama for dx = f dt + sqrt(2 w) dW: len(t_grid) - 1 steps, one drift call each.

    x_{i+1} = x_i + f(x_i, t_i) h + sqrt(2 w(t_i) h) z_i, z_i ~ N(0, I) drawn on x's device.
    """
    batch = x.shape[0]
    dt = t_grid.diff()
    states = [x] if trajectory else None
    for i in range(dt.shape[0]):
        t = t_grid[i].expand(batch)
        noise_scale = torch.sqrt(2 * diffusion(x, t) * dt[i])
        x = (x + drift(x, t) * dt[i] + noise_scale * torch.randn_like(x)).to(x.dtype)
        if trajectory:
            states.append(x)
    return states if trajectory else [x]


def sde_heun(drift, diffusion, x, t_grid, trajectory=False):
    """Stochastic Heun (upstream SiT's): noise first, then a Heun step of the drift; two drift calls each.

    x_hat = x_i + sqrt(2 w(t_i) h) z_i;  x_{i+1} = x_hat + h/2 [f(x_hat, t_i) + f(x_hat + h f(x_hat, t_i), t_{i+1})].
    """
    batch = x.shape[0]
    dt = t_grid.diff()
    states = [x] if trajectory else None
    for i in range(dt.shape[0]):
        t_cur, t_next = t_grid[i].expand(batch), t_grid[i + 1].expand(batch)
        x_hat = (x + torch.sqrt(2 * diffusion(x, t_cur) * dt[i]) * torch.randn_like(x)).to(x.dtype)
        d_cur = drift(x_hat, t_cur)
        d_next = drift(_add_scaled(x_hat, dt[i], d_cur), t_next)
        x = (x_hat + 0.5 * dt[i] * (d_cur + d_next)).to(x.dtype)
        if trajectory:
            states.append(x)
    return states if trajectory else [x]
