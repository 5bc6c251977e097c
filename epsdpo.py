"""ε-DPO: Direct Preference Optimization with a KL penalty β chosen per preference pair, in plain torch.

Lee et al., "KL Penalty Control via Perturbation for Direct Preference Optimization" (arXiv 2502.13177, 2025), on
Rafailov et al., "Direct Preference Optimization" (2023). For a pair (prompt x, chosen y_w, rejected y_l), z is the
preference logit log π(y_w|x) − log π(y_l|x) under a model π:

    z_θ, γ    z of the policy and of the reference;  h = z_θ − γ, the margin;  DPO's loss is −log σ(β h)
    z⁻, z⁺    z of the policies estimated for the penalties β/(1+ε) and β/(1−ε), whose logits are
              f_ref + λ (f_θ − f_ref), λ = 1 ± ε
    s         +1 if z⁻ > z_θ > z⁺ (z grows as β shrinks), −1 if z⁻ < z_θ < z⁺, 0 otherwise
    β̃         β/(1 + ε s), the pair's β: its loss is −log σ(β̃ h); after each optimizer step β ← mean β̃

Sections 1–6 follow the method (epsilon_dpo_loss is a whole step), then the input checks. This module works on full
logits, with float32 copies of them; epsdpo_chunked.py computes the same in chunks or from the last hidden states,
for micro-batches whose float32 logits would pass 64 MiB. B pairs are 2B rows: the B chosen sequences, then the B
rejected ones. completion_mask (2B, T), 0 and 1 in any dtype, is aligned with input_ids (not shifted): 1 on every
completion token, EOS included; 0 on the prompt and on the padding, which may be on either side. Both models run
without dropout (.eval()). With torch alone, from any folder:

    import torch
    from epsdpo import BaselineBeta, epsilon_dpo_loss

    torch.manual_seed(0)  # a bigram model stands in for the policy: any causal LM's logits (2B, T, V) work alike
    policy = torch.nn.Sequential(torch.nn.Embedding(16, 8), torch.nn.Linear(8, 16)).eval()  # no dropout
    reference = torch.nn.Sequential(torch.nn.Embedding(16, 8), torch.nn.Linear(8, 16)).eval().requires_grad_(False)
    reference.load_state_dict(policy.state_dict())  # frozen, equal to the policy at the start
    optimizer, baseline_beta = torch.optim.AdamW(policy.parameters(), lr=0.05), BaselineBeta(beta=0.1, epsilon=0.01)
    input_ids = torch.tensor([[1, 4, 5, 9, 10, 2], [1, 4, 5, 7, 2, 0]])  # B = 1: prompt 1 4 5, chosen, rejected
    completion_mask = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 0]])  # the rejected row padded with 0
    for step in range(4):
        logits = policy(input_ids)  # (2B, T, V)
        with torch.no_grad():
            ref_logits = reference(input_ids)
        out = epsilon_dpo_loss(logits, ref_logits, input_ids, completion_mask, baseline_beta)
        out.loss.backward()  # with gradient accumulation: every micro-batch's loss ...
        baseline_beta.observe(out.s)  # ... and s, on every rank
        optimizer.step()
        optimizer.zero_grad()
        print(step, baseline_beta.value, out.s.tolist(), out.h.tolist())  # the β this step trained with
        baseline_beta.step()  # after every optimizer step: β ← mean β̃
"""

import math
import numbers
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

BETA_RANGE = (1.2e-38, 1e30)  # the β the loss takes: β̃ is float32, whose smallest normal number is 1.2e-38


# 1. Sequence log-probabilities
def sequence_logps(logits, input_ids, completion_mask):
    """log π(y|x) = Σ_i log softmax(f(x, y_<i))[y_i], i over each sequence's completion tokens only.

    Shapes: logits (N, T, V) for input_ids (N, T); completion_mask (N, T). Returns (N,), float32 (float64 for
    float64 logits), differentiable. A sum, not a mean: DPO's β is defined for the sum. Positions off the mask
    (prompt, padding) never reach the result or its gradient, whatever their logits or ids (NaN included).
    """
    _check_tensor(logits, "logits", "(N, T, V)")
    _check_batch(input_ids, completion_mask, logits.shape, logits.device, "logits", pairs=False)
    return _sequence_logps(logits, input_ids, completion_mask)


def _sequence_logps(logits, input_ids, completion_mask):
    scored = completion_mask[:, 1:] != 0  # the logits at t predict token t + 1
    next_tokens = torch.where(scored, input_ids[:, 1:], 0)[..., None].long()
    logits = torch.where(scored[..., None], logits[:, :-1], 0)  # positions off the mask: 0, never NaN
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float32 at least: bf16 loses ε
    token_logps = logits.log_softmax(-1).gather(-1, next_tokens).squeeze(-1)  # (N, T-1)
    return torch.where(scored, token_logps, 0).sum(-1)  # (N,)


# 2. DPO
def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """DPO's loss of each pair and its implicit rewards, as TRL's: (losses, chosen_rewards, rejected_rewards).

    Shapes: the four log-probabilities and what it returns (B,); beta a number or (B,), one β per pair.

        h = (log π_θ(y_w) − log π_θ(y_l)) − (log π_ref(y_w) − log π_ref(y_l)) = z_θ − γ
        loss = −log σ(β h)
        r_w = β (log π_θ(y_w) − log π_ref(y_w)),   r_l = β (log π_θ(y_l) − log π_ref(y_l))   (detached)
    """
    names = ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
    all_logps = (chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    for name, logps in zip(names, all_logps, strict=True):
        _check_tensor(logps, f"{name} (log-probabilities)", "(B,)", chosen_logps.device)
    beta, shapes = _check_beta(beta), [tuple(logps.shape) for logps in all_logps]
    if len(set(shapes)) != 1 or not len(chosen_logps) or getattr(beta, "shape", ()) not in ((), chosen_logps.shape):
        raise ValueError(
            f"{', '.join(names)} must all have the same shape (B,) with B ≥ 1, and beta be a number or (B,), "
            f"got {shapes} and beta {tuple(getattr(beta, 'shape', ()))}"
        )
    losses, _, chosen_rewards, rejected_rewards = _dpo_loss(*all_logps, beta)
    return losses, chosen_rewards, rejected_rewards


def _dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    beta = torch.as_tensor(beta, dtype=chosen_logps.dtype, device=chosen_logps.device)
    h = (chosen_logps - rejected_logps) - (ref_chosen_logps - ref_rejected_logps)  # z_θ − γ
    losses = -F.logsigmoid(beta * h)  # logsigmoid stays finite for any h
    chosen_rewards = (beta * (chosen_logps - ref_chosen_logps)).detach()
    rejected_rewards = (beta * (rejected_logps - ref_rejected_logps)).detach()
    return losses, h, chosen_rewards, rejected_rewards


# 3. The perturbed policies (paper Eqs. 3 and 4)
def perturbed_logps(policy_logits, ref_logits, input_ids, completion_mask, epsilon):
    """log π̂_λ(y|x) of the policies estimated for β/(1+ε) and β/(1−ε), without another forward pass: with the
    logits f_λ = f_ref + λ (f_θ − f_ref) at every position, λ = 1 + ε (weaker) and λ = 1 − ε (stronger).

    Shapes: policy_logits and ref_logits (2B, T, V); input_ids and completion_mask (2B, T). Returns
    (weaker_logps, stronger_logps), each (2B,), without gradient. torch.lerp(f_ref, f_θ, λ) is exactly f_ref
    when f_θ = f_ref (λ f_θ + (1−λ) f_ref is not, in floating point). The work is in float32: in bf16,
    ε (f_θ − f_ref) falls below the rounding step of the logits.
    """
    _check_logits(policy_logits, ref_logits, input_ids, completion_mask)
    return _perturbed_logps(policy_logits, ref_logits, input_ids, completion_mask, _check_epsilon(epsilon))


@torch.no_grad()
def _perturbed_logps(policy_logits, ref_logits, input_ids, completion_mask, epsilon):
    dtype = torch.promote_types(policy_logits.dtype, torch.float32)
    policy, ref = policy_logits.to(dtype), ref_logits.to(dtype)
    weaker_logps = _sequence_logps(torch.lerp(ref, policy, 1 + epsilon), input_ids, completion_mask)  # λ = 1 + ε
    stronger_logps = _sequence_logps(torch.lerp(ref, policy, 1 - epsilon), input_ids, completion_mask)  # λ = 1 − ε
    return weaker_logps, stronger_logps


# 4. The criterion and the per-pair β (paper Eq. 5)
def criterion(policy_logits, ref_logits, input_ids, completion_mask, epsilon):
    """s ∈ {−1, 0, +1} for each pair: +1 asks for the weaker penalty β/(1+ε), −1 for the stronger β/(1−ε).

    Shapes: policy_logits and ref_logits (2B, T, V); input_ids and completion_mask (2B, T). Returns (B,) int64.

        s = +1 if z⁻ > z_θ > z⁺ (z grows as β shrinks);   s = −1 if z⁻ < z_θ < z⁺;   s = 0 otherwise

    γ and β would shift or scale all three alike. The three points tell which way z moves between λ = 1 − ε and
    1 + ε, nothing beyond; where z⁻, z⁺ lie on one side of z_θ, and on ties, β stays. To first order in ε,
    s = sign(h − (K_w − K_l)), K the KL(π_θ‖π_ref) summed along a completion (sequence_kl).
    """
    _check_logits(policy_logits, ref_logits, input_ids, completion_mask)
    policy_logps = _sequence_logps(policy_logits.detach(), input_ids, completion_mask)
    perturbed = _perturbed_logps(policy_logits, ref_logits, input_ids, completion_mask, _check_epsilon(epsilon))
    return _criterion(policy_logps, *perturbed)


@torch.no_grad()
def _criterion(policy_logps, weaker_logps, stronger_logps):
    """s (B,) from the sequence log-probabilities (2B,) of the policy and of the two perturbed policies."""
    z_theta = _z(policy_logps.detach().to(weaker_logps.dtype))
    z_weaker, z_stronger = _z(weaker_logps), _z(stronger_logps)
    weaker = (z_weaker > z_theta) & (z_theta > z_stronger)  # s = +1
    stronger = (z_weaker < z_theta) & (z_theta < z_stronger)  # s = −1
    return weaker.long() - stronger.long()


def _z(logps):
    """z = log π(y_w|x) − log π(y_l|x) per pair (B,), from the sequence log-probabilities of its 2B rows."""
    chosen_logps, rejected_logps = logps.chunk(2)
    return chosen_logps - rejected_logps


@torch.no_grad()
def sequence_kl(policy_logits, ref_logits, input_ids, completion_mask):
    """K = Σ_t KL(π_θ(·|x, y<t) ‖ π_ref(·|x, y<t)) over each sequence's completion positions: what s measures.

    Shapes: as epsilon_dpo_loss; returns (2B,) float32, no gradient. With ΔK = K[:B] − K[B:] (K_w − K_l), the slope
    of z(λ) at λ = 1 is dz/dλ = h − ΔK, so for small ε, s = sign(h − ΔK) wherever that is clear of zero.
    """
    _check_logits(policy_logits, ref_logits, input_ids, completion_mask)
    scored = completion_mask[:, 1:, None] != 0  # the logits at t predict token t + 1
    dtype = torch.promote_types(policy_logits.dtype, torch.float32)
    log_p, log_q = (torch.where(scored, f[:, :-1], 0).to(dtype).log_softmax(-1) for f in (policy_logits, ref_logits))
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0)  # ≥ 0, but for rounding; off the mask: exactly 0
    return kl.sum(-1)


def betas_from_s(beta, s, epsilon):
    """β̃ = β / (1 + ε s) per pair: β/(1+ε) for s = +1, β/(1−ε) for s = −1, β for s = 0. beta: the baseline
    β, a number; s (B,) integers in {−1, 0, +1}. Returns (B,) float32."""
    beta, epsilon = beta_and_epsilon(beta, epsilon)
    _check_tensor(s, "s", "of -1, 0 and +1", floats=False)
    if ((s < -1) | (s > 1)).any():
        raise ValueError(f"s must be an integer tensor of -1, 0 and +1, got {s.tolist()[:8]}")
    return beta / (1 + epsilon * s.to(torch.float32))


# 5. Updating β itself (paper Algorithm 1)
class BaselineBeta:
    """The baseline β, moved after every optimizer step to the mean β̃ of the pairs that made that step:

        β ← mean_i β̃_i = β · mean_i 1 / (1 + ε s_i)     (the paper's Algorithm 1; the authors' trainer moves β
                                                      to β / (1 + ε mean_i s_i), which is never higher and at
                                                      least (1 − ε²) times it, a step)

    No floor: if every pair gets s = +1, β falls as β/(1+ε)^t; min_beta and max_beta clamp it, within BETA_RANGE.
    .value before step() is the β the step trained with. observe(out.s) after every micro-batch of training, then
    step() after optimizer.step(): under torch.distributed an all-reduce of the counts, read on the host, which every
    rank must call at every step; or step(counts), the step's numbers of s = +1, 0, −1 over every micro-batch and
    rank (no observe(), collective or sync). Counts add exactly, so at ε = 0 β stays bit for bit.
    """

    def __init__(self, beta, epsilon, device="cpu", min_beta=0.0, max_beta=math.inf):
        self.value, self.epsilon = beta_and_epsilon(beta, epsilon)
        bounds_are_numbers = all(isinstance(b, numbers.Real) and not isinstance(b, bool) for b in (min_beta, max_beta))
        if not (bounds_are_numbers and 0 <= min_beta <= self.value <= max_beta):
            raise ValueError(f"expected 0 <= min_beta <= beta <= max_beta, got {min_beta!r}, {beta}, {max_beta!r}")
        self.min_beta, self.max_beta = float(min_beta), float(max_beta)
        self.counts = torch.zeros(4, dtype=torch.int64, device=device)  # pairs seen with s = +1, 0, −1, other

    def observe(self, s):
        """Count the criterion s (B,) of one micro-batch, on its device: no wait for it."""
        _check_tensor(s, "s", "of -1, 0 and +1", floats=False)
        counts = torch.stack([(s == 1).sum(), (s == 0).sum(), (s == -1).sum(), ((s < -1) | (s > 1)).sum()])
        self.counts = self.counts.to(s.device) + counts

    def step(self, counts=None):
        """β ← the mean β̃ of the step's pairs; returns it. counts: (number of s = +1, 0, −1) over the step."""
        weaker, kept, stronger = self._counts_of_every_rank() if counts is None else _check_counts(counts, "counts")
        pairs = weaker + kept + stronger
        if pairs:  # no pair seen: β stays
            mean_factor = (weaker / (1 + self.epsilon) + kept + stronger / (1 - self.epsilon)) / pairs  # 1/(1 + ε s)
            beta = min(max(self.value * mean_factor, self.min_beta), self.max_beta)
            self.value = min(max(beta, BETA_RANGE[0]), BETA_RANGE[1])
        self.counts = torch.zeros_like(self.counts)
        return self.value

    def _counts_of_every_rank(self):
        """The counts observed since the last step, summed over the ranks of torch.distributed, on the host."""
        counts, backend = self.counts, dist.get_backend() if dist.is_available() and dist.is_initialized() else None
        if backend in ("gloo", "mpi"):  # they reduce on the host
            counts = counts.cpu()
        elif backend and counts.device.type == "cpu":  # NCCL: on the GPU of s, never GPU 0 by default
            raise ValueError(
                f"under {backend} the counts must be on this rank's GPU: observe() s there, or create "
                f"BaselineBeta(beta, epsilon, device=...) for a step() with nothing observed"
            )
        if backend:
            dist.all_reduce(counts)
        *counts, other = counts.tolist()
        if other:
            seen = sum(counts) + other
            raise ValueError(f"s must all be -1, 0 or +1: {other} of the {seen} observed since the last step were not")
        return counts

    def state_dict(self):  # counts pending in a half-accumulated step included
        return {"beta": self.value, "epsilon": self.epsilon, "counts": self.counts[:3].tolist()}

    def load_state_dict(self, state):
        if not isinstance(state, dict):
            raise ValueError(f"a BaselineBeta state is a dict of beta, epsilon and counts, got {state!r}"[:200])
        counts = _check_counts(state.get("counts"), "a BaselineBeta state's counts")
        beta, epsilon = beta_and_epsilon(state.get("beta"), state.get("epsilon"))
        if not self.min_beta <= beta <= self.max_beta:
            raise ValueError(f"the state's beta {beta} is outside min_beta {self.min_beta}, max_beta {self.max_beta}")
        self.value, self.epsilon = beta, epsilon
        self.counts = torch.tensor([*counts, 0], dtype=torch.int64, device=self.counts.device)


def beta_and_epsilon(beta, epsilon):
    """(β, ε), checked: from a BaselineBeta (an ε given too must be its own), or as given."""
    if isinstance(beta, BaselineBeta):
        if epsilon not in (None, beta.epsilon):
            raise ValueError(f"epsilon {epsilon!r} differs from the BaselineBeta's {beta.epsilon}: pass it alone")
        return beta.value, beta.epsilon
    if epsilon is None:
        raise ValueError("epsilon is required when beta is a number (or pass the BaselineBeta as beta)")
    if isinstance(beta, torch.Tensor):
        raise ValueError("beta must be one number (the baseline β) or a BaselineBeta, not a tensor")
    return _check_beta(beta), _check_epsilon(epsilon)


# 6. One whole step
@dataclass
class EpsilonDPOOutput:
    """What epsilon_dpo_loss returns. loss is a scalar; every other field is (B,)."""

    loss: torch.Tensor  # mean of losses: call .backward() on it
    losses: torch.Tensor  # −log σ(β̃ h) per pair
    h: torch.Tensor  # the margin z_θ − γ, detached: compare runs by it (β̃ h moves with β)
    s: torch.Tensor  # the criterion, ∈ {−1, 0, +1}: observe() it
    pair_betas: torch.Tensor  # β̃ = β / (1 + ε s), held constant in the loss
    chosen_rewards: torch.Tensor  # β̃ (log π_θ(y_w) − log π_ref(y_w)), detached
    rejected_rewards: torch.Tensor  # β̃ (log π_θ(y_l) − log π_ref(y_l)), detached
    chosen_logps: torch.Tensor  # log π_θ(y_w), differentiable
    rejected_logps: torch.Tensor  # log π_θ(y_l), differentiable
    ref_chosen_logps: torch.Tensor  # log π_ref(y_w)
    ref_rejected_logps: torch.Tensor  # log π_ref(y_l)


def epsilon_dpo_loss(policy_logits, ref_logits, input_ids, completion_mask, beta, epsilon=None):
    """The ε-DPO loss of a batch of pairs, from the logits of one forward pass per model.

    Shapes: policy_logits and ref_logits (2B, T, V), any float dtype, the reference's under no_grad; input_ids (2B, T);
    completion_mask (2B, T), 0 and 1 in any dtype. beta: the BaselineBeta (its β and ε), or the baseline β, a number,
    with 0 ≤ epsilon < 1. Returns an EpsilonDPOOutput (out.loss to backward, out.h the margins). It changes nothing:
    a training loop calls observe(out.s) and logs baseline_beta.value before step(); evaluation calls neither.

        s_i = criterion(...), from the logits alone;   β̃_i = β / (1 + ε s_i), a constant
        loss = mean_i −log σ(β̃_i h_i)

    At ε = 0 every s is 0: DPO's loss and gradient, bit for bit. One host sync (the input checks). NaN or infinite
    logits on the mask are not checked (another sync): they give a NaN loss, which the caller must stop on.
    """
    beta, epsilon = beta_and_epsilon(beta, epsilon)
    _check_logits(policy_logits, ref_logits, input_ids, completion_mask)
    policy_logps = _sequence_logps(policy_logits, input_ids, completion_mask)  # (2B,)
    with torch.no_grad():
        ref_logps = _sequence_logps(ref_logits, input_ids, completion_mask)
        s = _criterion(policy_logps, *_perturbed_logps(policy_logits, ref_logits, input_ids, completion_mask, epsilon))
    return epsilon_dpo_output(policy_logps, ref_logps, s, beta, epsilon)


def epsilon_dpo_output(policy_logps, ref_logps, s, beta, epsilon):
    """The EpsilonDPOOutput of both models' sequence log-probabilities (2B,) and s (B,)."""
    pair_betas = beta / (1 + epsilon * s.to(torch.float32))  # (B,)
    logps = (*policy_logps.chunk(2), *ref_logps.chunk(2))  # chosen, rejected, ref_chosen, ref_rejected: (B,) each
    losses, h, chosen_rewards, rejected_rewards = _dpo_loss(*logps, pair_betas)
    return EpsilonDPOOutput(losses.mean(), losses, h.detach(), s, pair_betas, chosen_rewards, rejected_rewards, *logps)


# Checks: bad input fails here, saying what is wrong, not deep inside torch.
def _check_tensor(tensor, name, shape, device=None, floats=True):
    """A floating-point (floats) or integer tensor; with as many dimensions as shape names, if it names some."""
    dims = len([size for size in shape.strip("()").split(",") if size.strip()]) if shape.startswith("(") else None
    kind_ok = isinstance(tensor, torch.Tensor) and tensor.dtype != torch.bool and tensor.is_floating_point() == floats
    if not kind_ok or (dims is not None and tensor.dim() != dims):
        got = f"{getattr(tensor, 'dtype', type(tensor).__name__)} {tuple(getattr(tensor, 'shape', ()))}"
        kind, of_shape = "a floating-point" if floats else "an integer", "of shape " if dims is not None else ""
        raise ValueError(f"{name} must be {kind} tensor {of_shape}{shape}, got {got}")
    _check_device(tensor, name, device)


def _check_device(tensor, name, device=None):
    if tensor.device.type == "meta":
        raise ValueError(f"{name} is on the meta device: it has a shape but no values (load the model's weights)")
    if device is not None and tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device}, the other tensors on {device}: put them on one device")


def _check_logits(policy_logits, ref_logits, input_ids, completion_mask, values=True):
    _check_tensor(policy_logits, "policy_logits", "(2B, T, V)")
    _check_tensor(ref_logits, "ref_logits", "(2B, T, V)", policy_logits.device)
    if ref_logits.shape != policy_logits.shape:
        shapes = f"ref_logits {tuple(ref_logits.shape)} must have the shape of policy_logits"
        raise ValueError(f"{shapes} {tuple(policy_logits.shape)}")
    _check_batch(input_ids, completion_mask, policy_logits.shape, policy_logits.device, "policy_logits", values=values)


def _check_batch(input_ids, completion_mask, shape, device, name, pairs=True, values=True):
    """input_ids and completion_mask for logits of shape (N, T, V): (N, T), and N = 2B rows of pairs if pairs.
    values: read the mask's and the scored ids' values, which waits for the device, once."""
    if 0 in shape or (pairs and shape[0] % 2):
        raise ValueError(f"{name} {tuple(shape)}: expected positions, words and an even number of rows, got {shape[0]}")
    for tensor_name, tensor in (("input_ids", input_ids), ("completion_mask", completion_mask)):
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{tensor_name} must be a tensor of shape (N, T), got {type(tensor).__name__}")
        _check_device(tensor, tensor_name, device)
    if input_ids.shape != shape[:2] or completion_mask.shape != shape[:2]:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and completion_mask {tuple(completion_mask.shape)} must "
            f"both have the shape (N, T) = {tuple(shape[:2])} of {name} {tuple(shape)}"
        )
    if input_ids.dtype not in (torch.int64, torch.int32):  # what an embedding layer takes
        raise ValueError(f"input_ids must hold token ids as torch.int64 or torch.int32, got {input_ids.dtype}")
    if not values:
        return
    mask_on, ids = completion_mask != 0, input_ids[:, 1:]
    bad_ids = mask_on[:, 1:] & ((ids < 0) | (ids >= shape[2]))
    not_binary, first_scored = (mask_on & (completion_mask != 1)).any(), mask_on[:, 0].any()
    flags = torch.cat([torch.stack([not_binary, first_scored, bad_ids.any()]), ~mask_on.any(-1)]).tolist()  # 1 sync
    if flags[0]:
        raise ValueError(f"completion_mask must hold only 0 and 1, got {completion_mask.unique().tolist()[:8]}")
    if flags[1]:
        raise ValueError("completion_mask[:, 0] must be 0: the first token has no logit before it to predict it")
    if flags[2]:
        got = ids[bad_ids].tolist()[:8]
        raise ValueError(f"input_ids must be in [0, {shape[2]}) wherever completion_mask is 1, got {got}")
    if pairs and any(flags[3:]):  # a sequence without a completion has log-probability 0: nothing to learn from
        row, num_pairs = flags[3:].index(True), shape[0] // 2
        raise ValueError(
            f"pair {row % num_pairs}: its {'chosen' if row < num_pairs else 'rejected'} sequence (row {row} "
            f"of input_ids) has no completion token: completion_mask is 0 on all of it"
        )


def _check_counts(counts, name):
    """Three integers >= 0: the pairs with s = +1, 0 and −1."""
    integers = isinstance(counts, (list, tuple)) and len(counts) == 3
    integers = integers and all(isinstance(c, numbers.Integral) and not isinstance(c, bool) for c in counts)
    if not (integers and min(counts) >= 0 and sum(counts) < 2**63):
        raise ValueError(f"{name} must be 3 integers >= 0 (sum < 2**63): the pairs with s = +1, 0, -1; got {counts!r}")
    return [int(count) for count in counts]


def _check_beta(beta):  # a float (from a Fraction or NumPy float too), or a tensor
    if isinstance(beta, torch.Tensor):
        if not (beta.is_floating_point() and beta.device.type != "meta" and (beta > 0).all() and beta.isfinite().all()):
            raise ValueError(f"beta must be finite and > 0 for every pair, got {beta!r}"[:200])
        return beta
    if isinstance(beta, bool) or not (isinstance(beta, numbers.Real) and BETA_RANGE[0] <= beta <= BETA_RANGE[1]):
        raise ValueError(f"beta must be a finite number > 0, in [1.2e-38, 1e30], got {beta!r}"[:200])
    return float(beta)


def _check_epsilon(epsilon):
    if isinstance(epsilon, bool) or not (isinstance(epsilon, numbers.Real) and 0 <= epsilon < 1):  # NaN fails too
        raise ValueError(f"epsilon must be a number in [0, 1), got {epsilon!r}"[:200])
    return float(epsilon)
