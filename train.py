"""Train a causal language model with ε-DPO (epsdpo.py) on preference pairs (data.py).

    python train.py                      # the demo: tiny_data/ on a laptop CPU, in about 30 s on 2 cores
    python train.py --lora-r 8           # LoRA adapters; the reference is the model with them off
    python train.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset trl-lib/ultrafeedback_binarized \\
        --beta 0.01 --lr 5e-7 --batch-size 2 --grad-accum 32 --max-length 1024
    torchrun --nproc_per_node 8 train.py --fsdp ...      # sharded over 8 GPUs
    python compare.py                    # DPO and ε-DPO side by side; --betas: the reward–KL frontier

One straight path, train() below: arguments, data, models, loop, evaluation, saving. Every default is in
parse_args. Writes to --output-dir: metrics.jsonl (a row per optimizer step and per evaluation), summary.json,
curves.png, criterion.png, checkpoint-STEP/ folders, and the trained model and tokenizer (save_pretrained).
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
from training.arguments import MAX_BETA, TINY_DATASET, TINY_GOLD_REWARD, parse_args
from training.batches import collate, micro_batches, to_device
from training.checkpoints import (
    restore_checkpoint,
    resume_command,
    resumed_args,
    save_checkpoint,
    save_pretrained_atomically,
)
from training.data import load_gold_reward, load_pairs, load_tokenizer
from training.errors import ReportedError, run_command
from training.evaluation import NOISE, SUMS, across_ranks, criterion_measures, evaluate, pair_sums, s_counts, train_row
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
from training.reports import plot_criterion, plot_curves, print_data_report, print_start, print_summary, run_summary
from training.sharding import gathered_state_dict, local
from training.signals import stop_signals

# ----------------------------------------------------------------------------------------------------
# One training run


def learning_rate(step, args, total_steps):
    """Of optimizer step `step` (from 1): linear warmup from 0 over --warmup-ratio of the steps, then linear decay to
    0 at total_steps. A function of the step alone, so a run resumed with a larger --max-steps follows the schedule
    of a run planned with that many steps from where it stopped."""
    warmup_steps = int(args.warmup_ratio * total_steps)
    return args.lr * min(step / (warmup_steps + 1), (total_steps - step + 1) / max(1, total_steps - warmup_steps))


def one_progress_bar():
    """tqdm, the training's progress bar, with the libraries' own bars (loading, mapping) off."""
    import datasets
    import transformers
    from tqdm.auto import tqdm

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    return tqdm


def exit_stopped(number, step, output_dir, says):
    """Exit with the status of signal `number`, the run stopped after `step`; `says`: the process that prints it."""
    if says:
        print(
            f"stopped by signal {number} after step {step}; "
            + (f"checkpoint written: {resume_command(output_dir)} continues the run" if step else "nothing to resume")
        )
    sys.exit(128 + number)


def check_finite(step, loss, grad_norm, output_dir):
    """Stop before applying a step whose loss or gradient is NaN or infinite, naming the checkpoint to go on from."""
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        latest = our_checkpoints(output_dir)[-1:]
        raise ReportedError(
            f"step {step}: the loss or the gradient is not finite (gradient norm {grad_norm}); stopped "
            f"before applying it. "
            + (
                f"The last checkpoint, {latest[0]}, is intact: {resume_command(output_dir)} continues from it."
                if latest
                else "No checkpoint was written yet."
            )
        )


def train(args, label="ε-DPO", checkpoint=None):
    """Train one policy into args.output_dir; returns its summary on rank 0. checkpoint: (folder, state) to resume
    from."""
    started = time.time()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    rank, world_size, device = init_distributed(args.device, args.dist_timeout)  # rank 0 alone writes and prints
    output_dir = pathlib.Path(args.output_dir)
    # The folder is checked and locked before anything is loaded, and stays locked while the run lasts.
    with claim_on_rank_zero(output_dir, args, rank, world_size, device):
        tqdm, autocast = one_progress_bar(), precision(args.dtype, device)

        # Data
        tokenizer = load_tokenizer(tokenizer_name(args.model, args.model_base), args.trust_remote_code, args.model)
        if rank == 0:
            check_only_ours_replaced(output_dir, run_writes(tokenizer, args.lora_r > 0))
        data = load_pairs(
            args.dataset,
            args.train_split,
            args.eval_split,
            args.eval_fraction,
            args.seed,
            tokenizer,
            args.max_length,
            args.max_prompt_length,
            args.skip_invalid,
            least=args.batch_size * args.grad_accum * world_size,
        )
        train_pairs, eval_pairs = data["pairs"]["train"], data["pairs"]["eval"]
        if rank == 0:
            print_data_report(data["notes"], data["skipped"], data["boundary_moved"])
        inputs = checked_inputs(args, data, checkpoint)  # resuming: refused unless what the run read
        gold_reward = load_gold_reward(
            args.gold_reward or (TINY_GOLD_REWARD if pathlib.Path(args.dataset).resolve() == TINY_DATASET else None)
        )

        # Models, optimizer, baseline β; and, resuming, the checkpoint's state
        models = setup_models(
            args, device, world_size, autocast is not None, tokenizer, train_pairs + eval_pairs, checkpoint
        )
        policy, autocast = models.policy, autocast or contextlib.nullcontext()
        trained_weights = [weight for weight in policy.parameters() if weight.requires_grad]  # LoRA: the adapters
        optimizer = make_optimizer(trained_weights, args, device)  # AdamW (fused on CUDA)
        baseline_beta = epsdpo.BaselineBeta(args.beta, args.epsilon, min_beta=args.min_beta, max_beta=MAX_BETA)
        total_steps = args.max_steps or max(
            1, int(args.epochs * len(train_pairs) // (args.batch_size * args.grad_accum * world_size))
        )
        first_step, s_by_noise, held = 1, [0] * len(NOISE), None  # pairs by (noise flag, s), as NOISE
        if checkpoint:
            first_step, s_by_noise = restore_checkpoint(checkpoint, policy, optimizer, baseline_beta)
        # This rank's share of every step from first_step: a step's pairs follow from the seed and the pairs a step.
        batches = micro_batches(train_pairs, args.batch_size, args.grad_accum, world_size, rank, args.seed, first_step)
        if rank == 0:
            prepare_output_dir(output_dir, first_step - 1 if checkpoint else None)  # all checks passed: now change it
            print_start(
                args,
                label,
                checkpoint,
                first_step,
                total_steps,
                len(train_pairs),
                len(eval_pairs),
                world_size,
                device,
                trained_weights,
                policy,
                models.loss_note,
            )

        def log_evaluation(step):
            with autocast:
                metrics = evaluate(models, tokenizer, eval_pairs, baseline_beta.value, gold_reward, args, device)
            if rank == 0:
                append_metrics(
                    output_dir,
                    {
                        "step": step,
                        "split": "eval",
                        "beta": baseline_beta.value,
                        "lr": learning_rate(step + 1, args, total_steps),
                        **metrics,
                    },
                )

        def stop_after(step):
            """Ctrl-C or SIGTERM: a checkpoint of the last whole step, and exit with the signal's status."""
            progress.close()
            if step >= 1:
                save_checkpoint(output_dir, step, policy, optimizer, baseline_beta, s_by_noise, args, inputs)
            exit_stopped(stop.signal, step, output_dir, rank == 0)

        # Loop. Ctrl-C or SIGTERM ends the step under way (one process: drops a half-accumulated one), checkpoints,
        # stops.
        if first_step == 1:
            log_evaluation(0)
        progress = tqdm(range(first_step, total_steps + 1), desc=label, disable=None if rank == 0 else True)
        with stop_signals.training() as stop:
            for step in progress:
                beta = baseline_beta.value  # the β of every pair of this step
                sums = torch.zeros(len(SUMS) + len(NOISE), dtype=torch.float64, device=device)
                for micro_batch in range(args.grad_accum):
                    if stop.signal is not None and world_size == 1:
                        optimizer.zero_grad(set_to_none=True)
                        stop_after(step - 1)
                    batch = collate(next(batches), tokenizer.pad_token_id, device)
                    with models.no_sync(last_micro_batch=micro_batch == args.grad_accum - 1):
                        with autocast, training_mode(models.layers):
                            out = micro_batch_loss(
                                models.trained, models.reference, batch, beta, args.epsilon, models.head
                            )
                        (out.loss / args.grad_accum).backward()
                    sums += pair_sums(out, batch.noise)
                grad_norm = local(
                    torch.nn.utils.clip_grad_norm_(trained_weights, args.max_grad_norm)
                )  # FSDP: over all shards
                # What the step needs on the host, from every rank, in one collective and one wait for the device:
                # the sums (s counts among them), the gradient norm, the β each rank used and whether it got a signal.
                flags = to_device([torch.tensor([beta, stop.signal is not None], dtype=torch.float64)], device)[
                    0
                ]  # no wait
                ranks = across_ranks(torch.cat([sums, grad_norm.double().reshape(1), flags]))
                totals, grad_norm = ranks.sum(0), ranks[0, -3].item()
                check_finite(step, totals[SUMS.index("loss")].item(), grad_norm, output_dir)
                lr = learning_rate(step, args, total_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.step()
                if step == first_step:  # every state exists now: its size on this rank
                    held = held_bytes(policy, optimizer, models.reference)
                optimizer.zero_grad(set_to_none=True)
                if not args.fixed_baseline_beta:
                    baseline_beta.step(s_counts(totals))  # β ← mean β̃ of this step's pairs, all ranks'
                row, step_counts = train_row(
                    step, beta, lr, ranks, grad_norm, None if args.fixed_baseline_beta else baseline_beta.value
                )
                s_by_noise = [seen + new for seen, new in zip(s_by_noise, step_counts, strict=True)]
                if rank == 0:
                    append_metrics(output_dir, row)
                progress.set_postfix(
                    loss=f"{row['loss']:.3f}", acc=f"{row['rewards/accuracies']:.2f}", beta=f"{beta:.4f}"
                )
                if step % args.eval_every == 0 or step == total_steps:
                    log_evaluation(step)
                if ranks[:, -1].any() and step < total_steps:
                    stop_after(step)
                if step % args.save_every == 0:
                    save_checkpoint(output_dir, step, policy, optimizer, baseline_beta, s_by_noise, args, inputs)

        # What the criterion measures on the final policy (every rank computes, rank 0 draws criterion.png)
        measured = criterion_measures(
            policy,
            models.reference,
            train_pairs[: args.criterion_pairs],
            tokenizer.pad_token_id,
            args.epsilon,
            models.head,
            autocast,
            args.eval_batch_size,
            args.batch_size,
        )
        # Saving (under FSDP, every rank first sends its shards to rank 0's CPU memory)
        state_dict = gathered_state_dict(policy)
        if rank != 0:
            return None
        if measured:
            plot_criterion(measured, args.epsilon, output_dir / "criterion.png")
        plot_curves({label: read_metrics(output_dir)}, output_dir / "curves.png")
        summary = run_summary(
            label,
            args,
            device,
            total_steps,
            data,
            baseline_beta.value,
            read_metrics(output_dir),
            s_by_noise,
            measured,
            time.time() - started,
            held,
        )
        # summary.json, listing the model's files, then the files: a run killed in between is known to be unsaved.
        summary["saved"] = save_pretrained_atomically(output_dir, policy, tokenizer, summary, state_dict)
        return summary


# ----------------------------------------------------------------------------------------------------
# The command line


def main(argv=None):
    args, given = parse_args(argv, description=__doc__)

    def run():
        run_args, checkpoint = (
            resumed_args(args, given, lambda argv: parse_args(argv, report=True)[0]) if args.resume else (args, None)
        )
        summary = train(run_args, checkpoint=checkpoint)
        if summary:  # rank 0
            print_summary([summary])

    run_command(run)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
