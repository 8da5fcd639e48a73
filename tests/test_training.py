"""The training study: gradients of the objective against finite differences, the L-BFGS
plain-CE solution against scikit-learn, and an end-to-end run of a tiny configuration."""

import numpy as np
import pytest

from cestudy.study import runner, spec, training
from cestudy.study.store import Store

pytest.importorskip("sklearn")


@pytest.mark.parametrize("model", ["logreg", "mlp"])
@pytest.mark.parametrize("kind", ["ce", "ce_inverse", "focal2", "smooth", "naive"])
def test_objective_gradient_matches_finite_differences(model, kind):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(20, 5))
    y = rng.integers(0, 3, 20)
    params = training.init_params(model, 5, 3, rng)
    params = [p + 0.1 * rng.normal(size=p.shape) for p in params]
    w = np.array([0.5, 1.0, 2.0])
    val, grads = training.objective(model, params, X, y, kind, np.float64, w, l2=0.01)
    for pi, (p, g) in enumerate(zip(params, grads)):
        for idx in [tuple(rng.integers(0, s) for s in p.shape) for _ in range(4)]:
            h = 1e-6
            plus = [q.copy() for q in params]
            minus = [q.copy() for q in params]
            plus[pi][idx] += h
            minus[pi][idx] -= h
            fp, _ = training.objective(model, plus, X, y, kind, np.float64, w, 0.01)
            fm, _ = training.objective(model, minus, X, y, kind, np.float64, w, 0.01)
            assert g[idx] == pytest.approx((fp - fm) / (2 * h), rel=1e-5, abs=1e-8)


def test_lbfgs_plain_ce_matches_scikit_learn():
    """Same split, same objective (mean CE + l2/2 ||W||^2 with l2 = 1/(C N), biases free):
    cestudy's L-BFGS and LogisticRegression(C=1) agree to 1e-6 in the objective and 1e-3 in
    every predicted probability."""
    from sklearn.linear_model import LogisticRegression

    X, y = training.load("digits")
    Xtr, ytr, Xte, yte, _ = training.split(X, y, 1.0, "step", seed=0)
    c = 1.0
    cell = dict(
        dataset="digits",
        model="logreg",
        optimizer="lbfgs",
        loss="ce",
        dtype="float64",
        imbalance=1.0,
        profile="step",
        epochs=100,
        lr=0.5,
        batch=64,
        C=c,
        seed=0,
    )
    ours = training.train_cell(cell)
    clf = LogisticRegression(C=c, max_iter=5000, tol=1e-10).fit(Xtr, ytr)
    l2 = 1.0 / (c * len(ytr))
    p_tr = clf.predict_proba(Xtr)
    theirs = -np.mean(np.log(p_tr[np.arange(len(ytr)), ytr])) + 0.5 * l2 * np.sum(clf.coef_**2)
    assert ours["final_train_loss"] == pytest.approx(theirs, rel=1e-6)
    sk = training._sklearn(
        dict(cell, loss="sklearn"), Xtr, ytr, Xte, yte, np.zeros(10, bool), 10, l2
    )
    assert ours["balanced_accuracy"] == pytest.approx(sk["balanced_accuracy"], abs=0.01)


def test_imbalanced_split_keeps_the_test_set_balanced():
    """digits: 174..183 samples a class; 30% of the smallest (52) go to test from every class,
    the training pool keeps n_max = 174 - 52 = 122 of the majority classes and
    max(2, round(122 / 100)) = 2 of each of the 5 minority classes (step profile, ratio 100)."""
    X, y = training.load("digits")
    Xtr, ytr, Xte, yte, minority = training.split(X, y, 100.0, "step", seed=1)
    counts = np.bincount(y)
    per_test = int(counts.min() * 0.3)
    n_max = counts.min() - per_test
    assert (per_test, n_max) == (52, 122)
    np.testing.assert_array_equal(np.bincount(yte, minlength=10), np.full(10, per_test))
    tr = np.bincount(ytr, minlength=10)
    np.testing.assert_array_equal(np.sort(tr), [2] * 5 + [n_max] * 5)
    np.testing.assert_array_equal(minority, tr == 2)
    # the splits are disjoint and standardised with the training statistics
    assert len(ytr) + len(yte) == 5 * 2 + 5 * n_max + 10 * per_test
    np.testing.assert_allclose(Xtr.mean(axis=0), 0, atol=1e-12)
    # no imbalance: every class keeps n_max and none is a minority
    _, ytr1, _, _, minority1 = training.split(X, y, 1.0, "step", seed=1)
    np.testing.assert_array_equal(np.bincount(ytr1, minlength=10), np.full(10, n_max))
    assert not minority1.any()


def test_training_study_runs_end_to_end(tmp_path):
    p = tmp_path / "t.toml"
    p.write_text("""
name = "tinytrain"
[[part]]
kind = "training"
dataset = ["breast_cancer"]
model = ["logreg", "mlp"]
optimizer = ["gd"]
loss = ["ce", "naive", "sklearn"]
dtype = ["float32", "float16"]
imbalance = [1.0, 10.0]
epochs = 3
""")
    s = spec.load(str(p))
    with Store(tmp_path / "r.sqlite") as st:
        summary = runner.run_study(s, st, quiet=True)
        cells = st.cells()
    assert summary.failed == 0 and summary.done == len(s.cells())
    assert len(cells) == len(s.cells())
    by = {
        tuple(c["params"][k] for k in ("model", "loss", "dtype", "imbalance")): c["metrics"]
        for c in cells
    }
    for (model, loss, dtype, imb), m in by.items():
        key = (model, loss, dtype, imb)
        assert m["n_test"] > 0 and m["n_train"] > 0, key
        if loss == "sklearn":
            assert m["balanced_accuracy"] >= 0.85, key
            continue
        curve = np.array([float(v) for v in m["curve_train_loss"]])
        assert len(curve) == 3, key
        # gradient descent over minibatches of 64, three epochs
        assert m["steps"] == 3 * -(-m["n_train"] // 64), key
        if loss == "ce":
            # cestudy's loss stays finite in float16 too, and gradient descent lowers it
            assert np.isfinite(curve).all() and m["first_nonfinite_step"] is None, key
            assert curve[-1] < curve[0], key
            assert 0.7 <= m["balanced_accuracy"] <= 1.0 and 0.0 <= m["ece"] <= 0.5, key
        if loss == "naive" and dtype == "float32":
            # without overflow the naive formulation trains exactly as the accurate one
            ce = by[(model, "ce", dtype, imb)]
            np.testing.assert_allclose(curve, np.array(ce["curve_train_loss"], float), rtol=1e-5)
            assert m["balanced_accuracy"] == ce["balanced_accuracy"], key
