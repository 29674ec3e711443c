"""GPU and host sampling: NVML (``nvidia-ml-py``, imported as ``pynvml``) for each GPU's memory,
utilisation, temperature and power; ``psutil`` for CPU and RAM.

On a machine with no GPU (no NVIDIA driver, or NVML cannot start) it says so once and carries on
with host numbers only. A GPU that fails one query (a field it does not support, such as power on
some boards) just lacks that field.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import psutil

log = logging.getLogger("bridge.sampler")


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class Sampler:
    """Call :meth:`sample` at a fixed interval (from a thread: NVML calls block briefly)."""

    def __init__(self) -> None:
        self.nvml: Any = None
        self.no_gpu_reason = ""
        self.handles: list[Any] = []
        try:
            import pynvml

            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            self.nvml = pynvml
            if not self.handles:
                self.no_gpu_reason = "NVML found no GPU"
        except Exception as exc:  # pynvml raises NVMLError_* (LibraryNotFound, DriverNotLoaded, ...)
            self.no_gpu_reason = f"NVML unavailable: {exc or type(exc).__name__}"
        if self.no_gpu_reason:
            log.info("no GPU: %s; sampling CPU and RAM only", self.no_gpu_reason)
        psutil.cpu_percent(None)  # the first call only starts the measurement

    def facts(self) -> dict[str, Any]:
        """What does not change: GPU names, driver and CUDA versions (empty without a GPU)."""
        if self.nvml is None:
            return {"gpus": [], "no_gpu": self.no_gpu_reason}
        nv = self.nvml
        out: dict[str, Any] = {"gpus": []}
        for h in self.handles:
            try:
                out["gpus"].append(_text(nv.nvmlDeviceGetName(h)))
            except Exception:
                out["gpus"].append("?")
        try:
            out["driver"] = _text(nv.nvmlSystemGetDriverVersion())
        except Exception:
            pass
        try:
            cuda = int(nv.nvmlSystemGetCudaDriverVersion_v2())
            out["cuda"] = f"{cuda // 1000}.{cuda % 1000 // 10}"
        except Exception:
            pass
        return out

    def sample(self) -> dict[str, Any]:
        """One ``sample`` record (the STATS ``sample`` shape, docs/protocol.md §12a)."""
        vm = psutil.virtual_memory()
        rec: dict[str, Any] = {
            "kind": "sample",
            "ts": round(time.time(), 3),
            "gpus": self._gpus(),
            "cpu_percent": psutil.cpu_percent(None),
            "ram_used_bytes": int(vm.total - vm.available),
            "ram_total_bytes": int(vm.total),
        }
        return rec

    def _gpus(self) -> list[dict[str, Any]]:
        if self.nvml is None:
            return []
        nv = self.nvml
        gpus = []
        for i, h in enumerate(self.handles):
            gpu: dict[str, Any] = {"index": i}
            try:
                gpu["name"] = _text(nv.nvmlDeviceGetName(h))
            except Exception:
                pass
            try:
                mem = nv.nvmlDeviceGetMemoryInfo(h)
                gpu["memory_used_bytes"] = int(mem.used)
                gpu["memory_total_bytes"] = int(mem.total)
            except Exception:
                pass
            try:
                gpu["utilization_percent"] = float(nv.nvmlDeviceGetUtilizationRates(h).gpu)
            except Exception:
                pass
            try:
                gpu["temperature_c"] = float(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU))
            except Exception:
                pass
            try:
                gpu["power_w"] = nv.nvmlDeviceGetPowerUsage(h) / 1000.0
            except Exception:
                pass
            gpus.append(gpu)
        return gpus

    def close(self) -> None:
        if self.nvml is not None:
            try:
                self.nvml.nvmlShutdown()
            except Exception:
                pass
            self.nvml = None


def main() -> None:
    """``python -m bridge.node.sampler``: print the facts and one sample (a quick check on a GPU box)."""
    import json

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sampler = Sampler()
    print(json.dumps(sampler.facts()))
    time.sleep(0.2)  # psutil's CPU figure needs an interval between two calls
    print(json.dumps(sampler.sample()))
    sampler.close()


if __name__ == "__main__":
    main()
