"""ε-DPO: Direct Preference Optimization with a KL penalty β chosen per preference pair.

Reference: Lee et al., "KL Penalty Control via Perturbation for Direct Preference Optimization"
(arXiv 2502.13177, NeurIPS 2025), built on Rafailov et al., "Direct Preference Optimization" (2023).

For each pair (prompt x, chosen y_w, rejected y_l), with z = log π(y_w|x) − log π(y_l|x):

    z_θ, γ      z of the policy and of the reference;  h = z_θ − γ, the margin;  DPO's loss is −log σ(β h)
    z⁻, z⁺      z of the policies estimated for the weaker penalty β/(1+ε) and the stronger β/(1−ε),
                from the logits f_λ = f_ref + λ (f_θ − f_ref) with λ = 1+ε and λ = 1−ε
    s           +1 if z⁻ > z_θ > z⁺ (z grows as β shrinks), −1 if z⁻ < z_θ < z⁺, 0 otherwise
    β̃ = β/(1 + ε s), the pair's β;  the loss is −log σ(β̃ h);  after each optimizer step β ← mean β̃

plain_epsilon_dpo_loss, first below, is all of it in 20 lines of plain torch. Sections 1 to 6 then
compute the same thing at scale, in the order of the method (tests check them equal to it):
  1. sequence_logps      log π(y|x), summed over completion tokens only
  2. dpo_loss            −log σ(β h) and the implicit rewards
  3. perturbed_logps     log π̂_λ(y|x) for λ = 1 ± ε, estimated from the logits alone
  4. criterion           s ∈ {−1, 0, +1};  pair_betas: β̃ = β / (1 + ε s)
  5. BaselineBeta        β ← mean of β̃ over every pair of an optimizer step
  6. epsilon_dpo_loss    one whole step: all of the above in one call
  7. epsilon_dpo_loss_from_hidden   the same step from the last hidden states, at 128k–256k vocabularies:
                         never a (2B, T, V) logits tensor

It depends on torch alone and takes plain tensors, so it can be copied into any training loop. This
runs as written from the repository's root (tiny_data/model is the demo's 60-word model):

    import torch
    from transformers import AutoModelForCausalLM
    from epsdpo import BaselineBeta, epsilon_dpo_loss

    policy = AutoModelForCausalLM.from_pretrained("tiny_data/model").eval()        # eval(): dropout off
    reference = AutoModelForCausalLM.from_pretrained("tiny_data/model").eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    baseline_beta = BaselineBeta(beta=0.1, epsilon=0.01)

    # One pair (B = 1), as the tiny tokenizer writes it: row 0 is prompt + chosen, row B = 1 prompt + rejected.
    prompt, chosen, rejected = [1, 4, 5, 6, 11, 7], [6, 24, 9, 10, 38, 8, 2], [6, 24, 9, 46, 8, 2]
    #   <s> review of the kettle :     the price is very great . </s>   the price is awful . </s>
    input_ids = torch.tensor([prompt + chosen, prompt + rejected + [0]])       # right-padded with the pad id 0
    attention_mask = torch.tensor([[1] * 13, [1] * 12 + [0]])
    completion_mask = torch.tensor([[0] * 6 + [1] * 7,                         # not shifted: 1 on each completion
                                    [0] * 6 + [1] * 6 + [0]])                  # token, EOS included
    micro_batches = [(input_ids, attention_mask, completion_mask)] * 2    # gradient accumulation over 2

    for step in range(3):
        for ids, attention, completion in micro_batches:
            logits = policy(ids, attention_mask=attention).logits                    # (2B, T, V)
            with torch.no_grad():
                ref_logits = reference(ids, attention_mask=attention).logits
            out = epsilon_dpo_loss(logits, ref_logits, ids, completion, baseline_beta)   # β and ε from it
            (out.loss / len(micro_batches)).backward()
            baseline_beta.observe(out.s)        # every micro-batch; under DDP each rank observes its own pairs
        optimizer.step()
        optimizer.zero_grad()
        baseline_beta.step()                    # after every optimizer step; under DDP on every rank, every
                                                # step: it is a collective (all-reduce), a rank that skips it hangs

Conventions: the B chosen rows come first, then the B rejected ones, in the same order; rows are right-
padded; completion_mask is aligned with input_ids (not shifted) and is 1 on every completion token,
EOS included; both models run without dropout (in train mode the two forward passes differ by noise,
and s is no longer 0 at the start nor a function of the policy). Each public function checks its input
and raises ValueError saying what is wrong; the computation it describes is in the private function
below it, which epsilon_dpo_loss calls without checking twice.
"""

import numbers
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------------
# The method in plain torch


def plain_epsilon_dpo_loss(policy_logits, ref_logits, input_ids, completion_mask, beta, epsilon):
    """ε-DPO on full logits, in plain torch: the whole method, to read first.

    Shapes: policy_logits and ref_logits (2B, T, V), the B chosen sequences then the B rejected ones;
    input_ids and completion_mask (2B, T); beta the baseline β > 0; 0 ≤ epsilon < 1.
    Returns (loss, s, pair_betas): the mean loss (a scalar), s (B,) in {−1, 0, +1} and β̃ (B,).

    It checks nothing and makes float32 copies of the whole (2B, T, V) logits: epsilon_dpo_loss (section
    6) computes the same loss, s and gradients from the completion positions alone, one row at a time.
    """
    num_pairs = policy_logits.shape[0] // 2
    dtype = torch.promote_types(policy_logits.dtype, torch.float32)  # float32 at least: bf16 would lose ε (f_θ − f_ref)
    policy, ref = policy_logits.to(dtype), ref_logits.to(dtype)
    next_tokens, scored = input_ids[:, 1:, None], completion_mask[:, 1:] == 1   # the logits at t predict token t + 1

    def log_ratio(logits):   # z = log π(y_w|x) − log π(y_l|x), with log π(y|x) = Σ_completion log softmax(f)[y]: (B,)
        token_logps = logits[:, :-1].log_softmax(-1).gather(-1, next_tokens).squeeze(-1)      # (2B, T-1)
        logps = torch.where(scored, token_logps, 0).sum(-1)                                     # (2B,)
        return logps[:num_pairs] - logps[num_pairs:]

    z_theta, gamma = log_ratio(policy), log_ratio(ref)
    h = z_theta - gamma                                               # the margin: DPO's loss is −log σ(β h)
    with torch.no_grad():                                             # no gradient flows through the decision
        z_weaker = log_ratio(torch.lerp(ref, policy, 1 + epsilon))    # z⁻: f_ref + (1+ε)(f_θ − f_ref), for β/(1+ε)
        z_stronger = log_ratio(torch.lerp(ref, policy, 1 - epsilon))  # z⁺: f_ref + (1−ε)(f_θ − f_ref), for β/(1−ε)
        weaker = (z_weaker > z_theta) & (z_theta > z_stronger)        # z grows as β shrinks: the weaker penalty
        stronger = (z_weaker < z_theta) & (z_theta < z_stronger)      # z grows as β grows: the stronger penalty
        s = weaker.long() - stronger.long()                           # ties and non-monotone cases: 0
    pair_betas = beta / (1 + epsilon * s)                             # β̃: β/(1+ε), β/(1−ε) or β
    loss = -F.logsigmoid(pair_betas * h).mean()
    return loss, s, pair_betas


# ----------------------------------------------------------------------------------------------------
# The same method at scale: sections 1 to 6 compute what plain_epsilon_dpo_loss computes, without ever
# holding a float32 copy of the (2B, T, V) logits, with one host synchronization per call, and with a
# number of torch operations that follows the rows of the batch, not the vocabulary.

# The full-vocabulary work (log-softmax normalizers, perturbed logits) runs over one row's completion
# positions at a time, split only where a row holds more than this many bytes of float32 logits
# (256 positions of a 256k vocabulary). On a GPU every torch operation costs a launch of some
# microseconds whatever its size, so the number of operations follows the rows of the batch, not the
# vocabulary or the sequence length; and the float32 copies alive at once stay a few rows' worth,
# never a float32 copy of the whole (N, T, V) logits.
CHUNK_BYTES = 256 * 2**20


# ----------------------------------------------------------------------------------------------------
# Checks shared by the public functions: bad input fails here, with a message, not deep inside torch.


def _check_on(tensor, name, device):
    """A tensor with values (not on the meta device) on the device of the others."""
    if tensor.device.type == "meta":
        raise ValueError(f"{name} is on the meta device: it has a shape but no values (load the model's weights)")
    if device is not None and tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device}, the other tensors on {device}: put them on one device")


def _check_beta(beta):
    """beta as a float, or as the floating-point tensor it is; a Fraction or a NumPy float is a number too."""
    if isinstance(beta, torch.Tensor):
        _check_on(beta, "beta", None)
        if not (beta.is_floating_point() and torch.isfinite(beta).all() and (beta > 0).all()):
            raise ValueError(f"beta must be finite and > 0 for every pair, got {beta.tolist()}")
        return beta
    if isinstance(beta, bool) or not (isinstance(beta, numbers.Real) and 0 < beta < float("inf")):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    return float(beta)


def _check_epsilon(epsilon):
    """epsilon as a float. At ε ≥ 1, β/(1−ε) is infinite or negative; NaN fails both comparisons too."""
    if isinstance(epsilon, bool) or not (isinstance(epsilon, numbers.Real) and 0 <= epsilon < 1):
        raise ValueError(f"epsilon must be a number in [0, 1), got {epsilon!r}")
    return float(epsilon)


def _check_sequences(logits, input_ids, completion_mask, name="logits"):
    if not (isinstance(logits, torch.Tensor) and logits.dim() == 3 and logits.is_floating_point()):
        raise ValueError(f"{name} must be a floating-point tensor of shape (N, T, V), got "
                         f"{getattr(logits, 'dtype', type(logits).__name__)} {tuple(getattr(logits, 'shape', ()))}")
    if 0 in logits.shape:
        raise ValueError(f"{name} {tuple(logits.shape)} is empty: every batch needs rows, positions and a vocabulary")
    for tensor_name, tensor in (("input_ids", input_ids), ("completion_mask", completion_mask)):
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{tensor_name} must be a tensor of shape (N, T), got {type(tensor).__name__}")
    if input_ids.shape != logits.shape[:2] or completion_mask.shape != logits.shape[:2]:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and completion_mask {tuple(completion_mask.shape)} "
            f"must both have the shape (N, T) = {tuple(logits.shape[:2])} of {name} {tuple(logits.shape)}"
        )
    if input_ids.dtype not in (torch.int64, torch.int32):                  # what an embedding layer takes
        raise ValueError(f"input_ids must hold token ids as torch.int64 or torch.int32, got {input_ids.dtype}")
    _check_on(logits, name, None)
    _check_on(input_ids, "input_ids", logits.device)
    _check_on(completion_mask, "completion_mask", logits.device)


def _check_pairs(policy_logits, ref_logits, input_ids, completion_mask):
    _check_sequences(policy_logits, input_ids, completion_mask, "policy_logits")
    if not isinstance(ref_logits, torch.Tensor) or ref_logits.shape != policy_logits.shape:
        raise ValueError(f"ref_logits {tuple(getattr(ref_logits, 'shape', ()))} must have the shape of "
                         f"policy_logits {tuple(policy_logits.shape)}")
    _check_sequences(ref_logits, input_ids, completion_mask, "ref_logits")
    if policy_logits.shape[0] % 2:
        raise ValueError(
            f"expected an even number of rows (B chosen, then B rejected), got {policy_logits.shape[0]}"
        )


# ----------------------------------------------------------------------------------------------------
# 1. Sequence log-probabilities


def sequence_logps(logits, input_ids, completion_mask):
    """Sum of the log-probabilities of the completion tokens of each sequence.

    Shapes: logits (N, T, V), the model's outputs for input_ids (N, T); completion_mask (N, T), 1 on the
    completion tokens of input_ids, 0 elsewhere. Returns (N,), float32 (float64 for float64 logits).

        log π(y|x) = Σ_i log softmax(f(x, y_<i))[y_i]      i over the completion tokens only

    What plain_epsilon_dpo_loss computes with a log-softmax and a gather, without its float32 (N, T, V)
    copy: the log-normalizers are taken one row's completion at a time (CHUNK_BYTES), and backward
    rebuilds the softmax the same way.
    A sum, not a mean: DPO's β is defined for the sum. Positions off the mask (prompt, padding) never
    reach the result, whatever their tokens or logits; a row with no completion token gives 0.
    """
    _check_sequences(logits, input_ids, completion_mask)
    positions = _scored_positions(input_ids, completion_mask, logits.shape[-1], _compute_dtype(logits).itemsize)
    return _CompletionLogps.apply(logits, positions)


# How sequence_logps does it: find the scored positions once, then work a row's completion at a time.


@dataclass
class _Positions:
    """Where the logits score a completion token, found once per batch.

    The logits at position t predict the token at t + 1, so logits[n, t] score a token when
    completion_mask[n, t + 1] is 1.
    """

    scored: torch.Tensor      # (N, T-1) bool: logits[:, :-1] that score a completion token
    targets: torch.Tensor     # (N, T-1) the token each of them scores (0 where none: safe to gather)
    chunks: list              # (row, start, stop): pieces of the spans below, each under CHUNK_BYTES
    empty_rows: list          # the rows with no completion token (their log-probability is 0)
    spans: list               # (row, first, stop): logits[row, first:stop] hold all of row's scored positions


def _check_every_pair_scored(positions):
    """A pair whose chosen or rejected sequence has no completion token has no preference to learn."""
    if positions.empty_rows:
        row, num_pairs = positions.empty_rows[0], positions.scored.shape[0] // 2
        raise ValueError(f"pair {row % num_pairs}: its {'chosen' if row < num_pairs else 'rejected'} sequence (row {row} "
                         f"of input_ids) has no completion token: completion_mask is 0 on all of it")


def _scored_positions(input_ids, completion_mask, vocab_size, itemsize):
    """Check the mask and the scored token ids, and find each row's span of scored positions.

    One host synchronization for the whole batch (the .tolist() below), whatever its size: the spans
    must be known on the host to slice the logits.
    """
    num_rows, length = input_ids.shape
    mask_on = completion_mask != 0
    scored, next_tokens = mask_on[:, 1:], input_ids[:, 1:]                     # (N, T-1)
    token_position = torch.arange(length, device=input_ids.device)
    problems = torch.stack([(mask_on & (completion_mask != 1)).any(),            # a mask value not 0 or 1
                            mask_on[:, 0].any(),                                  # a completion at position 0
                            (scored & ((next_tokens < 0) | (next_tokens >= vocab_size))).any()])
    first_scored = torch.where(mask_on, token_position, length).amin(-1) - 1      # (N,) T-1 for a row without any
    last_scored = torch.where(mask_on, token_position, 0).amax(-1) - 1           # (N,) −1 for a row without any
    # All the host needs, in one tensor: one .tolist(), one wait for the device.
    on_host = torch.cat([problems.long(), first_scored, last_scored]).tolist()
    (bad_values, first_token_scored, bad_ids), firsts, lasts = on_host[:3], on_host[3 : 3 + num_rows], on_host[3 + num_rows :]
    if bad_values:
        raise ValueError(f"completion_mask must hold only 0 and 1, got {completion_mask.unique().tolist()[:8]}")
    if first_token_scored:
        raise ValueError("completion_mask[:, 0] must be 0: the first token has no logit before it to predict it "
                         "(every completion follows at least one prompt token)")
    if bad_ids:
        wrong = next_tokens[scored & ((next_tokens < 0) | (next_tokens >= vocab_size))]
        raise ValueError(f"input_ids must be in [0, {vocab_size}) wherever completion_mask is 1, got {wrong.tolist()[:8]}")

    longest = max(1, CHUNK_BYTES // (vocab_size * itemsize))
    spans = [(row, first, last + 1) for row, (first, last) in enumerate(zip(firsts, lasts)) if first <= last]
    chunks = [(row, start, min(start + longest, stop)) for row, first, stop in spans for start in range(first, stop, longest)]
    empty_rows = [row for row, (first, last) in enumerate(zip(firsts, lasts)) if last < first]
    return _Positions(scored, torch.where(scored, next_tokens, 0).long(), chunks, empty_rows, spans)    # int32 ids too


def _compute_dtype(logits):
    # Log-softmax in float32 even for bf16/fp16 logits (float64 stays float64).
    return torch.promote_types(logits.dtype, torch.float32)


def _log_normalizers(logits, positions):
    """logsumexp over the vocabulary of the logits at every scored position: (N, T-1), 0 elsewhere."""
    dtype = _compute_dtype(logits)
    log_normalizers = torch.zeros(positions.scored.shape, dtype=dtype, device=logits.device)
    logits_rows, normalizer_rows = logits.unbind(0), log_normalizers.unbind(0)          # views, one per row
    for row, start, stop in positions.chunks:
        normalizer_rows[row][start:stop] = torch.logsumexp(logits_rows[row][start:stop].to(dtype), dim=-1)
    return log_normalizers


def _target_logits(logits, positions):
    """f[y]: the logit of the token each scored position predicts, (N, T-1), in the logits' dtype."""
    return logits[:, :-1].gather(-1, positions.targets[..., None]).squeeze(-1)


def _sum_over_completion(token_values, scored):
    """(..., T-1) per-token values -> (...) per-sequence sums; unscored positions count 0, whatever they hold.

    Each row is summed on its own, so no row's rounding depends on the other rows.
    """
    return torch.where(scored, token_values, 0).sum(dim=-1)


class _CompletionLogps(torch.autograd.Function):
    """Σ over scored positions of log softmax(logits)[target], with a backward that stores nothing new.

    Plain autograd would keep a float32 log-softmax of every position alive until backward (an
    (N, T, V) tensor). Here forward keeps only the logits (which exist anyway) and the (N, T-1)
    log-normalizers, and backward rebuilds the softmax one chunk at a time:
        ∂ log softmax(f)[y] / ∂f = onehot(y) − softmax(f)
    """

    @staticmethod
    def forward(ctx, logits, positions):
        log_normalizers = _log_normalizers(logits, positions)                           # (N, T-1)
        ctx.positions = positions
        ctx.save_for_backward(logits, log_normalizers)
        token_logps = _target_logits(logits, positions).to(log_normalizers.dtype) - log_normalizers
        return _sum_over_completion(token_logps, positions.scored)                      # (N,)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logps):
        logits, log_normalizers = ctx.saved_tensors
        positions, dtype = ctx.positions, log_normalizers.dtype
        # −g at every scored position of a sequence whose log-probability has gradient g, 0 elsewhere.
        minus_grads = torch.where(positions.scored, -grad_logps[:, None].to(dtype), 0)[..., None]   # (N, T-1, 1)
        grad_logits = torch.zeros_like(logits)                                                    # (N, T, V)
        logits_rows, normalizer_rows = logits.unbind(0), log_normalizers[..., None].unbind(0)     # views, per row
        target_rows, minus_grad_rows, grad_rows = positions.targets[..., None].unbind(0), minus_grads.unbind(0), grad_logits.unbind(0)
        for row, start, stop in positions.chunks:
            softmax = (logits_rows[row][start:stop].to(dtype) - normalizer_rows[row][start:stop]).exp_()   # (m, V)
            # Subtract the one-hot before rounding to the logits' dtype: for a confident model g (1 − p)
            # is far smaller than g p, and bf16 would round it away.
            softmax_minus_onehot = softmax.scatter_(-1, target_rows[row][start:stop], -1.0, reduce="add")
            grad_rows[row][start:stop] = softmax_minus_onehot.mul_(minus_grad_rows[row][start:stop])
        return grad_logits, None


# ----------------------------------------------------------------------------------------------------
# 2. DPO


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """The DPO loss of each pair and its implicit rewards.

    Shapes: the four log-probabilities are (B,); beta is a number or a (B,) tensor (one β per pair).
    Returns (losses, chosen_rewards, rejected_rewards), each (B,).

        h    = (log π_θ(y_w) − log π_θ(y_l)) − (log π_ref(y_w) − log π_ref(y_l))     the margin
        loss = −log σ(β h)
        r_w  = β (log π_θ(y_w) − log π_ref(y_w)),   r_l = β (log π_θ(y_l) − log π_ref(y_l))

    The rewards are detached: they are for logging, not for gradients.
    """
    named = {"chosen_logps": chosen_logps, "rejected_logps": rejected_logps, "ref_chosen_logps": ref_chosen_logps,
             "ref_rejected_logps": ref_rejected_logps}
    shapes = [tuple(getattr(t, "shape", ())) for t in named.values()]
    if len(set(shapes)) != 1 or len(shapes[0]) != 1 or shapes[0][0] == 0:
        raise ValueError("chosen_logps, rejected_logps, ref_chosen_logps and ref_rejected_logps must all have the "
                         f"same shape (B,) with B ≥ 1, got {shapes}")
    for name, logps in named.items():
        if not (isinstance(logps, torch.Tensor) and logps.is_floating_point()):
            raise ValueError(f"{name} must be a floating-point tensor (log-probabilities), got {getattr(logps, 'dtype', type(logps).__name__)}")
        _check_on(logps, name, chosen_logps.device)
    beta = _check_beta(beta)
    if isinstance(beta, torch.Tensor) and beta.shape not in ((), chosen_logps.shape):
        raise ValueError(f"beta must be a number or have shape {tuple(chosen_logps.shape)}, got {tuple(beta.shape)}")
    return _dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)


def _dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
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
    rounding step of the logits. Only completion positions are computed, a row at a time, under no_grad.
    """
    _check_pairs(policy_logits, ref_logits, input_ids, completion_mask)
    epsilon = _check_epsilon(epsilon)
    positions = _scored_positions(input_ids, completion_mask, policy_logits.shape[-1],
                                  _compute_dtype(policy_logits).itemsize)
    return _perturbed_logps(policy_logits, ref_logits, positions, epsilon)


@torch.no_grad()
def _perturbed_logps(policy_logits, ref_logits, positions, epsilon):
    dtype = _compute_dtype(policy_logits)
    # torch.lerp(f_ref, f_θ, λ) forms f_ref + λ (f_θ − f_ref) in one pass, exactly f_ref when f_θ = f_ref.
    # Index 0 of the leading dimension of 2 is λ = 1 + ε (weaker penalty), index 1 is λ = 1 − ε (stronger).
    lambdas = (1 + epsilon, 1 - epsilon)
    # log softmax(f_λ)[y] = f_λ[y] − logsumexp(f_λ): first the perturbed logits of the targets, (2, N, T-1) ...
    ref_targets, policy_targets = (_target_logits(logits, positions).to(dtype) for logits in (ref_logits, policy_logits))
    target_logits = torch.stack([torch.lerp(ref_targets, policy_targets, lam) for lam in lambdas])
    # ... then the log-normalizers of the perturbed distributions, a chunk of positions at a time.
    log_normalizers = torch.zeros_like(target_logits)                                     # (2, N, T-1)
    ref_rows, policy_rows = ref_logits.unbind(0), policy_logits.unbind(0)
    normalizer_rows = [normalizers.unbind(0) for normalizers in log_normalizers]          # [λ][row]
    for row, start, stop in positions.chunks:
        ref_chunk, policy_chunk = ref_rows[row][start:stop].to(dtype), policy_rows[row][start:stop].to(dtype)   # (m, V)
        for lam, rows_of_lambda in zip(lambdas, normalizer_rows):
            rows_of_lambda[row][start:stop] = torch.logsumexp(torch.lerp(ref_chunk, policy_chunk, lam), dim=-1)
    weaker_logps, stronger_logps = _sum_over_completion(target_logits - log_normalizers, positions.scored)
    return weaker_logps, stronger_logps


# ----------------------------------------------------------------------------------------------------
# 4. The criterion and the per-pair β (paper Eq. 5)


def criterion(policy_logits, ref_logits, input_ids, completion_mask, epsilon, policy_logps=None):
    """The criterion s ∈ {−1, 0, +1} of each pair: +1 asks for the weaker penalty, −1 for the stronger.

    Shapes: policy_logits and ref_logits (2B, T, V); input_ids and completion_mask (2B, T), the B chosen
    sequences followed by the B rejected ones (one concatenated forward pass). Returns a LongTensor (B,).
    policy_logps (2B,), optional: the policy's own sequence log-probabilities, if the caller has them.

        z_θ = log π_θ(y_w) − log π_θ(y_l),   z⁻, z⁺ the same under λ = 1+ε and λ = 1−ε
        s = +1   if z⁻ > z_θ > z⁺   z grows as β shrinks: the weaker penalty β/(1+ε)
        s = −1   if z⁻ < z_θ < z⁺   z grows as β grows:   the stronger penalty β/(1−ε)
        s =  0   otherwise          ties and non-monotone cases keep β

    The reference's log-ratio γ and the factor β would shift or scale all three alike, so the raw
    policy log-ratios are compared. No gradient flows through the decision. A pair whose chosen or
    rejected sequence has no completion token is refused (ValueError naming the pair and the row).
    To first order in ε, s = sign(h − (K_w − K_l)), with K the KL(π_θ‖π_ref) summed along a completion
    (README: "Why it works").
    """
    _check_pairs(policy_logits, ref_logits, input_ids, completion_mask)
    epsilon = _check_epsilon(epsilon)
    if policy_logps is not None and tuple(getattr(policy_logps, "shape", ())) != policy_logits.shape[:1]:
        raise ValueError(f"policy_logps must have shape {tuple(policy_logits.shape[:1])}, "
                         f"got {tuple(getattr(policy_logps, 'shape', ()))}")
    if policy_logps is not None:
        _check_on(policy_logps, "policy_logps", policy_logits.device)
    positions = _scored_positions(input_ids, completion_mask, policy_logits.shape[-1],
                                  _compute_dtype(policy_logits).itemsize)
    _check_every_pair_scored(positions)
    if policy_logps is None:
        with torch.no_grad():
            policy_logps = _CompletionLogps.apply(policy_logits, positions)
    return _criterion(policy_logits, ref_logits, positions, epsilon, policy_logps)


@torch.no_grad()
def _criterion(policy_logits, ref_logits, positions, epsilon, policy_logps):
    weaker_logps, stronger_logps = _perturbed_logps(policy_logits, ref_logits, positions, epsilon)
    return _criterion_from_logps(policy_logps, weaker_logps, stronger_logps)


@torch.no_grad()
def _criterion_from_logps(policy_logps, weaker_logps, stronger_logps):
    """s (B,) from the sequence log-probabilities (2B,) of the policy and of the two perturbed policies."""
    num_pairs = policy_logps.shape[0] // 2

    def log_ratios(logps):                                                 # (2B,) -> (B,): chosen − rejected
        return logps[:num_pairs] - logps[num_pairs:]

    z_theta = log_ratios(policy_logps.detach().to(weaker_logps.dtype))
    z_weaker, z_stronger = log_ratios(weaker_logps), log_ratios(stronger_logps)

    weaker = (z_weaker > z_theta) & (z_theta > z_stronger)                # s = +1
    stronger = (z_weaker < z_theta) & (z_theta < z_stronger)              # s = −1
    return weaker.long() - stronger.long()


def pair_betas(beta, s, epsilon):
    """The β of each pair: β̃ = β / (1 + ε s).

    Shapes: beta a number (the baseline β), s (B,) in {−1, 0, +1}. Returns (B,) float32.
    s = +1 gives β/(1+ε), s = −1 gives β/(1−ε), s = 0 gives β.
    """
    beta, epsilon = _check_beta(beta), _check_epsilon(epsilon)
    if isinstance(beta, torch.Tensor) and beta.dim() != 0:
        raise ValueError(f"beta must be one number (the baseline β), got shape {tuple(beta.shape)}")
    if isinstance(s, torch.Tensor):
        _check_on(s, "s", None)
    if not isinstance(s, torch.Tensor) or s.is_floating_point() or ((s < -1) | (s > 1)).any():
        raise ValueError(f"s must be an integer tensor of -1, 0 and +1, got {s!r}"[:200])
    return _pair_betas(beta, s, epsilon)


def _pair_betas(beta, s, epsilon):
    return beta / (1 + epsilon * s.to(torch.float32))


# ----------------------------------------------------------------------------------------------------
# 5. Updating β itself (paper Algorithm 1)


class BaselineBeta:
    """The baseline β, moved after every optimizer step to the mean β̃ of the pairs that made that step.

        β ← mean_i β̃_i = β · mean_i 1 / (1 + ε s_i)

    over every pair of the step: call observe(s) for each micro-batch of gradient accumulation, then
    step() once after optimizer.step(). When torch.distributed is initialized, step() sums the counts over
    all ranks (one all-reduce), so every rank gets the same β: it is a collective, which every rank must
    call after every optimizer step, or the others wait for it forever. Evaluation must not call observe().

    Why count s instead of averaging β̃: since all β̃ of one step are β/(1+ε), β or β/(1−ε), the mean is
    exact from three integer counts, which add exactly across micro-batches and ranks; at ε = 0 β stays
    bit for bit what it was. The counts stay on the device of s until step(), so observe() never
    waits for the GPU; under NCCL, step() reduces them there. device: where the counts are before the first
    observe() (a loop that calls step() without observe() under NCCL gives this rank's GPU). (The authors'
    released trainer uses β / (1 + ε mean_i s_i) instead; the two agree to first order in ε.)
    """

    def __init__(self, beta, epsilon, device="cpu"):
        if isinstance(beta, torch.Tensor):
            raise ValueError("beta must be a number, not a tensor")
        self.value, self.epsilon = _check_beta(beta), _check_epsilon(epsilon)
        self.counts = torch.zeros(3, dtype=torch.int64, device=device)    # pairs seen with s = +1, 0, −1 since the last step
        self.seen = 0                                                     # pairs observed since the last step

    def observe(self, s):
        """Record the criterion s (B,) of one micro-batch; step() checks that each was −1, 0 or +1."""
        if not (isinstance(s, torch.Tensor) and not s.is_floating_point() and s.dtype != torch.bool):
            raise ValueError(f"s must be an integer tensor of -1, 0 and +1, got {getattr(s, 'dtype', type(s).__name__)}")
        _check_on(s, "s", None)
        s = s.detach()
        self.counts = self.counts.to(s.device) + torch.stack([(s == value).sum() for value in (1, 0, -1)])
        self.seen += s.numel()

    def step(self):
        """Move β to the mean β̃ of everything observed since the last step; returns the new β."""
        counts = torch.cat([self.counts, torch.tensor([self.seen], device=self.counts.device)])
        if dist.is_available() and dist.is_initialized():
            # Gloo and MPI reduce on the host; NCCL on the GPU the counts are on (those of s), never on
            # torch.cuda.current_device(): in a loop that never calls set_device, that is GPU 0 on every rank.
            backend = dist.get_backend()
            if backend in ("gloo", "mpi"):
                counts = counts.cpu()
            elif counts.device.type == "cpu" and "gloo" not in backend:
                raise ValueError(f"under {backend} the counts must be on this rank's GPU: observe() s there, "
                                 f"or create BaselineBeta(beta, epsilon, device=...) for a step() with nothing observed")
            dist.all_reduce(counts)                                          # sum over ranks, exactly
        weaker, kept, stronger, seen = counts.tolist()
        if weaker + kept + stronger != seen:
            raise ValueError(f"s must all be -1, 0 or +1: {seen - weaker - kept - stronger} of the {seen} "
                             f"observed since the last step were not")
        if seen:                                                             # no pair seen: β stays
            mean_factor = (weaker / (1 + self.epsilon) + kept + stronger / (1 - self.epsilon)) / seen
            self.value = self.value * mean_factor
        self.counts, self.seen = torch.zeros_like(self.counts), 0
        return self.value

    def state_dict(self):
        """Everything a resumed run needs, including counts pending in a half-accumulated step."""
        return {"beta": self.value, "epsilon": self.epsilon, "counts": self.counts.tolist()}

    def load_state_dict(self, state):
        if not (isinstance(state, dict) and {"beta", "epsilon", "counts"} <= state.keys()):
            raise ValueError(f"a BaselineBeta state is a dict with beta, epsilon and counts, got {state!r}"[:200])
        if isinstance(state["beta"], torch.Tensor):
            raise ValueError("beta must be a number, not a tensor")
        beta, epsilon, counts = _check_beta(state["beta"]), _check_epsilon(state["epsilon"]), state["counts"]
        if not (isinstance(counts, (list, tuple)) and len(counts) == 3
                and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts) and sum(counts) < 2**63):
            raise ValueError(f"counts must be three integers >= 0 whose sum fits in int64 (pairs seen with s = +1, 0, −1), "
                             f"got {counts!r}"[:200])
        self.value, self.epsilon = beta, epsilon
        self.counts, self.seen = torch.tensor(counts, dtype=torch.int64, device=self.counts.device), sum(counts)


def _beta_and_epsilon(beta, epsilon):
    """(β, ε) from a BaselineBeta, refusing an ε that is not its own; or as given."""
    if isinstance(beta, BaselineBeta):
        if epsilon is not None and epsilon != beta.epsilon:
            raise ValueError(f"epsilon {epsilon!r} differs from the BaselineBeta's {beta.epsilon}: "
                             f"pass the BaselineBeta alone, and it gives both")
        return beta.value, beta.epsilon
    if epsilon is None:
        raise ValueError("epsilon is required when beta is a number (or pass the BaselineBeta as beta)")
    return beta, epsilon


# ----------------------------------------------------------------------------------------------------
# 6. One whole step


@dataclass
class EpsilonDPOOutput:
    """What epsilon_dpo_loss returns. loss is a scalar, every other field is (B,)."""

    loss: torch.Tensor               # mean of losses: call .backward() on it
    losses: torch.Tensor             # −log σ(β̃ h) per pair
    pair_betas: torch.Tensor         # β̃ = β / (1 + ε s), held constant in the loss
    s: torch.Tensor                  # the criterion, ∈ {−1, 0, +1}
    chosen_rewards: torch.Tensor     # β̃ (log π_θ(y_w) − log π_ref(y_w)), detached
    rejected_rewards: torch.Tensor   # β̃ (log π_θ(y_l) − log π_ref(y_l)), detached
    chosen_logps: torch.Tensor       # log π_θ(y_w), differentiable
    rejected_logps: torch.Tensor     # log π_θ(y_l), differentiable
    ref_chosen_logps: torch.Tensor   # log π_ref(y_w)
    ref_rejected_logps: torch.Tensor # log π_ref(y_l)


def epsilon_dpo_loss(policy_logits, ref_logits, input_ids, completion_mask, beta, epsilon=None):
    """The ε-DPO loss of a batch of pairs, from the logits of one concatenated forward pass per model.

    Shapes: policy_logits and ref_logits (2B, T, V), the B chosen sequences followed by the B rejected
    ones; input_ids and completion_mask (2B, T). beta: a BaselineBeta, whose β and ε are used (an epsilon
    given too must equal its own), or the baseline β as a number with 0 ≤ epsilon < 1.
    Returns an EpsilonDPOOutput.

        s_i  = criterion(...)                       from the logits alone
        β̃_i  = β / (1 + ε s_i)                      constant: no gradient flows through the decision
        loss = mean_i −log σ(β̃_i h_i)

    The same values, s and gradients as plain_epsilon_dpo_loss (tested). At ε = 0 every s is 0 and this
    is DPO's loss and gradient, bit for bit. A pair with an empty chosen or rejected completion is refused,
    naming it (its log-probability would be 0). One host synchronization (finding the completion
    positions), and a number of torch operations that follows the rows of the batch, not its vocabulary.
    """
    beta, epsilon = _beta_and_epsilon(beta, epsilon)
    _check_pairs(policy_logits, ref_logits, input_ids, completion_mask)
    if isinstance(beta, torch.Tensor):
        raise ValueError("beta must be a number (the baseline β), not a tensor")
    beta, epsilon = _check_beta(beta), _check_epsilon(epsilon)
    positions = _scored_positions(input_ids, completion_mask, policy_logits.shape[-1],
                                  _compute_dtype(policy_logits).itemsize)
    _check_every_pair_scored(positions)

    policy_logps = _CompletionLogps.apply(policy_logits, positions)                      # (2B,), with grad
    with torch.no_grad():
        ref_logps = _CompletionLogps.apply(ref_logits.detach(), positions)               # (2B,)
    s = _criterion(policy_logits.detach(), ref_logits, positions, epsilon, policy_logps)
    return _epsilon_dpo_output(policy_logps, ref_logps, s, beta, epsilon)


def _epsilon_dpo_output(policy_logps, ref_logps, s, beta, epsilon):
    """The per-pair β and the DPO loss with it, from the sequence log-probabilities (2B,) and s (B,)."""
    num_pairs = policy_logps.shape[0] // 2
    betas = _pair_betas(beta, s, epsilon)                                            # (B,)
    losses, chosen_rewards, rejected_rewards = _dpo_loss(
        policy_logps[:num_pairs], policy_logps[num_pairs:], ref_logps[:num_pairs], ref_logps[num_pairs:], betas
    )
    return EpsilonDPOOutput(
        loss=losses.mean(),
        losses=losses,
        pair_betas=betas,
        s=s,
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        chosen_logps=policy_logps[:num_pairs],
        rejected_logps=policy_logps[num_pairs:],
        ref_chosen_logps=ref_logps[:num_pairs],
        ref_rejected_logps=ref_logps[num_pairs:],
    )


# ----------------------------------------------------------------------------------------------------
# 7. At scale: the loss from hidden states
#
# The logits are the last hidden states times the output layer's weight, f = softcap(hidden @ W.T), and ε-DPO
# reads them only at the completion positions. So nothing needs the (2B, T, V) logits tensors of section 6
# (1 GB each in bf16 for Llama-3's 128,256 words at T = 1,024 and 2 pairs), nor their gradient: the scored
# positions are projected a chunk at a time, in forward for all four log-probabilities at once, and again
# in backward for the policy's gradient.
#
# A chunk is at most GROUP_POSITIONS scored positions (of all rows together) times a slice of the
# vocabulary, cut so that it holds as many logits as CHUNK_POSITIONS positions of the whole vocabulary:
#   - memory: a few float32 chunks of CHUNK_POSITIONS × V (32 MiB at V = 128,256), whatever B and T;
#   - operations: one chunk per CHUNK_POSITIONS scored positions, whatever V (a GPU pays per launch);
#   - matrix products of GROUP_POSITIONS rows: a GPU reads W once per group, where products of 64 rows
#     would wait on memory (re-reading W) rather than compute.
CHUNK_POSITIONS = 64
GROUP_POSITIONS = 2048


@dataclass
class _Gathered:
    """The positions the hidden-state path projects: every row's span of scored positions, all rows together."""

    hidden_index: torch.Tensor    # (P,) into hidden.flatten(0, 1): row * T + t
    token_index: torch.Tensor     # (P,) into a flattened (N, T-1): row * (T-1) + t
    rows: torch.Tensor            # (P,) the row of each
    scored: torch.Tensor          # (P,) bool: it scores a completion token (spans may have gaps)
    targets: torch.Tensor         # (P,) the token it scores (0 where none)
    chunks: list                  # (start, stop, [(first word, last word + 1), ...]): the chunks, group by group


def _gathered_positions(positions, num_rows, length, vocab_size, device):
    hidden_index = torch.tensor([row * length + t for row, first, stop in positions.spans for t in range(first, stop)],
                                dtype=torch.long, device=device)                          # one copy to the device
    rows = hidden_index // length
    token_index = hidden_index - rows
    chunks = []
    for start in range(0, len(hidden_index), GROUP_POSITIONS):
        stop = min(start + GROUP_POSITIONS, len(hidden_index))
        num_slices = min(vocab_size, -(-(stop - start) // CHUNK_POSITIONS))             # ceil(positions / 64)
        bounds = [vocab_size * i // num_slices for i in range(num_slices + 1)]
        chunks.append((start, stop, list(zip(bounds[:-1], bounds[1:]))))
    return _Gathered(hidden_index, token_index, rows, positions.scored.flatten()[token_index],
                     positions.targets.flatten()[token_index], chunks)


def _matmul_dtype(hidden, weight):
    # What autocast multiplies in when it is on (bf16 logits, as the model's own head gives under autocast),
    # else the inputs' common dtype.
    if torch.is_autocast_enabled(hidden.device.type):
        return torch.get_autocast_dtype(hidden.device.type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _softcapped(logits, logit_softcap):
    # cap · tanh(f / cap), in the order Gemma-2 computes it, so that bf16 logits round as the model's do.
    return logits if logit_softcap is None else torch.tanh(logits / logit_softcap) * logit_softcap


def _in_slice(targets, first, stop):
    """(where each target lies in the slice [first, stop) of the vocabulary (m, 1), whether it does (m,))."""
    local = targets - first
    return local.clamp(0, stop - first - 1)[:, None], (local >= 0) & (local < stop - first)


class _LogpsFromHidden(torch.autograd.Function):
    """The four sequence log-probabilities of ε-DPO from hidden states, each (N,): the policy's (with a
    gradient), the reference's, and the perturbed ones for λ = 1 + ε and λ = 1 − ε.

    The twin of _CompletionLogps and _perturbed_logps: forward keeps the per-position log-normalizers
    and the gathered policy hidden states (P, H); backward projects each chunk again and rebuilds its
    softmax, ∂ log softmax(f)[y] / ∂f = onehot(y) − softmax(f), times the soft-cap's derivative 1 − tanh²,
    then  ∂/∂hidden = grad_f @ W  and  ∂/∂W = grad_f.T @ hidden.
    """

    @staticmethod
    def forward(ctx, policy_hidden, policy_weight, ref_hidden, ref_weight, positions, gathered, logit_softcap, epsilon):
        num_rows, length, _ = policy_hidden.shape
        policy_dtype, ref_dtype = _matmul_dtype(policy_hidden, policy_weight), _matmul_dtype(ref_hidden, ref_weight)
        dtype = torch.promote_types(policy_dtype, torch.float32)              # softmax and perturbation: float32
        lambdas = (1 + epsilon, 1 - epsilon)
        with torch.autocast(policy_hidden.device.type, enabled=False):       # the dtypes are chosen above
            hidden = policy_hidden.detach().flatten(0, 1)[gathered.hidden_index].to(policy_dtype)        # (P, H)
            ref_hidden = ref_hidden.detach().flatten(0, 1)[gathered.hidden_index].to(ref_dtype)
            weight, ref_weight = policy_weight.detach().to(policy_dtype), ref_weight.detach().to(ref_dtype)
            num_slices = max(len(slices) for _, _, slices in gathered.chunks)
            # logsumexp over each slice of the vocabulary, then over the slices: [policy, ref, λ = 1+ε, λ = 1−ε]
            slice_normalizers = torch.full((4, num_slices, len(hidden)), -float("inf"), dtype=dtype, device=hidden.device)
            target_logits = torch.zeros(2, len(hidden), dtype=dtype, device=hidden.device)     # [policy, ref]
            for start, stop, slices in gathered.chunks:
                for index, (first, last) in enumerate(slices):
                    policy_logits = _softcapped(hidden[start:stop] @ weight[first:last].T, logit_softcap).to(dtype)
                    ref_logits = _softcapped(ref_hidden[start:stop] @ ref_weight[first:last].T, logit_softcap).to(dtype)
                    slice_normalizers[:, index, start:stop] = torch.stack(
                        [policy_logits.logsumexp(-1), ref_logits.logsumexp(-1)]
                        + [torch.lerp(ref_logits, policy_logits, lam).logsumexp(-1) for lam in lambdas])
                    where, inside = _in_slice(gathered.targets[start:stop], first, last)
                    found = torch.stack([policy_logits.gather(-1, where), ref_logits.gather(-1, where)]).squeeze(-1)
                    target_logits[:, start:stop] += torch.where(inside, found, 0)
            log_normalizers = slice_normalizers.logsumexp(1)                                    # (4, P)
            ref_targets, policy_targets = target_logits[1], target_logits[0]
            targets = torch.stack([policy_targets, ref_targets, *(torch.lerp(ref_targets, policy_targets, lam) for lam in lambdas)])
            # Back to (N, T-1), to sum each row as sequence_logps does.
            token_logps = torch.zeros(4, num_rows * (length - 1), dtype=dtype, device=hidden.device)
            token_logps.index_copy_(1, gathered.token_index, targets - log_normalizers)
            logps = _sum_over_completion(token_logps.view(4, num_rows, length - 1), positions.scored)   # (4, N)
        ctx.save_for_backward(hidden, policy_weight, log_normalizers[0])
        ctx.gathered, ctx.logit_softcap, ctx.hidden_shape = gathered, logit_softcap, policy_hidden.shape
        ctx.hidden_dtype, ctx.policy_dtype = policy_hidden.dtype, policy_dtype
        outputs = tuple(logps.unbind(0))
        ctx.mark_non_differentiable(*outputs[1:])
        return outputs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logps, *_):
        hidden, policy_weight, log_normalizers = ctx.saved_tensors
        gathered, logit_softcap, dtype = ctx.gathered, ctx.logit_softcap, log_normalizers.dtype
        with torch.autocast(hidden.device.type, enabled=False):
            weight = policy_weight.to(ctx.policy_dtype)
            # −g at every scored position of a sequence whose log-probability has gradient g, 0 elsewhere.
            minus_grads = torch.where(gathered.scored, -grad_logps.to(dtype)[gathered.rows], 0)[:, None]     # (P, 1)
            grad_hidden = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device)                     # (P, H)
            grad_weight = torch.zeros(weight.shape if ctx.needs_input_grad[1] else 0, dtype=dtype, device=hidden.device)  # (V, H)
            for start, stop, slices in gathered.chunks:
                for first, last in slices:
                    logits = hidden[start:stop] @ weight[first:last].T
                    if logit_softcap is not None:
                        tanh = torch.tanh(logits / logit_softcap)
                        logits = tanh * logit_softcap
                    softmax = (logits.to(dtype) - log_normalizers[start:stop, None]).exp_()          # (m, slice)
                    where, inside = _in_slice(gathered.targets[start:stop], first, last)
                    # Subtract the one-hot before rounding to the matmul dtype, as _CompletionLogps does.
                    grad_logits = softmax.scatter_add_(-1, where, -inside.to(dtype)[:, None]).mul_(minus_grads[start:stop])
                    if logit_softcap is not None:
                        grad_logits.mul_(1 - tanh.to(dtype).square())                  # d cap·tanh(f/cap) / df
                    grad_logits = grad_logits.to(weight.dtype)
                    grad_hidden[start:stop] += grad_logits @ weight[first:last]
                    if ctx.needs_input_grad[1]:                 # not for a frozen head (LoRA)
                        grad_weight[first:last] += grad_logits.T @ hidden[start:stop]
            num_rows, length, width = ctx.hidden_shape
            grad_policy_hidden = torch.zeros(num_rows * length, width, dtype=ctx.hidden_dtype, device=hidden.device)
            grad_policy_hidden.index_copy_(0, gathered.hidden_index, grad_hidden.to(ctx.hidden_dtype))
        grad_weight = grad_weight.to(policy_weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_policy_hidden.view(ctx.hidden_shape), grad_weight, None, None, None, None, None, None


def _check_hidden(hidden, weight, input_ids, completion_mask, prefix):
    if not (isinstance(hidden, torch.Tensor) and hidden.dim() == 3 and hidden.is_floating_point() and 0 not in hidden.shape):
        raise ValueError(f"{prefix}_hidden must be a non-empty floating-point tensor of shape (N, T, H), got "
                         f"{getattr(hidden, 'dtype', type(hidden).__name__)} {tuple(getattr(hidden, 'shape', ()))}")
    if not (isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.is_floating_point() and 0 not in weight.shape
            and weight.shape[1] == hidden.shape[2]):
        raise ValueError(f"{prefix}_weight must be a non-empty floating-point tensor of shape (V, H) with H = "
                         f"{hidden.shape[2]} as in {prefix}_hidden, got {tuple(getattr(weight, 'shape', ()))}")
    _check_on(hidden, f"{prefix}_hidden", None)
    _check_on(weight, f"{prefix}_weight", hidden.device)
    # The checks of the logits path, on a stand-in of the logits' shape (N, T, V) that holds no memory.
    logits_shape = hidden.new_zeros(()).expand(*hidden.shape[:2], weight.shape[0])
    _check_sequences(logits_shape, input_ids, completion_mask, f"softcap({prefix}_hidden @ {prefix}_weight.T)")


def epsilon_dpo_loss_from_hidden(policy_hidden, policy_weight, ref_hidden, ref_weight, input_ids, completion_mask,
                                 beta, epsilon=None, logit_softcap=None):
    """epsilon_dpo_loss from the last hidden states and the output layers' weights, never the full logits.

    Shapes: policy_hidden and ref_hidden (2B, T, H), each model's last hidden states after its final norm,
    the B chosen sequences followed by the B rejected ones; policy_weight and ref_weight (V, H), the
    output layers' weights (bias-free heads; a tied weight is fine: its gradient adds to the embedding's);
    input_ids and completion_mask (2B, T); beta the baseline β; 0 ≤ epsilon < 1; logit_softcap None or
    Gemma-2's final_logit_softcapping. Returns the EpsilonDPOOutput of

        epsilon_dpo_loss(softcap(policy_hidden @ policy_weight.T), softcap(ref_hidden @ ref_weight.T), ...)
        softcap(f) = cap · tanh(f / cap)        (no soft-cap: softcap(f) = f)

    within float32 rounding, with gradients for policy_hidden and policy_weight. Only the scored positions
    are projected, a chunk at a time (CHUNK_POSITIONS above), in forward and again in backward, so the extra
    memory is a few chunks of CHUNK_POSITIONS × V float32 logits whatever B and T. The products run in
    the inputs' dtype (bf16 under a bf16 autocast, as the model's own head would), the soft-cap in that
    dtype too, and the softmax, logsumexp and perturbation in float32, as in the logits path.
    """
    beta, epsilon = _beta_and_epsilon(beta, epsilon)
    _check_hidden(policy_hidden, policy_weight, input_ids, completion_mask, "policy")
    _check_hidden(ref_hidden, ref_weight, input_ids, completion_mask, "ref")
    if ref_weight.shape[0] != policy_weight.shape[0]:
        raise ValueError(f"ref_weight {tuple(ref_weight.shape)} and policy_weight {tuple(policy_weight.shape)} must have "
                         f"the same vocabulary")
    if policy_hidden.shape[0] % 2:
        raise ValueError(f"expected an even number of rows (B chosen, then B rejected), got {policy_hidden.shape[0]}")
    if isinstance(beta, torch.Tensor):
        raise ValueError("beta must be a number (the baseline β), not a tensor")
    beta, epsilon = _check_beta(beta), _check_epsilon(epsilon)
    if logit_softcap is not None and (isinstance(logit_softcap, bool) or not isinstance(logit_softcap, numbers.Real)
                                      or not 0 < logit_softcap < float("inf")):
        raise ValueError(f"logit_softcap must be None or a finite number > 0, got {logit_softcap!r}")
    (num_rows, length, _), vocab_size = policy_hidden.shape, policy_weight.shape[0]
    positions = _scored_positions(input_ids, completion_mask, vocab_size, 4)
    _check_every_pair_scored(positions)
    gathered = _gathered_positions(positions, num_rows, length, vocab_size, policy_hidden.device)

    policy_logps, ref_logps, weaker_logps, stronger_logps = _LogpsFromHidden.apply(
        policy_hidden, policy_weight, ref_hidden, ref_weight, positions, gathered, logit_softcap, epsilon)
    s = _criterion_from_logps(policy_logps, weaker_logps, stronger_logps)
    return _epsilon_dpo_output(policy_logps, ref_logps, s, beta, epsilon)
