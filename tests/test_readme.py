"""The README's Python examples run as written, and its set-up commands are the ones CI runs."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def python_blocks():
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_readme_python_examples_run():
    blocks = python_blocks()
    assert len(blocks) >= 2
    for code in blocks:
        namespace = {}
        exec(compile(code, "README.md", "exec"), namespace)


def test_readme_opens_with_the_two_set_up_commands_and_ci_runs_the_test_command():
    text = (ROOT / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    commands = [line for line in first_block.splitlines() if line and not line.startswith("#")]
    assert commands[0].endswith("python -m cestudy run")
    assert commands[1].endswith("python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1].replace("pip install", "python3 -m pip install").replace(
        "python -m pytest", "python3 -m pytest") in ci
