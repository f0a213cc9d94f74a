"""Vocabulary-parallel head on 2 gloo ranks: gathered logits and greedy tokens equal the replicated head's, top-k
picks come from the true top-k, one extra blocking sync per token, and the vocabulary-parallel cross-entropy
trains to the same losses and gradients as the full one."""

import copy

import pytest
import torch
import torch.nn.functional as F

from tests.dist_utils import ATOL, RTOL, run_workers
from tpblocks.infer import perfmodel as pm
from tpblocks.infer.engine import DecodeEngine
from tpblocks.models import build_model, get_flavor

FLAVORS = {"debug_llama": {}, "debug_burger": {"tie_embeddings": False}}  # a tied and an untied head


def _full(flavor: str):
    torch.manual_seed(0)
    return build_model(get_flavor(flavor, init_std=0.5, **FLAVORS[flavor])).eval()


def _decode_checks(rank: int, world: int) -> None:
    from torch.distributed.tensor import DTensor

    from tpblocks.parallel import MeshComm, ParallelDims, shard_model

    mesh = ParallelDims(dp=1, lane=world, world_size=world).build_mesh("cpu")
    prompt = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(3))
    for flavor in FLAVORS:
        full = _full(flavor)
        comm = MeshComm(mesh)
        # Sharded as training shards it (DTensor parameters): the first engine swaps them for their local tensors.
        model = shard_model(copy.deepcopy(full), comm, vocab_parallel_head=True, lane_dtensors=True)
        assert isinstance(model.output.weight, DTensor) and model.output.weight.to_local().shape[0] == 256 // world
        with torch.no_grad():
            torch.testing.assert_close(model(prompt), full(prompt), rtol=RTOL, atol=ATOL)
        want = DecodeEngine(full, batch=2, max_seq_len=40).generate(prompt, 30)
        for compiled in (True, False):
            engine = DecodeEngine(model, batch=2, max_seq_len=40, compile=compiled)
            assert not any(isinstance(p, DTensor) for p in model.parameters()), "a compiled graph would see DTensors"
            comm.counter.reset()
            got = engine.generate(prompt, 30)
            assert torch.equal(got, want), f"{flavor} compiled={compiled}: vocab-parallel greedy differs"
            if not compiled:  # 30 forwards (prefill + 29 steps) and 30 candidate gathers, as the formula says
                assert comm.counter.blocking == 30 * pm.syncs_for_config(full.cfg, vocab_parallel_head=True)
                assert comm.counter.by_kind["vocab_gather"] == 30
        # top-k through gathered candidates: every token is in the true top-k of its step
        engine = DecodeEngine(model, batch=2, max_seq_len=40)
        tokens = engine.generate(prompt, 12, temperature=1.0, top_k=3, seed=rank)  # same on both ranks (broadcast)
        seq = torch.cat([prompt, tokens], dim=1)
        with torch.no_grad():
            top3 = full(seq[:, :-1])[:, prompt.shape[1] - 1 :].topk(3, dim=-1).indices
        assert (top3 == tokens[..., None]).any(-1).all(), f"{flavor}: a sampled token outside the top-3"


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_vocab_parallel_decode_on_two_ranks_equals_replicated_head():
    run_workers(_decode_checks, world=2)


def _training_checks(rank: int, world: int) -> None:
    from tpblocks.parallel import MeshComm, ParallelDims, local_slice, shard_model, vocab_parallel_cross_entropy

    mesh = ParallelDims(dp=1, lane=world, world_size=world).build_mesh("cpu")
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(0)
    full = build_model(get_flavor("debug_burger", tie_embeddings=False))
    model = shard_model(copy.deepcopy(full), MeshComm(mesh), vocab_parallel_head=True)
    opt_full = torch.optim.SGD(full.parameters(), lr=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(3):
        tokens = torch.randint(0, 256, (2, 9), generator=gen)
        targets = torch.randint(0, 256, (2, 9), generator=gen)
        want = F.cross_entropy(full(tokens).flatten(0, 1), targets.flatten())
        got = vocab_parallel_cross_entropy(model(tokens, gather_logits=False), targets, model.comm)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m, s=step: f"step {s} loss: {m}")
        for o in (opt_full, opt):
            o.zero_grad()
        want.backward()
        got.backward()
        grads = dict(full.named_parameters())
        for name, p in model.named_parameters():
            expected = local_slice(grads[name].grad, model.shard_spec, name)
            torch.testing.assert_close(p.grad, expected, rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"{n}: {m}")
        opt_full.step()
        opt.step()


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_vocab_parallel_cross_entropy_trains_like_the_full_head():
    run_workers(_training_checks, world=2)


def test_vocab_parallel_head_needs_a_divisible_vocabulary():
    from tpblocks.parallel.dims import check_vocab_parallel_head

    model = build_model(get_flavor("debug_llama", vocab_size=255))
    with pytest.raises(ValueError, match="multiple of the lane degree"):
        check_vocab_parallel_head(model.cfg, 2)
