"""Train a causal language model with ε-DPO (epsdpo.py) on preference pairs.

    python train.py                      # the demo: tiny_data/ on a laptop CPU, under a minute
    python train.py --compare            # DPO (ε = 0) and ε-DPO from the same start, side by side
    python train.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset trl-lib/ultrafeedback_binarized \\
        --beta 0.01 --lr 5e-7 --batch-size 2 --grad-accum 32 --max-length 1024

One straight path: arguments, data, models, loop, evaluation, saving. Every default is in parse_args.
Writes to --output-dir: metrics.jsonl (a row per optimizer step and per evaluation), summary.json,
curves.png, and the trained model and tokenizer (save_pretrained).
"""

import argparse
import contextlib
import importlib.util
import json
import math
import os
import pathlib
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

import epsdpo
from data import ReportedError, collate, load_splits, micro_batches, tokenize_rows

HERE = pathlib.Path(__file__).resolve().parent
TINY_MODEL, TINY_DATASET, TINY_GOLD_REWARD = HERE / "tiny_data/model", HERE / "tiny_data/data", HERE / "tiny_data/gold_reward.py"


# ----------------------------------------------------------------------------------------------------
# Arguments


def _number(kind, low=None, low_open=True, high=None, what=""):
    """An argparse type: a number in a range, rejected with a message when the arguments are parsed."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not math.isfinite(value) or (low is not None and (value <= low if low_open else value < low)) or (
            high is not None and value >= high
        ):
            raise argparse.ArgumentTypeError(f"{value} is out of range: {what}")
        return value
    return parse


def parse_args(argv=None):
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass                                                            # the docstring as written, and defaults

    p = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    count = _number(int, 1, low_open=False, what="must be >= 1")
    p.add_argument("--model", default=str(TINY_MODEL), help="policy to start from: a Hub id or a local folder")
    p.add_argument("--ref-model", default=None, help="reference model; None: the same as --model")
    p.add_argument("--dataset", default=str(TINY_DATASET),
                   help="a Hub id, a local JSON/JSONL/Parquet file, a folder of them, or a saved datasets folder")
    p.add_argument("--train-split", default="train", help="the split to train on")
    p.add_argument("--eval-split", default="test", help="held out if present; otherwise --eval-fraction of train")
    p.add_argument("--eval-fraction", type=_number(float, 0, high=1, what="must be in (0, 1)"), default=0.05,
                   help="fraction of train rows held out when there is no --eval-split")
    p.add_argument("--gold-reward", default=None,
                   help="a Python file with score(prompt, completion) -> float; on by default for tiny_data")
    p.add_argument("--output-dir", default="out", help="where everything is written")
    p.add_argument("--beta", type=_number(float, 0, what="beta must be > 0"), default=0.1,
                   help="the baseline KL penalty β (the paper: 0.01 for instruct models on UltraFeedback)")
    p.add_argument("--epsilon", type=_number(float, 0, low_open=False, high=1, what="epsilon must be in [0, 1)"),
                   default=0.01, help="the perturbation ε; 0 is plain DPO")
    p.add_argument("--lr", type=_number(float, 0, what="the learning rate must be > 0"), default=5e-4,
                   help="AdamW's peak learning rate (the paper: 5e-7 on 7-8B models)")
    p.add_argument("--weight-decay", type=_number(float, 0, low_open=False, what="must be >= 0"), default=0.0,
                   help="AdamW's weight decay")
    p.add_argument("--warmup-ratio", type=_number(float, 0, low_open=False, high=1, what="must be in [0, 1)"),
                   default=0.1, help="fraction of the steps over which the learning rate rises from 0")
    p.add_argument("--max-grad-norm", type=_number(float, 0, what="must be > 0"), default=1.0,
                   help="gradients are clipped to this norm")
    p.add_argument("--batch-size", type=count, default=16,
                   help="pairs per micro-batch")
    p.add_argument("--grad-accum", type=count, default=1,
                   help="micro-batches per optimizer step")
    p.add_argument("--max-steps", type=count, default=None,
                   help="optimizer steps; None: --epochs over the train split")
    p.add_argument("--epochs", type=_number(float, 0, what="must be > 0"), default=2.0,
                   help="passes over the train split, when --max-steps is not given")
    p.add_argument("--max-length", type=_number(int, 2, low_open=False, what="must be >= 2"), default=512,
                   help="prompt + completion tokens")
    p.add_argument("--max-prompt-length", type=count, default=256,
                   help="when a pair exceeds --max-length, its prompt keeps BOS and its last tokens up to this many")
    p.add_argument("--eval-every", type=count, default=25,
                   help="optimizer steps between evaluations")
    p.add_argument("--eval-batch-size", type=count, default=64,
                   help="pairs (or prompts to sample from) per evaluation batch")
    p.add_argument("--max-new-tokens", type=count, default=32,
                   help="length of the completions sampled for the gold reward")
    p.add_argument("--seed", type=int, default=0, help="seeds the data order and the sampling")
    p.add_argument("--device", default="auto", help="cuda, mps or cpu; auto: the first available")
    p.add_argument("--skip-invalid", action="store_true",
                   help="drop malformed rows (and report how many) instead of stopping at the first")
    p.add_argument("--overwrite", action="store_true", help="replace the run in a non-empty --output-dir")
    p.add_argument("--resume", metavar="OUTPUT_DIR", default=None,
                   help="continue the run in OUTPUT_DIR from its latest checkpoint, with its arguments")
    p.add_argument("--save-every", type=count, default=100,
                   help="optimizer steps between checkpoints (one is also written on Ctrl-C or SIGTERM)")
    p.add_argument("--keep-checkpoints", type=count, default=2,
                   help="how many of the latest checkpoints to keep")
    p.add_argument("--trust-remote-code", action="store_true", help="run code from the model's repository")
    p.add_argument("--compare", action="store_true", help="train DPO (ε = 0) and ε-DPO and show them side by side")
    args = p.parse_args(argv)
    if args.max_prompt_length >= args.max_length:
        p.error(f"--max-prompt-length {args.max_prompt_length} must be less than --max-length {args.max_length}, "
                f"so that every completion keeps a token")
    return args


# ----------------------------------------------------------------------------------------------------
# Models


def pick_device(name):
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def init_distributed(device_name):
    """(rank, world size, device). Under torchrun (WORLD_SIZE > 1) this joins the process group: NCCL on
    GPUs, gloo on CPUs; otherwise one process on the device --device picks."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, pick_device(device_name)
    local_rank = int(os.environ["LOCAL_RANK"])
    on_gpus = torch.cuda.is_available() and device_name in ("auto", "cuda")
    if on_gpus:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if on_gpus else "gloo")
    return dist.get_rank(), world_size, torch.device("cuda", local_rank) if on_gpus else torch.device("cpu")


def gather(values):
    """A list from every rank, joined in rank order (the list itself in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, values)
    return [value for part in parts for value in part]


def any_rank(flag):
    """True on every rank if it is True on any: ranks must stop together, or the others wait forever."""
    return any(gather([bool(flag)]))


def load_model(name, device, args):
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as error:                              # no such model, or code it would run
        raise ReportedError(f"model {name}: {str(error).splitlines()[0]}") from None
    # eval() for the policy too: dropout off, as DPO assumes; gradients flow all the same.
    return model.to(device).eval()


def forward(policy, reference, batch, beta, epsilon):
    """One concatenated forward pass of chosen and rejected per model, then the ε-DPO loss."""
    logits = policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits          # (2B, T, V)
    with torch.no_grad():
        ref_logits = reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return epsdpo.epsilon_dpo_loss(logits, ref_logits, batch.input_ids, batch.completion_mask, beta, epsilon)


# ----------------------------------------------------------------------------------------------------
# Metrics


def pair_metrics(outputs):
    """Means over the pairs of one step (or one evaluation) on every rank, under TRL's metric names."""
    def cat(name):                                                      # (pairs,) over every rank
        return torch.tensor(gather(torch.cat([getattr(out, name).detach().float() for out in outputs]).tolist()))

    chosen_rewards, rejected_rewards, steps = cat("chosen_rewards"), cat("rejected_rewards"), cat("steps")
    # A tie (h = 0, as at the first step) counts half: the reference model is right half the time.
    accuracies = (chosen_rewards > rejected_rewards).float() + 0.5 * (chosen_rewards == rejected_rewards).float()
    return {
        "loss": cat("losses").mean().item(),
        "beta/pairs_mean": cat("pair_betas").mean().item(),
        "steps/lower_beta": (steps == 1).float().mean().item(),
        "steps/higher_beta": (steps == -1).float().mean().item(),
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/accuracies": accuracies.mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "logps/chosen": cat("chosen_logps").mean().item(),
        "logps/rejected": cat("rejected_logps").mean().item(),
    }


@torch.no_grad()
def sample_and_score(policy, reference, tokenizer, prompts, gold_reward, args, device):
    """Sample one completion per prompt from the policy; return the gold reward of each and a KL estimate of each.

    KL(π_θ‖π_ref) = E_{y~π_θ}[log π_θ(y|x) − log π_ref(y|x)], estimated by the mean over the samples.
    """
    from transformers import GenerationConfig

    # Pure ancestral sampling (no top-k, top-p or temperature from the model's defaults): the KL
    # estimate is only unbiased for samples of π_θ itself.
    sampling = GenerationConfig(do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=args.max_new_tokens,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    rewards, kls = [], []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(args.seed)                                    # the same prompts get the same noise
        for start in range(0, len(prompts), args.eval_batch_size):
            chunk = prompts[start : start + args.eval_batch_size]
            width = max(len(ids) for _, ids in chunk)
            prompt_ids = torch.full((len(chunk), width), tokenizer.pad_token_id)   # left-padded for generate
            attention_mask = torch.zeros_like(prompt_ids)
            for row, (_, ids) in enumerate(chunk):
                prompt_ids[row, width - len(ids) :] = torch.tensor(ids)
                attention_mask[row, width - len(ids) :] = 1
            generated = policy.generate(input_ids=prompt_ids.to(device), attention_mask=attention_mask.to(device),
                                        generation_config=sampling)[:, width:].tolist()
            samples = []
            for (prompt, ids), new in zip(chunk, generated):
                if tokenizer.eos_token_id in new:
                    new = new[: new.index(tokenizer.eos_token_id) + 1]
                samples.append({"prompt_ids": ids, "chosen_ids": new, "rejected_ids": new, "noisy": None})
                rewards.append(gold_reward(prompt, tokenizer.decode(new, skip_special_tokens=True)))
            # Score the samples right-padded, the way training scores completions.
            batch = collate(samples, tokenizer.pad_token_id, device)
            half = len(samples)
            kwargs = dict(input_ids=batch.input_ids[:half], attention_mask=batch.attention_mask[:half])
            logps = epsdpo.sequence_logps(policy(**kwargs).logits, batch.input_ids[:half], batch.completion_mask[:half])
            ref_logps = epsdpo.sequence_logps(reference(**kwargs).logits, batch.input_ids[:half], batch.completion_mask[:half])
            kls += (logps - ref_logps).tolist()
    return rewards, kls


@torch.no_grad()
def evaluate(policy, reference, tokenizer, eval_pairs, beta, gold_reward, args, device):
    """Metrics over the whole held-out split, with the current β (evaluation never moves β). Each rank
    takes its share of the pairs; the metrics are over all of them."""
    distributed = dist.is_available() and dist.is_initialized()
    shard = eval_pairs[dist.get_rank() :: dist.get_world_size()] if distributed else eval_pairs
    outputs = [
        forward(policy, reference, collate(shard[i : i + args.eval_batch_size], tokenizer.pad_token_id, device),
                beta, args.epsilon)
        for i in range(0, len(shard), args.eval_batch_size)
    ]
    metrics = pair_metrics(outputs)
    if gold_reward is not None:
        prompts = [(p["prompt"], p["prompt_ids"]) for p in shard]
        rewards, kls = (gather(values) for values in sample_and_score(policy, reference, tokenizer, prompts, gold_reward, args, device))
        metrics["gold_reward"], metrics["kl"] = sum(rewards) / len(rewards), sum(kls) / len(kls)
    return metrics


# ----------------------------------------------------------------------------------------------------
# One training run


def train(args, label="ε-DPO"):
    """Train one policy with args.epsilon; returns its summary. Writes everything to args.output_dir."""
    import datasets
    import transformers
    from tqdm.auto import tqdm

    datasets.disable_progress_bars()                                    # one progress bar: the training's
    transformers.utils.logging.disable_progress_bar()

    started = time.time()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    output_dir = pathlib.Path(args.output_dir)
    checkpoint = check_output_dir(output_dir, args)                     # the one to resume from, or None
    rank, world_size, device = init_distributed(args.device)            # rank 0 alone writes and prints
    if world_size > 1:
        dist.barrier()                                                  # every rank has checked the folder

    # Data
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as error:
        raise ReportedError(f"--model {args.model}: {str(error).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token                       # padding is masked out anyway
    train_rows, eval_rows, notes = load_splits(args.dataset, args.train_split, args.eval_split, args.eval_fraction, args.seed)
    lengths = (tokenizer, args.max_length, args.max_prompt_length, args.skip_invalid)
    train_pairs, train_skipped, train_moved = tokenize_rows(train_rows, *lengths)
    eval_pairs, eval_skipped, eval_moved = tokenize_rows(eval_rows, *lengths)
    if rank == 0:
        for note in notes:
            print(f"note: {note}")
        for split, skipped in (("train", train_skipped), ("eval", eval_skipped)):
            for reason, count in skipped.items():
                print(f"skipped {count} {split} rows: {reason}")
        if train_moved + eval_moved:
            print(f"note: in {train_moved} train and {eval_moved} held-out pairs the tokenizer merges tokens across the "
                  f"prompt/completion boundary; the prompt is the part both sequences share")
    if len(train_pairs) < args.batch_size or not eval_pairs:
        raise ReportedError(f"--dataset {args.dataset}: {len(train_pairs)} usable train pairs and {len(eval_pairs)} "
                            f"held-out pairs; need at least --batch-size ({args.batch_size}) and 1")
    gold_reward_path = args.gold_reward or (TINY_GOLD_REWARD if pathlib.Path(args.dataset).resolve() == TINY_DATASET else None)
    gold_reward = _load_gold_reward(gold_reward_path) if gold_reward_path else None

    # Models: a resumed run takes its policy from the checkpoint, the rest from the checkpoint's state
    policy = load_model(checkpoint or args.model, device, args)
    reference = load_model(args.ref_model or args.model, device, args).requires_grad_(False)
    if world_size > 1:                                                  # gradients averaged over the ranks
        ddp_policy = torch.nn.parallel.DistributedDataParallel(policy, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        ddp_policy = policy
    pairs_per_step = args.batch_size * args.grad_accum * world_size
    total_steps = args.max_steps or max(1, int(args.epochs * len(train_pairs) // pairs_per_step))
    warmup_steps = int(args.warmup_ratio * total_steps)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(     # linear warmup from 0, then linear decay to 0
        optimizer, lambda step: min((step + 1) / (warmup_steps + 1), (total_steps - step) / max(1, total_steps - warmup_steps))
    )
    baseline_beta = epsdpo.BaselineBeta(args.beta, args.epsilon)
    if rank == 0:
        prepare_output_dir(output_dir, checkpoint)
    # Every rank draws the same global micro-batches of batch_size × world_size pairs and keeps its share:
    # N ranks see the pairs one process with N times the batch size would see.
    batches = (pairs[rank * args.batch_size : (rank + 1) * args.batch_size]
               for pairs in micro_batches(train_pairs, args.batch_size * world_size, args.seed))
    steps_by_noise = {}                                                 # (noisy flag, s) -> count of pairs
    first_step = 1
    if checkpoint:
        state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)   # nothing unpickled blindly
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        baseline_beta.load_state_dict(state["baseline_beta"])
        for _ in range(state["step"] * args.grad_accum):                # the data order is a function of the seed
            next(batches)
        steps_by_noise = dict(state["steps_by_noise"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        first_step = state["step"] + 1
    if rank == 0:
        print((f"resuming from {checkpoint} at step {first_step}\n" if checkpoint else "") +
              f"{label}: {len(train_pairs)} train pairs, {len(eval_pairs)} held out, {total_steps} steps of "
              f"{pairs_per_step} pairs on {world_size} × {device}, β = {args.beta}, ε = {args.epsilon}")

    def log(row):
        if rank == 0:
            # One write() of a whole line: a crash cannot leave half of it.
            with open(output_dir / "metrics.jsonl", "a") as metrics_file:
                metrics_file.write(json.dumps(row) + "\n")

    def log_evaluation(step):
        metrics = evaluate(policy, reference, tokenizer, eval_pairs, baseline_beta.value, gold_reward, args, device)
        log({"step": step, "split": "eval", "beta": baseline_beta.value, "lr": scheduler.get_last_lr()[0], **metrics})

    def save_checkpoint(step):
        state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "baseline_beta": baseline_beta.state_dict(), "steps_by_noise": steps_by_noise, "args": vars(args),
                 "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}}
        if rank == 0:
            write_checkpoint(output_dir, step, policy, state, args.keep_checkpoints)

    # Loop. Ctrl-C or SIGTERM finishes the optimizer step under way, writes a checkpoint and stops.
    if first_step == 1:
        log_evaluation(0)
    stop = _StopOnSignal()
    progress = tqdm(range(first_step, total_steps + 1), desc=label, disable=None if rank == 0 else True)
    with stop:
        for step in progress:
            beta = baseline_beta.value
            outputs = []
            for micro_batch in range(args.grad_accum):
                batch = collate(next(batches), tokenizer.pad_token_id, device)
                # Under DDP, gradients are averaged across ranks once per optimizer step, at the last micro-batch.
                last = micro_batch == args.grad_accum - 1
                with ddp_policy.no_sync() if world_size > 1 and not last else contextlib.nullcontext():
                    out = forward(ddp_policy, reference, batch, beta, args.epsilon)
                    (out.loss / args.grad_accum).backward()
                baseline_beta.observe(out.steps)
                outputs.append(out)
                for noisy, s in gather(list(zip(batch.noisy, out.steps.tolist()))):
                    steps_by_noise[noisy, s] = steps_by_noise.get((noisy, s), 0) + 1
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
            losses = torch.cat([out.losses.detach() for out in outputs])
            if any_rank(not (torch.isfinite(losses).all() and torch.isfinite(grad_norm))):
                latest = latest_checkpoint(output_dir)
                raise ReportedError(f"step {step}: the loss or the gradient is not finite (gradient norm {grad_norm.item()}); "
                                f"stopped before applying it. " + (f"The last checkpoint, {latest}, is intact: "
                                f"--resume {output_dir} continues from it." if latest else "No checkpoint was written yet."))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            baseline_beta.step()                                        # β ← mean β̃ of this step's pairs

            row = {"step": step, "split": "train", "beta": beta, "lr": lr, **pair_metrics(outputs),
                   "beta/pairs_mean": baseline_beta.value}
            if world_size > 1:
                row["beta/ranks"] = gather([baseline_beta.value])         # every rank's new β: all the same
            log(row)
            progress.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['rewards/accuracies']:.2f}", beta=f"{beta:.4f}")
            if step % args.eval_every == 0 or step == total_steps:
                log_evaluation(step)
            stopping = any_rank(stop.signal is not None)
            if stopping or step % args.save_every == 0:
                save_checkpoint(step)
            if stopping and step < total_steps:
                progress.close()
                number = stop.signal or signal.SIGTERM
                if rank == 0:
                    print(f"stopped by signal {number} after step {step}; checkpoint written: "
                          f"python train.py --resume {output_dir} continues the run")
                sys.exit(128 + number)

    # Saving
    if rank != 0:
        return None
    save_pretrained_atomically(output_dir, policy, tokenizer)
    evaluations = [row for row in _read_metrics(output_dir) if row["split"] == "eval"]
    summary = {
        "label": label,
        "args": vars(args),
        "device": str(device),
        "train_pairs": len(train_pairs),
        "eval_pairs": len(eval_pairs),
        "skipped": {"train": train_skipped, "eval": eval_skipped},
        "boundary_moved": {"train": train_moved, "eval": eval_moved},
        "steps": total_steps,
        "final_beta": baseline_beta.value,
        "start": evaluations[0],
        "final": evaluations[-1],
        "steps_by_noise": _step_fractions(steps_by_noise),
        "seconds": round(time.time() - started, 1),
    }
    write_atomically(output_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    plot_curves({label: _read_metrics(output_dir)}, output_dir / "curves.png")
    return summary


# ----------------------------------------------------------------------------------------------------
# Output that is never lost: a guarded folder, atomic files, checkpoints


def check_output_dir(output_dir, args):
    """Refuse a folder holding something, unless told to replace it (--overwrite) or continue it (--resume).

    Changes nothing; returns the checkpoint to resume from, or None.
    """
    if args.resume:
        checkpoint = latest_checkpoint(output_dir)
        if checkpoint is None:
            raise ReportedError(f"--resume {output_dir}: no checkpoint-STEP folder in it")
        return checkpoint
    if output_dir.exists() and any(output_dir.iterdir()) and not args.overwrite:
        raise ReportedError(f"--output-dir {output_dir} is not empty; nothing in it was touched. Pass --overwrite "
                            f"to replace its run, --resume {output_dir} to continue it, or another --output-dir")
    return None


def prepare_output_dir(output_dir, checkpoint):
    """Once the data and models are known to be good: forget the metrics written after the checkpoint we
    resume from, or (--overwrite) the previous run's metrics and checkpoints; the rest is overwritten as saved."""
    output_dir.mkdir(parents=True, exist_ok=True)
    if checkpoint:
        step = int(checkpoint.name.split("-")[1])
        rows = [row for row in _read_metrics(output_dir) if row["step"] <= step]
        write_atomically(output_dir / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
        return
    (output_dir / "metrics.jsonl").unlink(missing_ok=True)
    for stale in output_dir.glob("checkpoint-*"):
        shutil.rmtree(stale)


def write_atomically(path, text):
    """Write to a temporary name, then rename: the file is either the old one or the whole new one."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def save_pretrained_atomically(output_dir, model, tokenizer):
    temporary = output_dir / ".saving"
    shutil.rmtree(temporary, ignore_errors=True)
    model.save_pretrained(temporary)
    tokenizer.save_pretrained(temporary)
    for saved in temporary.iterdir():
        os.replace(saved, output_dir / saved.name)
    temporary.rmdir()


def latest_checkpoint(output_dir):
    checkpoints = sorted(pathlib.Path(output_dir).glob("checkpoint-[0-9]*"), key=lambda p: int(p.name.split("-")[1]))
    return checkpoints[-1] if checkpoints else None


def write_checkpoint(output_dir, step, policy, state, keep):
    """OUTPUT_DIR/checkpoint-STEP/: the policy (safetensors) and trainer_state.pt; keeps the last `keep`."""
    temporary = output_dir / f".checkpoint-{step}"
    shutil.rmtree(temporary, ignore_errors=True)
    policy.save_pretrained(temporary)
    torch.save(state, temporary / "trainer_state.pt")
    shutil.rmtree(output_dir / f"checkpoint-{step}", ignore_errors=True)
    os.replace(temporary, output_dir / f"checkpoint-{step}")           # appears whole, or not at all
    for old in sorted(output_dir.glob("checkpoint-[0-9]*"), key=lambda p: int(p.name.split("-")[1]))[:-keep]:
        shutil.rmtree(old)


class _StopOnSignal:
    """While active, SIGINT and SIGTERM only set .signal: the loop stops at the end of its step."""

    def __enter__(self):
        self.signal = None
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, number, frame):
        self.signal = number

    def __exit__(self, *exc):
        for number, handler in self.previous.items():
            signal.signal(number, handler)


def _load_gold_reward(path):
    spec = importlib.util.spec_from_file_location("gold_reward", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.score


def _step_fractions(steps_by_noise):
    """Fractions of s = +1 and s = −1 over training, for clean and noisy pairs separately (if marked)."""
    groups = {}
    for (noisy, s), count in steps_by_noise.items():
        name = {None: "all", False: "clean", True: "noisy"}[noisy]
        groups.setdefault(name, {1: 0, 0: 0, -1: 0})[s] += count
    return {
        name: {"pairs": sum(c.values()), "lower_beta": c[1] / sum(c.values()), "higher_beta": c[-1] / sum(c.values())}
        for name, c in sorted(groups.items())
    }


def _read_metrics(output_dir):
    path = pathlib.Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in open(path)] if path.exists() else []


# ----------------------------------------------------------------------------------------------------
# What the user sees


def plot_curves(runs, path):
    """One panel per quantity; each run (label -> metric rows) a colour, training thin, evaluation dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("loss", "loss"), ("rewards/accuracies", "reward accuracy"), ("rewards/margins", "reward margin"),
              ("beta", "baseline β"), ("steps/lower_beta", "fraction s = +1 (β/(1+ε))"),
              ("steps/higher_beta", "fraction s = −1 (β/(1−ε))"), ("gold_reward", "gold reward of samples"),
              ("kl", "KL(π_θ ‖ π_ref) of samples")]
    if not any("gold_reward" in row for rows in runs.values() for row in rows):
        panels = panels[:6]
    figure, axes = plt.subplots(2, len(panels) // 2, figsize=(4 * len(panels) // 2, 6.5), squeeze=False)
    for (key, title), axis in zip(panels, axes.flat):
        for color, (label, rows) in zip(("tab:blue", "tab:red", "tab:green"), runs.items()):
            for split, style in (("train", dict(linewidth=0.8, alpha=0.6)), ("eval", dict(marker="o", linestyle=":"))):
                points = [(r["step"], r[key]) for r in rows if r["split"] == split and key in r]
                if points:
                    axis.plot(*zip(*points), color=color, label=f"{label} {split}", **style)
        axis.set_title(title)
        axis.set_xlabel("optimizer step")
    axes.flat[0].legend(fontsize=7)
    figure.tight_layout()
    temporary = path.with_name(path.name + ".tmp")
    figure.savefig(temporary, dpi=110, format="png")
    os.replace(temporary, path)                                         # the figure appears whole
    plt.close(figure)


def print_summary(summaries):
    """A table of the held-out numbers at the start and the end of each run."""
    rows = [("held-out reward accuracy", "rewards/accuracies", "{:.3f}"), ("held-out reward margin", "rewards/margins", "{:.3f}"),
            ("held-out loss", "loss", "{:.4f}"), ("gold reward of samples", "gold_reward", "{:+.3f}"),
            ("KL(π_θ‖π_ref) of samples", "kl", "{:.3f}")]
    header = f"{'':28}" + "".join(f"{'start':>10}{s['label'] + ' end':>16}" for s in summaries[:1]) + "".join(
        f"{s['label'] + ' end':>16}" for s in summaries[1:])
    print("\n" + header)
    for name, key, fmt in rows:
        if key in summaries[0]["final"]:
            cells = [fmt.format(summaries[0]["start"][key])] + [fmt.format(s["final"][key]) for s in summaries]
            print(f"{name:28}{cells[0]:>10}" + "".join(f"{c:>16}" for c in cells[1:]))
    print(f"{'baseline β':28}{summaries[0]['args']['beta']:>10.4f}" + "".join(f"{s['final_beta']:>16.4f}" for s in summaries))
    for s in summaries:
        for group, f in s["steps_by_noise"].items():
            print(f"{s['label']}, {group} train pairs ({f['pairs']} seen): s = +1 {f['lower_beta']:.1%}, s = −1 {f['higher_beta']:.1%}")
        print(f"{s['label']}: {s['seconds']} s, written to {s['args']['output_dir']}")


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.resume:                                                 # the interrupted run's own arguments
            checkpoint = latest_checkpoint(args.resume)
            if checkpoint is None:
                raise ReportedError(f"--resume {args.resume}: no checkpoint-STEP folder in it")
            saved = torch.load(checkpoint / "trainer_state.pt", weights_only=True)["args"]
            args = argparse.Namespace(**{**saved, "resume": args.resume, "output_dir": args.resume})
        if not args.compare:
            summary = train(args)
            if summary:                                                 # rank 0
                print_summary([summary])
            return
        output_dir = pathlib.Path(args.output_dir)
        if output_dir.exists() and any(output_dir.iterdir()) and not args.overwrite:
            raise ReportedError(f"--output-dir {output_dir} is not empty; nothing in it was touched. Pass "
                                f"--overwrite to replace it, or another --output-dir")
        if init_distributed(args.device)[1] > 1:
            dist.barrier()                                              # every rank has checked before any writes
        runs = {}
        for label, epsilon, folder in (("DPO", 0.0, "dpo"), ("ε-DPO", args.epsilon, "epsilon-dpo")):
            run_args = argparse.Namespace(**{**vars(args), "epsilon": epsilon, "compare": False,
                                             "output_dir": str(output_dir / folder)})
            runs[label] = train(run_args, label)
    except ReportedError as error:
        sys.exit(f"error: {error}")
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if None in runs.values():                                           # not rank 0
        return
    plot_curves({label: _read_metrics(s["args"]["output_dir"]) for label, s in runs.items()}, output_dir / "compare.png")
    print_summary(list(runs.values()))
    print(f"side by side: {output_dir / 'compare.png'}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
