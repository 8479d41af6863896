"""What a run needs to be one job over several processes (hosts): one decision for all, and
evaluation split over the processes and gathered.

With one process every function here is the plain single-process behaviour, without any
collective. With several (`jax.distributed` initialised, see
`compacter_jax.train.init_distributed`), all processes must call these together.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from experiments.evaluation import Evaluator


def is_primary() -> bool:
    """True on process 0, the one that writes the run's files."""
    return jax.process_index() == 0


def agree(ok: bool) -> bool:
    """Process 0's `ok`, on every process (so that all stop, or none, after a check only
    process 0 made, e.g. the workdir lock)."""
    if jax.process_count() == 1:
        return ok
    return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))


def gather_rows(rows: dict[int, Any]) -> dict[int, Any]:
    """The union over processes of each process's `{row: JSON-able value}`."""
    if jax.process_count() == 1:
        return dict(rows)
    payload = np.frombuffer(json.dumps(sorted(rows.items())).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.int32(payload.size))
    padded = np.zeros(int(np.max(sizes)), np.uint8)
    padded[:payload.size] = payload
    gathered = multihost_utils.process_allgather(padded)  # [processes, max size]
    out: dict[int, Any] = {}
    for size, data in zip(np.asarray(sizes).reshape(-1), np.asarray(gathered)):
        out.update({int(k): v for k, v in json.loads(bytes(data[:int(size)]).decode())})
    return out


@dataclasses.dataclass
class HostShardedEvaluator(Evaluator):
    """An `Evaluator` whose decoding is split over the processes: process p decodes the
    length-bucketed batches p, p + P, p + 2P, ... of a split; the texts are gathered so every
    process computes the same metrics of the whole split; process 0 writes the predictions.

    The parameters passed to `evaluate` must live on this process's devices (e.g. a host or
    `jax.local_devices()[0]` copy): each process runs its own decoding programs, of its own
    batch shapes, so they cannot be one multi-process computation.
    """

    def _batches(self, split: str):
        index, count = jax.process_index(), jax.process_count()
        for i, batch in enumerate(super()._batches(split)):
            if i % count == index:
                yield batch

    def _own_rows(self, split: str) -> list[int]:
        return [int(r) for batch in self._batches(split) for r in batch["example_index"]
                if r >= 0]

    def _gathered(self, texts: list[str], split: str) -> list[str]:
        rows = gather_rows({r: texts[r] for r in self._own_rows(split)})
        missing = set(range(len(texts))) - set(rows)
        if missing:
            raise RuntimeError(f"evaluation of {split}: rows {sorted(missing)[:5]} were "
                               "decoded by no process")
        return [rows[r] for r in range(len(texts))]

    def generate(self, params: Any, split: str) -> list[str]:
        return self._gathered(super().generate(params, split), split)

    def rank(self, params: Any, split: str) -> list[str]:
        return self._gathered(super().rank(params, split), split)

    def write_predictions(self, name: str, texts: list[str], split: str | None = None):
        return super().write_predictions(name, texts, split) if is_primary() else None
