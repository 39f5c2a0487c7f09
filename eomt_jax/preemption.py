"""Stopping training cleanly on SIGTERM (preemption, scheduler time limits) and SIGINT (Ctrl-C).

Inside `StopSignals`, the first signal only raises a flag: the training loop finishes its step, saves a checkpoint
and exits with `exit_code` (130 for SIGINT, 143 for SIGTERM, the shell's convention); a second signal exits at
once, without saving. Rerunning the same command resumes from the saved step.

With several processes every process must save the same step. SIGTERM is then left to JAX's preemption service
(started by `jax.distributed.initialize`), which tells every process and agrees on the step to stop at
(`jax.experimental.multihost_utils.reached_preemption_sync_point`); SIGINT on one process is passed on to that
service as a SIGTERM to itself.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import jax

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class StopSignals:
    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}
        self._multiprocess = False

    def __enter__(self) -> "StopSignals":
        self._multiprocess = jax.process_count() > 1
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be installed from the main thread
        signals = [signal.SIGINT] if self._multiprocess else [signal.SIGINT, signal.SIGTERM]
        for s in signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            sys.stderr.write(f"\n{name} again: exiting now, without saving\n")
            sys.stderr.flush()
            os._exit(EXIT_CODES.get(signum, 1))
        self.received = signum
        sys.stderr.write(f"\n{name} received: finishing this step and saving a checkpoint (again to exit now)\n")
        sys.stderr.flush()
        if self._multiprocess and signum == signal.SIGINT:
            os.kill(os.getpid(), signal.SIGTERM)

    def should_stop(self, step: int) -> bool:
        """Whether the run stops after `step` (the same answer on every process)."""
        if self._multiprocess:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                if self.received is None:
                    self.received = signal.SIGTERM
                return True
            return False
        return self.received is not None

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.received, 1)

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "none"
