"""RTN / GPTQ / LQER / gates on synthetic matrices (docs/records/record-stack.md §4.3-§4.5)."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from pgolf.artifact import lowrank
from pgolf.quant import lqer
from pgolf.quant.gptq import (clip_range, dequantize, hessian_error, quantize_absmax_int8, quantize_gptq,
                              quantize_rtn, sdclip_scale)


def _problem(rows=48, cols=96, n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    X = torch.randn(n, cols, generator=g) @ mix * torch.linspace(0.2, 3.0, cols)  # correlated, uneven
    W = torch.randn(rows, cols, generator=g) * 0.05
    return W, X.T @ X / n


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(2, 70), bits=st.integers(2, 8),
       k=st.floats(0.5, 20.0), scale=st.floats(1e-3, 10.0), seed=st.integers(0, 10_000))
def test_rtn_within_half_step_of_clipped(rows, cols, bits, k, scale, seed):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * scale
    q, s = quantize_rtn(w, bits, k)
    R = clip_range(bits)
    assert q.dtype == torch.int8 and s.dtype == torch.float16
    assert int(q.abs().max()) <= R
    sf = s.float()[:, None]
    clipped = torch.maximum(torch.minimum(w, R * sf), -R * sf)
    assert bool(((dequantize(q, s) - clipped).abs() <= sf / 2 * (1 + 1e-5) + 1e-7).all())


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 12), cols=st.integers(1, 40), seed=st.integers(0, 10_000))
def test_gate_int8_within_half_step(rows, cols, seed):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    q, s = quantize_absmax_int8(w)
    sf = s.float()[:, None]
    assert int(q.abs().max()) <= 127
    clipped = torch.maximum(torch.minimum(w, 127 * sf), -127 * sf)  # fp16 scale may round down
    assert bool(((dequantize(q, s) - clipped).abs() <= sf / 2 * (1 + 1e-5) + 1e-7).all())


@pytest.mark.parametrize("bits", [3, 4, 6, 8])
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_beats_rtn_in_hessian_error(bits, act_order):
    W, H = _problem()
    k = 3.0 if bits < 6 else 12.0
    qr, sr = quantize_rtn(W, bits, k)
    qg, sg = quantize_gptq(W, H, bits, k, block_size=32, act_order=act_order)
    assert torch.equal(sr, sg)  # the same SDClip scales: only the rounding differs
    assert int(qg.abs().max()) <= clip_range(bits)
    assert hessian_error(W, dequantize(qg, sg), H) < 0.9 * hessian_error(W, dequantize(qr, sr), H)


def test_gptq_dead_columns_and_block_sizes():
    W, H = _problem(rows=16, cols=40)
    H[:, 7] = 0
    H[7, :] = 0
    q1, _ = quantize_gptq(W, H, 6, 12.0, block_size=128)
    q2, _ = quantize_gptq(W, H, 6, 12.0, block_size=8)
    assert bool((q1[:, 7] == 0).all())  # a dead input's weights are dropped
    # blocking is an exact reorganisation of the same updates (up to float rounding)
    assert (q1.int() - q2.int()).abs().max() <= 1 and (q1 != q2).float().mean() < 0.02


def test_sdclip_scale_is_k_std_over_R():
    w = torch.randn(8, 256)
    s = sdclip_scale(w, 6, 12.85)
    torch.testing.assert_close(s.float(), (12.85 * w.std(dim=1) / 31).half().float())


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([2, 4]), n=st.integers(1, 300), seed=st.integers(0, 1000))
def test_pack_bits_round_trip(bits, n, seed):
    lo = -(1 << (bits - 1))
    v = torch.randint(lo, -lo, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
    p = lowrank.pack_bits(v, bits)
    assert p.numel() == -(-n * bits // 8)
    assert torch.equal(lowrank.unpack_bits(p, bits, n), v)


@pytest.mark.parametrize("cols,mode", [(128, "asym"), (100, "sym")])  # 4*100 % 64 != 0: fallback
def test_lqer_reduces_error(cols, mode):
    W = torch.randn(64, cols)
    q, s = quantize_rtn(W, 3, 2.5)
    E = W - dequantize(q, s)
    A, B = lqer.factors(E, 4)
    p = lqer.pack(A, B, asym=True, group=64, bits=4)
    assert p["mode"] == mode
    Ah, Bh = lowrank.unpack(p)
    assert Ah.shape == A.shape and Bh.shape == B.shape
    assert (E - lowrank.correction(p)).norm() < E.norm()
    if mode == "asym":
        assert p["a"].dtype == torch.uint8 and p["a"].numel() == 64 * 4 // 4  # INT2: 4 per byte
        assert p["b"].numel() == 4 * cols // 2 and p["sb"].numel() == 4 * cols // 64  # INT4 groups of 64


def test_quantile_clip_and_688_options():
    from pgolf.quant.gptq import QUANTILE_CANDIDATES, quantile_clip_scale

    g = torch.Generator().manual_seed(1)
    W = torch.randn(32, 256, generator=g)
    W[0, 0] = 40.0  # an outlier: row 0 prefers clipping it
    s = quantile_clip_scale(W, 5)
    R = clip_range(5)
    allowed = torch.stack([torch.quantile(W.abs(), qt, dim=1) / R for qt in QUANTILE_CANDIDATES]).half()
    assert bool((allowed == s[None]).any(dim=0).all())  # each row uses one of the candidate clips
    assert float(s[0]) * R < 40.0
    q, s2 = quantize_rtn(W, 5, 12.0, scale=s)
    assert torch.equal(s2, s)
    W2, H = _problem(rows=16, cols=64)
    qa, _ = quantize_gptq(W2, H, 5, 12.0, ascending=True, scale=quantile_clip_scale(W2, 5))
    assert int(qa.abs().max()) <= R


def test_exact_fp32_turns_tf32_off_on_cuda_and_restores_it():
    """GPTQ runs with TF32 off on CUDA (the record pipeline turns it on for training) and one thread
    on the CPU; both settings come back afterwards, also after an error. (The flag is a process
    setting that a CPU build holds too, so this runs without a GPU.)"""
    from pgolf.quant.gptq import exact_fp32

    before = torch.backends.cuda.matmul.allow_tf32
    threads = torch.get_num_threads()
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        with pytest.raises(RuntimeError, match="inside"):
            with exact_fp32(torch.device("cuda")):
                assert torch.backends.cuda.matmul.allow_tf32 is False
                raise RuntimeError("inside")
        assert torch.backends.cuda.matmul.allow_tf32 is True
        with exact_fp32(torch.device("cpu")):
            assert torch.get_num_threads() == 1 and torch.backends.cuda.matmul.allow_tf32 is True
        assert torch.get_num_threads() == threads
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.gpu
def test_gptq_and_lqer_on_cuda_give_the_cpu_result_with_tf32_on():
    """With TF32 on (as during training), GPTQ on CUDA gives the CPU's integers but for fp32 rounding,
    and LQER's factors are the CPU's exactly: its SVD runs on the CPU (singular-vector signs are the
    solver's choice, and asym packing is not sign-symmetric)."""
    assert torch.cuda.is_available(), "run the gpu tests on a CUDA machine"
    W, H = _problem(512, 512)
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        q_cpu, s_cpu = quantize_gptq(W, H, 6, 13.0)
        q_gpu, _ = quantize_gptq(W.cuda(), H.cuda(), 6, 13.0, scale=s_cpu.cuda())  # the same row scales
        assert (q_cpu != q_gpu.cpu()).float().mean().item() < 1e-3
        assert torch.backends.cuda.matmul.allow_tf32 is True  # restored
        E = W - q_cpu.float() * s_cpu.float()[:, None]
        A, B = lqer.factors(E, 4)
        Ag, Bg = lqer.factors(E.cuda(), 4)
        assert Ag.is_cuda and torch.equal(A, Ag.cpu()) and torch.equal(B, Bg.cpu())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
