"""Streaming export and sharded inputs: `forge convert --to hf` reads a Forge folder (sharded like a
tp=2 checkpoint, or one file) tensor by tensor and writes Hugging Face safetensors shards of at most
--max-shard-size with model.safetensors.index.json, that transformers loads with Forge's logits;
every loader (forge.from_pretrained, forge generate, forge convert --from hf) accepts sharded HF
and sharded Forge folders with the unsharded results; and (slow) the export of a 334M-parameter
model grows the process's peak RSS by at most 2 x its largest tensor + 300 MiB."""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
import sys

import pytest
import torch
import yaml

pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import forge  # noqa: E402
from forge.config import ModelConfig  # noqa: E402
from forge.models.hf.convert import (HFShardWriter, forge_shapes, forge_to_hf_state_dict, main,  # noqa: E402
                                     parse_size, pick_family, resolve, shard_layout, write_hf_folder)
from forge.models.io import CONFIG_FILE, model_config_dict, read_weights, save_state_folder, unique_state_dict  # noqa: E402
from forge.models.presets import PRESETS  # noqa: E402
from forge.models.sharded import Part, WeightReader, merge_index, write_index, write_parts  # noqa: E402
from forge.models.transformer import build_model  # noqa: E402
from tests.test_hf_parity import LLAMA, make_hf_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny shapes: see conftest.one_thread

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INDEX = "model.safetensors.index.json"


# ---------------------------------------------------------------- helpers
def _halves(name: str, t: torch.Tensor, dim: int) -> list[list[Part]]:
    """The parts two "ranks" hold of `t`: halves along `dim` (a tp=2 shard; experts: an ep=2 slice),
    or the whole tensor on rank 0 when it is 1-D or too small to cut."""
    shape = tuple(t.shape)
    if t.dim() < 2 or shape[dim] < 2:
        return [[Part(name, t, shape, (0,) * t.dim(), shape)], []]
    cut, out = shape[dim] // 2, []
    for a, b in ((0, cut), (cut, shape[dim])):
        start, box = [0] * t.dim(), list(shape)
        start[dim], box[dim] = a, b - a
        out.append([Part(name, t.narrow(dim, a, b - a), shape, tuple(start), tuple(box))])
    return out


def write_sharded(folder: str, cfg: ModelConfig, groups) -> None:
    """A sharded Forge folder as a checkpoint writes it: `groups` yields {name: tensor} dicts (one
    at a time, so a caller can produce a large model piece by piece); each group's matrices are
    split in two boxes (along dim 0 or 1, alternately) written by two ranks of their own."""
    os.makedirs(folder, exist_ok=True)
    entries, rank, i = [], 0, 0
    for group in groups:
        per_rank = [[], []]
        for name, t in group.items():
            for r, parts in enumerate(_halves(name, t, i % 2 if t.dim() < 3 else i % 3)):
                per_rank[r] += parts
            i += 1
        for parts in per_rank:
            entries.append(write_parts(folder, rank, parts))
            rank += 1
    write_index(folder, merge_index(entries))
    with open(os.path.join(folder, CONFIG_FILE), "w") as f:
        yaml.safe_dump(model_config_dict(cfg), f, sort_keys=False)


def random_model(preset: str, seed: int = 0):
    cfg = PRESETS[preset]
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():          # norm gains and biases away from 1 / 0, so every tensor matters
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1 if p.dim() >= 2 else p + 0.2 * torch.randn_like(p))
    return model, cfg


def shard_files(folder: str) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))


def data_bytes(path: str) -> int:
    """The tensor bytes of a safetensors file (its size less the header)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return os.path.getsize(path) - 8 - n


def hf_tensors(folder: str) -> dict[str, torch.Tensor]:
    """Every tensor of an HF folder, asserting that none is stored twice."""
    out = {}
    for name in shard_files(folder):
        with safe_open(os.path.join(folder, name), framework="pt") as f:
            for k in f.keys():
                assert k not in out, f"{k} is stored twice"
                out[k] = f.get_tensor(k)
    return out


def logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


# ---------------------------------------------------------------- sizes and the shard writer
def test_parse_size_like_transformers():
    from huggingface_hub.serialization._base import parse_size_to_int
    from transformers.utils.hub import convert_file_size_to_int
    for s in ("5GB", "500MB", "100KB", "20kb", "1.5GB", "2TB"):
        assert parse_size(s) == parse_size_to_int(s), s
    for s in ("2GiB", "300MiB", "64KiB"):
        assert parse_size(s) == convert_file_size_to_int(s), s
    assert parse_size(1000) == parse_size("1000") == 1000 and parse_size("5GB") == 5 * 10 ** 9
    for bad in ("5 parsecs", "GB", "", "0", -1, "1e3"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_shard_layout_rule():
    f32 = torch.float32
    layout = [(n, (k,), f32) for n, k in (("a", 10), ("b", 10), ("c", 30), ("d", 5), ("e", 20), ("f", 1))]
    # 100 bytes a shard: a+b (80), then c (120 bytes) alone, then d+e... d (20) + e (80) = 100 fits, f next
    assert [[e[0] for e in s] for s in shard_layout(layout, 100)] == [["a", "b"], ["c"], ["d", "e"], ["f"]]
    assert [[e[0] for e in s] for s in shard_layout(layout, 10 ** 9)] == [list("abcdef")]


def test_shard_writer_refuses_what_was_not_declared(tmp_path):
    layout = [("a", (2, 3), torch.float32), ("b", (4,), torch.bfloat16)]
    with pytest.raises(RuntimeError, match="expected tensor 'a'"):
        with HFShardWriter(str(tmp_path), layout, 10 ** 9) as w:
            w.add("b", torch.zeros(4, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match=r"expected tensor 'a' \(2, 3\) torch.float32"):
        with HFShardWriter(str(tmp_path), layout, 10 ** 9) as w:
            w.add("a", torch.zeros(3, 2))
    with pytest.raises(RuntimeError, match="not completed"):
        with HFShardWriter(str(tmp_path), layout, 10 ** 9) as w:
            w.add("a", torch.zeros(2, 3))
    a, b = torch.randn(2, 3), torch.randn(4).bfloat16()
    with HFShardWriter(str(tmp_path), layout, 10 ** 9) as w:
        w.add("a", a)
        w.add("b", b)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert torch.equal(f.get_tensor("a"), a) and torch.equal(f.get_tensor("b"), b)


# ---------------------------------------------------------------- Forge (sharded) -> HF shards
@pytest.mark.parametrize("preset, limit", [("tiny-llama", "40KB"), ("tiny-mixtral", "70KB"),
                                           ("tiny-gpt2", "40KB")])          # gpt2: tied, fused qkv
def test_sharded_forge_to_hf_shards(preset, limit, tmp_path):
    model, cfg = random_model(preset)
    sd = unique_state_dict(model)
    src = str(tmp_path / "forge")
    write_sharded(src, cfg, [sd])
    assert len([n for n in os.listdir(src) if n.startswith("shard-")]) == 2
    out, one = str(tmp_path / "hf"), str(tmp_path / "hf_one")
    assert main(["--to", "hf", "--input", src, "--output", out, "--max-shard-size", limit]) == 0
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]

    # the index lists every tensor once, in the file that holds it; each file within the limit
    index = json.load(open(os.path.join(out, INDEX)))
    files = shard_files(out)
    n = len(files)
    assert n >= 3 and files == [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    tensors = hf_tensors(out)
    assert set(index["weight_map"]) == set(tensors)
    for name in files:
        with safe_open(os.path.join(out, name), framework="pt") as f:
            keys = list(f.keys())
        assert {k for k, v in index["weight_map"].items() if v == name} == set(keys)
        size = data_bytes(os.path.join(out, name))
        assert size <= parse_size(limit) or len(keys) == 1, (name, size, keys)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert index["metadata"]["total_parameters"] == sum(t.numel() for t in tensors.values())

    # the same tensors as the whole-dict conversion; tied models store no lm_head
    spec = pick_family(cfg)
    ref = forge_to_hf_state_dict(spec, cfg, sd)
    assert set(ref) == set(tensors) and all(torch.equal(ref[k], tensors[k]) for k in ref)
    assert cfg.tie_embeddings == ("lm_head.weight" not in tensors)

    # transformers loads it with Forge's logits
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    hf = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert json.load(open(os.path.join(out, "config.json")))["architectures"] == [spec.architecture]
    assert (logits(hf, ids) - logits(model, ids)).abs().max() <= 1e-5

    # without --max-shard-size (5GB) everything fits: one model.safetensors and no index
    assert main(["--to", "hf", "--input", src, "--output", one]) == 0
    assert shard_files(one) == ["model.safetensors"] and not os.path.exists(os.path.join(one, INDEX))
    single = hf_tensors(one)
    assert set(single) == set(tensors) and all(torch.equal(single[k], tensors[k]) for k in single)


def test_export_dtype_default_is_stored(tmp_path):
    model, cfg = random_model("tiny-llama")
    sd = {k: v.to(torch.bfloat16) for k, v in unique_state_dict(model).items()}
    src = str(tmp_path / "forge")
    write_sharded(src, cfg, [sd])
    assert main(["--to", "hf", "--input", src, "--output", str(tmp_path / "bf16")]) == 0
    conf = json.load(open(tmp_path / "bf16" / "config.json"))
    assert conf["dtype"] == "bfloat16"
    assert {t.dtype for t in hf_tensors(str(tmp_path / "bf16")).values()} == {torch.bfloat16}
    assert AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16")).dtype == torch.bfloat16
    assert main(["--to", "hf", "--input", src, "--output", str(tmp_path / "fp32"), "--dtype", "fp32"]) == 0
    fp32 = hf_tensors(str(tmp_path / "fp32"))
    assert {t.dtype for t in fp32.values()} == {torch.float32}
    ref = forge_to_hf_state_dict(pick_family(cfg), cfg, sd, torch.float32)
    assert all(torch.equal(ref[k], fp32[k]) for k in ref)


def test_export_errors_leave_nothing(tmp_path, capsys):
    model, cfg = random_model("tiny-llama")
    sd = unique_state_dict(model)
    sd.pop("layers.1.attn.wk.weight")
    src = str(tmp_path / "forge")
    write_sharded(src, cfg, [sd])
    out = tmp_path / "hf"
    assert main(["--to", "hf", "--input", src, "--output", str(out)]) == 2
    assert "missing tensors ['layers.1.attn.wk.weight']" in capsys.readouterr().err
    assert not out.exists() and not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]
    with pytest.raises(SystemExit):
        main(["--to", "hf", "--input", src, "--output", str(out), "--max-shard-size", "5 parsecs"])
    assert "5 parsecs" in capsys.readouterr().err
    assert main(["--from", "hf", "--input", src, "--output", str(out), "--max-shard-size", "1GB"]) == 2


# ---------------------------------------------------------------- sharded inputs to every loader
def test_sharded_hf_folder_loads(tmp_path):
    hf = make_hf_model("llama", "LlamaForCausalLM", LLAMA)
    one, sharded = str(tmp_path / "one"), str(tmp_path / "sharded")
    hf.save_pretrained(one)
    hf.save_pretrained(sharded, max_shard_size="20KB")
    assert os.path.isfile(os.path.join(sharded, INDEX)) and len(shard_files(sharded)) > 3
    ref = unique_state_dict(forge.from_pretrained(one))
    got = unique_state_dict(forge.from_pretrained(sharded))
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    fg = str(tmp_path / "fg")
    assert main(["--from", "hf", "--input", sharded, "--output", fg]) == 0
    conv = read_weights(fg)
    assert conv.keys() == ref.keys() and all(torch.equal(ref[k], conv[k]) for k in ref)
    # and back: the sharded export of that folder equals the HF model's own tensors
    back = str(tmp_path / "back")
    assert main(["--to", "hf", "--input", fg, "--output", back, "--max-shard-size", "20KB"]) == 0
    orig, new = hf_tensors(one), hf_tensors(back)
    assert orig.keys() == new.keys() and all(torch.equal(orig[k], new[k]) for k in orig)


def test_sharded_forge_folder_loads(tmp_path, capsys):
    from forge.generate import main as generate_main, resolve_model_folder
    from tests.test_generate import _save_folder
    model, _ = _save_folder(tmp_path / "one")
    one = str(tmp_path / "one")
    cfg, sd = model.cfg, unique_state_dict(model)
    step = tmp_path / "run" / "checkpoints" / "step_00000010"
    folder = str(step / "model")
    write_sharded(folder, cfg, [sd])
    for name in os.listdir(one):                     # the tokenizer files, as a checkpoint holds them
        if name not in ("model.safetensors", CONFIG_FILE):
            shutil.copy2(os.path.join(one, name), folder)
    (step / "COMPLETE").write_text("")
    assert "model.safetensors" not in os.listdir(folder)

    for path in (folder, str(step), str(tmp_path / "run")):
        assert resolve(path) == ("forge", folder)
        assert resolve_model_folder(path) == folder
        got = unique_state_dict(forge.from_pretrained(path))
        assert got.keys() == sd.keys() and all(torch.equal(sd[k], got[k]) for k in sd)

    argv = ["--prompt", "ROMEO:", "--max-new-tokens", "8", "--temperature", "0"]
    assert generate_main(["--checkpoint", one] + argv) == 0
    want = capsys.readouterr().out
    assert generate_main(["--checkpoint", str(step)] + argv) == 0
    assert capsys.readouterr().out == want

    # the errors name both forms of a Forge folder
    (tmp_path / "empty").mkdir()
    for call in (resolve, resolve_model_folder):
        with pytest.raises(FileNotFoundError, match="forge_index.json"):
            call(str(tmp_path / "empty"))


def test_write_hf_folder_takes_a_state_dict_or_a_folder(tmp_path):
    """write_hf_folder streams from FolderWeights and from a plain state dict alike."""
    from forge.models.hf.convert import FolderWeights
    model, cfg = random_model("tiny-qwen2")
    sd = unique_state_dict(model)
    save_state_folder(sd, model_config_dict(cfg), str(tmp_path / "forge"))     # the one-file form
    write_hf_folder(str(tmp_path / "a"), cfg, sd, max_shard_size="16KB")
    with FolderWeights(str(tmp_path / "forge")) as w:
        write_hf_folder(str(tmp_path / "b"), cfg, w, max_shard_size="16KB")
    a, b = hf_tensors(str(tmp_path / "a")), hf_tensors(str(tmp_path / "b"))
    assert shard_files(str(tmp_path / "a")) == shard_files(str(tmp_path / "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- memory (slow)
MEASURE = r"""
import json, sys, time
import transformers
from transformers import GenerationConfig, LlamaConfig                     # imported before measuring
import forge.models.sharded, forge.models.transformer
from forge.memory import peak_rss_bytes, reset_peak_rss, rss_bytes
from forge.models.hf.convert import main
src, out = sys.argv[1:3]
ok = reset_peak_rss()
base, t0 = rss_bytes(), time.time()
rc = main(["--to", "hf", "--input", src, "--output", out, "--max-shard-size", "200MB"])
print(json.dumps({"rc": rc, "reset": ok, "growth": peak_rss_bytes() - base, "seconds": time.time() - t0}))
"""


def _layer_groups(cfg: ModelConfig, seed: int = 0):
    """Random tensors of `cfg`'s model, one layer (or the embedding / head / final norm) at a time."""
    groups: dict = {}
    for name, shape in forge_shapes(cfg).items():
        key = name.split(".")[1] if name.startswith("layers.") else "top"
        groups.setdefault(key, {})[name] = shape
    g = torch.Generator().manual_seed(seed)
    for shapes in groups.values():
        yield {name: torch.randn(shape, generator=g) * 0.02 for name, shape in shapes.items()}


@pytest.mark.slow
def test_export_memory_is_bounded_by_the_largest_tensor(tmp_path):
    cfg = ModelConfig(vocab_size=32000, d_model=1024, n_layers=16, n_heads=16, max_seq_len=2048).validate()
    shapes = forge_shapes(cfg)
    n_params = sum(math.prod(s) for s in shapes.values())
    largest = max(math.prod(s) for s in shapes.values()) * 4
    src, out = str(tmp_path / "forge"), str(tmp_path / "hf")
    write_sharded(src, cfg, _layer_groups(cfg))
    r = subprocess.run([sys.executable, "-c", MEASURE, src, out], capture_output=True, text=True, cwd=ROOT,
                       timeout=900)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout.strip().splitlines()[-1])
    if not m["reset"]:
        pytest.skip("this kernel cannot reset the peak RSS (/proc/self/clear_refs)")
    assert m["rc"] == 0, r.stderr
    bound = 2 * largest + 300 * 2 ** 20
    print(f"\nexport of {n_params / 1e6:.0f}M parameters ({n_params * 4 / 2 ** 20:.0f} MiB fp32, largest tensor "
          f"{largest / 2 ** 20:.0f} MiB) to 200MB shards: peak RSS growth {m['growth'] / 2 ** 20:.0f} MiB "
          f"(bound {bound / 2 ** 20:.0f} MiB), {m['seconds']:.1f} s")
    assert m["growth"] <= bound

    index = json.load(open(os.path.join(out, INDEX)))
    files = shard_files(out)
    assert len(index["weight_map"]) == len(shapes) and set(index["weight_map"].values()) == set(files)
    assert all(data_bytes(os.path.join(out, f)) <= 200 * 10 ** 6 for f in files)
    with WeightReader(src) as reader:
        for hf_name, fg_name in (("model.embed_tokens.weight", "embed.tok.weight"),
                                 ("model.layers.7.mlp.down_proj.weight", "layers.7.mlp.w_out.weight")):
            with safe_open(os.path.join(out, index["weight_map"][hf_name]), framework="pt") as f:
                assert torch.equal(f.get_tensor(hf_name), reader.get(fg_name))
