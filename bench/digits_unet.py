"""Training throughput of the digits UNet on CPU: probdiff (JAX) against the same network in PyTorch.

Run from the repository root:

    python bench/digits_unet.py            # full run (~6 min on 2 CPU cores)
    python bench/digits_unet.py --quick    # smoke run (< 2 min; fewer steps and rounds, no torch.compile)
    python bench/digits_unet.py --out bench/results/digits_unet.json

Data: sklearn's ``load_digits()`` (1797 images of 8 x 8, values 0..16) scaled to [-1, 1]; channels
last (1797, 8, 8, 1) for JAX, NCHW (1797, 1, 8, 8) for PyTorch.

Network: ``probdiff.unet.UNet(1, key, base=32, mults=(1, 2), time_dim=64, groups=8)``, and the same
architecture written with ``torch.nn`` (Conv2d, GroupNorm, SiLU, Linear, nearest upsampling), built
from the JAX initial weights (copied, transposed to PyTorch's layouts). The script asserts that the
parameter counts match, that both give the same eps-prediction, loss and gradients on one batch
(with the zero-initialised last conv perturbed), and records the differences.

Objective: DDPM's L_simple, t ~ U{1..1000}, linear betas 1e-4..0.02, eps ~ N(0, I),
x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, loss = mean over the batch of
||eps - eps_theta(x_t, t)||^2 summed over the pixels; Adam, lr 2e-4, batch 128.

Variants (each timed block runs ``--steps`` steps):

A          probdiff's path: ``SVI(model, lambda x: None, optax.adam(2e-4), DiffusionELBO("simple"))``
           with the UNet registered by ``eqx_module`` in ``GaussianDiffusion(net, schedules.linear(1000),
           (8, 8, 1))`` observed in a plate, driven by ``probdiff.training.fit(svi, data, steps,
           batch_size=128, steps_per_call=steps, state=previous)`` (one compiled ``lax.scan`` block per
           call, plus fit's EMA and NaN guard). Its loss is the sum over the batch (a plate), not the
           mean: Adam's update does not depend on that constant factor (up to its epsilon).
B          hand-written JAX: the same UNet, ``jax.value_and_grad`` + ``optax.adam(2e-4)``, minibatches
           drawn exactly as ``fit`` draws them, ``steps`` steps in one jitted ``lax.scan``.
B_lax      diagnostic, the "before": B with every convolution computed by
           ``lax.conv_general_dilated`` (NHWC/HWIO), i.e. XLA's CPU convolution, and the upsampling done
           by repeating pixels. Inside ``lax.scan`` its backward convolutions fall back to naive loops
           (~20x slower, see the README), so it is timed as one jitted step per Python call (its best
           case); one scanned block of three steps is timed once and recorded as ``B_lax_scan`` (full
           mode only).
T          PyTorch eager, ``torch.set_num_threads(os.cpu_count())``.
T1         PyTorch eager with one thread (diagnostic: on a 2-core machine that another process
           shares, OpenMP's two threads wait on each other at every op).
T_compile  ``torch.compile`` of the PyTorch network (full mode only; skipped if it fails).

Rounds are interleaved in one process, the order rotated by one variant each round, with a 1 s
pause before every timed block so that the previous variant's spinning worker threads (OpenMP's
or XLA's) do not compete with the next one. The summary reports medians of steps/s and ratios
of medians (and the median of the per-round ratios); compile times are excluded from them and
recorded separately.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import statistics
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import optax
import torch
import torch.nn.functional as F
from _env import machine_info, timestamped_log, versions, write_result
from numpyro.contrib.module import eqx_module
from numpyro.infer import SVI
from torch import nn

import probdiff.unet as unet_mod
from probdiff import GaussianDiffusion, schedules
from probdiff.infer import DiffusionELBO
from probdiff.training import fit
from probdiff.unet import UNet

BATCH = 128
T_STEPS = 1000
LR = 2e-4
SCAN_LAX_STEPS = 3
PAUSE_S = 1.0  # idle time before every timed block
NET_KW = {"base": 32, "mults": (1, 2), "time_dim": 64, "groups": 8}


# --------------------------------------------------------------------------- data
def load_data():
    """Digits scaled to [-1, 1]: (JAX array (1797, 8, 8, 1), torch tensor (1797, 1, 8, 8))."""
    from sklearn.datasets import load_digits

    x = load_digits().images.astype(np.float32) / 16.0 * 2.0 - 1.0
    return jnp.asarray(x[..., None]), torch.from_numpy(np.ascontiguousarray(x[:, None]))


# --------------------------------------------------------------------------- the PyTorch network
class TorchResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3 -> + Linear(temb) -> GroupNorm -> SiLU -> conv3x3, plus skip."""

    def __init__(self, c_in, c_out, emb_dim, groups):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time = nn.Linear(emb_dim, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x))) + self.time(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.skip is None else self.skip(x)) + h


class TorchUNet(nn.Module):
    """The architecture of ``probdiff.unet.UNet`` in PyTorch (NCHW)."""

    def __init__(self, channels, *, base=32, mults=(1, 2), time_dim=64, groups=8):
        super().__init__()
        emb_dim = 4 * base
        widths = [base * m for m in mults]
        self.time_dim = time_dim
        self.conv_in = nn.Conv2d(channels, base, 3, padding=1)
        self.time1 = nn.Linear(time_dim, emb_dim)
        self.time2 = nn.Linear(emb_dim, emb_dim)
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        prev = base
        for i, w in enumerate(widths):
            self.down.append(TorchResBlock(prev, w, emb_dim, groups))
            if i < len(widths) - 1:
                self.downsample.append(nn.Conv2d(w, w, 3, stride=2, padding=1))
            prev = w
        self.mid = TorchResBlock(prev, prev, emb_dim, groups)
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i, w in enumerate(reversed(widths)):
            self.up.append(TorchResBlock(prev + w, w, emb_dim, groups))
            if i < len(widths) - 1:
                self.upsample.append(nn.Conv2d(w, w, 3, padding=1))
            prev = w
        self.norm_out = nn.GroupNorm(groups, prev)
        self.conv_out = nn.Conv2d(prev, channels, 3, padding=1)

    def forward(self, x, t):
        half = self.time_dim // 2
        freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32) / half)
        angles = t.to(torch.float32)[:, None] * freqs
        e = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
        emb = F.silu(self.time2(F.silu(self.time1(e))))
        h = self.conv_in(x)
        skips = []
        for i, block in enumerate(self.down):
            h = block(h, emb)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = self.mid(h, emb)
        for i, block in enumerate(self.up):
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
            if i < len(self.upsample):
                h = self.upsample[i](F.interpolate(h, scale_factor=2, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))


def torch_from_jax(net: UNet) -> TorchUNet:
    """A TorchUNet carrying the weights of ``net`` (HWIO -> OIHW, (in, out) -> (out, in))."""
    tnet = TorchUNet(net.channels, **NET_KW)

    def conv(tc, jc):
        tc.weight.data = torch.from_numpy(np.asarray(jc.w).transpose(3, 2, 0, 1).copy())
        tc.bias.data = torch.from_numpy(np.asarray(jc.b).copy())

    def norm(tn, jn):
        tn.weight.data = torch.from_numpy(np.asarray(jn.scale).copy())
        tn.bias.data = torch.from_numpy(np.asarray(jn.bias).copy())

    def lin(tl, w, b):
        tl.weight.data = torch.from_numpy(np.asarray(w).T.copy())
        tl.bias.data = torch.from_numpy(np.asarray(b).copy())

    def block(tb, jb):
        norm(tb.norm1, jb.norm1)
        conv(tb.conv1, jb.conv1)
        lin(tb.time, jb.time_w, jb.time_b)
        norm(tb.norm2, jb.norm2)
        conv(tb.conv2, jb.conv2)
        if jb.skip is not None:
            conv(tb.skip, jb.skip)

    conv(tnet.conv_in, net.conv_in)
    w1, b1, w2, b2 = net.time_mlp
    lin(tnet.time1, w1, b1)
    lin(tnet.time2, w2, b2)
    for tb, jb in zip(tnet.down, net.down, strict=True):
        block(tb, jb)
    for tc, jc in zip(tnet.downsample, net.downsample, strict=True):
        conv(tc, jc)
    block(tnet.mid, net.mid)
    for tb, jb in zip(tnet.up, net.up, strict=True):
        block(tb, jb)
    for tc, jc in zip(tnet.upsample, net.upsample, strict=True):
        conv(tc, jc)
    norm(tnet.norm_out, net.norm_out)
    conv(tnet.conv_out, net.conv_out)
    return tnet


# --------------------------------------------------------------------------- the "before": XLA convolutions
def _lax_conv2d(x, w, b=None, *, stride: int = 1):
    k = w.shape[0]
    p = (k - 1) // 2
    y = jax.lax.conv_general_dilated(x, w.astype(x.dtype), (stride, stride), ((p, p), (p, p)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y if b is None else y + b.astype(x.dtype)


def _lax_upsample_conv2d(x, w, b=None):
    n, h, wd, c = x.shape
    up = jnp.broadcast_to(x[:, :, None, :, None, :], (n, h, 2, wd, 2, c)).reshape(n, 2 * h, 2 * wd, c)
    return _lax_conv2d(up, w, b)


@contextlib.contextmanager
def xla_convolutions():
    """Trace the UNet with ``lax.conv_general_dilated`` in place of its matmul convolutions."""
    saved = unet_mod.conv2d, unet_mod.upsample_conv2d
    unet_mod.conv2d, unet_mod.upsample_conv2d = _lax_conv2d, _lax_upsample_conv2d
    try:
        yield
    finally:
        unet_mod.conv2d, unet_mod.upsample_conv2d = saved


# --------------------------------------------------------------------------- JAX setups
def block_ready(x):
    return jax.tree_util.tree_map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, x)


def batch_at(data, key_data, step):
    """Minibatch ``step`` exactly as ``probdiff.training.fit`` draws it."""
    idx = jax.random.randint(jax.random.fold_in(key_data, step), (BATCH,), 0, data.shape[0])
    return data[idx]


def simple_loss(params, static, alpha_bar, key, x0):
    """mean_i ||eps_i - eps_theta(x_t, t_i)||^2 with t_i ~ U{1..T} (DDPM's Algorithm 1)."""
    net = eqx.combine(params, static)
    k_t, k_eps = jax.random.split(key)
    t = jax.random.randint(k_t, (x0.shape[0],), 1, T_STEPS + 1)
    eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
    ab = alpha_bar[t][:, None, None, None]
    x_t = jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * eps
    return jnp.mean(jnp.sum((eps - net(x_t, t)) ** 2, axis=(1, 2, 3)))


def make_hand_step(static, alpha_bar, data, key_data):
    opt = optax.adam(LR)

    def step(carry, _):
        params, opt_state, key, i = carry
        key, sub = jax.random.split(key)
        loss, grads = jax.value_and_grad(simple_loss)(params, static, alpha_bar, sub, batch_at(data, key_data, i))
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, key, i + 1), loss

    return opt, step


# --------------------------------------------------------------------------- PyTorch setup
class TorchTrainer:
    def __init__(self, tnet, data, alpha_bar, seed=0):
        self.net = tnet
        self.data = data
        self.alpha_bar = torch.from_numpy(np.array(alpha_bar, np.float32))
        self.opt = torch.optim.Adam(tnet.parameters(), lr=LR)
        self.gen = torch.Generator().manual_seed(seed)
        self.fn = tnet

    def step(self):
        idx = torch.randint(0, self.data.shape[0], (BATCH,), generator=self.gen)
        x0 = self.data[idx]
        t = torch.randint(1, T_STEPS + 1, (BATCH,), generator=self.gen)
        eps = torch.randn(x0.shape, generator=self.gen)
        ab = self.alpha_bar[t][:, None, None, None]
        x_t = ab.sqrt() * x0 + (1.0 - ab).sqrt() * eps
        loss = ((eps - self.fn(x_t, t)) ** 2).sum(dim=(1, 2, 3)).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss

    def run(self, steps):
        for _ in range(steps):
            loss = self.step()
        return float(loss)


# --------------------------------------------------------------------------- checks
def same_network_check(net, tnet, alpha_bar):
    """eps-prediction, loss and gradients of JAX and PyTorch on one batch, last conv perturbed."""
    key = jax.random.key(11)
    k1, k2, k3, k4 = jax.random.split(key, 4)
    w = 0.05 * jax.random.normal(k1, net.conv_out.w.shape)
    net = eqx.tree_at(lambda n: n.conv_out.w, net, w)
    tnet.conv_out.weight.data = torch.from_numpy(np.asarray(w).transpose(3, 2, 0, 1).copy())
    x0 = jax.random.uniform(k2, (16, 8, 8, 1), minval=-1.0, maxval=1.0)
    t = jax.random.randint(k3, (16,), 1, T_STEPS + 1)
    eps = jax.random.normal(k4, x0.shape)
    ab = alpha_bar[t][:, None, None, None]
    x_t = jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * eps
    params, static = eqx.partition(net, eqx.is_inexact_array)

    def loss(p):
        return jnp.mean(jnp.sum((eps - eqx.combine(p, static)(x_t, t)) ** 2, axis=(1, 2, 3)))

    out_j = np.asarray(jax.jit(lambda p: eqx.combine(p, static)(x_t, t))(params))
    loss_j, g_j = jax.jit(jax.value_and_grad(loss))(params)
    xt_t = torch.from_numpy(np.asarray(x_t).transpose(0, 3, 1, 2).copy())
    tt = torch.from_numpy(np.asarray(t).astype(np.int64))
    eps_t = torch.from_numpy(np.asarray(eps).transpose(0, 3, 1, 2).copy())
    tnet.zero_grad()
    out_t = tnet(xt_t, tt)
    loss_t = ((eps_t - out_t) ** 2).sum(dim=(1, 2, 3)).mean()
    loss_t.backward()
    # the gradient of conv_out's kernel and of the first block's conv1, relative to their size
    gw_j = np.asarray(g_j.conv_out.w).transpose(3, 2, 0, 1)
    gw_t = tnet.conv_out.weight.grad.numpy()
    g1_j = np.asarray(g_j.down[0].conv1.w).transpose(3, 2, 0, 1)
    g1_t = tnet.down[0].conv1.weight.grad.numpy()
    return {
        "eps_pred_max_abs_diff": float(np.max(np.abs(out_j - out_t.detach().numpy().transpose(0, 2, 3, 1)))),
        "eps_pred_max_abs": float(np.max(np.abs(out_j))),
        "loss_jax": float(loss_j),
        "loss_torch": float(loss_t.detach()),
        "grad_conv_out_rel_diff": float(np.max(np.abs(gw_j - gw_t)) / np.max(np.abs(gw_t))),
        "grad_down0_conv1_rel_diff": float(np.max(np.abs(g1_j - g1_t)) / np.max(np.abs(g1_t))),
    }


# --------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer steps and rounds, no torch.compile")
    ap.add_argument("--out", default="bench/results/digits_unet.json")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    args = ap.parse_args(argv)
    steps = args.steps or (5 if args.quick else 50)
    rounds = args.rounds or (2 if args.quick else 6)
    with_compile = not (args.quick or args.no_compile)
    n_threads = os.cpu_count()
    torch.set_num_threads(n_threads)
    torch.manual_seed(0)
    t_start = time.perf_counter()

    log = timestamped_log()

    vers = versions()
    vers["torch"] = torch.__version__
    import sklearn

    vers["scikit-learn"] = sklearn.__version__
    result = {"benchmark": "digits UNet training throughput, JAX vs PyTorch on CPU",
              "started_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "machine": machine_info(), "versions": vers,
              "parameters": {"quick": args.quick, "steps_per_block": steps, "rounds": rounds, "batch": BATCH,
                             "T": T_STEPS, "lr": LR, "net": {"channels": 1, **NET_KW},
                             "torch_num_threads": n_threads}}

    data_j, data_t = load_data()
    schedule = schedules.linear(T_STEPS)
    alpha_bar = schedule.alpha_bar
    net0 = UNet(1, jax.random.key(0), **NET_KW)
    params0, static = eqx.partition(net0, eqx.is_inexact_array)
    n_jax = sum(int(a.size) for a in jax.tree_util.tree_leaves(params0))
    tnet = torch_from_jax(net0)
    n_torch = sum(p.numel() for p in tnet.parameters())
    assert n_jax == n_torch, (n_jax, n_torch)
    result["parameter_count"] = {"jax": n_jax, "torch": n_torch}
    log(f"parameters: JAX {n_jax}, PyTorch {n_torch}")
    check = same_network_check(net0, torch_from_jax(net0), alpha_bar)
    result["same_network_check"] = check
    log("same network: " + ", ".join(f"{k} {v:.3g}" for k, v in check.items()))

    rng_key = jax.random.key(0)
    key_data, _ = jax.random.split(rng_key)
    compile_s = {}
    first_losses = {}

    # ---- A: probdiff's SVI + fit
    def model(x):
        net = eqx_module("eps_net", net0)
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", GaussianDiffusion(net, schedule, (8, 8, 1)), obs=x)

    svi = SVI(model, lambda x: None, optax.adam(LR), DiffusionELBO("simple"))
    t0 = time.perf_counter()
    res = fit(svi, data_j, steps, batch_size=BATCH, rng_key=rng_key, steps_per_call=steps, progress_bar=False)
    block_ready(res.state)
    first_a = time.perf_counter() - t0
    state_a = res.state
    first_losses["A"] = float(np.mean(res.losses)) / BATCH  # the plate sums over the batch

    def run_a():
        nonlocal state_a
        r = fit(svi, data_j, steps, batch_size=BATCH, rng_key=rng_key, state=state_a, steps_per_call=steps,
                progress_bar=False)
        block_ready(r.state)
        state_a = r.state
        return float(np.mean(r.losses)) / BATCH

    # ---- B: hand-written JAX
    opt, hand_step = make_hand_step(static, alpha_bar, data_j, key_data)
    carry_b = (params0, opt.init(params0), jax.random.key(7), jnp.zeros((), jnp.int32))
    t0 = time.perf_counter()
    block_b = jax.jit(lambda c: jax.lax.scan(hand_step, c, None, length=steps)).lower(carry_b).compile()
    compile_s["B"] = time.perf_counter() - t0
    carry_b, ls = block_b(carry_b)
    block_ready(carry_b)
    first_losses["B"] = float(jnp.mean(ls))

    def run_b():
        nonlocal carry_b
        carry_b, ls = block_b(carry_b)
        block_ready(carry_b)
        return float(jnp.mean(ls))

    # ---- B_lax: the same loop on XLA's convolutions, one jitted step per call. A fresh step
    # function: lax.scan caches the trace of its body per Python function, and B's step was
    # traced with the matmul convolutions.
    _, hand_step_l = make_hand_step(static, alpha_bar, data_j, key_data)
    with xla_convolutions():
        carry_l = (params0, opt.init(params0), jax.random.key(7), jnp.zeros((), jnp.int32))
        t0 = time.perf_counter()
        step_l = jax.jit(lambda c: hand_step_l(c, None)).lower(carry_l).compile()
        compile_s["B_lax (one step)"] = time.perf_counter() - t0
        if not args.quick:
            t0 = time.perf_counter()
            scan_l = jax.jit(lambda c: jax.lax.scan(hand_step_l, c, None, length=SCAN_LAX_STEPS)).lower(carry_l).compile()
            compile_s[f"B_lax_scan ({SCAN_LAX_STEPS}-step block)"] = time.perf_counter() - t0
    carry_l, _ = step_l(carry_l)
    block_ready(carry_l)
    if not args.quick:
        t0 = time.perf_counter()
        out = scan_l(carry_l)
        block_ready(out)
        result["B_lax_scan_steps_per_s"] = SCAN_LAX_STEPS / (time.perf_counter() - t0)
        log(f"B_lax_scan (XLA convolutions inside lax.scan): {result['B_lax_scan_steps_per_s']:.3f} steps/s")

    def run_l():
        nonlocal carry_l
        for _ in range(steps):
            carry_l, loss = step_l(carry_l)
        block_ready(carry_l)
        return float(loss)

    # ---- T, T1: PyTorch eager; T_compile
    trainer = TorchTrainer(tnet, data_t, np.asarray(alpha_bar))
    t0 = time.perf_counter()
    first_losses["T"] = trainer.run(3)
    compile_s["T (3 warm-up steps)"] = time.perf_counter() - t0
    trainer1 = TorchTrainer(torch_from_jax(net0), data_t, np.asarray(alpha_bar), seed=1)
    trainer1.run(3)

    def run_t():
        torch.set_num_threads(n_threads)
        return trainer.run(steps)

    def run_t1():
        torch.set_num_threads(1)
        try:
            return trainer1.run(steps)
        finally:
            torch.set_num_threads(n_threads)

    runners = {"A": run_a, "B": run_b, "B_lax": run_l, "T": run_t, "T1": run_t1}
    if with_compile:
        try:
            trainer_c = TorchTrainer(torch_from_jax(net0), data_t, np.asarray(alpha_bar), seed=2)
            trainer_c.fn = torch.compile(trainer_c.net)
            t0 = time.perf_counter()
            trainer_c.run(3)
            compile_s["T_compile (compile + 3 steps)"] = time.perf_counter() - t0
            runners["T_compile"] = lambda: trainer_c.run(steps)
        except Exception as e:  # noqa: BLE001
            result["T_compile_error"] = repr(e)[:500]
            log(f"torch.compile failed, skipped: {e!r}"[:300])

    # the compile time of A: first fit call (compile + one block) minus a steady block
    t0 = time.perf_counter()
    run_a()
    steady_a = time.perf_counter() - t0
    compile_s["A (first fit call - steady call)"] = first_a - steady_a
    log("compile s: " + ", ".join(f"{k} {v:.1f}" for k, v in compile_s.items()))

    # ---- interleaved rounds
    raw = {k: [] for k in runners}
    losses = {k: [] for k in runners}
    names = list(runners)
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            # let the previous variant's worker threads (OpenMP's, XLA's) go idle before timing
            time.sleep(PAUSE_S)
            t0 = time.perf_counter()
            losses[name].append(runners[name]())
            raw[name].append(time.perf_counter() - t0)
        log(f"round {r + 1}/{rounds}: " + "  ".join(f"{k} {steps / v[-1]:.2f}" for k, v in raw.items())
            + f" steps/s  (load {os.getloadavg()[0]:.2f})")

    med = {k: statistics.median(v) for k, v in raw.items()}
    sps = {k: steps / v for k, v in med.items()}

    def ratio(a, b):
        return {"ratio_of_medians": sps[a] / sps[b],
                "median_of_round_ratios": statistics.median(y / x for x, y in zip(raw[a], raw[b], strict=True))}

    summary = {k: {"median_s_per_block": med[k], "steps_per_s_median": sps[k],
                   "steps_per_s_min": steps / max(raw[k]), "steps_per_s_max": steps / min(raw[k])} for k in raw}
    ratios = {"A/T": ratio("A", "T"), "B/T": ratio("B", "T"), "A/B": ratio("A", "B"),
              "B_lax/T": ratio("B_lax", "T"), "B/B_lax": ratio("B", "B_lax"),
              "A/T1": ratio("A", "T1"), "T/T1": ratio("T", "T1")}
    if "T_compile" in raw:
        ratios["A/T_compile"] = ratio("A", "T_compile")
    result.update({"raw_s_per_block": raw, "mean_loss_per_block": losses, "first_block_mean_loss": first_losses,
                   "compile_s": compile_s, "summary": summary, "ratios": ratios,
                   "goal": {"A/T >= 1.0": sps["A"] / sps["T"] >= 1.0, "B/T >= 1.0": sps["B"] / sps["T"] >= 1.0}})
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["wall_s"] = time.perf_counter() - t_start

    print(f"\nsteps/s (median over {rounds} interleaved rounds of {steps} steps, batch {BATCH}, 8x8x1 digits)")
    print(f"{'variant':10s} {'steps/s':>9s} {'min-max':>15s} {'/ T':>6s}")
    for k in raw:
        print(f"{k:10s} {sps[k]:9.2f} {summary[k]['steps_per_s_min']:7.2f}-{summary[k]['steps_per_s_max']:<7.2f} "
              f"{sps[k] / sps['T']:6.2f}")
    print("ratios: " + ", ".join(f"{k} {v['ratio_of_medians']:.2f}" for k, v in ratios.items()))
    log(f"wrote {write_result(args.out, result)}")


if __name__ == "__main__":
    main()
