"""pgolf — a research workbench for the OpenAI Parameter Golf challenge.

Importing pgolf touches no CUDA, NCCL or network: distributed set-up happens in
`pgolf.distributed.setup()`, called by the training entry point.
"""
__version__ = "0.1.0"
