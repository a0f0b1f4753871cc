"""examples/inverse_digits.py end to end on a tiny train_digits.py checkpoint."""

import json
import math
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLERS = ("TwistedSMC", "DPS", "AnnealedLangevin")


def _finite_numbers(obj):
    """Every number in a JSON tree (bools excluded)."""
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _finite_numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _finite_numbers(v)
    elif isinstance(obj, int | float) and not isinstance(obj, bool):
        yield obj


@pytest.mark.slow  # a UNet trained for 20 steps, then six sampler compiles: a few minutes on 2 cores
def test_example_inverse_digits_tiny(tmp_path):
    train = runpy.run_path(str(ROOT / "examples" / "train_digits.py"))
    train["main"](
        [
            "--steps",
            "20",
            "--T",
            "20",
            "--base",
            "8",
            "--test",
            "16",
            "--batch-size",
            "16",
            "--quiet",
            "--out",
            str(tmp_path / "prior"),
        ]
    )
    checkpoint = tmp_path / "prior" / "checkpoint.safetensors"

    mod = runpy.run_path(str(ROOT / "examples" / "inverse_digits.py"))
    out = tmp_path / "inverse"
    res = mod["main"](["--tiny", "--checkpoint", str(checkpoint), "--out", str(out)])
    for name in mod["FILES"]:
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "inverse_digits.json").read_text())
    assert saved["config"]["checkpoint_config"]["T"] == 20
    results = saved["results"]
    for problem in ("inpainting", "denoising"):
        r = results[problem]
        assert math.isfinite(r["observation_rmse"]) and r["observation_rmse"] > 0
        for s in SAMPLERS:
            m = r[s]
            for key in ("seconds", "rmse", "mean_sd", "coverage_2sd"):
                assert math.isfinite(m[key]), (problem, s, key)
            assert m["rmse"] > 0 and m["mean_sd"] >= 0 and 0 <= m["coverage_2sd"] <= 1
            assert m["arviz"]["draws"] > 1 and math.isfinite(m["arviz"]["ess_bulk_median"])
            assert m["rmse"] == pytest.approx(res[problem][s]["rmse"])
        smc = r["TwistedSMC"]
        assert len(smc["ess_trajectory"]) == 2 and len(smc["ess_trajectory"][0]) == 20  # two runs, t = T..1
        assert all(1 - 1e-4 <= e <= 4 + 1e-4 for run in smc["ess_trajectory"] for e in run)  # 1 <= ESS <= K
        assert all(0 <= k <= 20 for k in smc["resampling_steps"])
        assert all(math.isfinite(v) for v in smc["log_evidence"])
        assert 0 <= r["AnnealedLangevin"]["accept_prob"] <= 1
    assert "mean_fill_rmse" in results["inpainting"]
    assert all(math.isfinite(v) for v in _finite_numbers(results))
    with pytest.raises(FileExistsError):  # never overwrites without --overwrite
        mod["main"](["--tiny", "--checkpoint", str(checkpoint), "--out", str(out)])


def test_example_inverse_digits_needs_a_checkpoint(tmp_path):
    mod = runpy.run_path(str(ROOT / "examples" / "inverse_digits.py"))
    with pytest.raises(SystemExit, match="train_digits.py"):
        mod["main"](["--tiny", "--checkpoint", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path)])
