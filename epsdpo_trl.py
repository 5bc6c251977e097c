"""ε-DPO inside TRL: EpsilonDPOTrainer, TRL's DPOTrainer with this project's loss and its moving β.

A script that trains with TRL's DPOTrainer trains with ε-DPO by changing two names (docs/trl.md):

    from trl import DPOConfig, DPOTrainer                         # before
    from epsdpo_trl import EpsilonDPOConfig, EpsilonDPOTrainer    # after: the same arguments, plus epsilon

    args = EpsilonDPOConfig(output_dir="out", beta=0.1, epsilon=0.01)
    trainer = EpsilonDPOTrainer(model="Qwen/Qwen2.5-0.5B-Instruct", args=args, train_dataset=pairs)
    trainer.train()

What changes from DPOTrainer, and nothing else (data, models, PEFT, accelerate, logging and saving are TRL's):

    the loss      each pair's −log σ(β̃ h), β̃ = β / (1 + ε s), s from the criterion of epsdpo.py (Lee et al.
                  2025, arXiv 2502.13177); computed by epsdpo_chunked from both models' last hidden states where
                  the output layer is a plain linear map (never the (2B, T, V) logits), else from their logits
    β             one epsdpo.BaselineBeta: every micro-batch of an optimizer step trains with the β of the step's
                  start; after the optimizer step, β ← the mean β̃ of the step's pairs, over every micro-batch and
                  every process (one all-reduce of three counts a step). Saved in each checkpoint folder
                  (baseline_beta.json) and restored by trainer.train(resume_from_checkpoint=...)
    metrics       TRL's rewards/* and logps/* (the rewards with each pair's β̃), and beta, h, s/weaker, s/stronger
    refused       what ε-DPO cannot combine with, at construction, in one line saying why (REFUSED below)

Tested with trl 1.16 (requirements.txt): another version is refused at import, in one line.
"""

import json
import math
import os
import warnings
from dataclasses import dataclass, field

import torch
import trl
from packaging.specifiers import SpecifierSet
from packaging.version import Version

TESTED_TRL = ">=1.16,<1.17"  # requirements.txt says the same
if Version(trl.__version__) not in SpecifierSet(TESTED_TRL) and not os.environ.get("EPSDPO_TRL_ANY_VERSION"):
    # The trainer overrides DPOTrainer's loss, its checkpoints and its metrics: another TRL may do them otherwise.
    raise ImportError(
        f"epsdpo_trl is tested with trl{TESTED_TRL}, this is trl {trl.__version__}: pip install 'trl{TESTED_TRL}' "
        f"(or set EPSDPO_TRL_ANY_VERSION=1 to try this version)"
    )
if Version(trl.__version__) not in SpecifierSet(TESTED_TRL):
    warnings.warn(f"epsdpo_trl: trl {trl.__version__} is untested (EPSDPO_TRL_ANY_VERSION is set)", stacklevel=2)

from accelerate.utils import is_peft_model  # noqa: E402  (after the version check: these names move between versions)
from transformers import TrainerCallback  # noqa: E402
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402
from trl.models.utils import disable_gradient_checkpointing  # noqa: E402
from trl.trainer.utils import use_adapter  # noqa: E402

import epsdpo  # noqa: E402
import epsdpo_chunked  # noqa: E402

BETA_FILE = "baseline_beta.json"  # in every checkpoint folder: BaselineBeta.state_dict()
# Configuration fields by which models scale their logits (Cohere, Granite, Falcon-H1, ...), as TRL's fused head reads.
LOGIT_SCALES = ("logit_scale", "logits_scaling", "output_multiplier", "lm_head_multiplier")


@dataclass
class EpsilonDPOConfig(DPOConfig):
    """TRL's DPOConfig plus ε-DPO's numbers. beta is the baseline β the run starts from (it moves, unlike DPO's)."""

    epsilon: float = field(
        default=0.01,
        metadata={"help": "The perturbation ε of ε-DPO, in [0, 1): pairs train with β/(1±ε) or β; 0 is DPO."},
    )
    min_beta: float = field(
        default=0.0, metadata={"help": "A floor for the baseline β (BaselineBeta's min_beta); 0: none."}
    )
    max_beta: float | None = field(
        default=None, metadata={"help": "A ceiling for the baseline β (BaselineBeta's max_beta); None: none."}
    )

    def __post_init__(self):
        super().__post_init__()
        baseline_beta(self)  # β, ε and the bounds checked now, each bad value in one line


def baseline_beta(args, device="cpu"):
    """The BaselineBeta of an EpsilonDPOConfig: β = args.beta, ε = args.epsilon, clamped to [min_beta, max_beta]."""
    max_beta = math.inf if args.max_beta is None else args.max_beta
    return epsdpo.BaselineBeta(args.beta, args.epsilon, device=device, min_beta=args.min_beta, max_beta=max_beta)


# What ε-DPO cannot be combined with: (is it set?, why not), each refused in one line rather than mixed silently.
REFUSED = {
    "precompute_ref_log_probs": (
        lambda args: args.precompute_ref_log_probs,
        "the criterion needs the reference's logits at every completion position, not its log-probabilities",
    ),
    "loss_type": (
        lambda args: list(args.loss_type) != ["sigmoid"] or args.loss_weights not in (None, [1.0]),
        "ε-DPO is defined for DPO's sigmoid loss alone, −log σ(β̃ h): loss_type='sigmoid' and no loss_weights",
    ),
    "use_liger_kernel": (
        lambda args: args.use_liger_kernel,
        "Liger's kernels are untested with ε-DPO's loss path (TRL deprecates them for model_init_kwargs use_kernels)",
    ),
    "f_divergence_type": (
        lambda args: args.f_divergence_type != "reverse_kl",
        "the perturbed policies f_ref + λ (f_θ − f_ref) are the optimum of the reverse-KL penalty only",
    ),
    "ld_alpha": (
        lambda args: args.ld_alpha is not None,
        "LD-DPO reweights tokens of the log-probabilities; the criterion compares whole-sequence ones",
    ),
    "label_smoothing": (
        lambda args: args.label_smoothing != 0,
        "label smoothing (robust DPO, cDPO) is not defined for a per-pair β: set label_smoothing=0",
    ),
    "padding_free": (
        lambda args: args.padding_free,
        "DPOTrainer in TRL 1.16 ignores it (it pads, with a warning): set padding_free=False",
    ),
    "sync_ref_model": (
        lambda args: args.sync_ref_model,
        "β is a KL penalty to a fixed reference; what it means when the reference moves (TR-DPO) is not defined",
    ),
    "use_weighting": (
        lambda args: args.use_weighting,
        "WPO's weights of the pairs' losses are not defined with a per-pair β",
    ),
    "disable_dropout": (
        lambda args: not args.disable_dropout,
        "with dropout on, s would measure the dropout's noise, not the policy: keep disable_dropout=True",
    ),
}


def refusal(args, compute_metrics=None):
    """Why EpsilonDPOTrainer cannot run with these arguments, in one line; None when it can."""
    if not isinstance(args, EpsilonDPOConfig):
        return f"args must be an EpsilonDPOConfig (TRL's DPOConfig plus epsilon), got {type(args).__name__}"
    for name, (is_set, why) in REFUSED.items():
        if is_set(args):
            return f"{name}={getattr(args, name)!r}: {why}"
    if compute_metrics is not None:
        return "compute_metrics: it reads logits, which this trainer never builds; ε-DPO logs its metrics itself"
    return None


@dataclass
class LossPath:
    """How the trainer computes the loss: from hidden states (with the soft-cap of the logits), or from logits."""

    from_hidden: bool
    logit_softcap: float | None
    why: str  # why from logits, when it is


class EpsilonDPOTrainer(DPOTrainer):
    """TRL's DPOTrainer with ε-DPO's loss and moving β; the same arguments, with an EpsilonDPOConfig as args.

    trainer.baseline_beta.value is the β the current optimizer step trains with; trainer.loss_path says how the loss
    is computed. Every argument is DPOTrainer's (see its docstring); what ε-DPO cannot combine with (REFUSED,
    compute_metrics, vision-language models, an MoE auxiliary loss) raises a ValueError here, in one line.
    """

    _tag_names = ["trl", "dpo", "epsilon-dpo"]

    def __init__(
        self,
        model,
        ref_model=None,
        args=None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
    ):
        if args is None:
            model_name = model if isinstance(model, str) else model.config._name_or_path
            args = EpsilonDPOConfig(f"{model_name.split('/')[-1]}-epsilon-DPO")
        why_not = refusal(args, compute_metrics)  # before anything is loaded or tokenized
        if why_not:
            raise ValueError(f"EpsilonDPOTrainer: {why_not}")
        super().__init__(
            model=model,
            ref_model=ref_model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
        )
        if self._is_vlm or self._is_vision_dataset:
            raise ValueError("EpsilonDPOTrainer: vision-language models are not supported (tested on text models)")
        if self.aux_loss_enabled:
            raise ValueError(
                "EpsilonDPOTrainer: this trainer adds no MoE load-balancing loss: set router_aux_loss_coef=0"
            )
        self.baseline_beta = baseline_beta(args, self.accelerator.device)
        self.loss_path = self._choose_loss_path()
        if not self.loss_path.from_hidden and self.accelerator.is_main_process:
            print(f"EpsilonDPOTrainer: the loss runs on both models' full logits: {self.loss_path.why}")
        self.add_callback(_MoveBetaAfterEachStep(self))

    # ------------------------------------------------------------------------------------------------
    # The loss

    def epsilon_dpo_loss(self, model, inputs):
        """epsdpo.epsilon_dpo_loss of one batch TRL collated, with the baseline β: an epsdpo.EpsilonDPOOutput.

        inputs: input_ids, attention_mask, completion_mask, each (2B, T): the B chosen rows, then the B rejected,
        right-padded (TRL's DataCollatorForPreference). model: the policy as the Trainer calls it (wrapped for
        DDP, FSDP or DeepSpeed); the reference is self.ref_model, or the policy with its adapters off (PEFT).

            h = z_θ − γ;  s from z⁻, z_θ, z⁺ (epsdpo.criterion);  β̃ = β / (1 + ε s)
            loss = mean −log σ(β̃ h)
        """
        input_ids, completion_mask = inputs["input_ids"], inputs["completion_mask"]
        model_inputs = {"input_ids": input_ids, "attention_mask": inputs["attention_mask"], "use_cache": False}
        beta, epsilon = self.baseline_beta.value, self.baseline_beta.epsilon
        if self.loss_path.from_hidden:
            policy = self._last_hidden_states(model, model_inputs)  # hidden states (2B, T, H), weight (V, H)
            reference = self._run_reference(self._last_hidden_states, model_inputs)
            softcap = self.loss_path.logit_softcap
            with self.accelerator.autocast():  # the products in the dtype the model's own head would use
                return epsdpo_chunked.epsilon_dpo_loss_from_hidden(
                    *policy, *reference, input_ids, completion_mask, beta, epsilon, softcap
                )
        policy_logits = model(**model_inputs).logits  # (2B, T, V)
        ref_logits = self._run_reference(lambda reference, inputs: reference(**inputs).logits, model_inputs)
        return epsdpo_chunked.epsilon_dpo_loss(policy_logits, ref_logits, input_ids, completion_mask, beta, epsilon)

    def _last_hidden_states(self, model, model_inputs):
        """(last hidden states (2B, T, H) after the final norm, output layer's weight (V, H)) of a causal LM.

        The model is called as the Trainer calls it (so that DDP sees the forward pass and reduces the gradients
        of the output layer with the others), asking for the logits of the last position only; its decoder's
        output is caught by a hook. output_hidden_states=True would keep every layer's output to the end instead.
        """
        unwrapped, caught = self.accelerator.unwrap_model(model), []
        hook = unwrapped.get_decoder().register_forward_hook(lambda decoder, args, output: caught.append(output[0]))
        try:
            model(**model_inputs, logits_to_keep=1)
        finally:
            hook.remove()
        return caught[-1], unwrapped.get_output_embeddings().weight

    def _run_reference(self, run, model_inputs):
        """run(reference, model_inputs) under no_grad, with the reference as DPOTrainer runs it: the separate
        ref_model, or (PEFT) the policy with its adapters off, or on TRL's frozen "ref" adapter."""
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            if self.ref_model is not None:
                return run(self.ref_model, model_inputs)
            unwrapped = self.accelerator.unwrap_model(self.model)
            with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
                return run(self.model, model_inputs)

    def _choose_loss_path(self):
        """From hidden states when both models' logits are softcap(last hidden state @ W.T): a bias-free linear output
        layer, no scale of the logits, and the product equal to the model's own logits on the first training pair's
        first tokens; else from logits, with the reason."""
        deepspeed_plugin = self.accelerator.state.deepspeed_plugin
        if self.is_deepspeed_enabled and deepspeed_plugin.zero_stage == 3:
            # The loss projects the hidden states again in backward, where ZeRO-3 has partitioned the output layer.
            return LossPath(False, None, "DeepSpeed ZeRO-3 partitions the output layer outside its forward pass")
        policy = self.model.get_base_model() if is_peft_model(self.model) else self.model
        models = [policy] if self.ref_model is None else [policy, self.accelerator.unwrap_model(self.ref_model)]
        softcaps = {getattr(model.config.get_text_config(), "final_logit_softcapping", None) for model in models}
        if len(softcaps) > 1:
            return LossPath(False, None, f"the two models soft-cap their logits differently ({softcaps})")
        (softcap,) = softcaps
        for model in models:
            head, config = model.get_output_embeddings(), model.config.get_text_config()
            if type(head) is not torch.nn.Linear or head.bias is not None:
                return LossPath(False, None, f"{type(model).__name__}'s output layer is not a bias-free nn.Linear")
            scales = {name: getattr(config, name, None) for name in LOGIT_SCALES}
            if any(scale not in (None, 1.0) for scale in scales.values()):
                return LossPath(False, None, f"{type(model).__name__} scales its logits ({scales})")
            # Under FSDP the reference is sharded already: a forward pass here would need every process.
            with self.accelerator.autocast():  # as the loss runs: under bf16 both products are bf16
                why_not = None if self.is_fsdp_enabled else _head_mismatch(model, self.train_dataset, softcap)
            if why_not:
                return LossPath(False, None, f"{type(model).__name__}: {why_not}")
        return LossPath(True, softcap, "")

    # ------------------------------------------------------------------------------------------------
    # What the Trainer calls

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The mean ε-DPO loss of the batch's pairs, as DPOTrainer's: the Trainer divides it by the micro-batches
        of the step. In training, s is counted (on the device, no wait): β moves after the optimizer step."""
        if return_outputs:
            raise ValueError("EpsilonDPOTrainer.compute_loss returns the loss alone: it never builds the logits")
        mode = "train" if self.model.training else "eval"
        out = self.epsilon_dpo_loss(model, inputs)
        if mode == "train":
            self.baseline_beta.observe(out.s)  # evaluation never moves β
        self._record_pair_metrics(mode, out)
        return out.loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation: the loss and the metrics of a batch, never logits (DPOTrainer's builds them for compute_metrics,
        which this trainer refuses)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def _record_pair_metrics(self, mode, out):
        """TRL's metrics of a batch, over every process's pairs (as DPOTrainer computes them, with each pair's β̃):
        rewards/chosen β̃ (log π_θ(y_w) − log π_ref(y_w)), rewards/rejected, rewards/accuracies (chosen >
        rejected), rewards/margins, logps/chosen log π_θ(y_w), logps/rejected; and h, the margin z_θ − γ (β-free:
        compare runs by it). In evaluation also beta and the fractions of pairs with s = +1 and −1; in training
        those are counted over the whole optimizer step (_MoveBetaAfterEachStep)."""
        values = {
            "rewards/chosen": out.chosen_rewards,
            "rewards/rejected": out.rejected_rewards,
            "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float(),
            "rewards/margins": out.chosen_rewards - out.rejected_rewards,
            "logps/chosen": out.chosen_logps.detach(),
            "logps/rejected": out.rejected_logps.detach(),
            "h": out.h,
        }
        if mode == "eval":
            values.update({"s/weaker": (out.s == 1).float(), "s/stronger": (out.s == -1).float()})
            self._metrics[mode]["beta"].append(self.baseline_beta.value)
        gathered = self.accelerator.gather(torch.stack(list(values.values()), dim=1))  # (pairs of all processes, K)
        means = gathered.T.contiguous().mean(dim=1).tolist()  # one wait for the device
        for name, mean in zip(values, means, strict=True):
            self._metrics[mode][name].append(mean)

    def _end_optimizer_step(self):
        """After each optimizer step, on every process: record the β the step trained with and its s fractions,
        then β ← the mean β̃ of the step's pairs. One all-reduce (the counts) and one wait for the device a
        step."""
        counts = self.accelerator.reduce(self.baseline_beta.counts, reduction="sum")  # every process's micro-batches
        weaker, kept, stronger, other = counts.tolist()  # pairs with s = +1, 0, −1, anything else (none)
        pairs = weaker + kept + stronger
        if other or not pairs:
            raise RuntimeError(
                f"EpsilonDPOTrainer: the step counted {pairs} pairs and {other} values of s not in -1, 0, 1"
            )
        metrics = self._metrics["train"]
        metrics["beta"].append(self.baseline_beta.value)
        metrics["s/weaker"].append(weaker / pairs)
        metrics["s/stronger"].append(stronger / pairs)
        self.baseline_beta.step((weaker, kept, stronger))  # β ← β · mean 1/(1 + ε s); the counts start again at 0

    # ------------------------------------------------------------------------------------------------
    # Checkpoints: β is training state

    def _save_checkpoint(self, model, trial):
        # Written before the Trainer's own files, so that a checkpoint the Trainer finished always holds β.
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save:
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, BETA_FILE), "w") as file:
                json.dump(self.baseline_beta.state_dict(), file)
        super()._save_checkpoint(model, trial)

    def _load_optimizer_and_scheduler(self, checkpoint):
        # train(resume_from_checkpoint=...) restores the optimizer here, on every process: β with it.
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, BETA_FILE)
        if not os.path.isfile(path):
            raise ValueError(f"EpsilonDPOTrainer: {checkpoint} holds no {BETA_FILE}: it was not saved by ε-DPO")
        with open(path) as file:
            state = json.load(file)
        if state.get("epsilon") != self.args.epsilon:
            raise ValueError(
                f"EpsilonDPOTrainer: {checkpoint} was trained with epsilon={state.get('epsilon')}, "
                f"the arguments say {self.args.epsilon}"
            )
        self.baseline_beta.load_state_dict(state)


class _MoveBetaAfterEachStep(TrainerCallback):
    """The Trainer calls on_step_end after each optimizer step (and zero_grad), before it logs, evaluates, saves."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._end_optimizer_step()


@torch.no_grad()
def _head_mismatch(model, train_dataset, softcap):
    """Why the model's logits are not softcap(last hidden state @ W.T) on the first 16 tokens of the first training
    pair (a model that scales or shifts them in its own code, one without logits_to_keep); None when they are."""
    pair = next(iter(train_dataset))
    input_ids = torch.tensor([(pair["prompt_ids"] + pair["chosen_ids"])[:16]], device=model.device)
    caught = []
    hook = model.get_decoder().register_forward_hook(lambda decoder, args, output: caught.append(output[0]))
    try:
        model(input_ids=input_ids, logits_to_keep=1)
    except Exception as error:  # no logits_to_keep, no decoder output, ...
        return f"its forward pass gives no last hidden states ({type(error).__name__})"
    finally:
        hook.remove()
    logits = caught[-1] @ model.get_output_embeddings().weight.T  # (1, T, V)
    logits = logits if softcap is None else torch.tanh(logits / softcap) * softcap
    expected = model(input_ids=input_ids).logits
    float32 = logits.dtype == expected.dtype == torch.float32  # not under autocast, nor a bf16 model
    tolerance = 1e-4 if float32 else 1e-2
    close = logits.shape == expected.shape and torch.allclose(logits.float(), expected.float(), tolerance, tolerance)
    if not close:
        return "its logits are not softcap(last hidden state @ output weight.T)"
    return None
