"""File modes of what Forge writes, and `forge --version`."""
from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest
import torch

from tests.test_train import tiny


@pytest.fixture
def umask():
    """Set the process umask for one test, restore it after."""
    old = os.umask(0o022)
    os.umask(old)

    def set_(mask):
        os.umask(mask)
    yield set_
    os.umask(old)


def modes(root) -> dict[str, int]:
    """{relative path: permission bits} of root and everything under it."""
    out = {".": stat.S_IMODE(os.stat(root).st_mode)}
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(d, n)
            out[os.path.relpath(p, root)] = stat.S_IMODE(os.stat(p).st_mode)
    return out


def assert_modes(root, file_mode, dir_mode):
    found = modes(root)
    wrong = {p: oct(m) for p, m in found.items()
             if m != (dir_mode if os.path.isdir(os.path.join(root, p)) else file_mode)}
    assert not wrong, f"expected files {oct(file_mode)}, folders {oct(dir_mode)}: {wrong}"
    return found


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_model_folders_and_shards_follow_the_umask(tmp_path, umask, mask, file_mode, dir_mode):
    """Atomic writes (a mkdtemp folder renamed into place, safetensors files) end with the modes
    open()/mkdir give under the umask, not 0o700 / 0o600."""
    from forge.config import ModelConfig
    from forge.models.hf.convert import write_forge_folder
    from forge.models.io import save_state_folder
    from forge.models.sharded import Part, write_parts
    umask(mask)
    sd = {"w": torch.arange(6.0).reshape(2, 3)}
    save_state_folder(sd, {"model": {}}, str(tmp_path / "saved"))
    write_forge_folder(str(tmp_path / "exported"), ModelConfig(), sd)
    os.makedirs(tmp_path / "sharded")
    write_parts(str(tmp_path / "sharded"), 0, [Part("w", sd["w"], (2, 3), (0, 0), (2, 3))])
    for name in ("saved", "exported", "sharded"):
        found = assert_modes(tmp_path / name, file_mode, dir_mode)
        assert any(p.endswith(".safetensors") for p in found), found


def test_training_outputs_follow_the_umask(tmp_path, umask, data_cache):
    """Everything a training run writes (config, metrics, tokenizer, checkpoints) is 0o644 / 0o755
    under umask 0o022."""
    from forge.train.trainer import train
    umask(0o022)
    out = tmp_path / "run"
    train(tiny(out, data_cache, "train.max_steps=4", "train.eval_interval=4"))
    found = assert_modes(out, 0o644, 0o755)
    assert any(p.endswith(".safetensors") for p in found), sorted(found)


def test_version_flag_names_forge_and_library_versions(capsys):
    """`forge --version` / `-V` (in process) and `python -m forge --version` (a subprocess) print
    forge's version and the versions the imported torch, deepspeed and transformers report."""
    import deepspeed
    import transformers

    import forge
    from forge.cli import main
    assert main(["-V"]) == 0
    outs = [capsys.readouterr().out,
            subprocess.run([sys.executable, "-m", "forge", "--version"], capture_output=True, text=True,
                           check=True).stdout]
    for out in outs:
        assert out.startswith(f"forge {forge.__version__} ")
        for v in (torch.__version__, deepspeed.__version__, transformers.__version__):
            assert v in out, (v, out)
