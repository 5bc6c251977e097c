"""What a run says when it cannot go on, and how a script ends: in one line, never a traceback.

ReportedError   a problem with the user's data, paths or run, said in one line
note            a line said once, by the first process alone
run_command     a script's body, with every refusal in one line, Ctrl-C and SIGTERM caught
"""

import os
import sys

from training.signals import StopNow, signal_name, stop_signals


class ReportedError(Exception):
    """A problem with the user's data, paths or run: the scripts report it in one line, without a traceback."""


def note(text):
    """Print "note: text" once: under torchrun every process runs the same code, and the first alone says it."""
    if os.environ.get("RANK", "0") == "0":
        print(f"note: {text}")


def run_command(function):
    """function(), with every refusal in one line, Ctrl-C and SIGTERM caught, and the process group closed."""
    import torch.distributed as dist

    first_rank = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 alone explains
    try:
        with stop_signals:  # Ctrl-C and SIGTERM, from here to the end
            try:
                function()
            finally:
                if dist.is_available() and dist.is_initialized():
                    dist.destroy_process_group()
    except (ReportedError, OSError) as error:  # OSError: a full disk, say
        sys.exit(f"error: {error}" if first_rank else 1)
    except StopNow as stopped:
        if first_rank:
            why = f"stopped by {signal_name(stopped.signal)} before training started"
            print(f"{why}; nothing was written to resume from", file=sys.stderr)
        sys.exit(128 + stopped.signal)
    except KeyboardInterrupt:
        sys.exit("error: stopped at once by a second signal; the last checkpoint is as it was")
