"""The README's API example runs as written and does what it says (the guides' blocks: test_docs.py)."""

import re
import subprocess
import sys
from pathlib import Path

DTYPE_PROMOTION = "standard"  # optax and flax mix dtypes (conftest)

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_api_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    code = blocks[0]
    assert len(code.strip().splitlines()) <= 25
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    mse = float(re.search(r"MSE ([0-9.e+-]+)", out.stdout).group(1))
    assert mse < 1e-3, out.stdout  # the closed loop learns the reflection a NODE cannot


def test_readme_quickstart_is_two_commands():
    text = README.read_text()
    quick = text.split("## Quickstart", 1)[1].split("##", 1)[0]
    commands = re.findall(r"```bash\n(.*?)```", quick, flags=re.S)
    assert len(commands) == 2 and all(len(c.strip().splitlines()) == 1 for c in commands)
    assert "train.toy" in commands[0] and "pytest" in commands[1]
    ci = (README.parent / ".ci" / "run").read_text()
    assert commands[1].strip().replace("pip install ", "pip install -q ") in ci
