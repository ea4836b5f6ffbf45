"""Progress: a tqdm bar on a terminal, a plain line every ~10% otherwise (logs, CI)."""
from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm


class Progress:
    def __init__(self, total: int, mode: str = "auto", desc: str = "", start: int = 0, enabled: bool = True):
        self.total, self.desc, self.last_line, self.t0 = total, desc, start, time.perf_counter()
        if not enabled or mode == "none":
            self.mode = "none"
        elif mode == "auto":
            self.mode = "bar" if sys.stderr.isatty() else "lines"
        else:
            self.mode = mode
        self.bar = tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True, leave=False) if self.mode == "bar" else None

    def update(self, n: int, **info: float) -> None:
        if self.bar is not None:
            self.bar.n = n
            self.bar.set_postfix({k: f"{v:.4f}" for k, v in info.items()}, refresh=True)
        elif self.mode == "lines" and (n == self.total or n - self.last_line >= max(1, self.total // 10)):
            self.last_line = n
            extra = "".join(f"  {k} {v:.4f}" for k, v in info.items())
            print(f"{self.desc} {n}/{self.total}{extra}  [{time.perf_counter() - self.t0:.1f}s]", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
