"""Host CPU facts that change what ONNX Runtime computes for an int8 artifact."""
from __future__ import annotations

import functools
import pathlib
import platform

from eqcompiler.compile.qdq import REDUCED_INT8_RANGE

# How quantize_weights' layer descriptions mark 7-bit (reduce_range) int8 weights.
REDUCED_MARK = f"[{REDUCED_INT8_RANGE[0]}, {REDUCED_INT8_RANGE[1]}]"
# Instructions that give ORT's int8 GEMMs exact int32 dot products on x86.
_EXACT_INT8_DOT_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8"}


@functools.lru_cache(maxsize=1)
def _linux_cpu_flags() -> frozenset[str] | None:
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return None


# `eqc compile --cpu`: the CPU class whose ONNX Runtime int8 kernels the artifact is made for, an explicit input so
# the same command gives the same bytes on every host. "vnni": exact int8 dot products (x86 with AVX512-VNNI,
# AVX-VNNI or AMX; ARM; GPUs and TensorRT never take these kernels); "avx2": x86 without them, where ORT's int8
# GEMMs saturate on full-range weights (static W8A8 then gets uint8-encoded or 7-bit weights); "host": this machine.
CPU_CHOICES = ("vnni", "avx2", "host")
DEFAULT_CPU = "vnni"


def resolve_cpu(cpu: str) -> str:
    """"vnni" or "avx2" for a --cpu value ("host" reads this machine's flags)."""
    from eqcompiler.errors import EqcError

    if cpu not in CPU_CHOICES:
        raise EqcError(f"--cpu must be one of {', '.join(CPU_CHOICES)}, got '{cpu}'")
    if cpu == "host":
        return "avx2" if int8_gemm_saturates() else "vnni"
    return cpu


def int8_saturates_on(cpu: str) -> bool:
    """Whether ORT's int8 CPU GEMMs saturate on full-range int8 weights on the resolved `cpu` class."""
    return cpu == "avx2"


def int8_gemm_saturates() -> bool:
    """True on x86-64 CPUs without VNNI/AMX: there ORT multiplies uint8 activations by int8 weights
    with vpmaddubsw, whose int16 pair sums saturate unless |weight| <= 64 (see `--reduce-range`).
    False elsewhere, and where the flags cannot be read (no warning beats a wrong one)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    flags = _linux_cpu_flags()
    return flags is not None and not (flags & _EXACT_INT8_DOT_FLAGS)


def full_range_int8_layers(manifest: dict) -> list[str]:
    """Linear layers an eqc manifest reports as int8 weights stored with the full [-128, 127] range
    (embedding rows are gathered, not multiplied, so they do not count)."""
    report = (manifest.get("quantization") or {}).get("report") or {}
    sections = [s.get("layers") for s in report.values() if isinstance(s, dict)]
    return sorted(name for layers in sections if isinstance(layers, dict)  # the KV pass reports a count
                  for name, desc in layers.items()
                  if isinstance(desc, str) and desc.startswith("int8") and REDUCED_MARK not in desc
                  and "(embedding rows)" not in desc)


def saturation_warning(manifest: dict) -> str | None:
    """One line for `eqc eval` when this host's ORT int8 kernels will saturate on the artifact: static
    int8 activations (which ORT fuses into its int8 GEMMs) meeting full-range int8 weights."""
    report = (manifest.get("quantization") or {}).get("report") or {}
    if "quantize_activations" not in report:
        return None  # weight-only or per-token: ORT computes those in float (or eqc's exact int8 op)
    layers = full_range_int8_layers(manifest)
    encoded = report.get("encode_int8_as_uint8") or {}
    if encoded.get("applied"):
        layers = [name for name in layers if name in (encoded.get("left_int8") or {})]
    if not layers or not int8_gemm_saturates():
        return None
    return (f"this CPU has no VNNI: ONNX Runtime's int8 kernels saturate on full-range int8 weights "
            f"({len(layers)} layers here), so scores can be worse than the artifact's QDQ numerics; "
            "compile with --cpu avx2 (or --cpu host) for such CPUs")
