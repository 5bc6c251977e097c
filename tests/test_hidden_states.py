"""The loss from the last hidden states gives what the loss from the logits gives, without its (2B, T, V) tensors:
epsdpo_chunked's functions against their logits, in chunks and compiled; then train.py's models of several
families, whose output layer is a plain linear map (or falls back to the logits path)."""

import copy
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import epsdpo_chunked
import train
from test_epsdpo import slow_completion_kls, slow_sequence_logps
from tests.helpers import good_rows, read_metrics, tiny_model_folder, write_jsonl
from training import adapters, batches, data, evaluation, loss, models
from training.arguments import TINY_GOLD_REWARD, TINY_MODEL

# ----------------------------------------------------------------------------------------------------
# epsdpo_chunked.py: the loss from hidden states against the loss from their logits


def softcapped(logits, cap):
    """The logits as a soft-capped model (Gemma-2) gives them: cap · tanh(logits / cap)."""
    return logits if cap is None else torch.tanh(logits / cap) * cap


def hidden_state_batch(vocab=300, width=16, length=40, seed=0):
    """A tied model in miniature: hidden states computed from the output weight itself (as an input embedding
    shares it), a reference a little away from it, and rows of different completion lengths (one with a gap)."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, width, generator=generator).requires_grad_()
    mixing = torch.randn(width, width, generator=generator) / width**0.5
    input_ids = torch.randint(0, vocab, (6, length), generator=generator)
    ref_weight = weight.detach() + 0.1 * torch.randn(vocab, width, generator=generator)
    completion_mask = torch.zeros(6, length, dtype=torch.long)
    for row, (first, stop) in enumerate(
        [(5, length), (3, 29), (length - 2, length), (2, length), (9, 20), (1, length)]
    ):
        completion_mask[row, first:stop] = 1
    completion_mask[4, 12:14] = 0
    ref_hidden = torch.tanh(ref_weight[input_ids] @ mixing)
    return weight, mixing, ref_weight, ref_hidden, input_ids, completion_mask


@pytest.mark.parametrize("cap", [None, 3.0])
@pytest.mark.parametrize("precision", ["float32", "bf16 autocast", "bf16 tensors"])
def test_the_loss_from_hidden_states_equals_the_loss_from_their_logits(precision, cap):
    weight, mixing, ref_weight, ref_hidden, input_ids, completion_mask = hidden_state_batch()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16 autocast")
    if precision == "bf16 tensors":
        weight, ref_weight, ref_hidden = (
            t.detach().bfloat16().requires_grad_(t.requires_grad) for t in (weight, ref_weight, ref_hidden)
        )

    def loss_and_gradient(from_hidden):
        with autocast:
            hidden = torch.tanh(weight[input_ids] @ mixing.to(weight.dtype))  # the tied weight, used twice
            if from_hidden:
                out = epsdpo_chunked.epsilon_dpo_loss_from_hidden(
                    hidden, weight, ref_hidden, ref_weight, input_ids, completion_mask, 0.5, 0.3, cap
                )
            else:
                out = epsdpo_chunked.epsilon_dpo_loss(
                    softcapped(hidden @ weight.T, cap),
                    softcapped(ref_hidden @ ref_weight.T, cap),
                    input_ids,
                    completion_mask,
                    0.5,
                    0.3,
                )
        (gradient,) = torch.autograd.grad(out.loss, weight)
        return out, gradient

    (out, gradient), (expected, expected_gradient) = loss_and_gradient(True), loss_and_gradient(False)
    assert out.s.abs().sum() > 0  # the criterion has something to do
    for name in (
        "s",
        "pair_betas",
        "losses",
        "chosen_logps",
        "rejected_logps",
        "ref_chosen_logps",
        "ref_rejected_logps",
        "chosen_rewards",
        "rejected_rewards",
        "loss",
    ):
        torch.testing.assert_close(getattr(out, name), getattr(expected, name), rtol=1e-5, atol=1e-5)
    assert gradient.dtype == weight.dtype
    # float32: the same up to float32 rounding; bf16: the gradients of the logits are rounded to bf16 in both,
    # at different places, before the matrix products.
    tolerance = 1e-5 if precision == "float32" else 2e-2
    torch.testing.assert_close(
        gradient.float(), expected_gradient.float(), rtol=0, atol=tolerance * expected_gradient.abs().max().item()
    )


def test_hidden_state_tiles_give_what_one_tile_gives(monkeypatch):
    weight, mixing, ref_weight, ref_hidden, input_ids, completion_mask = hidden_state_batch(vocab=50, length=12)
    hidden = (weight.detach()[input_ids] @ mixing).requires_grad_()

    def everything():
        out = epsdpo_chunked.epsilon_dpo_loss_from_hidden(
            hidden, weight, ref_hidden, ref_weight, input_ids, completion_mask, 0.5, 0.3, 5.0
        )
        return out.losses, out.chosen_logps, out.ref_rejected_logps, *torch.autograd.grad(out.loss, (hidden, weight))

    def tiles():  # positions, positions a chunk, chunks, words a slice, slices
        positions = epsdpo_chunked._hidden_positions(input_ids, completion_mask, 50, 16, torch.device("cpu"))
        chunks, slices = len(positions.rows) // positions.chunk_size, len(positions.local_targets)
        return positions.num_positions, positions.chunk_size, chunks, positions.slice_size, slices

    assert tiles() == (42, 42, 1, 50, 1)  # 42 positions × 50 words: one tile of 32 MiB
    whole = everything()
    monkeypatch.setattr(epsdpo_chunked, "CHUNK_FLOAT32_BYTES", 4 * 50 * 4)  # buffers of 800 bytes: 11 positions
    assert tiles() == (42, 11, 4, 13, 4)  # of 16 floats a chunk (2 padded), 13 words of 16 a slice (the last 11)
    for tiled, expected in zip(everything(), whole, strict=True):
        torch.testing.assert_close(tiled, expected)
    monkeypatch.setattr(epsdpo_chunked, "MAX_CHUNKS", 5)  # buffers of 1/5 of the scored logits, 1,680 bytes:
    assert tiles() == (42, 21, 2, 17, 3)  # 2 chunks and 3 slices
    for tiled, expected in zip(everything(), whole, strict=True):
        torch.testing.assert_close(tiled, expected)


def test_compiled_chunks_are_one_graph_each_and_give_the_eager_results(monkeypatch):
    """torch.compile of the chunk bodies, as on a GPU, captured whole (fullgraph) and run with the eager kernels
    ("aot_eager": no C++ compiler needed): the values and gradients of the eager bodies, and one graph for the
    forward body and one for the backward body, whatever the number of positions of the batch (padded chunks,
    dynamic shapes)."""
    weight, mixing, ref_weight, ref_hidden, input_ids, completion_mask = hidden_state_batch(vocab=50, length=12)
    hidden = (weight.detach()[input_ids] @ mixing).requires_grad_()

    def everything(rows):
        out = epsdpo_chunked.epsilon_dpo_loss_from_hidden(
            hidden[rows], weight, ref_hidden[rows], ref_weight, input_ids[rows], completion_mask[rows], 0.5, 0.3, 5.0
        )
        return (
            out.losses,
            out.s,
            out.chosen_logps,
            out.ref_rejected_logps,
            *torch.autograd.grad(out.loss, (hidden, weight)),
        )

    graphs = []

    def backend(graph, example_inputs):
        graphs.append(graph)
        return torch._dynamo.lookup_backend("aot_eager")(graph, example_inputs)

    monkeypatch.setattr(epsdpo_chunked, "CHUNK_FLOAT32_BYTES", 4 * 50 * 4)  # chunks of 4 positions, the last padded
    batches = [[0, 1, 2, 3, 4, 5], [0, 2, 3, 5], [1, 4]]  # 42, 28 and 12 positions
    eager = [everything(rows) for rows in batches]
    monkeypatch.setattr(epsdpo_chunked, "COMPILE_BACKENDS", {"cpu": backend})
    monkeypatch.setattr(epsdpo_chunked, "_compiled", {})
    torch._dynamo.reset()
    for rows, expected in zip(batches, eager, strict=True):
        for compiled, eagerly in zip(everything(rows), expected, strict=True):
            torch.testing.assert_close(compiled, eagerly, rtol=0, atol=0)
    assert len(graphs) == 2


def test_tiles_that_fail_to_compile_run_eagerly_and_say_so_once(monkeypatch):
    """A backend that fails (as inductor without Triton does): the loss gives the eager values and gradients, and one
    warning for the whole process, however many calls and bodies."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(40, 8, generator=generator).requires_grad_()
    ref_weight = weight.detach() + 0.1 * torch.randn(40, 8, generator=generator)
    input_ids = torch.randint(0, 40, (4, 10), generator=generator)
    completion_mask = torch.zeros(4, 10, dtype=torch.long)
    completion_mask[:, 4:] = 1
    hidden, ref_hidden = torch.randn(2, 4, 10, 8, generator=generator)
    hidden.requires_grad_()

    def loss_and_gradients():
        out = epsdpo_chunked.epsilon_dpo_loss_from_hidden(
            hidden, weight, ref_hidden, ref_weight, input_ids, completion_mask, 0.5, 0.3
        )
        return out.losses, out.s, *torch.autograd.grad(out.loss, (hidden, weight))

    eager = loss_and_gradients()
    attempts = []

    def failing_backend(graph, example_inputs):
        attempts.append(graph)
        raise RuntimeError("Cannot find a working triton installation (forced by the test)")

    monkeypatch.setattr(epsdpo_chunked, "COMPILE_BACKENDS", {"cpu": failing_backend})
    monkeypatch.setattr(epsdpo_chunked, "_compiled", {})
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            for value, expected in zip(loss_and_gradients(), eager, strict=True):
                torch.testing.assert_close(value, expected, rtol=0, atol=0)
    said = [str(w.message) for w in caught if "epsdpo_chunked" in str(w.message)]
    assert len(said) == 1 and "run eagerly" in said[0] and "Cannot find a working triton" in said[0], said
    assert len(attempts) == 1  # after the first failure nothing is compiled again


def test_what_evaluation_reads_from_hidden_states_is_what_the_logits_give():
    """completion_measures_from_hidden: log π̂_λ(y|x) at any λ (1: the policy, 0: the reference) and the summed
    KL(π_θ‖π_ref) along each completion, equal to a float64 loop over the positions of the full logits; in chunks
    of a few positions too; and 0 for a row without a completion token."""
    weight, mixing, ref_weight, ref_hidden, input_ids, completion_mask = hidden_state_batch(vocab=50, length=12)
    completion_mask[2] = 0
    hidden = weight.detach()[input_ids] @ mixing
    lambdas = (0.0, 1.0, 0.7, 1.3)
    logps, kls = epsdpo_chunked.completion_measures_from_hidden(
        hidden, weight, ref_hidden, ref_weight, input_ids, completion_mask, lambdas, logit_softcap=5.0
    )
    policy_logits, ref_logits = (
        softcapped(h.double() @ w.detach().double().T, 5.0) for h, w in ((hidden, weight), (ref_hidden, ref_weight))
    )
    for lam, row in zip(lambdas, logps, strict=True):
        torch.testing.assert_close(
            row.double(),
            slow_sequence_logps(torch.lerp(ref_logits, policy_logits, lam), input_ids, completion_mask),
            rtol=1e-5,
            atol=1e-5,
        )
    torch.testing.assert_close(
        kls.double(), slow_completion_kls(policy_logits, ref_logits, completion_mask), rtol=1e-5, atol=1e-6
    )
    assert kls[2] == 0 and (logps[:, 2] == 0).all() and (kls[[0, 1, 3, 4, 5]] > 0).all()


@pytest.mark.parametrize(
    "change, message",
    [
        (
            dict(policy_hidden=torch.zeros(4, 6)),
            "policy_hidden must be a floating-point tensor of shape (2B, T, H), got torch.float32 (4, 6)",
        ),
        (
            dict(policy_weight=torch.zeros(5, 3)),
            "policy_weight (5, 3) must have the shape (V, H) with V ≥ 1 and H = 4 as in policy_hidden",
        ),
        (
            dict(ref_weight=torch.zeros(7, 4)),
            "ref_weight (7, 4) and policy_weight (5, 4) must have the same vocabulary",
        ),
        (dict(ref_hidden=torch.zeros(4, 5, 4)), "input_ids (4, 6) and completion_mask (4, 6) must both have the shape"),
        (dict(logit_softcap=0.0), "logit_softcap must be None or a number in (0, 1e30], got 0.0"),
        (dict(logit_softcap=True), "logit_softcap must be None or a number in (0, 1e30], got True"),
        (dict(epsilon=1.0), "epsilon must be a number in [0, 1)"),
    ],
)
def test_bad_input_to_the_loss_from_hidden_states_is_rejected_naming_it(change, message):
    arguments = dict(
        policy_hidden=torch.zeros(4, 6, 4),
        policy_weight=torch.zeros(5, 4),
        ref_hidden=torch.zeros(4, 6, 4),
        ref_weight=torch.zeros(5, 4),
        input_ids=torch.zeros(4, 6, dtype=torch.long),
        completion_mask=torch.tensor([[0, 0, 1, 1, 1, 1]] * 4),
        beta=0.1,
        epsilon=0.1,
    )
    with pytest.raises(ValueError) as error:
        epsdpo_chunked.epsilon_dpo_loss_from_hidden(**{**arguments, **change})
    assert message in str(error.value)


# ----------------------------------------------------------------------------------------------------
# On the output layers of transformers models


FAMILIES = [
    ("llama", {"tie_word_embeddings": False}),
    ("qwen2", {"tie_word_embeddings": True}),
    ("gemma2", {"final_logit_softcapping": 0.02, "head_dim": 8}),
]  # Gemma-2's soft-cap made small enough to bite


@pytest.mark.parametrize("kind, config", FAMILIES)
def test_a_step_from_hidden_states_gives_the_loss_and_gradients_of_logits(kind, config, monkeypatch):
    """loss.micro_batch_loss on tiny models of three families: the loss, every output and every gradient as from
    the logits, to float32 rounding; and the KL along samples from hidden states as from the logits."""
    from transformers import AutoConfig

    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(
            kind,
            vocab_size=60,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            **config,
        )
    ).eval()
    reference = copy.deepcopy(policy).requires_grad_(False)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    head, _ = models.linear_head(policy, torch.tensor([[1, 5, 7]]))
    assert head == models.LinearHead(60, config.get("final_logit_softcapping"))
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    batch = batches.collate(
        [data.tokenize_pair(row, tokenizer, 64, 32) for row in good_rows(4)],
        tokenizer.pad_token_id,
        torch.device("cpu"),
    )

    monkeypatch.setattr(loss, "PLAIN_LOSS_BYTES", 0)  # the paths at scale, on a tiny model

    def step(head):
        out = loss.micro_batch_loss(policy, reference, batch, 0.5, 0.3, head)
        return out, torch.autograd.grad(out.loss, list(policy.parameters()))

    (out, gradients), (expected, expected_gradients) = step(head), step(None)
    assert out.s.abs().sum() > 0
    for name in ("loss", "losses", "s", "chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps"):
        torch.testing.assert_close(getattr(out, name), getattr(expected, name), rtol=1e-5, atol=1e-5)
    for gradient, expected_gradient in zip(gradients, expected_gradients, strict=True):
        torch.testing.assert_close(gradient, expected_gradient, rtol=1e-4, atol=1e-6)
    # What evaluation reads (log π̂_λ and the KL along each completion): from hidden states in chunks as from the
    # logits, these two rows at a time.
    (logps, kls), (expected_logps, expected_kls) = (
        evaluation.completion_measures(policy, reference, batch, h, (0.0, 1.0, 1.3), max_rows=2) for h in (head, None)
    )
    assert (expected_kls > 0).all()
    torch.testing.assert_close(kls, expected_kls)
    torch.testing.assert_close(logps, expected_logps)
    torch.testing.assert_close(logps[1], torch.cat([expected.chosen_logps, expected.rejected_logps]))


def test_the_loss_from_hidden_states_trains_as_the_loss_from_logits(tmp_path, monkeypatch, capsys):
    """Two steps of train.py on a tiny soft-capped Gemma-2: the same metrics, the KL along samples included, to
    float32 rounding; and the logits path says once that it is used."""
    kind, config = FAMILIES[2]
    model = tiny_model_folder(tmp_path / "model", kind=kind, **config)
    # tiny_data's tokenizer (transformers would pick Gemma's tokenizer class for a Gemma-2 folder).
    monkeypatch.setattr(
        train,
        "load_tokenizer",
        lambda name, trust, *given, _real=train.load_tokenizer: _real(str(TINY_MODEL), trust),
    )
    dataset = write_jsonl(tmp_path / "pairs.jsonl", good_rows(10))
    arguments = [
        "--model",
        model,
        "--dataset",
        str(dataset),
        "--eval-fraction",
        "0.2",
        "--batch-size",
        "4",
        "--max-steps",
        "2",
        "--epsilon",
        "0.3",
        "--lr",
        "1e-2",
        "--gold-reward",
        str(TINY_GOLD_REWARD),
        "--max-new-tokens",
        "4",
    ]
    train.main(["--output-dir", str(tmp_path / "hidden"), *arguments])
    assert "the loss from full" not in capsys.readouterr().out
    monkeypatch.setattr(models, "FROM_HIDDEN_STATES", False)
    train.main(["--output-dir", str(tmp_path / "logits"), *arguments])
    assert (
        capsys.readouterr().out.count("the loss from full (2B, T, V) logits: models.FROM_HIDDEN_STATES is False") == 1
    )
    hidden, logits = read_metrics(tmp_path / "hidden"), read_metrics(tmp_path / "logits")
    assert [(r["split"], r["step"]) for r in hidden] == [(r["split"], r["step"]) for r in logits] and len(hidden) == 4
    assert any(r["rewards/margins"] != 0 for r in hidden) and any(r["kl"] > 0 for r in hidden if r["split"] == "eval")
    for hidden_row, logits_row in zip(hidden, logits, strict=True):
        assert hidden_row.keys() == logits_row.keys()
        for name, value in logits_row.items():
            assert hidden_row[name] == (
                value if isinstance(value, str) else pytest.approx(value, rel=1e-4, abs=1e-6)
            ), name


def test_only_the_last_hidden_state_is_kept_for_every_architecture():
    """models.last_hidden_states calls the model as usual, with logits_to_keep=1 and without output_hidden_states:
    the model returns no hidden state per layer (it would keep L + 1 of them through the pass); the final normed
    hidden state comes from a hook on the decoder, and softcap(it @ weight.T) is the model's logits. Tiny Llama
    (tied and untied), Qwen2, Gemma-2 soft-capped, Mixtral, GPT-2, and LoRA's reference, AdaptersOff."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig

    shape = dict(
        vocab_size=60,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    configs = {
        "llama tied": ("llama", dict(shape, tie_word_embeddings=True)),
        "llama": ("llama", dict(shape, tie_word_embeddings=False)),
        "qwen2": ("qwen2", shape),
        "gemma2": ("gemma2", dict(shape, head_dim=8, final_logit_softcapping=0.02)),
        "mixtral": ("mixtral", dict(shape, num_local_experts=4, num_experts_per_tok=2)),
        "gpt2": ("gpt2", dict(vocab_size=60, n_embd=16, n_layer=2, n_head=2, bos_token_id=1, eos_token_id=2)),
    }
    input_ids = torch.randint(3, 60, (2, 7), generator=torch.Generator().manual_seed(0))
    for name, (kind, config) in [*configs.items(), ("lora reference", configs["llama"])]:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **config)).eval()
        called = model
        if name == "lora reference":
            with adapters.quiet_peft():
                called = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
            for weight_name, weight in called.named_parameters():
                if ".lora_B." in weight_name:
                    torch.nn.init.normal_(weight.data)  # the policy differs from its reference
            called = models.AdaptersOff(called)
        calls = []
        hook = model.register_forward_hook(
            lambda module, args, kwargs, output, calls=calls: calls.append((kwargs, output)), with_kwargs=True
        )
        with torch.no_grad():
            hidden, weight = models.last_hidden_states(called, dict(input_ids=input_ids))
        hook.remove()
        ((kwargs, output),) = calls
        assert not kwargs.get("output_hidden_states") and output.hidden_states is None, name
        assert output.logits.shape == (2, 1, 60) and hidden.shape == (2, 7, 16), name
        logits = hidden @ weight.T
        cap = config.get("final_logit_softcapping")
        with torch.no_grad():
            expected = (called(input_ids=input_ids) if name == "lora reference" else model(input_ids)).logits
        torch.testing.assert_close(
            logits if cap is None else torch.tanh(logits / cap) * cap, expected, rtol=1e-5, atol=1e-6
        )


def test_heads_that_are_not_a_plain_linear_map_use_the_logits_path():
    from transformers import CohereConfig, CohereForCausalLM, LlamaConfig, LlamaForCausalLM

    sizes = dict(
        vocab_size=60,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    input_ids = torch.tensor([[1, 5, 7, 9]])
    cohere = CohereForCausalLM(CohereConfig(logit_scale=0.5, **sizes)).eval()  # scaled logits
    assert models.linear_head(cohere, input_ids) == (
        None,
        "its logits are not softcap(last hidden state @ output weight.T)",
    )
    with_bias = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, **sizes)).eval()
    with_bias.lm_head = torch.nn.Linear(16, 60)
    assert models.linear_head(with_bias, input_ids) == (None, "its output layer is a Linear with a bias")
