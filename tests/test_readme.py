"""Every ```python block of README.md runs as written, each on its own in a fresh process (so each must hold its own
imports). A block that cannot run must say so on its first line, visibly: ``# not run: <why>``."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
NOT_RUN = "# not run:"


def python_blocks() -> list[tuple[int, str]]:
    """(line number, code) of every ```python block in README.md."""
    text = README.read_text(encoding="utf-8")
    return [
        (text.count("\n", 0, m.start()) + 1, m.group(1))
        for m in re.finditer(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)
    ]


BLOCKS = python_blocks()


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize(("line", "code"), BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_block_runs(line, code, tmp_path):
    if code.startswith(NOT_RUN):
        pytest.skip(f"README.md:{line} is marked {code.splitlines()[0]!r}")
    script = tmp_path / "snippet.py"
    script.write_text(code, encoding="utf-8")
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"README.md:{line} failed:\n{proc.stderr[-4000:]}"
