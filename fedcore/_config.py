"""Typed config files: TOML validated by pydantic, errors that name the file and key."""

from __future__ import annotations

import os
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ._errors import ConfigError
from ._transport import MqttSettings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

T = TypeVar("T", bound=BaseModel)


class StrictModel(BaseModel):
    """Base of every config section: unknown keys are errors, values are not coerced."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ServesMetrics(StrictModel):
    """The Prometheus endpoint keys a gateway's and an agent's section share."""

    metrics_port: Annotated[int, Field(ge=0, le=65535)] | None = Field(
        None,
        description="Serve Prometheus metrics at `http://metrics_host:metrics_port/metrics`;"
        " 0 picks a free port; unset: not served.",
    )
    metrics_host: str = Field(
        "127.0.0.1",
        description="The address the metrics endpoint listens on; loopback unless a scraper"
        " elsewhere needs it.",
    )


class BrokerSection(StrictModel):
    """Where the MQTT broker is; shared by agent and gateway configs."""

    #: The environment variable that overrides ``host`` and ``port`` (``host:port``).
    ENV: ClassVar[str] = "FEDLEDGER_BROKER"

    host: str = Field(
        "127.0.0.1",
        description="Host name or IP address of the MQTT broker; `--broker` or"
        " `$FEDLEDGER_BROKER` (`host:port`) override it and `port`.",
    )
    port: Annotated[int, Field(ge=1, le=65535)] = Field(
        1883, description="TCP port of the MQTT broker (usually 1883 plain, 8883 with TLS)."
    )
    keepalive: Annotated[int, Field(ge=5, le=3600)] = Field(
        30,
        description="Seconds between MQTT keepalive pings when nothing else is sent; the"
        " broker drops a client silent for 1.5 times as long.",
    )
    tls_ca: Path | None = Field(
        None,
        description="CA certificate (PEM) the broker's certificate must chain to"
        " (`fedledger pki`); setting any `tls_*` key switches mutual TLS on, and without"
        " this one the system's CAs are trusted.",
    )
    tls_cert: Path | None = Field(
        None,
        description="This client's certificate (PEM) from the organisation CA; its CN is the"
        " identity the broker's ACL uses. Goes with `tls_key`.",
    )
    tls_key: Path | None = Field(
        None, description="Private key (PEM, unencrypted) of `tls_cert`; keep it mode 0600."
    )

    @field_validator("tls_ca", "tls_cert", "tls_key", mode="before")
    @classmethod
    def _relative_to_file(cls, value: Any, info: Any) -> Path | None:
        return None if value is None else resolve_path(value, info)

    def overridden(
        self, address: str | None = None, *, environ: Mapping[str, str] = os.environ
    ) -> BrokerSection:
        """This section with host and port from ``address`` (a ``--broker`` option), else
        from ``$FEDLEDGER_BROKER``, else as the file says: the same site files run against
        another broker without being edited. TLS settings stay those of the file."""
        source = "--broker"
        if not address:
            address, source = environ.get(self.ENV) or None, self.ENV
        if address is None:
            return self
        host, port = parse_broker_address(address, source=source)
        return self.model_copy(update={"host": host, "port": port})

    def mqtt_settings(self, **more: Any) -> MqttSettings:
        """The transport settings for this section (plus client id, will...)."""
        return MqttSettings(
            host=self.host,
            port=self.port,
            keepalive=self.keepalive,
            tls_ca=self.tls_ca,
            tls_cert=self.tls_cert,
            tls_key=self.tls_key,
            **more,
        )


def parse_broker_address(address: str, *, source: str = "--broker") -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for an IPv6 address) as ``(host, port)``; a bad one is a
    :class:`ConfigError` naming ``source`` (the option or the environment variable)."""
    host, sep, port = address.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"{address!r} is not host:port (port 1-65535)", key=source)
    return host, int(port)


def load_config(path: str | os.PathLike[str], model: type[T]) -> T:
    """Read ``path`` (TOML) into ``model``; relative paths inside resolve from its folder."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("file not found", file=str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(f"cannot read: {reason}", file=str(path)) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", file=str(path)) from None
    return validate_config(data, model, file=str(path), base_dir=path.parent)


def validate_config(
    data: dict[str, Any], model: type[T], *, file: str, base_dir: Path | None = None
) -> T:
    try:
        return model.model_validate(data, context={"base_dir": base_dir or Path.cwd()})
    except ValidationError as exc:
        # Unknown keys and wrong values first: a misspelt key also shows up as "missing".
        errors = sorted(exc.errors(), key=lambda e: e["type"] == "missing")
        described = [_describe(e, model) for e in errors]
        key, message = described[0]
        if len(described) > 1:
            others = "; ".join(f"{k}: {m}" for k, m in described[1:4])
            message += f" (also {others})"
        raise ConfigError(message, file=file, key=key) from None


def _describe(error: Any, model: type[BaseModel]) -> tuple[str | None, str]:
    key = ".".join(str(part) for part in error["loc"]) or None
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        allowed = _allowed_keys(model, error["loc"][:-1])
        message = f"unknown key (allowed: {', '.join(allowed)})"
    elif error["type"] == "missing":
        message = "required key is missing"
    return key, message


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    current: Any = model
    for part in loc:
        current = _optional(current)
        if typing.get_origin(current) is dict:  # a table of sections by name: one of them
            current = typing.get_args(current)[1]
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        current = field.annotation
    return sorted(getattr(_optional(current), "model_fields", {}))


def _optional(annotation: Any) -> Any:
    """``X`` of ``X | None`` (an optional section), else ``annotation``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(members) == 1:
            return members[0]
    return annotation


def resolve_path(value: str | Path, info: Any) -> Path:
    """Field validator helper: a path relative to the config file's folder."""
    base = (info.context or {}).get("base_dir") or Path.cwd()
    path = Path(value)
    return path if path.is_absolute() else Path(base) / path
