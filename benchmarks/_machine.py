"""Machine and version lines printed at the top of every benchmark table."""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import os
import platform
import sys


def header(
    command: str, packages: tuple[str, ...] = ("torch", "transformers", "mindspore", "gguf")
) -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = []
    for p in ("slimport", *packages):
        with contextlib.suppress(md.PackageNotFoundError):
            versions.append(f"{p} {md.version(p)}")
    return "\n".join([
        f"machine: {cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.system()} {platform.release()}",
        f"python {sys.version.split()[0]}; " + ", ".join(versions),
        f"command: {command}",
    ])  # fmt: skip
