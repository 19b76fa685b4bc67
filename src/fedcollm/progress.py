"""Progress of a long pass (training, scoring): a tqdm bar on a terminal, lines elsewhere.

A bar redraws one line with carriage returns. Where the output is not a terminal, a simulated
client's (a Ray actor's, forwarded line by line to the driver), an experiment job's log, a
SuperNode's service log, that shows nothing until the bar ends, or one ever-growing line. There
the same calls print a line every PROGRESS_SECONDS instead:

    [fedcollm] client 2 round 1: step 120 of 244 (49%), 63 s, ~65 s left, loss=1.234
"""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm

PROGRESS_EVERY = 10  # steps between loss readings for the display (each one waits for the device)
PROGRESS_SECONDS = 30.0  # between two lines where there is no terminal: a few per minute of a pass


class LineProgress:
    """tqdm's update / set_postfix / close, as a line every PROGRESS_SECONDS (none for a pass
    shorter than that: its caller's own summary line says enough)."""

    def __init__(self, total: int, desc: str, initial: int = 0, unit: str = "step"):
        self.total, self.desc, self.n, self.initial, self.unit, self.postfix = total, desc, initial, initial, unit, ""
        self.start = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= PROGRESS_SECONDS and self.n > self.initial:  # no pace before the first step
            self.last = now
            spent = now - self.start  # at this pass's pace (steps done before a resume excluded)
            left = spent / (self.n - self.initial) * max(self.total - self.n, 0)
            print(f"[fedcollm] {self.desc}: {self.unit} {self.n} of {self.total} ({100 * self.n // max(self.total, 1)}%), "
                  f"{spent:.0f} s, ~{left:.0f} s left{self.postfix}", flush=True)

    def set_postfix(self, **values) -> None:
        self.postfix = "".join(f", {k}={v}" for k, v in values.items())

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, enabled: bool, initial: int = 0, unit: str = "step", leave: bool = False):
    """A tqdm bar where stderr is a terminal (`leave`: it stays once done), LineProgress
    elsewhere, a disabled bar if not enabled."""
    if enabled and not sys.stderr.isatty():
        return LineProgress(total, desc, initial, unit)
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled, leave=leave)
