"""Config domains (pgolf/config_domains.py): every numeric field has one, every preset lies inside them,
and a value outside names the field the user set, before anything divides by it or builds a tensor."""
from __future__ import annotations

import dataclasses
import json
import math
import typing

import pytest

from pgolf import config_domains
from pgolf.config import Config
from pgolf.config_domains import DOMAINS, Range
from pgolf.errors import PgolfError
from pgolf.presets import PRESETS, get_preset


def numeric_fields() -> dict[str, type]:
    """Every int / float / list-of-numbers field of Config as "section.key" -> its element type."""
    out = {}
    for section, cls in typing.get_type_hints(Config).items():
        if not dataclasses.is_dataclass(cls):
            continue  # Config.preset
        for name, tp in typing.get_type_hints(cls).items():
            if typing.get_origin(tp) is list:
                (tp,) = typing.get_args(tp)
            if tp in (int, float):
                out[f"{section}.{name}"] = tp
    return out


def missing_and_stale(domains: dict[str, Range]) -> tuple[set[str], set[str]]:
    fields = set(numeric_fields())
    return fields - set(domains), set(domains) - fields


def test_every_numeric_field_has_a_domain():
    missing, stale = missing_and_stale(DOMAINS)
    assert not missing, f"numeric config fields without a domain in pgolf/config_domains.py: {sorted(missing)}"
    assert not stale, f"domains of fields that do not exist: {sorted(stale)}"
    # the check above fails when an entry is dropped (as it would for a field added without one)
    assert missing_and_stale({k: v for k, v in DOMAINS.items() if k != "model.num_heads"})[0] == {"model.num_heads"}
    assert len(numeric_fields()) > 100


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_lies_inside_the_domains(name):
    config_domains.check(PRESETS[name]())  # the function's own values
    get_preset(name)  # and through Config.from_dict, as every command resolves it


def _outside(domain: Range, tp: type) -> list:
    """Values just outside `domain` for a field of type `tp`."""
    step = 1 if tp is int else 0.5
    out = []
    if domain.lo is not None:
        out.append(tp(domain.lo) if domain.lo_open else tp(domain.lo - step))
    if domain.hi is not None:
        out.append(tp(domain.hi) if domain.hi_open else tp(domain.hi + step))
    if tp is float:
        out += [math.nan, math.inf]
    return out


CASES = [(key, v) for key, tp in numeric_fields().items() for v in _outside(DOMAINS[key], tp)]


@pytest.mark.parametrize("preset", ["baseline", "pr430", "pr1855"])
def test_a_value_outside_its_domain_names_the_field(preset):
    assert len(CASES) > 150
    list_fields = {"model.ve_layers"}
    for key, bad in CASES:
        value = [bad] if key in list_fields else bad
        with pytest.raises(PgolfError) as e:
            get_preset(preset, [f"{key}={json.dumps(value)}"])
        assert str(e.value).startswith(f"{key}: "), (key, bad, str(e.value))


def test_messages_say_what_was_expected():
    cases = {"model.num_heads=0": "model.num_heads: 0: expected >= 1",
             "model.num_layers=-2": "model.num_layers: -2: expected >= 1",
             "optim.beta2=1.0": "optim.beta2: 1.0: expected within [0, 1)",
             "optim.matrix_lr=NaN": "optim.matrix_lr: nan: expected a finite number >= 0",
             "quant.byte_shuffle=256": "quant.byte_shuffle: 256: expected within [0, 255]",
             "ttt.sgd_temperature=0": "ttt.sgd_temperature: 0.0: expected within (0, 2]",
             "ttt.hedge_neural_prior=Infinity": "ttt.hedge_neural_prior: inf: expected a finite number",
             "model.ve_layers=[9,-1]": "model.ve_layers: [9, -1]: expected >= 0"}
    for override, message in cases.items():
        with pytest.raises(PgolfError) as e:
            get_preset("pr430", [override])
        assert str(e.value) == message


def test_a_loaded_config_json_names_its_file(tmp_path):
    d = get_preset("cpu-smoke").to_dict()
    d["model"]["mlp_mult"] = 0.0
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    with pytest.raises(PgolfError, match=rf"^{tmp_path}/config.json: model.mlp_mult: 0.0: expected > 0$"):
        Config.load(path)


@pytest.mark.parametrize("override,key", [("model.num_heads=0", "model.num_heads"),
                                          ("model.num_layers=0", "model.num_layers"),
                                          ("model.num_layers=-2", "model.num_layers"),
                                          ("model.model_dim=0", "model.model_dim")])
def test_params_refuses_with_one_line(override, key, cli):
    """Today `num_heads=0` is a ZeroDivisionError traceback and `num_layers=-2` blames parallel_start_layer."""
    rc, res, err = cli("params", "--preset", "pr1855", "--set", override)
    assert rc == 2 and res is None
    assert err.strip() == f"pgolf: error: {key}: {override.split('=')[1]}: expected >= 1"


def test_train_refuses_zero_layers_before_writing_anything(tmp_path, cli):
    """Today `num_layers=0` trains an embedding-only model and records it as finished."""
    for argv in (["--set", "model.num_layers=0"], ["--seed", "-1"], ["--max-seconds", "nan"]):
        rc, res, err = cli("train", "--preset", "cpu-smoke", "--data", tmp_path / "no-data", "--out",
                           tmp_path / "runs" / "r", *argv)
        assert rc == 2 and res is None and err.count("pgolf: error:") == 1
        assert ("model.num_layers" if "num_layers" in argv[1] else "train.") in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("sets, line", [
    (["quant.level=10"], "quant.level: 10: zlib takes -1 (its strongest) or 0..9"),  # cpu-smoke writes zlib
    (["quant.compressor=\"brotli\"", "quant.level=12"], "quant.level: 12: brotli takes -1 (its strongest) or 0..11"),
    (["quant.compressor=\"pergroup\"", "quant.group_codec=\"zpaq\"", "quant.level=12"],
     "quant.level: 12: brotli takes -1 (its strongest) or 0..11"),  # pergroup's rest stream is brotli
    (["quant.compressor=\"best\"", "quant.level=10"], "quant.level: 10: lzma takes -1 (its strongest) or 0..9"),
], ids=["zlib", "brotli", "pergroup", "best"])
def test_a_level_the_codec_rejects_is_named_before_any_work(sets, line, cli):
    """quant.level's bound depends on the codecs the config writes (zlib.error was the traceback)."""
    rc, res, err = cli("params", "--preset", "cpu-smoke", *[a for s in sets for a in ("--set", s)])
    assert rc == 2 and res is None and err.strip() == f"pgolf: error: {line}"


def test_levels_each_codec_takes_pass_and_compress():
    """Each codec's strongest level (and -1) is accepted and compresses; zpaq clamps any level."""
    from pgolf.artifact import codecs

    assert set(config_domains.MAX_LEVEL) == set(codecs.BEST_CODECS) == set(codecs.CODECS) - {"zpaq"}
    data = bytes(range(256)) * 64
    for codec, top in config_domains.MAX_LEVEL.items():
        for level in (-1, 0, top):
            cfg = get_preset("cpu-smoke")
            cfg.quant.compressor, cfg.quant.level = codec, level
            assert config_domains.level_violation(cfg.quant) is None
            assert codecs.decompress(codecs.compress(data, codec, level)) == data
    cfg = get_preset("pr1855")
    cfg.quant.level = 9  # zpaq groups (clamped to 5) and brotli's rest stream
    assert config_domains.level_violation(cfg.quant) is None


def test_a_positive_mlp_mult_too_small_for_one_hidden_unit_is_named(cli):
    """mlp_mult lies in its domain (> 0) yet 0.001 x 128 floors to a 0-wide MLP (a ZeroDivisionError in
    the optimizer's shape scaling, found by fuzzing `pgolf train --set`)."""
    rc, res, err = cli("params", "--preset", "cpu-smoke", "--set", "model.mlp_mult=0.001")
    assert rc == 2
    assert err.strip() == "pgolf: error: model.mlp_mult: 0.001 x model_dim 128 leaves the MLP no hidden unit"
    rc, res, _ = cli("params", "--preset", "cpu-smoke", "--set", "model.mlp_mult=0.008")  # 1 hidden unit
    assert rc == 0 and res["params"] > 0


def test_adam_eps_zero_is_named_not_a_nan_later(cli):
    """ttt.eps=0 ended in "distribution: negative or non-finite probabilities" (Adam's 0/0 on a parameter
    with no gradient yet), which hid its cause; both Adam epsilons must be > 0."""
    for key in ("ttt.eps", "optim.adam_eps"):
        rc, _, err = cli("params", "--preset", "cpu-smoke", "--set", f"{key}=0")
        assert rc == 2 and err.strip() == f"pgolf: error: {key}: 0.0: expected > 0"
