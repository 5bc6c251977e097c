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

import argparse
import contextlib
import math
import os
import pathlib
import random
import sys
import time

if __name__ == "__main__":                      # before the imports below take seconds: Ctrl-C there is one line
    import signals

    signals.stop_at_once_on_ctrl_c()

import torch
import torch.distributed as dist

import epsdpo
import epsdpo_chunked
from adapters import tokenizer_name
from batches import collate, micro_batches, to_device
from checkpoints import restore_checkpoint, resume_command, resumed_args, save_checkpoint, save_pretrained_atomically
from data import ReportedError, load_gold_reward, load_pairs, load_tokenizer
from evaluation import NOISE, SUMS, across_ranks, criterion_measures, evaluate, pair_sums, s_counts, train_row
from fingerprints import checked_inputs
from models import held_bytes, init_distributed, last_hidden_states, precision, setup_models, training_mode
from output_folder import (append_metrics, check_only_ours_replaced, claim_on_rank_zero, our_checkpoints, prepare_output_dir,
                           read_metrics, run_writes)
from reports import plot_criterion, plot_curves, print_data_report, print_start, print_summary, run_summary
from sharding import gathered_state_dict, local, reshard_root
from signals import StopNow, stop_signals

HERE = pathlib.Path(__file__).resolve().parent
TINY_MODEL, TINY_DATASET, TINY_GOLD_REWARD = HERE / "tiny_data/model", HERE / "tiny_data/data", HERE / "tiny_data/gold_reward.py"
# Below this many bytes of float32 logits a micro-batch, epsdpo.py's loss (the method as written) on full logits;
# above, epsdpo_chunked.py's: from the last hidden states where the output layer allows, else from logits in chunks.
PLAIN_LOSS_BYTES = 64 * 2**20
MAX_BETA = 1e6                                # --beta is below it, and the baseline β never passes it (ε near 1)


# ----------------------------------------------------------------------------------------------------
# Arguments


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


def parse_args(argv=None, report=False, extra=(), description=__doc__):
    """(args, the names of the arguments given on the command line). report: bad arguments raise
    ReportedError (for a checkpoint's saved arguments) instead of exiting with the usage. extra: (flag, options)
    of more arguments (compare.py's)."""
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass                                                            # the docstring as written, and defaults

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            if report:
                raise ReportedError(message)
            super().error(message)

    p = Parser(description=description, formatter_class=Formatter)
    count, beta = number(int, 1, low_open=False, what="must be >= 1"), number(float, 0, high=MAX_BETA, what="beta must be in (0, 1e6)")
    add = p.add_argument
    add("--model", type=_path_or_hub_id, default=str(TINY_MODEL), help="policy to start from: a Hub id or a local folder")
    add("--model-base", type=_path_or_hub_id, default=None, help="when --model is a peft adapter: the model it is merged into; None: the base its adapter_config.json names (a relative one from here, else from the adapter's folder), kept for --resume")
    add("--ref-model", type=_path_or_hub_id, default=None, help="reference model; None: the same as --model")
    add("--dataset", type=_path_or_hub_id, default=str(TINY_DATASET), help="a Hub id, a local JSON/JSONL/Parquet file, a folder of them, or a saved datasets folder")
    add("--train-split", default="train", help="the split to train on")
    add("--eval-split", default=None, help="the held-out split, which must exist; None: test, validation or valid, the first present, otherwise --eval-fraction of train")
    add("--eval-fraction", type=number(float, 0, high=1, what="must be in (0, 1)"), default=0.05, help="fraction of train rows held out when there is no --eval-split")
    add("--gold-reward", type=_path, default=None, help="a Python file with score(prompt, completion) -> float; on by default for tiny_data")
    add("--output-dir", type=_path, default="out", help="where everything is written")
    add("--beta", type=beta, default=0.1, help="the baseline KL penalty β (the paper: 0.01 for instruct models on UltraFeedback)")
    add("--epsilon", type=number(float, 0, low_open=False, high=1, what="epsilon must be in [0, 1)"), default=0.01, help="the perturbation ε; 0 is plain DPO")
    add("--fixed-baseline-beta", action="store_true", help="per-pair β̃ only: the baseline β never moves")
    add("--min-beta", type=number(float, 0, low_open=False, high=MAX_BETA, what="must be in [0, 1e6)"), default=0.0, help="a floor for the baseline β (BaselineBeta's min_beta); 0: none. Its ceiling is 1e6, --beta's own bound")
    add("--lr", type=number(float, 0, what="the learning rate must be > 0"), default=None, help="AdamW's peak learning rate (the paper: 5e-7 on 7-8B models); None: 5e-4, or 3e-3 with --lora-r")
    add("--weight-decay", type=number(float, 0, low_open=False, what="must be >= 0"), default=0.0, help="AdamW's weight decay")
    add("--warmup-ratio", type=number(float, 0, low_open=False, high=1, what="must be in [0, 1)"), default=0.1, help="fraction of the steps over which the learning rate rises from 0")
    add("--max-grad-norm", type=number(float, 0, what="must be > 0"), default=1.0, help="gradients are clipped to this norm")
    add("--batch-size", type=count, default=16, help="pairs per micro-batch")
    add("--grad-accum", type=count, default=1, help="micro-batches per optimizer step")
    add("--max-steps", type=count, default=None, help="optimizer steps; None: --epochs over the train split")
    add("--epochs", type=number(float, 0, what="must be > 0"), default=2.0, help="passes over the train split, when --max-steps is not given")
    add("--max-length", type=number(int, 2, low_open=False, what="must be >= 2"), default=512, help="prompt + completion tokens")
    add("--max-prompt-length", type=count, default=256, help="when a pair exceeds --max-length, its prompt keeps BOS and its last tokens up to this many")
    add("--dtype", choices=("auto", "float32", "bfloat16"), default="auto", help="bfloat16: mixed precision (float32 weights, bf16 autocast, the frozen weights autocast casts in bf16: the reference's, or LoRA's base); auto: bfloat16 on GPUs with bf16 arithmetic (compute capability >= 8.0); float32 on those GPUs multiplies in TF32")
    add("--lora-r", type=number(int, 0, low_open=False, what="must be >= 0"), default=0, help="train LoRA adapters of this rank (peft), the reference being the model with them off; 0: every weight (full fine-tuning)")
    add("--lora-alpha", type=number(float, 0, what="must be > 0"), default=16.0, help="LoRA's scale: the adapters add (alpha / r) B A x")
    add("--lora-target", nargs="+", default=["all-linear"], help="the layers LoRA adapts (peft's target_modules, e.g. q_proj v_proj); all-linear: every linear layer but the output head")
    add("--gradient-checkpointing", action="store_true", help="recompute the policy's activations in backward (transformers' switch): less memory, more time")
    add("--fsdp", action="store_true", help="under torchrun: shard the policy, its gradients and AdamW state, and the reference across the processes (FSDP2) instead of copying them to each (DDP)")
    add("--eval-every", type=count, default=25, help="optimizer steps between evaluations")
    add("--eval-batch-size", type=count, default=64, help="pairs (or prompts to sample from) per evaluation batch")
    add("--max-new-tokens", type=count, default=32, help="length of the completions sampled for the gold reward")
    add("--criterion-pairs", type=number(int, 0, low_open=False, what="must be >= 0"), default=1000, help="train pairs on which the final policy's s is compared with sign(h − ΔK) and sign(h), drawn in criterion.png; 0: none")
    add("--seed", type=number(int, 0, low_open=False, high=2**32, what="must be in [0, 2**32)"), default=0, help="seeds the data order and the sampling")
    add("--device", default="auto", help="cuda, cuda:N, mps or cpu; auto: the first available")
    add("--skip-invalid", action="store_true", help="drop malformed rows (and report how many) instead of stopping at the first")
    add("--overwrite", action="store_true", help="replace the run in a non-empty --output-dir (its own files only)")
    add("--resume", type=_path, metavar="OUTPUT_DIR", default=None, help="continue the run in OUTPUT_DIR from its latest checkpoint, with its arguments")
    add("--save-every", type=count, default=100, help="optimizer steps between checkpoints (one is also written on Ctrl-C or SIGTERM)")
    add("--keep-checkpoints", type=count, default=2, help="how many of the latest checkpoints to keep")
    add("--trust-remote-code", action="store_true", help="run code from the model's repository")
    for flag, options in extra:
        add(flag, **options)
    args = p.parse_args(argv)
    if args.min_beta > args.beta and not getattr(args, "betas", None):          # compare.py checks its --betas
        p.error(f"--min-beta {args.min_beta} is more than --beta {args.beta}: the floor of the baseline β is below its start")
    if "all-linear" in args.lora_target and len(args.lora_target) > 1:
        p.error("--lora-target all-linear stands alone (every linear layer but the output head): give it, or layer names")
    if args.max_prompt_length >= args.max_length:
        p.error(f"--max-prompt-length {args.max_prompt_length} must be less than --max-length {args.max_length}, "
                f"so that every completion keeps a token")
    if args.lr is None:
        args.lr = 3e-3 if args.lora_r else 5e-4         # LoRA's few weights, starting at B = 0, need larger steps
    for action in p._actions:                   # parsed again without defaults: what the command line gave
        action.default = argparse.SUPPRESS
    given = set(vars(p.parse_args(argv)))
    if not args.lora_r and not args.resume and given & {"lora_alpha", "lora_target"}:     # resuming: the run's --lora-r
        p.error("--lora-alpha and --lora-target apply only with --lora-r > 0")
    return args, given


# ----------------------------------------------------------------------------------------------------
# The loss of one micro-batch


def forward(policy, reference, batch, beta, epsilon, head=None):
    """One concatenated forward pass of chosen and rejected per model, then the ε-DPO loss: epsdpo.py's when the
    logits are small; at scale from the last hidden states when the output layer is a plain linear map (head, see
    models.linear_head), never a (2B, T, V) tensor, else from the logits in chunks."""
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    on_host = (batch.host_input_ids, batch.host_completion_mask)    # at scale the loss finds the positions there: no wait
    if head and batch.input_ids.numel() * head.vocab_size * 4 > PLAIN_LOSS_BYTES:
        hidden, weight = last_hidden_states(policy, inputs)                                         # (2B, T, H), (V, H)
        with torch.no_grad():
            ref_hidden, ref_weight = last_hidden_states(reference, inputs)
        out = epsdpo_chunked.epsilon_dpo_loss_from_hidden(hidden, weight, ref_hidden, ref_weight, *on_host, beta, epsilon,
                                                          head.logit_softcap)
        reshard_root(reference)         # FSDP: the reference's output layer, whole for the loss, freed before the backward
        return out
    logits = policy(**inputs).logits                                                                # (2B, T, V)
    with torch.no_grad():
        ref_logits = reference(**inputs).logits
    reshard_root(reference)
    if logits.numel() * 4 <= PLAIN_LOSS_BYTES:                      # the method as written; its checks wait once
        return epsdpo.epsilon_dpo_loss(logits, ref_logits, batch.input_ids, batch.completion_mask, beta, epsilon)
    return epsdpo_chunked.epsilon_dpo_loss(logits, ref_logits, *on_host, beta, epsilon)


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
        print(f"stopped by signal {number} after step {step}; " + (
              f"checkpoint written: {resume_command(output_dir)} continues the run" if step else "nothing to resume"))
    sys.exit(128 + number)


def check_finite(step, loss, grad_norm, output_dir):
    """Stop before applying a step whose loss or gradient is NaN or infinite, naming the checkpoint to go on from."""
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        latest = our_checkpoints(output_dir)[-1:]
        raise ReportedError(f"step {step}: the loss or the gradient is not finite (gradient norm {grad_norm}); stopped "
                            f"before applying it. " + (f"The last checkpoint, {latest[0]}, is intact: "
                                                       f"{resume_command(output_dir)} continues from it." if latest else "No checkpoint was written yet."))


def train(args, label="ε-DPO", checkpoint=None):
    """Train one policy into args.output_dir; returns its summary on rank 0. checkpoint: (folder, state) to resume from."""
    started = time.time()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    rank, world_size, device = init_distributed(args.device)            # rank 0 alone writes and prints
    output_dir = pathlib.Path(args.output_dir)
    # The folder is checked and locked before anything is loaded, and stays locked while the run lasts.
    with claim_on_rank_zero(output_dir, args, rank, world_size, device):
        tqdm, autocast = one_progress_bar(), precision(args.dtype, device)

        # Data
        tokenizer = load_tokenizer(tokenizer_name(args.model, args.model_base), args.trust_remote_code, args.model)
        if rank == 0:
            check_only_ours_replaced(output_dir, run_writes(tokenizer, args.lora_r > 0))
        data = load_pairs(args.dataset, args.train_split, args.eval_split, args.eval_fraction, args.seed, tokenizer,
                          args.max_length, args.max_prompt_length, args.skip_invalid, least=args.batch_size * args.grad_accum * world_size)
        train_pairs, eval_pairs = data["pairs"]["train"], data["pairs"]["eval"]
        if rank == 0:
            print_data_report(data["notes"], data["skipped"], data["boundary_moved"])
        inputs = checked_inputs(args, data, checkpoint)                 # resuming: refused unless what the run read
        gold_reward = load_gold_reward(args.gold_reward or (TINY_GOLD_REWARD if pathlib.Path(args.dataset).resolve() == TINY_DATASET else None))

        # Models, optimizer, baseline β; and, resuming, the checkpoint's state
        models = setup_models(args, device, world_size, autocast is not None, tokenizer, train_pairs + eval_pairs, checkpoint)
        policy, autocast = models.policy, autocast or contextlib.nullcontext()
        trained_weights = [weight for weight in policy.parameters() if weight.requires_grad]  # LoRA: the adapters
        optimizer = torch.optim.AdamW(trained_weights, lr=args.lr, weight_decay=args.weight_decay)
        baseline_beta = epsdpo.BaselineBeta(args.beta, args.epsilon, min_beta=args.min_beta, max_beta=MAX_BETA)
        total_steps = args.max_steps or max(1, int(args.epochs * len(train_pairs) // (args.batch_size * args.grad_accum * world_size)))
        first_step, s_by_noise, held = 1, [0] * len(NOISE), None            # pairs by (noise flag, s), as NOISE
        if checkpoint:
            first_step, s_by_noise = restore_checkpoint(checkpoint, policy, optimizer, baseline_beta)
        # This rank's share of every step from first_step: the pairs of a step follow from the seed and the pairs a step.
        batches = micro_batches(train_pairs, args.batch_size, args.grad_accum, world_size, rank, args.seed, first_step)
        if rank == 0:
            prepare_output_dir(output_dir, first_step - 1 if checkpoint else None)   # all checks passed: now change it
            print_start(args, label, checkpoint, first_step, total_steps, len(train_pairs), len(eval_pairs), world_size,
                        device, trained_weights, policy, models.loss_note)

        def log_evaluation(step):
            with autocast:
                metrics = evaluate(forward, models, tokenizer, eval_pairs, baseline_beta.value, gold_reward, args, device)
            if rank == 0:
                append_metrics(output_dir, {"step": step, "split": "eval", "beta": baseline_beta.value,
                                            "lr": learning_rate(step + 1, args, total_steps), **metrics})

        def stop_after(step):
            """Ctrl-C or SIGTERM: a checkpoint of the last whole step, and exit with the signal's status."""
            progress.close()
            if step >= 1:
                save_checkpoint(output_dir, step, policy, optimizer, baseline_beta, s_by_noise, args, inputs)
            exit_stopped(stop.signal, step, output_dir, rank == 0)

        # Loop. Ctrl-C or SIGTERM ends the step under way (one process: drops a half-accumulated one), checkpoints, stops.
        if first_step == 1:
            log_evaluation(0)
        progress = tqdm(range(first_step, total_steps + 1), desc=label, disable=None if rank == 0 else True)
        with stop_signals.training() as stop:
            for step in progress:
                beta = baseline_beta.value                                  # the β of every pair of this step
                sums = torch.zeros(len(SUMS) + len(NOISE), dtype=torch.float64, device=device)
                for micro_batch in range(args.grad_accum):
                    if stop.signal is not None and world_size == 1:
                        optimizer.zero_grad(set_to_none=True)
                        stop_after(step - 1)
                    batch = collate(next(batches), tokenizer.pad_token_id, device)
                    with models.no_sync(last_micro_batch=micro_batch == args.grad_accum - 1):
                        with autocast, training_mode(models.layers):
                            out = forward(models.trained, models.reference, batch, beta, args.epsilon, models.head)
                        (out.loss / args.grad_accum).backward()
                    sums += pair_sums(out, batch.noise)
                grad_norm = local(torch.nn.utils.clip_grad_norm_(trained_weights, args.max_grad_norm))  # FSDP: over all shards
                # What the step needs on the host, from every rank, in one collective and one wait for the device:
                # the sums (s counts among them), the gradient norm, the β each rank used and whether it got a signal.
                flags = to_device([torch.tensor([beta, stop.signal is not None], dtype=torch.float64)], device)[0]   # no wait
                ranks = across_ranks(torch.cat([sums, grad_norm.double().reshape(1), flags]))
                totals, grad_norm = ranks.sum(0), ranks[0, -3].item()
                check_finite(step, totals[SUMS.index("loss")].item(), grad_norm, output_dir)
                lr = learning_rate(step, args, total_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.step()
                if step == first_step:                                      # every state exists now: its size on this rank
                    held = held_bytes(policy, optimizer, models.reference)
                optimizer.zero_grad(set_to_none=True)
                if not args.fixed_baseline_beta:
                    baseline_beta.step(s_counts(totals))                    # β ← mean β̃ of this step's pairs, all ranks'
                row, step_counts = train_row(step, beta, lr, ranks, grad_norm, None if args.fixed_baseline_beta else baseline_beta.value)
                s_by_noise = [seen + new for seen, new in zip(s_by_noise, step_counts)]
                if rank == 0:
                    append_metrics(output_dir, row)
                progress.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['rewards/accuracies']:.2f}", beta=f"{beta:.4f}")
                if step % args.eval_every == 0 or step == total_steps:
                    log_evaluation(step)
                if ranks[:, -1].any() and step < total_steps:
                    stop_after(step)
                if step % args.save_every == 0:
                    save_checkpoint(output_dir, step, policy, optimizer, baseline_beta, s_by_noise, args, inputs)

        # What the criterion measures on the final policy (every rank computes, rank 0 draws criterion.png)
        measured = criterion_measures(policy, models.reference, train_pairs[: args.criterion_pairs], tokenizer.pad_token_id,
                                      args.epsilon, forward, models.head, autocast, args.eval_batch_size, args.batch_size)
        # Saving (under FSDP, every rank first sends its shards to rank 0's CPU memory)
        state_dict = gathered_state_dict(policy)
        if rank != 0:
            return None
        if measured:
            plot_criterion(measured, args.epsilon, output_dir / "criterion.png")
        plot_curves({label: read_metrics(output_dir)}, output_dir / "curves.png")
        summary = run_summary(label, args, device, total_steps, data, baseline_beta.value, read_metrics(output_dir), s_by_noise,
                              measured, time.time() - started, held)
        # summary.json, listing the model's files, then the files: a run killed in between is known to be unsaved.
        summary["saved"] = save_pretrained_atomically(output_dir, policy, tokenizer, summary, state_dict)
        return summary


# ----------------------------------------------------------------------------------------------------
# The command line


def run_command(function):
    """function(), with every refusal in one line, Ctrl-C and SIGTERM caught, and the process group closed."""
    first_rank = os.environ.get("RANK", "0") == "0"                     # under torchrun, rank 0 alone explains
    try:
        with stop_signals:                                              # Ctrl-C and SIGTERM, from here to the end
            try:
                function()
            finally:
                if dist.is_available() and dist.is_initialized():
                    dist.destroy_process_group()
    except (ReportedError, OSError) as error:                           # OSError: a full disk, say
        sys.exit(f"error: {error}" if first_rank else 1)
    except StopNow as stopped:
        if first_rank:
            print(f"stopped by signal {stopped.signal} before training started; nothing was written to resume from",
                  file=sys.stderr)
        sys.exit(128 + stopped.signal)
    except KeyboardInterrupt:
        sys.exit("error: stopped at once by a second signal; the last checkpoint is as it was")


def main(argv=None):
    args, given = parse_args(argv)

    def run():
        run_args, checkpoint = resumed_args(args, given, lambda argv: parse_args(argv, report=True)[0]) if args.resume else (args, None)
        summary = train(run_args, checkpoint=checkpoint)
        if summary:                                                     # rank 0
            print_summary([summary])
    run_command(run)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
