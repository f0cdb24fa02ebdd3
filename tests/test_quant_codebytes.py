"""code_bytes: the wrapper decompresses to the minified bundle, which compiles and runs an artifact."""
import subprocess
import sys

from pgolf.quant import codebytes as cb


def test_wrapper_round_trips_and_compiles():
    info = cb.code_bytes()
    files, missing = cb.module_closure()
    assert not missing
    program = cb.bundle(files)
    assert cb.unwrap(info["wrapper"]) == program  # the stub holds exactly the minified bundle
    assert info["code_bytes"] == len(info["wrapper"].encode()) < info["code_bytes_minified"] < info["code_bytes_raw"]
    compile(program, "<bundle>", "exec")
    ns = {}
    exec(program.split("import sys", 1)[0], ns)  # just the S / P literals
    for name, src in ns["S"].items():
        compile(src, name, "exec")  # every minified module compiles on its own
        assert "assert " not in src or "assert" in name  # asserts removed
    for needed in ("pgolf/model/gpt.py", "pgolf/eval/bpb.py", "pgolf/artifact/qstate.py", "pgolf/artifact/lowrank.py"):
        assert needed in info["code_files"]
    assert "pgolf/train.py" not in info["code_files"] and "pgolf/quant/pipeline.py" not in info["code_files"]


RUNNER = r'''
import sys
exec(open(sys.argv[1]).read())  # the wrapper, as a submission would run it
import torch
from pgolf.artifact.qstate import load_artifact
from pgolf.model import build_model
from pgolf.config import Config
cfg = Config.from_dict(__import__("json").loads(open(sys.argv[3]).read()))
fresh = build_model(cfg)
fresh.load_state_dict(load_artifact(open(sys.argv[2], "rb").read()))
fresh(torch.zeros(1, 8, dtype=torch.long))
outside = [n for n, m in sys.modules.items() if n.startswith("pgolf") and getattr(m, "__file__", None)]
print("OK" if not outside else f"not from the bundle: {outside}")
'''


def test_wrapper_alone_loads_and_runs_an_artifact(tmp_path):
    from pgolf.artifact.qstate import serialize
    from pgolf.config import Config
    from pgolf.model import build_model
    from pgolf.quant.quantize import quantize_state_dict

    cfg = Config()  # the artifact is made here; the bundled code alone loads and runs it
    cfg.model.num_layers, cfg.model.model_dim, cfg.model.num_heads, cfg.model.num_kv_heads = 2, 64, 2, 1
    cfg.model.vocab_size = 512
    cfg.quant.passthrough_numel = 1024
    qstate, _ = quantize_state_dict(build_model(cfg).state_dict(), cfg.quant)
    (tmp_path / "model.ptz").write_bytes(serialize(qstate, cfg.quant)[0])
    (tmp_path / "config.json").write_text(cfg.to_json())
    (tmp_path / "stub.py").write_text(cb.code_bytes()["wrapper"])
    (tmp_path / "run.py").write_text(RUNNER)
    r = subprocess.run([sys.executable, "run.py", "stub.py", "model.ptz", "config.json"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith("OK"), r.stdout
