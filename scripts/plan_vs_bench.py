"""Predicted beside measured: the `pgolf plan` and `pgolf bench` JSON lines of scripts/gpu_checks.sh.

    python scripts/plan_vs_bench.py OUT_DIR

Reads OUT_DIR/plan-*.json and bench-*.json (one JSON object each, the last line of the command) and
prints a markdown table for docs/perf.md: ms/step predicted at the plan's MFU and measured, the
measured MFU, the MFU the measured time implies with the plan's FLOPs, and peak memory (the plan's
eager upper bound, the allocator's measured peak); then TTT throughput and GPTQ seconds. A missing or
failed file leaves "-" in its cells.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

PEAK = 989e12  # H100 dense bf16 (pgolf.bench.PEAK_TFLOPS)
# (bench file, plan file, looping mode of the plan) for every timed training step
PAIRS = [("bench-baseline", "plan-baseline", "looping_off"),
         ("bench-pr1855-off", "plan-pr1855", "looping_off"),
         ("bench-pr1855-on", "plan-pr1855", "looping_on")]


def load(out: Path, name: str) -> dict:
    try:
        return json.loads((out / f"{name}.json").read_text())
    except (OSError, ValueError):
        return {}


def cell(value, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)


def main(out: Path) -> None:
    print(f"| step | tokens/step | predicted ms (MFU {load(out, 'plan-pr1855').get('mfu', 0.4)}) | measured ms "
          "| measured MFU | MFU implied by plan FLOPs | predicted peak GB (eager bound) | measured peak GiB | device |")
    print("|---|---|---|---|---|---|---|---|---|")
    for bench_name, plan_name, mode in PAIRS:
        b, p = load(out, bench_name), load(out, plan_name)
        flops = p.get("flops_per_token_by_mode", {}).get(mode)
        ms = b.get("ms_per_step")
        tokens = b.get("tokens_per_step") or p.get("tokens_per_rank_step")
        implied = tokens * flops / (ms / 1000) / PEAK if flops and ms and tokens else None
        print(f"| {bench_name} | {cell(tokens, '{:,}')} "
              f"| {cell(p.get('predicted_ms_per_step_by_mode', {}).get(mode), '{:.1f}')} | {cell(ms, '{:.1f}')} "
              f"| {cell(b.get('mfu'), '{:.3f}')} | {cell(implied, '{:.3f}')} "
              f"| {cell(p.get('peak_memory_gb_per_rank'), '{:.1f}')} | {cell(b.get('peak_mem_gib'), '{:.1f}')} "
              f"| {b.get('device', '-')} ({b.get('attention_backend', '-')}) |")
    ttt, plan = load(out, "bench-ttt-pr1855"), load(out, "plan-pr1855").get("ttt", {})
    print(f"\nTTT pr1855: predicted {cell(plan.get('scored_tokens_per_s_per_gpu'), '{:,}')} scored tokens/s/GPU "
          f"(full windows), measured {cell(ttt.get('scored_tokens_per_s_per_gpu'), '{:,}')}")
    quant, gptq = load(out, "bench-quant-pr1855"), load(out, "plan-pr1855").get("gptq", {})
    print(f"GPTQ pr1855: predicted {cell(gptq.get('predicted_s'), '{:.1f}')} s, measured Hessians "
          f"{cell(quant.get('hessians_s'), '{:.1f}')} s + GPTQ {cell(quant.get('quantize_s'), '{:.1f}')} s")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
