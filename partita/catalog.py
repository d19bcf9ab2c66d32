"""Device types and link presets with sourced figures, so a cluster file can say `type: raspberry-pi-4`.

`partita.cluster` re-exports these as `CATALOG` (name -> `DeviceType`) and `LINK_PRESETS`
(name -> `LinkSpec`). A device in a cluster file takes every field it does not give itself from its
catalog type.

What the numbers mean:
- `flops_per_s` is fp32 FLOP/s. For the small ARM boards it is a measured figure (HPL/Linpack on all
  cores), which is close to what a DNN reaches there. For GPUs and x86 parts it is the vendor's or the
  derived fp32 *peak* (cores x clock x FLOP/cycle); a real network reaches perhaps 30-70% of it.
  `basis` says which. Relative speeds matter most to the planner; for absolute predictions deploy
  times every segment on the real devices (`partita.runtime.measure`) and plans with those times.
- `memory_bytes` is the installed RAM (unified memory on Jetsons and Pis) or the GPU's memory. What a
  stage may really use is lower (OS, runtime); override `memory` in the cluster file where it binds.
- Link presets are typical *achieved* TCP goodput and one-way latency, not PHY rates.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

__all__ = ["DeviceType", "LinkPreset", "DEVICE_TYPES", "LINK_PRESET_VALUES"]

GiB = 2.0**30


@dataclass(frozen=True)
class DeviceType:
    """A kind of device: its fp32 compute, its memory, and where the figures come from."""

    name: str
    flops_per_s: float  # fp32 FLOP/s (see `basis`)
    memory_bytes: float  # installed memory, bytes
    basis: str  # "measured" (a benchmark) or "peak" (vendor/derived theoretical fp32 peak)
    source_url: str
    notes: str = ""


@dataclass(frozen=True)
class LinkPreset:
    """A typical link: achieved bandwidth (bytes/s) and one-way latency (s)."""

    name: str
    bandwidth_bytes_per_s: float
    latency_s: float
    notes: str = ""


_TYPES = (
    DeviceType(
        "raspberry-pi-3b", 6.0e9, 1 * GiB, "measured",
        "https://www.netlib.org/benchmark/hpl/ (HPL on Pi 3B, 4x Cortex-A53 @ 1.2 GHz, ~6 GFLOPS)",
        "4x Cortex-A53 @ 1.2 GHz, 1 GiB LPDDR2",
    ),
    DeviceType(
        "raspberry-pi-4", 13.5e9, 4 * GiB, "measured",
        "https://github.com/geerlingguy/top500-benchmark (HPL, Pi 4 Model B, 4x Cortex-A72 @ 1.5-1.8 GHz)",
        "4 GiB model; 2/8 GiB models exist (override memory)",
    ),
    DeviceType(
        "raspberry-pi-5", 30.2e9, 8 * GiB, "measured",
        "https://github.com/geerlingguy/top500-benchmark (HPL, Pi 5 8GB: ~30 GFLOPS, 4x Cortex-A76 @ 2.4 GHz)",
        "8 GiB model",
    ),
    DeviceType(
        "jetson-nano", 235.8e9, 4 * GiB, "peak",
        "https://developer.nvidia.com/embedded/jetson-nano (472 GFLOPS fp16 = 128 Maxwell cores x 2 x 921.6 MHz x 2)",
        "fp32 peak = 128 x 2 FLOP x 921.6 MHz; 4 GiB shared with the CPU",
    ),
    DeviceType(
        "jetson-orin-nano", 1.28e12, 8 * GiB, "peak",
        "https://developer.nvidia.com/embedded/jetson-orin-nano-developer-kit (1024 Ampere CUDA cores @ 625 MHz)",
        "fp32 peak = 1024 x 2 FLOP x 625 MHz; 8 GiB shared with the CPU",
    ),
    DeviceType(
        "intel-nuc-11-i5", 307.2e9, 16 * GiB, "peak",
        "https://ark.intel.com/content/www/us/en/ark/products/208658.html (i5-1135G7: 4 cores, 2.4 GHz base, AVX-512)",
        "fp32 peak = 4 cores x 2.4 GHz x 32 FLOP/cycle (one 512-bit FMA port); 16 GiB configured",
    ),
    DeviceType(
        "laptop-i7-1165g7", 358.4e9, 16 * GiB, "peak",
        "https://ark.intel.com/content/www/us/en/ark/products/208662.html (i7-1165G7: 4 cores, 2.8 GHz base, AVX-512)",
        "a typical thin-and-light laptop CPU; fp32 peak = 4 x 2.8 GHz x 32 FLOP/cycle",
    ),
    DeviceType(
        "apple-m1", 2.6e12, 8 * GiB, "peak",
        "https://en.wikipedia.org/wiki/Apple_M1 (8-core GPU: 2.6 TFLOPS fp32)",
        "GPU fp32 peak; 8 GiB unified memory model",
    ),
    DeviceType(
        "nvidia-t4", 8.1e12, 16 * GiB, "peak",
        "https://www.nvidia.com/en-us/data-center/tesla-t4/ (8.1 TFLOPS single precision, 16 GB GDDR6)",
    ),
    DeviceType(
        "nvidia-l4", 30.3e12, 24 * GiB, "peak",
        "https://www.nvidia.com/en-us/data-center/l4/ (30.3 TFLOPS fp32, 24 GB GDDR6)",
    ),
    DeviceType(
        "nvidia-a100-40gb", 19.5e12, 40 * GiB, "peak",
        "https://www.nvidia.com/en-us/data-center/a100/ (19.5 TFLOPS fp32, 40 GB HBM2)",
    ),
    DeviceType(
        "nvidia-h100-sxm", 67.0e12, 80 * GiB, "peak",
        "https://www.nvidia.com/en-us/data-center/h100/ (67 TFLOPS fp32 SXM, 80 GB HBM3)",
    ),
)

DEVICE_TYPES: MappingProxyType[str, DeviceType] = MappingProxyType({t.name: t for t in _TYPES})

_MBIT = 1e6 / 8.0
_PRESETS = (
    LinkPreset("wifi4", 50 * _MBIT, 3e-3, "802.11n 2.4 GHz, typical achieved TCP goodput"),
    LinkPreset("wifi5", 200 * _MBIT, 2e-3, "802.11ac 5 GHz, typical achieved TCP goodput"),
    LinkPreset("wifi6", 600 * _MBIT, 1.5e-3, "802.11ax 5 GHz, typical achieved TCP goodput"),
    LinkPreset("ethernet-100M", 94 * _MBIT, 3e-4, "100BASE-TX, TCP goodput"),
    LinkPreset("ethernet-1G", 940 * _MBIT, 2e-4, "1000BASE-T, TCP goodput"),
    LinkPreset("ethernet-10G", 9400 * _MBIT, 5e-5, "10GBASE-T, TCP goodput"),
    LinkPreset("lte", 20 * _MBIT, 4e-2, "4G LTE uplink-limited, typical"),
    LinkPreset("5g", 100 * _MBIT, 1.5e-2, "5G sub-6 GHz uplink-limited, typical"),
    LinkPreset("infiniband-200G", 200e9 / 8 * 0.9, 2e-6, "HDR InfiniBand, ~90% of line rate"),
    LinkPreset("nvlink-4", 450e9, 1e-6, "H100 NVLink 4, per direction"),
)

LINK_PRESET_VALUES: MappingProxyType[str, LinkPreset] = MappingProxyType({p.name: p for p in _PRESETS})
