"""Entry point of the GPU check: settings, the sections in order under one time budget, the JSON and the table.

    python -m benchmarks.gpu --out DIR [--budget-s 450] [--only decode,training] [--seed N]
    python -m benchmarks.gpu --dry-run --out DIR      # CPU, tiny sizes, Triton interpreter, compile via aot_eager

Each section runs inside a guard: an exception is recorded with its message and the next section runs; when the
budget is spent (checked before each step, and enforced by an alarm), the rest is marked skipped. The JSON is
rewritten after every section, so a run killed from outside still leaves what it measured.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

# (section, module, phase, seconds it needs at least to start on a GPU, seconds it may take at most or None). The
# cheap phases of every section come first and the cold compiles (the slowest, the first to be skipped when time
# runs short) last.
PLAN = (
    ("ceilings", "ceilings", None, 5, None),
    ("kernel_correctness", "kernel_check", None, 30, None),
    ("comm", "comm_check", None, 10, 45),  # NCCL init should take seconds: a hang must not eat the run
    ("decode", "decode", "graph", 20, None),
    ("training", "train", "eager", 20, None),
    ("kernel_speed", "kernel_speed", None, 30, None),
    ("decode", "decode", "compiled", 60, None),
    ("training", "train", "compile", 60, None),
)
SECTIONS = ("ceilings", "kernel_correctness", "comm", "kernel_speed", "decode", "training")  # the summary's order
REPO = Path(__file__).resolve().parents[2]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="one prepared GPU check (benchmarks/gpu/__init__.py)")
    parser.add_argument("--out", default="outputs/gpu_check", help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, Triton interpreter (CI)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="whole-run time budget in seconds (default 450)")
    parser.add_argument("--only", default="", help=f"comma list of sections: {', '.join(SECTIONS)}")
    parser.add_argument("--seed", type=int, default=None, help="input seed (default: drawn fresh, and recorded)")
    args = parser.parse_args(argv)
    names = list(SECTIONS)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()] or names
    unknown = sorted(set(args.only) - set(names))
    if unknown:
        parser.error(f"--only: unknown section(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    return args


def environment(settings) -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "platform": platform.platform(), "cpu_count": os.cpu_count(), "dry_run": settings.dry_run,
           "seed": settings.seed, "budget_s": settings.budget.seconds,
           "kernels_env": os.environ.get("TPBLOCKS_KERNELS"),
           "triton_interpret": os.environ.get("TRITON_INTERPRET")}  # fmt: skip
    for name in ("triton", "transformers"):
        try:
            env[name] = importlib.import_module(name).__version__
        except ImportError:
            env[name] = None
    if settings.cuda:
        props = torch.cuda.get_device_properties(0)
        env.update(device=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                   memory_GiB=round(props.total_memory / 2**30, 1))  # fmt: skip
    else:
        env["device"] = f"cpu ({platform.processor() or platform.machine()})"
    try:
        env["git"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True, timeout=5).stdout.strip() or None  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        env["git"] = None
    return env


def run_section(name: str, module: str, phase: str | None, need: float, cap: float | None, settings,
                results: dict) -> None:  # fmt: skip
    """One phase of one section, guarded. A section's ``run(settings, results, phase)`` returns its figures with
    the earlier phases' rows included; ``results[name]["phases"]`` records how each phase went."""
    from .common import OutOfTime

    label = f"{name} [{phase}]" if phase else name
    record = results.setdefault(name, {"phases": {}})
    t0 = time.perf_counter()
    status, data, message = "ok", {}, ""
    if not settings.budget.allows(0 if settings.dry_run else need):
        status, message = "skipped", f"time budget: {settings.budget.left():.0f} s left"
    else:
        print(f"\n=== {label} ({settings.budget.left():.0f} s of budget left)", flush=True)
        try:
            settings.budget.arm(cap)  # the alarm only interrupts a section, never the bookkeeping around them
            data = importlib.import_module(f"benchmarks.gpu.{module}").run(settings, results, phase)
        except OutOfTime as e:
            status, message = "timed out", str(e)
        except ImportError as e:  # an optional package missing on this machine: said, not a crash
            status, message = "skipped", f"missing package: {e}"
        except Exception as e:  # noqa: BLE001 - one broken section must not hide the others
            status, message = "failed", f"{type(e).__name__}: {e}"[:500]
            record["traceback"] = traceback.format_exc()[-3000:]
        finally:
            settings.budget.disarm()
    record["phases"][label] = {"status": status, "seconds": round(time.perf_counter() - t0, 1), "message": message}
    record.update(data)
    record["status"] = "ok" if any(p["status"] == "ok" for p in record["phases"].values()) else status
    print(f"--- {label}: {status} in {record['phases'][label]['seconds']} s {message}", flush=True)
    from benchmarks.common import print_table

    for key in ("table", "prediction_table"):
        if data.get(key):
            print_table(data[key], title=f"{label} ({key})")


def summary_rows(results: dict) -> list[dict]:
    from .common import fmt

    rows = []
    for name in SECTIONS:
        sec = results.get(name)
        if sec is None:
            continue
        for label, phase in sec.get("phases", {}).items():
            if phase["status"] != "ok":
                rows.append({"section": name, "item": f"{label}: {phase['status']}", "value": "",
                             "note": phase.get("message", "")[:90]})  # fmt: skip
        for item, value, note in sec.get("summary", []):
            rows.append({"section": name, "item": item, "value": fmt(value, 4) if isinstance(value, float) else value,
                         "note": note})  # fmt: skip
    return rows


def markdown(rows: list[dict], env: dict) -> str:
    head = (
        f"device {env.get('device')}, torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), triton "
        f"{env.get('triton')}, python {env.get('python')}, git {env.get('git')}, seed {env.get('seed')}"
    )
    lines = [head, "", "| section | item | value | note |", "|---|---|---|---|"]
    lines += [f"| {r['section']} | {r['item']} | {r['value']} | {r['note']} |" for r in rows]
    return "\n".join(lines) + "\n"


def write(out: Path, results: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:  # before any kernel module is imported: @triton.jit reads it
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    from benchmarks.common import print_table

    from .common import Budget, Settings

    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device here; run with --dry-run on a CPU", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(3), "little")
    settings = Settings(device=torch.device("cpu" if args.dry_run else "cuda"), dry_run=args.dry_run,
                        budget=Budget(args.budget_s), seed=seed,
                        compile_backend="aot_eager" if args.dry_run else "inductor")  # fmt: skip
    out = Path(args.out)
    results: dict = {"environment": environment(settings)}
    print(f"GPU check: {results['environment']}", flush=True)
    for name, module, phase, need, cap in PLAN:
        if name in args.only:
            run_section(name, module, phase, need, cap, settings, results)
            write(out, results)
    rows = summary_rows(results)
    results["summary"] = rows
    write(out, results)
    (out / "gpu_check.md").write_text(markdown(rows, results["environment"]))
    print_table(rows, title=f"\nGPU check summary ({results['environment'].get('device')}; "
                            f"full figures in {out / 'gpu_check.json'})")  # fmt: skip
    return 0
