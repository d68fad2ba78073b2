"""Helpers shared by several test modules (imported as ``from helpers import ...``)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def doc_block(path: str, heading: str, index: int) -> str:
    """The ``index``-th Python code block of the section under ``heading`` of the Markdown file
    ``path`` (relative to the repository root): the tests run documented examples as written."""
    section = (ROOT / path).read_text().split(heading, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)[index]
