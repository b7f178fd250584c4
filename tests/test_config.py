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


# every numeric field: (override, words the message must hold); NaN / inf where they make no sense
BAD_VALUES = [
    ("optim.lr=.nan", ["optim.lr", "finite"]), ("optim.lr=.inf", ["optim.lr", "finite"]),
    ("optim.lr=0", ["optim.lr", "> 0"]), ("optim.lr=-1e-3", ["optim.lr"]),
    ("optim.min_lr=-1e-5", ["optim.min_lr", ">= 0"]), ("optim.min_lr=.nan", ["optim.min_lr", "finite"]),
    ("optim.min_lr=1.0", ["optim.min_lr", "optim.lr"]),
    ("optim.weight_decay=-0.1", ["optim.weight_decay", ">= 0"]), ("optim.weight_decay=.inf", ["optim.weight_decay"]),
    ("optim.beta1=1.5", ["optim.beta1", "[0, 1)"]), ("optim.beta1=1.0", ["optim.beta1"]),
    ("optim.beta1=-0.1", ["optim.beta1"]), ("optim.beta2=.nan", ["optim.beta2"]),
    ("optim.eps=-1e-8", ["optim.eps", "> 0"]), ("optim.eps=0", ["optim.eps"]),
    ("optim.grad_clip=-1", ["optim.grad_clip", "0 turns clipping off"]), ("optim.grad_clip=.inf", ["optim.grad_clip"]),
    ("optim.warmup_steps=-1", ["optim.warmup_steps"]), ("optim.decay_frac=1.5", ["optim.decay_frac", "[0, 1]"]),
    ("optim.decay_frac=.nan", ["optim.decay_frac"]), ("optim.schedule=linear", ["optim.schedule", "cosine"]),
    ("model.init_std=-0.02", ["model.init_std", "> 0"]), ("model.init_std=0", ["model.init_std"]),
    ("model.init_std=.nan", ["model.init_std", "finite"]),
    ("model.norm_eps=-1e-5", ["model.norm_eps"]), ("model.norm_eps=0", ["model.norm_eps"]),
    ("model.rope_theta=0", ["model.rope_theta"]), ("model.rope_theta=.inf", ["model.rope_theta"]),
    ("model.rotary_pct=1.5", ["model.rotary_pct", "(0, 1]"]), ("model.rotary_pct=0", ["model.rotary_pct"]),
    ("model.rope_scaling_factor=0", ["model.rope_scaling_factor"]),
    ("model.rope_low_freq_factor=-1", ["model.rope_low_freq_factor"]),
    ("model.rope_high_freq_factor=.nan", ["model.rope_high_freq_factor"]),
    ("model.rope_original_max_seq_len=0", ["model.rope_original_max_seq_len"]),
    ("model.ff_mult=0", ["model.ff_mult"]), ("model.ff_multiple_of=0", ["model.ff_multiple_of"]),
    ("model.d_ff=0", ["model.d_ff"]), ("model.head_dim=-8", ["model.head_dim"]), ("model.n_kv_heads=0", ["model.n_kv_heads"]),
    ("model.embed_scale=.nan", ["model.embed_scale"]), ("model.norm_offset=.inf", ["model.norm_offset"]),
    ("model.attn_softcap=0", ["model.attn_softcap", "or null"]), ("model.logit_softcap=-30", ["model.logit_softcap"]),
    ("model.attn_scale=.nan", ["model.attn_scale"]), ("model.qkv_clip=0", ["model.qkv_clip"]),
    ("model.dropout=1.0", ["model.dropout"]), ("model.attn_dropout=-0.1", ["model.attn_dropout"]),
    ("model.dropout=.nan", ["model.dropout"]),
    ("model.vocab_size=0", ["model.vocab_size"]), ("model.d_model=-64", ["model.d_model"]),
    ("model.moe.n_experts=-1", ["model.moe.n_experts"]), ("model.moe.top_k=0", ["model.moe.top_k"]),
    ("model.moe.every=0", ["model.moe.every"]), ("model.moe.first_dense=-1", ["model.moe.first_dense"]),
    ("model.moe.capacity_factor=0", ["model.moe.capacity_factor"]),
    ("model.moe.aux_loss_coef=-0.01", ["model.moe.aux_loss_coef"]),
    ("model.moe.z_loss_coef=.nan", ["model.moe.z_loss_coef"]),
    ("model.moe.bias_update_rate=-1", ["model.moe.bias_update_rate"]), ("model.moe.d_ff=0", ["model.moe.d_ff"]),
    ("model.moe.n_shared_experts=-1", ["model.moe.n_shared_experts"]),
    ("parallel.tp=0", ["parallel.tp", ">= 1"]), ("parallel.pp=-1", ["parallel.pp"]), ("parallel.ep=0", ["parallel.ep"]),
    ("parallel.zero_stage=4", ["parallel.zero_stage"]), ("parallel.pp_partition=random", ["parallel.pp_partition"]),
    ("data.split=[-0.5, 1.0, 0.5]", ["data.split[0]", ">= 0"]), ("data.split=[0, 0, 0]", ["data.split", "positive sum"]),
    ("data.split=[.nan, 1, 0]", ["data.split[0]", "finite"]), ("data.split=[1, 1, 1, 1]", ["data.split", "three"]),
    ("data.blend=[-1.0]", ["data.blend[0]"]), ("data.vocab_size=0", ["data.vocab_size"]),
    ("data.seq_len=1", ["data.seq_len", ">= 2"]), ("model.max_seq_len=1", ["data.seq_len", "model.max_seq_len"]),
    ("train.max_steps=0", ["train.max_steps", ">= 1"]), ("train.micro_batch_size=0", ["train.micro_batch_size"]),
    ("train.grad_accum=0", ["train.grad_accum"]), ("train.eval_steps=0", ["train.eval_steps"]),
    ("train.save_interval=-1", ["train.save_interval", "0 = never"]), ("train.eval_interval=-5", ["train.eval_interval"]),
    ("train.log_interval=-1", ["train.log_interval"]),
    ("train.activation_checkpointing=some", ["train.activation_checkpointing"]),
    ("train.linear_backend=mkl", ["train.linear_backend"]), ("train.out_dir=''", ["train.out_dir"]),
    ("model=3", ["model", "mapping"]), ("train=[1, 2]", ["train", "mapping"]), ("optim=0.1", ["optim", "mapping"]),
    ("model.moe=3", ["model.moe", "mapping"]),
]


@pytest.mark.parametrize("override, words", BAD_VALUES, ids=[o for o, _ in BAD_VALUES])
def test_bad_value_is_a_config_error_naming_the_key(override, words):
    extra = ["data.paths=[a]"] if override.startswith("data.blend") else []
    with pytest.raises(ConfigError) as e:
        load_config(None, [override, *extra])
    for w in words:
        assert w in str(e.value), (override, str(e.value))


def test_good_edge_values_pass():
    """The interval ends that are allowed: zero decay/clip/warmup/min_lr, beta 0, intervals 0."""
    cfg = load_config(None, ["optim.weight_decay=0", "optim.grad_clip=0", "optim.warmup_steps=0", "optim.min_lr=0",
                             "optim.beta1=0", "optim.decay_frac=1", "train.save_interval=0", "train.eval_interval=0",
                             "data.split=[1, 0, 0]", "model.rotary_pct=1.0", "model.moe.capacity_factor=null"])
    assert cfg.optim.grad_clip == 0 and cfg.data.split == [1.0, 0.0, 0.0]


def test_out_dir_that_is_a_file_is_refused_before_anything_is_written(tmp_path, capsys):
    from forge.train.cli import main
    f = tmp_path / "notadir"
    f.write_text("x")
    for out in (f, f / "run"):
        with pytest.raises(ConfigError, match="train.out_dir.*(is a file|lies under the file)"):
            load_config(None, [f"train.out_dir={out}"])
        assert main([f"train.out_dir={out}", "train.max_steps=1"]) == 2
        assert "train.out_dir" in capsys.readouterr().err
    assert f.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["notadir"]


def test_config_error_is_printed_by_rank_0_only(monkeypatch, capsys):
    from forge.train.cli import main
    monkeypatch.setenv("RANK", "1")
    assert main(["optim.lr=.nan"]) == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert main(["optim.lr=.nan"]) == 2
    assert capsys.readouterr().err.count("optim.lr") == 1


def _literal_fields(cls, prefix):
    """(dotted key, allowed values) of every Literal-typed field under dataclass `cls`."""
    import dataclasses
    import typing
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += _literal_fields(tp, f"{prefix}.{f.name}")
        elif typing.get_origin(tp) is typing.Literal:
            out.append((f"{prefix}.{f.name}", typing.get_args(tp)))
    return out


def _all_literal_fields():
    from forge.config import JobConfig
    import dataclasses
    import typing
    hints = typing.get_type_hints(JobConfig)
    return [kv for f in dataclasses.fields(JobConfig) for kv in _literal_fields(hints[f.name], f.name)]


def test_every_enumerated_key_is_one_checked_literal():
    """Issue 14 item 3: the string enums are Literal fields; a value outside one is refused by the
    one check, naming the key and the choices, and each choice is accepted (or refused only by a
    cross-field rule that names another key)."""
    keys = dict(_all_literal_fields())
    for key in ("train.precision", "optim.schedule", "train.linear_backend", "model.rope_scaling", "model.moe.router",
                "train.activation_checkpointing", "parallel.zero_stage"):
        assert key in keys, key
    for key, options in keys.items():
        with pytest.raises(ConfigError, match=key.replace(".", r"\.") + ".*is not one of"):
            load_config(None, [f"{key}=bogus"])
        for value in options:
            try:
                assert getattr(load_config(None, [f"{key}={value}"]), key.split(".")[0]) is not None
            except ConfigError as e:
                assert key not in str(e).split(":")[0] or "is not one of" not in str(e), e


def test_a_model_config_built_in_code_is_checked_too():
    from forge.config import ModelConfig, MoEConfig
    with pytest.raises(ConfigError, match="model.moe.router='top2'"):
        ModelConfig(moe=MoEConfig(n_experts=4, router="top2")).validate()
    with pytest.raises(ConfigError, match="model.rope_scaling='ntk'"):
        ModelConfig(position="alibi", rope_scaling="ntk").validate()


@pytest.mark.parametrize("overrides, fragment", [
    (["model.n_heads=4", "model.d_model=64", "parallel.tp=3"], "parallel.tp=3 must divide model.n_heads"),
    (["model.preset=tiny-llama", "model.d_ff=130", "parallel.tp=4"], "MLP hidden size 130"),
    (["model.preset=tiny-mixtral", "model.moe.d_ff=33", "parallel.tp=2"], "expert hidden size 33"),
    (["model.preset=tiny-mixtral", "model.moe.n_shared_experts=1", "model.moe.shared_d_ff=33", "parallel.tp=2"],
     "shared experts' hidden size 33"),
    (["model.preset=tiny-mixtral", "model.moe.n_experts=6", "parallel.ep=4"], "parallel.ep=4 does not divide"),
    (["model.attention=ssm", "model.position=none", "model.d_model=64", "model.n_heads=4", "model.ssm_head_dim=64",
      "parallel.tp=4"], "must divide the ssm heads"),
    (["parallel.tp=2", "parallel.sequence_parallel=true", "data.seq_len=31", "model.max_seq_len=32"],
     "does not divide data.seq_len=31"),
    (["parallel.pp=2", "parallel.zero_stage=3"], "parallel.zero_stage=3"),
    (["parallel.offload_optimizer=true"], "parallel.offload_optimizer"),
    (["optim.name=muon", "parallel.tp=2"], "optim.name='muon'"),
])
def test_layout_inconsistencies_are_refused_by_load_config(overrides, fragment):
    """Issue 14 item 3: what engine.check_supported, the schedule check and the layers re-checked
    is refused by JobConfig.validate, before any process group exists."""
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, overrides)


def test_the_world_size_is_checked_against_the_layout():
    cfg = load_config(None, ["model.preset=tiny-mixtral", "parallel.tp=2", "parallel.ep=2"])
    cfg.check_world(8)                                   # dp = 4, ep = 2 divides it
    with pytest.raises(ConfigError, match="parallel.tp \\* parallel.pp"):
        cfg.check_world(6 + 1)
    with pytest.raises(ConfigError, match="parallel.ep=2 must divide the data-parallel size 1"):
        cfg.check_world(2)
