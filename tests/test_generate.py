"""KV-cache generation: cache decoding equals full re-forwards, sampling obeys top-k and seeds, sharded
generation on 2 gloo ranks equals one process, and launch/generate.py runs from a saved model."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tpblocks.infer import generate, sample_next
from tpblocks.models import build_model, get_flavor
from tpblocks.models.io import save_model
from tpblocks.parallel.dist import free_port

REPO = Path(__file__).resolve().parents[1]
FLAVORS = ["debug_llama", "debug_burger", "debug_sandwich"]


def _model(flavor: str, seed: int = 0):
    # A large init std gives peaked, position-dependent logits: greedy decoding then produces varied tokens,
    # so a cache bug (wrong position, stale keys) changes the output instead of hiding in a constant stream.
    torch.manual_seed(seed)
    cfg = get_flavor(flavor, init_std=0.5)
    return build_model(cfg).eval()


@torch.no_grad()
def _full_forward_greedy(model, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        logits = model(torch.tensor([seq]))
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt) :]


@pytest.mark.parametrize("flavor", FLAVORS)
def test_greedy_with_cache_equals_argmax_of_full_forwards(flavor):
    model = _model(flavor)
    prompt = [5, 17, 42, 99, 3]
    out = generate(model, prompt, max_new_tokens=16)
    assert len(out) == 16
    assert len(set(out)) > 3, "degenerate stream: the test could not see a cache bug"
    assert out == _full_forward_greedy(model, prompt, 16)


@pytest.mark.parametrize("flavor", FLAVORS)
def test_sampled_tokens_are_in_the_top_k_of_each_step(flavor):
    model = _model(flavor)
    prompt, k = [7, 8, 9], 3
    out = generate(model, prompt, max_new_tokens=12, temperature=1.5, top_k=k, seed=11)
    seq = list(prompt)
    with torch.no_grad():
        for token in out:
            top = torch.topk(model(torch.tensor([seq]))[0, -1], k).indices.tolist()
            assert token in top
            seq.append(token)
    assert generate(model, prompt, 12, temperature=0.7, top_k=1, seed=5) == generate(model, prompt, 12)


def test_sampling_is_seed_deterministic():
    model = _model("debug_burger")
    prompt = [1, 2, 3]
    a = generate(model, prompt, 20, temperature=2.0, seed=123)
    assert a == generate(model, prompt, 20, temperature=2.0, seed=123)
    assert a != generate(model, prompt, 20, temperature=2.0, seed=124)


def test_sample_next_respects_k_and_temperature():
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0, 2.8])
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, 1.0, top_k=2, generator=g) for _ in range(300)}
    assert draws == {1, 2}
    g.manual_seed(0)
    cold = [sample_next(logits, 0.01, generator=g) for _ in range(50)]
    assert set(cold) == {1}  # a tiny temperature is (almost) greedy
    assert sample_next(logits) == 1


def test_eos_stops_and_validation():
    model = _model("debug_llama")
    first = generate(model, [4, 5], 1)[0]
    assert generate(model, [4, 5], 10, eos_id=first) == [first]
    assert generate(model, [4], 0) == []
    for kwargs, match in [
        (dict(prompt_ids=[]), "empty"),
        (dict(prompt_ids=[300]), "outside the vocabulary"),
        (dict(prompt_ids=[1], temperature=-1.0), "temperature"),
        (dict(prompt_ids=[1], top_k=0), "top_k"),
        (dict(prompt_ids=[1], max_new_tokens=10_000), "max_seq_len"),
    ]:
        args = {"max_new_tokens": 4, **kwargs}
        with pytest.raises(ValueError, match=match):
            generate(model, **args)


# ---------------------------------------------------------------------- 2 ranks, gloo
def _worker(rank: int, world: int, port: int, results: dict):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from tpblocks.parallel import MeshComm, ParallelDims, destroy_distributed, init_distributed, shard_model

    init_distributed("gloo")
    try:
        mesh = ParallelDims(dp=1, lane=world, world_size=world).build_mesh("cpu")
        out = {}
        for flavor in FLAVORS:
            comm = MeshComm(mesh)
            model = shard_model(_model(flavor), comm)
            greedy = generate(model, [5, 17, 42], 10)
            comm.counter.reset()
            sampled = generate(model, [5, 17, 42], 10, temperature=1.0, top_k=20, seed=3)
            out[flavor] = (greedy, sampled, comm.counter.blocking)
        results[rank] = out
    finally:
        destroy_distributed()


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_sharded_generation_on_two_ranks_equals_one_process():
    from tpblocks.infer.perfmodel import syncs_for_config

    port = free_port()
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(2, port, results), nprocs=2, join=True)
        results = dict(results)
    assert results[0] == results[1]
    for flavor in FLAVORS:
        model = _model(flavor)
        greedy, sampled, blocking = results[0][flavor]
        assert greedy == generate(model, [5, 17, 42], 10)
        assert sampled == generate(model, [5, 17, 42], 10, temperature=1.0, top_k=20, seed=3)
        # 10 forward steps, each with the syncs of Eq. 9 / 10 (the token broadcast is not a model sync).
        assert blocking == 10 * syncs_for_config(model.cfg)


# ---------------------------------------------------------------------- launch/generate.py
def _run_launcher(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(REPO / "launch" / "generate.py"), *args],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO,
    )  # fmt: skip


def _run_dir_with_checkpoint(tmp_path: Path, model, data_yaml: str = "") -> Path:
    run = tmp_path / "run"
    step = run / "checkpoints" / "step_00000010"
    save_model(model, step / "model.pt")
    (run / "checkpoints" / "latest").write_text("step_00000010\n")
    # Without data_yaml the config has no data section, so no trained-tokenizer cache lookup happens.
    data = f"data:\n{data_yaml}" if data_yaml else ""
    (run / "config.yaml").write_text(f"seed: 0\n{data}")
    return run


@pytest.mark.timeout(150)
def test_launch_generate_converts_a_sharded_checkpoint(tmp_path):
    from test_sharded_state import sharded_run_dir

    model = _model("debug_burger")
    ckpt = sharded_run_dir(tmp_path / "run", model)
    proc = _run_launcher(f"checkpoint={tmp_path / 'run'}", "prompt_ids=[5,17,42]", "max_new_tokens=6")
    assert proc.returncode == 0, proc.stderr
    assert f"generated ids: {generate(model, [5, 17, 42], 6)}" in proc.stdout
    assert (ckpt / "model.pt").is_file()
    (ckpt / "dcp" / "__0_0.distcp").write_bytes(b"")
    (ckpt / "model.pt").unlink()
    proc = _run_launcher(f"checkpoint={ckpt}", "prompt_ids=[5]", "max_new_tokens=2")
    assert proc.returncode == 2 and "is damaged (dcp/__0_0.distcp is 0 bytes" in proc.stderr, proc.stderr


@pytest.mark.timeout(150)
def test_launch_generate_from_run_dir_prints_token_ids(tmp_path):
    model = _model("debug_burger")
    run = _run_dir_with_checkpoint(tmp_path, model)
    proc = _run_launcher(f"checkpoint={run}", "prompt_ids=[5,17,42]", "max_new_tokens=6")
    assert proc.returncode == 0, proc.stderr
    expected = generate(model, [5, 17, 42], 6)
    assert f"generated ids: {expected}" in proc.stdout
    bad = _run_launcher(f"checkpoint={tmp_path / 'nope'}", "prompt_ids=[1]")
    assert bad.returncode != 0 and "no model" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.timeout(150)
def test_launch_generate_with_tokenizer_from_config(tmp_path, shared_data):
    tok = shared_data / "tokenizer" / "llama2_tokenizer.model"
    if not tok.exists():
        pytest.skip("Llama-2 tokenizer not in shared data")
    torch.manual_seed(0)
    model = build_model(get_flavor("debug_llama", vocab_size=32000, init_std=0.5)).eval()
    run = _run_dir_with_checkpoint(tmp_path, model, f"  tokenizer_path: {tok}\n")
    proc = _run_launcher(f"checkpoint={run}", "prompt='Hello world'", "max_new_tokens=5", "temperature=0.8",
                         "top_k=50", "seed=1")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tok))
    ids = [sp.bos_id(), *sp.encode("Hello world")]
    expected = generate(model, ids, 5, temperature=0.8, top_k=50, seed=1)
    assert f"generated ids: {expected}" in proc.stdout
    assert sp.decode(expected) in proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_launch_generate_compiled_bf16_batch_streams_and_reports_speed(tmp_path):
    model = _model("debug_llama")
    run = _run_dir_with_checkpoint(tmp_path, model)
    proc = _run_launcher(f"checkpoint={run}", "prompt_ids=[5,17,42]", "max_new_tokens=8", "compile=true",
                         "dtype=bf16", "batch=2", timeout=380)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "decode compiled bf16" in proc.stdout and "tok/s for batch 2" in proc.stdout
    rows = proc.stdout.split("generated ids:\n")[1].splitlines()[:2]
    assert all(len(eval(r)) == 8 for r in rows)  # both sequences, 8 tokens each (streamed ids printed before)
