"""`pgolf bench` runs on the current device and reports the contract keys (timings are not asserted)."""
from __future__ import annotations

TINY = ["model.num_layers=6", "model.loop_start=1", "model.loop_end=2", "model.parallel_start_layer=4", "model.model_dim=64", "model.num_heads=2", "model.num_kv_heads=1",
        "model.vocab_size=256", "train.train_seq_len=64", "train.train_batch_tokens=512",
        "train.micro_batch_tokens=256"]


def test_bench_reports_contract_keys_on_cpu(cli):
    args = [a for s in TINY for a in ("--set", s)]
    rc, res, err = cli("bench", "--preset", "pr1855", "--steps", "2", "--warmup", "1", "--looping", "on", *args)
    assert rc == 0, err
    assert set(res) >= {"device", "attention_backend", "tokens_per_step", "ms_per_step", "tokens_per_s", "mfu"}
    assert res["device"] == "cpu" and res["attention_backend"] == "sdpa"
    assert res["tokens_per_step"] == 512 and res["accum_steps"] == 2  # 2 micro-batches of 256
    assert res["looping"] is True and res["mfu"] is None  # no known peak on a CPU
    assert res["ms_per_step"] > 0 and res["tokens_per_s"] > 0


def test_bench_rejects_a_batch_that_does_not_divide(cli):
    rc, res, err = cli("bench", "--preset", "cpu-smoke", "--set", "train.micro_batch_tokens=300")
    assert rc == 2 and "train.micro_batch_tokens" in err


def test_flops_count_looped_blocks_once_per_visit():
    from pgolf.bench import flops_per_token
    from pgolf.model import build_model
    from pgolf.presets import get_preset

    cfg = get_preset("pr1855", TINY)
    model = build_model(cfg, "meta")
    block = 2 * 64 * 64 + 2 * 32 * 64 + 2 * 4 * 64 * 64  # q, o (64x64), k, v (32x64), MLP 4x up and down
    model.looping = False
    flat = flops_per_token(model, 64)
    model.looping = True  # layers 1-2 run 3 times: 4 more block visits, 4 more layers of attention
    assert flops_per_token(model, 64) - flat == 6.0 * 4 * block + 12.0 * 4 * 64 * 64
