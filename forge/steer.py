"""Manual steering vectors: extract one from contrasting prompts, add it while decoding.

    forge steer extract --checkpoint CKPT --positive pos.txt --negative neg.txt --layer L --out vec.safetensors
    forge generate --checkpoint CKPT --steer vec.safetensors --steer-scale 4 --prompt "..."

"At layer L" means the residual stream after block L's output, x_L (0-based; the input of
block L+1, or of the final norm for the last block). With the positive prompts P and the
negative prompts N (one prompt a line; each run alone, from position 0), every token t of every
prompt contributes its hidden state x_L[t]:

    v = mean_{t in tokens(P)} x_L[t]  -  mean_{t in tokens(N)} x_L[t]        (D,)

Steering with scale s replaces x_L by x_L + s v at every position (prompt and generated tokens
alike), so the blocks after L, the final norm and the head see the shifted stream; the blocks up
to L are unchanged, and so is every cached key/value of layers <= L (the KV cache stays exact).

The file is safetensors with one tensor "vector" (D,) (float32) and metadata
{"format": "forge-steering", "layer": "L"}.

Learned per-dataset vectors (model.steering_datasets): `forge generate --steer-dataset I` adds the
vector the model learned for dataset I (set_steering_dataset); without it none is added.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Iterable, Optional

import torch

FORMAT = "forge-steering"


def set_steering(model, vector: Optional[torch.Tensor], layer: int = 0, scale: float = 1.0) -> None:
    """Add scale * vector (D,) to the residual stream after block `layer` of `model` from now on;
    vector None removes the steering."""
    if vector is None:
        model.steering = None
        return
    n, d = model.cfg.n_layers, model.cfg.d_model
    if not 0 <= layer < n:
        raise ValueError(f"steering layer {layer} is outside the model's layers 0..{n - 1}")
    if tuple(vector.shape) != (d,):
        raise ValueError(f"the steering vector has shape {tuple(vector.shape)}, the model's residual stream ({d},)")
    device = next(model.parameters()).device
    model.steering = (layer, (vector.float() * scale).to(device))


def set_steering_dataset(model, index: Optional[int]) -> None:
    """Every sample of `model` (trained with model.steering_datasets = n) gets the learned vector
    V[index] of dataset `index` from now on; None: no learned vector (the default)."""
    n = model.cfg.steering_datasets
    if index is not None and not n:
        raise ValueError("--steer-dataset: the model has no per-dataset steering vectors (model.steering_datasets=0)")
    if index is not None and not 0 <= index < n:
        raise ValueError(f"--steer-dataset {index} is outside the model's datasets 0..{n - 1}")
    model.steering_dataset = index


@torch.no_grad()
def residual_stream(model, ids: torch.Tensor, layer: int) -> torch.Tensor:
    """x_layer: the residual stream after block `layer` for ids (B, T) -> (B, T, D), computed by
    running the embedding and blocks 0..layer (positions from 0; no steering)."""
    pos = torch.arange(ids.shape[1], device=ids.device)
    x = model.embed(ids, pos)                                              # (B, T, D)
    for i in range(layer + 1):
        x = model.layers[str(i)](x, pos, None)
    return x


@torch.no_grad()
def mean_difference(model, positive: Iterable[list[int]], negative: Iterable[list[int]], layer: int) -> torch.Tensor:
    """v (D,): the mean of x_layer over every token of the positive prompts minus that over the
    negative prompts (each prompt a list of token ids, run alone)."""
    n = model.cfg.n_layers
    if not 0 <= layer < n:
        raise ValueError(f"--layer {layer} is outside the model's layers 0..{n - 1}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        means = []
        for name, prompts in (("positive", positive), ("negative", negative)):
            total, count = torch.zeros(model.cfg.d_model, dtype=torch.float64, device=device), 0
            for ids in prompts:
                x = residual_stream(model, torch.tensor([ids], device=device), layer)   # (1, T, D)
                total += x[0].double().sum(0)
                count += x.shape[1]
            if count == 0:
                raise ValueError(f"the {name} prompt set is empty")
            means.append(total / count)
        return (means[0] - means[1]).float()
    finally:
        model.train(was_training)


def save_vector(path: str, vector: torch.Tensor, layer: int) -> None:
    from forge.fsutil import save_safetensors
    save_safetensors({"vector": vector.detach().float().contiguous().cpu()}, path,
                     metadata={"format": FORMAT, "layer": str(int(layer))})


def load_vector(path: str) -> tuple[torch.Tensor, int]:
    """(vector (D,), layer) from a file written by save_vector."""
    from safetensors import safe_open
    if not os.path.isfile(path):
        raise FileNotFoundError(f"steering vector file {path!r} does not exist")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT or "layer" not in meta or "vector" not in f.keys():
            raise ValueError(f"{path!r} is not a Forge steering vector (safetensors with 'vector' and "
                             f"metadata format={FORMAT!r}, layer)")
        return f.get_tensor("vector"), int(meta["layer"])


# ------------------------------------------------------------------ CLI
def read_prompts(path: str, tok, ctx: int, vocab: int) -> list[list[int]]:
    """The non-empty lines of `path`, each encoded (as forge generate encodes a prompt)."""
    from forge.generate import encode_prompt
    with open(path, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f if line.strip()]
    if not lines:
        raise ValueError(f"{path!r} holds no prompts (one prompt a line)")
    return [encode_prompt(tok, line, ctx, vocab) for line in lines]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="forge steer", description="Manual steering vectors.")
    sub = p.add_subparsers(dest="action", required=True)
    e = sub.add_parser("extract", help="mean residual activation of positive minus negative prompts at a layer")
    e.add_argument("--checkpoint", required=True, help="as forge generate --checkpoint")
    e.add_argument("--positive", required=True, help="text file, one prompt a line")
    e.add_argument("--negative", required=True, help="text file, one prompt a line")
    e.add_argument("--layer", type=int, required=True, help="block index L: the stream after block L's output")
    e.add_argument("--out", required=True, help="output .safetensors file")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    from forge.generate import GenerationError, context_length, load_for_generation
    args = build_parser().parse_args(argv)
    try:
        model, tok, _ = load_for_generation(args.checkpoint, "cpu", torch.float32)
        ctx, vocab = context_length(model), model.cfg.vocab_size
        pos = read_prompts(args.positive, tok, ctx, vocab)
        neg = read_prompts(args.negative, tok, ctx, vocab)
        v = mean_difference(model, pos, neg, args.layer)
    except (FileNotFoundError, ValueError, GenerationError) as e:
        print(f"forge steer: {e}", file=sys.stderr)
        return 2
    save_vector(args.out, v, args.layer)
    print(f"forge steer: wrote {args.out} (layer {args.layer}, |v| = {float(v.norm()):.4g}, "
          f"{sum(map(len, pos))} positive and {sum(map(len, neg))} negative tokens)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
