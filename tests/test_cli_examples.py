"""The ``probdiff`` command and every example script, run tiny, as a new user would."""

import json
import runpy
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from probdiff.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_demo_writes_figures_and_metrics(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "metrics.json").write_text("user data")  # replaced, as --overwrite asks
    assert main(["demo", "--out", str(out), "--steps", "20", "--points", "64", "--draws", "4", "--overwrite"]) == 0
    for name in ("demo.png", "denoising_terms.png", "metrics.json"):
        assert (out / name).stat().st_size > 0
    metrics = json.loads((out / "metrics.json").read_text())
    rows = metrics["report"]["rows"]
    elbo = rows["ELBO (B2: recon - prior - denoising)"]["closed_form"]
    log_p = rows["exact log p_theta(x_0)  (reverse chain)"]["closed_form"]
    assert elbo <= log_p  # the bound holds for the closed forms the demo prints
    printed = capsys.readouterr().out
    assert "exact log p_theta(x_0)" in printed and "Trace_ELBO" in printed


def test_demo_never_overwrites(tmp_path, capsys):
    # (that --overwrite does replace the files is checked above, on the run that test makes anyway)
    out = tmp_path / "demo"
    out.mkdir()
    keep = out / "metrics.json"
    keep.write_text("user data")
    assert main(["demo", "--out", str(out), "--steps", "5", "--points", "8", "--draws", "2"]) == 1
    assert keep.read_text() == "user data"
    assert "--overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json"]  # nothing else written either


@pytest.mark.parametrize("argv", [["demo", "--steps", "0"], ["demo", "--points", "x"], ["demo", "--schedule", "exp"]])
def test_demo_rejects_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2
    assert argv[1] in capsys.readouterr().err


def test_console_script_is_installed():
    result = subprocess.run(
        [sys.executable, "-m", "probdiff.cli", "--help"], capture_output=True, text=True, check=True
    )
    assert "demo" in result.stdout


@pytest.mark.slow  # 30-40 s on 2 cores; the ELBO's closed forms are tested in test_diffusion.py
def test_example_gaussian_elbo_tiny(tmp_path):
    mod = runpy.run_path(str(ROOT / "examples" / "gaussian_elbo.py"))
    res = mod["main"](["--steps", "20", "--points", "32", "--draws", "4", "--out", str(tmp_path)])
    # The bound holds at every T, and the gap shrinks from T = 5 to T = 20.
    gaps = res["gap_vs_T"]["gap"]
    assert all(g >= 0 for g in gaps) and gaps[-1] < gaps[0]
    for name in ("gaussian_elbo.json", "b2_vs_b3.png", "elbo_gap_vs_T.png"):
        assert (tmp_path / name).exists()


def test_example_train_2d_tiny(tmp_path):
    mod = runpy.run_path(str(ROOT / "examples" / "train_2d.py"))
    res = mod["main"](["--steps", "10", "--T", "10", "--points", "256", "--width", "16", "--quiet",
                       "--data", "two_moons", "--out", str(tmp_path)])
    m = res["two_moons"]
    # bits/dim is -ELBO / (2 log 2) of the reported held-out ELBO.
    assert m["bits_per_dim"] == pytest.approx(-m["held_out_elbo_nats"] / (2 * np.log(2.0)))
    for name in ("samples.png", "losses.png", "train_2d.json"):
        assert (tmp_path / name).exists()


DIGITS_TINY = ["--T", "10", "--base", "8", "--test", "16", "--batch-size", "16", "--quiet", "--checkpoint-every", "4"]


@pytest.mark.slow  # 75 s on 2 cores (UNet compile); the UNet trains under SVI in test_unet.py
def test_example_train_digits_tiny(tmp_path):
    mod = runpy.run_path(str(ROOT / "examples" / "train_digits.py"))
    res = mod["main"](DIGITS_TINY + ["--steps", "4", "--out", str(tmp_path / "a")])
    for name in ("samples.png", "loss.png", "checkpoint.safetensors", "train_digits.json"):
        assert (tmp_path / "a" / name).stat().st_size > 0
    # bits/dim of the discrete images is an upper bound no lower than 0 and, for a barely
    # trained model, above the 4.09 bits of the model-free code.
    assert res["bits_per_dim"] > np.log2(17)
    with pytest.raises(FileExistsError):
        mod["main"](DIGITS_TINY + ["--steps", "4", "--out", str(tmp_path / "a")])


def test_example_train_digits_refuses_bad_devices(tmp_path):
    mod = runpy.run_path(str(ROOT / "examples" / "train_digits.py"))
    for bad in ("0", "two", str(len(jax.devices()) + 1)):
        with pytest.raises(SystemExit):
            mod["main"](DIGITS_TINY + ["--devices", bad, "--out", str(tmp_path / bad)])


# Three UNet trainings (each compiles its own training step, ELBO and sampler: about 2 CPU-minutes
# together), so behind the slow marker. The default suite checks the same property, a resumed run
# equal bit for bit to the uninterrupted one, through `probdiff train --resume`
# (test_cli_train.py::test_resume_continues_the_same_run) and through fit, save_state and
# load_state (test_training.py::test_resume_repeats_the_uninterrupted_run_exactly).
@pytest.mark.slow
def test_example_train_digits_resume_is_exact(tmp_path):
    mod = runpy.run_path(str(ROOT / "examples" / "train_digits.py"))
    mod["main"](DIGITS_TINY + ["--steps", "4", "--out", str(tmp_path / "a")])
    # Resuming 4 steps from step 4 gives the same state as 8 steps straight (same data stream).
    mod["main"](DIGITS_TINY + ["--steps", "8", "--resume", str(tmp_path / "a" / "checkpoint.safetensors"),
                               "--out", str(tmp_path / "b")])
    mod["main"](DIGITS_TINY + ["--steps", "8", "--out", str(tmp_path / "c")])
    from probdiff.checkpoint import load_checkpoint

    b, meta_b = load_checkpoint(tmp_path / "b" / "checkpoint.safetensors")
    c, meta_c = load_checkpoint(tmp_path / "c" / "checkpoint.safetensors")
    assert meta_b["losses"] == meta_c["losses"]
    import jax

    def raw(x):  # typed PRNG keys come back as key arrays
        return np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)

    for name in c:
        np.testing.assert_array_equal(raw(b[name]), raw(c[name]), err_msg=name)


@pytest.mark.slow  # 25 s on 2 cores; stationarity itself is tested in test_stationarity.py
def test_example_langevin_stationarity_tiny(tmp_path):
    import scipy.integrate
    import scipy.special

    mod = runpy.run_path(str(ROOT / "examples" / "langevin_stationarity.py"))
    res = mod["main"](["--tiny", "--out", str(tmp_path)])
    for name in ("stationarity.png", "ebm.png", "metrics.json"):
        assert (tmp_path / name).stat().st_size > 0
    assert json.loads((tmp_path / "metrics.json").read_text())["stationarity"]["chains"] == res["stationarity"]["chains"]

    # (a) E1: chains started at draws of p stay within the KS noise of n exact draws; chains
    # started at the point mass begin at KS ~ 1 and move toward p
    a = res["stationarity"]
    for name in ("ULA", "MALA"):
        assert max(a[name]["from_p"]["ks"]) < 2 * a["ks_noise_floor_95"], (name, a[name]["from_p"]["ks"])
        ks = a[name]["from_point_mass"]["ks"]
        assert ks[0] > 0.99 and ks[-1] < ks[1] < ks[0], (name, ks)
    # ULA's stationary variance on N(0, 1) is 1 / (1 - eta/4), MALA's is 1 (5 SE from the ESS)
    v = a["variance_on_standard_normal"]
    for j, eta in enumerate(v["eta"]):
        assert v["closed_form_ula"][j] == pytest.approx(1 / (1 - eta / 4))
        assert abs(v["ULA"][j] - v["closed_form_ula"][j]) < 5 * v["ULA_se"][j]
        assert abs(v["MALA"][j] - 1.0) < 5 * v["MALA_se"][j]
        assert v["ULA"][j] > v["MALA"][j]

    # (b) D1: log Z by the script's 2-D grid against polar coordinates,
    # Z = int_0^inf exp(-(r - 2)^2 / (2 0.3^2)) 2 pi I_0(r / 2) r dr
    b = res["energy_based_model"]
    z, _ = scipy.integrate.quad(lambda r: np.exp(-(r - 2) ** 2 / 0.18) * 2 * np.pi * scipy.special.i0(r / 2) * r, 0, 8)
    assert b["log_Z_quadrature"] == pytest.approx(np.log(z), abs=1e-4)
    # adding log Z or 100 to E leaves the chains as they are, up to a rare float32 flip of an accept
    for label in ("E + log Z", "E + 100"):
        run = b["runs"][label]
        assert run["chains_differing_from_E_run"] <= 0.01 * b["chains"], (label, run)
        for k, m in run["moments"].items():
            assert m == pytest.approx(b["runs"]["E"]["moments"][k], abs=0.5 * run["moments_se"][k])


def test_example_annealed_langevin_tiny(tmp_path):
    from probdiff._io import OutputExistsError

    mod = runpy.run_path(str(ROOT / "examples" / "annealed_langevin.py"))
    res = mod["main"](["--tiny", "--out", str(tmp_path)])
    for name in ("annealed_langevin.png", "trajectory.png", "metrics.json"):
        assert (tmp_path / name).stat().st_size > 0
    saved = json.loads((tmp_path / "metrics.json").read_text())["results"]
    assert saved["annealed"]["mmd2"] == pytest.approx(res["annealed"]["mmd2"])
    # plain Langevin is far outside the noise floor of two exact sets, annealed much closer;
    # annealed gets the mode weights closer to the true ones
    assert res["plain"]["mmd2"] > 5 * res["mmd2_noise_floor"]
    assert res["annealed"]["mmd2"] < res["plain"]["mmd2"] / 3
    w = np.asarray(res["true_weights"])
    err = {k: np.max(np.abs(np.asarray(res[k]["mode_weights"]) - w)) for k in ("annealed", "plain")}
    assert err["annealed"] < err["plain"], err
    with pytest.raises(OutputExistsError):
        mod["main"](["--tiny", "--out", str(tmp_path)])


@pytest.mark.slow  # 25 s on 2 cores; NCSN's loss and Vincent's identity are tested in test_score_matching.py
def test_example_ncsn_2d_tiny(tmp_path):
    from probdiff._io import OutputExistsError

    mod = runpy.run_path(str(ROOT / "examples" / "ncsn_2d.py"))
    res = mod["main"](["--tiny", "--out", str(tmp_path)])
    for name in ("score_field.png", "samples.png", "loss.png", "metrics.json"):
        assert (tmp_path / name).stat().st_size > 0
    saved = json.loads((tmp_path / "metrics.json").read_text())["results"]
    assert saved["learned"]["mmd2"] == pytest.approx(res["learned"]["mmd2"])
    L = len(res["sigmas"])
    fisher, zero = np.asarray(res["fisher_error"]), np.asarray(res["fisher_error_of_zero_score"])
    assert fisher.shape == zero.shape == (L,) and np.all(np.isfinite(fisher)) and np.all(fisher >= 0)
    # even 150 steps beat the zero score on average over the levels, and the loss fell
    assert fisher.mean() < 0.5 * zero.mean(), (fisher, zero)
    assert np.isfinite(res["final_loss"]) and res["final_loss"] < res["initial_loss"]
    # Vincent's identity: the loss exceeds its floor L(s*) by half the mean Fisher error (the
    # same draws on both sides; only a mean-zero cross term differs)
    gap = res["eval_loss"] - res["loss_exact_score"]
    assert gap == pytest.approx(res["half_mean_fisher_error"], rel=0.3, abs=0.005)
    for key in ("learned", "exact_score_sampler"):
        w = np.asarray(res[key]["mode_weights"])
        assert w.shape == (len(res["true_weights"]),) and w.sum() == pytest.approx(1.0)
        assert np.isfinite(res[key]["mmd2"])
    # the same sampler on the exact score: close to exact samples at any training length
    assert res["exact_score_sampler"]["mmd2"] < 0.02
    assert len(res["mmd2_null"]) == mod["TINY"]["null_pairs"]
    with pytest.raises(OutputExistsError):
        mod["main"](["--tiny", "--out", str(tmp_path)])


@pytest.mark.slow  # 40-80 s each on 2 cores: run with -m slow
def test_example_likelihood_2d_tiny(tmp_path):
    from probdiff._io import OutputExistsError

    mod = runpy.run_path(str(ROOT / "examples" / "likelihood_2d.py"))
    res = mod["main"](["--tiny", "--out", str(tmp_path)])
    for name in ("samples.png", "density.png", "loss.png", "metrics.json"):
        assert (tmp_path / name).stat().st_size > 0
    saved = json.loads((tmp_path / "metrics.json").read_text())["results"]
    rows = res["likelihood_rows"]
    assert saved["likelihood_rows"]["exact score: ODE"]["mean"] == pytest.approx(rows["exact score: ODE"]["mean"])
    for label, r in rows.items():
        assert np.isfinite(r["mean"]) and np.isfinite(r["se"]), label
        assert r["bits_per_dim"] == pytest.approx(r["mean"] / (2 * np.log(2.0)))
        if "nfe" in r:
            assert r["nfe"] >= 6, label  # at least one Tsit5 step of 6 evaluations
    # the exact score's ODE gives the true NLL on the same points (solver at rtol 1e-3 and the
    # prior mismatch of VP at t = 1: a few thousandths of a nat), whatever the training did
    assert abs(rows["exact score: ODE"]["minus_true"]) < 0.02
    # a barely trained model cannot beat the true density by more than the noise of 16 points
    for label in ("discrete: -ELBO (B2)", "discrete: ODE (from_diffusion)", "likelihood weighting: ODE"):
        assert rows[label]["minus_true"] > -3 * rows[label]["minus_true_se"], label
    # the exact score's SDE bound is tight: within its Monte-Carlo noise (16 draws per point) of the truth
    b = rows["exact score: SDE bound"]
    assert abs(b["minus_true"]) < 4 * b["minus_true_se"] + 0.1, b
    assert all(rows[f"{w} weighting: SDE bound"]["mc_se"] > 0 for w in ("likelihood", "variance"))
    assert res["ode_worse_than_elbo"] == (rows["discrete: ODE (from_diffusion)"]["mean"]
                                          > rows["discrete: -ELBO (B2)"]["mean"])
    assert set(res["ode_worse_than_bound"]) == {"discrete", "likelihood", "variance"}
    assert all(np.isfinite(v) for w in res["weighting"].values() for v in w.values())
    ed = res["energy_distance"]  # --tiny samples with ShARK only, at 5 steps
    assert set(ed) == {"discrete", "likelihood", "variance"} and all(set(ed[m]) == {"shark 5"} for m in ed)
    assert all(np.isfinite(v) for m in ed.values() for v in m.values())
    assert np.isfinite(res["energy_distance_noise_floor"])
    with pytest.raises(OutputExistsError):
        mod["main"](["--tiny", "--out", str(tmp_path)])


@pytest.mark.slow  # 40-80 s each on 2 cores: run with -m slow
def test_example_likelihood_digits_tiny(tmp_path):
    mod = runpy.run_path(str(ROOT / "examples" / "likelihood_digits.py"))
    res = mod["main"](["--tiny", "--out", str(tmp_path)])
    for name in ("bits_per_dim.png", "samples.png", "loss.png", "metrics.json"):
        assert (tmp_path / name).stat().st_size > 0
    rows = res["rows"]
    offset = np.log2(17 / 2)
    assert res["offset_bits_per_dim"] == pytest.approx(offset)
    # the model-free code: log2 17 bits per pixel of the image, 1 bit/dim of y in [-1, 1)
    assert rows["uniform on [-1, 1]^D (no model)"]["discrete"] == pytest.approx(np.log2(17))
    assert rows["uniform on [-1, 1]^D (no model)"]["continuous"] == pytest.approx(1.0)
    for label in ("-ELBO (B2, T terms)", "ODE NLL (Hutchinson)"):
        r = rows[label]
        assert np.isfinite(r["discrete"]) and np.isfinite(r["se"]), label
        assert r["discrete"] - r["continuous"] == pytest.approx(offset), label
        # an upper bound on the bits of a discrete image is never below 0
        assert r["discrete"] > 0, label
    ode = rows["ODE NLL (Hutchinson)"]
    assert ode["nfe"] >= 6 and np.isfinite(ode["probe_se"]) and ode["probe_se"] >= 0
    saved = json.loads((tmp_path / "metrics.json").read_text())["results"]
    assert saved["rows"]["ODE NLL (Hutchinson)"]["discrete"] == pytest.approx(ode["discrete"])


@pytest.mark.slow  # 40-80 s each on 2 cores: run with -m slow
def test_example_cnf_2d_tiny(tmp_path):
    mod = runpy.run_path(str(ROOT / "examples" / "cnf_2d.py"))
    res = mod["main"](["--tiny", "--out", str(tmp_path)])
    for name in ("training.png", "samples.png", "density.png", "metrics.json"):
        assert (tmp_path / name).stat().st_size > 0
    for key in ("true_nll", "cnf_nll", "cnf_minus_true", "cnf_minus_true_se", "nfe", "energy_distance",
                "initial_loss", "final_loss"):
        assert np.isfinite(res[key]), key
    assert res["cnf_bits_per_dim"] == pytest.approx(res["cnf_nll"] / (2 * np.log(2.0)))
    # a flow cannot beat the true density on held-out points beyond their noise
    assert res["cnf_minus_true"] > -3 * res["cnf_minus_true_se"]
    assert len(res["curve"]) == 2 and all(np.isfinite(c["nll"]) for c in res["curve"])
    # the density integrates to at most 1 over the plotted box (Riemann sum on a coarse grid)
    assert 0 < res["grid_mass"]["cnf"] < 1.3
    saved = json.loads((tmp_path / "metrics.json").read_text())["results"]
    assert saved["cnf_nll"] == pytest.approx(res["cnf_nll"])


@pytest.mark.slow  # five model families compiled: 1-3 minutes on 2 cores
def test_example_zoo_2d_tiny(tmp_path):
    res = runpy.run_path(str(ROOT / "examples" / "zoo_2d.py"))["main"](["--tiny", "--out", str(tmp_path)])
    assert (tmp_path / "zoo.png").stat().st_size > 0
    assert len(res["rows"]) == 8  # VAE, MHVAE and diffusion two rows each, RealNVP and CNF one
    for name, row in res["rows"].items():
        assert np.isfinite(row["nll"]) and np.isfinite(row["excess"]), name
    saved = json.loads((tmp_path / "metrics.json").read_text())["results"]
    assert saved["true"]["nll"] == pytest.approx(res["true"]["nll"])
