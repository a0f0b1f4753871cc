"""Run every benchmark of the project and write one JSON and one markdown table.

``python -m bench`` (or ``python bench/run_all.py``) from the repository root runs each script of
``bench/`` in a fresh process (so each pays its own compilations, as a user's script would),
collects their JSON files and writes

* ``<out-dir>/suite.json``: the machine, the versions, and per benchmark its exit code, wall time,
  JSON path and headline numbers;
* ``<out-dir>/suite.md``: the headline numbers as one markdown table.

``--quick`` runs every script's smoke mode (about 20 minutes on 2 CPU cores in all, 7 of them likelihood); its results
go to ``bench/results/quick/``, a full run's to ``bench/results/suite/``, unless ``--out-dir``
says otherwise (the per-script results that bench/README.md quotes stay as they are). A full run
takes about an hour on 2 CPU cores. ``--only scaling,inverse`` picks scripts; ``--skip``
leaves some out. On a machine with a GPU the scripts run there (JAX picks the accelerator), and
``digits_unet`` then compares against PyTorch on the same card.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _env import machine_info, versions, write_result  # noqa: E402
from _headlines import headlines  # noqa: E402

#: Every benchmark script, in the order the suite runs them (cheap and central first).
BENCHMARKS = ("scaling", "foundation", "training", "vs_torch_2d", "digits_unet", "score_matching",
              "mala", "inverse", "likelihood")


def _scaling_headlines(data: dict) -> list[dict]:
    rows = []

    def add(metric, value, unit, note=""):
        rows.append({"metric": metric, "value": value, "unit": unit, "note": note})

    try:
        tr = data["T"]["train"]
        Ts = sorted(tr, key=int)
        add(f"train steps/s at T = {Ts[0]} and {Ts[-1]} (sampled t)",
            f"{tr[Ts[0]]['steps_per_s']:.1f} / {tr[Ts[-1]]['steps_per_s']:.1f}", "steps/s")
        add(f"training step memory at T = {Ts[0]} and {Ts[-1]}",
            f"{tr[Ts[0]]['memory']['peak'] / 2**20:.1f} / {tr[Ts[-1]]['memory']['peak'] / 2**20:.1f}", "MiB")
        ch, al = data["T"]["elbo_chunked"], data["T"]["elbo_all_t"]
        add(f"full-T ELBO memory at T = {Ts[-1]}, chunked / all t at once",
            f"{ch[Ts[-1]]['memory']['peak'] / 2**20:.1f} / {al[Ts[-1]]['memory']['peak'] / 2**20:.1f}", "MiB")
        add(f"full-T ELBO time at T = {Ts[-1]} ({data['T']['parameters']['elbo_points']} points)",
            round(ch[Ts[-1]]["median_s"], 3), "s")
        sa = data["T"]["sample"]
        add(f"ancestral sampling at T = {Ts[-1]} ({data['T']['parameters']['sample_points']} points)",
            round(sa[Ts[-1]]["median_s"], 3), "s")
    except (KeyError, IndexError, TypeError):
        pass
    try:
        p = data["precision"]
        for net in ("mlp", "unet"):
            add(f"bf16 / float32 training speed, {net}",
                round(p[f"{net}/bfloat16"]["steps_per_s"] / p[f"{net}/float32"]["steps_per_s"], 3), "ratio")
    except (KeyError, ZeroDivisionError, TypeError):
        pass
    try:
        runs = {int(k): v for k, v in data["devices"]["runs"].items() if "error" not in v}
        n = max(runs)
        add(f"data-parallel speed-up on {n} devices, strong / weak",
            f"{runs[n]['strong']['steps_per_s'] / runs[1]['strong']['steps_per_s']:.2f} / "
            f"{runs[n]['weak']['examples_per_s'] / runs[1]['weak']['examples_per_s']:.2f}", "x",
            f"{data['machine'].get('jax_backend', '?')} devices")
    except (KeyError, ValueError, ZeroDivisionError, TypeError):
        pass
    return rows


def suite_headlines(name: str, data: dict) -> list[dict]:
    """Headline rows of one benchmark's JSON (see ``_headlines.py``; scaling's are here)."""
    if name == "scaling":
        return _scaling_headlines(data)
    try:
        return headlines(name, data)
    except Exception as err:  # a broken extractor must not lose the suite's other results
        return [{"metric": "headline extraction failed", "value": repr(err)[:80], "unit": "", "note": ""}]


def markdown(suite: dict) -> str:
    m = suite["machine"]
    lines = [f"# probdiff benchmark suite ({suite['mode']})", "",
             f"{suite['started_utc']}, commit `{str(suite['versions'].get('probdiff_git', '?'))[:7]}`, "
             f"{m.get('cpu_model', '?')} ({m.get('cpu_count', '?')} cores), JAX backend {m.get('jax_backend')}, "
             f"devices {', '.join(m.get('jax_devices', []))}.", "",
             "| benchmark | metric | value | unit | note |", "|---|---|---|---|---|"]
    for name, run in suite["runs"].items():
        if run["returncode"] != 0:
            lines.append(f"| {name} | **failed** (exit {run['returncode']}) | | | see {run['log']} |")
            continue
        for row in run["headlines"]:
            val = row["value"]
            if isinstance(val, float):
                val = f"{val:.4g}"
            cells = [name, row["metric"], str(val), row.get("unit", ""), row.get("note", "")]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        lines.append(f"| {name} | wall time of the script | {run['wall_s']:.0f} | s | |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="every script's smoke mode (~20 min on 2 cores)")
    ap.add_argument("--out-dir", default=None,
                    help="where the JSON files go (default bench/results/suite, with --quick bench/results/quick)")
    ap.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    ap.add_argument("--skip", default="", help="comma-separated benchmarks to leave out")
    args = ap.parse_args(argv)
    names = list(BENCHMARKS) if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names + [s for s in args.skip.split(",") if s] if n not in BENCHMARKS]
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    names = [n for n in names if n not in set(args.skip.split(","))]
    out_dir = Path(args.out_dir or (HERE / "results" / ("quick" if args.quick else "suite")))
    out_dir.mkdir(parents=True, exist_ok=True)
    suite = {"benchmark": "probdiff benchmark suite", "mode": "quick" if args.quick else "full",
             "started_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
             "machine": machine_info(), "versions": versions(), "runs": {}}
    for name in names:
        out = out_dir / f"{name}.json"
        log_path = out_dir / f"{name}.log"
        cmd = [sys.executable, str(HERE / f"{name}.py"), "--out", str(out)] + (["--quick"] if args.quick else [])
        print(f"[suite] {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        with open(log_path, "w") as fh:
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=HERE.parent).returncode
        wall = time.perf_counter() - t0
        run = {"returncode": rc, "wall_s": wall, "json": str(out), "log": str(log_path), "headlines": []}
        if rc == 0 and out.exists():
            run["headlines"] = suite_headlines(name, json.loads(out.read_text()))
        print(f"[suite] {name}: exit {rc}, {wall:.0f} s", flush=True)
        suite["runs"][name] = run
        write_result(out_dir / "suite.json", suite)  # after every script: a crash keeps what ran
    (out_dir / "suite.md").write_text(markdown(suite))
    print(markdown(suite))
    print(f"[suite] wrote {out_dir / 'suite.json'} and {out_dir / 'suite.md'}")
    return 0 if all(r["returncode"] == 0 for r in suite["runs"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
