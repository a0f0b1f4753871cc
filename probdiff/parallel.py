r"""Data-parallel training on ``jax.sharding``: the batch split over devices, parameters replicated.

SVI's loss on a minibatch is a mean (or sum) over its examples,

$$ \mathcal L(\theta) = \frac1B \sum_{b=1}^{B} \ell_\theta(x_0^{(b)}), \qquad
   \nabla_\theta \mathcal L = \frac1D \sum_{d=1}^{D} \Big( \frac{D}{B} \sum_{b \in \text{shard } d}
   \nabla_\theta \ell_\theta(x_0^{(b)}) \Big), $$

so splitting the B examples over D devices and summing the per-device gradients gives the
one-device gradient exactly (up to the order of float additions). Nothing here writes that sum:
the batch is placed with a ``NamedSharding`` over a one-axis ``Mesh``, the parameters with a
replicated one, and ``jax.jit`` (XLA's SPMD partitioner) inserts the all-reduce. The per-example
draws of t and eps are the same as on one device because JAX's random bits do not depend on how
an array is sharded (``jax_threefry_partitionable``, on by default).

Three ways to use it:

* ``fit(svi, data, n, batch_size=B, rng_key=k, mesh=data_mesh())``: the training driver draws each
  minibatch on device and constrains it to the mesh (B must be a multiple of the device count).
* ``svi.run(key, n, shard_batch(x, mesh))`` or ``jax.jit(svi.update)(replicate(state, mesh),
  shard_batch(x, mesh))``: NumPyro's own loop; jit follows the shardings of its arguments.
* Several hosts: call ``jax.distributed.initialize()`` first in every process; ``data_mesh()``
  then spans every device of every host, and ``shard_batch`` takes each process's own rows
  (``jax.make_array_from_process_local_data``). See the scaling page of the docs.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["data_mesh", "shard_batch", "replicate", "batch_sharding"]

_AXIS = "data"


def data_mesh(devices=None, *, axis_name: str = _AXIS) -> Mesh:
    """A one-axis ``jax.sharding.Mesh`` over ``devices`` (default: ``jax.devices()``, i.e. every
    device of every process after ``jax.distributed.initialize()``).

    Args:
        devices: a sequence of devices, or an int n for the first n of ``jax.devices()``.
        axis_name: the mesh axis that the batch is split over.

    Example:
        >>> from probdiff.parallel import data_mesh
        >>> dict(data_mesh(1).shape)
        {'data': 1}
    """
    everything = jax.devices()
    if devices is None:
        devices = everything
    elif isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
        if not 1 <= devices <= len(everything):
            raise ValueError(f"devices must lie in 1..{len(everything)} (the devices JAX sees); got {devices}")
        devices = everything[: int(devices)]
    try:
        devices = list(devices)
    except TypeError:
        raise ValueError(f"devices must be None, an int, or a sequence of devices; got {devices!r}") from None
    if not devices:
        raise ValueError("devices must name at least one device")
    if not isinstance(axis_name, str) or not axis_name:
        raise ValueError(f"axis_name must be a non-empty string; got {axis_name!r}")
    return Mesh(np.asarray(devices, dtype=object), (axis_name,))


def _check_mesh(mesh) -> str:
    if not isinstance(mesh, Mesh) or len(mesh.axis_names) != 1:
        raise ValueError(f"mesh must be a one-axis jax.sharding.Mesh (see probdiff.parallel.data_mesh); got {mesh!r}")
    return mesh.axis_names[0]


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The ``NamedSharding`` that splits an array's leading (example) axis over ``mesh``."""
    return NamedSharding(mesh, PartitionSpec(_check_mesh(mesh)))


def shard_batch(x, mesh: Mesh):
    """Place ``x`` (or a pytree of arrays) with its leading axis split over the devices of ``mesh``.

    With one process ``x`` is the whole batch; its leading size must be a multiple of the number
    of devices. With several processes (after ``jax.distributed.initialize()``) each process passes
    its own rows, and the result is the global batch of all processes' rows in process order.

    Args:
        x: an array of shape ``(B, ...)`` or a pytree of them.
        mesh: a one-axis mesh, e.g. [data_mesh][probdiff.parallel.data_mesh].

    Returns:
        A ``jax.Array`` (or pytree) sharded as [batch_sharding][probdiff.parallel.batch_sharding].
    """
    sharding = batch_sharding(mesh)
    n_dev = mesh.devices.size
    n_local = len(mesh.local_devices)

    def put(a):
        a = np.asarray(a) if not isinstance(a, jax.Array) else a
        if a.ndim < 1:
            raise ValueError(f"shard_batch: every array needs a leading batch axis; got shape {a.shape}")
        if jax.process_count() == 1:
            if a.shape[0] % n_dev:
                raise ValueError(f"shard_batch: the batch size {a.shape[0]} must be a multiple of the "
                                 f"number of devices ({n_dev})")
            return jax.device_put(a, sharding)
        if n_local == 0:
            raise ValueError(f"shard_batch: process {jax.process_index()} has no device in the mesh; build the "
                             "mesh over devices of every process (data_mesh() with no argument does)")
        if a.shape[0] % n_local:
            raise ValueError(f"shard_batch: this process's batch size {a.shape[0]} must be a multiple of "
                             f"its number of devices in the mesh ({n_local})")
        return jax.make_array_from_process_local_data(sharding, np.asarray(a))

    return jax.tree_util.tree_map(put, x)


def replicate(tree, mesh: Mesh):
    """Place every array of ``tree`` (parameters, an ``SVIState``, a dataset) whole on every device
    of ``mesh``. With several processes each must pass the same values."""
    _check_mesh(mesh)
    sharding = NamedSharding(mesh, PartitionSpec())

    def put(a):
        if not hasattr(a, "shape"):
            return a
        if jax.process_count() == 1 or (isinstance(a, jax.Array) and not a.is_fully_addressable):
            return jax.device_put(a, sharding)  # one process, or already a global array: reshard
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            data = put(jax.random.key_data(a))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(a))
        host = np.asarray(a)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree_util.tree_map(put, tree)
