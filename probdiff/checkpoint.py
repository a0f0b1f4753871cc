r"""Checkpoints of JAX pytrees in the safetensors format: no pickle, ever.

A checkpoint is one ``.safetensors`` file (https://github.com/huggingface/safetensors): an
8-byte header length, a JSON header, then the raw bytes of each array. Reading one parses
JSON and copies bytes; nothing in it can run code, unlike ``pickle``, ``np.load(...,
allow_pickle=True)`` or ``torch.load``. Any pytree of arrays can be saved: SVI params (an
``eqx_module``'s ``"eps_net$params"`` included), optax states, an ``SVIState`` with its PRNG
key.

**On disk.** Each leaf is stored as one tensor named by its key path,
``jax.tree_util.keystr(path)`` (``['eps_net$params'].weights[0]``, ``[0].count``); a tree
that is a single array is stored under ``<root>``. Typed PRNG keys are stored as their key
data (``jax.random.key_data``), and dtypes the safetensors format does not hold (bfloat16,
the float8 types, complex128) as an unsigned-integer view of their bytes. The safetensors
metadata, a dict of strings, holds:

* ``format``: ``"probdiff-checkpoint"``, the tag that marks a probdiff checkpoint;
* ``format_version``: ``"1"``; a reader refuses files with a newer version;
* ``probdiff_version``: the probdiff that wrote the file;
* ``leaves``: JSON list of the leaf names, in ``tree_flatten`` order;
* ``dtypes``: JSON list of each leaf's dtype as the tree held it (``"float32"``,
  ``"bfloat16"``, ``"key<fry>"``), in the same order;
* ``prng_impls``: JSON object, leaf name -> PRNG implementation (``"threefry2x32"``) for each
  typed key;
* ``user_metadata``: JSON object, the ``metadata`` passed to :func:`save_checkpoint`;
* ``sha256``: hex SHA-256 over all the other metadata entries and every stored tensor's
  name, dtype, shape and bytes, so that a flipped bit anywhere is detected on load.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "FORMAT", "FORMAT_VERSION"]

#: The value of the ``format`` metadata entry that marks a probdiff checkpoint.
FORMAT = "probdiff-checkpoint"
#: The on-disk format version this module writes; it reads this version and older ones.
FORMAT_VERSION = 1

_ROOT = "<root>"  # name of the leaf of a tree that is a single array (its key path is empty)
# dtypes that safetensors stores natively (in every safetensors >= 0.4 numpy API).
_NATIVE = frozenset(
    np.dtype(d).name
    for d in (
        np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
        np.uint64, np.float16, np.float32, np.float64, np.complex64,
    )
)
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_REQUIRED = ("leaves", "dtypes", "prng_impls", "user_metadata", "sha256")


class CheckpointError(ValueError):
    """A file is not a readable probdiff checkpoint: corrupt, truncated, foreign or too new."""


def _probdiff_version() -> str:
    import probdiff

    return probdiff.__version__


def _is_key(dtype) -> bool:
    return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _dtype_name(dtype) -> str:
    return str(dtype) if _is_key(dtype) else np.dtype(dtype).name


def _leaf_names(tree, what: str):
    """The leaves of ``tree`` and their names (key strings), checked to be unique."""
    with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = [jax.tree_util.keystr(p) or _ROOT for p, _ in with_path]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"two leaves of {what} have the same key path {dup!r}; rename one of them")
    if "__metadata__" in names:
        raise ValueError(f"{what} has a leaf named '__metadata__', a name safetensors reserves")
    return names, [leaf for _, leaf in with_path], treedef


def _as_array(leaf, name: str, what: str):
    """A leaf as an array (jax or numpy) with ``.shape`` and ``.dtype``; TypeError otherwise."""
    if isinstance(leaf, jax.Array | np.ndarray | np.generic | bool | int | float | complex):
        arr = leaf if isinstance(leaf, jax.Array | np.ndarray) else np.asarray(leaf)
        if _is_key(arr.dtype) or _restore_dtype(arr.dtype.name) == arr.dtype:
            return arr
        raise TypeError(f"leaf {name} of {what} has dtype {arr.dtype}, which a checkpoint cannot store")
    raise TypeError(
        f"leaf {name} of {what} is a {type(leaf).__name__}, not an array; keep only the array "
        "leaves (for an Equinox module: eqx.filter(module, eqx.is_array)) before saving"
    )


def _contiguous(a: np.ndarray) -> np.ndarray:
    """``a`` in C order (unlike ``np.ascontiguousarray``, keeps 0-d arrays 0-d)."""
    return np.require(a, requirements="C")


def _encode(arr) -> tuple[np.ndarray, str | None]:
    """A leaf as the numpy array safetensors stores, and its PRNG impl if it is a typed key."""
    if _is_key(arr.dtype):
        return _contiguous(np.asarray(jax.random.key_data(arr))), str(jax.random.key_impl(arr))
    a = np.asarray(arr)
    a = _contiguous(a.astype(a.dtype.newbyteorder("<"), copy=False))
    if a.dtype.name in _NATIVE:
        return a, None
    if a.dtype.itemsize in _UINT:
        return a.view(_UINT[a.dtype.itemsize]), None
    # wider than 8 bytes (complex128): uint64 words on a trailing axis
    return _contiguous(a[..., None].view(np.uint64)), None


def _digest(meta: Mapping[str, str], names, arrays) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in meta.items() if k != "sha256"}, sort_keys=True).encode())
    for name, a in zip(names, arrays, strict=True):
        h.update(f"\0{name}\0{a.dtype.name}\0{list(a.shape)}\0{a.nbytes}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _user_metadata_json(metadata) -> str:
    if metadata is None:
        return "{}"
    if not isinstance(metadata, Mapping):
        raise TypeError(
            f"metadata must be a dict of JSON-serialisable values; got a {type(metadata).__name__}"
        )
    for key, value in metadata.items():
        if not isinstance(key, str):
            raise TypeError(f"metadata keys must be strings; got key {key!r} ({type(key).__name__})")
        try:
            json.dumps(value)
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"metadata[{key!r}] is not JSON-serialisable ({type(value).__name__}): {err}"
            ) from None
    return json.dumps(dict(metadata))


def save_checkpoint(path, tree, *, metadata=None, overwrite: bool = False) -> Path:
    r"""Save a pytree of arrays to a safetensors checkpoint file, atomically.

    The file is written to a temporary file in the same folder and moved into place in one
    step, so a crash mid-write leaves either the old file or none, never half a file.

    Args:
        path: the file to write; ``.safetensors`` is the customary suffix. Its folder must
            exist.
        tree: any JAX pytree whose leaves are arrays (JAX or NumPy, any dtype including
            bfloat16 and typed PRNG keys) or Python numbers: a dict of params, an optax
            state, an ``SVIState``. ``None`` subtrees are kept by the structure, not stored.
        metadata: a dict with string keys and JSON-serialisable values, returned by
            :func:`load_checkpoint` (tuples come back as lists).
        overwrite: replace ``path`` if it exists. Without it an existing file is never
            touched, even by a writer racing this one.

    Returns:
        ``path`` as a :class:`pathlib.Path`.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False (the file is unchanged).
        IsADirectoryError: ``path`` is a folder.
        FileNotFoundError: the folder of ``path`` does not exist.
        TypeError: a leaf is not an array (the message names it), or ``metadata`` is not a
            dict of JSON-serialisable values (the message names the key).
        ValueError: two leaves have the same key path.

    Examples:
        >>> import os, tempfile
        >>> import jax, jax.numpy as jnp
        >>> from probdiff.checkpoint import load_checkpoint, save_checkpoint
        >>> state = {"params": {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}, "key": jax.random.key(0)}
        >>> with tempfile.TemporaryDirectory() as d:
        ...     path = save_checkpoint(os.path.join(d, "ckpt.safetensors"), state, metadata={"step": 100})
        ...     restored, meta = load_checkpoint(path, like=state)
        >>> meta
        {'step': 100}
        >>> restored["params"]["w"].shape, restored["key"].dtype
        ((2, 3), key<fry>)
    """
    path = Path(os.fspath(path))
    if path.is_dir():
        raise IsADirectoryError(f"checkpoint path {path} is a folder; give a file name")
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"checkpoint {path} already exists; pass overwrite=True to replace it, or choose another path"
        )
    folder = path.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"folder {folder} of checkpoint {path} does not exist")

    names, leaves, _ = _leaf_names(tree, "tree")
    tensors, dtypes, impls = {}, [], {}
    for name, leaf in zip(names, leaves, strict=True):
        arr = _as_array(leaf, name, "tree")
        dtypes.append(_dtype_name(arr.dtype))
        tensors[name], impl = _encode(arr)
        if impl is not None:
            impls[name] = impl
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "probdiff_version": _probdiff_version(),
        "leaves": json.dumps(names),
        "dtypes": json.dumps(dtypes),
        "prng_impls": json.dumps(impls),
        "user_metadata": _user_metadata_json(metadata),
    }
    meta["sha256"] = _digest(meta, names, [tensors[n] for n in names])

    from safetensors.numpy import save_file

    tmp = folder / f".{path.name}.{secrets.token_hex(6)}.tmp"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # mode as for any new file
    try:
        save_file(tensors, str(tmp), metadata=meta)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # the writer may create it private; give it a new file's mode
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            _move_no_clobber(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _move_no_clobber(tmp: Path, path: Path) -> None:
    """Move ``tmp`` to ``path``, failing if ``path`` exists (a hard link is atomic at that)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(
            f"checkpoint {path} already exists; pass overwrite=True to replace it, or choose another path"
        ) from None
    except OSError:  # no hard links on this file system: check, then rename
        if path.exists():
            raise FileExistsError(
                f"checkpoint {path} already exists; pass overwrite=True to replace it"
            ) from None
        os.replace(tmp, path)
    else:
        tmp.unlink()


def _parse(meta: Mapping[str, str], key: str, path, kind):
    try:
        value = json.loads(meta[key])
    except (KeyError, ValueError):
        raise CheckpointError(
            f"checkpoint {path} is corrupt: metadata entry {key!r} is missing or not JSON"
        ) from None
    if not isinstance(value, kind):
        raise CheckpointError(
            f"checkpoint {path} is corrupt: metadata entry {key!r} is not a {kind.__name__}"
        )
    return value


def _restore_dtype(name: str):
    """The NumPy dtype called ``name`` (``"float32"``, ``"bfloat16"``), or None if there is none."""
    try:
        dtype = np.dtype(name)
    except TypeError:
        import ml_dtypes  # registers bfloat16 and friends with NumPy (jax imports it anyway)

        found = getattr(ml_dtypes, name, None) if name.isidentifier() and not name.startswith("_") else None
        try:
            dtype = np.dtype(found) if found is not None else None
        except TypeError:
            dtype = None
    if dtype is None or dtype.name != name or dtype.itemsize == 0:
        return None
    # numbers, and ml_dtypes (bfloat16, float8_*, int4: kind "V", no fields), stored as their bytes;
    # never objects, strings, records or datetimes
    return dtype if dtype.kind in "biufc" or (dtype.kind == "V" and dtype.names is None) else None


def _decode(stored: np.ndarray, dtype_name: str, impl, name: str, path):
    """The leaf as the tree held it: a typed key (jax) or a numpy array of its own dtype."""
    if impl is not None:
        if not dtype_name.startswith("key<"):
            raise CheckpointError(
                f"checkpoint {path} is corrupt: leaf {name} has a PRNG impl but dtype {dtype_name}"
            )
        try:
            return jax.random.wrap_key_data(stored, impl=impl)
        except Exception as err:
            raise CheckpointError(
                f"checkpoint {path}: leaf {name} is a PRNG key of implementation {impl!r}, which this "
                f"JAX cannot rebuild ({err})"
            ) from None
    dtype = _restore_dtype(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:
        raise CheckpointError(f"checkpoint {path}: leaf {name} has dtype {dtype_name!r}, unknown to NumPy")
    if stored.dtype == dtype:
        return stored
    ok = stored.dtype == _UINT.get(dtype.itemsize) or (dtype.itemsize > 8 and stored.dtype == np.uint64)
    if not ok:
        raise CheckpointError(
            f"checkpoint {path} is corrupt: leaf {name} is stored as {stored.dtype}, "
            f"which cannot hold {dtype_name}"
        )
    try:
        out = stored.view(dtype)
        return out[..., 0] if dtype.itemsize > 8 else out
    except (ValueError, IndexError):
        raise CheckpointError(
            f"checkpoint {path} is corrupt: leaf {name} of shape {stored.shape} cannot hold {dtype_name}"
        ) from None


def _read(path):
    """Open, validate and decode a checkpoint: names, decoded leaves, user metadata."""
    from safetensors import SafetensorError, safe_open

    path = Path(os.fspath(path))
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise CheckpointError(
                    f"{path} is a safetensors file but a foreign checkpoint, not one written by "
                    f"probdiff.checkpoint.save_checkpoint (no format tag {FORMAT!r} in its metadata)"
                )
            stored = {k: np.array(f.get_tensor(k), copy=True) for k in f.keys()}
    except CheckpointError:
        raise
    except (SafetensorError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(
            f"{path} is not a valid safetensors checkpoint (truncated, corrupt or another format): {err}"
        ) from None
    except OSError as err:
        raise CheckpointError(f"checkpoint {path} cannot be read: {err}") from None

    try:
        version = int(meta.get("format_version", ""))
    except ValueError:
        version = 0
    if version < 1:
        raise CheckpointError(f"checkpoint {path} is corrupt: format_version {meta.get('format_version')!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {version}, newer than the version {FORMAT_VERSION} this "
            f"probdiff {_probdiff_version()} reads (it was written by probdiff "
            f"{meta.get('probdiff_version', '?')}); upgrade probdiff to load it"
        )
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise CheckpointError(f"checkpoint {path} is corrupt: its metadata lacks {', '.join(missing)}")
    names = _parse(meta, "leaves", path, list)
    dtypes = _parse(meta, "dtypes", path, list)
    impls = _parse(meta, "prng_impls", path, dict)
    user = _parse(meta, "user_metadata", path, dict)
    names_ok = all(isinstance(n, str) for n in names) and sorted(names) == sorted(stored)
    if not names_ok or len(dtypes) != len(names):
        raise CheckpointError(f"checkpoint {path} is corrupt: its tensors do not match its list of leaves")
    if _digest(meta, names, [stored[n] for n in names]) != meta["sha256"]:
        raise CheckpointError(
            f"checkpoint {path} is corrupt: its SHA-256 checksum does not match its contents "
            "(the file was altered or damaged after it was written)"
        )
    leaves = [_decode(stored[n], d, impls.get(n), n, path) for n, d in zip(names, dtypes, strict=True)]
    return names, leaves, user


def _like_leaf(value, like, name: str, path):
    """``value`` (decoded from the file) as the kind of array that ``like`` is."""
    if _is_key(value.dtype):
        return value
    if isinstance(like, np.ndarray):
        return value
    if isinstance(like, np.generic):
        return value[()]
    if isinstance(like, bool | int | float | complex):
        return value.item()
    out = jnp.asarray(value)
    if out.dtype != value.dtype:
        raise ValueError(
            f"leaf {name} of checkpoint {path} has dtype {value.dtype}, which JAX turns into {out.dtype} "
            "here; enable 64-bit types (jax.config.update('jax_enable_x64', True)) to load it"
        )
    return out


def load_checkpoint(path, like=None):
    r"""Load a checkpoint written by :func:`save_checkpoint`, checking it is intact.

    Nothing in the file is unpickled or executed: it is parsed as safetensors (JSON header,
    raw bytes), its format tag and version are checked, and its SHA-256 checksum is
    recomputed before any array is returned.

    Args:
        path: the checkpoint file.
        like: a pytree of the structure saved, e.g. freshly initialised params or an
            ``SVIState`` from ``svi.init``; its leaves may be arrays, Python numbers or
            ``jax.ShapeDtypeStruct`` (from ``jax.eval_shape``). Every leaf's name (key
            path), shape and dtype must match the file's.

    Returns:
        ``(tree, metadata)``: the user metadata dict saved with the file, and with ``like``
        a pytree of ``like``'s structure (leaves are JAX arrays, or NumPy arrays and Python
        numbers where ``like`` has those; typed PRNG keys come back as typed keys); without
        ``like`` a flat dict, leaf name -> NumPy array (typed keys as JAX key arrays), in
        the order of the saved tree.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: (a ValueError) the file is not a safetensors file, is truncated or
            corrupt, is a foreign safetensors file without probdiff's format tag, fails its
            checksum, or has a newer format version than this probdiff reads.
        ValueError: a leaf of ``like`` is missing from the file or differs in shape or dtype
            (the message names the leaf), or the file holds a leaf ``like`` lacks.

    Examples:
        >>> import os, tempfile
        >>> import numpy as np
        >>> from probdiff.checkpoint import load_checkpoint, save_checkpoint
        >>> with tempfile.TemporaryDirectory() as d:
        ...     path = save_checkpoint(os.path.join(d, "ckpt.safetensors"), {"w": np.arange(3.0)})
        ...     flat, meta = load_checkpoint(path)
        >>> flat, meta
        ({"['w']": array([0., 1., 2.])}, {})
    """
    names, leaves, user = _read(path)
    if like is None:
        return dict(zip(names, leaves, strict=True)), user

    like_names, like_leaves, treedef = _leaf_names(like, "like")
    have = dict(zip(names, leaves, strict=True))
    extra = [n for n in names if n not in set(like_names)]
    out = []
    for name, ref in zip(like_names, like_leaves, strict=True):
        if name not in have:
            raise ValueError(
                f"leaf {name} of `like` is not in checkpoint {path}"
                + (f" (the file has {', '.join(extra)} instead)" if extra else "")
            )
        value = have[name]
        ref_arr = ref if hasattr(ref, "shape") and hasattr(ref, "dtype") else _as_array(ref, name, "like")
        ref_shape, ref_dtype = tuple(ref_arr.shape), _dtype_name(ref_arr.dtype)
        shape, dtype = tuple(value.shape), _dtype_name(value.dtype)
        if shape != ref_shape or dtype != ref_dtype:
            raise ValueError(
                f"leaf {name} of checkpoint {path} has shape {shape} and dtype {dtype}, but `like` has "
                f"shape {ref_shape} and dtype {ref_dtype}"
            )
        out.append(_like_leaf(value, ref, name, path))
    if extra:
        raise ValueError(f"checkpoint {path} holds leaves that `like` lacks: {', '.join(extra)}")
    return jax.tree_util.tree_unflatten(treedef, out), user
