"""What can be checked of the Docker image and the launchers without a Docker engine or a cluster."""
import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "docker" / "Dockerfile").read_text()


def test_every_copy_source_exists():
    sources = []
    for line in DOCKERFILE.splitlines():
        if line.strip().upper().startswith("COPY"):
            sources += [a for a in shlex.split(line)[1:-1] if not a.startswith("--")]
    assert sources, "the Dockerfile copies nothing"
    for src in sources:
        assert (ROOT / src).exists(), f"COPY source {src!r} does not exist"


def test_image_installs_this_package_with_pyproject_requirements_and_runs_forge():
    installs = [l for l in DOCKERFILE.splitlines() if re.search(r"pip install\b", l)]
    assert any(re.search(r"pip install .*(-e )?\.\s*$", l) for l in installs), installs
    assert "COPY pyproject.toml" in DOCKERFILE            # requirements come from pyproject, not a copy
    assert re.search(r'^ENTRYPOINT \["forge"\]', DOCKERFILE, re.M)
    base = re.search(r"^FROM (\S+)", DOCKERFILE, re.M).group(1)
    assert "cuda" in base and "pytorch" in base


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "launchers").glob("*.sh")) + ["slurm.sbatch"])
def test_launcher_scripts_parse_and_run_forge_train(script):
    path = ROOT / "launchers" / script
    subprocess.run(["bash", "-n", str(path)], check=True)
    assert "forge train" in path.read_text()


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "ds_configs").glob("*.json")))
def test_ds_config_templates_are_json_without_forge_owned_keys(name):
    tree = json.loads((ROOT / "ds_configs" / name).read_text())
    owned = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
             "gradient_clipping", "bf16", "fp16", "optimizer", "scheduler"}
    assert not owned & set(tree), f"{name} sets keys that Forge derives from its own config"
    assert "stage" in tree["zero_optimization"]          # says which parallel.zero_stage it is for


def test_cli_drops_the_deepspeed_launchers_local_rank(monkeypatch):
    from forge.cli import _strip_local_rank
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert _strip_local_rank(["--local_rank=3", "train", "c.yaml"]) == ["train", "c.yaml"]
    import os
    assert os.environ["LOCAL_RANK"] == "3"


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "ds_configs").glob("*.json")))
def test_templates_merge_with_a_matching_config_and_refuse_a_contradicting_one(name):
    from forge.config import ConfigError, load_config
    from forge.train.engine import build_ds_config
    stage = json.loads((ROOT / "ds_configs" / name).read_text())["zero_optimization"]["stage"]
    offload = ["parallel.offload_optimizer=true"] if "offload" in name else []
    ds = build_ds_config(load_config(None, [f"parallel.ds_config={name}", f"parallel.zero_stage={stage}"] + offload), 2)
    assert ds["zero_optimization"]["stage"] == stage and ds["train_batch_size"] == 2 * 8
    other = stage % 3 + 1 if offload else (stage + 1) % 4      # offload needs ZeRO >= 1 (JobConfig.validate)
    with pytest.raises(ConfigError, match="zero_optimization.stage"):
        build_ds_config(load_config(None, [f"parallel.ds_config={name}", f"parallel.zero_stage={other}"]
                                    + offload), 2)


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "tools").glob("*.sh")))
def test_tool_scripts_parse(script):
    subprocess.run(["bash", "-n", str(ROOT / "tools" / script)], check=True)


def test_image_torch_and_installed_torch_are_in_the_declared_range():
    """The torch of the Docker base image tag and the torch this suite runs with both satisfy
    pyproject's torch requirement, so `pip install -e .` keeps the image's build."""
    import tomllib

    import torch
    from packaging.requirements import Requirement
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (req,) = [Requirement(d) for d in deps if Requirement(d).name == "torch"]
    assert req.specifier, "torch needs a tested range"
    base = re.search(r"^FROM pytorch/pytorch:(\d+\.\d+\.\d+)-", DOCKERFILE, re.M).group(1)
    assert req.specifier.contains(base), (base, str(req))
    assert req.specifier.contains(torch.__version__.split("+")[0]), (torch.__version__, str(req))
