"""Atomic writes (a file or a folder written aside and renamed into place) and file modes that
follow the user's umask. Every write-then-rename in Forge goes through `atomic_file` or
`atomic_dir`, so a crash leaves the old file (or folder) or the new one, never half of one.

`tempfile.mkdtemp` creates folders 0o700 and safetensors' `save_file` writes files 0o600, whatever
the umask; a folder renamed into place from such a temporary (an atomic write) would stay private
to its owner. These helpers give what `open()` / `os.makedirs` would have given:

    file mode   = 0o666 & ~umask        (umask 0o022 -> 0o644)
    folder mode = 0o777 & ~umask        (umask 0o022 -> 0o755)
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask sets as it reads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str) -> None:
    """chmod `path` to the mode a plain open()/mkdir would have given it (see module doc)."""
    mask = current_umask()
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~mask)


def make_temp_dir(parent: str, prefix: str) -> str:
    """`tempfile.mkdtemp` in `parent`, with the umask's folder mode instead of 0o700."""
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    apply_umask(tmp)
    return tmp


def save_safetensors(tensors: dict, path: str, metadata: dict | None = None) -> None:
    """safetensors' `save_file`, with the umask's file mode instead of 0o600."""
    from safetensors.torch import save_file
    save_file(tensors, path, metadata=metadata)
    apply_umask(path)


def fsync_dir(path: str) -> None:
    """fsync a folder, so a rename inside it survives a power cut (best effort: not every
    filesystem allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w", durable: bool = False, suffix: str = "", **open_kw):
    """Yield `path + ".tmp{pid}{suffix}"` opened with `mode` (or, with mode=None, its name for a
    writer that opens it itself, e.g. savefig / np.save: `suffix` then keeps the extension they
    want). On a clean exit it replaces `path` (os.replace: readers see the old file or the new
    one); on an error it is removed and `path` is left as it was. durable: fsync the file before
    the rename."""
    tmp = f"{path}.tmp{os.getpid()}{suffix}"
    try:
        if mode is None:
            yield tmp
        else:
            with open(tmp, mode, **open_kw) as f:
                yield f
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_json_atomic(path: str, obj, indent: int = 1, durable: bool = True, **dump_kw) -> None:
    """`obj` as JSON in `path`, through `atomic_file` (fsync'd before the rename when durable)."""
    with atomic_file(path, "w", durable=durable, encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, **dump_kw)


@contextlib.contextmanager
def atomic_dir(out: str, force: bool = False):
    """Yield a temporary sibling folder of `out` (umask modes); on a clean exit it takes `out`'s
    place: an existing `out` is moved aside, the new folder renamed in, then the old one deleted.
    An existing non-empty `out` is refused (FileExistsError) unless force. On an error the
    temporary is removed and `out` is left as it was."""
    out = os.path.abspath(out)
    if os.path.exists(out) and not force and (not os.path.isdir(out) or os.listdir(out)):
        raise FileExistsError(f"{out!r} exists and is not empty; pass --force to overwrite it")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = make_temp_dir(parent, prefix=f".tmp-{os.path.basename(out)}-")
    try:
        yield tmp
        old = None
        if os.path.lexists(out):
            old = tmp + "-old"
            os.rename(out, old)
        os.rename(tmp, out)
        if old:
            shutil.rmtree(old) if os.path.isdir(old) and not os.path.islink(old) else os.remove(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class JSONFileError(ValueError):
    """A JSON file that cannot be read, does not parse or holds no object; the message names it."""


def read_json_object(file: str) -> dict:
    """The JSON object in `file`. A missing file raises FileNotFoundError (the caller says what
    it was for); an unreadable, truncated or corrupt one, or one that holds no object, raises
    JSONFileError naming it."""
    try:
        with open(file, encoding="utf-8") as f:
            value = json.load(f)
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise JSONFileError(f"{file!r} cannot be read ({type(e).__name__}: {e}): it is truncated or "
                            "corrupt") from None
    if not isinstance(value, dict):
        raise JSONFileError(f"{file!r} holds {type(value).__name__}, not a JSON object")
    return value
