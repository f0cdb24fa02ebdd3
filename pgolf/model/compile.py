"""The compiled forwards: the training step (fixed shapes) and the LoRA TTT step (varying context).

Both are `torch.compile(..., fullgraph=True)` of the model's one forward, as the records compile
theirs (docs/records/record-stack.md §3.7: the model with dynamic=False; §5.1: the TTT forward with dynamic shapes,
warmed up at the chunk and the full context on random tokens). A graph break is therefore an error,
never a silent slowdown. The document mask is the one data-dependent piece (how many segments a row
holds): `CompiledForward` prepares it outside the graph (`GPT.attention_mask`) and passes it in with
the length of FlashAttention's cu_seqlens marked dynamic, so a new count of segments does not recompile
(the records instead pre-compile four cu_seqlens buckets; `maybe_mark_dynamic`: a kernel whose fake form
needed the length fixed would recompile per bucket, as theirs, rather than fail). Switching looping on
adds one graph, which the trainer's warm-up compiles before the clock starts.

`backend` is Inductor on CUDA; the CPU compile check (pgolf.compile_check) passes "eager", "aot_eager"
or "inductor".
"""
from __future__ import annotations

from typing import Any

import torch

from pgolf.model.attention import FLASH_MODULES, DocMask


class CompiledForward:
    """`target` (`model` itself or its `forward_at`) compiled whole, called like the model's own method.
    (The method is passed, not named: a getattr by a computed name would keep every method of the
    script's classes in an exported script, pgolf.script.bundle.)"""

    def __init__(self, model: Any, target: Any, *, dynamic_width: bool = False,
                 backend: str = "inductor"):
        self.model = model
        self.dynamic_width = dynamic_width
        self.compiled = torch.compile(target, dynamic=False, fullgraph=True, backend=backend)

    def __call__(self, idx: torch.Tensor, *args: Any, mask: DocMask | None = None, **kw: Any) -> torch.Tensor:
        # contiguous token tensors: a graph guards on strides, and callers pass slices (x[:, :-1]) or not
        idx = idx.contiguous()
        args = tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)
        if mask is None:
            mask = self.model.attention_mask(idx)
        if mask is not None and mask.backend in FLASH_MODULES and mask.plan is not None:
            torch._dynamo.maybe_mark_dynamic(mask.plan[0], 0)  # cu_seqlens: any number of segments, one graph
        if self.dynamic_width:  # the row width and, for forward_at, the number of positions vary
            for t in (idx, *args):
                torch._dynamo.maybe_mark_dynamic(t, 1)
        return self.compiled(idx, *args, mask=mask, **kw)


def compile_train(model: torch.nn.Module, backend: str = "inductor") -> CompiledForward:
    """`model(idx, targets)` compiled at fixed shapes (one graph per looping mode)."""
    return CompiledForward(model, model, backend=backend)


def compile_ttt(model: torch.nn.Module, backend: str = "inductor") -> CompiledForward:
    """`model.forward_at(idx, positions, lora=..., mask=...)` compiled with two dynamic sizes, the window
    width and the number of scored positions, which change from chunk to chunk (the records compile
    with dynamic=True; the batch and the adapters' shapes stay fixed here, so they need no symbols)."""
    return CompiledForward(model, model.forward_at, dynamic_width=True, backend=backend)
