"""Per-epoch GPU utilisation, memory and power through NVML (nvidia-ml-py, imported as ``pynvml``).

    stats = GpuStats(device)
    stats.begin()                 # start of the epoch
    ...
    record.update(stats.end())    # {"gpu/util_pct": …, "gpu/power_w": …, …}, or {} without NVML

Utilisation is the mean of NVML's own samples taken during the epoch (the driver keeps a
short history; when it has none, the instantaneous reading). Power is the energy counter's
difference over the epoch's wall time (mean power, not a snapshot), where the GPU has one.
Without NVML (no pynvml, no driver: ``nvmlInit`` raises NVMLError_LibraryNotFound on CPU
machines) every call returns {} and the reason is logged once.
"""

from __future__ import annotations

import logging
import time

import torch

logger = logging.getLogger(__name__)

_nvml = None  # the initialised pynvml module, False when unavailable, None before the first try
_nvml_reason = ""


def nvml():
    """pynvml after ``nvmlInit()``, or None when NVML is unavailable (tried once per process)."""
    global _nvml, _nvml_reason
    if _nvml is None:
        try:
            import pynvml

            pynvml.nvmlInit()
            _nvml = pynvml
        except Exception as exc:  # noqa: BLE001  ImportError, NVMLError_LibraryNotFound, driver errors
            _nvml, _nvml_reason = False, f"{type(exc).__name__}: {exc}"
            logger.info("GPU statistics off (NVML unavailable: %s)", _nvml_reason)
    return _nvml or None


def nvml_unavailable_reason() -> str:
    """Why ``nvml()`` returned None ('' when it did not, or was not asked yet)."""
    return _nvml_reason


def _handle(pynvml, device: torch.device):
    """The NVML handle of a torch CUDA device, by PCI bus id (right under CUDA_VISIBLE_DEVICES)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        p = torch.cuda.get_device_properties(index)
        bus_id = f"{p.pci_domain_id:08x}:{p.pci_bus_id:02x}:{p.pci_device_id:02x}.0"
        return pynvml.nvmlDeviceGetHandleByPciBusId(bus_id.encode())
    except Exception:  # noqa: BLE001  older torch without PCI ids, or an NVML that rejects the form
        return pynvml.nvmlDeviceGetHandleByIndex(index)


class GpuStats:
    """Utilisation, memory and power of one GPU over an interval (an epoch)."""

    def __init__(self, device: torch.device | str | None = None):
        device = torch.device(device) if device is not None else (
            torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        self.device = device
        self.pynvml = nvml() if device.type == "cuda" else None
        self.handle = None
        if self.pynvml is not None:
            try:
                self.handle = _handle(self.pynvml, device)
            except Exception as exc:  # noqa: BLE001
                logger.info("GPU statistics off (no NVML handle for %s: %s)", device, exc)
        self._t0 = self._energy0 = self._stamp0 = None

    @property
    def enabled(self) -> bool:
        return self.handle is not None

    def begin(self) -> None:
        """Start an interval: the time, the energy counter, the sample history mark, torch's peak memory."""
        if not self.enabled:
            return
        self._t0 = time.monotonic()
        self._stamp0 = int(time.time() * 1e6)  # NVML sample timestamps are CPU-epoch microseconds
        self._energy0 = self._call("nvmlDeviceGetTotalEnergyConsumption")  # mJ, Volta and later
        try:
            torch.cuda.reset_peak_memory_stats(self.device)
        except Exception:  # noqa: BLE001  (no CUDA runtime in this process)
            pass

    def end(self) -> dict[str, float]:
        """The interval's figures (keys prefixed ``gpu/``); {} without NVML."""
        if not self.enabled:
            return {}
        nv, out = self.pynvml, {}
        util = self._mean_samples(nv.NVML_GPU_UTILIZATION_SAMPLES)
        mem_util = self._mean_samples(nv.NVML_MEMORY_UTILIZATION_SAMPLES)
        if util is None or mem_util is None:
            rates = self._call("nvmlDeviceGetUtilizationRates")
            if rates is not None:
                util = rates.gpu if util is None else util
                mem_util = rates.memory if mem_util is None else mem_util
        if util is not None:
            out["gpu/util_pct"] = float(util)
        if mem_util is not None:
            out["gpu/mem_bw_util_pct"] = float(mem_util)
        mem = self._call("nvmlDeviceGetMemoryInfo")
        if mem is not None:
            out["gpu/mem_used_gib"] = mem.used / 2**30
            out["gpu/mem_total_gib"] = mem.total / 2**30
        try:
            out["gpu/torch_peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        except Exception:  # noqa: BLE001
            pass
        energy = self._call("nvmlDeviceGetTotalEnergyConsumption")
        seconds = time.monotonic() - self._t0 if self._t0 is not None else 0.0
        if energy is not None and self._energy0 is not None and seconds > 0:
            out["gpu/energy_kj"] = (energy - self._energy0) / 1e6
            out["gpu/power_w"] = (energy - self._energy0) / 1e3 / seconds
        else:
            power = self._call("nvmlDeviceGetPowerUsage")  # mW, now
            if power is not None:
                out["gpu/power_w"] = power / 1e3
        return out

    def _call(self, name: str, *args):
        try:
            return getattr(self.pynvml, name)(self.handle, *args)
        except Exception:  # noqa: BLE001  NotSupported on this GPU: leave the figure out
            return None

    def _mean_samples(self, kind: int) -> float | None:
        """Mean of NVML's buffered samples of `kind` since begin(), or None when there are none."""
        if self._stamp0 is None:
            return None
        got = self._call("nvmlDeviceGetSamples", kind, self._stamp0)
        if not got:
            return None
        _, samples = got
        values = [s.sampleValue.uiVal for s in samples if s.timeStamp >= self._stamp0]
        return sum(values) / len(values) if values else None
