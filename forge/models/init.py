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

A random tensor is defined at its full (unsharded) shape, in blocks of whole rows (about BLOCK
elements each), block 0 from a generator seeded with hash(seed, name) and block b from
hash(hash(seed, name), b); this rank keeps its part: chunk `tp_rank` along `partition_dim` (the
vocabulary tensors' padding rows zero). Expert e of a stacked expert tensor comes from its own
seed, hash(seed, name, e), so an expert-parallel rank draws only its own experts. One process,
tp, pp, ep and ZeRO 3 therefore start from bit-identical weights (on one device type: CUDA and
CPU generators differ). The blocks go through one reused scratch buffer of BLOCK elements, so
beyond the rank's own shards the init holds that buffer alone (no full tensor, and no
allocate-and-free per parameter that would fragment the heap: freed 2x-shard transients between
kept shards once held 1.7x a Mamba-2 rank's shard in glibc's heap at tp=2). Only the structured
token tables (model.embed_init other than gaussian) are built whole.

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
BLOCK = 2 ** 22      # elements (16 MiB fp32) per drawn block of rows: the init's one transient buffer


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
        """out <- this rank's rows of the full (V, E) token table of model.embed_init (padding rows 0).
        The gaussian table is drawn in row blocks as any matrix; the structured tables are built whole."""
        seed = tensor_seed(self.seed, name)
        if self.cfg.embed_init == "gaussian":
            self._draw(out, getattr(out, "partition_dim", None), self.std, seed, vocab=True,
                       mean=self.cfg.embed_init_mean)
            return
        gen = torch.Generator(device=out.device).manual_seed(seed)
        full = EMBED_INIT[self.cfg.embed_init](self.cfg, (self.vocab, out.shape[1]), gen, out.device)
        dim = getattr(out, "partition_dim", None)
        start, n = (0, out.shape[0]) if dim is None or self.tp == 1 else (self.tp_rank * out.shape[0], out.shape[0])
        rows = max(0, min(n, self.vocab - start))
        out.zero_()
        out.narrow(0, 0, rows).copy_(full.narrow(0, start, rows))

    def _draw(self, out, dim, std, seed, vocab=False, mean=0.0):
        """out <- this rank's tp chunk along `dim` (None: all of it) of the full tensor F ~ N(mean, std).

        F (the unsharded shape; vocabulary tensors: vocab_size rows, the padding rows of the last
        shard 0) is drawn in blocks of whole rows along dim 0, R = max(1, BLOCK // row size) rows
        each, block b from its own generator (seed for b = 0, hash(seed, b) after), so the blocks,
        and so the values, depend on F's shape alone. A rank draws only the blocks that hold its
        rows (dim 0) or every block, keeping its columns (dim >= 1), into one reused scratch buffer:
        no full tensor is ever allocated, and nothing is allocated and freed per parameter."""
        split = dim is not None and self.tp > 1
        n = out.shape[dim] if split else 0
        full = list(out.shape)
        if split:
            full[dim] = self.vocab if vocab else n * self.tp
        start = self.tp_rank * n if split else 0
        row = math.prod(full[1:])
        R = max(1, BLOCK // max(row, 1))
        lo, hi = (start, min(start + n, full[0])) if split and dim == 0 else (0, full[0])
        direct = not split and out.dtype == torch.float32 and out.is_contiguous()
        if split and dim == 0 and hi - lo < n:
            out.zero_()                                     # vocabulary padding rows
        for b in range(lo // R, -(-hi // R)):
            b0, b1 = b * R, min((b + 1) * R, full[0])       # rows of F in block b
            gen = torch.Generator(device=out.device).manual_seed(seed if b == 0 else tensor_seed(seed, "rows", b))
            if direct:
                out.narrow(0, b0, b1 - b0).normal_(mean, std, generator=gen)
                continue
            block = self._scratch(out.device, (b1 - b0) * row).view(b1 - b0, *full[1:])
            block.normal_(mean, std, generator=gen)
            if not split:
                out.narrow(0, b0, b1 - b0).copy_(block)
            elif dim == 0:
                r0, r1 = max(b0, lo), min(b1, hi)
                out.narrow(0, r0 - start, r1 - r0).copy_(block.narrow(0, r0 - b0, r1 - r0))
            else:
                out.narrow(0, b0, b1 - b0).copy_(block.narrow(dim, start, n))

    def _scratch(self, device, numel):
        """A flat fp32 buffer of >= numel elements on device, kept and reused across draws."""
        buf = getattr(self, "_buf", None)
        if buf is None or buf.device != torch.device(device) or buf.numel() < numel:
            self._buf = buf = None                          # free the old one before the new exists
            self._buf = buf = torch.empty(max(numel, BLOCK), device=device)
        return buf[:numel]

    def release(self):
        """Free the scratch buffer (materialize calls this when it is done)."""
        self._buf = None


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
    if init is not None:
        init.release()
    return model
