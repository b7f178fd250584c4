"""Helpers shared by several test files (`from tests.helpers import ...`)."""
import os

import torch


def tiny_run_args(out_dir, cache, *extra):
    """Overrides of a tiny training run (2 layers, d_model 32, seq 32, micro batch 4) writing to
    `out_dir` with its data cache in `cache`; `extra` (run length, intervals, ...) come last and
    win."""
    return ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.max_seq_len=32", "data.seq_len=32",
            f"data.cache_dir={cache}", "train.micro_batch_size=4", f"train.out_dir={out_dir}", "log.progress=false",
            *extra]


def snapshot(path):
    """{relative path: (size, mtime)} of every file under `path`."""
    out = {}
    for d, _, files in os.walk(path):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, path)] = (os.path.getsize(p), os.stat(p).st_mtime_ns)
    return out


def assert_causal(model, seq_len, t, vocab=64):
    """Changing token t leaves the logits before t bit-identical and changes those from t on."""
    ids = torch.randint(0, vocab, (2, seq_len), generator=torch.Generator().manual_seed(0))
    other = ids.clone()
    other[:, t] = (ids[:, t] + 1) % vocab
    with torch.no_grad():
        a, b = model(ids), model(other)
    assert torch.equal(a[:, :t], b[:, :t])
    assert (a[:, t:] - b[:, t:]).abs().max() > 1e-4


def assert_cache_decoding_equals_recomputation(model, new_tokens, vocab=64):
    """A 19-token sequence fed as a prompt of 7 through the cache, then 1 and 3 tokens at a time:
    the logits equal one full pass within 1e-5 and the cache holds 19 positions; greedy decoding
    of `new_tokens` with the cache equals decoding without it."""
    from forge.generate import generate
    seq = torch.randint(0, vocab, (2, 19), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(seq)
        cache = model.new_cache()
        parts = [model(seq[:, :7], cache=cache), model(seq[:, 7:8], cache=cache)]
        parts += [model(seq[:, t:t + 3], cache=cache) for t in range(8, 19, 3)]
    assert cache.length == 19
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    prompt = seq[:, :5]
    assert torch.equal(generate(model, prompt, new_tokens, temperature=0.0, use_cache=True),
                       generate(model, prompt, new_tokens, temperature=0.0, use_cache=False))


def built_data(folder):
    """`folder` after building the tiny runs' data in it (Shakespeare, 32-token sequences, the
    default seed) in this process, so that several training processes then only read it."""
    from forge.config import load_config
    from forge.data import build_data
    cfg = load_config(None, ["data.seq_len=32", "model.max_seq_len=32", f"data.cache_dir={folder}"])
    build_data(cfg.data, seed=cfg.train.seed, work_dir=folder, rank=0, world_size=1)
    return folder


def assert_same_training(losses, weights, ref_losses, ref_weights, tol=1e-5):
    """Two training runs agree: as many losses, each within `tol` relative of the reference's,
    and the same tensors, each within `tol` relative to it (2-norms)."""
    assert len(losses) == len(ref_losses)
    assert all(abs(a - b) <= tol * abs(b) for a, b in zip(losses, ref_losses)), (losses, ref_losses)
    assert weights.keys() == ref_weights.keys()
    for key, ref in ref_weights.items():
        err = (weights[key] - ref).norm() / ref.norm().clamp_min(1e-12)
        assert err <= tol, f"{key}: relative difference {err:.2e}"


ALPHABET = "\n !',.:;?abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def save_char_model(path, tok_dir, max_seq_len, std):
    """A tiny Forge model folder at `path` (d_model 32, 2 layers, weights N(0, std), seed 0) with a
    character tokenizer over ALPHABET saved in `tok_dir`; returns (model in eval mode, tokenizer)."""
    from forge.config import ModelConfig
    from forge.data.tokenizer import CharTokenizer
    from forge.models import build_model
    from forge.models.io import model_config_dict, save_model_folder
    tok = CharTokenizer.from_alphabet(ALPHABET)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, max_seq_len=max_seq_len)
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, std)
    tok.save(str(tok_dir))
    save_model_folder(model, model_config_dict(cfg), str(path), tokenizer_dir=str(tok_dir))
    return model.eval(), tok
