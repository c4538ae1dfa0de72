"""gateway: validates, stores and aggregates updates, and anchors every round on the ledger."""

from ._aggregate import FedAvgAccumulator, fedavg
from ._anchor import LedgerOutbox, OutboxState
from ._buffer import place_update, staleness_weight
from ._combine import RoundAggregator
from ._config import GatewayConfig, GatewaySection, load_gateway_config
from ._dp import DPAggregator, DPRounds
from ._errors import REJECT_REASONS, GatewayError, Rejected
from ._fedbuff import FedBuffRounds
from ._metrics import GatewayMetrics
from ._protocol import PROTOCOLS, RoundProtocol, register_protocol
from ._registry import DeviceRegistry, RegistryFile
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
from ._round import OpenRound, RoundResult
from ._run import open_gateway
from ._service import Gateway
from ._stats import GatewayStats
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
from ._sync import SynchronousRounds
from ._validate import AcceptedUpdate, RoundContext, UpdateValidator

__all__ = [
    "AGGREGATION_RULES",
    "PROTOCOLS",
    "REJECT_REASONS",
    "SERVER_OPTIMIZERS",
    "AcceptedUpdate",
    "Aggregate",
    "AggregationRule",
    "DPAggregator",
    "DPRounds",
    "DeviceRegistry",
    "FedAvgAccumulator",
    "FedBuffRounds",
    "Gateway",
    "GatewayConfig",
    "GatewayError",
    "GatewayMetrics",
    "GatewaySection",
    "GatewayStats",
    "LedgerOutbox",
    "OpenRound",
    "OutboxState",
    "RegistryFile",
    "Rejected",
    "RoundAggregator",
    "RoundContext",
    "RoundProtocol",
    "RoundResult",
    "ServerOptimizer",
    "ServerOptimizerState",
    "SynchronousRounds",
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
    "place_update",
    "register_protocol",
    "server_step",
    "staleness_weight",
    "trimmed_mean",
]
