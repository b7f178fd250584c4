"""Rank-local materialisation and layout-independent initialisation.

A model (or one pipeline stage) is constructed on the meta device holding only this rank's
shards; `materialize` then gives it storage on the training device, one parameter at a time, and
fills each parameter with a value that depends on (seed, Forge name) alone:

    W ~ N(0, std)               matrices, stacked experts (dim >= 2)
    E = EMBED_INIT[embed_init]  the token table (V, width): gaussian N(embed_init_mean, std), or a
                                deterministic / structured table (see the functions below)
    W ~ N(0, std / sqrt(2 L))   outputs of a residual branch: the layers built with
                                residual_output=True (attention wo, MLP / expert w_out)
    W ~ N(0, module.weight_std) the weights of a module that sets weight_std (the ssm convolutions)
    b = 0                       biases
    norm gains, scalars         their module's constants (`init_constants`: ones, 1 - offset, DyT's
                                alpha, the sphere radius, the PReLU slope, ...)

A random tensor is drawn at its full (unsharded) shape from a generator seeded with
hash(seed, name) and then cut to this rank's part: chunk `tp_rank` along `partition_dim` (the
vocabulary tensors first padded with zero rows to the padded vocabulary). Expert e of a stacked
expert tensor comes from its own generator, hash(seed, name, e), so an expert-parallel rank draws
only its own experts. One process, tp, pp, ep and ZeRO 3 therefore start from bit-identical
weights (on one device type: CUDA and CPU generators differ). At most one full parameter (one
full expert for expert tensors) exists beyond the rank's own shards at any time.

Derived buffers (rotary frequencies, ALiBi slopes, the vocabulary padding mask, MoE bias and
load counters) are recomputed on the device by each module's `init_buffers`.
"""
from __future__ import annotations

import hashlib
import math
from typing import Callable, Optional

import torch
import torch.nn as nn

from forge.parallel.context import SINGLE, ParallelContext
from forge.parallel.sharding import VOCAB_TENSORS


def tensor_seed(seed: int, name: str, index: Optional[int] = None) -> int:
    """A 63-bit generator seed from the run seed and a tensor's Forge name (and expert index)."""
    key = f"{seed}/{name}" if index is None else f"{seed}/{name}/{index}"
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


# ---- token-table initialisations: (cfg, (V, E), generator, device) -> the full (V, E) table
def _gaussian(cfg, shape, gen, device):
    """N(embed_init_mean, init_std) entries."""
    return torch.empty(shape, device=device).normal_(cfg.embed_init_mean, cfg.init_std, generator=gen)


def _onehot(cfg, shape, gen, device):
    """Row i = c e_i (c = embed_init_scale): distinct basis vectors; needs V <= E (validated)."""
    V, E = shape
    w = torch.zeros(shape, device=device)
    w[torch.arange(V), torch.arange(V)] = cfg.embed_init_scale
    return w


def _signs(shape, gen, device):
    return torch.randint(0, 2, shape, generator=gen, device=device).float().mul_(2).sub_(1)


def _hypercube(cfg, shape, gen, device):
    """Random corners of the cube [-c, c]^E: every entry +c or -c with probability 1/2 each."""
    return _signs(shape, gen, device).mul_(cfg.embed_init_scale)


def _unique_hypercube(cfg, shape, gen, device):
    """Random corners of [-c, c]^E with no two rows equal or opposite (V <= 2^(E-1), validated).
    A row's class {v, -v} is keyed by v * sign(v_0); a row whose class was taken is redrawn."""
    import numpy as np
    V, E = shape
    if E - 1 < 63 and 2 ** (E - 1) <= 4 * V:    # few classes: a random choice of V of them
        codes = torch.randperm(2 ** (E - 1), generator=gen, device=device)[:V]
        bits = (codes.unsqueeze(1) >> torch.arange(E - 1, device=device)) & 1
        w = torch.cat([torch.ones(V, 1, device=device), bits.float().mul_(2).sub_(1)], dim=1)
        w.mul_(_signs((V, 1), gen, device))
    else:
        w = _signs(shape, gen, device)
        seen = set()
        for i in range(V):
            while True:
                key = np.packbits((w[i] * w[i, 0] > 0).cpu().numpy()).tobytes()
                if key not in seen:
                    seen.add(key)
                    break
                w[i] = _signs((E,), gen, device)
    return w.mul_(cfg.embed_init_scale)


def _angle_hypersphere(cfg, shape, gen, device):
    """Rows on the sphere of radius r = embed_init_scale: v = r cos(theta) / |cos(theta)| with
    every angle theta_ij ~ U[0, 2 pi) independent, so distinct rows are nearly orthogonal
    (their cosine has mean 0 and standard deviation ~ 1/sqrt(E))."""
    theta = torch.rand(shape, generator=gen, device=device).mul_(2 * math.pi)
    v = torch.cos(theta)
    return v.div_(v.norm(dim=1, keepdim=True)).mul_(cfg.embed_init_scale)


EMBED_INIT = {"gaussian": _gaussian, "onehot": _onehot, "hypercube": _hypercube,
              "unique_hypercube": _unique_hypercube, "angle_hypersphere": _angle_hypersphere}
EMBED_TABLE = "embed.tok.weight"


class WeightInit:
    """The initial value of each parameter of a rank-local model (see the module docstring).

    std: model.init_std; n_layers: L of the residual scaling; vocab_size: rows of the unpadded
    vocabulary tensors; ctx: the ParallelContext the model was built with."""

    def __init__(self, cfg, seed: int, ctx: ParallelContext = SINGLE):
        self.std, self.n_layers, self.vocab = cfg.init_std, cfg.n_layers, cfg.vocab_size
        self.cfg = cfg
        self.seed = seed
        self.tp, self.tp_rank, self.ep, self.ep_rank = ctx.tp, ctx.tp_rank, ctx.ep, ctx.ep_rank

    def __call__(self, module: nn.Module, attr: str, name: str, p: torch.Tensor) -> None:
        """Fill `p` (module.<attr>, Forge name `name`) in place."""
        if attr == "bias":
            p.zero_()
        elif name == EMBED_TABLE or name.split(".", 1)[-1] == EMBED_TABLE:
            self._embed_table(p, name)
        elif p.dim() >= 2:
            std = self.std / math.sqrt(2 * self.n_layers) if getattr(module, "residual_output", False) else self.std
            std = getattr(module, "weight_std", None) or std      # a module's own std (ssm convolutions)
            self._normal(p, name, std)
        elif not hasattr(module, "init_constants"):
            raise ValueError(f"no initialisation rule for parameter {name!r} of shape {tuple(p.shape)} "
                             f"({type(module).__name__}): give the module an init_constants method")

    def _normal(self, p, name, std):
        dim = getattr(p, "partition_dim", None)
        if getattr(p, "expert", False):                 # (E/ep, ...): expert e from its own generator
            n_local = p.shape[0]
            for i in range(n_local):
                e = self.ep_rank * n_local + i
                self._draw(p[i], None if dim is None else dim - 1, std, tensor_seed(self.seed, name, e))
            return
        vocab = name in VOCAB_TENSORS or name.split(".", 1)[-1] in VOCAB_TENSORS
        self._draw(p, dim, std, tensor_seed(self.seed, name), vocab)

    def _embed_table(self, out, name):
        """out <- this rank's rows of the full (V, E) token table of model.embed_init (padding rows 0)."""
        gen = torch.Generator(device=out.device).manual_seed(tensor_seed(self.seed, name))
        full = EMBED_INIT[self.cfg.embed_init](self.cfg, (self.vocab, out.shape[1]), gen, out.device)
        dim = getattr(out, "partition_dim", None)
        start, n = (0, out.shape[0]) if dim is None or self.tp == 1 else (self.tp_rank * out.shape[0], out.shape[0])
        rows = max(0, min(n, self.vocab - start))
        out.zero_()
        out.narrow(0, 0, rows).copy_(full.narrow(0, start, rows))

    def _draw(self, out, dim, std, seed, vocab=False):
        """out <- this rank's tp chunk along `dim` (None: all) of N(0, std) drawn at the full shape."""
        gen = torch.Generator(device=out.device).manual_seed(seed)
        if dim is None or self.tp == 1:
            out.normal_(0.0, std, generator=gen)
            return
        n = out.shape[dim]
        full = list(out.shape)
        full[dim] = self.vocab if vocab else n * self.tp
        t = torch.empty(full, device=out.device).normal_(0.0, std, generator=gen)
        start = self.tp_rank * n                        # vocabulary rows past the end are padding: 0
        rows = max(0, min(n, t.shape[dim] - start))
        out.zero_()
        out.narrow(dim, 0, rows).copy_(t.narrow(dim, start, rows))


def materialize(model: nn.Module, device, init: Optional[WeightInit] = None,
                name_of: Callable[[str], str] = lambda n: n,
                partition: Optional[Callable[[nn.Parameter], None]] = None) -> nn.Module:
    """Give every meta parameter and buffer of `model` storage on `device`, one parameter at a time.

    init: fills each new parameter (None: left uninitialised, for a model about to be loaded);
    name_of: the Forge name of a parameter name of `model` (pipeline stages name them otherwise);
    partition: called on each parameter once it holds its value (ZeRO 3 partitions it there, so
    no rank ever holds more than one full parameter beyond its partitions).
    Parameter attributes (partition_dim, expert, ...) and ties (a head sharing the embedding)
    are kept."""
    device = torch.device(device)
    done: dict[int, nn.Parameter] = {}
    for mname, module in model.named_modules():
        fresh = []                                      # parameters materialised in this module
        for attr, p in list(module._parameters.items()):
            if p is None or not p.is_meta:
                continue
            if id(p) in done:                           # a tied parameter, materialised already
                module._parameters[attr] = done[id(p)]
                continue
            new = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device), requires_grad=p.requires_grad)
            new.__dict__.update(p.__dict__)
            module._parameters[attr] = done[id(p)] = new
            fresh.append(new)
            if init is not None:
                with torch.no_grad():
                    init(module, attr, name_of(f"{mname}.{attr}" if mname else attr), new)
        if hasattr(module, "init_constants") and init is not None:
            with torch.no_grad():
                module.init_constants()
        if any(b is not None and b.is_meta for b in module._buffers.values()):
            if not hasattr(module, "init_buffers"):
                raise ValueError(f"module {mname!r} ({type(module).__name__}) has meta buffers and no init_buffers")
            with torch.device(device):
                module.init_buffers()
        if partition is not None:
            for p in fresh:
                partition(p)
    return model
