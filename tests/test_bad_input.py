"""Bad inputs are named errors before any work: truncated or corrupt checkpoint, model, config and
tokenizer files name the file (and, for a training checkpoint, the train.resume=... of the
previous complete one); incomplete step dirs are refused by every reader; a full disk says so;
ranks that resolved different configs name the keys."""
from __future__ import annotations

import errno
import os
import shutil

import pytest
import torch

import forge
from forge.config import ConfigError, load_config
from forge.generate import resolve_model_folder
from forge.models.discovery import IncompleteCheckpointError
from forge.models.hf.convert import main as convert_main
from forge.models.io import WriteError, model_config_dict, save_model_folder
from forge.models.sharded import WeightFileError
from forge.train.checkpoint import CheckpointError, CheckpointWriteError
from forge.train.cli import main as train_main
from forge.train.trainer import config_mismatch, train
from tests.helpers import snapshot, tiny_run_args

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_args(out_dir, cache, *extra):
    return tiny_run_args(out_dir, cache, "train.max_steps=4", "train.save_interval=2", "train.eval_interval=0",
                         "train.log_interval=1", "optim.warmup_steps=1", *extra)


def truncate(file, keep=0.5):
    data = open(file, "rb").read()
    open(file, "wb").write(data[: max(1, int(len(data) * keep))])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real 4-step run with complete checkpoints at steps 2 and 4 (copied by each test)."""
    root = tmp_path_factory.mktemp("bad_input")
    cache = str(root / "cache")
    train(load_config(None, tiny_args(root / "run", cache)))
    return root / "run", cache


def copy_run(trained, tmp_path):
    src, cache = trained
    run = tmp_path / "run"
    shutil.copytree(src, run)
    return run, cache


# ---------------------------------------------------------------- truncated checkpoint files
CHECKPOINT_FILES = ["trainer_state.json", "rng_state_rank00000.pt", "model/shard-00000.safetensors",
                    "optim/shard-00000.safetensors", "model/forge_index.json", "optim/forge_index.json"]


@pytest.mark.slow
@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_truncated_newest_checkpoint_names_file_and_previous_step(trained, tmp_path, name):
    """resume=auto on a newest checkpoint with one truncated file: CheckpointError naming that
    file and `train.resume=` of step 2; nothing under the run dir changes."""
    run, cache = copy_run(trained, tmp_path)
    newest, previous = run / "checkpoints" / "step_00000004", run / "checkpoints" / "step_00000002"
    truncate(newest / name)
    before = snapshot(run)
    with pytest.raises(CheckpointError) as e:
        train(load_config(None, tiny_args(run, cache, "train.max_steps=6", "train.resume=auto")))
    msg = str(e.value)
    assert os.path.basename(name) in msg and str(newest) in msg, msg
    assert f"train.resume={previous}" in msg, msg
    assert snapshot(run) == before


@pytest.mark.slow
def test_corrupt_newest_then_resume_from_previous_keeps_it_aside(trained, tmp_path, capsys):
    """The CLI reports the corrupt newest checkpoint once with exit status 2; resuming from the
    step it names is allowed although a newer checkpoint exists: the newer one is moved to
    superseded/ (kept whole, COMPLETE included) and the run writes step 4 again."""
    run, cache = copy_run(trained, tmp_path)
    newest, previous = run / "checkpoints" / "step_00000004", run / "checkpoints" / "step_00000002"
    truncate(newest / "model" / "shard-00000.safetensors")
    old_newest = snapshot(newest)
    assert train_main(tiny_args(run, cache, "train.resume=auto", "train.max_steps=6")) == 2
    err = capsys.readouterr().err
    assert err.count("checkpoint error") == 1 and "shard-00000.safetensors" in err
    assert f"train.resume={previous}" in err
    r = train(load_config(None, tiny_args(run, cache, f"train.resume={previous}")))
    assert r.start_step == 2 and r.step == 4 and r.checkpoint == str(newest)
    aside = list((run / "superseded").iterdir())
    assert len(aside) == 1 and snapshot(aside[0] / "step_00000004") == old_newest      # moved, not changed
    assert (newest / "COMPLETE").exists() and (previous / "COMPLETE").exists()
    assert f"{newest} is newer than the checkpoint resumed from: moved aside to {aside[0] / 'step_00000004'}" \
        in capsys.readouterr().err


# ---------------------------------------------------------------- model, config and tokenizer files
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A single-file Forge model folder with a char tokenizer, and its Hugging Face export."""
    from forge.config import ModelConfig
    from forge.data.tokenizer import CharTokenizer
    from forge.models import build_model
    root = tmp_path_factory.mktemp("folders")
    tok = CharTokenizer.from_alphabet("abcdefgh \n")
    tok.save(str(root / "tok"))
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=2).validate()
    torch.manual_seed(0)
    save_model_folder(build_model(cfg), model_config_dict(cfg), str(root / "forge"), tokenizer_dir=str(root / "tok"))
    assert convert_main(["--to", "hf", "--input", str(root / "forge"), "--output", str(root / "hf")]) == 0
    return root


BROKEN = [  # (folder, file, how, error type of from_pretrained)
    ("forge", "model.safetensors", "truncate", WeightFileError),
    ("forge", "config.yaml", "garble", ConfigError),
    ("forge", "tokenizer.json", "truncate", None),
    ("hf", "config.json", "truncate", ValueError),
    ("hf", "model.safetensors", "truncate", WeightFileError),
    ("hf", "tokenizer.json", "garble", None),
]


@pytest.mark.parametrize("kind, name, how, error", BROKEN, ids=[f"{k}-{n}" for k, n, _, _ in BROKEN])
def test_broken_file_is_named_and_convert_writes_nothing(folders, tmp_path, capsys, kind, name, how, error):
    """forge convert exits 2 naming the file and leaves no output (a broken tokenizer is never
    copied); forge.from_pretrained raises an error naming it."""
    src = tmp_path / kind
    shutil.copytree(folders / kind, src)
    if how == "truncate":
        truncate(src / name)
    else:
        (src / name).write_text("model: [unclosed\n" if name.endswith(".yaml") else "{not json")
    out = tmp_path / "out"
    way = ["--to", "hf"] if kind == "forge" else ["--from", "hf"]
    assert convert_main([*way, "--input", str(src), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(src / name) in err, err
    assert not out.exists() and not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]
    if error is not None:
        with pytest.raises(error, match=name.replace(".", r"\.")):
            forge.from_pretrained(str(src))


# ---------------------------------------------------------------- incomplete step dirs
def test_incomplete_step_dir_is_refused_by_every_reader(folders, tmp_path, capsys):
    """A step dir without COMPLETE (and its model/ folder) is refused by forge generate's
    resolver, forge convert (exit 2, nothing written) and forge.from_pretrained alike."""
    run = tmp_path / "run"
    done, partial = run / "checkpoints" / "step_00000010", run / "checkpoints" / "step_00000020"
    for d in (done, partial):
        shutil.copytree(folders / "forge", d / "model")
    (done / "COMPLETE").write_text("")
    for path in (partial, partial / "model"):
        with pytest.raises(IncompleteCheckpointError, match=f"incomplete.*{done}"):
            resolve_model_folder(str(path))
        with pytest.raises(IncompleteCheckpointError, match="incomplete"):
            forge.from_pretrained(str(path))
        assert convert_main(["--to", "hf", "--input", str(path), "--output", str(tmp_path / "o")]) == 2
        assert "incomplete" in capsys.readouterr().err and not (tmp_path / "o").exists()
    # the complete one and the run dir (newest complete: step 10) still load
    assert forge.from_pretrained(str(done)).cfg.d_model == 32
    assert resolve_model_folder(str(run)) == str(done / "model")


# ---------------------------------------------------------------- full disk
def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.slow
def test_disk_full_while_saving_checkpoint(trained, tmp_path, monkeypatch, capsys):
    """ENOSPC from the shard writer: forge train exits 2 with "disk full" and the step dir, which
    has no COMPLETE marker; resume=auto then takes the previous complete checkpoint."""
    import forge.models.sharded as sharded
    run, cache = copy_run(trained, tmp_path)
    monkeypatch.setattr(sharded, "save_safetensors", _enospc)
    assert train_main(tiny_args(run, cache, "train.resume=auto", "train.max_steps=6")) == 2
    err = capsys.readouterr().err
    step6 = run / "checkpoints" / "step_00000006"
    assert "disk full" in err and str(step6) in err and "not marked COMPLETE" in err, err
    assert step6.is_dir() and not (step6 / "COMPLETE").exists()
    from forge.train.checkpoint import resolve_resume
    assert resolve_resume("auto", str(run)) == str(run / "checkpoints" / "step_00000004")


def test_disk_full_while_writing_rng_state_names_the_file(tmp_path, monkeypatch):
    """torch.save's own ENOSPC report is "unexpected pos N vs M"; Forge writes it through a
    plain file write instead, so the error is ENOSPC and names the file."""
    import builtins

    from forge.train.checkpoint import _save_torch, _writing_checkpoint
    real_open = builtins.open

    class FullFile:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(builtins, "open", lambda f, mode="r", *a, **k: FullFile(real_open(f, mode, *a, **k))
                        if "w" in mode else real_open(f, mode, *a, **k))
    file = str(tmp_path / "rng_state_rank00000.pt")
    with pytest.raises(CheckpointWriteError, match="disk full") as e:
        with _writing_checkpoint(str(tmp_path)):
            _save_torch({"x": torch.zeros(3)}, file)
    assert file in str(e.value) and e.value.rank_local


def test_disk_full_while_exporting(folders, tmp_path, monkeypatch, capsys):
    """forge convert: ENOSPC while writing the output exits 2 with "disk full" naming the output,
    and leaves neither the output nor its temporary folder."""
    import forge.models.hf.save as save
    monkeypatch.setattr(save, "save_safetensors", _enospc)
    out = tmp_path / "forge2"
    assert convert_main(["--from", "hf", "--input", str(folders / "hf"), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "disk full" in err and str(out) in err, err
    assert not out.exists() and not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]
    import forge.models.io as io
    monkeypatch.setattr(io, "save_safetensors", _enospc)
    with pytest.raises(WriteError, match="disk full") as e:
        save_model_folder(forge.from_pretrained(str(folders / "forge")), {}, str(tmp_path / "m"))
    assert e.value.errno == errno.ENOSPC and str(tmp_path / "m") in str(e.value)


# ---------------------------------------------------------------- ranks with different configs
def test_config_mismatch_names_keys_and_values():
    a = load_config(None, []).to_dict()
    b = load_config(None, ["optim.lr=1e-3", "train.seed=7"]).to_dict()
    assert config_mismatch([a, a]) is None
    text = config_mismatch([a, a, b])
    assert "optim.lr: rank 0 0.0003, rank 2 0.001" in text and "train.seed: rank 0 1234, rank 2 7" in text
    assert "rank 1" not in text


def _mismatch(rank, world):
    from forge.train.trainer import check_same_config
    cfg = load_config(None, [f"optim.lr={1e-3 if rank else 3e-4}"])
    with pytest.raises(ConfigError) as e:
        check_same_config(cfg)
    assert "ranks [1]" in str(e.value) and "optim.lr: rank 0 0.0003, rank 1 0.001" in str(e.value)


@pytest.mark.slow
def test_rank_config_mismatch_on_two_processes():
    from tests.distributed import run_distributed
    run_distributed(_mismatch, 2)


@pytest.mark.slow
def test_truncated_deepspeed_file_of_an_older_checkpoint(trained, tmp_path):
    """Checkpoints written before the sharded optimizer hold DeepSpeed's ds/*.pt files: a
    truncated one is a CheckpointError naming the checkpoint's ds/ files and the previous step."""
    import json
    run, cache = copy_run(trained, tmp_path)
    newest = run / "checkpoints" / "step_00000004"
    state = json.loads((newest / "trainer_state.json").read_text())
    state.pop("sharded_optimizer")
    (newest / "trainer_state.json").write_text(json.dumps(state))
    (newest / "ds").mkdir()
    torch.save({"module": {}}, newest / "ds" / "mp_rank_00_model_states.pt")
    truncate(newest / "ds" / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError) as e:
        train(load_config(None, tiny_args(run, cache, "train.max_steps=6", "train.resume=auto")))
    msg = str(e.value)
    assert str(newest / "ds" / "mp_rank_00_model_states.pt") in msg and "train.resume=" in msg and "step_00000002" in msg, msg


@pytest.mark.parametrize("error, errno_, words", [
    (OSError(errno.ENOSPC, "No space left on device", "/d/x.bin"), errno.ENOSPC, ["disk full", "/d/x.bin", "/d"]),
    (Exception("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on "
               "device\" }) (os error 28)"), errno.ENOSPC, ["disk full", "/d"]),             # safetensors
    (RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 252800 vs 252692"), errno.EIO,
     ["short write", "disk or quota full", "/d"]),                                          # torch.save
    (OSError(errno.EACCES, "Permission denied", "/d/y"), errno.EACCES, ["cannot write", "Permission denied", "/d/y"]),
])
def test_write_errors_are_named(error, errno_, words):
    """models.io.writing turns each writer's report of a failed write into one WriteError that
    keeps the errno, names the path and says "disk full" for ENOSPC."""
    from forge.models.io import writing
    with pytest.raises(WriteError) as e:
        with writing("/d"):
            raise error
    assert e.value.errno == errno_
    for w in words:
        assert w in str(e.value), str(e.value)
    with pytest.raises(KeyError):                   # anything else passes through unchanged
        with writing("/d"):
            raise KeyError("x")
