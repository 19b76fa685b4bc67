"""Crash injection for the kill-and-resume tests: SIGKILL this process at a named point.

FEDCOLLM_TEST_KILL_AT="POINT:ROUND" (POINT = kd | checkpoint | outputs) kills the server process
at the start of that round's KD, after writing that round's checkpoint file but before renaming
it into place, or after the run's last round (ROUND) but before its outputs are written;
"pass:EPOCH" kills a training pass (`train.sft` with a resume file) once that epoch's state is
saved. Unset (always, outside tests), it does nothing.
"""

from __future__ import annotations

import os
import signal

ENV = "FEDCOLLM_TEST_KILL_AT"


def maybe_kill(point: str, round_: int) -> None:
    if os.environ.get(ENV) == f"{point}:{round_}":
        os.kill(os.getpid(), signal.SIGKILL)
