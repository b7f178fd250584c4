"""Tensor (and sequence) parallel model == one process: logits, loss and every gradient, for
tp=2 on gloo, over families that exercise GQA, MQA (kv heads replicated), tied/untied heads,
biases, learned positions, per-head and all-head qk-norm, parallel blocks, a vocabulary that
tp does not divide, and a factorised embedding with learned scale and Granite's multipliers."""
import dataclasses

import pytest
import torch

from tests.distributed import run_distributed

CASES = [("tiny-llama", {}), ("tiny-gpt2", {}), ("tiny-qwen3", {}), ("tiny-olmo2", {}), ("tiny-pythia", {}),
         ("tiny-gemma2", {}),
         ("tiny-gemma", {}), ("tiny-palm", {}), ("tiny-olmo2", {"n_kv_heads": 1}),  # one kv head, two ranks
         # Granite's scalars; a factorised tied table whose head down-projection is U^T, a learned scale
         ("tiny-granite", {"n_embd_wte": 16, "tie_embed_proj": True, "embed_scale_learned": True})]


def _check(rank, world, sequence_parallel):
    from forge.models import build_model
    from forge.models.io import load_state_dict_strict, unique_state_dict
    from forge.models.presets import PRESETS
    from forge.parallel.groups import build_groups
    from forge.parallel.mappings import gather_from
    from forge.parallel.sharding import gather_tensors, shard_state_dict

    groups = build_groups(tp=world)
    for name, overrides in CASES:
        cfg = dataclasses.replace(PRESETS[name], vocab_size=255, **overrides)        # padded to 256 under tp=2
        torch.manual_seed(0)
        full = build_model(cfg)
        with torch.no_grad():                                           # non-trivial norms and biases
            for n, p in full.named_parameters():
                if p.dim() == 1:
                    p.add_(0.1 * torch.randn_like(p))
        model = build_model(cfg, groups.context(sequence_parallel))
        load_state_dict_strict(model, shard_state_dict(unique_state_dict(full), model, groups.tp_group), name)
        ids = torch.randint(0, 255, (2, 17), generator=torch.Generator().manual_seed(1))
        x, y = ids[:, :-1], ids[:, 1:]
        ref_logits = full(x)
        ref_loss = full.loss(ref_logits, y)
        ref_loss.backward()
        logits = model(x)
        loss = model.loss(logits, y)
        loss.backward()
        gathered = gather_from(logits, -1, groups.tp_group)[..., :255]
        torch.testing.assert_close(gathered, ref_logits, atol=1e-5, rtol=1e-5, msg=f"{name}: logits")
        torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6, msg=f"{name}: loss")
        grads = gather_tensors({n: p.grad for n, p in model.named_parameters()}, model, groups.tp_group, 255)
        for n, p in full.named_parameters():
            torch.testing.assert_close(grads[n], p.grad, atol=1e-5, rtol=1e-4, msg=f"{name}: grad of {n}")


@pytest.mark.slow
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2-sp"])
def test_tensor_parallel_matches_single_process(sequence_parallel):
    run_distributed(_check, 2, sequence_parallel)


def _dropout_streams(rank, world):
    from forge.models import build_model
    from forge.models.presets import PRESETS
    from forge.parallel.groups import build_groups
    from forge.parallel.mappings import gather_from
    from forge.parallel.random import tp_stream
    groups = build_groups(tp=world)
    cfg = dataclasses.replace(PRESETS["tiny-llama"], dropout=0.2, attn_dropout=0.2)
    torch.manual_seed(0)                               # the default stream: equal on every tp rank
    model = build_model(cfg, groups.context()).train()
    tp_stream.seed(1234 + 2718 + groups.tp_rank)       # the tensor-parallel stream: one per rank
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    loss = model.loss(model(ids[:, :-1]), ids[:, 1:])
    losses = gather_from(loss.detach().reshape(1), 0, groups.tp_group)
    # replicated activations saw the same residual/embedding masks: the loss agrees on every rank
    assert torch.equal(losses[0], losses[1]), losses
    # attention dropout draws from the tp stream: the same default stream with another tp seed differs
    torch.manual_seed(0)
    build_model(cfg, groups.context())          # advance the default stream as above
    tp_stream.seed(99 + groups.tp_rank)
    again = model.loss(model(ids[:, :-1]), ids[:, 1:])
    assert not torch.equal(again.detach(), loss.detach())
    with tp_stream.fork(torch.device("cpu")):
        mine = torch.rand(8)
    draws = gather_from(mine, 0, groups.tp_group).view(world, 8)
    assert not torch.equal(draws[0], draws[1])         # per-rank regions draw independent masks
    tp_stream.seed(None)


@pytest.mark.slow
def test_dropout_matches_on_replicated_activations_and_differs_inside_tp_regions():
    run_distributed(_dropout_streams, 2)
