"""Process memory read from Linux's /proc (no torch, no nnU-Net): what the benchmark and the timing tools report.

Every function degrades gracefully where /proc is missing or read-only (NaN, or False for the reset).
"""
from __future__ import annotations


def _status_mb(key: str) -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def rss_mb() -> float:
    """Current resident set size of this process in MB (VmRSS)."""
    return _status_mb("VmRSS")


def rss_high_water_mb() -> float:
    """Peak resident set size of this process in MB since start or the last reset (VmHWM)."""
    return _status_mb("VmHWM")


def reset_rss_high_water() -> bool:
    """Reset the kernel's RSS high-water mark (so start-up does not count); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
