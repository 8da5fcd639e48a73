"""Report section for ``imbalance`` cells: what the minority classes get under each loss.

Reads result rows only; the loss labels come from the variants' registry names.
"""

from __future__ import annotations

from .. import figures
from ..markdown import Context, Part, fmt_pct, table, with_findings

KINDS = ("imbalance",)
TITLE = "Class imbalance"
INTRO = (
    "A classifier that has learned the class prior (logits log prior + N(0, 1) noise + a "
    "margin of 2 on the true class) scored under each loss. Shares are means over seeds; "
    "the minority classes are the rarer half. A share of the loss is not applicable "
    "(`n/a`) where no minority sample was drawn.\n"
)


def series(rows):
    return figures.imbalance_series(rows)


def top_ratio(rows, profile="step"):
    """(ratio, classes, {loss label: (loss share, gradient share, sample share)}) at the largest
    imbalance ratio of ``profile`` for the smallest class count, or None."""
    s = series(rows)
    classes = min((k[2] for k in s if k[1] == profile), default=None)
    pick = {lab: d for (lab, p, c), d in s.items() if p == profile and c == classes}
    ratio = max((max(d) for d in pick.values()), default=None)
    if ratio is None:
        return None
    return ratio, classes, {lab: d[ratio] for lab, d in sorted(pick.items()) if ratio in d}


def share_sentence(rows, profile="step", labels=None):
    top = top_ratio(rows, profile)
    if top is None:
        return None
    ratio, classes, shares = top
    samp = next(iter(shares.values()))[2]
    if samp <= 0:
        return (
            f"At an imbalance of {ratio:g} ({profile} profile, {classes} classes) no "
            f"minority sample was drawn, so the minority share of the loss is not "
            f"applicable there."
        )
    chosen = [lab for lab in (labels or sorted(shares)) if lab in shares]
    items = [f"{fmt_pct(shares[lab][0])} of the {lab} loss" for lab in chosen]
    desc = ", ".join(items[:-1]) + (" and " if len(items) > 1 else "") + items[-1]
    return (
        f"At an imbalance of {ratio:g} ({profile} profile, {classes} classes) the minority "
        f"classes are {fmt_pct(samp)} of the samples and carry {desc}."
    )


def render(ctx: Context, rows) -> Part:
    s = series(rows)
    if not s:
        return Part("")
    parts = [f"## {TITLE}\n", INTRO]
    out_rows = []
    for (label, prof, classes), d in sorted(s.items()):
        for ratio in sorted(d):
            loss_s, grad_s, samp = d[ratio]
            none = samp <= 0
            out_rows.append(
                (
                    label,
                    prof,
                    classes,
                    f"{ratio:g}",
                    fmt_pct(samp),
                    "n/a" if none else fmt_pct(loss_s),
                    "n/a" if none else fmt_pct(grad_s),
                )
            )
    parts.append(
        table(
            [
                "loss",
                "profile",
                "classes",
                "ratio",
                "minority samples",
                "minority loss",
                "minority gradient",
            ],
            out_rows,
        )
    )
    rel = ctx.add_figure(
        parts,
        "imbalance",
        figures.fig_imbalance,
        rows,
        alt="Minority share of loss and gradient",
        caption="Share of the loss (top) and of the gradient norms (bottom) that the minority "
        "classes get, against the imbalance ratio; the dashed black line is their share of the "
        "samples. Ratios at which no minority sample was drawn are left out.",
    )
    findings = []
    for prof in sorted({k[1] for k in s}, key=lambda p: (p != "step", p)):
        text = share_sentence(rows, prof)
        if text:
            findings.append(ctx.finding(text, rel))
    return with_findings(parts, findings)
