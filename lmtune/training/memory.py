"""Peak memory during a block: CUDA max allocated on a GPU, else the process's peak RSS sampled by a
thread (ru_maxrss is a whole-process high-water mark and would carry over from earlier runs)."""
from __future__ import annotations

import threading

import psutil
import torch


class PeakMemory:
    def __init__(self, interval: float = 0.05):
        self.interval, self.peak_mb, self.start_mb, self._stop = interval, 0.0, 0.0, threading.Event()

    def __enter__(self) -> PeakMemory:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            return self
        proc = psutil.Process()
        self.start_mb = proc.memory_info().rss / 2**20

        def sample() -> None:
            while not self._stop.is_set():
                self.peak_mb = max(self.peak_mb, proc.memory_info().rss / 2**20)
                self._stop.wait(self.interval)
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if torch.cuda.is_available():
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
            return
        self._stop.set()
        self._thread.join()
