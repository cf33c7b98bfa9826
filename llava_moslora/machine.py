"""The machine a number was measured on: CPU kind, the instruction sets that change its bits, the
numeric pins in force, and the stack's versions.

A published number names the machine it came from (the main job's `$OUT/summary.md`, cited by
benchmarks/results/offline_results.md). On CPUs, the bits of a training run depend on the widest
instruction set the kernels use (scripts/pin_numerics.sh caps them at AVX2), so the flags listed
here are the ones that pick other kernels: AVX2, AVX512F, AVX512-BF16, AVX512-FP16 and AMX.

    llava-moslora machine      # prints the Markdown block
"""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

# CPU flags (as /proc/cpuinfo spells them) that select other kernels in torch, oneDNN or MKL.
KERNEL_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile")
# The variables scripts/pin_numerics.sh sets; unset means each library picks its widest kernels.
NUMERIC_PINS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR", "OMP_NUM_THREADS")
STACK = ("torch", "transformers", "peft", "xtuner", "mmengine", "ms-vlmeval")


def cpu_model_and_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[str, set[str]]:
    """The first CPU's model name and flags (`platform.processor()` and no flags off Linux)."""
    fields: dict[str, str] = {}
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())  # the first CPU's
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or "unknown CPU"
    return name, set(fields.get("flags", "").split())


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def describe_machine() -> str:
    """A Markdown list: CPU, its kernel-selecting flags, torch's CPU kernels, pins, versions."""
    import torch

    name, flags = cpu_model_and_flags()
    present = [flag for flag in KERNEL_FLAGS if flag in flags]
    absent = [flag for flag in KERNEL_FLAGS if flag not in flags]
    pins = ", ".join(f"{var}={os.environ.get(var, 'unset')}" for var in NUMERIC_PINS)
    return "\n".join(
        [
            f"- CPU: {name}, {os.cpu_count()} logical CPUs ({platform.machine()})",
            f"- flags: {' '.join(present) or 'none of ' + ' '.join(KERNEL_FLAGS)}"
            + (f" (without {' '.join(absent)})" if absent and present else ""),
            f"- torch CPU kernels in use: {torch.backends.cpu.get_cpu_capability()}; {pins}",
            "- stack: " + ", ".join(f"{p} {_version(p)}" for p in STACK),
        ]
    )
