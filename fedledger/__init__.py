"""fedledger: the command line and the single-machine demo that tie the components together.

The components themselves live in ``fedcore`` (with the CA in :mod:`fedcore.pki` and the
broker in :mod:`fedcore.mosquitto`), ``edge_agent``, ``gateway`` and ``ledger``. What the
benchmarks and tests build sites from is public here, and imported only when first used:
a device that runs ``fedledger agent run`` never loads it.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: Public name -> private module that defines it (loaded on first use).
_LAZY = {
    "DATASETS": "_datasets",
    "Dataset": "_datasets",
    "Layout": "_provision",
    "LocalAgents": "_demo",
    "TaskOptions": "_provision",
    "device_ids": "_provision",
    "dirichlet_partition": "_datasets",
    "iid_partition": "_datasets",
    "load_dataset": "_datasets",
    "provision": "_provision",
    "split_dataset": "_datasets",
}

__all__ = [
    "DATASETS",
    "Dataset",
    "Layout",
    "LocalAgents",
    "TaskOptions",
    "__version__",
    "device_ids",
    "dirichlet_partition",
    "iid_partition",
    "load_dataset",
    "provision",
    "split_dataset",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fedledger' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
