"""`pgolf data fetch` against a fake Hub (no network): every file is checked, and a 0-byte, partial
or corrupt download is deleted and fetched again, a bounded number of times, never used."""
import hashlib
import json

import numpy as np
import pytest

from pgolf.data import fetch, shards
from pgolf.errors import PgolfError

ROOT = "datasets/datasets/fineweb10B_sp1024"


@pytest.fixture
def hub(tmp_path, shared_dir):
    """The published files as {remote path: bytes}, plus what the Hub says about them."""
    files = {}
    rng = np.random.default_rng(0)
    for name, n in [("fineweb_val_000000.bin", 300), ("fineweb_train_000000.bin", 500),
                    ("fineweb_train_000001.bin", 400), ("fineweb_train_000002.bin", 100)]:
        toks = rng.integers(0, 1024, n)
        toks[0] = 1
        files[f"{ROOT}/{name}"] = shards.write_shard(tmp_path / "src" / name, toks).read_bytes()
    files["datasets/tokenizers/fineweb_1024_bpe.model"] = \
        (shared_dir / "tokenizers" / "fineweb_1024_bpe.model").read_bytes()
    files["datasets/manifest.json"] = json.dumps({
        "datasets": [{"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_1024",
                      "stats": {"files_val": 1, "files_train": 3, "docs_val": 7, "docs_train": 9}}],
        "tokenizers": [{"name": "sp_bpe_1024", "model_path": "tokenizers/fineweb_1024_bpe.model"}],
    }).encode()
    return files


class FakeHub:
    """Replaces fetch._download; `script[path]` lists what successive calls deliver ("good", "empty",
    "partial", "corrupt", "error"); afterwards every call is good."""

    def __init__(self, files, out, script=None):
        self.files, self.out, self.script = files, out, dict(script or {})
        self.calls = []

    def __call__(self, repo_id, remote, staging):
        assert repo_id == "willdepueoai/parameter-golf"
        self.calls.append(remote)
        what = self.script.get(remote, []).pop(0) if self.script.get(remote) else "good"
        # a bad copy must never have reached the output folder
        assert not (self.out / remote.rsplit("/", 1)[-1]).exists() or remote.endswith(".model")
        data = self.files[remote]
        if what == "error":
            raise ConnectionError("connection reset")
        data = {"good": data, "empty": b"", "partial": data[: len(data) // 2],
                "corrupt": data[:-1] + bytes([data[-1] ^ 1])}[what]
        dest = staging / remote
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        return dest


def _install(monkeypatch, hub, out, script=None, metadata=True):
    fake = FakeHub(hub, out, script)
    monkeypatch.setattr(fetch, "_download", fake)
    info = {p: (len(b), hashlib.sha256(b).hexdigest()) for p, b in hub.items()} if metadata else {}
    monkeypatch.setattr(fetch, "_remote_info", lambda repo, paths: {p: info[p] for p in paths if p in info})
    return fake


def test_bad_downloads_are_fetched_again(monkeypatch, cli, hub, tmp_path):
    out = tmp_path / "out"
    fake = _install(monkeypatch, hub, out, {f"{ROOT}/fineweb_val_000000.bin": ["empty", "good"],
                                            f"{ROOT}/fineweb_train_000000.bin": ["error", "partial", "good"],
                                            f"{ROOT}/fineweb_train_000001.bin": ["corrupt"]})
    rc, res, err = cli("data", "fetch", "--variant", "sp1024", "--train-shards", "2", "--out", out)
    assert rc == 0, err
    assert fake.calls.count(f"{ROOT}/fineweb_val_000000.bin") == 2
    assert fake.calls.count(f"{ROOT}/fineweb_train_000000.bin") == 3
    assert fake.calls.count(f"{ROOT}/fineweb_train_000001.bin") == 2  # same size, wrong sha256
    assert f"{ROOT}/fineweb_train_000002.bin" not in fake.calls  # only the requested prefix
    assert "empty (0-byte)" in err and "partial download" in err and "sha256" in err
    for name in ("fineweb_val_000000.bin", "fineweb_train_000000.bin", "fineweb_train_000001.bin"):
        assert (out / name).read_bytes() == hub[f"{ROOT}/{name}"]
    assert (out / "tokenizer.model").read_bytes() == hub["datasets/tokenizers/fineweb_1024_bpe.model"]
    assert res["out"] == str(out) and res["files"] == 6 and res["downloaded"] == 5
    assert res["bytes"] == sum(f.stat().st_size for f in out.iterdir())
    assert sorted(p.name for p in out.iterdir()) == sorted(  # no staging folder or temporaries left
        ["hub_manifest.json", "manifest.json", "tokenizer.model", "fineweb_val_000000.bin",
         "fineweb_train_000000.bin", "fineweb_train_000001.bin"])
    m = json.loads((out / "manifest.json").read_text())
    assert m["vocab_size"] == 1024 and m["tokens"] == {"val": 300, "train": 900}
    assert m["shards"]["fineweb_val_000000.bin"]["sha256"] == \
        hashlib.sha256(hub[f"{ROOT}/fineweb_val_000000.bin"]).hexdigest()
    # the fetched folder is a data folder like a built one
    rc, audit, err = cli("data", "audit", "--data", out)
    assert rc == 0 and audit["val_tokens"] == 300, err

    # a second run verifies what is there and downloads only what is broken
    (out / "fineweb_train_000001.bin").write_bytes(b"")
    fake.calls.clear()
    rc, res, err = cli("data", "fetch", "--train-shards", "2", "--out", out)
    assert rc == 0 and fake.calls == [f"{ROOT}/fineweb_train_000001.bin"] and res["downloaded"] == 1, err


def test_partial_shard_caught_without_hub_metadata(monkeypatch, hub, tmp_path):
    out = tmp_path / "out"
    fake = _install(monkeypatch, hub, out, {f"{ROOT}/fineweb_train_000000.bin": ["partial"]}, metadata=False)
    res = fetch.fetch("sp1024", 1, out=out)
    assert fake.calls.count(f"{ROOT}/fineweb_train_000000.bin") == 2 and res["files"] == 5
    assert shards.read_header(out / "fineweb_train_000000.bin") == 500


def test_retries_are_bounded(monkeypatch, cli, hub, tmp_path):
    out = tmp_path / "out"
    fake = _install(monkeypatch, hub, out, {f"{ROOT}/fineweb_val_000000.bin": ["empty"] * 10})
    rc, _, err = cli("data", "fetch", "--train-shards", "1", "--out", out)
    assert rc == 2 and fake.calls.count(f"{ROOT}/fineweb_val_000000.bin") == fetch.TRIES
    lines = err.strip().splitlines()
    assert lines[-1].startswith("pgolf: error: willdepueoai/parameter-golf/") and "after 3 tries" in lines[-1]
    assert not (out / "fineweb_val_000000.bin").exists() and not (out / "manifest.json").exists()


def test_more_shards_than_published(monkeypatch, hub, tmp_path):
    _install(monkeypatch, hub, tmp_path)
    with pytest.raises(PgolfError, match="publishes only 3"):
        fetch.fetch("sp1024", 4, out=tmp_path)


CROOT = "datasets/datasets/fineweb10B_sp8192_lossless_caps_caseops_v1_reserved"


def _caseops_hub(tmp_path, shared_dir, sidecar_tokens=300):
    rng = np.random.default_rng(1)
    files = {}
    toks = rng.integers(8, 8192, 300)
    toks[0] = 1
    side = rng.integers(1, 6, sidecar_tokens)
    side[0] = 0
    for name, arr in [("fineweb_val_000000.bin", toks), ("fineweb_val_bytes_000000.bin", side),
                      ("fineweb_train_000000.bin", rng.integers(8, 8192, 500))]:
        files[f"{CROOT}/{name}"] = shards.write_shard(tmp_path / "src" / name, arr).read_bytes()
    tok = "tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
    files[f"datasets/{tok}"] = (shared_dir / "tokenizers" / "fineweb_8192_bpe.model").read_bytes()  # 8192 pieces
    files["datasets/manifest.json"] = json.dumps({
        "datasets": [{"name": "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved", "tokenizer_name": "caseops",
                      "stats": {"files_val": 1, "files_train": 1}}],
        "tokenizers": [{"name": "caseops", "model_path": tok}]}).encode()
    return files


def _fake(monkeypatch, files, calls):
    def download(repo_id, remote, staging):
        assert repo_id == "romeerp/parameter-golf-caseops-v1"
        calls.append(remote)
        dest = staging / remote
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(files[remote])
        return dest
    monkeypatch.setattr(fetch, "_download", download)
    monkeypatch.setattr(fetch, "_remote_info", lambda repo, paths: {})


def test_caseops_variant_fetches_the_byte_sidecars(monkeypatch, cli, tmp_path, shared_dir):
    from pgolf.eval.bpb import load_val

    calls = []
    _fake(monkeypatch, _caseops_hub(tmp_path, shared_dir), calls)
    out = tmp_path / "out"
    rc, res, err = cli("data", "fetch", "--variant", "sp8192-caseops", "--train-shards", "1", "--out", out)
    assert rc == 0, err
    assert f"{CROOT}/fineweb_val_bytes_000000.bin" in calls and res["files"] == 6
    m = json.loads((out / "manifest.json").read_text())
    assert m["text_transform"] == "lossless_caps_caseops_v1" and m["tokens"] == {"val": 300, "train": 500}
    assert "fineweb_val_bytes_000000.bin" in m["shards"]
    val = load_val(out, None, 8192, 64)
    assert val.byte_source == "sidecar"
    assert val.total_bytes == int(shards.read_shard(out / "fineweb_val_bytes_000000.bin")[1:257].sum())


def test_caseops_sidecar_of_the_wrong_length_is_refused(monkeypatch, cli, tmp_path, shared_dir):
    _fake(monkeypatch, _caseops_hub(tmp_path, shared_dir, sidecar_tokens=299), [])
    rc, res, err = cli("data", "fetch", "--variant", "sp8192-caseops", "--train-shards", "1", "--out", tmp_path / "o")
    assert rc == 2 and err.count("pgolf: error:") == 1 and "299 entries for the 300 tokens" in err
    assert not (tmp_path / "o" / "manifest.json").exists()
