"""The machine line every benchmark prints (imram_dist.machine), and the package's import arrows:
the model library and the machine line load none of the orchestration stack."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from imram_dist import machine


def test_cpu_info_reads_the_first_cpus_fields():
    assert machine.cpu_info("processor") == "0"  # Linux: the first CPU's block
    assert machine.cpu_info("no such field") == ""
    assert machine.cpu_info("model name") != ""


def fake_sysfs(root: Path, topology: list[tuple[int, int]]) -> Path:
    for cpu, (package, core) in enumerate(topology):
        topo = root / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "physical_package_id").write_text(f"{package}\n")
        (topo / "core_id").write_text(f"{core}\n")
    (root / "cpufreq").mkdir()  # not a CPU: ignored
    return root


def test_physical_cores_counts_smt_siblings_once(tmp_path):
    assert machine.physical_cores(fake_sysfs(tmp_path / "smt", [(0, 0), (0, 0)])) == 1
    assert machine.physical_cores(fake_sysfs(tmp_path / "two", [(0, 0), (0, 1)])) == 2
    # core ids repeat across packages
    assert machine.physical_cores(fake_sysfs(tmp_path / "sockets", [(0, 0), (1, 0), (0, 0), (1, 0)])) == 2
    assert machine.physical_cores(tmp_path / "nothing") == 0


def test_describe_cpu_names_the_model_its_x86_ids_cores_and_bf16_support(monkeypatch):
    fields = {"model name": "AMD EPYC", "cpu family": "25", "model": "17", "stepping": "1",
              "flags": "fpu avx512f avx512_bf16 sse"}
    monkeypatch.setattr(machine, "cpu_info", lambda field: fields.get(field, ""))
    monkeypatch.setattr(machine, "physical_cores", lambda: 1)
    monkeypatch.setattr(machine.os, "cpu_count", lambda: 2)
    assert machine.describe_cpu() == ("AMD EPYC (x86 family 25 model 17 stepping 1), 2 CPUs on 1 cores, "
                                      "bf16 support: avx512_bf16")
    fields.update({"flags": "fpu amx_bf16 amx_tile avx512_bf16", "stepping": ""})  # ids incomplete: left out
    monkeypatch.setattr(machine, "physical_cores", lambda: 0)
    assert machine.describe_cpu() == "AMD EPYC, 2 CPUs, bf16 support: amx_bf16 amx_tile avx512_bf16"
    fields["flags"] = "fpu sse"
    assert machine.describe_cpu().endswith("bf16 support: none (no AMX/AVX512-BF16)")


def loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(m.split('.')[0] for m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    return set(out.stdout.split())


ORCHESTRATION = {"ray", "deepspeed", "mlflow", "webdataset", "pyarrow"}


def test_the_model_library_imports_no_orchestration_and_the_machine_line_no_torch():
    assert not loaded_after("import imram_dist.model") & ORCHESTRATION
    assert not loaded_after("import imram_dist.machine") & (ORCHESTRATION | {"torch"})
