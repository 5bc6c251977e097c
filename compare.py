"""DPO and ε-DPO side by side, and the reward–KL frontier of three methods: a set of train.py runs.

    python compare.py                                    # DPO (ε = 0) and ε-DPO from the same start and data order
    python compare.py --betas 0.05 0.1 0.2 0.4          # DPO, ε-DPO and ε-DPO with a fixed baseline β, for each β
                                                         # and 3 seeds: the DPO paper's reward–KL frontier; on CPUs
                                                         # as many runs at once as cores (--workers)
    python compare.py --resume out                       # a stopped comparison goes on, each run from its checkpoint;
                                                         # a finished one is drawn again, training nothing

Every flag of train.py applies to each run (--lora-r, --max-steps, ...). Each run is `python train.py` with its own
arguments in a folder of --output-dir (dpo/, epsilon-dpo/; beta-B/seed-S/METHOD/ with --betas), --workers of them at
once; comparison.json keeps the comparison's arguments, from which --resume plans the same runs. Ctrl-C or SIGTERM
reaches every run under way, and each stops with a checkpoint. compare.png, or frontier.json and frontier.png, come
from the whole comparison.
"""

import codecs
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

if __name__ == "__main__":  # before the imports below take seconds: Ctrl-C there is one line
    from training import signals

    signals.stop_at_once_on_ctrl_c()

from training import arguments
from training.arguments import TINY_DATASET
from training.checkpoints import RESUMABLE, RUNS_CODE, as_command_line, run_is_saved
from training.errors import ReportedError, note, run_command
from training.output_folder import (
    COMPARE_FILES,
    FRONTIER_FILES,
    check_only_ours_replaced,
    claim_output_dir,
    our_checkpoints,
    read_metrics,
    write_atomically,
)
from training.reports import frontier_points, plot_curves, plot_frontier, print_frontier, print_summary
from training.signals import signal_name, stop_signals

TRAIN = pathlib.Path(__file__).resolve().parent / "train.py"  # each run: python train.py ARGUMENTS
PLAN = "comparison.json"  # the comparison's arguments, in its folder: what --resume plans its runs from
METHODS = (
    ("DPO", "dpo", {"epsilon": 0.0}),
    ("ε-DPO", "epsilon-dpo", {}),
    ("ε-DPO, fixed baseline β", "epsilon-dpo-fixed-beta", {"fixed_baseline_beta": True}),
)
COMPARE_FLAGS = ("betas", "seeds", "workers")  # compare.py's own; every other flag is train.py's

# ----------------------------------------------------------------------------------------------------
# A comparison: its runs planned from its arguments, run, and drawn


def plan(args, given, output_dir):
    """The comparison's runs: [{"label", "folder" (in output_dir), "arguments" (train.py's command line)}]. Every
    run takes the comparison's train.py flags; DPO sets ε = 0, the fixed-β method --fixed-baseline-beta, and a
    frontier sets each run's β and seed (and evaluates at the start and the end unless --eval-every is given)."""
    defaults = vars(arguments.parse_args([])[0])
    runs = []
    for beta in args.betas or [args.beta]:
        for seed in range(args.seed, args.seed + (args.seeds if args.betas else 1)):
            for label, method, changes in METHODS if args.betas else METHODS[:2]:
                folder = output_dir / f"beta-{beta:g}" / f"seed-{seed}" / method if args.betas else output_dir / method
                values = {
                    **{name: value for name, value in vars(args).items() if name not in COMPARE_FLAGS},
                    **changes,
                    "beta": beta,
                    "seed": seed,
                    "output_dir": str(folder),
                    "resume": None,
                }
                if args.betas and "eval_every" not in given:
                    values["eval_every"] = sys.maxsize
                runs.append({"label": label, "folder": folder, "arguments": as_command_line(values, defaults)})
    return runs


def compare(args, given):
    """Train the comparison's runs (or, with --resume, go on with them), then draw it: compare.png, or with --betas
    frontier.json and frontier.png."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ReportedError(
            "compare.py starts its runs itself (python train.py each): run it with python, not torchrun"
        )
    output_dir = pathlib.Path(args.resume or args.output_dir)
    if args.resume:
        args, given, runs = resumed_comparison(args, given, output_dir)
    else:
        runs = [{**run, "command": run["arguments"]} for run in plan(args, given, output_dir)]
    if args.betas and not (args.gold_reward or pathlib.Path(args.dataset).resolve() == TINY_DATASET):
        raise ReportedError("--betas plots the gold reward against KL: it needs --gold-reward FILE")
    if args.betas and min(args.betas) < args.min_beta:
        raise ReportedError(
            f"--min-beta {args.min_beta} is more than --betas {min(args.betas)}: the floor of the baseline "
            f"β would be above a run's start"
        )
    workers = args.workers or (os.cpu_count() or 1 if args.betas and _on_cpus(args.device) else 1)
    with claim_output_dir(output_dir, args):
        names = FRONTIER_FILES if args.betas else COMPARE_FILES
        check_only_ours_replaced(output_dir, lambda name: name in names)
        if not args.resume:
            saved = {name: getattr(args, name) for name in sorted(given - RUNS_CODE - {"output_dir", "overwrite"})}
            write_atomically(output_dir / PLAN, json.dumps({"arguments": saved}, indent=2) + "\n")
        run_all(runs, workers, quiet=bool(args.betas) or workers > 1, output_dir=output_dir)
        draw(args, runs, output_dir)


def resumed_comparison(args, given, output_dir):
    """(the comparison's arguments, the names given, its runs, each with the command that goes on with it) for
    compare.py --resume DIR. Its arguments are comparison.json's, parsed by the command line's own parser: a run
    stopped with a checkpoint goes on with train.py --resume, one that did not start starts, one that finished is
    left as it is (or, with a larger --max-steps, goes on). Flags given now may change what train.py --resume may
    change, and --workers; --gold-reward and --trust-remote-code run code, so they apply only when given now."""
    allowed = RESUMABLE | RUNS_CODE | {"resume", "workers"}
    for name in sorted(given - allowed):
        if name != "output_dir" or pathlib.Path(args.output_dir).resolve() != output_dir.resolve():
            raise ReportedError(
                f"--resume {output_dir}: --{name.replace('_', '-')} given; a resumed comparison keeps its arguments "
                f"and may change only {', '.join('--' + n.replace('_', '-') for n in sorted(allowed - {'resume'}))}"
            )
    try:
        saved = json.loads((output_dir / PLAN).read_text())["arguments"]
        command_line = _as_flags({name: value for name, value in saved.items() if name not in RUNS_CODE})
        resumed, resumed_given = parse_args(command_line, report=True)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ReportedError) as error:
        why = "it has none" if isinstance(error, FileNotFoundError) else f"{type(error).__name__}: {error}"
        raise ReportedError(f"--resume {output_dir}: no comparison of compare.py to resume ({PLAN}: {why})") from None
    for name in sorted(set(saved) & RUNS_CODE - given):
        note(f"the comparison had --{name.replace('_', '-')}; it runs code, so it applies only when given again")
    for name in given & (RESUMABLE | RUNS_CODE | {"workers"}):
        setattr(resumed, name, getattr(args, name))
    resumed.resume, resumed.overwrite = str(output_dir), False
    runs = plan(resumed, resumed_given | (given & RESUMABLE), output_dir)
    again = as_command_line(
        {name: getattr(args, name) for name in given & (RESUMABLE | RUNS_CODE)},
        dict.fromkeys(RESUMABLE | RUNS_CODE),
    )
    for run in runs:
        folder, steps = run["folder"], _finished(run["folder"])
        if steps and not ("max_steps" in given and args.max_steps > steps):
            run["command"] = None  # nothing to train
        elif steps or our_checkpoints(folder):
            run["command"] = ["--resume", str(folder), *again]
        else:  # stopped before its first checkpoint, or never started: from the start (its own files replaced)
            run["command"] = run["arguments"] + ["--overwrite"] * (folder.is_dir() and any(folder.iterdir()))
    return resumed, resumed_given, runs


def _finished(folder):
    """The steps of the run in folder if it finished (its final save complete), else 0."""
    try:
        steps = json.loads((folder / "summary.json").read_text())["steps"]
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    return steps if isinstance(steps, int) and run_is_saved(folder, steps) else 0


def _as_flags(values):
    """A command line giving every one of values (name: value), as parse_args takes it."""
    return as_command_line(values, {name: object() for name in values})


def _on_cpus(device):
    from training.models import pick_device

    return pick_device(device).type == "cpu"


def draw(args, runs, output_dir):
    """compare.png and the side-by-side table, or frontier.json, frontier.png and the frontier's table, from the
    runs' summary.json."""
    summaries = []
    for run in runs:
        try:
            summary = json.loads((run["folder"] / "summary.json").read_text())
            summary["args"]["output_dir"] = str(run["folder"])
            summaries.append({**summary, "label": run["label"]})
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ReportedError(f"{run['folder']}: its summary.json does not read ({error})") from None
    try:
        if not args.betas:
            plot_curves(
                {s["label"]: read_metrics(s["args"]["output_dir"]) for s in summaries}, output_dir / "compare.png"
            )
            print_summary(summaries)
            print(f"side by side: {output_dir / 'compare.png'}")
            return
        points = frontier_points(summaries)
    except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError) as error:
        raise ReportedError(f"{output_dir}: a run's summary.json lacks what train.py writes ({error!r})") from None
    write_atomically(output_dir / "frontier.json", json.dumps(points, indent=2) + "\n")
    plot_frontier(points, output_dir / "frontier.png")
    print_frontier(points)
    print(f"{len(summaries)} runs: {output_dir / 'frontier.json'}, {output_dir / 'frontier.png'}")


# ----------------------------------------------------------------------------------------------------
# Running the runs: python train.py each, `workers` at a time; a signal reaches them all


class Run:
    """python train.py ARGUMENTS in a process of its own. quiet: what it prints is kept (the last of it says why
    it failed); otherwise its output is the terminal's, stderr passed on as it comes and its end kept too."""

    def __init__(self, arguments, environment, quiet):
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [sys.executable, str(TRAIN), *arguments],
            env=environment,
            stdout=self.log if quiet else None,
            stderr=subprocess.STDOUT if quiet else subprocess.PIPE,
        )
        self.copier = None
        if not quiet:  # stderr (tqdm's bar, an error) to ours, and to the log
            self.copier = threading.Thread(target=self._pass_on, args=(self.process.stderr,), daemon=True)
            self.copier.start()

    def _pass_on(self, stream):
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        for chunk in iter(lambda: os.read(stream.fileno(), 4096), b""):
            self.log.write(chunk)
            sys.stderr.write(decoder.decode(chunk))
            sys.stderr.flush()

    def poll(self):
        return self.process.poll()

    def send_signal(self, number):
        if self.process.poll() is None:
            self.process.send_signal(number)

    def wait(self, timeout=None):
        return self.process.wait(timeout)

    def kill(self):
        self.process.kill()

    def last_line(self):
        """The last line it printed (why it failed)."""
        if self.copier:
            self.copier.join(timeout=5)
        self.log.seek(max(0, self.log.seek(0, os.SEEK_END) - 4096))
        lines = self.log.read().decode("utf-8", "replace").replace("\r", "\n").splitlines()
        return next((line for line in reversed(lines) if line.strip()), "")


def start_run(arguments, environment, quiet):
    """A run of train.py under way (Run); a test may put another in its place."""
    return Run(arguments, environment, quiet)


def run_all(runs, workers, quiet, output_dir):
    """Each run's command (run["command"]; a run that has none is done already), `workers` at a time, each its own
    process (TOKENIZERS_PARALLELISM off; with several at once, one thread each unless OMP_NUM_THREADS says).

    The first Ctrl-C or SIGTERM (a terminal's Ctrl-C reaches the runs itself; a SIGTERM to this process alone is
    passed on) stops every run under way with its checkpoint, and starts none of the others; then it says what
    stopped and exits with the signal's status. A run that fails stops the others the same way."""
    environment = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if workers > 1:
        environment.setdefault("OMP_NUM_THREADS", "1")
    queue = [run for run in runs if run["command"] is not None]
    running, done, failed, started_at, passed_on = {}, 0, None, {}, False
    with stop_signals.training() as stop:  # a signal is noted here, not raised: it is passed on
        try:
            while running or (queue and stop.signal is None and failed is None):  # stopped: none starts
                while queue and len(running) < workers and stop.signal is None and failed is None:
                    run = queue.pop(0)
                    running[id(run)] = (run, start_run(run["command"], environment, quiet))
                    started_at[id(run)] = time.time()
                for key, (run, process) in list(running.items()):
                    if process.poll() is None:
                        continue
                    del running[key]
                    run["status"] = process.poll()
                    if run["status"] == 0:
                        done += 1
                        if quiet:
                            _say_done(run, done, len(runs), time.time() - started_at[key])
                    elif failed is None and stop.signal is None and not 128 < run["status"] < 160:
                        failed = (run, process.last_line() or f"exit status {run['status']}")
                        for _, other in running.values():  # they stop with a checkpoint, as on Ctrl-C
                            other.send_signal(signal.SIGTERM)
                if stop.signal is not None and not passed_on:
                    passed_on = True
                    for _, process in running.values():
                        process.send_signal(stop.signal)
                time.sleep(0.05)
        finally:  # leaving early (a second signal): the runs are told to stop, and waited for
            for _, process in running.values():
                process.send_signal(signal.SIGINT)
            for _, process in running.values():
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()
        if failed:
            run, line = failed
            raise ReportedError(
                f"the run in {run['folder']} failed: {line.removeprefix('error: ')}; "
                f"{_what_stopped(runs)}: python compare.py --resume {output_dir} goes on"
            )
        if stop.signal is not None:
            print(
                f"stopped by {signal_name(stop.signal)}: {_what_stopped(runs)}; "
                f"python compare.py --resume {output_dir} goes on"
            )
            sys.exit(128 + stop.signal)


def _what_stopped(runs):
    """'K of N runs finished, M stopped with a checkpoint, L did not start'."""
    finished = sum(run["command"] is None or run.get("status") == 0 for run in runs)
    stopped = sum(run.get("status") not in (None, 0) and bool(our_checkpoints(run["folder"])) for run in runs)
    return (
        f"{finished} of {len(runs)} runs finished, {stopped} stopped with a checkpoint, "
        f"{len(runs) - finished - stopped} did not start"
    )


def _say_done(run, done, total, seconds):
    try:
        s = json.loads((run["folder"] / "summary.json").read_text())
        print(
            f"{done}/{total} {run['label']}, β = {s['args']['beta']}, seed {s['args']['seed']}: gold reward "
            f"{s['final']['gold_reward']:+.2f}, KL {s['final']['kl']:.2f}, final β {s['final_beta']:.4f} "
            f"({seconds:.1f} s)"
        )
    except (OSError, ValueError, KeyError, TypeError):
        print(f"{done}/{total} {run['label']}: {run['folder']} ({seconds:.1f} s)")


# ----------------------------------------------------------------------------------------------------
# The command line


@dataclass
class ComparisonConfig(arguments.RunConfig):
    """train.py's settings, which every run of the comparison takes, and the comparison's own."""

    betas: list[float] | None = arguments.flag(
        None,
        "the reward–KL frontier of DPO, ε-DPO and ε-DPO with a fixed baseline β over these β",
        type=arguments.BETA,
        nargs="+",
    )
    seeds: int = arguments.flag(3, "with --betas: seeds per β (--seed, --seed + 1, ...)", type=arguments.COUNT)
    workers: int | None = arguments.flag(
        None,
        "runs that train at once, each a process of its own (0.5 GB of memory each on tiny_data); None: with --betas "
        "on CPUs one per core, else 1",
        type=arguments.COUNT,
    )


def parse_args(argv=None, report=False):
    """(a ComparisonConfig, the names of the flags given): train.py's flags, and --betas, --seeds and --workers."""
    return arguments.parse_args(argv, report=report, config=ComparisonConfig, description=__doc__)


def main(argv=None):
    args, given = parse_args(argv)
    run_command(lambda: compare(args, given))


if __name__ == "__main__":
    main()
