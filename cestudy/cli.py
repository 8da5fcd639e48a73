"""The command line: ``python -m cestudy {run,report,list,export,bench,info}``.

Every command lives here (``__main__`` only calls ``main``); the benchmark's arguments and run
logic are ``cestudy.bench.command``'s. This is the top layer: it may import anything, nothing
imports it.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = ROOT / "results" / "cestudy.sqlite"
DEFAULT_REPORTS = ROOT / "reports"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .bench import command as bench_command

    p = argparse.ArgumentParser(
        prog="cestudy",
        description="Cross-entropy under a microscope: run the studies, regenerate the "
        "reports, time the kernels against their peers.",
        epilog="Each command's options: python -m cestudy COMMAND --help",
    )
    p.add_argument("--version", action="version", version=f"cestudy {__version__}")
    sub = p.add_subparsers(dest="command")

    r = sub.add_parser("run", help="run studies (default: 'default') and regenerate the reports")
    r.add_argument(
        "studies",
        nargs="*",
        metavar="STUDY",
        help="study names from studies/ or paths of TOML files",
    )
    r.add_argument("--results", default=str(DEFAULT_RESULTS), help="SQLite results store")
    r.add_argument(
        "--jobs", type=_positive_int, default=1, help="worker processes, >= 1 (default 1: serial)"
    )
    r.add_argument(
        "--executor",
        choices=("local", "dask", "dask-local"),
        default="local",
        help="where cells run: this process and --jobs workers (local), a dask cluster at "
        "--scheduler (dask), or a dask LocalCluster started for the run (dask-local)",
    )
    r.add_argument("--scheduler", help="dask scheduler address for --executor dask")
    r.add_argument("--force", action="store_true", help="recompute finished cells")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument("--dry-run", action="store_true", help="print cell counts and a time estimate")
    r.add_argument("--no-report", action="store_true", help="do not regenerate the reports")
    r.add_argument(
        "--out", default=str(DEFAULT_REPORTS), help="reports folder (default: %(default)s)"
    )

    sub.add_parser("list", help="list studies, variants and implementations")

    e = sub.add_parser("export", help="export stored results as CSV or JSON")
    e.add_argument("--format", choices=("csv", "json"), default="json", help="default: json")
    e.add_argument(
        "--results",
        default=str(DEFAULT_RESULTS),
        help="SQLite results store (default: %(default)s)",
    )
    e.add_argument("--study", help="only this study")
    e.add_argument(
        "--kind", help="only cells of this kind (accuracy, imbalance, ...), so that the columns fit"
    )
    e.add_argument("--output", "-o", help="file to write (default: standard output)")

    rp = sub.add_parser("report", help="regenerate every report from stored results")
    rp.add_argument(
        "--results",
        default=None,
        help="SQLite store or exported JSON (default: results/cestudy.sqlite if it "
        "exists, else reports/data/results.json)",
    )
    rp.add_argument(
        "--out", default=str(DEFAULT_REPORTS), help="reports folder (default: %(default)s)"
    )

    b = sub.add_parser(
        "bench",
        help="time the kernels against torch, the numpy formulations, SciPy and the other "
        "frameworks installed (JAX, TensorFlow, scikit-learn)",
    )
    bench_command.add_arguments(b, default_results=str(DEFAULT_RESULTS))

    sub.add_parser("info", help="print versions, CPU, threading and CUDA for bug reports")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from .study.store import StoreError

    try:
        return COMMANDS[args.command](args)
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------
def _load_studies(names):
    from .study import spec

    studies = []
    for name in names:
        try:
            studies.append(spec.load(name))
        except spec.StudyError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return None
    return studies


def cmd_run(args):
    from .study import runner
    from .study.store import Store

    names = args.studies or ["default"]
    studies = _load_studies(names)
    if studies is None:
        return 2  # nothing written: every study is validated before the store is opened
    if args.dry_run:
        total = 0
        for s in studies:
            cells = s.cells()
            total += len(cells)
            by_kind = {}
            for c in cells:
                by_kind[c["kind"]] = by_kind.get(c["kind"], 0) + 1
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(by_kind.items()))
            print(
                f"{s.name}: {len(cells)} cells ({kinds}), estimated "
                f"{runner.estimate_seconds(cells):.0f} s serial"
            )
        print(f"total: {total} cells")
        return 0
    with Store(args.results) as store:
        for s in studies:
            summary = runner.run_study(
                s,
                store,
                jobs=args.jobs,
                executor=args.executor,
                scheduler=args.scheduler,
                force=args.force,
                quiet=args.quiet,
            )
            print(summary.format(), flush=True)
    if not args.no_report:
        from .report import build

        written = build.build_reports(args.results, args.out, export=True)
        print(f"reports: {len(written)} files under {args.out}")
    return 0


def cmd_list(args):
    from . import variants
    from .reference import implementations
    from .study import spec

    print("studies:")
    for name in spec.list_names():
        try:
            s = spec.load(name)
            print(f"  {name:12s} {len(s.cells()):6d} cells  {s.description.splitlines()[0]}")
        except spec.StudyError as exc:
            print(f"  {name:12s} INVALID: {exc}")
    print("variants:")
    for name, v in variants.VARIANTS.items():
        print(f"  {name:34s} {v.description}")
    print("implementations:")
    seen = {}
    for name in variants.VARIANTS:
        for impl_name, impl in implementations.for_variant(name).items():
            seen.setdefault(impl_name, (impl, []))[1].append(name)
    width = max(map(len, seen))
    for impl_name, (impl, _) in seen.items():
        ok, why = impl.availability()
        state = "available" if ok else f"unavailable: {why}"
        print(f"  {impl_name:{width}s} {impl.description} [{state}]")
    return 0


def _csv_value(v):
    """NaN as CSV readers (pandas, R, spreadsheets) read it; None as an empty field."""
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return "NaN"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    return v


def rows_to_csv(rows) -> tuple[str, list[str]]:
    """(CSV text, the list-valued columns left out). Columns: the row fields, then parameters,
    then metrics, each in first-seen order; list-valued metrics (curves, histograms) are left
    to the JSON export."""
    cols, lists = [], []
    for r in rows:
        for k, v in r.items():
            if isinstance(v, (list, dict)):
                if k not in lists:
                    lists.append(k)
            elif k not in cols:
                cols.append(k)
    cols = [k for k in cols if k not in lists]
    head = [k for k in cols if not k.startswith("p_")][:6]
    cols = (
        head
        + [k for k in cols if k.startswith("p_")]
        + [k for k in cols if k not in head and not k.startswith("p_")]
    )
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _csv_value(r.get(k)) for k in cols})
    return buf.getvalue(), lists


def cmd_export(args):
    from .report.data import export_rows
    from .study.store import Store, json_safe

    if not Path(args.results).exists():
        print(f"error: no results store at {args.results}", file=sys.stderr)
        return 2
    with Store(args.results) as store:
        rows = export_rows(store, study=args.study)
    if args.kind:
        rows = [r for r in rows if r["kind"] == args.kind]
    if not rows:
        print(
            f"error: no stored cells in {args.results}"
            + (f" for study {args.study!r}" if args.study else "")
            + (f" of kind {args.kind!r}" if args.kind else ""),
            file=sys.stderr,
        )
        return 2
    if args.format == "csv":
        text, left_out = rows_to_csv(rows)
        if left_out:
            print(
                f"note: list-valued columns left out of the CSV (use --format json): "
                f"{', '.join(left_out)}",
                file=sys.stderr,
            )
        kinds = sorted({r["kind"] for r in rows})
        if len(kinds) > 1:
            print(
                f"note: {len(kinds)} kinds in one table ({', '.join(kinds)}); --kind selects "
                f"one so that the columns fit",
                file=sys.stderr,
            )
    else:  # standard JSON: non-finite numbers as the strings "nan", "inf", "-inf"
        text = json.dumps(json_safe(rows), indent=1, sort_keys=True, allow_nan=False) + "\n"
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_report(args):
    from .report import build

    source = args.results
    if source is None:
        source = (
            str(DEFAULT_RESULTS)
            if DEFAULT_RESULTS.exists()
            else str(Path(args.out) / "data" / "results.json")
        )
    if not Path(source).exists():
        print(f"error: no results at {source}; run 'python -m cestudy run' first", file=sys.stderr)
        return 2
    written = build.build_reports(source, args.out, export=source.endswith(".sqlite"))
    print(f"reports: {len(written)} files under {args.out} (from {source})")
    return 0


BENCH_DTYPES = ("float32", "float64")
BENCH_MODES = ("forward", "forward_grad")


def _bench_error(message):
    print(f"cestudy bench: error: {message}", file=sys.stderr)
    return 2


def cmd_bench(args):
    """Check the benchmark's arguments (each error names its argument), then run it. A --quick
    smoke run is not stored unless --results names a store."""
    import re

    from . import variants
    from .bench import command as bench_command

    for item in (args.shapes or "").split(",") if args.shapes else ():
        m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", item)
        if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
            return _bench_error(f"--shapes: {item!r} is not NxC with N, C >= 1 (e.g. 2048x32768)")
    from .bench import cpu as bench_cpu

    timed = bench_cpu.VARIANTS if args.backend == "cpu" else tuple(variants.VARIANTS)
    for name in args.variants.split(","):
        if variants.canonical_name(name.strip()) not in timed:
            return _bench_error(
                f"--variants: {name!r} is not a variant the {args.backend} benchmark times; "
                f"allowed: {', '.join(timed)}"
            )
    if args.backend == "cpu":
        for option, allowed in (("dtypes", BENCH_DTYPES), ("modes", BENCH_MODES)):
            for value in getattr(args, option).split(","):
                if value not in allowed:
                    return _bench_error(f"--{option}: {value!r} is not one of {', '.join(allowed)}")
    if args.repeats < 1:
        return _bench_error(f"--repeats must be >= 1; got {args.repeats}")
    if args.quick and args.results == str(DEFAULT_RESULTS):
        args.results = ""  # a smoke run never mixes into the committed bench page
    return bench_command.main(args)


def cmd_info(args):
    from .study.manifest import manifest

    m = manifest()
    width = max(map(len, m))
    print("\n".join(f"{k.ljust(width)}  {v}" for k, v in m.items()))
    return 0


COMMANDS = {
    "run": cmd_run,
    "list": cmd_list,
    "export": cmd_export,
    "report": cmd_report,
    "bench": cmd_bench,
    "info": cmd_info,
}
