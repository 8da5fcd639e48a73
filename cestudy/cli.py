"""Sub-commands beyond ``info``; filled in by the study, report and bench layers."""


def add_commands(sub):
    pass


def dispatch(args):
    raise SystemExit(f"unknown command {args.command!r}")
