"""Report section for ``higham`` cells: the Blanchard, Higham & Higham 2021 reproduction.

Reads result rows only; every count in a finding is the stored one.
"""

from __future__ import annotations

from .. import figures
from ..markdown import Context, Part, fmt_pct, fmt_ulp, table, with_findings

KINDS = ("higham",)
TITLE = "Blanchard, Higham & Higham 2021 reproduction"


def ok_rows(rows):
    return sorted(
        (r for r in rows if r["kind"] == "higham" and r["status"] == "ok"),
        key=lambda r: (r["p_dtype"], r["p_formulation"]),
    )


def overflow_sentence(hr):
    basic = [r for r in hr if r["p_formulation"] == "basic" and r["overflow"]]
    shifted = [r for r in hr if r["p_formulation"] == "shifted"]
    if not basic:
        return None
    r = max(basic, key=lambda r: r["overflow"])
    pub = r.get("published_overflow")
    verdict = (
        "as published"
        if pub == r["overflow"]
        else f"published: {pub}"
        if pub is not None
        else "no published count"
    )
    return (
        f"On the {r['n_vectors']} MNIST vectors of Blanchard, Higham & Higham (2021), the "
        f"basic log-sum-exp overflows in {r['p_dtype']} on {r['overflow']} of {r['n_vectors']} "
        f"({verdict}) and the shifted form on "
        + ", ".join(f"{s['overflow']} ({s['p_dtype']})" for s in shifted)
        + "."
    )


def render(ctx: Context, rows) -> Part:
    hr = ok_rows(rows)
    parts = [
        f"## {TITLE}\n",
        "Their 2500 MNIST pre-softmax vectors rounded to the low precision, the "
        "log-sum-exp evaluated with every operation rounded to that precision; the error "
        "is measured against the oracle on the rounded vector, in units of the format's "
        "unit roundoff u.\n",
    ]
    if not hr:
        parts.append("No results: the data was not found when the study ran (see skipped cells).\n")
        return Part("\n".join(parts))
    parts.append(
        table(
            [
                "precision",
                "form",
                "overflows (this run)",
                "overflows (published)",
                "median error/u",
                "max error/u",
                "median bound",
                "within bound",
            ],
            [
                (
                    r["p_dtype"],
                    r["p_formulation"],
                    r["overflow"],
                    r["published_overflow"],
                    fmt_ulp(r["err_over_u_median"]),
                    fmt_ulp(r["err_over_u_max"]),
                    fmt_ulp(r["bound_median"]),
                    fmt_pct(r["frac_within_bound"]),
                )
                for r in hr
            ],
        )
    )
    rel = ctx.add_figure(
        parts,
        "higham",
        figures.fig_higham,
        rows,
        alt="Blanchard-Higham reproduction",
        caption="Left: vectors whose log-sum-exp overflows, this run against the published "
        "count. Right: relative error over u of the finite results.",
    )
    findings = []
    text = overflow_sentence(hr)
    if text:
        findings.append(ctx.finding(text, rel))
    differ = [r for r in hr if r["overflow"] != r["published_overflow"]]
    findings.append(
        ctx.finding(
            f"All {len(hr)} overflow counts match the published ones."
            if not differ
            else f"{len(differ)} of {len(hr)} overflow counts differ from the published ones: "
            + ", ".join(
                f"{r['p_dtype']} {r['p_formulation']} {r['overflow']} (published "
                f"{r['published_overflow']})"
                for r in differ
            )
            + ".",
            rel,
        )
    )
    return with_findings(parts, findings)
