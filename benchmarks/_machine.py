"""Machine and version lines printed at the top of every benchmark table."""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import sys


def header(command: str, packages: tuple[str, ...] = ("torch", "transformers", "mindspore", "gguf")) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = []
    for p in ("slimport", *packages):
        try:
            versions.append(f"{p} {md.version(p)}")
        except md.PackageNotFoundError:
            pass
    return "\n".join([
        f"machine: {cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.system()} {platform.release()}",
        f"python {sys.version.split()[0]}; " + ", ".join(versions),
        f"command: {command}",
    ])  # fmt: skip
