"""edge_agent: trains on a device's own data and sends signed, quantized updates.

Imports only ``fedcore``; nothing from ``gateway`` or ``ledger`` is installed on a device.
"""

from ._agent import AgentError, AgentState, EdgeAgent
from ._config import AgentConfig, AgentSection, load_agent_config
from ._inference import BACKENDS, InferenceError, Predictor
from ._metrics import AgentMetrics
from ._run import open_agent

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
]
