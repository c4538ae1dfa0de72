"""The next global model from a round's aggregate: ``base + delta`` (FedAvg), or an adaptive
server step whose state is kept in the store, so a restart resumes it."""

from __future__ import annotations

import numpy as np

from fedcore import Params, TaskSpec, decode_tensors, encode_tensors

from ._store import UpdateStore
from ._strategies import ServerOptimizerState, server_step


def next_global_model(
    task: TaskSpec, store: UpdateStore, round_: int, base: Params, delta: Params
) -> tuple[Params, bytes | None]:
    """The new model, and the optimizer state after ``round_`` to store with it (``None``
    for plain FedAvg)."""
    kind, lr = task.server_optimizer, task.server_lr
    if kind == "sgd" and lr in (None, 1.0):
        return {k: (base[k] + delta[k]).astype(np.float32) for k in base}, None
    state = None
    stored = store.optimizer_state(task.id)
    if stored is not None and stored[0] < round_:
        tensors = decode_tensors(stored[1])
        state = ServerOptimizerState(
            m={k: tensors[f"m.{k}"] for k in base},
            v={k: tensors[f"v.{k}"] for k in base},
            rounds=stored[0] + 1,
        )
    params, state = server_step(
        kind, base, delta, state, lr=lr if lr is not None else (1.0 if kind == "sgd" else 0.1)
    )
    tensors = {f"m.{k}": v for k, v in state.m.items()} | {f"v.{k}": v for k, v in state.v.items()}
    return params, encode_tensors(tensors, "f32")
