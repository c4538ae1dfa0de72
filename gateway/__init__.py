"""gateway: validates, stores and aggregates updates, and anchors every round on the ledger."""

from ._aggregate import FedAvgAccumulator, fedavg
from ._config import GatewayConfig, GatewaySection, load_gateway_config
from ._errors import REJECT_REASONS, GatewayError, Rejected
from ._metrics import GatewayMetrics
from ._registry import DeviceRegistry
from ._run import open_gateway
from ._service import Gateway, GatewayStats, RoundResult
from ._store import UpdateStore
from ._validate import AcceptedUpdate, RoundContext, UpdateValidator

__all__ = [
    "REJECT_REASONS",
    "AcceptedUpdate",
    "DeviceRegistry",
    "FedAvgAccumulator",
    "Gateway",
    "GatewayConfig",
    "GatewayError",
    "GatewayMetrics",
    "GatewaySection",
    "GatewayStats",
    "Rejected",
    "RoundContext",
    "RoundResult",
    "UpdateStore",
    "UpdateValidator",
    "fedavg",
    "load_gateway_config",
    "open_gateway",
]
