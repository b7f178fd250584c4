"""This process's resident memory (Linux /proc, falling back to getrusage), for tools and tests
that bound what a build or a save costs.

    reset_peak_rss()            lower the peak (VmHWM) to the current RSS, so an earlier transient
                                peak (imports) does not hide later growth; False where unsupported
    peak_rss_bytes()            VmHWM, or ru_maxrss where /proc lacks it (it cannot be reset)
    rss_bytes()                 the current RSS
"""
from __future__ import annotations

import os
import resource


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def maxrss_bytes() -> int:
    """getrusage's ru_maxrss (the process's peak, exited threads included; never reset)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return maxrss_bytes()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
