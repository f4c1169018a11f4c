"""Which CPU this is, in the words every benchmark prints next to its figures (torch-free, so that
benchmarks/bench_tune.py can say it without importing torch).

The model name alone does not identify a CPU: two hosts of this project's machines both said
"AMD EPYC", and their dense bf16 matmul ran at 920 GFLOP/s on 2 threads on one (docs/model.md,
"CPU figures") and at 270-370 on the other (x86 family 25 model 17, a Zen 4: ~180 per thread).
The x86 family/model numbers tell such CPUs apart (AMD family 25 is Zen 3/4, 26 is Zen 5), and the
core count says whether the CPUs share cores (SMT siblings share one core's vector units).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

BF16_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16")  # /proc/cpuinfo flags of the bf16 matmul paths


def cpu_info(field: str) -> str:
    """A field of the first CPU in /proc/cpuinfo ("vendor_id", "model name", "flags"), "" where
    there is none (another OS, another architecture)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":", 1)[0].strip() == field:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def physical_cores(sysfs: Path = Path("/sys/devices/system/cpu")) -> int:
    """The number of distinct (package, core) pairs among the CPUs the OS lists; 0 where sysfs does
    not say. A hypervisor may present SMT siblings as separate cores: then this counts them twice."""
    cores = set()
    for topo in sysfs.glob("cpu[0-9]*/topology"):
        try:
            cores.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
        except OSError:
            continue
    return len(cores)


def describe_cpu() -> str:
    """'<model name> (x86 family F model M stepping S), N CPUs on C cores, bf16 support: <flags>'."""
    name = cpu_info("model name") or platform.processor() or "unknown CPU"
    ids = [(label, cpu_info(field)) for label, field in (("family", "cpu family"), ("model", "model"),
                                                          ("stepping", "stepping"))]
    if all(value for _, value in ids):
        name += f" (x86 {' '.join(f'{label} {value}' for label, value in ids)})"
    cores = physical_cores()
    flags = cpu_info("flags").split()
    bf16 = " ".join(fl for fl in BF16_FLAGS if fl in flags) or "none (no AMX/AVX512-BF16)"
    return f"{name}, {os.cpu_count()} CPUs{f' on {cores} cores' if cores else ''}, bf16 support: {bf16}"
