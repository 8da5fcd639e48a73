"""One module per study kind, plus the GPU benchmark page.

Each study-kind module declares ``KINDS`` (the kinds of rows it reports) and
``render(ctx, rows) -> Part`` (its Markdown and findings); ``build`` enumerates ``SECTIONS`` in
this order for every study page. ``cuda`` renders a page of its own from the GPU benchmark's JSON.
A section reads result rows only: it never imports the study runner's compute code or the CLI.
"""

from . import accuracy, cuda, higham, imbalance, linear, performance, training

SECTIONS = (accuracy, imbalance, performance, training, higham, linear)


def for_kinds(kinds) -> list:
    """The sections that report any of ``kinds``, in page order."""
    return [s for s in SECTIONS if set(s.KINDS) & set(kinds)]


def known_kinds() -> set[str]:
    return {k for s in SECTIONS for k in s.KINDS}


__all__ = [
    "SECTIONS",
    "accuracy",
    "cuda",
    "for_kinds",
    "higham",
    "imbalance",
    "known_kinds",
    "linear",
    "performance",
    "training",
]
