"""`pgolf bench` runs on the current device and reports the contract keys (timings are not asserted)."""
from __future__ import annotations

TINY = ["model.num_layers=6", "model.loop_start=1", "model.loop_end=2", "model.parallel_start_layer=4",
        "model.model_dim=64", "model.num_heads=2", "model.num_kv_heads=1",
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


def test_bench_needs_a_timed_step(cli):
    """--steps 0 was a StatisticsError (the median of no times)."""
    for argv, bad in ((["--steps", "0"], "--steps 0 / --warmup 5"), (["--warmup", "-1"], "--steps 20 / --warmup -1")):
        rc, res, err = cli("bench", "--preset", "cpu-smoke", *argv)
        assert rc == 2 and err.strip() == (f"pgolf: error: {bad}: need at least 1 timed step and 0 or more "
                                           "warm-up steps")


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
    assert flops_per_token(model, 64) - flat == 6.0 * 4 * block + 6.0 * 4 * 64 * 65  # causal: 65/2 pairs a token


QTINY = TINY + ["quant.method=\"gptq\"", "quant.passthrough_numel=1024", "quant.calibration_batches=2",
                "quant.calibration_seqs=2", "quant.calibration_seq_len=64", "quant.lqer=true", "quant.lqer_top_k=2"]


def test_bench_quant_times_every_phase_and_compressor(cli):
    args = [a for s in QTINY for a in ("--set", s)]
    rc, res, err = cli("bench", "--quant", "--preset", "pr1855", "--codecs", "zstd,zpaq,pergroup:zpaq", *args)
    assert rc == 0, err
    assert res["weights"] == "init" and res["calibration_source"] == "random ids"
    assert res["calibration_tokens"] == 2 * 2 * 64 and res["lqer_tensors"] == 2
    # every block matrix (q, k, v, o, fc, proj x 6 layers) and the tied head
    assert res["hessians"] == 6 * 6 + 1 and res["gptq_total_s"] >= res["quantize_s"] > 0
    rows = {r["compressor"]: r for r in res["compressors"]}
    assert list(rows) == ["zstd", "zpaq", "pergroup:zpaq"]
    for r in rows.values():
        assert r["total_bytes"] == r["model_bytes"] + res["code_bytes"] and r["compress_s"] > 0


def test_bench_quant_on_a_trained_run_calibrates_on_train_shards(sp1024_data, tmp_path, cli):
    from pgolf.cli import main

    run = tmp_path / "run"
    tiny = ["model.num_layers=2", "model.model_dim=64", "model.num_heads=2", "model.num_kv_heads=1",
            "train.train_seq_len=64", "train.eval_seq_len=64", "train.train_batch_tokens=512",
            "data.val_max_tokens=2048", "train.iterations=2", "train.max_seconds=0"]
    assert main(["train", "--preset", "cpu-smoke", "--data", str(sp1024_data), "--out", str(run),
                 *[a for s in tiny for a in ("--set", s)]]) == 0
    rc, res, err = cli("bench", "--quant", "--run", run, "--codecs", "brotli", "--set", "quant.method=\"gptq\"",
                       "--set", "quant.passthrough_numel=1024")
    assert rc == 0, err
    assert res["weights"] == "trained" and res["calibration_source"] == "train shards"
    assert res["calibration_tokens"] == 4 * 8 * 256 and res["hessians"] == 2 * 6 + 1
    rc, res, err = cli("bench", "--quant", "--preset", "cpu-smoke", "--codecs", "brotli,rar")
    assert rc == 2 and err.count("pgolf: error:") == 1 and "--codecs 'rar'" in err


TTINY = ["model.num_layers=2", "model.model_dim=64", "model.num_heads=2", "model.num_kv_heads=1",
         "model.vocab_size=256", "ttt.eval_seq_len=64", "ttt.chunk_size=16", "ttt.batch_size=4", "ttt.lora_rank=4",
         "ttt.sgd_chunk_tokens=512", "eval.seq_len=64", "eval.batch_seqs=4"]


def test_bench_ttt_reports_scored_tokens_per_second(cli):
    from pgolf.eval.bench import synthetic_val

    v = synthetic_val(20_000, 256)
    docs = v.doc_starts.numel()
    assert v.num_targets == 20_000 and 10 < docs < 60  # ~810 tokens per document
    assert v.tokens[v.tokens < 8].unique().tolist() == [1]  # no special id but BOS
    assert int(v.bytes[v.tokens[1:] == 1].sum()) == 0 and int(v.bytes.min()) >= 0  # BOS targets: 0 bytes
    args = [a for s in TTINY for a in ("--set", s)]
    for method in ("lora", "sgd"):
        rc, res, err = cli("bench", "--ttt", "--preset", "cpu-smoke", "--tokens", "1024",
                           "--set", f'ttt.method="{method}"', *args)
        assert rc == 0, err
        assert res["method"] == method and res["targets"] == 1024 and res["updates"] > 0
        assert res["scored_tokens_per_s"] > 0 and res["time"]["within_budget"]
        assert res["device"] == "cpu" and res["scored_tokens_per_s_per_gpu"] is None  # no GPU figure on a CPU
        assert res["scored_tokens_per_s_per_rank"] == res["scored_tokens_per_s"]  # one rank
    rc, res, err = cli("bench", "--ttt", "--quant", "--preset", "cpu-smoke")
    assert rc == 2 and "one benchmark at a time" in err
