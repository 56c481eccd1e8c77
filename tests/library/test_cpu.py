"""Specification of the CPU reader: the int8 class of Intel, AMD and Arm machines, read
from their /proc/cpuinfo (fixture files in tests/cpuinfo/)."""
import pytest

from compress.machine import cpu
from helpers import REPO

FIXTURES = REPO / "tests" / "cpuinfo"
EXPECTED = {  # file: (int8 class, whether u8 x s8 products can saturate there)
    "amd_epyc_7b13_zen3_avx2.txt": ("avx2", True),
    "amd_epyc_9b14_zen4_avx512_vnni.txt": ("avx512-vnni", False),
    "intel_xeon_8175m_skylake_avx512.txt": ("avx512", True),
    "intel_xeon_8259cl_cascade_lake_vnni.txt": ("avx512-vnni", False),
    "intel_core_i7_12700_alder_lake_avx_vnni.txt": ("avx-vnni", False),
    "intel_xeon_kvm_amx.txt": ("amx", False),
    "arm_neoverse_n1_graviton2.txt": ("arm64", False),
}


def test_every_fixture_file_is_specified():
    assert {path.name for path in FIXTURES.glob("*.txt")} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_the_int8_class_of_each_machine(name):
    _, flags = cpu.read_cpuinfo(FIXTURES / name)
    cpu_class = cpu.cpu_class(flags, machine="")  # the file's machine, not this one
    assert (cpu_class, cpu.saturates(cpu_class)) == EXPECTED[name]


def test_the_model_name_and_flags_are_read_from_the_first_processor(tmp_path):
    two = (FIXTURES / "amd_epyc_7b13_zen3_avx2.txt").read_text()
    second = two.replace("AMD EPYC 7B13", "another").replace(" avx2", " avx512_vnni")
    (tmp_path / "cpuinfo").write_text(two + "\n" + second)
    name, flags = cpu.read_cpuinfo(tmp_path / "cpuinfo")
    assert name == "AMD EPYC 7B13"
    assert "avx2" in flags and "avx512_vnni" not in flags and "sse4_2" in flags


def test_a_machine_without_cpuinfo_is_of_no_known_class(tmp_path):
    assert cpu.read_cpuinfo(tmp_path / "missing") == ("", set())
    assert cpu.cpu_class(set(), machine="x86_64") == "other"
    assert cpu.saturates("other")  # treated as the cautious case: 7-bit weights


def test_the_report_line_names_the_cpu_and_its_class():
    line = cpu.describe_cpu(FIXTURES / "intel_xeon_8259cl_cascade_lake_vnni.txt")
    assert line.startswith("Intel(R) Xeon(R) Platinum 8259CL")
    assert "avx512_vnni" in line and "int8 class avx512-vnni" in line
