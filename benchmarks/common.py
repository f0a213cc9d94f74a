"""Shared helpers for benchmarks: a plain-text table, a JSON dump, and a description of the machine."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch


def machine_info() -> dict:
    """What the figures were measured on: they mean little without it."""
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "cpu_model": _cpu_model(),
        # Other processes on a shared machine change every CPU timing: record how busy it was.
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def busy_machine_warning() -> str | None:
    """A warning when the 1-minute load average exceeds the core count (timings then measure contention)."""
    if not hasattr(os, "getloadavg"):
        return None
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load <= cores:
        return None
    return (f"WARNING: load average {load:.1f} on {cores} cores: other processes hold the CPU and these timings "
            f"mostly measure contention; rerun on an idle machine")  # fmt: skip


def print_table(rows: list[dict], title: str = "") -> None:
    """Rows of dicts with the same keys, printed as aligned columns."""
    if title:
        print(title)
    if not rows:
        print("  (no rows)")
        return
    keys = list(rows[0])
    widths = {k: max(len(str(k)), *(len(str(r.get(k, ""))) for r in rows)) for k in keys}
    print("  " + "  ".join(str(k).ljust(widths[k]) for k in keys))
    print("  " + "  ".join("-" * widths[k] for k in keys))
    for r in rows:
        print("  " + "  ".join(str(r.get(k, "")).ljust(widths[k]) for k in keys))


def write_json(path: str | os.PathLike, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str))
    print(f"wrote {path}")
