"""ε-DPO at 32k–256k-word vocabularies: the functions of epsdpo.py, computed in chunks.

epsdpo.py is the method, on full logits with float32 copies of them: (2B, T, V) float32 tensors several times
over, 4 GB each for 4 pairs × 1,024 tokens at V = 128,256. This module computes the same values, s and gradients
(tested equal to epsdpo.py) with the same arguments and outputs, without those copies:

    sequence_logps, perturbed_logps, criterion, epsilon_dpo_loss     from the logits, a chunk of positions at a time:
                                                                     never a float32 copy of the (2B, T, V) logits
    epsilon_dpo_loss_from_hidden                                     from the last hidden states and the output
                                                                     layer's weight: never the (2B, T, V) logits
    completion_measures_from_hidden                                  what evaluation reads (log π̂_λ, KL), the same way

Everything else (dpo_loss, betas_from_s, BaselineBeta, EpsilonDPOOutput) is epsdpo.py's: copy both files.

Host synchronizations: none with input_ids and completion_mask on the CPU (where a training loop has them before
it copies them to the GPU): the positions are found and checked there, and reach the device without waiting. One
per call with them on the device. epsdpo.py waits once.
"""

import numbers
from dataclasses import dataclass

import torch

from epsdpo import _check_batch, _check_tensor, _criterion, beta_and_epsilon, epsilon_dpo_output

# ----------------------------------------------------------------------------------------------------
# From the logits: what epsdpo.py computes, without ever holding a float32 copy of the (2B, T, V) logits, and with
# a number of torch operations that follows the rows, not the vocabulary.
#
# The full-vocabulary work (log-softmax normalizers, perturbed logits) runs over one row's completion positions
# at a time, split only where a row holds more than this many bytes of float32 logits (256 positions of a 256k
# vocabulary): a GPU pays a launch per torch operation whatever its size, so their number follows the rows, not
# the vocabulary or the length, and the float32 copies alive at once stay a few rows' worth.
CHUNK_BYTES = 256 * 2**20


def sequence_logps(logits, input_ids, completion_mask):
    """Sum of the log-probabilities of the completion tokens of each sequence.

    Shapes: logits (N, T, V), the model's outputs for input_ids (N, T); completion_mask (N, T), 1 on the
    completion tokens of input_ids, 0 elsewhere. Returns (N,), float32 (float64 for float64 logits).

        log π(y|x) = Σ_i log softmax(f(x, y_<i))[y_i]      i over the completion tokens only

    What epsdpo.sequence_logps computes, without its float32 (N, T, V) copy: the log-normalizers are taken one
    row's completion at a time (CHUNK_BYTES), and backward rebuilds the softmax the same way. A sum, not a mean.
    Positions off the mask never reach the result, whatever they hold; a row with no completion token gives 0.
    """
    _check_tensor(logits, "logits", "(N, T, V)")
    _check_batch(
        input_ids,
        completion_mask,
        logits.shape,
        _batch_device(input_ids, logits.device),
        "logits",
        pairs=False,
        values=False,
    )
    return _CompletionLogps.apply(logits, _scored_positions(input_ids, completion_mask, logits))


# How sequence_logps does it: find the scored positions once, then work a row's completion at a time.
def _batch_device(input_ids, device):
    """Where input_ids and completion_mask may be: on the CPU, or with the logits or hidden states on `device`."""
    return input_ids.device if isinstance(input_ids, torch.Tensor) and input_ids.device.type == "cpu" else device


def _pair_positions(policy_logits, ref_logits, input_ids, completion_mask, every_pair=True):
    """The checked arguments' _Positions; every_pair: each pair's two sequences must both have a completion."""
    _check_tensor(policy_logits, "policy_logits", "(2B, T, V)")
    _check_tensor(ref_logits, "ref_logits", "(2B, T, V)", policy_logits.device)
    if ref_logits.shape != policy_logits.shape:
        raise ValueError(
            f"ref_logits {tuple(ref_logits.shape)} must have the shape of policy_logits {tuple(policy_logits.shape)}"
        )
    _check_batch(
        input_ids,
        completion_mask,
        policy_logits.shape,
        _batch_device(input_ids, policy_logits.device),
        "policy_logits",
        values=False,
    )
    positions = _scored_positions(input_ids, completion_mask, policy_logits)
    if every_pair:
        _check_every_pair_scored(positions.empty_rows, len(input_ids))
    return positions


@dataclass
class _Positions:
    """Where the logits score a completion token, found once per batch on the host: the logits at position t
    predict the token at t + 1, so logits[n, t] score a token when completion_mask[n, t + 1] is 1."""

    scored: torch.Tensor  # (N, T-1) bool, on the logits' device: logits[:, :-1] that score a completion token
    targets: (
        torch.Tensor
    )  # (N, T-1) on the logits' device: the token each of them scores (0 where none: safe to gather)
    chunks: list  # (row, start, stop): pieces of each row's span of scored positions, each under CHUNK_BYTES
    empty_rows: list  # the rows with no completion token (their log-probability is 0)


def _check_every_pair_scored(empty_rows, num_rows):  # such a pair has no preference to learn
    if empty_rows:
        row, num_pairs = empty_rows[0], num_rows // 2
        raise ValueError(
            f"pair {row % num_pairs}: its {'chosen' if row < num_pairs else 'rejected'} sequence (row {row} "
            f"of input_ids) has no completion token: completion_mask is 0 on all of it"
        )


def _on_host(input_ids, completion_mask, vocab_size):
    """(next_tokens, scored), (N, T-1) each, on the host: the token each logit predicts, and whether it is a
    completion token, after checking completion_mask and the scored ids. No wait for the device when input_ids
    and completion_mask are on the CPU; on the device, one: their copy to the host, in one piece."""
    if input_ids.device.type == completion_mask.device.type == "cpu":
        ids, mask = input_ids, completion_mask
    else:  # float64 holds every id below 2**53 and any mask value exactly
        ids, mask = torch.stack([input_ids.double(), completion_mask.double()]).cpu()
        ids, mask = ids.to(input_ids.dtype), mask.to(completion_mask.dtype)
    mask_on = mask != 0
    scored, next_tokens = mask_on[:, 1:], ids[:, 1:]  # (N, T-1)
    if (mask_on & (mask != 1)).any():
        raise ValueError(f"completion_mask must hold only 0 and 1, got {mask.unique().tolist()[:8]}")
    if mask_on[:, 0].any():
        raise ValueError(
            "completion_mask[:, 0] must be 0: the first token has no logit before it to predict it "
            "(every completion follows at least one prompt token)"
        )
    wrong = next_tokens[scored & ((next_tokens < 0) | (next_tokens >= vocab_size))]
    if len(wrong):
        raise ValueError(
            f"input_ids must be in [0, {vocab_size}) wherever completion_mask is 1, got {wrong.tolist()[:8]}"
        )
    return next_tokens, scored


def _to_device(host_tensors, device):
    """Host tensors on `device` without waiting for it: on CUDA from pinned memory, non_blocking (the copy queues behind
    the GPU's work; PyTorch keeps the pinned memory until it is done), as batches.to_device; elsewhere a plain copy."""
    if device.type == "cuda":
        return [tensor.pin_memory().to(device, non_blocking=True) for tensor in host_tensors]
    return [tensor.to(device) for tensor in host_tensors] if device.type != "cpu" else list(host_tensors)


def _scored_positions(input_ids, completion_mask, logits):
    """Check the mask and the scored token ids, and find each row's span of scored positions, on the host;
    then send what the logits' device needs there, without waiting for it."""
    vocab_size, itemsize = logits.shape[-1], _compute_dtype(logits).itemsize
    next_tokens, scored = _on_host(input_ids, completion_mask, vocab_size)
    token_position = torch.arange(scored.shape[1])
    firsts = torch.where(scored, token_position, scored.shape[1]).amin(-1).tolist()  # (N,) T-1 for a row without any
    lasts = torch.where(scored, token_position, -1).amax(-1).tolist()  # (N,) −1 for a row without any
    longest = max(1, CHUNK_BYTES // (vocab_size * itemsize))
    chunks = [
        (row, start, min(start + longest, last + 1))
        for row, (first, last) in enumerate(zip(firsts, lasts, strict=True))
        for start in range(first, last + 1, longest)
    ]
    empty_rows = [row for row, (first, last) in enumerate(zip(firsts, lasts, strict=True)) if last < first]
    targets = torch.where(scored, next_tokens, 0).long()  # int32 ids too
    return _Positions(*_to_device([scored, targets], logits.device), chunks, empty_rows)


def _compute_dtype(logits):
    # Log-softmax in float32 even for bf16/fp16 logits (float64 stays float64).
    return torch.promote_types(logits.dtype, torch.float32)


def _log_normalizers(logits, positions):
    """logsumexp over the vocabulary of the logits at every scored position: (N, T-1), 0 elsewhere."""
    dtype = _compute_dtype(logits)
    log_normalizers = torch.zeros(positions.scored.shape, dtype=dtype, device=logits.device)
    logits_rows, normalizer_rows = logits.unbind(0), log_normalizers.unbind(0)  # views, one per row
    for row, start, stop in positions.chunks:
        normalizer_rows[row][start:stop] = torch.logsumexp(logits_rows[row][start:stop].to(dtype), dim=-1)
    return log_normalizers


def _target_logits(logits, positions):
    """f[y]: the logit of the token each scored position predicts, (N, T-1), in the logits' dtype."""
    return logits[:, :-1].gather(-1, positions.targets[..., None]).squeeze(-1)


def _sum_over_completion(token_values, scored):
    """(..., T-1) per-token values -> (...) per-sequence sums, each row on its own; unscored positions count 0."""
    return torch.where(scored, token_values, 0).sum(dim=-1)


class _CompletionLogps(torch.autograd.Function):
    """Σ over scored positions of log softmax(logits)[target], with a backward that stores nothing new: plain
    autograd would keep a float32 log-softmax of every position (N, T, V); here forward keeps the logits (which
    exist anyway) and the (N, T-1) log-normalizers, and backward rebuilds the softmax a chunk at a time:
        ∂ log softmax(f)[y] / ∂f = onehot(y) − softmax(f)
    """

    @staticmethod
    def forward(ctx, logits, positions):
        log_normalizers = _log_normalizers(logits, positions)  # (N, T-1)
        ctx.positions = positions
        ctx.save_for_backward(logits, log_normalizers)
        token_logps = _target_logits(logits, positions).to(log_normalizers.dtype) - log_normalizers
        return _sum_over_completion(token_logps, positions.scored)  # (N,)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logps):
        logits, log_normalizers = ctx.saved_tensors
        positions, dtype = ctx.positions, log_normalizers.dtype
        # −g at every scored position of a sequence whose log-probability has gradient g, 0 elsewhere.
        minus_grads = torch.where(positions.scored, -grad_logps[:, None].to(dtype), 0)[..., None]  # (N, T-1, 1)
        grad_logits = torch.zeros_like(logits)  # (N, T, V)
        logits_rows, normalizer_rows = logits.unbind(0), log_normalizers[..., None].unbind(0)  # views, per row
        target_rows, minus_grad_rows, grad_rows = (
            positions.targets[..., None].unbind(0),
            minus_grads.unbind(0),
            grad_logits.unbind(0),
        )
        for row, start, stop in positions.chunks:
            softmax = (logits_rows[row][start:stop].to(dtype) - normalizer_rows[row][start:stop]).exp_()  # (m, V)
            # Subtract the one-hot before rounding to the logits' dtype: for a confident model g (1 − p)
            # is far smaller than g p, and bf16 would round it away.
            softmax_minus_onehot = softmax.scatter_(-1, target_rows[row][start:stop], -1.0, reduce="add")
            grad_rows[row][start:stop] = softmax_minus_onehot.mul_(minus_grad_rows[row][start:stop])
        return grad_logits, None


def perturbed_logps(policy_logits, ref_logits, input_ids, completion_mask, epsilon):
    """epsdpo.perturbed_logps: (weaker_logps, stronger_logps), each (N,), of the policies estimated for β/(1+ε) and
    β/(1−ε), f_λ = f_ref + λ (f_θ − f_ref) with λ = 1 ± ε, in float32, from the completion positions a row at a time.
    Shapes: policy_logits and ref_logits (N, T, V); input_ids and completion_mask (N, T)."""
    positions = _pair_positions(policy_logits, ref_logits, input_ids, completion_mask, every_pair=False)
    return _perturbed_logps(policy_logits, ref_logits, positions, beta_and_epsilon(1.0, epsilon)[1])


@torch.no_grad()
def _perturbed_logps(policy_logits, ref_logits, positions, epsilon):
    dtype = _compute_dtype(policy_logits)
    # torch.lerp(f_ref, f_θ, λ) forms f_ref + λ (f_θ − f_ref) in one pass, exactly f_ref when f_θ = f_ref.
    lambdas = (1 + epsilon, 1 - epsilon)  # weaker, stronger
    # log softmax(f_λ)[y] = f_λ[y] − logsumexp(f_λ): first the perturbed logits of the targets, (2, N, T-1) ...
    ref_targets, policy_targets = (
        _target_logits(logits, positions).to(dtype) for logits in (ref_logits, policy_logits)
    )
    target_logits = torch.stack([torch.lerp(ref_targets, policy_targets, lam) for lam in lambdas])
    # ... then the log-normalizers of the perturbed distributions, a chunk of positions at a time.
    log_normalizers = torch.zeros_like(target_logits)  # (2, N, T-1)
    ref_rows, policy_rows = ref_logits.unbind(0), policy_logits.unbind(0)
    normalizer_rows = [normalizers.unbind(0) for normalizers in log_normalizers]  # [λ][row]
    for row, start, stop in positions.chunks:
        ref_chunk, policy_chunk = ref_rows[row][start:stop].to(dtype), policy_rows[row][start:stop].to(dtype)  # (m, V)
        for lam, rows_of_lambda in zip(lambdas, normalizer_rows, strict=True):
            rows_of_lambda[row][start:stop] = torch.logsumexp(torch.lerp(ref_chunk, policy_chunk, lam), dim=-1)
    weaker_logps, stronger_logps = _sum_over_completion(target_logits - log_normalizers, positions.scored)
    return weaker_logps, stronger_logps


def criterion(policy_logits, ref_logits, input_ids, completion_mask, epsilon):
    """epsdpo.criterion: s (B,) ∈ {−1, 0, +1}, from the completion positions a chunk at a time."""
    epsilon = beta_and_epsilon(1.0, epsilon)[1]
    positions = _pair_positions(policy_logits, ref_logits, input_ids, completion_mask)
    with torch.no_grad():
        policy_logps = _CompletionLogps.apply(policy_logits, positions)
    return _criterion(policy_logps, *_perturbed_logps(policy_logits, ref_logits, positions, epsilon))


def epsilon_dpo_loss(policy_logits, ref_logits, input_ids, completion_mask, beta, epsilon=None):
    """epsdpo.epsilon_dpo_loss, with the same arguments and EpsilonDPOOutput, from the completion positions a
    chunk at a time: the same values, s and gradients (tested), without a float32 copy of the (2B, T, V) logits,
    in a number of torch operations that follows the rows of the batch, not its vocabulary."""
    beta, epsilon = beta_and_epsilon(beta, epsilon)
    positions = _pair_positions(policy_logits, ref_logits, input_ids, completion_mask)
    policy_logps = _CompletionLogps.apply(policy_logits, positions)  # (2B,), with grad
    with torch.no_grad():
        ref_logps = _CompletionLogps.apply(ref_logits.detach(), positions)  # (2B,)
        s = _criterion(policy_logps, *_perturbed_logps(policy_logits.detach(), ref_logits, positions, epsilon))
    return epsilon_dpo_output(policy_logps, ref_logps, s, beta, epsilon)


# ----------------------------------------------------------------------------------------------------
# From the hidden states
#
# The logits are f = softcap(hidden @ W.T), read only at the completion positions: those of all rows are gathered,
# then projected a chunk of positions at a time over the whole vocabulary, in forward for all four log-probabilities
# and again in backward for the policy's gradient; never the (2B, T, V) logits (1 GB in bf16 at V = 128,256, 4 × 1,024).
#
# How many chunks. A GPU pays a launch (some microseconds) per torch operation whatever its size, and a chunk is 23 of
# them in bf16 (12 in forward, 11 in backward): the number of chunks is the cost to bound. A chunk holds
# CHUNK_FLOAT32_BYTES of float32 logits (m positions × V words) while that makes at most MAX_CHUNKS chunks; beyond, the
# chunks grow instead, each 1/MAX_CHUNKS of the scored positions. So:
#   - operations: at most MAX_CHUNKS chunks whatever B, T and V; 887 per call (forward and backward, bf16 autocast)
#     from 1 GiB of scored float32 logits on (4 pairs × 1,024 tokens at V = 128,256: 3 GiB), fewer below;
#   - memory: eager forward holds 4 float32 chunks at once: max(4 × 32 MiB, 1/8 of the scored positions' float32
#     logits), at most 1/8 of one float32 (2B, T, V) logits tensor (3/32 when 3/4 of the positions are scored);
#   - a chunk of 32 MiB at least (65 positions at V = 128,256) keeps each kernel large enough to be efficient.
# All chunks have m positions (the last padded with positions that count nowhere): a compiled body is one graph.
CHUNK_FLOAT32_BYTES = 32 * 2**20
MAX_CHUNKS = 32
# torch.compile's backend for the chunk bodies, by device type. On CUDA, inductor makes a chunk a few kernels (the
# products, and fused reductions that never write the float32 (m, V) intermediates), as Liger-Kernel compiles its
# fused linear losses. Elsewhere they run eagerly (a CPU gains little, and inductor needs a C++ compiler there;
# MPS's inductor is young): the eager bodies are the reference the tests check the compiled ones against.
COMPILE_BACKENDS = {"cuda": "inductor"}


@dataclass
class _HiddenPositions:
    """The scored positions of all rows, in row order, padded to a whole number of chunks, on the device."""

    hidden_index: torch.Tensor  # (P',) into hidden.flatten(0, 1): row * T + t (0 for padding)
    token_index: torch.Tensor  # (P',) into a flattened (N, T-1): row * (T-1) + t
    rows: torch.Tensor  # (P',) the row of each (N for padding: its gradient is 0)
    targets: torch.Tensor  # (P', 1) the token it scores (0 for padding)
    num_positions: int  # P, the scored positions; P' = P rounded up to a multiple of chunk_size
    chunk_size: int  # m, positions per chunk
    empty_rows: list  # the rows with no completion token

    def row_sums(self, token_values, num_rows, length):
        """(K, P') values at the positions -> (K, N) sums, each row's in (N, T-1) as sequence_logps: none
        rounds with another's."""
        per_token = token_values.new_zeros(len(token_values), num_rows * (length - 1))
        per_token.index_copy_(1, self.token_index[: self.num_positions], token_values[:, : self.num_positions])
        return per_token.view(-1, num_rows, length - 1).sum(-1)


def _hidden_positions(input_ids, completion_mask, vocab_size, device):
    """The scored positions, found and checked on the host, sent to the device in one copy that does not wait."""
    next_tokens, scored = _on_host(input_ids, completion_mask, vocab_size)
    (num_rows, scored_length), num_positions = scored.shape, int(scored.sum())
    chunk_size = max(
        1, min(num_positions, max(-(-num_positions // MAX_CHUNKS), CHUNK_FLOAT32_BYTES // (4 * vocab_size)))
    )
    padding = -num_positions % chunk_size if num_positions else 1  # a batch without: one chunk
    token_index = scored.flatten().nonzero().squeeze(1)  # (P,) row-major
    rows = token_index // scored_length
    index = torch.stack([token_index + rows, token_index, rows, next_tokens.flatten()[token_index].long()])
    index = torch.cat([index, torch.tensor([[0], [0], [num_rows], [0]]).expand(4, padding)], dim=1)  # (4, P')
    hidden_index, token_index, rows, targets = _to_device([index], device)[0]
    empty_rows = (~scored.any(-1)).nonzero().flatten().tolist()
    return _HiddenPositions(hidden_index, token_index, rows, targets[:, None], num_positions, chunk_size, empty_rows)


def _matmul_dtype(hidden, weight):  # autocast's when it is on (bf16 logits, as the model's own head), else theirs
    if torch.is_autocast_enabled(hidden.device.type):
        return torch.get_autocast_dtype(hidden.device.type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _gathered(policy_hidden, policy_weight, ref_hidden, ref_weight, positions):
    """(policy's and reference's hidden states at the positions (P', H), their weights transposed (H, V), each in the
    dtype of its products, and the dtype of the softmax: float32, float64 for float64 inputs), under the caller's
    autocast."""
    dtypes = (_matmul_dtype(policy_hidden, policy_weight), _matmul_dtype(ref_hidden, ref_weight))
    hidden, ref_hidden = (
        states.detach().flatten(0, 1).index_select(0, positions.hidden_index).to(dtype)
        for states, dtype in zip((policy_hidden, ref_hidden), dtypes, strict=True)
    )
    weight_t, ref_weight_t = (
        weight.detach().to(dtype).T for weight, dtype in zip((policy_weight, ref_weight), dtypes, strict=True)
    )
    return hidden, ref_hidden, weight_t, ref_weight_t, torch.promote_types(dtypes[0], torch.float32)


def _softcapped(logits, logit_softcap):
    # cap · tanh(f / cap), in the order Gemma-2 computes it, so that bf16 logits round as the model's do.
    return logits if logit_softcap is None else torch.tanh(logits / logit_softcap) * logit_softcap


def _forward_chunk(hidden, ref_hidden, weight_t, ref_weight_t, targets, weaker, stronger, logit_softcap, dtype):
    """One chunk of m positions, both models' logits (m, V) over the whole vocabulary in dtype (float32), and what the
    loss reads of them: log Σ_v exp f_v of π_θ, π_ref, π̂_weaker, π̂_stronger (m,) each; f[y] of π_θ, π_ref (m, 1)."""
    policy = _softcapped(hidden @ weight_t, logit_softcap).to(dtype)  # (m, V)
    ref = _softcapped(ref_hidden @ ref_weight_t, logit_softcap).to(dtype)
    return (
        policy.logsumexp(-1),
        ref.logsumexp(-1),  # f_λ = f_ref + λ (f_θ − f_ref), as torch.lerp
        torch.lerp(ref, policy, weaker).logsumexp(-1),
        torch.lerp(ref, policy, stronger).logsumexp(-1),
        policy.gather(-1, targets),
        ref.gather(-1, targets),
    )


def _backward_chunk(hidden, weight, weight_t, log_normalizers, targets, minus_grads, logit_softcap, dtype):
    """(∂/∂hidden (m, H), ∂/∂f (m, V)) of Σ_p g_p log softmax(f_p)[y_p] over one chunk, from minus_grads −g (m, 1)
    and forward's log_normalizers (m, 1): the logits again, then
        ∂/∂f = g (onehot(y) − softmax(f)) · (1 − tanh²(f / cap) with a soft-cap);  ∂/∂hidden = ∂/∂f @ W"""
    logits = hidden @ weight_t  # (m, V)
    tanh = None if logit_softcap is None else torch.tanh(logits / logit_softcap)
    logits = logits if tanh is None else tanh * logit_softcap
    softmax = logits.to(dtype).sub_(log_normalizers).exp_()
    # Subtract the one-hot before rounding to the matmul dtype: for a confident model g (1 − p) is far smaller
    # than g p, and bf16 would round it away.
    grad_logits = softmax.scatter_(-1, targets, -1.0, reduce="add").mul_(minus_grads)
    if tanh is not None:
        grad_logits.mul_(1 - tanh.to(dtype).square())  # d cap·tanh(f/cap) / df
    grad_logits = grad_logits.to(weight.dtype)
    return grad_logits @ weight, grad_logits


_compiled = {}  # backend: (forward, backward), compiled


def _chunk_bodies(device):
    """(forward, backward) chunk bodies for `device`: compiled, once per backend, where COMPILE_BACKENDS names one
    (fullgraph: each body one graph; dynamic: one graph whatever m), else eager."""
    backend = COMPILE_BACKENDS.get(device.type)
    if backend is not None and backend not in _compiled:
        _compiled[backend] = [
            torch.compile(body, backend=backend, fullgraph=True, dynamic=True)
            for body in (_forward_chunk, _backward_chunk)
        ]
    return _compiled[backend] if backend is not None else (_forward_chunk, _backward_chunk)


class _LogpsFromHidden(torch.autograd.Function):
    """The four sequence log-probabilities of ε-DPO from hidden states, each (N,): the policy's (with a gradient),
    the reference's, and the perturbed ones for λ = 1 ± ε. Forward keeps the policy's hidden states at the positions
    (P', H) and their log-normalizers; backward projects each chunk again and rebuilds its softmax."""

    @staticmethod
    def forward(ctx, policy_hidden, policy_weight, ref_hidden, ref_weight, positions, logit_softcap, epsilon):
        (num_rows, length, _), device = policy_hidden.shape, policy_hidden.device
        forward_chunk, _ = _chunk_bodies(device)
        hidden, ref_hidden, weight_t, ref_weight_t, dtype = _gathered(
            policy_hidden, policy_weight, ref_hidden, ref_weight, positions
        )
        with torch.autocast(device.type, enabled=False):  # the dtypes are chosen
            size, lambdas = positions.chunk_size, (1 + epsilon, 1 - epsilon)
            # λ as 0-d tensors (filled on the device, no copy): a compiled body takes them as inputs, not constants.
            lambda_weights = [torch.full((), lam, dtype=dtype, device=device) for lam in lambdas]
            chunks = [
                forward_chunk(*parts, weight_t, ref_weight_t, targets, *lambda_weights, logit_softcap, dtype)
                for *parts, targets in zip(
                    hidden.split(size), ref_hidden.split(size), positions.targets.split(size), strict=True
                )
            ]
            *log_normalizers, policy_targets, ref_targets = (
                torch.cat(column) for column in zip(*chunks, strict=True)
            )  # (P',), (P', 1)
            policy_targets, ref_targets = policy_targets[:, 0], ref_targets[:, 0]
            # log π̂(y_t) = f_λ[y_t] − log Σ_v exp f_λ,v at each position (4, P'): policy, reference, λ = 1 ± ε
            token_logps = torch.stack(
                [policy_targets, ref_targets, *(torch.lerp(ref_targets, policy_targets, lam) for lam in lambdas)]
            )
            logps = positions.row_sums(token_logps - torch.stack(log_normalizers), num_rows, length)  # (4, N)
        ctx.save_for_backward(hidden, policy_weight, log_normalizers[0])
        ctx.positions, ctx.logit_softcap, ctx.hidden_shape = positions, logit_softcap, policy_hidden.shape
        ctx.hidden_dtype, ctx.policy_dtype = policy_hidden.dtype, hidden.dtype
        outputs = tuple(logps.unbind(0))
        ctx.mark_non_differentiable(*outputs[1:])
        return outputs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logps, *_):
        (hidden, policy_weight, log_normalizers), positions = ctx.saved_tensors, ctx.positions
        dtype, weight_grad = log_normalizers.dtype, ctx.needs_input_grad[1]
        _, backward_chunk = _chunk_bodies(hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            weight_t = (weight := policy_weight.to(ctx.policy_dtype)).T
            # −g of the sequence of each position (0 for padding, whose row is N).
            minus_grads = torch.nn.functional.pad(-grad_logps.to(dtype), (0, 1))[positions.rows]  # (P',)
            size, grad_weight, grad_hidden = positions.chunk_size, None, []
            for chunk, *parts in zip(
                hidden.split(size),
                log_normalizers[:, None].split(size),
                positions.targets.split(size),
                minus_grads[:, None].split(size),
                strict=True,
            ):
                grad_chunk, grad_logits = backward_chunk(chunk, weight, weight_t, *parts, ctx.logit_softcap, dtype)
                grad_hidden.append(grad_chunk)
                # ∂/∂W += ∂/∂f.T @ hidden in float32 (float64 inputs: float64), in place when the products are;
                # else one (V, H) product at a time, in their dtype. None for a frozen head (LoRA).
                if weight_grad and grad_weight is None:
                    grad_weight = (grad_logits.T @ chunk).to(dtype)
                elif weight_grad and grad_weight.dtype == grad_logits.dtype:
                    grad_weight.addmm_(grad_logits.T, chunk)
                elif weight_grad:
                    grad_weight.add_(grad_logits.T @ chunk)
            num_rows, length, width = ctx.hidden_shape
            grad_policy_hidden = torch.zeros(num_rows * length, width, dtype=ctx.hidden_dtype, device=hidden.device)
            grad_policy_hidden.index_copy_(
                0,
                positions.hidden_index[: positions.num_positions],
                torch.cat(grad_hidden)[: positions.num_positions].to(ctx.hidden_dtype),
            )
        grad_weight = grad_weight.to(policy_weight.dtype) if weight_grad else None
        return grad_policy_hidden.view(ctx.hidden_shape), grad_weight, None, None, None, None, None


def _check_both_models(
    policy_hidden, policy_weight, ref_hidden, ref_weight, input_ids, completion_mask, logit_softcap, pairs=True
):
    """The checked arguments' _HiddenPositions."""
    for prefix, hidden, weight in (("policy", policy_hidden, policy_weight), ("ref", ref_hidden, ref_weight)):
        _check_tensor(
            hidden,
            f"{prefix}_hidden",
            "(2B, T, H)" if pairs else "(N, T, H)",
            None if prefix == "policy" else policy_hidden.device,
        )
        _check_tensor(weight, f"{prefix}_weight", "(V, H)", hidden.device)
        if weight.shape[1] != hidden.shape[2] or 0 in weight.shape:
            raise ValueError(
                f"{prefix}_weight {tuple(weight.shape)} must have the shape (V, H) with V ≥ 1 and H = "
                f"{hidden.shape[2]} as in {prefix}_hidden"
            )
        _check_batch(
            input_ids,
            completion_mask,
            (*hidden.shape[:2], weight.shape[0]),
            _batch_device(input_ids, hidden.device),
            f"softcap({prefix}_hidden @ {prefix}_weight.T)",
            pairs=pairs,
            values=False,
        )
    if ref_weight.shape[0] != policy_weight.shape[0]:
        raise ValueError(
            f"ref_weight {tuple(ref_weight.shape)} and policy_weight {tuple(policy_weight.shape)} must have "
            f"the same vocabulary"
        )
    if logit_softcap is not None and (
        isinstance(logit_softcap, bool)
        or not isinstance(logit_softcap, numbers.Real)
        or not 0 < logit_softcap < float("inf")
    ):
        raise ValueError(f"logit_softcap must be None or a finite number > 0, got {logit_softcap!r}")
    return _hidden_positions(input_ids, completion_mask, policy_weight.shape[0], policy_hidden.device)


def epsilon_dpo_loss_from_hidden(
    policy_hidden,
    policy_weight,
    ref_hidden,
    ref_weight,
    input_ids,
    completion_mask,
    beta,
    epsilon=None,
    logit_softcap=None,
):
    """epsilon_dpo_loss from the last hidden states and the output layers' weights, never the full logits. Shapes:
    policy_hidden and ref_hidden (2B, T, H), each model's last hidden states after its final norm, the B chosen
    sequences followed by the B rejected ones; policy_weight and ref_weight (V, H), the output layers' weights
    (bias-free heads; a tied weight is fine: its gradient adds to the embedding's); input_ids and completion_mask
    (2B, T), best on the CPU (below); beta the baseline β; 0 ≤ epsilon < 1; logit_softcap None or Gemma-2's
    final_logit_softcapping. Returns the EpsilonDPOOutput of

        epsilon_dpo_loss(softcap(policy_hidden @ policy_weight.T), softcap(ref_hidden @ ref_weight.T), ...)
        softcap(f) = cap · tanh(f / cap)        (no soft-cap: softcap(f) = f)

    within float32 rounding, with gradients for policy_hidden and policy_weight. Only the scored positions are
    projected, in at most MAX_CHUNKS chunks over the whole vocabulary (above), in forward and again in backward:
    887 torch operations for 4 pairs × 1,024 tokens at V = 128,256 in bf16, as many for longer sequences and larger
    vocabularies, and an extra peak of at most 1/8 of one float32 (2B, T, V) logits tensor; on CUDA each chunk's
    body is compiled. The products run in the inputs' dtype (bf16 under a bf16 autocast, as the model's own head),
    the soft-cap too, the softmax, logsumexp and perturbation in float32, as in the logits path.
    """
    beta, epsilon = beta_and_epsilon(beta, epsilon)
    positions = _check_both_models(
        policy_hidden, policy_weight, ref_hidden, ref_weight, input_ids, completion_mask, logit_softcap
    )
    _check_every_pair_scored(positions.empty_rows, len(input_ids))
    policy_logps, ref_logps, weaker_logps, stronger_logps = _LogpsFromHidden.apply(
        policy_hidden, policy_weight, ref_hidden, ref_weight, positions, logit_softcap, epsilon
    )
    s = _criterion(policy_logps, weaker_logps, stronger_logps)
    return epsilon_dpo_output(policy_logps, ref_logps, s, beta, epsilon)


@torch.no_grad()
def completion_measures_from_hidden(
    policy_hidden, policy_weight, ref_hidden, ref_weight, input_ids, completion_mask, lambdas=(), logit_softcap=None
):
    """What evaluation reads along each sequence's completion, from hidden states in the loss's chunks (eager):
        logps (K, N)   log π̂_λ(y|x) = Σ_t log softmax(f_ref + λ (f_θ − f_ref))[y_t] for each λ of lambdas (K of them):
                       λ = 1 is the policy, λ = 0 the reference, 1 ± ε the policies of the criterion
        kls (N,)       Σ_t KL(π_θ(·|x, y<t) ‖ π_ref(·|x, y<t)) = Σ_t Σ_v p_v (log p_v − log q_v)

    Shapes: as epsilon_dpo_loss_from_hidden, with N rows of any kind (no pairs); a row without a completion
    token gives 0. Float32 (float64 for float64 inputs), without gradient. Host synchronizations as there.
    """
    positions = _check_both_models(
        policy_hidden, policy_weight, ref_hidden, ref_weight, input_ids, completion_mask, logit_softcap, pairs=False
    )
    hidden, ref_hidden, weight_t, ref_weight_t, dtype = _gathered(
        policy_hidden, policy_weight, ref_hidden, ref_weight, positions
    )
    with torch.autocast(policy_hidden.device.type, enabled=False):  # the dtypes are chosen
        size, columns = positions.chunk_size, []
        for hidden_chunk, ref_chunk, targets in zip(
            hidden.split(size), ref_hidden.split(size), positions.targets.split(size), strict=True
        ):
            policy = _softcapped(hidden_chunk @ weight_t, logit_softcap).to(dtype)  # (m, V)
            ref = _softcapped(ref_chunk @ ref_weight_t, logit_softcap).to(dtype)
            log_q, log_p = ref.logsumexp(-1, keepdim=True), policy.logsumexp(-1, keepdim=True)
            # Σ_v p_v ((f_θ − log Σ exp f_θ) − (f_ref − log Σ exp f_ref)), p = softmax(f_θ)
            kls = ((policy - log_p).exp_() * (policy - ref - (log_p - log_q))).sum(-1)
            columns.append(
                torch.stack(
                    [
                        kls,
                        *(
                            (lambda perturbed: perturbed.gather(-1, targets).squeeze(-1) - perturbed.logsumexp(-1))(
                                torch.lerp(ref, policy, lam)
                            )
                            for lam in lambdas
                        ),
                    ]
                )
            )
        kls, *logps = sums = positions.row_sums(torch.cat(columns, 1), *policy_hidden.shape[:2])
    return sums[1:], kls
