"""pgolf.script.specialise / fold: the exported script specialised to the configuration it bakes in.

- folding: Python's own results, written back; nothing folded that could raise or has an effect;
- specialisation on small modules (hand-worked expected code, pr1855's values): config reads through
  parameters, locals and `self` attributes become literals, dead branches and hasattr go; the
  environment's fields, a field switched through an object of unknown type, and everything once a
  config is built or an attribute is set by a computed name, stay reads;
- the real scripts: a switch left off leaves no trace (pr1855, cpu-smoke), a switch left on is there,
  and the specialised and unspecialised flattenings build the same model and give the same logits.
"""
from __future__ import annotations

import ast
import sys
import textwrap
import types

import pytest
import torch

from pgolf.script import bundle, fold, specialise
from pgolf.export.record import ENV
from pgolf.script.scopes import external_attrs
from pgolf.presets import get_preset

SECTIONS = ("Config", "DataConfig", "ModelConfig", "OptimConfig", "TrainConfig", "QuantConfig", "EvalConfig",
            "TTTConfig")
EXTERN = {"torch": "ext:torch", "nn": "ext:torch.nn", "enum": "ext:enum"}


def folded(src: str) -> str:
    body, _ = fold.fold_block(ast.parse(textwrap.dedent(src)).body)
    return ast.unparse(ast.Module(body=body, type_ignores=[]))


def code(src: str) -> str:
    return ast.unparse(ast.parse(textwrap.dedent(src)))


@pytest.mark.parametrize("src, expected", [
    ("x = 'sparse' in ('attn_out', 'sparse') and (not 0 < 12 <= 512)", "x = False"),
    ("x = -(2 ** 2) + 7 // 2", "x = -1"),
    ("x = (-1) ** 2", "x = 1"),  # the sign stays inside the power
    ("x = f'{8}: {name!r} {0.5:.2f}'", "x = f'8: {name!r} 0.50'"),
    ("if 'gated' == 'gated':\n    a()\nelse:\n    b()", "a()"),
    ("y = p if 0 else q", "y = q"),
    ("if x and False:\n    a()", ""),  # x is pure: the test is False
    ("if f() and False:\n    a()", "if f() and False:\n    a()"),  # f() must still run
    ("y = f() and False", "y = f() and False"),  # a value, not a test: f()'s result when it is falsy
    ("y = 1 / 0", "y = 1 / 0"),  # raises at run time, as it should
    ("y = 'ab' * 3", "y = 'ab' * 3"),  # only numbers
    ("for k in ():\n    a()\nelse:\n    b()", "b()"),
    ("def g(x):\n    return x\n    dead()", "def g(x):\n    return x"),
    ("while 0:\n    a()", ""),
    ("if (1, 2) is None:\n    a()", ""),
    ("y = (1, 2) is (1, 2)", "y = (1, 2) is (1, 2)"),  # identity of other literals: CPython's business
    ("step = s if 0 < 0 < n else n", "step = n"),  # a false link ends the chain (n is never evaluated)
    ("y = 'lora' + '+3phase'", "y = 'lora+3phase'"),
])
def test_folding_is_python_at_build_time(src, expected):
    assert folded(src) == code(expected)


def test_dead_locals_go_only_when_nothing_reads_them():
    tree = ast.parse(textwrap.dedent('''
        def g(a):
            d, h = (512, 8)
            unused = a.x
            kept = f()
            used = 3
            def inner():
                return used
            return inner
    '''))
    assert fold.drop_dead_locals(tree.body[0])
    assert ast.unparse(tree) == code('''
        def g(a):
            kept = f()
            used = 3
            def inner():
                return used
            return inner
    ''')


# ----------------------------------------------------------------------------------- specialisation
def placeholders(src: str) -> list[ast.stmt]:
    """A module in the bundle's placeholder form: its own top-level names as `m:Name`, the config
    classes as `pgolf.config:Name`, torch as `ext:torch`."""
    tree = ast.parse(textwrap.dedent(src))
    own = {s.name for s in tree.body if hasattr(s, "name")} | {
        t.id for s in tree.body if isinstance(s, ast.Assign) for t in s.targets if isinstance(t, ast.Name)}
    for n in ast.walk(tree):
        if isinstance(n, ast.Name):
            n.id = (f"pgolf.config:{n.id}" if n.id in SECTIONS else f"m:{n.id}" if n.id in own
                    else EXTERN.get(n.id, n.id))
    for s in tree.body:
        if hasattr(s, "name"):
            s.name = f"m:{s.name}"
    return tree.body


def plain(stmts: list[ast.stmt]) -> str:
    return ast.unparse(ast.Module(body=stmts, type_ignores=[])).replace("pgolf.config:", "").replace(
        "m:", "").replace("ext:torch.nn", "nn").replace("ext:torch", "torch").replace("ext:enum", "enum")


def special(src: str, preset: str = "pr1855") -> tuple[str, list[str]]:
    stmts = placeholders(src)
    why = specialise.specialise(stmts, bundle.baked_config(get_preset(preset)), {v[:2] for v in ENV.values()},
                                lambda b: external_attrs(b, instance=True))
    return plain(stmts), why


ATTENTION = '''
class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = cfg.attn_gate
        if self.gate == "dense":
            self.w = nn.Parameter(torch.zeros(cfg.num_heads, cfg.model_dim))
        elif self.gate == "sparse":
            self.w = nn.Parameter(torch.zeros(cfg.num_heads, cfg.attn_gate_width))
        if cfg.bigram_buckets:
            self.bigram = Bigram(cfg)

    def forward(self, x):
        if self.cfg.qk_norm and x is not None:
            x = norm(x)
        if hasattr(self, "bigram"):
            x = x + self.bigram(x)
        return x * self.cfg.attn_gate_scale if self.gate != "none" else x


class Bigram(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n = cfg.bigram_buckets


def steps(cfg: Config):
    t, q = cfg.train, cfg.quant
    m = cfg.model
    return t.iterations, t.warmdown_frac, q.compressor, m.num_layers, int(m.mlp_mult * m.model_dim)
'''


def test_config_reads_become_literals_and_dead_switches_go():
    out, why = special(ATTENTION)
    assert why == []
    assert out == code('''
class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = 'sparse'
        self.w = nn.Parameter(torch.zeros(8, 12))

    def forward(self, x):
        if x is not None:
            x = norm(x)
        return x * 0.5


class Bigram(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n = 0


def steps(cfg: Config):
    t, q = (cfg.train, cfg.quant)
    return (t.iterations, 0.85, 'pergroup', 11, 2048)
''')  # ITERATIONS is an environment override: it stays a read


def test_parameters_take_what_every_call_passes():
    """`build(cfg)` is only ever called with the Config (and no device): its parameters are those,
    and it returns a literal then, as `label` does, so their calls are that literal; `escaped` is also
    put in a table, so nothing is known of its calls."""
    out, why = special('''
def build(cfg, device=None):
    mcfg = cfg.model if isinstance(cfg, Config) else cfg
    return mcfg.num_layers, device or "cpu", getattr(cfg.quant, "lqer_rank")


def label(cfg: Config):
    return "lora"


def main(cfg: Config):
    a = build(cfg)
    b = build(cfg, None)
    if label(cfg) == "lora":
        return a, b


def escaped(cfg, n):
    return cfg.train.warmdown_frac, n


TABLE = {"x": escaped}
''')
    assert why == []
    assert out == code('''
def build(cfg, device=None):
    return (11, 'cpu', 4)


def label(cfg: Config):
    return 'lora'


def main(cfg: Config):
    return ((11, 'cpu', 4), (11, 'cpu', 4))


def escaped(cfg, n):
    return (cfg.train.warmdown_frac, n)


TABLE = {'x': escaped}
''')


def test_constructor_parameters_take_what_every_construction_passes():
    """`Rope(...)` and `Log(...)` are only ever constructed by name: their `__init__` parameters are
    what every construction passes (a default included), so the branches on them fold. `type(x)(p,
    2.0)` may construct any class its two arguments fit: Rope (three parameters) is not one, Log is,
    so Log's `every` is unknown; `Kept` is also passed on (its constructions are not all seen), and
    `Meta`'s metaclass is not `type`, so their parameters stay as they are."""
    out, why = special('''
class Rope(nn.Module):
    def __init__(self, dims, base, ntk):
        super().__init__()
        if ntk != 1.0:
            base = base * ntk
        self.dims = dims or 64
        self.base = base


class Log:
    def __init__(self, path, every=10.0, baseline=None):
        self.every = every
        if baseline is not None:
            self.baseline = baseline


class Kept:
    def __init__(self, n):
        self.n = n or 1


class Meta(enum.Enum):
    def __init__(self, n):
        self.n = n or 1


def main(cfg: Config, x, p):
    r = Rope(16, 10000.0, 1.0)
    log = Log(p)
    again = type(x)(p, 2.0)
    return r, log, again, Kept(3), Meta(3), [Kept]
''')
    assert why == []
    assert out == code('''
class Rope(nn.Module):
    def __init__(self, dims, base, ntk):
        super().__init__()
        self.dims = 16
        self.base = 10000.0


class Log:
    def __init__(self, path, every=10.0, baseline=None):
        self.every = every


class Kept:
    def __init__(self, n):
        self.n = n or 1


class Meta(enum.Enum):
    def __init__(self, n):
        self.n = n or 1


def main(cfg: Config, x, p):
    r = Rope(16, 10000.0, 1.0)
    log = Log(p)
    again = type(x)(p, 2.0)
    return (r, log, again, Kept(3), Meta(3), [Kept])
''')


def test_a_parameter_every_call_fills_alike_and_nothing_reads_goes_with_its_arguments():
    """`plan`'s `seq_len` is 2048 in every call and folds away, so it leaves the signature and the
    calls, as `tol` does (its default in every call); `stride` is still read; `device` is not known in
    one call (`pick()`) and stays; `kept` is passed on as a value, so nothing is known of its calls;
    `flags` is always given the ttt section and never reads it: the local `t` only filled that
    argument, so it goes too."""
    out, why = special('''
def plan(n, seq_len, stride=0, *, device=None, tol=1e-05):
    return n // seq_len, stride


def kept(n, seq_len):
    return n


def flags(tc, n):
    return n + 1


def main(cfg: Config, n):
    t = cfg.ttt
    return plan(n, cfg.train.train_seq_len, 1, device=pick()), plan(n, 2048), kept(n, 2048), [kept], flags(t, n)
''')
    assert why == []
    assert out == code('''
def plan(n, stride=0, *, device=None):
    return (n // 2048, stride)


def kept(n, seq_len):
    return n


def flags(n):
    return n + 1


def main(cfg: Config, n):
    return (plan(n, 1, device=pick()), plan(n), kept(n, 2048), [kept], flags(n))
''')


def test_a_field_switched_at_run_time_stays_a_read():
    src = '''
def masking(model, on):
    c = model.cfg
    c.doc_mask = on


def uses(m: ModelConfig):
    return m.doc_mask, m.tie_embeddings, m.skip_gates


def replaced(m: ModelConfig):
    return dataclasses.replace(m, skip_gates=False)
'''
    out, why = special(src.replace("dataclasses.replace", "ext_replace"))
    assert why == [] and "return (m.doc_mask, True, True)" in out
    stmts = placeholders(src)
    for n in ast.walk(stmts[2]):  # the real dataclasses.replace
        if isinstance(n, ast.Attribute) and n.attr == "replace":
            stmts[2].body[0].value.func = ast.Name(id="ext:dataclasses.replace", ctx=ast.Load())
    specialise.specialise(stmts, bundle.baked_config(get_preset("pr1855")), {v[:2] for v in ENV.values()},
                          lambda b: external_attrs(b, instance=True))
    assert "return (m.doc_mask, True, m.skip_gates)" in plain(stmts)


@pytest.mark.parametrize("extra, reason", [
    ("def make():\n    return ModelConfig(num_layers=2)\n", "ModelConfig is constructed"),
    ("def poke(obj, name):\n    setattr(obj, name, 1)\n", "setattr with a computed attribute name"),
    ("def load(d):\n    return Config.from_dict(d)\n", "a configuration is made with from_dict"),
])
def test_another_config_or_a_computed_store_stops_the_specialisation(extra, reason):
    out, why = special(ATTENTION + extra)
    assert why == [reason]
    assert "self.cfg.attn_gate_scale" in out and "cfg.attn_gate" in out  # nothing substituted


def test_hasattr_stays_when_something_may_set_the_attribute():
    out, why = special(ATTENTION.replace("super().__init__()\n        self.cfg = cfg",
                                         "super().__init__()\n        self.register_buffer('bigram', None)\n"
                                         "        self.cfg = cfg"))
    assert why == [] and "hasattr(self, 'bigram')" in out


def test_a_section_is_never_none():
    """`q is None` where `q` is a section every call passes (the record reads back its own artifact
    with its quantisation) is False, and `load` then returns a literal its call becomes; a parameter
    some call leaves at None stays a test."""
    out, why = special('''
def load(blob, q=None):
    if q is None and blob[:1] == b"x":
        return "int8"
    if (blob[:4] == b"PGRP") if q is None else q.compressor == "pergroup":
        return "pergroup"
    return "torch"


def other(blob, q=None):
    return q is not None


def main(cfg: Config, blob):
    return load(blob, cfg.quant), other(blob), other(blob, cfg.quant)
''')
    assert why == []
    assert out == code('''
def load(blob, q=None):
    return 'pergroup'


def other(blob, q=None):
    return q is not None


def main(cfg: Config, blob):
    return ('pergroup', other(blob), other(blob, cfg.quant))
''')


# ----------------------------------------------------------------------------------- the real scripts
def classes_and_attrs(text: str) -> tuple[set[str], set[str]]:
    """The classes a script defines and the attributes it sets (`x.a = ...`)."""
    tree = ast.parse(text)
    return ({n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)},
            {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store)})


def test_switches_left_off_leave_no_trace():
    pr1855 = bundle.build(get_preset("pr1855"))
    assert pr1855.unspecialised == []
    classes, attrs = classes_and_attrs(pr1855.text)
    # off in pr1855: BigramHash, value embeddings, dense / attn_out / head-scalar gates, channel smear,
    # recurrent carries, value residual, untied head
    assert not {"BigramHash", "ValueEmbedding"} & classes
    assert not {"bigram", "ve", "attn_gate_proj", "recur_alpha", "lambda_v", "lm_head"} & attrs
    for gone in ("'dense'", "'head_scalar'", "'channel'", "'frozen'", "carry_beta[", "def from_dict", "DOMAINS"):
        assert gone not in pr1855.text, gone  # (config validation of the baked values goes too)
    # constructed alike every time: the TTT log's no-TTT baseline and RoPE's NTK scaling; a parameter
    # that every call fills alike and nothing reads: warm-up's configuration and switches
    for gone in ("_on_record", "ntk_factor **", "def warmup(model: GPT, cfg"):
        assert gone not in pr1855.text, gone
    assert "def warmup(model: GPT)" in pr1855.text
    # on: the sparse gate, the gated smear, skip gates, parallel lanes, phased TTT, GPTQ
    assert {"attn_gate_w", "smear_lambda", "skip_gates", "parallel_post_lambdas"} <= attrs
    assert {"PhasedTTT", "Muon"} <= classes and "def calibrate" in pr1855.text

    smoke = bundle.build(get_preset("cpu-smoke"))
    classes, attrs = classes_and_attrs(smoke.text)
    assert smoke.unspecialised == [] and not {"attn_gate_w", "smear_lambda", "skip_gates"} & attrs
    assert "def calibrate" not in smoke.text  # int8 quantisation: no GPTQ calibration
    assert {"resid_mix", "skip_weights"} <= attrs  # the baseline's residual mix and U-Net skips


TINY_1855 = ["model.num_layers=5", "model.model_dim=64", "model.num_heads=2", "model.num_kv_heads=1",
             "model.vocab_size=256", "model.parallel_start_layer=3", "model.loop_start=1", "model.loop_end=2",
             "model.xsa_last_n=5", "model.rope_dims=8", "model.attn_gate_width=12"]


def load_script(text: str, name: str, monkeypatch) -> types.ModuleType:
    mod = types.ModuleType(name)
    monkeypatch.setitem(sys.modules, name, mod)
    exec(compile(text, f"<{name}>", "exec"), mod.__dict__)
    return mod


@pytest.mark.parametrize("preset, overrides", [("cpu-smoke", []), ("pr1855", TINY_1855)])
def test_specialised_script_computes_what_the_unspecialised_one_does(preset, overrides, monkeypatch):
    """Folding never changes a value: both flattenings build the same model from the same seed and
    give the same logits and loss on the same tokens, looping on and off."""
    cfg = get_preset(preset, overrides)
    outs = []
    for specialised in (True, False):
        text = bundle.build(cfg, specialised=specialised).text
        mod = load_script(text, f"exported_{specialised}", monkeypatch)
        torch.manual_seed(0)
        model = mod.build_model(mod.CONFIG)
        sd_init = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():  # every weight non-zero (the output projections start at zero)
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        idx = torch.randint(0, cfg.model.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
        idx[:, 20] = cfg.data.bos_id  # a document boundary inside each row
        with torch.no_grad():
            res = [model(idx), model(idx, idx.roll(-1, 1))]
            model.looping = True
            res += [model(idx), model.forward_at(idx, torch.tensor([[3, 40], [0, 47]]))]
        outs.append((sd_init, res))
    (sd_a, res_a), (sd_b, res_b) = outs
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert all(torch.equal(a, b) for a, b in zip(res_a, res_b))
    assert not torch.equal(res_a[0], res_a[2]) or preset == "cpu-smoke"  # (pr1855 loops: another forward)
    assert torch.isfinite(res_a[1]) and res_a[1] > 0


def test_membership_in_a_tuple_constant_that_unpacks_another_folds():
    """`BACKENDS = ("auto", *KERNELS)` is a constant when KERNELS is one: a membership test of a
    literal in it folds, and its dead check goes; a tuple unpacking a name bound twice (or anything
    else) stays a run-time read."""
    out, why = special('''
KERNELS = ("flex", "sdpa")
BACKENDS = ("auto", *KERNELS)
TWICE = ("a",)
TWICE = ("b",)
MIXED = ("auto", *TWICE)

def pick(name):
    if "auto" not in BACKENDS:
        raise ValueError(BACKENDS)
    if "flex" in MIXED:
        return 1
    return "sdpa" in BACKENDS
''')
    assert why == []
    assert "raise" not in out and "'flex' in MIXED" in out and "return True" in out
