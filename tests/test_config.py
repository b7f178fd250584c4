"""Config: YAML + dotted overrides + presets, and errors that name the key."""
import pytest

from forge.config import ConfigError, load_config, parse_overrides


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


def test_yaml_then_overrides_then_types(tmp_path):
    path = write(tmp_path, "model:\n  preset: tiny-llama\n  n_layers: 3\noptim:\n  lr: 1.0e-3\n")
    cfg = load_config(path, ["model.n_layers=4", "optim.lr=3e-4", "train.max_steps=7"])
    assert cfg.model.n_layers == 4            # override beats YAML
    assert cfg.optim.lr == pytest.approx(3e-4)  # "3e-4" (a YAML string) coerced to float
    assert cfg.train.max_steps == 7
    assert cfg.model.norm == "rmsnorm" and cfg.model.n_kv_heads == 2   # from the preset


def test_preset_fields_are_overridable_and_presets_untouched():
    from forge.models.presets import PRESETS
    cfg = load_config(None, ["model.preset=tiny-gpt2", "model.d_model=32", "model.n_heads=2"])
    assert cfg.model.d_model == 32 and cfg.model.position == "learned"
    assert PRESETS["tiny-gpt2"].d_model == 64


@pytest.mark.parametrize("override, fragment", [
    (["model.n_layerz=2"], "model.n_layerz"),
    (["optim.lr=fast"], "optim.lr"),
    (["model.n_layers=2.5"], "model.n_layers"),
    (["model.norm=batchnorm"], "layernorm"),                 # lists the valid choices
    (["model.attention=flash"], "model.attention"),
    (["model.preset=gpt5"], "model.preset"),
    (["model.d_model=65", "model.n_heads=4"], "model.n_heads"),
    (["model.n_kv_heads=3", "model.n_heads=4"], "model.n_kv_heads"),
    (["model.rotary_pct=0.35", "model.d_model=64", "model.n_heads=4"], "rotary"),
    (["model.attention=sliding", "model.sliding_window=512", "model.max_seq_len=256"], "model.sliding_window"),
    (["model.attention=sliding"], "model.sliding_window"),
    (["train.precision=fp8"], "train.precision"),
    (["data.seq_len=512", "model.max_seq_len=256"], "data.seq_len"),
    (["model.use_bias=true"], "model.use_bias"),
    (["nonsense"], "key=value"),
])
def test_bad_config_names_the_key(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    assert fragment in str(e.value)


def test_bad_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match="does not parse"):
        load_config(write(tmp_path, "model: [unclosed\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))


def test_parse_overrides_nesting():
    assert parse_overrides(["a.b.c=1", "a.d=[1, 2]", "e=x"]) == {"a": {"b": {"c": 1}, "d": [1, 2]}, "e": "x"}


def test_hash_is_stable_and_sensitive():
    a, b = load_config(None, []), load_config(None, [])
    assert a.hash() == b.hash()
    assert a.hash() != load_config(None, ["model.n_layers=3"]).hash()
