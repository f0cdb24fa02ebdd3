"""SentencePiece tokenizers: load one, or train one with the challenge's settings
(docs/records/record-stack.md §1.3)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import sentencepiece as spm

from pgolf.errors import PgolfError

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3

# The trainer settings of the official SP1024 / SP8192 models (data/download_hf_docs_and_tokenize.py).
CHALLENGE_SETTINGS: dict[str, Any] = dict(
    model_type="bpe",
    character_coverage=0.999,
    byte_fallback=True,
    split_digits=True,
    normalization_rule_name="nmt_nfkc",
    add_dummy_prefix=False,
    pad_id=PAD_ID,
    bos_id=BOS_ID,
    eos_id=EOS_ID,
    unk_id=UNK_ID,
)


def load_tokenizer(path: str | Path) -> spm.SentencePieceProcessor:
    path = Path(path)
    if not path.is_file():
        raise PgolfError(f"{path}: tokenizer not found")
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (OSError, RuntimeError):
        raise PgolfError(f"{path}: not a readable SentencePiece model") from None
    return sp


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_prefix: str | Path,
                    user_symbols: tuple[str, ...] = ()) -> Path:
    """Train a BPE model on `texts`; writes `<out_prefix>.model` and `.vocab`, returns the .model path.
    `user_symbols` are reserved as user-defined pieces right after the four specials (CaseOps: ids 4-7).

    Documents are fed line by line: SentencePiece silently skips "sentences" longer than
    max_sentence_length (4192 bytes), which would drop most long documents, and nmt_nfkc turns
    newlines into spaces anyway.
    """
    if not 2 ** 8 + 4 + len(user_symbols) < vocab_size <= 2 ** 16:
        raise PgolfError(f"--vocab-size {vocab_size}: must be in {261 + len(user_symbols)}..65536 (256 byte pieces "
                         f"+ 4 specials + {len(user_symbols)} reserved + at least one merge; ids are stored as uint16)")
    prefix = Path(out_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    lines = (ln for t in texts for ln in t.replace("\x00", " ").splitlines() if ln.strip())
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines, model_prefix=str(prefix), vocab_size=vocab_size,
            num_threads=min(os.cpu_count() or 1, 8), minloglevel=2,
            user_defined_symbols=list(user_symbols), **CHALLENGE_SETTINGS)
    except RuntimeError as e:
        # e.g. "Vocabulary size is too high": the corpus has too few distinct merges
        raise PgolfError(f"--vocab-size {vocab_size}: SentencePiece training failed ({str(e).strip()})") from None
    return Path(f"{prefix}.model")
