"""``probdiff train / sample / evaluate`` run tiny: outputs, resume, refusals, bad data."""

import json

import numpy as np
import pytest

from probdiff.checkpoint import load_checkpoint
from probdiff.cli import main

TINY = ["--steps", "60", "--T", "20", "--hidden", "16,16", "--batch-size", "32", "--checkpoint-every", "30"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One ``probdiff train`` run with TINY (60 steps, checkpoints at 30 and 60), shared by the
    tests below: each train run compiles its own training block, ELBO and sampler, so a second
    identical run would cost seconds and check nothing new (the run is deterministic). The tests
    only read this folder."""
    out = tmp_path_factory.mktemp("cli_train") / "run"
    assert main(["train", "--out", str(out), *TINY]) == 0
    return out


def test_train_sample_evaluate(tiny_run, tmp_path, capsys):
    out = tiny_run
    for name in ("checkpoint.safetensors", "loss.png", "samples.png", "metrics.json"):
        assert (out / name).stat().st_size > 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 60 and np.isfinite(metrics["elbo_nats"])
    # bits/dim is -ELBO / (D log 2) of the reported ELBO, D = 2.
    assert metrics["bits_per_dim"] == pytest.approx(-metrics["elbo_nats"] / (2 * np.log(2)))
    _, meta = load_checkpoint(out / "checkpoint.safetensors")
    assert meta["config"]["T"] == 20 and len(meta["losses"]) == 60

    assert main(["sample", "--checkpoint", str(out / "checkpoint.safetensors"), "--num", "50",
                 "--out", str(tmp_path / "s")]) == 0
    assert np.load(tmp_path / "s" / "samples.npy").shape == (50, 2)
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(out / "checkpoint.safetensors"), "--num", "100"]) == 0
    assert "elbo_nats" in json.loads(capsys.readouterr().out)


def test_resume_continues_the_same_run(tiny_run, tmp_path):
    """60 steps in one go and 30 + 30 through --resume give the same loss sequence."""
    a, b = tiny_run, tmp_path / "b"  # a: the 60 steps in one go
    half = [*TINY]
    half[1] = "30"
    assert main(["train", "--out", str(b), *half]) == 0
    assert main(["train", "--out", str(tmp_path / "c"), "--resume", str(b / "checkpoint.safetensors"),
                 "--steps", "60", "--checkpoint-every", "30"]) == 0
    _, meta_a = load_checkpoint(a / "checkpoint.safetensors")
    _, meta_c = load_checkpoint(tmp_path / "c" / "checkpoint.safetensors")
    np.testing.assert_array_equal(meta_a["losses"], meta_c["losses"])


def test_train_refuses_to_overwrite_and_bad_data(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text("mine")
    assert main(["train", "--out", str(out), *TINY]) == 1
    assert (out / "metrics.json").read_text() == "mine"
    bad = tmp_path / "bad.npy"
    x = np.ones((50, 2))
    x[17, 1] = np.nan
    np.save(bad, x)
    assert main(["train", "--out", str(tmp_path / "r2"), "--data", str(bad), *TINY]) == 1
    err = capsys.readouterr().err
    assert "row 17" in err and "bad.npy" in err
    assert main(["train", "--out", str(tmp_path / "r3"), "--data", str(tmp_path / "missing.npy"), *TINY]) == 1
    assert "missing.npy" in capsys.readouterr().err
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a checkpoint at all")
    assert main(["sample", "--checkpoint", str(garbage), "--out", str(tmp_path / "s")]) == 1
    assert "garbage.safetensors" in capsys.readouterr().err


def test_train_refuses_bad_devices_before_writing(tmp_path):
    import jax

    for bad in ("0", "two", str(len(jax.devices()) + 1)):
        with pytest.raises(SystemExit, match=r"--devices must be 'all' or an integer in 1\.\."):
            main(["train", "--out", str(tmp_path / bad), "--devices", bad, *TINY])
        assert not (tmp_path / bad).exists()  # refused before the output folder was made
