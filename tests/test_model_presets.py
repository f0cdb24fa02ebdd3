"""Every preset: the exact parameter count of its record through `pgolf params`, a tiny version that keeps
its features trains on the CPU, uses every parameter, and runs LoRA with zero B exactly as without."""
import json

import pytest
import torch

from model_helpers import one_thread  # noqa: F401  (autouse)
from model_helpers import ALL_PRESETS, V, tiny_cfg, tiny_model, tokens
from pgolf.cli import main
from pgolf.model import BatchedLoRA, build_model, count_params
from pgolf.presets import get_preset

RECORD_PARAMS = {  # docs/records/record-stack.md §2.1, Appendix B; docs/records/hedge-stack.md §4.3
    "baseline": 17_059_912,
    "pr1855": 35_945_671,
    "pr1765": 35_944_602,
    "pr1784": 35_989_658,
    "pr1801": 35_945_658,  # the #1787 model: the frozen carry coefficients are buffers
    "pr1790": 35_946_727,  # #1667's count + 11 x 96 for the 24-wide AttnOutGate
    "pr430": 33_318_079,
}


@pytest.mark.parametrize("preset,expected", RECORD_PARAMS.items())
def test_pgolf_params_reports_the_record_count(preset, expected, capsys, monkeypatch):
    """`pgolf params --preset P` prints the record's exact count, from a meta-device build (no init)."""
    from pgolf.model.gpt import GPT

    def no_init(self):
        raise AssertionError("pgolf params must build on the meta device, without initialising weights")
    monkeypatch.setattr(GPT, "reset_parameters", no_init)
    assert main(["params", "--preset", preset]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result == {"preset": preset, "params": expected}


def test_frozen_carry_coefficients_are_buffers_not_parameters():
    """#1801's alpha/beta are frozen buffers (saved with the weights); they add no parameters."""
    m = build_model(get_preset("pr1801"), "meta")
    names = dict(m.named_buffers())
    assert names["carry_beta"].shape == (3,) and names["carry_alpha"].shape == (3, 3)
    assert not any("carry" in n for n, _ in m.named_parameters())
    assert {"carry_alpha", "carry_beta"} <= set(m.state_dict())
    assert count_params(m) == count_params(build_model(get_preset("pr1801", ["model.recur_carry=none"]), "meta"))


@pytest.mark.parametrize("preset", ALL_PRESETS)
def test_tiny_preset_keeps_every_feature_switch(preset):
    """The tiny overrides change shape keys only: every feature switch of the preset is as recorded."""
    shape = {"model_dim", "num_heads", "num_kv_heads", "vocab_size", "mlp_mult", "rope_dims",
             "bigram_buckets", "bigram_dim", "ve_dim"}
    full, tiny = get_preset(preset).model, tiny_cfg(preset).model
    diff = {k for k in vars(full) if getattr(full, k) != getattr(tiny, k)}
    assert diff <= shape
    assert (tiny.rope_dims == 0) == (full.rope_dims == 0)  # partial RoPE stays partial


@pytest.mark.parametrize("preset", ALL_PRESETS)
def test_every_parameter_gets_a_gradient(preset):
    """With looping on (where the preset loops), the loss depends on every trainable parameter."""
    model = tiny_model(preset)
    model(tokens(bos_at=(0, 11)), tokens(seed=1)).backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert dead == []


@pytest.mark.parametrize("preset", ALL_PRESETS)
def test_lora_with_zero_b_equals_the_plain_forward(preset):
    """BatchedLoRA on all six targets with random A and B = 0: logits bit-identical to no LoRA."""
    model = tiny_model(preset)
    torch.manual_seed(1)
    lora = BatchedLoRA(model, 2, rank=4, alpha=8.0)
    assert all(A.abs().min() > 0 for A in lora.A.values()) and not any(B.any() for B in lora.B.values())
    idx = tokens(bos_at=(0, 11))
    with torch.no_grad():
        assert torch.equal(model(idx, lora=lora), model(idx))


@pytest.mark.parametrize("preset", ALL_PRESETS)
def test_tiny_preset_trains(preset):
    """A few AdamW steps on one fixed batch from the preset's own init: the loss falls clearly."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg(preset))
    model.looping = bool(model.cfg.num_loops)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2, weight_decay=0.0)
    idx, tgt = tokens(1, 32, seed=3), tokens(1, 32, seed=4)
    losses = []
    for _ in range(6):
        loss = model(idx, tgt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert abs(losses[0] - torch.log(torch.tensor(float(V))).item()) < 0.05  # uniform at init
    assert losses[-1] < losses[0] - 2.0, losses
