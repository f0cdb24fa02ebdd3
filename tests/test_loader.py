"""The training stream and calibration windows, on tiny shards whose token ids are their global
positions (so every batch says exactly where it came from)."""
from pathlib import Path

import numpy as np
import pytest
import torch

from pgolf.data import shards
from pgolf.data.loader import TrainLoader, calibration_batches
from pgolf.errors import PgolfError

SIZES = [100, 57, 80]
OFFSETS = np.cumsum([0] + SIZES)


@pytest.fixture
def tiny(tmp_path):
    for i, n in enumerate(SIZES):
        shards.write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", np.arange(OFFSETS[i], OFFSETS[i] + n))
    shards.write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(1000, 1100))
    return tmp_path


def test_one_process_with_accumulation_sees_what_two_processes_see(tiny):
    one = TrainLoader(tiny, seq_len=4)
    ranks = [TrainLoader(tiny, seq_len=4, rank=r, world_size=2) for r in range(2)]
    for _ in range(12):  # long enough to cross every shard end and wrap around
        a = one.next_batch(8, accum_steps=2)
        b = [loader.next_batch(8, accum_steps=1)[0] for loader in ranks]
        for (xa, ya), (xb, yb) in zip(a, b):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_stream_order_shard_ends_and_wrap(tiny):
    loader = TrainLoader(tiny, seq_len=4)
    starts = []
    for _ in range(14):
        ((x, y),) = loader.next_batch(8)
        assert x.shape == y.shape == (2, 4) and x.dtype == y.dtype == torch.int64
        flat_x, flat_y = x.flatten(), y.flatten()
        assert torch.equal(flat_y[:-1], flat_x[1:]) and flat_y[-1] == flat_x[-1] + 1  # y = x shifted by one
        starts.append(int(flat_x[0]))
    # spans of 9 tokens: 11 fit in shard 0 (the last token is dropped), 6 in shard 1, 8 in shard 2
    assert starts[:11] == list(range(0, 99, 9))
    assert starts[11:14] == [100, 109, 118]
    for _ in range(6 - 3 + 8):
        loader.next_batch(8)
    assert int(loader.next_batch(8)[0][0][0, 0]) == 0  # wrapped around to shard 0
    loader.next_batch(8)
    loader.reset()
    assert int(loader.next_batch(8)[0][0][0, 0]) == 0


def test_micro_steps_are_rank_interleaved_chunks(tiny):
    # world 2, accumulation 2: the step's span holds chunks [m0r0, m0r1, m1r0, m1r1]
    r1 = TrainLoader(tiny, seq_len=4, rank=1, world_size=2)
    (x0, _), (x1, _) = r1.next_batch(4, accum_steps=2)
    assert int(x0[0, 0]) == 5 and int(x1[0, 0]) == 15


def test_loader_errors(tiny, tmp_path_factory):
    with pytest.raises(PgolfError, match="multiple of seq_len"):
        TrainLoader(tiny, seq_len=4).next_batch(10)
    with pytest.raises(PgolfError, match="no train shard holds a span"):
        TrainLoader(tiny, seq_len=4).next_batch(100)
    with pytest.raises(PgolfError, match="rank"):
        TrainLoader(tiny, seq_len=4, rank=2, world_size=2)
    with pytest.raises(PgolfError, match="no fineweb_train"):
        TrainLoader(tmp_path_factory.mktemp("empty"), seq_len=4)
    loader = TrainLoader(tiny, seq_len=4, vocab_size=64)
    loader.next_batch(8, accum_steps=7)  # ids 0..62: inside the vocabulary
    with pytest.raises(PgolfError, match="fineweb_train_000000.bin: token id 71 >= vocab_size 64"):
        loader.next_batch(8)  # ids 63..71
    broken = tmp_path_factory.mktemp("broken")
    shards.write_shard(broken / "fineweb_train_000000.bin", np.arange(10))
    (broken / "fineweb_train_000001.bin").write_bytes(b"\0" * 100)
    with pytest.raises(PgolfError, match="fineweb_train_000001.bin: truncated"):
        TrainLoader(broken, seq_len=4)  # every header is checked before the first step


def test_calibration_windows(tiny):
    batches = calibration_batches(tiny, n_batches=3, seqs=4, seq_len=8, seed=7)
    assert len(batches) == 3 and all(b.shape == (4, 8) and b.dtype == torch.int64 for b in batches)
    rows = torch.cat(batches)
    assert (rows < OFFSETS[-1]).all()  # train shards only, never the val split
    assert torch.equal(rows[:, 1:] - rows[:, :-1], torch.ones(12, 7, dtype=torch.int64))  # contiguous
    assert rows.flatten().unique().numel() == rows.numel()  # non-overlapping
    again = calibration_batches(tiny, n_batches=3, seqs=4, seq_len=8, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    other = calibration_batches(tiny, n_batches=3, seqs=4, seq_len=8, seed=8)
    assert not all(torch.equal(a, b) for a, b in zip(batches, other))
    r1 = torch.cat(calibration_batches(tiny, n_batches=1, seqs=4, seq_len=8, rank=1, world_size=2))
    assert ((r1 >= OFFSETS[1]) & (r1 < OFFSETS[2])).all()  # rank 1 of 2 uses shards[1::2]
    with pytest.raises(PgolfError, match="calibration needs"):
        calibration_batches(tiny, n_batches=10, seqs=4, seq_len=8)


def _record_windows(tiny, n_windows: int, seq_len: int, rank: int, world: int) -> list[list[int]]:
    """The record's ShuffledSequenceLoader (#1855 train_gpt.py), as its code states the rule: PCG64(rank),
    files[rank::world]; per shard in order a phase below seq_len then a permutation of the windows; per
    window a shard drawn with p = windows left / total, the last start popped, tokens [start, start +
    seq_len) as the input."""
    files = sorted(tiny.glob("fineweb_train_*.bin"))[rank::world]
    rng = np.random.Generator(np.random.PCG64(rank))
    toks = [shards.read_shard(f) for f in files]
    start_inds = []
    for t in toks:
        max_phase = min(seq_len - 1, max(0, t.size - seq_len - 1))
        phase = int(rng.integers(max_phase + 1)) if max_phase > 0 else 0
        start_inds.append((phase + rng.permutation((t.size - 1 - phase) // seq_len) * seq_len).tolist())
    remaining = np.array([len(s) for s in start_inds], dtype=np.float64)
    out = []
    for _ in range(n_windows):
        si = int(rng.choice(len(files), p=remaining / remaining.sum()))
        start = start_inds[si].pop()
        remaining[si] -= 1
        out.append(toks[si][start:start + seq_len].tolist())
    return out


@pytest.mark.parametrize("rank,world", [(0, 1), (1, 2)])
def test_calibration_windows_with_seed_0_are_the_records(tiny, rank, world):
    got = torch.cat(calibration_batches(tiny, n_batches=2, seqs=3, seq_len=8, rank=rank, world_size=world))
    assert got.tolist() == _record_windows(tiny, 6, 8, rank, world)


def test_real_shards(sp1024_data):
    loader = TrainLoader(sp1024_data, seq_len=1024, vocab_size=1024)
    batches = [loader.next_batch(8 * 1024, accum_steps=2) for _ in range(3)]
    x, y = batches[0][0]
    assert x.shape == (8, 1024) and x[0, 0] == 1  # the stream starts at the first BOS
    assert int(torch.cat([b[0][0] for b in batches]).max()) < 1024


# ---------------------------------------------------------------- where a shard's end is checked
def _record_chunks(data_dir, steps: int, micro: int, accum: int, rank: int, world: int,
                   bos: int | None) -> list[list[int]]:
    """The #1530 line's training loader (#1855 train_gpt.py: DocumentPackingLoader `_init_shard`,
    `_advance_shard`, `_prepare_batch`, `next_batch`), transcribed: each next_batch (one per micro-step)
    takes a span of world * (micro + 1) tokens at the cursor; while that span would cross the shard's
    end, the next shard (wrapping) is opened and the cursor set to its first BOS; rank r's tokens are
    the span's r-th slice of micro + 1. `bos=None`: the cursor opens at 0 (fixed rows, pgolf only)."""
    toks = [shards.read_shard(f) for f in sorted(data_dir.glob("fineweb_train_*.bin"))]

    def first(t):
        return 0 if bos is None else int(np.flatnonzero(t == bos)[0])

    si, cursor, per_rank = 0, first(toks[0]), micro + 1
    out = []
    for _ in range(steps * accum):
        while cursor + world * per_rank > toks[si].size:
            si = (si + 1) % len(toks)
            cursor = first(toks[si])
        start = cursor + rank * per_rank
        out.append(toks[si][start:start + per_rank].tolist())
        cursor += world * per_rank
    return out


def _chunks(loader: TrainLoader, steps: int, micro: int, accum: int) -> list[list[int]]:
    """Each micro-step's tokens: the inputs, then the last target."""
    return [x.flatten().tolist() + [int(y.flatten()[-1])]
            for _ in range(steps) for x, y in loader.next_batch(micro, accum)]


def test_shard_end_by_hand(tiny):
    # shards 0..99 | 100..156 | 157..236; 2 ranks x 2 micro-steps of 4 tokens: a micro-step of both ranks
    # is 10 tokens, a step 20. Shard 0 holds 5 steps exactly; shard 1 holds 2 steps (100..139), then
    # step 8: `step` drops 140..156 and starts at 157; `micro` still fits micro-step 0 (140..149),
    # drops 150..156 and starts micro-step 1 at 157.
    def step8(rank, shard_end):
        loader = TrainLoader(tiny, seq_len=4, rank=rank, world_size=2, shard_end=shard_end)
        return [c[0] for c in _chunks(loader, 8, 4, 2)[-2:]]
    assert [step8(r, "step") for r in range(2)] == [[157, 167], [162, 172]]
    assert [step8(r, "micro") for r in range(2)] == [[140, 157], [145, 162]]
    # 1 rank x 4 micro-steps of 8 (spans of 9): step 3 starts at 72; 72 + 36 > 100, so `step` moves to
    # shard 1, while `micro` fits 72, 81, 90 and only then moves (99 + 9 > 100)
    for shard_end, want in (("step", [100, 109, 118, 127]), ("micro", [72, 81, 90, 100])):
        loader = TrainLoader(tiny, seq_len=4, shard_end=shard_end)
        assert [c[0] for c in _chunks(loader, 3, 8, 4)[-4:]] == want, shard_end


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("segmentation", ["rows", "varlen"])
def test_shard_end_micro_is_the_records_loader(tmp_path, segmentation, world):
    # documents start at BOS = 0; each shard's first BOS is a few tokens in, so varlen skips a prefix
    for i, (n, lead) in enumerate(zip(SIZES, [0, 3, 5])):
        t = np.arange(OFFSETS[i], OFFSETS[i] + n) + 1
        t[lead::13] = 0
        shards.write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", t)
    micro, accum, steps = 8, 3, 12  # long enough to cross every shard's end and wrap around
    for rank in range(world):
        loader = TrainLoader(tmp_path, seq_len=4, rank=rank, world_size=world, segmentation=segmentation,
                             bos_id=0, shard_end="micro")
        want = _record_chunks(tmp_path, steps, micro, accum, rank, world, 0 if segmentation == "varlen" else None)
        assert _chunks(loader, steps, micro, accum) == want
        step = TrainLoader(tmp_path, seq_len=4, rank=rank, world_size=world, segmentation=segmentation, bos_id=0)
        assert _chunks(step, steps, micro, accum) != want  # the default differs here: the test can fail
        micro_1 = TrainLoader(tmp_path, seq_len=4, rank=rank, world_size=world, segmentation=segmentation,
                              bos_id=0, shard_end="micro")
        step.reset()
        assert _chunks(step, steps, micro, 1) == _chunks(micro_1, steps, micro, 1)  # accumulation 1: the same


def test_shard_end_default_and_presets():
    from pgolf.config import DataConfig
    from pgolf.presets import get_preset
    assert DataConfig().shard_end == "step"  # pin: the stream of before, unless a preset says otherwise
    for name in ("pr1765", "pr1784", "pr1790", "pr1801", "pr1855"):
        assert get_preset(name).data.shard_end == "micro", name
    for name in ("baseline", "cpu-smoke", "pr430"):  # the root train_gpt.py's TokenStream (#430 kept it)
        assert get_preset(name).data.shard_end == "splice", name


def test_shard_end_unknown_value(tiny):
    with pytest.raises(PgolfError, match="data.shard_end"):
        TrainLoader(tiny, seq_len=4, shard_end="wrap")


def _root_stream(data_dir, steps: int, micro: int, accum: int, rank: int, world: int) -> list[list[int]]:
    """The root train_gpt.py's DistributedTokenLoader over TokenStream, written out: per micro-step one
    take() of world x (micro + 1) tokens that splices a shard's rest with the next shard's start (wrapping),
    rank r's slice r. The first token of each rank's chunk per micro-step."""
    files = sorted(Path(data_dir).glob("fineweb_train_*.bin"))
    f, toks, pos, out = 0, shards.read_shard(files[0]), 0, []
    for _ in range(steps * accum):
        need, parts = world * (micro + 1), []
        while need > 0:
            if pos >= toks.size:
                f = (f + 1) % len(files)
                toks, pos = shards.read_shard(files[f]), 0
                continue
            k = min(need, toks.size - pos)
            parts.append(toks[pos:pos + k])
            pos, need = pos + k, need - k
        chunk = np.concatenate(parts)
        out.append(chunk[rank * (micro + 1):(rank + 1) * (micro + 1)].tolist())
    return out


@pytest.mark.parametrize("world", [1, 2])
def test_shard_end_splice_is_the_root_scripts_token_stream(tiny, world):
    """Shards 0..99 | 100..156 | 157..236 (ids = positions): nothing is dropped, spans cross shard ends and
    wrap after the last, and each micro-step of each rank is the root script's slice."""
    micro, accum, steps = 8, 3, 12  # 12 x 3 x world x 9 tokens: past every shard end, wrapping around
    for rank in range(world):
        loader = TrainLoader(tiny, seq_len=4, rank=rank, world_size=world, shard_end="splice")
        assert _chunks(loader, steps, micro, accum) == _root_stream(tiny, steps, micro, accum, rank, world)
    flat = sum(_chunks(TrainLoader(tiny, seq_len=4, shard_end="splice"), 9, 8, 3), [])
    assert flat == [i % 237 for i in range(9 * 3 * 9)]  # every token once, in order, then the wrap


def test_train_shards_without_tokens_are_one_error(tmp_path):
    shards.write_shard(tmp_path / "fineweb_train_000000.bin", np.zeros(0, np.uint16))
    with pytest.raises(PgolfError, match="hold no tokens"):
        TrainLoader(tmp_path, seq_len=4, shard_end="splice")
