"""High-precision oracle: reference losses and gradients for every variant, and the ULP metric.

The oracle evaluates the accurate formulation in extended precision (``numpy.longdouble``, the
x87 80-bit format with a 64-bit significand on x86-64 Linux, binary128 on aarch64 Linux), with
the differences x_j - m formed exactly (a float64 two-sum carried into extended precision). Its
relative error is a few units of 2^-64 = 5.4e-20, i.e. about 0.001 ulp of float64 and 1e-11 ulp
of float32: "well under 0.01 ulp" of every dtype under test. ``tests/test_oracle.py`` checks it
against mpmath at 60 digits on random and extreme inputs; the ``mp_*`` functions here are those
mpmath references (slow; for validation on samples).

Conventions match ``cestudy.api`` (torch semantics, NaN rows, 0 log 0 = 0). Everything returns
``numpy.longdouble`` arrays; losses are per sample (no reduction).
"""

from __future__ import annotations

import inspect

import numpy as np

from .. import dtypes, variants

LD = np.longdouble
EXTENDED_BITS = np.finfo(LD).nmant + 1


def extended_precision_available() -> bool:
    """True when longdouble carries at least 64 significand bits (x86-64 or aarch64 Linux)."""
    return EXTENDED_BITS >= 64


# --------------------------------------------------------------------------------------------
# The ULP metric
# --------------------------------------------------------------------------------------------
def ulp(exact, dtype):
    """Spacing of ``dtype`` at |exact| (the unit in the last place), as longdouble.

    Subnormal and zero values get the smallest subnormal spacing; values beyond the largest
    finite number get the spacing at the top binade.
    """
    fi = dtypes.finfo(dtype)
    p = int(fi.nmant) + 1
    a = np.abs(np.asarray(exact, dtype=LD))
    with np.errstate(invalid="ignore", over="ignore"):
        _, e = np.frexp(np.where(np.isfinite(a) & (a > 0), a, LD(1)))
    e = np.clip(e.astype(np.int64) - 1, int(fi.minexp), int(fi.maxexp) - 1)
    return np.ldexp(LD(1), e - p + 1)


def ulp_error(value, exact, dtype):
    """|value - exact| in units of the last place of ``dtype`` at ``exact`` (float64 array).

    Non-finite cases: equal values (the same infinity, or NaN where the exact value is NaN) give
    0; a NaN or infinity where the exact value is finite, or a finite value where it is not,
    gives inf.
    """
    v = np.asarray(np.asarray(value).astype(np.float64), dtype=LD)
    x = np.asarray(exact, dtype=LD)
    v, x = np.broadcast_arrays(v, x)
    out = np.full(v.shape, np.inf)
    both_nan = np.isnan(v) & np.isnan(x)
    same = (v == x) | both_nan
    finite = np.isfinite(v) & np.isfinite(x) & ~same
    with np.errstate(over="ignore", invalid="ignore"):
        out[finite] = (np.abs(v[finite] - x[finite]) / ulp(x[finite], dtype)).astype(np.float64)
    out[same] = 0.0
    return out


def grad_ulp_error(value, exact, dtype):
    """Gradient error per element as the accuracy contract states it: the smaller of the
    relative error in ulps and the error in ulps of the largest exact element of its row
    (elements far below the row's largest need only be accurate relative to it)."""
    exact = np.asarray(exact, dtype=LD)
    rel = ulp_error(value, exact, dtype)
    if exact.ndim == 0 or exact.size == 0:
        return rel
    with np.errstate(invalid="ignore"):
        rowmax = np.nanmax(
            np.where(np.isfinite(exact), np.abs(exact), LD(0)), axis=-1, keepdims=True
        )
    v = np.asarray(np.asarray(value).astype(np.float64), dtype=LD)
    finite = np.isfinite(v) & np.isfinite(exact)
    absu = np.full(rel.shape, np.inf)
    with np.errstate(invalid="ignore", over="ignore"):
        scale = np.broadcast_to(ulp(rowmax, dtype), exact.shape)
        absu[finite] = (np.abs(v - exact)[finite] / scale[finite]).astype(np.float64)
    return np.minimum(rel, absu)


# --------------------------------------------------------------------------------------------
# Row machinery
# --------------------------------------------------------------------------------------------
def _as2d(a):
    a = np.asarray(a)
    return a.reshape(1, -1) if a.ndim == 1 else a


class _Rows:
    """Shifted exponentials of each row in extended precision.

    e[i, j] = exp(x_ij - m_i) (1 at the first argmax k_i), s = sum_{j != k} e, L = log1p(s),
    nlp[i, j] = -log softmax_j = (m - x_j) + L, bad[i] = row has NaN or a non-finite max.
    """

    def __init__(self, logits):
        x = _as2d(logits).astype(np.float64)
        n, c = x.shape
        self.x = x
        has_nan = np.isnan(x).any(axis=1)
        xm = np.where(np.isnan(x), -np.inf, x)
        self.k = np.argmax(xm, axis=1)
        m = xm[np.arange(n), self.k] if n else np.zeros(0)
        self.bad = has_nan | ~np.isfinite(m)
        m = np.where(self.bad, 0.0, m)
        self.m = m
        xs = np.where(self.bad[:, None], 0.0, x)
        with np.errstate(invalid="ignore"):
            hi = xs - m[:, None]
            bb = hi - xs
            lo = (xs - (hi - bb)) + (-m[:, None] - bb)
        lo = np.where(np.isfinite(hi), lo, 0.0)
        self.d = hi.astype(LD) + lo.astype(LD)  # x - m, exact to 2^-64 relative
        e = np.exp(hi.astype(LD)) * (LD(1) + lo.astype(LD))
        e[np.arange(n), self.k] = 0
        self.s = e.sum(axis=1)
        e[np.arange(n), self.k] = 1
        self.e = e
        self.z = LD(1) + self.s
        self.L = np.log1p(self.s)
        self.nlp = self.L[:, None] - self.d  # (m - x_j) + L >= 0

    def softmax(self):
        return self.e / self.z[:, None]

    def nan_rows(self, out):
        out[self.bad] = np.nan
        return out


def _weights(weight, c):
    if weight is None:
        return np.ones(c, dtype=LD)
    return np.asarray(weight, dtype=np.float64).astype(LD)


# --------------------------------------------------------------------------------------------
# Softmax cross-entropy
# --------------------------------------------------------------------------------------------
def _index_rows(logits, target, weight, ignore_index):
    """(rows, c, kept rows, targets with ignored ones set to 0, class weights, row numbers)."""
    r = _Rows(logits)
    n, c = r.x.shape
    y = np.asarray(target, dtype=np.int64).reshape(n)
    keep = y != ignore_index
    return r, c, keep, np.where(keep, y, 0), _weights(weight, c), np.arange(n)


def cross_entropy(logits, target, weight=None, ignore_index=-100, label_smoothing=0.0):
    """Per-row loss (N,) for class-index targets (torch semantics), longdouble."""
    r, c, keep, ys, w, rows = _index_rows(logits, target, weight, ignore_index)
    eps = LD(label_smoothing)
    with np.errstate(invalid="ignore"):
        loss = w[ys] * r.nlp[rows, ys]
        if label_smoothing:
            smooth = (w[None, :] * r.nlp).sum(axis=1)
            loss = (1 - eps) * loss + (eps / c) * smooth
    loss = r.nan_rows(loss)
    loss[~keep] = 0
    return loss


def cross_entropy_grad(logits, target, weight=None, ignore_index=-100, label_smoothing=0.0):
    """Per-row gradient (N, C) of :func:`cross_entropy` (grad_scale 1), longdouble."""
    r, c, keep, ys, w, rows = _index_rows(logits, target, weight, ignore_index)
    p = r.softmax()
    eps = LD(label_smoothing)
    pm1 = np.where(ys == r.k, -r.s / r.z, p[rows, ys] - 1)
    g = p.copy()
    g[rows, ys] = pm1
    g = (1 - eps) * w[ys][:, None] * g
    if label_smoothing:
        g = g + (eps / c) * (w.sum() * p - w[None, :])
    g[r.bad] = np.nan
    g[~keep] = 0
    return g


def cross_entropy_probs(logits, target, weight=None, label_smoothing=0.0):
    """Per-row H(a, softmax(x)) for probability targets, a = w ((1 - eps) p + eps / C)."""
    r = _Rows(logits)
    n, c = r.x.shape
    a = _soft_target(target, weight, label_smoothing, c)
    with np.errstate(invalid="ignore"):
        terms = np.where(a == 0, LD(0), a * r.nlp)
    return r.nan_rows(terms.sum(axis=1))


def _soft_target(target, weight, label_smoothing, c):
    t = _as2d(target).astype(np.float64).astype(LD)
    eps = LD(label_smoothing)
    return _weights(weight, c)[None, :] * ((1 - eps) * t + eps / c)


def cross_entropy_probs_grad(logits, target, weight=None, label_smoothing=0.0):
    r = _Rows(logits)
    n, c = r.x.shape
    a = _soft_target(target, weight, label_smoothing, c)
    g = a.sum(axis=1)[:, None] * r.softmax() - a
    g[r.bad] = np.nan
    return g


def kl_divergence(logits, target):
    """Per-row KL(p || softmax(x)), 0 log 0 = 0."""
    r = _Rows(logits)
    p = _as2d(target).astype(np.float64).astype(LD)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p == 0, LD(0), p * (np.log(np.where(p == 0, LD(1), p)) + r.nlp))
    return r.nan_rows(terms.sum(axis=1))


def kl_divergence_grad(logits, target):
    r = _Rows(logits)
    p = _as2d(target).astype(np.float64).astype(LD)
    g = p.sum(axis=1)[:, None] * r.softmax() - p
    g[r.bad] = np.nan
    return g


def entropy(p):
    p = _as2d(p).astype(np.float64).astype(LD)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(p == 0, LD(0), -p * np.log(np.where(p == 0, LD(1), p))).sum(axis=1)


# --------------------------------------------------------------------------------------------
# Losses on log-probabilities (torch's nll_loss and kl_div)
# --------------------------------------------------------------------------------------------
def nll_loss(log_probs, target, weight=None, ignore_index=-100):
    """Per-row -w_y x_y (0 for ignored rows), longdouble."""
    x = _as2d(log_probs).astype(np.float64).astype(LD)
    n, c = x.shape
    y = np.asarray(target, dtype=np.int64).reshape(n)
    keep = y != ignore_index
    ys = np.where(keep, y, 0)
    loss = -_weights(weight, c)[ys] * x[np.arange(n), ys]
    loss[~keep] = 0
    return loss


def nll_loss_grad(log_probs, target, weight=None, ignore_index=-100):
    x = _as2d(log_probs)
    n, c = x.shape
    y = np.asarray(target, dtype=np.int64).reshape(n)
    keep = y != ignore_index
    ys = np.where(keep, y, 0)
    g = np.zeros((n, c), dtype=LD)
    g[np.arange(n)[keep], ys[keep]] = -_weights(weight, c)[ys[keep]]
    return g


def kl_div(log_probs, target, log_target=False):
    """Element-wise t (log t - x) (0 log 0 = 0), or exp(t) (t - x) for log-space targets."""
    x, t = _ld(log_probs), _ld(target)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if log_target:
            return np.exp(t) * (t - x)
        return np.where(t == 0, -(t * x), t * (np.log(np.where(t == 0, LD(1), t)) - x))


def kl_div_grad(log_probs, target, log_target=False):
    t = _ld(target)
    with np.errstate(over="ignore"):
        return -(np.exp(t) if log_target else t) * np.ones_like(_ld(log_probs))


# --------------------------------------------------------------------------------------------
# Focal losses
# --------------------------------------------------------------------------------------------
def softmax_focal_loss(logits, target, gamma=2.0, weight=None, ignore_index=-100):
    loss, _ = _softmax_focal(logits, target, gamma, weight, ignore_index, grad=False)
    return loss


def softmax_focal_loss_grad(logits, target, gamma=2.0, weight=None, ignore_index=-100):
    _, g = _softmax_focal(logits, target, gamma, weight, ignore_index, grad=True)
    return g


def _softmax_focal(logits, target, gamma, weight, ignore_index, grad):
    r, c, keep, ys, w, rows = _index_rows(logits, target, weight, ignore_index)
    w = w[ys]
    gamma = LD(gamma)
    ce = r.nlp[rows, ys]
    e_y = r.e[rows, ys]
    # 1 - p_y = sum_{j != y} e_j / z: s / z at the argmax (z - 1 would cancel), else z >= 2 e_y
    a = np.where(ys == r.k, r.s / r.z, (r.z - e_y) / r.z)
    p_y = e_y / r.z
    ag = np.where(gamma == 0, LD(1), np.where(a == 0, LD(0), a**gamma))
    loss = w * ag * ce
    loss = r.nan_rows(loss)
    loss[~keep] = 0
    if not grad:
        return loss, None
    with np.errstate(invalid="ignore"):  # ce p_y -> 0 as p_y -> 0, ce = +inf included
        inner = np.where(p_y > 0, gamma * ce * p_y, LD(0)) + a
    p = r.softmax()
    with np.errstate(invalid="ignore", divide="ignore"):
        g = np.where(p == 0, LD(0), (w * ag * inner / a)[:, None] * p)
    g[rows, ys] = -w * ag * inner
    g[r.bad] = np.nan
    g[~keep] = 0
    return loss, g


# --------------------------------------------------------------------------------------------
# Element-wise sigmoid losses
# --------------------------------------------------------------------------------------------
def _softplus(x):
    with np.errstate(over="ignore"):
        return np.where(x > 0, x + np.log1p(np.exp(-np.abs(x))), np.log1p(np.exp(-np.abs(x))))


def _sigmoid(x):
    with np.errstate(over="ignore", invalid="ignore"):
        e = np.exp(-np.abs(x))
        return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


def _ld(a):
    return np.asarray(a).astype(np.float64).astype(LD)


def binary_cross_entropy_with_logits(logits, target, weight=None, pos_weight=None):
    """Element-wise w [pw t softplus(-x) + (1 - t) softplus(x)], longdouble."""
    x, t = _ld(logits), _ld(target)
    w = LD(1) if weight is None else _ld(weight)
    pw = LD(1) if pos_weight is None else _ld(pos_weight)
    with np.errstate(invalid="ignore"):
        return w * (pw * t * _softplus(-x) + (1 - t) * _softplus(x))


def binary_cross_entropy_with_logits_grad(logits, target, weight=None, pos_weight=None):
    x, t = _ld(logits), _ld(target)
    w = LD(1) if weight is None else _ld(weight)
    pw = LD(1) if pos_weight is None else _ld(pos_weight)
    with np.errstate(invalid="ignore"):
        return w * ((1 - t) * _sigmoid(x) - pw * t * _sigmoid(-x))


def binary_cross_entropy(probs, target, weight=None):
    """torch BCELoss on probabilities (logs clamped at -100), exact arithmetic on the inputs."""
    p, t = _ld(probs), _ld(target)
    w = LD(1) if weight is None else _ld(weight)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -w * (t * np.maximum(np.log(p), -100) + (1 - t) * np.maximum(np.log1p(-p), -100))


def sigmoid_focal_loss(logits, target, alpha=0.25, gamma=2.0):
    return _sigmoid_focal(logits, target, alpha, gamma)[0]


def sigmoid_focal_loss_grad(logits, target, alpha=0.25, gamma=2.0):
    return _sigmoid_focal(logits, target, alpha, gamma)[1]


def _sigmoid_focal(logits, target, alpha, gamma):
    x, t = _ld(logits), _ld(target)
    gamma = LD(gamma)
    sp, sn = _sigmoid(x), _sigmoid(-x)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        b = t * sn + (1 - t) * sp
        ce = t * _softplus(-x) + (1 - t) * _softplus(x)
        bg = np.where(gamma == 0, LD(1), np.where(b == 0, LD(0), b**gamma))
        alpha_t = alpha * t + (1 - alpha) * (1 - t) if alpha >= 0 else LD(1)
        loss = alpha_t * ce * bg
        g = ((1 - t) * sp - t * sn) * bg
        extra = np.where(
            (b == 0) | (gamma == 0),
            LD(0),
            gamma * ce * (bg / np.where(b == 0, LD(1), b)) * (1 - 2 * t) * sp * sn,
        )
        return loss, alpha_t * (g + extra)


# --------------------------------------------------------------------------------------------
# logsumexp, log_softmax, softmax
# --------------------------------------------------------------------------------------------
def logsumexp(logits):
    r = _Rows(logits)
    out = r.m.astype(LD) + r.L
    x = r.x
    with np.errstate(invalid="ignore"):
        posinf = np.isposinf(x).any(axis=1) & ~np.isnan(x).any(axis=1)
        allneg = np.isneginf(x).all(axis=1)
    out[r.bad] = np.nan
    out[posinf] = np.inf
    out[allneg] = -np.inf
    return out


def log_softmax(logits):
    r = _Rows(logits)
    out = -r.nlp
    out[r.bad] = np.nan
    return out


def softmax(logits):
    r = _Rows(logits)
    out = r.softmax()
    out[r.bad] = np.nan
    return out


# --------------------------------------------------------------------------------------------
# mpmath references (validation of the oracle; slow, scalar)
# --------------------------------------------------------------------------------------------
def mp_log_softmax_row(x, dps=60):
    """[-log p_j] of one row at ``dps`` digits, as mpmath numbers."""
    import mpmath

    with mpmath.workdps(dps):
        xs = [mpmath.mpf(float(v)) for v in x]
        m = max(xs)
        s = mpmath.fsum(mpmath.exp(v - m) for v in xs)
        lse = m + mpmath.log(s)
        return [lse - v for v in xs]


def mp_cross_entropy_row(x, y, dps=60):
    return mp_log_softmax_row(x, dps)[y]


def mp_softmax_row(x, dps=60):
    import mpmath

    with mpmath.workdps(dps):
        return [mpmath.exp(-v) for v in mp_log_softmax_row(x, dps + 10)]


def mp_bce_with_logits(x, t, dps=60):
    import mpmath

    with mpmath.workdps(dps):
        x, t = mpmath.mpf(float(x)), mpmath.mpf(float(t))
        return t * mpmath.log1p(mpmath.exp(-x)) + (1 - t) * mpmath.log1p(mpmath.exp(x))


def mp_kl_row(x, p, dps=60):
    import mpmath

    with mpmath.workdps(dps):
        nlp = mp_log_softmax_row(x, dps + 10)
        return mpmath.fsum(
            mpmath.mpf(float(pi)) * (mpmath.log(mpmath.mpf(float(pi))) + v)
            for pi, v in zip(p, nlp)
            if pi != 0
        )


# --------------------------------------------------------------------------------------------
# By variant name (the registry in cestudy.variants)
# --------------------------------------------------------------------------------------------
def _options(variant, options):
    return {k: v for k, v in options.items() if k in variant.option_names}


def loss(name, x, target, **options):
    """The exact per-sample loss of variant ``name`` (longdouble); options it does not take are
    ignored."""
    v = variants.get(name)
    return globals()[v.oracle](x, target, **_options(v, options))


def grad(name, x, target, **options):
    """The exact gradient of the summed loss of variant ``name`` (None where it has none)."""
    v = variants.get(name)
    fn = globals().get(v.oracle + "_grad")
    return None if fn is None else fn(x, target, **_options(v, options))


# --------------------------------------------------------------------------------------------
# Linear cross-entropy: the logits z = input @ linear_weight.T + linear_bias, then cross_entropy
# --------------------------------------------------------------------------------------------
LINEAR_CHUNK_ELEMENTS = 1 << 20
"""Rows x classes of the longdouble logits the linear oracle holds at a time (16 MiB each)."""


def linear_logits(input, linear_weight, linear_bias=None, c0=0, c1=None, bound=False, dtype=LD):
    """The logits of classes c0 .. c1 - 1 for every row, (N, c1 - c0) of ``dtype`` (longdouble
    or float64); with ``bound``, also an upper bound on their absolute error (float64 array).

    Inputs of at most 26 significand bits (float32, float16, bfloat16): every product x_h w_h is
    exact in float64 and the float64 BLAS sum errs by at most gamma_H sum_h |x_h w_h|
    (H 2^-53 of sum |x w|: 5e-13 relative for H = 4096, 1e-5 of a float32 ulp). float64
    inputs: the product is formed in longdouble (numpy's loop, not BLAS: slow, for test sizes),
    error at most H 2^-63 sum |x w|. The bias is added in ``dtype``."""
    return _linear_logits_fn(input, linear_weight, linear_bias, dtype)(c0, c1, bound)


def _f64(a):
    """``a`` as float64; float16/bfloat16 through float32 (exact; ml_dtypes' direct bfloat16 to
    float64 cast is 25 times slower)."""
    a = np.asarray(a)
    if a.dtype not in (np.float32, np.float64):
        a = a.astype(np.float32)
    return a.astype(np.float64)


def _linear_logits_fn(input, linear_weight, linear_bias, dtype):
    """linear_logits as a function of (c0, c1[, bound]) with the input converted once."""
    x = np.asarray(input)
    w = np.asarray(linear_weight)
    h = x.shape[-1]
    narrow = dtypes.mantissa_bits(x.dtype) <= 26 and dtypes.mantissa_bits(w.dtype) <= 26
    x64 = _f64(x)
    xld = None if narrow else x64.astype(LD)
    b = None if linear_bias is None else _f64(linear_bias)

    def fn(c0, c1=None, bound=False):
        c1 = w.shape[0] if c1 is None else c1
        w64 = _f64(w[c0:c1])
        if narrow:
            z = (x64 @ w64.T).astype(dtype, copy=False)
            unit = 2.0**-53
        else:
            z = (xld @ w64.astype(LD).T).astype(dtype, copy=False)
            unit = 2.0**-63
        if b is not None:
            z += b[c0:c1].astype(dtype)[None, :]
        if not bound:
            return z
        absdot = np.abs(x64) @ np.abs(w64).T
        gamma = h * unit / (1 - h * unit)
        return z, absdot * (1 + 2 * h * 2.0**-53) * gamma

    return fn


def _linear_ce(
    input,
    linear_weight,
    target,
    linear_bias,
    weight,
    ignore_index,
    label_smoothing,
    logits,
    chunk,
    with_grad,
    precision,
):
    """Both passes of the linear oracle (see :func:`linear_cross_entropy_and_grad`)."""
    work = {"longdouble": LD, "float64": np.float64}[precision]
    x = np.asarray(input)
    w = np.asarray(linear_weight)
    n, v = x.shape[0], w.shape[0]
    if logits is None:
        logits = _linear_logits_fn(x, w, linear_bias, work)
    if chunk is None:
        chunk = max(1, LINEAR_CHUNK_ELEMENTS // max(n, 1))
    bounds = [(c0, min(v, c0 + chunk)) for c0 in range(0, v, chunk)]
    y = np.asarray(target, dtype=np.int64).reshape(n)
    keep = y != ignore_index
    ys = np.where(keep, y, 0)
    wts = _weights(weight, v).astype(work)
    eps = work(label_smoothing)
    rows = np.arange(n)

    def chunk_logits(c0, c1):
        z = np.asarray(logits(c0, c1))
        return z.astype(np.float64).astype(work) if z.dtype != work else z

    # pass 1: the online log-sum-exp (every rescaling errs by one rounding of ``work``)
    m = np.full(n, -np.inf, dtype=work)
    k = np.zeros(n, dtype=np.int64)
    s = np.zeros(n, dtype=work)
    zy = np.zeros(n, dtype=work)
    shift = np.zeros(n, dtype=work)  # sum_j w_j (m - z_j), for label smoothing
    seen = work(0)
    bad = np.zeros(n, dtype=bool)
    with np.errstate(invalid="ignore", over="ignore"):
        for c0, c1 in bounds:
            z = chunk_logits(c0, c1)
            nan = np.isnan(z)
            if nan.any():
                bad |= nan.any(axis=1)
                z = np.where(nan, -np.inf, z)
            kc = np.argmax(z, axis=1)
            mc = z[rows, kc]
            rise = mc > m
            old = rise & np.isfinite(m)
            if old.any():
                s[old] = (s[old] + 1) * np.exp(m[old] - mc[old])
                if label_smoothing:
                    shift[old] += seen * (mc[old] - m[old])
            m = np.where(rise, mc, m)
            k = np.where(rise, c0 + kc, k)
            ok = np.isfinite(m)
            mm = np.where(ok, m, 0)[:, None]
            e = z - mm
            np.exp(e, out=e)
            e[~ok] = 0
            here = (k >= c0) & (k < c1)
            e[rows[here], k[here] - c0] = 0
            s += e.sum(axis=1)
            yin = keep & (ys >= c0) & (ys < c1)
            zy[yin] = z[rows[yin], ys[yin] - c0]
            if label_smoothing:
                t = mm - z
                t *= wts[c0:c1][None, :]
                t[~ok] = 0
                shift += t.sum(axis=1)
                seen = seen + wts[c0:c1].sum()
        L = np.log1p(s)
        loss = wts[ys] * ((m - zy) + L)
        if label_smoothing:
            loss = (1 - eps) * loss + (eps / v) * (shift + wts.sum() * L)
    bad |= ~np.isfinite(m)
    loss[bad] = np.nan
    loss[~keep] = 0
    if not with_grad:
        return loss, None, None, None

    # pass 2: dL/dz per chunk in ``work``, the products with the inputs in float64
    zz = 1 + s
    wsum = wts.sum()
    mm = np.where(bad, 0, m)[:, None]
    x64 = _f64(x)
    gx = np.zeros((n, x.shape[1]))
    gw = np.empty((v, x.shape[1]))
    gb = np.empty(v)
    c_true = ((1 - eps) * wts[ys])[:, None]
    with np.errstate(invalid="ignore", over="ignore"):
        for c0, c1 in bounds:
            p = chunk_logits(c0, c1) - mm
            np.exp(p, out=p)
            p /= zz[:, None]
            here = (k >= c0) & (k < c1) & ~bad
            p[rows[here], k[here] - c0] = 1 / zz[here]
            yin = keep & (ys >= c0) & (ys < c1) & ~bad
            py = p[rows[yin], ys[yin] - c0]
            g = p * c_true
            g[rows[yin], ys[yin] - c0] = c_true[yin, 0] * np.where(
                ys[yin] == k[yin], -s[yin] / zz[yin], py - 1
            )
            if label_smoothing:
                p *= wsum
                p -= wts[c0:c1][None, :]
                g += (eps / v) * p
                g[rows[here], k[here] - c0] = (
                    c_true[here, 0] * np.where(ys[here] == k[here], -s[here], 1) / zz[here]
                    + (eps / v) * (wsum - wts[k[here]] - wts[k[here]] * s[here]) / zz[here]
                )
            g[bad] = np.nan
            g[~keep] = 0
            g64 = g.astype(np.float64)
            gx += g64 @ _f64(w[c0:c1])
            gw[c0:c1] = g64.T @ x64
            gb[c0:c1] = g.sum(axis=0).astype(np.float64)
    return loss, gx, gw, gb


def linear_cross_entropy(
    input,
    linear_weight,
    target,
    linear_bias=None,
    weight=None,
    ignore_index=-100,
    label_smoothing=0.0,
    logits=None,
    chunk=None,
    precision="longdouble",
):
    """Per-row cross-entropy (N,) of z = input @ linear_weight.T + linear_bias.

    The logits come from :func:`linear_logits` (exact to about H 2^-53 of sum |x w| for
    float32/float16/bfloat16 inputs) one chunk of classes at a time, and the cross-entropy is
    evaluated on them with the online log-sum-exp (max, sum) merge, torch's semantics (weights,
    ignore_index, label smoothing), NaN rows as :func:`cross_entropy`.

    ``precision``: "longdouble" (the default: every step to about 2^-64 relative) or "float64"
    (about 10 times faster, for the linear study: each term exp(z_j - m) then errs by up to
    |z_j - m| 2^-53, about 1e-13 relative for |z| < 745, 2e-6 of a float32 ulp).
    ``logits``, a function (c0, c1) -> (N, c1 - c0) array, replaces the exact logits (the exact
    cross-entropy of an implementation's own logits: the error split of the linear study);
    ``chunk`` sets the classes per chunk (so that ``logits`` can repeat an implementation's
    calls exactly). Returns an array of the ``precision``'s dtype."""
    return _linear_ce(with_grad=False, **locals())[0]


_LINEAR_SIGNATURE = inspect.signature(linear_cross_entropy)


def _linear_arguments(args, kwargs):
    """The arguments of a call with :func:`linear_cross_entropy`'s signature, by name (defaults
    filled in), as that function would bind them."""
    bound = _LINEAR_SIGNATURE.bind(*args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


def linear_cross_entropy_grad(*args, **kwargs):
    """(grad_input, grad_weight, grad_bias) of the summed loss of :func:`linear_cross_entropy`
    (same arguments), float64: dL/dz in the ``precision``, rounded to float64, and the products
    G @ W, G.T @ input in float64 BLAS (error at most V 2^-53 of (|G| @ |W|) and N 2^-53 of
    (|G|.T @ |input|): 2.9e-11 relative for V = 262144, 5e-4 of a float32 ulp)."""
    return linear_cross_entropy_and_grad(*args, **kwargs)[1:]


def linear_cross_entropy_and_grad(*args, **kwargs):
    """(per-row loss, grad_input, grad_weight, grad_bias) of :func:`linear_cross_entropy`'s
    arguments in one call (two passes over the classes instead of three)."""
    return _linear_ce(with_grad=True, **_linear_arguments(args, kwargs))


linear_cross_entropy_grad.__signature__ = _LINEAR_SIGNATURE
linear_cross_entropy_and_grad.__signature__ = _LINEAR_SIGNATURE
