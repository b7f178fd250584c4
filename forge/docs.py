"""`python -m forge.docs [--check]`: writes docs/config.md, the reference of every config key.

The reference is generated from the forge/config/ package itself: the keys, types and defaults from the
dataclasses under `JobConfig`, each key's meaning from the `# comment` after its field (a comment
line directly below, aligned with it, continues it), each section's description from its class
docstring, and the valid values of registry keys from forge.models.registry.REGISTRIES (and
model.preset from forge.models.presets.PRESETS). `--check` exits 1 when docs/config.md differs
from what would be generated (tests/test_config_docs.py runs the same comparison).
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import os
import sys
import tokenize
import typing

from forge.config import JobConfig

DOCS_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "config.md")
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config")   # the forge.config package


def field_comments(source: str) -> dict[tuple[str, str], str]:
    """{(class name, field name): comment text} for the annotated fields of every class in `source`:
    the comment on the field's line plus comment-only lines right below it starting in the same column."""
    comments: dict[int, tuple[int, str]] = {}             # line -> (column, text) of its comment
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = (tok.start[1], tok.string.lstrip("#").strip())
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    out = {}
    for cls in ast.walk(ast.parse(source)):
        if not isinstance(cls, ast.ClassDef):
            continue
        for node in cls.body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.end_lineno in comments:
                col, text = comments[node.end_lineno]
                line = node.end_lineno + 1
                while line in comments and line not in code_lines and comments[line][0] == col:
                    text += " " + comments[line][1]
                    line += 1
                out[(cls.name, node.target.id)] = text
    return out


def config_comments() -> dict[tuple[str, str], str]:
    """`field_comments` of every module of the forge/config/ package, merged (class names are unique)."""
    out = {}
    for name in sorted(os.listdir(CONFIG_DIR)):
        if name.endswith(".py"):
            with open(os.path.join(CONFIG_DIR, name)) as f:
                out.update(field_comments(f.read()))
    return out


def _type_name(tp) -> str:
    """`int`, `str | None`, `list[float] | None`, `fp32 | bf16` (a Literal) for an annotation."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union or (origin is not None and origin.__name__ == "UnionType"):
        return " \\| ".join(_type_name(a) for a in args).replace("NoneType", "null")
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    if origin is typing.Literal:                     # one of the values: `fp32 \| bf16 \| fp16`
        return " \\| ".join(str(a) for a in args)
    return getattr(tp, "__name__", str(tp))


def _value(v) -> str:
    """A default as YAML writes it."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return str(v)


def _choices(section: str, name: str) -> list[str]:
    from forge.models.registry import REGISTRIES
    if section == "model" and name in REGISTRIES:
        return sorted(REGISTRIES[name])
    if section == "model" and name == "preset":
        from forge.models.presets import PRESETS
        return sorted(PRESETS)
    return []


def _rows(cls, prefix: str, comments: dict, hints_of=typing.get_type_hints):
    """(key, type, default, meaning) of every leaf field of dataclass `cls`, nested ones after."""
    rows, nested = [], []
    hints, default = hints_of(cls), cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            nested.append((tp, f"{prefix}.{f.name}"))
            continue
        meaning = comments.get((cls.__name__, f.name), "")
        choices = _choices(prefix.split(".")[0], f.name) if "." not in prefix else []
        if choices:
            meaning = (meaning + "; " if meaning else "") + "one of: " + ", ".join(f"`{c}`" for c in choices)
        rows.append((f"{prefix}.{f.name}", _type_name(tp), _value(getattr(default, f.name)), meaning))
    return rows, nested


def missing_meanings() -> list[str]:
    """Dotted keys whose field has no `# comment` in the forge/config/ package."""
    comments = config_comments()
    missing = []

    def walk(cls, prefix):
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}.{f.name}" if prefix else f.name)
            elif prefix and (cls.__name__, f.name) not in comments:
                missing.append(f"{prefix}.{f.name}")
    walk(JobConfig, "")
    return missing


def render() -> str:
    """The text of docs/config.md."""
    comments = config_comments()
    out = ["# Configuration reference", "",
           "<!-- Generated by `python -m forge.docs` from forge/config/; do not edit by hand. -->", "",
           "A job config has six sections. Set keys in a YAML file (one mapping per section) and/or as dotted",
           "`key=value` overrides on the command line (values parsed as YAML); precedence, lowest first:",
           "the defaults below < `model.preset` < the YAML file < the overrides. An unknown key or a value of",
           "the wrong type is an error naming the key.", "",
           "    forge train configs/shakespeare_char.yaml train.max_steps=200 optim.lr=1e-3",
           "    forge train --print-config model.preset=tiny-llama     # the resolved config, nothing run", "",
           "`forge train --print-config` and the `config.yaml` a run writes mark keys that the chosen options",
           "never read with a `# unused: ...` comment (e.g. `data.vocab_size` with the char tokenizer).", ""]
    sections = [(f.name, typing.get_type_hints(JobConfig)[f.name]) for f in dataclasses.fields(JobConfig)]
    out += ["Sections: " + ", ".join(f"[`{name}`](#{name})" for name, _ in sections) + ".", ""]
    for name, cls in sections:
        todo = [(cls, name)]
        while todo:
            c, prefix = todo.pop(0)
            doc = inspect.cleandoc(c.__doc__ or "") if c.__doc__ and not c.__doc__.startswith(c.__name__ + "(") else ""
            out += [f"## {prefix}", ""] + ([doc, ""] if doc else [])
            rows, nested = _rows(c, prefix, comments)
            out += ["| key | type | default | meaning |", "|---|---|---|---|"]
            out += [f"| `{k}` | {t} | `{d}` | {m.replace('|', chr(92) + '|')} |" for k, t, d, m in rows]
            out.append("")
            todo = nested + todo
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = render()
    if "--check" in argv:
        current = open(DOCS_FILE).read() if os.path.isfile(DOCS_FILE) else ""
        if current != text:
            print(f"{DOCS_FILE} is out of date: run `python -m forge.docs`", file=sys.stderr)
            return 1
        return 0
    os.makedirs(os.path.dirname(DOCS_FILE), exist_ok=True)
    with open(DOCS_FILE, "w") as f:
        f.write(text)
    missing = missing_meanings()
    if missing:
        print(f"keys without a `# comment` in forge/config/: {missing}", file=sys.stderr)
    print(DOCS_FILE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
