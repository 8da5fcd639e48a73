"""The package imports one way: every import of every module (function-local ones included, read
with ast) goes to the same or a lower layer, and the import graph has no cycle."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cestudy"

# Lowest first. A module may import modules of its own layer or of lower ones, never higher.
LAYERS = [
    ("registry", ["dtypes", "variants"]),
    ("kernels", ["kernels", "kernels.*"]),
    ("dispatch", ["backends", "buffers", "dispatch"]),
    ("losses", ["losses", "linear", "torch", "__init__"]),
    ("reference", ["reference", "reference.*"]),
    ("bench, study", ["bench", "bench.*", "study", "study.*"]),
    ("report", ["report", "report.*"]),
    ("cli", ["cli", "__main__"]),
]


def _modules():
    """{dotted name relative to cestudy ('' parts dropped): path} for every module."""
    out = {}
    for p in sorted(PACKAGE.rglob("*.py")):
        rel = p.relative_to(PACKAGE).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def layer_of(module: str) -> int:
    for i, (_, patterns) in enumerate(LAYERS):
        for pat in patterns:
            if module == pat or (pat.endswith(".*") and module.startswith(pat[:-1])):
                return i
    raise AssertionError(f"cestudy.{module} is in no layer: add it to LAYERS in {__file__}")


def _package_of(module: str, path: Path) -> list[str]:
    parts = [] if module == "__init__" else module.split(".")
    return parts if path.name == "__init__.py" else parts[:-1]


def imports_of(module: str) -> set[str]:
    """The cestudy modules ``module`` imports anywhere in its body (function-local included)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    package = _package_of(module, path)
    found = set()

    def resolve(name):  # the longest known module prefix of a dotted name
        parts = name.split(".") if name else []
        while parts:
            cand = ".".join(parts)
            if cand in MODULES:
                return cand
            parts = parts[:-1]
        return "__init__"

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "cestudy" or a.name.startswith("cestudy."):
                    found.add(resolve(a.name[len("cestudy.") :] if "." in a.name else ""))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                mod = ".".join(base + ([node.module] if node.module else []))
            elif node.module and (node.module == "cestudy" or node.module.startswith("cestudy.")):
                mod = node.module[len("cestudy.") :] if "." in node.module else ""
            else:
                continue
            for a in node.names:
                sub = f"{mod}.{a.name}" if mod else a.name
                found.add(sub if sub in MODULES else resolve(mod))
    found.discard(module)
    return found


GRAPH = {m: imports_of(m) for m in MODULES}


def test_every_module_has_a_layer():
    for m in MODULES:
        layer_of(m)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_from_a_higher_layer(module):
    mine = layer_of(module)
    bad = [
        f"cestudy.{t} ({LAYERS[layer_of(t)][0]})"
        for t in sorted(GRAPH[module])
        if layer_of(t) > mine
    ]
    assert not bad, (
        f"cestudy.{module} ({LAYERS[mine][0]}) imports from a higher layer: {', '.join(bad)}"
    )


def test_no_import_cycle():
    state, stack = {}, []

    def visit(m):
        state[m] = "active"
        stack.append(m)
        for t in sorted(GRAPH[m]):
            if state.get(t) == "active":
                cycle = stack[stack.index(t) :] + [t]
                raise AssertionError("import cycle: " + " -> ".join(f"cestudy.{c}" for c in cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def test_the_walk_sees_function_local_imports():
    # cli imports the report only inside cmd_run: the walk must see it
    assert "report.build" in GRAPH["cli"]
    assert "bench.cpu" in GRAPH["study.kinds.performance"]
