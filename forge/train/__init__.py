"""Training: `forge train` (forge.train.cli) and `forge.train.trainer.train(cfg)`.

    from forge.train import train
    result = train(cfg)          # TrainResult: losses, val_losses, metrics, checkpoint, ...

Modules: trainer (`train`: checks, model, engine), loop (the run: resume, steps, eval, save),
engine (DeepSpeed config + initialize), schedule (lr), checkpoint (layout, save, resume), metrics
(metrics.jsonl, progress bar, wandb, TensorBoard), distributed (single-process rendezvous).
Imported lazily so `import forge.train` does not import DeepSpeed.
"""
from __future__ import annotations

__all__ = ["train", "TrainResult"]


def __getattr__(name):
    if name in __all__:
        from forge.train import trainer
        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
