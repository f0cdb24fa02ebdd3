"""`pgolf plan` (issue 12): memory per component, FLOPs per token against the analytic count of
docs/perf.md worked out by hand, predicted ms/step beside the records' measured ones, exit 2 over 80 GB."""
from __future__ import annotations

import pytest
import torch

# 6 N + 6 L d (T + 1) by hand (docs/perf.md). pr1855: a block applies q, o 512x512, k, v 256x512 and the MLP
# 2048x512 twice = 2,883,584 weights; 17 visits looped (11 flat), the tied head 8192 x 512, the smear gate 12.
PR1855_N = {"looping_on": 17 * 2_883_584 + 8192 * 512 + 12, "looping_off": 11 * 2_883_584 + 8192 * 512 + 12}
PR1855_ATTN = {"looping_on": 6 * 17 * 512 * 2049, "looping_off": 6 * 11 * 512 * 2049}
# baseline: q, o 512x512, k, v 256x512, MLP 1024x512 twice = 1,835,008 per block, 9 blocks, head 1024 x 512
BASELINE_FLOPS = 6 * (9 * 1_835_008 + 1024 * 512) + 6 * 9 * 512 * 1025


@pytest.fixture(scope="module")
def pr1855_plan():
    from pgolf.cli import main
    import io
    import json
    import contextlib

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["plan", "--preset", "pr1855", "--nproc", "8"])
    assert rc == 0
    return json.loads(out.getvalue().strip().splitlines()[-1])


def test_pr1855_plan_flops_agree_with_the_analytic_count(pr1855_plan):
    p = pr1855_plan
    assert p["params"] == 35_945_671  # docs/records/record-stack.md §2.1
    for mode in ("looping_off", "looping_on"):
        analytic = 6 * PR1855_N[mode] + PR1855_ATTN[mode]
        assert abs(p["flops_per_token_by_mode"][mode] / analytic - 1) < 0.05, mode
    assert p["flops_per_token"] == p["flops_per_token_by_mode"]["looping_on"]  # the mode training ends in


def test_pr1855_plan_memory_time_and_records_side_by_side(pr1855_plan):
    p = pr1855_plan
    mem = p["memory_gb_per_rank"]
    assert set(mem) == {"parameters", "gradients", "optimizer", "ema", "activations"}
    # parameters: fp32 except tok_emb in bf16; the EMA is an fp32 copy of all of them
    assert mem["parameters"] == pytest.approx((35_945_671 * 4 - 8192 * 512 * 2) / 1e9, abs=1e-3)
    assert mem["ema"] == pytest.approx(35_945_671 * 4 / 1e9, abs=1e-3)
    # Muon's bf16 momentum, sharded over 8 ranks: banks of 22 (q+o), 22 (k+v), 11, 11 -> 3, 3, 2, 2 per rank;
    # AdamW: two moments of tok_emb (bf16) and of the fp32 control tensors
    muon = (3 * 512 * 512 + 3 * 256 * 512 + 2 * 2048 * 512 * 2) * 2
    adam = 2 * 8192 * 512 * 2 + 2 * 4 * (35_945_671 - 8192 * 512 - 11 * 2_883_584)
    assert mem["optimizer"] == pytest.approx((muon + adam) / 1e9, abs=1e-3)
    assert 10 < mem["activations"] < 80 and p["peak_memory_gb_per_rank"] == pytest.approx(sum(mem.values()), abs=0.01)
    # 98,304 tokens x FLOPs / (989 TFLOP/s x 0.40)
    for mode, ms in p["predicted_ms_per_step_by_mode"].items():
        assert ms == pytest.approx(98_304 * p["flops_per_token_by_mode"][mode] / (989e12 * 0.40) * 1e3, rel=1e-3)
    assert p["measured"]["ms_per_step"] == {"looping_off": 96.0, "looping_on": 141.0}
    assert 0.2 < p["measured"]["implied_mfu"]["looping_on"] < 0.5
    assert p["graph_breaks"] == 0 and p["recompiles"] == 0
    assert p["ttt"]["scored_per_step"] == 64 * 48 and p["gptq"]["calibration_tokens"] == 16 * 48 * 2048


def test_baseline_plan_on_one_gpu(cli):
    rc, p, err = cli("plan", "--preset", "baseline", "--nproc", "1")
    assert rc == 0, err
    assert p["params"] == 17_059_912 and p["accum_steps"] == 8 and p["tokens_per_rank_step"] == 524_288
    assert abs(p["flops_per_token"] / BASELINE_FLOPS - 1) < 0.05
    assert p["measured"]["ms_per_step"] == {"looping_off": 360.7} and "gptq" not in p  # int8 export
    assert "memory per rank (GB)" in err and "measured 360.7 ms" in err  # the table, on stderr
    assert p["compile_check"]["backend"] == "eager" and "compile check (eager): 0 graph breaks" in err


def test_a_rank_over_80_gb_is_an_error(cli):
    """Eight micro-batches of 65,536 tokens in one: eight times the activations of a baseline rank."""
    rc, p, err = cli("plan", "--preset", "baseline", "--nproc", "1", "--set", "train.micro_batch_tokens=524288")
    assert rc == 2 and p is None
    assert err.count("pgolf: error:") == 1 and "over the 80 GB of an H100" in err and "activations" in err
    rc, _, err = cli("plan", "--preset", "baseline", "--mfu", "1.5")
    assert rc == 2 and "--mfu" in err


def test_live_bytes_and_attention_flops_by_hand():
    """The tracker's peak on fake tensors, and the stand-in kernel's FLOPs: 4 H D per allowed pair
    forward, twice that backward (segments of 3 and 5 tokens, causal: 6 + 15 pairs)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from pgolf.model.flash_ref import varlen_attn
    from pgolf.plan import _LiveBytes

    with FakeTensorMode(), _LiveBytes() as live:
        a = torch.empty(1000)  # 4,000 B
        b = torch.empty(1500, dtype=torch.bfloat16)  # 3,000 B: 7,000 B live
        del a  # 3,000 B live
        c = b.float() * 2  # a 6,000 B temporary beside the 6,000 B result: 15,000 B, then 9,000 B
        assert live.now == 3000 + 6000
    assert live.peak == 3000 + 6000 + 6000 and c.shape == (1500,)
    q, k, v = (torch.randn(8, h, 4, requires_grad=True) for h in (2, 1, 1))
    cu = torch.tensor([0, 3, 3, 8], dtype=torch.int32)
    with FlopCounterMode(display=False) as fc:
        varlen_attn(q, k, v, cu, 5, True, 0.5).sum().backward()
    assert fc.get_total_flops() == 4 * 2 * 4 * 21 * 3


def test_plan_vs_bench_puts_prediction_beside_measurement(pr1855_plan, tmp_path):
    """scripts/plan_vs_bench.py: the implied MFU is the plan's FLOPs over the measured time."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "plan-pr1855.json").write_text(json.dumps(pr1855_plan))
    bench = {"device": "H100", "attention_backend": "fa3", "tokens_per_step": 98_304, "ms_per_step": 200.0,
             "mfu": 0.2, "peak_mem_gib": 40.0}
    (tmp_path / "bench-pr1855-on.json").write_text(json.dumps(bench))
    script = Path(__file__).resolve().parents[1] / "scripts" / "plan_vs_bench.py"
    out = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                         check=True).stdout
    row = next(line for line in out.splitlines() if line.startswith("| bench-pr1855-on"))
    implied = 98_304 * pr1855_plan["flops_per_token_by_mode"]["looping_on"] / 0.2 / 989e12
    cells = [c.strip() for c in row.split("|")]
    assert cells[3] == f"{pr1855_plan['predicted_ms_per_step_by_mode']['looping_on']:.1f}" and cells[4] == "200.0"
    assert cells[6] == f"{implied:.3f}" and cells[9] == "H100 (fa3)"
    assert "| bench-baseline | - |" in out  # a step that did not run leaves dashes
