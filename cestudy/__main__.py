"""Command line: ``python -m cestudy {run,report,list,export,bench,info}``."""
from __future__ import annotations

import argparse
import sys


def _cmd_info(args):
    from .info import format_info

    print(format_info())
    return 0


def build_parser():
    p = argparse.ArgumentParser(prog="cestudy", description=__doc__)
    sub = p.add_subparsers(dest="command")
    sub.add_parser("info", help="print versions, CPU, threading and CUDA for bug reports")
    from . import cli

    cli.add_commands(sub)
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "info":
        return _cmd_info(args)
    from . import cli

    return cli.dispatch(args)


if __name__ == "__main__":
    sys.exit(main())
