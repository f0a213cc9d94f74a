"""Damaged checkpoints and shards, resumes that change the config, a stalled rank: runs end in the right
behaviour or one actionable error (in this process, tiny Burger, a few seconds each; the stalled-rank case
launches torchrun and is slow)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import test_train_support as support
from test_train_support import one_thread, tiny_data

from tpblocks.train import checkpoint as ckpt_io
from tpblocks.train import run

__all__ = ["one_thread", "tiny_data"]  # fixtures, imported for pytest

KEYS = ("step", "lr", "train_loss", "tokens", "eval_loss", "grad_norm")
SHORT = {"train.max_steps": 8, "train.checkpoint_every": 4, "train.eval_every": 4}


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def _run(tiny_data, run_dir, **extra) -> dict:
    return run(support.compose(support.tiny_overrides(tiny_data, run_dir, **extra)))


def _curve(run_dir) -> list[tuple]:
    return [tuple(r.get(k) for k in KEYS) for r in support.read_metrics(run_dir)]


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory) -> Path:
    """An uninterrupted 8-step run with checkpoints at steps 4 and 8."""
    import torch

    run_dir = tmp_path_factory.mktemp("faults") / "reference"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the resumed runs (one_thread): the same float reductions, bit for bit
    try:
        assert _run(tiny_data, run_dir, **SHORT)["status"] == "completed"
    finally:
        torch.set_num_threads(threads)
    return run_dir


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_64_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    path.write_bytes(bytes(data))


SHARD = "dcp/__0_0.distcp"  # the one rank's shard of model + optimizer state
DAMAGE = {
    "shard truncated": lambda ckpt: _truncate(ckpt / SHARD),
    "shard missing": lambda ckpt: (ckpt / SHARD).unlink(),
    "dcp metadata missing": lambda ckpt: (ckpt / "dcp" / ".metadata").unlink(),
    "trainer.pt emptied": lambda ckpt: (ckpt / "trainer.pt").write_bytes(b""),
    "64 bytes flipped in the shard": lambda ckpt: _flip_64_bytes(ckpt / SHARD),
}


@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tiny_data, reference, tmp_path, capsys, how):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    newest = ckpt_io.checkpoint_root(run_dir) / "step_00000008"
    DAMAGE[how](newest)
    capsys.readouterr()
    summary = _run(tiny_data, run_dir, **SHORT, **{"train.resume": "auto"})
    err = capsys.readouterr().err
    assert summary["status"] == "completed"
    assert f"checkpoint {newest} is damaged" in err and "falling back" in err
    assert f"resumed from {newest.parent / 'step_00000004'} (step 4)" in err
    assert _curve(run_dir) == _curve(reference)  # steps 5..8 recomputed bit for bit
    assert ckpt_io.checkpoint_damage(newest) is None  # and the damaged checkpoint rewritten whole


def test_damaged_checkpoint_named_explicitly_is_refused(tiny_data, reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    newest = ckpt_io.checkpoint_root(run_dir) / "step_00000008"
    _flip_64_bytes(newest / "trainer.pt")
    with pytest.raises(ValueError, match=r"train.resume=.*step_00000008.* is damaged \(trainer.pt does not match"):
        _run(tiny_data, run_dir, **SHORT, **{"train.resume": str(newest)})


def test_every_checkpoint_damaged_is_refused_not_restarted(tiny_data, reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    for ckpt in ckpt_io.complete_checkpoints(run_dir):
        _truncate(ckpt / SHARD)
    with pytest.raises(ValueError, match="every checkpoint under .* is damaged; train.resume=none starts afresh"):
        _run(tiny_data, run_dir, **SHORT)


def test_load_model_on_damaged_or_foreign_files_is_one_line(reference, tmp_path):
    from tpblocks.models.io import load_model

    good = ckpt_io.checkpoint_root(reference) / "step_00000008"
    copy = tmp_path / "ckpt"
    shutil.copytree(good, copy)
    assert (copy / "model.pt").is_file()  # converted for the end-of-run sample and signed in the manifest
    _flip_64_bytes(copy / "model.pt")
    with pytest.raises(ValueError, match="model.pt is damaged: model.pt does not match its sha256"):
        load_model(copy)
    fresh = tmp_path / "fresh"
    shutil.copytree(good, fresh, ignore=shutil.ignore_patterns("model.pt"))
    _flip_64_bytes(fresh / SHARD)
    with pytest.raises(ValueError, match=r"checkpoint .*fresh is damaged \(dcp/__0_0.distcp does not match"):
        ckpt_io.model_file(fresh)  # the converter refuses a damaged checkpoint too
    cut = tmp_path / "cut.pt"
    cut.write_bytes((good / "model.pt").read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"cannot read .*cut.pt.*truncated or not a torch file"):
        load_model(cut)
    foreign = tmp_path / "foreign.pt"
    import torch

    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="not a tpblocks model file"):
        load_model(foreign)


FIXED_ON_RESUME = {
    "comm_reception": (
        {"+model.overrides.comm_reception": "sum"},
        r"holds another model: comm_reception='gated' \(now",
    ),
    "lane_depth": ({"+model.overrides.lane_depth": 3}, r"lane_depth=2 \(now 3\).*the architecture cannot change"),
    "min_lr_ratio": ({"scheduler.min_lr_ratio": 0.1}, r"scheduler.min_lr_ratio=0.1 differs from the checkpoint's 0.0"),
    "warmup": ({"scheduler.warmup_fraction": 0.5}, r"scheduler.warmup_fraction gives 4 warm-up steps .* with 1"),
    "cosine horizon": ({"train.max_steps": 12}, r"a cosine schedule cannot be stretched"),
}


@pytest.mark.parametrize("what", sorted(FIXED_ON_RESUME))
def test_resume_refuses_what_it_cannot_honour(tiny_data, reference, tmp_path, what):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    change, pattern = FIXED_ON_RESUME[what]
    with pytest.raises(ValueError, match=pattern):
        _run(tiny_data, run_dir, **{**SHORT, **change})


def test_resume_applies_and_logs_a_new_learning_rate(tiny_data, reference, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    shutil.rmtree(ckpt_io.checkpoint_root(run_dir) / "step_00000008")
    (ckpt_io.checkpoint_root(run_dir) / "latest").unlink()
    capsys.readouterr()
    assert _run(tiny_data, run_dir, **SHORT, **{"optim.lr": 1.5e-3})["status"] == "completed"
    assert "resume: optim.lr: 0.003 -> 0.0015 (takes effect from step 5)" in capsys.readouterr().err
    ref, got = support.read_metrics(reference), support.read_metrics(run_dir)
    for old, new in zip(ref[4:], got[4:]):  # the same schedule shape, half the peak
        assert new["lr"] == pytest.approx(old["lr"] / 2, rel=1e-12)
    assert "lr: 0.0015" in (run_dir / "config.yaml").read_text()  # config.yaml records what ran


def test_corrupted_shard_body_is_refused_before_training(tiny_data, reference, tmp_path):
    """In-vocabulary corruption (the ids stay valid) changes the body's sha256: refused before step 1."""
    from tpblocks.config import RunConfig
    from tpblocks.data import prepare_data
    from tpblocks.data.shards import HEADER_BYTES

    cfg = RunConfig.from_dictconfig(support.compose(support.tiny_overrides(tiny_data, tmp_path / "unused"))).data
    shards = tmp_path / "shards"
    shutil.copytree(prepare_data(cfg).directory, shards)
    train0 = shards / "train_000000.bin"
    with open(train0, "r+b") as f:
        f.seek(HEADER_BYTES + 100)
        f.write(bytes(64))  # 32 tokens of id 0: valid ids, wrong body
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError, match=r"token shards in .* are damaged: train_000000.bin does not match its sha256"):
        _run(tiny_data, run_dir, **{"data.source": "shards", "data.path": str(shards)})
    assert not (run_dir / "metrics.jsonl").exists()


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_a_stopped_rank_is_named_within_the_timeout(tiny_data, tmp_path):
    """SIGSTOP one of two ranks mid-run: the other's collective times out after trainer.dist_timeout_s and the job
    exits with one line naming the stopped rank; no worker is left behind."""
    run_dir = tmp_path / "run"
    extra = {"train.max_steps": 2000, "train.checkpoint_every": 0, "train.eval_every": 0, "trainer.dist_timeout_s": 10}
    proc = subprocess.Popen(
        support.launch_cmd(support.tiny_overrides(tiny_data, run_dir, **extra), nproc=2), cwd=support.REPO,
        env=support.child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 200
        while time.monotonic() < deadline and proc.poll() is None:
            if (run_dir / "metrics.jsonl").exists() and len(support.read_metrics(run_dir)) >= 3:
                break
            time.sleep(0.2)
        workers = _workers_of(run_dir)
        assert sorted(workers) == [0, 1], workers
        os.kill(workers[1], signal.SIGSTOP)
        stopped = time.monotonic()
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0 and time.monotonic() - stopped < 90
    assert "error: rank 0: a collective timed out after trainer.dist_timeout_s=10 s: rank(s) [1] stalled" in stderr
    assert support.read_summary(run_dir)["status"] == "failed"
    time.sleep(1)
    assert _workers_of(run_dir) == {}


def _workers_of(run_dir: Path) -> dict[int, int]:
    """{rank: pid} of the live torchrun workers training into ``run_dir``."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            environ = dict(
                e.split(b"=", 1) for e in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in e
            )
        except OSError:
            continue
        if str(run_dir).encode() in cmdline and b"TORCHELASTIC_RUN_ID" in environ and b"RANK" in environ:
            found[int(environ[b"RANK"])] = int(pid)
    return found


def test_resume_extends_a_wsd_horizon_and_says_so(tiny_data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    wsd = {**SHORT, "scheduler": "wsd", "train.checkpoint_every": 4}
    assert _run(tiny_data, run_dir, **wsd)["status"] == "completed"
    shutil.rmtree(ckpt_io.checkpoint_root(run_dir) / "step_00000008")  # keep step 4: before the decay (step 6)
    (ckpt_io.checkpoint_root(run_dir) / "latest").unlink()
    capsys.readouterr()
    assert _run(tiny_data, run_dir, **{**wsd, "train.max_steps": 12})["step"] == 12
    assert "resume: train.max_steps 8 -> 12 (WSD decay moved to the new end)" in capsys.readouterr().err
