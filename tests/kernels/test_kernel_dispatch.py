"""Dispatch switch and model integration: the models run the Triton kernels when forced, the reference otherwise."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import dispatch, ops
from kernels import reception as rec_k
from kernels import rms_norm as norm_k
from kernels import swiglu as swiglu_k
from tpblocks.models.flavors import get_flavor
from tpblocks.models.model import TransformerLM


def test_modes_env_and_override(monkeypatch):
    x = torch.randn(2, 3)
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert dispatch.get_mode() == "reference" and not dispatch.use_triton(x)
    monkeypatch.setenv(dispatch.ENV_VAR, "auto")
    assert dispatch.use_triton(x) == x.is_cuda  # auto: Triton on CUDA, the reference on a CPU tensor
    assert not dispatch.use_triton(torch.randn(2, device="cpu"))
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    assert dispatch.use_triton(x)  # on CUDA, or on the CPU under TRITON_INTERPRET=1 (how these tests run)
    with dispatch.forced("reference"):
        assert not dispatch.use_triton(x)
    assert dispatch.get_mode() == "triton"
    monkeypatch.setenv(dispatch.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="TPBLOCKS_KERNELS='fast'"):
        dispatch.get_mode()
    with pytest.raises(ValueError, match="kernel mode"):
        dispatch.set_mode("cuda")


def test_forced_triton_without_interpreter_is_explained(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with dispatch.forced("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dispatch.use_triton(torch.randn(2, device="cpu"))


def _count_launches(monkeypatch) -> dict[str, int]:
    counts = {"rms_norm": 0, "swiglu": 0, "slice": 0, "reception": 0}

    def spy(module, name, key):
        original = getattr(module, name)

        def wrapped(*args, **kwargs):
            counts[key] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapped)

    spy(norm_k, "rms_norm_fwd_triton", "rms_norm")
    spy(swiglu_k, "swiglu_fwd_triton", "swiglu")
    spy(swiglu_k, "lane_down_into_own_slice_triton", "slice")
    spy(rec_k, "reception_fwd_triton", "reception")
    return counts


def _small_burger(**overrides):
    return get_flavor("debug_burger", lane_depth=2, tp_block_repetition=1, **overrides)


def test_model_uses_every_kernel_and_matches_reference(monkeypatch):
    torch.manual_seed(0)
    model = TransformerLM(_small_burger())
    with torch.no_grad():  # open the zero-initialised reception gates so the gated term matters
        for name, p in model.named_parameters():
            if name.endswith("gate"):
                p.normal_(0.0, 0.5)
    tokens = torch.randint(0, 256, (2, 9))
    results = {}
    counts = _count_launches(monkeypatch)
    for mode in ("reference", "triton"):
        model.zero_grad()
        with dispatch.forced(mode):
            logits = model(tokens)
            F.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
        results[mode] = (logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
        if mode == "reference":
            assert sum(counts.values()) == 0
    assert all(counts.values()), counts  # every fused kernel ran in the forced-Triton pass
    torch.testing.assert_close(results["triton"][0], results["reference"][0], atol=1e-5, rtol=1e-5)
    for name, grad in results["reference"][1].items():
        torch.testing.assert_close(results["triton"][1][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_ops_reference_path_equals_model_functions():
    """On the CPU in "auto" mode the ops are the models' own math (the HF-parity numerics)."""
    from tpblocks.models.layers import rms_norm

    x, w = torch.randn(3, 4, 16), torch.randn(3, 1, 16)
    assert torch.equal(ops.rms_norm(x, w, 1e-5), rms_norm(x, w, 1e-5))
    g, u = torch.randn(5, 7), torch.randn(5, 7)
    assert torch.equal(ops.swiglu(g, u), F.silu(g) * u)


def test_model_decode_uses_the_decode_kernel(monkeypatch):
    """Prefill with SDPA, then one-token decode steps through the Triton flash-decoding kernel."""
    from kernels import decode_attention as attn_k

    calls = []
    original = attn_k.decode_attention_triton
    monkeypatch.setattr(attn_k, "decode_attention_triton", lambda *a, **k: calls.append(1) or original(*a, **k))
    torch.manual_seed(0)
    model = TransformerLM(_small_burger(max_seq_len=16)).eval()
    prompt, steps = torch.randint(0, 256, (2, 5)), torch.randint(0, 256, (2, 3))
    logits = {}
    for mode in ("reference", "triton"):
        cache = model.new_cache()
        with torch.no_grad(), dispatch.forced(mode):
            model(prompt, cache)
            logits[mode] = torch.stack([model(steps[:, i : i + 1], cache) for i in range(steps.shape[1])])
    assert calls  # the decode steps ran the kernel (lane layers and classic layers)
    torch.testing.assert_close(logits["triton"], logits["reference"], atol=1e-5, rtol=1e-5)
