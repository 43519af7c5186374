"""What a plan compiles for: the table of device peaks and memories, the TPU slices, and the parsing of a
`--plan` topology (`tpu:v3-8`, `cpu:N`) into the JAX devices to compile for (docs/planning.md)."""

from __future__ import annotations

import dataclasses
import os
import re
import sys

from shortcut.errors import InputError


class PlanError(InputError, RuntimeError):
    """A plan cannot be made (unknown topology, libtpu missing, ...); the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Device:
    """One JAX device of a kind: its peak dense bf16 FLOP/s and memory, with where the figures come from."""

    label: str
    peak_flops: float | None
    memory_bytes: float | None
    source: str
    kinds: tuple[str, ...] = ()  # substrings of JAX's `device_kind` that name this device (device_for_kind)


GiB = 2**30
_GPU = "vendor datasheet, dense (no sparsity); memory not listed: GPU topologies are not planned"
# Per JAX device (a TPU v3 core; a v4 / v5p chip, whose two cores JAX drives as one "megacore" device; a
# v5e / v6e chip; a GPU). The one table of device peaks: the planner's, and the accelerator benchmark's MFU.
# Order matters for device_for_kind: the first row naming a kind wins ("H100 PCIe" before "H100").
DEVICES: dict[str, Device] = {
    "tpu-v3": Device("TPU v3 core", 123e12 / 2, 16 * GiB,
                     "cloud.google.com/tpu/docs/v3: 123 TFLOP/s bf16 and 32 GiB HBM per chip of 2 cores", ("TPU v3",)),
    "tpu-v4": Device("TPU v4 chip (megacore)", 275e12, 32 * GiB,
                     "cloud.google.com/tpu/docs/v4: 275 TFLOP/s bf16, 32 GiB HBM per chip", ("TPU v4",)),
    "tpu-v5e": Device("TPU v5e chip", 197e12, 16 * GiB,
                      "cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, 16 GiB HBM per chip",
                      ("TPU v5 lite", "TPU v5e")),
    "tpu-v5p": Device("TPU v5p chip (megacore)", 459e12, 95 * GiB,
                      "cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16, 95 GiB HBM per chip",
                      ("TPU v5p", "TPU v5")),
    "tpu-v6e": Device("TPU v6e chip", 918e12, 32 * GiB,
                      "cloud.google.com/tpu/docs/v6e: 918 TFLOP/s bf16, 32 GiB HBM per chip", ("TPU v6",)),
    "gpu-h100-pcie": Device("NVIDIA H100 PCIe", 756e12, None, _GPU, ("H100 PCIe",)),
    "gpu-h100": Device("NVIDIA H100 SXM", 989e12, None, _GPU, ("H100",)),
    "gpu-h200": Device("NVIDIA H200", 989e12, None, _GPU, ("H200",)),
    "gpu-h800": Device("NVIDIA H800", 989e12, None, _GPU, ("H800",)),
    "gpu-b200": Device("NVIDIA B200", 2250e12, None, _GPU, ("B200",)),
    "gpu-a100": Device("NVIDIA A100", 312e12, None, _GPU, ("A100",)),
    "gpu-l40s": Device("NVIDIA L40S", 362e12, None, _GPU, ("L40S",)),
    "gpu-l4": Device("NVIDIA L4", 121e12, None, _GPU, ("L4",)),
    "gpu-a10": Device("NVIDIA A10", 125e12, None, _GPU, ("A10",)),
    "cpu": Device("host CPU device", None, None,
                  "no peak: a CPU estimate; memory is this host's MemAvailable shared by the fake devices"),
}


def device_for_kind(kind: str) -> Device | None:
    """The DEVICES row of a JAX `device_kind` (e.g. "NVIDIA H100 80GB HBM3", "TPU v4"), None when unknown."""
    return next((d for d in DEVICES.values()
                 if any(re.search(rf"\b{re.escape(k)}\b", kind, re.IGNORECASE) for k in d.kinds)), None)

# slice name -> (libtpu topology name, chip config, device kind); single-host slices (one process compiles).
TPU_SLICES: dict[str, tuple[str, str, str]] = {
    "v3-8": ("v3:2x2", "default", "tpu-v3"),
    "v4-8": ("v4:2x2x1", "megacore", "tpu-v4"),
    "v5e-1": ("v5e:1x1", "default", "tpu-v5e"),
    "v5e-4": ("v5e:2x2", "default", "tpu-v5e"),
    "v5e-8": ("v5e:2x4", "default", "tpu-v5e"),
    "v5p-8": ("v5:2x2x1", "megacore", "tpu-v5p"),
    "v6e-4": ("v6e:2x2", "default", "tpu-v6e"),
    "v6e-8": ("v6e:2x4", "default", "tpu-v6e"),
}

INSTALL_LIBTPU = ("libtpu is not installed: `pip install -e '.[plan]'` (or `pip install \"jax[tpu]==<your jax version>\"`) "
                  "to compile for TPU topologies; `--plan cpu:N` works without it")


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as given, e.g. tpu:v3-8
    platform: str  # tpu | cpu
    num_devices: int
    kind: str  # key of DEVICES
    slice_name: str = ""

    @property
    def device(self) -> Device:
        return DEVICES[self.kind]

    @property
    def slug(self) -> str:
        return self.name.replace(":", "-")


def parse_topology(text: str) -> Topology:
    platform, _, rest = text.partition(":")
    if platform == "cpu":
        if not rest.isdigit() or int(rest) < 1:
            raise PlanError(f"--plan {text}: cpu:N needs a device count N >= 1, e.g. cpu:8")
        return Topology(text, "cpu", int(rest), "cpu")
    if platform == "tpu":
        if rest not in TPU_SLICES:
            raise PlanError(f"--plan {text}: unknown TPU slice {rest!r}; known: "
                            f"{', '.join('tpu:' + s for s in TPU_SLICES)}")
        topo, chip, kind = TPU_SLICES[rest]
        cores = int(rest.split("-")[1])
        n = cores // 2 if chip == "megacore" or kind == "tpu-v5p" else cores
        return Topology(text, "tpu", n, kind, rest)
    if platform in ("gpu", "cuda"):
        raise PlanError(f"--plan {text}: no GPU targets; JAX compiles for CUDA without a GPU only with the "
                        "jax-cuda12 plugin and a target description (docs/planning.md). Use tpu:SLICE or cpu:N")
    raise PlanError(f"--plan {text}: expected tpu:SLICE (e.g. tpu:v3-8) or cpu:N (e.g. cpu:8)")


def prepare_jax(topology: Topology) -> bool:
    """Before JAX's backends start: the CPU backend by default (a TPU plan only compiles for the TPU; the
    local libtpu must not try to drive a TPU), with N devices for cpu:N. False when JAX already started
    with fewer devices than needed (the caller reruns in a fresh process)."""
    import jax
    from jax._src import xla_bridge

    want = topology.num_devices if topology.platform == "cpu" else 1
    if not xla_bridge.backends_are_initialized():
        jax.config.update("jax_platforms", "cpu")
        if topology.platform == "cpu":
            jax.config.update("jax_num_cpu_devices", want)
        return True
    return topology.platform != "cpu" or len(jax.devices("cpu")) >= want


def topology_devices(topology: Topology) -> list:
    import jax

    if topology.platform == "cpu":
        return jax.devices("cpu")[:topology.num_devices]
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise PlanError(INSTALL_LIBTPU) from None
    from jax.experimental import topologies

    topo, chip, _ = TPU_SLICES[topology.slice_name]
    with _quiet_stderr():  # libtpu reports at length that this host has no TPU; it needs none to compile
        try:
            desc = topologies.get_topology_desc(platform="tpu", topology_name=topo, chip_config_name=chip)
        except Exception as e:  # noqa: BLE001
            raise PlanError(f"--plan {topology.name}: libtpu could not describe {topo}: {first_line(e)}") from None
    devices = list(desc.devices)
    if len(devices) != topology.num_devices:
        raise PlanError(f"--plan {topology.name}: libtpu gave {len(devices)} devices for {topo}, "
                        f"expected {topology.num_devices}")
    return devices


class _quiet_stderr:
    """Redirect file descriptor 2 (native libraries' logging) to /dev/null for a block."""

    def __enter__(self):
        sys.stderr.flush()
        self.saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)

    def __exit__(self, *exc):
        os.dup2(self.saved, 2)
        os.close(self.saved)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (at most 300 characters), or its type's name."""
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__



def capacity(topology: Topology) -> tuple[float | None, str]:
    """Memory per device of a topology and where the figure comes from (for cpu:N, this host's share)."""
    if topology.platform == "cpu":
        from shortcut.memory import host_available_bytes

        host = host_available_bytes()
        return (None, "unknown") if host is None else (host / topology.num_devices,
                                                       f"host MemAvailable / {topology.num_devices}")
    return topology.device.memory_bytes, topology.device.source


