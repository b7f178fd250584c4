"""lm-evaluation-harness over a Forge model: `ForgeLM` (lm_eval's `LM` API) and `forge eval
CHECKPOINT --tasks ...`. Needs the optional extra: pip install 'forge[eval]' (lm_eval 0.4.9).

    forge eval runs/x --tasks hellaswag,lambada_openai            # tasks lm_eval ships (downloads data)
    forge eval runs/x --tasks my_task --include-path my_tasks/    # local task YAMLs

The three request types, for a model f with context C = model.max_seq_len and tokenizer enc:

* loglikelihood(context, continuation) -> (sum_t log p(y_t | x, y_<t), greedy): x = enc(context)
  (the end-of-document token when the context is empty), y = the tokens enc(context +
  continuation) adds after x (lm_eval's split: trailing spaces of the context move to the
  continuation); the model reads (x + y)[:-1], left-truncated to its last C tokens, and
      logprob = sum_{t in y} log_softmax(f(x + y)[pos(t) - 1])[t]
  greedy = every y_t is the argmax at its position.
* loglikelihood_rolling(text) -> log p(text): the text's tokens after the end-of-document token,
  scored in lm_eval's disjoint rolling windows of C tokens (lm_eval.utils.get_rolling_token_windows,
  each window conditioned on as much preceding text as fits); equal to one forward pass when
  the text fits the context.
* generate_until(context, {until, max_gen_toks, temperature, do_sample}) -> text: forge's
  `generate` (greedy unless do_sample with temperature > 0; the window slides past C), cut at
  the first `until` string or the end-of-document token.

Requests are scored in batches of `batch_size`, longest first, right-padded: causal attention
makes a position's logits independent of the padding after it.
"""
from __future__ import annotations

import functools
import json
import os
import sys
from typing import Optional

import torch
import torch.nn.functional as F

from forge.dtypes import DTYPES

INSTALL_HINT = "lm-evaluation-harness is not installed: pip install 'forge[eval]' (or pip install lm_eval==0.4.9)"


def alias_renamed_transformers_classes() -> None:
    """lm_eval 0.4.9 imports all its model backends when imported; one of them reads
    transformers.AutoModelForVision2Seq, which transformers 5 renamed AutoModelForImageTextToText.
    Forge uses none of those backends; the old name is pointed at the new class (nothing else is
    changed) so that lm_eval imports under transformers 5. Call before importing lm_eval."""
    try:
        import transformers
        import transformers.models.auto          # noqa: F401  (settles transformers' lazy module first)
        import transformers.processing_utils     # noqa: F401
    except ImportError:
        return
    mod = sys.modules["transformers"]
    if not hasattr(mod, "AutoModelForVision2Seq") and hasattr(mod, "AutoModelForImageTextToText"):
        mod.AutoModelForVision2Seq = mod.AutoModelForImageTextToText


def import_lm_eval():
    """Import lm_eval (see alias_renamed_transformers_classes), or ImportError with the install hint."""
    alias_renamed_transformers_classes()
    try:
        import lm_eval
        import lm_eval.api.model  # noqa: F401
        import lm_eval.tasks  # noqa: F401
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} ({e})") from None
    return lm_eval


def _base():
    return import_lm_eval().api.model.LM


class _Stop(Exception):
    """Raised from generate's on_token callback once an `until` string has appeared."""


def make_forge_lm(model, tokenizer, batch_size: int = 8, seed: int = 0):
    """A ForgeLM (an lm_eval.api.model.LM subclass, built on first use so that importing this
    module does not need lm_eval)."""
    return forge_lm_class()(model, tokenizer, batch_size, seed)


class _ForgeLMMethods:
    """The methods of ForgeLM, lm_eval's LM over a Forge model and tokenizer (module doc: the math of
    each request); a plain class so that this module imports without lm_eval."""

    def __init__(self, model, tokenizer, batch_size: int = 8, seed: int = 0):
        super().__init__()
        self.model, self.tok = model.eval(), tokenizer
        self.batch_size = int(batch_size)
        self.max_length = int(model.cfg.max_seq_len)
        self.device = next(model.parameters()).device
        self.seed = seed

    # ---- tokens
    @property
    def eot_token_id(self) -> int:
        return self.tok.eod_id

    @property
    def tokenizer_name(self) -> str:
        return "forge-" + self.tok.sha256()[:12]

    def tok_encode(self, text: str) -> list[int]:
        return self.tok.encode(text) if text else []

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context tokens, continuation tokens) as lm_eval splits them: trailing spaces of
        the context go to the continuation; the continuation is what enc(context +
        continuation) adds after enc(context); an empty context is the end-of-document token."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation, context = context[-n_spaces:] + continuation, context[:-n_spaces]
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        cont = whole[len(ctx):]
        return (ctx or [self.eot_token_id]), cont

    # ---- scoring
    @torch.no_grad()
    def score_tokens(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log-probabilities of the continuation tokens, all greedy) for each
        (context, continuation) token pair; see the module doc."""
        C = self.max_length
        out: list[Optional[tuple[float, bool]]] = [None] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        for b in range(0, len(order), self.batch_size):
            idx = order[b:b + self.batch_size]
            rows, conts = [], []
            for i in idx:
                ctx, cont = pairs[i]
                if not cont:
                    raise ValueError("an empty continuation has no log-likelihood")
                if len(cont) > C:
                    raise ValueError(f"a continuation of {len(cont)} tokens is longer than the model's "
                                     f"context of {C} tokens")
                rows.append((ctx + cont)[-(C + 1):][:-1])           # the model's input, <= C tokens
                conts.append(cont)
            T = max(len(r) for r in rows)
            ids = torch.zeros(len(rows), T, dtype=torch.long)
            for r, row in enumerate(rows):
                ids[r, :len(row)] = torch.tensor(row)
            logits = self.model(ids.to(self.device))                                  # (B, T, V)
            for r, (i, row, cont) in enumerate(zip(idx, rows, conts)):
                n = len(cont)
                # float64 over the scored positions only: sums of many terms stay exact to ~1e-12
                lp = F.log_softmax(logits[r, len(row) - n:len(row)].double(), dim=-1)  # (n, V)
                target = torch.tensor(cont, device=lp.device)
                total = float(lp.gather(-1, target[:, None]).sum())
                out[i] = (total, bool((lp.argmax(-1) == target).all()))
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self.encode_pair(*req.args) for req in requests]
        res = self.score_tokens(pairs)
        for req, r in zip(requests, res):
            self.cache_hook.add_partial("loglikelihood", req.args, r)
        return res

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
        out = []
        for req in requests:
            (text,) = req.args[:1]
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tok_encode(text), self.eot_token_id, self.max_length, context_len=1)]
            total = sum(lp for lp, _ in self.score_tokens(windows)) if windows else 0.0
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from forge.generate import generate
        out = []
        for req in requests:
            context, kw = req.args[0], dict(req.args[1] if len(req.args) > 1 else {})
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            n = int(kw.pop("max_gen_toks", 256))
            temperature = float(kw.pop("temperature", 0.0) or 0.0)
            if not kw.pop("do_sample", temperature > 0):
                temperature = 0.0
            ids = (self.tok_encode(context) or [self.eot_token_id])[-self.max_length:]
            new: list[int] = []

            def on_token(nxt, new=new, until=until):
                new.append(int(nxt[0]))
                if until and any(u in self.tok.decode(new) for u in until):
                    raise _Stop
            g = torch.Generator(device=self.device).manual_seed(self.seed)
            try:
                generate(self.model, torch.tensor([ids]), n, temperature=temperature,
                         top_k=kw.pop("top_k", None), top_p=kw.pop("top_p", None), generator=g,
                         eos_id=self.eot_token_id, on_token=on_token)
            except _Stop:
                pass
            if self.eot_token_id in new:
                new = new[:new.index(self.eot_token_id)]
            text = self.tok.decode(new)
            for u in until:
                text = text.split(u)[0]
            self.cache_hook.add_partial("generate_until", (context, req.args[1] if len(req.args) > 1 else {}),
                                        text)
            out.append(text)
        return out


@functools.lru_cache(maxsize=None)
def forge_lm_class():
    """ForgeLM: _ForgeLMMethods on lm_eval's LM base class (imported here, on first use)."""
    return type("ForgeLM", (_ForgeLMMethods, _base()), {})


def run_tasks(lm, tasks: list[str], include_paths: list[str] = (), num_fewshot: Optional[int] = None,
              limit: Optional[float] = None, seed: int = 0) -> dict:
    """lm_eval.simple_evaluate over `lm` with a TaskManager that also reads `include_paths`."""
    lm_eval = import_lm_eval()
    from lm_eval.tasks import TaskManager
    for p in include_paths:
        if not os.path.isdir(p):
            raise FileNotFoundError(f"--include-path {p!r} is not a folder")
    named = [t for t in tasks if not os.path.isfile(t)]
    tm = None
    if include_paths:              # indexing lm_eval's own thousands of task YAMLs takes ~10 s: only when needed
        tm = TaskManager(include_path=list(include_paths), include_defaults=False)
        if not all(tm.match_tasks([t]) for t in named):
            tm = None
    tm = tm or TaskManager(include_path=list(include_paths) or None)
    unknown = [t for t in named if not tm.match_tasks([t])]
    if unknown:
        raise ValueError(f"--tasks: unknown tasks {unknown} (lm_eval's tasks and those under --include-path)")
    return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                   task_manager=tm, random_seed=seed, numpy_random_seed=seed,
                                   torch_random_seed=seed, fewshot_random_seed=seed, log_samples=False,
                                   bootstrap_iters=0)


def main_tasks(args) -> int:
    """`forge eval CHECKPOINT --tasks ...` (arguments from forge.evaluate.build_parser)."""
    from forge.generate import load_for_generation
    try:
        import_lm_eval()
    except ImportError as e:
        print(f"forge eval: --tasks: {e}", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    try:
        model, tok, _ = load_for_generation(args.checkpoint, args.device, dtype, flag="CHECKPOINT")
        lm = make_forge_lm(model, tok, batch_size=args.batch_size or 8, seed=args.seed)
        res = run_tasks(lm, [t.strip() for t in args.tasks.split(",") if t.strip()], args.include_path,
                        args.num_fewshot, args.limit, args.seed)
    except (FileNotFoundError, ValueError) as e:
        print(f"forge eval: {e}", file=sys.stderr)
        return 2
    results = res["results"]
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"results": results, "n-samples": res.get("n-samples"), "configs": res.get("configs")}, f,
                      indent=2, default=str)
    if args.json:
        print(json.dumps(results, default=str))
    else:
        for task, metrics in results.items():
            shown = ", ".join(f"{k.split(',')[0]} {v:.4f}" for k, v in metrics.items()
                              if isinstance(v, float) and "stderr" not in k)
            print(f"{task}: {shown}")
    return 0
