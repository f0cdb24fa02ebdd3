"""`pgolf quantize RUN_DIR [--set quant.k=v] [--strict] [--no-eval] [--allow-unfinished]` (the CLI contract's keys)."""
from __future__ import annotations

from typing import Any


def cmd_quantize(args: Any) -> dict[str, Any]:
    from pgolf.quant.pipeline import CLI_KEYS, quantize_run

    out = quantize_run(args.run_dir, args.overrides, strict=args.strict, evaluate=not args.no_eval,
                       allow_unfinished=args.allow_unfinished)
    extra = ("code_bytes_raw", "margin", "bits_per_param", "quant_delta_bpb", "bytes_by_group", "quant_timings")
    return {k: out.get(k) for k in CLI_KEYS + extra}
