"""Train a causal language model with ε-DPO (epsdpo.py) on preference pairs.

    python train.py                      # the demo: tiny_data/ on a laptop CPU, in about 30 s on 2 cores
    python train.py --lora-r 8           # LoRA adapters; the reference is the model with them off
    python train.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset trl-lib/ultrafeedback_binarized \\
        --beta 0.01 --lr 5e-7 --batch-size 2 --grad-accum 32 --max-length 1024
    torchrun --nproc_per_node 8 train.py --fsdp ...      # sharded over 8 GPUs
    python compare.py                    # DPO and ε-DPO side by side; --betas: the reward–KL frontier

One straight path, train() below: data, models, the loop, evaluation, saving. Every flag and its default is in
training/arguments.py (python train.py --help lists them). Writes to --output-dir: metrics.jsonl (a row per
optimizer step and per evaluation), summary.json, curves.png, criterion.png, checkpoint-STEP/ folders, and the
trained model and tokenizer (save_pretrained). The machinery it calls lives in training/, one module per concern.
"""

import contextlib
import math
import os
import pathlib
import random
import sys
import time

if __name__ == "__main__":  # before the imports below take seconds: Ctrl-C there is one line
    from training import signals

    signals.stop_at_once_on_ctrl_c()

import torch

import epsdpo
from training.adapters import tokenizer_name
from training.arguments import MAX_BETA, parse_args
from training.async_checkpoints import CheckpointSaver
from training.batches import collate, micro_batches
from training.checkpoints import restore_checkpoint, resume_command, resumed_args, save_pretrained_atomically
from training.data import gold_reward_path, load_gold_reward, load_pairs, load_tokenizer
from training.errors import ReportedError, run_command
from training.evaluation import (
    NOISE,
    SIGNAL,
    SUMS,
    criterion_measures,
    evaluate,
    gather_step,
    pair_sums,
    s_counts,
    train_row,
)
from training.fingerprints import checked_inputs
from training.loss import micro_batch_loss
from training.models import held_bytes, init_distributed, make_optimizer, precision, setup_models, training_mode
from training.output_folder import (
    append_metrics,
    check_only_ours_replaced,
    claim_on_rank_zero,
    our_checkpoints,
    prepare_output_dir,
    read_metrics,
    run_writes,
)
from training.reports import (
    plot_criterion,
    plot_curves,
    print_data_report,
    print_start,
    print_summary,
    progress_bar,
    quiet_libraries,
    run_label,
    run_summary,
)
from training.sharding import clip_gradient_norm, gathered_state_dict
from training.signals import signal_name, stop_signals


def learning_rate(step, args, total_steps):
    """Of optimizer step `step` (from 1): linear warmup from 0 over --warmup-ratio of the steps, then linear decay to
    0 at total_steps. A function of the step alone, so a run resumed with a larger --max-steps follows the schedule
    of a run planned with that many steps from where it stopped."""
    warmup_steps = int(args.warmup_ratio * total_steps)
    return args.lr * min(step / (warmup_steps + 1), (total_steps - step + 1) / max(1, total_steps - warmup_steps))


def train(args, checkpoint=None):
    """Train one policy into args.output_dir; its summary on rank 0. checkpoint: (folder, state) to resume from."""
    started = time.time()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    rank, world_size, device = init_distributed(args.device, args.dist_timeout)  # rank 0 alone writes and prints
    output_dir, pairs_a_step = pathlib.Path(args.output_dir), args.batch_size * args.grad_accum * world_size
    with claim_on_rank_zero(output_dir, args, rank, world_size, device):  # checked and locked before anything loads
        # Data: the pairs tokenized; resuming, refused unless they are what the run read (inputs, fingerprinted)
        tokenizer, data, inputs, gold_reward = load_data(args, output_dir, rank, pairs_a_step, checkpoint)
        train_pairs, eval_pairs = data["pairs"]["train"], data["pairs"]["eval"]

        # Models, optimizer and baseline β; resuming, their state from the checkpoint
        autocast = precision(args.dtype, device)  # bf16 autocast, or None for float32
        all_pairs, mixed_precision = train_pairs + eval_pairs, autocast is not None
        models = setup_models(args, device, world_size, mixed_precision, tokenizer, all_pairs, checkpoint)
        policy, autocast = models.policy, autocast or contextlib.nullcontext()
        trained_weights = [weight for weight in policy.parameters() if weight.requires_grad]  # LoRA: the adapters
        optimizer = make_optimizer(trained_weights, args, device)  # AdamW (fused on CUDA)
        baseline_beta = epsdpo.BaselineBeta(args.beta, args.epsilon, min_beta=args.min_beta, max_beta=MAX_BETA)
        total_steps = args.max_steps or max(1, int(args.epochs * len(train_pairs)) // pairs_a_step)
        # Resuming: the checkpoint's state. batches: this rank's share of each step from first_step, seeded.
        first_step, s_by_noise = restore_checkpoint(checkpoint, policy, optimizer, baseline_beta)
        batches = micro_batches(train_pairs, args.batch_size, args.grad_accum, world_size, rank, args.seed, first_step)
        if rank == 0:
            prepare_output_dir(output_dir, first_step - 1 if checkpoint else None, checkpoint)  # all checks passed
            print_start(args, checkpoint, first_step, total_steps, data, world_size, device, models)

        def log_evaluation(step):  # held-out metrics with the β of the next step; evaluation never moves β
            with autocast:
                metrics = evaluate(models, tokenizer, eval_pairs, baseline_beta.value, gold_reward, args, device)
            if rank == 0:
                lr = learning_rate(step + 1, args, total_steps)
                append_metrics(output_dir, dict(step=step, split="eval", beta=baseline_beta.value, lr=lr) | metrics)

        def stop_after(step, signal):  # Ctrl-C or SIGTERM on any rank: a checkpoint of the last whole step, then exit
            progress.close()
            optimizer.zero_grad(set_to_none=True)  # a half-accumulated step's gradients are dropped
            if step >= 1:  # the checkpoint under way first: both appear whole
                saver.save(step, policy, optimizer, baseline_beta, s_by_noise, wait=True)
            exit_stopped(signal, step, output_dir, rank == 0)

        # The loop
        if first_step == 1:
            log_evaluation(0)
        progress, held = progress_bar(range(first_step, total_steps + 1), args, rank), None
        trained, reference = models.trained, models.reference  # the policy as it trains (DDP: wrapped), the reference
        # Ctrl-C or SIGTERM ends the step under way, then stop_after; saver writes the checkpoints (FSDP: in a thread)
        with stop_signals.training() as stop, CheckpointSaver(output_dir, args, inputs) as saver:
            for step in progress:
                beta = baseline_beta.value  # the β of every pair of this step
                sums = torch.zeros(len(SUMS) + len(NOISE), dtype=torch.float64, device=device)
                for micro_batch in range(args.grad_accum):
                    if stop.signal is not None and world_size == 1:  # one process: the step is dropped at once
                        stop_after(step - 1, stop.signal)
                    batch = collate(next(batches), tokenizer.pad_token_id, device)
                    with models.no_sync(last_micro_batch=micro_batch == args.grad_accum - 1):
                        with autocast, training_mode(models.layers):
                            out = micro_batch_loss(trained, reference, batch, beta, args.epsilon, models.head)
                        (out.loss / args.grad_accum).backward()
                    sums += pair_sums(out, batch.noise)  # on the device: no wait
                grad_norm = clip_gradient_norm(trained_weights, args.max_grad_norm)  # under FSDP: over all shards
                # One collective, one wait a step: every rank's sums (s counts too), grad norm, β, write done, signal
                ranks, totals, grad_norm = gather_step(sums, grad_norm, beta, saver.written(), stop.signal or 0)
                check_finite(step, totals[SUMS.index("loss")].item(), grad_norm, saver)
                lr = learning_rate(step, args, total_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.step()
                held = held or held_bytes(policy, optimizer, models.reference)  # its states exist: their size
                optimizer.zero_grad(set_to_none=True)
                # β ← mean β̃ of this step's pairs, every rank's (with --fixed-baseline-beta, β never moves)
                next_beta = None if args.fixed_baseline_beta else baseline_beta.step(s_counts(totals))
                row, step_counts = train_row(step, beta, lr, ranks, grad_norm, next_beta)
                s_by_noise = [seen + new for seen, new in zip(s_by_noise, step_counts, strict=True)]
                if rank == 0:
                    append_metrics(output_dir, row)
                progress.set_postfix(loss=round(row["loss"], 3), acc=row["rewards/accuracies"], beta=round(beta, 4))
                if step % args.eval_every == 0 or step == total_steps:
                    log_evaluation(step)
                if ranks[:, SIGNAL].any() and step < total_steps:  # every rank stops, with the signal one of them got
                    stop_after(step, int(ranks[:, SIGNAL].max()))
                saver.after_step(step, ranks, policy, optimizer, baseline_beta, s_by_noise)  # every --save-every steps

        # What the criterion measures on the final policy (every rank computes, rank 0 draws criterion.png)
        with autocast:
            measured = criterion_measures(models, train_pairs[: args.criterion_pairs], tokenizer.pad_token_id, args)
        state_dict = gathered_state_dict(policy)  # under FSDP every rank sends its shards to rank 0's CPU memory
        if rank != 0:
            return None
        if measured:
            plot_criterion(measured, args.epsilon, output_dir / "criterion.png")
        rows, seconds = read_metrics(output_dir), time.time() - started
        plot_curves({run_label(args): rows}, output_dir / "curves.png")
        summary = run_summary(
            args, device, total_steps, data, baseline_beta.value, rows, s_by_noise, measured, seconds, held
        )
        # summary.json, listing the model's files, then the files: a run killed in between is known to be unsaved.
        summary["saved"] = save_pretrained_atomically(output_dir, policy, tokenizer, summary, state_dict)
        return summary


def load_data(args, output_dir, rank, pairs_a_step, checkpoint):
    """(tokenizer, the tokenized pairs, what the run reads fingerprinted, the gold reward's score or None): the data
    step of train(). Resuming, the fingerprints must be the checkpoint's, or ReportedError naming what changed."""
    quiet_libraries()  # one progress bar, the training's
    tokenizer = load_tokenizer(tokenizer_name(args.model, args.model_base), args.trust_remote_code, args.model)
    if rank == 0:
        check_only_ours_replaced(output_dir, run_writes(tokenizer, args.lora_r > 0), checkpoint)
    splits = (args.dataset, args.train_split, args.eval_split, args.eval_fraction, args.seed)
    data = load_pairs(*splits, tokenizer, args.max_length, args.max_prompt_length, args.skip_invalid, pairs_a_step)
    if rank == 0:
        print_data_report(data["notes"], data["skipped"], data["boundary_moved"])
    return tokenizer, data, checked_inputs(args, data, checkpoint), load_gold_reward(gold_reward_path(args))


def check_finite(step, loss, grad_norm, saver):
    """Stop before applying a step whose loss or gradient is NaN or infinite, naming the checkpoint to go on from
    (saver: the run's CheckpointSaver; a checkpoint it writes in the background, of an earlier step, is finished)."""
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        saver.finish()  # every rank is here: the step's totals are every rank's
        output_dir = saver.output_dir
        latest = our_checkpoints(output_dir)[-1:]
        go_on = f"The last checkpoint, {latest[0]}, is intact: {resume_command(output_dir)} continues from it."
        raise ReportedError(
            f"step {step}: the loss or the gradient is not finite (gradient norm {grad_norm}); stopped before applying "
            f"it. {go_on if latest else 'No checkpoint was written yet.'}"
        )


def exit_stopped(number, step, output_dir, says):
    """Exit with the status of signal `number`, the run stopped after `step`; `says`: the process that prints it."""
    if says:
        resume = f"checkpoint written: {resume_command(output_dir)} continues the run"
        print(f"stopped by {signal_name(number)} after step {step}; {resume if step else 'nothing to resume'}")
    sys.exit(128 + number)


def main(argv=None):
    args, given = parse_args(argv, description=__doc__)

    def run():
        checkpoint = None
        if args.resume:  # the run's own arguments, with those a resume may change
            run_args, checkpoint = resumed_args(args, given, lambda argv: parse_args(argv, report=True)[0])
        summary = train(run_args if checkpoint else args, checkpoint=checkpoint)
        if summary:  # rank 0
            print_summary([summary])

    run_command(run)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
