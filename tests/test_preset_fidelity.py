"""Every record preset carries its record's numbers: each value of `pgolf.presets_sources` (with the PR
that states it) is checked field by field, no record preset sets a value the table does not source,
and the check fails on a changed value."""
import pytest

from pgolf.config import Config
from pgolf.presets import PRESETS, get_preset
from pgolf.presets_sources import SOURCES, Fact, mismatches, table, value_at

FACTS = [(preset, key, fact) for preset, facts in SOURCES.items() for key, fact in facts.items()]


def _id(preset: str, key: str, fact: Fact) -> str:
    return f"{preset}:{key}:{'#' + str(fact.pr) if fact.pr is not None else 'baseline-or-pgolf'}"


@pytest.mark.parametrize("preset,key,fact", FACTS, ids=[_id(*f) for f in FACTS])
def test_preset_value_is_the_sourced_one(preset, key, fact):
    assert value_at(get_preset(preset), key) == fact.value, f"{key}: see {fact.where} of #{fact.pr}"


@pytest.mark.parametrize("preset", sorted(SOURCES))
def test_record_preset_sets_nothing_unsourced(preset):
    """Every field a preset changes from the defaults is in its table (a new number needs a source)."""
    default, cfg = Config().to_dict(), get_preset(preset).to_dict()
    changed = {f"{s}.{k}" for s, fields in cfg.items() if isinstance(fields, dict)
               for k, v in fields.items() if v != default[s][k]}
    assert changed - set(SOURCES[preset]) == set()


def test_every_record_preset_has_a_table_and_every_key_exists():
    assert set(SOURCES) == set(PRESETS) - {"cpu-smoke"}
    fields = Config().to_dict()
    for preset, facts in SOURCES.items():
        for key in facts:
            section, name = key.split(".")
            assert name in fields[section], f"{preset}: {key} is not a config field"


def test_a_flipped_value_is_caught_and_named(monkeypatch):
    """A preset whose QK gain drifts back to #1626's 5.0 fails the check, which names the key and #1790."""
    cfg = get_preset("pr1790", ["model.qk_gain_init=5.0"])
    (line,) = mismatches(cfg, SOURCES["pr1790"])
    assert "model.qk_gain_init = 5.0" in line and "#1790" in line and "5.25" in line
    # the same through the preset registry, as the parametrised test sees it
    flipped = get_preset("pr1765", ["ttt.lora_alpha=0.0"])
    monkeypatch.setitem(PRESETS, "pr1765", lambda: flipped)
    assert mismatches(get_preset("pr1765"), SOURCES["pr1765"]) == [
        "pr1765: ttt.lora_alpha = 0.0, but #1765 (args) states 96.0"]


def test_the_known_errors_of_issue_15_are_fixed():
    """Hand-read from the PRs' logs: #1765 ran rank 128 at alpha 96 (TTT_LORA_ALPHA=96 in its args);
    #1790's block lists QK 5.25 and its base's MATRIX_LR 0.026, EMBED_BITS 7, clips 12 / 13 / 15."""
    p = get_preset("pr1765").ttt
    assert (p.lora_rank, p.lora_alpha, p.warm_start_a, p.weight_decay) == (128, 96.0, True, 1.0)
    c = get_preset("pr1790")
    assert (c.model.qk_gain_init, c.optim.matrix_lr) == (5.25, 0.026)
    q = c.quant
    assert (q.embed_bits, q.embed_clip_sigmas, q.mlp_clip_sigmas, q.attn_clip_sigmas) == (7, 15.0, 12.0, 13.0)
    assert (c.ttt.lora_rank, c.ttt.lora_alpha) == (128, 144.0)
    assert get_preset("pr1784").quant.embed_bits == 7 and get_preset("pr1784").ttt.lora_alpha == 144.0


def test_table_rows_name_the_inherited_source():
    """Where #1765 is silent the row names #1626; its own changes name #1765."""
    rows = {r["key"]: r for r in table("pr1765")}
    assert rows["optim.matrix_lr"]["pr"] == 1626 and rows["ttt.lora_rank"]["pr"] == 1765
    assert rows["ttt.lora_alpha"] == {"key": "ttt.lora_alpha", "value": 96.0, "pr": 1765, "where": "args"}
