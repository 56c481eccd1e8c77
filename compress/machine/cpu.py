"""Which CPU a model runs on, as far as int8 is concerned.

int8 convolutions and matrix products in onnxruntime (and PyTorch) multiply uint8
activations by int8 weights. How the products are summed depends on the instruction
set, and that decides how an int8 file must be quantised:

- AVX2, or AVX-512 without VNNI: `vpmaddubsw` adds two u8 x s8 products into a
  *saturating* int16 (255 x 127 x 2 = 64770 > 32767), so large activations meeting
  large weights are clipped. onnxruntime's `reduce_range` (7-bit weights) keeps
  every pair within int16. Measured on an AMD EPYC (AVX2, no VNNI): the demo's
  distilled model 91.3% in fp32, 83.75% in int8 with 8-bit weights, 91.25% with
  `reduce_range`.
- VNNI (AVX512-VNNI, AVX-VNNI) and AMX: `vpdpbusd` / `tdpbusd` sum the products in
  int32, nothing saturates, and 8-bit weights keep their full precision.

`cpu_class()` names the class of a CPU from the flags of /proc/cpuinfo (this
machine's by default); `saturates()` says whether u8 x s8 int8 can saturate on it.
`native_bf16()` names the unit that computes bfloat16 on it, if any (--amp on the CPU).
"""
from __future__ import annotations

import platform

# int8 classes, from the most capable; the first whose flags a CPU has is its class
CPU_CLASSES = {
    "amx": "Intel AMX (amx_int8): int8 tile products summed in int32",
    "avx512-vnni": "AVX-512 with VNNI (vpdpbusd): int8 products summed in int32",
    "avx-vnni": "AVX2 with AVX-VNNI (vpdpbusd): int8 products summed in int32",
    "avx512": "AVX-512 without VNNI: u8 x s8 pairs summed in saturating int16",
    "avx2": "AVX2 without VNNI: u8 x s8 pairs summed in saturating int16",
    "arm64": "64-bit Arm: int8 products widened before they are summed",
    "other": "none of the above (older x86): treated as saturating",
}
REQUIRED_FLAGS = {"amx": {"amx_int8"}, "avx512-vnni": {"avx512_vnni"}, "avx-vnni": {"avx_vnni"},
                  "avx512": {"avx512bw"}, "avx2": {"avx2"}}
# the classes whose int8 products can saturate (see the module's docstring)
SATURATING = {"avx512", "avx2", "other"}
CPUINFO = "/proc/cpuinfo"


def read_cpuinfo(path: str = CPUINFO) -> tuple[str, set[str]]:
    """(model name, set of instruction-set flags) of the first processor in `path`;
    ("", set()) where there is no such file (not Linux)."""
    try:
        with open(path) as file:
            text = file.read()
    except OSError:
        return "", set()
    name, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "model name" and not name:
            name = value.strip()
        elif key in ("flags", "features") and not flags:  # x86 / Arm
            flags = set(value.split())
    return name, flags


def cpu_class(flags: set[str] | None = None, machine: str | None = None) -> str:
    """The int8 class (a key of CPU_CLASSES) of a CPU with these /proc/cpuinfo `flags`
    (this machine's if None)."""
    if flags is None:
        flags = read_cpuinfo()[1]
    machine = (machine or platform.machine()).lower()
    if machine in ("aarch64", "arm64") or "asimd" in flags:  # (Arm lists "Features")
        return "arm64"
    for name, required in REQUIRED_FLAGS.items():
        if required <= flags:
            return name
    return "other"


def saturates(cpu: str) -> bool:
    """Whether u8 x s8 int8 products can saturate on CPU class `cpu` (reduce_range needed)."""
    return cpu in SATURATING


# the units that multiply bfloat16 natively, from the fastest; without one, PyTorch's bf16
# autocast on the CPU converts and computes in fp32, slower than fp32 alone
BF16_UNITS = {"amx_bf16": "AMX (amx_bf16)", "avx512_bf16": "AVX512-BF16"}


def native_bf16(flags: set[str] | None = None) -> str | None:
    """The unit of BF16_UNITS a CPU with these /proc/cpuinfo `flags` (this machine's if None)
    computes bfloat16 with, or None."""
    flags = read_cpuinfo()[1] if flags is None else flags
    return next((unit for flag, unit in BF16_UNITS.items() if flag in flags), None)


def describe_cpu(path: str = CPUINFO) -> str:
    """One line for a report's header: the model name and its int8 class."""
    name, flags = read_cpuinfo(path)
    cpu = cpu_class(flags, machine=None if path == CPUINFO else "")
    present = [flag for flag in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
               if flag in flags]
    return (f"{name or platform.processor() or platform.machine()} "
            f"({', '.join(present) or 'no AVX2'}; int8 class {cpu})")
