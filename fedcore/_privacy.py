"""Client-level differential privacy (DP-FedAvg, McMahan et al., 2018): the task's ``[dp]``
section, the L2 clipping both sides apply, the Poisson sampling of devices from a committed
secret seed, and the privacy accountant.

The accountant is Google's ``dp-accounting`` (RDP): each round is one DP event, Poisson-
sampled Gaussian with rate ``q`` and noise multiplier ``z`` (or, without sampling, a plain
Gaussian: no amplification). The gateway and ``fedledger ledger privacy`` build the events
from the same numbers (the round records on the ledger) with :func:`epsilon`, so an auditor
recomputes the gateway's figure exactly. ``dp_accounting`` is imported only when an epsilon
is computed: a device never needs it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
from pydantic import Field, model_validator

from ._config import StrictModel
from ._errors import ConfigError
from ._files import atomic_write_text

#: The Renyi orders the accountant optimises over: integers, where the sampled Gaussian's
#: RDP has a closed form (fractional orders near 1 need a series that may not converge).
RDP_ORDERS = (*range(2, 65), 80, 96, 128, 192, 256, 512, 1024)
#: The metric keys a DP round's ledger record carries (``CommitRound`` metrics).
DP_METRICS = ("dp_noise_multiplier", "dp_clip", "dp_sampling_rate", "dp_noised", "dp_epsilon")


class DPSection(StrictModel):
    """``[dp]`` of a task: central differential privacy at the level of a device."""

    noise_multiplier: Annotated[float, Field(gt=0, le=100)] = Field(
        description="z: the Gaussian noise added to the sum of clipped updates has standard"
        " deviation `z * clip`."
    )
    clip: Annotated[float, Field(gt=0, le=1e6)] = Field(
        description="C: every update (the model delta) is clipped to this L2 norm, on the"
        " device and again at the gateway."
    )
    target_delta: Annotated[float, Field(gt=0, lt=1)] = Field(
        1e-5, description="The delta of the (epsilon, delta) guarantee."
    )
    budget_epsilon: Annotated[float, Field(gt=0, le=1000)] = Field(
        description="The privacy budget: a round that would take epsilon above it is not"
        " opened, and the task ends."
    )
    sampling: Annotated[float, Field(gt=0, le=1)] = Field(
        1.0,
        description="q: the probability that a device takes part in a round (Poisson"
        " sampling, drawn from the gateway's secret seed); 1: every device, every round (no"
        " amplification).",
    )
    seed_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = Field(
        None,
        description="SHA-256 (hex) of the gateway's sampling seed (`fedledger pki dp-seed`),"
        " required when `sampling < 1`: committed with the task, the seed itself is revealed"
        " on the ledger when the task ends.",
    )

    @model_validator(mode="after")
    def _seed_when_sampled(self):
        if self.sampling < 1 and self.seed_sha256 is None:
            raise ValueError("dp.sampling < 1 needs dp.seed_sha256 (fedledger pki dp-seed)")
        return self

    def ledger_terms(self) -> dict:
        """What ``CreateTask`` records under ``privacy.dp``."""
        return self.model_dump(mode="json")


def update_norm(delta: Mapping[str, np.ndarray]) -> float:
    """The L2 norm of an update over all its tensors."""
    return float(
        np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in delta.values()))
    )


def clip_update(
    delta: Mapping[str, np.ndarray], clip: float
) -> tuple[dict[str, np.ndarray], float]:
    """``delta`` scaled to L2 norm at most ``clip``, and its norm before."""
    norm = update_norm(delta)
    factor = 1.0 if norm <= clip else clip / norm
    return {k: (np.asarray(v, np.float32) * np.float32(factor)) for k, v in delta.items()}, norm


def seed_digest(seed: bytes) -> str:
    return hashlib.sha256(seed).hexdigest()


def new_dp_seed(path: str | os.PathLike[str]) -> str:
    """Write a fresh 32-byte sampling seed (hex, mode 0600) to ``path``, which must not
    exist; returns its SHA-256, which goes into the task as ``dp.seed_sha256``."""
    target = Path(path)
    if target.exists() or target.is_symlink():
        raise ConfigError(f"{target} exists; a seed is never overwritten", file=str(target))
    seed = secrets.token_bytes(32)
    atomic_write_text(target, seed.hex() + "\n", mode=0o600)
    return seed_digest(seed)


def load_dp_seed(path: str | os.PathLike[str], *, config: str | None = None) -> bytes:
    """Read a sampling seed written by :func:`new_dp_seed` (16 to 64 bytes as hex)."""
    try:
        text = Path(path).read_text(encoding="ascii").strip()
        seed = bytes.fromhex(text)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"cannot read the DP sampling seed {path}: {exc}", file=config, key="gateway.dp_seed"
        ) from None
    if not 16 <= len(seed) <= 64:
        raise ConfigError(
            f"the DP sampling seed {path} holds {len(seed)} bytes; 16 to 64 expected",
            file=config,
            key="gateway.dp_seed",
        )
    return seed


def sampled_devices(
    seed: bytes, task: str, round_: int, devices: Iterable[str], rate: float
) -> tuple[str, ...]:
    """The devices Poisson-sampled for a round: each independently with probability
    ``rate``, decided by HMAC-SHA256(seed, "task/round/device") read as a number in [0, 1).
    Anyone holding the revealed seed recomputes the same set."""
    if rate >= 1:
        return tuple(sorted(devices))
    chosen = []
    for device in sorted(devices):
        mac = hmac.new(seed, f"{task}/{round_}/{device}".encode(), hashlib.sha256).digest()
        if int.from_bytes(mac[:8], "big") / 2.0**64 < rate:
            chosen.append(device)
    return tuple(chosen)


@dataclass(frozen=True, slots=True)
class DPRoundEvent:
    """One round as the accountant sees it (what its ledger record says)."""

    noise_multiplier: float
    sampling_rate: float

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, float]) -> DPRoundEvent | None:
        if "dp_noise_multiplier" not in metrics:
            return None
        return cls(float(metrics["dp_noise_multiplier"]), float(metrics["dp_sampling_rate"]))


def epsilon(events: Sequence[DPRoundEvent], delta: float, *, amplified: bool = True) -> float:
    """Epsilon at ``delta`` after ``events`` (RDP accountant of ``dp-accounting``).

    ``amplified=False`` ignores the sampling (what the same noise costs without it)."""
    if not events:
        return 0.0
    import dp_accounting

    accountant = dp_accounting.rdp.RdpAccountant(list(RDP_ORDERS))
    # composition is commutative: equal rounds compose as one event with a count
    for event, count in sorted(Counter(events).items(), key=lambda item: astuple(item[0])):
        dp_event = dp_accounting.GaussianDpEvent(event.noise_multiplier)
        if amplified and event.sampling_rate < 1:
            dp_event = dp_accounting.PoissonSampledDpEvent(event.sampling_rate, dp_event)
        accountant.compose(dp_event, count)
    return float(accountant.get_epsilon(delta))
