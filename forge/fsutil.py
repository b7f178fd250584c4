"""File modes that follow the user's umask.

`tempfile.mkdtemp` creates folders 0o700 and safetensors' `save_file` writes files 0o600, whatever
the umask; a folder renamed into place from such a temporary (an atomic write) would stay private
to its owner. These helpers give what `open()` / `os.makedirs` would have given:

    file mode   = 0o666 & ~umask        (umask 0o022 -> 0o644)
    folder mode = 0o777 & ~umask        (umask 0o022 -> 0o755)
"""
from __future__ import annotations

import os
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
