"""What a run measures: the sums a training step or an evaluation gathers from every rank at once (TRL's metric
names), held-out evaluation, samples of the policy scored by the gold reward and by their KL from the reference,
and what the criterion measures on the final policy.

loss.micro_batch_loss is the ε-DPO loss of a micro-batch, as training computes it: evaluation computes what
training computes, with the same memory.
"""

import torch
import torch.distributed as dist

import epsdpo
import epsdpo_chunked
from training.batches import NOISE_CODES, collate, collate_prompts, model_inputs, to_device
from training.data import gold_score
from training.loss import micro_batch_loss
from training.models import last_hidden_states
from training.sharding import gathered_once, sharded

# ----------------------------------------------------------------------------------------------------
# Metrics: sums kept on the device, gathered from every rank once per optimizer step or evaluation


SUMS = (
    "pairs",
    "loss",
    "beta/pairs_mean",
    "s/weaker",
    "s/stronger",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "h",
)
NOISE = [(noisy, s) for noisy in NOISE_CODES for s in (1, 0, -1)]  # pairs counted by noise flag and s


def pair_sums(out, noise, pairs=None):
    """The sums over one micro-batch's pairs (its first `pairs`), in the order of SUMS then NOISE: (21,)
    float64, no host sync."""
    chosen, rejected, s = out.chosen_rewards, out.rejected_rewards, out.s
    # A tie (h = 0, as at the first step) counts half: the reference model is right half the time.
    accuracies = (chosen > rejected).float() + 0.5 * (chosen == rejected).float()
    # h = z_θ − γ, the margin: comparable across runs, unlike the rewards' β̃ h when β differs.
    h = (out.chosen_logps - out.ref_chosen_logps) - (out.rejected_logps - out.ref_rejected_logps)
    sums = [
        torch.ones_like(chosen),
        out.losses.detach(),
        out.pair_betas,
        s == 1,
        s == -1,
        chosen,
        rejected,
        accuracies,
        chosen - rejected,
        out.chosen_logps.detach(),
        out.rejected_logps.detach(),
        h.detach(),
    ]
    sums = torch.stack([values[:pairs].double().sum() for values in sums])
    codes = (noise * 3 + 1 - s)[:pairs]  # the index of (noisy, s) in NOISE
    return torch.cat([sums, (codes[:, None] == torch.arange(len(NOISE), device=codes.device)).sum(0).double()])


def gather_from_every_rank(values):
    """(world size, K) on the host: every rank's vector of K values. One collective, one host sync."""
    if dist.is_available() and dist.is_initialized():
        parts = [torch.empty_like(values) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, values)
        values = torch.stack(parts)
    return values.reshape(-1, values.shape[-1]).cpu()


def means(totals):
    """TRL's metric names, each the mean over the pairs of the summed totals (laid out as SUMS)."""
    return {name: (totals[i] / totals[0]).item() for i, name in enumerate(SUMS) if i}


def s_fractions(s_by_noise):
    """Fractions of s = +1 (the weaker penalty) and s = −1 (the stronger), for clean and noisy pairs separately.

    s_by_noise: counts of pairs with (flag, s) for flag in (absent, clean, noisy), s in (+1, 0, −1)."""
    groups = {}
    for name, (weaker, kept, stronger) in zip(
        ("all", "clean", "noisy"), zip(*[iter(s_by_noise)] * 3, strict=True), strict=True
    ):
        if weaker + kept + stronger:
            groups[name] = {
                "pairs": weaker + kept + stronger,
                "weaker": weaker / (weaker + kept + stronger),
                "stronger": stronger / (weaker + kept + stronger),
            }
    return dict(sorted(groups.items()))


def s_counts(totals):
    """(pairs with s = +1, 0, −1) from the step's totals, laid out as SUMS: what BaselineBeta.step takes."""
    pairs, weaker, stronger = (int(totals[SUMS.index(name)]) for name in ("pairs", "s/weaker", "s/stronger"))
    return weaker, pairs - weaker - stronger, stronger


# The last columns of gather_step's rows: a rank's gradient norm, the β it trained with, whether the background write
# of its checkpoint has returned (async_checkpoints), the signal it got.
GRAD_NORM, BETA, WRITTEN, SIGNAL = -4, -3, -2, -1


def gather_step(sums, grad_norm, beta, written, signal):
    """What an optimizer step needs on the host, from every rank: (ranks, totals, gradient norm). ranks (world size,
    K): each rank's sums of the step (as pair_sums), its gradient norm, the β it trained with, 1 if the background
    write of its checkpoint under way has returned (else 0) and the number of the signal it got (0: none), last;
    totals: their sums over the ranks. One collective and one wait for the device, the step's only ones: the numbers
    of the host reach the device without waiting for it."""
    flags = to_device([torch.tensor([beta, written, signal], dtype=torch.float64)], sums.device)[0]
    ranks = gather_from_every_rank(torch.cat([sums, grad_norm.double().reshape(1), flags]))
    return ranks, ranks.sum(0), ranks[0, GRAD_NORM].item()


def train_row(step, beta, lr, ranks, grad_norm, next_beta):
    """The metrics.jsonl row of an optimizer step, from every rank's sums (ranks, as gather_from_every_rank gave
    them, with the gradient norm, the β, the written flag and the signal last); and the step's counts by (noise flag,
    s), as NOISE.

    next_beta: the baseline β after the step (the mean β̃ of its pairs), None when it does not move."""
    totals = ranks.sum(0)
    step_counts = [int(count) for count in totals[len(SUMS) : len(SUMS) + len(NOISE)].tolist()]
    row = {"step": step, "split": "train", "beta": beta, "lr": lr, **means(totals), "grad_norm": grad_norm}
    if next_beta is not None:
        row["beta/pairs_mean"] = next_beta  # the same mean of β̃, in float64
    fractions = s_fractions(step_counts)
    row.update(
        {
            f"s/{kind}/{group}": f[kind]
            for group, f in fractions.items()
            if group != "all"
            for kind in ("weaker", "stronger")
        }
    )
    if len(ranks) > 1:
        row["beta/ranks"] = ranks[:, BETA].tolist()  # the β each rank used: all the same
    return row, step_counts


@torch.no_grad()
def sample_and_score(policy, reference, tokenizer, pairs, gold_reward, args, device, head=None):
    """One completion per prompt, sampled from the policy: [gold reward of each], [KL estimate of each]."""
    from transformers import GenerationConfig

    # Pure ancestral sampling: the KL estimate is only unbiased for samples of π_θ itself. generate() fills
    # every field left unset here from the model's own generation_config.json (repetition_penalty, top_k,
    # no_repeat_ngram_size, ...), so while sampling the model's defaults are a bare GenerationConfig.
    sampling = GenerationConfig(
        do_sample=True,
        top_k=0,
        top_p=1.0,
        temperature=1.0,
        max_new_tokens=args.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    rewards, kls, model_defaults = [], [], policy.generation_config
    policy.generation_config = GenerationConfig()
    try:
        # Under FSDP each rank gathers the policy's units once for all its samples, not once per new token.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), gathered_once(policy, device):
            torch.manual_seed(args.seed)  # the same prompts get the same noise
            for start in range(0, len(pairs), args.eval_batch_size):
                chunk = pairs[start : start + args.eval_batch_size]
                prompt_ids, attention_mask = collate_prompts(chunk, tokenizer.pad_token_id, device)
                generated = policy.generate(
                    input_ids=prompt_ids,
                    attention_mask=attention_mask,
                    generation_config=sampling,
                    synced_gpus=sharded(policy),
                )[:, prompt_ids.shape[1] :].tolist()
                samples = []
                for pair, new in zip(chunk, generated, strict=True):
                    new = new[: new.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in new else new
                    samples.append({"prompt_ids": pair["prompt_ids"], "chosen_ids": new, "rejected_ids": new})
                    rewards.append(
                        gold_score(gold_reward, pair["prompt"], tokenizer.decode(new, skip_special_tokens=True))
                    )
                batch = collate(samples, tokenizer.pad_token_id, device)  # scored right-padded, as in training
                kls += completion_measures(
                    policy, reference, batch, head, rows=len(samples), max_rows=2 * args.batch_size
                )[1].tolist()
    finally:
        policy.generation_config = model_defaults  # saved with the model as it was
    return rewards, kls


@torch.no_grad()
def evaluate(models, tokenizer, eval_pairs, beta, gold_reward, args, device):
    """Metrics over the whole held-out split, with the current β (evaluation never moves β). Each rank
    takes its share of the pairs; the metrics are over all of them."""
    policy, reference, head = models.policy, models.reference, models.head
    rank, ranks = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    shard = eval_pairs[rank::ranks]
    # Under FSDP every rank runs each forward pass (each gathers weights from all): a shorter share is
    # padded to the longest with a pair that is computed and counted nowhere.
    padded = shard + eval_pairs[:1] * (-(-len(eval_pairs) // ranks) - len(shard))
    sums = torch.zeros(len(SUMS) + len(NOISE), dtype=torch.float64, device=device)
    size = args.eval_batch_size if head else min(args.eval_batch_size, args.batch_size)  # full logits: as in training
    for i in range(0, len(padded), size):
        batch = collate(padded[i : i + size], tokenizer.pad_token_id, device)
        sums += pair_sums(
            micro_batch_loss(policy, reference, batch, beta, args.epsilon, head), batch.noise, pairs=len(shard) - i
        )
    rewards, kls = (
        sample_and_score(policy, reference, tokenizer, padded, gold_reward, args, device, head)
        if gold_reward
        else ([], [])
    )
    rewards, kls = rewards[: len(shard)], kls[: len(shard)]
    sample_sums = torch.tensor([sum(rewards), sum(kls), len(rewards)], dtype=torch.float64, device=device)
    totals = gather_from_every_rank(torch.cat([sums[: len(SUMS)], sample_sums])).sum(0)
    metrics = means(totals)
    if gold_reward:
        metrics["gold_reward"], metrics["kl"] = (totals[-3] / totals[-1]).item(), (totals[-2] / totals[-1]).item()
    return metrics


# ----------------------------------------------------------------------------------------------------
# The KL along samples, and what the criterion measures


def sequence_kl(policy_logits, ref_logits):
    """Σ over the completion positions t of KL(π_θ(·|x, y<t) ‖ π_ref(·|x, y<t)), per sequence: (N,).
    Takes, per sequence, the logits (m, V) at the positions that predict its completion (the logits fallback of
    completion_measures).

    Along a completion y sampled from π_θ, this is an unbiased estimate of KL(π_θ(·|x) ‖ π_ref(·|x)) by
    the chain rule, like the sampled log-ratio log π_θ(y|x) − log π_ref(y|x); but it is never negative,
    and at each position it averages over every next token instead of taking the one sampled, which
    removes that token's share of the noise (not the share of which completion was drawn).
    """
    kls = []
    for policy_row, ref_row in zip(policy_logits, ref_logits, strict=True):
        log_p, log_q = policy_row.float().log_softmax(-1), ref_row.float().log_softmax(-1)
        kls.append((log_p.exp() * (log_p - log_q)).sum())
    return torch.stack(kls)


@torch.no_grad()
def completion_measures(policy, reference, batch, head, lambdas=(), rows=None, max_rows=None):
    """What both models say along the completion of each sequence of batch (its first `rows`): (logps (K, N),
    kls (N,)), log π̂_λ(y|x) at each of the K lambdas (1: the policy, 0: the reference) and Σ_t KL(π_θ‖π_ref)
    (sequence_kl).

    From the last hidden states, in the loss's tiles (epsdpo_chunked.completion_measures_from_hidden), when head is a
    LinearHead: never a (N, T, V) tensor, whatever the batch. Otherwise from the logits of at most max_rows sequences
    at a time (train.py: --batch-size pairs, as training holds them), each row's scored positions in float32 one row
    at a time."""
    rows = rows or len(batch.input_ids)
    input_ids = batch.input_ids[:rows]  # right-padded: the models need no attention mask (batches.model_inputs)
    if head is not None:
        (hidden, weight), (ref_hidden, ref_weight) = (
            last_hidden_states(model, model_inputs(input_ids)) for model in (policy, reference)
        )
        return epsdpo_chunked.completion_measures_from_hidden(
            hidden,
            weight,
            ref_hidden,
            ref_weight,
            batch.host_input_ids[:rows],
            batch.host_completion_mask[:rows],
            lambdas,
            head.logit_softcap,
        )
    logps, kls = [], []
    for part in (slice(start, start + (max_rows or rows)) for start in range(0, rows, max_rows or rows)):
        logits, ref_logits = (model(**model_inputs(input_ids[part])).logits for model in (policy, reference))
        scored = batch.host_completion_mask[:rows][part, 1:].bool()  # (n, T-1), on the host
        # A row's scored logits (m, V) in float32 at a time: only one row's copies alive at once, whatever λ.
        for f, f_ref, ids, mask in zip(logits[:, :-1], ref_logits[:, :-1], input_ids[part, 1:], scored, strict=True):
            f, f_ref, targets = f[mask].float(), f_ref[mask].float(), ids[mask][:, None]  # (m, V), (m, V), (m, 1)
            kls.append(sequence_kl([f], [f_ref])[0])
            # log π̂_λ(y|x) = Σ_t log softmax(f_ref + λ (f_θ − f_ref))[y_t]
            lambda_logps = [torch.lerp(f_ref, f, lam).log_softmax(-1).gather(-1, targets).sum() for lam in lambdas]
            logps.append(torch.stack(lambda_logps) if lambdas else f.new_zeros(0))
    return torch.stack(logps, 1), torch.stack(kls)


@torch.no_grad()
def criterion_measures(models, pairs, pad_token_id, args):
    """What the criterion measures on the final policy, for reports.plot_criterion: per pair h, ΔK, s and the noise
    flag; how often s = sign(h − ΔK) and s = sign(h) ("agreement"); and z(λ) of a few pairs ("curves" at "lambdas").
    None at ε = 0 or without pairs. Under the run's autocast.

    ΔK = K_w − K_l, with K the KL(π_θ‖π_ref) summed along a completion. To first order in ε,
    z(1 ± ε) − z(1) = ± ε dz/dλ with dz/dλ = h − ΔK, so s = sign(h − ΔK) where that is clear of zero.

    Called on every rank: each computes its share of the pairs (pairs[rank::ranks]), and every rank gets all of them
    back, in order, in one all_gather (under FSDP each forward pass is a collective, so a shorter share is padded with
    a pair counted nowhere). Each batch runs each model once: completion_measures gives, from the same hidden states
    (or logits), log π̂_λ at λ = 1, 0, 1 + ε and 1 − ε (the policy, the reference and the criterion's two, which
    give h and s as the loss computes them) and the KL along each completion; in batches of --eval-batch-size
    pairs, or, where the head needs full logits (models.head None), of --batch-size pairs, as in training.
    """
    policy, reference, head, epsilon = models.policy, models.reference, models.head, args.epsilon
    if epsilon == 0 or not pairs:
        return None
    device = next(policy.parameters()).device
    batch_size = args.eval_batch_size if head is not None else args.batch_size
    rank, ranks = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    share = pairs[rank::ranks]
    padded = share + pairs[:1] * (-(-len(pairs) // ranks) - len(share))
    columns = []  # per pair: h, ΔK, s, noise flag
    for start in range(0, len(padded), batch_size):
        batch = collate(padded[start : start + batch_size], pad_token_id, device)
        (logps, ref_logps, weaker_logps, stronger_logps), kls = completion_measures(
            policy, reference, batch, head, (1.0, 0.0, 1 + epsilon, 1 - epsilon), max_rows=len(batch.input_ids)
        )
        half = len(batch.noise)
        h = (logps[:half] - ref_logps[:half]) - (logps[half:] - ref_logps[half:])  # z_θ − γ
        s = epsdpo._criterion(logps, weaker_logps, stronger_logps)  # the rule of the loss, on the same numbers
        columns.append(torch.stack([v.double() for v in (h, kls[:half] - kls[half:], s, batch.noise)]))
    # Every rank's columns, (ranks, 4 × its padded share), then pair i = rank i % ranks, place i // ranks of its share.
    gathered = gather_from_every_rank(torch.cat(columns, dim=1).flatten()).view(ranks, 4, -1)
    h, delta_k, s, noise = torch.stack([gathered[i % ranks, :, i // ranks] for i in range(len(pairs))], dim=1)
    agreement = {
        "pairs": len(s),
        "s = sign(h − ΔK)": (s == torch.sign(h - delta_k)).double().mean().item(),
        "s = sign(h)": (s == torch.sign(h)).double().mean().item(),
    }
    # A few pairs' z(λ) from λ = 0 (the reference) to 2: three clean and three mislabelled where marked. On
    # every rank: under FSDP each forward pass is a collective.
    marked = [i for flag in (1, 2) for i in (noise == flag).nonzero().flatten().tolist()[:3]]
    examples = marked if len(marked) > 3 else list(range(min(6, len(s))))
    # λ from 0 to 2, and finely across [1 − 2ε, 1 + 2ε], where the criterion compares z(1 − ε), z(1), z(1 + ε).
    lambdas = sorted(
        {step / 10 for step in range(21)} | {1 + k * epsilon / 2 for k in range(-4, 5) if 0 <= 1 + k * epsilon / 2 <= 2}
    )
    examples_batch = collate([pairs[i] for i in examples], pad_token_id, device)
    logps, _ = completion_measures(policy, reference, examples_batch, head, lambdas, max_rows=2)
    z = (logps[:, : len(examples)] - logps[:, len(examples) :]).T.tolist()  # (examples, λ)
    return {
        "h": h,
        "delta_k": delta_k,
        "s": s,
        "noise": noise,
        "agreement": agreement,
        "curves": dict(zip(examples, z, strict=True)),
        "lambdas": lambdas,
    }
