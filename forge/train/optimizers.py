"""Optimizers (`optim.name`), their parameter groups, and what each keeps per parameter.

    adamw      DeepSpeed's optimizer {"type": "AdamW", torch_adam} (forge.train.engine.build_ds_config):
               m = b1 m + (1 - b1) g,  v = b2 v + (1 - b2) g^2,
               w -= lr (m_hat / (sqrt(v_hat) + eps) + wd w)                       state: exp_avg, exp_avg_sq
    lion       Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms":
               w -= lr (sign(b1 m + (1 - b1) g) + wd w),  then m = b2 m + (1 - b2) g   state: exp_avg
    sgd        torch.optim.SGD: b = mu b + g (b = g at the first step),
               w -= lr (g + mu b if nesterov else b), decay coupled (g += wd w)  state: momentum_buffer
    adafactor  torch.optim.Adafactor (Shazeer & Stern 2018; torch's relative-step form: the step is
               min(lr, 1/sqrt(t)) times max(eps2, RMS(w)), decoupled decay lr * wd):
               matrices keep row and column means of g^2 (row_var (R, 1), col_var (1, C)),
               vectors their own variance
    muon       Jordan et al. 2024: 2-D hidden matrices take
               b = mu b + g,  u = g + mu b (nesterov) or b,  O = NewtonSchulz5(u) ~ U V^T (u = U S V^T),
               w -= lr (0.2 sqrt(max(R, C)) O + wd w)       (Liu et al. 2025: the 0.2 sqrt(max(R, C))
               factor matches AdamW's update RMS, so optim.lr is shared)    state: momentum_buffer;
               embeddings, the head, norms and biases take AdamW with optim.beta1/beta2/eps
               (state exp_avg, exp_avg_sq)
    soap       Vyas et al. 2024, "SOAP: Improving and Stabilizing Shampoo using Adam": a hidden 2-D
               matrix (R, C) with gradient G keeps Shampoo's L = b2 L + (1 - b2) G G^T (R, R) and
               R = b2 R + (1 - b2) G^T G (C, C) and runs Adam in their eigenbases Q_L, Q_R:
               G' = Q_L^T G Q_R,  M = b1 M + (1 - b1) G (original space),  V' = b2 V' + (1 - b2) G'^2,
               w -= lr (Q_L ((Q_L^T M Q_R) / bc1) / (sqrt(V' / bc2) + eps) Q_R^T + wd w)
               (bc_i = 1 - b_i^k, k the Adam step). The first step only builds L, R and the bases
               (no update, as the paper's code: the projection never uses the current gradient);
               L and R then take each step's G after its update, and every
               optim.soap_precondition_frequency Adam steps Q_L, Q_R are recomputed with eigh (the
               paper uses eigh once and then one QR power-iteration step; eigh each time is exact and
               simpler). V' stays as it is across a refresh, as in the paper.
               state: exp_avg, exp_avg_sq, gg_left, gg_right, q_left, q_right; embeddings, the head,
               norms and biases take AdamW as under muon

Every optimizer but adamw is built here and handed to `deepspeed.initialize(optimizer=...)`
("zero_allow_untested_optimizer"). Elementwise ones (lion, sgd) run on DeepSpeed's flat ZeRO 1/2
partitions and on tp shards unchanged. Adafactor's row/column means, its RMS(w) and its update's RMS
are whole-tensor quantities, Muon orthogonalises the whole matrix and SOAP rotates it by the
eigenbases of its whole G G^T and G^T G: all three need tp = 1 and ZeRO 0
(check_optim says so). DeepSpeed 0.19 ships a Muon for ZeRO 1/2 ({"type": "Muon"},
deepspeed/runtime/zero/muon: stage_1_and_2 gathers a matrix's gradient partitions and
orthogonalises while flattening); Forge does not use it: its ZeRO 1/2 momentum is one flat buffer
per parameter group (`_muon_momentum_buffer`, the group's whole matrices), not per-parameter
fragments that forge.layout.optim could save and restore under another layout, and it knows
nothing of Forge's tp groups (a tp shard would be orthogonalised on its own). Its update is the
EMA form u = lerp(g, lerp(m, g, 1 - mu), mu), which is (1 - mu) times the sum form here, so
after the Newton-Schulz normalisation the two give the same step.

Weight decay (`param_groups`): matrices are decayed, vectors (norms, biases) never; embedding
tables (token and learned positions) unless optim.decay_embeddings=false (by default every tensor of
2 or more dimensions is decayed).
"""
from __future__ import annotations

import math

import torch

from forge.config import ConfigError


def _shape(p) -> tuple:
    return tuple(getattr(p, "ds_shape", p.shape))        # a ZeRO 3 partition keeps its full shape there


# ---------------------------------------------------------------- Lion
class Lion(torch.optim.Optimizer):
    """update = sign(b1 m + (1 - b1) g);  w = w (1 - lr wd) - lr update;  m = b2 m + (1 - b2) g."""

    def __init__(self, params, lr: float, betas=(0.9, 0.99), weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    def state_shapes(self, p) -> dict:
        return {"exp_avg": _shape(p)}

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p)
                m, g = state["exp_avg"], p.grad
                update = (m * b1).add_(g, alpha=1 - b1).sign_()
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"])
                m.mul_(b2).add_(g, alpha=1 - b2)
        return loss


# ---------------------------------------------------------------- SGD, Adafactor (torch's)
class SGD(torch.optim.SGD):
    """torch.optim.SGD, with the state shapes forge.layout.optim saves."""

    def state_shapes(self, p) -> dict:
        return {"momentum_buffer": _shape(p)} if self.defaults["momentum"] else {}


class Adafactor(torch.optim.Adafactor):
    """torch.optim.Adafactor, with the state shapes forge.layout.optim saves (factored for
    matrices: the row and column means of g^2 over the last two dimensions)."""

    def state_shapes(self, p) -> dict:
        shape = _shape(p)
        if len(shape) > 1:
            return {"row_var": shape[:-1] + (1,), "col_var": shape[:-2] + (1, shape[-1])}
        return {"variance": shape}


# ---------------------------------------------------------------- Muon
def newton_schulz5(g: torch.Tensor, steps: int) -> torch.Tensor:
    """Approximately U V^T for g = U S V^T (Jordan et al. 2024): X = g / ||g||_F, then `steps` times
    X = a X + (b A + c A^2) X with A = X X^T, (a, b, c) = (3.4445, -4.7750, 2.0315), on the wide
    orientation (rows <= cols); fp32. Its singular values end in about [0.7, 1.2], not exactly 1."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.float()
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        A = x @ x.T                                     # (R, R), R = min(rows, cols)
        x = a * x + (b * A + c * A @ A) @ x
    return x.T if tall else x


def _adamw_step(p, g, state: dict, group: dict) -> None:
    """AdamW for the tensors muon and soap leave to it: m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2,
    w -= lr (m / bc1 / (sqrt(v / bc2) + eps) + wd w), bc_i = 1 - b_i^t (torch.optim.AdamW)."""
    b1, b2 = group["betas"]
    lr, wd = group["lr"], group["weight_decay"]
    if "step" not in state:
        state["step"] = torch.tensor(0.0)
        state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
    state["step"] += 1
    t = float(state["step"])
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m.lerp_(g, 1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    denom = (v / (1 - b2 ** t)).sqrt_().add_(group["eps"])
    p.mul_(1 - lr * wd)
    p.addcdiv_(m, denom, value=-lr / (1 - b1 ** t))


class Muon(torch.optim.Optimizer):
    """Muon for the groups with use_muon=True, AdamW for the others (see the module docstring)."""

    def __init__(self, params, lr: float, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                 betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                                      betas=tuple(betas), eps=eps, weight_decay=weight_decay, use_muon=False))

    def state_shapes(self, p) -> dict:
        group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
        if group["use_muon"]:
            return {"momentum_buffer": _shape(p)}
        return {"exp_avg": _shape(p), "exp_avg_sq": _shape(p)}

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state, g = self.state[p], p.grad
                if group["use_muon"]:
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    buf = state["momentum_buffer"].mul_(group["momentum"]).add_(g)
                    u = g.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                    o = newton_schulz5(u, group["ns_steps"]).to(p.dtype)
                    p.mul_(1 - lr * wd)
                    p.add_(o, alpha=-lr * 0.2 * math.sqrt(max(p.shape)))
                    continue
                _adamw_step(p, g, state, group)
        return loss


# ---------------------------------------------------------------- SOAP
class SOAP(torch.optim.Optimizer):
    """SOAP for the groups with use_soap=True, AdamW for the others (see the module docstring)."""

    def __init__(self, params, lr: float, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0,
                 precondition_frequency: int = 10):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      precondition_frequency=precondition_frequency, use_soap=False))

    def state_shapes(self, p) -> dict:
        group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
        shape = _shape(p)
        out = {"exp_avg": shape, "exp_avg_sq": shape}
        if group["use_soap"]:
            rows, cols = shape
            out.update(gg_left=(rows, rows), gg_right=(cols, cols), q_left=(rows, rows), q_right=(cols, cols))
        return out

    @staticmethod
    def _precondition(state: dict, g: torch.Tensor, b2: float, refresh: bool) -> None:
        """L = b2 L + (1 - b2) G G^T, R = b2 R + (1 - b2) G^T G; on refresh Q_L, Q_R = their eigenvectors."""
        state["gg_left"].mul_(b2).add_(g @ g.T, alpha=1 - b2)          # (R, R)
        state["gg_right"].mul_(b2).add_(g.T @ g, alpha=1 - b2)         # (C, C)
        if refresh:
            state["q_left"].copy_(torch.linalg.eigh(state["gg_left"])[1])
            state["q_right"].copy_(torch.linalg.eigh(state["gg_right"])[1])

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, wd, (b1, b2) = group["lr"], group["weight_decay"], group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state, g = self.state[p], p.grad
                if not group["use_soap"]:
                    _adamw_step(p, g, state, group)
                    continue
                if "step" not in state:
                    state["step"] = torch.tensor(0.0)
                    for key, shape in self.state_shapes(p).items():
                        state[key] = torch.zeros(shape, dtype=p.dtype, device=p.device)
                state["step"] += 1
                k = int(state["step"]) - 1                      # Adam steps: the first call only preconditions
                if k == 0:
                    self._precondition(state, g, b2, refresh=True)
                    continue
                ql, qr = state["q_left"], state["q_right"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                rotated = ql.T @ g @ qr                          # (R, C) in the eigenbases
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(rotated, rotated, value=1 - b2)
                denom = (v / (1 - b2 ** k)).sqrt_().add_(group["eps"])
                update = ql @ ((ql.T @ m @ qr) / denom) @ qr.T   # (R, C) back in the original space
                p.mul_(1 - lr * wd)
                p.add_(update, alpha=-lr / (1 - b1 ** k))
                self._precondition(state, g, b2, refresh=k % group["precondition_frequency"] == 0)
        return loss


# ---------------------------------------------------------------- registry
def _lion(groups, o):
    return Lion(groups, lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)


def _sgd(groups, o):
    return SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay)


def _adafactor(groups, o):
    return Adafactor(groups, lr=o.lr, weight_decay=o.weight_decay)


def _muon(groups, o):
    return Muon(groups, lr=o.lr, momentum=o.muon_momentum, nesterov=o.muon_nesterov, ns_steps=o.muon_ns_steps,
                betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)


def _soap(groups, o):
    return SOAP(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay,
                precondition_frequency=o.soap_precondition_frequency)


# name -> builder(param groups, OptimConfig) of the client optimizer; None: DeepSpeed builds it
OPTIMIZERS = {"adamw": None, "lion": _lion, "sgd": _sgd, "adafactor": _adafactor, "muon": _muon,
              "soap": _soap}
# float32 state values kept per parameter element (forge.plan); adafactor's factored rows and
# columns are O(R + C) per matrix, counted as 0; muon: 1 for its matrices, 2 for AdamW's tensors;
# soap: 2 (m, v) + its matrices' (R, R) and (C, C) L, R, Q_L, Q_R (per tensor in state_count)
STATE_COUNT = {"adamw": 2, "lion": 1, "sgd": 1, "adafactor": 0, "muon": 1, "soap": 2}
WHOLE_TENSOR = ("adafactor", "muon", "soap")        # need each tensor whole: tp = 1, ZeRO 0
HIDDEN_MATRIX = ("muon", "soap")    # their own rule for hidden 2-D matrices, AdamW for the other tensors


def check_optim(cfg) -> None:
    """ConfigError for an unknown optim.name or a combination it does not run."""
    o, p = cfg.optim, cfg.parallel
    if o.name not in OPTIMIZERS:
        raise ConfigError(f"optim.name={o.name!r} is not one of {sorted(OPTIMIZERS)}")
    if o.name in WHOLE_TENSOR:
        why = {"muon": "orthogonalises each whole matrix",
               "soap": "rotates each whole matrix by the eigenbases of its G G^T and G^T G",
               "adafactor": "keeps row/column means and RMS norms of each whole tensor"}[o.name]
        if p.tp > 1:
            raise ConfigError(f"optim.name={o.name!r} with parallel.tp={p.tp}: {o.name} {why}, which a tp shard is "
                              "not; use parallel.tp=1 (or optim.name adamw, lion, sgd)")
        if p.zero_stage > 0:
            raise ConfigError(f"optim.name={o.name!r} with parallel.zero_stage={p.zero_stage}: {o.name} {why}, "
                              "which DeepSpeed's flat ZeRO partitions are not; use parallel.zero_stage=0")
        if cfg.train.precision != "fp32" and p.pp > 1:
            raise ConfigError(f"optim.name={o.name!r} with train.precision={cfg.train.precision} and parallel.pp > 1: "
                              "DeepSpeed's bf16 optimizer partitions the state flat; use fp32 or parallel.pp=1")
    if o.name == "sgd" and o.nesterov and o.momentum <= 0:
        raise ConfigError("optim.nesterov=true needs optim.momentum > 0")
    if not (0 <= o.momentum < math.inf and 0 <= o.muon_momentum < 1):          # NaN fails too
        raise ConfigError(f"optim.momentum={o.momentum} must be >= 0 and optim.muon_momentum={o.muon_momentum} "
                          "in [0, 1)")
    if o.muon_ns_steps < 1:
        raise ConfigError(f"optim.muon_ns_steps={o.muon_ns_steps} must be >= 1")


def _embedding_ids(model) -> set:
    """The token and learned-position tables."""
    from forge.models.layers.position import LearnedPositions
    from forge.parallel.layers import VocabParallelEmbedding
    tables = (VocabParallelEmbedding, torch.nn.Embedding, LearnedPositions)
    return {id(q) for m in model.modules() if isinstance(m, tables) for q in m.parameters(recurse=False)}


def _head_ids(model) -> set:
    return {id(q) for m in model.modules() if type(m).__name__ == "Head" for q in m.parameters()}


def param_groups(model: torch.nn.Module, optim) -> list[dict]:
    """Weight-decay groups ("decay": matrices; "no_decay": vectors (a steering table too), and embeddings where
    optim.decay_embeddings=false); for muon and soap each is split again into their own matrices (2-D,
    not an embedding or the head; group name suffix "_muon" / "_soap") and AdamW's tensors
    (use_muon / use_soap)."""
    embeds = _embedding_ids(model)
    split = optim.name in HIDDEN_MATRIX
    heads = _head_ids(model) if split else set()
    buckets: dict[tuple, list] = {}
    for name, prm in model.named_parameters():     # tied parameters appear once
        if not prm.requires_grad:
            continue
        shape = getattr(prm, "ds_shape", prm.shape)      # a ZeRO 3 partition keeps its full shape there
        # a per-dataset steering table (n, D) is n vectors, not a matrix: no decay, no Muon / SOAP
        vectors = len(shape) < 2 or name.rsplit(".", 1)[-1] == "steering"
        decay = not vectors and (optim.decay_embeddings or id(prm) not in embeds)
        own = (split and not vectors and len(shape) == 2 and id(prm) not in embeds
               and id(prm) not in heads)
        buckets.setdefault((decay, own), []).append(prm)
    groups = []
    for (decay, own) in sorted(buckets, key=lambda k: (not k[0], k[1])):
        group = {"params": buckets[(decay, own)], "weight_decay": optim.weight_decay if decay else 0.0,
                 "name": ("decay" if decay else "no_decay") + (f"_{optim.name}" if own else "")}
        if split:
            group[f"use_{optim.name}"] = own
        groups.append(group)
    if not any(g["name"] == "decay" for g in groups) and not split:
        groups.insert(0, {"params": [], "weight_decay": optim.weight_decay, "name": "decay"})
    return groups


def state_count(module: torch.nn.Module, optim) -> dict[int, float]:
    """{id(parameter): fp32 optimizer states it keeps per element} (forge.plan): adamw 2 (m, v),
    lion 1 (m), sgd 1 (its momentum buffer; 0 without momentum), adafactor 1 for vectors and 0 for
    matrices (factored: R + C values, not counted), muon 1 for its matrices and 2 for AdamW's, soap
    2 (m, v) + 2 (R^2 + C^2) / (R C) (L and Q_L (R, R), R and Q_R (C, C)) for its (R, C) matrices and
    2 for AdamW's (a float there)."""
    counts = {}
    for group in param_groups(module, optim):
        for p in group["params"]:
            shape = _shape(p)
            soap = 2 + 2 * (shape[0] ** 2 + shape[-1] ** 2) / (shape[0] * shape[-1]) if group.get("use_soap") else 2
            counts[id(p)] = {"adamw": 2, "lion": 1, "sgd": 1 if optim.momentum else 0,
                             "adafactor": 0 if len(shape) > 1 else 1,
                             "muon": 1 if group.get("use_muon") else 2, "soap": soap}[optim.name]
    return counts


def build_client_optimizer(groups: list[dict], optim):
    """The torch optimizer for `deepspeed.initialize(optimizer=...)`, or None for adamw."""
    builder = OPTIMIZERS[optim.name]
    return None if builder is None else builder(groups, optim)
