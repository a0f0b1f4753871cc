"""Headline numbers of each benchmark's JSON, for the suite runner's summary table.

``headlines(name, data)`` returns a short list of rows ``{"metric", "value", "unit", "note"}`` for
the JSON that ``bench/<name>.py`` wrote; ``EXTRACTORS`` maps each name (the script's stem) to its
extractor. Timings are medians and ratios are ratios of medians, as in ``bench/README.md``.

Every row is extracted on its own: a missing key (a ``--quick`` run, an older JSON) or a value of
the wrong type drops that row and never the others, and nothing here raises. Standard library only.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Callable

# --------------------------------------------------------------------------- helpers


def _num(x):
    """A value for the table: ints as they are, floats to 4 significant digits, strings as they are."""
    if x is None or isinstance(x, bool):
        raise ValueError("no value")
    if isinstance(x, int | str):
        return x
    x = float(x)
    if not math.isfinite(x) or x == 0:
        return x
    return float(f"{x:.4g}")


def _fmt(x) -> str:
    """A number for a note: about 3 significant digits, thousands separated, no exponent above 1e-3."""
    if x is None:
        return "-"
    if isinstance(x, bool) or isinstance(x, str):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}" if abs(x) >= 10000 else str(x)
    x = float(x)
    ax = abs(x)
    if not math.isfinite(x):
        return str(x)
    if ax >= 10000:
        return f"{x:,.0f}"
    if ax >= 100:
        return f"{x:.0f}"
    if ax >= 1e-3 or ax == 0:
        return f"{x:.3g}"
    return f"{x:.2e}"


def _row(metric: str, value, unit: str = "", note: str = "") -> dict:
    return {"metric": metric, "value": _num(value), "unit": unit, "note": note}


def _get(d, *path, default=None):
    """d[path[0]][path[1]]...; default when any step is missing or not indexable."""
    for key in path:
        try:
            d = d[key]
        except (KeyError, IndexError, TypeError):
            return default
    return d


def _keys(d, *path) -> list:
    """The keys of the dict at path, or [] (never raises)."""
    sub = _get(d, *path)
    return list(sub) if isinstance(sub, dict) else []


def _dict(d, *path) -> dict:
    """The dict at path, or {} (never raises)."""
    sub = _get(d, *path)
    return sub if isinstance(sub, dict) else {}


def _range(lo, hi, label: str = "range") -> str:
    """'range lo-hi', or '' when either end is missing."""
    if not isinstance(lo, int | float) or not isinstance(hi, int | float):
        return ""
    return f"{label} {_fmt(lo)}-{_fmt(hi)}"


def _pass(flag) -> str:
    return "" if flag is None else ("pass" if flag else "FAIL")


def _join(*parts) -> str:
    """The non-empty parts, joined by '; '."""
    return "; ".join(p for p in parts if p)


def _opt(fmt: str, value) -> str:
    """fmt.format(value) with numbers through _fmt, or '' when value is missing."""
    if value is None:
        return ""
    return fmt.format(_fmt(value) if isinstance(value, int | float) else value)


def _ctx(*parts) -> str:
    """' (a, b)' from the non-empty parts, or ''."""
    parts = [p for p in parts if p]
    return f" ({', '.join(parts)})" if parts else ""


class _Rows:
    """Collects rows; each one built by its own call, so a failing row is skipped alone."""

    def __init__(self):
        self.rows: list[dict] = []

    def add(self, make: Callable, *args) -> None:
        try:
            out = make(*args)
        except Exception:  # a missing key or a wrong type: this row only
            return
        if isinstance(out, dict):
            self.rows.append(out)
        elif isinstance(out, list):
            self.rows.extend(r for r in out if isinstance(r, dict))


def _skipped(data) -> list[dict] | None:
    """A 'skipped' row for a JSON that a script wrote without measuring (optional dependency missing)."""
    if isinstance(data, dict) and data.get("skipped") is True:
        return [_row("benchmark status", "skipped", "", str(data.get("reason", "")))]
    return None


def _steps_range(steps, max_s, min_s) -> str:
    """'range lo-hi' in steps/s from a block's step count and its slowest and fastest times."""
    try:
        return _range(steps / max_s, steps / min_s)
    except (TypeError, ZeroDivisionError):
        return ""


# --------------------------------------------------------------------------- foundation


def _foundation(d: dict) -> list[dict]:
    """Compile time of d.elbo across T, full-T ELBO and ancestral sampling against their baselines."""
    r = _Rows()
    batch = _get(d, "parameters", "compile_batch")
    runs = _dict(d, "compile", "runs")

    def compile_rows():
        found = [v for v in runs.values() if v.get("fn") == "elbo" and v.get("chunk_size") == "auto"]
        found.sort(key=lambda v: v["T"])
        return found

    def compile_row(v, t_lo):
        med = v["total"]["median"]
        lo = _get(t_lo, "total", "median")
        growth = f"{_fmt(med / lo)}x the T = {t_lo['T']} time" if v is not t_lo else ""
        return _row(
            f"compile time, d.elbo (default chunking{_opt(', batch {}', batch)}), T = {v['T']}",
            med,
            "s",
            _join(_opt("median of {} fresh compiles", v["total"].get("n")), growth),
        )

    try:
        entries = compile_rows()
    except Exception:
        entries = []
    for v in entries:
        r.add(compile_row, v, entries[0])

    el = _dict(d, "elbo")
    ctx = _ctx(_opt("T = {}", el.get("T")), _opt("{} points", el.get("points")))
    summ = _dict(el, "summary")

    def elbo_time():
        s = summ["elbo_chunkauto"]
        return _row(
            f"full-T ELBO time, d.elbo default chunking{ctx}",
            s["median"],
            "s",
            _range(s.get("min"), s.get("max"), "min-max"),
        )

    def elbo_base():
        s = summ["baseline_scan"]
        return _row(
            f"full-T ELBO baseline: T network evaluations in a lax.scan{ctx}",
            s["median"],
            "s",
            _range(s.get("min"), s.get("max"), "min-max"),
        )

    def elbo_ratio():
        q = el["ratios"]["elbo_chunkauto/baseline_scan"]
        return _row(
            "ELBO time / baseline (d.elbo default chunking, goal <= 1.2)",
            q["ratio_of_medians"],
            "x",
            _join(_opt("median of paired ratios {}", q.get("median_of_paired_ratios")), _pass(q.get("pass"))),
        )

    sm = _dict(d, "sample")
    sctx = _ctx(_opt("T = {}", sm.get("T")), _opt("{} points", sm.get("points")))

    def sample_time():
        s = sm["summary"]["sample"]
        base = _get(sm, "summary", "baseline_scan", "median")
        return _row(
            f"ancestral sampling time, d.sample{sctx}",
            s["median"],
            "s",
            _opt("hand-written lax.scan of the reverse update {} s", base),
        )

    def sample_ratio():
        q = sm["ratios"]["sample/baseline_scan"]
        diff = sm.get("max_abs_diff_library_vs_baseline")
        return _row(
            "sampling time / hand-written lax.scan (goal <= 1.1)",
            q["ratio_of_medians"],
            "x",
            _join(_opt("same samples: max abs diff {}", diff), _pass(q.get("pass"))),
        )

    for make in (elbo_time, elbo_base, elbo_ratio, sample_time, sample_ratio):
        r.add(make)
    return r.rows


# --------------------------------------------------------------------------- training


def _training(d: dict) -> list[dict]:
    """Training steps/s of fit, svi.update and the hand-written loop, their ratios, fit's compile time."""
    r = _Rows()
    p = _dict(d, "parameters")
    steps = p.get("steps_per_block")
    ctx = _ctx("MLP 3x256", _opt("batch {}", p.get("batch")), _opt("T = {}", p.get("T")))
    summ = _dict(d, "summary")
    labels = {"A": "probdiff fit", "B": "svi.update in lax.scan", "C": "hand-written JAX + optax"}

    def sps(k):
        s = summ[k]
        return _row(
            f"train steps/s, {labels[k]}{ctx}",
            s["steps_per_s_median"],
            "steps/s",
            _steps_range(steps, s.get("max_s"), s.get("min_s")),
        )

    def ratio(k):
        s = summ[k]
        goal = _get(d, "goals", k, "pass")
        return _row(
            f"train speed ratio, {labels[k]} / hand-written JAX (goal >= 0.95)",
            s["ratio_to_C"],
            "x",
            _join(_opt("median of per-round ratios {}", s.get("median_of_round_ratios_to_C")), _pass(goal)),
        )

    def compile_fit():
        cs = d["compile_s"]
        key = next(k for k in cs if k.startswith("A (fit"))
        return _row(
            "compile time, probdiff fit training block", cs[key], "s", "first block minus a steady block"
        )

    for k in ("A", "B", "C"):
        r.add(sps, k)
    for k in ("A", "B"):
        r.add(ratio, k)
    r.add(compile_fit)
    return r.rows


# --------------------------------------------------------------------------- vs_torch_2d


def _vs_torch_2d(d: dict) -> list[dict]:
    """probdiff against PyTorch + diffusers on eight Gaussians: training, sampling, sample quality."""
    skipped = _skipped(d)
    if skipped is not None:
        return skipped
    r = _Rows()
    p = _dict(d, "parameters")
    tr = _dict(d, "training")
    sps = _dict(tr, "steps_per_s")
    ctx = _ctx("eight Gaussians, MLP 3x256", _opt("batch {}", p.get("batch")))

    def train(k, label):
        s = sps[k]
        return _row(
            f"train steps/s, {label}{ctx}", s["median"], "steps/s", _range(s.get("min"), s.get("max"))
        )

    def train_ratio():
        q = tr["ratios"]["A/P"]
        best = None
        try:
            best = sps["A"]["max"] / sps["P"]["max"]
        except Exception:
            pass
        return _row(
            "train speed ratio, probdiff fit / PyTorch + diffusers",
            q["ratio_of_medians"],
            "x",
            _join(
                _opt("median of per-round ratios {}", q.get("median_of_round_ratios")),
                _opt("best blocks {}", best),
                "PyTorch's OpenMP threads stall under other load: best blocks compare quiet rounds",
            ),
        )

    def lib_vs_hand():
        q = tr["ratios"]["A/C"]
        return _row(
            "train speed ratio, probdiff fit / hand-written JAX",
            q["ratio_of_medians"],
            "x",
            _opt("median of per-round ratios {}", q.get("median_of_round_ratios")),
        )

    sa = _dict(d, "sampling")
    sctx = _ctx(_opt("{} points", p.get("num_samples")) + _opt(" x {} steps", p.get("T")))

    def sample(k, label):
        return _row(
            f"sampling time, {label}{sctx}",
            sa["median_s"][k],
            "s",
            _opt("median of {} rounds", p.get("sample_rounds")),
        )

    def sample_ratio():
        q = sa["ratio_A/P"]
        return _row(
            "sampling speed ratio, probdiff / diffusers",
            q["ratio_of_medians"],
            "x",
            _opt("median of per-round ratios {}", q.get("median_of_round_ratios")),
        )

    def quality():
        qa = d["quality"]
        a = qa["A"]["median"]["energy"]
        pt = _get(qa, "P", "median", "energy")
        floor = _get(qa, "noise_floor_data_vs_data", "max_abs", "energy")
        steps = qa.get("after_train_steps")
        return _row(
            f"energy distance to fresh data, probdiff{_opt(' after {} train steps', steps)}",
            a,
            "",
            _join(_opt("PyTorch + diffusers {}", pt), _opt("data-vs-data noise up to {}", floor)),
        )

    r.add(train, "A", "probdiff fit")
    r.add(train, "P", "PyTorch + diffusers")
    r.add(train_ratio)
    r.add(lib_vs_hand)
    r.add(sample, "A", "probdiff")
    r.add(sample, "P", "PyTorch + diffusers")
    r.add(sample_ratio)
    r.add(quality)
    return r.rows


# --------------------------------------------------------------------------- digits_unet


def _digits_unet(d: dict) -> list[dict]:
    """Digits UNet training steps/s: probdiff fit, hand-written JAX, PyTorch eager and torch.compile."""
    r = _Rows()
    p = _dict(d, "parameters")
    summ = _dict(d, "summary")
    n = _get(d, "parameter_count", "jax")
    size = f"{n / 1000:.0f}k params" if isinstance(n, int | float) and not isinstance(n, bool) else ""
    ctx = _ctx("8x8 digits", size, _opt("batch {}", p.get("batch")))
    threads = p.get("torch_num_threads")
    labels = {
        "A": "probdiff fit",
        "B": "hand-written JAX",
        "T": f"PyTorch eager{_opt(', {} threads', threads)}",
        "T_compile": "torch.compile",
    }

    def sps(k):
        s = summ[k]
        return _row(
            f"UNet train steps/s, {labels[k]}{ctx}",
            s["steps_per_s_median"],
            "steps/s",
            _range(s.get("steps_per_s_min"), s.get("steps_per_s_max")),
        )

    def ratio(key, label, goal=""):
        q = d["ratios"][key]
        return _row(
            f"UNet train speed ratio, {label}{goal}",
            q["ratio_of_medians"],
            "x",
            _opt("median of per-round ratios {}", q.get("median_of_round_ratios")),
        )

    def compile_fit():
        cs = d["compile_s"]
        key = next(k for k in cs if k.startswith("A "))
        return _row("compile time, probdiff fit (UNet)", cs[key], "s", "first fit call minus a steady call")

    for k in ("A", "B", "T", "T_compile"):
        r.add(sps, k)
    r.add(ratio, "A/T", "probdiff fit / PyTorch eager", " (goal >= 1.0)")
    r.add(ratio, "A/T_compile", "probdiff fit / torch.compile")
    r.add(ratio, "A/B", "probdiff fit / hand-written JAX")
    r.add(compile_fit)
    return r.rows


# --------------------------------------------------------------------------- mala


def _mala(d: dict) -> list[dict]:
    """Per target: probdiff MALA's min-ESS/s, and its ESS/s and draws/s against blackjax and NUTS."""
    r = _Rows()

    def label(name):
        dim = _get(d, "targets", name, "dim")
        return f"{name}{_opt(', D = {}', dim)}"

    def ess(name):
        t = d["targets"][name]
        s = t["summary"]
        bj = _get(s, "BJ", "ess_min_per_s", "median")
        nuts = _get(s, "NUTS", "ess_min_per_s", "median")
        return _row(
            f"min-ESS/s, probdiff MALA ({label(name)})",
            s["P"]["ess_min_per_s"]["median"],
            "ESS/s",
            _join(_opt("blackjax MALA {}", bj), _opt("NUTS {}", nuts), _opt("step size {}", t.get("eta"))),
        )

    def vs_bj(name):
        q = d["targets"][name]["ratios"]["P/BJ"]
        e = q["ess_min"]
        return _row(
            f"min-ESS/s ratio, probdiff / blackjax MALA ({label(name)}, goal >= 1.0)",
            e["ratio_of_medians"],
            "x",
            _join(
                _opt("median of per-round ratios {}", e.get("median_of_round_ratios")),
                _opt("pooled {}", q.get("pooled_ess_min")),
                _pass(_get(d, "targets", name, "goal", "pass")),
            ),
        )

    def draws_vs_bj(name):
        q = d["targets"][name]["ratios"]["P/BJ"]["draws"]
        return _row(
            f"draws/s ratio, probdiff / blackjax MALA ({label(name)})",
            q["ratio_of_medians"],
            "x",
            _join(
                _opt("median of per-round ratios {}", q.get("median_of_round_ratios")),
                "cost per draw, not affected by ESS noise",
            ),
        )

    def vs_nuts(name):
        q = d["targets"][name]["ratios"]["P/NUTS"]["ess_min"]
        return _row(
            f"min-ESS/s ratio, probdiff MALA / NumPyro NUTS ({label(name)})",
            q["ratio_of_medians"],
            "x",
            _opt("median of per-round ratios {}", q.get("median_of_round_ratios")),
        )

    for name in _keys(d, "targets"):
        for make in (ess, vs_bj, draws_vs_bj, vs_nuts):
            r.add(make, name)
    return r.rows


# --------------------------------------------------------------------------- score_matching

_SM_LABELS = {
    "baseline": "plain regression baseline, one forward-backward",
    "DSM": "DenoisingScoreMatching",
    "NCSN": "NCSNScoreMatching",
    "TC": "TimeConditionalScoreMatching",
    "SSM-1": "SlicedScoreMatching, 1 probe",
    "SSM-4": "SlicedScoreMatching, 4 probes",
    "ISM": "ImplicitScoreMatching, exact trace",
}


def _score_matching(d: dict) -> list[dict]:
    """Training steps/s of each score-matching loss (SVI path) and its cost over the baseline's step."""
    r = _Rows()
    summ = _dict(d, "summary")
    batch = _get(d, "parameters", "batch")
    dims = sorted({int(m.group(1)) for k in summ if (m := re.match(r"D(\d+) \S+ svi$", k))})

    def loss_row(D, loss):
        s = summ[f"D{D} {loss} svi"]
        sps = s["steps_per_s_median"]
        if loss == "baseline":
            note = f"{_fmt(1000.0 / sps)} ms/step"
        else:
            note = _join(
                _opt("{}x the baseline's step time", _get(s, "vs_baseline", "ratio_of_medians")),
                _opt("matmul FLOPs {}x", s.get("dot_flops_vs_baseline")),
            )
        ctx = _ctx(f"D = {D}", "MLP 3x256", _opt("batch {}", batch))
        return _row(f"score-matching train steps/s, {_SM_LABELS.get(loss, loss)}{ctx}", sps, "steps/s", note)

    def svi_overhead():
        ratios = [
            v["svi_over_hand_time"]["ratio_of_medians"]
            for k, v in summ.items()
            if k.endswith(" svi") and isinstance(v, dict) and "svi_over_hand_time" in v
        ]
        return _row(
            "score-matching step time, SVI path / hand-written loss (median over losses and D)",
            statistics.median(ratios),
            "x",
            f"range {_fmt(min(ratios))}-{_fmt(max(ratios))}",
        )

    if dims:
        hi, lo = dims[-1], dims[0]
        for loss in ("baseline", "DSM", "TC", "SSM-1", "SSM-4", "ISM"):
            r.add(loss_row, hi, loss)
        if lo != hi:
            r.add(loss_row, lo, "ISM")
    r.add(svi_overhead)
    return r.rows


# --------------------------------------------------------------------------- likelihood


def _likelihood(d: dict) -> list[dict]:
    """Cost per likelihood (exact trace and Hutchinson), NFE, the exact-trace crossover, compile time."""
    r = _Rows()
    models = _dict(d, "models")
    what = {
        "mlp2": "trained MLP, D = 2",
        "mlp64": "trained MLP on digits, D = 64",
        "unet64": "trained UNet on digits, D = 64",
    }
    traces = {"exact": "exact trace", "hutch-rad-1": "Hutchinson, 1 Rademacher probe"}

    def cost(model, trace):
        c = models[model]["cost"][trace]
        ratio = _get(models, model, "ratios_per_example", f"{trace} / exact", "ratio_of_medians")
        calls = len(c.get("s_per_call") or [])
        return _row(
            f"ODE log-likelihood time per example, {traces[trace]}, {what[model]}"
            f"{_ctx(_opt('batch {}', c.get('batch')), 'one call' if calls == 1 else '')}",
            1000.0 * c["s_per_example_median"],
            "ms",
            _join(
                _opt("{}x the exact trace", ratio),
                _opt("NFE {} mean", c.get("nfe_mean")) + _opt(" / {} max", c.get("nfe_max")),
                _opt("compile {} s", c.get("compile_s")),
            ),
        )

    def nfe_exact_score():
        g = models["gmm2"]["cost"]["exact"]
        trained = _get(models, "mlp2", "cost", "exact", "nfe_mean")
        return _row(
            "NFE per likelihood, exact closed-form score (2-D mixture, exact trace)",
            g["nfe_mean"],
            "NFE",
            _opt("trained MLP on the same data: {} (its time embedding sets the NFE)", trained),
        )

    def crossover():
        rules = d["crossover"]["rules"]
        return _row(
            "exact-trace crossover D* (largest D where exact <= 4 Rademacher probes)",
            rules["d_star_4probe"],
            "dims",
            _join(
                _opt("interpolated {}", rules.get("d_cross_4probe_interpolated")),
                _opt("old rule (<= 2x one probe): D* = {}", rules.get("d_star_2x")),
            ),
        )

    def compile_time():
        small, unet = [], []
        for name, m in models.items():
            for c in (m.get("cost") or {}).values():
                (unet if name.startswith("unet") else small).append(c["compile_s"])
        return _row(
            "compile time per likelihood program (MLP and closed-form models)",
            statistics.median(small),
            "s",
            _join(
                f"range {_fmt(min(small))}-{_fmt(max(small))}",
                f"UNet {_fmt(min(unet))}-{_fmt(max(unet))} s" if unet else "",
            ),
        )

    r.add(cost, "mlp2", "exact")
    r.add(cost, "mlp64", "exact")
    r.add(cost, "mlp64", "hutch-rad-1")
    r.add(cost, "unet64", "exact")
    r.add(cost, "unet64", "hutch-rad-1")
    r.add(nfe_exact_score)
    r.add(crossover)
    r.add(compile_time)
    return r.rows


# --------------------------------------------------------------------------- inverse

_BUDGET_WORDS = {
    "TwistedSMC": "{} particles",
    "DPS": "{} samples",
    "MALA": "{} draws/chain",
    "ULA": "{} draws/chain",
}


def _inverse(d: dict) -> list[dict]:
    """Posterior mean error of each sampler at its largest budget; time to a target error; the sharp case."""
    r = _Rows()
    cases = _dict(d, "cases")
    names = list(cases) if isinstance(cases, dict) else []
    main = [n for n in names if re.fullmatch(r"D\d+", n)]
    main.sort(key=lambda n: int(n[1:]))
    sharp = [n for n in names if n.endswith("_sharp")]

    def case_ctx(name):
        prob = _dict(cases, name, "problem")
        return _ctx(_opt("D = {}", prob.get("D")), _opt("s = {}", prob.get("noise_scale")))

    def err(name, sampler):
        e = max(cases[name]["samplers"][sampler], key=lambda x: x["budget"])  # the largest budget
        budget = _BUDGET_WORDS.get(sampler, "budget {}").format(_fmt(e["budget"]))
        ms = e.get("time_per_run_s")
        return _row(
            f"posterior mean error, {sampler} at {budget}{case_ctx(name)}",
            e["mean_err_rms"],
            "rel. err",
            _join(
                _opt("cov err {}", e.get("cov_err_rms")),
                _opt("{} ms/run", 1000.0 * ms if ms is not None else None),
                _opt("{} NFE/run", e.get("nfe_per_run")),
            ),
        )

    def time_to_target(name):
        tt = cases[name]["time_to_target_s"]
        target = _get(d, "parameters", "targets", "mean_err", default=0.05)
        v = tt["MALA"]["mean_err"]
        others = [
            f"{s} {_fmt(1000.0 * t['mean_err'])} ms" if t.get("mean_err") is not None else f"{s} not reached"
            for s, t in tt.items()
            if s != "MALA" and isinstance(t, dict)
        ]
        return _row(
            f"time per run to posterior mean error {target}, MALA{case_ctx(name)}",
            1000.0 * v if v is not None else "not reached",
            "ms" if v is not None else "",
            "; ".join(others),
        )

    if main:
        big = main[-1]
        for sampler in _keys(cases, big, "samplers"):
            r.add(err, big, sampler)
        r.add(time_to_target, big)
    for name in sharp:
        for sampler in _keys(cases, name, "samplers"):
            r.add(err, name, sampler)
    return r.rows


# --------------------------------------------------------------------------- entry points

EXTRACTORS: dict[str, Callable[[dict], list[dict]]] = {
    "foundation": _foundation,
    "training": _training,
    "vs_torch_2d": _vs_torch_2d,
    "digits_unet": _digits_unet,
    "mala": _mala,
    "score_matching": _score_matching,
    "likelihood": _likelihood,
    "inverse": _inverse,
}


def headlines(name: str, data: dict) -> list[dict]:
    """Headline numbers of one benchmark's JSON: a list of {"metric": str, "value": float | int | str,
    "unit": str, "note": str} rows (note may be ""), at most ~8 rows per benchmark."""
    extract = EXTRACTORS.get(name)
    if extract is None or not isinstance(data, dict):
        return []
    skipped = _skipped(data)
    if skipped is not None:
        return skipped
    try:
        return extract(data)
    except Exception:  # the extractors guard every row; this only catches a bug in their glue
        return []
