"""Reports: generation from a store built here, determinism, every figure kind, link checking,
and the committed reports/ rebuilt byte-for-byte from the committed results."""

import filecmp
import json
import re
import shutil
from pathlib import Path

import matplotlib.image as mpimg
import pytest

from cestudy import variants
from cestudy.report import build, data, headline, sections
from cestudy.study import higham, runner, spec
from cestudy.study.store import Store

ROOT = Path(__file__).resolve().parents[1]

STUDY = """
name = "mini"
description = "every figure kind from a small store"

[[part]]
kind = "accuracy"
variant = ["cross_entropy"]
implementation = ["naive", "lse", "numba", "torch"]
dtype = ["float32", "float16"]
family = ["gaussian"]
scale = [0.1, 10.0, 1000.0]
classes = [2, 50]
batch = 8

[[part]]
kind = "accuracy"
variant = ["cross_entropy"]
implementation = ["clipped", "lse", "numba"]
dtype = ["float32"]
family = ["dominant"]
scale = [5.0, 40.0]
classes = [10]
batch = 16
clip_eps = [1e-7, 1e-3]

[[part]]
kind = "imbalance"
variant = ["cross_entropy", "softmax_focal_loss"]
class_weight = ["none", "inverse"]
classes = [4]
imbalance = [1.0, 100.0]
profile = ["step", "exp"]
batch = 512

[[part]]
kind = "performance"
variant = ["cross_entropy"]
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
    for kind in (
        "error-vs-scale",
        "atlas-float32",
        "nonfinite",
        "clipping",
        "true-class-gradient",
        "imbalance",
        "throughput",
    ):
        assert any(kind in f for f in figs), (kind, figs)
    assert "mini-higham.png" in figs
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


def test_higham_count_in_the_report_is_the_computed_one(store_path, tmp_path):
    """The data ships with the package, so the reproduction always runs; the page quotes the
    stored count (475 as published), and a different stored count shows as that count."""
    assert higham.data_path().exists(), "the Blanchard-Higham data ships in cestudy/data/"
    out = tmp_path / "reports"
    build.build_reports(store_path, out)
    doc = json.loads((out / "data" / "results.json").read_text())
    basic16 = next(
        r
        for r in doc["cells"]
        if r["kind"] == "higham" and r["p_dtype"] == "float16" and r["p_formulation"] == "basic"
    )
    assert basic16["overflow"] == basic16["published_overflow"] == 475
    md = (out / "mini.md").read_text()
    assert f"on {basic16['overflow']} of {basic16['n_vectors']} (as published)" in md
    basic16["overflow"] = 474
    (tmp_path / "edited.json").write_text(json.dumps(doc))
    build.build_reports(tmp_path / "edited.json", tmp_path / "edited", export=False)
    md = (tmp_path / "edited" / "mini.md").read_text()
    assert "on 474 of 2500 (published: 475)" in md
    assert "1 of 4 overflow counts differ" in md


def test_pages_show_their_code_version_and_flag_stale_results(store_path, tmp_path):
    with Store(store_path) as st:
        version = {c["code_version"] for c in st.cells()}
    assert len(version) == 1
    current = build.build_reports(store_path, tmp_path / "a", code_version=version.pop())
    md = (tmp_path / "a" / "mini.md").read_text()
    assert "That is the current code version." in md and "has changed since" not in md
    assert current
    build.build_reports(store_path, tmp_path / "b", code_version="0123456789abcdef")
    md = (tmp_path / "b" / "mini.md").read_text()
    assert "**The code that produces" in md and "of them has changed since**" in md
    # how many cells are older (here every one the page lists), and of which implementation
    older = int(md.split("**The code that produces ")[1].split(" ")[0])
    listed = int(md.split("These results come from code version `")[1].split("(")[1].split()[0])
    assert older == listed > 0
    assert "older than the current code" in (tmp_path / "b" / "README.md").read_text()


def test_pages_hold_no_run_ids_local_paths_or_legacy_variant_names(store_path, tmp_path):
    out = tmp_path / "reports"
    build.build_reports(store_path, out)
    legacy = set(variants.LEGACY_NAMES)
    for md in out.glob("*.md"):
        text = md.read_text()
        assert "manifest of run" not in text and str(tmp_path) not in text, md.name
        assert "NaN/inf" not in text, md.name
        words = set(re.findall(r"[a-z_]+", text))
        assert not (words & legacy), (md.name, words & legacy)


def test_legacy_variant_names_in_results_are_canonicalised(tmp_path):
    rows = [{"study": "s", "kind": "accuracy", "p_variant": old} for old in variants.LEGACY_NAMES]
    assert [data.canonical_row(r)["p_variant"] for r in rows] == [
        variants.canonical_name(old) for old in variants.LEGACY_NAMES
    ]
    assert {data.canonical_row(r)["p_variant"] for r in rows} <= set(variants.VARIANTS)


def test_every_study_kind_has_a_section_module():
    from cestudy.study import spec as study_spec

    assert set(study_spec.KINDS) <= sections.known_kinds()


def test_committed_readme_findings_are_what_the_reports_generate(tmp_path):
    """The README's headline section equals what the report code writes from the committed
    results (it is regenerated by `python -m cestudy report`); the index opens with at most six
    findings, each linking its figure and its page."""
    readme = (ROOT / "README.md").read_text()
    assert headline.README_START in readme and headline.README_END in readme
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    (tmp_path / "README.md").write_text(
        headline.replace_readme_section(readme, f"{headline.README_START}\n{headline.README_END}")
    )
    (tmp_path / "reports" / "data").mkdir(parents=True)
    for f in (ROOT / "reports" / "data").glob("*.json"):
        shutil.copy(f, tmp_path / "reports" / "data" / f.name)
    out = tmp_path / "reports"
    build.build_reports(out / "data" / "results.json", out, export=False)
    assert (tmp_path / "README.md").read_text() == readme
    text = (out / "README.md").read_text()
    block = text.split("## Headline findings\n", 1)[1].split("\n## ", 1)[0]
    items = [line for line in block.splitlines() if line.startswith("- ")]
    assert 1 <= len(items) <= headline.MAX_FINDINGS
    for item in items:
        links = LINK.findall(item)
        figs = [k for k in links if k.startswith("figures/")]
        assert figs and (out / figs[0]).exists(), item
        assert any(k.endswith(".md") and (out / k).exists() for k in links), item
    assert "## Which formulation to use" in text


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
    other.write_text(
        STUDY.replace('name = "mini"', 'name = "other"').split("[[part]]")[0]
        + "[[part]]"
        + STUDY.split("[[part]]")[1]
    )
    with Store(tmp_path / "second.sqlite") as st:
        runner.run_study(spec.load(str(other)), st, quiet=True)
    build.build_reports(tmp_path / "second.sqlite", out)
    after = json.loads((out / "data" / "results.json").read_text())
    studies = {r["study"] for r in after["cells"]}
    assert studies == {"mini", "other"}
    assert len(after["cells"]) == len(before["cells"]) + sum(
        1 for r in after["cells"] if r["study"] == "other"
    )
    assert (out / "mini.md").exists() and (out / "other.md").exists()
    run_ids = {r["run_id"] for r in after["runs"]}
    assert {r["run_id"] for r in after["cells"]} <= run_ids


def test_the_non_finite_line_stays_finite_above_huge_finite_errors():
    """A finite error of 1e308 ulp (a tiny exact value, a result of order 1) once overflowed
    10^(log10(top) + 2) and stopped the report."""
    from cestudy.report import figures

    assert figures._cap({"a": 1.5e308}) == figures.MAX_CAP
    assert figures._cap({"a": 100.0}, {"b": float("inf")}) == figures.INF_ULP
