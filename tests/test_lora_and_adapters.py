"""LoRA and adapters: the reference is the policy with its adapters off, an SFT adapter as --model is merged, the
saved adapter says what to load it onto, a LoRA run resumes bit for bit, flags that cannot work stop the run."""

import json
import math
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import epsdpo
import train
from tests.helpers import copy_of, read_metrics, run_expecting_error, tiny_model_folder, without_gold_reward
from training import adapters, batches, checkpoints, data, errors, loss, models
from training.arguments import TINY_DATASET, TINY_MODEL, parse_args

# ----------------------------------------------------------------------------------------------------
# LoRA: adapters on the policy, the reference the same model with them off


def lora_models(*flags, monkeypatch=None):
    """(models, batch, autocast) as train.py sets them up with LoRA adapters of rank 4 on the tiny model,
    and a batch of 8 of its held-out pairs. With monkeypatch, models.load_model's calls are counted."""
    args, _ = parse_args(["--lora-r", "4", *flags])
    tokenizer = data.load_tokenizer(adapters.tokenizer_name(args.model))
    lines = (TINY_DATASET / "test.jsonl").read_text().splitlines()[:8]
    pairs, _, _ = data.tokenize_rows(
        [(f"line {i}", json.loads(line)) for i, line in enumerate(lines)], tokenizer, 512, 256
    )
    autocast = models.precision(args.dtype, torch.device("cpu"))
    built = models.setup_models(args, torch.device("cpu"), 1, autocast is not None, tokenizer, pairs)
    return (
        built,
        batches.collate(pairs, tokenizer.pad_token_id, torch.device("cpu")),
        autocast or torch.autocast("cpu", enabled=False),
    )


def sft_adapter(folder, base=str(TINY_MODEL), base_name=None, seed=0):
    """A peft LoRA adapter of "supervised fine-tuning" on q_proj and v_proj of base, its B made non-zero, saved to
    folder without a tokenizer; adapter_config.json names base_name (default: base) as its base."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    adapted = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    )
    for name, weight in adapted.named_parameters():
        if ".lora_B." in name:
            torch.nn.init.normal_(weight.data, std=0.5)
    adapted.save_pretrained(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base_name or base
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lora_reference_is_the_policy_with_adapters_off_so_loss_is_log_2(dtype, monkeypatch):
    loaded = []
    real_load_model = models.load_model
    monkeypatch.setattr(models, "load_model", lambda *a: (loaded.append(a[0]), real_load_model(*a))[1])
    built, batch, autocast = lora_models("--dtype", dtype)
    assert (
        len(loaded) == 1 and isinstance(built.reference, models.AdaptersOff) and built.reference.policy is built.policy
    )
    trained = {name: weight for name, weight in built.policy.named_parameters() if weight.requires_grad}
    assert trained and all(".lora_A." in name or ".lora_B." in name for name in trained)  # only the adapters
    assert {weight.dtype for weight in trained.values()} == {torch.float32}  # the master weights
    frozen_linear = {
        module.weight.dtype
        for name, module in built.policy.named_modules()
        if isinstance(module, torch.nn.Linear) and name.endswith("base_layer")
    }
    assert frozen_linear == {torch.bfloat16 if dtype == "bfloat16" else torch.float32}  # the base, stored once
    assert built.policy.get_input_embeddings().weight.dtype == torch.float32
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    with autocast:
        assert torch.equal(built.policy(**inputs).logits, built.reference(**inputs).logits)  # B = 0: bit for bit
        out = loss.micro_batch_loss(
            built.trained, built.reference, batch, 0.1, 0.5, built.head
        )  # as train.py: from hidden states
    assert built.head is not None
    assert torch.equal(out.s, torch.zeros(8, dtype=torch.long))
    log_2 = torch.tensor(math.log(2))  # in float32, as the loss
    assert torch.equal(out.losses, log_2.expand(8)) and torch.equal(out.loss, log_2)
    assert all(weight.requires_grad for weight in trained.values())  # the reference gave the adapters back


def test_lora_gradient_checkpointing_gives_the_adapters_the_same_gradients():
    """The embeddings are frozen, so the checkpointed layers' inputs do not require grad: the reentrant
    kind of checkpointing would give the adapters no gradient at all."""
    gradients, layer_calls = {}, []
    for run, flags in (("plain", []), ("checkpointed", ["--gradient-checkpointing"])):
        torch.manual_seed(0)  # the same adapters' A
        built, batch, _ = lora_models(*flags)
        for name, weight in built.policy.named_parameters():
            if ".lora_B." in name:  # B ≠ 0: every adapter gets a gradient
                torch.nn.init.normal_(weight.data, std=0.1)
        mlp = built.policy.get_base_model().model.layers[0].mlp
        real_forward = mlp.forward
        mlp.forward = lambda *a, run=run, real_forward=real_forward: (
            layer_calls.append((run, torch.is_grad_enabled())),
            real_forward(*a),
        )[1]
        with models.training_mode(built.layers):
            loss.micro_batch_loss(built.trained, built.reference, batch, 0.1, 0.5).loss.backward()
        gradients[run] = {name: w.grad for name, w in built.policy.named_parameters() if w.requires_grad}
    assert layer_calls.count(("plain", True)) == 1 and layer_calls.count(("checkpointed", True)) == 2
    assert all(gradient is not None and gradient.abs().sum() > 0 for gradient in gradients["checkpointed"].values())
    assert all(torch.equal(gradients["checkpointed"][name], gradients["plain"][name]) for name in gradients["plain"])


def test_a_lora_run_saves_its_adapter_and_checkpoints_without_the_base(lora_run):
    from peft import PeftModel

    _, output_dir = lora_run
    rows = read_metrics(output_dir)
    assert rows[0]["loss"] == float(torch.tensor(math.log(2))) and rows[0]["rewards/margins"] == 0.0  # the start
    summary = json.loads((output_dir / "summary.json").read_text())
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= set(summary["saved"])
    assert not (output_dir / "model.safetensors").exists()
    checkpoint = {p.name for p in (output_dir / "checkpoint-2").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.pt"} <= checkpoint  # the adapter,
    assert "model.safetensors" not in checkpoint  # not the base
    config = json.loads((output_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(TINY_MODEL) and config["r"] == 4
    saved = load_file(output_dir / "adapter_model.safetensors")
    loaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"]), output_dir
    )
    weights = {name.replace(".default", ""): w for name, w in loaded.named_parameters() if ".lora_" in name}
    assert weights.keys() == saved.keys() and all(torch.equal(weights[name], saved[name]) for name in saved)
    assert all(saved[name].abs().sum() > 0 for name in saved)  # B moved from 0, A from its start


def test_a_lora_run_resumes_to_the_same_adapter_bit_for_bit(lora_run, tmp_path):
    _, whole = lora_run
    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    for name in (".train.lock", "adapter_model.safetensors"):  # the output is written again
        (resumed / name).unlink()
    shutil.rmtree(resumed / "checkpoint-4")
    train.main(["--resume", str(resumed)])  # from checkpoint-2: base + its adapter
    assert read_metrics(resumed) == read_metrics(whole)
    whole_adapter, resumed_adapter = (load_file(run / "adapter_model.safetensors") for run in (whole, resumed))
    assert all(torch.equal(whole_adapter[name], resumed_adapter[name]) for name in whole_adapter)


def test_a_lora_checkpoint_of_another_adapter_is_refused_naming_it(lora_run, tmp_path):
    """An adapter on other layers (q_proj alone) in the run's checkpoint; and, its adapter config put back, an
    optimizer state of other shapes, named after the adapter's file, not model.safetensors."""
    arguments, run = lora_run
    output_dir = copy_of(run, tmp_path)
    checkpoint = output_dir / "checkpoint-4"
    config = (checkpoint / "adapter_config.json").read_text()
    (checkpoint / "adapter_config.json").write_text(json.dumps({**json.loads(config), "target_modules": ["q_proj"]}))
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
    del state["files"]  # a checkpoint without the proofs of its files (with them, one edited is passed over)
    torch.save(state, checkpoint / "trainer_state.pt")
    error = run_expecting_error(["--resume", str(output_dir), "--max-steps", "5"])
    assert (
        error
        == f"error: {checkpoint}: its adapter ({checkpoint / 'adapter_config.json'}) is not the run's (--lora-r 4 "
        f"--lora-alpha 16 --lora-target all-linear, 14 layers): it is not a checkpoint of this run"
    )
    (checkpoint / "adapter_config.json").write_text(config)
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
    state["optimizer"]["param_groups"][0]["params"] = state["optimizer"]["param_groups"][0]["params"][:-2]
    torch.save(state, checkpoint / "trainer_state.pt")
    error = run_expecting_error(["--resume", str(output_dir), "--max-steps", "5"])
    adapter = checkpoint / "adapter_model.safetensors"
    assert error == f"error: {checkpoint}: its optimizer state is for another model than {adapter}"


def test_a_checkpoint_holding_an_adapter_it_did_not_write_is_passed_over(tmp_path, capsys):
    """An adapter of rank 8, or on q_proj and v_proj alone, put under a rank-4 all-linear checkpoint's
    adapter_config.json (a RuntimeError traceback, or 10 of 14 adapters silently zero) makes it a checkpoint to
    pass over with a note, as a torn one: the proofs of its files are in its trainer_state.pt, and each adapter's
    rank is checked against its config. So does a file that came after it was written (modeling_mine.py, which
    --trust-remote-code would run)."""
    from peft import LoraConfig, get_peft_model

    def adapter(rank, targets):
        model = AutoModelForCausalLM.from_pretrained(TINY_MODEL)
        return get_peft_model(model, LoraConfig(r=rank, lora_alpha=16, target_modules=targets, lora_dropout=0.0))

    policy, output_dir = adapter(4, "all-linear"), tmp_path / "out"
    output_dir.mkdir()
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad])
    for step in (1, 2):
        state = {
            "step": step,
            "baseline_beta": epsdpo.BaselineBeta(0.1, 0.01).state_dict(),
            "s_by_noise": [0] * 9,
            "args": {"lora_r": 4},
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        }
        checkpoints.write_checkpoint(output_dir, step, policy, optimizer, state, keep=2)
    written = (output_dir / "checkpoint-2/adapter_model.safetensors").read_bytes()
    for rank, targets, why in (
        (8, "all-linear", "has rank 8, its adapter_config.json r = 4"),
        (4, ["q_proj", "v_proj"], "is not the file this checkpoint wrote"),
    ):
        adapter(rank, targets).save_pretrained(tmp_path / f"r{rank}", save_embedding_layers=False)
        shutil.copy(tmp_path / f"r{rank}/adapter_model.safetensors", output_dir / "checkpoint-2")
        assert checkpoints.latest_checkpoint(output_dir)[0] == output_dir / "checkpoint-1"
        assert (
            f"note: {output_dir / 'checkpoint-2'} cannot be resumed from (ValueError: adapter_model.safetensors {why}"
            in capsys.readouterr().out
        )
    (output_dir / "checkpoint-2/adapter_model.safetensors").write_bytes(written)
    assert checkpoints.latest_checkpoint(output_dir)[0] == output_dir / "checkpoint-2"
    (output_dir / "checkpoint-2/modeling_mine.py").write_text("import os")  # what --trust-remote-code would run
    assert checkpoints.latest_checkpoint(output_dir)[0] == output_dir / "checkpoint-1"
    assert "(ValueError: modeling_mine.py came after the checkpoint was written)" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------
# SFT adapters as --model


def test_an_sft_adapter_as_model_is_merged_into_the_reference(tmp_path):
    """And the LoRA adapter trained on it says in adapter_config.json and README.md what it must be loaded onto:
    AutoPeftModelForCausalLM stops on it rather than loading it onto the base alone, and the README's code gives
    the trained model."""
    from peft import AutoPeftModelForCausalLM, PeftModel

    sft = sft_adapter(tmp_path / "sft-adapter")
    assert adapters.tokenizer_name(str(sft)) == str(TINY_MODEL)  # no tokenizer: the base's
    built, batch, _ = lora_models("--model", str(sft))
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    sft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY_MODEL), sft).merge_and_unload()
    base_logits = AutoModelForCausalLM.from_pretrained(TINY_MODEL)(**inputs).logits
    reference_logits = built.reference(**inputs).logits
    assert torch.equal(reference_logits, sft_model(**inputs).logits) and not torch.allclose(
        reference_logits, base_logits
    )
    with torch.no_grad():
        assert torch.equal(built.policy(**inputs).logits, reference_logits)  # a fresh adapter on top: B = 0
        for name, weight in built.policy.named_parameters():
            if ".lora_B." in name:
                weight.add_(0.1)  # trained, say
        trained_logits = built.policy(**inputs).logits
    checkpoints.save_model(built.policy, tmp_path / "out")
    base = json.loads((tmp_path / "out/adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == f"merge {sft.resolve()} into {TINY_MODEL}, then load this adapter onto that model (README.md)"
    with pytest.raises(Exception, match="merge .* into .*README.md"):
        AutoPeftModelForCausalLM.from_pretrained(tmp_path / "out")
    with pytest.raises(errors.ReportedError, match=r"this adapter was trained on another adapter merged into its base"):
        adapters.adapter_base(str(tmp_path / "out"))  # as --model of another run: one line
    readme = (tmp_path / "out/README.md").read_text()
    assert readme.startswith("---\n") and "# Load this adapter onto the supervised fine-tuned model" in readme
    code = readme.split("```python\n")[1].split("```")[0].replace("THIS_FOLDER", str(tmp_path / "out"))
    namespace = {}
    exec(code, namespace)  # the README's own lines
    with torch.no_grad():
        torch.testing.assert_close(namespace["model"](**inputs).logits, trained_logits, rtol=1e-5, atol=1e-5)
    AutoTokenizer.from_pretrained(TINY_MODEL).save_pretrained(sft)
    assert adapters.tokenizer_name(str(sft)) == str(sft)  # an adapter with a tokenizer gives its own
    full, _, _ = lora_models("--model", str(sft), "--lora-r", "0")  # full fine-tuning of the merged model
    assert all(weight.requires_grad for weight in full.policy.parameters())


def test_an_sft_adapter_with_a_relative_base_keeps_that_base_on_resume(tmp_path, monkeypatch, small_data):
    """--model an SFT adapter without --lora-r: the merged model trains, every weight of it. adapter_config.json names
    its base relatively (base): from the working directory it is there/base, from the adapter's folder
    there/sft/base, another model. Resolved once, from where the run started, and kept (--model-base)."""
    there, elsewhere = tmp_path / "there", tmp_path / "elsewhere"
    (there / "sft").mkdir(parents=True)
    elsewhere.mkdir()
    shutil.copytree(TINY_MODEL, there / "base")
    tiny_model_folder(there / "sft/base", vocab_size=60, max_position_embeddings=64)  # the other "base"
    sft_adapter(there / "sft", base=str(there / "base"), base_name="base")
    monkeypatch.chdir(there)
    assert adapters.adapter_base(str(there / "sft")) == str(there / "base")
    output_dir = tmp_path / "out"
    train.main(
        [
            "--output-dir",
            str(output_dir),
            "--model",
            str(there / "sft"),
            *without_gold_reward(small_data),
            "--max-steps",
            "1",
            "--save-every",
            "1",
            "--eval-every",
            "1000",
        ]
    )
    state = torch.load(output_dir / "checkpoint-1/trainer_state.pt", weights_only=True)
    assert state["args"]["model_base"] == str(there / "base")
    merged = AutoModelForCausalLM.from_pretrained(output_dir)  # a full model, trained from the SFT model
    assert (
        sum(int((merged.state_dict()[n] != w).sum()) for n, w in load_file(there / "base/model.safetensors").items())
        > 80_000
    )
    monkeypatch.chdir(elsewhere)
    assert adapters.adapter_base(str(there / "sft")) == str(there / "sft/base")  # what a fresh resolution would take
    train.main(["--resume", str(output_dir), "--max-steps", "2"])  # the fingerprints match: the same base
    assert json.loads((output_dir / "summary.json").read_text())["args"]["model_base"] == str(there / "base")


def test_a_card_names_no_bare_base_and_an_adapter_on_an_adapter_is_refused(tmp_path):
    """The model card of a LoRA run on an SFT adapter: peft's front matter named the bare base (base_model, a
    base_model:adapter tag), another model than the one trained on; the card says to merge instead. An adapter
    whose base is an adapter itself gave a tokenizer error: one line now."""
    from peft import LoraConfig, get_peft_model

    policy = get_peft_model(
        AutoModelForCausalLM.from_pretrained(TINY_MODEL), LoraConfig(r=2, target_modules=["q_proj"])
    )
    policy.peft_config["default"].base_model_name_or_path = adapters.SFT_BASE.format(adapter="/sft", base="/base")
    checkpoints.save_model(policy, tmp_path / "adapter")
    card = (tmp_path / "adapter/README.md").read_text()
    front = card.split("\n---\n")[0]
    assert "base_model" not in front and "library_name: peft" in front
    assert "merge_and_unload" in card
    for folder, base in (("first", str(TINY_MODEL)), ("second", str(tmp_path / "first"))):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base}))
    with pytest.raises(errors.ReportedError, match=f"its base {tmp_path / 'first'} is an adapter itself; merge"):
        adapters.adapter_base(str(tmp_path / "second"))


# ----------------------------------------------------------------------------------------------------
# Flags


@pytest.mark.parametrize(
    "case", ["lora-r 10**20", "lora-r past a layer", "a misspelled lora-target", "an offline Hub base"]
)
def test_lora_flags_and_adapters_that_cannot_work_stop_with_one_line(tmp_path, case, small_data):
    arguments, expected = {
        "lora-r 10**20": (
            ["--lora-r", str(10**20)],
            f"--lora-r {10**20}: more than the rank of a layer it adapts "
            f"(model.layers.0.mlp.down_proj: 64 × 128); give --lora-r 64 or less",
        ),
        "lora-r past a layer": (
            ["--lora-r", "65", "--lora-target", "q_proj"],
            "--lora-r 65: more than the rank of a layer",
        ),
        "a misspelled lora-target": (
            ["--lora-r", "4", "--lora-target", "q_proj", "v_prj"],
            "--lora-target v_prj: the model "
            "has no layer of that name (its linear layers: down_proj, gate_proj, k_proj, lm_head, "
            "o_proj, q_proj, up_proj, v_proj)",
        ),
        "an offline Hub base": (
            lambda: ["--model", str(sft_adapter(tmp_path / "sft", base_name="nobody/not-downloaded"))],
            f"--model {tmp_path / 'sft'}: its base nobody/not-downloaded: OSError",
        ),
    }[case]
    arguments = arguments() if callable(arguments) else arguments
    error = run_expecting_error(["--output-dir", str(tmp_path / "out"), "--max-steps", "1", *small_data, *arguments])
    assert error.startswith(f"error: {expected}") and "\n" not in error, error


def test_lora_flags_parse_as_meant_and_an_adapted_head_uses_the_logits(two_checkpoints, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--lora-r", "4", "--lora-target", "all-linear", "q_proj"])
    assert "--lora-target all-linear stands alone" in capsys.readouterr().err
    args, given = parse_args(["--resume", str(two_checkpoints), "--lora-alpha", "32"])  # the run's --lora-r decides
    with pytest.raises(errors.ReportedError, match="--lora-alpha 32.0 differs from the run's 16.0"):
        checkpoints.resumed_args(args, given, lambda argv: parse_args(argv, report=True)[0])
    built, _, _ = lora_models("--lora-target", "q_proj", "lm_head")
    assert (built.head, built.loss_note) == (
        None,
        "LoRA adapts its output layer (--lora-target), so its logits are not one matrix product",
    )
