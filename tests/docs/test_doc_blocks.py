"""Every ```python block of README.md and docs/*.md runs as written.

Each block runs in a fresh interpreter from an empty folder. A block that cannot run here
(torchrun, a GPU) is marked by an HTML comment ``<!-- norun -->`` on the line before it and
is skipped; the marker is shown nowhere on the site. README.md, docs/analyses.md and
docs/losses.md have their own runners (listed in ``RUN_ELSEWHERE``), so their blocks are not
run twice; this file checks that those runners still exist and read that page.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"(<!-- norun -->\s*\n)?```python\n(.*?)```", re.S)
#: pages whose blocks another test runs: page -> that test file
RUN_ELSEWHERE = {
    "README.md": "tests/docs/test_readme.py",
    "docs/analyses.md": "tests/docs/test_analyses_doc.py",
    "docs/losses.md": "tests/torch_backend/test_closure.py",
}
#: the import that each optional package shows in a block
OPTIONAL = {"torch": "torch", "jax": "jax", "sklearn": "sklearn", "matfree": "matfree",
            "lightning": "lightning", "transformers": "transformers", "flax": "flax",
            "optax": "optax", "matplotlib": "matplotlib"}


def blocks(path: Path) -> list[tuple[bool, str]]:
    """``(runnable, code)`` of each python block of a markdown file."""
    return [(not marker, code) for marker, code in BLOCK.findall(path.read_text())]


def _pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


CASES = [
    pytest.param(page, index, id=f"{page.relative_to(ROOT)}#{index}")
    for page in _pages()
    if str(page.relative_to(ROOT)) not in RUN_ELSEWHERE
    for index in range(len(blocks(page)))
]


def test_blocks_are_found():
    # the six blocks of interop, migrating-from-pyhessian and monitoring at least
    assert len(CASES) >= 6
    assert blocks(ROOT / "docs" / "monitoring.md")[0][0]  # runnable
    marked = BLOCK.findall("<!-- norun -->\n```python\nimport gpu\n```\n```python\nx = 1\n```")
    assert [bool(m) for m, _ in marked] == [True, False]


@pytest.mark.parametrize("page", list(RUN_ELSEWHERE))
def test_other_pages_have_their_runner(page):
    runner = (ROOT / RUN_ELSEWHERE[page]).read_text()
    assert Path(page).name in runner and "```python" in runner


@pytest.mark.parametrize(("page", "index"), CASES)
def test_doc_block_runs(page, index, tmp_path):
    runnable, code = blocks(page)[index]
    if not runnable:
        pytest.skip("marked <!-- norun --> (cannot run on this machine)")
    for module, dist in OPTIONAL.items():
        if re.search(rf"^\s*(import|from)\s+{module}\b|^\s*import .*\b{module}\b", code, re.M):
            if importlib.util.find_spec(dist) is None:
                pytest.skip(f"needs {dist}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{page.name} block {index}:\n{proc.stderr[-3000:]}"
