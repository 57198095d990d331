"""What the benchmark scripts record about the machine they ran on.

Imported by the scripts next to it (``from machine import machine_description``): run as
``python benchmarks/NAME.py``, their folder comes first on ``sys.path``.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def machine_description(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.machine()}"
    if device.type == "cuda":
        text += f"; GPU {torch.cuda.get_device_name(device)}"
    return text


def publish(lines: list[str], out: str | Path | None) -> None:
    """Print a result table and, if ``out`` is given, write it there (folders made as needed)."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
