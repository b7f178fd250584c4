"""Tensor (and sequence) parallel model == one process: logits, loss and every gradient, for
tp=2 on gloo, over families that exercise GQA, MQA (kv heads replicated), tied/untied heads,
biases, learned positions, per-head and all-head qk-norm, parallel blocks and a vocabulary that
tp does not divide."""
import dataclasses

import pytest
import torch

from tests.distributed import run_distributed

CASES = [("tiny-llama", {}), ("tiny-gpt2", {}), ("tiny-qwen3", {}), ("tiny-olmo2", {}), ("tiny-pythia", {}),
         ("tiny-gemma2", {}),
         ("tiny-gemma", {}), ("tiny-palm", {}), ("tiny-olmo2", {"n_kv_heads": 1})]  # one kv head, two ranks


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
        model = build_model(cfg, tp_group=groups.tp_group, sequence_parallel=sequence_parallel)
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
        if name == "tiny-llama" and not sequence_parallel:     # what DeepSpeed's universal checkpoint reads
            import re
            from forge.parallel.build import universal_checkpoint_info
            info = universal_checkpoint_info(model, cfg, world)
            rows = [n for n, _ in model.named_parameters()
                    if any(re.match(p, n) for p in info["parameter_with_row_parallelism_patterns"])]
            assert rows and all(n.endswith(("attn.wo.weight", "mlp.w_out.weight")) for n in rows), rows
            assert info["padded_vocab_size"] == 256 and info["original_vocab_size"] == 255
            replicated = info["tp_replicated_parameter_patterns"]
            assert any(re.match(p, "layers.0.attn_norm.weight") for p in replicated)
            assert not any(re.match(p, "layers.0.attn.wq.weight") for p in replicated)
        for n, p in full.named_parameters():
            torch.testing.assert_close(grads[n], p.grad, atol=1e-5, rtol=1e-4, msg=f"{name}: grad of {n}")


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2-sp"])
def test_tensor_parallel_matches_single_process(sequence_parallel):
    run_distributed(_check, 2, sequence_parallel)
