"""`forge prepare`: tokenize documents once, offline, into MMIDIDX shards plus a manifest.

    forge prepare --input PATH [PATH ...] --output DIR
                  [--tokenizer FILE_OR_DIR | --train-tokenizer [bpe|char] --vocab-size N]
                  [--text-key KEY] [--text-unit line|paragraph|file] [--workers N]
                  [--shard-size TOKENS] [--dtype auto|uint16|int32] [--strict] [--overwrite]

Each document's tokens are followed by the end-of-document token and stored as one sequence.
Shards fill in input order and hold at most `shard_size` tokens: a document that does not fit
the current shard starts the next one, and only a document longer than a whole shard is cut
(its pieces are consecutive sequences, counted as `split_documents`). Output is byte-identical
whatever `--workers`: workers only tokenize chunks; the main process writes them in order.

Crash safety: a shard is written as `*.tmp` and renamed when complete, and only then is it
added to `manifest.json` (itself written then renamed) with its end position in the input
stream, `end = [record, token offset]`. A rerun with the same settings verifies the listed shards
(files present, sizes, MMIDIDX structure, sha256 of .bin and .idx against the manifest), deletes
anything unlisted, skips the records the good shards cover and continues. A damaged listed shard
is rebuilt from its span of the input (previous shard's `end` to its own), in the same pass, and
must come out with the manifest's checksum; good shards are not touched. So a finished run re-read
is a verification (it re-hashes every shard, ~0.3 s per 100 MB) and the repair of what it names.

Refused (exit status 2, the message names the file): input with no text at all, a `.txt` that
looks binary (forge.data.sources.check_text), and everything forge.data.sources refuses.

Per shard the manifest counts the input records that finished in it (`records`), empty ones
skipped (`empty`), ones with invalid UTF-8 replaced (`invalid_utf8`) and cut ones
(`split_documents`); `totals` sums them (plus records after the last shard).
"""
from __future__ import annotations

import argparse
import bisect
import glob
import logging
import os
import shutil
import sys
from collections import deque
from typing import Iterable, Iterator, Optional

import numpy as np

from forge.data.indexed import IndexedWriter, token_dtype
from forge.data.integrity import verify_shard_files
from forge.data.shards import FORMAT, MANIFEST, read_manifest
from forge.data.sources import InputError, Record, describe_input, iter_records, resolve_inputs, UNITS
from forge.data.tokenizer import CONFIG_FILE, TOKENIZER_FILE, CharTokenizer, Tokenizer, train_bpe
from forge.fsutil import write_json_atomic

log = logging.getLogger("forge.data")
COUNTERS = ("records", "empty", "invalid_utf8", "split_documents")
DEFAULT_SHARD_SIZE = 1 << 28
MAX_WARNINGS = 10

# ------------------------------------------------------------------ tokenization (workers)
_worker_tok: Optional[Tokenizer] = None


def _init_worker(tokenizer_json: str, config: dict) -> None:
    global _worker_tok
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tok = Tokenizer.from_json(tokenizer_json, config)


def encode_chunk(tok: Tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of `texts`, each followed by EOD, concatenated (int64) and the per-text lengths."""
    if isinstance(tok, CharTokenizer):
        parts = [tok.encode_array(t) for t in texts]
    else:
        parts = [np.array(ids, dtype=np.int64) for ids in tok.encode_batch(texts)]
    lengths = np.array([len(p) + 1 for p in parts], dtype=np.int64)
    flat = np.empty(int(lengths.sum()), dtype=np.int64)
    ends = np.cumsum(lengths)
    flat[ends - 1] = tok.eod_id
    for p, e, n in zip(parts, ends, lengths):
        flat[e - n:e - 1] = p
    return flat, lengths


def _encode_in_worker(texts: list[str]):
    return encode_chunk(_worker_tok, texts)


def _chunks(records: Iterable[tuple[int, Record]], chunk_chars: int) -> Iterator[list[tuple[int, Record]]]:
    chunk, size = [], 0
    for item in records:
        chunk.append(item)
        size += len(item[1].text)
        if size >= chunk_chars or len(chunk) >= 8192:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def tokenized(records: Iterable[tuple[int, Record]], tok: Tokenizer, workers: int = 1,
              chunk_chars: int = 1 << 20) -> Iterator[tuple[int, Record, Optional[np.ndarray]]]:
    """(index, record, tokens incl. EOD or None if empty) in input order; `workers` processes."""
    def texts(chunk):
        return [rec.text for _, rec in chunk if rec.text.strip()]

    def emit(chunk, result):
        try:
            flat, lengths = result()
        except ValueError:                # name the record (e.g. a character outside a char alphabet)
            for _, rec in chunk:
                try:
                    encode_chunk(tok, [rec.text])
                except ValueError as e:
                    raise InputError(f"{rec.where}: {e}") from None
            raise
        k = start = 0
        for i, rec in chunk:
            if rec.text.strip():
                yield i, rec, flat[start:start + lengths[k]]
                start += int(lengths[k])
                k += 1
            else:
                yield i, rec, None

    if workers <= 1:
        for chunk in _chunks(records, chunk_chars):
            yield from emit(chunk, lambda: encode_chunk(tok, texts(chunk)))
        return
    import multiprocessing as mp
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tok.to_json(), tok.special_tokens())) as pool:
        pending: deque = deque()          # bounded window keeps memory flat and order fixed
        for chunk in _chunks(records, chunk_chars):
            pending.append((chunk, pool.apply_async(_encode_in_worker, (texts(chunk),))))
            if len(pending) >= 2 * workers:
                c, r = pending.popleft()
                yield from emit(c, r.get)
        while pending:
            c, r = pending.popleft()
            yield from emit(c, r.get)


# ------------------------------------------------------------------ shard writing (main process)
class _ShardFiller:
    """Packs tokenized records into shards of at most `shard_size` tokens; see the module doc."""

    def __init__(self, out: str, manifest: dict, dtype, vocab_size: int, shard_size: int):
        self.out, self.manifest, self.dtype = out, manifest, dtype
        self.vocab_size, self.size = vocab_size, shard_size
        self.writer: Optional[IndexedWriter] = None
        self.counts = dict.fromkeys(COUNTERS, 0)
        self.warned = 0

    def _close(self, end: tuple[int, int]) -> None:
        entry = {"name": os.path.basename(self.writer.prefix), **self.writer.finish(),
                 "end": list(end), **self.counts}
        self.manifest["shards"].append(entry)
        write_json_atomic(os.path.join(self.out, MANIFEST), self.manifest)
        log.info("shard %s: %d documents, %d tokens", entry["name"], entry["documents"], entry["tokens"])
        self.writer, self.counts = None, dict.fromkeys(COUNTERS, 0)

    def _open(self) -> IndexedWriter:
        if self.writer is None:
            name = f"shard_{len(self.manifest['shards']):05d}"
            self.writer = IndexedWriter(os.path.join(self.out, name), self.dtype, self.vocab_size)
        return self.writer

    def _count(self, rec: Record, tokens: Optional[np.ndarray]) -> None:
        """Count a record once, in the shard where it finishes."""
        self.counts["records"] += 1
        self.counts["empty"] += tokens is None
        self.counts["split_documents"] += tokens is not None and len(tokens) > self.size
        if rec.bad_utf8:
            self.counts["invalid_utf8"] += 1
            if self.warned < MAX_WARNINGS:
                log.warning("%s: invalid UTF-8 replaced by U+FFFD", rec.where)
                self.warned += 1

    def add(self, index: int, rec: Record, tokens: Optional[np.ndarray], skip: int = 0) -> None:
        """Record number `index`; `skip` tokens of it are already in earlier shards (resume)."""
        if tokens is None:
            return self._count(rec, None)
        n, pos = len(tokens), skip
        while pos < n:
            rest = n - pos
            if self.writer is not None and self.writer.tokens + rest > self.size and rest <= self.size:
                self._close((index, pos))         # the document fits a fresh shard: do not cut it
            w = self._open()
            take = min(rest, self.size - w.tokens)
            w.add(tokens[pos:pos + take])
            pos += take
            if pos == n:
                self._count(rec, tokens)
            if w.tokens == self.size:
                self._close((index + 1, 0) if pos == n else (index, pos))

    def finish(self, end: tuple[int, int]) -> None:
        """`end`: the position after the last record, written on the last shard."""
        if self.writer is not None:
            self._close(end)
        totals = {k: sum(s[k] for s in self.manifest["shards"]) + self.counts[k] for k in COUNTERS}
        totals.update(documents=sum(s["documents"] for s in self.manifest["shards"]),
                      tokens=sum(s["tokens"] for s in self.manifest["shards"]),
                      shards=len(self.manifest["shards"]))
        self.manifest.update(totals=totals, tail=self.counts, complete=True)
        write_json_atomic(os.path.join(self.out, MANIFEST), self.manifest)


def _until(items: Iterator[tuple[int, Record]], stop: Optional[int]) -> Iterator[tuple[int, Record]]:
    """The items up to record number `stop` (all if None), without reading further input."""
    for i, rec in items:
        if stop is not None and i > stop:
            return
        yield i, rec


class _Repair:
    """Rebuilds the listed shards that `verify_shard_files` finds damaged, from the same input.

    Shard k holds the input stream from the previous shard's `end` to its own: for each record r
    in that span, the tokens [lo, hi) where lo is the start offset (first record) or 0 and hi the
    end offset (last record) or all of them; each non-empty slice is one sequence. That is how
    `_ShardFiller` wrote it, so the rebuilt shard must match the manifest's sha256; a mismatch means
    the input changed and is an error. Good shards are left untouched.
    """

    def __init__(self, out: str, manifest: dict, dtype, vocab_size: int):
        self.out, self.manifest, self.dtype, self.vocab_size = out, manifest, dtype, vocab_size
        self.todo: dict[int, tuple[tuple[int, int], tuple[int, int]]] = {}    # shard -> (start, end), open
        self.writers: dict[int, IndexedWriter] = {}
        self.spans, self.order, self.starts, self.first, self.last = {}, [], [], 0, -1
        if not manifest["shards"]:
            return
        damaged = verify_shard_files(out, manifest)
        for k, why in damaged:
            start = tuple(manifest["shards"][k - 1]["end"]) if k else (0, 0)
            self.todo[k] = (start, tuple(manifest["shards"][k]["end"]))
            log.warning("shard %s is damaged (%s): rebuilding it", manifest["shards"][k]["name"], why)
        if damaged:
            log.info("keeping %d verified shards", len(manifest["shards"]) - len(damaged))
        self.spans = dict(self.todo)
        self.order = sorted(self.spans)
        self.starts = [self.spans[k][0][0] for k in self.order]
        self.first = min((a[0] for a, _ in self.todo.values()), default=0)
        self.last = max((b[0] if b[1] else b[0] - 1 for _, b in self.todo.values()), default=-1)

    def _spans(self, i: int) -> list[tuple[int, int, Optional[int]]]:
        """(shard, lo, hi) for each damaged shard holding tokens [lo, hi) of record i (bisect, O(log))."""
        out = []
        j = bisect.bisect_right(self.starts, i) - 1
        while j >= 0:
            k = self.order[j]
            (r0, o0), (r1, o1) = self.spans[k]
            if not (i < r1 or (i == r1 and o1 > 0)):
                break                     # spans are ordered: earlier ones end even earlier
            out.append((k, o0 if i == r0 else 0, o1 if i == r1 else None))
            j -= 1
        return out[::-1]

    def wants(self, i: int) -> bool:
        return bool(self._spans(i))

    def add(self, i: int, tokens: Optional[np.ndarray]) -> None:
        for k, lo, hi in self._spans(i):
            if tokens is not None and len(tokens[lo:hi]):
                if k not in self.writers:
                    name = self.manifest["shards"][k]["name"]
                    self.writers[k] = IndexedWriter(os.path.join(self.out, name), self.dtype, self.vocab_size)
                self.writers[k].add(tokens[lo:hi])
            (r1, o1) = self.spans[k][1]
            if i == (r1 if o1 else r1 - 1):
                self._close(k)

    def _close(self, k: int) -> None:
        entry = self.manifest["shards"][k]
        w = self.writers.pop(k, None) or IndexedWriter(os.path.join(self.out, entry["name"]), self.dtype,
                                                       self.vocab_size)
        got = w.finish()
        self.todo.pop(k, None)
        if (got["bin_sha256"], got["idx_sha256"]) != (entry["bin_sha256"], entry["idx_sha256"]):
            raise InputError(f"{self.out}: rebuilt {entry['name']} differs from the one in {MANIFEST} (sha256 "
                             f"{got['bin_sha256'][:16]}... vs {entry['bin_sha256'][:16]}...): the input changed "
                             f"since it was prepared; prepare it again with --overwrite")
        log.info("rebuilt shard %s: %d documents, %d tokens, checksum verified", entry["name"], got["documents"],
                 got["tokens"])

    def finish(self) -> None:
        """Close what the input ended before closing (cannot happen with unchanged input: an error)."""
        for k in sorted(self.todo):
            self._close(k)


def _clean_output(out: str, keep: set[str]) -> None:
    """Remove temporaries and shard files the manifest does not list (left by a crash)."""
    for path in set(glob.glob(os.path.join(out, "shard_*")) + glob.glob(os.path.join(out, "*.tmp*"))):
        name = os.path.basename(path).split(".")[0]
        if name not in keep or ".tmp" in path:
            os.remove(path)


def _check_settings(out: str, manifest: dict, settings: dict, keys=None) -> None:
    """Raise if `out` was prepared with other settings (only `keys` compared, if given)."""
    stored = manifest["settings"]
    keys = set(settings) | set(stored) if keys is None else keys
    diff = sorted(k for k in keys if settings.get(k) != stored.get(k))
    if diff:
        raise ValueError(f"{out} holds shards prepared with other settings (differing: {diff}); "
                         f"use another --output or --overwrite")


def prepare_records(records: Iterable[Record], out: str, tokenizer: Tokenizer, settings: dict,
                    workers: int = 1, shard_size: int = DEFAULT_SHARD_SIZE, dtype: str = "auto",
                    overwrite: bool = False) -> dict:
    """Tokenize `records` (the same sequence on every rerun) into shards under `out`; resumes an
    unfinished run with identical `settings` (which describe where the records come from)."""
    if shard_size <= 0:
        raise ValueError(f"shard size must be positive, got {shard_size}")
    np_dtype = token_dtype(tokenizer.vocab_size, dtype)
    settings = {**settings, "shard_size": shard_size, "dtype": np_dtype.name,
                "tokenizer_sha256": tokenizer.sha256()}
    manifest = _open_manifest(out, tokenizer, settings, overwrite)
    _clean_output(out, {s["name"] for s in manifest["shards"]})
    repair = _Repair(out, manifest, np_dtype, tokenizer.vocab_size)
    complete = bool(manifest.get("complete"))
    if complete and not repair.todo:
        log.info("%s is already complete (%d shards, all verified)", out, len(manifest["shards"]))
        return manifest
    start_rec, start_off = manifest["shards"][-1]["end"] if manifest["shards"] else (0, 0)
    if start_rec and not complete:
        log.info("resuming after %d shards (input record %d)", len(manifest["shards"]), start_rec)
    filler = _ShardFiller(out, manifest, np_dtype, tokenizer.vocab_size, shard_size)
    first = min(start_rec, repair.first) if repair.todo else start_rec
    stop = repair.last if complete else None       # a complete folder only re-reads what it repairs
    todo = ((i, r) for i, r in enumerate(records)
            if i >= first and (repair.wants(i) or (i >= start_rec and not complete)))
    last = start_rec - 1
    for i, rec, tokens in tokenized(_until(todo, stop), tokenizer, workers):
        repair.add(i, tokens)
        if i >= start_rec and not complete:
            filler.add(i, rec, tokens, skip=start_off if i == start_rec else 0)
            last = i
    repair.finish()
    if complete:
        return manifest
    if not manifest["shards"] and filler.writer is None:
        raise InputError(f"the input holds no text: {filler.counts['records']} records, all empty "
                         f"(check --input, --text-key and --text-unit); {out} was left without shards")
    filler.finish(end=(last + 1, 0))
    t = manifest["totals"]
    log.info("%s: %d documents, %d tokens in %d shards; skipped %d empty, replaced invalid UTF-8 in %d, "
             "split %d longer than a shard", out, t["documents"], t["tokens"], t["shards"], t["empty"],
             t["invalid_utf8"], t["split_documents"])
    return manifest


def _open_manifest(out: str, tokenizer: Tokenizer, settings: dict, overwrite: bool) -> dict:
    """The manifest of `out` (created if missing) for a run with `settings`: an existing one whose
    settings must equal them (else an error naming the difference: a folder only ever holds one
    tokenization), or with `overwrite` / when there is none a fresh empty one, written together
    with the tokenizer before any shard (the old manifest, tokenizer, config and index cache gone)."""
    os.makedirs(out, exist_ok=True)
    manifest = read_manifest(out)
    if manifest is not None and not overwrite:
        _check_settings(out, manifest, settings)
        return manifest
    if manifest is not None:
        for name in (MANIFEST, TOKENIZER_FILE, CONFIG_FILE):
            if os.path.exists(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
        shutil.rmtree(os.path.join(out, "index_cache"), ignore_errors=True)
    tokenizer.save(out)
    manifest = {"format": FORMAT, "version": 1, "tokenizer": TOKENIZER_FILE, "settings": settings,
                "vocab_size": tokenizer.vocab_size, "eod_id": tokenizer.eod_id, "shards": [],
                "complete": False}
    write_json_atomic(os.path.join(out, MANIFEST), manifest)
    return manifest


# ------------------------------------------------------------------ files -> shards, and the CLI
def prepare(inputs: list[str], out: str, tokenizer: Optional[str] = None, train_tokenizer: Optional[str] = None,
            vocab_size: int = 4096, text_key: str = "text", unit: str = "line", workers: int = 1,
            shard_size: int = DEFAULT_SHARD_SIZE, dtype: str = "auto", strict: bool = False,
            overwrite: bool = False) -> dict:
    """Resolve inputs and the tokenizer (load `tokenizer`, or train `bpe`/`char` on the inputs,
    or reuse the one of an unfinished run in `out`), then `prepare_records`. Returns the manifest."""
    if (tokenizer is None) == (train_tokenizer is None):
        raise ValueError("give exactly one of --tokenizer FILE_OR_DIR and --train-tokenizer")
    sources = resolve_inputs(inputs)
    read = lambda: iter_records(sources, text_key, unit, strict)
    settings = {"inputs": [describe_input(s) for s in sources], "text_key": text_key, "unit": unit,
                "strict": strict, "tokenizer_source": tokenizer or f"train:{train_tokenizer}:{vocab_size}"}
    previous = None if overwrite else read_manifest(out)
    if previous is not None:
        _check_settings(out, previous, settings, keys=settings.keys())     # fail before any training
    if previous is not None and train_tokenizer is not None:
        tok = Tokenizer.load(os.path.join(out, TOKENIZER_FILE))     # resume: never retrain
    elif train_tokenizer == "char":
        tok = CharTokenizer.train(r.text for r in read())
    elif train_tokenizer == "bpe":
        log.info("training a byte-level BPE tokenizer (vocab %d) on %d inputs", vocab_size, len(sources))
        tok = train_bpe((r.text for r in read() if r.text.strip()), vocab_size)
    elif train_tokenizer is not None:
        raise ValueError(f"--train-tokenizer must be bpe or char, got {train_tokenizer!r}")
    else:
        tok = Tokenizer.load(tokenizer)
    return prepare_records(read(), out, tok, settings, workers, shard_size, dtype, overwrite)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="forge prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="files, folders, globs, or a hub dataset NAME[:CONFIG]")
    p.add_argument("--output", required=True, help="output folder (shards, manifest.json, tokenizer.json)")
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer", help="tokenizer.json or a Hugging Face tokenizer folder")
    tok.add_argument("--train-tokenizer", nargs="?", const="bpe", choices=("bpe", "char"),
                     help="train a tokenizer on the inputs (default bpe)")
    p.add_argument("--vocab-size", type=int, default=4096, help="vocabulary of a trained BPE tokenizer")
    p.add_argument("--text-key", default="text", help="field holding the text in json/jsonl/parquet/arrow")
    p.add_argument("--text-unit", default="line", choices=UNITS, help=".txt files: one document per ...")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (each single-threaded)")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="max tokens per shard")
    p.add_argument("--dtype", default="auto", choices=("auto", "uint16", "int32"), help="token dtype")
    p.add_argument("--strict", action="store_true", help="refuse invalid UTF-8 instead of replacing it")
    p.add_argument("--overwrite", action="store_true", help="discard shards prepared with other settings")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"        # --workers N means N single-threaded processes
    try:
        prepare(args.input, args.output, args.tokenizer, args.train_tokenizer, args.vocab_size, args.text_key,
                args.text_unit, args.workers, args.shard_size, args.dtype, args.strict, args.overwrite)
    except (InputError, ValueError, FileNotFoundError) as e:
        print(f"forge prepare: error: {e}", file=sys.stderr)
        return 2
    return 0
