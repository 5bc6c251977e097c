"""A run's settings: RunConfig, every flag of train.py with its type, default and range, in one place; and its parser.

Each field of RunConfig is the flag --field-name (python train.py --help lists them with their defaults). The code
of a run takes the RunConfig that parse_args makes, typed, and each checkpoint keeps it as a dict, to resume with.
compare.py adds its own fields (a subclass); a resumed run parses its checkpoint's saved arguments again
(report=True).
"""

import argparse
import math
import os
import pathlib
from dataclasses import MISSING, dataclass, field, fields

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


def flag(default, help, **options):
    """A RunConfig field that is a command-line flag: its default, its help, and argparse's options (type, choices,
    nargs, metavar, action)."""
    metadata = {"help": help, **options}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


COUNT = number(int, 1, low_open=False, what="must be >= 1")
BETA = number(
    float,
    MIN_BETA,
    low_open=False,
    high=MAX_BETA,
    what=f"beta must be in (0, 1e6), and at least {MIN_BETA} (the least the loss takes)",
)


@dataclass
class RunConfig:
    """Every setting of a train.py run; the field x_y is the flag --x-y."""

    # What to train, and on what
    model: str = flag(str(TINY_MODEL), "policy to start from: a Hub id or a local folder", type=_path_or_hub_id)
    model_base: str | None = flag(
        None,
        "when --model is a peft adapter: the model it is merged into; None: the base its adapter_config.json names "
        "(a relative one from here, else from the adapter's folder), kept for --resume",
        type=_path_or_hub_id,
    )
    ref_model: str | None = flag(None, "reference model; None: the same as --model", type=_path_or_hub_id)
    dataset: str = flag(
        str(TINY_DATASET),
        "a Hub id, a local JSON/JSONL/Parquet file, a folder of them, or a saved datasets folder",
        type=_path_or_hub_id,
    )
    train_split: str = flag("train", "the split to train on")
    eval_split: str | None = flag(
        None,
        "the held-out split, which must exist; None: test, validation or valid, the first present, otherwise "
        "--eval-fraction of train",
    )
    eval_fraction: float = flag(
        0.05,
        "fraction of train rows held out when there is no --eval-split",
        type=number(float, 0, high=1, what="must be in (0, 1)"),
    )
    gold_reward: str | None = flag(
        None, "a Python file with score(prompt, completion) -> float; on by default for tiny_data", type=_path
    )
    output_dir: str = flag("out", "where everything is written", type=_path)
    # ε-DPO
    beta: float = flag(
        0.1, "the baseline KL penalty β (the paper: 0.01 for instruct models on UltraFeedback)", type=BETA
    )
    epsilon: float = flag(
        0.01,
        "the perturbation ε; 0 is plain DPO",
        type=number(float, 0, low_open=False, high=1, what="epsilon must be in [0, 1)"),
    )
    fixed_baseline_beta: bool = flag(False, "per-pair β̃ only: the baseline β never moves", action="store_true")
    min_beta: float = flag(
        0.0,
        "a floor for the baseline β (BaselineBeta's min_beta); 0: none. Its ceiling is 1e6, --beta's own bound",
        type=number(float, 0, low_open=False, high=MAX_BETA, what="must be in [0, 1e6)"),
    )
    # Optimization
    lr: float | None = flag(
        None,
        "AdamW's peak learning rate (the paper: 5e-7 on 7-8B models); None: 5e-4, or 3e-3 with --lora-r",
        type=number(float, 0, what="the learning rate must be > 0"),
    )
    weight_decay: float = flag(0.0, "AdamW's weight decay", type=number(float, 0, low_open=False, what="must be >= 0"))
    warmup_ratio: float = flag(
        0.1,
        "fraction of the steps over which the learning rate rises from 0",
        type=number(float, 0, low_open=False, high=1, what="must be in [0, 1)"),
    )
    max_grad_norm: float = flag(1.0, "gradients are clipped to this norm", type=number(float, 0, what="must be > 0"))
    batch_size: int = flag(16, "pairs per micro-batch", type=COUNT)
    grad_accum: int = flag(1, "micro-batches per optimizer step", type=COUNT)
    max_steps: int | None = flag(None, "optimizer steps; None: --epochs over the train split", type=COUNT)
    epochs: float = flag(
        2.0, "passes over the train split, when --max-steps is not given", type=number(float, 0, what="must be > 0")
    )
    max_length: int = flag(512, "prompt + completion tokens", type=number(int, 2, low_open=False, what="must be >= 2"))
    max_prompt_length: int = flag(
        256, "when a pair exceeds --max-length, its prompt keeps BOS and its last tokens up to this many", type=COUNT
    )
    # Precision, adapters, memory
    dtype: str = flag(
        "auto",
        "bfloat16: mixed precision (float32 weights, bf16 autocast, the frozen weights autocast casts in bf16: the "
        "reference's, or LoRA's base); auto: bfloat16 on GPUs with bf16 arithmetic (compute capability >= 8.0); "
        "float32 on those GPUs multiplies in TF32",
        choices=("auto", "float32", "bfloat16"),
    )
    lora_r: int = flag(
        0,
        "train LoRA adapters of this rank (peft), the reference being the model with them off; 0: every weight (full "
        "fine-tuning)",
        type=number(int, 0, low_open=False, what="must be >= 0"),
    )
    lora_alpha: float = flag(
        16.0, "LoRA's scale: the adapters add (alpha / r) B A x", type=number(float, 0, what="must be > 0")
    )
    lora_target: list[str] = flag(
        ["all-linear"],
        "the layers LoRA adapts (peft's target_modules, e.g. q_proj v_proj); all-linear: every linear layer but the "
        "output head",
        nargs="+",
    )
    gradient_checkpointing: bool = flag(
        False,
        "recompute the policy's activations in backward (transformers' switch): less memory, more time",
        action="store_true",
    )
    full_logits: bool = flag(
        False,
        "take the loss from the full (2B, T, V) logits even where the output layer allows its last hidden states (to "
        "compare the two: more memory)",
        action="store_true",
    )
    fsdp: bool = flag(
        False,
        "under torchrun: shard the policy, its gradients and AdamW state, and the reference across the processes "
        "(FSDP2) instead of copying them to each (DDP)",
        action="store_true",
    )
    # Evaluation
    eval_every: int = flag(25, "optimizer steps between evaluations", type=COUNT)
    eval_batch_size: int = flag(64, "pairs (or prompts to sample from) per evaluation batch", type=COUNT)
    max_new_tokens: int = flag(32, "length of the completions sampled for the gold reward", type=COUNT)
    criterion_pairs: int = flag(
        1000,
        "train pairs on which the final policy's s is compared with sign(h − ΔK) and sign(h), drawn in "
        "criterion.png; 0: none",
        type=number(int, 0, low_open=False, what="must be >= 0"),
    )
    # The run itself
    seed: int = flag(
        0,
        "seeds the data order and the sampling",
        type=number(int, 0, low_open=False, high=2**32, what="must be in [0, 2**32)"),
    )
    device: str = flag("auto", "cuda, cuda:N, mps or cpu; auto: the first available")
    dist_timeout: float = flag(
        30.0,
        "under torchrun: how long a process waits for the others in a collective before the run fails (torch's "
        "default: 10; process 0 alone reads, or downloads, the weights while the others wait)",
        type=number(float, 0, what="must be > 0"),
        metavar="MINUTES",
    )
    skip_invalid: bool = flag(
        False, "drop malformed rows (and report how many) instead of stopping at the first", action="store_true"
    )
    overwrite: bool = flag(
        False, "replace the run in a non-empty --output-dir (its own files only)", action="store_true"
    )
    resume: str | None = flag(
        None,
        "continue the run in OUTPUT_DIR from its latest checkpoint, with its arguments",
        type=_path,
        metavar="OUTPUT_DIR",
    )
    save_every: int = flag(
        100, "optimizer steps between checkpoints (one is also written on Ctrl-C or SIGTERM)", type=COUNT
    )
    keep_checkpoints: int = flag(2, "how many of the latest checkpoints to keep", type=COUNT)
    trust_remote_code: bool = flag(False, "run code from the model's repository", action="store_true")


def parse_args(argv=None, report=False, config=RunConfig, description=None):
    """(the run's config, an instance of config: RunConfig or a subclass of it; the names of the flags the command line
    gave). report: bad arguments raise ReportedError (for a checkpoint's saved arguments) instead of exiting with
    the usage."""

    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass  # the docstring as written, and defaults

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            if report:
                raise ReportedError(message)
            super().error(message)

    p = Parser(description=description, formatter_class=Formatter)
    for option in fields(config):
        default = option.default if option.default is not MISSING else option.default_factory()
        p.add_argument("--" + option.name.replace("_", "-"), default=default, **option.metadata)
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
    return config(**vars(args)), given
