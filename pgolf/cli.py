"""The `pgolf` command line (the contract is docs/cli-contract.md).

Every command returns a dict; the last line on stdout is that dict as one JSON object. Progress goes
to stderr. Each subcommand's work lives in the module that owns it; this file only parses arguments
and dispatches, importing lazily so `pgolf --help` stays fast.

Exit status (the same for every command):
  0    success: the JSON result is the last stdout line
  1    the command ran and printed its JSON, but part of the work failed: the result's `failed` list
       is not empty (a sweep with failed points)
  2    bad input (`PgolfError`): one `pgolf: error: ...` line on stderr (`--debug`: the traceback)
  130  interrupted by SIGINT (Ctrl-C)
  143  stopped by SIGTERM (torchrun, Slurm, `pgolf.lab.launch`): handled like SIGINT, so a run is
       recorded as interrupted and never as finished
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from typing import Any

from pgolf.errors import PgolfError, Terminated, sigterm_raises

EXIT_OK, EXIT_SOME_FAILED, EXIT_BAD_INPUT, EXIT_SIGINT, EXIT_SIGTERM = 0, 1, 2, 130, 143


class UsageError(PgolfError):
    """A command line argparse rejects (a missing argument, an unknown flag or command)."""


class Parser(argparse.ArgumentParser):
    """argparse with the contract's error form: one `pgolf: error:` line and exit 2 (no usage block).
    Subcommand parsers are made by the same class, so theirs name the subcommand."""

    def error(self, message: str):  # type: ignore[override]
        sub = self.prog[len("pgolf "):] + ": " if self.prog.startswith("pgolf ") else ""
        raise UsageError(f"{sub}{message} (see `{self.prog} --help`)")


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field by dotted path (repeatable), e.g. model.num_layers=4")


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="pgolf", description="Parameter Golf research workbench")
    ap.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("params", help="count the trainable parameters of a preset")
    p.add_argument("--preset", default="baseline")
    p.add_argument("--code-bytes", action="store_true", help="also count the code bytes of its exported record script")
    p.add_argument("--breakdown", nargs="?", const="module", choices=("module", "definition"),
                   help="what each module (or top-level definition) of that script costs (implies --code-bytes)")
    _add_set(p)
    p.set_defaults(handler="pgolf.plan:cmd_params")

    data = sub.add_parser("data", help="build, fetch and audit challenge shards")
    dsub = data.add_subparsers(dest="data_command", required=True)
    p = dsub.add_parser("build", help="documents -> challenge shards (+ manifest)")
    p.add_argument("--input", nargs="+", default=[], help=".jsonl (text field) or .txt files")
    p.add_argument("--sample", action="store_true", help="use the embedded sample corpus (pydoc_data)")
    p.add_argument("--tokenizer", help="SentencePiece .model to encode with")
    p.add_argument("--vocab-size", type=int, help="train a SentencePiece model with the challenge settings")
    p.add_argument("--val-docs", type=int, help="the first N documents form the validation split")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard")
    p.add_argument("--caseops", action="store_true",
                   help="CaseOps-transform the text (#1729); val gets original-byte sidecars")
    p.add_argument("--out", required=True)
    p.set_defaults(handler="pgolf.data.cli:cmd_build")
    p = dsub.add_parser("fetch", help="download the published challenge export from the Hugging Face Hub")
    p.add_argument("--variant", choices=["sp1024", "sp8192", "sp8192-caseops"], default="sp1024")
    p.add_argument("--train-shards", type=int, default=80)
    p.add_argument("--out", default=None)
    p.add_argument("--repo-id", default=None, help="dataset repository (default: the official export)")
    p.set_defaults(handler="pgolf.data.cli:cmd_fetch")
    p = dsub.add_parser("audit", help="validation bytes by the scoring LUTs vs the decoded UTF-8 text")
    p.add_argument("--data", required=True)
    p.add_argument("--tokenizer", default=None)
    p.set_defaults(handler="pgolf.data.cli:cmd_audit")

    p = sub.add_parser("train", help="train a preset (single process or under torchrun)")
    p.add_argument("--preset", default=None, help="default baseline; not with --config")
    p.add_argument("--config", default=None, help="a config.json to start from instead of a preset (it names its own)")
    p.add_argument("--data", default=None)
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--out", default=None, help="run directory (default runs/<run_id>)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-seconds", type=float, default=None)
    p.add_argument("--runs-root", default="runs")
    _add_set(p)
    p.set_defaults(handler="pgolf.train:cmd_train")

    p = sub.add_parser("quantize", help="GPTQ + compression of a run's weights; re-evaluates the artifact")
    p.add_argument("run_dir")
    p.add_argument("--strict", action="store_true", help="fail when the artifact is over the limit")
    p.add_argument("--no-eval", action="store_true", help="skip the re-evaluation of the artifact")
    p.add_argument("--allow-unfinished", action="store_true", help="quantise a run that did not finish")
    _add_set(p)
    p.set_defaults(handler="pgolf.quant.cli:cmd_quantize")

    p = sub.add_parser("eval", help="score the validation set from the artifact, optionally with TTT")
    p.add_argument("run_dir")
    p.add_argument("--artifact", default=None, help="score this artifact (default: the run's latest)")
    p.add_argument("--weights", choices=["artifact", "fp"], default=None,
                   help="artifact: the run's latest artifact (quantised, else the trainer's export); "
                        "fp: the unquantised final_model.pt")
    p.add_argument("--allow-unfinished", action="store_true", help="evaluate a run that did not finish")
    p.add_argument("--ttt", action="store_true")
    p.add_argument("--trace", default=None, help="write one entry per scored token to FILE.npz")
    _add_set(p)
    p.set_defaults(handler="pgolf.eval.cli:cmd_eval")

    p = sub.add_parser("bench", help="time training steps (or the artifact, --quant, or TTT, --ttt) on this device")
    p.add_argument("--preset", default="baseline")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--looping", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--quant", action="store_true",
                   help="time Hessians + GPTQ and every compressor instead of training steps")
    p.add_argument("--ttt", action="store_true",
                   help="time the configured TTT method (scored tokens/s) on synthetic documents")
    p.add_argument("--tokens", type=int, default=262_144, help="with --ttt: targets in the synthetic stream")
    p.add_argument("--run", default=None,
                   help="with --quant / --ttt: use this run's trained weights and config")
    p.add_argument("--codecs", default=None,
                   help="with --quant: comma list, e.g. brotli,zpaq,pergroup:zpaq (default: all)")
    _add_set(p)
    p.set_defaults(handler="pgolf.bench:cmd_bench")

    p = sub.add_parser("plan", help="predict memory, FLOPs and step times on an H100 without a GPU")
    p.add_argument("--preset", default="baseline")
    p.add_argument("--nproc", type=int, default=8, help="GPUs (ranks) the run would use")
    p.add_argument("--mfu", type=float, default=0.40, help="model FLOPs utilisation assumed for the times")
    p.add_argument("--compile-backend", default="eager", choices=("eager", "aot_eager", "inductor"),
                   help="the compile check's torch.compile backend: eager (dynamo's trace, seconds), aot_eager "
                        "(+ the backward), inductor (the real lowering and C++ code, minutes on a CPU)")
    _add_set(p)
    p.set_defaults(handler="pgolf.plan:cmd_plan")

    p = sub.add_parser("sweep", help="execute a parameterised notebook once per seed x grid point")
    p.add_argument("notebook", nargs="?")
    p.add_argument("--seeds", nargs="+", type=int, default=[1337])
    p.add_argument("-p", dest="params", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    p.add_argument("--grid", action="append", default=[], metavar="NAME=V1,V2",
                   help="a notebook parameter, or a dotted config key appended to the notebook's overrides")
    p.add_argument("--nproc", type=int, default=None,
                   help="torchrun processes per point (per node with slurm; default: one per GPU, one without)")
    p.add_argument("--runs-root", default="runs")
    p.add_argument("--status", metavar="RUNS_ROOT", default=None,
                   help="list every point of the sweeps under RUNS_ROOT (local and Slurm) with its state "
                        "(finished, active, failed, new) and, for Slurm, its job id")
    p.add_argument("--launcher", choices=["local", "slurm"], default="local",
                   help="local: one point after another here; slurm: one job per point (submitit)")
    s = p.add_argument_group("--launcher slurm")
    s.add_argument("--nodes", type=int, default=None, help="nodes per job (torchrun --nnodes, c10d rendezvous)")
    s.add_argument("--gpus-per-node", type=int, default=None)
    s.add_argument("--partition", default=None)
    s.add_argument("--time", default=None, help="job time limit: minutes, H:MM:SS or D-HH:MM:SS (default 60)")
    s.add_argument("--account", default=None)
    s.add_argument("--sbatch", action="append", default=[], metavar="KEY[=VALUE]",
                   help="an extra sbatch option, e.g. --sbatch qos=high --sbatch exclusive (repeatable)")
    s.add_argument("--dry-run", action="store_true",
                   help="write one sbatch script per point (listed under scripts) and submit nothing")
    s.add_argument("--wait", action="store_true", help="wait for the submitted jobs and report them")
    s.add_argument("--cluster", choices=["slurm", "local"], default=None,
                   help="submitit's executor: slurm (default), or local (jobs as child processes here)")
    p.set_defaults(handler="pgolf.lab.sweep_cli:cmd_sweep")

    p = sub.add_parser("stats", help="seed statistics and the challenge's significance test")
    p.add_argument("a_glob")
    p.add_argument("--vs", dest="b_glob", default=None)
    p.add_argument("--metric", default="val_bpb")
    p.add_argument("--runs-root", default="runs")
    p.add_argument("--pool", action="store_true",
                   help="pool runs of different configurations (config_key) matched by one pattern")
    p.set_defaults(handler="pgolf.lab.stats:cmd_stats")

    p = sub.add_parser("export", help="record runs of one configuration -> a records/ submission folder")
    p.add_argument("runs", nargs="+", metavar="RUN")
    p.add_argument("--out", required=True)
    p.add_argument("--name", default=None)
    p.add_argument("--author", default="")
    p.add_argument("--github-id", default="")
    p.add_argument("--blurb", default="")
    p.set_defaults(handler="pgolf.export.submission:cmd_export")

    p = sub.add_parser("check", help="the pre-submission checks of a submission folder (exit 2 on any failure)")
    p.add_argument("folder")
    p.add_argument("--vs", default=None, metavar="BPB_MEAN,STD,N|RECORD_DIR",
                   help="the current record, for the significance rule")
    p.set_defaults(handler="pgolf.export.check:cmd_check")
    return ap


def finite(obj: Any) -> Any:
    """`obj` with every float that JSON cannot hold (NaN, +-Infinity: a std of one run, a t statistic
    without spread) replaced by None, so the last stdout line is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    try:
        args = ap.parse_args(argv)
    except UsageError as e:
        print(f"pgolf: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    module, func = args.handler.split(":")
    try:
        with sigterm_raises():  # SIGTERM stops a command as Ctrl-C does
            handler = getattr(importlib.import_module(module), func)
            result: dict[str, Any] = handler(args)
    except PgolfError as e:
        if args.debug:
            raise
        print(f"pgolf: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("pgolf: interrupted", file=sys.stderr)
        return EXIT_SIGINT
    except Terminated:
        print("pgolf: terminated (SIGTERM)", file=sys.stderr)
        return EXIT_SIGTERM
    sys.stdout.flush()
    print(json.dumps(finite(result), default=str, allow_nan=False))  # strict JSON: no NaN / Infinity
    failed = result.get("failed")
    if failed:
        print(f"pgolf: {len(failed)} failed (listed under \"failed\" in the result)", file=sys.stderr)
        return EXIT_SOME_FAILED
    return EXIT_OK


if __name__ == "__main__":
    from pgolf.distributed import leave

    leave(main())
