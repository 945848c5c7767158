"""Device functions shared by the adaLN kernels (Triton, inlined where called).

token_span: the sample and run of tokens a program covers. The per-row maths of the LayerNorm
kernels take one row in fp32 whose lanes past D are zero (masked loads with other=0.0), `mask` marking
the D real lanes, and the row's per-sample (1 + scale) in fp32; normalize_modulate_rows takes a
(ROWS, BLOCK_D) tile of rows of one sample, each row normalised on its own.

Each adaLN kernel has two loops over its program's tokens: one row a step (`(ROWS == 1) &
ONE_ROW_LOOP`, a condition on constants that the compiler resolves; written with `and`, Triton
compiles both loops behind a run-time branch, and refuses them), and a (ROWS, BLOCK_D) tile a step,
which also runs ROWS = 1 when ONE_ROW_LOOP is off (kernels._launch.row_loop: the tuning suite times
the two at one row).
"""
import triton
import triton.language as tl


@triton.jit
def token_span(T, D, rows_per_program, n_tiles, BLOCK_D: tl.constexpr):
    """What this program covers, one program per (sample, tile of rows_per_program tokens): (b, tile,
    t_start, t_end, cols, mask), its tokens t_start <= t < t_end of sample b, and the BLOCK_D columns
    (int64: cols * stride_d may exceed 2**31 for strided rows) with the D real ones masked."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // n_tiles
    tile = pid % n_tiles
    t_start = tile * rows_per_program
    cols = tl.arange(0, BLOCK_D).to(tl.int64)
    return b, tile, t_start, tl.minimum(t_start + rows_per_program, T), cols, cols < D


@triton.jit
def normalize_modulate(x, mask, D, eps, one_plus_scale, shift):
    """LayerNorm (no affine, statistics in fp32) then adaLN modulation of one row.

    Returns (x_hat, out, rstd): x_hat = (x - mean) * rstd (zero past D), out = x_hat * (1 + scale)
    + shift, rstd = 1 / sqrt(var + eps) with the biased variance over the D features.

    A row whose variance overflows fp32 (a root mean square of x - mean past about 1.8e19 / sqrt(D),
    5e17 at D = 1152, or one value past 1.8e19: a diverged residual stream, the sum of squares inf,
    and past about 1e27 delta**2 too, making it inf - inf) gets rstd NaN, so x_hat, out and the
    gradients through it are NaN: rsqrt(inf) = 0 would turn the row into `shift`, and a NaN variance
    clamped to 0 into values near 1e33, finite outputs that hide the divergence.
    """
    mean = tl.sum(x, axis=0) / D
    centred = tl.where(mask, x - mean, 0.0)
    # The corrected two-pass variance: the mean's rounding leaves the centred row a small common
    # offset (its mean, delta), taken out of the variance and of x_hat. Without it a constant fp32 row
    # of large magnitude (a sum that rounds) normalised to +-1 everywhere instead of 0, once delta**2
    # outweighed eps. Both sums read `centred`, so they reduce side by side.
    delta = tl.sum(centred, axis=0) / D
    var = tl.sum(centred * centred, axis=0) / D - delta * delta  # inf or NaN where the row overflows
    # tl.maximum drops a NaN operand: the overflow is tested before the clamp of rounding's negatives
    rstd = tl.where(var < float("inf"), tl.rsqrt(tl.maximum(var, 0.0) + eps), float("nan"))
    x_hat = tl.where(mask, (centred - delta) * rstd, 0.0)
    return x_hat, x_hat * one_plus_scale + shift, rstd


@triton.jit
def normalize_modulate_rows(x, mask, D, eps, one_plus_scale, shift):
    """normalize_modulate of each row of a (ROWS, BLOCK_D) tile, `mask` (ROWS, BLOCK_D) marking the real
    lanes of the real rows, one_plus_scale and shift (1, BLOCK_D). Returns (x_hat, out, rstd), rstd of
    shape (ROWS,); a row that is all padding gets x_hat = 0 and rstd = 1 / sqrt(eps)."""
    mean = tl.sum(x, axis=1) / D
    centred = tl.where(mask, x - mean[:, None], 0.0)
    delta = tl.sum(centred, axis=1) / D  # as in normalize_modulate: the mean's rounding taken out
    var = tl.sum(centred * centred, axis=1) / D - delta * delta
    rstd = tl.where(var < float("inf"), tl.rsqrt(tl.maximum(var, 0.0) + eps), float("nan"))  # as in normalize_modulate
    x_hat = tl.where(mask, (centred - delta[:, None]) * rstd[:, None], 0.0)
    return x_hat, x_hat * one_plus_scale + shift, rstd


@triton.jit
def normalize_modulate_vjp_rows(d_out, x_hat, rstd, one_plus_scale, D):
    """normalize_modulate_vjp of each row of a (ROWS, BLOCK_D) tile; rstd (ROWS,), one_plus_scale
    (1, BLOCK_D)."""
    g = d_out * one_plus_scale
    mean_g = tl.sum(g, axis=1) / D
    mean_g_xhat = tl.sum(g * x_hat, axis=1) / D
    return rstd[:, None] * (g - mean_g[:, None] - x_hat * mean_g_xhat[:, None])


@triton.jit
def normalize_modulate_vjp(d_out, x_hat, rstd, one_plus_scale, D):
    """The gradient reaching the row x from d_out = dL/d(out), through the modulation and the norm:

        g  = d_out * (1 + scale)                                   (the gradient reaching x_hat)
        dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat))        (means over the D features)
    """
    g = d_out * one_plus_scale
    mean_g = tl.sum(g, axis=0) / D
    mean_g_xhat = tl.sum(g * x_hat, axis=0) / D
    return rstd * (g - mean_g - x_hat * mean_g_xhat)
