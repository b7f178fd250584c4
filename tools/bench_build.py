"""Build cost of a parallel layout (a tool that prints figures; not a test).

For a Llama-style model and a layout ("1", "tp2", "tp2pp2", "zero3"), each rank, in fresh gloo
processes, builds the model as `forge train` does (seed_everything, build_for_layout), then
creates the DeepSpeed engine (fp32, Forge's torch AdamW; ZeRO 3 partitions there), without
training. Per rank: the growth of its peak RSS over a baseline taken after every import and a
gc.collect(), after the build and after the engine; their wall times; the fp32 bytes of the
parameters it holds (under ZeRO 3 its ds_tensor partitions). The peak is VmHWM, reset to the
current RSS before the baseline; ru_maxrss (which keeps the peak of exited threads, so an
import-time peak can hide growth) is reported too.

    python tools/bench_build.py [--size 100M,400M] [--layouts 1,tp2,tp2pp2,zero3] [--json]
"""
from __future__ import annotations

import argparse
import gc
import glob
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from forge.memory import maxrss_bytes, peak_rss_bytes, reset_peak_rss, rss_bytes  # noqa: E402

MiB = 2 ** 20
# Llama-style (rope, rmsnorm, SwiGLU, untied 32000 vocabulary): d_model, n_layers, n_heads, d_ff
SIZES = {
    "100M": (768, 8, 12, 2048),
    "400M": (1024, 24, 16, 3072),
    "1B": (2048, 18, 16, 5632),
}
# name -> (processes, parallel.* settings)
LAYOUTS = {
    "1": (1, {}),
    "tp2": (2, {"tp": 2}),
    "tp2pp2": (4, {"tp": 2, "pp": 2}),
    "zero3": (2, {"zero_stage": 3}),
}


def overrides(size: str, layout: str, extra: tuple = ()) -> list[str]:
    d, n_layers, heads, d_ff = SIZES[size]
    over = ["model.preset=llama2-7b", f"model.d_model={d}", f"model.n_layers={n_layers}", f"model.n_heads={heads}",
            f"model.d_ff={d_ff}", "model.max_seq_len=2048", "data.seq_len=2048", "train.precision=fp32",
            "train.micro_batch_size=1", "train.grad_accum=1", "optim.grad_clip=1.0"]
    return over + list(extra) + [f"parallel.{k}={v}" for k, v in LAYOUTS[layout][1].items()]


def build_model_for_layout(cfg, groups):
    """This rank's model exactly as `forge train` builds it."""
    from forge.train.trainer import build_rank_model
    return build_rank_model(cfg, groups)


def _import_everything():
    """Import, before the baseline, what the build and deepspeed.initialize would import lazily."""
    import importlib
    for mod in ("deepspeed", "deepspeed.runtime.engine", "deepspeed.runtime.pipe.engine",
                "deepspeed.runtime.pipe.module", "deepspeed.runtime.zero.stage3",
                "deepspeed.runtime.zero.stage_1_and_2", "deepspeed.runtime.zero.partition_parameters",
                "deepspeed.checkpoint.constants", "deepspeed.moe.utils", "forge.layout.build",
                "forge.layout.pipeline", "forge.parallel.sharding", "forge.models.io",
                "forge.models.layers.moe", "forge.models.block", "forge.kernels", "forge.train.engine",
                "forge.train.trainer"):
        try:
            importlib.import_module(mod)
        except ImportError:     # a module moved: it is then imported (and counted) during the build
            print(f"bench_build: could not import {mod}", file=sys.stderr)


def _peaks_kb() -> tuple[int, int]:
    """(VmHWM, ru_maxrss) in kB."""
    return peak_rss_bytes() // 1024, maxrss_bytes() // 1024


def _param_bytes(model, zero3: bool) -> int:
    """fp32 bytes of the parameters this rank holds (ZeRO 3: its partitions)."""
    params = {id(p): p for p in model.parameters()}.values()
    if zero3:
        return 4 * sum(p.ds_tensor.numel() for p in params if hasattr(p, "ds_tensor"))
    return 4 * sum(p.numel() for p in params)


def prepare_rank(over: list[str], world: int):
    """(JobConfig, ParallelGroups) of this process, set up as `forge train` does before it builds
    (every import done first, so that it does not count in a later memory baseline)."""
    from forge.config import load_config
    from forge.kernels import set_linear_backend
    from forge.parallel.groups import build_groups
    from forge.train import distributed as fdist
    from forge.train.engine import check_supported
    from forge.train.trainer import _quiet_deepspeed, seed_everything
    _import_everything()
    cfg = load_config(None, over)
    check_supported(cfg, world)
    _quiet_deepspeed()
    fdist.init_distributed()
    groups = build_groups(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep)
    set_linear_backend(cfg.train.linear_backend)
    seed_everything(cfg.train.seed)
    return cfg, groups


def _worker(rank, world, port, size, layout, out_dir, extra=()):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    sys.stdout.flush()
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)    # DeepSpeed's prints (pipeline layout); stderr stays
    from forge.train import distributed as fdist
    from forge.train.engine import create_engine
    cfg, groups = prepare_rank(overrides(size, layout, extra), world)
    gc.collect()
    fdist.barrier()

    reset = reset_peak_rss()
    rss0 = rss_bytes() // 1024
    base, base_maxrss = _peaks_kb()
    t0 = time.perf_counter()
    model = build_model_for_layout(cfg, groups)
    if hasattr(model, "set_activation_checkpointing"):
        model.set_activation_checkpointing(cfg.train.activation_checkpointing)
    build_s = time.perf_counter() - t0
    peak_build, maxrss_build = _peaks_kb()
    build_shard = _param_bytes(model, zero3=False)
    fdist.barrier()

    t0 = time.perf_counter()
    engine = create_engine(cfg, model, groups)
    engine_s = time.perf_counter() - t0
    peak_engine, maxrss_engine = _peaks_kb()
    zero3 = cfg.parallel.zero_stage == 3
    shard = _param_bytes(engine.module, zero3)
    row = dict(size=size, layout=layout, rank=rank, world=world, build_shard_bytes=build_shard, shard_bytes=shard,
               base_rss_kb=rss0, peak_reset=reset, base_hwm_kb=base, peak_build_kb=peak_build,
               peak_engine_kb=peak_engine, growth_build_mib=(peak_build - base) / 1024,
               growth_engine_mib=(peak_engine - base) / 1024, base_maxrss_kb=base_maxrss,
               maxrss_growth_build_mib=(maxrss_build - base_maxrss) / 1024,
               maxrss_growth_engine_mib=(maxrss_engine - base_maxrss) / 1024, build_s=build_s, engine_s=engine_s)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(row, f)
    fdist.barrier()


def model_figures(size: str, extra: tuple = ()) -> dict:
    """Parameter count, fp32 full-model bytes and the largest parameter, from the model on meta."""
    from forge.config import load_config
    from forge.models.transformer import build_model
    cfg = load_config(None, overrides(size, "1", extra))
    with torch.device("meta"):
        model = build_model(cfg.model)
    return dict(params=model.num_params(), full_bytes=4 * model.num_params(),
                largest_param_bytes=4 * max(p.numel() for p in model.parameters()))


def estimate_gib(size: str, layout: str, full_bytes: int, rank_local: bool = True) -> float:
    """Rough peak of all processes, for refusing what the machine cannot hold. Rank-local build:
    each rank its shard plus one full tensor; ZeRO 3's engine adds ~4 partitions (fp32 master,
    gradient, Adam's two moments). rank_local=False: the build before it (692981b), which held
    the full fp32 model plus 2 shards per rank (tp, pp), or ~2.3 full models with ZeRO 3's engine."""
    world, par = LAYOUTS[layout]
    shards = par.get("tp", 1) * par.get("pp", 1)
    if rank_local:
        per_rank = full_bytes / world * (5 if par.get("zero_stage") == 3 else 1.3) + 0.3 * 2 ** 30
        return world * per_rank / 2 ** 30
    extra = 2 / shards if shards > 1 else 0.1
    if par.get("zero_stage") == 3:
        extra = 3 / world
    return world * (0.3 * 2 ** 30 + full_bytes * (1 + extra)) / 2 ** 30


def run_one(size: str, layout: str, extra: tuple = ()) -> tuple[list[dict], float]:
    import torch.multiprocessing as mp
    from forge.train.distributed import find_free_port
    world = LAYOUTS[layout][0]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_build_") as d:
        mp.spawn(_worker, args=(world, find_free_port(), size, layout, d, extra), nprocs=world, join=True)
        rows = []
        for path in sorted(glob.glob(os.path.join(d, "rank*.json"))):
            with open(path) as f:
                rows.append(json.load(f))
    return sorted(rows, key=lambda r: r["rank"]), time.perf_counter() - t0


def print_table(size, layout, fig, rows, wall):
    world, par = LAYOUTS[layout]
    what = ", ".join(f"{k}={v}" for k, v in par.items()) or "one process"
    print(f"\n{size} ({fig['params']:,} parameters, fp32 {fig['full_bytes'] / MiB:,.0f} MiB, largest parameter "
          f"{fig['largest_param_bytes'] / MiB:,.1f} MiB) | layout {layout}: {world} process(es), {what} | "
          f"run {wall:.1f} s")
    print(f"{'rank':>4} {'shard MiB':>10} {'base MiB':>9} {'growth build':>13} {'/shard':>7} "
          f"{'growth engine':>14} {'/shard':>7} {'build s':>8} {'engine s':>9} {'ru_maxrss growth':>17}")
    if not all(r["peak_reset"] for r in rows):
        print("  (peak RSS could not be reset before the baseline: an import-time peak may hide growth)")
    for r in rows:
        shard = r["shard_bytes"] / MiB
        print(f"{r['rank']:>4} {shard:>10,.1f} {r['base_hwm_kb'] / 1024:>9,.0f} {r['growth_build_mib']:>13,.1f} "
              f"{r['growth_build_mib'] / shard:>7.2f} {r['growth_engine_mib']:>14,.1f} "
              f"{r['growth_engine_mib'] / shard:>7.2f} {r['build_s']:>8.2f} {r['engine_s']:>9.2f} "
              f"{r['maxrss_growth_build_mib']:>8,.0f}/{r['maxrss_growth_engine_mib']:<8,.0f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", action="append", help=f"comma list or repeated, of {list(SIZES)} (default 100M)")
    ap.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma list of {list(LAYOUTS)}")
    ap.add_argument("--max-gb", type=float, default=18.0,
                    help="skip a combination whose estimated peak (all ranks) exceeds this many GiB")
    ap.add_argument("--json", action="store_true", help="one JSON line per rank instead of tables")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override applied after the size (e.g. model.attention=ssm); repeatable")
    args = ap.parse_args()
    sizes = [s for arg in (args.size or ["100M"]) for s in arg.split(",") if s]
    layouts = [x for x in args.layouts.split(",") if x]
    for name, known in ((sizes, SIZES), (layouts, LAYOUTS)):
        bad = [x for x in name if x not in known]
        if bad:
            ap.error(f"unknown {bad}; choose from {list(known)}")
    if not args.json:
        import deepspeed
        import forge
        print(f"torch {torch.__version__}, deepspeed {deepspeed.__version__}, forge from "
              f"{os.path.dirname(forge.__file__)}; growth = peak RSS after the build / after "
              "deepspeed.initialize minus before the build (VmHWM, reset before the baseline; "
              "ru_maxrss growth after build/engine in the last column); "
              "/shard = growth over the rank's fp32 parameter bytes")
    for size in sizes:
        fig = model_figures(size, tuple(args.set))
        for layout in layouts:
            est = estimate_gib(size, layout, fig["full_bytes"])
            if est > args.max_gb:
                msg = f"skipped {size} {layout}: estimated peak {est:.1f} GiB > --max-gb {args.max_gb:g}"
                print(json.dumps(dict(size=size, layout=layout, skipped=msg)) if args.json else f"\n{msg}", flush=True)
                continue
            try:
                rows, wall = run_one(size, layout, tuple(args.set))
            except Exception as e:     # a rank failed or was killed (out of memory): report, go on
                msg = f"{size} {layout} failed: {type(e).__name__}: {e}"
                print(json.dumps(dict(size=size, layout=layout, error=msg)) if args.json else f"\n{msg}", flush=True)
                continue
            if args.json:
                for r in rows:
                    print(json.dumps({**r, **fig, "run_s": wall}), flush=True)
            else:
                print_table(size, layout, fig, rows, wall)
                sys.stdout.flush()


if __name__ == "__main__":
    main()
