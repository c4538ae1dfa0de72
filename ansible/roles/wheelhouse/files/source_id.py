"""Print what a wheel set is named after: the fedledger version and, for a source tree, a
digest of its contents, so that a changed tree never reuses wheels built from an older one;
and the control node's Python version and machine (what it builds for by default).

Usage: python source_id.py SOURCE  (a source folder, or a pip requirement)
"""

import hashlib
import json
import platform
import sys
from importlib.metadata import version
from pathlib import Path

SOURCES = (
    "pyproject.toml",
    "fedcore",
    "edge_agent",
    "gateway",
    "ledger",
    "fedledger",
    "bench",
    "monitoring",
    "firmware_configs",
)


def tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for name in SOURCES:
        top = root / name
        files = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
        for path in files:
            if "__pycache__" in path.parts:
                continue
            digest.update(str(path.relative_to(root)).encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


source = Path(sys.argv[1])
ident = version("fedledger")
if source.is_dir():
    ident += "-" + tree_digest(source)
python = f"{sys.version_info.major}.{sys.version_info.minor}"
print(json.dumps({"version": version("fedledger"), "id": ident, "python": python,
                  "machine": platform.machine()}))  # fmt: skip
