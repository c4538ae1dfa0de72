"""Synchronous rounds (FedAvg and its robust variants): every update is trained from the
open round's model and counts in it; the round closes when every live device reported, or
at its deadline with a quorum."""

from __future__ import annotations

from ._protocol import RoundProtocol, register_protocol


@register_protocol
class SynchronousRounds(RoundProtocol):
    name = "synchronous"
