"""The run sections: `parallel`, `data`, `optim`, `train` and `log`, each with its own `validate`."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal, Optional

from forge.config.core import ConfigError, check_choices, check_range


@dataclass
class ParallelConfig:
    tp: int = 1                             # tensor-parallel size: each layer's linears split over tp ranks
    pp: int = 1                             # pipeline-parallel stages
    ep: int = 1                             # data ranks that split one set of experts (divides dp)
    zero_stage: Literal[0, 1, 2, 3] = 0     # ZeRO stage: 1 splits optimizer state over dp, 2 also grads, 3 also weights
    sequence_parallel: bool = False         # with tp > 1: norms and dropout on sequence shards (Megatron-style)
    pp_partition: str = "parameters"        # parameters | uniform | type:<regex>
    offload_optimizer: bool = False         # ZeRO optimizer state kept in CPU memory
    ds_config: Optional[str] = None         # a template from ds_configs/ (DeepSpeed-only settings)

    def validate(self) -> "ParallelConfig":
        """tp, pp, ep >= 1; zero_stage one of 0-3; pp_partition parameters | uniform | type:REGEX."""
        check_choices(self, "parallel")
        for k in ("tp", "pp", "ep"):
            check_range(f"parallel.{k}", getattr(self, k), low=1)
        if self.pp_partition not in ("parameters", "uniform") and not self.pp_partition.startswith("type:"):
            raise ConfigError(f"parallel.pp_partition={self.pp_partition!r} is not one of ['parameters', "
                              "'type:REGEX', 'uniform']")
        return self


@dataclass
class DataConfig:
    dataset: str = "shakespeare"            # "shakespeare" (embedded) or "indexed" (.bin/.idx shards)
    paths: list[str] = field(default_factory=list)    # shard-set directories (or prefixes)
    blend: Optional[list[float]] = None     # one weight per path
    split: list[float] = field(default_factory=lambda: [0.98, 0.02, 0.0])   # train/valid/test by documents
    tokenizer: str = "char"                 # char | bpe | path to tokenizer.json / HF folder
    vocab_size: int = 4096                  # for a tokenizer trained here (bpe)
    seq_len: Optional[int] = None           # sample length; None = model.max_seq_len
    cache_dir: Optional[str] = None         # where sample indices are cached (default: beside the data)

    def validate(self) -> "DataConfig":
        """split: three finite weights >= 0 with a positive sum; blend: finite weights >= 0 with a
        positive sum; vocab_size >= 1; seq_len >= 2 (inputs and next-token targets) where set."""
        for name, weights in (("split", self.split), ("blend", self.blend)):
            if weights is None:
                continue
            for i, w in enumerate(weights):
                check_range(f"data.{name}[{i}]", w, low=0)
            if not weights or sum(weights) <= 0:
                raise ConfigError(f"data.{name}={weights} must hold weights >= 0 with a positive sum")
        if len(self.split) > 3:
            raise ConfigError(f"data.split={self.split} has more than three (train, valid, test) weights")
        check_range("data.vocab_size", self.vocab_size, low=1)
        check_range("data.seq_len", self.seq_len, low=2, optional=True)
        return self


@dataclass
class OptimConfig:
    lr: float = 3e-4                        # peak learning rate (after warmup)
    min_lr: float = 3e-5                    # floor of the cosine / wsd decay, reached at train.max_steps
    weight_decay: float = 0.1               # AdamW decoupled weight decay (not on norms, biases)
    beta1: float = 0.9                      # AdamW first-moment decay
    beta2: float = 0.95                     # AdamW second-moment decay
    eps: float = 1e-8                       # AdamW epsilon
    grad_clip: float = 1.0                  # clip the global gradient norm to this; 0 = off
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"   # lr after warmup: cosine decay, warmup-stable-decay, or constant
    warmup_steps: int = 100                 # linear warmup from 0 to lr over this many steps
    decay_frac: float = 0.2                 # wsd: fraction of max_steps spent decaying
    # optimizer (forge.train.optimizers.OPTIMIZERS): adamw | lion | sgd | adafactor | muon | soap
    name: str = "adamw"                     # OPTIMIZERS key: adamw | lion | sgd | adafactor | muon | soap
    decay_embeddings: bool = True           # weight decay on embedding tables (norms, biases: never)
    momentum: float = 0.9                   # sgd: momentum (0 = plain SGD, no state)
    nesterov: bool = False                  # sgd: Nesterov momentum
    muon_momentum: float = 0.95             # muon: momentum of the orthogonalised matrices
    muon_nesterov: bool = True              # muon: Nesterov momentum
    muon_ns_steps: int = 5                  # muon: Newton-Schulz iterations
    soap_precondition_frequency: int = 10   # soap: recompute the eigenbases of G G^T, G^T G every this many steps

    def validate(self) -> "OptimConfig":
        """lr finite > 0, min_lr in [0, lr], betas in [0, 1), eps > 0, weight_decay >= 0,
        grad_clip >= 0 (0 = off), warmup_steps >= 0, decay_frac in [0, 1], soap_precondition_frequency
        >= 1; NaN and inf refused."""
        check_choices(self, "optim")
        check_range("optim.lr", self.lr, low=0, low_open=True)
        check_range("optim.min_lr", self.min_lr, low=0)
        if self.min_lr > self.lr:
            raise ConfigError(f"optim.min_lr={self.min_lr} must be in [0, optim.lr={self.lr}]")
        for k in ("beta1", "beta2"):
            check_range(f"optim.{k}", getattr(self, k), low=0, high=1, high_open=True)
        check_range("optim.eps", self.eps, low=0, low_open=True)
        check_range("optim.weight_decay", self.weight_decay, low=0)
        check_range("optim.grad_clip", self.grad_clip, low=0, what=">= 0 (0 turns clipping off)")
        check_range("optim.warmup_steps", self.warmup_steps, low=0)
        check_range("optim.decay_frac", self.decay_frac, low=0, high=1)
        check_range("optim.soap_precondition_frequency", self.soap_precondition_frequency, low=1)
        return self


@dataclass
class TrainConfig:
    max_steps: int = 1000                   # optimizer steps of the run (the lr schedule spans them)
    micro_batch_size: int = 8               # sequences per data-parallel rank per forward/backward
    grad_accum: int = 1                     # micro batches per step (micro_batch_size * grad_accum * dp sequences)
    seed: int = 1234                        # seeds the weights (per tensor name), the data order and dropout
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"   # compute dtype (bf16/fp16 keep fp32 master weights)
    out_dir: str = "runs/default"           # config.yaml, metrics.jsonl, summary.json, loss.png, checkpoints/ go here
    resume: str = "none"                    # none | auto | path to a checkpoint
    init_from: Optional[str] = None         # a fresh run starts from these weights: Forge folder, checkpoint,
                                            # HF folder or hub id (the model config comes from it)
    save_interval: int = 500                # checkpoint every this many steps, and at the end; 0 = at the end only
    eval_interval: int = 250                # validation every this many steps, and at the end; 0 = never
    eval_steps: int = 20                    # validation batches per eval (capped at the validation split)
    log_interval: int = 10                  # a metrics.jsonl training line every this many steps
    activation_checkpointing: Literal["none", "full", "attention"] = "none"   # recompute in backward: nothing, whole blocks, or attention only
    compile: bool = False                   # torch.compile the model (inductor)
    linear_backend: Literal["aten", "onednn", "auto"] = "aten"   # fp32 CPU linears (forge.kernels); auto picks per machine
    # non-finite steps (forge.train.nonfinite) and checkpoint retention (forge.train.checkpoint)
    max_skipped_steps: int = 5              # abort (NonFiniteError) after this many skipped steps in a row; 0 = never
    spike_factor: float = 0.0               # also skip a step whose loss > factor x mean of the last 20 applied; 0 = off
    keep_last: int = 0                      # keep the newest k complete checkpoints (+ keep_every's); 0 = keep all
    keep_every: int = 0                     # ... and every checkpoint whose step is a multiple of this; 0 = off
    # hangs (forge.train.watchdog): a stalled or dead rank ends the job instead of hanging it
    collective_timeout_s: float = 600.0     # a collective (every process group) or the wait for rank 0's
                                            # data index that takes longer raises on the waiting rank
    step_timeout_s: float = 1800.0          # no step, eval or save finished for this long: dump every
                                            # thread's stack and exit 124 (0 = no watchdog)
    first_step_timeout_s: float = 3600.0    # the same for the first step (torch.compile, warm-up);
                                            # 0 = step_timeout_s
    stop_timeout_s: float = 20.0            # after SIGINT/SIGTERM, a rank that has not finished its step
                                            # within this long (waiting for a dead peer) dumps its stacks
                                            # and exits 128+signal, unsaved (0 = wait for the step)

    def validate(self) -> "TrainConfig":
        """max_steps, micro_batch_size, grad_accum, eval_steps >= 1; the intervals >= 0 (0 = never);
        the choices known; out_dir a directory or creatable as one (checked before anything is
        written: an existing file there, or above it, is an error)."""
        check_choices(self, "train")
        for k in ("max_steps", "micro_batch_size", "grad_accum", "eval_steps"):
            check_range(f"train.{k}", getattr(self, k), low=1)
        for k in ("save_interval", "eval_interval", "log_interval"):
            check_range(f"train.{k}", getattr(self, k), low=0, what=">= 0 (0 = never)")
        for k in ("max_skipped_steps", "keep_last", "keep_every"):
            check_range(f"train.{k}", getattr(self, k), low=0, what=">= 0 (0 turns it off)")
        check_range("train.spike_factor", self.spike_factor, low=0)
        if self.spike_factor != 0 and not self.spike_factor > 1:
            raise ConfigError(f"train.spike_factor={self.spike_factor} must be 0 (off) or > 1")
        check_range("train.collective_timeout_s", self.collective_timeout_s, low=0, low_open=True, what="> 0 (seconds)")
        for k in ("step_timeout_s", "first_step_timeout_s"):
            check_range(f"train.{k}", getattr(self, k), low=0, what=">= 0 (seconds; 0 = off / step_timeout_s)")
        check_range("train.stop_timeout_s", self.stop_timeout_s, low=0, what=">= 0 (seconds; 0 = wait for the step)")
        if not self.out_dir:
            raise ConfigError("train.out_dir is empty; name the run directory (e.g. train.out_dir=runs/x)")
        node = os.path.abspath(self.out_dir)
        while node and not os.path.exists(node):
            parent = os.path.dirname(node)
            if parent == node:
                break
            node = parent
        if os.path.exists(node) and not os.path.isdir(node):
            what = "is a file" if node == os.path.abspath(self.out_dir) else f"lies under the file {node!r}"
            raise ConfigError(f"train.out_dir={self.out_dir!r} {what}, not a directory; choose another "
                              "train.out_dir (nothing was written)")
        return self


@dataclass
class LogConfig:
    progress: bool = True                   # tqdm progress bar on a terminal; plain log lines with an ETA otherwise
    wandb: bool = False                     # log to Weights & Biases (offline without an API key; pip install wandb)
    wandb_project: str = "forge"            # the wandb project name
    tensorboard: bool = False               # TensorBoard events in OUT/tensorboard (pip install tensorboard)
    plot: bool = True                       # redraw OUT/loss.png at each eval when matplotlib is installed
