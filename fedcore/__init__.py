"""fedcore: what agents and gateways must agree on (wire format, codecs, models, keys).

Both sides import this package; it imports neither of them.
"""

import typing

from ._canonical import canonical_json, sha256_hex
from ._certs import (
    ALG_ECDSA_P256,
    ALG_ED25519,
    SIGNING_ALGS,
    CertificateTrust,
    certificate_der,
    certificate_fingerprint,
    certificate_signer,
    check_key_matches,
    load_certificate,
    load_ec_private_key,
    verify_ecdsa,
)
from ._codec import (
    CODECS,
    DEFAULT_K_FRACTION,
    TensorView,
    decode_tensors,
    encode_tensors,
    iter_tensors,
    quantize_int4,
    quantize_int8,
    quantize_int8_channels,
    topk_with_feedback,
)
from ._config import (
    BrokerSection,
    ServesMetrics,
    StrictModel,
    load_config,
    parse_broker_address,
    resolve_path,
    validate_config,
)
from ._data import (
    LABEL_RULES,
    CsvTable,
    SignalWindower,
    check_labels,
    collect_windows,
    load_local_data,
    load_signal_windows,
    read_csv_table,
    read_signal_chunks,
    window_signal,
)
from ._device_class import DeviceBudgetError, DeviceClass, check_task_fits, load_device_class
from ._errors import (
    CertificateError,
    CodecError,
    ConfigError,
    DecryptError,
    FedledgerError,
    SignatureError,
    WireError,
)
from ._export import EXPORT_FORMATS, dequantized_params, export_model, export_onnx, export_tflite
from ._faults import POINTS as CRASH_POINTS
from ._faults import crash_point
from ._files import (
    MARKER,
    UnsafePathError,
    atomic_write_bytes,
    atomic_write_text,
    check_folder,
    claim_folder,
    fresh_folder,
    read_marker,
    remove_owned_folder,
    write_marker,
)
from ._limits import (
    MAX_BATCH_RECORDS,
    MAX_BATCHES,
    MAX_CLASS_RECALLS,
    MAX_METRICS,
    MAX_ROUND,
    MAX_SAMPLES,
)
from ._lock import AlreadyLocked, ProcessLock, lock_beside
from ._model import (
    MODEL_KINDS,
    ModelSpec,
    Params,
    accuracy,
    clinical_metrics,
    evaluate_model,
    fake_quantize,
    init_params,
    model_hash,
    model_payload,
    predict_logits,
    train,
)
from ._privacy import (
    DP_METRICS,
    DPRoundEvent,
    DPSection,
    clip_update,
    epsilon,
    load_dp_seed,
    new_dp_seed,
    sampled_devices,
    seed_digest,
    update_norm,
)
from ._seal import (
    ENC_X25519_AES256GCM,
    SEAL_OVERHEAD,
    generate_x25519_key,
    load_x25519_private_key,
    load_x25519_public_key,
    x25519_public_b64,
)
from ._signing import (
    Signer,
    generate_key,
    load_private_key,
    load_public_key,
    public_key_b64,
    save_private_key,
    signer_from_key,
    verify_signature,
)
from ._task import DP_RULES, ColumnsSection, TaskSpec, ledger_privacy, load_task
from ._topics import (
    IDENTIFIER,
    device_from_topic,
    model_topic,
    presence_subscription,
    presence_topic,
    update_subscription,
    update_topic,
)
from ._transport import (
    InMemoryBroker,
    InMemoryTransport,
    Message,
    MqttSettings,
    MqttTransport,
    Transport,
    Will,
)
from ._wire import (
    DEFAULT_MAX_MESSAGE_BYTES,
    TYPE_MODEL,
    TYPE_UPDATE,
    WIRE_VERSION,
    Envelope,
    ModelHeader,
    UpdateHeader,
    decode_envelope,
    encode_model,
    encode_update,
    open_update_payload,
)

if typing.TYPE_CHECKING:
    from ._metrics_http import MetricsEndpoint
    from ._sqlite import NotADatabaseError, connect_readonly, table_names

# Imported on first use (PEP 562): the metrics endpoint loads prometheus_client and its HTTP
# server, which an agent without a metrics port never needs.
# Likewise sqlite3, for the read-only openers of the gateway's and the ledger's files.
_LAZY = {
    "MetricsEndpoint": "._metrics_http",
    "NotADatabaseError": "._sqlite",
    "connect_readonly": "._sqlite",
    "table_names": "._sqlite",
}


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
    "ALG_ECDSA_P256",
    "ALG_ED25519",
    "CODECS",
    "CRASH_POINTS",
    "DEFAULT_K_FRACTION",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DP_METRICS",
    "DP_RULES",
    "ENC_X25519_AES256GCM",
    "EXPORT_FORMATS",
    "IDENTIFIER",
    "LABEL_RULES",
    "MARKER",
    "MAX_BATCHES",
    "MAX_BATCH_RECORDS",
    "MAX_CLASS_RECALLS",
    "MAX_METRICS",
    "MAX_ROUND",
    "MAX_SAMPLES",
    "MODEL_KINDS",
    "SEAL_OVERHEAD",
    "SIGNING_ALGS",
    "TYPE_MODEL",
    "TYPE_UPDATE",
    "WIRE_VERSION",
    "AlreadyLocked",
    "BrokerSection",
    "CertificateError",
    "CertificateTrust",
    "CodecError",
    "ColumnsSection",
    "ConfigError",
    "CsvTable",
    "DPRoundEvent",
    "DPSection",
    "DecryptError",
    "DeviceBudgetError",
    "DeviceClass",
    "Envelope",
    "FedledgerError",
    "InMemoryBroker",
    "InMemoryTransport",
    "Message",
    "MetricsEndpoint",
    "ModelHeader",
    "ModelSpec",
    "MqttSettings",
    "MqttTransport",
    "NotADatabaseError",
    "Params",
    "ProcessLock",
    "ServesMetrics",
    "SignalWindower",
    "SignatureError",
    "Signer",
    "StrictModel",
    "TaskSpec",
    "TensorView",
    "Transport",
    "UnsafePathError",
    "UpdateHeader",
    "Will",
    "WireError",
    "accuracy",
    "atomic_write_bytes",
    "atomic_write_text",
    "canonical_json",
    "certificate_der",
    "certificate_fingerprint",
    "certificate_signer",
    "check_folder",
    "check_key_matches",
    "check_labels",
    "check_task_fits",
    "claim_folder",
    "clinical_metrics",
    "clip_update",
    "collect_windows",
    "connect_readonly",
    "crash_point",
    "decode_envelope",
    "decode_tensors",
    "dequantized_params",
    "device_from_topic",
    "encode_model",
    "encode_tensors",
    "encode_update",
    "epsilon",
    "evaluate_model",
    "export_model",
    "export_onnx",
    "export_tflite",
    "fake_quantize",
    "fresh_folder",
    "generate_key",
    "generate_x25519_key",
    "init_params",
    "iter_tensors",
    "ledger_privacy",
    "load_certificate",
    "load_config",
    "load_device_class",
    "load_dp_seed",
    "load_ec_private_key",
    "load_local_data",
    "load_private_key",
    "load_public_key",
    "load_signal_windows",
    "load_task",
    "load_x25519_private_key",
    "load_x25519_public_key",
    "lock_beside",
    "model_hash",
    "model_payload",
    "model_topic",
    "new_dp_seed",
    "open_update_payload",
    "parse_broker_address",
    "predict_logits",
    "presence_subscription",
    "presence_topic",
    "public_key_b64",
    "quantize_int4",
    "quantize_int8",
    "quantize_int8_channels",
    "read_csv_table",
    "read_marker",
    "read_signal_chunks",
    "remove_owned_folder",
    "resolve_path",
    "sampled_devices",
    "save_private_key",
    "seed_digest",
    "sha256_hex",
    "signer_from_key",
    "table_names",
    "topk_with_feedback",
    "train",
    "update_norm",
    "update_subscription",
    "update_topic",
    "validate_config",
    "verify_ecdsa",
    "verify_signature",
    "window_signal",
    "write_marker",
    "x25519_public_b64",
]
