"""pytest configuration for the doctests of the package (``--doctest-modules`` over cestudy/):
modules whose optional dependency is not installed are not collected."""

import importlib.util

collect_ignore = [] if importlib.util.find_spec("torch") else ["cestudy/torch.py"]
