"""Sub-commands run, list, export, report and bench (``info`` lives in ``__main__``)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = ROOT / "results" / "cestudy.sqlite"
DEFAULT_REPORTS = ROOT / "reports"


def add_commands(sub):
    r = sub.add_parser("run", help="run studies (default: 'default') and regenerate the reports")
    r.add_argument("studies", nargs="*", metavar="STUDY",
                   help="study names from studies/ or paths of TOML files")
    r.add_argument("--results", default=str(DEFAULT_RESULTS), help="SQLite results store")
    r.add_argument("--jobs", type=int, default=1, help="worker processes (default 1: serial)")
    r.add_argument("--executor", choices=("local", "dask", "dask-local"), default="local")
    r.add_argument("--scheduler", help="dask scheduler address for --executor dask")
    r.add_argument("--force", action="store_true", help="recompute finished cells")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument("--dry-run", action="store_true", help="print cell counts and a time estimate")
    r.add_argument("--no-report", action="store_true", help="do not regenerate the reports")
    r.add_argument("--out", default=str(DEFAULT_REPORTS), help="reports folder")

    sub.add_parser("list", help="list studies, variants and implementations")

    e = sub.add_parser("export", help="export stored results as CSV or JSON")
    e.add_argument("--format", choices=("csv", "json"), default="json")
    e.add_argument("--results", default=str(DEFAULT_RESULTS))
    e.add_argument("--study", help="only this study")
    e.add_argument("--output", "-o", help="file to write (default: standard output)")

    p = sub.add_parser("report", help="regenerate every report from stored results")
    p.add_argument("--results", default=None,
                   help="SQLite store or exported JSON (default: results/cestudy.sqlite if it "
                        "exists, else reports/data/results.json)")
    p.add_argument("--out", default=str(DEFAULT_REPORTS))

    b = sub.add_parser("bench", help="time the kernels against torch, numpy and scipy")
    b.add_argument("--backend", choices=("cpu", "cuda"), default="cpu")
    b.add_argument("--quick", action="store_true", help="small shapes only (a smoke run)")
    b.add_argument("--shapes", help="comma-separated NxC list, e.g. 256x10,2048x32768")
    b.add_argument("--variants", default="ce_index,ce_prob,bce_logits")
    b.add_argument("--dtypes", default="float32,float64")
    b.add_argument("--modes", default="forward,forward_grad")
    b.add_argument("--repeats", type=int, default=7)
    b.add_argument("--json", help="also write the table as JSON here")
    b.add_argument("--validate-only", action="store_true",
                   help="--backend cuda: run the correctness checks, time nothing")
    b.add_argument("--results", default=str(DEFAULT_RESULTS),
                   help="store the bench cells here (study 'bench'); '' to skip")


def dispatch(args):
    return {"run": cmd_run, "list": cmd_list, "export": cmd_export, "report": cmd_report,
            "bench": cmd_bench}[args.command](args)


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
            print(f"{s.name}: {len(cells)} cells ({kinds}), estimated "
                  f"{runner.estimate_seconds(cells):.0f} s serial")
        print(f"total: {total} cells")
        return 0
    with Store(args.results) as store:
        for s in studies:
            summary = runner.run_study(s, store, jobs=args.jobs, executor=args.executor,
                                       scheduler=args.scheduler, force=args.force,
                                       quiet=args.quiet)
            print(summary.format())
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
    for v, d in ((k, x.description) for k, x in variants.VARIANTS.items()):
        print(f"  {v:14s} {d}")
    print("implementations:")
    seen = {}
    for v, impls in ((k, implementations.for_variant(k)) for k in variants.VARIANTS):
        for name, impl in impls.items():
            seen.setdefault(name, (impl, []))[1].append(v)
    for name, (impl, variants) in seen.items():
        ok, why = impl.availability()
        state = "available" if ok else f"unavailable: {why}"
        print(f"  {name:9s} {impl.description} [{state}]")
    return 0


def cmd_export(args):
    from .report.data import export_rows, rows_to_csv
    from .study.store import Store

    if not Path(args.results).exists():
        print(f"error: no results store at {args.results}", file=sys.stderr)
        return 2
    with Store(args.results) as store:
        rows = export_rows(store, study=args.study)
    text = rows_to_csv(rows) if args.format == "csv" else json.dumps(rows, indent=1,
                                                                      sort_keys=True)
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_report(args):
    from .report import build

    source = args.results
    if source is None:
        source = str(DEFAULT_RESULTS) if DEFAULT_RESULTS.exists() else \
            str(Path(args.out) / "data" / "results.json")
    if not Path(source).exists():
        print(f"error: no results at {source}; run 'python -m cestudy run' first",
              file=sys.stderr)
        return 2
    written = build.build_reports(source, args.out, export=source.endswith(".sqlite"))
    print(f"reports: {len(written)} files under {args.out} (from {source})")
    return 0


def cmd_bench(args):
    from .bench import command as bench_cli

    return bench_cli.main(args)
