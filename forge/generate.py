"""Text generation: sampling helpers, `generate` (KV-cached decoding) and `forge generate`.

    forge generate --checkpoint OUT --prompt "ROMEO:" --max-new-tokens 200 \\
                   --temperature 0.8 --top-k 50 --top-p 0.95 --seed 0
    forge generate --checkpoint OUT --interactive

`--checkpoint` is a training run directory (the newest `checkpoints/step_*/` holding a COMPLETE
marker is used), one checkpoint step directory, or a Forge model folder (config.yaml + tokenizer
files + model.safetensors, or a checkpoint's sharded forge_index.json + shard-*.safetensors).

Decoding: the prompt is run once through the model filling a KVCache, then each new token is
fed alone, attending to the cached keys/values (O(T) per token instead of re-running the whole
sequence). The next token comes from the last position's logits z:
    temperature 0:   argmax z                                   (greedy)
    otherwise:       sample softmax(filter(z / temperature))    filter = top-k then top-p
Generation stops after max_new_tokens, when every row has produced eos_id, or at the model's
context length (model.cfg.max_seq_len), whichever comes first.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Callable, Optional

import torch

NEG_INF = float("-inf")


class GenerationError(ValueError):
    """A request that cannot be generated (prompt too long, cannot be encoded, ...)."""


# ------------------------------------------------------------------ sampling helpers
def top_k_filter(logits: torch.Tensor, k: Optional[int]) -> torch.Tensor:
    """Keep the k largest logits of each row (ties with the k-th value kept), the rest -> -inf.

    logits (..., V). k None, 0 or >= V leaves the logits unchanged. E.g. k=2:
    [1.0, 3.0, 2.0, 0.5] -> [-inf, 3.0, 2.0, -inf].
    """
    if k is None or k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]                   # (..., 1)
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits: torch.Tensor, p: Optional[float]) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probabilities sum to
    at least p (the most likely token is always kept), the rest -> -inf.

    A token is kept iff the total probability of the tokens strictly more likely than it (in
    descending order) is below p. p None or >= 1 leaves the logits unchanged. E.g. probabilities
    [0.5, 0.3, 0.15, 0.05] with p=0.7 keep the first two (0.5 < 0.7, 0.8 >= 0.7 stops after them).
    """
    if p is None or p >= 1.0:
        return logits
    if p <= 0:
        raise ValueError(f"top_p={p} must be in (0, 1]")
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs                           # mass strictly ahead
    remove_sorted = before >= p
    remove_sorted[..., 0] = False
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, NEG_INF)


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V): greedy when temperature == 0."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = top_p_filter(top_k_filter(logits / temperature, top_k), top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ------------------------------------------------------------------ generation
def context_length(model) -> int:
    return int(model.cfg.max_seq_len)


@torch.no_grad()
def generate(model, ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None,
             generator: Optional[torch.Generator] = None, seed: Optional[int] = None,
             eos_id: Optional[int] = None, use_cache: bool = True,
             on_token: Optional[Callable[[torch.Tensor], None]] = None) -> torch.Tensor:
    """Continue `ids` (B, T) by up to `max_new_tokens` tokens -> (B, T + n), n <= max_new_tokens.

    temperature 0 is greedy decoding; otherwise sampling with optional top-k / top-p filtering,
    drawn from `generator` (or a fresh one seeded with `seed`). A row that produced `eos_id` is
    padded with eos_id until every row has; generation then stops. With `use_cache` the prompt
    fills a KV cache once and each step feeds only the new token; without it each step re-runs
    the whole sequence (same tokens, slower: the reference the cache is tested against).
    `on_token(next_ids (B,))` is called after each step. A prompt longer than the model's
    context raises GenerationError; the output stops at the context length (with a warning).
    """
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise GenerationError(f"ids must be an integer tensor (B, T), got {tuple(ids.shape)} {ids.dtype}")
    B, T = ids.shape
    if T == 0:
        raise GenerationError("the prompt is empty: give at least one token (e.g. the end-of-document id)")
    ctx = context_length(model)
    if T > ctx:
        raise GenerationError(f"the prompt is {T} tokens, longer than the model's context of {ctx} tokens "
                              f"(model.max_seq_len); shorten it")
    vocab = model.cfg.vocab_size
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise GenerationError(f"token ids must be in [0, {vocab}) (the model's vocabulary), got "
                              f"[{int(ids.min())}, {int(ids.max())}]")
    n_new = max(0, int(max_new_tokens))
    if T + n_new > ctx:
        warnings.warn(f"prompt ({T}) + max_new_tokens ({n_new}) exceeds the context of {ctx} tokens; "
                      f"stopping after {ctx - T} new tokens", stacklevel=2)
        n_new = ctx - T
    device = next(model.parameters()).device
    ids = ids.to(device=device, dtype=torch.long)
    if generator is None and temperature > 0:
        generator = torch.Generator(device=device)
        if seed is not None:
            generator.manual_seed(seed)
        else:
            generator.seed()
    was_training = model.training
    model.eval()
    try:
        out = [ids]
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        cache = model.new_cache() if use_cache else None
        step_in = ids
        for _ in range(n_new):
            if use_cache:
                logits = model(step_in, cache=cache)[:, -1]
            else:
                logits = model(torch.cat(out, dim=1))[:, -1]
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            if eos_id is not None:
                nxt = nxt.masked_fill(finished, eos_id)
                finished |= nxt == eos_id
            out.append(nxt.unsqueeze(1))
            step_in = nxt.unsqueeze(1)
            if on_token is not None:
                on_token(nxt)
            if eos_id is not None and bool(finished.all()):
                break
        return torch.cat(out, dim=1)
    finally:
        model.train(was_training)


# ------------------------------------------------------------------ loading
def resolve_model_folder(path: str) -> str:
    """The Forge model folder behind `path`: a model folder itself, a checkpoint step directory
    (its `model/`; it must hold the COMPLETE marker), or a training run directory (the newest
    `checkpoints/step_*/` with a COMPLETE marker and a model folder)."""
    from forge.models.io import FOLDER_CONTENTS, is_forge_folder
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"--checkpoint {path!r} does not exist")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--checkpoint {path!r} is not a directory")
    from forge.models.discovery import complete_model_folder
    step_model = complete_model_folder(path)        # a step dir (or its model/): COMPLETE checked
    if step_model is not None and is_forge_folder(step_model):
        return step_model
    if is_forge_folder(path):
        return path
    if os.path.isdir(os.path.join(path, "checkpoints")):
        from forge.models.hf.convert import newest_checkpoint_model
        return newest_checkpoint_model(path)
    raise FileNotFoundError(f"--checkpoint {path!r} is neither a Forge model folder ({FOLDER_CONTENTS}), a "
                            f"checkpoint step directory (model/ + COMPLETE) nor a training run directory "
                            f"(checkpoints/)")


def load_for_generation(path: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(model in eval mode on `device`, tokenizer, model folder) from any --checkpoint form."""
    from forge.data.tokenizer import Tokenizer
    from forge.models.io import load_model_folder
    folder = resolve_model_folder(path)
    model, _ = load_model_folder(folder, dtype=dtype)
    try:
        tok = Tokenizer.load(folder)
    except (FileNotFoundError, OSError, ValueError) as e:
        raise FileNotFoundError(f"model folder {folder!r} has no usable tokenizer (tokenizer.json): {e}") from None
    if tok.vocab_size > model.cfg.vocab_size:
        warnings.warn(f"the tokenizer has {tok.vocab_size} tokens but the model only {model.cfg.vocab_size}")
    return model.to(device).eval(), tok, folder


# ------------------------------------------------------------------ CLI
class _Streamer:
    """Prints the decoded continuation as tokens arrive (re-decoding keeps multi-byte BPE and
    merged characters right: only the text beyond what was already printed is written)."""

    def __init__(self, tok, prompt_ids: list[int], eos_id: Optional[int], out=None):
        self.tok, self.prompt, self.eos_id = tok, list(prompt_ids), eos_id
        self.out = out if out is not None else sys.stdout
        self.new: list[int] = []
        self.printed = ""
        self.done = False

    def text(self) -> str:
        full = self.tok.decode(self.prompt + self.new)
        head = self.tok.decode(self.prompt)
        return full[len(head):] if full.startswith(head) else self.tok.decode(self.new)

    def __call__(self, nxt: torch.Tensor) -> None:
        t = int(nxt[0])
        if self.done or (self.eos_id is not None and t == self.eos_id):
            self.done = True
            return
        self.new.append(t)
        text = self.text()
        if text.endswith("\ufffd"):          # an incomplete UTF-8 sequence: wait for the rest
            return
        if text.startswith(self.printed):
            self.out.write(text[len(self.printed):])
            self.out.flush()
            self.printed = text

    def finish(self) -> None:
        text = self.text()
        if text.startswith(self.printed):
            self.out.write(text[len(self.printed):])
        self.out.write("\n")
        self.out.flush()


def encode_prompt(tok, text: str, ctx: int, vocab: int) -> list[int]:
    """Token ids of `text` (an empty prompt starts from the end-of-document token), or a
    GenerationError that says what is wrong."""
    try:
        ids = tok.encode(text) if text else []
    except ValueError as e:
        raise GenerationError(f"the tokenizer cannot encode the prompt: {e}") from None
    if not ids:
        ids = [tok.eod_id]
    if len(ids) > ctx:
        raise GenerationError(f"the prompt is {len(ids)} tokens, longer than the model's context of {ctx} "
                              f"tokens (model.max_seq_len); shorten it")
    bad = sorted({i for i in ids if i >= vocab})
    if bad:
        raise GenerationError(f"the prompt encodes to token ids {bad[:10]} outside the model's vocabulary of "
                              f"{vocab}: the tokenizer does not belong to this model")
    return ids


def run_one(model, tok, text: str, args, generator: torch.Generator, out=None) -> str:
    ctx = context_length(model)
    ids = encode_prompt(tok, text, ctx, model.cfg.vocab_size)
    eos = None if args.ignore_eod else tok.eod_id
    n = args.max_new_tokens
    if len(ids) + n > ctx:
        print(f"[note: the context is {ctx} tokens; generating {ctx - len(ids)} instead of {n}]", file=sys.stderr)
        n = ctx - len(ids)
    streamer = _Streamer(tok, ids if text else [], eos, out)
    prompt = torch.tensor([ids], dtype=torch.long)
    generate(model, prompt, n, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
             generator=generator, eos_id=eos, use_cache=not args.no_cache, on_token=streamer)
    streamer.finish()
    return streamer.text()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="forge generate", description="Sample text from a Forge checkpoint.")
    p.add_argument("--checkpoint", required=True,
                   help="training run dir (newest complete checkpoint), checkpoint step dir, or model folder")
    p.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--interactive", action="store_true", help="read prompts from stdin in a loop")
    p.add_argument("--ignore-eod", action="store_true", help="keep going past the end-of-document token")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each step")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.temperature < 0:
        print("forge generate: --temperature must be >= 0", file=sys.stderr)
        return 2
    if args.top_p is not None and not 0 < args.top_p <= 1:
        print("forge generate: --top-p must be in (0, 1]", file=sys.stderr)
        return 2
    if args.max_new_tokens < 0:
        print("forge generate: --max-new-tokens must be >= 0", file=sys.stderr)
        return 2
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    try:
        model, tok, _ = load_for_generation(args.checkpoint, args.device, dtype)
    except (FileNotFoundError, ValueError) as e:
        print(f"forge generate: {e}", file=sys.stderr)
        return 2
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    if args.seed is not None:
        generator.manual_seed(args.seed)
    else:
        generator.seed()
    if not args.interactive:
        try:
            run_one(model, tok, args.prompt, args, generator)
        except GenerationError as e:
            print(f"forge generate: {e}", file=sys.stderr)
            return 2
        return 0
    print(f"forge generate: interactive (context {context_length(model)} tokens); an empty line or "
          f"Ctrl-D quits, Ctrl-C stops a generation", file=sys.stderr)
    if args.prompt:
        try:
            run_one(model, tok, args.prompt, args, generator)
        except GenerationError as e:
            print(f"error: {e}", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if not line.strip():
            return 0
        try:
            run_one(model, tok, line, args, generator)
        except GenerationError as e:
            print(f"error: {e}", file=sys.stderr)
        except KeyboardInterrupt:
            print("\n[interrupted]", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
