r"""Figures of 2-D diffusions: the forward chain, the reverse chain and the ELBO by t.

Plotting belongs to the caller: these functions take arrays and return a Matplotlib
``Figure`` (drawn with the non-interactive Agg backend); nothing here shows a window.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import io  # noqa: E402
from pathlib import Path  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["plot_chains", "plot_denoising_terms", "save_png", "tile_images"]


def save_png(fig, path, *, dpi: int = 90, palette: bool = True) -> Path:
    """Save a Matplotlib figure as a PNG and close it.

    With ``palette=True`` the image is stored with a 256-colour palette (Pillow, which
    Matplotlib depends on): about a third of the size of an RGBA PNG, with the same look for
    line plots and scatter plots.

    Args:
        fig: the figure.
        path: where to write it.
        dpi: resolution.
        palette: quantise to 256 colours.

    Returns:
        the path written.
    """
    path = Path(path)
    if not palette:
        fig.savefig(path, dpi=dpi)
        plt.close(fig)
        return path
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    buf.seek(0)
    Image.open(buf).convert("RGB").quantize(256).save(path, optimize=True)
    return path


def _scatter(ax, x, color, title, lim):
    ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.4, color=color, linewidths=0)
    ax.set_title(title, fontsize=9)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_chains(forward, reverse, times, *, data=None, lim: float = 3.5):
    r"""Snapshots of the forward chain x_t ~ q(x_t | x_0) and the reverse chain at the same t.

    Args:
        forward: array ``(len(times), N, 2)``: forward-chain points at each t of ``times``.
        reverse: array ``(len(times), N, 2)``: reverse-chain points at each t of ``times``.
        times: the time indices shown, increasing (0 = data).
        data: optional ``(M, 2)`` data shown faintly under the reverse chain's t = 0 panel.
        lim: half-width of the square plotting window.

    Returns:
        A Matplotlib figure with two rows: q(x_t | x_0) (top) and p_theta(x_t) (bottom).
    """
    forward = np.asarray(forward)
    reverse = np.asarray(reverse)
    k = len(times)
    fig, axes = plt.subplots(2, k, figsize=(2.0 * k, 4.3), squeeze=False)
    for j, t in enumerate(times):
        title = "data $x_0$" if t == 0 else rf"$q(x_{{{t}}} \mid x_0)$"
        _scatter(axes[0, j], forward[j], "tab:blue", title, lim)
        if t == 0 and data is not None:
            d = np.asarray(data)
            axes[1, j].scatter(d[:, 0], d[:, 1], s=2, alpha=0.15, color="0.5", linewidths=0)
        _scatter(axes[1, j], reverse[j], "tab:orange", rf"$p_\theta(x_{{{t}}})$", lim)
    axes[0, 0].set_ylabel("forward (noising)")
    axes[1, 0].set_ylabel("reverse (sampling)")
    fig.tight_layout()
    return fig


def plot_denoising_terms(terms_by_t, *, exact=None, label: str = "Monte Carlo"):
    r"""The denoising-matching terms E KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)) against t.

    Args:
        terms_by_t: array ``(T - 1,)`` of the mean KL at t = 2..T (nats).
        exact: optional array of the same shape, a closed form to overlay.
        label: legend label of ``terms_by_t``.
    """
    terms_by_t = np.asarray(terms_by_t)
    t = np.arange(2, terms_by_t.shape[0] + 2)
    fig, ax = plt.subplots(figsize=(5.0, 3.2))
    ax.plot(t, terms_by_t, lw=1, label=label)
    if exact is not None:
        ax.plot(t, np.asarray(exact), lw=1, ls="--", color="k", label="closed form")
    ax.set_yscale("log")
    ax.set_xlabel("t")
    ax.set_ylabel("nats per example")
    ax.set_title(r"denoising matching $E\,KL(q(x_{t-1}|x_t,x_0)\,\|\,p_\theta(x_{t-1}|x_t))$", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def tile_images(images, rows: int, image_shape=(8, 8)) -> np.ndarray:
    """Tile n grey images into one (rows * (h + 1) - 1, cols * (w + 1) - 1) picture, 1-pixel NaN gaps.

    Args:
        images: n images of ``image_shape`` pixels each, in any shape that reshapes to
            ``(n,) + image_shape`` (e.g. (n, 64) or (n, 8, 8, 1)).
        rows: the number of rows; the columns are ceil(n / rows).
        image_shape: (h, w).

    Returns:
        A float array for ``imshow``, NaN between the images (drawn blank).
    """
    h, w = image_shape
    images = np.asarray(images, np.float64).reshape((-1, h, w))
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ValueError(f"rows must be a positive integer; got {rows!r}")
    cols = -(-len(images) // rows)
    out = np.full((rows * (h + 1) - 1, cols * (w + 1) - 1), np.nan)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        out[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = image
    return out
