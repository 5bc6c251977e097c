"""Ctrl-C and SIGTERM: a run stops after the optimizer step under way, with a checkpoint; before training, at once."""

import contextlib
import os
import signal
import sys
import time


def signal_name(number):
    """How a stop line names a signal: "signal 15 (SIGTERM)"."""
    try:
        return f"signal {number} ({signal.Signals(number).name})"
    except ValueError:
        return f"signal {number}"


def stop_at_once_on_ctrl_c():
    """Before stop_signals takes over (while torch and transformers import, seconds): Ctrl-C exits with one line
    and the signal's status, not a KeyboardInterrupt's traceback from inside an import."""

    def stop(number, frame):
        if os.environ.get("RANK", "0") == "0":  # under torchrun, once in all
            print(
                f"stopped by {signal_name(number)} before training started; nothing was written to resume from",
                file=sys.stderr,
            )
        sys.exit(128 + number)

    signal.signal(signal.SIGINT, stop)


class StopNow(KeyboardInterrupt):
    """The first SIGINT or SIGTERM before training: there is nothing to save, so the run stops at once."""

    def __init__(self, number):
        super().__init__(number)
        self.signal = number


class StopAtOnce(KeyboardInterrupt):
    """A signal more than WINDOW seconds after the first: the run stops at once, whatever it is doing."""


class StopOnSignal:
    """SIGINT and SIGTERM while active (`with stop_signals:`, nestable). The first signal stops the run:
    before training at once (StopNow), during training (inside `with stop_signals.training():`) after the
    step under way, with a checkpoint: there it only sets .signal. Under torchrun one Ctrl-C reaches each
    process two or three times within milliseconds (the terminal's SIGINT to the process group, then
    torchrun's forwarded SIGINT and SIGTERM): signals within WINDOW seconds of the first are that same stop.
    One sent later raises StopAtOnce (a KeyboardInterrupt): it stops at once."""

    WINDOW = 2.0

    def __init__(self):
        self.depth, self.signal, self.first_at, self.training_now = 0, None, None, False

    def __enter__(self):
        if self.depth == 0:
            self.signal = None
            self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        self.depth += 1
        return self

    def __exit__(self, *exc):
        self.depth -= 1
        if self.depth == 0:
            for number, handler in self.previous.items():
                signal.signal(number, handler)

    @contextlib.contextmanager
    def training(self):
        with self:
            self.training_now = True
            try:
                yield self
            finally:
                self.training_now = False

    def _handle(self, number, frame):
        now = time.monotonic()
        if self.signal is None:
            self.signal, self.first_at = number, now
            if not self.training_now:
                raise StopNow(number)
        elif now - self.first_at >= self.WINDOW:
            raise StopAtOnce


stop_signals = StopOnSignal()  # one per process: main() holds it while it runs
