"""The training study: the loss variants in gradient descent on real data with induced imbalance.

Models (numpy, with cestudy's fused forward+gradient kernels for the loss):
- ``logreg``: multinomial logistic regression, logits = X W + b;
- ``mlp``: one hidden layer of 32 ReLU units, logits = relu(X W1 + b1) W2 + b2.

Optimisers: mini-batch gradient descent (``gd``) and ``scipy.optimize.minimize(method="L-BFGS-B",
jac=True)`` (``lbfgs``, logistic regression only). The objective is
    mean_i loss_i + (l2 / 2) ||W||^2   (biases not penalised),
which is scikit-learn's LogisticRegression objective C sum_i loss_i + ||W||^2 / 2 divided by
C N, i.e. l2 = 1 / (C N). ``sklearn`` and ``sklearn_balanced`` fit LogisticRegression
(class_weight None / "balanced", lbfgs, the same C) on the same splits as the peer baseline.

Data ship with scikit-learn (the optional ``train`` extra; nothing is downloaded): ``digits``
(load_digits, 10 classes, 8x8 images) and ``breast_cancer`` (load_breast_cancer, 2 classes).
Features are standardised on the training split. The test split is balanced (the same number of
samples per class); the training split is subsampled to the cell's imbalance ratio with the step
or long-tail (exponential) profile of Cui et al. 2019.

Loss variants: ``ce`` (plain), ``ce_inverse`` / ``ce_effective`` (class weights by inverse
frequency / effective number of samples, beta = 0.999), ``focal1`` / ``focal2`` (softmax focal,
gamma 1 / 2), ``smooth`` (label smoothing 0.1), and the numpy formulations ``naive`` (softmax then
log) and ``clipped`` (eps = 1e-7), all fed logits rounded to the cell's dtype (float32, float16 or
bfloat16): cestudy computes low precision in float32, the numpy formulations in the dtype itself.
"""

from __future__ import annotations

import math

import numpy as np

from .. import dtypes
from ..backends import Skip
from . import inputs

LOSSES = (
    "ce",
    "ce_inverse",
    "ce_effective",
    "focal1",
    "focal2",
    "smooth",
    "naive",
    "clipped",
    "sklearn",
    "sklearn_balanced",
)
DATASETS = ("digits", "breast_cancer")
MODELS = ("logreg", "mlp")
OPTIMIZERS = ("gd", "lbfgs")
HIDDEN = 32


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
def load(dataset):
    try:
        from sklearn import datasets
    except ImportError:
        raise Skip("scikit-learn is not installed (pip install 'cestudy[train]')") from None
    loader = {"digits": datasets.load_digits, "breast_cancer": datasets.load_breast_cancer}[dataset]
    d = loader()
    return np.asarray(d.data, dtype=np.float64), np.asarray(d.target, dtype=np.int64)


def split(X, y, imbalance, profile, seed, test_per_class=None):
    """Balanced test split; the training split subsampled to the imbalance profile.

    Class order is shuffled by the seed, so which classes become the minority varies."""
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    counts = np.array([np.sum(y == c) for c in classes])
    per_test = test_per_class or int(counts.min() * 0.3)
    test_idx, pool = [], {}
    for c in classes:
        idx = rng.permutation(np.flatnonzero(y == c))
        test_idx.append(idx[:per_test])
        pool[c] = idx[per_test:]
    n_max = min(len(v) for v in pool.values())
    order = rng.permutation(classes)  # order[0] is the majority class
    prior = inputs.class_prior(len(classes), imbalance, profile)
    train_idx = []
    for rank, c in enumerate(order):
        n_c = max(2, int(round(n_max * prior[rank] / prior[0])))
        train_idx.append(pool[c][:n_c])
    tr = rng.permutation(np.concatenate(train_idx))
    te = np.concatenate(test_idx)
    mu = X[tr].mean(axis=0)
    sd = X[tr].std(axis=0)
    sd[sd == 0] = 1.0
    minority = np.zeros(len(classes), bool)
    minority[order[(len(classes) + 1) // 2 :]] = True if imbalance > 1 else False
    return (X[tr] - mu) / sd, y[tr], (X[te] - mu) / sd, y[te], minority


# --------------------------------------------------------------------------------------------
# Losses: (mean loss, d mean loss / d logits) for logits rounded to the cell's dtype
# --------------------------------------------------------------------------------------------
def loss_and_grad(kind, logits, y, dtype, weights):
    import cestudy as cs

    from ..reference import formulations

    with np.errstate(over="ignore"):  # logits beyond float16's range become inf, as they would
        z = logits.astype(dtype)
    n = len(y)
    if kind in ("ce", "ce_inverse", "ce_effective", "smooth"):
        loss, g = cs.cross_entropy_with_grad(
            z,
            y,
            weight=None if kind in ("ce", "smooth") else weights,
            label_smoothing=0.1 if kind == "smooth" else 0.0,
        )
    elif kind in ("focal1", "focal2"):
        loss, g = cs.softmax_focal_loss_with_grad(z, y, gamma=1.0 if kind == "focal1" else 2.0)
    elif kind in ("naive", "clipped"):
        with np.errstate(all="ignore"):
            per, g = formulations.cross_entropy(kind)(z, y, eps=1e-7)
        loss = np.sum(per.astype(np.float64)) / n
        g = g.astype(np.float64) / n
    else:
        raise ValueError(f"unknown loss {kind!r}")
    return float(loss), np.asarray(g, dtype=np.float64)


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------
def init_params(model, d, c, rng):
    if model == "logreg":
        return [np.zeros((d, c)), np.zeros(c)]
    return [
        rng.normal(size=(d, HIDDEN)) * np.sqrt(2.0 / d),
        np.zeros(HIDDEN),
        rng.normal(size=(HIDDEN, c)) * np.sqrt(1.0 / HIDDEN),
        np.zeros(c),
    ]


def forward(model, params, X):
    if model == "logreg":
        W, b = params
        return X @ W + b, None
    W1, b1, W2, b2 = params
    h = np.maximum(X @ W1 + b1, 0.0)
    return h @ W2 + b2, h


def objective(model, params, X, y, kind, dtype, weights, l2):
    """(objective, gradients): mean loss + l2/2 * sum of squared weight matrices."""
    logits, h = forward(model, params, X)
    loss, g = loss_and_grad(kind, logits, y, dtype, weights)
    if model == "logreg":
        W, b = params
        grads = [X.T @ g + l2 * W, g.sum(axis=0)]
        reg = 0.5 * l2 * np.sum(W * W)
    else:
        W1, b1, W2, b2 = params
        gh = (g @ W2.T) * (h > 0)
        grads = [X.T @ gh + l2 * W1, gh.sum(axis=0), h.T @ g + l2 * W2, g.sum(axis=0)]
        reg = 0.5 * l2 * (np.sum(W1 * W1) + np.sum(W2 * W2))
    return loss + reg, grads


def _flat(params):
    return np.concatenate([p.ravel() for p in params])


def _unflat(theta, like):
    out, i = [], 0
    for p in like:
        out.append(theta[i : i + p.size].reshape(p.shape))
        i += p.size
    return out


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------
def softmax_probs(logits):
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def classification_metrics(probs, y, minority, bins=15):
    """Balanced accuracy, minority-class recall, macro F1, expected calibration error."""
    c = probs.shape[1]
    pred = np.argmax(probs, axis=1)
    recall, f1 = [], []
    for k in range(c):
        tp = np.sum((pred == k) & (y == k))
        fn = np.sum((pred != k) & (y == k))
        fp = np.sum((pred == k) & (y != k))
        r = tp / max(tp + fn, 1)
        p = tp / max(tp + fp, 1)
        recall.append(r)
        f1.append(0.0 if p + r == 0 else 2 * p * r / (p + r))
    conf = probs.max(axis=1)
    correct = (pred == y).astype(float)
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (conf > lo) & (conf <= hi)
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    out = {
        "balanced_accuracy": float(np.mean(recall)),
        "macro_f1": float(np.mean(f1)),
        "ece": float(ece),
        "accuracy": float(correct.mean()),
    }
    out["minority_recall"] = (
        float(np.mean(np.asarray(recall)[minority])) if minority.any() else float(np.mean(recall))
    )
    return out


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
def train_cell(cell):
    """Train one model; return metrics with learning curves."""
    X, y = load(cell["dataset"])
    Xtr, ytr, Xte, yte, minority = split(X, y, cell["imbalance"], cell["profile"], cell["seed"])
    c = int(y.max()) + 1
    n, d = Xtr.shape
    l2 = 1.0 / (cell["C"] * n)
    kind = cell["loss"]
    if kind.startswith("sklearn"):
        return _sklearn(cell, Xtr, ytr, Xte, yte, minority, c, l2)
    dtype = dtypes.dtype_from_name(cell["dtype"])
    prior = np.bincount(ytr, minlength=c) / n
    weights = inputs.class_weights("inverse" if kind == "ce_inverse" else "effective", prior, n)
    rng = np.random.default_rng(cell["seed"])
    params = init_params(cell["model"], d, c, rng)
    curve_loss, curve_bacc = [], []
    first_nonfinite = None
    steps = 0

    def evaluate(p):
        logits, _ = forward(cell["model"], p, Xte)
        return classification_metrics(softmax_probs(logits), yte, minority)

    if cell["optimizer"] == "lbfgs":
        from scipy.optimize import minimize

        def fun(theta):
            nonlocal first_nonfinite, steps
            steps += 1
            val, grads = objective(
                cell["model"], _unflat(theta, params), Xtr, ytr, kind, dtype, weights, l2
            )
            if not math.isfinite(val) and first_nonfinite is None:
                first_nonfinite = steps
            curve_loss.append(val)
            return val, _flat(grads)

        res = minimize(
            fun,
            _flat(params),
            jac=True,
            method="L-BFGS-B",
            options={"maxiter": cell["epochs"] * 10, "gtol": 1e-6},
        )
        params = _unflat(res.x, params)
        converged_at = int(res.nit)
        curve_bacc.append(evaluate(params)["balanced_accuracy"])
    else:
        lr = cell["lr"]
        batch = cell["batch"]
        converged_at = None
        for epoch in range(cell["epochs"]):
            order = rng.permutation(n)
            for s in range(0, n, batch):
                idx = order[s : s + batch]
                val, grads = objective(
                    cell["model"], params, Xtr[idx], ytr[idx], kind, dtype, weights, l2
                )
                steps += 1
                if not math.isfinite(val) or not all(np.isfinite(g).all() for g in grads):
                    if first_nonfinite is None:
                        first_nonfinite = steps
                params = [p - lr * g for p, g in zip(params, grads)]
            full, _ = objective(cell["model"], params, Xtr, ytr, kind, dtype, weights, l2)
            curve_loss.append(full)
            curve_bacc.append(
                evaluate(params)["balanced_accuracy"]
                if all(np.isfinite(p).all() for p in params)
                else math.nan
            )
        final = curve_loss[-1]
        for e, v in enumerate(curve_loss):  # first epoch within 1% of the final loss
            if math.isfinite(final) and math.isfinite(v) and abs(v - final) <= 0.01 * abs(final):
                converged_at = e + 1
                break
    finite = all(np.isfinite(p).all() for p in params)
    out = (
        evaluate(params)
        if finite
        else {
            "balanced_accuracy": math.nan,
            "macro_f1": math.nan,
            "ece": math.nan,
            "accuracy": math.nan,
            "minority_recall": math.nan,
        }
    )
    out.update(
        {
            "final_train_loss": float(curve_loss[-1]) if curve_loss else math.nan,
            "steps": int(steps),
            "converged_at": converged_at,
            "first_nonfinite_step": first_nonfinite,
            "curve_train_loss": [float(v) for v in curve_loss[-200:]],
            "curve_test_bacc": [float(v) for v in curve_bacc],
            "n_train": int(n),
            "n_test": int(len(yte)),
            "minority_train_share": float(np.mean(minority[ytr])) if minority.any() else 0.0,
        }
    )
    return out


def _sklearn(cell, Xtr, ytr, Xte, yte, minority, c, l2):
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(
        C=cell["C"],
        class_weight="balanced" if cell["loss"].endswith("balanced") else None,
        max_iter=2000,
        tol=1e-8,
    )
    clf.fit(Xtr, ytr)
    probs = clf.predict_proba(Xte)
    out = classification_metrics(probs, yte, minority)
    p_tr = clf.predict_proba(Xtr)
    out.update(
        {
            "final_train_loss": float(
                -np.mean(np.log(p_tr[np.arange(len(ytr)), ytr])) + 0.5 * l2 * np.sum(clf.coef_**2)
            ),
            "steps": int(np.max(clf.n_iter_)),
            "converged_at": int(np.max(clf.n_iter_)),
            "first_nonfinite_step": None,
            "curve_train_loss": [],
            "curve_test_bacc": [],
            "n_train": int(len(ytr)),
            "n_test": int(len(yte)),
            "minority_train_share": float(np.mean(minority[ytr])) if minority.any() else 0.0,
        }
    )
    return out
