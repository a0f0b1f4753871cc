"""probdiff.checkpoint: bitwise round trips, exact structures, atomic no-clobber writes, and
clear refusals of missing, corrupt, foreign, too-new and pickle files (which are never unpickled)."""

import functools
import json
import os
import pickle
from collections import namedtuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from helpers import x64
from numpyro.contrib.module import eqx_module
from numpyro.infer import SVI, Trace_ELBO
from safetensors import safe_open
from safetensors.numpy import save_file

from probdiff.checkpoint import FORMAT, FORMAT_VERSION, CheckpointError, load_checkpoint, save_checkpoint
from probdiff.nets import MLP

State = namedtuple("State", ["params", "opt_state", "rng_key", "step"])


@functools.cache
def _net():
    """One small MLP for the whole file (building one eagerly takes seconds on a slow CPU)."""
    return MLP(2, jax.random.key(1), hidden=(8, 8), time_dim=4)


def _mlp_params():
    params, _ = eqx.partition(_net(), eqx.is_inexact_array)
    return params


def _tree():
    params = {"eps_net$params": _mlp_params(), "scale": jnp.array([0.5, 2.0], jnp.float32)}
    opt_state = optax.adam(1e-3).init(params)
    return State(
        params=params,
        opt_state=opt_state,
        rng_key=jax.random.key(7),
        step=jnp.array(12, jnp.int32),
    ), {
        "mask": jnp.array([True, False, True]),
        "half": jnp.linspace(-1.0, 1.0, 5).astype(jnp.bfloat16),
        "np_uint8": np.arange(4, dtype=np.uint8),
        "keys": jax.random.split(jax.random.key(3, impl="rbg"), 3),
        "nothing": None,
        "empty": jnp.zeros((0, 3)),
    }


def _assert_bitwise_equal(a, b):
    """Same structure, and every leaf the same dtype, shape and bytes (keys: same key data)."""
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def _data_start(path):
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def test_round_trip_with_like_is_bitwise_and_keeps_the_structure(tmp_path):
    tree = _tree()
    path = save_checkpoint(tmp_path / "ckpt.safetensors", tree, metadata={"step": 12})
    restored, meta = load_checkpoint(path, like=_tree())
    assert meta == {"step": 12}
    _assert_bitwise_equal(restored, tree)
    assert isinstance(restored[0], State) and isinstance(restored[0].params["eps_net$params"], MLP)
    assert type(restored[0].opt_state[0]) is type(tree[0].opt_state[0])  # optax ScaleByAdamState
    assert restored[1]["nothing"] is None
    assert isinstance(restored[1]["np_uint8"], np.ndarray)  # a NumPy leaf of `like` stays NumPy
    assert isinstance(restored[0].step, jax.Array)
    # A key drives the same random numbers after the round trip.
    assert jax.random.key_impl(restored[1]["keys"]) == "rbg"
    np.testing.assert_array_equal(
        jax.random.normal(restored[0].rng_key, (4,)), jax.random.normal(tree[0].rng_key, (4,))
    )
    np.testing.assert_array_equal(
        jax.vmap(jax.random.uniform)(restored[1]["keys"]), jax.vmap(jax.random.uniform)(tree[1]["keys"])
    )
    # The restored network computes exactly what the original did.
    static = eqx.partition(_net(), eqx.is_inexact_array)[1]
    net = eqx.combine(restored[0].params["eps_net$params"], static)
    apply = eqx.filter_jit(lambda net, x: net(x, 5))
    np.testing.assert_array_equal(apply(net, jnp.ones((3, 2))), apply(_net(), jnp.ones((3, 2))))


def test_round_trip_without_like_is_a_flat_dict_in_leaf_order(tmp_path):
    tree = _tree()
    path = save_checkpoint(tmp_path / "ckpt.safetensors", tree)
    flat, meta = load_checkpoint(path)
    assert meta == {}
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    assert list(flat) == names
    assert "[0].params['eps_net$params'].weights[0]" in flat and "[1]['half']" in flat
    assert flat["[1]['half']"].dtype == jnp.bfloat16
    assert isinstance(flat["[0].step"], np.ndarray)
    assert jax.dtypes.issubdtype(flat["[0].rng_key"].dtype, jax.dtypes.prng_key)
    for name, leaf in zip(names, jax.tree_util.tree_leaves(tree), strict=True):
        _assert_bitwise_equal(flat[name], leaf)


def test_float64_int64_and_complex128_round_trip_under_x64(tmp_path):
    with x64():
        tree = {
            "f64": jnp.array([1 / 3, np.pi, -0.0, np.inf]),
            "i64": jnp.array([2**40, -1]),
            "c128": np.array([1 + 2j, np.nan + 1e-300j]),
            "py": {"f": 0.1, "i": 3, "b": True},
        }
        save_checkpoint(tmp_path / "x64.safetensors", tree)
        restored, _ = load_checkpoint(tmp_path / "x64.safetensors", like=tree)
        assert restored["f64"].dtype == jnp.float64 and restored["i64"].dtype == jnp.int64
        _assert_bitwise_equal(
            {k: v for k, v in restored.items() if k != "py"}, {k: v for k, v in tree.items() if k != "py"}
        )
        assert restored["py"] == tree["py"] and type(restored["py"]["b"]) is bool
    # Without x64 a float64 leaf is not silently narrowed to float32.
    like = {
        "f64": jax.ShapeDtypeStruct((4,), np.float64),
        "i64": np.zeros(2, np.int64),
        "c128": np.zeros(2, np.complex128),
        "py": {"f": 0.0, "i": 0, "b": False},
    }
    with pytest.raises(ValueError, match=r"\['f64'\].*x64"):
        load_checkpoint(tmp_path / "x64.safetensors", like=like)


def test_like_may_be_shapes_from_eval_shape_and_a_single_array_tree(tmp_path):
    params = _mlp_params()
    save_checkpoint(tmp_path / "p.safetensors", params)
    abstract = jax.eval_shape(lambda: _mlp_params())
    restored, _ = load_checkpoint(tmp_path / "p.safetensors", like=abstract)
    _assert_bitwise_equal(restored, params)

    x = jnp.arange(6.0).reshape(2, 3)
    save_checkpoint(tmp_path / "x.safetensors", x)
    flat, _ = load_checkpoint(tmp_path / "x.safetensors")
    assert list(flat) == ["<root>"]
    restored, _ = load_checkpoint(tmp_path / "x.safetensors", like=x)
    _assert_bitwise_equal(restored, x)

    save_checkpoint(tmp_path / "empty.safetensors", {})
    assert load_checkpoint(tmp_path / "empty.safetensors", like={}) == ({}, {})


def test_svi_state_resumes_exactly(tmp_path):
    """An SVIState (optax state, PRNG key) and its params saved mid-run: resuming from the
    checkpoint gives the very same next step as going on without it."""
    x = jax.random.normal(jax.random.key(0), (16, 2))

    def model(x):
        net = eqx_module("eps_net", _net())
        loc = numpyro.param("loc", jnp.zeros(2))
        numpyro.sample("obs", dist.Normal(net(x, 1) + loc, 1.0).to_event(2), obs=x)

    svi = SVI(model, lambda x: None, optax.adam(1e-2), Trace_ELBO())
    update = jax.jit(svi.update)
    state = svi.init(jax.random.key(2), x)
    state, _ = update(state, x)
    save_checkpoint(tmp_path / "svi.safetensors", state, metadata={"iteration": 1})
    fresh = svi.init(jax.random.key(99), x)
    resumed, meta = load_checkpoint(tmp_path / "svi.safetensors", like=fresh)
    assert meta == {"iteration": 1}
    _assert_bitwise_equal(resumed, state)
    (a, loss_a), (b, loss_b) = update(state, x), update(resumed, x)
    assert float(loss_a) == float(loss_b)
    _assert_bitwise_equal(svi.get_params(a), svi.get_params(b))


def test_existing_file_is_never_overwritten_without_overwrite(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, {"w": jnp.ones(3)})
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="ckpt.safetensors"):
        save_checkpoint(path, {"w": jnp.zeros(3)})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.safetensors"]  # no temporary file left behind
    save_checkpoint(path, {"w": jnp.zeros(3)}, overwrite=True)
    assert float(load_checkpoint(path)[0]["['w']"].sum()) == 0.0
    assert os.listdir(tmp_path) == ["ckpt.safetensors"]
    with pytest.raises(IsADirectoryError, match="folder"):
        save_checkpoint(tmp_path, {"w": jnp.ones(3)}, overwrite=True)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        save_checkpoint(tmp_path / "nowhere" / "c.safetensors", {"w": jnp.ones(3)})


def test_failed_write_leaves_neither_temp_file_nor_checkpoint(tmp_path, monkeypatch):
    import safetensors.numpy

    def fail(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "ckpt.safetensors", {"w": jnp.ones(3)})
    assert os.listdir(tmp_path) == []


def test_metadata_round_trip_and_non_json_metadata(tmp_path):
    meta = {"step": 3, "lr": 1e-3, "tags": ["a", "é"], "nested": {"ok": None, "t": True}}
    save_checkpoint(tmp_path / "m.safetensors", {"w": jnp.ones(2)}, metadata=meta)
    assert load_checkpoint(tmp_path / "m.safetensors")[1] == meta
    with pytest.raises(TypeError, match=r"metadata\['schedule'\]"):
        save_checkpoint(tmp_path / "bad.safetensors", {"w": 1.0}, metadata={"step": 1, "schedule": object()})
    with pytest.raises(TypeError, match="keys must be strings"):
        save_checkpoint(tmp_path / "bad.safetensors", {"w": jnp.ones(2)}, metadata={1: "x"})
    assert not (tmp_path / "bad.safetensors").exists()


def test_non_array_leaves_are_refused_by_name(tmp_path):
    net = _net()
    with pytest.raises(TypeError, match=r"\['act'\].*eqx.filter"):
        save_checkpoint(tmp_path / "c.safetensors", {"w": jnp.ones(2), "act": jax.nn.silu})
    with pytest.raises(TypeError, match=r"\[.name.\].*dtype <U1.*cannot store"):
        save_checkpoint(tmp_path / "c.safetensors", {"name": np.array(["a"])})
    save_checkpoint(tmp_path / "c.safetensors", eqx.filter(net, eqx.is_array))  # the documented fix
    assert not list(tmp_path.glob(".*"))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_checkpoint(tmp_path / "nope.safetensors")


JUNK = [b"", np.random.default_rng(0).bytes(1000), (16).to_bytes(8, "little") + b"{not json}      "]


@pytest.mark.parametrize("content", JUNK, ids=["empty", "random", "bad-header"])
def test_random_bytes_are_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="junk.safetensors.*not a valid safetensors"):
        load_checkpoint(path)


def test_truncated_checkpoint(tmp_path):
    path = save_checkpoint(tmp_path / "c.safetensors", _tree())
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 1, 8):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="c.safetensors"):
            load_checkpoint(path)


def test_plain_safetensors_file_is_a_foreign_checkpoint(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"weight": np.ones((2, 2), np.float32)}, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="model.safetensors.*foreign checkpoint"):
        load_checkpoint(path)
    save_file({"weight": np.ones((2, 2), np.float32)}, path)  # no metadata at all
    with pytest.raises(CheckpointError, match="foreign checkpoint"):
        load_checkpoint(path)


def test_flipped_byte_in_tensor_data_fails_the_checksum(tmp_path):
    path = save_checkpoint(tmp_path / "c.safetensors", _tree())
    data = bytearray(path.read_bytes())
    start = _data_start(path)
    for pos in (start, (start + len(data)) // 2, len(data) - 1):
        flipped = data.copy()
        flipped[pos] ^= 0x01
        path.write_bytes(bytes(flipped))
        with pytest.raises(CheckpointError, match="c.safetensors is corrupt.*SHA-256"):
            load_checkpoint(path)


def test_edited_header_fails_the_checksum(tmp_path):
    path = save_checkpoint(tmp_path / "c.safetensors", {"w": jnp.ones(2)}, metadata={"step": 100})
    data = path.read_bytes()
    edited = data.replace(b'\\"step\\": 100', b'\\"step\\": 900')
    assert edited != data and len(edited) == len(data)
    path.write_bytes(edited)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)


def test_newer_format_version_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "c.safetensors", {"w": jnp.ones(2)})
    with safe_open(path, framework="numpy") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert meta["format"] == FORMAT and json.loads(meta["leaves"]) == ["['w']"]
    meta["format_version"] = str(FORMAT_VERSION + 1)
    newer = tmp_path / "newer.safetensors"
    save_file(tensors, newer, metadata=meta)
    with pytest.raises(CheckpointError, match=f"newer.safetensors has format version {FORMAT_VERSION + 1}"):
        load_checkpoint(newer)


def test_like_mismatches_name_the_leaf_and_both_sides(tmp_path):
    path = save_checkpoint(tmp_path / "c.safetensors", {"a": jnp.ones((2, 3)), "b": jnp.zeros(4, jnp.int32)})
    with pytest.raises(ValueError, match=r"leaf \['a'\].*shape \(2, 3\).*`like` has shape \(3, 2\)"):
        load_checkpoint(path, like={"a": jnp.ones((3, 2)), "b": jnp.zeros(4, jnp.int32)})
    with pytest.raises(ValueError, match=r"leaf \['b'\].*dtype int32.*dtype float32"):
        load_checkpoint(path, like={"a": jnp.ones((2, 3)), "b": jnp.zeros(4)})
    with pytest.raises(ValueError, match=r"leaf \['c'\] of `like` is not in.*\['b'\]"):
        load_checkpoint(path, like={"a": jnp.ones((2, 3)), "c": jnp.zeros(4, jnp.int32)})
    with pytest.raises(ValueError, match=r"leaves that `like` lacks: \['b'\]"):
        load_checkpoint(path, like={"a": jnp.ones((2, 3))})
    save_checkpoint(tmp_path / "k.safetensors", {"k": jax.random.key(0)})
    with pytest.raises(ValueError, match=r"shape \(\) and dtype key<fry>.*shape \(2,\) and dtype uint32"):
        load_checkpoint(tmp_path / "k.safetensors", like={"k": jax.random.PRNGKey(0)})


class _Trap:
    """Unpickling this runs os.mkdir(sentinel): proof that a pickle was executed."""

    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return os.mkdir, (self.sentinel,)


def _refuse_pickle(*args, **kwargs):
    raise AssertionError("load_checkpoint tried to unpickle")


@pytest.mark.parametrize("kind", ["pickle", "npz"])
def test_pickle_files_are_refused_without_unpickling(tmp_path, monkeypatch, kind):
    # The trap is live: unpickling it does run code.
    pickle.loads(pickle.dumps(_Trap(tmp_path / "proof")))
    assert (tmp_path / "proof").is_dir()

    sentinel = tmp_path / "it_ran"
    path = tmp_path / "ckpt.safetensors"
    if kind == "pickle":
        path.write_bytes(pickle.dumps({"w": np.ones(3), "trap": _Trap(sentinel)}))
    else:
        with open(path, "wb") as f:
            np.savez(f, w=np.ones(3), trap=np.array([_Trap(sentinel)], dtype=object))
    for mod, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (np, "load")]:
        monkeypatch.setattr(mod, name, _refuse_pickle)
    with pytest.raises(CheckpointError, match="ckpt.safetensors.*not a valid safetensors"):
        load_checkpoint(path)
    assert not sentinel.exists()


def test_crafted_files_with_our_tag_are_refused(tmp_path):
    """A file with probdiff's tag, a valid checksum and a hostile dtype is refused, not decoded."""
    from probdiff.checkpoint import _digest

    path = save_checkpoint(tmp_path / "c.safetensors", {"w": np.arange(2, dtype=np.uint64)})
    with safe_open(path, framework="numpy") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    for key, value, match in [
        ("dtypes", '["object"]', "dtype 'object', unknown"),
        ("dtypes", '["float32"]', "stored as uint64, which cannot hold float32"),
        ("leaves", '["w"]', "do not match its list of leaves"),
        ("leaves", "[not json", "'leaves' is missing or not JSON"),
        ("format_version", "one", "corrupt: format_version 'one'"),
    ]:
        crafted = dict(meta, **{key: value})
        crafted["sha256"] = _digest(crafted, ["['w']"], [tensors["['w']"]])
        bad = tmp_path / "crafted.safetensors"
        save_file(tensors, bad, metadata=crafted)
        with pytest.raises(CheckpointError, match=match):
            load_checkpoint(bad)
