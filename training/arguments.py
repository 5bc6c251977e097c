"""train.py's command line: every flag with its default and range, in one place, checked when it is parsed.

compare.py adds its own flags (extra); a resumed run parses its checkpoint's saved arguments again (report=True).
"""

import argparse
import math
import os
import pathlib

from training.errors import ReportedError

ROOT = pathlib.Path(__file__).resolve().parent.parent  # the repository: tiny_data/ is the demo's default
TINY_MODEL, TINY_DATASET, TINY_GOLD_REWARD = (
    ROOT / "tiny_data/model",
    ROOT / "tiny_data/data",
    ROOT / "tiny_data/gold_reward.py",
)
MAX_BETA = 1e6  # --beta is below it, and the baseline β never passes it (ε near 1)
MIN_BETA = 1.2e-38  # epsdpo.BETA_RANGE[0], the least β the loss takes (β̃ is float32); BaselineBeta never goes below


def number(kind, low=None, low_open=True, high=None, what=""):
    """An argparse type: a number in a range, rejected with a message when the arguments are parsed."""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        too_low = low is not None and (value <= low if low_open else value < low)
        if not math.isfinite(value) or too_low or (high is not None and value >= high):
            raise argparse.ArgumentTypeError(f"{value} is out of range: {what}")
        return value

    return parse


def _path(text):
    """An argparse type: a local path, ~ expanded, made absolute (a resumed run reads the same files)."""
    return os.path.abspath(os.path.expanduser(text))


def _path_or_hub_id(text):
    """An argparse type: a local file or folder (one that exists, or is written as a path), as _path;
    otherwise a Hub id, as it is."""
    return _path(text) if text.startswith(("~", ".", "/")) or os.path.exists(text) else text


def parse_args(argv=None, report=False, extra=(), description=None):
    """(args, the names of the arguments given on the command line). report: bad arguments raise
    ReportedError (for a checkpoint's saved arguments) instead of exiting with the usage. extra: (flag, options)
    of more arguments (compare.py's)."""

    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass  # the docstring as written, and defaults

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            if report:
                raise ReportedError(message)
            super().error(message)

    p = Parser(description=description, formatter_class=Formatter)
    count, beta = (
        number(int, 1, low_open=False, what="must be >= 1"),
        number(
            float,
            MIN_BETA,
            low_open=False,
            high=MAX_BETA,
            what=f"beta must be in (0, 1e6), and at least {MIN_BETA} (the least the loss takes)",
        ),
    )
    add = p.add_argument
    add(
        "--model",
        type=_path_or_hub_id,
        default=str(TINY_MODEL),
        help="policy to start from: a Hub id or a local folder",
    )
    add(
        "--model-base",
        type=_path_or_hub_id,
        default=None,
        help="when --model is a peft adapter: the model it is merged into; None: the base its adapter_config.json "
        "names (a relative one from here, else from the adapter's folder), kept for --resume",
    )
    add("--ref-model", type=_path_or_hub_id, default=None, help="reference model; None: the same as --model")
    add(
        "--dataset",
        type=_path_or_hub_id,
        default=str(TINY_DATASET),
        help="a Hub id, a local JSON/JSONL/Parquet file, a folder of them, or a saved datasets folder",
    )
    add("--train-split", default="train", help="the split to train on")
    add(
        "--eval-split",
        default=None,
        help="the held-out split, which must exist; None: test, validation or valid, the first present, otherwise "
        "--eval-fraction of train",
    )
    add(
        "--eval-fraction",
        type=number(float, 0, high=1, what="must be in (0, 1)"),
        default=0.05,
        help="fraction of train rows held out when there is no --eval-split",
    )
    add(
        "--gold-reward",
        type=_path,
        default=None,
        help="a Python file with score(prompt, completion) -> float; on by default for tiny_data",
    )
    add("--output-dir", type=_path, default="out", help="where everything is written")
    add(
        "--beta",
        type=beta,
        default=0.1,
        help="the baseline KL penalty β (the paper: 0.01 for instruct models on UltraFeedback)",
    )
    add(
        "--epsilon",
        type=number(float, 0, low_open=False, high=1, what="epsilon must be in [0, 1)"),
        default=0.01,
        help="the perturbation ε; 0 is plain DPO",
    )
    add("--fixed-baseline-beta", action="store_true", help="per-pair β̃ only: the baseline β never moves")
    add(
        "--min-beta",
        type=number(float, 0, low_open=False, high=MAX_BETA, what="must be in [0, 1e6)"),
        default=0.0,
        help="a floor for the baseline β (BaselineBeta's min_beta); 0: none. Its ceiling is 1e6, --beta's own bound",
    )
    add(
        "--lr",
        type=number(float, 0, what="the learning rate must be > 0"),
        default=None,
        help="AdamW's peak learning rate (the paper: 5e-7 on 7-8B models); None: 5e-4, or 3e-3 with --lora-r",
    )
    add(
        "--weight-decay",
        type=number(float, 0, low_open=False, what="must be >= 0"),
        default=0.0,
        help="AdamW's weight decay",
    )
    add(
        "--warmup-ratio",
        type=number(float, 0, low_open=False, high=1, what="must be in [0, 1)"),
        default=0.1,
        help="fraction of the steps over which the learning rate rises from 0",
    )
    add(
        "--max-grad-norm",
        type=number(float, 0, what="must be > 0"),
        default=1.0,
        help="gradients are clipped to this norm",
    )
    add("--batch-size", type=count, default=16, help="pairs per micro-batch")
    add("--grad-accum", type=count, default=1, help="micro-batches per optimizer step")
    add("--max-steps", type=count, default=None, help="optimizer steps; None: --epochs over the train split")
    add(
        "--epochs",
        type=number(float, 0, what="must be > 0"),
        default=2.0,
        help="passes over the train split, when --max-steps is not given",
    )
    add(
        "--max-length",
        type=number(int, 2, low_open=False, what="must be >= 2"),
        default=512,
        help="prompt + completion tokens",
    )
    add(
        "--max-prompt-length",
        type=count,
        default=256,
        help="when a pair exceeds --max-length, its prompt keeps BOS and its last tokens up to this many",
    )
    add(
        "--dtype",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="bfloat16: mixed precision (float32 weights, bf16 autocast, the frozen weights autocast casts in bf16: "
        "the reference's, or LoRA's base); auto: bfloat16 on GPUs with bf16 arithmetic (compute capability >= "
        "8.0); float32 on those GPUs multiplies in TF32",
    )
    add(
        "--lora-r",
        type=number(int, 0, low_open=False, what="must be >= 0"),
        default=0,
        help="train LoRA adapters of this rank (peft), the reference being the model with them off; 0: every weight "
        "(full fine-tuning)",
    )
    add(
        "--lora-alpha",
        type=number(float, 0, what="must be > 0"),
        default=16.0,
        help="LoRA's scale: the adapters add (alpha / r) B A x",
    )
    add(
        "--lora-target",
        nargs="+",
        default=["all-linear"],
        help="the layers LoRA adapts (peft's target_modules, e.g. q_proj v_proj); all-linear: every linear layer but "
        "the output head",
    )
    add(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute the policy's activations in backward (transformers' switch): less memory, more time",
    )
    add(
        "--full-logits",
        action="store_true",
        help="take the loss from the full (2B, T, V) logits even where the output layer allows its last hidden states "
        "(to compare the two: more memory)",
    )
    add(
        "--fsdp",
        action="store_true",
        help="under torchrun: shard the policy, its gradients and AdamW state, and the reference across the processes "
        "(FSDP2) instead of copying them to each (DDP)",
    )
    add("--eval-every", type=count, default=25, help="optimizer steps between evaluations")
    add("--eval-batch-size", type=count, default=64, help="pairs (or prompts to sample from) per evaluation batch")
    add("--max-new-tokens", type=count, default=32, help="length of the completions sampled for the gold reward")
    add(
        "--criterion-pairs",
        type=number(int, 0, low_open=False, what="must be >= 0"),
        default=1000,
        help="train pairs on which the final policy's s is compared with sign(h − ΔK) and sign(h), drawn in "
        "criterion.png; 0: none",
    )
    add(
        "--seed",
        type=number(int, 0, low_open=False, high=2**32, what="must be in [0, 2**32)"),
        default=0,
        help="seeds the data order and the sampling",
    )
    add("--device", default="auto", help="cuda, cuda:N, mps or cpu; auto: the first available")
    add(
        "--dist-timeout",
        type=number(float, 0, what="must be > 0"),
        default=30.0,
        metavar="MINUTES",
        help="under torchrun: how long a process waits for the others in a collective before the run fails "
        "(torch's default: 10; process 0 alone reads, or downloads, the weights while the others wait)",
    )
    add(
        "--skip-invalid",
        action="store_true",
        help="drop malformed rows (and report how many) instead of stopping at the first",
    )
    add("--overwrite", action="store_true", help="replace the run in a non-empty --output-dir (its own files only)")
    add(
        "--resume",
        type=_path,
        metavar="OUTPUT_DIR",
        default=None,
        help="continue the run in OUTPUT_DIR from its latest checkpoint, with its arguments",
    )
    add(
        "--save-every",
        type=count,
        default=100,
        help="optimizer steps between checkpoints (one is also written on Ctrl-C or SIGTERM)",
    )
    add("--keep-checkpoints", type=count, default=2, help="how many of the latest checkpoints to keep")
    add("--trust-remote-code", action="store_true", help="run code from the model's repository")
    for flag, options in extra:
        add(flag, **options)
    args = p.parse_args(argv)
    if args.min_beta > args.beta and not (getattr(args, "betas", None) or args.resume):  # compare.py: its --betas
        p.error(
            f"--min-beta {args.min_beta} is more than --beta {args.beta}: the floor of the baseline β would be above "
            "its start"
        )
    if "all-linear" in args.lora_target and len(args.lora_target) > 1:
        p.error(
            "--lora-target all-linear stands alone (every linear layer but the output head): give it, or layer names"
        )
    if args.max_prompt_length >= args.max_length and not args.resume:  # resuming: the run's (checkpoints.py)
        p.error(
            f"--max-prompt-length {args.max_prompt_length} must be less than --max-length {args.max_length}, "
            f"so that every completion keeps a token"
        )
    if args.lr is None:
        args.lr = 3e-3 if args.lora_r else 5e-4  # LoRA's few weights, starting at B = 0, need larger steps
    for action in p._actions:  # parsed again without defaults: what the command line gave
        action.default = argparse.SUPPRESS
    given = set(vars(p.parse_args(argv)))
    if not args.lora_r and not args.resume and given & {"lora_alpha", "lora_target"}:  # resuming: the run's --lora-r
        p.error("--lora-alpha and --lora-target apply only with --lora-r > 0")
    return args, given
