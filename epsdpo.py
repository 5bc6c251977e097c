"""ε-DPO: Direct Preference Optimization with a KL penalty β chosen per preference pair.

Reference: Lee et al., "KL Penalty Control via Perturbation for Direct Preference Optimization"
(arXiv 2502.13177, NeurIPS 2025), built on Rafailov et al., "Direct Preference Optimization" (2023).

The module reads top to bottom in the order of the method:
  1. sequence_logps      log π(y|x), summed over completion tokens only
  2. dpo_loss            −log σ(β h) and the implicit rewards
  3. perturbed_logps     log π̂_λ(y|x) for λ = 1 ± ε, estimated from the logits alone
  4. epsilon_steps       the criterion s ∈ {−1, 0, +1};  pair_betas: β̃ = β / (1 + ε s)
  5. BaselineBeta        β ← mean of β̃ over every pair of an optimizer step
  6. epsilon_dpo_loss    one whole step: all of the above in one call

It depends on torch alone and takes plain tensors, so it can be copied into any training loop:

    logits = policy(input_ids).logits                      # (2B, T, V): B chosen rows, then B rejected
    with torch.no_grad():
        ref_logits = reference(input_ids).logits
    out = epsilon_dpo_loss(logits, ref_logits, input_ids, completion_mask, baseline.value, epsilon)
    out.loss.backward()
    baseline.observe(out.steps)                            # once per micro-batch
    optimizer.step(); baseline.step()                      # once per optimizer step
"""

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

# Full-vocabulary work is done this many logits at a time (4 MiB of float32), so that the only float32
# copies of the (N, T, V) logits ever alive are a few of these chunks, whatever N, T and V are. Chunks
# this small also stay in the CPU's cache: on the benchmark (bench.py) they were faster than 16 MiB ones.
CHUNK_ELEMENTS = 1 << 20


# ----------------------------------------------------------------------------------------------------
# Checks shared by the public functions: bad input fails here, with a message, not deep inside torch.


def _check_beta(beta):
    if isinstance(beta, torch.Tensor):
        if not (torch.isfinite(beta).all() and (beta > 0).all()):
            raise ValueError(f"beta must be finite and > 0 for every pair, got {beta.tolist()}")
    elif not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")


def _check_epsilon(epsilon):
    # At ε ≥ 1, β/(1−ε) is infinite or negative; NaN fails both comparisons and is rejected too.
    if not (isinstance(epsilon, (int, float)) and 0 <= epsilon < 1):
        raise ValueError(f"epsilon must be a number in [0, 1), got {epsilon!r}")


def _check_sequences(logits, input_ids, completion_mask, name="logits"):
    if logits.dim() != 3:
        raise ValueError(f"{name} must have shape (N, T, V), got {tuple(logits.shape)}")
    if input_ids.shape != logits.shape[:2] or completion_mask.shape != logits.shape[:2]:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and completion_mask {tuple(completion_mask.shape)} "
            f"must both have the shape (N, T) = {tuple(logits.shape[:2])} of {name} {tuple(logits.shape)}"
        )
    if completion_mask[:, :1].any():
        raise ValueError(
            "completion_mask[:, 0] must be 0: the first token has no logit before it to predict it "
            "(every completion follows at least one prompt token)"
        )


def _check_pairs(policy_logits, ref_logits, input_ids, completion_mask):
    _check_sequences(policy_logits, input_ids, completion_mask, "policy_logits")
    if ref_logits.shape != policy_logits.shape:
        raise ValueError(
            f"ref_logits {tuple(ref_logits.shape)} must have the shape of "
            f"policy_logits {tuple(policy_logits.shape)}"
        )
    if policy_logits.shape[0] % 2:
        raise ValueError(
            f"expected an even number of rows (B chosen, then B rejected), got {policy_logits.shape[0]}"
        )


# ----------------------------------------------------------------------------------------------------
# 1. Sequence log-probabilities


def _completion_positions(input_ids, completion_mask):
    """Where the logits score a completion token.

    The logits at position t predict the token at t + 1, so token t + 1 is scored when
    completion_mask[:, t + 1] is on. Returns (rows, positions, targets), each (M,) for the M scored
    tokens: logits[rows, positions] is the distribution that predicts targets = input_ids[rows, positions + 1].
    """
    scored = completion_mask[:, 1:].bool()                                  # (N, T-1)
    rows, positions = scored.nonzero(as_tuple=True)                        # (M,), (M,)
    targets = input_ids[:, 1:][rows, positions]                            # (M,)
    return rows, positions, targets


def _chunks(rows, positions, vocab_size):
    """Runs of consecutive scored positions of one row, at most CHUNK_ELEMENTS logits each.

    Yields (row, start, stop, tokens): logits[row, start:stop] is a view (no copy) of the (m, V) logits
    that score the m tokens rows[tokens], positions[tokens]. A completion is one run per row.
    """
    longest = max(1, CHUNK_ELEMENTS // vocab_size)
    run_starts = torch.ones_like(rows, dtype=torch.bool)
    run_starts[1:] = (rows[1:] != rows[:-1]) | (positions[1:] != positions[:-1] + 1)
    first_tokens = run_starts.nonzero().flatten().tolist() + [rows.shape[0]]
    for row, start, begin, end in zip(rows[run_starts].tolist(), positions[run_starts].tolist(), first_tokens, first_tokens[1:]):
        for first in range(begin, end, longest):
            last = min(first + longest, end)
            yield row, start + (first - begin), start + (last - begin), slice(first, last)


def _compute_dtype(logits):
    # Log-softmax in float32 even for bf16/fp16 logits (float64 stays float64).
    return torch.promote_types(logits.dtype, torch.float32)


def _per_sequence(token_values, rows, positions, shape):
    """Sum per-token values (M,) into per-sequence values (N,); unscored positions count 0.

    Scattering into an (N, T-1) grid and summing each row makes every sequence's sum independent of
    the other rows (reordering or swapping rows cannot change a row's rounding).
    """
    grid = token_values.new_zeros(shape)                                   # (N, T-1)
    grid[rows, positions] = token_values
    return grid.sum(dim=-1)                                                # (N,)


class _CompletionTokenLogps(torch.autograd.Function):
    """log softmax(logits[r, p])[y] at the M scored positions, with a backward that stores nothing new.

    Plain autograd would keep a float32 log-softmax of every scored position alive until backward
    (an (M, V) tensor). Here forward keeps only the logits (which exist anyway) and the (M,)
    log-normalizers, and backward rebuilds the softmax one chunk at a time:
        ∂ log softmax(f)[y] / ∂f = onehot(y) − softmax(f)
    """

    @staticmethod
    def forward(ctx, logits, rows, positions, targets):
        dtype = _compute_dtype(logits)
        log_normalizers = torch.empty(rows.shape[0], dtype=dtype, device=logits.device)   # (M,)
        for row, start, stop, tokens in _chunks(rows, positions, logits.shape[-1]):
            log_normalizers[tokens] = torch.logsumexp(logits[row, start:stop].to(dtype), dim=-1)
        ctx.save_for_backward(logits, rows, positions, targets, log_normalizers)
        return logits[rows, positions, targets].to(dtype) - log_normalizers              # (M,)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_token_logps):
        logits, rows, positions, targets, log_normalizers = ctx.saved_tensors
        grad_logits = torch.zeros_like(logits)                                           # (N, T, V)
        for row, start, stop, tokens in _chunks(rows, positions, logits.shape[-1]):
            chunk_logits = logits[row, start:stop].to(log_normalizers.dtype)             # (m, V)
            softmax_minus_onehot = torch.exp(chunk_logits - log_normalizers[tokens, None])
            # Subtract the one-hot before rounding to the logits' dtype: for a confident model g (1 − p)
            # is far smaller than g p, and bf16 would round it away.
            softmax_minus_onehot[torch.arange(stop - start, device=logits.device), targets[tokens]] -= 1
            grad_logits[row, start:stop] = softmax_minus_onehot.mul_(-grad_token_logps[tokens, None])
        return grad_logits, None, None, None


def sequence_logps(logits, input_ids, completion_mask):
    """Sum of the log-probabilities of the completion tokens of each sequence.

    Shapes: logits (N, T, V), the model's outputs for input_ids (N, T); completion_mask (N, T), 1 on the
    completion tokens of input_ids. Returns (N,), float32 (float64 for float64 logits).

        log π(y|x) = Σ_i log softmax(f(x, y_<i))[y_i]      i over the completion tokens only

    A sum, not a mean: DPO's β is defined for the sum. Positions off the mask (prompt, padding) never
    reach the result, whatever their tokens or logits; a row with no completion token gives 0.
    Differentiable in logits; works position by position, so no float32 (N, T, V) copy is ever made.
    """
    _check_sequences(logits, input_ids, completion_mask)
    rows, positions, targets = _completion_positions(input_ids, completion_mask)
    token_logps = _CompletionTokenLogps.apply(logits, rows, positions, targets)          # (M,)
    return _per_sequence(token_logps, rows, positions, completion_mask[:, 1:].shape)


# ----------------------------------------------------------------------------------------------------
# 2. DPO


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """The DPO loss of each pair and its implicit rewards.

    Shapes: the four log-probabilities are (B,); beta is a float or a (B,) tensor (one β per pair).
    Returns (losses, chosen_rewards, rejected_rewards), each (B,).

        h    = (log π_θ(y_w) − log π_θ(y_l)) − (log π_ref(y_w) − log π_ref(y_l))     the margin
        loss = −log σ(β h)
        r_w  = β (log π_θ(y_w) − log π_ref(y_w)),   r_l = β (log π_θ(y_l) − log π_ref(y_l))

    The rewards are detached: they are for logging, not for gradients.
    """
    shapes = {tuple(t.shape) for t in (chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(
            "chosen_logps, rejected_logps, ref_chosen_logps and ref_rejected_logps must all have shape (B,), "
            f"got {[tuple(t.shape) for t in (chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)]}"
        )
    _check_beta(beta)
    if isinstance(beta, torch.Tensor) and beta.shape not in ((), chosen_logps.shape):
        raise ValueError(f"beta must be a float or have shape {tuple(chosen_logps.shape)}, got {tuple(beta.shape)}")
    beta = torch.as_tensor(beta, dtype=chosen_logps.dtype, device=chosen_logps.device)

    policy_log_ratios = chosen_logps - rejected_logps                      # z_θ
    ref_log_ratios = ref_chosen_logps - ref_rejected_logps                 # γ
    margins = policy_log_ratios - ref_log_ratios                           # h = z_θ − γ
    losses = -F.logsigmoid(beta * margins)                                 # logsigmoid stays finite for any h
    chosen_rewards = (beta * (chosen_logps - ref_chosen_logps)).detach()
    rejected_rewards = (beta * (rejected_logps - ref_rejected_logps)).detach()
    return losses, chosen_rewards, rejected_rewards


# ----------------------------------------------------------------------------------------------------
# 3. The perturbed policies (paper Eqs. 3 and 4)


@torch.no_grad()
def perturbed_logps(policy_logits, ref_logits, input_ids, completion_mask, epsilon):
    """Sequence log-probabilities of the policies estimated for β/(1+ε) and β/(1−ε), without a forward pass.

    Shapes: policy_logits and ref_logits (N, T, V); input_ids and completion_mask (N, T).
    Returns (weaker_logps, stronger_logps), each (N,), float32 (float64 for float64 logits):

        f_λ = f_ref + λ (f_θ − f_ref)                      per position, over the whole vocabulary
        log π̂_λ(y|x) = Σ_i log softmax(f_λ(x, y_<i))[y_i]
        weaker:   λ = 1 + ε, the policy for β⁻ = β/(1+ε)   (weaker KL penalty)
        stronger: λ = 1 − ε, the policy for β⁺ = β/(1−ε)   (stronger KL penalty)

    Why this form: f_ref + λ(f_θ − f_ref) is exactly f_ref when the policy equals the reference, which
    λ f_θ + (1−λ) f_ref is not in floating point. Why float32: in bf16, ε (f_θ − f_ref) is below the
    rounding step of the logits. Only completion positions are computed, a chunk at a time, under no_grad.
    """
    _check_pairs(policy_logits, ref_logits, input_ids, completion_mask)
    _check_epsilon(epsilon)
    dtype = _compute_dtype(policy_logits)
    rows, positions, targets = _completion_positions(input_ids, completion_mask)
    weaker_lambda, stronger_lambda = 1 + epsilon, 1 - epsilon

    # torch.lerp(f_ref, f_θ, λ) computes f_ref + λ (f_θ − f_ref) in one pass (exactly f_ref when f_θ = f_ref).
    # log softmax(f_λ)[y] = f_λ[y] − logsumexp(f_λ): first the target's perturbed logit f_λ[y], (M,) ...
    ref_targets = ref_logits[rows, positions, targets].to(dtype)                        # (M,)
    policy_targets = policy_logits[rows, positions, targets].to(dtype)
    weaker_token_logps = torch.lerp(ref_targets, policy_targets, weaker_lambda)
    stronger_token_logps = torch.lerp(ref_targets, policy_targets, stronger_lambda)

    # ... then minus the log-normalizer of each perturbed distribution, a chunk of positions at a time.
    for row, start, stop, tokens in _chunks(rows, positions, policy_logits.shape[-1]):
        chunk_ref = ref_logits[row, start:stop].to(dtype)                               # (m, V)
        chunk_policy = policy_logits[row, start:stop].to(dtype)
        weaker_token_logps[tokens] -= torch.logsumexp(torch.lerp(chunk_ref, chunk_policy, weaker_lambda), -1)
        stronger_token_logps[tokens] -= torch.logsumexp(torch.lerp(chunk_ref, chunk_policy, stronger_lambda), -1)

    grid_shape = completion_mask[:, 1:].shape
    return (
        _per_sequence(weaker_token_logps, rows, positions, grid_shape),
        _per_sequence(stronger_token_logps, rows, positions, grid_shape),
    )


# ----------------------------------------------------------------------------------------------------
# 4. The criterion and the per-pair β (paper Eq. 5)


@torch.no_grad()
def epsilon_steps(policy_logits, ref_logits, input_ids, completion_mask, epsilon, policy_logps=None):
    """The direction s ∈ {−1, 0, +1} in which each pair's β moves.

    Shapes: policy_logits and ref_logits (2B, T, V); input_ids and completion_mask (2B, T), the B chosen
    sequences followed by the B rejected ones (one concatenated forward pass). Returns a LongTensor (B,).
    policy_logps (2B,), optional: the policy's own sequence log-probabilities, if the caller has them.

        z_θ = log π_θ(y_w) − log π_θ(y_l),   z⁻, z⁺ the same under λ = 1+ε and λ = 1−ε
        s = +1   if z⁻ > z_θ > z⁺   the preference logit grows as β shrinks: use β/(1+ε)
        s = −1   if z⁻ < z_θ < z⁺   the preference logit grows as β grows:   use β/(1−ε)
        s =  0   otherwise          ties and non-monotone cases keep β

    The reference's log-ratio γ and the factor β would shift or scale all three alike, so the raw
    policy log-ratios are compared. No gradient flows through the decision.
    """
    _check_pairs(policy_logits, ref_logits, input_ids, completion_mask)
    if policy_logps is None:
        policy_logps = sequence_logps(policy_logits, input_ids, completion_mask)
    elif policy_logps.shape != policy_logits.shape[:1]:
        raise ValueError(
            f"policy_logps must have shape {tuple(policy_logits.shape[:1])}, got {tuple(policy_logps.shape)}"
        )
    weaker_logps, stronger_logps = perturbed_logps(policy_logits, ref_logits, input_ids, completion_mask, epsilon)

    num_pairs = policy_logits.shape[0] // 2

    def log_ratios(logps):                                                 # (2B,) -> (B,): chosen − rejected
        return logps[:num_pairs] - logps[num_pairs:]

    z_theta = log_ratios(policy_logps.detach().to(weaker_logps.dtype))
    z_weaker, z_stronger = log_ratios(weaker_logps), log_ratios(stronger_logps)

    relax = (z_weaker > z_theta) & (z_theta > z_stronger)                 # s = +1
    tighten = (z_weaker < z_theta) & (z_theta < z_stronger)               # s = −1
    return relax.long() - tighten.long()


def pair_betas(beta, steps, epsilon):
    """The β of each pair: β̃ = β / (1 + ε s).

    Shapes: beta a float (the baseline β), steps (B,) in {−1, 0, +1}. Returns (B,) float32.
    s = +1 gives β/(1+ε), s = −1 gives β/(1−ε), s = 0 gives β.
    """
    _check_beta(beta)
    _check_epsilon(epsilon)
    return beta / (1 + epsilon * steps.to(torch.float32))


# ----------------------------------------------------------------------------------------------------
# 5. Updating β itself (paper Algorithm 1)


class BaselineBeta:
    """The baseline β, moved after every optimizer step to the mean β̃ of the pairs that made that step.

        β ← mean_i β̃_i = β · mean_i 1 / (1 + ε s_i)

    over every pair of the step: call observe(steps) for each micro-batch of gradient accumulation, then
    step() once after optimizer.step(). When torch.distributed is initialized, step() sums the counts over
    all ranks, so every rank gets the same β. Evaluation must not call observe().

    Why count s instead of averaging β̃: since all β̃ of one step are β/(1+ε), β or β/(1−ε), the mean is
    exact from three integer counts, which add exactly across micro-batches and ranks; at ε = 0 β stays
    bit for bit what it was. (The authors' released trainer uses β / (1 + ε mean_i s_i) instead; the two
    agree to first order in ε.)
    """

    def __init__(self, beta, epsilon):
        _check_beta(beta)
        _check_epsilon(epsilon)
        self.value = float(beta)
        self.epsilon = float(epsilon)
        self.counts = [0, 0, 0]                                            # pairs seen with s = +1, 0, −1

    def observe(self, steps):
        """Record the steps s (B,) of one micro-batch."""
        steps = steps.detach()
        counts = [int((steps == s).sum()) for s in (1, 0, -1)]
        if sum(counts) != steps.numel():
            raise ValueError(f"steps must all be -1, 0 or +1, got {steps.unique().tolist()}")
        self.counts = [seen + new for seen, new in zip(self.counts, counts)]

    def step(self):
        """Move β to the mean β̃ of everything observed since the last step; returns the new β."""
        counts = self.counts
        if dist.is_available() and dist.is_initialized():
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            counts_tensor = torch.tensor(counts, dtype=torch.int64, device=device)
            dist.all_reduce(counts_tensor)                                  # sum over ranks, exactly
            counts = counts_tensor.tolist()
        relaxed, kept, tightened = counts
        if relaxed + kept + tightened:                                     # no pair seen: β stays
            mean_factor = (relaxed / (1 + self.epsilon) + kept + tightened / (1 - self.epsilon)) / (
                relaxed + kept + tightened
            )
            self.value = self.value * mean_factor
        self.counts = [0, 0, 0]
        return self.value

    def state_dict(self):
        """Everything a resumed run needs, including counts pending in a half-accumulated step."""
        return {"beta": self.value, "epsilon": self.epsilon, "counts": list(self.counts)}

    def load_state_dict(self, state):
        _check_beta(state["beta"])
        _check_epsilon(state["epsilon"])
        self.value, self.epsilon, self.counts = float(state["beta"]), float(state["epsilon"]), list(state["counts"])


# ----------------------------------------------------------------------------------------------------
# 6. One whole step


@dataclass
class EpsilonDPOOutput:
    """What epsilon_dpo_loss returns. loss is a scalar, every other field is (B,)."""

    loss: torch.Tensor               # mean of losses: call .backward() on it
    losses: torch.Tensor             # −log σ(β̃ h) per pair
    pair_betas: torch.Tensor         # β̃ = β / (1 + ε s), held constant in the loss
    steps: torch.Tensor              # s ∈ {−1, 0, +1}
    chosen_rewards: torch.Tensor     # β̃ (log π_θ(y_w) − log π_ref(y_w)), detached
    rejected_rewards: torch.Tensor   # β̃ (log π_θ(y_l) − log π_ref(y_l)), detached
    chosen_logps: torch.Tensor       # log π_θ(y_w), differentiable
    rejected_logps: torch.Tensor     # log π_θ(y_l), differentiable
    ref_chosen_logps: torch.Tensor   # log π_ref(y_w)
    ref_rejected_logps: torch.Tensor # log π_ref(y_l)


def epsilon_dpo_loss(policy_logits, ref_logits, input_ids, completion_mask, beta, epsilon):
    """The ε-DPO loss of a batch of pairs, from the logits of one concatenated forward pass per model.

    Shapes: policy_logits and ref_logits (2B, T, V), the B chosen sequences followed by the B rejected
    ones; input_ids and completion_mask (2B, T); beta the baseline β (a float); 0 ≤ epsilon < 1.
    Returns an EpsilonDPOOutput.

        s_i  = epsilon_steps(...)                   the criterion, from the logits alone
        β̃_i  = β / (1 + ε s_i)                      constant: no gradient flows through the decision
        loss = mean_i −log σ(β̃_i h_i)

    At ε = 0 every s is 0 and this is DPO's loss and gradient, bit for bit.
    """
    _check_pairs(policy_logits, ref_logits, input_ids, completion_mask)
    _check_beta(beta)
    _check_epsilon(epsilon)
    num_pairs = policy_logits.shape[0] // 2

    policy_logps = sequence_logps(policy_logits, input_ids, completion_mask)              # (2B,), with grad
    with torch.no_grad():
        ref_logps = sequence_logps(ref_logits.detach(), input_ids, completion_mask)       # (2B,)
    steps = epsilon_steps(policy_logits, ref_logits, input_ids, completion_mask, epsilon, policy_logps)
    betas = pair_betas(beta, steps, epsilon)                                              # (B,)

    losses, chosen_rewards, rejected_rewards = dpo_loss(
        policy_logps[:num_pairs], policy_logps[num_pairs:], ref_logps[:num_pairs], ref_logps[num_pairs:], betas
    )
    return EpsilonDPOOutput(
        loss=losses.mean(),
        losses=losses,
        pair_betas=betas,
        steps=steps,
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        chosen_logps=policy_logps[:num_pairs],
        rejected_logps=policy_logps[num_pairs:],
        ref_chosen_logps=ref_logps[:num_pairs],
        ref_rejected_logps=ref_logps[num_pairs:],
    )
