"""Memory against T, read off XLA's account of the compiled programs (no timing, no noise).

``compiled.memory_analysis()`` gives the bytes of a program's arguments, outputs and temporaries;
their sum (less aliased buffers) is what the program needs at its peak. The checks compare T = 100
with T = 4000 against what each design predicts, with margins set so that the failure the test
guards against would exceed them many times over:

* a training step draws t and never builds the T latents: its memory must not grow with T at all
  beyond the schedule's own T-sized arrays; materialising x_{1:T} for the batch would add
  Delta T * B * D * 4 bytes = 16 MB here.
* the exact full-T ELBO streams over t in chunks and adds each chunk into a running sum: it keeps
  nothing per example and t, only T-vectors like the schedule's (the same margin of sixteen
  float32 T-vectors, 250 KB, against the Delta T * N * 4 bytes = 4 MB that even one stacked
  scalar per (t, example) would take); evaluating all t at once (``chunk_size=None``) holds
  Delta T * N * width * 4 bytes ~ 130 MB, and the test checks that this variant does exceed the
  margin, so the check is able to fail.
"""

from __future__ import annotations

import jax
import pytest

from probdiff import GaussianDiffusion, schedules
from probdiff.nets import MLP
from probdiff.recipes import build

T_SMALL, T_LARGE = 100, 4000
D_T = T_LARGE - T_SMALL


def peak_bytes(jitted, *args) -> int:
    m = jitted.lower(*args).compile().memory_analysis()
    if m is None:
        pytest.skip("this backend gives no memory analysis")
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes


def test_training_step_memory_does_not_grow_with_T():
    B, D = 256, 4
    x = jax.random.normal(jax.random.key(0), (B, D))
    peaks = {}
    for T in (T_SMALL, T_LARGE):
        r = build({"T": T, "hidden": [32, 32], "batch_size": B, "data_dim": D})
        state = r.svi.init(jax.random.key(1), x)
        peaks[T] = peak_bytes(jax.jit(r.svi.update), state, x)
    latents = D_T * B * D * 4
    # the schedule's arrays (a dozen T-vectors of float32) are the only T-sized data
    assert peaks[T_LARGE] - peaks[T_SMALL] <= 16 * D_T * 4, peaks
    assert 16 * D_T * 4 < latents / 50  # the bound is far below the materialised path


def test_full_T_elbo_streams_over_t():
    N, D, width = 256, 4, 32
    net = MLP(D, jax.random.key(2), hidden=(width, width))
    x = jax.random.normal(jax.random.key(3), (N, D))
    key = jax.random.key(4)
    peaks = {}
    for chunk, T in ((100, T_SMALL), (100, T_LARGE), (None, T_LARGE)):
        d = GaussianDiffusion(net, schedules.linear(T), (D,), chunk_size=chunk)
        peaks[chunk, T] = peak_bytes(jax.jit(d.elbo), key, x)
    # at T = 100 the 99 KLs fit one chunk of 100: chunk_size=None compiles the same program
    peaks[None, T_SMALL] = peaks[100, T_SMALL]
    margin = 16 * D_T * 4
    assert margin < D_T * N * 4 / 10
    grown = peaks[100, T_LARGE] - peaks[100, T_SMALL]
    assert grown <= margin, (grown, peaks)
    # all t at once holds every t's activations: the same check fails for it, by far
    assert peaks[None, T_LARGE] - peaks[None, T_SMALL] > 100 * margin, peaks
