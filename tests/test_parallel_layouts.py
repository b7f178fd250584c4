"""Every parallel layout trains like one process: `forge train` under tp / pp / dp (ZeRO 1-3),
sequence parallelism, expert parallelism (ZeRO 0-2) and their combinations (gloo, CPU processes) gives the
same first losses and the same final parameters as a single process that sees the same global
batch, within 1e-5. The MoE model trains with its aux loss and aux-loss-free balancing (the
expert biases are in the compared state), and where rank 0 sees every token of the batch (tp,
pp) its logged MoE metrics, averaged over the layers of every pipeline stage, equal one process's."""
import json
import os

import pytest
from forge.models.io import read_weights

from tests.distributed import run_distributed

STEPS = 4
LR = 2e-3


def job(out_dir, cache_dir, preset, ranks_per_batch, micro=2, **parallel):
    """The run as overrides; `ranks_per_batch` = dp, so micro batches x dp is the same global batch
    of 8 sequences. Adam's eps is 1e-6, not 1e-8: on the first step Adam moves a parameter by
    lr * g / (|g| + eps), so a gradient entry that happens to be near 1e-9 (one in tiny-mixtral's
    layers.1.attn.wo) turns fp32 roundoff of the reduction order into a 1e-5 difference."""
    moe = ["model.moe.bias_update_rate=0.01"] if "mixtral" in preset else []
    ga = 8 // (micro * ranks_per_batch)
    over = [f"model.preset={preset}", "model.max_seq_len=32", "model.dropout=0.0", "data.seq_len=32",
            f"data.cache_dir={cache_dir}", "train.max_steps=%d" % STEPS, f"train.micro_batch_size={micro}",
            f"train.grad_accum={ga}", "train.eval_interval=0", "train.save_interval=0", "train.log_interval=1",
            "train.precision=fp32", f"optim.lr={LR}", "optim.warmup_steps=1", "optim.schedule=constant",
            "optim.grad_clip=0.5", "optim.eps=1e-6", f"train.out_dir={out_dir}", "log.progress=false", *moe]
    section = {"activation_checkpointing": "train"}
    return over + [f"{section.get(k, 'parallel')}.{k}={v}" for k, v in parallel.items()]


def _train(rank, world, overrides, stop_at=None):
    from forge.config import load_config
    from forge.train.trainer import train
    train(load_config(None, overrides), stop_at=stop_at)


def run(overrides, world):
    if world == 1:
        _train(0, 1, overrides)
    else:
        run_distributed(_train, world, overrides)
    out = [o.split("=", 1)[1] for o in overrides if o.startswith("train.out_dir=")][0]
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [r for r in map(json.loads, f) if "loss" in r]
    losses = [r["loss"] for r in records]
    moe = [{k: v for k, v in r.items() if k.startswith("moe/")} for r in records]
    weights = read_weights(os.path.join(out, "checkpoints", f"step_{STEPS:08d}", "model"))
    return losses, weights, moe


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    from tests.helpers import built_data
    return built_data(str(tmp_path_factory.mktemp("data")))       # build the shards once


_REFERENCE: dict = {}


def reference(tmp_path_factory, cache_dir, preset, micro=2):
    if (preset, micro) not in _REFERENCE:
        out = str(tmp_path_factory.mktemp(f"ref-{preset}"))
        _REFERENCE[preset, micro] = run(job(out, cache_dir, preset, 1, micro), 1)
    return _REFERENCE[preset, micro]


LAYOUTS = [  # (preset, world, dp, parallel settings)
    ("tiny-llama", 2, 2, dict(zero_stage=1)),
    ("tiny-llama", 2, 2, dict(zero_stage=2)),
    ("tiny-llama", 2, 2, dict(zero_stage=3)),
    ("tiny-llama", 2, 1, dict(tp=2)),
    ("tiny-llama", 2, 1, dict(tp=2, sequence_parallel="true")),
    ("tiny-llama", 2, 1, dict(pp=2)),
    ("tiny-llama", 2, 1, dict(pp=2, activation_checkpointing="attention")),
    ("tiny-llama", 2, 1, dict(tp=2, activation_checkpointing="full")),
    ("tiny-llama", 4, 1, dict(tp=2, pp=2)),
    ("tiny-llama", 4, 2, dict(tp=2, zero_stage=1)),
    ("tiny-llama", 4, 2, dict(tp=2, zero_stage=3)),
    ("tiny-gpt2", 2, 1, dict(tp=2)),
    ("tiny-gpt2", 2, 1, dict(pp=2, zero_stage=1)),
    ("tiny-gpt2", 2, 2, dict(zero_stage=3)),
    ("tiny-gpt2", 4, 2, dict(tp=2, zero_stage=3)),
    ("tiny-mixtral", 2, 2, dict(ep=2)),
    ("tiny-mixtral", 2, 2, dict(ep=2, zero_stage=1)),
    ("tiny-mixtral", 2, 2, dict(ep=2, zero_stage=2)),
    ("tiny-mixtral", 4, 4, dict(ep=2)),                 # two expert-data-parallel replicas of each expert
    ("tiny-mixtral", 4, 4, dict(ep=2, zero_stage=1)),   # expert optimizer state split over them
    ("tiny-mixtral", 2, 1, dict(tp=2)),
    ("tiny-mixtral", 2, 1, dict(pp=2)),
    ("tiny-mixtral", 2, 1, dict(pp=2, zero_stage=1)),
    ("tiny-mixtral", 4, 2, dict(ep=2, pp=2)),
    ("tiny-mixtral", 4, 2, dict(tp=2, ep=2)),
    ("tiny-mixtral", 4, 2, dict(tp=2, ep=2, zero_stage=2)),
    ("tiny-mixtral", 4, 2, dict(ep=2, pp=2, zero_stage=1)),
    # multi-head latent attention: heads split over tp, the down-projections and latent norms replicated
    # (their gradients summed over tp); group-limited sigmoid routing with a routed scale under pp and ep
    ("tiny-deepseek-v3", 2, 1, dict(tp=2)),
    ("tiny-deepseek-v3", 2, 1, dict(tp=2, sequence_parallel="true")),
    ("tiny-deepseek-v3", 2, 1, dict(pp=2)),
    ("tiny-deepseek-v3", 2, 2, dict(ep=2)),
    ("tiny-granite", 2, 1, dict(pp=2)),       # residual multiplier in BlockPipe, scalars on a tied head across stages
    # Mamba-2 (ssm layers): n_groups 1 < tp, so B/C replicated and the gated norm reduced over tp; a tied head
    ("tiny-mamba2", 2, 1, dict(tp=2)),
    ("tiny-mamba2", 2, 1, dict(pp=2)),
]


def _layout_id(preset, world, dp, parallel):
    name = f"{preset}-" + "-".join(f"{k}{v}" for k, v in parallel.items())
    return name + (f"-dp{dp}" if "ep" in parallel and dp != parallel["ep"] else "")


@pytest.mark.slow
@pytest.mark.parametrize("preset, world, dp, parallel", LAYOUTS, ids=[_layout_id(*layout) for layout in LAYOUTS])
def test_layout_matches_one_process(tmp_path_factory, cache_dir, preset, world, dp, parallel):
    # MoE: the router's load-balancing loss is not additive over micro batches (its expert shares
    # are counted over the tokens of the whole expert-parallel group), so the reference runs
    # together the micro batches that one expert-parallel group sees: 2 per rank x ep. Data ranks
    # take consecutive samples and ep groups are consecutive data ranks, so reference micro batch
    # j of a step is exactly expert-parallel group j's (j = micro step * dp/ep + group).
    ref_micro = 2 * parallel["ep"] if "ep" in parallel else 2
    ref_losses, ref_weights, ref_moe = reference(tmp_path_factory, cache_dir, preset, ref_micro)
    # a pipeline passes its micro batches (2 sequences each) one by one, as the reference does
    out = str(tmp_path_factory.mktemp("layout"))
    losses, weights, moe = run(job(out, cache_dir, preset, dp, **parallel), world)
    assert len(losses) == STEPS
    for a, b in zip(losses, ref_losses):
        assert abs(a - b) <= 1e-5 * abs(b), (losses, ref_losses)
    # rank 0 routes every token of the batch (under ep, only its own share; under sequence parallelism
    # only its T/tp tokens, so its metrics are not the batch's)
    if dp == 1 and not parallel.get("sequence_parallel"):
        for mine, ref in zip(moe, ref_moe):
            assert mine.keys() == ref.keys() and all(abs(mine[k] - v) <= 1e-5 * abs(v) + 1e-7 for k, v in ref.items()), \
                (mine, ref)
    assert weights.keys() == ref_weights.keys()
    for name, ref in ref_weights.items():
        if name.endswith("attn.wk.bias"):
            # A key bias shifts every score of a query equally: softmax ignores it, its gradient is
            # zero up to roundoff, and Adam turns roundoff into steps of size lr. Bound those steps.
            assert (weights[name] - ref).abs().max() <= 2 * STEPS * LR
            continue
        err = (weights[name] - ref).norm() / ref.norm().clamp_min(1e-12)
        assert err <= 1e-5, f"{name}: relative difference {err:.2e}"


RESUMED = [  # (preset, world, dp, parallel settings)
    ("tiny-llama", 2, 1, dict(tp=2)),
    ("tiny-llama", 2, 1, dict(pp=2)),
    ("tiny-llama", 4, 2, dict(tp=2, zero_stage=3)),
    ("tiny-mixtral", 2, 2, dict(ep=2, zero_stage=1)),
    ("tiny-mixtral", 4, 2, dict(ep=2, tp=2)),
]


@pytest.mark.slow
@pytest.mark.parametrize("preset, world, dp, parallel", RESUMED, ids=[_layout_id(*layout) for layout in RESUMED])
def test_resume_matches_one_process(tmp_path_factory, cache_dir, preset, world, dp, parallel):
    """Stopped after step 2 with a checkpoint and resumed, a layout still equals one process:
    steps 3-4 and the final weights. Under ep every rank gets its own experts back (DeepSpeed's
    module file holds ep rank 0's; with tp, each expert's tp shard)."""
    ref_micro = 2 * parallel["ep"] if "ep" in parallel else 2
    ref_losses, ref_weights, _ = reference(tmp_path_factory, cache_dir, preset, ref_micro)
    out = str(tmp_path_factory.mktemp("resume"))
    over = job(out, cache_dir, preset, dp, **parallel)
    run_distributed(_train, world, over, 2)                # stops after step 2 with a checkpoint
    losses, weights, _ = run(over + ["train.resume=auto"], world)
    assert len(losses) == STEPS
    for a, b in zip(losses, ref_losses):
        assert abs(a - b) <= 1e-5 * abs(b), (losses, ref_losses)
    for name, ref in ref_weights.items():
        err = (weights[name] - ref).norm() / ref.norm().clamp_min(1e-12)
        assert err <= 1e-5, f"{name}: relative difference {err:.2e}"
