"""A dependency-free progress bar (tqdm is used when installed)."""
from __future__ import annotations

import sys
import time


class Progress:
    """Counts work units; shows ``unit`` throughput as ``units * unit_scale`` per second."""

    def __init__(self, total: float, enabled: bool = True, desc: str = "", unit: str = "it",
                 unit_scale: float = 1.0, stream=None):
        self.total, self.enabled, self.desc = total, enabled and total > 0, desc
        self.unit, self.scale = unit, unit_scale
        self.stream = stream or sys.stderr
        self.n = 0.0
        self.t0 = time.time()
        self._last = 0.0
        self._tqdm = None
        if self.enabled:
            try:
                from tqdm import tqdm

                self._tqdm = tqdm(total=round(total * unit_scale), desc=desc, unit=unit,
                                  file=self.stream, dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, n: float) -> None:
        if not self.enabled:
            return
        self.n += n
        if self._tqdm is not None:
            self._tqdm.update(round(self.n * self.scale) - self._tqdm.n)
            return
        now = time.time()
        if now - self._last >= 0.5 or self.n >= self.total:
            self._last = now
            self._draw(now)

    def _draw(self, now: float, end: str = "") -> None:
        done = self.n * self.scale
        total = self.total * self.scale
        el = max(now - self.t0, 1e-9)
        rate = done / el
        eta = (total - done) / rate if rate > 0 else float("inf")
        pct = 100.0 * self.n / self.total
        line = (f"{self.desc}: {pct:5.1f}% {done:,.0f}/{total:,.0f} {self.unit} "
                f"[{el:6.1f}s, {rate:,.0f} {self.unit}/s, eta {eta:5.0f}s]")
        tty = getattr(self.stream, "isatty", lambda: False)()
        self.stream.write(("\r" + line + end) if tty else (line + "\n"))
        self.stream.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self._tqdm is not None:
            self._tqdm.close()
            return
        tty = getattr(self.stream, "isatty", lambda: False)()
        self._draw(time.time(), end="\n" if tty else "")
        self.enabled = False
