"""MQTT topic layout, in one place.

Every topic starts with ``fedledger/v1/<task>``; the ``v1`` segment changes only with a
breaking wire version, so old and new fleets never read each other's messages.
"""

from __future__ import annotations

import re

PREFIX = "fedledger/v1"

#: Device and task identifiers: safe in topics, file names and SQL without quoting.
IDENTIFIER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def model_topic(task: str) -> str:
    """Retained: the current global model of ``task``, published by the gateway."""
    return f"{PREFIX}/{task}/model"


def update_topic(task: str, device: str) -> str:
    """Where ``device`` publishes its updates (QoS 1)."""
    return f"{PREFIX}/{task}/update/{device}"


def update_subscription(task: str) -> str:
    return f"{PREFIX}/{task}/update/+"


def presence_topic(task: str, device: str) -> str:
    """Retained ``online``/``offline``; ``offline`` is also the device's last will."""
    return f"{PREFIX}/{task}/presence/{device}"


def presence_subscription(task: str) -> str:
    return f"{PREFIX}/{task}/presence/+"


def secagg_topic(task: str, device: str) -> str:
    """Where ``device`` publishes its secure aggregation messages (keys, shares, reveals)."""
    return f"{PREFIX}/{task}/secagg/{device}"


def secagg_subscription(task: str) -> str:
    return f"{PREFIX}/{task}/secagg/+"


def stage_topic(task: str) -> str:
    """Retained: the gateway's current secure aggregation message to every device."""
    return f"{PREFIX}/{task}/stage"


def inbox_topic(task: str, device: str) -> str:
    """Retained: the gateway's secure aggregation message to ``device`` alone (its shares)."""
    return f"{PREFIX}/{task}/inbox/{device}"


def device_from_topic(topic: str, task: str) -> str | None:
    """The device id in an update, presence or secagg topic of ``task``, or None if it is
    not one."""
    for kind in ("update", "presence", "secagg"):
        head = f"{PREFIX}/{task}/{kind}/"
        if topic.startswith(head):
            device = topic[len(head) :]
            return device if IDENTIFIER.fullmatch(device) else None
    return None
