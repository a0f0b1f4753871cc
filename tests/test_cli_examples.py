"""The ``probdiff`` command and every example script, run tiny, as a new user would."""

import json
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from probdiff.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_demo_writes_figures_and_metrics(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "20", "--points", "64", "--draws", "4"]) == 0
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
    out = tmp_path / "demo"
    out.mkdir()
    keep = out / "metrics.json"
    keep.write_text("user data")
    assert main(["demo", "--out", str(out), "--steps", "5", "--points", "8", "--draws", "2"]) == 1
    assert keep.read_text() == "user data"
    assert "--overwrite" in capsys.readouterr().err
    assert main(["demo", "--out", str(out), "--steps", "5", "--points", "8", "--draws", "2", "--overwrite"]) == 0
    assert keep.read_text() != "user data"


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


def test_example_train_digits_tiny_and_resume(tmp_path):
    mod = runpy.run_path(str(ROOT / "examples" / "train_digits.py"))
    tiny = ["--T", "10", "--base", "8", "--test", "16", "--batch-size", "16", "--quiet", "--checkpoint-every", "4"]
    res = mod["main"](tiny + ["--steps", "4", "--out", str(tmp_path / "a")])
    for name in ("samples.png", "loss.png", "checkpoint.safetensors", "train_digits.json"):
        assert (tmp_path / "a" / name).stat().st_size > 0
    # bits/dim of the discrete images is an upper bound no lower than 0 and, for a barely
    # trained model, above the 4.09 bits of the model-free code.
    assert res["bits_per_dim"] > np.log2(17)
    # Resuming 4 steps from step 4 gives the same state as 8 steps straight (same data stream).
    mod["main"](tiny + ["--steps", "8", "--resume", str(tmp_path / "a" / "checkpoint.safetensors"),
                        "--out", str(tmp_path / "b")])
    mod["main"](tiny + ["--steps", "8", "--out", str(tmp_path / "c")])
    from probdiff.checkpoint import load_checkpoint

    b, meta_b = load_checkpoint(tmp_path / "b" / "checkpoint.safetensors")
    c, meta_c = load_checkpoint(tmp_path / "c" / "checkpoint.safetensors")
    assert meta_b["losses"] == meta_c["losses"]
    import jax

    def raw(x):  # typed PRNG keys come back as key arrays
        return np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)

    for name in c:
        np.testing.assert_array_equal(raw(b[name]), raw(c[name]), err_msg=name)
    with pytest.raises(FileExistsError):
        mod["main"](tiny + ["--steps", "4", "--out", str(tmp_path / "a")])
