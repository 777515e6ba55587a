"""Device mesh, state and batch shardings for training and batched inference.

One mesh with two axes: ``data`` (batch parallelism) and ``fsdp`` (batch parallelism *and* weights
split across devices). Batches are split over both axes; every state array is replicated unless the
``fsdp`` axis has more than one device, in which case its largest dimension divisible by that axis
is split over it (frozen backbone, trainable weights and optimiser moments alike). The same code
runs on one CPU, 8 fake CPU devices, a GPU node or a multi-host TPU pod: in a multi-process run
every process passes only its own rows of the batch (``global_batch_from_local``).

Host values across processes (``gather_rows``, ``local_rows``, ``allgather_json``,
``broadcast_json``, ``broadcast_arrays``, ``sync``) are what multi-host evaluation and prediction
exchange besides the jitted forward's arrays.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA = "data"
FSDP = "fsdp"
# Batches are split over every device: data-parallel groups times the fsdp group.
BATCH_AXES = (DATA, FSDP)
# Arrays smaller than this stay replicated under fsdp: splitting a bias saves nothing and costs a
# collective per use.
FSDP_MIN_SIZE = 2**14


def make_mesh(
    mesh_config: Mapping[str, int] | None = None, devices: Sequence[Any] | None = None
) -> Mesh:
    """The ``(data, fsdp)`` mesh from ``config.mesh`` (``data=-1``: every device left over by fsdp).

    ``devices`` defaults to ``jax.devices()`` (all processes); a single process asking for fewer
    (``data * fsdp`` < device count) gets the first ones. The axes are ``Auto`` so that method
    code runs unchanged under the mesh (the compiler propagates shardings from the inputs).
    """
    mesh_config = dict(mesh_config or {})
    devices = list(jax.devices() if devices is None else devices)
    fsdp = int(mesh_config.get(FSDP, 1))
    data = int(mesh_config.get(DATA, -1))
    if fsdp < 1 or len(devices) % fsdp:
        raise ValueError(
            f"config.mesh.fsdp={fsdp} must be a positive divisor of the device count {len(devices)}"
        )
    if data == -1:
        data = len(devices) // fsdp
    if 0 < data * fsdp < len(devices) and jax.process_count() == 1:
        devices = devices[: data * fsdp]  # a single process may train on the first devices only
    if data < 1 or data * fsdp != len(devices):
        raise ValueError(
            f"config.mesh: data={data} x fsdp={fsdp} must equal the device count {len(devices)} "
            "(use data=-1 to take every remaining device)"
        )
    return jax.make_mesh(
        (data, fsdp), (DATA, FSDP), axis_types=(AxisType.Auto,) * 2, devices=devices
    )


def batch_size_per_process(global_batch: int, mesh: Mesh) -> int:
    """Rows each process feeds per step; the global batch must split evenly over devices."""
    n_devices = mesh.devices.size
    if global_batch % n_devices:
        raise ValueError(
            f"config.data.batch_size={global_batch} must be a multiple of the number of devices "
            f"in the mesh ({n_devices}); change the batch size or config.mesh"
        )
    return global_batch // jax.process_count()


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device of the mesh."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def state_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
    """Replicated, or (fsdp > 1 and large enough) the largest dimension divisible by fsdp split."""
    n = mesh.shape[FSDP]
    if n == 1 or int(np.prod(shape, dtype=np.int64)) < FSDP_MIN_SIZE:
        return replicated(mesh)
    candidates = [(size, axis) for axis, size in enumerate(shape) if size % n == 0]
    if not candidates:
        return replicated(mesh)
    _, axis = max(candidates)
    spec = [None] * len(shape)
    spec[axis] = FSDP
    return NamedSharding(mesh, P(*spec))


def state_shardings(mesh: Mesh, tree: Any) -> Any:
    """The sharding rule applied to every array leaf of ``tree`` (arrays or ShapeDtypeStructs)."""
    return jax.tree.map(lambda x: state_sharding(mesh, np.shape(x)), tree)


def _put(x: Any, sharding: NamedSharding) -> jax.Array:
    if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
        impl = jax.random.key_impl(x)
        return jax.random.wrap_key_data(_put(jax.random.key_data(x), sharding), impl=impl)
    # Every process holds the full value (built from the same seed or read from the same file), so
    # each device takes its slice of the host copy; this works for one or many processes.
    host = np.asarray(x)
    return jax.make_array_from_process_local_data(sharding, host, host.shape)


def put_state(tree: Any, shardings: Any) -> Any:
    """Places a pytree whose full value every process holds according to ``shardings``."""
    return jax.tree.map(_put, tree, shardings)


def global_batch_from_local(
    local_batch: Mapping[str, np.ndarray], mesh: Mesh
) -> dict[str, jax.Array]:
    """This process's rows of the batch -> global arrays split over the mesh's batch axes.

    With P processes, process p passes rows ``[p*B/P, (p+1)*B/P)`` of the global batch of B.
    String fields (paths, category names) are left out.
    """
    sharding = batch_sharding(mesh)
    out = {}
    for name, value in local_batch.items():
        value = np.asarray(value)
        if value.dtype.kind in "OUS":
            continue  # file names and other host-side bookkeeping never reach the devices
        global_shape = (value.shape[0] * jax.process_count(), *value.shape[1:])
        out[name] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out


# ----------------------------------------------------------------------------------------------
# Host values across processes (evaluation and prediction). Each is one collective for every
# process: call them on all processes, in the same order. A single process gets its own values.


def gather_rows(tree: Any) -> Any:
    """Every process's rows of host arrays (the same shapes on each) -> the global rows.

    Rows come in process order, which is the order of ``global_batch_from_local`` (process p's
    rows are rows ``[p*B/P, (p+1)*B/P)`` of the result). One collective for the whole tree.
    """
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    from jax.experimental import multihost_utils

    # Collectives move numbers: booleans travel as uint8 and come back as booleans.
    tree = jax.tree.map(np.asarray, tree)
    sent = jax.tree.map(lambda x: x.astype(np.uint8) if x.dtype == bool else x, tree)
    gathered = multihost_utils.process_allgather(sent, tiled=False)  # (P, rows, ...)
    return jax.tree.map(
        lambda x, like: np.asarray(x).reshape(-1, *like.shape[1:]).astype(like.dtype),
        gathered,
        tree,
    )


def local_rows(tree: Any) -> Any:
    """This process's rows of batch-split global arrays: its own part of the batch it passed to
    ``global_batch_from_local``, read from its devices without any collective."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)

    def rows(x: jax.Array) -> np.ndarray:
        shards = {s.index[0].start or 0: s.data for s in x.addressable_shards if not s.replica_id}
        return np.concatenate([np.asarray(shards[start]) for start in sorted(shards)])

    return jax.tree.map(rows, tree)


def allgather_json(value: Any) -> list[Any]:
    """Every process's JSON-able ``value`` (NaN allowed), one list entry per process in order."""
    if jax.process_count() == 1:
        return [value]
    data = np.frombuffer(json.dumps(value, default=_json_default).encode(), np.uint8)
    sizes = gather_rows(np.asarray([data.size], np.int32))
    padded = np.zeros((1, max(1, int(sizes.max()))), np.uint8)  # equal shapes for the collective
    padded[0, : data.size] = data
    texts = gather_rows(padded)
    return [json.loads(texts[i, :size].tobytes()) for i, size in enumerate(sizes)]


def broadcast_json(value: Any) -> Any:
    """Process 0's JSON-able ``value`` on every process."""
    return allgather_json(value)[0]


def raise_together(failure: Exception | None, make: Callable[[str], Exception]) -> None:
    """Raises ``failure``, or (as ``make(message)``) another process's, on every process: one that
    stopped alone would leave the others waiting in the next collective until its timeout."""
    if jax.process_count() > 1:
        found = [m for m in allgather_json(None if failure is None else str(failure)) if m]
        if failure is None and found:
            raise make(found[0])
    if failure is not None:
        raise failure


def broadcast_arrays(tree: Any) -> Any:
    """Process 0's host arrays on every process (values each process computed for itself, such as
    a few-shot memory bank, made identical whatever the hosts' arithmetic)."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    return jax.tree.map(np.asarray, multihost_utils.broadcast_one_to_all(tree))


def sync(name: str) -> None:
    """Waits until every process got here (e.g. process 0 has written the result files)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-able")
