"""`forge plan`: per-rank memory of a layout from its ranks built on the meta device (forge/plan.py)."""
import contextlib
import importlib.util
import io
import json
import os
import time

import pytest
import torch

from forge.cli import main as forge_main
from forge.config import ConfigError, load_config
from forge.models.transformer import Transformer
from forge.plan import _build_layers, plan


@pytest.fixture(autouse=True, scope="module")
def no_process_group():
    """forge plan runs ranks under a fake process group of its own: shut down the one an earlier
    in-process `train()` left (a later one starts it again)."""
    from forge.train.distributed import shutdown
    shutdown()


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RANK_KEYS = {"rank", "tp_rank", "pp_rank", "dp_rank", "ep_rank", "params", "param_bytes", "grad_bytes", "optim_bytes",
             "activation_bytes", "total_bytes", "ranks_covered", "model_params", "build_peak_bytes", "fits"}


def _plan(overrides, world, **kw):
    return plan(load_config(None, overrides), world, **kw)


def _cli_json(capsys, *args):
    start = time.perf_counter()
    assert forge_main(["plan", *args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    print(f"forge plan {' '.join(args)}: {time.perf_counter() - start:.2f} s")
    return result


def _unsharded_count(overrides) -> int:
    cfg = load_config(None, overrides)
    with torch.device("meta"):
        return Transformer(cfg.model).num_params()


@pytest.fixture(scope="module")
def llama70b():
    """`forge plan ... --json` for llama3-70b, tp 8 x pp 8 on 1024 ranks (run once for the module)."""
    out = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out):
        assert forge_main(["plan", "model.preset=llama3-70b", "parallel.tp=8", "parallel.pp=8", "parallel.zero_stage=1",
                           "train.precision=bf16", "--world", "1024", "--json"]) == 0
    print(f"forge plan llama3-70b tp8 pp8 world 1024: {time.perf_counter() - start:.2f} s")
    return json.loads(out.getvalue())


# ---------------------------------------------------------------- parameter counts
LAYOUTS = [
    (["model.preset=tiny-llama", "parallel.tp=2"], 2),
    (["model.preset=tiny-llama", "parallel.tp=4", "parallel.pp=2"], 16),            # kv heads (2) < tp: replicated
    (["model.preset=tiny-phi", "model.vocab_size=250", "parallel.tp=4"], 4),         # padded vocab, head bias
    (["model.preset=tiny-gpt2", "model.vocab_size=255", "parallel.tp=2", "parallel.pp=2"], 8),   # tied across stages
    (["model.preset=tiny-gpt2", "parallel.pp=3", "parallel.pp_partition=uniform"], 3),
    (["model.preset=tiny-olmo2", "parallel.tp=2", "parallel.sequence_parallel=true"], 4),   # qk_norm over all heads
    (["model.preset=tiny-mixtral", "parallel.ep=2"], 4),
    (["model.preset=tiny-mixtral", "parallel.ep=4", "parallel.tp=2", "parallel.pp=2"], 32),
    (["model.preset=tiny-mixtral", "model.n_layers=4", "model.moe.first_dense=1", "model.moe.every=2",
      "model.moe.n_shared_experts=1", "model.moe.shared_gate=true", "model.mlp_bias=true", "parallel.ep=2",
      "parallel.tp=2"], 8),
    (["model.preset=tiny-llama", "model.norm_attn=dyt", "model.norm_mlp=hyperspherenorm", "model.norm_final=prmsnorm",
      "model.mlp=kan", "model.kan_degree=2", "model.mlp_up_bias=true", "parallel.tp=2",
      "parallel.sequence_parallel=true"], 2),                                     # issue 16's norm and MLP kinds
    (["model.preset=tiny-gpt2", "model.block=peri_ln", "model.norm_post=dyt", "model.mlp=dual_path",
      "model.activation=prelu", "model.mlp_down_bias=false", "parallel.tp=2", "parallel.pp=2"], 4),
    (["model.preset=tiny-granite", "model.n_embd_wte=16", "model.embed_scale_learned=true", "model.vocab_size=255",
      "parallel.tp=2"], 2),                         # factorised tied table, up / down projections, learned scale
    (["model.preset=tiny-granite", "model.n_embd_wte=16", "model.tie_embeddings=false", "parallel.tp=2",
      "parallel.pp=2"], 4),                         # factorised untied table under a pipeline
    (["model.preset=tiny-granite", "model.n_embd_wte=16", "parallel.tp=2", "parallel.pp=2"], 4),  # + HeadDownPipe
]


@pytest.mark.parametrize("overrides,world", LAYOUTS, ids=lambda v: " ".join(v) if isinstance(v, list) else str(v))
def test_shards_sum_to_the_model(overrides, world):
    """Over the distinct shards the model parameters add up to the unsharded model's count
    (replicated tensors once per tp group, dp replicas once, tied embedding once, no padding)."""
    result = _plan(overrides, world)
    expected = _unsharded_count(overrides)
    assert result["params"] == expected
    assert sum(r["model_params"] for r in result["ranks"]) == expected
    L = result["layout"]
    assert len(result["ranks"]) == L["tp"] * L["pp"] * L["ep"]
    covered = sorted(k for r in result["ranks"] for k in r["ranks_covered"])
    assert covered == list(range(world))
    for r in result["ranks"]:
        assert r["params"] >= r["model_params"] + r["padding_params"]
    if "model.vocab_size=250" in overrides:                     # 250 rows -> 252 over tp 4: 2 padding rows
        d = load_config(None, overrides).model.d_model
        assert sum(r["padding_params"] for r in result["ranks"]) == 2 * (2 * d + 1)   # embed, head weight + bias


def test_llama70b_shards_sum_to_the_model(llama70b):
    expected = _unsharded_count(["model.preset=llama3-70b"])
    assert llama70b["params"] == expected == 70_553_706_496
    assert sum(r["model_params"] for r in llama70b["ranks"]) == expected
    assert len(llama70b["ranks"]) == 64 and all(len(r["ranks_covered"]) == 16 for r in llama70b["ranks"])


def test_layers_built_once_per_kind_match_every_layer_built():
    """Blocks of one kind (attention kind, dense / MoE) are built once: their counts equal every layer's."""
    from forge.parallel.groups import ParallelGroups
    from forge.layout.pipeline import pipeline_specs
    for overrides in (["model.preset=tiny-gemma2", "model.n_layers=4"],
                      ["model.preset=tiny-mixtral", "model.n_layers=5", "model.moe.first_dense=1",
                       "model.moe.every=2"]):
        cfg = load_config(None, overrides)
        with torch.device("meta"):
            every = [sum(p.numel() for p in s.build().parameters()) for s in pipeline_specs(cfg.model)]
        assert [l.trainable for l in _build_layers(cfg, ParallelGroups())] == every


# ---------------------------------------------------------------- bytes per parameter
@pytest.mark.parametrize("precision,expected", [
    ("bf16", {0: lambda n: 16, 1: lambda n: 4 + 12 / n, 2: lambda n: 2 + 14 / n, 3: lambda n: 16 / n}),
    ("fp32", {0: lambda n: 16, 1: lambda n: 8 + 12 / n, 2: lambda n: 4 + 16 / n, 3: lambda n: 20 / n}),
])
def test_model_state_bytes_per_parameter(precision, expected):
    """The ZeRO paper's 16, 4 + 12/N, 2 + 14/N, 16/N for mixed precision (DeepSpeed's fp32 keeps
    an extra fp32 copy of its partition), on a model large enough that rounding does not show."""
    for n in (8, 64):
        for stage, formula in expected.items():
            r = _plan(["model.preset=llama3-8b", f"train.precision={precision}", f"parallel.zero_stage={stage}"],
                      n)["ranks"][0]
            per = (r["param_bytes"] + r["grad_bytes"] + r["optim_bytes"]) / r["params"]
            assert per == pytest.approx(formula(n), rel=0.05), (precision, stage, n, per)


def test_optimizer_state_bytes_per_parameter():
    """The optimizer column per optim.name (fp32 ZeRO 0, and lion's 4 + 4 partitioned at ZeRO 1):
    adamw 8, lion 4, sgd 4 (0 without momentum), adafactor ~0 (only vectors keep a state), muon 4
    for hidden matrices + 8 for the embedding, head and norms (llama3-8b: 2 V d + (2 L + 1) d of them)."""
    from forge.models.presets import PRESETS
    m = PRESETS["llama3-8b"]
    adamw_params = 2 * m.vocab_size * m.d_model + (2 * m.n_layers + 1) * m.d_model
    for name, extra, per in (("adamw", (), lambda n: 8), ("lion", (), lambda n: 4), ("sgd", (), lambda n: 4),
                             ("sgd", ("optim.momentum=0",), lambda n: 0), ("adafactor", (), lambda n: 0),
                             ("muon", (), lambda n: 4 + 4 * adamw_params / n),
                             ("lion", ("parallel.zero_stage=1",), lambda n: 8 / 8)):
        r = _plan(["model.preset=llama3-8b", f"optim.name={name}", *extra], 8)["ranks"][0]
        assert r["optim_bytes"] / r["params"] == pytest.approx(per(r["params"]), abs=1e-3), (name, extra)


def test_pipeline_bf16_zero0_and_expert_partitions():
    """bf16 at ZeRO 0 under a pipeline is DeepSpeed's BF16_Optimizer (4 + 12/N); experts' optimizer
    states split over dp/ep, dense ones over dp."""
    r = _plan(["model.preset=llama3-8b", "train.precision=bf16", "parallel.pp=2"], 16)["ranks"][0]
    assert (r["param_bytes"] + r["grad_bytes"] + r["optim_bytes"]) / r["params"] == pytest.approx(4 + 12 / 8, rel=0.01)
    m = _plan(["model.preset=mixtral-8x7b", "train.precision=bf16", "parallel.zero_stage=1", "parallel.ep=8"], 64)
    cfg = load_config(None, ["model.preset=mixtral-8x7b"]).model
    expert = cfg.n_layers * 3 * cfg.d_model * cfg.d_ff          # one expert per layer on each rank
    r = m["ranks"][0]
    assert r["optim_bytes"] == pytest.approx(12 * ((r["params"] - expert) / 64 + expert / 8), rel=1e-3)


def test_activations_follow_korthikanti():
    """s b h (10 + 24/t) per layer without sequence parallelism, 34/t with it, 2 s b h per layer
    (+ one layer) under full recompute, 1F1B micro batches in flight, fp32 logits on the head's stage."""
    base = ["model.preset=tiny-llama", "model.n_layers=8", "data.seq_len=64", "train.micro_batch_size=2",
            "train.precision=bf16", "parallel.zero_stage=1", "train.grad_accum=8"]
    s, b, h, V = 64, 2, 64, 256
    rows = _plan(base + ["parallel.tp=2", "parallel.pp=4", "parallel.pp_partition=type:BlockPipe"], 16)["ranks"]
    stage = {r["pp_rank"]: r for r in rows if r["tp_rank"] == 0}
    per_layer = s * b * h * (10 + 24 / 2)
    assert stage[0]["activation_bytes"] == int(4 * 2 * per_layer)            # 2 layers x 4 in flight
    assert stage[2]["activation_bytes"] == int(2 * 2 * per_layer)            # pp - 2 in flight
    assert stage[3]["activation_bytes"] == int(2 * per_layer + 4 * s * b * V / 2)
    sp = _plan(base + ["parallel.tp=2", "parallel.sequence_parallel=true"], 2)["ranks"][0]
    assert sp["activation_bytes"] == int(8 * s * b * h * 34 / 2 + 4 * s * b * V / 2)
    full = _plan(base + ["train.activation_checkpointing=full"], 1)["ranks"][0]
    assert full["activation_bytes"] == int(8 * 2 * s * b * h + s * b * h * 34 + 4 * s * b * V)


def test_build_peak_is_the_shard_plus_the_init_block_and_zero3s_whole_tensor():
    from forge.models.init import BLOCK
    over = ["model.preset=llama3-8b", "train.precision=bf16", "parallel.tp=2"]
    cfg = load_config(None, over).model
    embed_shard = 4 * cfg.vocab_size * cfg.d_model // 2         # the largest tensor a tp=2 rank holds, fp32
    for stage in (1, 3):
        r = _plan(over + [f"parallel.zero_stage={stage}"], 8)["ranks"][0]
        shard = r["params"] if stage == 1 else -(-r["params"] // 4)
        assert r["build_peak_bytes"] == 4 * shard + 4 * BLOCK + (embed_shard if stage == 3 else 0)
    # a structured token table is built whole: the full (V, d) table, fp32
    r = _plan(over + ["parallel.zero_stage=1", "model.embed_init=hypercube"], 8)["ranks"][0]
    assert r["build_peak_bytes"] == 4 * r["params"] + 2 * embed_shard


# ---------------------------------------------------------------- command line
def test_cli_json_and_table(llama70b, capsys):
    assert set(llama70b) >= {"layout", "params", "ranks", "formulas", "fits"}
    for r in llama70b["ranks"]:
        assert set(r) >= RANK_KEYS
        assert r["total_bytes"] >= r["param_bytes"] + r["grad_bytes"] + r["optim_bytes"] + r["activation_bytes"]
    L = llama70b["layout"]
    assert (L["tp"], L["pp"], L["dp"], L["ep"]) == (8, 8, 16, 1)
    mixtral = _cli_json(capsys, "model.preset=mixtral-8x7b", "parallel.ep=8", "train.precision=bf16", "--world", "64")
    assert mixtral["params"] == _unsharded_count(["model.preset=mixtral-8x7b"])
    assert sorted(r["ep_rank"] for r in mixtral["ranks"]) == list(range(8))
    assert sum(r["model_params"] for r in mixtral["ranks"]) == mixtral["params"]
    assert forge_main(["plan", "model.preset=tiny-llama", "parallel.tp=2", "--world", "4", "--gpu-mem", "1"]) == 0
    text = capsys.readouterr().out
    assert "world 4 = tp 2 x pp 1 x dp 2 (ep 1)" in text and "Korthikanti" in text and "fits 1 GiB" in text


@pytest.mark.parametrize("overrides,world,key", [
    (["parallel.tp=2", "parallel.pp=2"], 6, "parallel.tp * parallel.pp"),
    (["model.preset=tiny-mixtral", "parallel.ep=4"], 2, "parallel.ep=4"),
    (["model.preset=tiny-llama", "parallel.tp=3"], 3, "parallel.tp=3"),
    (["model.preset=tiny-llama", "parallel.pp=6"], 6, "parallel.pp=6"),
    (["parallel.pp=2", "parallel.zero_stage=2"], 2, "parallel.zero_stage=2"),
    (["parallel.pp=2", "parallel.pp_partition=type:nothing"], 2, "parallel.pp_partition"),
    (["parallel.sequence_parallel=true"], 1, "parallel.sequence_parallel"),
    (["model.preset=tiny-llama", "model.d_ff=130", "parallel.tp=4"], 4, "model.d_ff"),
    ([], 0, "--world"),
])
def test_bad_layouts_name_the_key(overrides, world, key):
    with pytest.raises(ConfigError, match=key.replace("*", r"\*")):
        _plan(overrides, world)


def test_cli_reports_config_errors(capsys):
    assert forge_main(["plan", "parallel.tp=2", "parallel.pp=2", "--world", "6"]) == 2
    assert "parallel.tp * parallel.pp" in capsys.readouterr().err


# ---------------------------------------------------------------- against DeepSpeed (multi-process)
def _pipeline_worker(rank, world, cfg, out):
    from deepspeed.pipe import PipelineModule
    from forge.parallel.groups import build_groups
    from forge.layout.pipeline import pipeline_specs
    from forge.train.distributed import init_distributed
    init_distributed()
    groups = build_groups(pp=world)
    for method in ("parameters", "uniform", "type:BlockPipe"):
        pipe = PipelineModule(layers=pipeline_specs(cfg.model), topology=groups.topology, partition_method=method,
                              loss_fn=lambda x, y: x)
        out[(method, rank)] = (list(map(int, pipe.parts)), sum(p.numel() for p in pipe.parameters()))


@pytest.mark.slow
def test_stage_split_matches_deepspeed():
    """The plan's stage boundaries and per-stage parameters equal a DeepSpeed PipelineModule's (pp=2)."""
    import torch.multiprocessing as mp
    from tests.distributed import run_distributed
    over = ["model.preset=tiny-gpt2", "model.n_layers=3"]    # tied: the embedding is built on both stages
    out = mp.Manager().dict()
    run_distributed(_pipeline_worker, 2, load_config(None, over), out)
    for method in ("parameters", "uniform", "type:BlockPipe"):
        result = _plan(over + ["parallel.pp=2", f"parallel.pp_partition={method}"], 2)
        assert result["layout"]["stage_parts"] == [out[(method, 0)][0]] == [out[(method, 1)][0]]
        assert [r["params"] for r in result["ranks"]] == [out[(method, s)][1] for s in (0, 1)], method


def _zero_worker(rank, world, runs, base, out):
    """Model-state bytes per rank (tools/bench_parallel.py's tensor_bytes over the engine) after the
    first micro batch of the second step (grad_accum 2): ZeRO 1 then holds every gradient."""
    spec = importlib.util.spec_from_file_location("bench_parallel", os.path.join(ROOT, "tools", "bench_parallel.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from forge.parallel.groups import build_groups
    from forge.train.distributed import init_distributed
    from forge.train.engine import create_engine
    from forge.train.trainer import build_rank_model
    init_distributed()
    for run in runs:
        cfg = load_config(None, base + list(run))
        groups = build_groups()
        engine = create_engine(cfg, build_rank_model(cfg, groups), groups)     # as forge train builds it
        ids = torch.randint(0, cfg.model.vocab_size, (2, 33))
        for micro in range(3):
            engine.backward(engine.module.loss(engine(ids[:, :-1]), ids[:, 1:]))
            if micro == 2:
                out[(run, rank)] = bench.tensor_bytes(engine)
            engine.step()


ALLOCATION_BASE = ["model.d_model=128", "model.n_layers=2", "model.n_heads=4", "model.vocab_size=1024",
                   "model.max_seq_len=32", "train.micro_batch_size=2", "train.grad_accum=2"]
ALLOCATION_RUNS = [(f"train.precision={p}", f"parallel.zero_stage={z}")
                   for p in ("bf16", "fp32") for z in (0, 1, 2, 3)]


@pytest.fixture(scope="module")
def allocations():
    """{(run, rank): bytes} measured once in 2 gloo processes for every run."""
    import torch.multiprocessing as mp
    from tests.distributed import run_distributed
    out = mp.Manager().dict()
    run_distributed(_zero_worker, 2, ALLOCATION_RUNS, ALLOCATION_BASE, out)
    return dict(out)


@pytest.mark.slow
@pytest.mark.parametrize("run", ALLOCATION_RUNS, ids=" ".join)
def test_model_states_match_a_real_allocation(run, allocations):
    """dp=2, ZeRO 0-3 in bf16 and fp32, built as forge train builds: the plan's weights +
    grads + optimizer within 10% of what the engine holds (0.1% where the weights have the dtype)."""
    r = _plan(ALLOCATION_BASE + list(run), 2)["ranks"][0]
    planned = r["param_bytes"] + r["grad_bytes"] + r["optim_bytes"]
    for rank in (0, 1):
        assert planned == pytest.approx(allocations[(run, rank)], rel=0.10), (run, rank, planned / r["params"],
                                                                              allocations[(run, rank)] / r["params"])
