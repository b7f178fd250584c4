"""Text generation: sampling helpers, `generate` (KV-cached decoding) and `forge generate`.

    forge generate --checkpoint OUT --prompt "ROMEO:" --max-new-tokens 200 \\
                   --temperature 0.8 --top-k 50 --top-p 0.95 --seed 0
    forge generate --checkpoint OUT --interactive
    forge generate --checkpoint OUT --steer vec.safetensors --steer-scale 4   (forge.steer)

`--checkpoint` is a training run directory (the newest `checkpoints/step_*/` holding a COMPLETE
marker is used), one checkpoint step directory, or a Forge model folder (config.yaml + tokenizer
files + model.safetensors, or a checkpoint's sharded forge_index.json + shard-*.safetensors),
or a Hugging Face folder / hub repo id (read by forge.from_pretrained's loader). The prompt is
printed before its continuation (--no-echo: the continuation alone). Bad flag values are refused
by argparse (exit 2, naming the flag). --interactive edits lines with readline where Python has
it, keeping the lines typed in --history (default ~/.forge_history; '' for none).

Decoding: the prompt is run once through the model filling a KVCache, then each new token is
fed alone, attending to the cached keys/values (O(T) per token instead of re-running the whole
sequence). The next token comes from the last position's logits z:
    temperature 0:   argmax z                                   (greedy)
    otherwise:       sample softmax(filter(z / temperature))    filter = top-k then top-p
Generation stops after max_new_tokens or when every row has produced eos_id.

Past the context (C = model.cfg.max_seq_len) the window slides: the model only ever sees
positions 0..C-1, as in training, so once the cached window would exceed C tokens the cache is
recomputed from the last C-1 tokens, which then sit at positions 0..C-2 (with RoPE a cached
key cannot be moved to another position; recomputing is exact and simple). Precisely, with s
the sequence so far (length L) and `start` the window's first token (initially 0):
    if L - start > C:  start = L - (C - 1)
    next token from the logits of model(s[start:L]) at its last position
so the model conditions on C-1 or C tokens, alternately, once the sequence is longer than C.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from typing import Callable, Optional

import torch

from forge.dtypes import DTYPES

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
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature={temperature} must be a finite number >= 0")
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = top_p_filter(top_k_filter(logits / temperature, top_k), top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ------------------------------------------------------------------ generation
def context_length(model) -> int:
    return int(model.cfg.max_seq_len)


def window_start(length: int, start: int, ctx: int) -> int:
    """The first token of the window the model conditions on, for a sequence of `length` tokens
    whose previous window began at `start`: unchanged while the window fits the context `ctx`,
    else the last ctx - 1 tokens (see the module doc)."""
    return length - max(1, ctx - 1) if length - start > ctx else start


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
    the whole window (same tokens, slower). Past the model's context the window slides (module
    doc: the cache is recomputed from the last context - 1 tokens). `on_token(next_ids (B,))`
    is called after each step. A prompt longer than the model's context raises GenerationError.
    """
    ctx = _check_request(model, ids, temperature, top_p)
    device = next(model.parameters()).device
    ids = ids.to(device=device, dtype=torch.long)
    generator = _sampling_generator(generator, seed, temperature, device)
    was_training = model.training
    model.eval()
    try:
        return _decode(model, ids, max(0, int(max_new_tokens)), ctx, eos_id, use_cache, on_token,
                       lambda logits: sample_next(logits, temperature, top_k, top_p, generator))
    finally:
        model.train(was_training)


def _check_request(model, ids: torch.Tensor, temperature: float, top_p: Optional[float]) -> int:
    """Refuse what `generate` cannot serve with a GenerationError naming the argument, before the
    model runs: ids not (B, T) integers, an empty or over-long prompt, ids outside the model's
    vocabulary, a negative or non-finite temperature, top_p outside (0, 1]. Returns the context."""
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise GenerationError(f"ids must be an integer tensor (B, T), got {tuple(ids.shape)} {ids.dtype}")
    T = ids.shape[1]
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
    if not math.isfinite(temperature) or temperature < 0:
        raise GenerationError(f"temperature={temperature} must be a finite number >= 0")
    if top_p is not None and not 0 < top_p <= 1:
        raise GenerationError(f"top_p={top_p} must be in (0, 1]")
    return ctx


def _sampling_generator(generator: Optional[torch.Generator], seed: Optional[int], temperature: float,
                        device) -> Optional[torch.Generator]:
    """What sampling draws from: `generator` when given; else, when sampling (temperature > 0), a
    fresh one on `device` seeded with `seed` (from the OS when seed is None); greedy needs none."""
    if generator is None and temperature > 0:
        generator = torch.Generator(device=device)
        if seed is not None:
            generator.manual_seed(seed)
        else:
            generator.seed()
    return generator


def _decode(model, ids: torch.Tensor, n_new: int, ctx: int, eos_id: Optional[int], use_cache: bool,
            on_token: Optional[Callable[[torch.Tensor], None]],
            sample: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The decoding loop of `generate` (its doc): `sample(logits (B, V)) -> (B,)` picks each token.
    Keeps: the model sees at most `ctx` tokens, the window seq[:, start:]; with the cache, the
    cache holds the window's tokens but `step_in`, which the next call feeds (the prompt first,
    then the newest token; the whole window again after a slide). A row past eos_id stays eos_id."""
    B = ids.shape[0]
    seq = ids                                          # (B, L)
    finished = torch.zeros(B, dtype=torch.bool, device=ids.device)
    cache = model.new_cache() if use_cache else None
    step_in, start = ids, 0                            # tokens not yet in the cache; window start
    for _ in range(n_new):
        new_start = window_start(seq.shape[1], start, ctx)
        if new_start != start and use_cache:           # slide: recompute the cache from the window
            cache, step_in = model.new_cache(), seq[:, new_start:]
        start = new_start
        if use_cache:
            logits = model(step_in, cache=cache)[:, -1]   # (B, V)
        else:
            logits = model(seq[:, start:])[:, -1]
        nxt = sample(logits)                               # (B,)
        if eos_id is not None:
            nxt = nxt.masked_fill(finished, eos_id)
            finished |= nxt == eos_id
        seq = torch.cat([seq, nxt.unsqueeze(1)], dim=1)
        step_in = nxt.unsqueeze(1)
        if on_token is not None:
            on_token(nxt)
        if eos_id is not None and bool(finished.all()):
            break
    return seq


# ------------------------------------------------------------------ loading
def resolve_model_folder(path: str, flag: str = "--checkpoint") -> str:
    """The Forge model folder behind `path`: a model folder itself, a checkpoint step directory
    (its `model/`; it must hold the COMPLETE marker), or a training run directory (the newest
    `checkpoints/step_*/` with a COMPLETE marker and a model folder)."""
    from forge.models.io import FOLDER_CONTENTS
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{flag} {path!r} does not exist")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{flag} {path!r} is not a directory")
    from forge.models.discovery import find_model_folder
    folder = find_model_folder(path)                # a step dir (COMPLETE checked), run dir, model folder
    if folder is not None:
        return folder
    raise FileNotFoundError(f"{flag} {path!r} is neither a Forge model folder ({FOLDER_CONTENTS}), a "
                            f"checkpoint step directory (model/ + COMPLETE), a training run directory "
                            f"(checkpoints/) nor a Hugging Face folder (config.json)")


def resolve_checkpoint(path: str, flag: str = "--checkpoint") -> tuple[str, str]:
    """("forge", Forge model folder) as resolve_model_folder finds it, or ("hf", folder) for a
    Hugging Face folder (config.json + weights) or a hub repo id (from the local cache, or
    downloaded when online): what forge.from_pretrained accepts, located by its own resolver."""
    from forge.models.hf.convert import _REPO_ID, HF_CONFIG, resolve
    from forge.models.io import is_forge_folder
    path = os.fspath(path)
    if os.path.isdir(path) and not is_forge_folder(path) and os.path.isfile(os.path.join(path, HF_CONFIG)):
        return "hf", path
    if not os.path.exists(path) and _REPO_ID.fullmatch(path) and not path.startswith((".", "/")):
        try:
            return resolve(path)
        except (ConnectionError, OSError, ValueError) as e:
            raise FileNotFoundError(f"{flag} {path!r} does not exist here, and as a Hugging Face hub repo "
                                    f"id: {e}") from None
    return "forge", resolve_model_folder(path, flag)


def load_for_generation(path: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
                        flag: str = "--checkpoint"):
    """(model in eval mode on `device`, tokenizer, model folder) from any --checkpoint form: a
    Forge folder / step dir / run dir, or a Hugging Face folder or hub id (converted on load by
    forge.from_pretrained's loader)."""
    from forge.data.tokenizer import Tokenizer
    from forge.models.io import load_model_folder
    kind, folder = resolve_checkpoint(path, flag)
    if kind == "hf":
        from forge.models.hf.convert import from_pretrained
        model = from_pretrained(folder, dtype=dtype)
    else:
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
    """Generate from `text` as the flags in `args` say, streaming to `out` (stdout): the prompt
    first unless args.no_echo, then the continuation; returns the continuation."""
    out = out if out is not None else sys.stdout
    ctx = context_length(model)
    ids = encode_prompt(tok, text, ctx, model.cfg.vocab_size)
    eos = None if args.ignore_eod else tok.eod_id
    n = args.max_new_tokens
    if len(ids) + n > ctx:
        print(f"[note: the context is {ctx} tokens; past it each token is predicted from the last {ctx - 1} "
              f"to {ctx} tokens (a sliding window)]", file=sys.stderr)
    if text and not args.no_echo:
        out.write(text)
        out.flush()
    streamer = _Streamer(tok, ids if text else [], eos, out)
    prompt = torch.tensor([ids], dtype=torch.long)
    generate(model, prompt, n, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
             generator=generator, eos_id=eos, use_cache=not args.no_cache, on_token=streamer)
    streamer.finish()
    return streamer.text()


# argparse types: a bad value is refused by argparse itself, naming the flag, with exit status 2
def checked(parse: Callable, ok: Callable, need: str) -> Callable[[str], object]:
    """An argparse `type`: `parse(text)` (int or float), then `ok(value)`; either failing is an
    ArgumentTypeError (argparse: exit 2 naming the flag) saying what the flag needs."""
    kind = "an integer" if parse is int else "a number"

    def convert(text: str):
        try:
            v = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {kind}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"{text} must be {need}")
        return v
    convert.__name__ = need         # argparse names the type in its "invalid <name> value" fallback
    return convert


positive_int = checked(int, lambda v: v >= 1, "a positive integer (>= 1)")
temperature_value = checked(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0 (0 = greedy)")
probability = checked(float, lambda v: 0 < v <= 1, "in (0, 1]")                # also refuses nan
seed_value = checked(int, lambda v: 0 <= v < 2 ** 63, "in [0, 2**63)")


def device_value(text: str) -> str:
    try:
        d = torch.device(text)
    except RuntimeError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device ({e})") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine (use cpu)")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="forge generate", description="Sample text from a Forge checkpoint.")
    p.add_argument("--checkpoint", required=True,
                   help="training run dir (newest complete checkpoint), checkpoint step dir, Forge model folder, "
                        "or Hugging Face folder / hub repo id (as forge.from_pretrained)")
    p.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    p.add_argument("--max-new-tokens", type=positive_int, default=200,
                   help="tokens to generate; past the context the window slides")
    p.add_argument("--temperature", type=temperature_value, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=positive_int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=probability, default=None, help="nucleus sampling mass, in (0, 1]")
    p.add_argument("--seed", type=seed_value, default=None)
    p.add_argument("--interactive", action="store_true",
                   help="read prompts from stdin in a loop (line editing and history where readline exists)")
    p.add_argument("--history", default=os.path.join("~", ".forge_history"),
                   help="interactive history file (default ~/.forge_history; '' for none)")
    p.add_argument("--no-echo", action="store_true", help="print only the continuation, not the prompt first")
    p.add_argument("--ignore-eod", action="store_true", help="keep going past the end-of-document token")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole window each step")
    p.add_argument("--device", type=device_value, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--steer", default=None,
                   help="steering vector file (forge steer extract): added to the residual stream at its layer")
    p.add_argument("--steer-scale", type=float, default=1.0, help="multiplier of the --steer vector")
    p.add_argument("--steer-dataset", type=int, default=None, metavar="I",
                   help="a model trained with model.steering_datasets: add the learned vector of dataset I "
                        "(0-based, in data.paths order) to every sample (default: none of them)")
    return p


def setup_history(path: str):
    """Line editing (arrow keys, Ctrl-R) through readline when Python has it, with the lines
    typed read from and saved to `path` (none when empty). Returns a function that saves the
    history, or None without readline."""
    try:
        import readline
    except ImportError:                      # e.g. Windows without pyreadline: plain input()
        return None
    readline.clear_history()
    readline.set_auto_history(False)         # lines are added by add_line (also when stdin is a pipe)
    path = os.path.expanduser(path) if path else ""
    if path and os.path.isfile(path):
        try:
            readline.read_history_file(path)
        except OSError as e:
            print(f"forge generate: cannot read the history file {path!r}: {e}", file=sys.stderr)
    readline.set_history_length(1000)

    def save() -> None:
        if path:
            try:
                readline.write_history_file(path)
            except OSError as e:
                print(f"forge generate: cannot write the history file {path!r}: {e}", file=sys.stderr)
    return save


def interactive(model, tok, args, generator) -> int:
    print(f"forge generate: interactive (context {context_length(model)} tokens); an empty line or "
          f"Ctrl-D quits, Ctrl-C stops a generation", file=sys.stderr)
    save = setup_history(args.history)
    if args.prompt:
        try:
            run_one(model, tok, args.prompt, args, generator)
        except GenerationError as e:
            print(f"error: {e}", file=sys.stderr)
    try:
        while True:
            try:
                line = input("> ")
            except (EOFError, KeyboardInterrupt):
                print(file=sys.stderr)
                return 0
            if not line.strip():
                return 0
            if save is not None:
                import readline
                readline.add_history(line)
            try:
                run_one(model, tok, line, args, generator)
            except GenerationError as e:
                print(f"error: {e}", file=sys.stderr)
            except KeyboardInterrupt:
                print("\n[interrupted]", file=sys.stderr)
    finally:
        if save is not None:
            save()


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    dtype = DTYPES[args.dtype]
    try:
        model, tok, _ = load_for_generation(args.checkpoint, args.device, dtype)
        if args.steer:
            from forge.steer import load_vector, set_steering
            vector, layer = load_vector(args.steer)
            set_steering(model, vector, layer, args.steer_scale)
        if args.steer_dataset is not None:
            from forge.steer import set_steering_dataset
            set_steering_dataset(model, args.steer_dataset)
    except (FileNotFoundError, ValueError) as e:
        print(f"forge generate: {e}", file=sys.stderr)
        return 2
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    if args.seed is not None:
        generator.manual_seed(args.seed)
    else:
        generator.seed()
    if args.interactive:
        return interactive(model, tok, args, generator)
    try:
        run_one(model, tok, args.prompt, args, generator)
    except GenerationError as e:
        print(f"forge generate: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
