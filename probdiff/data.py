r"""Built-in 2-D data sets, a loader for user arrays, and two-sample distances.

The data sets are generated in the package with JAX from a PRNG key (nothing is downloaded):

* [eight_gaussians][probdiff.data.eight_gaussians]: eight Gaussians on a circle, with an exact
  log-density [eight_gaussians_log_prob][probdiff.data.eight_gaussians_log_prob];
* [two_moons][probdiff.data.two_moons]: two interleaving half circles;
* [swiss_roll][probdiff.data.swiss_roll]: a 2-D spiral.

Each is called as ``name(key, num, *, ...)`` and returns an array of shape ``(num, 2)``,
float32 (float64 under ``jax_enable_x64``). Each is jit-able with ``num`` static, e.g.
``jax.jit(two_moons, static_argnums=1)``; the keyword parameters may then be traced (their
values are checked only when concrete). [load][probdiff.data.load] picks one by name from
[DATASETS][probdiff.data.DATASETS].

Images: [digits][probdiff.data.digits] returns scikit-learn's bundled 8x8 handwritten digits
(integer pixels 0..16, shipped with scikit-learn, nothing downloaded);
[dequantize][probdiff.data.dequantize] turns integer pixels into continuous data and
[discrete_bits_per_dim][probdiff.data.discrete_bits_per_dim] converts a bound on that density
into bits per pixel of the discrete images.

[load_array][probdiff.data.load_array] reads user data from a ``.npy`` or ``.npz`` file, never
unpickling anything. [energy_distance][probdiff.data.energy_distance] and
[mmd_rbf][probdiff.data.mmd_rbf] compare two samples, e.g. generated points with data.
"""

from __future__ import annotations

import functools
import math
import operator
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from probdiff._checks import is_concrete

__all__ = [
    "digits",
    "DIGITS_LEVELS",
    "dequantize",
    "discrete_bits_per_dim",
    "eight_gaussians",
    "eight_gaussians_log_prob",
    "two_moons",
    "swiss_roll",
    "DATASETS",
    "load",
    "load_array",
    "energy_distance",
    "mmd_rbf",
]

#: Unit directions (cos(2 pi k / 8), sin(2 pi k / 8)), k = 0..7, computed in float64.
_EIGHT_DIRECTIONS = np.stack(
    [np.cos(2 * np.pi * np.arange(8) / 8), np.sin(2 * np.pi * np.arange(8) / 8)], axis=-1
)

#: two_moons: mean of the noiseless moons, (1/2, 1/4).
_MOONS_CENTER = (0.5, 0.25)
#: two_moons: RMS per coordinate of the centred noiseless moons, sqrt(21/32 - 1/(2 pi)).
_MOONS_SCALE = math.sqrt(21 / 32 - 1 / (2 * math.pi))
#: swiss_roll: sqrt(E[u^2] / 2) for u ~ U(1.5 pi, 4.5 pi), that is pi sqrt(39/8).
_SWISS_SCALE = math.pi * math.sqrt(39 / 8)


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def _check_num(num) -> int:
    """``num`` as a Python int >= 1; it fixes the output shape, so it must be static."""
    if isinstance(num, jax.core.Tracer):
        raise TypeError(
            "num must be a static Python integer (it fixes the output shape); under jax.jit "
            "mark it static, e.g. jax.jit(two_moons, static_argnums=1)"
        )
    if isinstance(num, bool):
        raise ValueError(f"num must be a positive integer (the number of points); got {num!r}")
    try:
        n = operator.index(num)
    except TypeError:
        raise ValueError(f"num must be a positive integer (the number of points); got {num!r}") from None
    if n < 1:
        raise ValueError(f"num must be a positive integer (the number of points); got {n}")
    return n


def _check_scalar(value, name: str, *, positive: bool):
    """Check that a concrete scalar is finite and > 0 (``positive``) or >= 0; return it."""
    if jnp.ndim(value) != 0:
        raise ValueError(f"{name} must be a scalar; got shape {jnp.shape(value)}")
    if is_concrete(value):
        v = float(value)
        ok = math.isfinite(v) and (v > 0 if positive else v >= 0)
        if not ok:
            allowed = "finite and > 0" if positive else "finite and >= 0"
            raise ValueError(f"{name} must be {allowed}; got {name} = {v}")
    return value


# --------------------------------------------------------------------------------------------
# Data sets
# --------------------------------------------------------------------------------------------


def _uniform_and_gaussian(key, num: int, dtype):
    """v ~ U[0, 1) and eps ~ N(0, I_2) per point, independent, from a single PRNG call.

    eps comes from two more uniforms by the Box-Muller transform,
    eps = sqrt(-2 log(1 - w)) (cos 2 pi w', sin 2 pi w'), with 1 - w in (0, 1]. One call to
    the generator compiles in about half the time of ``split`` + ``uniform`` + ``normal``.
    Like ``jax.random.normal``, the tail is cut where the uniforms' resolution ends:
    |eps| <= sqrt(2 * 23 log 2) = 5.6 in float32 (a 2-D Gaussian exceeds it with probability 1e-7).
    """
    w = jax.random.uniform(key, (num, 3), dtype)
    radius = jnp.sqrt(-2 * jnp.log1p(-w[:, 1]))
    angle = 2 * jnp.pi * w[:, 2]
    return w[:, 0], radius[:, None] * jnp.stack([jnp.cos(angle), jnp.sin(angle)], axis=-1)


def eight_gaussians(key, num: int, *, radius=2.0, scale=0.1) -> jax.Array:
    r"""Samples of eight Gaussians of equal weight whose means lie evenly on a circle.

    $$ p(x) = \frac{1}{8}\sum_{k=0}^{7}\mathcal{N}\big(x;\ r\,(\cos\tfrac{2\pi k}{8},\,
       \sin\tfrac{2\pi k}{8}),\ s^2 I\big), $$

    with r = ``radius`` and s = ``scale``. Each point picks its component k uniformly at
    random. The mixture has mean 0 and covariance $(r^2/2 + s^2)\,I$; its exact log-density is
    [eight_gaussians_log_prob][probdiff.data.eight_gaussians_log_prob].

    Args:
        key: a JAX PRNG key.
        num: the number of points, a positive integer (static under ``jit``).
        radius: r, the radius of the circle of means, finite and >= 0.
        scale: s, the standard deviation of each component, finite and > 0.

    Returns:
        An array of shape ``(num, 2)``, float32 (float64 under ``jax_enable_x64``).

    Raises:
        ValueError: ``num`` is not a positive integer, or ``radius`` or ``scale`` is out of
            range (checked when concrete).

    Examples:
        >>> import jax
        >>> from probdiff.data import eight_gaussians
        >>> x = eight_gaussians(jax.random.key(0), 1000)
        >>> x.shape, x.dtype
        ((1000, 2), dtype('float32'))
        >>> bool(abs(float(((x ** 2).sum(1) ** 0.5).mean()) - 2.0) < 0.05)
        True
    """
    num = _check_num(num)
    _check_scalar(radius, "radius", positive=False)
    _check_scalar(scale, "scale", positive=True)
    return _eight_gaussians(key, num, radius, scale)


@functools.partial(jax.jit, static_argnums=1)
def _eight_gaussians(key, num, radius, scale):
    dtype = jnp.result_type(float)
    v, eps = _uniform_and_gaussian(key, num, dtype)
    # k = floor(8 v): v is a multiple of 2^-23 (2^-52 in float64), so each k has probability 1/8.
    k = jnp.floor(8 * v).astype(jnp.int32)
    means = jnp.asarray(radius, dtype) * jnp.asarray(_EIGHT_DIRECTIONS, dtype)[k]
    return means + jnp.asarray(scale, dtype) * eps


def eight_gaussians_log_prob(x, radius=2.0, scale=0.1) -> jax.Array:
    r"""The exact log-density of [eight_gaussians][probdiff.data.eight_gaussians].

    $$ \log p(x) = \operatorname{logsumexp}_{k=0}^{7}\Big(-\frac{\lVert x - r\,d_k\rVert^2}
       {2s^2}\Big) - \log(2\pi s^2) - \log 8,\qquad d_k = (\cos\tfrac{2\pi k}{8},\,
       \sin\tfrac{2\pi k}{8}) . $$

    Args:
        x: points, shape ``batch + (2,)``.
        radius: r, the radius of the circle of means, finite and >= 0.
        scale: s, the standard deviation of each component, finite and > 0.

    Returns:
        log p(x), shape ``batch``, in the float dtype of ``x`` (at least float32).

    Raises:
        ValueError: ``x`` does not end in an axis of size 2, or ``radius`` or ``scale`` is
            out of range (checked when concrete).

    Examples:
        >>> import math
        >>> import jax.numpy as jnp
        >>> from probdiff.data import eight_gaussians_log_prob
        >>> lp = float(eight_gaussians_log_prob(jnp.array([2.0, 0.0]), radius=2.0, scale=0.1))
        >>> abs(lp - (-math.log(2 * math.pi * 0.01) - math.log(8))) < 1e-5   # at a mean
        True
    """
    x = jnp.asarray(x)
    if x.ndim < 1 or x.shape[-1] != 2:
        raise ValueError(f"x must have a last axis of size 2; got shape {tuple(x.shape)}")
    _check_scalar(radius, "radius", positive=False)
    _check_scalar(scale, "scale", positive=True)
    return _eight_gaussians_log_prob(x, radius, scale)


@jax.jit
def _eight_gaussians_log_prob(x, radius, scale):
    dtype = jnp.result_type(x, float)
    x = x.astype(dtype)
    scale = jnp.asarray(scale, dtype)
    means = jnp.asarray(radius, dtype) * jnp.asarray(_EIGHT_DIRECTIONS, dtype)
    sq = jnp.sum((x[..., None, :] - means) ** 2, axis=-1)
    log_norm = jnp.log(2 * jnp.pi * scale**2) + math.log(8)
    return jax.scipy.special.logsumexp(-sq / (2 * scale**2), axis=-1) - log_norm


def two_moons(key, num: int, *, noise=0.05) -> jax.Array:
    r"""Samples of two interleaving half circles ("two moons"), standardised.

    The rows alternate between the moons: rows 0, 2, 4, ... lie on the upper moon and rows
    1, 3, 5, ... on the lower one (so ``num - num // 2`` and ``num // 2`` points, and every
    slice of an even number of consecutive rows holds both moons equally), each row with its
    own $u \sim \mathcal{U}(0, \pi)$ and $\varepsilon \sim \mathcal{N}(0, I)$:

    $$ y = \begin{cases} (\cos u,\ \sin u) + \sigma\varepsilon & \text{upper moon,}\\
       (1 - \cos u,\ \tfrac12 - \sin u) + \sigma\varepsilon & \text{lower moon,} \end{cases}
       \qquad x = \frac{y - c}{a}, $$

    with $\sigma$ = ``noise``, $c = (1/2,\ 1/4)$ and $a = \sqrt{21/32 - 1/(2\pi)} \approx 0.70505$.
    The constants c and a are the mean and the root-mean-square per coordinate of the
    noiseless moons (the same a for both axes, so the shape is kept): over the two moons
    together, x has mean 0 and $\mathbb{E}\lVert x\rVert^2/2 = 1 + \sigma^2/a^2$.

    Args:
        key: a JAX PRNG key.
        num: the number of points, a positive integer (static under ``jit``).
        noise: $\sigma$, the standard deviation of the Gaussian noise before standardisation,
            finite and >= 0.

    Returns:
        An array of shape ``(num, 2)``, float32 (float64 under ``jax_enable_x64``).

    Raises:
        ValueError: ``num`` is not a positive integer, or ``noise`` is out of range
            (checked when concrete).

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from probdiff.data import two_moons
        >>> x = two_moons(jax.random.key(0), 500, noise=0.0)
        >>> y = x * 0.7050497 + jnp.array([0.5, 0.25])   # undo the standardisation
        >>> r = jnp.linalg.norm(y[::2], axis=1)   # even rows: the upper moon, on the unit circle
        >>> bool(jnp.allclose(r, 1.0, atol=1e-5))
        True
    """
    num = _check_num(num)
    _check_scalar(noise, "noise", positive=False)
    return _two_moons(key, num, noise)


@functools.partial(jax.jit, static_argnums=1)
def _two_moons(key, num, noise):
    dtype = jnp.result_type(float)
    v, eps = _uniform_and_gaussian(key, num, dtype)
    u = math.pi * v
    cos_u, sin_u = jnp.cos(u), jnp.sin(u)
    upper = jnp.stack([cos_u, sin_u], axis=-1)
    lower = jnp.stack([1 - cos_u, 0.5 - sin_u], axis=-1)
    is_upper = (jnp.arange(num) % 2 == 0)[:, None]
    y = jnp.where(is_upper, upper, lower)
    y = y + jnp.asarray(noise, dtype) * eps
    return (y - jnp.asarray(_MOONS_CENTER, dtype)) / jnp.asarray(_MOONS_SCALE, dtype)


def swiss_roll(key, num: int, *, noise=0.05) -> jax.Array:
    r"""Samples of a 2-D swiss roll: a spiral of one and a half turns.

    $$ u \sim \mathcal{U}(\tfrac32\pi,\ \tfrac92\pi),\qquad
       x = \frac{(u\cos u,\ u\sin u)}{b} + \sigma\varepsilon,\qquad
       \varepsilon \sim \mathcal{N}(0, I), $$

    with $\sigma$ = ``noise`` and $b = \pi\sqrt{39/8} \approx 6.93645$, chosen so that the
    noiseless spiral has $\mathbb{E}\lVert x\rVert^2/2 = \mathbb{E}[u^2]/(2b^2) = 1$. The
    noise is added after the scaling. The noiseless mean is $(2,\ 2/(3\pi))/b \approx
    (0.288,\ 0.031)$; ``|x| * b`` recovers u when ``noise = 0``.

    Args:
        key: a JAX PRNG key.
        num: the number of points, a positive integer (static under ``jit``).
        noise: $\sigma$, the standard deviation of the Gaussian noise (in the scaled units),
            finite and >= 0.

    Returns:
        An array of shape ``(num, 2)``, float32 (float64 under ``jax_enable_x64``).

    Raises:
        ValueError: ``num`` is not a positive integer, or ``noise`` is out of range
            (checked when concrete).

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from probdiff.data import swiss_roll
        >>> x = swiss_roll(jax.random.key(0), 1000, noise=0.0)
        >>> u = jnp.linalg.norm(x, axis=1) * 6.936449
        >>> bool((u > 1.5 * jnp.pi - 1e-4).all() and (u < 4.5 * jnp.pi + 1e-4).all())
        True
    """
    num = _check_num(num)
    _check_scalar(noise, "noise", positive=False)
    return _swiss_roll(key, num, noise)


@functools.partial(jax.jit, static_argnums=1)
def _swiss_roll(key, num, noise):
    dtype = jnp.result_type(float)
    v, eps = _uniform_and_gaussian(key, num, dtype)
    u = 1.5 * math.pi + 3 * math.pi * v
    x = u[:, None] * jnp.stack([jnp.cos(u), jnp.sin(u)], axis=-1) / jnp.asarray(_SWISS_SCALE, dtype)
    return x + jnp.asarray(noise, dtype) * eps


#: The built-in data sets by name; each is called as ``DATASETS[name](key, num, **kwargs)``.
DATASETS = {
    "eight_gaussians": eight_gaussians,
    "two_moons": two_moons,
    "swiss_roll": swiss_roll,
}


def load(name: str, key, num: int, **kwargs) -> jax.Array:
    r"""Samples of the built-in data set called ``name`` (a key of ``DATASETS``).

    $$ \texttt{load}(\text{name}, \text{key}, \text{num}, \ldots) =
       \texttt{DATASETS[name]}(\text{key}, \text{num}, \ldots) . $$

    Args:
        name: ``"eight_gaussians"``, ``"two_moons"`` or ``"swiss_roll"``.
        key: a JAX PRNG key.
        num: the number of points, a positive integer.
        **kwargs: keyword arguments of that data set (``noise``, or ``radius`` and ``scale``).

    Returns:
        An array of shape ``(num, 2)``, float32 (float64 under ``jax_enable_x64``).

    Raises:
        ValueError: ``name`` is not a built-in data set; the message lists the valid names.

    Examples:
        >>> import jax
        >>> from probdiff import data
        >>> data.load("two_moons", jax.random.key(0), 8, noise=0.1).shape
        (8, 2)
    """
    if not isinstance(name, str) or name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; valid names: {', '.join(sorted(DATASETS))}")
    return DATASETS[name](key, num, **kwargs)


# --------------------------------------------------------------------------------------------
# User data
# --------------------------------------------------------------------------------------------

_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK"  # local file header PK\x03\x04, or PK\x05\x06 for an empty zip


# --------------------------------------------------------------------------- images
#: Number of grey levels of scikit-learn's 8x8 digits (pixels 0..16).
DIGITS_LEVELS = 17


def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 handwritten digits (UCI optical digits, 1797 images).

    Returns:
        ``(images, labels)``: images of shape ``(1797, 8, 8, 1)`` (channels last) with integer
        grey levels 0..16 as ``int32``, and labels 0..9 of shape ``(1797,)``. The levels go
        through [dequantize][probdiff.data.dequantize] with ``levels=17`` before a diffusion
        sees them.

    Raises:
        ImportError: naming the package to install when scikit-learn is missing.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - scikit-learn is a dependency
        raise ImportError("probdiff.data.digits needs scikit-learn: pip install scikit-learn") from err
    bunch = load_digits()
    images = np.asarray(bunch.images, np.int32)[..., None]
    return images, np.asarray(bunch.target, np.int32)


def dequantize(key, levels_array, levels: int) -> jax.Array:
    r"""Uniform dequantisation of integer pixels k in 0..L-1 into [-1, 1).

    $$ y = \frac{2\,(k + u)}{L} - 1,\qquad u\sim\mathcal{U}[0, 1)^D , $$

    so each level k owns the cell [2k/L - 1, 2(k+1)/L - 1) and y is uniform inside it. Any
    density p(y) then bounds the probability of the discrete image (Jensen, Theis et al.
    2016): log P(k) >= E_u[log p(y)] + D log(2 / L); see
    [discrete_bits_per_dim][probdiff.data.discrete_bits_per_dim].

    Args:
        key: a JAX PRNG key for u.
        levels_array: integer pixels in 0..L-1, any shape.
        levels: L >= 2.

    Returns:
        y, float32 (float64 under ``jax_enable_x64``), the shape of ``levels_array``.
    """
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise ValueError(f"levels must be an integer >= 2; got {levels!r}")
    k = jnp.asarray(levels_array)
    if not jnp.issubdtype(k.dtype, jnp.integer):
        raise TypeError(f"levels_array must hold integers 0..{levels - 1}; got dtype {k.dtype}")
    if is_concrete(k) and k.size and (int(k.min()) < 0 or int(k.max()) >= levels):
        raise ValueError(
            f"levels_array must lie in 0..{levels - 1}; got values in {int(k.min())}..{int(k.max())}"
        )
    dtype = jnp.result_type(float)
    u = jax.random.uniform(key, k.shape, dtype)
    return 2.0 * (k.astype(dtype) + u) / levels - 1.0


def discrete_bits_per_dim(log_density_nats, num_dims: int, levels: int):
    r"""Bits per dimension of discrete data from a (bound on the) density of its dequantised form.

    $$ \text{bits/dim} = -\frac{\log p(y) + D\log(2/L)}{D\log 2}, $$

    with y from [dequantize][probdiff.data.dequantize]: D log(2/L) is the log-Jacobian of
    k + u -> y. Given an ELBO of y, the result is an upper bound on -log2 P(k) / D. A density
    uniform on [-1, 1]^D gives log2 L, the cost of storing each level without a model.

    Args:
        log_density_nats: log p(y) or an ELBO of it, per image, any shape.
        num_dims: D, the number of pixels per image (times channels).
        levels: L, the number of grey levels.
    """
    if isinstance(num_dims, bool) or not isinstance(num_dims, int) or num_dims < 1:
        raise ValueError(f"num_dims must be a positive integer; got {num_dims!r}")
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise ValueError(f"levels must be an integer >= 2; got {levels!r}")
    return -(jnp.asarray(log_density_nats) + num_dims * math.log(2.0 / levels)) / (num_dims * math.log(2.0))


def _npy_header_dtype(fp):
    """The dtype in a .npy header (format 1.0 or 2.0), or None if it cannot be read here."""
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fp)[2]
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(fp)[2]
    return None  # format 3.0: np.load below still refuses object arrays


def _dtype_problem(dtype) -> str | None:
    """Why an array of ``dtype`` is not usable data, or None if it is (real numbers)."""
    if dtype.hasobject:
        return f"holds an array of Python objects (dtype {dtype}), which is never unpickled"
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        return f"has a non-numeric dtype {dtype}; expected integers or floating-point numbers"
    return None


def load_array(path, *, event_shape=None) -> jax.Array:
    r"""User data from a ``.npy`` or ``.npz`` file, checked, as a float array of shape (N, ...).

    The file holds one point per row: an array of shape $(N,) + \text{event\_shape}$ with
    $N \ge 1$ and at least 2 dimensions, integer or floating-point, with finite values. A
    ``.npz`` file is read as its only array, else as its array named ``x``, else as its array
    named ``data``. Files are read with ``allow_pickle=False``: an array of Python objects is
    refused without being unpickled. The kind of file is told by its first bytes (the NumPy
    or zip magic), not by its name.

    Args:
        path: the file, a ``str`` or ``os.PathLike``.
        event_shape: if given, the required shape of one row, e.g. ``(2,)``.

    Returns:
        The array, float32 (float64 under ``jax_enable_x64``).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is corrupt or not a ``.npy``/``.npz`` file; a ``.npz`` file has
            no array or several arrays none of which is named ``x`` or ``data`` (the message
            lists the names); the array has fewer than 2 dimensions, no element, a dtype that
            is not integer or floating-point, a row that is not ``event_shape``, or a row
            holding NaN or +-inf (the message names the first such row, counted from 0; a
            value too large for float32 counts as inf). Every message names the file.

    Examples:
        >>> import tempfile, os
        >>> import numpy as np
        >>> from probdiff.data import load_array
        >>> path = os.path.join(tempfile.mkdtemp(), "points.npz")
        >>> np.savez(path, x=np.arange(6).reshape(3, 2))
        >>> x = load_array(path, event_shape=(2,))
        >>> x.shape, x.dtype
        ((3, 2), dtype('float32'))
    """
    path = Path(path)
    where = f"file {path}"
    if not path.exists():
        raise FileNotFoundError(f"{where} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"{where} is a folder; expected a .npy or .npz file")
    with open(path, "rb") as f:
        magic = f.read(len(_NPY_MAGIC))
    if magic.startswith(_ZIP_MAGIC):
        arr = _read_npz(path, where)
    elif magic == _NPY_MAGIC:
        arr = _read_npy(path, where)
    else:
        raise ValueError(
            f"{where} is not a .npy or .npz file (it does not start with the NumPy or zip magic "
            "bytes), or it is corrupt; save arrays with numpy.save or numpy.savez"
        )
    return _checked_array(arr, where, event_shape)


def _read_npy(path: Path, where: str) -> np.ndarray:
    try:
        with open(path, "rb") as f:
            dtype = _npy_header_dtype(f)
    except MemoryError:
        raise
    except Exception as err:
        raise ValueError(f"{where} is corrupt: its .npy header cannot be read ({err})") from err
    problem = dtype is not None and _dtype_problem(dtype)
    if problem:
        raise ValueError(f"{where} {problem}")
    try:
        return np.load(path, allow_pickle=False)
    except MemoryError:
        raise
    except Exception as err:
        raise ValueError(f"{where} is corrupt or truncated: {type(err).__name__}: {err}") from err


def _read_npz(path: Path, where: str) -> np.ndarray:
    try:
        with zipfile.ZipFile(path) as zf:
            members = [n for n in zf.namelist() if n.endswith(".npy")]
            names = [n[: -len(".npy")] for n in members]
            if not names:
                raise ValueError(f"{where} is a .npz file that holds no array")
            if len(names) == 1:
                name = names[0]
            elif "x" in names:
                name = "x"
            elif "data" in names:
                name = "data"
            else:
                raise ValueError(
                    f"{where} holds several arrays ({', '.join(repr(n) for n in sorted(names))}) and "
                    "none is named 'x' or 'data'; save the points alone, or under the name 'x'"
                )
            with zf.open(name + ".npy") as member:
                dtype = _npy_header_dtype(member)
    except ValueError as err:
        if str(err).startswith(where):
            raise
        raise ValueError(f"{where} is corrupt: {err}") from err
    except MemoryError:
        raise
    except Exception as err:
        raise ValueError(f"{where} is corrupt or truncated: {type(err).__name__}: {err}") from err
    problem = dtype is not None and _dtype_problem(dtype)
    if problem:
        raise ValueError(f"{where}: array {name!r} {problem}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return npz[name]
    except MemoryError:
        raise
    except Exception as err:
        raise ValueError(f"{where} is corrupt or truncated: {type(err).__name__}: {err}") from err


def _checked_array(arr: np.ndarray, where: str, event_shape) -> jax.Array:
    problem = _dtype_problem(arr.dtype)
    if problem:
        raise ValueError(f"{where} {problem}")
    if arr.ndim < 2:
        raise ValueError(
            f"{where} holds an array of shape {arr.shape}; expected 2-D or more, one point per row "
            "(shape (N, D) or (N,) + event_shape)"
        )
    if arr.size == 0:
        raise ValueError(f"{where} holds an empty array (shape {arr.shape}); expected at least one point")
    if event_shape is not None:
        event_shape = (event_shape,) if isinstance(event_shape, int) else tuple(int(d) for d in event_shape)
        if arr.shape[1:] != event_shape:
            raise ValueError(
                f"{where} holds rows of shape {arr.shape[1:]}; expected event_shape = {event_shape}"
            )
    dtype = np.dtype(jnp.result_type(float))
    _check_rows_finite(arr, where, "")
    with np.errstate(over="ignore"):
        cast = arr.astype(dtype)
    _check_rows_finite(cast, where, f" after conversion to {dtype} (a value exceeds its range)")
    return jnp.asarray(cast)


def _check_rows_finite(arr: np.ndarray, where: str, note: str) -> None:
    if not np.issubdtype(arr.dtype, np.floating):
        return
    rows = arr.reshape(arr.shape[0], -1)
    bad = ~np.isfinite(rows)
    if bad.any():
        row = int(np.argmax(bad.any(axis=1)))
        value = rows[row][bad[row]][0]
        what = "NaN" if np.isnan(value) else ("inf" if value > 0 else "-inf")
        raise ValueError(f"{where}: row {row} holds {what}{note} (rows counted from 0)")


# --------------------------------------------------------------------------------------------
# Two-sample distances
# --------------------------------------------------------------------------------------------


def _two_samples(x, y):
    """``x`` and ``y`` as (n, d) and (m, d) float arrays with the same row shape, n, m >= 2."""
    x, y = jnp.asarray(x), jnp.asarray(y)
    if x.ndim < 1 or y.ndim < 1:
        raise ValueError(f"x and y must be samples with one point per row; got shapes {x.shape} and {y.shape}")
    if x.shape[1:] != y.shape[1:]:
        raise ValueError(
            f"x and y must have points of the same shape; got x.shape = {x.shape}, y.shape = {y.shape}"
        )
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError(
            f"x and y must hold at least 2 points each (for the unbiased within-sample terms); "
            f"got {x.shape[0]} and {y.shape[0]}"
        )
    dtype = jnp.result_type(x, y, float)
    return x.reshape(x.shape[0], -1).astype(dtype), y.reshape(y.shape[0], -1).astype(dtype)


def _sq_dists(a, b):
    """Squared Euclidean distances between the rows of a (n, d) and b (m, d): shape (n, m)."""
    return jnp.sum((a[:, None, :] - b[None, :, :]) ** 2, axis=-1)


def _dists(a, b):
    """Euclidean distances, with a finite (zero) gradient where two points coincide."""
    sq = _sq_dists(a, b)
    pos = sq > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def _offdiag_mean(k):
    """Mean of the off-diagonal entries of a square matrix."""
    n = k.shape[0]
    return jnp.sum(jnp.where(jnp.eye(n, dtype=bool), 0.0, k)) / (n * (n - 1))


def energy_distance(x, y) -> jax.Array:
    r"""The squared energy distance between two samples, with unbiased within-sample terms.

    $$ \widehat{D^2} = \frac{2}{nm}\sum_{i,j}\lVert x_i - y_j\rVert
       - \frac{1}{n(n-1)}\sum_{i\ne i'}\lVert x_i - x_{i'}\rVert
       - \frac{1}{m(m-1)}\sum_{j\ne j'}\lVert y_j - y_{j'}\rVert , $$

    an unbiased estimate of $D^2(P, Q) = 2\,\mathbb{E}\lVert X-Y\rVert - \mathbb{E}\lVert X-X'\rVert
    - \mathbb{E}\lVert Y-Y'\rVert$ (Székely and Rizzo), which is >= 0 and 0 only when P = Q. The
    estimate itself can be slightly negative. Points of any shape are flattened to vectors.
    Cost O(n m d) time; the (n, m) distance matrices are held in memory.

    Args:
        x: n >= 2 points from P, shape ``(n,) + event``.
        y: m >= 2 points from Q, shape ``(m,) + event``.

    Returns:
        A scalar, in the promoted float dtype of ``x`` and ``y`` (at least float32).

    Raises:
        ValueError: the points of ``x`` and ``y`` differ in shape, or a sample has fewer than
            2 points.

    Examples:
        >>> import jax
        >>> from probdiff.data import energy_distance, eight_gaussians, two_moons
        >>> k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
        >>> same = energy_distance(eight_gaussians(k1, 300), eight_gaussians(k2, 300))
        >>> diff = energy_distance(eight_gaussians(k1, 300), two_moons(k3, 300))
        >>> bool(abs(float(same)) < 0.05 < float(diff))
        True
    """
    return _energy_distance(*_two_samples(x, y))


@jax.jit
def _energy_distance(x, y):
    n, m = x.shape[0], y.shape[0]
    xy = jnp.mean(_dists(x, y))
    xx = jnp.sum(_dists(x, x)) / (n * (n - 1))
    yy = jnp.sum(_dists(y, y)) / (m * (m - 1))
    return 2 * xy - xx - yy


def mmd_rbf(x, y, bandwidth) -> jax.Array:
    r"""The unbiased squared maximum mean discrepancy between two samples, Gaussian kernel.

    $$ \widehat{\mathrm{MMD}^2} = \frac{1}{n(n-1)}\sum_{i\ne i'}k(x_i, x_{i'})
       + \frac{1}{m(m-1)}\sum_{j\ne j'}k(y_j, y_{j'}) - \frac{2}{nm}\sum_{i,j}k(x_i, y_j),
       \qquad k(a, b) = \exp\Big(-\frac{\lVert a-b\rVert^2}{2h^2}\Big), $$

    with h = ``bandwidth`` (Gretton et al. 2012, the U-statistic). It estimates
    $\mathrm{MMD}^2(P, Q)$ without bias and can be slightly negative. Points of any shape are
    flattened to vectors.

    Args:
        x: n >= 2 points from P, shape ``(n,) + event``.
        y: m >= 2 points from Q, shape ``(m,) + event``.
        bandwidth: h, the kernel's length scale, a finite scalar > 0 (checked when concrete).

    Returns:
        A scalar, in the promoted float dtype of ``x`` and ``y`` (at least float32).

    Raises:
        ValueError: the points of ``x`` and ``y`` differ in shape, a sample has fewer than
            2 points, or ``bandwidth`` is out of range.

    Examples:
        >>> import jax.numpy as jnp
        >>> from probdiff.data import mmd_rbf
        >>> x = jnp.array([[0.0, 0.0], [1.0, 0.0]])
        >>> round(float(mmd_rbf(x, x + 10.0, bandwidth=1.0)), 4)   # e^{-1/2} + e^{-1/2} - 0
        1.2131
    """
    x, y = _two_samples(x, y)
    _check_scalar(bandwidth, "bandwidth", positive=True)
    return _mmd_rbf(x, y, bandwidth)


@jax.jit
def _mmd_rbf(x, y, bandwidth):
    h2 = 2 * jnp.asarray(bandwidth, x.dtype) ** 2
    kxx = _offdiag_mean(jnp.exp(-_sq_dists(x, x) / h2))
    kyy = _offdiag_mean(jnp.exp(-_sq_dists(y, y) / h2))
    kxy = jnp.mean(jnp.exp(-_sq_dists(x, y) / h2))
    return kxx + kyy - 2 * kxy
