"""Input documents for `forge prepare`: files, folders, globs or a Hugging Face hub dataset.

Every input becomes a stream of records `(text, where, bad_utf8)`, read with bounded memory:

* `.txt[.gz]`: one record per line (`unit="line"`, the `datasets` text-loader default), per
  blank-line-separated paragraph (`"paragraph"`) or per file (`"file"`).
* `.jsonl[.gz]`, and `.json` files holding one object per line: one record per line, text under
  `text_key`.
These two are read line by line here (not through `datasets`) so that every problem names its
file and line, and invalid UTF-8 is found per line: replaced by U+FFFD and flagged, or refused
(`strict`).
* `.parquet`, `.arrow`, `.json` holding a JSON array, and hub datasets: read with
  `datasets.load_dataset(..., streaming=True)`; problems name the file and row.

`where` is "path:line" (or "path:row N"); a record whose text is missing raises `InputError`,
and so does a `.txt` whose first 64 KiB look binary (`check_text`).
"""
from __future__ import annotations

import glob
import gzip
import json
import os
from typing import Iterator, NamedTuple, Optional

from forge.hub import unreachable_reason

TEXT_SUFFIXES = (".txt", ".txt.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")
DATASETS_BUILDERS = {".parquet": "parquet", ".arrow": "arrow"}
SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + tuple(DATASETS_BUILDERS)
UNITS = ("line", "paragraph", "file")


class InputError(ValueError):
    """Bad input; the message names the file and line (or row)."""


class Record(NamedTuple):
    text: str
    where: str
    bad_utf8: bool = False


def _suffix(path: str) -> Optional[str]:
    low = path.lower()
    return next((s for s in SUFFIXES if low.endswith(s)), None)


def _walk(folder: str) -> list[str]:
    """Input files under `folder`, skipping hidden files, prepared outputs and tokenizer files."""
    found = []
    for d, dirs, files in os.walk(folder):
        if "manifest.json" in files and d != folder:
            dirs.clear()
            continue
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        found += [os.path.join(d, f) for f in files if _suffix(f) and not f.startswith(".") and f not in
                  ("manifest.json", "tokenizer.json", "tokenizer_config.json")]
    return sorted(found)


def resolve_inputs(inputs: list[str]) -> list[str]:
    """Expand folders (recursively) and globs into sorted files; other names are hub datasets."""
    out: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = _walk(item)
            if not found:
                raise InputError(f"input folder {item} holds no {'/'.join(SUFFIXES)} files")
            out += found
        elif os.path.isfile(item):
            if not _suffix(item):
                raise InputError(f"input {item}: unsupported file type (supported: {', '.join(SUFFIXES)})")
            out.append(item)
        elif glob.has_magic(item):
            found = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p) and _suffix(p))
            if not found:
                raise InputError(f"input glob {item!r} matches no {'/'.join(SUFFIXES)} files")
            out += found
        elif _suffix(item) or item.startswith(("/", "./", "../", "~")):
            raise InputError(f"input {item} does not exist")
        else:
            why = unreachable_reason(variables=("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
            if why is not None:
                raise InputError(f"input {item!r} is not a local file, folder or glob, and the Hugging Face "
                                 f"hub is unreachable ({why}); download the dataset and pass its files")
            out.append("hf:" + item)
    return out


def describe_input(source: str) -> dict:
    """Identity of an input for the manifest (files: size and mtime, so changes are noticed)."""
    if source.startswith("hf:"):
        return {"source": source}
    st = os.stat(source)
    return {"source": os.path.abspath(source), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _open(path: str):
    return gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb")


def _decode(raw: bytes, path: str, first_line: int, strict: bool) -> tuple[str, bool]:
    """UTF-8 text of `raw` (which starts at line `first_line` of `path`) and whether it was repaired."""
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError as e:
        if strict:
            line = first_line + raw.count(b"\n", 0, e.start)
            raise InputError(f"{path}:{line}: invalid UTF-8 ({e.reason}: "
                             f"{raw[max(0, e.start - 10):e.start + 10]!r}); drop --strict to replace it") from None
        return raw.decode("utf-8", "replace"), True


def _lines(path: str, strict: bool) -> Iterator[tuple[str, str, bool]]:
    """(line without its newline, "path:lineno", bad_utf8) for each line of the file."""
    with _open(path) as f:
        for n, raw in enumerate(f, 1):
            if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            text, bad = _decode(raw.rstrip(b"\r\n"), path, n, strict)
            yield text, f"{path}:{n}", bad


SNIFF_BYTES = 1 << 16
BINARY_FRACTION = 0.1


def check_text(path: str) -> None:
    """Raise InputError if `path` (a .txt[.gz]) looks binary: more than BINARY_FRACTION of the
    characters in its first SNIFF_BYTES bytes are NUL, other control characters (not tab, newline,
    carriage return, form feed) or bytes that are not UTF-8. A few bad bytes in real text pass
    (they are replaced per line and counted, or refused with --strict)."""
    with _open(path) as f:
        head = f.read(SNIFF_BYTES)
    if not head:
        return
    text = head.decode("utf-8", "replace")
    bad = sum(text.count(c) for c in BAD_CHARS)
    if bad > BINARY_FRACTION * len(text):
        nul = head.count(b"\0")
        raise InputError(f"{path}: not text: {bad} of the first {len(text)} characters are NUL ({nul}), control "
                         f"characters or invalid UTF-8 (a binary file, or text in UTF-16/another encoding?); "
                         f"convert it to UTF-8 or remove it from --input")


BAD_CHARS = [chr(c) for c in range(32) if chr(c) not in "\t\n\r\f"] + ["\x7f", "\ufffd"]


def _text_records(path: str, unit: str, strict: bool) -> Iterator[Record]:
    check_text(path)
    if unit == "file":
        with _open(path) as f:
            raw = f.read()
        text, bad = _decode(raw[3:] if raw.startswith(b"\xef\xbb\xbf") else raw, path, 1, strict)
        yield Record(text, f"{path}:1", bad)
        return
    if unit == "line":
        for text, where, bad in _lines(path, strict):
            yield Record(text, where, bad)
        return
    buf: list[str] = []                 # paragraphs: runs of non-blank lines
    start, bad_any = "", False
    for text, where, bad in _lines(path, strict):
        if not text.strip():
            if buf:
                yield Record("\n".join(buf), start, bad_any)
            buf, bad_any = [], False
            continue
        if not buf:
            start = where
        buf.append(text)
        bad_any |= bad
    if buf:
        yield Record("\n".join(buf), start, bad_any)


def _text_of(row, key: str, where: str) -> Optional[str]:
    if not isinstance(row, dict):
        raise InputError(f"{where}: expected a JSON object with a {key!r} field, got {type(row).__name__}")
    if key not in row:
        raise InputError(f"{where}: no {key!r} field (fields: {sorted(row)[:20]}); choose one with --text-key")
    value = row[key]
    if value is not None and not isinstance(value, str):
        raise InputError(f"{where}: field {key!r} is a {type(value).__name__}, not a string")
    return value


def _jsonl_records(path: str, key: str, strict: bool) -> Iterator[Record]:
    for line, where, bad in _lines(path, strict):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        text = _text_of(row, key, where) or ""
        if "\\ud" in line.lower():            # lone surrogate escapes cannot be encoded as UTF-8
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                if strict:
                    raise InputError(f"{where}: field {key!r} holds an unpaired UTF-16 surrogate") from None
                text, bad = text.encode("utf-8", "replace").decode("utf-8"), True
        yield Record(text, where, bad)


def _looks_like_jsonl(path: str) -> bool:
    with _open(path) as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return not head.startswith(b"[")


def _datasets_records(source: str, key: str) -> Iterator[Record]:
    import datasets
    datasets.disable_progress_bars()
    if source.startswith("hf:"):
        name, _, config = source[3:].partition(":")
        ds = datasets.load_dataset(name, config or None, split="train", streaming=True)
    else:
        builder = DATASETS_BUILDERS.get(_suffix(source), "json")
        ds = datasets.load_dataset(builder, data_files=[source], split="train", streaming=True)
    for i, row in enumerate(ds):
        where = f"{source}:row {i + 1}"
        yield Record(_text_of(row, key, where) or "", where)


def iter_records(sources: list[str], text_key: str = "text", unit: str = "line",
                 strict: bool = False) -> Iterator[Record]:
    """Every record of every source, in order."""
    if unit not in UNITS:
        raise ValueError(f"text unit must be one of {UNITS}, got {unit!r}")
    for src in sources:
        suffix = None if src.startswith("hf:") else _suffix(src)
        if suffix in TEXT_SUFFIXES:
            yield from _text_records(src, unit, strict)
        elif suffix in JSONL_SUFFIXES and _looks_like_jsonl(src):
            yield from _jsonl_records(src, text_key, strict)
        else:
            yield from _datasets_records(src, text_key)
