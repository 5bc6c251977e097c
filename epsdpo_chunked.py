"""ε-DPO at 32k–256k-word vocabularies: the functions of epsdpo.py, computed in chunks.

epsdpo.py is the method, on full logits with float32 copies of them: (2B, T, V) float32 tensors several times
over, 4 GB each for 4 pairs × 1,024 tokens at V = 128,256. This module computes the same values, s and gradients
(tested equal to epsdpo.py) with the same arguments and outputs, without those copies:

    sequence_logps, perturbed_logps, criterion, epsilon_dpo_loss     from the logits, a chunk of positions at a time:
                                                                     never a float32 copy of the (2B, T, V) logits
    epsilon_dpo_loss_from_hidden                                     from the last hidden states and the output
                                                                     layer's weight: never the (2B, T, V) logits

Everything else (dpo_loss, betas_from_s, BaselineBeta, EpsilonDPOOutput) is epsdpo.py's: copy both files.
"""

import numbers
from dataclasses import dataclass

import torch

from epsdpo import (_check_batch, _check_logits, _check_tensor, _criterion, beta_and_epsilon,
                    epsilon_dpo_output)

# ----------------------------------------------------------------------------------------------------
# From the logits: what epsdpo.py computes, without ever holding a float32 copy of the (2B, T, V) logits, with
# one host synchronization per call, and a number of torch operations that follows the rows, not the vocabulary.
#
# The full-vocabulary work (log-softmax normalizers, perturbed logits) runs over one row's completion
# positions at a time, split only where a row holds more than this many bytes of float32 logits
# (256 positions of a 256k vocabulary). On a GPU every torch operation costs a launch of some
# microseconds whatever its size, so the number of operations follows the rows of the batch, not the
# vocabulary or the sequence length; and the float32 copies alive at once stay a few rows' worth,
# never a float32 copy of the whole (N, T, V) logits.
CHUNK_BYTES = 256 * 2**20


def sequence_logps(logits, input_ids, completion_mask):
    """Sum of the log-probabilities of the completion tokens of each sequence.

    Shapes: logits (N, T, V), the model's outputs for input_ids (N, T); completion_mask (N, T), 1 on the
    completion tokens of input_ids, 0 elsewhere. Returns (N,), float32 (float64 for float64 logits).

        log π(y|x) = Σ_i log softmax(f(x, y_<i))[y_i]      i over the completion tokens only

    What epsdpo.sequence_logps computes with a log-softmax and a gather, without its float32 (N, T, V)
    copy: the log-normalizers are taken one row's completion at a time (CHUNK_BYTES), and backward
    rebuilds the softmax the same way.
    A sum, not a mean: DPO's β is defined for the sum. Positions off the mask (prompt, padding) never
    reach the result, whatever their tokens or logits; a row with no completion token gives 0.
    """
    _check_tensor(logits, "logits", "(N, T, V)")
    _check_batch(input_ids, completion_mask, logits.shape, logits.device, "logits", pairs=False, values=False)
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
    _check_logits(policy_logits, ref_logits, input_ids, completion_mask, values=False)
    epsilon = beta_and_epsilon(1.0, epsilon)[1]
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


def criterion(policy_logits, ref_logits, input_ids, completion_mask, epsilon):
    """epsdpo.criterion: s (B,) ∈ {−1, 0, +1}, from the completion positions a chunk at a time."""
    _check_logits(policy_logits, ref_logits, input_ids, completion_mask, values=False)
    epsilon = beta_and_epsilon(1.0, epsilon)[1]
    positions = _scored_positions(input_ids, completion_mask, policy_logits.shape[-1],
                                  _compute_dtype(policy_logits).itemsize)
    _check_every_pair_scored(positions)
    with torch.no_grad():
        policy_logps = _CompletionLogps.apply(policy_logits, positions)
    return _criterion(policy_logps, *_perturbed_logps(policy_logits, ref_logits, positions, epsilon))


def epsilon_dpo_loss(policy_logits, ref_logits, input_ids, completion_mask, beta, epsilon=None):
    """epsdpo.epsilon_dpo_loss, with the same arguments and EpsilonDPOOutput, from the completion positions a
    chunk at a time: the same values, s and gradients (tested), without a float32 copy of the (2B, T, V) logits.

    One host synchronization (finding the completion positions), and a number of torch operations that
    follows the rows of the batch, not its vocabulary.
    """
    beta, epsilon = beta_and_epsilon(beta, epsilon)
    _check_logits(policy_logits, ref_logits, input_ids, completion_mask, values=False)
    positions = _scored_positions(input_ids, completion_mask, policy_logits.shape[-1],
                                  _compute_dtype(policy_logits).itemsize)
    _check_every_pair_scored(positions)
    policy_logps = _CompletionLogps.apply(policy_logits, positions)                      # (2B,), with grad
    with torch.no_grad():
        ref_logps = _CompletionLogps.apply(ref_logits.detach(), positions)               # (2B,)
        s = _criterion(policy_logps, *_perturbed_logps(policy_logits.detach(), ref_logits, positions, epsilon))
    return epsilon_dpo_output(policy_logps, ref_logps, s, beta, epsilon)


# ----------------------------------------------------------------------------------------------------
# From the hidden states
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


def _check_hidden(hidden, weight, input_ids, completion_mask, prefix, device=None):
    _check_tensor(hidden, f"{prefix}_hidden", "(2B, T, H)", device)
    _check_tensor(weight, f"{prefix}_weight", "(V, H)", hidden.device)
    if weight.shape[1] != hidden.shape[2] or 0 in weight.shape:
        raise ValueError(f"{prefix}_weight {tuple(weight.shape)} must have the shape (V, H) with V ≥ 1 and H = "
                         f"{hidden.shape[2]} as in {prefix}_hidden")
    _check_batch(input_ids, completion_mask, (*hidden.shape[:2], weight.shape[0]), hidden.device,
                 f"softcap({prefix}_hidden @ {prefix}_weight.T)", values=False)


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
    beta, epsilon = beta_and_epsilon(beta, epsilon)
    _check_hidden(policy_hidden, policy_weight, input_ids, completion_mask, "policy")
    _check_hidden(ref_hidden, ref_weight, input_ids, completion_mask, "ref", policy_hidden.device)
    if ref_weight.shape[0] != policy_weight.shape[0]:
        raise ValueError(f"ref_weight {tuple(ref_weight.shape)} and policy_weight {tuple(policy_weight.shape)} must have "
                         f"the same vocabulary")
    if logit_softcap is not None and (isinstance(logit_softcap, bool) or not isinstance(logit_softcap, numbers.Real)
                                      or not 0 < logit_softcap < float("inf")):
        raise ValueError(f"logit_softcap must be None or a finite number > 0, got {logit_softcap!r}")
    (num_rows, length, _), vocab_size = policy_hidden.shape, policy_weight.shape[0]
    positions = _scored_positions(input_ids, completion_mask, vocab_size, 4)
    _check_every_pair_scored(positions)
    gathered = _gathered_positions(positions, num_rows, length, vocab_size, policy_hidden.device)

    policy_logps, ref_logps, weaker_logps, stronger_logps = _LogpsFromHidden.apply(
        policy_hidden, policy_weight, ref_hidden, ref_weight, positions, gathered, logit_softcap, epsilon)
    s = _criterion(policy_logps, weaker_logps, stronger_logps)
    return epsilon_dpo_output(policy_logps, ref_logps, s, beta, epsilon)
