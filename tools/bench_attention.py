"""Forward + backward speed and memory of each attention kind against causal softmax (SDPA), on CPU.

    python tools/bench_attention.py [--seq-lens 256 1024] [--d-model 64] [--n-heads 4] [--layers 2]
                                    [--batch 2] [--steps 3] [--chunk 256] [--kinds softmax consmax ...]

Every kind is the same decoder (d_model, n_heads, layers, vocabulary 256, GLU MLP) with one setting
changed; each runs in a fresh process so its peak resident memory (ru_maxrss) is its own. Figures:
    tokens/s    batch * T / (median seconds of one forward + backward), after one warm-up step
    x softmax   tokens/s over causal softmax's, timed in the same process, steps alternating with
                the kind's (so a machine that others load changes both alike)
    saved MiB   bytes the forward leaves for backward (saved tensors, one count per storage):
                the activation memory the kind costs; softmax through SDPA keeps no T x T scores,
                explicit scores keep only each chunk's inputs (chunks are recomputed in backward)
    cache B/tok bytes the KV cache holds per token (all layers, fp32) after a cached 16-token prefix:
                keys and values, an mla layer's latent and rotary key, nothing for identity
    peak MiB    growth of the process's peak RSS over what it held after building the model
                (T in increasing order, so each peak is that length's); the children run with
                MALLOC_MMAP_THRESHOLD_=65536 so that glibc returns freed tensors to the system
                (else its adaptive threshold keeps them in the heap and the peak reads ~200 MiB
                high whatever the chunk); still coarse on a loaded machine
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

KINDS = {  # name -> model overrides (each against "softmax", the default)
    "softmax": {},
    "softermax": dict(attention_softmax="softermax"),
    "strongermax": dict(attention_softmax="strongermax", strongermax_base=3.0, strongermax_temperature=2.0),
    "consmax": dict(attention_softmax="consmax"),
    "sigmoid": dict(attention_softmax="sigmoid"),
    "polymax": dict(attention_softmax="polymax"),
    "relumax": dict(attention_softmax="relumax"),
    "relu2max": dict(attention_softmax="relu2max"),
    "softplus": dict(attention_softmax="softplus"),
    "squareplus": dict(attention_softmax="squareplus"),
    "qk_norm=l2_scale": dict(qk_norm="l2_scale"),
    "qk/v widths 8/32": dict(qk_head_dim=8, v_head_dim=32),
    "identity": dict(attention="identity"),
    # Mamba-2 layers in place of attention (inner width 2 d_model, heads of 16, state 16, chunks of 64)
    "ssm": dict(attention="ssm", ssm_head_dim=16, ssm_state_size=16, ssm_chunk_size=64),
    # multi-head latent attention (DeepSeek): latent 32 + shared rotary key 8 cached per token and layer
    "mla": dict(attention="mla", q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8),
}


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024      # Linux: KiB


def _step(model, ids) -> float:
    t0 = time.perf_counter()
    model.loss(model(ids[:, :-1]), ids[:, 1:]).backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def child(args) -> None:
    import torch
    from forge.config import ModelConfig
    from forge.models import build_model
    torch.set_num_threads(args.threads)
    kw = dict(vocab_size=256, d_model=args.d_model, n_heads=args.n_heads, n_layers=args.layers,
              max_seq_len=max(args.seq_lens), d_ff=4 * args.d_model, attention_chunk=args.chunk)
    model = build_model(ModelConfig(**kw, **KINDS[args.child]), seed=0).train()
    ref = build_model(ModelConfig(**kw), seed=0).train()
    base = _rss_mib()
    out = {}
    for T in sorted(args.seq_lens):
        ids = torch.randint(0, 256, (args.batch, T + 1), generator=torch.Generator().manual_seed(T))
        saved = {}

        def pack(t):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model.loss(model(ids[:, :-1]), ids[:, 1:])
        loss.backward()
        model.zero_grad(set_to_none=True)
        peak = _rss_mib() - base                  # before the reference runs at this length
        _step(ref, ids)
        times, ref_times = [], []
        for _ in range(args.steps):
            times.append(_step(model, ids))
            ref_times.append(_step(ref, ids))
        out[T] = dict(tokens_per_s=args.batch * T / statistics.median(times), saved_mib=sum(saved.values()) / 2 ** 20,
                      peak_mib=peak, vs_softmax=statistics.median(ref_times) / statistics.median(times))
    cache = model.new_cache()
    with torch.no_grad():
        model.eval()(torch.randint(0, 256, (args.batch, 16)), cache=cache)
    held = sum(t.numel() * t.element_size() for t in cache.k + cache.v if t is not None)
    out["cache_bytes_per_token"] = held / (args.batch * 16)
    print(json.dumps(out))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--chunk", type=int, default=256, help="model.attention_chunk")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--kinds", nargs="+", default=list(KINDS), help=f"any of {list(KINDS)}")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0
    bad = [k for k in args.kinds if k not in KINDS]
    if bad:
        p.error(f"unknown kinds {bad}; valid: {list(KINDS)}")
    passed = [a for a in (argv if argv is not None else sys.argv[1:])]
    results = {}
    for kind in args.kinds:
        r = subprocess.run([sys.executable, os.path.abspath(__file__), *passed, "--child", kind],
                           capture_output=True, text=True, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
        if r.returncode:
            print(f"{kind}: failed\n{r.stderr[-2000:]}", file=sys.stderr)
            return 1
        res = json.loads(r.stdout.strip().splitlines()[-1])
        cache_bytes = res.pop("cache_bytes_per_token")
        results[kind] = {int(t): v for t, v in res.items()}
        results[kind]["cache"] = cache_bytes
    print(f"d_model {args.d_model}, {args.n_heads} heads, {args.layers} layers, batch {args.batch}, "
          f"chunk {args.chunk}, {args.threads} thread(s), forward + backward")
    head = f"{'kind':<18}| cache B/tok " + "".join(f"| T={T:<5} tok/s  x softmax  saved MiB  peak MiB " for T in args.seq_lens)
    print(head)
    print("-" * len(head))
    for kind, r in results.items():
        row = f"{kind:<18}| {r['cache']:>11.0f} "
        for T in args.seq_lens:
            row += (f"| {r[T]['tokens_per_s']:>11.0f}  {r[T]['vs_softmax']:>9.2f}  {r[T]['saved_mib']:>9.1f}  "
                    f"{r[T]['peak_mib']:>8.1f} ")
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
