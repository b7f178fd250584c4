"""Whether the Hugging Face hub can be reached, asked once and the same way by every command
that may fetch from it (`forge convert` / `from_pretrained` for a repo id, `forge prepare` for a
dataset name), so that an offline machine gets a clear error at once instead of a hang.
"""
from __future__ import annotations

import os
import socket
import threading
from typing import Optional
from urllib.parse import urlparse

DEFAULT_ENDPOINT = "https://huggingface.co"
_TRUE = ("1", "true", "yes", "on")


def offline_reason(variables: tuple[str, ...] = ("HF_HUB_OFFLINE",)) -> Optional[str]:
    """"<VAR> is set" for the first of `variables` set to a true value (or huggingface_hub's own
    offline flag, HF_HUB_OFFLINE), else None."""
    for var in variables:
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return f"{var} is set"
    try:
        from huggingface_hub import constants
        if constants.HF_HUB_OFFLINE:
            return "HF_HUB_OFFLINE is set"
    except Exception:                      # noqa: BLE001 - no huggingface_hub: only the variables count
        pass
    return None


def endpoint() -> str:
    """The hub's URL: huggingface_hub's ENDPOINT (which honours HF_ENDPOINT), else HF_ENDPOINT."""
    try:
        from huggingface_hub import constants
        return constants.ENDPOINT
    except Exception:                      # noqa: BLE001
        return os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT)


def unreachable_reason(timeout: float = 5.0, variables: tuple[str, ...] = ("HF_HUB_OFFLINE",)) -> Optional[str]:
    """None when the hub answers a TCP connection within `timeout` seconds (DNS included: the
    probe runs in a thread, so a resolver that hangs cannot hold the caller); otherwise why not
    (offline mode, see `offline_reason`, or no connection to the endpoint's host)."""
    why = offline_reason(variables)
    if why:
        return why
    url = urlparse(endpoint())
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    errors: list[str] = []
    ok: list[bool] = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError as e:
            errors.append(str(e))
    th = threading.Thread(target=probe, daemon=True)
    th.start()
    th.join(timeout)
    if ok:
        return None
    return f"cannot connect to {host}:{port}" + (f": {errors[0]}" if errors else f" within {timeout:g}s")
