"""Sweeps without a scheduler: grids at a matched budget, invalid points kept, manifest/task plumbing, the
report (CSV + plots) over fabricated run directories that follow the run-directory contract, Eq. 12."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tpblocks.models import TransformerLM, get_flavor
from tpblocks.sweeps.collect import collect, extremum_distance, extremum_distance_curve, read_csv, write_csv
from tpblocks.sweeps.grids import GRIDS, expand, get_scale, parse_values
from tpblocks.sweeps.manifest import build_manifest, finalize_task, read_manifest
from tpblocks.sweeps.plots import plot_sweep
from tpblocks.sweeps.submit import SlurmResources, sbatch_command, with_repo
from tpblocks.sweeps.task import task_argv

REPO = Path(__file__).resolve().parents[1]
TINY = get_scale("tiny")


# ---------------------------------------------------------------------------------------------- grids
@pytest.mark.parametrize("grid", list(GRIDS))
def test_every_valid_point_matches_the_budget(grid):
    points = expand(grid, TINY)
    assert points, grid
    for p in points:
        if p.valid:
            assert abs(p.n_params - TINY.budget) <= 0.01 * TINY.budget, (p.name, p.n_params)


def test_counts_checked_against_built_models():
    """The solver's analytic count is the sizing module's; check it against real modules' numel."""
    for p in expand("lane_count", TINY, {"lane_count": [1, 4, 16]}):
        model = TransformerLM(p.model)
        numel = sum(t.numel() for t in model.parameters())
        assert 0.99 * TINY.budget <= numel <= 1.01 * TINY.budget, (p.name, numel)


def test_paper_lane_count_grid_is_the_reports():
    points = expand("lane_count", get_scale("paper"))
    by = {(p.coords["recipe"], p.coords.get("lane_count")): p for p in points}
    assert set(by) == {(r, n) for r in ("sandwich", "burger") for n in (1, 2, 4, 8, 16)} | {("llama", None)}
    for (recipe, lanes), p in by.items():
        assert p.valid, p.invalid_reason
        assert abs(p.n_params - 150e6) <= 1.5e6
        if recipe != "llama":
            assert (p.model.lane_count, p.model.lane_depth, p.model.n_classic_layers) == (lanes, 12, 1)
            assert p.model.tp_block_repetition == 1 and p.model.vocab_size == 32001
    # the report's Llama baseline is as deep as the TP models (12 lane layers + 1 classic)
    assert by[("llama", None)].model.n_layers == 13


def test_paper_grids_follow_section_6():
    paper = get_scale("paper")
    tp = expand("tp_blocks", paper)
    assert {(p.model.tp_block_repetition * p.model.lane_depth) for p in tp} == {12}
    assert sorted({p.model.tp_block_repetition for p in tp}) == [1, 2, 3, 4, 6, 12]
    classic = expand("classic_layers", paper)
    assert sorted({p.model.n_classic_layers for p in classic}) == [1, 2, 3, 4]
    assert {(p.model.tp_block_repetition, p.model.lane_count, p.model.lane_depth) for p in classic} == {(4, 4, 3)}
    aspect = {(p.coords["recipe"], p.model.lane_depth) for p in expand("aspect_ratio", paper)}
    assert aspect == {("burger", d) for d in (8, 20, 32)} | {("sandwich", d) for d in (3, 8, 16, 20, 32)}
    seeds = expand("seed_variance", paper)
    assert len(seeds) == 2 * 2 * 10 and all(f"seed={p.coords['seed']}" in p.train_overrides for p in seeds)


def test_delayed_grid_keeps_invalid_points_with_reason():
    depth = TINY.delayed_lane_depth
    points = expand("delayed_comm", TINY)
    assert len(points) == 3 * 4 * 4  # every combination is listed, valid or not
    for p in points:
        s, n = p.coords["comm_start"], p.coords["comm_length"]
        # the first send (after layer s) is received after layer s + n, which must exist (layers 0..depth-1)
        fits = s + n <= depth - 1
        assert p.valid == fits, p.name
        if not fits:
            assert "comm_start" in p.invalid_reason and "lane_depth" in p.invalid_reason
        else:
            assert (p.model.comm_start, p.model.comm_interleave, p.model.comm_length) == (
                s, p.coords["comm_interleave"], n)  # fmt: skip
    assert any(not p.valid for p in points) and any(p.valid for p in points)


def test_axis_values_and_scale_knobs_from_strings():
    assert parse_values(["lane_count=1,2,4", "recipe=sandwich"]) == {"lane_count": [1, 2, 4], "recipe": ["sandwich"]}
    scale = get_scale("tiny", budget="8e5", tokens="4096")
    assert scale.budget == 800_000 and scale.max_steps == 4
    with pytest.raises(ValueError, match="unknown scale knob"):
        get_scale("tiny", budgte="1")
    with pytest.raises(ValueError, match="tokens_per_step"):
        get_scale("tiny", tokens="10")
    with pytest.raises(ValueError, match="unknown sweep grid"):
        expand("lanes", TINY)


def test_overrides_rebuild_the_solved_model_through_the_trainer_config():
    """Compose the trainer's own Hydra config with a task's overrides: the model it would train is the point's."""
    pytest.importorskip("tpblocks.config")
    from tpblocks.config import RunConfig, compose

    if not (REPO / "conf" / "config.yaml").is_file():
        pytest.skip("the trainer's conf/ is not present")
    points = [p for p in expand("delayed_comm", TINY) if p.valid][:2] + expand("lane_count", TINY, {"lane_count": [8]})
    manifest = build_manifest("mixed", TINY, points, "/tmp/unused")
    for task, point in zip(manifest.tasks, points):
        run = RunConfig.from_dictconfig(compose(task.overrides))
        assert run.model.replace(extra={}) == point.model.replace(extra={}), task.name
        assert run.train.max_steps == TINY.max_steps and run.seq_len == TINY.seq_len


# ---------------------------------------------------------------------------------------------- manifest / task
def _manifest(tmp_path, grid="lane_count", values=None):
    points = expand(grid, TINY, values if values is not None else {"lane_count": [1, 2, 4], "recipe": ["sandwich"]})
    m = with_repo(build_manifest(grid, TINY, points, tmp_path / "sweep", extra_overrides=["train.log_every=1"]))
    m.write()
    return read_manifest(m.path)


def test_manifest_round_trip_and_task_argv(tmp_path):
    m = _manifest(tmp_path)
    assert [t.name for t in m.tasks] == ["sandwich_L1", "sandwich_L2", "sandwich_L4"]
    argv = task_argv(m, 1)
    assert argv[0] == str(REPO / "launch" / "train.py")
    assert f"run_dir={tmp_path / 'sweep' / 'runs' / 'sandwich_L2'}" in argv and argv[-1] == "train.log_every=1"
    out = subprocess.run([sys.executable, "-m", "tpblocks.sweeps.task", "argv", str(m.path), "2"],
                         capture_output=True, text=True, cwd=REPO)  # fmt: skip
    assert out.returncode == 0 and out.stdout.splitlines() == task_argv(m, 2)
    bad = subprocess.run([sys.executable, "-m", "tpblocks.sweeps.task", "argv", str(m.path), "3"],
                         capture_output=True, text=True, cwd=REPO)  # fmt: skip
    assert bad.returncode == 2 and "outside this sweep's 3 tasks" in bad.stderr


def test_finalize_records_a_crash_as_failed(tmp_path):
    m = _manifest(tmp_path)
    log = tmp_path / "task.log"
    log.write_text(
        "step 1\nTraceback (most recent call last):\nRuntimeError: out of memory\n"
        "E1122 01:37:49.288000 22991 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: 1)\n"
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n"
        "srun: error: vm: task 0: Exited with exit code 1\n"
    )  # what srun + torchrun print after the trainer's own error: the report must show the trainer's line
    s = finalize_task(m, 0, 137, log)
    assert s["status"] == "failed" and "137" in s["error"] and s["error"].endswith("RuntimeError: out of memory")
    assert json.loads((Path(m.tasks[0].run_dir) / "summary.json").read_text())["status"] == "failed"
    # a run that finished and said so is left alone
    done = {"status": "completed", "final_train_loss": 1.5}
    Path(m.tasks[1].run_dir).mkdir(parents=True)
    (Path(m.tasks[1].run_dir) / "summary.json").write_text(json.dumps(done))
    assert finalize_task(m, 1, 0) == done
    # exit 0 but the trainer never wrote its summary: not a success
    assert finalize_task(m, 2, 0)["status"] == "failed"


def test_sbatch_command_and_script_syntax(tmp_path):
    m = _manifest(tmp_path)
    cmd = sbatch_command(m, SlurmResources(nodes=4, gpus_per_node=8, partition="gpu", max_parallel=2))
    assert cmd[0] == "sbatch" and cmd[-1].endswith("launch/slurm/sweep_array.sbatch")
    assert "--array=0-2%2" in cmd and "--nodes=4" in cmd and "--gpus-per-node=8" in cmd and "--partition=gpu" in cmd
    export = next(c for c in cmd if c.startswith("--export="))
    assert f"TPB_MANIFEST={m.path}" in export and "TPB_NPROC_PER_NODE=8" in export
    for script in ("launch/slurm/sweep_array.sbatch", "launch/slurm/local_cluster.sh"):
        assert subprocess.run(["bash", "-n", str(REPO / script)]).returncode == 0, script
    with pytest.raises(ValueError, match="time="):
        SlurmResources(time="4h")


def test_submit_cli_dry_run_from_experiment_yaml(tmp_path):
    sweep_dir = tmp_path / "s"
    out = subprocess.run(
        [sys.executable, "launch/slurm/submit.py", "sweep_delayed_comm", "--scale", "tiny", "--dry-run",
         "--sweep-dir", str(sweep_dir), "--max-parallel", "3"],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    m = read_manifest(sweep_dir)
    assert m.sweep == "delayed_comm" and len(m.tasks) + len(m.invalid) == 48 and m.invalid
    assert f"--array=0-{len(m.tasks) - 1}%3" in out.stdout and "invalid sandwich_s2_i0_n6" in out.stdout
    bad = subprocess.run([sys.executable, "launch/slurm/submit.py", "sweep_nope", "--dry-run"],
                         capture_output=True, text=True, cwd=REPO)  # fmt: skip
    assert bad.returncode == 2 and "no sweep named" in bad.stderr


# ---------------------------------------------------------------------------------------------- report
def _fake_run(run_dir: Path, losses: list[float], status: str | None = "completed", error: str | None = None,
              eval_loss: float | None = None):  # fmt: skip
    """A run directory as the trainer writes it (contracts.md)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / "metrics.jsonl").open("w") as f:
        for i, loss in enumerate(losses, start=1):
            f.write(json.dumps({"step": i, "lr": 1e-3, "train_loss": loss, "tokens": 1024 * i, "tokens_per_s": 1.0,
                                "elapsed_s": float(i)}) + "\n")  # fmt: skip
    if status is not None:
        summary = {"status": status, "step": len(losses), "final_train_loss": losses[-1] if losses else None,
                   "final_eval_loss": eval_loss, "params": 1, "tokens_seen": 1024 * len(losses), "arch": "tp_blocks",
                   "recipe": "sandwich", "lane_count": 1, "flavor": "x", "experiment": "x", "error": error,
                   "wall_s": 1.0}  # fmt: skip
        (run_dir / "summary.json").write_text(json.dumps(summary))


def test_report_keeps_failed_and_missing_points(tmp_path):
    m = _manifest(tmp_path, values={"lane_count": [1, 2, 4, 8], "recipe": ["sandwich", "llama"]})
    runs = {t.name: Path(t.run_dir) for t in m.tasks}
    _fake_run(runs["sandwich_L1"], [5.0, 4.0, 3.1])
    _fake_run(runs["sandwich_L2"], [5.0, 4.2, 3.3])
    _fake_run(runs["sandwich_L4"], [5.0, 4.5], status="failed", error="RuntimeError: boom")
    _fake_run(runs["sandwich_L8"], [5.0, 4.4], status=None)  # killed: metrics but no summary
    # llama: never started (no directory)
    rows = collect([m.sweep_dir])
    status = {r["name"]: r["status"] for r in rows}
    assert status == {"sandwich_L1": "completed", "sandwich_L2": "completed", "sandwich_L4": "failed",
                      "sandwich_L8": "incomplete", "llama": "missing"}  # fmt: skip
    csv_rows = {r["name"]: r for r in read_csv(write_csv(rows, tmp_path / "out" / "results.csv"))}
    assert float(csv_rows["sandwich_L1"]["final_train_loss"]) == pytest.approx(3.1)
    assert csv_rows["sandwich_L4"]["error"] == "RuntimeError: boom" and csv_rows["sandwich_L2"]["lane_count"] == "2"
    assert int(csv_rows["llama"]["params"]) == next(t.n_params for t in m.tasks if t.name == "llama")
    [png] = plot_sweep(rows, tmp_path / "out")
    assert png.name == "fig18_lane_count.png" and png.stat().st_size > 10_000


def test_report_cli_on_a_delayed_sweep(tmp_path):
    m = _manifest(tmp_path, grid="delayed_comm", values={"comm_interleave": [0, 1]})
    for i, t in enumerate(m.tasks):
        _fake_run(Path(t.run_dir), [5.0, 4.0 + 0.05 * i])
    out = subprocess.run([sys.executable, "launch/report.py", m.sweep_dir, "--out", str(tmp_path / "rep")],
                         capture_output=True, text=True, cwd=REPO)  # fmt: skip
    assert out.returncode == 0, out.stderr
    rows = read_csv(tmp_path / "rep" / "results.csv")
    assert len(rows) == 3 * 2 * 4 and sum(r["status"] == "invalid" for r in rows) == len(m.invalid) > 0
    assert (tmp_path / "rep" / "fig22b_delayed_comm.png").stat().st_size > 10_000
    assert "invalid" in out.stdout and "completed" in out.stdout


def test_extremum_distance_eq12():
    # disjoint ranges [1, 2] and [3, 4]: gap of 1
    assert extremum_distance([1.0, 2.0], [3.0, 4.0]) == pytest.approx(1.0)
    assert extremum_distance([3.0, 4.0], [1.5, 2.0]) == pytest.approx(1.0)
    # overlapping [1, 3] and [2, 4]: overlap of 1 -> -1
    assert extremum_distance([1.0, 3.0, 2.0], [2.0, 4.0]) == pytest.approx(-1.0)
    # one range inside the other: minus the inner range's width
    assert extremum_distance([0.0, 10.0], [4.0, 6.0]) == pytest.approx(-2.0)
    a = [([1, 2, 3], [5.0, 4.0, 3.0]), ([1, 2, 3], [5.2, 4.1, 3.2])]
    b = [([1, 2, 3, 4], [5.1, 4.6, 3.9, 3.5]), ([2, 3], [4.5, 3.6])]
    steps, d = extremum_distance_curve(a, b)
    assert steps == [2, 3]
    assert d == pytest.approx([-(4.1 - 4.5), -(3.2 - 3.6)])


def test_seed_variance_figures(tmp_path):
    m = _manifest(tmp_path, grid="seed_variance", values={"seeds": [2]})
    g = torch.Generator().manual_seed(0)
    for t in m.tasks:
        base = 4.0 if t.coords["arch"] == "burger" else 3.5
        _fake_run(Path(t.run_dir), [base + 2 / s + 0.05 * float(torch.rand(1, generator=g)) for s in range(1, 9)])
    paths = plot_sweep(collect([m.sweep_dir]), tmp_path / "rep")
    assert {p.name for p in paths} == {"fig17b_seed_variance.png", "fig17d_extremum_distance.png"}
    assert all(p.stat().st_size > 10_000 for p in paths)


def test_get_flavor_bases_exist():
    from tpblocks.sweeps.grids import BASE_FLAVORS

    for flavor in BASE_FLAVORS.values():
        get_flavor(flavor)


# ---------------------------------------------------------------------------------------------- seeds, laptop, findings
def test_seed_axis_repeats_every_point_of_any_grid():
    points = expand("lane_count", TINY, {"lane_count": [4], "recipe": ["burger", "llama"], "seed": [1, 2]})
    assert [p.name for p in points] == ["burger_L4_seed1", "llama_seed1", "burger_L4_seed2", "llama_seed2"]
    assert all(p.train_overrides[-1] == f"seed={p.coords['seed']}" for p in points)
    assert points[0].model == points[2].model  # same model, only the initialisation differs
    # seed_variance keeps its own seed axis (one run per seed, not seeds x seeds)
    assert len(expand("seed_variance", TINY, {"seed": [0, 1], "scheduler": ["cosine"], "arch": ["llama"]})) == 2


def test_delayed_grid_reception_axis():
    points = expand("delayed_comm", TINY, {"comm_start": [0], "comm_interleave": [0], "comm_length": [1],
                                           "comm_reception": ["sum", "gated"]})  # fmt: skip
    assert [p.name for p in points] == ["sandwich_s0_i0_n1_sum", "sandwich_s0_i0_n1"]
    assert [p.model.comm_reception for p in points] == ["sum", "gated"]


def test_laptop_scale_points():
    laptop = get_scale("laptop")
    assert laptop.seq_len == 256 and laptop.vocab_size == 4096 and laptop.max_steps * laptop.tokens_per_step > 4e5
    assert "data=local" in laptop.overrides and any(o.startswith("data.heldout_tokens=") for o in laptop.overrides)
    points = expand("lane_count", laptop, {"lane_count": [1, 2, 4, 8]})
    assert len(points) == 9 and all(p.valid for p in points)
    assert all(abs(p.n_params - 3e6) <= 0.01 * 3e6 and p.model.tie_embeddings for p in points)


def _lane_sweep_with_seeds(tmp_path, losses: dict[str, float], spread: float = 0.02):
    """lane_count L1/L2/L4/L8 x {sandwich, burger} + Llama; L4 and Llama also with seeds 1 and 2."""
    main = expand("lane_count", TINY, {"lane_count": [1, 2, 4, 8], "seed": [0]})
    extra = expand("lane_count", TINY, {"lane_count": [4], "seed": [1, 2]})
    m = with_repo(build_manifest("lane_count", TINY, main + extra, tmp_path / "sweep"))
    m.write()
    for t in m.tasks:
        final = losses[t.name.rsplit("_seed", 1)[0]] + spread * t.coords["seed"]
        _fake_run(Path(t.run_dir), [final + 2.0, final + 1.0, final + 0.5, final], eval_loss=final + 0.1)
    return m


def test_findings_verdicts_and_report_command(tmp_path):
    from tpblocks.sweeps.findings import findings

    losses = {"llama": 3.0, "sandwich_L1": 3.10, "burger_L1": 3.10, "sandwich_L2": 3.2, "sandwich_L4": 3.3,
              "sandwich_L8": 3.4, "burger_L2": 3.5, "burger_L4": 3.45, "burger_L8": 3.0}  # fmt: skip
    m = _lane_sweep_with_seeds(tmp_path, losses)
    rows = collect([m.sweep_dir])
    found, note = findings(rows)
    verdict = {f.finding: f.verdict for f in found}
    assert "0.040" in note  # spread = 2 x 0.02 over seeds 0..2
    assert verdict["Fig. 18: more lanes -> higher loss (Sandwich)"] == "yes"
    assert verdict["Fig. 18: more lanes -> higher loss (Burger)"] == "no"  # L8 below L1 beyond the spread
    assert verdict["Fig. 18: one lane, Sandwich = Burger (no prepare/merge)"] == "yes"
    assert verdict["Fig. 18: Sandwich below Burger at every lane count"] == "mixed"  # L8: burger below sandwich
    assert verdict["Fig. 17d: llama and burger_L4 separated beyond seed noise (Eq. 12 > 0)"] == "yes"
    # a Burger grid without its one-lane point borrows the Sandwich's: with one lane they are the same model
    rows_no_b1 = [r for r in rows if r["name"] != "burger_L1_seed0"]
    [burger] = [f for f in findings(rows_no_b1)[0] if f.finding == "Fig. 18: more lanes -> higher loss (Burger)"]
    assert burger.verdict == "no" and "L1 = sandwich_L1" in burger.evidence
    # within the seed spread: not decided, direction said
    close = _lane_sweep_with_seeds(tmp_path / "close", {**losses, "burger_L4": 3.31})
    verdict = {f.finding: f.verdict for f in findings(collect([close.sweep_dir]))[0]}
    assert verdict["Fig. 18: Sandwich below Burger at 4 lanes"].startswith("too small to decide (direction as")

    out = subprocess.run([sys.executable, "launch/report.py", m.sweep_dir, "--out", str(tmp_path / "rep"), "--loss",
                          "eval"], capture_output=True, text=True, cwd=REPO)  # fmt: skip
    assert out.returncode == 0, out.stderr
    text = (tmp_path / "rep" / "findings.md").read_text()
    assert "| Fig. 18: more lanes -> higher loss (Sandwich) | yes |" in text and "final_eval_loss" in text
    assert "| burger_L4 | 3 | 3.5700 | 3.5500 | 3.5900 |" in text  # eval = final + 0.1, seeds 0..2
    for name in ("fig18_lane_count.png", "fig18_lane_count_curves.png", "fig17d_lane_count_extremum.png"):
        assert (tmp_path / "rep" / name).stat().st_size > 10_000, name


def test_manifest_records_the_commit_of_the_checkout(tmp_path):
    from tpblocks.sweeps.submit import git_state

    assert git_state(tmp_path) == {}  # not a git checkout: nothing recorded, no error
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    m = _manifest(tmp_path)
    assert len(m.extra["commit"]) == 40 and isinstance(m.extra["dirty"], bool)


def test_rerun_submits_only_the_unfinished_tasks(tmp_path):
    from tpblocks.sweeps.submit import unfinished_tasks

    m = _manifest(tmp_path)  # sandwich L1, L2, L4
    _fake_run(Path(m.tasks[0].run_dir), [5.0, 4.0])
    _fake_run(Path(m.tasks[1].run_dir), [5.0], status="failed", error="killed")
    assert unfinished_tasks(m) == [1, 2]  # failed, never started
    assert unfinished_tasks(m, ["sandwich_L1"]) == [0]
    with pytest.raises(ValueError, match="no task named nope"):
        unfinished_tasks(m, ["nope"])
    cmd = sbatch_command(m, SlurmResources(max_parallel=1), indices=[2, 1])
    assert "--array=1,2%1" in cmd
    with pytest.raises(ValueError, match="outside this sweep"):
        sbatch_command(m, SlurmResources(), indices=[7])
    out = subprocess.run([sys.executable, "launch/slurm/submit.py", m.sweep_dir, "--rerun", "--dry-run"],
                         capture_output=True, text=True, cwd=REPO)  # fmt: skip
    assert out.returncode == 0 and "--array=1,2 " in out.stdout, out.stderr


def test_classic_layers_findings(tmp_path):
    """Fig. 21: C4 above C1 for both recipes; the Sandwich's effect larger than the Burger's, judged on the spread."""
    from tpblocks.sweeps.findings import findings

    main = expand("classic_layers", TINY, {"n_classic_layers": [1, 4], "seed": [0]})
    seeds = expand("lane_count", TINY, {"lane_count": [4], "recipe": ["sandwich"], "seed": [0, 1, 2]})
    m = with_repo(build_manifest("classic", TINY, main + seeds, tmp_path / "sweep"))
    m.write()
    losses = {"sandwich_C1": 3.0, "sandwich_C4": 3.5, "burger_C1": 3.2, "burger_C4": 3.25, "sandwich_L4": 3.3}
    for t in m.tasks:
        final = losses[t.name.rsplit("_seed", 1)[0]] + 0.01 * t.coords["seed"]
        _fake_run(Path(t.run_dir), [final + 1.0, final], eval_loss=final)
    verdict = {f.finding: f.verdict for f in findings(collect([m.sweep_dir]))[0]}
    assert verdict["Fig. 21: more classic layers per TP block -> higher loss (Sandwich, 4 vs 1)"] == "yes"
    assert verdict["Fig. 21: more classic layers per TP block -> higher loss (Burger, 4 vs 1)"] == "yes"
    assert verdict["Fig. 21: the classic-layer effect is larger for Sandwich than for Burger"] == "yes"


def test_findings_decide_nothing_without_a_measured_seed_spread(tmp_path):
    from tpblocks.sweeps.findings import findings

    m = _manifest(tmp_path, values={"lane_count": [1, 8], "recipe": ["sandwich"]})
    _fake_run(Path(m.tasks[0].run_dir), [5.0, 3.0], eval_loss=3.0)
    _fake_run(Path(m.tasks[1].run_dir), [5.0, 3.5], eval_loss=3.5)
    found, note = findings(collect([m.sweep_dir]))
    assert "unmeasured" in note
    [lanes] = [f for f in found if f.finding == "Fig. 18: more lanes -> higher loss (Sandwich)"]
    assert lanes.verdict.startswith("too small to decide") and "spread inf" in lanes.evidence
