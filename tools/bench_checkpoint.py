"""Checkpoint save and resume cost of a parallel layout (a tool that prints figures; not a test).

For a Llama-style model (tools/bench_build.py's sizes) and a layout ("1", "tp2", "pp2", "tp2pp2",
"zero3" at dp=2), fresh gloo processes build the model and engine as `forge train` does (fp32),
run one training step on random tokens (so Adam's states exist) and time one save_checkpoint.
Per rank: seconds, peak-RSS growth (VmHWM reset before), bytes of the files it wrote (Forge's
by name: */shard-{rank}, rng_state_rank{rank}, the rest rank 0's; DeepSpeed's as handed to its
checkpoint engine). In total: bytes per folder (model/, ds/, ...) and per parameter, and what
the DeepSpeed files hold. New processes then time load_checkpoint into a fresh engine of the
same layout (peak-RSS growth, weights checked).

    python tools/bench_checkpoint.py [--size 100M|400M] [--layouts 1,tp2,pp2,tp2pp2,zero3] [--keep] [--json]
"""
from __future__ import annotations

import argparse
import gc
import glob
import inspect
import json
import os
import re
import shutil
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
from bench_build import SIZES, model_figures, prepare_rank  # noqa: E402
from bench_build import overrides as build_overrides  # noqa: E402
from forge.memory import peak_rss_bytes, reset_peak_rss  # noqa: E402

MiB = 2 ** 20
# name -> (processes, parallel.* settings)
LAYOUTS = {
    "1": (1, {}),
    "tp2": (2, {"tp": 2}),
    "pp2": (2, {"pp": 2}),
    "tp2pp2": (4, {"tp": 2, "pp": 2}),
    "zero3": (2, {"zero_stage": 3}),
}
SEQ = 64
STEP = 1


def overrides(size: str, layout: str) -> list[str]:
    over = [o for o in build_overrides(size, "1") if not o.startswith("data.seq_len=")]
    return over + [f"data.seq_len={SEQ}"] + [f"parallel.{k}={v}" for k, v in LAYOUTS[layout][1].items()]


def _setup(rank, world, port, size, layout):
    """Process group, config, groups and a freshly built engine, as `forge train` makes them."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    sys.stdout.flush()
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)    # DeepSpeed's prints; stderr stays
    from forge.train.engine import create_engine
    from forge.train.trainer import build_rank_model
    import forge.train.checkpoint  # noqa: F401
    cfg, groups = prepare_rank(overrides(size, layout), world)
    t0 = time.perf_counter()
    engine = create_engine(cfg, build_rank_model(cfg, groups), groups)
    return cfg, groups, engine, time.perf_counter() - t0


def _weights_sum(engine) -> float:
    """float64 sum of this rank's parameters (ZeRO 3: its partitions): a save/load round-trip check."""
    s = 0.0
    for p in {id(p): p for p in engine.module.parameters()}.values():
        t = p.ds_tensor if hasattr(p, "ds_tensor") else p
        s += float(t.detach().double().sum())
    return s


def _baseline() -> tuple[bool, int]:
    """gc, hand freed heap memory back (malloc_trim: otherwise a save that reuses what the step
    freed shows no growth), reset VmHWM; returns (reset worked, RSS now)."""
    gc.collect()
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return reset_peak_rss(), peak_rss_bytes()


def _random_batches(cfg, seed):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.data.seq_len + 1), generator=g)


def _trainer_state(cfg, groups) -> dict:
    from forge.train import distributed as fdist
    try:
        from forge.train.precision import optimizer_layout
        layout = {"optimizer_layout": optimizer_layout(cfg)}
    except ImportError:
        layout = {}
    n = cfg.train.micro_batch_size * cfg.train.grad_accum * groups.dp * STEP
    return {"consumed_samples": n, "tokens": n * cfg.data.seq_len, "world_size": fdist.world_size(),
            "dp_size": groups.dp, "zero_stage": cfg.parallel.zero_stage, "precision": cfg.train.precision,
            **layout, "forge_version": "bench"}


def _save_worker(rank, world, port, size, layout, out_dir, res_dir):
    from forge.train import distributed as fdist
    from forge.train.checkpoint import save_checkpoint
    from forge.train.engine import manual_clipping
    from forge.train.step import train_step
    cfg, groups, engine, build_s = _setup(rank, world, port, size, layout)
    t0 = time.perf_counter()
    clip = [p for p in engine.module.parameters() if p.requires_grad] if manual_clipping(cfg) else None
    engine.train()
    loss, _ = train_step(engine, _random_batches(cfg, 1234 + groups.dp_rank), cfg.train.grad_accum, groups, clip,
                         cfg.optim.grad_clip, False)
    step_s = time.perf_counter() - t0
    written = []                       # every file DeepSpeed writes goes through its checkpoint engine
    ce = getattr(engine, "checkpoint_engine", None)
    if ce is not None:
        save = ce.save

        def recording_save(state_dict, path, *a, **k):
            written.append(os.path.abspath(path))
            return save(state_dict, path, *a, **k)
        ce.save = recording_save
    state = _trainer_state(cfg, groups)
    fdist.barrier()
    reset, base = _baseline()
    t0 = time.perf_counter()
    path = save_checkpoint(engine, cfg, out_dir, STEP, groups, state)
    save_s = time.perf_counter() - t0
    growth = peak_rss_bytes() - base
    row = dict(rank=rank, build_s=build_s, step_s=step_s, loss=loss, save_s=save_s, save_growth=growth, rss=base,
               peak_reset=reset, ds_files=[os.path.relpath(p, path) for p in written], path=path,
               weights_sum=_weights_sum(engine), dp_rank=groups.dp_rank, tp_rank=groups.tp_rank,
               pp_rank=getattr(groups, "pp_rank", None))
    with open(os.path.join(res_dir, f"save{rank}.json"), "w") as f:
        json.dump(row, f)
    fdist.barrier()


def _load_worker(rank, world, port, size, layout, path, res_dir):
    from forge.train import distributed as fdist
    from forge.train.checkpoint import load_checkpoint
    cfg, groups, engine, build_s = _setup(rank, world, port, size, layout)
    fdist.barrier()
    reset, base = _baseline()
    t0 = time.perf_counter()
    state = load_checkpoint(engine, path, groups, cfg)
    load_s = time.perf_counter() - t0
    growth = peak_rss_bytes() - base
    row = dict(rank=rank, build_s=build_s, load_s=load_s, load_growth=growth, peak_reset=reset,
               step=state.get("step"), weights_sum=_weights_sum(engine))
    with open(os.path.join(res_dir, f"load{rank}.json"), "w") as f:
        json.dump(row, f)
    fdist.barrier()


def _spawn(fn, world, *args):
    import torch.multiprocessing as mp
    from forge.train.distributed import find_free_port
    mp.spawn(fn, args=(world, find_free_port(), *args), nprocs=world, join=True)


def _read_rows(res_dir, prefix):
    rows = []
    for p in glob.glob(os.path.join(res_dir, f"{prefix}*.json")):
        with open(p) as f:
            rows.append(json.load(f))
    return {r["rank"]: r for r in rows}


_RANK_FILE = (re.compile(r"(?:^|/)shard-(\d+)\.safetensors$"), re.compile(r"^rng_state_rank(\d+)\.pt$"))


def attribute(step_dir: str, saves: dict) -> tuple[dict, dict, list]:
    """(rank -> bytes written, area -> bytes, [(file, bytes, rank)]): Forge's per-rank files by
    name (*/shard-{rank}.safetensors, rng_state_rank{rank}.pt), DeepSpeed's by the paths each rank
    handed its checkpoint engine, everything else (model/model.safetensors of the gathering save,
    indexes, config, trainer state) to rank 0. Areas: the top-level folders, "other" for files."""
    owner = {f: r for r, row in saves.items() for f in row["ds_files"]}
    files, per_rank, area = [], {r: 0 for r in saves}, {}
    for d, _, names in os.walk(step_dir):
        for n in names:
            rel = os.path.relpath(os.path.join(d, n), step_dir)
            size = os.path.getsize(os.path.join(d, n))
            r = owner.get(rel)
            for pat in _RANK_FILE:
                m = pat.search(rel)
                if m:
                    r = int(m.group(1))
            r = 0 if r is None else r
            per_rank[r] = per_rank.get(r, 0) + size
            top = rel.split(os.sep)[0] if os.sep in rel else "other"
            area[top] = area.get(top, 0) + size
            files.append((rel, size, r))
    return per_rank, area, sorted(files)


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def inspect_ds(step_dir: str) -> list[str]:
    """What the DeepSpeed files hold, per kind of file (rank digits as *): tensor MiB under each
    top-level key; a flat state dict of tensors (a pipeline layer file) counts as "weights"."""
    kinds: dict = {}
    for f in sorted(glob.glob(os.path.join(step_dir, "ds", "*.pt"))):
        kind = re.sub(r"\d+", "*", os.path.basename(f))
        k = kinds.setdefault(kind, {"files": 0, "bytes": 0, "tensors": {}, "empty": set()})
        k["files"] += 1
        k["bytes"] += os.path.getsize(f)
        sd = torch.load(f, map_location="cpu", weights_only=False, mmap=True)
        if isinstance(sd, dict) and sd and all(isinstance(v, torch.Tensor) for v in sd.values()):
            sd = {"weights": sd}
        for key, v in (sd.items() if isinstance(sd, dict) else [("?", sd)]):
            b = _tensor_bytes(v)
            if b:
                k["tensors"][key] = k["tensors"].get(key, 0) + b
            elif isinstance(v, dict) and v and all(isinstance(t, torch.Tensor) for t in v.values()):
                k["empty"].add(f"{key} ({len(v)} tensors)")         # ZeRO 3's module: placeholders
        del sd
    return [f"  {kind}: {k['files']} file(s), {k['bytes'] / MiB:,.1f} MiB; tensor MiB "
            + (", ".join(f"{key} {b / MiB:,.1f}" for key, b in k["tensors"].items()) or "none")
            + (f"; empty: {', '.join(sorted(k['empty']))}" if k["empty"] else "")
            for kind, k in kinds.items()]


def estimate_gib(size_bytes: int, layout: str, gathering: bool) -> float:
    """Rough peak of all processes (GiB): the larger of the two phases, in fp32 copies of the
    model summed over ranks, plus ~0.5 GiB a process, as measured at 393M. Save: weights, grads
    and Adam's two states (4; 5 under ZeRO 3); the gathering save adds ~1.6 a rank (tp, ZeRO 3)
    or, under pp, ~3.6 on each tp-rank-0 rank (every stage pickled and unpickled) and ~0.7 on the
    others. Resume: ~6.5 (11 under ZeRO 3) with the sharded resume of 4e29b56, ~4 with DeepSpeed's."""
    world, par = LAYOUTS[layout]
    zero3, tp, pp = par.get("zero_stage") == 3, par.get("tp", 1), par.get("pp", 1)
    extra = 0.0
    if gathering and world > 1:
        extra = (world // tp) * 3.6 + (world - world // tp) * 0.7 if pp > 1 else 1.6 * world
    save = (5 if zero3 else 4) + extra
    resume = 11 if zero3 else 6.5
    return (world * 0.5 * 2 ** 30 + size_bytes * max(save, resume)) / 2 ** 30


def run_one(size, layout, fig, keep=False):
    world = LAYOUTS[layout][0]
    t0 = time.perf_counter()
    out = tempfile.mkdtemp(prefix="bench_ckpt_", dir=os.environ.get("BENCH_CKPT_DIR"))
    try:
        res = os.path.join(out, "results")
        os.makedirs(res)
        _spawn(_save_worker, world, size, layout, os.path.join(out, "run"), res)
        saves = _read_rows(res, "save")
        save_wall = time.perf_counter() - t0
        step_dir = saves[0]["path"]
        per_rank, area, files = attribute(step_dir, saves)
        ds_lines = inspect_ds(step_dir)
        t1 = time.perf_counter()
        _spawn(_load_worker, world, size, layout, step_dir, res)
        loads = _read_rows(res, "load")
        load_wall = time.perf_counter() - t1
    finally:
        if keep:
            print(f"kept {out}", file=sys.stderr)
        else:
            shutil.rmtree(out, ignore_errors=True)
    total = sum(area.values())
    rows = []
    for r in sorted(saves):
        s, ld = saves[r], loads.get(r, {})
        rows.append(dict(size=size, layout=layout, rank=r, rss_mib=s["rss"] / MiB, save_s=s["save_s"],
                         save_growth_mib=s["save_growth"] / MiB,
                         written_mib=per_rank.get(r, 0) / MiB, resume_s=ld.get("load_s"),
                         resume_growth_mib=ld.get("load_growth", 0) / MiB, build_s=s["build_s"], step_s=s["step_s"],
                         resume_build_s=ld.get("build_s"), loss=s["loss"],
                         weights_back=ld.get("weights_sum") == s["weights_sum"],
                         peak_reset=s["peak_reset"] and ld.get("peak_reset", False)))
    totals = dict(size=size, layout=layout, params=fig["params"], total_bytes=total,
                  bytes_per_param=total / fig["params"], area_bytes=area,
                  area_per_param={a: b / fig["params"] for a, b in area.items()},
                  save_run_s=save_wall, resume_run_s=load_wall, files=files, ds_inside=ds_lines)
    return rows, totals


def print_table(size, layout, fig, rows, t):
    world, par = LAYOUTS[layout]
    what = ", ".join(f"{k}={v}" for k, v in par.items()) or "one process"
    print(f"\n{size} ({fig['params']:,} parameters, fp32 {fig['full_bytes'] / MiB:,.0f} MiB) | layout {layout}: "
          f"{world} process(es), {what} | save run {t['save_run_s']:.0f} s, resume run {t['resume_run_s']:.0f} s")
    print(f"{'rank':>4} {'RSS MiB':>8} {'save s':>7} {'growth MiB':>11} {'written MiB':>12} {'resume s':>9} {'growth MiB':>11} "
          f"{'build s':>8} {'step s':>7} {'weights back':>13}")
    for r in rows:
        rs = f"{r['resume_s']:.2f}" if r["resume_s"] is not None else "-"
        print(f"{r['rank']:>4} {r['rss_mib']:>8,.0f} {r['save_s']:>7.2f} {r['save_growth_mib']:>11,.1f} {r['written_mib']:>12,.1f} "
              f"{rs:>9} {r['resume_growth_mib']:>11,.1f} {r['build_s']:>8.1f} {r['step_s']:>7.1f} "
              f"{'yes' if r['weights_back'] else 'NO':>13}")
    if not all(r["peak_reset"] for r in rows):
        print("  (peak RSS could not be reset: growth may be hidden by an earlier peak)")
    areas = sorted(t["area_bytes"], key=lambda a: (a == "other", a))
    print(f"  totals: step dir {t['total_bytes'] / MiB:,.1f} MiB = "
          + " + ".join(f"{a}{'/' if a != 'other' else ''} {t['area_bytes'][a] / MiB:,.1f}" for a in areas)
          + f"; bytes/param {t['bytes_per_param']:.2f} ("
          + ", ".join(f"{a}{'/' if a != 'other' else ''} {t['area_per_param'][a]:.2f}" for a in areas) + ")")
    kinds: dict = {}
    for f, b, r in t["files"]:
        k = kinds.setdefault(re.sub(r"\d+", "*", f), [0, 0, set()])
        k[0], k[1] = k[0] + 1, k[1] + b
        k[2].add(r)
    print("  files: " + "; ".join(f"{kind} x{n} {b / MiB:,.1f} MiB (rank {','.join(map(str, sorted(rs)))})"
                                  for kind, (n, b, rs) in kinds.items()))
    if t["ds_inside"]:
        print("  inside ds/:")
        print("\n".join(t["ds_inside"]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="400M", help=f"one of {list(SIZES)} (default 400M; 100M for a quick run)")
    ap.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma list of {list(LAYOUTS)}")
    ap.add_argument("--max-gb", type=float, default=18.0,
                    help="skip a layout whose estimated peak (all ranks) exceeds this many GiB")
    ap.add_argument("--keep", action="store_true", help="leave the checkpoints (path on stderr; $BENCH_CKPT_DIR "
                    "chooses where they go)")
    ap.add_argument("--json", action="store_true", help="JSON lines (per rank, then totals) instead of tables")
    args = ap.parse_args()
    layouts = [x for x in args.layouts.split(",") if x]
    if args.size not in SIZES or any(x not in LAYOUTS for x in layouts):
        ap.error(f"choose --size from {list(SIZES)} and --layouts from {list(LAYOUTS)}")
    import deepspeed
    import forge
    import forge.train.checkpoint as ck
    gathering = "_full_model_state" in inspect.getsource(ck)    # the save before 157ab93
    fig = model_figures(args.size)
    if not args.json:
        print(f"torch {torch.__version__}, deepspeed {deepspeed.__version__}, forge from {os.path.dirname(forge.__file__)} "
              f"({'gathering save: model/model.safetensors on rank 0' if gathering else 'sharded save'}); fp32, one "
              f"training step (micro batch 1 x {SEQ} tokens) before the save; RSS = before the save (after gc "
              "and malloc_trim); growth = peak RSS (VmHWM, reset there) minus that RSS, for the save / the load; written = bytes of the files the rank wrote")
    for layout in layouts:
        est = estimate_gib(fig["full_bytes"], layout, gathering)
        if est > args.max_gb:
            msg = f"skipped {args.size} {layout}: estimated peak {est:.1f} GiB > --max-gb {args.max_gb:g}"
            print(json.dumps(dict(size=args.size, layout=layout, skipped=msg)) if args.json else f"\n{msg}", flush=True)
            continue
        try:
            rows, totals = run_one(args.size, layout, fig, args.keep)
        except Exception as e:     # a rank failed or was killed (out of memory): report, go on
            msg = f"{args.size} {layout} failed: {type(e).__name__}: {e}"
            print(json.dumps(dict(size=args.size, layout=layout, error=msg)) if args.json else f"\n{msg}", flush=True)
            continue
        if args.json:
            for r in rows:
                print(json.dumps(r))
            print(json.dumps(totals), flush=True)
        else:
            print_table(args.size, layout, fig, rows, totals)
            sys.stdout.flush()


if __name__ == "__main__":
    main()
