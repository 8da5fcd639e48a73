"""The README's Python examples run as written and print what the README says they print; its
set-up commands are the ones CI runs.

A statement in a README example followed by a comment that opens with values (``# [4.46e-18,
1.964]`` or ``# 0.5``) is evaluated and compared with those values at the precision they are
printed (half a unit of the last printed digit; ``-0.`` must be a negative zero). A ``torch:
[...]`` part of the same comment is checked the same way against torch, calling the function of
the same name in ``torch.nn.functional`` with the same arguments.
"""

import ast
import io
import re
import tokenize
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
NUMBER = r"-?\d+\.?\d*(?:e[-+]?\d+)?"
VALUES = re.compile(rf"^\s*(\[\s*{NUMBER}(?:\s*,\s*{NUMBER})*\s*\]|{NUMBER})(?=\s|;|$)")


def python_blocks():
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def _comments(code):
    """{line number: comment text without '#'}."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(code).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string[1:].strip()
    return out


def _printed(text):
    """The numbers a comment opens with, as strings, or None."""
    m = VALUES.match(text)
    if not m:
        return None
    return re.findall(NUMBER, m.group(1))


def _assert_matches(got, printed, what):
    got = np.atleast_1d(np.asarray(got, dtype=np.float64)).ravel()
    assert len(got) == len(printed), f"{what}: {got} vs README {printed}"
    for g, s in zip(got, printed):
        d = Decimal(s)
        if d == 0:
            assert g == 0 and np.signbit(g) == s.startswith("-"), f"{what}: {g!r} vs {s}"
            continue
        half_unit = Decimal(1).scaleb(d.as_tuple().exponent) / 2
        assert abs(Decimal(float(g)) - d) <= half_unit, f"{what}: {g!r} vs README {s}"


class _TorchFunctional:
    """``cs`` for the torch half of a comment: the function of the same name in
    torch.nn.functional, numpy arguments as tensors, the result as numpy."""

    def __init__(self, torch):
        self.torch = torch

    def __getattr__(self, name):
        f = getattr(self.torch.nn.functional, name)

        def call(*args, **kwargs):
            conv = [self.torch.tensor(a) if isinstance(a, np.ndarray) else a for a in args]
            kw = {
                k: self.torch.tensor(v) if isinstance(v, np.ndarray) else v
                for k, v in kwargs.items()
            }
            return f(*conv, **kw).numpy()

        return call


def run_block(code, torch=None):
    """Run one README block statement by statement; check every statement whose comment opens
    with values. Returns (namespace, number of values checked)."""
    namespace = {}
    comments = _comments(code)
    checked = 0
    for node in ast.parse(code).body:
        src = ast.get_source_segment(code, node)
        comment = comments.get(node.end_lineno, "")
        printed = _printed(comment)
        if isinstance(node, ast.Expr) and printed:
            got = eval(compile(ast.Expression(node.value), "README.md", "eval"), namespace)
            _assert_matches(got, printed, src)
            checked += len(printed)
            theirs = re.search(r"torch:\s*(.*)", comment)
            if theirs and torch is not None:
                ref = eval(
                    compile(ast.Expression(node.value), "README.md", "eval"),
                    {**namespace, "cs": _TorchFunctional(torch)},
                )
                _assert_matches(ref, _printed(theirs.group(1)), "torch: " + src)
                checked += 1
        else:
            exec(compile(ast.Module([node], []), "README.md", "exec"), namespace)
    return namespace, checked


def test_readme_python_examples_run_and_print_what_the_readme_says(torch):
    blocks = python_blocks()
    assert len(blocks) >= 2
    checked = 0
    for code in blocks:
        _, n = run_block(code, torch)
        checked += n
    assert checked >= 3  # [4.46e-18, 1.964] and torch's [-0., 1.964]


def test_readme_loss_example_claims():
    """The claims the first example makes in words: the mean is over rows, as torch's; the
    confident row's loss is positive where torch's is -0; the fused gradient is the one for the
    same call."""
    ns, _ = run_block(python_blocks()[0])
    cs, logits, labels = ns["cs"], ns["logits"], ns["labels"]
    per_row = cs.cross_entropy(logits, labels, reduction="none")
    assert per_row[0] > 0
    assert cs.cross_entropy(logits, labels) == pytest.approx(
        per_row.astype(np.float64).mean(), rel=1e-7
    )
    w = np.array([1.0, 2.0, 0.5])
    loss = cs.cross_entropy(logits, labels, label_smoothing=0.1, weight=w)
    assert ns["loss"] == loss and ns["grad"].shape == logits.shape
    # BCE on probabilities reproduces the clamp: sigmoid(18) rounds to 1 in float32, so the
    # t = 0 term of the first element would be log(0); torch's BCELoss clamps it at -100
    x, t = ns["x"], ns["t"]
    probs = (1 / (1 + np.exp(-x))).astype(np.float32)
    assert probs[0, 0] == 1.0
    clamped = cs.binary_cross_entropy(probs, 1 - t, reduction="none")
    assert clamped[0, 0] == pytest.approx(100.0)


def test_readme_opens_with_the_two_set_up_commands_and_ci_runs_both():
    text = (ROOT / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    commands = [line for line in first_block.splitlines() if line and not line.startswith("#")]
    assert commands[0].endswith("python -m cestudy run")
    assert commands[1].endswith("python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands[0] in ci and commands[1] in ci, "CI runs the README's commands verbatim"


def test_value_comments_are_parsed_and_compared_at_their_printed_precision():
    assert _printed("[4.46e-18, 1.964]; torch: [-0., 1.964]") == ["4.46e-18", "1.964"]
    assert _printed("mean over rows, as torch") is None
    assert _printed("H(p, q), q = softmax(logits)") is None
    _assert_matches([4.4649e-18, 1.96449], ["4.46e-18", "1.964"], "ok")
    with pytest.raises(AssertionError):
        _assert_matches([4.4651e-18, 1.964], ["4.46e-18", "1.964"], "rounds to 4.47e-18")
    with pytest.raises(AssertionError):
        _assert_matches([0.0], ["-0."], "positive zero")
    with pytest.raises(AssertionError):
        _assert_matches([1.0, 2.0], ["1.0"], "length")
