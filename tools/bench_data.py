"""Data pipeline throughput: `forge prepare` with 1 and 2 workers against a plain
`datasets.map` + tokenizer + numpy baseline on the same text, then loader samples/s.

    python tools/bench_data.py [--mb 100] [--vocab-size 8192] [--repeat 2] [--workdir DIR]

The corpus is the embedded Shakespeare cut into ~4 KB documents and repeated to --mb
megabytes of JSON lines (4 files). One byte-level BPE tokenizer is trained first (not timed).
Every configuration runs in its own subprocess with the same tokenizer.json and reports
tokens/s = tokens written (EOD included) / wall seconds from reading the files to the .bin:

  forge w=N      forge prepare --workers N (each worker single-threaded)
  baseline       load_dataset("json") -> .map(tokenizer, batched) -> numpy .bin, one process;
                 the tokenizer's own Rust thread pool on (its default) or off
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time


def make_corpus(folder: str, megabytes: float) -> list[str]:
    from forge.data.shakespeare import shakespeare_documents
    docs = []
    for play in shakespeare_documents("train") + shakespeare_documents("val"):
        buf = ""
        for speech in play.split("\n\n"):
            buf += speech + "\n\n"
            if len(buf) > 4000:
                docs.append(buf)
                buf = ""
        if buf.strip():
            docs.append(buf)
    os.makedirs(folder, exist_ok=True)
    files = [open(os.path.join(folder, f"part{i}.jsonl"), "w") for i in range(4)]
    size, k = 0, 0
    while size < megabytes * 1e6:
        line = json.dumps({"text": docs[k % len(docs)]}) + "\n"
        files[k % 4].write(line)
        size += len(line)
        k += 1
    for f in files:
        f.close()
    return sorted(f.name for f in files)


def run_forge(files, tokenizer, out, workers):
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from forge.data.prepare import prepare
    t0 = time.perf_counter()
    m = prepare(files, out, tokenizer=tokenizer, workers=workers, overwrite=True)
    return m["totals"]["tokens"], time.perf_counter() - t0


def run_baseline(files, tokenizer, out, parallel):
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if parallel else "false"
    import datasets
    import numpy as np
    from tokenizers import Tokenizer
    datasets.disable_progress_bars()
    tok = Tokenizer.from_file(tokenizer)
    eod = tok.token_to_id("<|endoftext|>")
    shutil.rmtree(os.path.join(out, "hf"), ignore_errors=True)        # no reuse of an earlier run's cache
    t0 = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=files, split="train", cache_dir=os.path.join(out, "hf"))

    def encode(batch):
        return {"ids": [e.ids + [eod] for e in tok.encode_batch(batch["text"], add_special_tokens=False)]}
    ds = ds.map(encode, batched=True, batch_size=1000, remove_columns=["text"])
    ids = ds.with_format("arrow")["ids"]
    tokens = ids.combine_chunks().flatten().to_numpy().astype(np.uint16)
    tokens.tofile(os.path.join(out, "baseline.bin"))
    return len(tokens), time.perf_counter() - t0


def run_loader(folder, seq_len=1024, batch=8, batches=400):
    import numpy as np
    from forge.data.gpt_dataset import GPTDataset
    from forge.data.loader import batch_iterator
    from forge.data.shards import ShardSet
    cache = os.path.join(folder, "bench_index")
    shutil.rmtree(cache, ignore_errors=True)
    t0 = time.perf_counter()
    ds = GPTDataset(ShardSet(folder), (0, ShardSet(folder).num_docs), seq_len, 0, cache)
    build = time.perf_counter() - t0
    it = batch_iterator(ds, batch, consumed_samples=len(ds) // 2)
    next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    loop = time.perf_counter() - t0
    idx = np.random.default_rng(0).integers(0, len(ds), 5000)
    t0 = time.perf_counter()
    for i in idx:
        ds[int(i)]
    rand = time.perf_counter() - t0
    return {"samples": len(ds), "index_build_s": build, "batch_samples_per_s": batches * batch / loop,
            "getitem_per_s": len(idx) / rand, "seq_len": seq_len}


def child(args) -> None:
    files = sorted(os.path.join(args.workdir, "corpus", f) for f in os.listdir(os.path.join(args.workdir, "corpus")))
    tokenizer = os.path.join(args.workdir, "tok", "tokenizer.json")
    out = os.path.join(args.workdir, args.child.replace("=", ""))
    os.makedirs(out, exist_ok=True)
    if args.child.startswith("forge"):
        tokens, secs = run_forge(files, tokenizer, out, int(args.child.split("=")[1]))
    elif args.child == "loader":
        print(json.dumps(run_loader(os.path.join(args.workdir, "forge1"))))
        return
    else:
        tokens, secs = run_baseline(files, tokenizer, out, parallel=args.child == "baseline-threads")
    print(json.dumps({"tokens": tokens, "seconds": secs}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, default=100)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--workdir", default="/tmp/forge_bench_data")
    p.add_argument("--repeat", type=int, default=2, help="rounds (configurations interleaved); best kept")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    corpus = os.path.join(args.workdir, "corpus")
    shutil.rmtree(args.workdir, ignore_errors=True)
    files = make_corpus(corpus, args.mb)
    mb = sum(os.path.getsize(f) for f in files) / 1e6
    from forge.data.shakespeare import shakespeare_text
    from forge.data.tokenizer import train_bpe
    t0 = time.perf_counter()
    train_bpe([shakespeare_text("train")], args.vocab_size).save(os.path.join(args.workdir, "tok"))
    print(f"corpus: {mb:.0f} MB of JSON lines in {len(files)} files; BPE vocab {args.vocab_size} "
          f"trained in {time.perf_counter() - t0:.1f}s; {os.cpu_count()} CPUs")
    labels = {"forge=1": "forge prepare --workers 1", "forge=2": "forge prepare --workers 2",
              "baseline-threads": "datasets.map, tokenizer threads on", "baseline": "datasets.map, 1 thread"}
    best: dict = {}
    for _ in range(args.repeat):
        for name in labels:
            res = subprocess.run([sys.executable, __file__, "--workdir", args.workdir, "--child", name],
                                 capture_output=True, text=True)
            if res.returncode:
                sys.exit(f"{labels[name]}: failed\n{res.stderr[-2000:]}")
            r = json.loads(res.stdout.strip().splitlines()[-1])
            best.setdefault(name, []).append(r)
    print(f"{'configuration':<36}{'tokens':>12}{'best s':>8}{'tokens/s':>12}   all runs (s)")
    for name, runs in best.items():
        r = min(runs, key=lambda x: x["seconds"])
        print(f"{labels[name]:<36}{r['tokens']:>12,}{r['seconds']:>8.1f}{r['tokens'] / r['seconds']:>12,.0f}   "
              + " ".join(f"{x['seconds']:.1f}" for x in runs))
    print(f"load average after: {open('/proc/loadavg').read().split()[:3]} (other processes share the CPUs)")
    res = subprocess.run([sys.executable, __file__, "--workdir", args.workdir, "--child", "loader"],
                         capture_output=True, text=True)
    r = json.loads(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 else None
    if r is None:
        print(f"loader: failed\n{res.stderr[-2000:]}")
    else:
        print(f"loader (seq_len {r['seq_len']}, {r['samples']:,} samples): index built in {r['index_build_s']:.2f}s; "
              f"batch_iterator {r['batch_samples_per_s']:,.0f} samples/s (micro batch 8); "
              f"random ds[i] {r['getitem_per_s']:,.0f}/s")


if __name__ == "__main__":
    main()
