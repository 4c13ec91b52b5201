"""What every result records about the machine it ran on."""
from pathlib import Path

from yoloquant.provenance import INT8_CPU_FLAGS, machine, machine_line


def test_machine_records_the_cpu_and_its_int8_flags():
    info = machine()
    assert info["cpu"] and info["cores"] >= 1
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():  # Linux: the flags are read from the first processor's block
        flags = next(line for line in cpuinfo.read_text().splitlines()
                     if line.startswith("flags")).split(":", 1)[1].split()
        assert info["cpu_flags"] == [f for f in INT8_CPU_FLAGS if f in flags]
        assert info["cpu_family_model"].count("/") == 1
    line = machine_line(info)
    assert info["cpu"] in line and (", ".join(info["cpu_flags"]) or "no AVX") in line


def test_machine_line_reads_older_records_without_flags():
    assert machine_line({"cpu": "X", "cores": 2}) == "CPU: X (no AVX-512/VNNI/AMX flags), 2 cores"
