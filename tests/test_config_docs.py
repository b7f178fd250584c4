"""docs/config.md (generated from the forge/config/ package), `forge train --help`, and the `# unused` marks of
the resolved config that --print-config prints and a run saves as config.yaml."""
from __future__ import annotations

import dataclasses
import re
import pytest
import torch
import yaml

from forge.config import JobConfig, config_yaml, flatten_dict, load_config, save_config, unused_keys
from forge.docs import DOCS_FILE, config_comments, field_comments, missing_meanings, render


def doc_rows() -> dict[str, tuple[str, str, str]]:
    """{key: (type, default, meaning)} read from the markdown tables of docs/config.md."""
    rows = {}
    for line in open(DOCS_FILE):
        m = re.match(r"^\| `([\w.]+)` \| (.+?) \| `(.*?)` \| (.*) \|$", line.rstrip("\n"))
        if m:
            rows[m.group(1)] = m.group(2, 3, 4)
    return rows


def test_docs_config_md_is_up_to_date():
    with open(DOCS_FILE) as f:
        assert f.read() == render(), "docs/config.md is out of date: run `python -m forge.docs`"


def test_every_config_key_has_a_meaning():
    assert missing_meanings() == [], "add a `# comment` after these fields in forge/config/"


def test_reference_has_every_key_with_its_default():
    """Each key of the default JobConfig is a row whose default reads back (YAML) as the value."""
    rows = doc_rows()
    defaults = flatten_dict(JobConfig().to_dict())
    assert set(rows) == set(defaults)
    for key, value in defaults.items():
        shown = yaml.safe_load(rows[key][1])
        if isinstance(value, float):
            shown = float(shown)
        assert shown == value, (key, rows[key][1], value)
        assert rows[key][2].strip(), key


def test_registry_keys_list_their_choices():
    from forge.models.presets import PRESETS
    from forge.models.registry import REGISTRIES
    rows = doc_rows()
    for key, reg in [*REGISTRIES.items(), ("preset", PRESETS)]:
        listed = set(re.findall(r"`([^`]+)`", rows[f"model.{key}"][2].split("one of:")[1]))
        assert listed == set(reg), key


def test_field_comments_parser():
    """Trailing comments, aligned continuation lines, and no capture of section comments."""
    src = ("class A:\n"
           "    # heading, not a meaning\n"
           "    x: int = 1          # the x\n"
           "    y: str = 'a'        # the y,\n"
           "                        # continued\n"
           "    # another heading\n"
           "    z: float = 0.0\n")
    assert field_comments(src) == {("A", "x"): "the x", ("A", "y"): "the y, continued"}
    comments = config_comments()                                     # field_comments of forge/config/*.py
    assert "hub id" in comments[("TrainConfig", "init_from")]        # a two-line comment in config/run.py


def test_train_help_points_to_the_reference_and_print_config():
    from forge.train.cli import _parser
    out = _parser().format_help()
    assert "docs/config.md" in out and "--print-config" in out and "python -m forge.docs" in out


def test_unused_keys_are_comments_that_read_back_as_the_config(tmp_path):
    """config.yaml marks data.vocab_size under the char tokenizer; safe_load of the text is the
    config itself, so resume and the config hash see no difference."""
    cfg = load_config(None, ["data.tokenizer=char"])
    text = config_yaml(cfg)
    assert re.search(r"^data:\n(  .*\n)*?  vocab_size: 4096  # unused: data.tokenizer=char", text, re.M)
    assert yaml.safe_load(text) == cfg.to_dict()
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(str(tmp_path / "config.yaml")).hash() == cfg.hash()
    bpe = load_config(None, ["data.tokenizer=bpe", "model.moe.n_experts=4", "optim.schedule=wsd"])
    marked = unused_keys(bpe)
    assert "data.vocab_size" not in marked and "optim.decay_frac" not in marked
    assert not any(k.startswith("model.moe.") for k in marked)
    assert "model.moe.top_k" in unused_keys(cfg)


def _perturbed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):       # another value in the key's valid range (fractions stay in (0, 1])
        return value * 0.5 if 0 < value <= 1 else value * 1.5 + 0.25
    return None


@pytest.mark.parametrize("overrides", [[], ["model.position=alibi", "model.block=parallel"],
                                       ["model.norm=layernorm", "model.rope_scaling=linear", "model.d_ff=96"]])
def test_unused_model_keys_do_not_change_the_model(overrides):
    """Changing any numeric / bool key marked unused leaves the built model's logits unchanged
    (same seed), and changing a key not marked unused (model.norm_eps, as a control) changes them."""
    from forge.models.transformer import build_model
    cfg = load_config(None, ["model.d_model=16", "model.n_heads=2", "model.n_layers=1", "model.max_seq_len=8",
                             *overrides])
    x = torch.randint(0, cfg.model.vocab_size, (2, 8))

    def logits(model_cfg):
        with torch.no_grad():
            return build_model(model_cfg, seed=0)(x)
    ref = logits(cfg.model)
    tried = 0
    for key in [k for k in unused_keys(cfg) if k.startswith("model.")]:
        parts = key.split(".")[1:]
        owner = cfg.model if len(parts) == 1 else getattr(cfg.model, parts[0])
        new = _perturbed(getattr(owner, parts[-1]))
        if new is None:
            continue
        m = dataclasses.replace(cfg.model, moe=dataclasses.replace(cfg.model.moe))
        setattr(m if len(parts) == 1 else m.moe, parts[-1], new)
        assert torch.equal(logits(m), ref), key
        tried += 1
    assert tried >= 3
    m = dataclasses.replace(cfg.model, norm_eps=0.5)
    assert not torch.equal(logits(m), ref)
