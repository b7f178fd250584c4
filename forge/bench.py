"""`forge bench`: training-step throughput of Forge's model against Hugging Face transformers.

    forge bench --preset tiny-llama --layers 12 --d-model 768 --heads 12 --seq-len 256 \\
                --batch 4 --steps 5 --warmup 2 --dtype fp32 --compile --device cpu

Both models are built in the same process with the same shape, the same weights (Forge's are
copied into the HF model, and the first losses are printed side by side as a parity check), the
same batch, dtype and optimizer (torch.optim.AdamW, fused where the device supports it). A timed
step is a full training step: forward, mean token cross-entropy, backward, optimizer step, zero
grads. After the warmup steps (which also absorb torch.compile's compilation) the timed steps of
the two models are interleaved (forge, hf, forge, hf, ...) so that a slow patch of the machine
hits both; tokens/s are from the median step time and the ratio is forge / hf.

Peak memory: on CUDA torch.cuda.max_memory_allocated over the model's steps, minus what was
allocated before the model was built; on CPU the peak resident set size over the model's build
and warmup steps (VmHWM, reset through /proc/self/clear_refs) minus the resident size before it.

MFU (CUDA only) = tokens/s * FLOPs per token / peak FLOP/s of the device, with
FLOPs per token = 6 N + 12 L d T (N: parameters doing matmuls per token, i.e. all parameters
except the input token / position embeddings, the output head counted even when tied).

Forge side: `--compile` wraps forward + loss in torch.compile (Inductor; on CPU it needs a C++
compiler); `--linear auto` (default) routes Forge's fp32 CPU linears through oneDNN
(forge.kernels, about 2x MKL's sgemm on AMD CPUs), `--linear aten` keeps F.linear, i.e. the very
kernels HF uses (then eager Forge and HF time the same within noise).

HF side: the matching transformers class (Llama, Qwen2 for q/k/v-only biases, Mistral for sliding
window) with its default attention implementation (sdpa) and no torch.compile ("eager" mode),
its loss computed by its own loss function (`labels=..., shift_labels=...`).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import platform
import resource
import statistics
import sys
import time

import torch

from forge.config import ConfigError, ModelConfig, model_from_dict, parse_overrides

# Dense (no sparsity) peak FLOP/s by device-name substring, checked in order.
PEAK_FLOPS = [
    ("H200", {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}),
    ("H100 PCIe", {"bf16": 756.5e12, "fp16": 756.5e12, "tf32": 378.0e12, "fp32": 51.2e12}),
    ("H100", {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}),
    ("A100", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Used when forge.models.presets (or the named preset) is not available.
_FALLBACK_PRESETS = {
    "tiny-llama": ModelConfig(vocab_size=32000, d_model=256, n_layers=4, n_heads=4, max_seq_len=256,
                              d_ff=688, norm_eps=1e-5, position="rope", norm="rmsnorm", mlp="glu",
                              activation="silu", block="pre_ln"),
}


def _preset(name: str) -> ModelConfig:
    try:
        from forge.models.presets import PRESETS
    except ImportError:
        PRESETS = {}
    table = {**_FALLBACK_PRESETS, **PRESETS}
    if name not in table:
        raise ConfigError(f"--preset {name!r} is not one of {sorted(table)}")
    base = table[name]
    return dataclasses.replace(base, moe=dataclasses.replace(base.moe))


def bench_config(args) -> ModelConfig:
    """The preset with the shape flags and `model.key=value` overrides applied."""
    cfg = _preset(args.preset)
    shape = {"n_layers": args.layers, "d_model": args.d_model, "n_heads": args.heads, "vocab_size": args.vocab}
    for k, v in shape.items():
        if v is not None:
            setattr(cfg, k, v)
    if args.heads is not None or args.d_model is not None:
        cfg.head_dim = None                              # d_model // n_heads
    if args.heads is not None:
        cfg.n_kv_heads = args.kv_heads                   # None: multi-head attention
    elif args.kv_heads is not None:
        cfg.n_kv_heads = args.kv_heads
    if args.d_ff is not None:
        cfg.d_ff = args.d_ff
    elif args.d_model is not None:                       # the family's rule at the new width
        d = cfg.d_model
        cfg.d_ff = 256 * math.ceil(8 * d / 3 / 256) if cfg.mlp == "glu" else 4 * d
    over = parse_overrides(args.overrides).get("model", {})
    bad = [o for o in args.overrides if not o.startswith("model.")]
    if bad:
        raise ConfigError(f"overrides must start with 'model.': {bad}")
    if over:
        cfg = model_from_dict({k: v for k, v in dataclasses.asdict(cfg).items() if k != "preset"} | over)
    cfg.preset = None
    cfg.max_seq_len = max(cfg.max_seq_len, args.seq_len)
    cfg.dropout = cfg.attn_dropout = 0.0
    return cfg.validate()


# ------------------------------------------------------------------ Hugging Face counterpart
def hf_counterpart(cfg: ModelConfig):
    """(transformers config, model class) of the same family and shape, or raise ValueError."""
    import transformers as tf
    why = []
    checks = {"position": "rope", "norm": "rmsnorm", "mlp": "glu", "activation": "silu", "block": "pre_ln",
              "qk_norm": "none", "norm_offset": 0.0, "embed_scale": 1.0, "final_norm": True,
              "rope_interleaved": False, "rotary_pct": 1.0, "head_bias": False, "attn_softcap": None,
              "logit_softcap": None, "attn_scale": None, "attention_pattern": None,
              "attention_softmax": "softmax", "qk_head_dim": None, "v_head_dim": None}
    if hasattr(cfg, "qkv_clip"):
        checks["qkv_clip"] = None
    for k, v in checks.items():
        if getattr(cfg, k) != v:
            why.append(f"model.{k}={getattr(cfg, k)!r} (needs {v!r})")
    for loc in ("attn", "mlp", "post", "final"):
        if cfg.norm_at(loc) != "rmsnorm":
            why.append(f"model.norm_{loc}={cfg.norm_at(loc)!r} (needs 'rmsnorm')")
    if cfg.up_bias != cfg.mlp_bias or cfg.down_bias != cfg.mlp_bias:
        why.append("model.mlp_up_bias / mlp_down_bias that differ from model.mlp_bias")
    if cfg.attention not in ("causal", "sliding"):
        why.append(f"model.attention={cfg.attention!r}")
    if cfg.moe.n_experts:
        why.append("a mixture-of-experts MLP")
    if cfg.attn_out_bias and not cfg.qkv_bias:
        why.append("an output-projection bias without q/k/v biases")
    if why:
        raise ValueError("no Hugging Face counterpart (Llama / Qwen2 / Mistral) for " + ", ".join(why)
                         + "; use --no-hf")
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "linear":
        rope = {**rope, "rope_type": "linear", "factor": cfg.rope_scaling_factor}
    elif cfg.rope_scaling == "llama3":
        rope = {**rope, "rope_type": "llama3", "factor": cfg.rope_scaling_factor,
                "low_freq_factor": cfg.rope_low_freq_factor, "high_freq_factor": cfg.rope_high_freq_factor,
                "original_max_position_embeddings": cfg.rope_original_max_seq_len}
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ff_dim,
                  num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                  num_key_value_heads=cfg.kv_heads, head_dim=cfg.hd, max_position_embeddings=cfg.max_seq_len,
                  rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings, rope_parameters=rope,
                  initializer_range=cfg.init_std, use_cache=False)
    if cfg.attention == "sliding":
        if cfg.qkv_bias or cfg.mlp_bias:
            raise ValueError("no Hugging Face counterpart for sliding-window attention with biases; use --no-hf")
        return tf.MistralConfig(**common, sliding_window=cfg.sliding_window), tf.MistralForCausalLM
    if cfg.qkv_bias and not cfg.attn_out_bias and not cfg.mlp_bias:
        return tf.Qwen2Config(**common), tf.Qwen2ForCausalLM
    return (tf.LlamaConfig(**common, attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias),
            tf.LlamaForCausalLM)


def hf_state_dict(forge_sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Forge parameter names -> Llama-family HF names (same layouts: NeoX-half RoPE, (out, in))."""
    names = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
             "attn.wq": "self_attn.q_proj", "attn.wk": "self_attn.k_proj", "attn.wv": "self_attn.v_proj",
             "attn.wo": "self_attn.o_proj", "mlp.w_gate": "mlp.gate_proj", "mlp.w_up": "mlp.up_proj",
             "mlp.w_out": "mlp.down_proj"}
    out = {}
    for k, t in forge_sd.items():
        if k == "embed.tok.weight":
            out["model.embed_tokens.weight"] = t
        elif k == "norm.weight":
            out["model.norm.weight"] = t
        elif k.startswith("head.proj."):
            out["lm_head." + k.split(".")[-1]] = t
        elif k.startswith("layers."):
            _, i, rest = k.split(".", 2)
            mod, leaf = rest.rsplit(".", 1)
            out[f"model.layers.{i}.{names[mod]}.{leaf}"] = t
        else:
            raise KeyError(f"no Hugging Face name for Forge tensor {k!r}")
    return out


# ------------------------------------------------------------------ memory
class PeakMemory:
    """Peak memory of a phase, in bytes above what was in use when the phase began."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            _malloc_trim()      # hand freed heap pages back, so the resident size starts honest
            self.exact = _reset_hwm()
            self.base = _proc_status("VmRSS") if self.exact else 0
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        elif self.exact:
            self.peak = _proc_status("VmHWM") - self.base
        else:   # no /proc: whole-process peak (an upper bound)
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        return False


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _malloc_trim() -> None:
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _proc_status("VmHWM")
        return True
    except (OSError, KeyError):
        return False


# ------------------------------------------------------------------ timing
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_optimizer(model, device):
    kw = dict(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    try:
        return torch.optim.AdamW(model.parameters(), fused=True, **kw), "AdamW(fused)"
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(model.parameters(), foreach=True, **kw), "AdamW(foreach)"


class Runner:
    """One model's training step (forward + loss + backward + AdamW step + zero_grad)."""

    def __init__(self, name, model, loss_fn, device):
        self.name, self.model, self.loss_fn, self.device = name, model, loss_fn, device
        self.opt, self.opt_name = make_optimizer(model, device)
        self.times, self.losses = [], []

    def step(self, x, y, timed: bool):
        _sync(self.device)
        t0 = time.perf_counter()
        loss = self.loss_fn(x, y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        _sync(self.device)
        dt = time.perf_counter() - t0
        self.losses.append(float(loss.detach()))
        if timed:
            self.times.append(dt)
        return dt


def flops_per_token(model, cfg: ModelConfig, seq_len: int) -> float:
    n = model.num_params()
    n -= model.embed.tok.weight.numel()
    if model.embed.pos is not None:
        n -= sum(p.numel() for p in model.embed.pos.parameters())
    if cfg.tie_embeddings:
        n += model.head.proj.weight.numel()
    return 6 * n + 12 * cfg.n_layers * cfg.n_heads * cfg.hd * seq_len


def peak_flops(device: torch.device, dtype: str) -> tuple[str, float | None]:
    if device.type != "cuda":
        return platform.processor() or "cpu", None
    name = torch.cuda.get_device_name(device)
    key = dtype
    if dtype == "fp32" and torch.backends.cuda.matmul.allow_tf32:
        key = "tf32"
    for sub, table in PEAK_FLOPS:
        if sub in name:
            return name, table[key]
    return name, None


def _build_forge(cfg, device, dtype, compile_, seed):
    from forge.models.transformer import build_model
    torch.manual_seed(seed)
    model = build_model(cfg).to(device=device, dtype=dtype).train()

    def loss_fn(x, y):
        return model.loss(model(x), y)

    return model, (torch.compile(loss_fn) if compile_ else loss_fn)


def _build_hf(cfg, forge_model, device, dtype, attn_impl):
    hf_cfg, cls = hf_counterpart(cfg)
    hf_cfg._attn_implementation = attn_impl
    with torch.device(device):
        hf = cls(hf_cfg).to(dtype)
    from forge.models.io import unique_state_dict
    sd = hf_state_dict(unique_state_dict(forge_model), cfg)
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"HF weight copy: missing {missing[:5]}, unexpected {unexpected[:5]}")
    hf.train()

    def loss_fn(x, y):
        return hf(input_ids=x, labels=y, shift_labels=y).loss

    return hf, loss_fn


def run(args) -> dict:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    from forge import kernels
    linear_backend = kernels.set_linear_backend(args.linear)
    cfg = bench_config(args)
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1), generator=g).to(device)
    x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    tokens = args.batch * args.seq_len

    # memory of a model = what building it adds + the peak of its warmup steps above their start
    mem, warm_s, parity = {}, {}, {}
    with PeakMemory(device) as pm:
        fmodel, floss = _build_forge(cfg, device, dtype, args.compile, args.seed)
    mem["forge"] = pm.peak
    fr = Runner("forge" + (" (compiled)" if args.compile else ""), fmodel, floss, device)
    runners = [fr]
    hf_error = None
    if not args.no_hf:
        try:
            with PeakMemory(device) as pm:
                hmodel, hloss = _build_hf(cfg, fmodel, device, dtype, args.hf_attn)
            mem["hf"] = pm.peak
            runners.append(Runner(f"hf ({args.hf_attn}, eager)", hmodel, hloss, device))
            with torch.no_grad():   # parity at identical weights, before either model trains
                parity["forge"] = float(fmodel.loss(fmodel(x), y))
                parity["hf"] = float(hloss(x, y))
        except ValueError as e:
            hf_error = str(e)
    for r, key in zip(runners, ("forge", "hf")):
        with PeakMemory(device) as pm:
            t0 = time.perf_counter()
            for _ in range(args.warmup):
                r.step(x, y, timed=False)
            warm_s[key] = time.perf_counter() - t0
        if args.warmup:
            mem[key] += pm.peak
    for _ in range(args.steps):
        for r in runners:
            r.step(x, y, timed=True)

    dev_name, peak = peak_flops(device, args.dtype)
    fpt = flops_per_token(fmodel, cfg, args.seq_len)
    rows = []
    for r, key in zip(runners, ("forge", "hf")):
        med = statistics.median(r.times)
        row = {"model": r.name, "step_s_median": med, "step_s_min": min(r.times),
               "tokens_per_s": tokens / med, "peak_mem_bytes": mem[key], "warmup_s": warm_s[key],
               "loss_at_init": parity.get(key), "last_loss": r.losses[-1], "optimizer": r.opt_name,
               "step_times_s": [round(t, 4) for t in r.times]}
        if peak:
            row["mfu"] = tokens / med * fpt / peak
        rows.append(row)
    out = {
        "device": dev_name, "dtype": args.dtype, "compile": args.compile, "threads": torch.get_num_threads(),
        "forge_linear": linear_backend if device.type == "cpu" and args.dtype == "fp32" else "aten",
        "shape": {"layers": cfg.n_layers, "d_model": cfg.d_model, "heads": cfg.n_heads, "kv_heads": cfg.kv_heads,
                  "d_ff": cfg.ff_dim, "vocab": cfg.vocab_size, "seq_len": args.seq_len, "batch": args.batch},
        "preset": args.preset, "steps": args.steps, "warmup": args.warmup, "tokens_per_step": tokens,
        "params": fmodel.num_params(), "flops_per_token": fpt, "peak_flops": peak, "results": rows,
    }
    if len(rows) == 2:
        out["ratio_forge_over_hf"] = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
        # per-round ratio (adjacent steps), robust to the machine's speed drifting over the run
        out["ratio_paired_median"] = statistics.median(h / f for f, h in zip(runners[0].times, runners[1].times))
        out["init_loss_abs_diff"] = abs(parity["forge"] - parity["hf"])
    if hf_error:
        out["hf_skipped"] = hf_error
    return out


def format_table(res: dict) -> str:
    s = res["shape"]
    lines = [f"forge bench: {res['device']}  dtype={res['dtype']}  compile={res['compile']}  "
             f"forge linear={res['forge_linear']}  threads={res['threads']}",
             f"shape: L={s['layers']} d={s['d_model']} heads={s['heads']}/{s['kv_heads']} d_ff={s['d_ff']} "
             f"vocab={s['vocab']} T={s['seq_len']} B={s['batch']}  params={res['params'] / 1e6:.1f}M  "
             f"FLOPs/token={res['flops_per_token'] / 1e9:.3f}G",
             f"steps: {res['warmup']} warmup + {res['steps']} timed (interleaved), optimizer "
             f"{res['results'][0]['optimizer']}",
             ""]
    has_mfu = any("mfu" in r for r in res["results"])
    head = (f"{'model':<26}{'step s (med)':>13}{'tokens/s':>11}{'peak mem MiB':>14}{'warmup s':>10}"
            f"{'loss@init':>11}")
    lines += [head + (f"{'MFU':>8}" if has_mfu else ""), "-" * (len(head) + (8 if has_mfu else 0))]
    for r in res["results"]:
        line = (f"{r['model']:<26}{r['step_s_median']:>13.3f}{r['tokens_per_s']:>11.1f}"
                f"{r['peak_mem_bytes'] / 2**20:>14.0f}{r['warmup_s']:>10.1f}"
                + (f"{r['loss_at_init']:>11.5f}" if r["loss_at_init"] is not None else f"{'-':>11}"))
        if has_mfu:
            line += f"{r['mfu'] * 100:>7.1f}%" if "mfu" in r else f"{'n/a':>8}"
        lines.append(line)
    if "ratio_forge_over_hf" in res:
        lines += ["", f"ratio forge/hf tokens/s: {res['ratio_forge_over_hf']:.3f}x  "
                      f"(median of per-round ratios: {res['ratio_paired_median']:.3f}x)  "
                      f"|loss@init diff|: {res['init_loss_abs_diff']:.2e}"]
    if "hf_skipped" in res:
        lines += ["", f"hf skipped: {res['hf_skipped']}"]
    if not has_mfu:
        lines.append("MFU: not reported (no GPU, or a GPU without a known peak)")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="forge bench", description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="model.key=value overrides of the preset")
    p.add_argument("--preset", default="tiny-llama")
    p.add_argument("--layers", type=int)
    p.add_argument("--d-model", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--kv-heads", type=int, help="default with --heads: = heads (MHA); else the preset's")
    p.add_argument("--d-ff", type=int, help="default with --d-model: 256*ceil(8d/3/256) (glu) or 4d (mlp)")
    p.add_argument("--vocab", type=int)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile Forge's forward + loss")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--linear", choices=["auto", "aten", "onednn"], default="auto",
                   help="Forge's CPU fp32 linear kernel (forge.kernels): auto = oneDNN when available")
    p.add_argument("--no-hf", action="store_true", help="time Forge only")
    p.add_argument("--hf-attn", default="sdpa", choices=["sdpa", "eager"],
                   help="transformers attention implementation (default sdpa, its own default)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        print("forge bench: --steps must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("forge bench: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    from forge import kernels
    previous = kernels.get_linear_backend()
    try:
        res = run(args)
    finally:
        kernels.set_linear_backend(previous)
    print(json.dumps(res, indent=2) if args.json else format_table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
