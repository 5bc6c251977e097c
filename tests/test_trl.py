"""EpsilonDPOTrainer (epsdpo_trl.py) against TRL's DPOTrainer at ε = 0, against epsdpo.py on full logits at ε > 0,
β across steps, evaluation and a resume, and every refusal. The runs are 3 optimizer steps of the 60-word tiny_data
model on a dozen pairs; the 2-process run, train.py and the docs' example are in test_trl_processes.py.

These tests run in one test process (the xdist group "trl"), which imports TRL once (about 6 s of CPU); each test
imports what it needs of it, so that the other test process, which collects this file without running it, never does.
"""

import importlib.util
import json
import os
import pathlib
import shutil

import pytest
import torch

import epsdpo

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tiny_data is local: nothing may reach for the Hub
pytestmark = pytest.mark.xdist_group("trl")

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_MODEL = str(ROOT / "tiny_data" / "model")
TRL_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def tiny_pairs(start, count):
    """count pairs of tiny_data's train split from row start, as a Dataset of prompt, chosen, rejected strings."""
    lines = (ROOT / "tiny_data" / "data" / "train.jsonl").read_text().splitlines()[start : start + count]
    rows = [json.loads(line) for line in lines]
    from datasets import Dataset

    return Dataset.from_list([{key: row[key] for key in ("prompt", "chosen", "rejected")} for row in rows])


def run_args(output_dir, config=None, **overrides):
    """The arguments of the runs here (an EpsilonDPOConfig, or config): 3 steps of 2 pairs × 2 micro-batches, float32
    on the CPU, a log per step."""
    from epsdpo_trl import EpsilonDPOConfig

    options = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "per_device_eval_batch_size": 4,
        "max_steps": 3,
        "learning_rate": 1e-3,
        "beta": 0.1,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "bf16": False,
        "gradient_checkpointing": False,
        "disable_tqdm": True,
        "use_cpu": True,
        "seed": 0,
    }
    return (config or EpsilonDPOConfig)(**{**options, **overrides})


def train_logs(trainer):
    """The rows the Trainer logged at each optimizer step, in order."""
    return [row for row in trainer.state.log_history if "loss" in row and "train_runtime" not in row]


def max_weight_difference(model, other):
    other_weights = other.state_dict()
    return max((weight - other_weights[name]).abs().max().item() for name, weight in model.state_dict().items())


def beta_after(beta, row, epsilon):
    """The rule (METHOD §5): β ← β · mean 1/(1 + ε s), from a step's logged fractions of s = +1 and s = −1."""
    weaker, stronger = row["s/weaker"], row["s/stronger"]
    return beta * (weaker / (1 + epsilon) + (1 - weaker - stronger) + stronger / (1 - epsilon))


# ----------------------------------------------------------------------------------------------------
# Refusals


def test_an_untested_trl_version_is_refused_at_import_in_one_line(monkeypatch):
    import trl

    monkeypatch.setattr(trl, "__version__", "1.17.0")
    spec = importlib.util.spec_from_file_location("epsdpo_trl_again", ROOT / "epsdpo_trl.py")
    with pytest.raises(ImportError) as refused:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    message = str(refused.value)
    assert "\n" not in message and "trl 1.17.0" in message and "trl>=1.16,<1.17" in message


REFUSED_SETTINGS = {
    "precompute_ref_log_probs": {"precompute_ref_log_probs": True},
    "loss_type": {"loss_type": ["ipo"]},
    "loss_weights": {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]},
    "use_liger_kernel": {"use_liger_kernel": True},
    "f_divergence_type": {"f_divergence_type": "js_divergence"},
    "ld_alpha": {"ld_alpha": 0.5},
    "label_smoothing": {"label_smoothing": 0.1},
    "padding_free": {"padding_free": True},
    "sync_ref_model": {"sync_ref_model": True},
    "use_weighting": {"use_weighting": True},
    "disable_dropout": {"disable_dropout": False},
}


@pytest.mark.parametrize("setting", REFUSED_SETTINGS)
def test_each_setting_epsilon_dpo_cannot_combine_with_is_refused_in_one_line(setting, tmp_path):
    from epsdpo_trl import EpsilonDPOTrainer

    args = run_args(tmp_path, **REFUSED_SETTINGS[setting])
    with pytest.raises(ValueError) as refused:
        EpsilonDPOTrainer(TINY_MODEL, args=args, train_dataset=tiny_pairs(0, 2))
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"EpsilonDPOTrainer: {setting.split('_weights')[0]}")


def test_a_dpoconfig_and_compute_metrics_are_refused_in_one_line(tmp_path):
    from trl import DPOConfig

    from epsdpo_trl import EpsilonDPOTrainer

    refusals = []
    for args, options in ((run_args(tmp_path, DPOConfig), {}), (run_args(tmp_path), {"compute_metrics": len})):
        with pytest.raises(ValueError) as refused:
            EpsilonDPOTrainer(TINY_MODEL, args=args, train_dataset=tiny_pairs(0, 2), **options)
        refusals.append(str(refused.value))
    assert "EpsilonDPOConfig" in refusals[0] and "compute_metrics" in refusals[1]
    assert not any("\n" in message for message in refusals)


def test_an_moe_model_with_its_auxiliary_loss_is_refused_in_one_line(tmp_path):
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    from epsdpo_trl import EpsilonDPOTrainer

    config = MixtralConfig(
        vocab_size=60,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_local_experts=2,
    )
    assert config.router_aux_loss_coef > 0  # Mixtral's own: DPOTrainer would add the load-balancing loss
    models = [MixtralForCausalLM(config) for _ in range(2)]
    with pytest.raises(ValueError, match="router_aux_loss_coef") as refused:
        EpsilonDPOTrainer(
            models[0],
            ref_model=models[1],
            args=run_args(tmp_path),
            train_dataset=tiny_pairs(0, 2),
            processing_class=AutoTokenizer.from_pretrained(TINY_MODEL),
        )
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(
    "bad", [{"epsilon": 1.0}, {"epsilon": -0.1}, {"beta": 0.0}, {"min_beta": 0.2}, {"max_beta": 0.05}]
)
def test_the_config_refuses_epsilon_beta_and_bounds_out_of_range(bad, tmp_path):
    with pytest.raises(ValueError) as refused:
        run_args(tmp_path, **bad)
    assert "\n" not in str(refused.value)


# ----------------------------------------------------------------------------------------------------
# ε = 0 is TRL's DPO


@pytest.fixture(scope="module")
def dpo_and_epsilon_zero(tmp_path_factory):
    """DPOTrainer and EpsilonDPOTrainer at ε = 0 on the same pairs, seed and arguments: 3 steps of 2 micro-batches,
    gradient checkpointing on (TRL's default), each evaluated on 4 held-out pairs after its steps."""
    from trl import DPOConfig, DPOTrainer

    from epsdpo_trl import EpsilonDPOConfig, EpsilonDPOTrainer

    folder, trainers = tmp_path_factory.mktemp("epsilon_zero"), []
    for trainer_class, config, options in (
        (DPOTrainer, DPOConfig, {}),
        (EpsilonDPOTrainer, EpsilonDPOConfig, {"epsilon": 0.0}),
    ):
        args = run_args(folder / trainer_class.__name__, config, gradient_checkpointing=True, **options)
        trainer = trainer_class(TINY_MODEL, args=args, train_dataset=tiny_pairs(0, 12), eval_dataset=tiny_pairs(100, 4))
        trainer.train()
        trainer.evaluation = trainer.evaluate()
        trainers.append(trainer)
    return trainers


def test_epsilon_zero_gives_dpotrainer_losses_metrics_and_weights(dpo_and_epsilon_zero):
    dpo, epsilon_zero = dpo_and_epsilon_zero
    assert epsilon_zero.loss_path.from_hidden  # the loss from hidden states, against TRL's fused log-probabilities
    dpo_rows, rows = train_logs(dpo), train_logs(epsilon_zero)
    assert len(rows) == len(dpo_rows) == 3
    names = ("loss", "grad_norm", "learning_rate", *TRL_METRICS)
    pairs = [(row[name], dpo_row[name]) for row, dpo_row in zip(rows, dpo_rows, strict=True) for name in names]
    pairs += [
        (epsilon_zero.evaluation[f"eval_{name}"], dpo.evaluation[f"eval_{name}"]) for name in ("loss", *TRL_METRICS)
    ]
    # Each to 1e-6 of max(1, |value|): float32 rounding of two loss paths (6.7e-8 at most measured; logps near -15)
    assert max(abs(value - dpo_value) / max(1, abs(dpo_value)) for value, dpo_value in pairs) < 1e-6
    assert max_weight_difference(epsilon_zero.model, dpo.model) < 1e-6  # 1.3e-7 measured
    assert rows[1]["rewards/margins"] != 0  # the policy moved: the comparison is not of three first steps
    assert [row["beta"] for row in rows] == [0.1] * 3 and all(row["s/weaker"] == row["s/stronger"] == 0 for row in rows)


# ----------------------------------------------------------------------------------------------------
# ε > 0: epsdpo.py's ε-DPO, with a moving β


@pytest.fixture(scope="module")
def epsilon_run(tmp_path_factory):
    """ε = 0.1, 3 steps of 2 micro-batches, a checkpoint after step 2; then evaluated on 4 held-out pairs."""
    from epsdpo_trl import EpsilonDPOTrainer

    folder = tmp_path_factory.mktemp("epsilon_run")
    args = run_args(folder, epsilon=0.1, save_strategy="steps", save_steps=2)
    trainer = EpsilonDPOTrainer(TINY_MODEL, args=args, train_dataset=tiny_pairs(0, 12), eval_dataset=tiny_pairs(100, 4))
    trainer.train()
    trainer.beta_before_evaluation = trainer.baseline_beta.value
    trainer.evaluation = trainer.evaluate()
    return trainer


def test_logged_beta_follows_the_rule_from_the_logged_s_fractions(epsilon_run):
    rows, epsilon = train_logs(epsilon_run), epsilon_run.args.epsilon
    assert rows[0]["beta"] == 0.1 and rows[0]["s/weaker"] == rows[0]["s/stronger"] == 0  # policy = reference: s = 0
    for row, next_row in zip(rows[:-1], rows[1:], strict=True):
        assert next_row["beta"] == pytest.approx(beta_after(row["beta"], row, epsilon), rel=1e-12)
    assert epsilon_run.baseline_beta.value == pytest.approx(beta_after(rows[-1]["beta"], rows[-1], epsilon), rel=1e-12)
    assert rows[2]["beta"] != 0.1 and rows[1]["s/weaker"] + rows[1]["s/stronger"] > 0  # β moved
    assert all({"h", *TRL_METRICS} <= set(row) for row in rows)


def test_evaluation_reports_the_metrics_and_never_moves_beta(epsilon_run):
    evaluation = epsilon_run.evaluation
    names = ("loss", "beta", "h", "s/weaker", "s/stronger", *TRL_METRICS)
    assert all(f"eval_{name}" in evaluation for name in names)
    assert evaluation["eval_beta"] == epsilon_run.baseline_beta.value == epsilon_run.beta_before_evaluation
    assert evaluation["eval_s/weaker"] + evaluation["eval_s/stronger"] > 0  # s was computed, and not counted:
    assert epsilon_run.baseline_beta.counts.tolist() == [0, 0, 0, 0]


def full_logits_loss(trainer, inputs, policy, reference):
    """epsdpo.epsilon_dpo_loss on both models' full (2B, T, V) logits: the method as written. The models run under the
    trainer's autocast, as in training (a bf16 run's logits are bf16)."""
    model_inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    with torch.no_grad(), trainer.accelerator.autocast():
        logits, ref_logits = policy(**model_inputs).logits, reference(**model_inputs).logits
    input_ids, completion_mask = inputs["input_ids"], inputs["completion_mask"]
    beta, epsilon = trainer.baseline_beta.value, trainer.args.epsilon
    return epsdpo.epsilon_dpo_loss(logits, ref_logits, input_ids, completion_mask, beta, epsilon)


def assert_equals_epsdpo_on_full_logits(trainer, reference, tolerance=1e-6):
    """On every batch TRL makes from the train pairs (the policy trained for 3 steps): the loss to `tolerance`, s and
    each pair's β̃ exactly; both signs of s among them, so that the comparison covers the criterion."""
    signs = set()
    for batch in trainer.get_train_dataloader():
        inputs = trainer._prepare_inputs(batch)
        with torch.no_grad():
            out = trainer.epsilon_dpo_loss(trainer.model, inputs)
        expected = full_logits_loss(trainer, inputs, trainer.model, reference)
        assert abs(out.loss.item() - expected.loss.item()) < tolerance  # 2.4e-7 at most measured (bf16: 1.2e-7)
        assert out.s.tolist() == expected.s.tolist() and torch.equal(out.pair_betas, expected.pair_betas)
        signs.update(out.s.tolist())
    assert {1, -1} <= signs


def test_loss_and_s_equal_epsdpo_on_full_logits_from_hidden_and_logits(epsilon_run):
    from epsdpo_trl import LossPath

    assert epsilon_run.loss_path.from_hidden
    assert_equals_epsdpo_on_full_logits(epsilon_run, epsilon_run.ref_model)
    hidden_path = epsilon_run.loss_path
    try:
        epsilon_run.loss_path = LossPath(False, None, "the test's")
        assert_equals_epsdpo_on_full_logits(epsilon_run, epsilon_run.ref_model)
    finally:
        epsilon_run.loss_path = hidden_path


@pytest.mark.parametrize("adapter", ["new", "pretrained"])
def test_with_lora_the_reference_is_the_base_or_the_adapter_trained_from(adapter, tmp_path):
    """A new adapter (peft_config): the reference is the model with its adapters off. A PeftModel whose adapter was
    trained before: DPOTrainer copies it into a frozen "ref" adapter, the reference."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from epsdpo_trl import EpsilonDPOTrainer

    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    args = run_args(tmp_path, epsilon=0.1, learning_rate=3e-2)
    if adapter == "new":
        trainer = EpsilonDPOTrainer(TINY_MODEL, args=args, train_dataset=tiny_pairs(0, 12), peft_config=lora)
    else:
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(TINY_MODEL), lora)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():  # as if trained: the adapter is not the base model
            for weight in (weight for name, weight in model.named_parameters() if "lora_B" in name):
                weight.add_(torch.randn(weight.shape, generator=generator), alpha=0.05)
        trainer = EpsilonDPOTrainer(model, args=args, train_dataset=tiny_pairs(0, 12))
    assert trainer.ref_model is None and trainer.loss_path.from_hidden
    assert ("ref" in trainer.model.peft_config) == (adapter == "pretrained")
    trainer.train()

    class Reference(torch.nn.Module):
        def forward(self, **inputs):
            if adapter == "new":
                with trainer.model.disable_adapter():
                    return trainer.model(**inputs)
            trainer.model.set_adapter("ref")
            try:
                return trainer.model(**inputs)
            finally:
                trainer.model.set_adapter("default")

    assert_equals_epsdpo_on_full_logits(trainer, Reference())


def test_an_output_layer_with_a_bias_takes_the_logits_path_and_the_same_loss(tmp_path):
    from transformers import AutoModelForCausalLM

    from epsdpo_trl import EpsilonDPOTrainer

    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL)
    head = torch.nn.Linear(64, 60, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.normal_(0, 0.1)
    model.lm_head, model.config.tie_word_embeddings = head, False
    args = run_args(tmp_path, epsilon=0.1)
    trainer = EpsilonDPOTrainer(model, args=args, train_dataset=tiny_pairs(0, 12))
    assert not trainer.loss_path.from_hidden and "bias" in trainer.loss_path.why
    trainer.train()
    assert_equals_epsdpo_on_full_logits(trainer, trainer.ref_model)


def test_under_bf16_autocast_the_loss_and_s_equal_epsdpo_on_the_bf16_logits(tmp_path):
    """bf16=True on the CPU (accelerate's autocast): the trainer projects the hidden states in bf16, as the model's own
    output layer does, and takes the softmax in float32, as epsdpo.py does with the model's bf16 logits."""
    from epsdpo_trl import EpsilonDPOTrainer

    trainer = EpsilonDPOTrainer(
        TINY_MODEL, args=run_args(tmp_path, epsilon=0.1, bf16=True), train_dataset=tiny_pairs(0, 12)
    )
    assert trainer.accelerator.mixed_precision == "bf16" and trainer.loss_path.from_hidden
    trainer.train()
    assert_equals_epsdpo_on_full_logits(trainer, trainer.ref_model, tolerance=1e-5)


# ----------------------------------------------------------------------------------------------------
# β across a resume


def test_a_resumed_run_continues_beta_exactly(epsilon_run, tmp_path):
    from epsdpo_trl import BETA_FILE, EpsilonDPOTrainer

    checkpoint = pathlib.Path(epsilon_run.args.output_dir) / "checkpoint-2"
    saved = json.loads((checkpoint / BETA_FILE).read_text())
    rows = train_logs(epsilon_run)
    assert saved["beta"] == rows[2]["beta"] != 0.1  # after step 2: the β step 3 trains with, moved by step 2
    resumed = EpsilonDPOTrainer(TINY_MODEL, args=run_args(tmp_path, epsilon=0.1), train_dataset=tiny_pairs(0, 12))
    resumed.train(resume_from_checkpoint=str(checkpoint))
    *checkpoint_rows, resumed_row = train_logs(resumed)  # the state's log of steps 1 and 2, then step 3
    assert [row["step"] for row in checkpoint_rows] == [1, 2] and resumed_row["step"] == 3
    assert resumed_row["beta"] == rows[2]["beta"] and resumed_row["s/weaker"] == rows[2]["s/weaker"]
    assert resumed_row["loss"] == pytest.approx(rows[2]["loss"], abs=1e-6)
    assert resumed.baseline_beta.value == epsilon_run.baseline_beta.value


def test_resuming_refuses_a_checkpoint_without_beta_or_with_another_epsilon(epsilon_run, tmp_path):
    from epsdpo_trl import BETA_FILE, EpsilonDPOTrainer

    checkpoint = tmp_path / "checkpoint-2"
    shutil.copytree(pathlib.Path(epsilon_run.args.output_dir) / "checkpoint-2", checkpoint)
    for edit, match in (
        (lambda path: path.write_text(json.dumps({**json.loads(path.read_text()), "epsilon": 0.2})), "epsilon=0.2"),
        (lambda path: path.unlink(), "holds no baseline_beta.json"),
    ):
        edit(checkpoint / BETA_FILE)
        trainer = EpsilonDPOTrainer(
            TINY_MODEL, args=run_args(tmp_path / "out", epsilon=0.1), train_dataset=tiny_pairs(0, 12)
        )
        with pytest.raises(ValueError, match=match):
            trainer.train(resume_from_checkpoint=str(checkpoint))
