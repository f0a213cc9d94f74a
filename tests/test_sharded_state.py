"""Sharded checkpoints (tpblocks/train/sharded_state.py) reshard exactly between layouts.

Two gloo ranks hold a lane-sharded model after one AdamW step and save it through DCP; one process loads that
checkpoint into the full model (weights and optimizer moments equal the gathered shards bit for bit), saves it
again, and two ranks load that back into their shards (each equal to its slice of the full tensors). Cases: a TP
block model (stacked lanes, reception gates), Llama with one KV head on two ranks (replicated KV rows, which are
saved gathered) and DTP (lane-cut head, norms shared by the lanes).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from dist_utils import run_workers

from tpblocks.config import OptimConfig
from tpblocks.models import build_model
from tpblocks.models.flavors import get_flavor
from tpblocks.models.io import load_model
from tpblocks.models.layers import local
from tpblocks.parallel import MeshComm, ParallelDims, local_slice, shard_model, unshard_state_dict
from tpblocks.train import checkpoint as ckpt_io
from tpblocks.train import sharded_state
from tpblocks.train.optim import build_optimizer

CASES = {
    "burger": ("debug_burger", {}),
    "llama_kv_replicated": ("debug_llama", {"n_kv_heads": 1}),
    "dtp_lane_head": ("debug_dtp", {"lm_head_type": "lane"}),
}
MOMENTS = ("exp_avg", "exp_avg_sq")


def _trained(cfg, comm=None):
    """The model (sharded over ``comm`` if given, as training shards it: DTensor lane shards) and its optimizer after
    one AdamW step on fixed tokens."""
    torch.manual_seed(0)
    model = build_model(cfg)
    if comm is not None:
        model = shard_model(model, comm, lane_dtensors=True)
    optimizer = build_optimizer(model, OptimConfig())
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, cfg.vocab_size, (2, 12), generator=gen)
    F.cross_entropy(model(tokens).flatten(0, 1), tokens.roll(-1, 1).flatten()).backward()
    optimizer.step()
    return model, optimizer


def _moments(model, optimizer) -> dict[str, dict[str, torch.Tensor]]:
    """{moment: {parameter name: this rank's tensor}}."""
    return {m: {n: optimizer.state[p][m] for n, p in model.named_parameters()} for m in MOMENTS}


@torch.no_grad()
def _gathered(model, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The full tensors of per-parameter ``values`` shaped like this rank's shards (collective)."""
    params = dict(model.named_parameters())
    backup = {n: p.clone() for n, p in params.items()}
    for n, p in params.items():
        p.copy_(values[n])
    full = unshard_state_dict(model)
    for n, p in params.items():
        p.copy_(backup[n])
    return {n: full[n] for n in params}


def _save_sharded(rank: int, world: int, case: str, out: str) -> None:
    flavor, overrides = CASES[case]
    cfg = get_flavor(flavor, **overrides)
    mesh = ParallelDims(dp=1, lane=world).build_mesh("cpu")
    model, optimizer = _trained(cfg, MeshComm(mesh))
    sharded_state.save(model, optimizer, mesh, f"{out}/lane2")
    expected = {"model": unshard_state_dict(model)}
    expected.update({m: _gathered(model, v) for m, v in _moments(model, optimizer).items()})
    if rank == 0:
        torch.save({"full": expected, "groups": sharded_state.optimizer_groups(optimizer)}, f"{out}/expected.pt")


def _load_sharded(rank: int, world: int, case: str, out: str) -> None:
    flavor, overrides = CASES[case]
    cfg = get_flavor(flavor, **overrides)
    mesh = ParallelDims(dp=1, lane=world).build_mesh("cpu")
    model, optimizer = _trained(cfg, MeshComm(mesh))
    with torch.no_grad():  # the load must overwrite every value (these are the saved ones otherwise)
        for tensor in [*model.parameters(), *(t for s in optimizer.state.values() for t in s.values())]:
            tensor.zero_()
    saved = torch.load(f"{out}/expected.pt", weights_only=True)
    sharded_state.load(model, optimizer, saved["groups"], mesh, f"{out}/lane1")
    full, spec = saved["full"], model.shard_spec
    for name, tensor in model.state_dict().items():
        assert torch.equal(local(tensor), local_slice(full["model"][name], spec, name)), f"rank {rank}: {name}"
    for moment, values in _moments(model, optimizer).items():
        for name, tensor in values.items():
            assert torch.equal(local(tensor), local_slice(full[moment][name], spec, name)), (
                f"rank {rank}: {moment} {name}"
            )
    assert all(int(s["step"]) == 1 for s in optimizer.state.values())


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", sorted(CASES))
def test_lane2_checkpoint_loads_in_one_process_and_back(case, tmp_path):
    run_workers(_save_sharded, world=2, args=(case, str(tmp_path)))
    saved = torch.load(tmp_path / "expected.pt", weights_only=True)
    full = saved["full"]
    flavor, overrides = CASES[case]
    cfg = get_flavor(flavor, **overrides)
    model, optimizer = _trained(cfg)  # different values (one process): all of them must be overwritten
    assert not torch.equal(_moments(model, optimizer)["exp_avg"]["tok_embeddings.weight"],
                           full["exp_avg"]["tok_embeddings.weight"])  # fmt: skip
    sharded_state.load(model, optimizer, saved["groups"], None, tmp_path / "lane2")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, full["model"][name]), name
    for moment, values in _moments(model, optimizer).items():
        for name, tensor in values.items():
            assert torch.equal(tensor, full[moment][name]), f"{moment} {name}"
    assert all(int(s["step"]) == 1 for s in optimizer.state.values())
    assert sharded_state.load_full_model_state(tmp_path / "lane2").keys() == model.state_dict().keys()

    sharded_state.save(model, optimizer, None, tmp_path / "lane1")
    run_workers(_load_sharded, world=2, args=(case, str(tmp_path)))


def test_missing_tensors_are_named(tmp_path):
    cfg = get_flavor("debug_burger")
    model, optimizer = _trained(cfg)
    sharded_state.save(model, None, None, tmp_path / "weights_only")
    with pytest.raises(ValueError, match=r"holds no optimizer state for .*trainer=deepspeed"):
        sharded_state.load(model, optimizer, sharded_state.optimizer_groups(optimizer), None, tmp_path / "weights_only")
    with pytest.raises(ValueError, match=r"cannot read the sharded checkpoint .*nowhere"):
        sharded_state.load(model, optimizer, None, None, tmp_path / "nowhere")


def sharded_run_dir(run_dir, model, step: int = 10):
    """A run directory whose one checkpoint holds ``model`` as a training save writes it (dcp/ + trainer.pt)."""
    tmp = ckpt_io.prepare_tmp(run_dir, step)
    sharded_state.save(model, None, None, tmp / ckpt_io.SHARDS)
    ckpt_io.write_trainer_state(tmp, {"step": step, "model_config": model.cfg.to_dict()})
    return ckpt_io.publish(run_dir, step, keep=1)


def test_converter_writes_the_model_file_and_signs_it(tmp_path):
    torch.manual_seed(5)
    model = build_model(get_flavor("debug_llama", n_kv_heads=1))
    ckpt = sharded_run_dir(tmp_path / "run", model)
    assert not (ckpt / "model.pt").exists()
    cli = [sys.executable, str(Path(__file__).parents[1] / "launch" / "consolidate.py")]
    hf_dir = tmp_path / "hf"
    done = subprocess.run([*cli, str(tmp_path / "run"), "--hf", str(hf_dir)], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    printed = done.stdout.strip().splitlines()  # transformers may log lines of its own in between
    assert done.returncode == 0 and (printed[0], printed[-1]) == (str(ckpt / "model.pt"), str(hf_dir)), done.stderr
    path = ckpt_io.model_file(ckpt)
    assert path == ckpt / "model.pt"
    again = load_model(ckpt)  # tpblocks.models.io reads it, checked against the manifest
    assert again.cfg == model.cfg
    for name, tensor in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name
    pytest.importorskip("transformers")
    from tpblocks.models.hf import load_hf

    exported = load_hf(str(hf_dir))  # the HF export reads the converted file
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(exported.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    listed = ckpt_io._manifest_listing(ckpt)
    assert "model.pt" in listed and ckpt_io.checkpoint_damage(ckpt) is None
    (ckpt / "model.pt").unlink()  # derived: deleting it leaves a resumable checkpoint
    assert ckpt_io.checkpoint_damage(ckpt) is None
    bad = subprocess.run([*cli, str(tmp_path / "nowhere")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "is neither a checkpoint directory" in bad.stderr
