"""The README cannot drift: every `forge ...` command in its bash blocks and every Python block
runs, in README order, in a scratch directory that holds `configs/`; the Quick start runs twice
in a row first (a second demo run resumes, finds the run complete and samples).

Commands run in this process through `forge.cli.main` (a shell would only add the interpreter's
start-up). To run in seconds they get tiny overrides appended (the last value of a key wins):
`forge train` a 1-layer d=32 model for 2 steps, `forge generate` 8 new tokens. A few placeholders
stand for files a reader brings (a corpus, a Hugging Face folder); this test makes tiny ones.
Commands that need GPUs, many processes, Docker, the network, or that install packages are not
run; SKIP says why for each, and a command that matches neither list fails the test, so a new
README command is either run here or given a reason.
"""
from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SKIP = {           # command prefix -> why this test does not run it
    "pip ": "installs packages (CI installs them)",
    "python -m pytest": "the test suite itself",
    "torchrun ": "8 processes (the parallel layouts are tested on 2-4 gloo processes elsewhere)",
    "deepspeed ": "needs GPUs",
    "docker ": "needs Docker",
    "forge bench": "compiles two 134M models (minutes); tests/test_bench.py runs a tiny bench",
}

TINY_TRAIN = ["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=2",
              "model.max_seq_len=32", "data.seq_len=32", "train.max_steps=2", "train.micro_batch_size=2",
              "train.eval_interval=2", "train.eval_steps=1", "train.save_interval=2", "train.log_interval=1",
              "train.compile=false", "optim.warmup_steps=1", "log.progress=false"]
TINY = {"train": TINY_TRAIN, "generate": ["--max-new-tokens", "8"]}
PLACEHOLDERS = {"HF_DIR_OR_REPO_ID": "hf_tiny"}


def readme_blocks(lang: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M)


def readme_commands(blocks: list[str] | None = None) -> list[str]:
    """Every command of the bash blocks, `a && b` split, comments dropped."""
    out = []
    for block in readme_blocks("bash") if blocks is None else blocks:
        for line in block.splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                out += [c.strip() for c in line.split("&&")]
    return out


def _argv(cmd: str) -> list[str]:
    words = [PLACEHOLDERS.get(w, w) for w in shlex.split(cmd)]
    expanded = []
    for w in words:
        expanded += sorted(glob.glob(w)) if "*" in w and glob.glob(w) else [w]
    if expanded[:3] == ["python", "-m", "forge"]:
        expanded = ["forge"] + expanded[3:]
    return expanded[1:] + TINY.get(expanded[1], [])


def _make_inputs(work: Path) -> None:
    shutil.copytree(ROOT / "configs", work / "configs")
    (work / "corpus").mkdir()
    lines = [json.dumps({"text": f"Document {i}: " + "to be or not to be, that is the question. " * 3})
             for i in range(40)]
    (work / "corpus" / "part.jsonl").write_text("\n".join(lines) + "\n")
    from transformers import LlamaConfig, LlamaForCausalLM
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))
    hf.save_pretrained(work / PLACEHOLDERS["HF_DIR_OR_REPO_ID"])


def test_readme_commands_run(tmp_path, monkeypatch):
    from forge.cli import main
    work = tmp_path / "work"
    work.mkdir()
    _make_inputs(work)
    monkeypatch.chdir(work)
    ran, unknown = [], []
    quick_start = readme_commands(readme_blocks("bash")[:1])      # run twice: a second run must work too
    for cmd in quick_start + readme_commands():
        if any(cmd.startswith(p) for p in SKIP):
            continue
        if not re.match(r"(forge|python -m forge) ", cmd):
            unknown.append(cmd)
            continue
        argv = _argv(cmd)
        monkeypatch.setattr(sys, "stdin", io.StringIO("ROMEO:\n"))
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            rc = main(argv)
        assert rc == 0, f"README command failed with exit {rc}: {cmd}\n(run as forge {' '.join(argv)})\n{out.getvalue()[-2000:]}"
        ran.append(cmd)
    assert not unknown, f"README commands neither run by this test nor in its SKIP list: {unknown}"
    assert any(c.startswith("forge train") for c in ran) and any(c.startswith("forge generate") for c in ran)
    for block in readme_blocks("python"):
        exec(compile(block, "README.md python block", "exec"), {})


def test_readme_commands_are_parsed():
    """The parser sees the Quick start's chained commands and every skip reason is used."""
    cmds = readme_commands()
    assert any(c.startswith("forge train configs/shakespeare_char.yaml") for c in cmds)
    assert any(c.startswith("forge generate") for c in cmds)
    for prefix in SKIP:
        assert any(c.startswith(prefix) for c in cmds), f"SKIP entry {prefix!r} matches no README command"
