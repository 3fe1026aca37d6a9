"""Catch SIGTERM / SIGINT / SIGUSR1 (and a launcher's preemption signal) and act on them between steps.

A signal only sets a flag; the checkpoint callback saves at the next step boundary, then either hands the
signal to the handler that was there before (submitit's: requeue the SLURM job and exit; or its SIGTERM
bypass: keep training) or stops the run. A second Ctrl-C quits at once.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Callable

log = logging.getLogger(__name__)

_NO_HANDLER = (signal.SIG_DFL, signal.SIG_IGN, None, signal.default_int_handler)


def preempt_signal() -> signal.Signals:
    """The signal submitit (hydra/launcher=slurm) asks SLURM to send before a timeout or preemption."""
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2").upper().removeprefix("SIG"),
                   signal.SIGUSR2)


class SignalCatcher:
    def __init__(self) -> None:
        self.pending: int | None = None
        self.previous: dict[int, Callable | int | None] = {}
        self._mine: dict[int, object] = {}

    def capture(self) -> None:
        """Remember the handlers in place before Lightning adds its own (call before ``fit`` registers them)."""
        sigs = [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1]
        pre = preempt_signal()
        if pre not in sigs and signal.getsignal(pre) not in _NO_HANDLER:
            sigs.append(pre)  # only under a launcher that handles it (submitit)
        self.previous = {s: signal.getsignal(s) for s in sigs}

    def install(self) -> None:
        for s in self.previous:
            signal.signal(s, self._handle)

    def restore(self) -> None:
        for s, h in self.previous.items():
            if signal.getsignal(s) == self._handle:
                signal.signal(s, h if h is not None else signal.SIG_DFL)

    def _handle(self, signum: int, frame) -> None:
        if self.pending is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: quit now, without a checkpoint
        self.pending = signum
        print(f"\n[comol] {signal.Signals(signum).name} received: saving a checkpoint after this step"
              + (" (Ctrl-C again to quit now)" if signum == signal.SIGINT else ""), file=sys.stderr, flush=True)

    def chained_handler(self, signum: int) -> Callable | None:
        """The earlier Python handler for ``signum`` (a launcher's), or None when the run should just stop."""
        prev = self.previous.get(signum)
        return prev if callable(prev) and prev not in _NO_HANDLER else None
