"""The compile check (issue 12): every preset's training step and LoRA TTT step trace whole
(fullgraph=True) through the compiled forwards CUDA runs, with no recompilation once warmed up; an
injected graph break is caught; LoRA TTT's own loop on its compiled forward adds no graph and scores
as the eager forward."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from pgolf.compile_check import check_config, compile_check
from pgolf.presets import PRESETS, get_preset


@pytest.mark.slow
@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_compiles_whole_and_never_recompiles(preset):
    cfg = get_preset(preset)
    res = compile_check(cfg)
    assert res["kernel"] == "fa3"  # traced through FlashAttention-3's call (the stand-in on the CPU)
    assert res["graph_breaks"] == 0 and res["break_reasons"] == [], res
    assert res["recompiles"] == 0, res
    assert res["train_graphs"] == (2 if cfg.model.num_loops else 1)  # one graph per looping mode
    if cfg.ttt.method == "lora":
        assert res["ttt_graphs"] == 1 and res["ttt_recompiles"] == 0  # every window and chunk: one graph
    else:
        assert "ttt_graphs" not in res  # pr430's TTT (Hedge) trains the base model eagerly


@pytest.mark.slow
def test_aot_eager_traces_the_backward_too():
    """AOT autograd's joint forward + backward trace (functionalisation, the kernel's fake strides): the
    cpu-smoke training step with backend aot_eager (the sweep above uses dynamo's eager backend)."""
    res = compile_check(get_preset("cpu-smoke"), backend="aot_eager", ttt=False)
    assert res["backend"] == "aot_eager" and res["graph_breaks"] == 0 and res["recompiles"] == 0


@pytest.mark.slow
def test_inductor_lowers_and_builds_the_training_step_on_cpu():
    """The backend a GPU run uses: Inductor lowers the cpu-smoke training step, forward and backward
    through FlashAttention-3's call, and builds it (C++ here, where a GPU gets Triton), whole and without
    recompiling (`pgolf plan --compile-backend inductor`; about 40 s). pr1855's step and TTT step take
    about 5 minutes this way: docs/perf.md."""
    res = compile_check(get_preset("cpu-smoke"), backend="inductor", ttt=False)
    assert res["backend"] == "inductor" and res["kernel"] == "fa3"
    assert res["graph_breaks"] == 0 and res["recompiles"] == 0 and res["train_graphs"] == 1, res


def test_check_config_keeps_switches_and_looping_structure():
    """The reduced preset keeps every switch and the loop's span and passes; only plain layers go."""
    from pgolf.model.gpt import virtual_layer_order

    full, small = get_preset("pr1855"), check_config(get_preset("pr1855"))
    for key in ("num_loops", "attn_gate", "smear_gate", "doc_mask", "skip_gates", "recur_carry", "qk_norm"):
        assert getattr(small.model, key) == getattr(full.model, key), key
    assert small.model.loop_end - small.model.loop_start == full.model.loop_end - full.model.loop_start
    assert virtual_layer_order(small.model, True) == [0, 1, 2, 3, 1, 2, 3, 1, 2, 3, 4, 5]
    assert small.model.parallel_start_layer == 4 and small.model.xsa_last_n == small.model.num_layers
    assert small.data.segmentation == "varlen" and small.model.model_dim == 64
    assert check_config(get_preset("pr430")).model.ve_layers == [1, 2]  # the last two layers, as in #430


def test_an_injected_graph_break_is_caught(monkeypatch):
    """A `.item()` inside the MLP (a host sync, data-dependent Python) breaks the graph: the check says so."""
    from pgolf.model import gpt

    forward = gpt.MLP.forward

    def leaky(self, x):
        if x.abs().max().item() > 1e9:  # never true; tracing it is what breaks the graph
            x = x * 0
        return forward(self, x)

    monkeypatch.setattr(gpt.MLP, "forward", leaky)
    res = compile_check(get_preset("cpu-smoke"), ttt=False, cached=False)
    assert res["graph_breaks"] >= 1 and res["recompiles"] is None
    assert any("item" in r for r in res["break_reasons"]), res["break_reasons"]


def test_lora_ttt_loop_on_its_compiled_forward_adds_no_graph(monkeypatch):
    """The compiled forward LoRA TTT takes on CUDA, forced here with dynamo's eager backend: after the
    warm-up (full context, then one chunk) the whole phased TTT loop (windows from 2 tokens to the full
    context, short last chunks, new adapters after each phase) adds no graph and scores as eager does."""
    from pgolf.eval import lora_ttt, ttt_base
    from pgolf.eval.phased import PhasedTTT
    from pgolf.model.compile import compile_ttt
    from test_eval_common import stream_for, tiny_cfg, tiny_model, tiny_val

    cfg = tiny_cfg()
    cfg.ttt.phases, cfg.ttt.prefix_docs = 2, 6
    model, val = tiny_model(cfg), tiny_val(16)
    eager = PhasedTTT(model, val, cfg, stream_for(val)).run()

    def compiled(m, c):
        return compile_ttt(m, backend="eager")

    monkeypatch.setattr(ttt_base, "ttt_forward", compiled)
    monkeypatch.setattr(lora_ttt, "ttt_forward", compiled)
    torch._dynamo.reset()
    counters.clear()
    try:
        ttt_base.warmup(model, cfg, lora=True)
        warmed = counters["stats"]["unique_graphs"]
        res = PhasedTTT(model, val, cfg, stream_for(val)).run()
        assert warmed == 1 and counters["stats"]["unique_graphs"] == 1
        assert sum(counters["graph_break"].values()) == 0
    finally:
        torch._dynamo.reset()
    assert res["updates"] == eager["updates"] > 0
    assert res["val_bpb"] == pytest.approx(eager["val_bpb"], rel=1e-5)
