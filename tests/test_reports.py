"""Reports: generation from a store built here, determinism, every figure kind, link checking,
and the committed reports/ rebuilt byte-for-byte from the committed results."""
import filecmp
import re
from pathlib import Path

import matplotlib.image as mpimg
import pytest

from cestudy.report import build
from cestudy.study import higham, runner, spec
from cestudy.study.store import Store

ROOT = Path(__file__).resolve().parents[1]

STUDY = """
name = "mini"
description = "every figure kind from a small store"

[[part]]
kind = "accuracy"
variant = ["ce_index"]
implementation = ["naive", "lse", "numba", "torch"]
dtype = ["float32", "float16"]
family = ["gaussian"]
scale = [0.1, 10.0, 1000.0]
classes = [2, 50]
batch = 8

[[part]]
kind = "accuracy"
variant = ["ce_index"]
implementation = ["clipped", "lse", "numba"]
dtype = ["float32"]
family = ["dominant"]
scale = [5.0, 40.0]
classes = [10]
batch = 16
clip_eps = [1e-7, 1e-3]

[[part]]
kind = "imbalance"
variant = ["ce_index", "focal_softmax"]
class_weight = ["none", "inverse"]
classes = [4]
imbalance = [1.0, 100.0]
profile = ["step", "exp"]
batch = 512

[[part]]
kind = "performance"
variant = ["ce_index"]
implementation = ["numba", "torch", "lse"]
dtype = ["float32"]
mode = ["forward", "forward_grad"]
batch = [16]
classes = [10, 100]
repeats = 2

[[part]]
kind = "higham"
dtype = ["float16", "bfloat16"]
formulation = ["basic", "shifted"]
"""

LINK = re.compile(r"!?\[[^\]]*\]\(([^)]+)\)")


def check_links(folder: Path):
    """Every relative link and image in the folder's Markdown resolves; every PNG opens."""
    problems = []
    for md in folder.rglob("*.md"):
        for target in LINK.findall(md.read_text()):
            if re.match(r"[a-z]+://", target) or target.startswith("#"):
                continue
            path = (md.parent / target.split("#")[0]).resolve()
            if not path.exists():
                problems.append(f"{md.name}: {target}")
    for png in folder.rglob("*.png"):
        img = mpimg.imread(png)
        assert img.shape[0] > 50 and img.shape[1] > 50, png
    assert not problems, problems


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rep")
    p = tmp / "mini.toml"
    p.write_text(STUDY)
    path = tmp / "r.sqlite"
    with Store(path) as st:
        summary = runner.run_study(spec.load(str(p)), st, quiet=True)
    assert summary.failed == 0
    return path


def test_reports_have_every_figure_kind_and_resolve(store_path, tmp_path):
    out = tmp_path / "reports"
    build.build_reports(store_path, out)
    figs = {p.name for p in (out / "figures").iterdir()}
    for kind in ("error-vs-scale", "atlas-float32", "nonfinite", "clipping",
                 "true-class-gradient", "imbalance", "throughput"):
        assert any(kind in f for f in figs), (kind, figs)
    if higham.data_path().exists():
        assert "mini-higham.png" in figs
        assert "475" in (out / "mini.md").read_text()
    check_links(out)
    text = (out / "mini.md").read_text()
    assert "## Machine and versions" in text and "### Findings" in text
    assert (out / "README.md").read_text().count("mini.md") >= 2


def test_reports_are_deterministic_and_rebuild_from_the_export(store_path, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    build.build_reports(store_path, a)
    build.build_reports(store_path, b)
    c = tmp_path / "c"
    build.build_reports(a / "data" / "results.json", c, export=False)
    for md in a.glob("*.md"):
        assert md.read_bytes() == (b / md.name).read_bytes()
        assert md.read_bytes() == (c / md.name).read_bytes()


def test_committed_reports_resolve_and_rebuild_byte_for_byte(tmp_path):
    committed = ROOT / "reports"
    results = committed / "data" / "results.json"
    assert results.exists(), "reports/data/results.json is committed with the reports"
    check_links(committed)
    out = tmp_path / "rebuilt"
    build.build_reports(results, out, export=False)
    mds = sorted(p.name for p in committed.glob("*.md"))
    assert mds and mds == sorted(p.name for p in out.glob("*.md"))
    for name in mds:
        assert filecmp.cmp(committed / name, out / name, shallow=False), name


def test_running_one_study_keeps_the_other_studies_results_in_the_export(store_path, tmp_path):
    import json

    out = tmp_path / "reports"
    build.build_reports(store_path, out)
    before = json.loads((out / "data" / "results.json").read_text())
    other = tmp_path / "other.toml"
    other.write_text(STUDY.replace('name = "mini"', 'name = "other"').split("[[part]]")[0]
                     + "[[part]]" + STUDY.split("[[part]]")[1])
    with Store(tmp_path / "second.sqlite") as st:
        runner.run_study(spec.load(str(other)), st, quiet=True)
    build.build_reports(tmp_path / "second.sqlite", out)
    after = json.loads((out / "data" / "results.json").read_text())
    studies = {r["study"] for r in after["cells"]}
    assert studies == {"mini", "other"}
    assert len(after["cells"]) == len(before["cells"]) + sum(
        1 for r in after["cells"] if r["study"] == "other")
    assert (out / "mini.md").exists() and (out / "other.md").exists()
    run_ids = {r["run_id"] for r in after["runs"]}
    assert {r["run_id"] for r in after["cells"]} <= run_ids
