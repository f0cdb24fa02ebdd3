"""The artifact format: how quantised weights are stored, compressed and loaded back.

codecs.py    zlib / lzma / brotli / zstd / zpaq streams, byte shuffle (one tag byte per stream)
pergroup.py  the per-group container of PR #1855 (role groups, row reordering, one stream each)
int8.py      the baseline's per-row int8 + zlib export
lowrank.py   the stored LQER factors and their correction
qstate.py    the quantised state: serialise, load, dequantise (`load_artifact`)
weights.py   a weights file (`.pt`) or an artifact -> a checked state_dict

This package sits below `pgolf.quant` (which chooses the integers) and `pgolf.eval` (which scores
what is loaded): both use it, neither reaches into the other to read a file.
"""
