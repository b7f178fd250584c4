"""Two nodes simulated on loopback: two `torchrun` node ranks (one process each) meet at one
c10d rendezvous, train with data parallelism and ZeRO-1, then resume from the checkpoint."""
import json
import os
import subprocess
import sys

import pytest

from tests.distributed import free_port


def launch_two_nodes(tmp_path, cache_dir, out, steps, resume):
    port = free_port()
    args = ["model.preset=tiny-llama", "model.max_seq_len=32", "data.seq_len=32", f"data.cache_dir={cache_dir}",
            f"train.max_steps={steps}", "train.micro_batch_size=2", "train.eval_interval=0", "train.save_interval=2",
            "train.log_interval=1", f"train.out_dir={out}", f"train.resume={resume}", "parallel.zero_stage=1",
            "log.progress=false"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "FORGE_DIST_OWNER"):
        env.pop(k, None)
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
         "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
         "--rdzv-id", "forge-test", "-m", "forge", "train", *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=str(tmp_path))
        for node in (0, 1)]
    outs = [p.communicate(timeout=400)[0] for p in procs]
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-4000:]
    return outs


@pytest.mark.slow
def test_two_nodes_train_and_resume(tmp_path):
    from tests.helpers import built_data
    cache = built_data(str(tmp_path / "data"))
    out = tmp_path / "run"
    launch_two_nodes(tmp_path, cache, out, steps=2, resume="none")
    assert (out / "checkpoints" / "step_00000002" / "COMPLETE").is_file()
    launch_two_nodes(tmp_path, cache, out, steps=4, resume="auto")
    assert (out / "checkpoints" / "step_00000004" / "COMPLETE").is_file()
    steps = [r["step"] for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r]
    assert steps == [1, 2, 3, 4]
    state = json.load(open(out / "checkpoints" / "step_00000004" / "trainer_state.json"))
    assert state["world_size"] == 2 and state["consumed_samples"] == 4 * 2 * 2
