"""What epsdpo.py and epsdpo_chunked.py refuse, and the numbers they take: shapes, dtypes, devices and Python types
of their inputs, each refused with a ValueError that names it; Fractions and numpy floats as β and ε, int32 ids. The
method's facts, and the valid ranges of β and ε, are in test_epsdpo.py."""

import math

import pytest
import torch

import epsdpo
import epsdpo_chunked
from test_epsdpo import IMPLEMENTATIONS, _pairs


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_an_odd_number_of_rows_is_rejected(impl):
    logits, input_ids, completion_mask = _pairs(num_rows=3)
    with pytest.raises(ValueError, match="even number of rows.*got 3"):
        impl.criterion(logits, logits, input_ids, completion_mask, 0.1)
    with pytest.raises(ValueError, match="even number of rows.*got 3"):
        impl.epsilon_dpo_loss(logits, logits, input_ids, completion_mask, 0.1, 0.1)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_mismatched_shapes_are_rejected(impl):
    logits, input_ids, completion_mask = _pairs()
    with pytest.raises(ValueError, match=r"must both have the shape \(N, T\) = \(2, 4\)"):
        impl.sequence_logps(logits, input_ids[:, :3], completion_mask)
    with pytest.raises(ValueError, match=r"must both have the shape"):
        impl.sequence_logps(logits, input_ids, completion_mask[:1])
    with pytest.raises(
        ValueError, match=r"must be a floating-point tensor of shape \(N, T, V\), got torch.float32 \(4, 5\)"
    ):
        impl.sequence_logps(logits[0], input_ids, completion_mask)
    with pytest.raises(ValueError, match=r"ref_logits \(2, 4, 6\) must have the shape of policy_logits \(2, 4, 5\)"):
        impl.criterion(logits, torch.randn(2, 4, 6), input_ids, completion_mask, 0.1)
    with pytest.raises(ValueError, match=r"must all have the same shape \(B,\)"):
        epsdpo.dpo_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.zeros(2), 0.1)
    with pytest.raises(
        ValueError, match=r"and beta be a number or \(B,\), got \[\(2,\), \(2,\), \(2,\), \(2,\)\] and beta \(3,\)"
    ):
        epsdpo.dpo_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.full((3,), 0.1))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("token_id", [-1, 5, 10**6])
def test_a_scored_token_id_outside_the_vocabulary_is_rejected(impl, token_id):
    logits, input_ids, completion_mask = _pairs(vocab=5)  # completion_mask is on at positions 2 and 3
    input_ids[0, 3] = token_id
    with pytest.raises(
        ValueError, match=rf"input_ids must be in \[0, 5\) wherever completion_mask is 1, got \[{token_id}\]"
    ):
        impl.sequence_logps(logits, input_ids, completion_mask)
    input_ids[0, 3], input_ids[0, 1] = 0, token_id  # off the mask: never read, so allowed
    impl.sequence_logps(logits, input_ids, completion_mask)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [torch.long, torch.int32, torch.bool])
def test_logits_that_are_not_floating_point_are_rejected(impl, dtype):
    logits, input_ids, completion_mask = _pairs()
    with pytest.raises(ValueError, match=r"logits must be a floating-point tensor"):
        impl.sequence_logps(logits.to(dtype), input_ids, completion_mask)
    with pytest.raises(ValueError, match=r"ref_logits must be a floating-point tensor"):
        impl.epsilon_dpo_loss(logits, logits.to(dtype), input_ids, completion_mask, 0.1, 0.1)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_an_empty_batch_is_rejected(impl):
    logits, input_ids, completion_mask = _pairs()
    with pytest.raises(
        ValueError, match=r"policy_logits \(0, 4, 5\): expected positions, words and an even number of rows"
    ):
        impl.epsilon_dpo_loss(logits[:0], logits[:0], input_ids[:0], completion_mask[:0], 0.1, 0.1)
    with pytest.raises(ValueError, match=r"with B ≥ 1"):
        epsdpo.dpo_loss(*torch.zeros(4, 0), 0.1)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_beta_must_be_a_real_number_and_may_be_a_numpy_float(impl):
    import numpy

    logits, input_ids, completion_mask = _pairs()
    for beta in (True, "0.1", None):
        with pytest.raises(ValueError, match="beta must be a finite number > 0"):
            impl.epsilon_dpo_loss(logits, logits, input_ids, completion_mask, beta, 0.1)
    with pytest.raises(ValueError, match="epsilon must be a number in"):
        epsdpo.BaselineBeta(0.1, True)
    for beta in (numpy.float32(0.1), numpy.float64(0.1)):
        out = impl.epsilon_dpo_loss(logits, logits, input_ids, completion_mask, beta, numpy.float32(0.1))
        assert out.loss.item() == pytest.approx(math.log(2))
        assert epsdpo.BaselineBeta(beta, 0.1).value == pytest.approx(0.1)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_meta_tensors_or_tensors_on_two_devices_are_refused_naming_which(impl):
    from torch._subclasses.fake_tensor import FakeTensorMode

    logits, input_ids, completion_mask = _pairs()
    meta = logits.to("meta")
    with pytest.raises(ValueError, match=r"^policy_logits is on the meta device: it has a shape but no values"):
        impl.epsilon_dpo_loss(meta, meta, input_ids.to("meta"), completion_mask.to("meta"), 0.1, 0.1)
    with pytest.raises(ValueError, match=r"^input_ids is on the meta device"):
        impl.sequence_logps(logits, input_ids.to("meta"), completion_mask)
    with pytest.raises(ValueError, match=r"^chosen_logps \(log-probabilities\) is on the meta device"):
        epsdpo.dpo_loss(*torch.zeros(4, 2, device="meta"), 0.1)
    with FakeTensorMode(allow_non_fake_inputs=True):  # two GPUs, without a GPU
        on_1, on_0 = logits.to("cuda:1"), input_ids.to("cuda:0")
        with pytest.raises(
            ValueError, match=r"^input_ids is on cuda:0, the other tensors on cuda:1: put them on one device"
        ):
            impl.epsilon_dpo_loss(on_1, on_1, on_0, completion_mask.to("cuda:1"), 0.1, 0.1)
        with pytest.raises(ValueError, match=r"^completion_mask is on cpu, the other tensors on cuda:1"):
            impl.criterion(on_1, on_1, input_ids.to("cuda:1"), completion_mask, 0.1)
        with pytest.raises(
            ValueError, match=r"^rejected_logps \(log-probabilities\) is on cuda:0, the other tensors on cuda:1"
        ):
            epsdpo.dpo_loss(
                torch.zeros(2).to("cuda:1"), torch.zeros(2).to("cuda:0"), *torch.zeros(2, 2).to("cuda:1"), 0.1
            )


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_ids_must_be_an_int64_or_int32_tensor_and_int32_gives_the_same(impl):
    logits, input_ids, completion_mask = _pairs()
    for ids, got in ((input_ids.tolist(), "list"), (None, "NoneType")):
        with pytest.raises(ValueError, match=rf"^input_ids must be a tensor of shape \(N, T\), got {got}"):
            impl.epsilon_dpo_loss(logits, logits, ids, completion_mask, 0.1, 0.1)
    with pytest.raises(ValueError, match=r"^completion_mask must be a tensor of shape \(N, T\), got list"):
        impl.sequence_logps(logits, input_ids, completion_mask.tolist())
    for dtype in (torch.uint8, torch.int16, torch.bool, torch.float32):
        with pytest.raises(
            ValueError, match=rf"^input_ids must hold token ids as torch.int64 or torch.int32, got {dtype}"
        ):
            impl.epsilon_dpo_loss(logits, logits, input_ids.to(dtype), completion_mask, 0.1, 0.1)
    policy_logits = logits.clone().requires_grad_()
    results = []
    for ids in (input_ids, input_ids.int()):
        out = impl.epsilon_dpo_loss(
            policy_logits,
            logits + 0.5 * torch.randn(logits.shape, generator=torch.Generator().manual_seed(0)),
            ids,
            completion_mask,
            0.1,
            0.5,
        )
        results.append((out.loss.detach(), out.s, torch.autograd.grad(out.loss, policy_logits)[0]))
    assert all(torch.equal(int64, int32) for int64, int32 in zip(*results, strict=True))


def test_log_probabilities_not_in_floating_point_are_refused_naming_which():
    logps = torch.zeros(2)
    with pytest.raises(
        ValueError,
        match=r"^ref_chosen_logps \(log-probabilities\) must be a floating-point tensor of shape \(B,\), "
        r"got torch.int64",
    ):
        epsdpo.dpo_loss(logps, logps, torch.zeros(2, dtype=torch.long), logps, 0.1)
    with pytest.raises(ValueError, match=r"^chosen_logps \(log-probabilities\) must be a floating-point tensor"):
        epsdpo.dpo_loss(torch.zeros(2, dtype=torch.int32), *torch.zeros(3, 2), 0.1)
    with pytest.raises(ValueError, match=r"^s must be an integer tensor of -1, 0 and \+1, got list"):
        epsdpo.BaselineBeta(0.1, 0.1).observe([1, 0])


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_a_fraction_is_a_number_like_any_other_for_beta_and_epsilon(impl):
    from fractions import Fraction

    logits, input_ids, completion_mask = _pairs()
    reference = logits + torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))
    as_floats = impl.epsilon_dpo_loss(logits, reference, input_ids, completion_mask, 0.1, 0.5)
    as_fractions = impl.epsilon_dpo_loss(logits, reference, input_ids, completion_mask, Fraction(1, 10), Fraction(1, 2))
    assert all(torch.equal(getattr(as_floats, f), getattr(as_fractions, f)) for f in ("loss", "pair_betas", "s"))
    assert torch.equal(
        epsdpo.betas_from_s(Fraction(1, 10), torch.tensor([1, 0, -1]), Fraction(1, 2)),
        epsdpo.betas_from_s(0.1, torch.tensor([1, 0, -1]), 0.5),
    )
    assert torch.equal(
        epsdpo.dpo_loss(*torch.ones(4, 2), Fraction(1, 10))[0], epsdpo.dpo_loss(*torch.ones(4, 2), 0.1)[0]
    )
    baselines = epsdpo.BaselineBeta(Fraction(1, 10), Fraction(1, 2)), epsdpo.BaselineBeta(0.1, 0.5)
    for baseline, (beta, epsilon) in zip(baselines, ((Fraction(1, 5), Fraction(1, 4)), (0.2, 0.25)), strict=True):
        baseline.load_state_dict({"beta": beta, "epsilon": epsilon, "counts": [1, 0, 0]})
    assert baselines[0].step() == baselines[1].step() and type(baselines[0].value) is float


def test_a_bool_s_is_refused_by_betas_from_s_as_by_observe():
    for call in (lambda s: epsdpo.betas_from_s(0.1, s, 0.1), epsdpo.BaselineBeta(0.1, 0.1).observe):
        with pytest.raises(ValueError, match=r"s must be an integer tensor of -1, 0 and \+1, got torch.bool"):
            call(torch.tensor([True, False]))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_one_position_a_row_is_a_pair_without_completion_refused_in_one_line(impl):
    logits, input_ids, completion_mask = torch.randn(2, 1, 5), torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 1)
    with pytest.raises(ValueError, match=r"^pair 0: its chosen sequence \(row 0 of input_ids\) has no completion"):
        impl.epsilon_dpo_loss(logits, logits, input_ids, completion_mask, 0.1, 0.01)


def test_hidden_state_measures_refuse_lambdas_and_soft_caps_they_cannot_use():
    hidden, weight = torch.randn(2, 4, 4), torch.randn(5, 4)
    input_ids, completion_mask = torch.randint(0, 5, (2, 4)), torch.tensor([[0, 1, 1, 1]] * 2)
    with pytest.raises(ValueError, match=r"^lambdas must be finite numbers, got 'ab'"):
        epsdpo_chunked.completion_measures_from_hidden(hidden, weight, hidden, weight, input_ids, completion_mask, "ab")
    for cap in (1e308, float("inf"), 0.0, True):  # 1e308 is infinite in float32: the loss was NaN
        with pytest.raises(ValueError, match=r"^logit_softcap must be None or a number in \(0, 1e30\]"):
            epsdpo_chunked.epsilon_dpo_loss_from_hidden(
                hidden, weight, hidden, weight, input_ids, completion_mask, 0.1, 0.01, cap
            )
    out = epsdpo_chunked.epsilon_dpo_loss_from_hidden(
        hidden, weight, hidden, weight, input_ids, completion_mask, 0.1, 0.01, 1e30
    )
    assert torch.isfinite(out.loss)
