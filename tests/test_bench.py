"""`forge bench` on tiny models: the Hugging Face counterpart is the conversion family's model
(its loss at the copied weights equals Forge's), the FLOPs per token are the analytic count, and a
model that no family represents is timed alone with the reason."""
import json
import math

import pytest

from forge.bench import main
from forge.config import ConfigError
from forge.models.presets import PRESETS

pytestmark = pytest.mark.usefixtures("one_thread")
ARGV = ["--steps", "1", "--warmup", "0", "--seq-len", "16", "--batch", "2", "--linear", "aten", "--json"]


def _bench(capsys, *argv):
    assert main([*ARGV, *argv]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("preset,arch", [("tiny-llama", "LlamaForCausalLM"), ("tiny-gpt2", "GPT2LMHeadModel"),
                                         ("tiny-pythia", "GPTNeoXForCausalLM")])
def test_hf_counterpart_has_forges_loss(capsys, preset, arch):
    """The HF model built by the conversion family, at Forge's weights, computes the same loss on
    the same batch (1e-4 fp32); both models then take a finite step. GPT-2 exercises a fused qkv
    transform, Pythia the embed_out / lm_head alias."""
    import torch

    from forge.bench import hf_counterpart
    assert hf_counterpart(PRESETS[preset], torch.float32)[0].architecture == arch
    res = _bench(capsys, "--preset", preset)
    forge, hf = res["results"]
    assert hf["model"] == "hf (sdpa, eager)"
    assert abs(forge["loss_at_init"] - hf["loss_at_init"]) < 1e-4 and res["init_loss_abs_diff"] < 1e-4
    # a fresh model's loss is near ln(V) (init_std 0.02 logits are nearly uniform)
    assert abs(forge["loss_at_init"] - math.log(PRESETS[preset].vocab_size)) < 0.5
    assert all(math.isfinite(r["last_loss"]) and r["tokens_per_s"] > 0 for r in (forge, hf))


def test_flops_per_token_is_the_analytic_count(capsys):
    """6 N + 12 L d T with N counted by hand for a Llama (GLU MLP, GQA, untied head, RMSNorm)."""
    res = _bench(capsys, "--preset", "tiny-llama", "--layers", "3", "--d-model", "48", "--heads", "4",
                 "--kv-heads", "2", "--d-ff", "80", "--vocab", "96", "--no-hf")
    d, L, ff, V, hd, kv, T = 48, 3, 80, 96, 12, 2, 16
    per_layer = d * d + 2 * d * kv * hd + d * d + 3 * d * ff + 2 * d      # q, k+v, o, gate/up/down, 2 norms
    n = L * per_layer + d + V * d                                          # final norm, head (no embedding)
    assert not PRESETS["tiny-llama"].tie_embeddings
    assert res["flops_per_token"] == 6 * n + 12 * L * d * T
    assert res["params"] == n + V * d                                      # + the token embedding
    row, = res["results"]
    assert row["loss_at_init"] is None and "ratio_forge_over_hf" not in res       # --no-hf: nothing to compare


def test_model_without_a_family_is_timed_alone(capsys):
    """A parallel-residual model (PaLM-style) has no exact HF architecture: Forge alone, and why."""
    res = _bench(capsys, "--preset", "tiny-palm")
    assert [r["model"] for r in res["results"]] == ["forge"]
    assert "model.block='parallel'" in res["hf_skipped"]


def test_table_and_bad_flags(capsys):
    assert main(ARGV[:-1] + ["--preset", "tiny-llama"]) == 0
    out = capsys.readouterr().out
    assert "ratio forge/hf tokens/s" in out and "|loss@init diff|" in out
    assert main(["--steps", "0"]) == 2
    with pytest.raises(ConfigError, match="not one of"):
        main(ARGV + ["--preset", "no-such-preset"])
