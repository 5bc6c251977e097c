"""Property tests of epsdpo.py: each test states one fact of the method (the paper, as epsdpo.py writes it out)
and can fail.

The fast code is checked against slow, obviously correct versions written here (a Python loop over
tokens in float64) and against what a transformers causal LM computes itself.
"""

import functools
import io
import math
import os
import textwrap

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import epsdpo
import epsdpo_chunked

# Each fact of the method holds for both implementations: the plain one, and the one in chunks at scale.
IMPLEMENTATIONS = [pytest.param(epsdpo, id="plain"), pytest.param(epsdpo_chunked, id="chunked")]

# CI runs the same examples every time; a developer's run explores new ones (HYPOTHESIS_PROFILE=thorough: many more).
settings.register_profile("dev", deadline=None, max_examples=60)
settings.register_profile("ci", deadline=None, max_examples=60, derandomize=True, print_blob=True)
settings.register_profile("thorough", deadline=None, max_examples=2000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))


# ----------------------------------------------------------------------------------------------------
# Slow, obviously correct references


def slow_sequence_logps(logits, input_ids, completion_mask):
    """log π(y|x) one token at a time, in float64: the logits at t − 1 score the token at t."""
    totals = []
    for n in range(logits.shape[0]):
        total = 0 * logits[n].double().sum()  # 0, but part of the graph even if no token is scored
        for t in range(1, logits.shape[1]):
            if completion_mask[n, t]:
                total = total + torch.log_softmax(logits[n, t - 1].double(), dim=-1)[input_ids[n, t]]
        totals.append(total)
    return torch.stack(totals)


def slow_log_ratios(policy_logits, ref_logits, input_ids, completion_mask, epsilon):
    """(z⁻, z_θ, z⁺) per pair, in float64, from f_λ = f_ref + λ (f_θ − f_ref) written out."""
    policy, ref = policy_logits.double(), ref_logits.double()

    def log_ratios(logits):
        logps = slow_sequence_logps(logits, input_ids, completion_mask)
        half = logps.shape[0] // 2
        return logps[:half] - logps[half:]

    return (
        log_ratios(ref + (1 + epsilon) * (policy - ref)),
        log_ratios(policy),
        log_ratios(ref + (1 - epsilon) * (policy - ref)),
    )


def slow_s(z_weaker, z_theta, z_stronger):
    """The criterion (paper Eq. 5), one pair at a time."""
    s_values = []
    for weaker, theta, stronger in zip(z_weaker.tolist(), z_theta.tolist(), z_stronger.tolist(), strict=True):
        if weaker > theta > stronger:
            s_values.append(1)
        elif weaker < theta < stronger:
            s_values.append(-1)
        else:
            s_values.append(0)
    return torch.tensor(s_values)


def separation(z_weaker, z_theta, z_stronger):
    """How far the closest comparison of §4 is from a tie: decisions are robust to errors below it."""
    return torch.minimum((z_weaker - z_theta).abs(), (z_theta - z_stronger).abs()).min().item()


# ----------------------------------------------------------------------------------------------------
# Random batches


@st.composite
def batches(draw, dtype=torch.float64):
    """A batch of B pairs: policy and reference logits (2B, T, V), input_ids, completion_mask."""
    num_pairs = draw(st.integers(1, 3))
    length = draw(st.integers(2, 8))
    vocab = draw(st.integers(2, 12))
    scale = draw(st.floats(0.01, 30))
    closeness = draw(st.sampled_from([0.01, 0.3, 1.0]))  # how far the policy is from the reference
    mask_density = draw(st.floats(0, 1))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))

    shape = (2 * num_pairs, length, vocab)
    ref_logits = scale * torch.randn(shape, generator=generator, dtype=torch.float64)
    policy_logits = ref_logits + closeness * scale * torch.randn(shape, generator=generator, dtype=torch.float64)
    input_ids = torch.randint(0, vocab, shape[:2], generator=generator)
    completion_mask = (torch.rand(shape[:2], generator=generator) < mask_density).long()
    completion_mask[:, 0] = 0
    # Every sequence has a completion token (a pair without one is refused), however sparse the rest.
    completion_mask[torch.arange(2 * num_pairs), torch.randint(1, length, (2 * num_pairs,), generator=generator)] = 1
    return policy_logits.to(dtype), ref_logits.to(dtype), input_ids, completion_mask


epsilons = st.floats(0.01, 0.95)
betas = st.floats(1e-3, 10)


# ----------------------------------------------------------------------------------------------------
# The method in plain torch, and what the criterion measures


@given(batches(), betas, epsilons)
def test_the_chunked_code_gives_the_plain_methods_loss_s_and_gradients(batch, beta, epsilon):
    policy_logits, ref_logits, input_ids, completion_mask = batch
    half = policy_logits.shape[0] // 2
    logps = [
        epsdpo.sequence_logps(policy_logits, input_ids, completion_mask),
        *epsdpo.perturbed_logps(policy_logits, ref_logits, input_ids, completion_mask, epsilon),
    ]
    z_theta, z_weaker, z_stronger = (x[:half] - x[half:] for x in logps)
    assume(separation(z_weaker, z_theta, z_stronger) > 1e-9)  # no tie that rounding could break either way
    plain_logits, chunked_logits = policy_logits.clone().requires_grad_(), policy_logits.clone().requires_grad_()
    plain = epsdpo.epsilon_dpo_loss(plain_logits, ref_logits, input_ids, completion_mask, beta, epsilon)
    plain.loss.backward()
    chunked = epsdpo_chunked.epsilon_dpo_loss(chunked_logits, ref_logits, input_ids, completion_mask, beta, epsilon)
    chunked.loss.backward()
    assert (
        type(chunked) is type(plain)
        and torch.equal(chunked.s, plain.s)
        and torch.equal(chunked.pair_betas, plain.pair_betas)
    )
    for field in ("loss", "losses", "h", "chosen_rewards", "rejected_rewards", "chosen_logps", "ref_rejected_logps"):
        torch.testing.assert_close(getattr(chunked, field), getattr(plain, field))
    torch.testing.assert_close(chunked_logits.grad, plain_logits.grad)
    torch.testing.assert_close(
        plain.h,
        (plain.chosen_logps - plain.rejected_logps - plain.ref_chosen_logps + plain.ref_rejected_logps).detach(),
    )


def slow_completion_kls(policy_logits, ref_logits, completion_mask):
    """K per sequence: Σ over its completion positions of KL(π_θ‖π_ref) of the next-token distributions."""
    log_p, log_q = policy_logits[:, :-1].double().log_softmax(-1), ref_logits[:, :-1].double().log_softmax(-1)
    return ((log_p.exp() * (log_p - log_q)).sum(-1) * completion_mask[:, 1:]).sum(-1)


@given(batches())
def test_sequence_kl_is_the_kl_summed_over_each_completion(batch):
    policy_logits, ref_logits, input_ids, completion_mask = batch
    kls = epsdpo.sequence_kl(policy_logits, ref_logits, input_ids, completion_mask)
    torch.testing.assert_close(kls, slow_completion_kls(policy_logits, ref_logits, completion_mask))
    assert (kls >= 0).all() and not kls.requires_grad


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@given(batches(), st.sampled_from([1e-5, 1e-4, 1e-3]))
def test_for_small_epsilon_s_is_the_sign_of_h_minus_the_kl_difference(impl, batch, epsilon):
    # README, "What s measures": dz/dλ at λ = 1 is h − (K_w − K_l),
    # so z(1 ± ε) − z(1) = ± ε (h − ΔK) + O(ε²).
    policy_logits, ref_logits, input_ids, completion_mask = batch
    half = policy_logits.shape[0] // 2
    logps, ref_logps = (
        slow_sequence_logps(logits, input_ids, completion_mask) for logits in (policy_logits, ref_logits)
    )
    kls = slow_completion_kls(policy_logits, ref_logits, completion_mask)
    slope = (logps[:half] - logps[half:]) - (ref_logps[:half] - ref_logps[half:]) - (kls[:half] - kls[half:])
    # d²z/dλ² is a difference of sums of the variances of f_θ − f_ref under π_λ, each at most (its range)² / 4
    # (Popoviciu): the sign of z(1 ± ε) − z(1) is the slope's wherever |slope| > ε/2 · that bound.
    differences = (policy_logits - ref_logits)[:, :-1].double()
    curvature = ((differences.amax(-1) - differences.amin(-1)) ** 2 / 4 * completion_mask[:, 1:]).sum(-1)
    clear = slope.abs() > epsilon * (curvature[:half] + curvature[half:]) + 1e-9 / epsilon
    assume(clear.any())
    s = impl.criterion(policy_logits, ref_logits, input_ids, completion_mask, epsilon)
    assert torch.equal(s[clear], torch.sign(slope[clear]).long())


def test_the_module_docstring_example_runs_as_written(monkeypatch, tmp_path):
    doc = epsdpo.__doc__
    code = textwrap.dedent(doc[doc.index("    import torch") :])
    monkeypatch.chdir(tmp_path)  # from any folder: it reads no file
    names = {}
    exec(compile(code, "epsdpo.__doc__", "exec"), names)
    trained, reference = names["policy"].state_dict(), names["reference"].state_dict()
    assert any(not torch.equal(trained[key], reference[key]) for key in reference)  # it trained
    assert names["out"].s.shape == (1,) and not names["policy"].training


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_epsilon_comes_from_the_baseline_beta_and_another_is_refused(impl):
    ref_logits, input_ids, completion_mask = _pairs()
    policy_logits = ref_logits + torch.randn(ref_logits.shape)
    baseline = epsdpo.BaselineBeta(0.2, 0.3)
    out = impl.epsilon_dpo_loss(policy_logits, ref_logits, input_ids, completion_mask, baseline)
    same = impl.epsilon_dpo_loss(policy_logits, ref_logits, input_ids, completion_mask, 0.2, 0.3)
    assert torch.equal(out.losses, same.losses) and torch.equal(out.pair_betas, same.pair_betas)
    with pytest.raises(ValueError, match="epsilon 0.01 differs from the BaselineBeta's 0.3"):
        impl.epsilon_dpo_loss(policy_logits, ref_logits, input_ids, completion_mask, baseline, 0.01)
    with pytest.raises(ValueError, match="epsilon is required when beta is a number"):
        impl.epsilon_dpo_loss(policy_logits, ref_logits, input_ids, completion_mask, 0.2)


# ----------------------------------------------------------------------------------------------------
# 1. Sequence log-probabilities


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@given(batches(dtype=torch.float32))
def test_sequence_logps_equals_a_per_token_loop(impl, batch):
    logits, _, input_ids, completion_mask = batch
    logps = impl.sequence_logps(logits, input_ids, completion_mask)
    assert logps.dtype == torch.float32
    expected = slow_sequence_logps(logits, input_ids, completion_mask)
    torch.testing.assert_close(logps.double(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@given(batches(), st.integers(0, 2**32 - 1))
def test_sequence_logps_gradient_equals_the_loops(impl, batch, seed):
    logits, _, input_ids, completion_mask = batch
    weights = torch.randn(logits.shape[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    fast_logits = logits.clone().requires_grad_()
    slow_logits = logits.clone().requires_grad_()
    (weights * impl.sequence_logps(fast_logits, input_ids, completion_mask)).sum().backward()
    (weights * slow_sequence_logps(slow_logits, input_ids, completion_mask)).sum().backward()
    torch.testing.assert_close(fast_logits.grad, slow_logits.grad)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_the_bf16_logps_gradient_is_the_float64_gradient_rounded_once(impl):
    # A confident model: the target's probability is near 1, so its gradient g (1 − p) is small. Subtracting
    # the one-hot after rounding g p to bf16 would leave an error larger than the value itself.
    logits = torch.zeros(2, 3, 5, dtype=torch.float64)
    logits[:, :, 0] = torch.tensor([[6.0, 7.0, 8.0], [5.5, 6.5, 7.5]])
    input_ids = torch.zeros(2, 3, dtype=torch.long)
    completion_mask = torch.tensor([[0, 1, 1], [0, 1, 1]])
    bf16_logits = logits.to(torch.bfloat16).requires_grad_()
    impl.sequence_logps(bf16_logits, input_ids, completion_mask).sum().backward()
    exact_logits = bf16_logits.detach().double().requires_grad_()
    slow_sequence_logps(exact_logits, input_ids, completion_mask).sum().backward()
    assert bf16_logits.grad.dtype == torch.bfloat16
    torch.testing.assert_close(bf16_logits.grad.double(), exact_logits.grad, rtol=2**-7, atol=0)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_sequence_logps_passes_gradcheck(impl):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    input_ids = torch.randint(0, 5, (4, 6), generator=generator)
    completion_mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0], [0, 0, 0, 1, 0, 1]])
    assert torch.autograd.gradcheck(lambda x: impl.sequence_logps(x, input_ids, completion_mask), (logits,))


def test_chunks_of_a_few_positions_give_what_whole_rows_give(monkeypatch):
    impl = epsdpo_chunked
    generator = torch.Generator().manual_seed(1)
    policy_logits = torch.randn(4, 12, 7, generator=generator, requires_grad=True)
    ref_logits = torch.randn(4, 12, 7, generator=generator)
    input_ids = torch.randint(0, 7, (4, 12), generator=generator)
    completion_mask = torch.tensor(
        [[0] * 3 + [1] * 9, [0] * 5 + [1] * 6 + [0], [0] * 12, [0, 1, 0, 1, 1, 0, 0, 1, 1, 1, 1, 1]]
    )

    def everything():
        logps = impl.sequence_logps(policy_logits, input_ids, completion_mask)
        (grad,) = torch.autograd.grad((logps * torch.arange(1.0, 5.0)).sum(), policy_logits)
        return logps, grad, *impl.perturbed_logps(policy_logits, ref_logits, input_ids, completion_mask, 0.3)

    whole = everything()
    monkeypatch.setattr(epsdpo_chunked, "CHUNK_BYTES", 3 * 7 * 4)  # three float32 positions per chunk
    assert (
        len(epsdpo_chunked._scored_positions(input_ids, completion_mask, torch.empty(0, 0, 7, device="meta")).chunks)
        == 3 + 2 + 0 + 4
    )
    for chunked, expected in zip(everything(), whole, strict=True):
        torch.testing.assert_close(chunked, expected)


@functools.cache
def tiny_causal_lm(vocab_size):
    """A small random transformers causal LM, made locally (no download), once per vocabulary size."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@settings(max_examples=15, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32 - 1), st.integers(2, 12), st.integers(1, 11))
def test_sequence_logps_equals_transformers_cross_entropy(impl, seed, length, prompt_length):
    assume(prompt_length < length)
    model = tiny_causal_lm(vocab_size=50)
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 50, (3, length), generator=generator)
    completion_mask = torch.zeros(3, length, dtype=torch.long)
    completion_mask[:, prompt_length:] = 1
    with torch.no_grad():
        logits = model(input_ids).logits
        logps = impl.sequence_logps(logits, input_ids, completion_mask)
        for row in range(3):
            # transformers shifts the labels itself and averages the cross-entropy over tokens not at -100.
            labels = input_ids[row : row + 1].masked_fill(completion_mask[row : row + 1] == 0, -100)
            mean_cross_entropy = model(input_ids[row : row + 1], labels=labels).loss
            num_tokens = int(completion_mask[row].sum())
            torch.testing.assert_close(logps[row], -mean_cross_entropy * num_tokens, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@given(batches(), st.integers(0, 2**32 - 1), epsilons)
def test_masked_positions_change_nothing(impl, batch, seed, epsilon):
    policy_logits, ref_logits, input_ids, completion_mask = batch
    generator = torch.Generator().manual_seed(seed)
    # Logits at t score the token at t + 1: these are the positions whose logits score nothing.
    unscored = torch.ones_like(completion_mask, dtype=torch.bool)
    unscored[:, :-1] = completion_mask[:, 1:] == 0
    noise = 1e4 * torch.randn(policy_logits.shape, generator=generator, dtype=policy_logits.dtype)
    other_policy = torch.where(unscored[..., None], noise, policy_logits)
    other_ref = torch.where(unscored[..., None], -noise, ref_logits)
    garbage_ids = torch.randint(-100, 10**6, input_ids.shape, generator=generator)
    other_ids = torch.where(completion_mask.bool(), input_ids, garbage_ids)

    assert torch.equal(
        impl.sequence_logps(other_policy, other_ids, completion_mask),
        impl.sequence_logps(policy_logits, input_ids, completion_mask),
    )
    assert torch.equal(
        impl.criterion(other_policy, other_ref, other_ids, completion_mask, epsilon),
        impl.criterion(policy_logits, ref_logits, input_ids, completion_mask, epsilon),
    )


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@given(batches(dtype=torch.float32), st.integers(1, 3))
def test_padding_on_either_side_gives_the_same_loss_and_gradient(impl, batch, padding):
    # Only completion_mask says what counts: rows padded on the left equal rows padded on the right, and the
    # logits of padding positions never reach the loss or the gradient, not even NaN ones.
    policy_logits, ref_logits, input_ids, completion_mask = batch
    rows, _, vocab = policy_logits.shape
    nan_logits = torch.full((rows, padding, vocab), math.nan)
    pad_ids, pad_mask = torch.zeros(rows, padding, dtype=input_ids.dtype), torch.zeros(rows, padding, dtype=torch.long)
    results = []
    for side in ("right", "left"):

        def padded(x, pad, side=side):
            return torch.cat([x, pad] if side == "right" else [pad, x], dim=1)

        logits = padded(policy_logits, nan_logits).requires_grad_()
        ids, mask, ref = padded(input_ids, pad_ids), padded(completion_mask, pad_mask), padded(ref_logits, nan_logits)
        out = impl.epsilon_dpo_loss(logits, ref, ids, mask, 0.1, 0.3)
        out.loss.backward()
        kept, at_padding = (
            (logits.grad[:, :-padding], logits.grad[:, -padding:])
            if side == "right"
            else (logits.grad[:, padding:], logits.grad[:, :padding])
        )
        assert torch.isfinite(logits.grad).all() and not at_padding.any()
        results.append((out.loss.detach(), out.s, kept))
    (right_loss, right_s, right_grad), (left_loss, left_s, left_grad) = results
    assert torch.isfinite(right_loss) and torch.equal(right_s, left_s)
    torch.testing.assert_close(left_loss, right_loss)
    torch.testing.assert_close(left_grad, right_grad)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_an_all_masked_row_gives_zero_and_a_pair_with_one_is_refused(impl):
    logits = torch.randn(2, 5, 4, requires_grad=True)
    input_ids = torch.randint(0, 4, (2, 5))
    completion_mask = torch.tensor([[0, 0, 0, 0, 0], [0, 0, 1, 1, 0]])
    logps = impl.sequence_logps(logits, input_ids, completion_mask)
    assert logps[0].item() == 0.0
    logps.sum().backward()
    assert torch.isfinite(logps).all() and torch.isfinite(logits.grad).all()
    assert torch.equal(logits.grad[0], torch.zeros_like(logits.grad[0]))

    # As a pair (row 0 chosen, row 1 rejected), it has no preference to learn: refused, naming the pair.
    with pytest.raises(
        ValueError, match=r"^pair 0: its chosen sequence \(row 0 of input_ids\) has no completion token"
    ):
        impl.epsilon_dpo_loss(logits, logits.detach() + 1, input_ids, completion_mask, 0.1, 0.5)
    with pytest.raises(
        ValueError, match=r"^pair 0: its chosen sequence \(row 0 of input_ids\) has no completion token"
    ):
        impl.criterion(logits, logits.detach() + 1, input_ids, completion_mask, 0.5)
    with pytest.raises(ValueError, match=r"^pair 1: its rejected sequence \(row 3 of input_ids\)"):
        impl.criterion(
            logits.repeat(2, 1, 1),
            logits.repeat(2, 1, 1),
            input_ids.repeat(2, 1),
            torch.tensor([[0, 0, 1, 0, 0]] * 3 + [[0] * 5]),
            0.5,
        )


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@given(batches(), st.integers(0, 2**32 - 1), epsilons, st.sampled_from(["policy", "reference"]))
def test_a_constant_per_position_changes_neither_logps_nor_s(impl, batch, seed, epsilon, which):
    policy_logits, ref_logits, input_ids, completion_mask = batch
    z = slow_log_ratios(policy_logits, ref_logits, input_ids, completion_mask, epsilon)
    assume(separation(*z) > 1e-9)  # float64 rounding cannot flip a decision
    shifts = 100 * torch.randn(
        policy_logits.shape[:2] + (1,), generator=torch.Generator().manual_seed(seed), dtype=policy_logits.dtype
    )  # one constant per (row, position)
    shifted_policy = policy_logits + shifts if which == "policy" else policy_logits
    shifted_ref = ref_logits + shifts if which == "reference" else ref_logits

    torch.testing.assert_close(
        impl.sequence_logps(shifted_policy, input_ids, completion_mask),
        impl.sequence_logps(policy_logits, input_ids, completion_mask),
    )
    assert torch.equal(
        impl.criterion(shifted_policy, shifted_ref, input_ids, completion_mask, epsilon),
        impl.criterion(policy_logits, ref_logits, input_ids, completion_mask, epsilon),
    )


# ----------------------------------------------------------------------------------------------------
# 2. DPO


@given(st.lists(st.floats(-1e4, 1e4), min_size=1, max_size=8), betas)
def test_dpo_loss_is_minus_log_sigmoid_of_beta_times_margin(margins, beta):
    margins = torch.tensor(margins, dtype=torch.float64)
    zeros = torch.zeros_like(margins)
    losses, chosen_rewards, rejected_rewards = epsdpo.dpo_loss(margins, zeros, zeros, zeros, beta)
    assert torch.isfinite(losses).all()
    # −log σ(x) = log(1 + e^(−x)), written stably for either sign of x
    x = beta * margins
    expected = torch.where(x > 0, torch.log1p(torch.exp(-x)), -x + torch.log1p(torch.exp(x)))
    torch.testing.assert_close(losses, expected)
    torch.testing.assert_close(chosen_rewards, beta * margins)
    assert torch.equal(rejected_rewards, zeros)


def test_dpo_loss_is_finite_for_huge_margins_in_float32():
    margins = torch.tensor([1e4, -1e4, 0.0])
    zeros = torch.zeros(3)
    losses, _, _ = epsdpo.dpo_loss(margins, zeros, zeros, zeros, 1.0)
    torch.testing.assert_close(losses, torch.tensor([0.0, 1e4, math.log(2)]))


def test_dpo_loss_uses_each_pairs_own_beta():
    chosen, rejected = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0])
    ref = torch.zeros(2)
    per_pair, _, _ = epsdpo.dpo_loss(chosen, rejected, ref, ref, torch.tensor([0.5, 2.0]))
    first, _, _ = epsdpo.dpo_loss(chosen, rejected, ref, ref, 0.5)
    second, _, _ = epsdpo.dpo_loss(chosen, rejected, ref, ref, 2.0)
    assert per_pair[0] == first[0] and per_pair[1] == second[1]


# ----------------------------------------------------------------------------------------------------
# 3 and 4. Perturbed policies, criterion, per-pair β


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@given(batches(), epsilons)
def test_perturbed_logps_equal_the_loop(impl, batch, epsilon):
    policy_logits, ref_logits, input_ids, completion_mask = batch
    weaker, stronger = impl.perturbed_logps(policy_logits, ref_logits, input_ids, completion_mask, epsilon)
    for logps, lam in ((weaker, 1 + epsilon), (stronger, 1 - epsilon)):
        expected = slow_sequence_logps(ref_logits + lam * (policy_logits - ref_logits), input_ids, completion_mask)
        torch.testing.assert_close(logps, expected)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@given(batches(), epsilons)
def test_s_equals_the_rule_computed_slowly(impl, batch, epsilon):
    policy_logits, ref_logits, input_ids, completion_mask = batch
    z = slow_log_ratios(policy_logits, ref_logits, input_ids, completion_mask, epsilon)
    assume(separation(*z) > 1e-9)
    s = impl.criterion(policy_logits, ref_logits, input_ids, completion_mask, epsilon)
    assert s.dtype == torch.long
    assert torch.equal(s, slow_s(*z))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@given(batches(dtype=torch.float32), betas)
def test_epsilon_zero_is_dpo(impl, batch, beta):
    policy_logits, ref_logits, input_ids, completion_mask = batch
    num_pairs = policy_logits.shape[0] // 2

    eps_logits = policy_logits.clone().requires_grad_()
    out = impl.epsilon_dpo_loss(eps_logits, ref_logits, input_ids, completion_mask, beta, 0.0)
    out.loss.backward()

    dpo_logits = policy_logits.clone().requires_grad_()
    logps = impl.sequence_logps(dpo_logits, input_ids, completion_mask)
    ref_logps = impl.sequence_logps(ref_logits, input_ids, completion_mask)
    dpo_losses, _, _ = epsdpo.dpo_loss(
        logps[:num_pairs], logps[num_pairs:], ref_logps[:num_pairs], ref_logps[num_pairs:], beta
    )
    dpo_losses.mean().backward()

    assert out.s.eq(0).all()
    assert torch.equal(out.losses, dpo_losses)  # bit for bit
    assert torch.equal(eps_logits.grad, dpo_logits.grad)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@given(batches(dtype=torch.float32), st.floats(0, 0.999), st.sampled_from([torch.float32, torch.bfloat16]))
def test_policy_equal_to_reference_gives_s_zero(impl, batch, epsilon, dtype):
    _, ref_logits, input_ids, completion_mask = batch
    ref_logits = ref_logits.to(dtype)
    s = impl.criterion(ref_logits.clone(), ref_logits, input_ids, completion_mask, epsilon)
    assert s.eq(0).all()


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@given(batches(), epsilons)
def test_swapping_chosen_and_rejected_negates_s(impl, batch, epsilon):
    policy_logits, ref_logits, input_ids, completion_mask = batch
    half = policy_logits.shape[0] // 2

    def swap(x):
        return torch.cat([x[half:], x[:half]])

    s = impl.criterion(policy_logits, ref_logits, input_ids, completion_mask, epsilon)
    swapped = impl.criterion(swap(policy_logits), swap(ref_logits), swap(input_ids), swap(completion_mask), epsilon)
    assert torch.equal(swapped, -s)


def known_pair(chosen_offsets, epsilon=0.1, impl=epsdpo):
    """A pair whose log-ratio z(λ) is known in closed form.

    Vocabulary {0, 1}; every token is 0. At each completion position the logit of token 0 is
    r + λ d under f_λ (the logit of token 1 is 0), so log π̂_λ(token) = −softplus(−(r + λ d)).
    chosen_offsets lists (r, d) per completion token of the chosen sequence; the rejected
    sequence has policy = reference (d = 0), so z(λ) moves with the chosen sequence only.
    """
    length = 1 + len(chosen_offsets)
    ref_logits = torch.zeros(2, length, 2)
    policy_logits = torch.zeros(2, length, 2)
    for t, (r, d) in enumerate(chosen_offsets):
        ref_logits[0, t, 0] = r
        policy_logits[0, t, 0] = r + d
    input_ids = torch.zeros(2, length, dtype=torch.long)
    completion_mask = torch.ones(2, length, dtype=torch.long)
    completion_mask[:, 0] = 0
    z_weaker, z_stronger = (
        log_ratio[:1] - log_ratio[1:]
        for log_ratio in impl.perturbed_logps(policy_logits, ref_logits, input_ids, completion_mask, epsilon)
    )
    z_theta = impl.sequence_logps(policy_logits, input_ids, completion_mask)
    z_theta = z_theta[:1] - z_theta[1:]
    s = impl.criterion(policy_logits, ref_logits, input_ids, completion_mask, epsilon)
    return s.item(), (z_weaker.item(), z_theta.item(), z_stronger.item())


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_constructed_cases_give_the_known_s(impl):
    # Policy made the chosen token likelier than the reference: z grows with λ, i.e. as β shrinks.
    step, (weaker, theta, stronger) = known_pair([(0.0, 1.0), (0.5, 2.0)], impl=impl)
    assert weaker > theta > stronger and step == +1
    # Policy made it less likely: z shrinks with λ, so it grows as β grows.
    step, (weaker, theta, stronger) = known_pair([(0.0, -1.0), (0.5, -2.0)], impl=impl)
    assert weaker < theta < stronger and step == -1
    # Policy equals the reference: a tie.
    step, (weaker, theta, stronger) = known_pair([(0.3, 0.0), (-0.5, 0.0)], impl=impl)
    assert weaker == theta == stronger and step == 0
    # Two tokens pulling opposite ways, balanced at λ = 1: z(λ) peaks at λ = 1, not monotone.
    step, (weaker, theta, stronger) = known_pair([(-3.0, 3.0), (3.0, -3.0)], impl=impl)
    assert weaker < theta and stronger < theta and step == 0


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@settings(max_examples=100)
@given(batches(), epsilons)
def test_bf16_inputs_give_the_float64_decision_on_well_separated_cases(impl, batch, epsilon):
    policy_logits, ref_logits, input_ids, completion_mask = batch
    policy_bf16, ref_bf16 = policy_logits.to(torch.bfloat16), ref_logits.to(torch.bfloat16)
    # The float64 answer for the very logits the bf16 tensors hold.
    z = slow_log_ratios(policy_bf16, ref_bf16, input_ids, completion_mask, epsilon)
    assume(separation(*z) > 1e-3 * (1 + max(v.abs().max().item() for v in z)))
    s = impl.criterion(policy_bf16, ref_bf16, input_ids, completion_mask, epsilon)
    assert torch.equal(s, slow_s(*z))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@given(batches(), betas, epsilons)
def test_no_gradient_flows_through_the_decision(impl, batch, beta, epsilon):
    policy_logits, ref_logits, input_ids, completion_mask = batch
    half = policy_logits.shape[0] // 2
    logits = policy_logits.clone().requires_grad_()
    out = impl.epsilon_dpo_loss(logits, ref_logits, input_ids, completion_mask, beta, epsilon)
    (grad,) = torch.autograd.grad(out.loss, logits)

    # −log σ(β̃ h) with the same β̃ held as a constant, computed the slow way.
    slow_logits = policy_logits.clone().requires_grad_()
    logps = slow_sequence_logps(slow_logits, input_ids, completion_mask)
    ref_logps = slow_sequence_logps(ref_logits, input_ids, completion_mask)
    margins = (logps[:half] - logps[half:]) - (ref_logps[:half] - ref_logps[half:])
    fixed_betas = out.pair_betas.detach().double()
    (-F.logsigmoid(fixed_betas * margins)).mean().backward()

    assert not out.pair_betas.requires_grad and not out.s.requires_grad
    torch.testing.assert_close(grad, slow_logits.grad)


@given(st.floats(1e-4, 10), epsilons, st.lists(st.integers(-1, 1), min_size=1, max_size=16))
def test_pair_betas_are_beta_over_one_plus_epsilon_s(beta, epsilon, s):
    result = epsdpo.betas_from_s(beta, torch.tensor(s), epsilon)
    expected = torch.tensor([beta / (1 + epsilon * value) for value in s], dtype=torch.float64)
    torch.testing.assert_close(result.double(), expected, rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------------------------------
# 5. The baseline-β update

micro_batches = st.lists(st.lists(st.integers(-1, 1), min_size=1, max_size=8), min_size=1, max_size=5)


@given(betas, epsilons, st.lists(micro_batches, min_size=1, max_size=4))
def test_beta_update_is_the_mean_pair_beta_of_every_micro_batch(beta, epsilon, optimizer_steps):
    baseline = epsdpo.BaselineBeta(beta, epsilon)
    expected = beta
    for micro_batches_of_step in optimizer_steps:
        all_pair_betas = []
        for s in micro_batches_of_step:
            baseline.observe(torch.tensor(s))
            all_pair_betas += [expected / (1 + epsilon * value) for value in s]
        expected = math.fsum(all_pair_betas) / len(all_pair_betas)
        assert baseline.step() == pytest.approx(expected, rel=1e-12)
        assert baseline.value > 0


@given(betas, epsilons, micro_batches)
def test_beta_update_is_within_1_minus_eps_squared_of_the_authors_rule(beta, epsilon, steps_s):
    # README, "How β moves": β/(1 + ε mean s) ≤ β mean 1/(1 + ε s) ≤ β/((1 + ε mean s)(1 − ε²)):
    # the authors' trainer on the left, Algorithm 1's mean of β̃ (what step() computes) in the middle.
    baseline = epsdpo.BaselineBeta(beta, epsilon)
    for s in steps_s:
        baseline.observe(torch.tensor(s))
    every_s = [value for s in steps_s for value in s]
    authors = beta / (1 + epsilon * math.fsum(every_s) / len(every_s))
    assert authors * (1 - 1e-12) <= baseline.step() <= authors / (1 - epsilon**2) * (1 + 1e-12)


@given(betas, micro_batches)
def test_beta_update_leaves_beta_unchanged_at_epsilon_zero(beta, micro_batches_of_step):
    baseline = epsdpo.BaselineBeta(beta, 0.0)
    for s in micro_batches_of_step:
        baseline.observe(torch.tensor(s))
    assert baseline.step() == beta  # bit for bit


def test_beta_update_stays_positive_and_moves_the_right_way():
    weaker = epsdpo.BaselineBeta(0.1, 0.5)
    for _ in range(200):
        weaker.observe(torch.ones(4, dtype=torch.long))
        weaker.step()
    assert 0 < weaker.value < 1e-30
    stronger = epsdpo.BaselineBeta(0.1, 0.5)
    stronger.observe(-torch.ones(4, dtype=torch.long))
    assert stronger.step() == pytest.approx(0.2)
    nothing_seen = epsdpo.BaselineBeta(0.1, 0.5)
    assert nothing_seen.step() == 0.1


def test_beta_falls_as_beta_over_one_plus_epsilon_to_the_t_until_min_beta():
    unbounded, floored = epsdpo.BaselineBeta(0.1, 0.01), epsdpo.BaselineBeta(0.1, 0.01, min_beta=0.08, max_beta=0.1)
    for step in range(1, 50):  # every pair of every step gets s = +1
        for baseline in (unbounded, floored):
            baseline.observe(torch.ones(4, dtype=torch.long))
            baseline.step()
        assert unbounded.value == pytest.approx(0.1 / 1.01**step, rel=1e-12)
    assert unbounded.value == pytest.approx(0.0614, abs=5e-5)  # the β of step 50: 0.1 / 1.01**49
    assert floored.value == 0.08
    floored.observe(-torch.ones(4, dtype=torch.long))
    assert floored.step() == pytest.approx(0.08 / 0.99) and floored.step() == pytest.approx(0.08 / 0.99)
    for _ in range(30):
        floored.observe(-torch.ones(4, dtype=torch.long))
        floored.step()
    assert floored.value == 0.1  # max_beta bounds it from above


def test_beta_never_leaves_the_range_the_loss_takes():
    # With every pair at s = +1, β falls as β / (1 + ε)^t: without a floor it would leave float32's normal range,
    # where the loss refuses it; it stops at BETA_RANGE[0], which the loss still takes.
    baseline = epsdpo.BaselineBeta(1e-36, 0.9)
    for _ in range(20):
        baseline.step([4, 0, 0])
    assert baseline.value == epsdpo.BETA_RANGE[0]
    ref_logits, input_ids, completion_mask = _pairs()
    out = epsdpo.epsilon_dpo_loss(ref_logits + 1, ref_logits, input_ids, completion_mask, baseline)
    assert torch.isfinite(out.loss)
    high = epsdpo.BaselineBeta(1e29, 0.9)
    for _ in range(5):
        high.step([0, 0, 4])
    assert high.value == epsdpo.BETA_RANGE[1]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.int32, torch.float32, torch.bfloat16])
def test_a_zero_one_mask_of_any_dtype_gives_what_an_int64_mask_gives(impl, mask_dtype):
    generator = torch.Generator().manual_seed(0)
    ref_logits = torch.randn(4, 6, 9, generator=generator)
    policy_logits = ref_logits + 0.5 * torch.randn(4, 6, 9, generator=generator)
    input_ids = torch.randint(0, 9, (4, 6), generator=generator)
    completion_mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 0, 0]])
    expected = impl.epsilon_dpo_loss(policy_logits, ref_logits, input_ids, completion_mask, 0.1, 0.3)
    out = impl.epsilon_dpo_loss(policy_logits, ref_logits, input_ids, completion_mask.to(mask_dtype), 0.1, 0.3)
    assert torch.equal(out.loss, expected.loss) and torch.equal(out.s, expected.s) and torch.equal(out.h, expected.h)


def test_beta_state_round_trips_mid_accumulation():
    original = epsdpo.BaselineBeta(0.05, 0.2)
    original.observe(torch.tensor([1, 1, 0]))
    original.step()
    original.observe(torch.tensor([-1, 1]))  # pending: half of an accumulated step
    checkpoint_file = io.BytesIO()  # the state as torch.save writes it to a checkpoint
    torch.save(original.state_dict(), checkpoint_file)
    checkpoint_file.seek(0)
    resumed = epsdpo.BaselineBeta(1.0, 0.0)
    resumed.load_state_dict(torch.load(checkpoint_file, weights_only=True))
    for baseline in (original, resumed):
        baseline.observe(torch.tensor([0, -1]))
    assert resumed.step() == original.step()
    assert resumed.state_dict() == original.state_dict()


def _beta_on_one_rank(rank, world_size, init_file, s_per_rank, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    baseline = epsdpo.BaselineBeta(0.1, 0.25)
    baseline.observe(torch.tensor(s_per_rank[rank]))
    results[rank] = baseline.step()
    dist.destroy_process_group()


def test_beta_update_averages_over_every_rank(tmp_path):
    import torch.multiprocessing as mp

    s_per_rank = [[1, 1, 1], [-1, 0]]
    results = mp.Manager().dict()
    # Forked, not spawned: the two processes start with torch imported, in milliseconds rather than seconds.
    mp.start_processes(
        _beta_on_one_rank, args=(2, tmp_path / "rendezvous", s_per_rank, results), nprocs=2, start_method="fork"
    )
    expected = (3 * 0.1 / 1.25 + 0.1 / 0.75 + 0.1) / 5  # the mean β̃ over both ranks' pairs
    assert results[0] == results[1] == pytest.approx(expected, rel=1e-12)


# ----------------------------------------------------------------------------------------------------
# Bad input: a ValueError that says what is wrong, and what is left to the caller (more: tests/test_library_input.py)


def _pairs(num_rows=2, length=4, vocab=5):
    logits = torch.randn(num_rows, length, vocab)
    input_ids = torch.randint(0, vocab, (num_rows, length))
    completion_mask = torch.tensor([0, 0, 1, 1]).repeat(num_rows, 1)
    return logits, input_ids, completion_mask


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("beta", [0.0, -0.1, float("nan"), float("inf"), torch.tensor([0.1, -0.1])])
def test_bad_beta_is_rejected(impl, beta):
    logits, input_ids, completion_mask = _pairs()
    logps = torch.zeros(2)
    with pytest.raises(ValueError, match="beta must be"):
        epsdpo.dpo_loss(logps, logps, logps, logps, beta)
    with pytest.raises(ValueError, match="beta must be"):
        epsdpo.betas_from_s(beta, torch.zeros(2, dtype=torch.long), 0.1)
    if not isinstance(beta, torch.Tensor):
        with pytest.raises(ValueError, match="beta must be"):
            impl.epsilon_dpo_loss(logits, logits, input_ids, completion_mask, beta, 0.1)
        with pytest.raises(ValueError, match="beta must be"):
            epsdpo.BaselineBeta(beta, 0.1)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("epsilon", [-0.01, 1.0, 1.5, float("nan")])
def test_bad_epsilon_is_rejected(impl, epsilon):
    logits, input_ids, completion_mask = _pairs()
    with pytest.raises(ValueError, match=r"epsilon must be a number in \[0, 1\)"):
        impl.criterion(logits, logits, input_ids, completion_mask, epsilon)
    with pytest.raises(ValueError, match=r"epsilon must be a number in \[0, 1\)"):
        impl.epsilon_dpo_loss(logits, logits, input_ids, completion_mask, 0.1, epsilon)
    with pytest.raises(ValueError, match=r"epsilon must be a number in \[0, 1\)"):
        epsdpo.betas_from_s(0.1, torch.zeros(1, dtype=torch.long), epsilon)
    with pytest.raises(ValueError, match=r"epsilon must be a number in \[0, 1\)"):
        epsdpo.BaselineBeta(0.1, epsilon)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_a_completion_on_the_first_token_is_rejected(impl):
    logits, input_ids, completion_mask = _pairs()
    completion_mask[:, 0] = 1
    with pytest.raises(ValueError, match=r"completion_mask\[:, 0\] must be 0"):
        impl.sequence_logps(logits, input_ids, completion_mask)


def test_s_outside_minus_one_zero_one_is_rejected():
    baseline = epsdpo.BaselineBeta(0.1, 0.1)
    baseline.observe(torch.tensor([0, 1]))
    baseline.observe(torch.tensor([0, 2]))  # observe() does not wait for the device ...
    with pytest.raises(ValueError, match=r"s must all be -1, 0 or \+1: 1 of the 4 observed since the last step"):
        baseline.step()  # ... step() checks, before β moves
    assert baseline.value == 0.1
    with pytest.raises(ValueError, match=r"s must be an integer tensor of -1, 0 and \+1"):
        epsdpo.betas_from_s(0.1, torch.tensor([1, -2]), 0.5)  # β/(1 − 2ε) would be negative


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("mask_value", [2, -1, 0.5])
def test_a_mask_value_other_than_zero_or_one_is_rejected(impl, mask_value):
    logits, input_ids, completion_mask = _pairs()
    completion_mask = completion_mask.to(torch.float32)
    completion_mask[1, 2] = mask_value
    with pytest.raises(ValueError, match=r"completion_mask must hold only 0 and 1"):
        impl.sequence_logps(logits, input_ids, completion_mask)
    with pytest.raises(ValueError, match=r"completion_mask must hold only 0 and 1"):
        impl.epsilon_dpo_loss(logits, logits, input_ids, completion_mask, 0.1, 0.1)


@pytest.mark.parametrize(
    "state",
    [
        {"beta": 0.1, "epsilon": 0.1, "counts": [1, 2]},
        {"beta": 0.1, "epsilon": 0.1, "counts": [1, -2, 0]},
        {"beta": 0.1, "epsilon": 0.1, "counts": [1.5, 2, 0]},
        {"beta": 0.1, "epsilon": 0.1, "counts": "123"},
        {"beta": 0.1, "epsilon": 0.1},
        {"beta": -1.0, "epsilon": 0.1, "counts": [0, 0, 0]},
        [0.1, 0.1, [0, 0, 0]],
        {"beta": 0.1, "epsilon": 0.1, "counts": [10**30, 0, 0]},
        {"beta": 0.1, "epsilon": 0.1, "counts": [2**62, 2**62, 0]},  # each fits in int64, their sum does not
    ],
)
def test_a_malformed_beta_state_is_rejected_and_changes_nothing(state):
    baseline = epsdpo.BaselineBeta(0.05, 0.2)
    with pytest.raises(ValueError):
        baseline.load_state_dict(state)
    assert baseline.state_dict() == {"beta": 0.05, "epsilon": 0.2, "counts": [0, 0, 0]}


def test_baseline_beta_refuses_bounds_counts_and_states_it_cannot_use():
    for min_beta, max_beta in (("0.1", 1.0), (None, 1.0), (0.0, None), (True, 1.0), (0.2, 1.0), (0.0, 0.05)):
        with pytest.raises(ValueError, match=r"^expected 0 <= min_beta <= beta <= max_beta"):
            epsdpo.BaselineBeta(0.1, 0.01, min_beta=min_beta, max_beta=max_beta)
    baseline = epsdpo.BaselineBeta(0.1, 0.01, min_beta=0.05)
    for counts in ([1, 0, math.nan], [1, -1, 0], [1.0, 0, 0], [True, 0, 0], [1, 0], "120"):
        with pytest.raises(ValueError, match=r"^counts must be 3 integers >= 0"):
            baseline.step(counts)
    assert baseline.value == 0.1  # nothing moved
    with pytest.raises(ValueError, match=r"^the state's beta 0.01 is outside min_beta 0.05, max_beta inf"):
        baseline.load_state_dict({"beta": 0.01, "epsilon": 0.01, "counts": [0, 0, 0]})
    with pytest.raises(ValueError, match=r"^a BaselineBeta state's counts must be 3 integers >= 0"):
        baseline.load_state_dict({"beta": 0.1, "epsilon": 0.01, "counts": [0, -2, 0]})
    assert baseline.value == 0.1 and baseline.state_dict()["counts"] == [0, 0, 0]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("beta", [1e-40, 10**400, 1e31])  # subnormal in float32, past float64, past float32
def test_a_beta_float32_cannot_hold_is_refused(impl, beta):
    logits, input_ids, completion_mask = _pairs()
    with pytest.raises(ValueError, match=r"beta must be a finite number > 0, in \[1.2e-38, 1e30\]"):
        impl.epsilon_dpo_loss(logits, logits, input_ids, completion_mask, beta, 0.1)
    with pytest.raises(ValueError, match=r"beta must be a finite number > 0, in \[1.2e-38, 1e30\]"):
        epsdpo.betas_from_s(beta, torch.zeros(2, dtype=torch.long), 0.1)
    with pytest.raises(ValueError, match=r"beta must be a finite number > 0, in \[1.2e-38, 1e30\]"):
        epsdpo.BaselineBeta(beta, 0.1)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_the_criterion_takes_logits_alone_and_leaves_nan_to_the_caller(impl):
    import inspect

    assert list(inspect.signature(impl.criterion).parameters) == [
        "policy_logits",
        "ref_logits",
        "input_ids",
        "completion_mask",
        "epsilon",
    ]
    logits, input_ids, completion_mask = _pairs()
    broken = logits.clone()
    broken[0, 2, 1] = float("nan")  # a scored position: no check, no host sync
    assert math.isnan(impl.epsilon_dpo_loss(broken, logits, input_ids, completion_mask, 0.1, 0.1).loss.item())
    assert "NaN or infinite" in epsdpo.epsilon_dpo_loss.__doc__ and "caller" in epsdpo.epsilon_dpo_loss.__doc__
