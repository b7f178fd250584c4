"""torch.profiler over a few steps of `forge train` (a tool that prints tables; not a test).

    python tools/profile_train.py OUT.txt CONFIG [key=value ...]
    python tools/profile_train.py prof.txt configs/shakespeare_char.yaml train.max_steps=18 \
        train.eval_interval=0 train.save_interval=0 train.out_dir=/tmp/prof

Profiles steps 11-15 (wait 8 optimizer steps, warm up 2, record 5): the engine's `step` is wrapped
so that each call advances the profiler schedule (with grad accumulation that is per micro batch).
Writes the ops sorted by self CPU time and by self device time (CUDA) to OUT.txt: many
`cudaStreamSynchronize` or per-parameter small ops in the CPU table show host-bound steps.
"""
from __future__ import annotations

import sys

import torch


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit(__doc__)
    out, config, overrides = argv[0], argv[1], argv[2:]
    import forge.train.trainer as trainer
    from forge.config import load_config
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    prof = torch.profiler.profile(activities=activities, schedule=torch.profiler.schedule(wait=8, warmup=2, active=5))
    create = trainer.create_engine

    def create_engine(*args, **kwargs):
        engine = create(*args, **kwargs)
        step = engine.step

        def profiled_step(*a, **k):
            result = step(*a, **k)
            prof.step()
            return result
        engine.step = profiled_step
        return engine

    trainer.create_engine = create_engine
    cfg = load_config(config, overrides + ["log.progress=false"])
    prof.start()
    result = trainer.train(cfg)
    prof.stop()
    device_key = "self_device_time_total" if torch.cuda.is_available() else "cpu_time_total"
    with open(out, "w") as f:
        f.write(f"tokens/s over the run: {result.tokens_per_s:,.0f}\n")
        counts = {e.key: e.count for e in prof.key_averages()}
        for op in ("aten::_local_scalar_dense", "cudaStreamSynchronize", "aten::copy_"):
            f.write(f"{op} per profiled step: {counts.get(op, 0) / 5:g}\n")   # .item()/float() = a host sync
        for key in ("self_cpu_time_total", device_key):
            f.write(prof.key_averages().table(sort_by=key, row_limit=30) + "\n")
    print(open(out).read())


if __name__ == "__main__":
    main(sys.argv[1:])
