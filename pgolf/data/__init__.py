"""The data layer: challenge shards, SentencePiece tokenizers, building / fetching data folders,
and the training loader. See docs/design.md ("Data") for the contracts.

A data folder holds `fineweb_val_*.bin`, `fineweb_train_*.bin`, `tokenizer.model` and
`manifest.json` (token counts, sha256 of every shard and of the tokenizer).
"""
from pgolf.data.shards import list_shards, load_split, read_shard, write_shard

__all__ = ["list_shards", "load_split", "read_shard", "write_shard"]
