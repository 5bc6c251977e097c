"""DPO and ε-DPO side by side, and the reward–KL frontier of three methods: train.py's runs, several at once.

    python compare.py                                    # DPO (ε = 0) and ε-DPO from the same start and data order
    python compare.py --betas 0.05 0.1 0.2 0.4          # DPO, ε-DPO and ε-DPO with a fixed baseline β, for each β
                                                         # and 3 seeds: the DPO paper's reward–KL frontier; on CPUs
                                                         # as many runs at once as cores (--workers)

Every flag of train.py applies to each run (--lora-r, --max-steps, ...). Each run is a train.py run in a folder of
--output-dir (dpo/, epsilon-dpo/; beta-B/seed-S/METHOD/ with --betas), which python train.py --resume continues;
compare.png, or frontier.json and frontier.png, come from the whole comparison.
"""

import argparse
import contextlib
import json
import os
import pathlib
import signal
import sys

if __name__ == "__main__":  # before the imports below take seconds: Ctrl-C there is one line
    from training import signals

    signals.stop_at_once_on_ctrl_c()

import torch

import train
from training import arguments
from training.arguments import TINY_DATASET, number
from training.errors import ReportedError, run_command
from training.models import init_distributed
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
from training.signals import StopNow, stop_signals

# ----------------------------------------------------------------------------------------------------
# Comparisons: DPO and ε-DPO side by side, and the reward–KL frontier of three methods


METHODS = (
    ("DPO", "dpo", {"epsilon": 0.0}),
    ("ε-DPO", "epsilon-dpo", {}),
    ("ε-DPO, fixed baseline β", "epsilon-dpo-fixed-beta", {"fixed_baseline_beta": True}),
)


def compare(args, given):
    """DPO and ε-DPO from the same start and data order, drawn to compare.png. With --betas, the three METHODS for
    every β and seed: the DPO paper's reward–KL frontier, written to frontier.json and frontier.png."""
    output_dir = pathlib.Path(args.output_dir)
    if args.betas and not (args.gold_reward or pathlib.Path(args.dataset).resolve() == TINY_DATASET):
        raise ReportedError("--betas plots the gold reward against KL: it needs --gold-reward FILE")
    if args.betas and min(args.betas) < args.min_beta:
        raise ReportedError(
            f"--min-beta {args.min_beta} is more than --betas {min(args.betas)}: the floor of the baseline "
            f"β is below each run's start"
        )
    runs = []
    for beta in args.betas or [args.beta]:
        for seed in range(args.seed, args.seed + (args.seeds if args.betas else 1)):
            for label, folder, changes in METHODS if args.betas else METHODS[:2]:
                where = output_dir / f"beta-{beta:g}" / f"seed-{seed}" / folder if args.betas else output_dir / folder
                # The frontier needs each run's end: evaluated at the start and the end, unless --eval-every is given.
                eval_every = sys.maxsize if args.betas and "eval_every" not in given else args.eval_every
                run = {name: value for name, value in vars(args).items() if name not in ("betas", "seeds", "workers")}
                runs.append(
                    (
                        argparse.Namespace(
                            **{
                                **run,
                                **changes,
                                "beta": beta,
                                "seed": seed,
                                "eval_every": eval_every,
                                "output_dir": str(where),
                            }
                        ),
                        label,
                    )
                )
    rank, world_size, device = init_distributed(args.device)
    with claim_output_dir(output_dir, args) if rank == 0 else contextlib.nullcontext():
        if rank == 0:  # compare.png, or frontier.json and .png
            names = FRONTIER_FILES if args.betas else COMPARE_FILES
            check_only_ours_replaced(output_dir, lambda name: name in names)
        frontier_on_cpus = args.betas and world_size == 1 and device.type == "cpu"
        summaries = (
            side_by_side(runs, args.workers or os.cpu_count() or 1)
            if frontier_on_cpus
            else one_after_another(runs, rank)
        )
        if summaries[0] is None:  # not rank 0
            return
        if not args.betas:
            plot_curves(
                {s["label"]: read_metrics(s["args"]["output_dir"]) for s in summaries}, output_dir / "compare.png"
            )
            print_summary(summaries)
            print(f"side by side: {output_dir / 'compare.png'}")
            return
        points = frontier_points(summaries)
        write_atomically(output_dir / "frontier.json", json.dumps(points, indent=2) + "\n")
        plot_frontier(points, output_dir / "frontier.png")
        print_frontier(points)
        print(f"{len(summaries)} runs: {output_dir / 'frontier.json'}, {output_dir / 'frontier.png'}")


def one_after_another(runs, rank):
    """train.train(*run) for every run in turn. A signal stops the run under way (with its checkpoint) and the rest."""
    summaries = []
    try:
        for run in runs:
            summaries.append(train.train(*run))
    except (SystemExit, StopNow):
        if stop_signals.signal is not None and rank == 0:
            print(
                f"the comparison stopped: {len(summaries)} of {len(runs)} runs had finished; the others did not start"
            )
        raise
    return summaries


def side_by_side(runs, workers):
    """train.train(*run) for every run, `workers` at a time, each in a process of one thread, quietly: a model as small
    as tiny_data's gains little from a second thread, and much from a second process. A line per run done.

    Ctrl-C or SIGTERM stops them all within seconds: the runs under way finish their step and write a
    checkpoint (the signal is passed on to them, as a Ctrl-C in a terminal also sends it), and the queued
    runs never start."""
    import concurrent.futures
    import multiprocessing

    others, spawn = set(multiprocessing.active_children()), multiprocessing.get_context("spawn")
    stopping = spawn.Event()  # set: the runs a worker has taken but not begun return at once
    with concurrent.futures.ProcessPoolExecutor(
        min(workers, len(runs)), spawn, initializer=_worker_starts, initargs=(stopping,)
    ) as pool:
        futures = [pool.submit(_quietly_on_one_thread, *run) for run in runs]
        try:
            for done, future in enumerate(concurrent.futures.as_completed(futures), start=1):
                s = future.result()
                print(
                    f"{done}/{len(runs)} {s['label']}, β = {s['args']['beta']}, seed {s['args']['seed']}: gold reward "
                    f"{s['final']['gold_reward']:+.2f}, KL {s['final']['kl']:.2f}, final β {s['final_beta']:.4f} "
                    f"({s['seconds']} s)"
                )
        except StopNow as stopped:
            stopping.set()
            for worker in set(multiprocessing.active_children()) - others:  # idle workers ignore SIGINT
                os.kill(worker.pid, signal.SIGINT)
            pool.shutdown(wait=True, cancel_futures=True)
            results = [
                f.result() if f.done() and not f.cancelled() and f.exception() is None else False for f in futures
            ]
            finished = sum(isinstance(result, dict) for result in results)
            stopped_runs = [
                run[0].output_dir
                for run, f in zip(runs, futures, strict=True)
                if f.done() and not f.cancelled() and f.exception() is not None and our_checkpoints(run[0].output_dir)
            ]
            print(
                f"stopped by signal {stopped.signal}: {finished} of {len(runs)} runs finished, {len(stopped_runs)} "
                "stopped "
                "with a checkpoint (python train.py --resume DIR continues each: "
                f"{', '.join(stopped_runs) or 'none'}), "
                f"{sum(f.cancelled() or result is None for f, result in zip(futures, results, strict=True))} did not "
                "start"
            )
            sys.exit(128 + stopped.signal)
    return [future.result() for future in futures]


def _worker_starts(stopping):
    global _stopping
    _stopping = stopping
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # while idle; train() stops on it


def _quietly_on_one_thread(args, label):
    torch.set_num_threads(1)
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), contextlib.redirect_stderr(devnull):
        with stop_signals:
            return None if _stopping.is_set() else train.train(args, label)


# ----------------------------------------------------------------------------------------------------
# The command line


def parse_args(argv=None):
    """train.py's arguments, and --betas, --seeds and --workers."""
    beta = number(float, 0, high=1e6, what="beta must be in (0, 1e6)")
    extra = [
        (
            "--betas",
            dict(
                type=beta,
                nargs="+",
                default=None,
                help="the reward–KL frontier of DPO, ε-DPO and ε-DPO with a fixed baseline β over these β",
            ),
        ),
        (
            "--seeds",
            dict(
                type=number(int, 1, low_open=False, what="must be >= 1"),
                default=3,
                help="with --betas: seeds per β (--seed, --seed + 1, ...)",
            ),
        ),
        (
            "--workers",
            dict(
                type=number(int, 1, low_open=False, what="must be >= 1"),
                default=None,
                help="with --betas on CPUs: runs that train at once, each in a process of its own (0.5 GB "
                "of memory each on tiny_data); None: one per core",
            ),
        ),
    ]
    return arguments.parse_args(argv, extra=extra, description=__doc__)


def main(argv=None):
    args, given = parse_args(argv)
    run_command(lambda: compare(args, given))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
