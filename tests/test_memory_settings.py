"""The process-wide memory settings of imram_dist/__init__.py: transparent huge pages for torch's
CPU tensors and glibc keeping freed memory for reuse. Both are on in every process that imports
imram_dist, off when the user says so, and passed to the Ray workers of a job."""

from __future__ import annotations

import os
import subprocess
import sys

from imram_dist import HUGE_PAGES_ENV, KEEP_FREED_MEMORY_ENV
from imram_dist.config import Config
from imram_dist.train.driver import job_env

# A fresh process imports imram_dist, then torch, fills a 64 MB tensor and frees it; it prints how
# much of the tensor the kernel backed with huge pages (AnonHugePages, KiB; needs THP in "madvise" or
# "always" mode, as on these machines: /sys/kernel/mm/transparent_hugepage/enabled) and how much of
# it stayed resident after the free (MiB).
PROBE = """
import imram_dist, torch
def resident_mib():
    return int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20
t = torch.empty(64 * 2**20, dtype=torch.uint8)
t.fill_(1)
huge = next(int(ln.split()[1]) for ln in open('/proc/self/smaps_rollup') if ln.startswith('AnonHugePages'))
before = resident_mib()
del t
print(huge, round(resident_mib() - before + 64))
"""


def probe(**settings: str) -> tuple[int, int]:
    env = {k: v for k, v in os.environ.items() if k not in (HUGE_PAGES_ENV, KEEP_FREED_MEMORY_ENV)}
    env.update(settings)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    huge_kib, kept_mib = out.stdout.split()
    return int(huge_kib), int(kept_mib)


def test_importing_the_package_turns_both_on():
    huge_kib, kept_mib = probe()
    assert huge_kib >= 32 * 1024  # at least half of the tensor on huge pages
    assert kept_mib >= 60  # the freed 64 MB stay mapped for the next allocation


def test_the_user_can_turn_each_off():
    assert probe(**{HUGE_PAGES_ENV: "0"})[0] == 0
    assert probe(**{KEEP_FREED_MEMORY_ENV: "0"})[1] <= 4  # returned to the OS at once


def test_ray_workers_get_the_settings(monkeypatch):
    monkeypatch.delenv(HUGE_PAGES_ENV, raising=False)
    monkeypatch.delenv(KEEP_FREED_MEMORY_ENV, raising=False)
    env = job_env(Config())
    assert env[HUGE_PAGES_ENV] == "1" and env[KEEP_FREED_MEMORY_ENV] == "1" and env["DS_ACCELERATOR"] == "cpu"
    monkeypatch.setenv(HUGE_PAGES_ENV, "0")
    monkeypatch.setenv(KEEP_FREED_MEMORY_ENV, "0")
    env = job_env(Config())
    assert env[HUGE_PAGES_ENV] == "0" and env[KEEP_FREED_MEMORY_ENV] == "0"
