"""Data-parallel strategies with one interface: `jit` over a device mesh (default) and `pmap`.

Both give the same numbers as one device (see `step.py`: global token sums, dropout masks keyed
by global row), up to float summation order:

    strategy = make_strategy("jit")                 # or "pmap"
    state = strategy.replicate(state)               # TrainState, same on every device
    frozen = strategy.put_frozen(frozen)            # replicated (or FSDP-sharded under jit)
    step = strategy.compile_train_step(train_step)  # state buffers are donated
    state, metrics = step(state, frozen, strategy.shard_batch(host_batch))
    host_state = strategy.unreplicate(state)        # numpy tree, e.g. for checkpoints

`shard_batch` takes this *process's* rows of the global batch (numpy, leading dim divisible by
the number of local devices); with several processes the global batch is their concatenation
in process order. Call `init_distributed()` first on multi-host jobs.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from compacter_jax.host import to_host

AXIS = "data"


DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"${name}={value!r} is not an integer") from None


def init_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, *, auto_detect: bool = False,
                     initialization_timeout: int = 300) -> bool:
    """Joins a multi-process JAX run when asked to; returns True if running distributed.

    Each setting comes from its argument, else from `$JAX_COORDINATOR_ADDRESS`,
    `$JAX_NUM_PROCESSES`, `$JAX_PROCESS_ID`. With none of them set and `auto_detect=False`
    this is a no-op, so the same entry point runs on one machine. `auto_detect=True` lets
    `jax.distributed.initialize` fill in what is unset from the cluster (Cloud TPU pod slices,
    SLURM, Open MPI, Kubernetes). On CPU, cross-process collectives use gloo (JAX's default).
    Must be called before any other JAX call.

    Args:
      coordinator_address: "host:port" of process 0 (reachable from every process).
      num_processes: number of processes (hosts) in the run.
      process_id: this process's index, 0..num_processes-1.
      auto_detect: let JAX detect the cluster when settings are missing.
      initialization_timeout: seconds to wait for every process to join.
    Returns:
      True when `jax.distributed` is initialised (now or before), False for a single process.
    Raises:
      ValueError naming the setting when settings are incomplete or out of range.
    """
    if jax.distributed.is_initialized():
        return True
    coordinator_address = coordinator_address or os.environ.get(DISTRIBUTED_ENV[0]) or None
    num_processes = num_processes if num_processes is not None else _env_int(DISTRIBUTED_ENV[1])
    process_id = process_id if process_id is not None else _env_int(DISTRIBUTED_ENV[2])
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
             "process_id": process_id}
    if not auto_detect and all(v is None for v in given.values()):
        return False
    if not auto_detect and any(v is None for v in given.values()):
        missing = [k for k, v in given.items() if v is None]
        raise ValueError(
            f"multi-process run: {', '.join(missing)} not set (set all three of "
            "--config.coordinator_address, --config.num_processes, --config.process_id, or "
            f"${', $'.join(DISTRIBUTED_ENV)}; or --config.detect_cluster=True on TPU pods, "
            "SLURM or Open MPI)")
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if process_id is not None and num_processes is not None and not (
            0 <= process_id < num_processes):
        raise ValueError(f"process_id {process_id} is not in 0..{num_processes - 1}")
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               initialization_timeout=initialization_timeout)
    return True


def _put(x: Any, shape: tuple[int, ...], sharding: NamedSharding,
         data: Callable[[np.ndarray, Any], np.ndarray]) -> jax.Array:
    host = to_host(x)
    return jax.make_array_from_callback(shape, sharding, lambda idx: data(host, idx))


class Strategy:
    """Common interface; see the module docstring. `num_devices` counts global devices."""

    name: str
    mesh: Mesh

    @property
    def num_devices(self) -> int:
        return self.mesh.devices.size

    @property
    def num_local_devices(self) -> int:
        return sum(d.process_index == jax.process_index() for d in self.mesh.devices.flat)

    def _check_batch(self, batch: Mapping[str, Any]) -> None:
        local = self.num_local_devices
        for key, value in batch.items():
            rows = np.shape(value)[0] if np.ndim(value) else 0
            if rows == 0 or rows % local:
                raise ValueError(
                    f"batch[{key!r}] has {rows} rows on this process, not a positive multiple "
                    f"of its {local} devices; make the per-process batch size divisible by "
                    f"{local}")

    def shard_batch(self, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
        """This process's rows `{key: [B_local, ...]}` -> global device arrays (jit:
        `[B_global, ...]` sharded on rows; pmap: `[n_devices, B_global / n_devices, ...]`)."""
        raise NotImplementedError

    def replicate(self, tree: Any) -> Any:
        """A host (or single-device) tree -> the same values on every device."""
        raise NotImplementedError

    def put_frozen(self, tree: Any) -> Any:
        """Places the frozen backbone (replicated unless the strategy shards it)."""
        return self.replicate(tree)

    def unreplicate(self, tree: Any) -> Any:
        """A replicated device tree (state, metrics) -> numpy copies of one replica."""
        raise NotImplementedError

    def one_copy(self, tree: Any) -> Any:
        """A device tree in this strategy's layout -> one usable by single-program code such as
        greedy decoding (no host copy). jit: the arrays as they are (replicated or sharded);
        pmap: the first replica, on its device."""
        return tree

    def compile_train_step(self, train_step: Callable, donate: bool = True) -> Callable:
        """`train_step(state, frozen, batch, axis_name=None)` -> compiled
        `(state, frozen, batch) -> (state, metrics)`; the input state is donated."""
        raise NotImplementedError

    def compile_eval_step(self, eval_step: Callable) -> Callable:
        """`eval_step(params, frozen, batch, axis_name=None)` -> compiled, global sums."""
        raise NotImplementedError


class JitStrategy(Strategy):
    """`jax.jit` over a 1-D mesh ("data"): batch rows sharded, state replicated; XLA inserts
    the gradient all-reduce. `shard_frozen=True` shards each large frozen leaf over "data"
    on its largest divisible dimension (FSDP-style, for backbones that don't fit per device);
    XLA all-gathers them where used."""

    name = "jit"

    def __init__(self, devices: Sequence[jax.Device] | None = None, shard_frozen: bool = False,
                 min_shard_elements: int = 2**16):
        devices = list(devices) if devices is not None else jax.devices()
        self.mesh = jax.make_mesh((len(devices),), (AXIS,), axis_types=(AxisType.Auto,),
                                  devices=devices)
        self.shard_frozen = shard_frozen
        self.min_shard_elements = min_shard_elements
        self.replicated = NamedSharding(self.mesh, P())
        self.rows = NamedSharding(self.mesh, P(AXIS))

    def shard_batch(self, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
        self._check_batch(batch)
        return {k: jax.make_array_from_process_local_data(self.rows, np.asarray(v))
                for k, v in batch.items()}

    def replicate(self, tree: Any) -> Any:
        return jax.tree_util.tree_map(
            lambda x: _put(x, np.shape(x), self.replicated, lambda h, idx: h[idx]), tree)

    def _frozen_sharding(self, shape: tuple[int, ...]) -> NamedSharding:
        n = self.num_devices
        if n == 1 or int(np.prod(shape)) < self.min_shard_elements:
            return self.replicated
        dims = [d for d in np.argsort(shape)[::-1] if shape[d] % n == 0]
        if not dims:
            return self.replicated
        spec = [None] * len(shape)
        spec[int(dims[0])] = AXIS
        return NamedSharding(self.mesh, P(*spec))

    def put_frozen(self, tree: Any) -> Any:
        if not self.shard_frozen:
            return self.replicate(tree)
        return jax.tree_util.tree_map(
            lambda x: _put(x, np.shape(x), self._frozen_sharding(np.shape(x)),
                           lambda h, idx: h[idx]), tree)

    def unreplicate(self, tree: Any) -> Any:
        return to_host(tree)

    def compile_train_step(self, train_step: Callable, donate: bool = True) -> Callable:
        return jax.jit(train_step, donate_argnums=(0,) if donate else (),
                       out_shardings=(self.replicated, self.replicated))

    def compile_eval_step(self, eval_step: Callable) -> Callable:
        return jax.jit(eval_step, out_shardings=self.replicated)


class PmapStrategy(Strategy):
    """`jax.pmap` over all devices with axis "data": every leaf carries a leading device axis;
    the steps reduce token sums and gradients with `psum` (pass `axis_name`)."""

    name = "pmap"

    def __init__(self, devices: Sequence[jax.Device] | None = None):
        self.devices = list(devices) if devices is not None else jax.devices()
        self.mesh = Mesh(np.array(self.devices), (AXIS,), axis_types=(AxisType.Auto,))
        self.stacked = NamedSharding(self.mesh, P(AXIS))

    def shard_batch(self, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
        self._check_batch(batch)
        local = self.num_local_devices
        out = {}
        for k, v in batch.items():
            v = np.asarray(v)
            v = v.reshape((local, v.shape[0] // local) + v.shape[1:])
            out[k] = jax.make_array_from_process_local_data(self.stacked, v)
        return out

    def replicate(self, tree: Any) -> Any:
        n = self.num_devices
        return jax.tree_util.tree_map(
            lambda x: _put(x, (n,) + np.shape(x), self.stacked, lambda h, idx: h[None]), tree)

    def unreplicate(self, tree: Any) -> Any:
        # Host values beside the device ones (e.g. a batch's token fill added to the step's
        # metrics) were never replicated: they are returned as numpy as they are.
        return jax.tree_util.tree_map(
            lambda x: (np.array(np.asarray(x.addressable_data(0))[0]) if isinstance(x, jax.Array)
                       else np.asarray(x)), tree)

    def one_copy(self, tree: Any) -> Any:
        return jax.tree_util.tree_map(lambda x: x.addressable_data(0)[0], tree)

    def compile_train_step(self, train_step: Callable, donate: bool = True) -> Callable:
        return jax.pmap(functools.partial(train_step, axis_name=AXIS), axis_name=AXIS,
                        devices=self.devices, donate_argnums=(0,) if donate else ())

    def compile_eval_step(self, eval_step: Callable) -> Callable:
        return jax.pmap(functools.partial(eval_step, axis_name=AXIS), axis_name=AXIS,
                        devices=self.devices)


def make_strategy(name: str = "jit", devices: Sequence[jax.Device] | None = None,
                  shard_frozen: bool = False, min_shard_elements: int = 2**16) -> Strategy:
    """"jit" (recommended; pmap is in maintenance mode) or "pmap" over `devices` (default
    all). `shard_frozen` (jit only) shards frozen leaves of >= `min_shard_elements`.

    jit, pmap and one device give the same losses and updates (up to float summation order)
    with `make_train_step`'s dropout keys: the masks of `flax.linen.Dropout` are keyed by global
    row. They differ under pmap only for a model whose dropout is not linen's (an NNX module, a
    hand-drawn mask) trained without `per_example_dropout=True`: each device then draws its
    shard's masks from the step's one key.
    """
    if name == "jit":
        return JitStrategy(devices, shard_frozen=shard_frozen,
                           min_shard_elements=min_shard_elements)
    if name == "pmap":
        if shard_frozen:
            raise ValueError("shard_frozen needs strategy 'jit'; pmap replicates every leaf")
        return PmapStrategy(devices)
    raise ValueError(f"unknown parallel strategy {name!r}; use 'jit' or 'pmap'")
