r"""Inpainting and denoising 8x8 digits with a trained diffusion prior: three posterior samplers.

The diffusion model trained by ``examples/train_digits.py`` (its EMA parameters, read from the
checkpoint) is the prior of the image in an ordinary NumPyro model, and a linear-Gaussian
observation of the image is the likelihood (``probdiff.inverse``):

    prior = GaussianDiffusion(unet, schedules.linear(T), (8, 8, 1))
    obs = inverse.Inpainting(mask, 0.05)       # or inverse.Denoising(0.3, (8, 8, 1))

    def model(y=None):
        with numpyro.plate("images", n):       # n held-out images, sampled jointly
            x = numpyro.sample("x", prior)
            numpyro.sample("y", obs(x), obs=y)

Two problems on ``--images`` held-out images of the checkpoint's split (its ``seed`` and ``test``;
the first image of each digit class in the split's order, while classes last), dequantised into
[-1, 1) as in training: **inpainting** (the bottom half missing, or a
random half with ``--mask random``; noise s = 0.05 on the observed pixels) and **denoising**
(every pixel seen through noise s = 0.3, a third of the pixel range [-1, 1)).

* ``numpyro.infer.Predictive(model, num_samples=...)`` draws x from the prior (the reverse chain)
  and y from the prior predictive (``prior_predictive.png``).
* The posterior p_theta(x | y) ∝ p_theta(x) p(y | x) is sampled by the kernels of
  ``probdiff.infer`` (``probdiff/infer/posterior.py``): ``TwistedSMC`` (K particles per run,
  asymptotically exact in K), ``DPS`` (diffusion posterior sampling: fast, biased) and
  ``AnnealedLangevin`` under ``numpyro.infer.MCMC`` (``chain_method="vectorized"``: annealed
  Langevin warm-up from t = T down to ``--t-final``, then MALA on p_{t_final}(x) p(y | x)).
  Every sampler runs several independent chains (for SMC and DPS: independent runs), and arviz
  reads them (``arviz.from_numpyro(mcmc)``; ``arviz.from_dict(posterior=sampler.get_samples(
  group_by_chain=True))``) for the bulk/tail ESS and split R-hat, summarised over the pixels the
  metric scores (median and worst). For SMC the draws of one run are its K particles after the
  final resampling, copies of each other where a particle was duplicated, so its ESS is that
  of the particle population, and R-hat compares the runs.
* Metrics per sampler and problem: the RMSE of the posterior mean to the true image on the pixels
  that were not observed (inpainting) or on all pixels (denoising), the average posterior
  standard deviation there, and the share of those pixels whose truth lies within two posterior
  SDs of the mean. For reference: the observation's own RMSE (denoising; for inpainting, on the
  observed pixels, which is the noise) and, for inpainting, the RMSE of filling the missing
  pixels with the per-pixel mean of the training images. All in pixel units of [-1, 1), where
  one grey level is 2 / 17 = 0.118. For SMC also its ESS trajectory over t, the number of
  resampling steps and the log-evidence estimate log p_theta(y) per run.

A plate makes the n images one joint posterior: the samplers treat x of shape (n, 8, 8, 1) as
one point. That is exact (the posterior factorises over the images) and is one network call per
step for all of them; DPS and the Langevin proposals act on every image separately, but the
SMC weights and the MALA acceptance are products over the images, so K particles or one
acceptance test serve all n images together (more images, faster weight degeneracy).

DPS uses its default tempered twist: untempered, the gradient of ell(x0_hat(x_t, t)) is of order
1e4 near t = T for this UNet (Tweedie's estimate divides by sqrt(alpha_bar_T) = 0.0064) and the
samples end in NaN at every guidance scale tried (1, 0.6, 0.3, 0.1). ``--t-final 10`` is where AnnealedLangevin samples: with t_final = 1
(the learned score at its roughest) the denoising RMSE was 0.180 against 0.141 at 10, and at 50
the prior p_50 blurs the posterior (noise SD 0.13): RMSE 0.140 but the posterior SD 0.185 against
0.117 and every truth inside two SDs; inpainting gave 0.22 at all three (a pair of held-out 6s,
1000 + 1000 iterations, 4 chains).

Expected output (defaults: the 3000-step, T = 1000, base-32 checkpoint of ``train_digits.py``;
held-out images 0 and 3 of its split, a 6 and a 2; measured on 2026-11-21 on 2 otherwise idle
CPU cores: 394 s in all, 12 s of it prior draws; each sampler's time includes its compilation,
which the tiny run below measures: 17 s SMC, 8 s DPS, 25-60 s Langevin). RMSE of the posterior
mean, mean posterior SD and 2-SD coverage on the scored pixels; arviz bulk ESS (median) and R-hat
(median / max) over them:

    inpainting (training-mean fill 0.556)  seconds  RMSE   SD    cover  ESS   R-hat
      TwistedSMC, K = 16, 2 runs               59   0.313  0.124  0.80    6   1.60 / 2.23
      DPS, 8 x 2 runs                          37   0.321  0.225  0.95   19   1.06 / 1.60
      AnnealedLangevin, 4 chains               73   0.310  0.209  0.88   15   1.21 / 2.24
    denoising (observation 0.279)
      TwistedSMC                               74   0.130  0.101  0.95   17   1.15 / 2.42
      DPS                                      40   0.131  0.103  0.91   19   1.08 / 1.70
      AnnealedLangevin                         77   0.166  0.120  0.94  138   1.02 / 1.58

All three complete the 6 (RMSE 0.17-0.22) far better than the 2, whose bottom stroke the top half
does not settle (0.38-0.42). Inpainting at s = 0.05 is hard on SMC: 326 and 259 of the 1000 steps
resample, the ESS falls to 1 of 16, and the runs' genealogies collapse, so its posterior SD is
half the others' and too small (coverage 0.80); log-evidence -469 and -454. Denoising resamples
14 and 21 times with the ESS never below 7 (log-evidence -64 and -61). The Langevin chains
settle in different completions of the missing half and do not leave them in 1000 iterations
(inpainting ESS 15 of 4000 draws, R-hat up to 2.2); on denoising they mix (ESS 137, R-hat 1.02).
DPS's ESS sits at arviz's cap n log10 n = 19.3 for 16 independent draws, and with 8 to 16 draws
per run the R-hats of DPS and SMC are noisy. Runs vary: on two held-out 6s the inpainting RMSEs
were 0.22 (SMC), 0.19 (DPS), 0.18 (Langevin).

Files in ``--out``: ``inverse_digits.png`` (per problem and image: the truth, the observation
with missing pixels in blue, posterior samples, mean and SD of each sampler),
``prior_predictive.png``, ``smc_ess.png`` (SMC's ESS over t, resampling steps marked) and
``inverse_digits.json`` (config and metrics).

Run: ``python examples/train_digits.py`` (once: about 10 minutes), then
``python examples/inverse_digits.py --out out/inverse_digits``; or tiny (a smoke test of an
untrained prior: about 1 and 2.5 minutes, nearly all of it compilation):
``python examples/train_digits.py --steps 20 --T 20 --base 8 --out /tmp/digits_tiny`` then
``python examples/inverse_digits.py --tiny --checkpoint /tmp/digits_tiny/checkpoint.safetensors
--out /tmp/inv_tiny``. ``--tiny`` also observes the inpainting pixels with s = 0.3: in a 20-step
chain beta_t / s^2 reaches 8 at s = 0.05, and the guidance steps of SMC and DPS overshoot until
they overflow.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import arviz as az  # noqa: E402
import equinox as eqx  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import numpyro  # noqa: E402
from numpyro.infer import MCMC, Predictive  # noqa: E402

from probdiff import GaussianDiffusion, data, inverse, schedules  # noqa: E402
from probdiff._io import parse_example_args, prepare_out_dir, write_json  # noqa: E402
from probdiff.checkpoint import load_checkpoint  # noqa: E402
from probdiff.infer import DPS, AnnealedLangevin, TwistedSMC  # noqa: E402
from probdiff.plotting import save_png, tile_images  # noqa: E402
from probdiff.unet import UNet  # noqa: E402

FILES = ("inverse_digits.png", "prior_predictive.png", "smc_ess.png", "inverse_digits.json")
L = data.DIGITS_LEVELS
SHAPE = (8, 8, 1)
EMA = ".ema['eps_net$params']"  # the leaf-name prefix of the EMA network parameters in a train_digits checkpoint
SAMPLERS = ("TwistedSMC", "DPS", "AnnealedLangevin")
MISSING = "#4a90d9"  # the colour of unobserved pixels

# sizes of a full run and of --tiny (used by the tests); a flag given explicitly wins
FULL = {
    "images": 2,
    "particles": 16,
    "smc_runs": 2,
    "samples": 8,
    "dps_runs": 2,
    "chains": 4,
    "warmup": 1000,
    "mcmc_samples": 1000,
    "prior_draws": 4,
    "inpaint_noise": 0.05,
}
TINY = {
    "images": 2,
    "particles": 4,
    "smc_runs": 2,
    "samples": 4,
    "dps_runs": 2,
    "chains": 2,
    "warmup": 20,
    "mcmc_samples": 20,
    "prior_draws": 2,
    "inpaint_noise": 0.3,
}


def load_eps_net(path):
    """The EMA eps-network of a ``train_digits.py`` checkpoint, and the training config.

    The checkpoint holds the whole training state; loaded without ``like`` it is a flat dict
    leaf name -> array. The UNet is rebuilt from the config, and each of its array leaves is
    looked up by its key path under the EMA prefix.
    """
    path = Path(path)
    if not path.exists():
        raise SystemExit(
            f"checkpoint {path} not found: train the prior first with `python examples/train_digits.py` "
            "(or pass --checkpoint PATH to a checkpoint it wrote)"
        )
    flat, meta = load_checkpoint(path)
    cfg = meta.get("config", {})
    missing = [k for k in ("base", "T", "seed", "test") if k not in cfg]
    if missing:
        raise SystemExit(
            f"checkpoint {path} has no {', '.join(missing)} in its config: not a train_digits.py checkpoint"
        )
    base = int(cfg["base"])
    net0 = UNet(1, jax.random.key(0), base=base, groups=min(8, base))
    like, static = eqx.partition(net0, eqx.is_array)
    with_path, treedef = jax.tree_util.tree_flatten_with_path(like)
    leaves = []
    for key_path, ref in with_path:
        name = EMA + jax.tree_util.keystr(key_path)
        if name not in flat:
            raise SystemExit(f"checkpoint {path} has no leaf {name}: not a train_digits.py checkpoint")
        value = jnp.asarray(flat[name])
        if value.shape != ref.shape or value.dtype != ref.dtype:
            raise SystemExit(
                f"leaf {name} of {path} has shape {value.shape} and dtype {value.dtype}; the UNet "
                f"of base {base} needs {ref.shape} and {ref.dtype}"
            )
        leaves.append(value)
    return eqx.combine(jax.tree_util.tree_unflatten(treedef, leaves), static), cfg


def pick_images(held_out, labels, n):
    """The first n held-out images (dataset indices), preferring one per digit class while classes last."""
    first = {}
    for i in held_out:
        first.setdefault(int(labels[i]), int(i))
    distinct = sorted(first.values(), key=lambda i: int(np.flatnonzero(held_out == i)[0]))[:n]
    rest = [int(i) for i in held_out if int(i) not in distinct]
    return np.asarray(distinct + rest[: n - len(distinct)])


def make_model(prior, obs, n):
    """The model of the module docstring: n images in a plate, each observed through ``obs``."""

    def model(y=None):
        with numpyro.plate("images", n):
            x = numpyro.sample("x", prior)
            numpyro.sample("y", obs(x), obs=y)

    return model


def to_levels(x):
    """Pixels in [-1, 1) to grey levels 0..16 (clipped), for display."""
    return np.clip(np.floor((np.asarray(x) + 1.0) / 2.0 * L), 0, L - 1)


def arviz_summary(idata, pixels):
    """Median and worst bulk/tail ESS and split R-hat of site x over the scored pixels (a boolean mask)."""
    x = idata.posterior["x"]
    with np.errstate(divide="ignore", invalid="ignore"):  # a pixel constant within every chain: R-hat NaN
        ess_bulk = np.asarray(az.ess(idata, var_names=["x"], method="bulk")["x"])[pixels]
        ess_tail = np.asarray(az.ess(idata, var_names=["x"], method="tail")["x"])[pixels]
        r_hat = np.asarray(az.rhat(idata, var_names=["x"])["x"])[pixels]
    return {
        "draws": int(x.sizes["chain"] * x.sizes["draw"]),
        "ess_bulk_median": float(np.nanmedian(ess_bulk)),
        "ess_bulk_min": float(np.nanmin(ess_bulk)),
        "ess_tail_min": float(np.nanmin(ess_tail)),
        "r_hat_median": float(np.nanmedian(r_hat)),
        "r_hat_max": float(np.nanmax(r_hat)),
        "r_hat_nan": int(np.isnan(r_hat).sum()),
    }


def posterior_metrics(samples, x_true, pixels):
    """RMSE of the posterior mean, mean posterior SD and 2-SD coverage on the scored pixels."""
    mean, sd = samples.mean(0), samples.std(0)
    err = (mean - x_true)[pixels]
    sq = np.where(pixels, mean - x_true, 0.0) ** 2
    per_image = np.sqrt(sq.sum(axis=(1, 2, 3)) / pixels.sum(axis=(1, 2, 3)))
    return {
        "rmse": float(np.sqrt(np.mean(err**2))),
        "rmse_per_image": per_image.tolist(),
        "mean_sd": float(sd[pixels].mean()),
        "coverage_2sd": float(np.mean(np.abs(err) <= 2 * sd[pixels])),
    }


def run_samplers(model, y, x_true, pixels, args, key):
    """TwistedSMC, DPS and AnnealedLangevin on one problem; samples (draws, n, 8, 8, 1) and results."""
    k_smc, k_dps, k_mcmc = jax.random.split(key, 3)
    samples, results = {}, {}

    t0 = time.perf_counter()
    smc = TwistedSMC(model, args.particles, num_chains=args.smc_runs, ess_threshold=args.ess_threshold).run(
        k_smc, y
    )
    smc_s = smc.get_samples(group_by_chain=True)["x"].block_until_ready()
    seconds = time.perf_counter() - t0
    extra = smc.get_extra_fields(group_by_chain=True)
    ess = np.asarray(extra["ess"])
    resampled = np.asarray(extra["resampled"])
    results["TwistedSMC"] = {
        "seconds": seconds,
        "arviz": arviz_summary(az.from_dict(posterior={"x": np.asarray(smc_s)}), pixels),
        "log_evidence": np.asarray(extra["log_evidence"]).tolist(),
        "resampling_steps": resampled.sum(1).tolist(),
        "ess_min": float(ess.min()),
        "final_ess": np.asarray(extra["final_ess"]).tolist(),
        "ess_trajectory": ess.tolist(),
        "resampled": resampled.astype(int).tolist(),
    }
    samples["TwistedSMC"] = np.asarray(smc_s).reshape((-1,) + smc_s.shape[2:])

    t0 = time.perf_counter()
    dps = DPS(model, args.samples, num_chains=args.dps_runs, scale=args.dps_scale).run(k_dps, y)
    dps_s = dps.get_samples(group_by_chain=True)["x"].block_until_ready()
    results["DPS"] = {
        "seconds": time.perf_counter() - t0,
        "arviz": arviz_summary(az.from_dict(posterior={"x": np.asarray(dps_s)}), pixels),
    }
    samples["DPS"] = np.asarray(dps_s).reshape((-1,) + dps_s.shape[2:])

    t0 = time.perf_counter()
    kernel = AnnealedLangevin(
        model,
        t_final=args.t_final,
        anneal_steps=args.anneal_steps,
        step_size=args.step_size,
        quadrature=args.quadrature,
    )
    mcmc = MCMC(
        kernel,
        num_warmup=args.warmup,
        num_samples=args.mcmc_samples,
        num_chains=args.chains,
        chain_method="vectorized",
        progress_bar=False,
    )
    mcmc.run(k_mcmc, y, extra_fields=("accept_prob", "log_kappa"))
    al_s = mcmc.get_samples(group_by_chain=True)["x"].block_until_ready()
    seconds = time.perf_counter() - t0
    fields = mcmc.get_extra_fields(group_by_chain=True)
    results["AnnealedLangevin"] = {
        "seconds": seconds,
        "arviz": arviz_summary(az.from_numpyro(mcmc, log_likelihood=False), pixels),
        "accept_prob": float(np.mean(fields["accept_prob"])),
        "kappa": np.exp(np.asarray(fields["log_kappa"])[:, -1]).tolist(),
    }
    samples["AnnealedLangevin"] = np.asarray(al_s).reshape((-1,) + al_s.shape[2:])

    for name in SAMPLERS:
        results[name].update(posterior_metrics(samples[name], x_true, pixels))
    return samples, results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--checkpoint",
        default="out/train_digits/checkpoint.safetensors",
        help="a checkpoint of examples/train_digits.py (default out/train_digits/checkpoint.safetensors)",
    )
    p.add_argument("--tiny", action="store_true", help="tiny budgets, for the tests (with a tiny checkpoint)")
    p.add_argument("--images", type=int, help=f"held-out images per problem (default {FULL['images']})")
    p.add_argument(
        "--mask",
        choices=("bottom", "random"),
        default="bottom",
        help="inpainting: the bottom half missing, or a random half of the pixels (default bottom)",
    )
    p.add_argument(
        "--inpaint-noise",
        type=float,
        help=f"inpainting noise s (default {FULL['inpaint_noise']}; {TINY['inpaint_noise']} with --tiny)",
    )
    p.add_argument("--denoise-noise", type=float, default=0.3, help="denoising noise s (default 0.3)")
    p.add_argument(
        "--particles", type=int, help=f"TwistedSMC particles per run (default {FULL['particles']})"
    )
    p.add_argument("--smc-runs", type=int, help=f"independent TwistedSMC runs (default {FULL['smc_runs']})")
    p.add_argument(
        "--ess-threshold", type=float, default=0.5, help="SMC resamples below this ESS / K (default 0.5)"
    )
    p.add_argument("--samples", type=int, help=f"DPS samples per run (default {FULL['samples']})")
    p.add_argument("--dps-runs", type=int, help=f"independent DPS runs (default {FULL['dps_runs']})")
    p.add_argument("--dps-scale", type=float, default=1.0, help="DPS guidance scale (default 1)")
    p.add_argument("--chains", type=int, help=f"AnnealedLangevin chains (default {FULL['chains']})")
    p.add_argument(
        "--warmup", type=int, help=f"AnnealedLangevin warm-up iterations (default {FULL['warmup']})"
    )
    p.add_argument(
        "--mcmc-samples",
        type=int,
        help=f"AnnealedLangevin samples per chain (default {FULL['mcmc_samples']})",
    )
    p.add_argument(
        "--anneal-steps",
        type=int,
        default=None,
        help="warm-up iterations spent annealing from T to --t-final (default: half the warm-up)",
    )
    p.add_argument(
        "--t-final",
        type=int,
        default=None,
        help="the noise level AnnealedLangevin samples at (default 10, at most T)",
    )
    p.add_argument(
        "--step-size", type=float, default=0.1, help="AnnealedLangevin's initial kappa (default 0.1)"
    )
    p.add_argument(
        "--quadrature",
        type=int,
        choices=(2, 3, 4),
        default=3,
        help="Gauss-Lobatto points of MALA's line integral (default 3)",
    )
    p.add_argument(
        "--prior-draws", type=int, help=f"prior and prior-predictive draws (default {FULL['prior_draws']})"
    )
    p.add_argument("--show", type=int, default=4, help="posterior samples shown per sampler (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/inverse_digits")
    p.add_argument("--overwrite", action="store_true")
    args = parse_example_args(p, argv, FULL, TINY)
    sizes = (
        args.images,
        args.particles,
        args.smc_runs,
        args.samples,
        args.dps_runs,
        args.chains,
        args.mcmc_samples,
        args.prior_draws,
        args.show,
    )
    if min(sizes) < 1 or args.warmup < 0:
        p.error("need positive sizes and --warmup >= 0")
    if min(args.smc_runs, args.dps_runs, args.chains) < 2:
        p.error("arviz's R-hat needs >= 2 chains: --smc-runs, --dps-runs and --chains must be >= 2")
    if not (args.inpaint_noise > 0 and args.denoise_noise > 0 and args.dps_scale > 0 and args.step_size > 0):
        p.error("noise scales, --dps-scale and --step-size must be > 0")
    if not 0 <= args.ess_threshold <= 1:
        p.error("need 0 <= --ess-threshold <= 1")

    net, cfg = load_eps_net(args.checkpoint)
    T = int(cfg["T"])
    if args.t_final is None:
        args.t_final = min(10, T)
    if not 1 <= args.t_final <= T:
        p.error(f"--t-final must lie in 1..T = {T}")
    if not args.images <= int(cfg["test"]):
        p.error(f"--images must be at most the checkpoint's {cfg['test']} held-out images")
    out = prepare_out_dir(args.out, FILES, overwrite=args.overwrite)
    return run(args, net, cfg, out)


def run(args, net, cfg, out):
    T = int(cfg["T"])
    t_start = time.perf_counter()

    # ------------------------------------------------------------------ data and problems
    images, labels = data.digits()
    perm = np.random.default_rng(int(cfg["seed"])).permutation(len(images))  # train_digits.py's split
    held_out, train = perm[: int(cfg["test"])], perm[int(cfg["test"]) :]
    n = args.images
    chosen = pick_images(held_out, labels, n)
    levels = images[chosen]
    k_deq, k_obs, k_prior, k_post = jax.random.split(jax.random.key(args.seed), 4)
    x_true = np.asarray(data.dequantize(k_deq, jnp.asarray(levels), L))
    train_mean = np.asarray(2.0 * (images[train] + 0.5) / L - 1.0).mean(0)  # per-pixel mean, cell centres

    if args.mask == "bottom":
        mask = np.zeros(SHAPE, bool)
        mask[: SHAPE[0] // 2] = True
    else:
        mask = np.zeros(math.prod(SHAPE), bool)
        mask[np.random.default_rng(args.seed).permutation(mask.size)[: mask.size // 2]] = True
        mask = mask.reshape(SHAPE)
    prior = GaussianDiffusion(net, schedules.linear(T), SHAPE)
    problems = {
        "inpainting": (inverse.Inpainting(mask, args.inpaint_noise), np.broadcast_to(~mask, x_true.shape)),
        "denoising": (inverse.Denoising(args.denoise_noise, SHAPE), np.ones(x_true.shape, bool)),
    }
    obs_keys = dict(zip(problems, jax.random.split(k_obs, len(problems)), strict=True))
    observed = {
        name: np.asarray(obs(jnp.asarray(x_true)).sample(obs_keys[name]))
        for name, (obs, _) in problems.items()
    }

    # ------------------------------------------------------------------ prior and prior predictive
    t0 = time.perf_counter()
    models = {name: make_model(prior, obs, n) for name, (obs, _) in problems.items()}
    pred = Predictive(models["inpainting"], num_samples=args.prior_draws)(k_prior)
    prior_x = np.asarray(pred["x"])
    prior_y = {
        "inpainting": np.asarray(pred["y"]),
        "denoising": np.asarray(
            Predictive(models["denoising"], posterior_samples={"x": pred["x"]})(k_prior)["y"]
        ),
    }
    prior_seconds = time.perf_counter() - t0

    # ------------------------------------------------------------------ posteriors
    results = {"prior_seconds": prior_seconds}
    posterior = {}
    for (name, (_, pixels)), key in zip(
        problems.items(), jax.random.split(k_post, len(problems)), strict=True
    ):
        y = jnp.asarray(observed[name])
        posterior[name], res = run_samplers(models[name], y, x_true, pixels, args, key)
        obs_pix = np.broadcast_to(mask, x_true.shape) if name == "inpainting" else pixels
        res["observation_rmse"] = float(np.sqrt(np.mean((observed[name] - x_true)[obs_pix] ** 2)))
        if name == "inpainting":
            fill = np.broadcast_to(train_mean, x_true.shape)
            res["mean_fill_rmse"] = float(np.sqrt(np.mean((fill - x_true)[pixels] ** 2)))
        results[name] = res
        print_problem(name, res, args)
    results["seconds_total"] = time.perf_counter() - t_start
    results["images"] = {
        "held_out_index": [int(np.flatnonzero(held_out == i)[0]) for i in chosen],
        "label": labels[chosen].tolist(),
    }
    print(f"total {results['seconds_total']:.0f} s (prior and prior-predictive draws {prior_seconds:.0f} s)")

    plot_posteriors(out / "inverse_digits.png", x_true, observed, mask, posterior, results, args.show)
    plot_prior(out / "prior_predictive.png", prior_x, prior_y, mask)
    plot_ess(out / "smc_ess.png", results, args.particles, T)
    config = {k: v for k, v in vars(args).items()}
    config["checkpoint_config"] = cfg
    write_json(out / "inverse_digits.json", {"config": config, "results": results})
    print(f"wrote {', '.join(str(out / f) for f in FILES)}")
    return results


def print_problem(name, res, args):
    scored = "the missing pixels" if name == "inpainting" else "all pixels"
    ref = f"observation RMSE {res['observation_rmse']:.3f}"
    if "mean_fill_rmse" in res:
        ref += f" (observed pixels); training-mean fill {res['mean_fill_rmse']:.3f}"
    print(f"\n{name}: RMSE of the posterior mean on {scored}; {ref}")
    print(
        f"  {'sampler':17s} {'seconds':>7s} {'RMSE':>6s} {'mean SD':>7s} {'cover':>6s} {'ESS med':>7s} "
        f"{'ESS min':>7s} {'R-hat med':>9s} {'R-hat max':>9s}"
    )
    for s in SAMPLERS:
        r, a = res[s], res[s]["arviz"]
        print(
            f"  {s:17s} {r['seconds']:7.1f} {r['rmse']:6.3f} {r['mean_sd']:7.3f} {r['coverage_2sd']:6.2f} "
            f"{a['ess_bulk_median']:7.1f} {a['ess_bulk_min']:7.1f} {a['r_hat_median']:9.3f} {a['r_hat_max']:9.3f}"
        )
    smc, al = res["TwistedSMC"], res["AnnealedLangevin"]
    print(
        f"  TwistedSMC ({args.particles} particles x {args.smc_runs} runs): log-evidence "
        f"{', '.join(f'{v:.1f}' for v in smc['log_evidence'])}; resampling steps {smc['resampling_steps']}; "
        f"smallest ESS {smc['ess_min']:.1f}; final ESS {', '.join(f'{v:.1f}' for v in smc['final_ess'])}"
    )
    print(
        f"  AnnealedLangevin (t_final {args.t_final}): acceptance {al['accept_prob']:.2f}, kappa "
        f"{', '.join(f'{v:.2g}' for v in al['kappa'])}"
    )


def _image(ax, img, cmap="gray_r", vmin=0, vmax=L - 1, title=None):
    ax.imshow(img, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=7)


def _observation(y, mask, name):
    """The observation in grey levels, unobserved pixels masked (drawn in MISSING)."""
    img = to_levels(y)[..., 0]
    if name == "inpainting":
        img = np.ma.masked_array(img, ~np.broadcast_to(mask[..., 0], img.shape))
    return img


def plot_posteriors(path, x_true, observed, mask, posterior, results, show):
    n = len(x_true)
    cols = 2 + len(SAMPLERS) * (show + 2)
    rows = len(observed) * n
    grey = plt.get_cmap("gray_r").with_extremes(bad=MISSING)
    sd_max = min(1.0, max(float(posterior[p][s].std(0).max()) for p in posterior for s in SAMPLERS))
    fig, axes = plt.subplots(rows, cols, figsize=(0.62 * cols + 0.6, 0.78 * rows + 0.5), squeeze=False)
    for pi, name in enumerate(observed):
        for i in range(n):
            r = pi * n + i
            top = r == 0
            _image(axes[r, 0], to_levels(x_true[i])[..., 0], title="truth" if top else None)
            axes[r, 0].set_ylabel(f"{name}\nimage {i}", fontsize=7)
            _image(
                axes[r, 1],
                _observation(observed[name][i], mask, name),
                cmap=grey,
                title="observed" if top else None,
            )
            c = 2
            for s in SAMPLERS:
                draws = posterior[name][s][:, i]
                for j in range(show):
                    _image(
                        axes[r, c + j],
                        to_levels(draws[j * len(draws) // show])[..., 0],
                        title=(s if j == 0 else "") if top else None,
                    )
                _image(axes[r, c + show], to_levels(draws.mean(0))[..., 0], title="mean" if top else None)
                _image(
                    axes[r, c + show + 1],
                    draws.std(0)[..., 0],
                    cmap="magma",
                    vmin=0,
                    vmax=sd_max,
                    title="SD" if top else None,
                )
                axes[r, c + show].set_xlabel(
                    f"{results[name][s]['rmse_per_image'][i]:.2f}", fontsize=6, labelpad=1
                )
                c += show + 2
    fig.suptitle(
        f"posterior samples, mean and SD (0 to {sd_max:.2f}, magma) per sampler; under each mean: its "
        "RMSE on the scored pixels; missing pixels in blue",
        fontsize=8,
    )
    fig.tight_layout(pad=0.3, w_pad=0.1, h_pad=0.4)
    save_png(fig, path, dpi=110)


def _tile_rgb(levels, missing, rows):
    """Tiled grey-level images as RGB: grey levels, missing pixels in MISSING, white gaps."""
    grey = tile_images(levels, rows)
    miss = tile_images(missing.astype(float), rows)
    rgb = np.repeat((1.0 - np.nan_to_num(grey, nan=0.0) / (L - 1))[..., None], 3, axis=-1)
    rgb[miss == 1] = matplotlib.colors.to_rgb(MISSING)
    rgb[np.isnan(grey)] = 1.0
    return rgb


def plot_prior(path, prior_x, prior_y, mask):
    """Prior draws (rows) of the n images of the plate (columns), and the prior-predictive y of both problems."""
    rows = prior_x.shape[0]
    fig, axes = plt.subplots(1, 3, figsize=(7.5, 2.2 + 0.45 * rows))
    x = to_levels(prior_x.reshape((-1,) + SHAPE))
    none = np.zeros(x.shape, bool)
    yi = to_levels(prior_y["inpainting"].reshape((-1,) + SHAPE))
    yd = to_levels(prior_y["denoising"].reshape((-1,) + SHAPE))
    panels = (
        (x, none, "prior draws x ~ p_theta"),
        (yi, np.broadcast_to(~mask, yi.shape), "y, inpainting"),
        (yd, none, "y, denoising"),
    )
    for ax, (img, missing, title) in zip(axes, panels, strict=True):
        ax.imshow(_tile_rgb(img, missing, rows), interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle(
        "Predictive(model, num_samples): one row per draw, one column per image of the plate", fontsize=8
    )
    fig.tight_layout()
    save_png(fig, path)


def plot_ess(path, results, K, T):
    names = [p for p in results if isinstance(results[p], dict) and "TwistedSMC" in results[p]]
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        smc = results[name]["TwistedSMC"]
        t = np.arange(T, 0, -1)
        for r, (ess, res) in enumerate(zip(smc["ess_trajectory"], smc["resampled"], strict=True)):
            ess = np.asarray(ess)
            (line,) = ax.plot(
                t,
                ess / K,
                lw=0.8,
                label=f"run {r}: {sum(res)} resamplings, log Z {smc['log_evidence'][r]:.1f}",
            )
            hit = np.asarray(res, bool)
            ax.plot(t[hit], ess[hit] / K, "|", color=line.get_color(), ms=5)
        ax.set_xscale("log")
        ax.invert_xaxis()
        ax.set_xlabel("t (reverse chain, T to 1)")
        ax.set_ylabel("ESS / K before resampling")
        ax.set_ylim(0, 1.05)
        ax.set_title(f"TwistedSMC, {name}, K = {K}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path)


if __name__ == "__main__":
    main()
