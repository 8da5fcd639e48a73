"""Markdown building blocks for the reports: number wording, tables, findings and page context.

Numbers are worded as a person would read them: errors in ulp ("0.5 ulp", "1.67e+07 ulp"),
"non-finite" where a result is NaN or infinite although the exact value is finite, "n/a" where
nothing was measured. Nothing here reads results or computes a metric.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Callable

from .figures import _num


def fmt_ulp(v) -> str:
    """An error in ulp as a number ("0.5", "1.67e+07"), "non-finite" or "n/a"."""
    v = _num(v)
    if math.isnan(v):
        return "n/a"
    if math.isinf(v):
        return "non-finite"
    if v >= 1e4:
        return f"{v:.3g}" if v < 1e5 else f"{v:.2e}"
    return f"{v:.3g}"


def ulp_phrase(v) -> str:
    """An error for a sentence: "0.5 ulp", "non-finite", "n/a"."""
    text = fmt_ulp(v)
    return text if text in ("non-finite", "n/a") else f"{text} ulp"


def fmt_pct(v) -> str:
    v = _num(v)
    if math.isnan(v):
        return "n/a"
    if v == 0:
        return "0%"
    return f"{100 * v:.3g}%" if 0 < abs(v) < 0.01 else f"{100 * v:.1f}%"


def fmt_num(v, digits=3) -> str:
    v = _num(v)
    if math.isnan(v):
        return "n/a"
    return f"{v:.{digits}g}"


def fmt_shape(n, c) -> str:
    return f"{n} x {c}"


def table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def bullets(items) -> str:
    return "\n".join(f"- {i}" for i in items) + "\n" if items else ""


def figure_block(rel: str, alt: str, caption: str) -> str:
    """A figure with its caption in italics below it."""
    return f"![{alt}]({rel})\n\n*{caption}*\n"


@dataclasses.dataclass(frozen=True)
class Finding:
    """One finding: a sentence computed from the rows, the page that holds its evidence and the
    figure that shows it (relative to the reports folder)."""

    text: str
    page: str
    figure: str | None = None
    also: tuple[str, ...] = ()
    """Further pages the sentence draws on."""

    def markdown(self, prefix: str = "", own_page: bool = False) -> str:
        links = []
        if self.figure:
            links.append(f"[figure]({prefix}{self.figure})")
        if not own_page:
            for page in (self.page, *self.also):
                links.append(f"[{page[:-3]}]({prefix}{page})")
        return self.text + (f" ({', '.join(links)})" if links else "")


@dataclasses.dataclass
class Part:
    """What a section contributes to a page: its Markdown and its findings."""

    markdown: str
    findings: list[Finding] = dataclasses.field(default_factory=list)


def section(select: Callable):
    """Decorator making a section's ``render(ctx, rows)`` out of ``body(ctx, kept)``: ``kept =
    select(rows)`` are the rows the section draws on, and a page without any gets an empty
    Part from it."""

    def decorate(body):
        @functools.wraps(body)
        def render(ctx, rows) -> Part:
            kept = select(rows)
            return body(ctx, kept) if kept else Part("")

        return render

    return decorate


def with_findings(parts: list[str], findings: list[Finding], level: int = 3, always=True) -> Part:
    """A section's Part: ``parts`` followed by its findings as a bulleted list under a
    "Findings" heading of ``level`` (the heading left out, when not ``always``, where there are
    no findings)."""
    if always or findings:
        parts = [*parts, "#" * level + " Findings\n"]
        parts += [f"- {f.markdown(own_page=True)}" for f in findings]
    return Part("\n".join([*parts, ""]), findings)


@dataclasses.dataclass
class Context:
    """Where a study's page and figures go, and the figures written so far."""

    out: Path
    study: str
    figures: list[str] = dataclasses.field(default_factory=list)

    @property
    def page(self) -> str:
        return f"{self.study}.md"

    def figure(self, name: str, fn: Callable, *args, **kw) -> str | None:
        """Draw ``fn(*args, path, **kw)`` into figures/<study>-<name>.png; the relative path, or
        None when the rows hold nothing to draw."""
        rel = f"figures/{self.study}-{name}.png"
        if fn(*args, self.out / rel, **kw):
            self.figures.append(rel)
            return rel
        return None

    def add_figure(
        self, parts: list[str], name: str, fn: Callable, *args, alt: str, caption: str, **kw
    ) -> str | None:
        """Draw a figure as ``figure`` does and, where drawn, append it with its caption to
        ``parts``; its relative path or None."""
        rel = self.figure(name, fn, *args, **kw)
        if rel:
            parts.append(figure_block(rel, alt, caption))
        return rel

    def finding(self, text: str, figure: str | None = None, also=()) -> Finding:
        return Finding(text, self.page, figure, tuple(also))
