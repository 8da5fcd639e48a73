"""Check that a run left the committed reports no poorer (issue 14), comparing the working tree
with the last commit: no page lost, no table row of a peer lost, the Higham reproduction still
there, no local path written into a tracked file. Exit 1 with what got poorer."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEERS = ("torch", "scipy", "jax", "tensorflow", "sklearn")


def committed(path: str) -> str | None:
    out = subprocess.run(["git", "show", f"HEAD:{path}"], cwd=ROOT, capture_output=True, text=True)
    return out.stdout if out.returncode == 0 else None


def table_rows(text: str, word: str) -> int:
    return sum(
        1 for line in text.splitlines() if line.startswith("|") and re.search(rf"\b{word}\b", line)
    )


def main() -> int:
    problems = []
    pages = subprocess.run(
        ["git", "ls-files", "reports/*.md", "README.md"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    home = [p for p in {str(ROOT), os.path.expanduser("~")} if len(p) > 1]
    for page in pages:
        before = committed(page)
        path = ROOT / page
        if not path.exists():
            problems.append(f"{page}: deleted by the run")
            continue
        now = path.read_text()
        for p in home:
            if p in now:
                problems.append(f"{page}: holds the local path {p}")
        if before is None:
            continue
        for peer in PEERS:
            lost = table_rows(before, peer) - table_rows(now, peer)
            if lost > 0:
                problems.append(f"{page}: {lost} table rows of {peer} fewer than committed")
    higham = ROOT / "reports" / "higham.md"
    if higham.exists() and "475 of 2500" not in higham.read_text():
        problems.append("reports/higham.md: the 475 of 2500 overflow count is gone")
    for p in problems:
        print("reports got poorer:", p)
    if not problems:
        print(f"reports: no page poorer than committed ({len(pages)} pages checked)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
