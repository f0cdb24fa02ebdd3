"""Bad quantisation settings and corrupt artifacts give one clear error line, never a traceback."""
from __future__ import annotations

import pytest
import torch

TINY = ["model.num_layers=2", "model.model_dim=64", "model.num_heads=2", "model.num_kv_heads=1",
        "train.train_seq_len=64", "train.eval_seq_len=64", "train.train_batch_tokens=512",
        "data.val_max_tokens=4096", "train.iterations=2", "train.max_seconds=0"]


@pytest.fixture(scope="module")
def tiny_run(sp1024_data, tmp_path_factory):
    from pgolf.cli import main

    out = tmp_path_factory.mktemp("qerr") / "run"
    assert main(["train", "--preset", "cpu-smoke", "--data", str(sp1024_data), "--out", str(out),
                 *[a for s in TINY for a in ("--set", s)]]) == 0
    return out


@pytest.mark.parametrize("setting,key", [("quant.mlp_bits=9", "quant.mlp_bits"),
                                         ("quant.byte_shuffle=300", "quant.byte_shuffle"),
                                         ("quant.clip_mode=\"median\"", "quant.clip_mode"),
                                         ("quant.compressor=\"rar\"", "quant.compressor"),
                                         ("quant.lqer=true", None)])
def test_bad_quant_settings_fail_before_any_work(tiny_run, cli, setting, key):
    extra = ["--set", "quant.lqer_group=0"] if key is None else []
    rc, res, err = cli("quantize", tiny_run, "--set", setting, *extra)
    assert rc == 2 and res is None and "Traceback" not in err
    assert err.count("pgolf: error:") == 1 and (key or "quant.lqer_group") in err
    assert not (tiny_run / "hessians.pt").exists()  # failed before calibration


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_artifact_is_one_line(tiny_run, cli, tmp_path, damage):
    blob = (tiny_run / "final_model.int8.ptz").read_bytes()
    bad = tmp_path / "bad.ptz"
    bad.write_bytes(blob[: len(blob) // 2] if damage == "truncate" else b"\x03" + bytes(range(256)) * 4)
    rc, res, err = cli("eval", tiny_run, "--artifact", bad)
    assert rc == 2 and res is None and "Traceback" not in err
    assert err.count("pgolf: error:") == 1 and str(bad) in err


def test_untied_head_gets_a_hessian():
    from pgolf.model import build_model
    from pgolf.presets import get_preset
    from pgolf.quant.hessian import collect_hessians

    cfg = get_preset("cpu-smoke", ["model.tie_embeddings=false", "model.num_layers=2", "model.model_dim=64",
                                   "model.num_heads=2", "model.num_kv_heads=1"])
    model = build_model(cfg)
    H = collect_hessians(model, [torch.randint(0, 1024, (2, 32))])
    assert "lm_head.weight" in H and H["lm_head.weight"].shape == (64, 64)
    assert "tok_emb.weight" not in H
