"""ε-DPO in chunks: the functions of epsdpo.py, for micro-batches whose float32 logits would pass 64 MiB.

epsdpo.py is the method, on full logits with float32 copies of them: (2B, T, V) float32 tensors several times
over, 4 GB each for 4 pairs × 1,024 tokens at V = 128,256 (train.py switches past 64 MiB of them, 2B × T × V × 4
bytes: 4 pairs of 256 tokens at V = 8,192). This module computes the same values, s and gradients
(tested equal to epsdpo.py) with the same arguments and outputs, without those copies:

    sequence_logps, perturbed_logps, criterion, epsilon_dpo_loss     from the logits, a chunk of positions at a time:
                                                                     never a float32 copy of the (2B, T, V) logits
    epsilon_dpo_loss_from_hidden                                     from the last hidden states and the output
                                                                     layer's weight: never the (2B, T, V) logits
    completion_measures_from_hidden                                  what evaluation reads (log π̂_λ, KL), the same
                                                                     way

Everything else (dpo_loss, betas_from_s, BaselineBeta, EpsilonDPOOutput) is epsdpo.py's: copy both files.

Host synchronizations: none with input_ids and completion_mask on the CPU (where a training loop has them before
it copies them to the GPU): the positions are found and checked there, and reach the device without waiting. One
per call with them on the device. epsdpo.py waits once.
"""

import math
import numbers
import warnings
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
    # The span of scored positions of each row, (N,) each: first > last for a row without any (every row at T = 1).
    token_position, (num_rows, scored_length) = torch.arange(scored.shape[1]), scored.shape
    firsts = torch.where(scored, token_position, scored_length).amin(-1).tolist() if scored_length else [1] * num_rows
    lasts = torch.where(scored, token_position, -1).amax(-1).tolist() if scored_length else [0] * num_rows
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
    """epsdpo.perturbed_logps: (weaker_logps, stronger_logps), each (N,), of the policies estimated for
    β/(1+ε) and β/(1−ε), f_λ = f_ref + λ (f_θ − f_ref) with λ = 1 ± ε, in float32, from the completion
    positions a row at a time.
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
# The logits are f = softcap(hidden @ W.T), read only at the completion positions. Those of all rows are gathered and
# worked in tiles: a chunk of m positions × a slice of v words. Forward projects both models on a tile, (m, v) each,
# and keeps what the loss reads of it: log Σ exp over the slice for π_θ, π_ref and π̂ at λ = 1 ± ε, and the
# logits of the targets that fall in the slice; the slices' log Σ exp are then combined (log Σ_s exp), as flash
# attention combines its blocks. Backward projects each tile again and rebuilds its softmax from forward's
# log-normalizers. So never the (2B, T, V) logits (1 GB in bf16 at V = 128,256, 4 × 1,024), and never a whole (V, H)
# copy of the weight: mixed precision's float32 output weight is cast to bf16 a slice at a time, inside the tile, and
# its gradient is summed in place, a slice at a time, into the one float32 (V, H) buffer that becomes it.
#
# How large a tile. Every buffer the loss makes holds at most B bytes, B = max(CHUNK_FLOAT32_BYTES, 1/MAX_CHUNKS of
# the scored positions' float32 logits):
#   - a tile's float32 logits, m × v × 4 (forward holds three at once, backward one and a half);
#   - a chunk's float32 gradient of its hidden states, m × H × 4, summed over the slices;
#   - a slice of the weight in float32, v × H × 4 (its bf16 copy and its gradient's product are half that each), or
#     1/MAX_CHUNKS of the weight where that is more (a small batch beside a large weight needs no finer slices).
# Positions are split only where the hidden size asks for it (m × H × 4 ≤ B), then the vocabulary into as few slices
# as both rules allow. So:
#   - where H is small beside the vocabulary (H ≤ V / MAX_CHUNKS: 4,008 at V = 128,256), one chunk of every position
#     and MAX_CHUNKS slices: 32 tiles, 978 torch operations per call (forward and backward, bf16 autocast) whatever
#     B, T and V from 1 GiB of scored float32 logits on (4 pairs × 1,024 tokens at V = 128,256: 3 GiB), fewer below;
#   - at larger H, more tiles (44 at H = 4,096, 96 at H = 8,192 for that batch: 1,476 and 3,008 operations), each
#     product large enough (at least 2,048 × 4,008 × 8,192 there) that a GPU's time goes to it, not to launches;
#   - memory: a few B at once; counted, 0.074, 0.065 and 0.072 × one float32 (2B, T, V) logits tensor at H = 256,
#     4,096 and 8,192 for that batch, the gradients it returns aside (bench_counts.loss_costs); there the tiles gather
#     their slices of the policy's weight, so that no view of the whole float32 weight lives beside its gradient.
# Why slices of the vocabulary before chunks of positions: each product reads its slice of the weight once for all the
# positions of its chunk, so few chunks keep the weight's reads (and its casts to bf16) to about one per pass, where
# chunks of a few positions over the whole vocabulary would read all of it again for each.
# All chunks have m positions (the last padded with positions that count nowhere); a compiled body takes any m and v.
CHUNK_FLOAT32_BYTES = 32 * 2**20
MAX_CHUNKS = 32
# torch.compile's backend for the tile bodies, by device type. On CUDA, inductor makes a tile a few kernels (the
# products, and fused reductions that never write the float32 (m, v) intermediates), as Liger-Kernel compiles its
# fused linear losses; where compiling fails (no Triton, a compiler error), the tile runs eagerly instead, said once.
# Elsewhere they run eagerly (a CPU gains little, and inductor needs a C++ compiler there; MPS's inductor is young):
# the eager bodies are the reference the tests check the compiled ones against.
COMPILE_BACKENDS = {"cuda": "inductor"}


@dataclass
class _HiddenPositions:
    """The scored positions of all rows, in row order, padded to a whole number of chunks, on the device; and the
    tiles: chunks of chunk_size positions × slices of slice_size words."""

    hidden_index: torch.Tensor  # (P',) into hidden.flatten(0, 1): row * T + t (0 for padding)
    token_index: torch.Tensor  # (P',) into a flattened (N, T-1): row * (T-1) + t
    rows: torch.Tensor  # (P',) the row of each (N for padding: its gradient is 0)
    local_targets: torch.Tensor  # (S, P', 1) the target's index in each slice (clamped into it where it lies elsewhere)
    in_slice: torch.Tensor  # (S, P', 1) whether the target lies in that slice (1) or not (0)
    target_slice: torch.Tensor  # (P',) the slice the target lies in
    num_positions: int  # P, the scored positions; P' = P rounded up to a multiple of chunk_size
    chunk_size: int  # m, positions per chunk
    slice_size: int  # v, words per slice (the last slice may hold fewer)
    words: list  # each slice's words (v,), on the device, where the tiles gather their slices; else None each
    empty_rows: list  # the rows with no completion token

    def row_sums(self, token_values, num_rows, length):
        """(K, P') values at the positions -> (K, N) sums, each row's in (N, T-1) as sequence_logps: none
        rounds with another's."""
        per_token = token_values.new_zeros(len(token_values), num_rows * (length - 1))
        per_token.index_copy_(1, self.token_index[: self.num_positions], token_values[:, : self.num_positions])
        return per_token.view(-1, num_rows, length - 1).sum(-1)

    def chunks(self, per_tile):
        """Per chunk of positions: (hidden_index (m,), target_slice (m,), and for each tensor (S, P', ...) of
        per_tile, its S views (m, ...) of that chunk), views made in one operation per kind, not one per tile."""
        size = self.chunk_size
        return zip(
            self.hidden_index.split(size),
            self.target_slice.split(size),
            *([part.unbind(0) for part in tensor.split(size, dim=1)] for tensor in per_tile),
            strict=True,
        )


def _tile_sizes(num_positions, vocab_size, width):
    """(m, v): positions per chunk and words per slice, by the rules above, each split as evenly as it goes."""
    budget = max(CHUNK_FLOAT32_BYTES, -(-num_positions * vocab_size * 4 // MAX_CHUNKS))  # B
    positions = max(1, num_positions)
    chunk = -(-positions // -(-positions * width * 4 // budget))  # m × H × 4 ≤ B
    weight_slices = min(MAX_CHUNKS, -(-vocab_size * width * 4 // budget))  # v × H × 4 ≤ B, or 1/MAX_CHUNKS of W
    slices = max(weight_slices, -(-chunk * vocab_size * 4 // budget))  # m × v × 4 ≤ B
    return chunk, -(-vocab_size // min(slices, vocab_size))


def _hidden_positions(input_ids, completion_mask, vocab_size, width, device):
    """The scored positions and their tiles, found and checked on the host, sent to the device in one copy that does
    not wait."""
    next_tokens, scored = _on_host(input_ids, completion_mask, vocab_size)
    (num_rows, scored_length), num_positions = scored.shape, int(scored.sum())
    chunk_size, slice_size = _tile_sizes(num_positions, vocab_size, width)
    padding = -num_positions % chunk_size if num_positions else chunk_size  # a batch without: one chunk
    token_index = scored.flatten().nonzero().squeeze(1)  # (P,) row-major
    rows = token_index // scored_length
    index = torch.stack([token_index + rows, token_index, rows, next_tokens.flatten()[token_index].long()])
    index = torch.cat([index, torch.tensor([[0], [0], [num_rows], [0]]).expand(4, padding)], dim=1)  # (4, P')
    targets = index[3]
    starts = torch.arange(0, vocab_size, slice_size)[:, None]  # (S, 1): the first word of each slice
    local = targets - starts  # (S, P')
    in_slice = (local >= 0) & (local < slice_size)
    local = torch.minimum(local.clamp(min=0), (vocab_size - starts - 1).clamp(max=slice_size - 1))
    host = torch.cat([index[:3], local, in_slice.long(), (targets // slice_size)[None]])  # (3 + 2S + 1, P')
    device_index = _to_device([host], device)[0]
    num_slices = len(starts)
    hidden_index, token_index, rows = device_index[:3]
    local_targets, in_slice = device_index[3 : 3 + num_slices], device_index[3 + num_slices : 3 + 2 * num_slices]
    empty_rows = (~scored.any(-1)).nonzero().flatten().tolist()
    # Where the weight is large beside the scored logits (H > P / 16), the tiles gather their slices of the policy's
    # weight (_slice_t); where it is small, they take views of it, one operation fewer a tile.
    gathered = num_slices > 1 and width * 16 > num_positions
    words = torch.arange(vocab_size, device=device).split(slice_size) if gathered else [None] * num_slices
    return _HiddenPositions(
        hidden_index,
        token_index,
        rows,
        local_targets[..., None],
        in_slice[..., None],
        device_index[-1],
        num_positions,
        chunk_size,
        slice_size,
        words,
        empty_rows,
    )


def _matmul_dtype(hidden, weight):  # autocast's when it is on (bf16 logits, as the model's own head), else theirs
    if torch.is_autocast_enabled(hidden.device.type):
        return torch.get_autocast_dtype(hidden.device.type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _gather(states, index, dtype):
    """The hidden states (N, T, H) at the positions index (m,) into its flattened rows: (m, H) in dtype."""
    return states.detach().flatten(0, 1).index_select(0, index).to(dtype)


def _softcapped(logits, logit_softcap):
    # cap · tanh(f / cap), in the order Gemma-2 computes it, so that bf16 logits round as the model's do.
    return logits if logit_softcap is None else torch.tanh(logits / logit_softcap) * logit_softcap


def _slice_t(weight, words, dtype):
    """A slice of the policy's output weight, transposed, (H, v) in dtype: with words (v,), those rows of the whole
    weight (V, H), gathered by index_select, which a compiled body fuses with the cast into one read of the slice;
    without, weight is that slice already (a view). Gathered where the weight is large: then no view of the whole
    float32 weight lives while its gradient, of the same size, fills, and a count of the storages alive (FakeTensors,
    bench_counts.PeakBytes) sees that gradient as the one (V, H) buffer, which it is."""
    return (weight if words is None else weight.index_select(0, words).T).to(dtype)


def _policy_slices(weight, positions):
    """(the weight, or its transposed slice, a view; words or None) for each slice, as _slice_t takes them. Inside the
    autograd.Function nothing records a graph: the weight needs no detach (a view of it, like any other)."""
    if positions.words[0] is None:
        return [(weight_t, None) for weight_t in weight.T.split(positions.slice_size, dim=1)]
    return [(weight, words) for words in positions.words]


def _forward_tile(hidden, ref_hidden, weight, words, ref_weight_t, local_targets, weaker, stronger, cap, dtype):
    """One tile: m positions (hidden, ref_hidden (m, H), in the dtype of the products) × a slice of v words (the
    policy's weight and words, as _slice_t takes them; ref_weight_t (H, v), the reference's slice transposed, in its
    own dtype: cast here, a slice at a time). Both models' logits (m, v) in dtype (float32), and what the loss reads
    of them: log Σ_v exp f_v over the slice for π_θ, π_ref, π̂_weaker, π̂_stronger, (m,) each; f at
    local_targets (m, 1) for π_θ and π_ref, (m, 1) each."""
    logit_softcap = cap
    policy = _softcapped(hidden @ _slice_t(weight, words, hidden.dtype), logit_softcap).to(dtype)  # (m, v)
    ref = _softcapped(ref_hidden @ ref_weight_t.to(ref_hidden.dtype), logit_softcap).to(dtype)
    return (
        policy.logsumexp(-1),
        ref.logsumexp(-1),  # f_λ = f_ref + λ (f_θ − f_ref), as torch.lerp
        torch.lerp(ref, policy, weaker).logsumexp(-1),
        torch.lerp(ref, policy, stronger).logsumexp(-1),
        policy.gather(-1, local_targets),
        ref.gather(-1, local_targets),
    )


def _backward_tile(hidden, hidden_t, weight, words, normalizers, local_targets, minus_onehot, minus_grads, cap, dtype):
    """One tile's (∂/∂hidden (m, H), ∂/∂W.T (H, v), None without hidden_t) of Σ_p g_p log softmax(f_p)[y_p],
    from minus_grads −g (m, 1), forward's log-normalizers (m, 1) over the whole vocabulary, and minus_onehot
    (m, 1), −1 where the target lies in this slice (at local_targets), 0 elsewhere: the tile's logits again, then
        ∂/∂f = g (onehot(y) − softmax(f)) · (1 − tanh²(f / cap) with a soft-cap)
        ∂/∂hidden = ∂/∂f @ W;
        ∂/∂W.T = hidden.T @ ∂/∂f          (each summed over the tiles by the caller)"""
    log_normalizers, weight_t = normalizers, _slice_t(weight, words, hidden.dtype)  # (H, v)
    logits = hidden @ weight_t  # (m, v)
    tanh = None if cap is None else torch.tanh(logits / cap)
    logits = logits if tanh is None else tanh * cap
    grad_logits = (logits - log_normalizers).exp_()  # softmax(f), in dtype (that of log_normalizers)
    # Subtract the one-hot before rounding to the matmul dtype: for a confident model g (1 − p) is far smaller
    # than g p, and bf16 would round it away.
    grad_logits.scatter_add_(-1, local_targets, minus_onehot).mul_(minus_grads)
    if tanh is not None:
        grad_logits.mul_(1 - tanh.to(dtype).square())  # d cap·tanh(f/cap) / df
    grad_logits = grad_logits.to(hidden.dtype)
    return grad_logits @ weight_t.T, None if hidden_t is None else hidden_t @ grad_logits


class _CompiledBodies:
    """The tile bodies compiled with torch.compile (fullgraph: one graph each; dynamic: whatever m and v), both run
    eagerly from the first time compiling one fails on (no Triton, a compiler error), which is said once, as a
    warning: the same values, more kernel launches."""

    def __init__(self, backend):
        self.backend, self.failed = backend, False
        self.bodies = [self._body(body) for body in (_forward_tile, _backward_tile)]

    def _body(self, body):
        compiled = torch.compile(body, backend=self.backend, fullgraph=True, dynamic=True)

        def compiled_or_eager(*args):
            if not self.failed:
                try:
                    return compiled(*args)
                except _compile_errors() as error:  # raised while compiling, before the body computed anything
                    self.failed = True
                    cause = getattr(error, "inner_exception", None) or error  # the backend's own, unwrapped
                    first_line = (str(cause).strip().splitlines() or [""])[0][:300]
                    warnings.warn(
                        f"epsdpo_chunked: compiling the loss's tile bodies with torch.compile (backend "
                        f"{getattr(self.backend, '__name__', self.backend)!r}) failed, so they run eagerly: the "
                        f"same values, more kernel launches ({type(cause).__name__}: {first_line})",
                        RuntimeWarning,
                        stacklevel=2,
                    )
            return body(*args)

        return compiled_or_eager


def _compile_errors():
    """What torch.compile raises when compiling fails (a backend's error arrives wrapped in dynamo's)."""
    import torch._dynamo.exc

    try:
        from torch._inductor.exc import InductorError  # inductor's own, in newer torch
    except ImportError:
        return (torch._dynamo.exc.TorchDynamoException,)
    return torch._dynamo.exc.TorchDynamoException, InductorError


_compiled = {}  # backend: _CompiledBodies


def _tile_bodies(device):
    """(forward, backward) tile bodies for `device`: compiled, once per backend, where COMPILE_BACKENDS names one,
    else eager."""
    backend = COMPILE_BACKENDS.get(device.type)
    if backend is None:
        return _forward_tile, _backward_tile
    if backend not in _compiled:
        _compiled[backend] = _CompiledBodies(backend)
    return _compiled[backend].bodies


def _dtypes(policy_hidden, policy_weight, ref_hidden, ref_weight):
    """(the policy's and the reference's matmul dtypes, under the caller's autocast; the softmax's dtype: float32,
    float64 for float64 inputs)."""
    dtypes = (_matmul_dtype(policy_hidden, policy_weight), _matmul_dtype(ref_hidden, ref_weight))
    return dtypes, torch.promote_types(dtypes[0], torch.float32)


def _combined(tiles, target_slice):
    """One chunk's tiles (S of them, each (log Σ exp ... (m,) × K, target logits (m, 1) × 2)) -> log Σ exp over
    the whole vocabulary, (K, m), log Σ_s exp of the slices'; and the target logits, (2, m), from the slice each
    lies in."""
    num_slices, num_sums, size = len(tiles), len(tiles[0]) - 2, len(target_slice)
    sums = torch.stack([value for tile in tiles for value in tile[:num_sums]]).view(num_slices, num_sums, size)
    targets = torch.stack([value for tile in tiles for value in tile[num_sums:]]).view(num_slices, 2, size)
    return sums.logsumexp(0), targets.gather(0, target_slice.expand(1, 2, size))[0]


class _LogpsFromHidden(torch.autograd.Function):
    """The four sequence log-probabilities of ε-DPO from hidden states, each (N,): the policy's (with a gradient),
    the reference's, and the perturbed ones for λ = 1 ± ε. Forward keeps the policy's log-normalizers (P',); backward
    gathers each chunk's hidden states again and projects each tile again."""

    @staticmethod
    def forward(ctx, policy_hidden, policy_weight, ref_hidden, ref_weight, positions, logit_softcap, epsilon):
        (num_rows, length, _), device = policy_hidden.shape, policy_hidden.device
        forward_tile, _ = _tile_bodies(device)
        (policy_dtype, ref_dtype), dtype = _dtypes(policy_hidden, policy_weight, ref_hidden, ref_weight)
        with torch.autocast(device.type, enabled=False):  # the dtypes are chosen
            lambdas = (1 + epsilon, 1 - epsilon)
            # λ as 0-d tensors (filled on the device, no copy): a compiled body takes them as inputs, not constants.
            lambda_weights = [policy_hidden.new_full((), lam, dtype=dtype) for lam in lambdas]
            weight_slices = _policy_slices(policy_weight, positions)
            ref_weight_slices = ref_weight.detach().T.split(positions.slice_size, dim=1)  # (H, v) views
            log_normalizers, target_logits = [], []
            for index, target_slice, local_targets in positions.chunks([positions.local_targets]):
                hidden, ref_chunk = _gather(policy_hidden, index, policy_dtype), _gather(ref_hidden, index, ref_dtype)
                tiles = [
                    forward_tile(
                        hidden, ref_chunk, *policy_slice, ref_slice, targets, *lambda_weights, logit_softcap, dtype
                    )
                    for policy_slice, ref_slice, targets in zip(
                        weight_slices, ref_weight_slices, local_targets, strict=True
                    )
                ]
                sums, targets = _combined(tiles, target_slice)
                log_normalizers.append(sums)
                target_logits.append(targets)
            log_normalizers, (policy_targets, ref_targets) = torch.cat(log_normalizers, 1), torch.cat(target_logits, 1)
            # log π̂(y_t) = f_λ[y_t] − log Σ_v exp f_λ,v at each position (4, P'): π_θ, π_ref, λ = 1 ± ε
            token_logps = torch.stack(
                [policy_targets, ref_targets, *(torch.lerp(ref_targets, policy_targets, lam) for lam in lambdas)]
            )
            logps = positions.row_sums(token_logps - log_normalizers, num_rows, length)  # (4, N)
        ctx.save_for_backward(policy_hidden, policy_weight, log_normalizers[0])
        ctx.positions, ctx.logit_softcap, ctx.policy_dtype = positions, logit_softcap, policy_dtype
        outputs = tuple(logps.unbind(0))
        ctx.mark_non_differentiable(*outputs[1:])
        return outputs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logps, *_):
        (policy_hidden, policy_weight, log_normalizers), positions = ctx.saved_tensors, ctx.positions
        dtype, weight_grad, device = log_normalizers.dtype, ctx.needs_input_grad[1], policy_hidden.device
        _, backward_tile = _tile_bodies(device)
        with torch.autocast(device.type, enabled=False):
            # −g of the sequence of each position (0 for padding, whose row is N).
            minus_grads = torch.nn.functional.pad(-grad_logps.to(dtype), (0, 1))[positions.rows][:, None]  # (P', 1)
            num_rows, length, width = policy_hidden.shape
            grad_hidden = policy_hidden.new_zeros(num_rows * length, width)
            # ∂/∂W in float32 (float64 inputs: float64), summed in place a slice at a time; the weight's gradient
            # itself when the weight is float32. None for a frozen head (LoRA).
            grad_weight = policy_weight.new_zeros(policy_weight.shape, dtype=dtype) if weight_grad else None
            weight_slices = _policy_slices(policy_weight, positions)
            grad_slices = (
                grad_weight.T.split(positions.slice_size, dim=1) if weight_grad else [None] * len(weight_slices)
            )
            minus_onehot = -positions.in_slice.to(dtype)  # (S, P', 1): −1 where the target lies in the slice
            for (index, _, local_targets, minus_onehots), normalizers, chunk_minus_grads in zip(
                positions.chunks([positions.local_targets, minus_onehot]),
                log_normalizers[:, None].split(positions.chunk_size),
                minus_grads.split(positions.chunk_size),
                strict=True,
            ):
                hidden = _gather(policy_hidden, index, ctx.policy_dtype)
                hidden_t = hidden.T if weight_grad else None
                grad_chunk = hidden.new_zeros(hidden.shape, dtype=dtype)  # ∂/∂hidden, summed over slices
                for policy_slice, grad_slice, targets, tile_minus_onehot in zip(
                    weight_slices, grad_slices, local_targets, minus_onehots, strict=True
                ):
                    grad_part, grad_weight_part = backward_tile(
                        hidden,
                        hidden_t,
                        *policy_slice,
                        normalizers,
                        targets,
                        tile_minus_onehot,
                        chunk_minus_grads,
                        ctx.logit_softcap,
                        dtype,
                    )
                    grad_chunk.add_(grad_part)
                    if weight_grad:
                        grad_slice.add_(grad_weight_part)
                    del grad_part, grad_weight_part  # freed before the next tile's products
                # Padding positions have −g = 0, so rows of exact zeros, added to position 0 of row 0.
                grad_hidden.index_add_(0, index, grad_chunk.to(grad_hidden.dtype))
        grad_weight = grad_weight.to(policy_weight.dtype) if weight_grad else None
        return grad_hidden.view(policy_hidden.shape), grad_weight, None, None, None, None, None


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
    # A cap past 1e30 is no cap a model uses (Gemma-2's is 30), and f / cap would round to 0 in float32.
    real = isinstance(logit_softcap, numbers.Real) and not isinstance(logit_softcap, bool)
    if logit_softcap is not None and not (real and 0 < logit_softcap <= 1e30):
        raise ValueError(f"logit_softcap must be None or a number in (0, 1e30], got {logit_softcap!r}")
    return _hidden_positions(
        input_ids, completion_mask, policy_weight.shape[0], policy_hidden.shape[2], policy_hidden.device
    )


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
    projected, in tiles of positions × words (above), in forward and again in backward; a float32 weight is cast to
    the products' dtype a slice at a time. Counted on FakeTensors at 4 pairs × 1,024 tokens (768 scored) and
    V = 128,256 in bf16: 978 torch operations at H = 256, as many for longer sequences and larger vocabularies; an
    extra peak (the returned gradients aside) of 0.074, 0.065 and 0.072 × one float32 (2B, T, V) logits tensor at
    H = 256, 4,096 and 8,192. On CUDA each tile's body is compiled (eagerly run if that fails). The products run in
    the inputs' dtype (bf16 under a bf16 autocast, as the model's own head), the soft-cap too, the softmax,
    logsumexp and perturbation in float32, as in the logits path.
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
        logps (K, N)   log π̂_λ(y|x) = Σ_t log softmax(f_ref + λ (f_θ − f_ref))[y_t] for each λ of lambdas (K):
                       λ = 1 is the policy, λ = 0 the reference, 1 ± ε the policies of the criterion
        kls (N,)       Σ_t KL(π_θ(·|x, y<t) ‖ π_ref(·|x, y<t)) = Σ_t Σ_v p_v (log p_v − log q_v)

    Shapes: as epsilon_dpo_loss_from_hidden, with N rows of any kind (no pairs); a row without a completion
    token gives 0. Float32 (float64 for float64 inputs), without gradient. Host synchronizations as there.
    """
    positions = _check_both_models(
        policy_hidden, policy_weight, ref_hidden, ref_weight, input_ids, completion_mask, logit_softcap, pairs=False
    )
    if not all(isinstance(lam, numbers.Real) and not isinstance(lam, bool) and math.isfinite(lam) for lam in lambdas):
        raise ValueError(f"lambdas must be finite numbers, got {lambdas!r}"[:200])
    (policy_dtype, ref_dtype), dtype = _dtypes(policy_hidden, policy_weight, ref_hidden, ref_weight)
    with torch.autocast(policy_hidden.device.type, enabled=False):  # the dtypes are chosen
        weight_slices, ref_weight_slices = (
            weight.detach().T.split(positions.slice_size, dim=1) for weight in (policy_weight, ref_weight)
        )  # (H, v) views
        columns = []
        for index, target_slice, local_targets in positions.chunks([positions.local_targets]):
            hidden, ref_chunk = _gather(policy_hidden, index, policy_dtype), _gather(ref_hidden, index, ref_dtype)
            tiles = [
                _measures_tile(hidden, ref_chunk, *slices, targets, lambdas, logit_softcap, dtype)
                for *slices, targets in zip(weight_slices, ref_weight_slices, local_targets, strict=True)
            ]
            sums, (policy_targets, ref_targets) = _combined([tile[:-1] for tile in tiles], target_slice)
            log_p, log_q, *perturbed_normalizers = sums  # over the whole vocabulary, (m,) each
            slice_log_p, slice_weighted = (torch.stack([tile[i] for tile in tiles]) for i in (0, -1))  # (S, m)
            # Σ_v p_v (f_θ,v − f_ref,v) − log Σ exp f_θ + log Σ exp f_ref, p = softmax(f_θ), a slice at a time
            kls = ((slice_log_p - log_p).exp_() * slice_weighted).sum(0) - log_p + log_q
            logps = [
                torch.lerp(ref_targets, policy_targets, lam) - normalizers
                for lam, normalizers in zip(lambdas, perturbed_normalizers, strict=True)
            ]
            columns.append(torch.stack([kls, *logps]))
        sums = positions.row_sums(torch.cat(columns, 1), *policy_hidden.shape[:2])
    return sums[1:], sums[0]


def _measures_tile(hidden, ref_hidden, weight_t, ref_weight_t, local_targets, lambdas, logit_softcap, dtype):
    """One tile of what evaluation reads, as _forward_tile: (log Σ exp over the slice of π_θ and π_ref, then of
    π̂_λ for each λ, (m,) each; f at local_targets of π_θ and π_ref, (m, 1) each; over the slice,
    Σ_v exp(f_θ,v − log Σ exp f_θ) (f_θ,v − f_ref,v), (m,))."""
    policy = _softcapped(hidden @ weight_t.to(hidden.dtype), logit_softcap).to(dtype)  # (m, v)
    ref = _softcapped(ref_hidden @ ref_weight_t.to(ref_hidden.dtype), logit_softcap).to(dtype)
    log_p = policy.logsumexp(-1)
    weighted = ((policy - log_p[:, None]).exp_() * (policy - ref)).sum(-1)
    return (
        log_p,
        ref.logsumexp(-1),
        *(torch.lerp(ref, policy, lam).logsumexp(-1) for lam in lambdas),
        policy.gather(-1, local_targets),
        ref.gather(-1, local_targets),
        weighted,
    )
