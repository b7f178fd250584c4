"""`forge convert` both directions, tokenizer / generation files carried across, atomic refusal to
overwrite, and `forge.from_pretrained` on Forge folders and training run directories."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

import forge  # noqa: E402
from forge.models.hf.convert import main  # noqa: E402
from forge.models.io import load_model_folder, save_model_folder, model_config_dict, unique_state_dict  # noqa: E402

V = 96
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tokenizer_files(path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    vocab = {f"t{i}": i for i in range(V - 3)} | {"<unk>": V - 3, "<s>": V - 2, "</s>": V - 1}
    Tokenizer(WordLevel(vocab, unk_token="<unk>")).save(os.path.join(path, "tokenizer.json"))
    json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
              open(os.path.join(path, "tokenizer_config.json"), "w"))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("hf_src"))
    conf = AutoConfig.for_model("qwen3", architectures=["Qwen3ForCausalLM"], vocab_size=V, hidden_size=32,
                                intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                head_dim=8, max_position_embeddings=64, bos_token_id=V - 2, eos_token_id=V - 1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(conf, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(d)
    _tokenizer_files(d)
    return d


def _logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.slow
def test_cli_round_trip(hf_dir, tmp_path):
    fg, hf2 = str(tmp_path / "forge"), str(tmp_path / "hf2")
    # --from hf through the real entry point (python -m forge convert ...)
    r = subprocess.run([sys.executable, "-m", "forge", "convert", "--from", "hf", "--input", hf_dir, "--output", fg],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert {"config.yaml", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "hf_source.json"} <= set(os.listdir(fg))
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]       # no temp folder left behind

    model, cfg = load_model_folder(fg)
    assert cfg.qk_norm == "head" and cfg.head_dim == 8

    assert main(["--to", "hf", "--input", fg, "--output", hf2]) == 0
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= set(os.listdir(hf2))
    conf = json.load(open(os.path.join(hf2, "config.json")))
    assert conf["architectures"] == ["Qwen3ForCausalLM"]
    assert (conf["bos_token_id"], conf["eos_token_id"]) == (V - 2, V - 1)
    gen = json.load(open(os.path.join(hf2, "generation_config.json")))
    assert gen["eos_token_id"] == V - 1

    ids = torch.randint(0, V, (2, 16))
    ref = _logits(AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval(), ids)
    back = _logits(AutoModelForCausalLM.from_pretrained(hf2, attn_implementation="eager").eval(), ids)
    assert torch.equal(ref, back)
    assert (_logits(model, ids) - ref).abs().max() <= 1e-4
    for path in (hf_dir, fg, hf2):     # forge.from_pretrained takes either kind of folder
        assert (_logits(forge.from_pretrained(path), ids) - ref).abs().max() <= 1e-4

    # refuse to overwrite a non-empty output unless --force; a failed run leaves the old output intact
    assert main(["--to", "hf", "--input", fg, "--output", hf2]) == 2
    assert main(["--to", "hf", "--input", fg, "--output", hf2, "--force", "--dtype", "bf16"]) == 0
    assert AutoModelForCausalLM.from_pretrained(hf2).dtype == torch.bfloat16
    assert main(["--from", "hf", "--input", fg, "--output", str(tmp_path / "x")]) == 2    # wrong direction


def test_cli_errors(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    json.dump({"architectures": ["BertForMaskedLM"], "model_type": "bert"}, open(bad / "config.json", "w"))
    assert main(["--from", "hf", "--input", str(bad), "--output", str(tmp_path / "o")]) == 2
    assert "BertForMaskedLM" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main(["--to", "hf", "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o")]) == 2


def test_from_pretrained_run_dir(tmp_path):
    from forge.config import ModelConfig
    from forge.models import build_model
    run = tmp_path / "run"
    models = {}
    for step, complete in ((10, True), (20, True), (30, False)):
        cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=1, n_heads=2).validate()
        torch.manual_seed(step)
        m = build_model(cfg)
        ck = run / "checkpoints" / f"step_{step:08d}"
        save_model_folder(m, model_config_dict(cfg), str(ck / "model"))
        if complete:
            (ck / "COMPLETE").write_text("")
        models[step] = m
    loaded = forge.from_pretrained(str(run))           # newest complete: step 20 (step 30 lacks COMPLETE)
    a, b = unique_state_dict(loaded), unique_state_dict(models[20])
    assert all(torch.equal(a[k], b[k]) for k in b)
    ids = torch.randint(0, V, (2, 8))
    with torch.no_grad():
        ref = models[20].eval()(ids)
        assert torch.equal(loaded(ids), ref)
    # the CLI accepts a run directory too: the HF export of step 20 gives its logits back
    assert main(["--to", "hf", "--input", str(run), "--output", str(tmp_path / "hf")]) == 0
    with torch.no_grad():
        torch.testing.assert_close(forge.from_pretrained(str(tmp_path / "hf"))(ids), ref, atol=1e-5, rtol=1e-5)
