"""`pgolf bench --quant`: how long the artifact takes to make, and how big it is per compressor.

Times the three phases the records budget at the end of training (docs/records/record-stack.md §3.9, §4):
Hessian collection over `quant.calibration_batches x calibration_seqs x calibration_seq_len` tokens,
GPTQ (+ LQER) of every matrix, then serialisation with each compressor and the load back. A speed
benchmark: without `--run` the weights are the preset's initialisation and the calibration tokens
are random ids (the time depends only on the shapes); with `--run DIR` the run's trained weights are
quantised and calibrated on its training shards (sizes then mean something). Validation data is
never read.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch

from pgolf.config import Config
from pgolf.errors import PgolfError
from pgolf.artifact import codecs as C
from pgolf.artifact.qstate import load_qstate, serialize
from pgolf.quant import quantize as A

# (compressor, group codec) pairs timed by default: every single-stream codec, and pergroup with
# the record's ZPAQ back end and with brotli (#1851's codec).
DEFAULT_CODECS = ("brotli", "lzma", "zstd", "zpaq", "pergroup:zpaq", "pergroup:brotli")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parse_codecs(spec: str | None) -> list[tuple[str, str]]:
    """"brotli,pergroup:zpaq" -> [("brotli", "brotli"), ("pergroup", "zpaq")]."""
    out = []
    for item in (spec.split(",") if spec else DEFAULT_CODECS):
        comp, _, group = item.strip().partition(":")
        if comp not in (*C.CODECS, "pergroup"):
            raise PgolfError(f"--codecs {item!r}: expected one of {', '.join(C.CODECS)}, pergroup[:CODEC]")
        if group and (comp != "pergroup" or group not in C.CODECS):
            raise PgolfError(f"--codecs {item!r}: only pergroup takes a group codec ({', '.join(C.CODECS)})")
        out.append((comp, group or "brotli"))
    return out


def _model_and_batches(cfg: Config, run_dir: str | None, device: torch.device):
    from pgolf.eval.bench import bench_model

    q = cfg.quant
    model = bench_model(cfg, run_dir, device)  # the trained weights with --run, else the initialisation
    if run_dir is not None:
        from pgolf.data.loader import calibration_batches

        batches = calibration_batches(cfg.data.path, q.calibration_batches, q.calibration_seqs,
                                      q.calibration_seq_len, seed=q.calibration_seed)
        return model, batches, "train shards"
    gen = torch.Generator().manual_seed(q.calibration_seed)
    batches = [torch.randint(0, cfg.model.vocab_size, (q.calibration_seqs, q.calibration_seq_len), generator=gen)
               for _ in range(q.calibration_batches)]
    return model, batches, "random ids"


def bench_quant(cfg: Config, *, run_dir: str | None = None, codecs: str | None = None,
                device: torch.device | None = None) -> dict[str, Any]:
    from pgolf.model import count_params
    from pgolf.script.codebytes import code_bytes
    from pgolf.quant.hessian import collect_hessians

    q = cfg.quant
    A.validate(q)
    pairs = parse_codecs(codecs)
    for comp, group in pairs:
        A.validate(dataclasses.replace(q, compressor=comp, group_codec=group))
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, batches, source = _model_and_batches(cfg, run_dir, device)  # looped forward, as the records calibrate
    _sync(device)
    t0 = time.perf_counter()
    H = collect_hessians(model, [b.to(device) for b in batches], min_numel=q.passthrough_numel,
                         doc_mask=q.calibration_doc_mask) \
        if q.method == "gptq" else {}
    _sync(device)
    hessians_s = time.perf_counter() - t0
    state = {k: v.detach() for k, v in model.state_dict().items()}
    t0 = time.perf_counter()
    qstate, info = A.quantize_state_dict(state, q, H, device)
    _sync(device)
    quantize_s = time.perf_counter() - t0
    code = code_bytes(cfg)["code_bytes"]
    rows = []
    for comp, group in pairs:
        qc = dataclasses.replace(q, compressor=comp, group_codec=group)
        t0 = time.perf_counter()
        blob, _ = serialize(qstate, qc)
        t1 = time.perf_counter()
        back = load_qstate(blob)
        t2 = time.perf_counter()
        if set(back["tensors"]) != set(qstate["tensors"]):
            raise PgolfError(f"{comp}: the artifact did not load back to the same tensors")
        rows.append({"compressor": comp + (f":{group}" if comp == "pergroup" else ""), "model_bytes": len(blob),
                     "total_bytes": len(blob) + code, "under_limit": len(blob) + code <= q.limit_bytes,
                     "compress_s": round(t1 - t0, 3), "decompress_s": round(t2 - t1, 3)})
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": name, "preset": cfg.preset, "run_dir": run_dir, "weights": "trained" if run_dir else "init",
            "params": count_params(model), "method": q.method, "calibration_source": source,
            "calibration_tokens": q.calibration_batches * q.calibration_seqs * q.calibration_seq_len,
            "hessians": len(H), "hessians_s": round(hessians_s, 3), "quantize_s": round(quantize_s, 3),
            "gptq_total_s": round(hessians_s + quantize_s, 3), "lqer_tensors": len(info["lqer"]),
            "code_bytes": code, "compressors": rows}
