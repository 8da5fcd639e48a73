"""Report section for ``training`` cells: the losses in gradient descent on real data.

Reads result rows only. A run's loss is cestudy's unless it is one of the numpy baseline
formulations (``cestudy.reference.formulations``) or scikit-learn's fit (``sklearn*``).
"""

from __future__ import annotations

import math

import numpy as np

from ...reference.formulations import DESCRIPTIONS as FORMULATIONS
from .. import figures
from ..figures import _num
from ..markdown import Context, Part, section, table, with_findings

KINDS = ("training",)
TITLE = "Training: the losses in gradient descent on real data"


def is_baseline(loss: str) -> bool:
    return loss in FORMULATIONS or loss.startswith("sklearn")


def ok_rows(rows):
    return [r for r in rows if r["kind"] == "training" and r["status"] == "ok"]


def groups(tr):
    g = {}
    for r in tr:
        key = (
            r["p_dataset"],
            r["p_model"],
            r["p_optimizer"],
            r["p_imbalance"],
            r["p_profile"],
            r["p_loss"],
            r["p_dtype"],
        )
        g.setdefault(key, []).append(r)
    return g


def _mean_sd(vals):
    vals = [v for v in (_num(x) for x in vals) if not math.isnan(v)]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return f"{vals[0]:.3f}"
    return f"{np.mean(vals):.3f} ± {np.std(vals, ddof=1):.3f}"


def _mean(g, key, metric):
    rows = g.get(key)
    if not rows:
        return math.nan
    return float(np.nanmean([_num(r.get(metric)) for r in rows]))


def nonfinite_runs(tr):
    """{(loss, dtype): (runs that hit NaN/inf, runs)}."""
    out = {}
    for r in tr:
        n = out.setdefault((r["p_loss"], r["p_dtype"]), [0, 0])
        n[0] += 1 if r.get("first_nonfinite_step") else 0
        n[1] += 1
    return {k: tuple(v) for k, v in out.items()}


def nonfinite_sentence(tr, dtype):
    """How many runs of the baselines and of cestudy's losses hit NaN/inf in ``dtype``."""
    runs = {k: v for k, v in nonfinite_runs(tr).items() if k[1] == dtype}
    base = [v for (loss, _), v in runs.items() if is_baseline(loss) and loss in FORMULATIONS]
    ours = [v for (loss, _), v in runs.items() if not is_baseline(loss)]
    if not base or not ours:
        return None
    names = sorted(loss for (loss, _) in runs if loss in FORMULATIONS)
    b_bad, b_all = sum(v[0] for v in base), sum(v[1] for v in base)
    o_bad, o_all = sum(v[0] for v in ours), sum(v[1] for v in ours)
    return (
        f"In {dtype} training, the {' and '.join(names)} losses hit a non-finite value in "
        f"{b_bad} of {b_all} runs, cestudy's losses in {o_bad if o_bad else 'none'} of "
        f"{o_all}."
    )


def page_findings(ctx, tr, g, curves, bacc):
    f = []
    for ds in sorted({k[0] for k in g}):
        text = balanced_accuracy_sentence(tr, ds, g)
        if text:
            f.append(ctx.finding(text, bacc))
        ours = _mean(g, (ds, "logreg", "lbfgs", 1.0, "step", "ce", "float32"), "final_train_loss")
        sk = _mean(
            g, (ds, "logreg", "lbfgs", 1.0, "step", "sklearn", "float64"), "final_train_loss"
        )
        if math.isnan(ours) or math.isnan(sk):
            continue
        gap = abs(ours - sk) / abs(sk)
        text = (
            f"{ds}: the plain-CE L-BFGS objective is {ours:.6g} against scikit-learn's "
            f"{sk:.6g} on the same balanced splits (relative gap {gap:.1e})"
        )
        if gap > 1e-3:
            text += (
                "; scikit-learn fits a two-class problem with one weight vector where the "
                "softmax model has two, so a gap there is by design"
            )
        f.append(ctx.finding(text + ".", bacc))
    for dt in sorted({r["p_dtype"] for r in tr}):
        text = nonfinite_sentence(tr, dt)
        if text:
            f.append(ctx.finding(text, curves))
    return f


@section(ok_rows)
def render(ctx: Context, tr) -> Part:
    parts = [
        f"## {TITLE}\n",
        "Multinomial logistic regression (and a one-hidden-layer network) on scikit-learn's "
        "bundled `digits` and `breast_cancer`, the training split subsampled to each "
        "imbalance ratio, the test split balanced. Objective: mean loss + l2/2 ||W||^2 with "
        "l2 = 1/(C N), scikit-learn's LogisticRegression objective divided by C N, so the "
        "plain-CE L-BFGS run and `sklearn` solve the same problem. Values are mean ± "
        "standard deviation over seeds; `non-finite runs` counts runs in which the loss or "
        "a gradient became NaN or infinite (the first such step is in the cell's "
        "metrics).\n",
    ]
    g = groups(tr)
    for ratio in sorted({k[3] for k in g}):
        parts.append(f"### Imbalance ratio {ratio:g}\n")
        out_rows = []
        for key in sorted(k for k in g if k[3] == ratio):
            rs = g[key]
            bad = sum(1 for r in rs if r.get("first_nonfinite_step"))
            out_rows.append(
                (
                    key[0],
                    key[1],
                    key[2],
                    key[4],
                    key[5],
                    key[6],
                    len(rs),
                    _mean_sd(r["balanced_accuracy"] for r in rs),
                    _mean_sd(r["minority_recall"] for r in rs),
                    _mean_sd(r["macro_f1"] for r in rs),
                    _mean_sd(r["ece"] for r in rs),
                    _mean_sd(r["final_train_loss"] for r in rs),
                    _mean_sd(r["converged_at"] for r in rs),
                    bad,
                )
            )
        parts.append(
            table(
                [
                    "dataset",
                    "model",
                    "optimiser",
                    "profile",
                    "loss",
                    "dtype",
                    "runs",
                    "balanced acc.",
                    "minority recall",
                    "macro F1",
                    "ECE",
                    "final train loss",
                    "converged at (epoch/iter)",
                    "non-finite runs",
                ],
                out_rows,
            )
        )
    curves = ctx.add_figure(
        parts,
        "training-curves",
        figures.fig_training_curves,
        tr,
        alt="Learning curves",
        caption="Training objective per epoch at the largest imbalance (seed 0); a cross "
        "marks the last finite value of a run that became non-finite.",
    )
    bacc = ctx.add_figure(
        parts,
        "training-bacc",
        figures.fig_training_bacc,
        tr,
        alt="Balanced accuracy vs imbalance",
        caption="Balanced accuracy on the balanced test split, mean over seeds.",
    )
    findings = page_findings(ctx, tr, g, curves, bacc)
    return with_findings(parts, findings)


def balanced_accuracy_sentence(tr, dataset, g=None):
    g = g if g is not None else groups(tr)
    ratios = sorted({k[3] for k in g if k[0] == dataset})
    if not ratios:
        return None
    top = ratios[-1]
    base = (dataset, "logreg", "lbfgs", top, "step")
    found = [(k[5], k[6]) for k in g if k[:5] == base]
    vals = [
        (loss, dt, _mean(g, base + (loss, dt), "balanced_accuracy"))
        for loss, dt in sorted(found, key=lambda x: (is_baseline(x[0]), x))
        if dt in ("float32", "float64")
    ]
    vals = [v for v in vals if not math.isnan(v[2])]
    if not vals:
        return None
    return (
        f"{dataset}, imbalance {top:g} (step), L-BFGS logistic regression, balanced "
        f"accuracy: " + ", ".join(f"{loss} {v:.3f}" for loss, _, v in vals) + "."
    )
