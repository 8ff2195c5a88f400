"""PerformanceMonitor: throughput, step time split into data wait and compute, peak memory."""

from __future__ import annotations

import resource
import sys
import time
from typing import Any

import torch


class PerformanceMonitor:
    """Measure throughput over log intervals, from host clocks only.

    The loop calls `interval(...)` when it logs, right after reading the loss (a device sync),
    so times cover finished device work without adding a sync of their own.

    Example:
        >>> monitor = PerformanceMonitor()
        >>> monitor.start()
        >>> stats = monitor.interval(steps=10, samples=320, data_seconds=0.0)
        >>> sorted(stats)[:4]
        ['compute_time_ms', 'data_time_ms', 'peak_rss_mb', 'samples_per_sec']
    """

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device or torch.device("cpu")
        self.total_steps = 0
        self.total_samples = 0
        self.total_seconds = 0.0
        self.total_data_seconds = 0.0
        self._mark = time.perf_counter()

    def start(self) -> None:
        self._mark = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def interval(self, steps: int, samples: int, data_seconds: float) -> dict[str, float]:
        """Close an interval of `steps` optimizer updates over `samples` samples."""
        now = time.perf_counter()
        seconds = max(now - self._mark, 1e-9)
        self._mark = now
        self.total_steps += steps
        self.total_samples += samples
        self.total_seconds += seconds
        self.total_data_seconds += data_seconds
        stats = {
            "samples_per_sec": samples / seconds,
            "step_time_ms": 1000.0 * seconds / max(steps, 1),
            "data_time_ms": 1000.0 * data_seconds / max(steps, 1),
            "compute_time_ms": 1000.0 * max(seconds - data_seconds, 0.0) / max(steps, 1),
            "seconds": seconds,
        }
        stats.update(self.memory())
        return stats

    def memory(self) -> dict[str, float]:
        """Peak process memory (RSS) and, on CUDA, peak allocated and reserved memory, in MiB."""
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # ru_maxrss is KiB on Linux, bytes on macOS.
        divisor = 1024 * 1024 if sys.platform == "darwin" else 1024
        out = {"peak_rss_mb": peak_rss / divisor}
        if self.device.type == "cuda":
            mib = 2**20
            out["cuda_allocated_mb"] = torch.cuda.memory_allocated(self.device) / mib
            out["cuda_reserved_mb"] = torch.cuda.memory_reserved(self.device) / mib
            out["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated(self.device) / mib
            out["cuda_peak_reserved_mb"] = torch.cuda.max_memory_reserved(self.device) / mib
        elif self.device.type == "mps":
            out["mps_allocated_mb"] = torch.mps.current_allocated_memory() / 2**20
        return out

    def summary(self) -> dict[str, Any]:
        """Totals over the run: updates, samples, seconds, mean throughput, peak memory."""
        seconds = max(self.total_seconds, 1e-9)
        out: dict[str, Any] = {
            "steps": self.total_steps,
            "samples": self.total_samples,
            "train_seconds": self.total_seconds,
            "samples_per_sec": self.total_samples / seconds,
            "data_wait_fraction": self.total_data_seconds / seconds,
        }
        out.update(self.memory())
        return out
