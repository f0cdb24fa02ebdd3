"""`pgolf data build | fetch | audit`: argument handling only; the work lives in build, fetch and bytes."""
from __future__ import annotations

from typing import Any

from pgolf.errors import PgolfError


def cmd_build(args) -> dict[str, Any]:
    from pgolf.data.build import build_from_files, build_sample

    if args.sample:
        if args.input:
            raise PgolfError("--sample / --input: give one source of documents, not both")
        return build_sample(args.out, vocab_size=args.vocab_size, tokenizer=args.tokenizer,
                            val_docs=args.val_docs, shard_tokens=args.shard_tokens, caseops=args.caseops)
    if not args.input:
        raise PgolfError("--input: give .jsonl/.txt files (or --sample for the embedded corpus)")
    if args.val_docs is None:
        # no silent default: the leaderboard metric needs a deliberate split (docs/records/record-stack.md §7)
        raise PgolfError("--val-docs: required with --input (the first N documents form validation)")
    return build_from_files(args.input, args.out, val_docs=args.val_docs, tokenizer=args.tokenizer,
                            vocab_size=args.vocab_size, shard_tokens=args.shard_tokens, caseops=args.caseops)


def cmd_fetch(args) -> dict[str, Any]:
    from pgolf.data.fetch import fetch

    return fetch(args.variant, args.train_shards, out=args.out, repo_id=args.repo_id)


def cmd_audit(args) -> dict[str, Any]:
    from pgolf.data.bytes import audit

    return audit(args.data, args.tokenizer)
