"""GPU figures from NVML (nvidia-ml-py), for status replies; empty where NVML is unavailable."""

from __future__ import annotations

from typing import Any

_handles: dict[str, Any] = {}


def read(pci_bus_id: str) -> dict[str, Any]:
    try:
        import pynvml
    except ImportError:
        return {}
    try:
        handle = _handles.get(pci_bus_id)
        if handle is None:
            pynvml.nvmlInit()
            handle = _handles[pci_bus_id] = pynvml.nvmlDeviceGetHandleByPciBusId(pci_bus_id)
        util = pynvml.nvmlDeviceGetUtilizationRates(handle)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return {
            "utilization_gpu": util.gpu,
            "utilization_memory": util.memory,
            "memory_used": int(memory.used),
            "memory_total": int(memory.total),
            "temperature": pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU),
        }
    except Exception:
        return {}
