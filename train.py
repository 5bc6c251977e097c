"""Train a causal language model with ε-DPO (epsdpo.py) on preference pairs (data.py).

    python train.py                      # the demo: tiny_data/ on a laptop CPU, under a minute
    python train.py --compare            # DPO (ε = 0) and ε-DPO from the same start, side by side
    python train.py --compare --betas 0.05 0.1 0.2 0.4   # the reward–KL frontier of DPO and ε-DPO (3 seeds)
    python train.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset trl-lib/ultrafeedback_binarized \\
        --beta 0.01 --lr 5e-7 --batch-size 2 --grad-accum 32 --max-length 1024

One straight path, train() below: arguments, data, models, loop, evaluation, saving. Every default is in
parse_args. Writes to --output-dir: metrics.jsonl (a row per optimizer step and per evaluation),
summary.json, curves.png, criterion.png, checkpoint-STEP/ folders, and the trained model and tokenizer (save_pretrained).
"""

import argparse
import contextlib
import json
import math
import os
import pathlib
import random
import signal
import sys
import time

import torch
import torch.distributed as dist

import epsdpo
from models import (completion_logits, gathered_state_dict, held_bytes, init_distributed, last_hidden_states, local, precision,
                    sequence_kl, setup_models, sharded, tokenizer_name, training_mode)
from data import (NOISE_CODES, ReportedError, collate, collate_prompts, gold_score, load_gold_reward, load_splits,
                  load_tokenizer, micro_batches, tokenize_rows)
from outputs import (COMPARE_FILES, append_metrics, FRONTIER_FILES, StopNow, check_only_ours_replaced, claim_on_rank_zero, claim_output_dir, criterion_figure, frontier_points, load_checkpoint,
                     our_checkpoints, plot_curves, plot_frontier, prepare_output_dir, print_data_report, print_frontier,
                     print_summary, read_metrics, resumed_args, run_writes, s_fractions, save_pretrained_atomically, stop_signals, write_atomically,
                     write_checkpoint)

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


def parse_args(argv=None, report=False):
    """(args, the names of the arguments given on the command line). report: bad arguments raise
    ReportedError (for a checkpoint's saved arguments) instead of exiting with the usage."""
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass                                                            # the docstring as written, and defaults

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            if report:
                raise ReportedError(message)
            super().error(message)

    p = Parser(description=__doc__, formatter_class=Formatter)
    count, beta = _number(int, 1, low_open=False, what="must be >= 1"), _number(float, 0, high=1e6, what="beta must be in (0, 1e6)")
    add = p.add_argument
    add("--model", type=_path_or_hub_id, default=str(TINY_MODEL), help="policy to start from: a Hub id or a local folder")
    add("--ref-model", type=_path_or_hub_id, default=None, help="reference model; None: the same as --model")
    add("--dataset", type=_path_or_hub_id, default=str(TINY_DATASET), help="a Hub id, a local JSON/JSONL/Parquet file, a folder of them, or a saved datasets folder")
    add("--train-split", default="train", help="the split to train on")
    add("--eval-split", default=None, help="the held-out split, which must exist; None: test if present, otherwise --eval-fraction of train")
    add("--eval-fraction", type=_number(float, 0, high=1, what="must be in (0, 1)"), default=0.05, help="fraction of train rows held out when there is no --eval-split")
    add("--gold-reward", type=_path, default=None, help="a Python file with score(prompt, completion) -> float; on by default for tiny_data")
    add("--output-dir", type=_path, default="out", help="where everything is written")
    add("--beta", type=beta, default=0.1, help="the baseline KL penalty β (the paper: 0.01 for instruct models on UltraFeedback)")
    add("--epsilon", type=_number(float, 0, low_open=False, high=1, what="epsilon must be in [0, 1)"), default=0.01, help="the perturbation ε; 0 is plain DPO")
    add("--fixed-baseline-beta", action="store_true", help="per-pair β̃ only: the baseline β never moves")
    add("--lr", type=_number(float, 0, what="the learning rate must be > 0"), default=None, help="AdamW's peak learning rate (the paper: 5e-7 on 7-8B models); None: 5e-4, or 3e-3 with --lora-r")
    add("--weight-decay", type=_number(float, 0, low_open=False, what="must be >= 0"), default=0.0, help="AdamW's weight decay")
    add("--warmup-ratio", type=_number(float, 0, low_open=False, high=1, what="must be in [0, 1)"), default=0.1, help="fraction of the steps over which the learning rate rises from 0")
    add("--max-grad-norm", type=_number(float, 0, what="must be > 0"), default=1.0, help="gradients are clipped to this norm")
    add("--batch-size", type=count, default=16, help="pairs per micro-batch")
    add("--grad-accum", type=count, default=1, help="micro-batches per optimizer step")
    add("--max-steps", type=count, default=None, help="optimizer steps; None: --epochs over the train split")
    add("--epochs", type=_number(float, 0, what="must be > 0"), default=2.0, help="passes over the train split, when --max-steps is not given")
    add("--max-length", type=_number(int, 2, low_open=False, what="must be >= 2"), default=512, help="prompt + completion tokens")
    add("--max-prompt-length", type=count, default=256, help="when a pair exceeds --max-length, its prompt keeps BOS and its last tokens up to this many")
    add("--dtype", choices=("auto", "float32", "bfloat16"), default="auto", help="bfloat16: mixed precision (float32 weights, bf16 autocast, the frozen weights autocast casts in bf16: the reference's, or LoRA's base); auto: bfloat16 on GPUs with bf16 arithmetic (compute capability >= 8.0)")
    add("--lora-r", type=_number(int, 0, low_open=False, what="must be >= 0"), default=0, help="train LoRA adapters of this rank (peft), the reference being the model with them off; 0: every weight (full fine-tuning)")
    add("--lora-alpha", type=_number(float, 0, what="must be > 0"), default=16.0, help="LoRA's scale: the adapters add (alpha / r) B A x")
    add("--lora-target", nargs="+", default=["all-linear"], help="the layers LoRA adapts (peft's target_modules, e.g. q_proj v_proj); all-linear: every linear layer but the output head")
    add("--gradient-checkpointing", action="store_true", help="recompute the policy's activations in backward (transformers' switch): less memory, more time")
    add("--fsdp", action="store_true", help="under torchrun: shard the policy, its gradients and AdamW state, and the reference across the processes (FSDP2) instead of copying them to each (DDP)")
    add("--eval-every", type=count, default=25, help="optimizer steps between evaluations")
    add("--eval-batch-size", type=count, default=64, help="pairs (or prompts to sample from) per evaluation batch")
    add("--max-new-tokens", type=count, default=32, help="length of the completions sampled for the gold reward")
    add("--criterion-pairs", type=_number(int, 0, low_open=False, what="must be >= 0"), default=1000, help="train pairs on which the final policy's s is compared with sign(h − ΔK) and sign(h), drawn in criterion.png; 0: none")
    add("--seed", type=_number(int, 0, low_open=False, high=2**32, what="must be in [0, 2**32)"), default=0, help="seeds the data order and the sampling")
    add("--device", default="auto", help="cuda, cuda:N, mps or cpu; auto: the first available")
    add("--skip-invalid", action="store_true", help="drop malformed rows (and report how many) instead of stopping at the first")
    add("--overwrite", action="store_true", help="replace the run in a non-empty --output-dir (its own files only)")
    add("--resume", type=_path, metavar="OUTPUT_DIR", default=None, help="continue the run in OUTPUT_DIR from its latest checkpoint, with its arguments")
    add("--save-every", type=count, default=100, help="optimizer steps between checkpoints (one is also written on Ctrl-C or SIGTERM)")
    add("--keep-checkpoints", type=count, default=2, help="how many of the latest checkpoints to keep")
    add("--trust-remote-code", action="store_true", help="run code from the model's repository")
    add("--compare", action="store_true", help="train DPO (ε = 0) and ε-DPO and show them side by side")
    add("--betas", type=beta, nargs="+", default=None, help="with --compare: the reward–KL frontier of DPO, ε-DPO and ε-DPO with a fixed baseline β over these β")
    add("--seeds", type=count, default=3, help="with --compare --betas: seeds per β (--seed, --seed + 1, ...)")
    args = p.parse_args(argv)
    if args.max_prompt_length >= args.max_length:
        p.error(f"--max-prompt-length {args.max_prompt_length} must be less than --max-length {args.max_length}, "
                f"so that every completion keeps a token")
    if args.lr is None:
        args.lr = 3e-3 if args.lora_r else 5e-4         # LoRA's few weights, starting at B = 0, need larger steps
    for action in p._actions:                   # parsed again without defaults: what the command line gave
        action.default = argparse.SUPPRESS
    given = set(vars(p.parse_args(argv)))
    if not args.compare and given & {"betas", "seeds"}:
        p.error(f"--{min(given & {'betas', 'seeds'})} is for --compare, which was not given")
    if not args.lora_r and given & {"lora_alpha", "lora_target"}:
        p.error("--lora-alpha and --lora-target apply only with --lora-r > 0")
    return args, given


# ----------------------------------------------------------------------------------------------------
# The loss of one micro-batch


def forward(policy, reference, batch, beta, epsilon, head=None):
    """One concatenated forward pass of chosen and rejected per model, then the ε-DPO loss: from the last hidden
    states when the output layer is a plain linear map (head, see models.linear_head), else from the logits."""
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    if head:                                                            # never a (2B, T, V) tensor
        hidden, weight = last_hidden_states(policy, inputs)                                         # (2B, T, H), (V, H)
        with torch.no_grad():
            ref_hidden, ref_weight = last_hidden_states(reference, inputs)
        return epsdpo.epsilon_dpo_loss_from_hidden(hidden, weight, ref_hidden, ref_weight, batch.input_ids,
                                                   batch.completion_mask, beta, epsilon, head.logit_softcap)
    logits = policy(**inputs).logits                                                                # (2B, T, V)
    with torch.no_grad():
        ref_logits = reference(**inputs).logits
    return epsdpo.epsilon_dpo_loss(logits, ref_logits, batch.input_ids, batch.completion_mask, beta, epsilon)


# ----------------------------------------------------------------------------------------------------
# Metrics: sums kept on the device, gathered from every rank once per optimizer step or evaluation


SUMS = ("pairs", "loss", "beta/pairs_mean", "s/weaker", "s/stronger", "rewards/chosen", "rewards/rejected",
        "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected", "h")
NOISE = [(noisy, s) for noisy in NOISE_CODES for s in (1, 0, -1)]       # pairs counted by noise flag and s


def pair_sums(out, noise, pairs=None):
    """The sums over one micro-batch's pairs (its first `pairs`), in the order of SUMS then NOISE: (21,)
    float64, no host sync."""
    chosen, rejected, s = out.chosen_rewards, out.rejected_rewards, out.s
    # A tie (h = 0, as at the first step) counts half: the reference model is right half the time.
    accuracies = (chosen > rejected).float() + 0.5 * (chosen == rejected).float()
    # h = z_θ − γ, the margin: comparable across runs, unlike the rewards' β̃ h when β differs.
    h = (out.chosen_logps - out.ref_chosen_logps) - (out.rejected_logps - out.ref_rejected_logps)
    sums = [torch.ones_like(chosen), out.losses.detach(), out.pair_betas, s == 1, s == -1, chosen, rejected,
            accuracies, chosen - rejected, out.chosen_logps.detach(), out.rejected_logps.detach(), h.detach()]
    sums = torch.stack([values[:pairs].double().sum() for values in sums])
    codes = (noise * 3 + 1 - s)[:pairs]                                 # the index of (noisy, s) in NOISE
    return torch.cat([sums, (codes[:, None] == torch.arange(len(NOISE), device=codes.device)).sum(0).double()])


def across_ranks(values):
    """(world size, K) on the host: every rank's vector of K values. One collective, one host sync."""
    if dist.is_available() and dist.is_initialized():
        parts = [torch.empty_like(values) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, values)
        values = torch.stack(parts)
    return values.reshape(-1, values.shape[-1]).cpu()


def means(totals):
    """TRL's metric names, each the mean over the pairs of the summed totals (laid out as SUMS)."""
    return {name: (totals[i] / totals[0]).item() for i, name in enumerate(SUMS) if i}


@torch.no_grad()
def sample_and_score(policy, reference, tokenizer, pairs, gold_reward, args, device, head=None):
    """One completion per prompt, sampled from the policy: [gold reward of each], [KL estimate of each]."""
    from transformers import GenerationConfig

    # Pure ancestral sampling: the KL estimate is only unbiased for samples of π_θ itself. generate() fills
    # every field left unset here from the model's own generation_config.json (repetition_penalty, top_k,
    # no_repeat_ngram_size, ...), so while sampling the model's defaults are a bare GenerationConfig.
    sampling = GenerationConfig(do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=args.max_new_tokens,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    rewards, kls, model_defaults = [], [], policy.generation_config
    policy.generation_config = GenerationConfig()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(args.seed)                                    # the same prompts get the same noise
            for start in range(0, len(pairs), args.eval_batch_size):
                chunk = pairs[start : start + args.eval_batch_size]
                prompt_ids, attention_mask = collate_prompts(chunk, tokenizer.pad_token_id, device)
                generated = policy.generate(input_ids=prompt_ids, attention_mask=attention_mask, generation_config=sampling,
                                            synced_gpus=sharded(policy))[:, prompt_ids.shape[1] :].tolist()
                samples = []
                for pair, new in zip(chunk, generated):
                    new = new[: new.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in new else new
                    samples.append({"prompt_ids": pair["prompt_ids"], "chosen_ids": new, "rejected_ids": new})
                    rewards.append(gold_score(gold_reward, pair["prompt"], tokenizer.decode(new, skip_special_tokens=True)))
                batch = collate(samples, tokenizer.pad_token_id, device)   # scored right-padded, as in training
                inputs = dict(input_ids=batch.input_ids[: len(samples)], attention_mask=batch.attention_mask[: len(samples)])
                scored = batch.completion_mask[: len(samples)]
                kls += sequence_kl(*(completion_logits(model, inputs, scored, head) for model in (policy, reference))).tolist()
    finally:
        policy.generation_config = model_defaults                      # saved with the model as it was
    return rewards, kls


@torch.no_grad()
def evaluate(policy, reference, tokenizer, eval_pairs, beta, gold_reward, args, device, head=None):
    """Metrics over the whole held-out split, with the current β (evaluation never moves β). Each rank
    takes its share of the pairs; the metrics are over all of them."""
    rank, ranks = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    shard = eval_pairs[rank::ranks]
    # Under FSDP every rank runs each forward pass (each gathers weights from all): a shorter share is
    # padded to the longest with a pair that is computed and counted nowhere.
    padded = shard + eval_pairs[:1] * (-(-len(eval_pairs) // ranks) - len(shard))
    sums = torch.zeros(len(SUMS) + len(NOISE), dtype=torch.float64, device=device)
    for i in range(0, len(padded), args.eval_batch_size):
        batch = collate(padded[i : i + args.eval_batch_size], tokenizer.pad_token_id, device)
        sums += pair_sums(forward(policy, reference, batch, beta, args.epsilon, head), batch.noise, pairs=len(shard) - i)
    rewards, kls = sample_and_score(policy, reference, tokenizer, padded, gold_reward, args, device, head) if gold_reward else ([], [])
    rewards, kls = rewards[: len(shard)], kls[: len(shard)]
    sample_sums = torch.tensor([sum(rewards), sum(kls), len(rewards)], dtype=torch.float64, device=device)
    totals = across_ranks(torch.cat([sums[: len(SUMS)], sample_sums])).sum(0)
    metrics = means(totals)
    if gold_reward:
        metrics["gold_reward"], metrics["kl"] = (totals[-3] / totals[-1]).item(), (totals[-2] / totals[-1]).item()
    return metrics


# ----------------------------------------------------------------------------------------------------
# One training run


def train(args, label="ε-DPO", checkpoint=None):
    """Train one policy; returns its summary (None on ranks other than 0). Writes to args.output_dir.

    checkpoint: (folder, state) to resume from, as latest_checkpoint() found it.
    """
    import datasets
    import transformers
    from tqdm.auto import tqdm

    datasets.disable_progress_bars()                                    # one progress bar: the training's
    transformers.utils.logging.disable_progress_bar()
    started = time.time()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    rank, world_size, device = init_distributed(args.device)            # rank 0 alone writes and prints
    output_dir = pathlib.Path(args.output_dir)
    # The folder is checked and locked before anything is loaded, and stays locked while the run lasts.
    with claim_on_rank_zero(output_dir, args, rank, world_size, device):
        autocast = precision(args.dtype, device)

        # Data
        tokenizer = load_tokenizer(tokenizer_name(args.model), args.trust_remote_code)
        if rank == 0:
            check_only_ours_replaced(output_dir, run_writes(tokenizer, args.lora_r > 0))
        train_rows, eval_rows, notes = load_splits(args.dataset, args.train_split, args.eval_split, args.eval_fraction, args.seed)
        lengths = (tokenizer, args.max_length, args.max_prompt_length, args.skip_invalid)
        (train_pairs, train_skipped, train_moved), (eval_pairs, eval_skipped, eval_moved) = (
            tokenize_rows(train_rows, *lengths), tokenize_rows(eval_rows, *lengths))
        if len(train_pairs) < args.batch_size * world_size or not eval_pairs:
            raise ReportedError(f"--dataset {args.dataset}: {len(train_pairs)} usable train pairs and {len(eval_pairs)} "
                                f"held-out pairs; need at least --batch-size × processes ({args.batch_size * world_size}) and 1")
        if rank == 0:
            print_data_report(notes, {"train": train_skipped, "eval": eval_skipped}, {"train": train_moved, "eval": eval_moved})
        gold_reward = load_gold_reward(args.gold_reward or (TINY_GOLD_REWARD if pathlib.Path(args.dataset).resolve() == TINY_DATASET else None))

        # Models
        models = setup_models(args, device, world_size, autocast is not None, tokenizer, train_pairs + eval_pairs, checkpoint)
        policy = models.policy
        trained_weights = [weight for weight in policy.parameters() if weight.requires_grad]  # LoRA: the adapters
        autocast = autocast or contextlib.nullcontext()
        pairs_per_step = args.batch_size * args.grad_accum * world_size
        total_steps = args.max_steps or max(1, int(args.epochs * len(train_pairs) // pairs_per_step))
        warmup_steps = int(args.warmup_ratio * total_steps)
        optimizer = torch.optim.AdamW(trained_weights, lr=args.lr, weight_decay=args.weight_decay)

        def learning_rate(step):
            """Of optimizer step `step` (from 1): linear warmup from 0, then linear decay to 0 at total_steps. A
            function of the step alone, so a run resumed with a larger --max-steps follows the schedule of a run
            planned with that many steps from where it stopped."""
            return args.lr * min(step / (warmup_steps + 1), (total_steps - step + 1) / max(1, total_steps - warmup_steps))
        baseline_beta = epsdpo.BaselineBeta(args.beta, args.epsilon, device=device)   # its counts: on the GPU under NCCL
        # Every rank draws the same global micro-batches of batch_size × world_size pairs and keeps its share:
        # N ranks see the pairs one process with N times the batch size would see.
        batches = (pairs[rank * args.batch_size : (rank + 1) * args.batch_size]
                   for pairs in micro_batches(train_pairs, args.batch_size * world_size, args.seed))
        s_by_noise, first_step, held = [0] * len(NOISE), 1, None            # pairs by (noise flag, s), as NOISE
        if checkpoint:
            folder, state = checkpoint
            load_checkpoint(folder, state, policy, optimizer)               # AdamW's state (and FSDP's shards)
            baseline_beta.load_state_dict(state["baseline_beta"])
            for _ in range(state["step"] * args.grad_accum):                # the data order is a function of the seed
                next(batches)
            s_by_noise = list(state["s_by_noise"])
            torch.set_rng_state(state["rng"]["torch"])
            random.setstate(state["rng"]["python"])
            first_step = state["step"] + 1
        if rank == 0:
            prepare_output_dir(output_dir, first_step - 1 if checkpoint else None)   # all checks passed: now change it
            lora = (f", LoRA r = {args.lora_r}: {sum(w.numel() for w in trained_weights):,} of "
                    f"{sum(w.numel() for w in policy.parameters()):,} weights train") if args.lora_r else ""
            print(((f"resuming from {checkpoint[0]} at step {first_step}\n" if first_step <= total_steps else
                    f"{checkpoint[0]} is the run's last step; its final save did not complete: saving it\n") if checkpoint else "") +
                  f"{label}: {len(train_pairs)} train pairs, {len(eval_pairs)} held out, {total_steps} steps of "
                  f"{pairs_per_step} pairs on {world_size} × {device}, β = {args.beta}, ε = {args.epsilon}{lora}" +
                  ("" if models.head else f"\nthe loss from full (2B, T, V) logits: {models.head_note}"))

        def log(row):
            if rank == 0:
                append_metrics(output_dir, row)

        def log_evaluation(step):
            with autocast:
                metrics = evaluate(policy, models.reference, tokenizer, eval_pairs, baseline_beta.value, gold_reward, args, device, models.head)
            log({"step": step, "split": "eval", "beta": baseline_beta.value, "lr": learning_rate(step + 1), **metrics})

        def save_checkpoint(step):
            state = {"step": step, "baseline_beta": baseline_beta.state_dict(), "s_by_noise": s_by_noise, "args": vars(args),
                     "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}}
            write_checkpoint(output_dir, step, policy, optimizer, state, args.keep_checkpoints)

        def stop_after(step):
            """Ctrl-C or SIGTERM: a checkpoint of the last whole step, and exit with the signal's status."""
            progress.close()
            if step >= 1:
                save_checkpoint(step)
            if rank == 0:
                print(f"stopped by signal {stop.signal} after step {step}; " + (
                      f"checkpoint written: python train.py --resume {output_dir} continues the run" if step else "nothing to resume"))
            sys.exit(128 + stop.signal)

        # Loop. Ctrl-C or SIGTERM finishes the optimizer step under way (in a single process, drops a half-
        # accumulated one), writes a checkpoint and stops; a second one stops at once.
        if first_step == 1:
            log_evaluation(0)
        progress = tqdm(range(first_step, total_steps + 1), desc=label, disable=None if rank == 0 else True)
        with stop_signals.training() as stop:
            for step in progress:
                beta = baseline_beta.value
                sums = torch.zeros(len(SUMS) + len(NOISE), dtype=torch.float64, device=device)
                for micro_batch in range(args.grad_accum):
                    if stop.signal is not None and world_size == 1:
                        optimizer.zero_grad(set_to_none=True)
                        baseline_beta.load_state_dict({**baseline_beta.state_dict(), "counts": [0, 0, 0]})
                        stop_after(step - 1)
                    batch = collate(next(batches), tokenizer.pad_token_id, device)
                    with models.no_sync(last_micro_batch=micro_batch == args.grad_accum - 1):
                        with autocast, training_mode(models.layers):
                            out = forward(models.trained, models.reference, batch, beta, args.epsilon, models.head)
                        (out.loss / args.grad_accum).backward()
                    if not args.fixed_baseline_beta:
                        baseline_beta.observe(out.s)
                    sums += pair_sums(out, batch.noise)
                grad_norm = local(torch.nn.utils.clip_grad_norm_(trained_weights, args.max_grad_norm))  # FSDP: over all shards
                # What the step needs on the host, from every rank, in one collective: the sums, the gradient
                # norm, the β each rank used and whether it got a signal.
                flags = torch.tensor([beta, stop.signal is not None], dtype=torch.float64).to(device)
                ranks = across_ranks(torch.cat([sums, grad_norm.double().reshape(1), flags]))
                totals, grad_norm = ranks.sum(0), ranks[0, -3].item()
                if not (math.isfinite(totals[1].item()) and math.isfinite(grad_norm)):
                    latest = our_checkpoints(output_dir)[-1:]
                    raise ReportedError(f"step {step}: the loss or the gradient is not finite (gradient norm {grad_norm}); "
                                        f"stopped before applying it. " + (f"The last checkpoint, {latest[0]}, is intact: "
                                        f"--resume {output_dir} continues from it." if latest else "No checkpoint was written yet."))
                lr = learning_rate(step)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.step()
                if step == first_step:                                      # every state exists now: its size on this rank
                    held = held_bytes(policy, optimizer, models.reference)
                optimizer.zero_grad(set_to_none=True)
                baseline_beta.step()                                        # β ← mean β̃ of this step's pairs
                step_counts = [int(count) for count in totals[len(SUMS) : -3].tolist()]
                s_by_noise = [seen + new for seen, new in zip(s_by_noise, step_counts)]

                row = {"step": step, "split": "train", "beta": beta, "lr": lr, **means(totals), "grad_norm": grad_norm,
                       **{f"s/{kind}/{group}": f[kind] for group, f in s_fractions(step_counts).items() if group != "all"
                          for kind in ("weaker", "stronger")}}
                if not args.fixed_baseline_beta:
                    row["beta/pairs_mean"] = baseline_beta.value            # the same mean of β̃, in float64
                if world_size > 1:
                    row["beta/ranks"] = ranks[:, -2].tolist()               # the β each rank used: all the same
                log(row)
                progress.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['rewards/accuracies']:.2f}", beta=f"{beta:.4f}")
                if step % args.eval_every == 0 or step == total_steps:
                    log_evaluation(step)
                stopping = bool(ranks[:, -1].any())
                if stopping and step < total_steps:
                    stop_after(step)
                if step % args.save_every == 0:
                    save_checkpoint(step)

        # What the criterion measured on the final policy, and criterion.png (every rank computes, rank 0 draws)
        criterion = criterion_figure(policy, models.reference, train_pairs[: args.criterion_pairs], tokenizer.pad_token_id, args.epsilon,
                                     forward, models.head, autocast, output_dir / "criterion.png" if rank == 0 else None, args.eval_batch_size)

        # Saving (under FSDP, every rank first sends its shards to rank 0's CPU memory)
        state_dict = gathered_state_dict(policy)
        if rank != 0:
            return None
        evaluations = [row for row in read_metrics(output_dir) if row["split"] == "eval"]
        summary = {
            "label": label, "args": vars(args), "device": str(device), "steps": total_steps,
            "train_pairs": len(train_pairs), "eval_pairs": len(eval_pairs),
            "skipped": {"train": train_skipped, "eval": eval_skipped},
            "boundary_moved": {"train": train_moved, "eval": eval_moved},
            "final_beta": baseline_beta.value, "start": evaluations[0], "final": evaluations[-1],
            "s_by_noise": s_fractions(s_by_noise), "criterion": criterion,
            "seconds": round(time.time() - started, 1), "bytes_held_by_rank_0": held,
        }
        plot_curves({label: read_metrics(output_dir)}, output_dir / "curves.png")
        # summary.json, listing the model's files, then the files: a run killed in between is known to be unsaved.
        summary["saved"] = save_pretrained_atomically(output_dir, policy, tokenizer, summary, state_dict)
        return summary


# ----------------------------------------------------------------------------------------------------
# Comparisons: DPO and ε-DPO side by side, and the reward–KL frontier of three methods


METHODS = (("DPO", "dpo", {"epsilon": 0.0}), ("ε-DPO", "epsilon-dpo", {}),
           ("ε-DPO, fixed baseline β", "epsilon-dpo-fixed-beta", {"fixed_baseline_beta": True}))


def compare(args, given):
    """--compare: DPO and ε-DPO from the same start and data order. With --betas, the three METHODS for
    every β and seed: the DPO paper's reward–KL frontier, written to frontier.json and frontier.png."""
    output_dir = pathlib.Path(args.output_dir)
    if args.betas and not (args.gold_reward or pathlib.Path(args.dataset).resolve() == TINY_DATASET):
        raise ReportedError("--compare --betas plots the gold reward against KL: it needs --gold-reward FILE")
    runs = []
    for beta in args.betas or [args.beta]:
        for seed in range(args.seed, args.seed + (args.seeds if args.betas else 1)):
            for label, folder, changes in METHODS if args.betas else METHODS[:2]:
                where = output_dir / f"beta-{beta:g}" / f"seed-{seed}" / folder if args.betas else output_dir / folder
                # The frontier needs each run's end: evaluated at the start and the end, unless --eval-every is given.
                eval_every = sys.maxsize if args.betas and "eval_every" not in given else args.eval_every
                runs.append((argparse.Namespace(**{**vars(args), **changes, "beta": beta, "seed": seed, "compare": False,
                                                   "betas": None, "eval_every": eval_every, "output_dir": str(where)}), label))
    rank, world_size, device = init_distributed(args.device)
    with claim_output_dir(output_dir, args) if rank == 0 else contextlib.nullcontext():
        if rank == 0:                                                   # compare.png, or frontier.json and .png
            names = FRONTIER_FILES if args.betas else COMPARE_FILES
            check_only_ours_replaced(output_dir, lambda name: name in names)
        frontier_on_cpus = args.betas and world_size == 1 and device.type == "cpu"
        summaries = side_by_side(runs) if frontier_on_cpus else one_after_another(runs, rank)
        if summaries[0] is None:                                        # not rank 0
            return
        if not args.betas:
            plot_curves({s["label"]: read_metrics(s["args"]["output_dir"]) for s in summaries}, output_dir / "compare.png")
            print_summary(summaries)
            print(f"side by side: {output_dir / 'compare.png'}")
            return
        points = frontier_points(summaries)
        write_atomically(output_dir / "frontier.json", json.dumps(points, indent=2) + "\n")
        plot_frontier(points, output_dir / "frontier.png")
        print_frontier(points)
        print(f"{len(summaries)} runs: {output_dir / 'frontier.json'}, {output_dir / 'frontier.png'}")


def one_after_another(runs, rank):
    """train(*run) for every run in turn. A signal stops the run under way (with its checkpoint) and the rest."""
    summaries = []
    try:
        for run in runs:
            summaries.append(train(*run))
    except (SystemExit, StopNow):
        if stop_signals.signal is not None and rank == 0:
            print(f"the comparison stopped: {len(summaries)} of {len(runs)} runs had finished; the others did not start")
        raise
    return summaries


def side_by_side(runs):
    """train(*run) for every run, in processes of one thread each, one per core, quietly: a model as small as
    tiny_data's gains little from a second thread, and much from a second process. A line per run done.

    Ctrl-C or SIGTERM stops them all within seconds: the runs under way finish their step and write a
    checkpoint (the signal is passed on to them, as a Ctrl-C in a terminal also sends it), and the queued
    runs never start."""
    import concurrent.futures
    import multiprocessing

    others, spawn = set(multiprocessing.active_children()), multiprocessing.get_context("spawn")
    stopping = spawn.Event()                    # set: the runs a worker has taken but not begun return at once
    with concurrent.futures.ProcessPoolExecutor(min(os.cpu_count() or 1, len(runs)), spawn, initializer=_worker_starts,
                                                initargs=(stopping,)) as pool:
        futures = [pool.submit(_quietly_on_one_thread, *run) for run in runs]
        try:
            for done, future in enumerate(concurrent.futures.as_completed(futures), start=1):
                s = future.result()
                print(f"{done}/{len(runs)} {s['label']}, β = {s['args']['beta']}, seed {s['args']['seed']}: gold reward "
                      f"{s['final']['gold_reward']:+.2f}, KL {s['final']['kl']:.2f}, final β {s['final_beta']:.4f} ({s['seconds']} s)")
        except StopNow as stopped:
            stopping.set()
            for worker in set(multiprocessing.active_children()) - others:     # idle workers ignore SIGINT
                os.kill(worker.pid, signal.SIGINT)
            pool.shutdown(wait=True, cancel_futures=True)
            results = [f.result() if f.done() and not f.cancelled() and f.exception() is None else False for f in futures]
            finished = sum(isinstance(result, dict) for result in results)
            stopped_runs = [run[0].output_dir for run, f in zip(runs, futures) if f.done() and not f.cancelled()
                            and f.exception() is not None and our_checkpoints(run[0].output_dir)]
            print(f"stopped by signal {stopped.signal}: {finished} of {len(runs)} runs finished, {len(stopped_runs)} stopped "
                  f"with a checkpoint (python train.py --resume DIR continues each: {', '.join(stopped_runs) or 'none'}), "
                  f"{sum(f.cancelled() or result is None for f, result in zip(futures, results))} did not start")
            sys.exit(128 + stopped.signal)
    return [future.result() for future in futures]


def _worker_starts(stopping):
    global _stopping
    _stopping = stopping
    signal.signal(signal.SIGINT, signal.SIG_IGN)                         # while idle; train() stops on it


def _quietly_on_one_thread(args, label):
    torch.set_num_threads(1)
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), contextlib.redirect_stderr(devnull):
        with stop_signals:
            return None if _stopping.is_set() else train(args, label)


# ----------------------------------------------------------------------------------------------------
# The command line


def main(argv=None):
    args, given = parse_args(argv)
    first_rank = os.environ.get("RANK", "0") == "0"                     # under torchrun, rank 0 alone explains
    try:
        with stop_signals:                                              # Ctrl-C and SIGTERM, from here to the end
            try:
                checkpoint = None
                if args.resume:
                    args, checkpoint = resumed_args(args, given, lambda argv: parse_args(argv, report=True)[0])
                if args.compare:
                    compare(args, given)
                else:
                    summary = train(args, checkpoint=checkpoint)
                    if summary:                                         # rank 0
                        print_summary([summary])
            finally:
                if dist.is_available() and dist.is_initialized():
                    dist.destroy_process_group()
    except (ReportedError, OSError) as error:                           # OSError: a full disk, say
        sys.exit(f"error: {error}" if first_rank else 1)
    except StopNow as stopped:
        print(f"stopped by signal {stopped.signal} before training started; nothing was written to resume from",
              file=sys.stderr)
        sys.exit(128 + stopped.signal)
    except KeyboardInterrupt:
        sys.exit("error: stopped at once by a second signal; the last checkpoint is as it was")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
