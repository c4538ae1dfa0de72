"""gateway: validates, stores and aggregates updates, and anchors every round on the ledger."""

from ._aggregate import FedAvgAccumulator, fedavg
from ._config import GatewayConfig, GatewaySection, load_gateway_config
from ._errors import REJECT_REASONS, GatewayError, Rejected
from ._metrics import GatewayMetrics
from ._registry import DeviceRegistry
from ._robust import (
    UpdateMatrix,
    bulyan,
    clip_pairs,
    clipped,
    coordinate_median,
    drop_nonfinite,
    krum,
    multi_krum,
    pairwise_sq_distances,
    trimmed_mean,
)
from ._run import open_gateway
from ._service import Gateway, GatewayStats, RoundResult
from ._store import UpdateStore
from ._strategies import (
    AGGREGATION_RULES,
    SERVER_OPTIMIZERS,
    Aggregate,
    AggregationRule,
    ServerOptimizer,
    ServerOptimizerState,
    aggregate,
    server_step,
)
from ._validate import AcceptedUpdate, RoundContext, UpdateValidator

__all__ = [
    "AGGREGATION_RULES",
    "REJECT_REASONS",
    "SERVER_OPTIMIZERS",
    "AcceptedUpdate",
    "Aggregate",
    "AggregationRule",
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
    "ServerOptimizer",
    "ServerOptimizerState",
    "UpdateMatrix",
    "UpdateStore",
    "UpdateValidator",
    "aggregate",
    "bulyan",
    "clip_pairs",
    "clipped",
    "coordinate_median",
    "drop_nonfinite",
    "fedavg",
    "krum",
    "load_gateway_config",
    "multi_krum",
    "open_gateway",
    "pairwise_sq_distances",
    "server_step",
    "trimmed_mean",
]
