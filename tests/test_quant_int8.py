"""The baseline int8 export: exact structure round trip, values within half a step."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from pgolf.errors import PgolfError
from pgolf.artifact.int8 import CLIP_Q, export_int8, load_int8

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@st.composite
def state_dicts(draw):
    sd = {}
    for i in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["big", "small", "control", "int", "vec"]))
        dtype = draw(st.sampled_from(DTYPES))
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
        if kind == "big":
            rows = draw(st.integers(1, 80))
            cols = 65_537 // rows + draw(st.integers(1, 64))
            t = torch.randn(rows, cols, generator=g) * draw(st.floats(1e-3, 10.0))
        elif kind == "vec":
            t = torch.randn(65_600, generator=g)
        elif kind == "int":
            sd[f"buf{i}"] = torch.randint(-5, 5, (draw(st.integers(1, 9)),), generator=g)
            continue
        else:
            t = torch.randn(draw(st.integers(1, 16)), draw(st.integers(1, 16)), generator=g)
        name = f"blocks.{i}.attn_scale" if kind == "control" else f"blocks.{i}.w"
        sd[name] = t.to(dtype)
    return sd


@settings(max_examples=15, deadline=None)
@given(state_dicts())
def test_int8_round_trip(sd):
    out = load_int8(export_int8(sd))
    assert list(out) == list(sd)
    for name, t in sd.items():
        r = out[name]
        assert r.dtype == t.dtype and r.shape == t.shape, name
        if not t.is_floating_point():
            assert torch.equal(r, t)
        elif "attn_scale" in name:
            assert torch.equal(r, t)  # control tensors stay fp32: exact
        elif t.numel() <= 65_536:
            assert torch.equal(r, t.half().to(t.dtype))
        else:
            w = t.float().reshape(t.shape[0] if t.ndim > 1 else 1, -1)
            clip = torch.quantile(w.abs().double(), CLIP_Q, dim=1, keepdim=True).float()
            step = (clip / 127).clamp_min(1 / 127).half().float()
            ref = torch.clamp(w, -clip, clip)
            err = (r.float().reshape(w.shape) - ref).abs()
            # half a step, plus the storage dtype's rounding of the dequantised value
            tol = step / 2 * 1.01 + ref.abs() * (2**-7 if t.dtype == torch.bfloat16 else 2**-10)
            assert bool((err <= tol + 1e-6).all()), name


def test_int8_rejects_garbage():
    with pytest.raises(PgolfError):
        load_int8(b"not an artifact")


def test_int8_compresses_large_matrix():
    sd = {"w": torch.randn(512, 512), "attn_scale": torch.ones(512)}
    blob = export_int8(sd)
    assert len(blob) < 512 * 512 * 1.05  # about a byte per weight before entropy coding
    np.testing.assert_allclose(load_int8(blob)["w"].numpy(), sd["w"].numpy(), atol=0.05)
