"""edge_agent: trains on a device's own data and sends signed, quantized updates.

Imports only ``fedcore``; nothing from ``gateway`` or ``ledger`` is installed on a device.
"""

import typing

from ._agent import AgentError, AgentState, EdgeAgent
from ._config import AgentConfig, AgentSection, load_agent_config
from ._inference import BACKENDS, InferenceError, Predictor
from ._run import open_agent, run_agent

if typing.TYPE_CHECKING:
    from ._metrics import AgentMetrics

# Imported on first use (PEP 562): metrics load prometheus_client, which an agent without a
# metrics port never needs (every MB counts on a device; see `fedledger bench agent`).
_LAZY = {"AgentMetrics": "._metrics"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "BACKENDS",
    "AgentConfig",
    "AgentError",
    "AgentMetrics",
    "AgentSection",
    "AgentState",
    "EdgeAgent",
    "InferenceError",
    "Predictor",
    "load_agent_config",
    "open_agent",
    "run_agent",
]
