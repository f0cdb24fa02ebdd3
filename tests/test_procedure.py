"""Procedures around the model that the #1530-line records follow (issue 17, docs/fidelity.md): GPTQ
calibration without document masking, which scored documents a TTT phase trains on, bf16 storage of the
token embedding and the Muon momentum, and the presets that switch them on."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from model_helpers import one_thread  # noqa: F401  (autouse)
from model_helpers import BOS, max_diff, tiny_cfg, tiny_model, tokens
from pgolf.presets import get_preset

RECORD_LINE = ["pr1765", "pr1784", "pr1790", "pr1801", "pr1855"]


def test_presets_default_to_the_record_procedures():
    for name in RECORD_LINE:
        c = get_preset(name)
        assert (c.data.segmentation, c.quant.calibration_doc_mask, c.ttt.phase_select) == ("varlen", False, "shortest")
        assert c.model.tok_emb_bf16 and c.optim.muon_momentum_bf16 and c.model.doc_mask, name
        assert c.model.bf16_rounding and c.optim.grad_clip_scope == "rank", name
    for name in ("baseline", "cpu-smoke", "pr430"):  # fixed rows, as their records
        c = get_preset(name)
        assert (c.data.segmentation, c.quant.calibration_doc_mask, c.ttt.phase_select) == ("rows", True, "queue")
        assert not (c.model.tok_emb_bf16 or c.optim.muon_momentum_bf16 or c.model.bf16_rounding), name
        assert c.optim.grad_clip_scope == "global", name


# ---------------------------------------------------------------- GPTQ calibration

def test_record_calibration_hessians_are_those_of_a_forward_without_document_mask():
    """pr1855 calibrates as record collect_hessians (forward_logits(x), no cu_seqlens): its Hessians equal
    those of the same weights with model.doc_mask off, and differ from a masked forward's."""
    from pgolf.quant.hessian import collect_hessians

    model = tiny_model("pr1855")
    cfg = model.cfg
    assert cfg.doc_mask and tiny_cfg("pr1855").quant.calibration_doc_mask is False
    plain = tiny_model("pr1855", "model.doc_mask=false")
    plain.load_state_dict(model.state_dict())
    batches = [tokens(B=2, T=32, seed=s, bos_at=(0, 9, 20)) for s in range(2)]
    H = collect_hessians(model, batches, min_numel=0, doc_mask=tiny_cfg("pr1855").quant.calibration_doc_mask)
    H_plain = collect_hessians(plain, batches, min_numel=0)
    assert set(H) == set(H_plain) and len(H) > 60  # 11 layers x 6 linears + the tied head, and the gates
    assert all(torch.equal(H[k], H_plain[k]) for k in H)
    assert cfg.doc_mask  # the model's own switch is restored
    H_masked = collect_hessians(model, batches, min_numel=0)
    assert max(max_diff(H[k], H_masked[k]) for k in H) > 1e-3


def test_calibration_key_tells_the_mask_settings_apart(tmp_path):
    from pgolf.quant.hessian import calibration_key

    w = tmp_path / "final_model.pt"
    w.write_bytes(b"weights")
    masked, record = get_preset("pr1855", ["quant.calibration_doc_mask=true"]), get_preset("pr1855")
    assert calibration_key(masked, w) != calibration_key(record, w)


def test_calibration_draws_as_rank_0_of_the_runs_world(tmp_path, monkeypatch):
    """A run trained on W ranks calibrates as the records' rank 0, from shards[0::W]: cached_hessians
    takes W from the run's env.json (which the trainer writes before training), passes it to the windows and keys the
    cache by it, so a run's Hessians are never reused for another world size."""
    from pgolf.quant import hessian

    w = tmp_path / "final_model.pt"
    w.write_bytes(b"weights")
    cfg = get_preset("pr1855")
    seen = []
    monkeypatch.setattr(hessian, "calibrate", lambda model, c, world_size=1: (
        seen.append(world_size) or ({}, {"world_size": world_size, "calibration_data_seconds": 0.0,
                                        "hessian_seconds": 0.0})))
    assert hessian.run_world_size(tmp_path) == 1  # no env.json
    hessian.cached_hessians(tmp_path, lambda: None, cfg)
    (tmp_path / "env.json").write_text('{"world_size": 8}')
    assert hessian.run_world_size(tmp_path) == 8
    _, info = hessian.cached_hessians(tmp_path, lambda: None, cfg)  # the world-1 cache does not serve it
    assert seen == [1, 8] and info["cached"] is False
    _, info = hessian.cached_hessians(tmp_path, lambda: None, cfg)
    assert info["cached"] is True and seen == [1, 8]
    assert hessian.calibration_key(cfg, w, 8) != hessian.calibration_key(cfg, w, 1)


# ---------------------------------------------------------------- phased TTT: which documents a phase trains on

LENGTHS = [5, 9, 3, 7, 11, 4, 8]  # document lengths (targets), worked out below


def _val(lengths):
    from pgolf.eval.bpb import ValSet

    parts = [np.r_[BOS, np.full(n - 1, 2 + i)] for i, n in enumerate(lengths)]
    parts[-1] = np.r_[parts[-1], 2]  # the last document's final target needs one more token
    t = torch.from_numpy(np.concatenate(parts).astype(np.int64))
    return ValSet(tokens=t, bytes=torch.ones(t.numel() - 1, dtype=torch.int16),
                  doc_starts=torch.nonzero(t == BOS).flatten(), byte_source="lut")


@pytest.mark.parametrize("rule,expected", [("shortest", [[6, 1], [0, 3, 6, 1]]),
                                           ("queue", [[4, 6], [4, 6, 1, 0]])])
def test_phase_documents_by_hand(rule, expected):
    """7 documents, batches of 2, prefix 4, 2 phases -> boundaries [2, 4].

    Ascending length: d2(3) d5(4) | d0(5) d3(7) | d6(8) d1(9) | d4(11) = batches A0..A3; the queue runs
    longest first: A3=[d4], A2=[d6,d1], A1=[d0,d3], A0=[d2,d5] (cumulative 1, 3, 5, 7 documents).
    Phase 1 (boundary 2) starts after A2; phase 2 (boundary 4) after A1.
    shortest (record eval_val_ttt_phased): the scored documents sorted by (batch index, position):
      phase 1: A2, A3 -> d6 d1 | d4 -> first 2 = [d6, d1]; phase 2: A1, A2, A3 -> first 4 = [d0, d3, d6, d1].
    queue (pgolf before issue 17): the first documents of the queue: [d4, d6], then [d4, d6, d1, d0].
    """
    from pgolf.eval.phased import PhasedTTT
    from test_eval_common import stream_for, tiny_cfg as eval_cfg, tiny_model as eval_model

    cfg = eval_cfg()
    cfg.ttt.batch_size, cfg.ttt.prefix_docs, cfg.ttt.phases, cfg.ttt.phase_select = 2, 4, 2, rule
    val = _val(LENGTHS)
    r = PhasedTTT(eval_model(cfg), val, cfg, stream_for(val))
    assert r.docs.lengths.tolist() == LENGTHS and [b.tolist() for b in r.batches] == [[4], [6, 1], [0, 3], [2, 5]]
    assert r.bounds == [2, 4] and r.fire == {1: [0], 2: [1]}
    assert [r.phase_docs(k).tolist() for k in range(2)] == expected


def test_global_sgd_on_packed_rows_trains_on_one_packed_row_per_micro_batch():
    """varlen: each global-SGD micro-batch of sequences is one packed row, cut every eval_seq_len tokens."""
    from pgolf.eval.phased import global_sgd, pack_docs
    from pgolf.eval.trace import EvalStream
    from test_eval_common import tiny_cfg as eval_cfg, tiny_model as eval_model, tiny_val

    cfg = eval_cfg()
    cfg.model.doc_mask, cfg.data.segmentation = True, "varlen"
    tc = cfg.ttt
    tc.global_chunk_tokens, tc.global_batch_seqs = 96, 2
    model, val = eval_model(cfg), tiny_val(12)
    stream = EvalStream(val.num_targets)
    stream.record(np.arange(val.num_targets), None, np.zeros(val.num_targets), np.ones(val.num_targets))
    x, y, pos = pack_docs(val.tokens.numpy(), np.array([0]), np.array([200]))
    shapes, cuts = [], []

    def seen(m, args):
        shapes.append(tuple(args[0].shape))
        cuts.append(m.max_doc_len)
    hook = model.register_forward_pre_hook(seen)
    before = model.max_doc_len
    global_sgd(model, x, y, pos, tc, stream, seq_len=16)
    hook.remove()
    # chunks of 96 (the last of 3 skipped): 6 sequences of 16 -> micro-batches of 2 sequences = rows of 32
    assert shapes == [(1, 32)] * 6 and set(cuts) == {16} and model.max_doc_len == before


@pytest.mark.parametrize("world", [2, 4])
def test_global_sgd_gives_each_rank_a_contiguous_range_of_the_chunk(world):
    """Record `train_val_ttt_global_sgd_distributed`: rank r trains on sequences
    [n r / W, n (r + 1) / W) of each chunk, so a packed micro-batch joins neighbouring text. (pgolf dealt
    them out r, r + W, ...: a packed row then ran one sequence into an unrelated one, attention
    crossing documents with no BOS between them.) Each rank's rows here are written out by hand."""
    from pgolf.eval.phased import global_sgd, pack_docs
    from pgolf.eval.trace import EvalStream
    from test_eval_common import tiny_cfg as eval_cfg, tiny_model as eval_model, tiny_val

    cfg = eval_cfg()
    cfg.model.doc_mask, cfg.data.segmentation = True, "varlen"
    tc = cfg.ttt
    tc.global_chunk_tokens, tc.global_batch_seqs = 128, 2  # 8 sequences of 16 per chunk
    val = tiny_val(12)
    x, y, pos = pack_docs(val.tokens.numpy(), np.array([0]), np.array([200]))
    starts = {}
    for rank in range(world):
        model = eval_model(cfg)
        stream = EvalStream(val.num_targets)
        stream.record(np.arange(val.num_targets), None, np.zeros(val.num_targets), np.ones(val.num_targets))
        firsts: list[int] = []

        def seen(m, args, firsts=firsts):
            row = args[0][0].cpu().numpy()
            firsts.append(int(np.flatnonzero((np.lib.stride_tricks.sliding_window_view(x, row.size) == row).all(1))[0]))
        model.register_forward_pre_hook(seen)
        global_sgd(model, x, y, pos, tc, stream, seq_len=16, rank=rank, world_size=world)  # no process group
        starts[rank] = firsts
    per = 8 // world  # sequences per rank and chunk; chunk 0 only (of 2: the last chunk is skipped)
    for rank in range(world):
        mine = list(range(rank * per, (rank + 1) * per))
        assert starts[rank] == [16 * s for s in mine[::2]], rank  # packed rows of 2 neighbouring sequences


# ---------------------------------------------------------------- bf16 storage

def _step(model, cfg, opt, ema, seed):
    from pgolf.train import optimizer_step

    idx = tokens(B=1, T=33, seed=seed, bos_at=(0, 12))
    optimizer_step(model, model, opt, ema, [(idx[:, :-1], idx[:, 1:])], cfg.optim.grad_clip_norm, 1.0, seed, cfg.optim)


def _muon_buffers(opt):
    return [st["momentum_buffer"] for st in opt.optimizers["muon"].state.values()]


@pytest.mark.parametrize("on", [True, False])
def test_bf16_switches_set_the_stored_dtypes(on):
    """tok_emb (and its AdamW moments) and the Muon momentum live in bf16 with the switches on, through
    optimizer steps, a state round trip and the EMA weights loaded back; in fp32 with them off."""
    from pgolf.model import build_model
    from pgolf.optim import EMA, build_optimizers

    cfg = tiny_cfg("pr1855", f"model.tok_emb_bf16={str(on).lower()}", f"optim.muon_momentum_bf16={str(on).lower()}")
    torch.manual_seed(0)
    model = build_model(cfg)
    want = torch.bfloat16 if on else torch.float32
    assert model.tok_emb.weight.dtype == want
    assert {p.dtype for n, p in model.named_parameters() if n != "tok_emb.weight"} == {torch.float32}
    opt, ema = build_optimizers(model, cfg.optim, True), EMA(model, 0.9)
    _step(model, cfg, opt, ema, 0)
    opt.load_state_dict(opt.state_dict())  # torch casts loaded state to each parameter's dtype (fp32 for Muon's)
    _step(model, cfg, opt, ema, 1)
    assert model.tok_emb.weight.dtype == want
    assert {b.dtype for b in _muon_buffers(opt)} == {want}
    adam = opt.optimizers["adam"].state[model.tok_emb.weight]
    assert adam["exp_avg"].dtype == adam["exp_avg_sq"].dtype == want
    assert ema.shadow["tok_emb.weight"].dtype == torch.float32  # the EMA copy stays fp32
    ema.copy_to(model)
    assert model.tok_emb.weight.dtype == want
    assert torch.equal(model.tok_emb.weight, ema.shadow["tok_emb.weight"].to(want))


def test_bf16_muon_momentum_is_the_records_arithmetic():
    """buf <- mu buf + bf16(g) and u = bf16(g) + mu buf, all in bf16 (record Muon.step), by hand."""
    from pgolf.optim.muon import Muon

    g = torch.Generator().manual_seed(5)
    p = torch.nn.Parameter(torch.randn(8, 4, generator=g))
    opt = Muon([p], lr=0.0, momentum=0.9, momentum_dtype=torch.bfloat16)
    g1, g2 = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)
    for grad in (g1, g2):
        p.grad = grad.clone()
        opt.step()
    buf = opt.state[p]["momentum_buffer"]
    expect = g1.bfloat16().mul_(0.9).add_(g2.bfloat16())  # step 1: buf = bf16(g1); step 2, in bf16
    assert buf.dtype == torch.bfloat16 and torch.equal(buf, expect)
    assert not torch.equal(buf.float(), 0.9 * g1 + g2)  # fp32 arithmetic would differ


def test_unknown_procedure_values_name_their_key():
    from pgolf.errors import PgolfError
    from pgolf.eval.phased import PhasedTTT
    from pgolf.model import build_model
    from test_eval_common import stream_for, tiny_cfg as eval_cfg, tiny_model as eval_model, tiny_val

    with pytest.raises(PgolfError, match="data.segmentation"):
        build_model(tiny_cfg("pr1855", "data.segmentation=packed"), "meta")
    cfg = eval_cfg()
    cfg.ttt.phases, cfg.ttt.phase_select = 2, "longest"
    val = tiny_val(6)
    with pytest.raises(PgolfError, match="ttt.phase_select"):
        PhasedTTT(eval_model(cfg), val, cfg, stream_for(val))


@pytest.mark.parametrize("on", [True, False])
def test_bf16_rounding_leaves_the_records_bf16_values(on):
    """The #1530-line records build GPT(h), cast it with .bfloat16() and restore fp32: every initial
    weight, and RoPE's inv_freq buffer (which stays bf16 and is read back with .float()), holds a bf16
    value, e.g. the parallel residual lambdas start at 1.1015625, not 1.1. With the switch off, fp32."""
    from pgolf.model import build_model

    cfg = tiny_cfg("pr1855", f"model.bf16_rounding={str(on).lower()}")
    torch.manual_seed(0)
    model = build_model(cfg)
    rotary = model.physical_blocks()[0].attn.rotary
    dims = rotary.dims
    exact = cfg.model.rope_base ** (-torch.arange(0, dims, 2, dtype=torch.float32) / dims)
    tensors = [*model.parameters(), rotary.inv_freq]
    assert {t.dtype for t in tensors} == {torch.float32, torch.bfloat16}  # tok_emb is stored in bf16
    lam = model.parallel_resid_lambdas.detach()
    if on:
        assert all(torch.equal(t, t.to(torch.bfloat16).to(t.dtype)) for t in tensors)
        assert torch.equal(rotary.inv_freq, exact.to(torch.bfloat16).float())
        assert not torch.equal(rotary.inv_freq, exact)
        assert float(lam.flatten()[0]) == 1.1015625
        cos, _ = rotary.cos_sin(64, torch.device("cpu"))
        assert torch.equal(cos, torch.outer(torch.arange(64.0), exact.to(torch.bfloat16).float()).cos())
    else:
        assert torch.equal(rotary.inv_freq, exact) and float(lam.flatten()[0]) == float(torch.tensor(1.1))
        assert not all(torch.equal(t, t.to(torch.bfloat16).to(t.dtype)) for t in tensors)


def test_warm_up_momentum_survives_on_several_ranks_only_with_keep_sharded():
    """The #1530-line records save the optimizer state before the compile warm-up and restore it after;
    their sharded Muon (more than one GPU) holds its momentum in `shard_mom`, outside that state, so the
    warm-up's momentum carries into training; on one GPU it lives in the state and is reset."""
    from pgolf.optim import build_optimizers
    from pgolf.train import keeps_warmup_momentum

    rec, plain = get_preset("pr1855"), get_preset("pr1855", ["optim.muon_warmup_momentum=reset"])
    assert [keeps_warmup_momentum(rec, 8), keeps_warmup_momentum(rec, 1), keeps_warmup_momentum(plain, 8)] == \
        [True, False, False]
    model = torch.nn.Linear(8, 6)
    for keep in (True, False):
        opt = build_optimizers(model, rec.optim, tied=False)
        before = opt.state_dict()
        for _ in range(2):
            model.weight.grad, model.bias.grad = torch.randn(6, 8), torch.randn(6)
            opt.reduce_and_clip(0.0)
            opt.step(1.0, 0)
        buf = opt.optimizers["muon"].state[model.weight]["momentum_buffer"].clone()
        opt.load_state_dict(before, keep_muon_momentum=keep)
        muon_state = opt.optimizers["muon"].state
        assert not opt.optimizers["adam"].state  # AdamW is rolled back either way
        if keep:
            assert torch.equal(muon_state[model.weight]["momentum_buffer"], buf) and buf.abs().sum() > 0
        else:
            assert "momentum_buffer" not in muon_state.get(model.weight, {})
