"""The whole job: JobConfig (the six sections and the checks across them), loading it from YAML and
overrides, and writing it back as YAML with its unused keys marked."""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Optional

import yaml

from forge.config.core import ConfigError, build_dataclass, check_range, merge_dicts, parse_overrides
from forge.config.model import ModelConfig
from forge.config.moe_quant import MoEConfig
from forge.config.run import DataConfig, LogConfig, OptimConfig, ParallelConfig, TrainConfig


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def validate(self) -> "JobConfig":
        """Each section's own checks (its `validate`), then the checks across sections."""
        self.model.validate()
        for section in (self.parallel, self.data, self.optim, self.train):
            section.validate()
        if self.model.steering_freeze_model and self.parallel.pp > 1:
            raise ConfigError("model.steering_freeze_model=true with parallel.pp > 1 is not supported: the stages "
                              "without the steering vector would have nothing to train")
        self._validate_steering_datasets()
        moe, ep = self.model.moe, self.parallel.ep
        if moe.n_experts and self.parallel.zero_stage == 3:
            raise ConfigError("parallel.zero_stage=3 with a mixture-of-experts model (model.moe.n_experts > 0) is not "
                              "supported (DeepSpeed's MoE does not work with ZeRO-3); use parallel.zero_stage 0, 1 or 2")
        if ep > 1 and not moe.n_experts:
            raise ConfigError(f"parallel.ep={ep} needs a mixture-of-experts model (model.moe.n_experts > 0)")
        if moe.n_experts and moe.n_experts % ep:
            raise ConfigError(f"parallel.ep={ep} does not divide model.moe.n_experts={moe.n_experts}")
        if self.data.seq_len is None:
            check_range("data.seq_len (= model.max_seq_len)", self.model.max_seq_len, low=2)
        elif self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")
        if self.data.blend is not None and len(self.data.blend) != len(self.data.paths):
            raise ConfigError(f"data.blend has {len(self.data.blend)} weights for {len(self.data.paths)} data.paths")
        self._validate_layout()
        from forge.train.optimizers import check_optim      # the optimizer registry and its limits
        check_optim(self)
        return self

    def _validate_layout(self) -> None:
        """The parallel layout against the model and the run: what DeepSpeed's engines run (pipeline
        with ZeRO 0/1 only, fp16 loss scaling needs ZeRO >= 1 there, offload needs ZeRO), and tp
        splitting the heads, the MLP and expert hidden sizes and (sequence parallel) the sequence."""
        m, p, t = self.model, self.parallel, self.train
        if p.pp > 1 and p.zero_stage > 1:
            raise ConfigError(f"parallel.pp={p.pp} with parallel.zero_stage={p.zero_stage}: DeepSpeed's pipeline engine "
                              "supports ZeRO stages 0 and 1 only; use parallel.zero_stage=1 (or parallel.pp=1 for ZeRO 2/3)")
        if t.precision == "fp16" and p.zero_stage == 0 and p.pp > 1:
            raise ConfigError("train.precision=fp16 with parallel.zero_stage=0 and parallel.pp > 1: DeepSpeed's pipeline "
                              "engine does not scale the fp16 loss at ZeRO 0; use parallel.zero_stage=1 (or bf16)")
        if p.sequence_parallel and p.tp == 1:
            raise ConfigError("parallel.sequence_parallel=true needs parallel.tp > 1")
        if p.offload_optimizer and p.zero_stage == 0:
            raise ConfigError("parallel.offload_optimizer=true needs parallel.zero_stage 1 or 2")
        if p.pp > m.n_layers + 3:
            raise ConfigError(f"parallel.pp={p.pp} exceeds the pipeline's {m.n_layers + 3} layers "
                              "(embedding, model.n_layers blocks, norm, head)")
        if p.tp == 1:
            return
        for key in ("attn_sub_norm", "mlp_sub_norm"):
            if getattr(m, key) not in (None, "rmsnorm", "identity"):
                raise ConfigError(f"model.{key}={getattr(m, key)!r} with parallel.tp={p.tp}: a sub-norm spans features "
                                  "split over tp; only 'rmsnorm' (mean square all-reduced) or 'identity' can")
        sizes = m.resolved()
        kinds = set(m.attention_pattern or [m.attention]) - {"identity"}
        if kinds and (m.n_heads % p.tp or (sizes.n_kv_heads % p.tp and p.tp % sizes.n_kv_heads)):
            raise ConfigError(f"parallel.tp={p.tp} must divide model.n_heads={m.n_heads}, and divide or be a "
                              f"multiple of model.n_kv_heads={sizes.n_kv_heads}")
        from forge.models.layers.moe import is_moe_layer
        dense = m.mlp != "identity" and not all(is_moe_layer(m, i) for i in range(m.n_layers))
        if dense and sizes.d_ff % p.tp:
            raise ConfigError(f"parallel.tp={p.tp} does not divide the MLP hidden size {sizes.d_ff} (model.d_ff, or "
                              "model.ff_mult * model.d_model rounded up to model.ff_multiple_of)")
        if m.moe.n_experts and sizes.moe.d_ff % p.tp:
            raise ConfigError(f"parallel.tp={p.tp} does not divide the expert hidden size {sizes.moe.d_ff} "
                              "(model.moe.d_ff)")
        shared = m.moe.n_experts and m.moe.n_shared_experts * sizes.moe.shared_d_ff
        if shared and shared % p.tp:
            raise ConfigError(f"parallel.tp={p.tp} does not divide the shared experts' hidden size {shared} "
                              "(model.moe.n_shared_experts * model.moe.shared_d_ff)")
        heads, groups = m.ssm_inner // m.ssm_head_dim, m.ssm_n_groups
        if "ssm" in kinds and (heads % p.tp or (groups % p.tp and p.tp % groups)):
            raise ConfigError(f"parallel.tp={p.tp} must divide the ssm heads (model.ssm_expand * model.d_model / "
                              f"model.ssm_head_dim = {heads}) and divide or be a multiple of "
                              f"model.ssm_n_groups={groups}")
        seq_len = self.data.seq_len or m.max_seq_len
        if p.sequence_parallel and seq_len % p.tp:
            raise ConfigError(f"parallel.sequence_parallel=true: parallel.tp={p.tp} does not divide "
                              f"data.seq_len={seq_len} (each rank holds seq_len / tp positions)")

    def check_world(self, world: int) -> None:
        """The layout against the number of processes: tp * pp divides it, ep divides the data-
        parallel size dp = world / (tp * pp)."""
        p = self.parallel
        if world % (p.tp * p.pp):
            raise ConfigError(f"the world size {world} is not divisible by parallel.tp * parallel.pp = {p.tp} * {p.pp}")
        dp = world // (p.tp * p.pp)
        if dp % p.ep:
            raise ConfigError(f"parallel.ep={p.ep} must divide the data-parallel size {dp} (= world {world} / "
                              f"(parallel.tp * parallel.pp))")

    def _validate_steering_datasets(self) -> None:
        n = self.model.steering_datasets
        if not n:
            return
        if self.parallel.pp > 1:
            raise ConfigError(f"model.steering_datasets={n} with parallel.pp={self.parallel.pp} is not supported: "
                              "the samples' dataset indices do not travel through the pipeline stages")
        datasets = len(self.data.paths) if self.data.dataset == "indexed" else 1
        if n != datasets:
            raise ConfigError(f"model.steering_datasets={n} must equal the number of datasets the samples come "
                              f"from: {datasets} (data.dataset={self.data.dataset!r}, data.paths={self.data.paths})")

    def resolved(self) -> "JobConfig":
        """A validated copy with the defaults that depend on another section filled in
        (data.seq_len None -> model.max_seq_len); this config is left as it is."""
        out = copy.deepcopy(self.validate())
        if out.data.seq_len is None:
            out.data.seq_len = out.model.max_seq_len
        return out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """Stable digest of the resolved config (compared across ranks)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]



def model_from_dict(d: dict, prefix: str = "model") -> ModelConfig:
    """ModelConfig from a dict; `preset` (if any) is the base that the other fields override."""
    base = None
    if d.get("preset"):
        from forge.models.presets import PRESETS
        name = d["preset"]
        if name not in PRESETS:
            raise ConfigError(f"{prefix}.preset={name!r} is not one of {sorted(PRESETS)}")
        base = dataclasses.replace(PRESETS[name], moe=dataclasses.replace(PRESETS[name].moe),
                                   quant=dataclasses.replace(PRESETS[name].quant))
    return build_dataclass(ModelConfig, d, prefix, base=base)


def config_from_dict(d: dict) -> JobConfig:
    if not isinstance(d or {}, dict):
        raise ConfigError(f"the config must be a mapping of sections, got {d!r}")
    d = dict(d or {})
    model = d.pop("model", {}) or {}
    if not isinstance(model, dict):
        raise ConfigError(f"model: expected a mapping (a section of model.* keys), got {model!r}")
    model = model_from_dict(model)
    cfg = build_dataclass(JobConfig, d)
    cfg.model = model
    return cfg.resolved()


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> JobConfig:
    tree: dict = {}
    if path:
        try:
            with open(path) as f:
                tree = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path!r} does not exist") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path!r} does not parse: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path!r} must hold a mapping of sections")
    tree = merge_dicts(tree, parse_overrides(overrides or []))
    return config_from_dict(tree)


def unused_keys(cfg: JobConfig) -> dict[str, str]:
    """{dotted key: why}: the keys whose value the chosen options never read (e.g. data.vocab_size
    unless a BPE tokenizer is trained here), so a printed or saved config can say so."""
    m, out = cfg.model, {}

    def mark(keys, why):
        out.update({k: why for k in keys})
    if not m.moe.n_experts:
        mark([f"model.moe.{f.name}" for f in dataclasses.fields(MoEConfig) if f.name != "n_experts"],
             "model.moe.n_experts=0 (dense MLP)")
    rope_extra = ["rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_seq_len",
                  "rope_yarn_beta_fast", "rope_yarn_beta_slow", "rope_yarn_truncate", "rope_attention_factor"]
    if m.position != "rope":
        mark([f"model.{k}" for k in ["rope_theta", "rotary_pct", "rope_interleaved", "rope_scaling"] + rope_extra],
             f"model.position={m.position}")
    else:
        used = {"none": set(), "linear": {"rope_scaling_factor"},
                "llama3": set(rope_extra[:4]),
                "yarn": {"rope_scaling_factor", "rope_original_max_seq_len"} | set(rope_extra[4:])}[m.rope_scaling]
        mark([f"model.{k}" for k in rope_extra if k not in used], f"model.rope_scaling={m.rope_scaling}")
    kinds = set(m.attention_pattern or [m.attention])
    for kind, key in (("sliding", "sliding_window"), ("local", "local_window")):
        if kind not in kinds and getattr(m, key) is not None:
            mark([f"model.{key}"], f"no {kind!r} attention")
    if "ssm" not in kinds:
        mark([f"model.{f.name}" for f in dataclasses.fields(ModelConfig) if f.name.startswith("ssm_")],
             "no 'ssm' layer")
    if "mla" not in kinds:
        mark([f"model.{k}" for k in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim")],
             "no 'mla' attention")
    if m.norm != "layernorm":
        mark(["model.norm_bias"], f"model.norm={m.norm}")
    if m.block != "parallel":
        mark(["model.parallel_shared_norm"], f"model.block={m.block}")
    if m.d_ff:
        mark(["model.ff_mult", "model.ff_multiple_of"], f"model.d_ff={m.d_ff} is set")
    d = cfg.data
    if d.dataset == "shakespeare":
        mark(["data.paths", "data.blend", "data.split"], "data.dataset=shakespeare (the plays' own train/val split)")
        if d.tokenizer != "bpe":
            mark(["data.vocab_size"], f"data.tokenizer={d.tokenizer} (only a bpe tokenizer trained here reads it)")
    else:
        mark(["data.vocab_size"], f"data.dataset={d.dataset} (the tokenizer comes with the data)")
    if cfg.optim.schedule != "wsd":
        mark(["optim.decay_frac"], f"optim.schedule={cfg.optim.schedule}")
    if cfg.optim.schedule == "constant":
        mark(["optim.min_lr"], "optim.schedule=constant")
    if cfg.parallel.tp == 1:
        mark(["parallel.sequence_parallel"], "parallel.tp=1")
    if cfg.parallel.pp == 1:
        mark(["parallel.pp_partition"], "parallel.pp=1")
    if not cfg.log.wandb:
        mark(["log.wandb_project"], "log.wandb=false")
    return out


def config_yaml(cfg: JobConfig) -> str:
    """The resolved config as YAML, each key in `unused_keys` followed by `# unused: why`. Comments
    only: `yaml.safe_load` of the text is `cfg.to_dict()` (resume and the config hash read it so)."""
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    unused, lines, path = unused_keys(cfg), [], []       # path: [(indent, key)] of the enclosing mappings
    for line in text.splitlines():
        key = re.match(r"^( *)([A-Za-z_]\w*):(?: |$)", line)
        if key:
            indent = len(key.group(1))
            path = [(i, k) for i, k in path if i < indent] + [(indent, key.group(2))]
            why = unused.get(".".join(k for _, k in path))
            if why:
                line += f"  # unused: {why}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def save_config(cfg: JobConfig, path: str) -> None:
    with open(path, "w") as f:
        f.write(config_yaml(cfg))
