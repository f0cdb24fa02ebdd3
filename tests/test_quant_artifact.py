"""Compressors, per-group container, quantised state and byte accounting: exact round trips."""
import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from pgolf.config import QuantConfig
from pgolf.errors import PgolfError
from pgolf.artifact import codecs as C
from pgolf.artifact import pergroup
from pgolf.artifact.qstate import dequantize_state, load_artifact, load_qstate, serialize
from pgolf.quant.quantize import byte_report, quantize_state_dict
from pgolf.artifact.int8 import export_int8


@settings(max_examples=25, deadline=None)
@given(data=st.one_of(st.binary(max_size=3000), st.just(b"BSHF\x02abc"), st.just(b"")),
       codec=st.sampled_from(list(C.CODECS) + ["best"]), level=st.sampled_from([-1, 1]),
       shuffle=st.sampled_from([0, 2, 3, 4]))
def test_every_compressor_round_trips(data, codec, level, shuffle):
    blob = C.compress(data, codec, level, shuffle)
    assert C.decompress(blob) == data


def test_best_is_smallest_and_corrupt_stream_is_an_error():
    data = bytes(range(256)) * 40
    assert len(C.compress(data, "best", 1)) == min(len(C.compress(data, c, 1)) for c in C.BEST_CODECS)
    with pytest.raises(PgolfError):
        C.decompress(b"\x03garbage")
    with pytest.raises(PgolfError):
        C.decompress(b"\x55")


def test_nn_chain_is_a_permutation_that_groups_similar_rows():
    base = torch.randint(-20, 20, (4, 64), dtype=torch.int8)
    q = base[torch.arange(40) % 4]  # 4 distinct rows, interleaved
    order = pergroup.nn_chain_order(q)
    assert sorted(order.tolist()) == list(range(40)) and order[0] == 0
    changes = int((q[order][1:] != q[order][:-1]).any(dim=1).sum())
    assert changes == 3  # each distinct row visited as one run


def _record_chain(q: np.ndarray) -> list[int]:
    """The record's row order (#1855 train_gpt.py, `_similarity_sort_l1`), as it states it: from row 0,
    the nearest unused row in L1, argmin over the unused rows in index order (so ties go to the
    lowest row)."""
    used = np.zeros(q.shape[0], bool)
    order, used[0] = [0], True
    for _ in range(q.shape[0] - 1):
        unused = np.flatnonzero(~used)
        best = int(unused[np.argmin(np.abs(q[unused].astype(np.int32) - q[order[-1]]).sum(axis=1))])
        order.append(best)
        used[best] = True
    return order


@pytest.mark.parametrize("values,cols", [(1, 3), (2, 6), (20, 64)])
def test_nn_chain_breaks_ties_as_the_record_on_every_device(values, cols):
    """Rows of few distinct values tie often; the order (and so the artifact's bytes) must be the
    record's on the CPU path and on the torch path the GPU runs (here on CPU tensors: argmin is
    documented to return the first minimum on every device)."""
    g = torch.Generator().manual_seed(values)
    q = torch.randint(-values, values + 1, (300, cols), dtype=torch.int8, generator=g)
    want = _record_chain(q.numpy())
    assert pergroup.nn_chain_order(q).tolist() == want
    assert pergroup._chain_torch(q).tolist() == want


def _tiny_state(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    sd = {"tok_emb.weight": torch.randn(300, 256, generator=g).to(dtype) * 0.02}
    for i in range(2):
        p = f"blocks.{i}."
        sd[p + "attn.c_q.weight"] = torch.randn(256, 272, generator=g)
        sd[p + "attn.c_k.weight"] = torch.randn(272, 256, generator=g)
        sd[p + "attn.proj.weight"] = torch.zeros(256, 272)  # zero-init: all-zero rows
        sd[p + "mlp.fc.weight"] = torch.randn(512, 256, generator=g)
        sd[p + "attn.attn_gate_w"] = torch.randn(8, 12, generator=g)  # sparse gate: 96 values
        sd[p + "attn.q_gain"] = torch.full((8,), 5.0)
        sd[p + "resid_mix"] = torch.randn(2, 256, generator=g)
    sd["skip_weights"] = torch.ones(1, 256)
    sd["bigram.embed.weight"] = torch.randn(300, 240, generator=g)  # embedding group, "other" role
    sd["carry_idx"] = torch.arange(3)
    return sd


def _q(**kw):
    return dataclasses.replace(QuantConfig(), level=5, **kw)


@pytest.mark.parametrize("compressor,group_codec", [("brotli", "brotli"), ("zstd", "brotli"), ("zpaq", "brotli"),
                                                   ("pergroup", "brotli"), ("pergroup", "zpaq"), ("best", "brotli")])
def test_artifact_round_trip_and_report_sums(compressor, group_codec):
    sd = _tiny_state(torch.bfloat16)
    q = _q(method="rtn", compressor=compressor, group_codec=group_codec, lqer=True, lqer_top_k=2, lqer_rank=2)
    qstate, info = quantize_state_dict(sd, q)
    kinds = {n: e["kind"] for n, e in qstate["tensors"].items()}
    assert kinds["blocks.0.attn.attn_gate_w"] == "gate"  # routed before the passthrough rule
    assert kinds["blocks.0.resid_mix"] == "pass" and kinds["carry_idx"] == "raw"
    assert len(info["lqer"]) == 2
    blob, streams = serialize(qstate, q)
    back = load_artifact(blob)
    ref = dequantize_state(qstate)
    assert list(back) == list(sd)
    for n, t in sd.items():
        assert back[n].dtype == t.dtype and back[n].shape == t.shape
        assert torch.equal(back[n], ref[n]), n  # the file holds exactly the quantised state
    told = load_artifact(blob, "a.ptz", q)  # read as the configuration that wrote it (the record's way)
    assert all(torch.equal(told[n], ref[n]) for n in sd)
    other = _q(compressor="brotli" if compressor == "pergroup" else "pergroup")
    with pytest.raises(PgolfError, match=r"^a\.ptz: corrupt artifact"):  # another configuration's file
        load_artifact(blob, "a.ptz", other)
    rep = byte_report(load_qstate(blob) if compressor != "pergroup" else qstate, blob, streams)
    assert sum(rep["bytes_by_group"].values()) == len(blob)
    assert rep["params"] == sum(t.numel() for t in sd.values() if t.is_floating_point())
    assert rep["bytes_by_group"]["lqer"] > 0 and rep["bytes_by_group"]["gate"] > 0


def test_zpaq_streams_are_tagged_deterministic_and_smaller_than_brotli_on_int6():
    """Int6 codes of heavy-tailed rows (what GPTQ leaves), 512 KB: ZPAQ context mixing beats brotli
    q11 (0.6% here; 1.7% on trained weights, docs/perf.md), as lrzip -z beat brotli for the #1855
    record; one thread, so the bytes never change."""
    torch.manual_seed(0)
    w = torch.distributions.StudentT(5.0).sample((1024, 512))
    s = 12.85 * w.std(dim=1, keepdim=True) / 31
    data = (w / s).round().clamp(-31, 31).to(torch.int8).t().contiguous().numpy().tobytes()
    z = C.compress(data, "zpaq")
    assert C.codec_of(z) == "zpaq" and z == C.compress(data, "zpaq") and C.decompress(z) == data
    assert len(z) < 0.997 * len(C.compress(data, "brotli"))
    z2 = C.compress(data, "zpaq", threads=2)  # two blocks, decoded in parallel
    assert z2 != z and z2 == C.compress(data, "zpaq", threads=2) and C.decompress(z2) == data
    assert len(z) < len(z2) < 1.005 * len(z)


def test_missing_zpaq_package_is_one_clear_error(monkeypatch):
    import sys

    blob = C.compress(b"abc" * 100, "zpaq", 1)
    monkeypatch.setitem(sys.modules, "zpaq", None)  # import zpaq now raises ImportError
    with pytest.raises(PgolfError, match="zpaq.*package"):
        C.decompress(blob)
    from pgolf.quant.quantize import validate
    with pytest.raises(PgolfError, match="quant.group_codec.*zpaq"):
        validate(_q(compressor="pergroup", group_codec="zpaq"))
    validate(_q(compressor="brotli", group_codec="zpaq"))  # pergroup off: the group codec is unused


def test_passthrough_restores_dtype_and_int8_baseline_loads():
    sd = _tiny_state()
    q = _q(method="gptq", compressor="zlib")  # no Hessians: falls back to RTN
    qstate, info = quantize_state_dict(sd, q)
    assert {v["method"] for v in info["tensors"].values()} == {"rtn", "absmax_int8"}
    back = load_artifact(serialize(qstate, q)[0])
    assert torch.equal(back["blocks.0.resid_mix"], sd["blocks.0.resid_mix"].half().float())
    assert torch.equal(back["blocks.1.attn.proj.weight"], sd["blocks.1.attn.proj.weight"])
    base = load_artifact(export_int8(sd))  # the trainer's baseline file loads through the same door
    assert set(base) == set(sd)


def test_group_bits_apply():
    sd = _tiny_state()
    q = _q(method="rtn", attn_bits=3, mlp_bits=5, embed_bits=7, other_bits=4, compressor="zstd")
    qstate, _ = quantize_state_dict(sd, q)
    t = qstate["tensors"]
    assert t["blocks.0.attn.c_q.weight"]["bits"] == 3 and int(t["blocks.0.attn.c_q.weight"]["q"].abs().max()) <= 3
    assert t["blocks.0.mlp.fc.weight"]["bits"] == 5 and t["tok_emb.weight"]["bits"] == 7
    assert t["bigram.embed.weight"]["bits"] == 7


def test_688_style_options():
    sd = _tiny_state()
    q = _q(method="rtn", clip_mode="quantile", prune_quantile=0.03, compressor="zstd", attn_bits=5)
    qstate, _ = quantize_state_dict(sd, q)
    qq = qstate["tensors"]["blocks.0.attn.c_q.weight"]["q"]
    assert float((qq == 0).float().mean()) >= 0.03  # the pruned 3% (and whatever rounds to 0)
    with pytest.raises(PgolfError, match="clip_mode"):
        quantize_state_dict(sd, _q(method="rtn", clip_mode="nope"))
