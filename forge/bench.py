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

HF side: the transformers class of the conversion family that represents the model exactly (the
one `forge convert --to hf` would write, forge.models.hf.convert.pick_family; e.g. Llama, Qwen2 for
q/k/v-only biases, Mistral for sliding window), its weights from Forge's through that family's key
map, with its default attention implementation (sdpa) and no torch.compile ("eager" mode), its
loss computed by its own loss function (`labels=..., shift_labels=...`). A model no family
represents is timed alone, and the reason is printed.
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
from typing import Optional

import torch

from forge.config import ConfigError, ModelConfig, model_from_dict, parse_overrides
from forge.dtypes import DTYPES

# Dense (no sparsity) peak FLOP/s by device-name substring, checked in order.
PEAK_FLOPS = [
    ("H200", {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}),
    ("H100 PCIe", {"bf16": 756.5e12, "fp16": 756.5e12, "tf32": 378.0e12, "fp32": 51.2e12}),
    ("H100", {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}),
    ("A100", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
]

def bench_config(args) -> ModelConfig:
    """The preset with the shape flags and `model.key=value` overrides applied."""
    from forge.models.presets import PRESETS
    if args.preset not in PRESETS:
        raise ConfigError(f"--preset {args.preset!r} is not one of {sorted(PRESETS)}")
    cfg = model_from_dict({"preset": args.preset})
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
def hf_counterpart(cfg: ModelConfig, dtype: torch.dtype):
    """(family spec, transformers config, model class) of the conversion family that represents
    `cfg` exactly (forge.models.hf.convert.pick_family: the one `forge convert --to hf` writes),
    or raise UnsupportedModelError (a ValueError) saying why no family does."""
    import transformers
    from forge.models.hf.convert import hf_config_for, pick_family
    spec = pick_family(cfg)
    hf_cfg = hf_config_for(spec, cfg, dtype)
    hf_cfg.use_cache = False
    return spec, hf_cfg, getattr(transformers, spec.architecture)


def hf_state_dict(spec, cfg: ModelConfig, model) -> dict[str, torch.Tensor]:
    """Forge `model`'s weights under the family's in-memory HF names (its key map and transforms,
    as `forge convert --to hf` writes them; on-disk names that transformers renames in memory,
    e.g. GPT-NeoX's embed_out -> lm_head, mapped back through the family's aliases)."""
    from forge.models.hf.convert import forge_to_hf_state_dict
    from forge.models.io import unique_state_dict
    on_disk = {v: k for k, v in spec.aliases.items()}
    sd = forge_to_hf_state_dict(spec, cfg, unique_state_dict(model))
    return {on_disk.get(k, k): t for k, t in sd.items()}


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
    return 6 * n + 12 * cfg.n_layers * cfg.n_heads * model.cfg.head_dim * seq_len      # model.cfg: resolved


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
    spec, hf_cfg, cls = hf_counterpart(cfg, dtype)
    hf_cfg._attn_implementation = attn_impl
    with torch.device(device):
        hf = cls(hf_cfg).to(dtype)
    missing, unexpected = hf.load_state_dict(hf_state_dict(spec, cfg, forge_model), strict=False)
    missing = [k for k in missing if not (cfg.tie_embeddings and k in spec.tied_hf_keys)]
    if missing or unexpected:
        raise ValueError(f"{spec.architecture}: transformers' in-memory parameter names differ from the "
                         f"family's file names (missing {missing[:3]}, unexpected {unexpected[:3]})")
    hf.train()

    def loss_fn(x, y):
        return hf(input_ids=x, labels=y, shift_labels=y).loss

    return hf, loss_fn


def _build_runners(args, cfg, device, dtype, x, y) -> tuple[list, dict, dict, Optional[str]]:
    """Forge's model and (unless --no-hf, or no family represents it) its Hugging Face counterpart
    at the same weights: (runners, build memory per model, loss at init per model, why HF is absent)."""
    mem, parity, hf_error = {}, {}, None
    with PeakMemory(device) as pm:
        fmodel, floss = _build_forge(cfg, device, dtype, args.compile, args.seed)
    mem["forge"] = pm.peak
    runners = [Runner("forge" + (" (compiled)" if args.compile else ""), fmodel, floss, device)]
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
    return runners, mem, parity, hf_error


def _time_runners(runners, args, x, y, mem: dict) -> dict:
    """Warm each model up (its peak above the start is added to `mem`), then time args.steps steps,
    alternating the models so both see the same machine load. Returns the warmup seconds per model."""
    warm_s = {}
    for r, key in zip(runners, ("forge", "hf")):
        with PeakMemory(r.device) as pm:
            t0 = time.perf_counter()
            for _ in range(args.warmup):
                r.step(x, y, timed=False)
            warm_s[key] = time.perf_counter() - t0
        if args.warmup:
            mem[key] += pm.peak
    for _ in range(args.steps):
        for r in runners:
            r.step(x, y, timed=True)
    return warm_s


def run(args) -> dict:
    """Time `forge` (and HF) training steps on random tokens; memory of a model = what building it
    adds + the peak of its warmup steps above their start; MFU = tokens/s * FLOPs per token / peak."""
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
    runners, mem, parity, hf_error = _build_runners(args, cfg, device, dtype, x, y)
    warm_s = _time_runners(runners, args, x, y, mem)

    fmodel = runners[0].model
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
    sizes = fmodel.cfg                                   # resolved: every size filled in
    out = {
        "device": dev_name, "dtype": args.dtype, "compile": args.compile, "threads": torch.get_num_threads(),
        "forge_linear": linear_backend if device.type == "cpu" and args.dtype == "fp32" else "aten",
        "shape": {"layers": sizes.n_layers, "d_model": sizes.d_model, "heads": sizes.n_heads,
                  "kv_heads": sizes.n_kv_heads, "d_ff": sizes.d_ff, "vocab": sizes.vocab_size,
                  "seq_len": args.seq_len, "batch": args.batch},
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
