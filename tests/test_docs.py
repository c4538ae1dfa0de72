"""The documentation's runnable blocks run: each file's blocks, in order, in one shell.

A block is runnable when the line just before its opening fence is ``<!-- runnable -->``
and the fence is ```` ```bash ````. A file's blocks run in one ``bash -euo pipefail`` in a
fresh folder, with this checkout's commands first on PATH and ``FEDLEDGER_BROKER`` pointing
at a Mosquitto this test started, so a doc never needs a broker of its own.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedcore.mosquitto import MosquittoBroker

ROOT = Path(__file__).parents[1]
MARK = "<!-- runnable -->"


def runnable_blocks(text: str) -> list[str]:
    lines = text.splitlines()
    blocks = []
    for i, line in enumerate(lines[:-1]):
        if line.strip() != MARK:
            continue
        if lines[i + 1].strip() != "```bash":
            raise AssertionError(f"line {i + 1}: {MARK} must come just before a ```bash fence")
        end = next(j for j in range(i + 2, len(lines)) if lines[j].strip() == "```")
        blocks.append("\n".join(lines[i + 2 : end]))
    return blocks


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_blocks_are_found_as_marked():
    text = "a\n<!-- runnable -->\n```bash\necho 1\necho 2\n```\n```bash\nnot marked\n```\n"
    assert runnable_blocks(text) == ["echo 1\necho 2"]
    with pytest.raises(AssertionError, match="must come just before"):
        runnable_blocks("<!-- runnable -->\n```python\nx\n```\n")
    # The own-federation walk-through is runnable from its first command to its last.
    blocks = runnable_blocks((ROOT / "docs" / "own-federation.md").read_text())
    assert blocks[0].startswith("fedledger data sample-csv")
    assert blocks[-1].startswith("fedledger ledger verify")


def _bin_dirs() -> list[str]:
    dirs = [ROOT / ".venv" / "bin", Path(sys.executable).parent]
    return [str(d) for d in dirs if d.is_dir()]


# Whole federations with privacy on: run by `make test-slow`.
SLOW_DOCUMENTS = {"privacy.md"}


@pytest.mark.mqtt
@pytest.mark.parametrize(
    "doc",
    [
        pytest.param(d, marks=pytest.mark.slow) if d.name in SLOW_DOCUMENTS else d
        for d in documents()
        if runnable_blocks(d.read_text())
    ],
    ids=lambda d: d.name,
)
def test_runnable_blocks_run(doc, tmp_path):
    script = "\n\n".join(runnable_blocks(doc.read_text()))
    with MosquittoBroker() as broker:
        env = {
            **os.environ,
            "PATH": os.pathsep.join([*_bin_dirs(), os.environ.get("PATH", "")]),
            "FEDLEDGER_BROKER": f"{broker.host}:{broker.port}",
        }
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    assert done.returncode == 0, f"{doc.name}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    if doc.name == "own-federation.md":
        assert "already created" in done.stdout
        assert re.search(r"ok: \d+ blocks", done.stdout), done.stdout[-2000:]
