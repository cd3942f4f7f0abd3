"""`IMGEMBED_RUNTIME=auto` / `IMGEMBED_PRECISION=auto`: the runtime and precision measured
fastest on this kind of CPU, read from the CPU's flags (bench/bench_runtime.py, README
"Runtimes"). Only choices that were measured are made: elsewhere auto means fp32."""

from __future__ import annotations

import importlib.util
import platform
from pathlib import Path

from imgembed.config import Settings
from imgembed.models import registry
from imgembed.models.registry import ModelRef

AUTO = "auto"


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The first CPU's feature flags (Linux: `flags` on x86, `Features` on ARM); empty where
    they cannot be read, which makes auto choose the safe fp32."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_class(flags: frozenset[str], machine: str | None = None) -> str:
    """avx512-vnni | avx-vnni | avx2 | other. The int8 matrix products run on VNNI where the
    CPU has it; on AVX2 alone at about twice fp32's speed."""
    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64", "i686", "x86"):
        return "other"
    if "avx512_vnni" in flags:
        return "avx512-vnni"
    if "avx_vnni" in flags:
        return "avx-vnni"
    if "avx2" in flags and "fma" in flags:
        return "avx2"
    return "other"


# Measured per class (images/s end to end and model-only, same run, README "Performance"):
# ONNX int8 beat ONNX fp32, torch and OpenVINO (fp32, bf16, NNCF int8) on both classes below.
# Unmeasured classes keep fp32: exact, and never slower than the reference.
_INT8_CLASSES = ("avx512-vnni", "avx-vnni", "avx2")


def choose(
    settings: Settings, ref: ModelRef, flags: frozenset[str], machine: str | None = None
) -> tuple[str, str]:
    """(runtime, precision) for these settings, with every `auto` replaced."""
    runtime, precision = settings.runtime, settings.precision
    if runtime == AUTO:
        onnx_capable = (
            registry.facts(ref.name).family == "open_clip"
            and settings.device in ("auto", "cpu")
            and importlib.util.find_spec("onnxruntime") is not None
        )
        runtime = "onnx" if onnx_capable else "torch"
    if precision == AUTO:
        fast_int8 = cpu_class(flags, machine) in _INT8_CLASSES
        precision = "int8" if runtime == "onnx" and fast_int8 else "fp32"
    return runtime, precision


def resolve(settings: Settings, ref: ModelRef) -> Settings:
    """The settings with `auto` runtime/precision replaced by this machine's choice."""
    if AUTO not in (settings.runtime, settings.precision):
        return settings
    runtime, precision = choose(settings, ref, cpu_flags())
    return settings.model_copy(update={"runtime": runtime, "precision": precision})
