"""Shared by the bench scripts (run as ``python bench/<name>.py``, so this folder is on
sys.path): the machine's CPU name and the process's peak memory, for their headers and
tables."""

from __future__ import annotations

import platform
import resource
import sys
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def peak_rss_mib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / (1024 * 1024) if sys.platform == "darwin" else kib / 1024
