"""The post-hoc comparison table and the 2-rank TP-vs-LP decode timing (structure and counts, never timings)."""

import pytest
import torch

from tpblocks.models import TransformerLM
from tpblocks.posthoc.lora import LoraConfig
from tpblocks.posthoc.table import TableSpec, format_rows, run_table
from tpblocks.posthoc.tiny import tiny_config


def _model():
    torch.manual_seed(0)
    return TransformerLM(tiny_config(n_layers=4, hidden_size=32, max_seq_len=64)).eval()


def test_table_rows_depths_and_counted_syncs():
    m = _model()
    ids = torch.randint(0, 256, (400,), generator=torch.Generator().manual_seed(0))
    spec = TableSpec(start=0, end=4, configs=(1, 7, 15), lp_ranges=((1, 3), (0, 4)), window=32, stride=16,
                     eval_tokens=300, prompt_tokens=8, decode_tokens=4, lora_rows=("cfg7",),
                     lora=LoraConfig(rank=2, steps=3, seq_len=16, batch=2))  # fmt: skip
    rows = run_table(m, ids, spec, train_ids=ids, progress=False)
    by = {r["row"]: r for r in rows}
    assert list(by) == ["base", "cfg1", "cfg7", "cfg15", "LP[1,3)", "LP[0,4)"]
    assert [by[k]["depth"] for k in by] == [4, 2, 4, 4, 3, 2]
    # base 2/layer; rate-2 groups 2 per pass; LP: 2 per plain layer + 1 per pair
    assert [by[k]["syncs_per_token"] for k in by] == [8, 4, 8, 8, 2 * 2 + 1, 2]
    assert by["base"]["ppl_change_pct"] == 0.0 and by["cfg1"]["ppl"] != by["base"]["ppl"]
    assert "ppl_after_lora" in by["cfg7"] and "ppl_after_lora" not in by["cfg1"]
    assert len(format_rows(rows)) == len(rows)


def test_table_spec_validation():
    with pytest.raises(ValueError, match="multiple of 4"):
        TableSpec(start=0, end=6)
    with pytest.raises(ValueError, match="odd number"):
        TableSpec(start=0, end=4, lp_ranges=((0, 3),))
    m = _model()
    with pytest.raises(ValueError, match="not rows of this table"):
        run_table(m, torch.zeros(100, dtype=torch.long), TableSpec(start=0, end=4, configs=(1,), lora_rows=("cfg9",)))


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_rank_lp_latency_counts(tmp_path):
    from tpblocks.posthoc.checkpoint import save_llama
    from tpblocks.posthoc.lp_latency import measure_lp_latency

    save_llama(_model(), tmp_path / "ckpt")
    rows = measure_lp_latency(tmp_path / "ckpt", [(1, 3), (0, 4)], prompt=list(range(8)), new_tokens=3, rounds=1)
    assert [r["row"] for r in rows] == ["TP", "LP[1,3)", "LP[0,4)"]
    assert [r["syncs_per_token"] for r in rows] == [8, 5, 2]
    assert all(r["ms_per_token_2rank"] > 0 for r in rows)
