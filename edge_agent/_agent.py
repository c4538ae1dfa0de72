"""The edge agent: waits for a signed global model, trains on local data, sends a signed
int8 update. It imports only ``fedcore``: what a device installs stays small."""

from __future__ import annotations

import base64
import ctypes
import hashlib
import json
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from threadpoolctl import threadpool_limits

from fedcore import (
    ALG_ECDSA_P256,
    ALG_ED25519,
    DEFAULT_K_FRACTION,
    MASKED_CODEC,
    TYPE_MODEL,
    TYPE_STAGE,
    DeviceClass,
    FedledgerError,
    Message,
    ModelHeader,
    SecAggError,
    SignatureError,
    Signer,
    StageHeader,
    TaskSpec,
    Transport,
    UpdateHeader,
    WireError,
    check_task_fits,
    clip_update,
    crash_point,
    decode_envelope,
    decode_tensors,
    encode_tensors,
    encode_update,
    inbox_topic,
    model_topic,
    secagg_topic,
    stage_topic,
    topk_with_feedback,
    train,
    update_topic,
    verify_signature,
)

if TYPE_CHECKING:
    from ._metrics import AgentMetrics
    from ._secagg import DeviceRound

log = logging.getLogger(__name__)


def _load_malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc
    except (AttributeError, OSError):
        return None  # musl, macOS: nothing to call


_malloc_trim = _load_malloc_trim()


def release_free_memory() -> None:
    """Give the C heap's free pages back to the system.

    Start-up (imports, config validation) and each round (training, encoding) free more
    memory than the agent keeps; glibc holds on to it, so a device would pay for the busiest
    moment while it waits for the next model, which is most of its life.
    """
    if _malloc_trim is not None:
        _malloc_trim(0)


class AgentError(FedledgerError):
    """The agent cannot go on (state file, task mismatch)."""


@dataclass
class AgentState:
    """Persisted across restarts: a counter is never reused, a round never trained twice,
    and an update is never lost to a crash between training and the broker's receipt.

    ``pending`` is the last signed update frame, kept until the gateway publishes a model of
    a later round (which it does only once that update's round has closed). While the model
    of ``last_round`` is the one published, a restart or a re-published model sends the same
    frame again; the gateway recognises the copy and counts it once.

    ``run`` is the gateway's run of the task the rounds belong to: a model of another run (a
    task id reused with a fresh gateway store) starts the rounds over, counters going on."""

    counter: int = -1
    last_round: int = -1
    pending: bytes | None = None
    run: str | None = None

    @classmethod
    def load(cls, path: Path | None) -> AgentState:
        if path is None or not path.exists():
            return cls()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            pending = data.get("pending")
            run = data.get("run")
            return cls(
                counter=int(data["counter"]),
                last_round=int(data["last_round"]),
                pending=None if pending is None else base64.b64decode(pending, validate=True),
                run=None if run is None else str(run),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise AgentError(f"{path}: unreadable agent state: {exc}") from None

    def save(self, path: Path | None) -> None:
        """Write to a temporary file, fsync, rename: a crash leaves the old or the new."""
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        data: dict[str, object] = {"counter": self.counter, "last_round": self.last_round}
        if self.pending is not None:
            data["pending"] = base64.b64encode(self.pending).decode("ascii")
        if self.run is not None:
            data["run"] = self.run
        tmp = path.with_suffix(path.suffix + ".tmp")
        with tmp.open("w", encoding="utf-8") as handle:
            json.dump(data, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)


class EdgeAgent:
    def __init__(
        self,
        *,
        device: str,
        task: TaskSpec,
        transport: Transport,
        signer: Signer,
        gateway_key: Ed25519PublicKey,
        data: tuple[np.ndarray, np.ndarray],
        state_path: Path | None = None,
        seed: int = 0,
        metrics: AgentMetrics | None = None,
        device_class: DeviceClass | None = None,
        certificate: bytes | None = None,
        seal_to: X25519PublicKey | None = None,
        resend_seconds: float = 30.0,
        clock=time.monotonic,
    ):
        """``certificate`` (DER) means ``signer`` signs with that certificate's key (ECDSA
        P-256) and every update carries it; ``seal_to`` encrypts update payloads to the
        gateway's X25519 key.

        ``device_class`` (from ``firmware_configs/``) sets the update codec, local epochs
        and batch size for this board and is checked against the task: a task whose model
        does not fit the board is refused here, before anything is downloaded or trained."""
        if device_class is not None:
            check_task_fits(device_class, task)
        self.device_class = device_class
        self.device = device
        self.task = task
        self.spec = task.model_spec()
        self.transport = transport
        self.x, self.y = data
        if self.x.shape[1] != self.spec.n_features:
            raise AgentError(
                f"local data has {self.x.shape[1]} features, the task's model expects "
                f"{self.spec.n_features}"
            )
        bad = np.flatnonzero((self.y < 0) | (self.y >= self.spec.n_classes))
        if len(bad):
            raise AgentError(
                f"local data row {int(bad[0])} has label {int(self.y[bad[0]])}, outside the"
                f" task's {self.spec.n_classes} classes"
            )
        self._signer = signer
        self._certificate = certificate
        self._seal_to = seal_to
        self._gateway_key = gateway_key
        self._state_path = state_path
        self._seed = seed
        self.state = AgentState.load(state_path)
        self.final_model: str | None = None
        self.rounds_trained = 0
        #: Updates sent again because their round was still open (see :class:`AgentState`).
        self.resends = 0
        #: Rounds this device was not sampled for (a DP task's Poisson sampling).
        self.rounds_skipped = 0
        self._skipped = -1
        #: The run of a retained final model this device took no part in (logged once).
        self._foreign_final: str | None = None
        self.bytes_sent = 0
        self.metrics = metrics
        if metrics is not None:
            metrics.bind(self)
        t = task.training
        self.codec = task.codec if device_class is None else device_class.codec
        self.epochs = t.epochs if device_class is None else device_class.local_epochs
        self.batch_size = t.batch_size if device_class is None else device_class.batch_size
        self.k_fraction = DEFAULT_K_FRACTION
        if device_class is not None and device_class.topk_fraction is not None:
            self.k_fraction = device_class.topk_fraction
        self.resend_seconds = resend_seconds
        self._clock = clock
        #: The newest round whose model this agent has seen, and when it last sent an update.
        self._seen_round = -1
        self._sent_at = 0.0
        #: What top-k left out of earlier updates, added back next round (error feedback).
        self.residual: dict[str, np.ndarray] | None = None
        #: A secure aggregation task's open round on this device (its secrets: memory only).
        self.secagg: DeviceRound | None = None

    def start(self) -> None:
        self.transport.subscribe(model_topic(self.task.id), 1)
        if self.task.secagg is not None:
            self.transport.subscribe(stage_topic(self.task.id), 1)
            self.transport.subscribe(inbox_topic(self.task.id, self.device), 1)
        self.transport.start()
        release_free_memory()

    def run(self, stop: threading.Event | None = None, *, exit_on_final: bool = True) -> None:
        while not (stop is not None and stop.is_set()):
            if exit_on_final and self.final_model is not None:
                return
            self.step(0.2)

    def step(self, timeout: float) -> None:
        """Handle what is queued, training once, on the newest model among it.

        With asynchronous rounds the gateway publishes new versions while the device trains;
        working through each in turn would only send updates staler than they need be.
        """
        try:
            message = self.transport.messages.get(timeout=timeout)
        except queue.Empty:
            self._maybe_resend()
            return
        newest = None
        stages = []
        while True:
            if message.topic != model_topic(self.task.id):
                stages.append(message)  # after the model they may belong to
            opened = self._open_model(message)
            if opened is not None and (newest is None or opened[0].round > newest[0].round):
                newest = opened
            try:
                message = self.transport.messages.get_nowait()
            except queue.Empty:
                break
        if newest is not None and self.final_model is None:
            self._train_and_send(newest[0], decode_tensors(newest[1]))
        for message in stages:
            self._on_stage(message)

    def handle(self, message: Message) -> None:
        opened = self._open_model(message)
        if opened is not None:
            self._train_and_send(opened[0], decode_tensors(opened[1]))
        elif message.topic != model_topic(self.task.id):
            self._on_stage(message)

    def _open_model(self, message: Message) -> tuple[ModelHeader, bytes] | None:
        """A verified global model to train on (header and payload), or ``None``: not a model,
        not ours, already trained on, or the final model (recorded)."""
        if message.topic != model_topic(self.task.id):
            return None
        envelope = self._from_gateway(message, TYPE_MODEL, "global model", 64 << 20)
        if envelope is None:
            return None
        header = envelope.header
        assert isinstance(header, ModelHeader)
        if header.task != self.task.id:
            return None
        if header.status == "final":
            if header.run is not None and header.run != self.state.run:
                # A retained final model of another run of this task id: a new gateway
                # will publish its first round; quitting now would stall it.
                if header.run != self._foreign_final:
                    self._foreign_final = header.run
                    log.info(
                        "task %s: the broker holds the final model of run %s, which this"
                        " device took no part in; waiting for the gateway's next model",
                        self.task.id, header.run,
                    )  # fmt: skip
                return None
            self.final_model = header.model_hash
            log.info("task %s finished; final model %s", self.task.id, header.model_hash[:12])
            return None
        if header.run is not None and header.run != self.state.run:
            self._join_run(header.run)
        self._seen_round = max(self._seen_round, header.round)
        if header.round == self.state.last_round and self.state.pending is not None:
            self._resend(header.round)
            return None
        if header.round <= self.state.last_round:
            return None  # already trained on this round (a retained or re-published model)
        if header.sampled is not None and self.device not in header.sampled:
            if header.round != self._skipped:
                self._skipped = header.round
                self.rounds_skipped += 1
                log.info("round %d: not sampled; waiting for the next round", header.round)
            return None
        return header, envelope.payload

    def _from_gateway(self, message: Message, kind: int, what: str, limit: int):
        """The envelope of a ``kind`` message the gateway signed, or None (logged)."""
        try:
            envelope = decode_envelope(message.payload, max_bytes=limit)
            if envelope.type != kind:
                raise WireError("wrong_type", f"not a {what} message")
            verify_signature(self._gateway_key, envelope.signature, envelope.signed)
        except (WireError, SignatureError) as exc:
            log.warning("ignored a %s message: %s", what, exc)
            return None
        return envelope

    def _join_run(self, run: str) -> None:
        """A model of ``run``: record it; a run other than the one the state's rounds belong
        to starts the rounds over (its round 0 is not the old run's round 0). Counters go on,
        so no signed counter is ever reused."""
        if self.state.run is not None:
            log.info(
                "task %s: a new run %s (this device's rounds were run %s); starting over",
                self.task.id, run, self.state.run,
            )  # fmt: skip
            self.state.last_round = -1
            self.state.pending = None
        self.state.run = run
        self.state.save(self._state_path)

    def _maybe_resend(self) -> None:
        """Resend the pending update every ``resend_seconds`` while its round is the newest
        one seen (the gateway waits on it, or on others)."""
        if (
            self.state.pending is not None
            and self.final_model is None
            and self._seen_round == self.state.last_round
            and self._clock() - self._sent_at >= self.resend_seconds
        ):
            self._resend(self.state.last_round)

    def _resend(self, round_: int) -> None:
        """The gateway still publishes the model of the round this agent's last update was
        for: it may never have got that update (the agent died before the broker took it),
        so send the same frame again; a copy of one it has is dropped, not counted."""
        frame = self.state.pending
        assert frame is not None
        self.transport.publish(update_topic(self.task.id, self.device), frame, qos=1)
        self.resends += 1
        self._sent_at = self._clock()
        self.bytes_sent += len(frame)
        log.info("round %d: re-sent the %d-byte update (round still open)", round_, len(frame))

    def _train_and_send(self, header: ModelHeader, global_params) -> None:
        seed = int.from_bytes(
            hashlib.sha256(f"{self._seed}/{self.device}/{header.round}".encode()).digest()[:8],
            "big",
        )
        started = time.perf_counter()
        # Small-batch SGD is several times faster on one BLAS thread than on many fighting
        # over a Pi's cores (measured by `fedledger bench agent`).
        with threadpool_limits(limits=1, user_api="blas"):
            local = train(
                self.spec, global_params, self.x, self.y,
                epochs=self.epochs, batch_size=self.batch_size, lr=self.task.training.lr,
                seed=seed, prox_mu=self.task.training.prox_mu, qat=self.task.training.qat,
            )  # fmt: skip
        if self.metrics is not None:
            self.metrics.training.observe(time.perf_counter() - started)
        delta = {k: local[k] - global_params[k] for k in global_params}
        if self.task.secagg is not None:
            self._secagg_keys(header, delta)
            return
        if self.codec.startswith("topk"):
            delta, self.residual = topk_with_feedback(
                delta, self.residual, self.k_fraction, codec=self.codec
            )
        if self.task.dp is not None:
            # DP-FedAvg: the update is bounded here, where the data is (the gateway clips
            # again, since it cannot take a device's word for it)
            delta, norm = clip_update(delta, self.task.dp.clip)
            log.debug("round %d: update norm %.4g, clipped to %.4g", header.round, norm,
                      self.task.dp.clip)  # fmt: skip
        payload = encode_tensors(delta, self.codec, k_fraction=self.k_fraction)
        self.state.counter += 1
        frame = encode_update(
            UpdateHeader(
                task=self.task.id,
                round=header.round,
                device=self.device,
                base=header.model_hash,
                samples=len(self.y),
                codec=self.codec,
                counter=self.state.counter,
                alg=ALG_ED25519 if self._certificate is None else ALG_ECDSA_P256,
                cert=base64.b64encode(self._certificate or b"").decode("ascii"),
            ),
            payload,
            self._signer,
            seal_to=self._seal_to,
        )
        self.state.last_round = header.round
        self.state.pending = frame
        # Persist before sending: a crash after this never reuses the counter, and the frame
        # is sent again at the next start while its round is still open.
        self.state.save(self._state_path)
        crash_point("agent.after-save")
        self.transport.publish(update_topic(self.task.id, self.device), frame, qos=1)
        self._sent_at = self._clock()
        self.rounds_trained += 1
        self.bytes_sent += len(frame)
        log.info("round %d: sent %d-byte update", header.round, len(frame))
        del local, delta, payload, frame  # the round's arrays: their pages can go back now
        release_free_memory()

    # ------------------------------------------------------------ secure aggregation
    def _secagg_keys(self, header: ModelHeader, delta: dict[str, np.ndarray]) -> None:
        """Secure aggregation: clip and quantize the update, keep it for masking, and send
        this round's public keys. Nothing of the round is persisted but its counters: a
        restart drops the device out of the round (its secrets are gone)."""
        from fedcore.secagg import quantize

        from ._secagg import DeviceRound

        delta, norm = clip_update(delta, self.task.secagg_clip)
        log.debug("round %d: update norm %.4g, clipped to %.4g", header.round, norm,
                  self.task.secagg_clip)  # fmt: skip
        shapes = self.spec.shapes()
        flat = np.concatenate([np.asarray(delta[name], np.float64).reshape(-1) for name in shapes])
        label = f"{self._seed}/{self.device}/{header.round}/quantize".encode()
        rng = np.random.default_rng(int.from_bytes(hashlib.sha256(label).digest()[:8], "big"))
        self.secagg = DeviceRound(
            task=self.task.id, round_=header.round, base=header.model_hash, device=self.device,
            shapes=shapes, quantized=quantize(flat, self.task.secagg_range, rng),
        )  # fmt: skip
        self.state.last_round = header.round
        self.state.pending = None
        self._send_stage("secagg-keys", self.secagg.keys_payload())
        self.rounds_trained += 1
        log.info("round %d: trained; sent secure aggregation keys", header.round)

    def _send_stage(self, codec: str, payload: bytes) -> bytes:
        """Sign and send one secure aggregation message (the masked input goes to the update
        topic, and stays pending like any update; the others to this device's secagg topic)."""
        session = self.secagg
        assert session is not None
        self.state.counter += 1
        frame = encode_update(
            UpdateHeader(
                task=self.task.id, round=session.round, device=self.device, base=session.base,
                samples=len(self.y), codec=codec, counter=self.state.counter,
                alg=ALG_ED25519 if self._certificate is None else ALG_ECDSA_P256,
                cert=base64.b64encode(self._certificate or b"").decode("ascii"),
            ),
            payload,
            self._signer,
            seal_to=self._seal_to,
        )  # fmt: skip
        masked = codec == MASKED_CODEC
        if masked:
            self.state.pending = frame
        self.state.save(self._state_path)  # before sending: a counter is never reused
        topic = (update_topic if masked else secagg_topic)(self.task.id, self.device)
        self.transport.publish(topic, frame, qos=1)
        self.bytes_sent += len(frame)
        if masked:
            self._sent_at = self._clock()
        return frame

    def _on_stage(self, message: Message) -> None:
        """A signed message of the gateway's secure aggregation stages."""
        from ._secagg import SecAggAbort

        session = self.secagg
        if session is None or message.topic not in (
            stage_topic(self.task.id),
            inbox_topic(self.task.id, self.device),
        ):
            return
        envelope = self._from_gateway(message, TYPE_STAGE, "secure aggregation", 16 << 20)
        if envelope is None:
            return
        header = envelope.header
        assert isinstance(header, StageHeader)
        if not session.matches(header) or header.to not in ("", self.device):
            return  # another round's (a retained message), or not to this device
        handlers = {
            "roster": (session.on_roster, "secagg-shares"),
            "relay": (session.on_relay, MASKED_CODEC),
            "unmask": (session.on_unmask, "secagg-reveal"),
        }
        handler, codec = handlers[header.stage]
        try:
            payload = handler(json.loads(envelope.payload))
        except (SecAggAbort, SecAggError, ValueError, TypeError, KeyError) as exc:
            log.warning("round %d: left secure aggregation: %s", session.round, exc)
            self.secagg = None
            return
        if payload is None:
            return
        frame = self._send_stage(codec, payload)
        log.info("round %d: answered the %s (%d bytes)", session.round, header.stage, len(frame))
        if header.stage == "unmask":
            self.secagg = None
        release_free_memory()
