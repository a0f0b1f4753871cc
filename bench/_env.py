"""What a benchmark records about where it ran: the machine and the versions of the stack."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

# probdiff sets its XLA flags (it turns off the CPU's YNNPACK fusion) when imported, which only
# takes effect if JAX's backend has not started yet: import it before anything touches JAX.
import probdiff  # noqa: E402, F401


def machine_info() -> dict:
    """JAX devices, platform, CPU model and count, memory, XLA flags and the load average."""
    import jax

    info = {
        "jax_devices": [str(dv) for dv in jax.devices()],
        "jax_backend": jax.default_backend(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "XLA_FLAGS": os.environ.get("XLA_FLAGS"),
        "loadavg_start": os.getloadavg(),
    }
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as fh:
            info["mem_total"] = fh.readline().split(":", 1)[1].strip()
    except OSError:
        pass
    return info


def versions() -> dict:
    """Versions of jax, jaxlib, numpyro, equinox, optax, numpy and probdiff (with its git commit)."""
    import equinox
    import jax
    import jaxlib
    import numpy
    import numpyro
    import optax


    v = {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "numpyro": numpyro.__version__,
        "equinox": equinox.__version__,
        "optax": optax.__version__,
        "numpy": numpy.__version__,
        "probdiff": probdiff.__version__,
    }
    root = Path(probdiff.__file__).resolve().parent.parent
    try:
        v["probdiff_git"] = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "probdiff"], capture_output=True, text=True
        ).stdout.strip()
        v["probdiff_git_dirty"] = bool(dirty)
    except (OSError, subprocess.CalledProcessError):
        pass
    return v


def timestamped_log():
    """A ``log(msg)`` that prints msg after the seconds since this call, flushed."""
    t_start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    return log


def write_result(path, result: dict) -> Path:
    """Write a benchmark's result dict as JSON to ``path`` (parent folders created); return the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    return out


class CompileClock:
    """Intervals of JAX's compile events (trace, lowering, XLA compile), to subtract from wall times.

    Create it before the timed calls: it registers a ``jax.monitoring`` listener.
    """

    EVENTS = (
        "/jax/core/compile/jaxpr_trace_duration",
        "/jax/core/compile/jaxpr_to_mlir_module_duration",
        "/jax/core/compile/backend_compile_duration",
    )

    def __init__(self):
        import jax

        self.intervals = []
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event, duration, **kwargs):
        if event in self.EVENTS:
            end = time.perf_counter()
            self.intervals.append((end - duration, end))

    def compile_seconds(self, t0, t1):
        """Length of the union of the recorded intervals inside [t0, t1] (nested traces count once)."""
        parts = sorted((max(a, t0), min(b, t1)) for a, b in self.intervals if b > t0 and a < t1)
        total, cur = 0.0, None
        for a, b in parts:
            if cur is None or a > cur[1]:
                if cur is not None:
                    total += cur[1] - cur[0]
                cur = [a, b]
            else:
                cur[1] = max(cur[1], b)
        if cur is not None:
            total += cur[1] - cur[0]
        return total

    def count(self, t0, t1):
        """Number of compile events wholly inside [t0, t1]."""
        return sum(1 for a, b in self.intervals if a >= t0 and b <= t1)
