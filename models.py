"""Model setup for train.py: devices and processes, precision, loading the policy and its reference,
gradient checkpointing, and the wrapper that trains it on several processes.

train.py reads as the loop a learner follows; what it takes to put a model of any size on the hardware
at hand is here, one function per concern.
"""

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from data import ReportedError

# The ε-DPO loss from the last hidden states (epsdpo.epsilon_dpo_loss_from_hidden) wherever the output layer is a
# plain linear map. False: from the full logits everywhere (the tests set it to compare the two).
FROM_HIDDEN_STATES = True

def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ReportedError(f"--device {name}: not a device (cpu, cuda, cuda:N, mps or auto)") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count(),
                 "mps": torch.backends.mps.is_available()}
    if not available.get(device.type):
        raise ReportedError(f"--device {name}: no such device on this machine (cuda: {torch.cuda.device_count()} GPUs, "
                            f"mps: {torch.backends.mps.is_available()})")
    return device


def init_distributed(device_name):
    """(rank, world size, device). Under torchrun (WORLD_SIZE > 1) this joins the process group: NCCL on
    GPUs, gloo on CPUs; otherwise one process on the device --device picks.

    Under torchrun each process takes the GPU of its LOCAL_RANK (which GPUs: CUDA_VISIBLE_DEVICES), so
    --device may say cuda, cpu or auto, but not one GPU for every process (cuda:N) or mps."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, pick_device(device_name)
    local_rank = int(os.environ["LOCAL_RANK"])
    if device_name not in ("auto", "cuda", "cpu"):
        raise ReportedError(f"--device {device_name}: under torchrun each process uses the GPU of its LOCAL_RANK "
                            f"(choose them with CUDA_VISIBLE_DEVICES); give --device cuda, cpu or auto")
    if device_name == "cuda" and torch.cuda.device_count() <= local_rank:
        raise ReportedError(f"--device cuda: process {local_rank} of this machine has no GPU "
                            f"(cuda: {torch.cuda.device_count()} GPUs)")
    on_gpus = device_name == "cuda" or (device_name == "auto" and torch.cuda.device_count() > local_rank)
    if on_gpus:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if on_gpus else "gloo")
    return dist.get_rank(), world_size, torch.device("cuda", local_rank) if on_gpus else torch.device("cpu")


def precision(name, device):
    """The autocast context of every forward pass, nanoGPT's way: with bf16, mixed precision (float32 weights
    that the optimizer updates, bf16 matrix products), because at learning rates like 5e-7 most updates of
    a bf16 weight are below its rounding step and vanish. None for float32."""
    if name == "auto":
        name = "bfloat16" if has_bf16_arithmetic(device) else "float32"
    if name == "float32":
        return None
    if device.type == "cuda" and not has_bf16_arithmetic(device):
        raise ReportedError(f"--dtype bfloat16: {torch.cuda.get_device_name(device)} (compute capability "
                            f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}) has no bf16 arithmetic; "
                            f"torch would emulate it, slower than float32: use --dtype float32")
    return torch.autocast(device.type, dtype=torch.bfloat16)


def has_bf16_arithmetic(device):
    """A GPU with bf16 matrix units: compute capability 8.0 (A100) or later. torch.cuda.is_bf16_supported()
    also says yes where bf16 is only emulated (T4, V100), and asks about the current GPU, not this one."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def frozen_weights_in_bf16(model):
    """A frozen model's weights that autocast multiplies in bf16 anyway, stored in bf16: half their memory.

    Those are the weights and biases of its linear layers (the output layer among them) and the experts of
    a mixture (3-D parameters) where transformers multiplies them with F.linear ("eager" experts). Rounding
    to bf16 once here or at every product gives the same bf16 numbers, so under autocast the reference
    computes the policy's logits bit for bit at the start and every s is 0 (METHOD §6). The rest stays in
    float32, as autocast leaves it: embeddings (a lookup is not cast; a tied output layer is the input
    embedding), norms, and experts multiplied by grouped_mm (transformers' default), which autocast does
    not cast: the policy multiplies those in float32 too."""
    tied = model.get_input_embeddings().weight
    for module in model.modules():
        experts = getattr(getattr(module, "config", None), "_experts_implementation", None) == "eager"
        for name, parameter in module.named_parameters(recurse=False):
            if parameter.requires_grad:
                raise ValueError("frozen_weights_in_bf16: the model has trainable parameters; freeze it first")
            product = isinstance(module, torch.nn.Linear) or (experts and parameter.dim() == 3)
            if product and parameter is not tied and parameter.is_floating_point():
                parameter.data = parameter.data.to(torch.bfloat16)
    return model


def load_model(name, device, trust_remote_code, frozen_in_bf16=False):
    """A model in float32 on `device`, in eval mode. frozen_in_bf16: frozen, with frozen_weights_in_bf16,
    converted on the CPU before it moves, so the device never holds a float32 copy of it."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32, trust_remote_code=trust_remote_code)
    except Exception as error:                                          # no such model, code it would run, bad files
        raise ReportedError(f"model {name}: {type(error).__name__}: {(str(error).splitlines() or [''])[0]}") from None
    if frozen_in_bf16:
        frozen_weights_in_bf16(model.requires_grad_(False))
    # eval() for the policy too: dropout off, as DPO assumes; gradients flow all the same.
    return model.to(device).eval()


def checkpointed_layers(policy):
    """transformers' gradient checkpointing for the policy; returns the layers it recomputes in backward.

    transformers recomputes a layer only while that layer is in training mode, so train() switches those
    layers alone into it around each training step: dropout stays off everywhere, as DPO assumes."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    (getattr(policy, "activation_checkpointing_enable", None) or policy.gradient_checkpointing_enable)()
    return [module for module in policy.modules() if isinstance(module, GradientCheckpointingLayer)]


@contextlib.contextmanager
def training_mode(layers):
    for layer in layers:
        layer.training = True                                           # this module alone, not its children
    try:
        yield
    finally:
        for layer in layers:
            layer.training = False


def check_models(policy, reference, tokenizer, pairs, args, checkpoint_folder=None):
    """The models and the tokenizer fit together: one vocabulary, and every token id inside it."""
    vocab, ref_vocab = (model.get_output_embeddings().weight.shape[0] for model in (policy, reference))
    if ref_vocab != vocab and checkpoint_folder:                        # the policy is the checkpoint's
        raise ReportedError(f"{checkpoint_folder}: its model has {vocab} words, the run's --model "
                            f"{args.ref_model or args.model} {ref_vocab}: it is not a checkpoint of this run")
    if ref_vocab != vocab:
        raise ReportedError(f"--ref-model {args.ref_model}: its vocabulary has {ref_vocab} words, the policy's {vocab}")
    vocab = min(vocab, policy.get_input_embeddings().weight.shape[0])
    largest = max(tokenizer.pad_token_id, *(max(p["prompt_ids"] + p["chosen_ids"] + p["rejected_ids"]) for p in pairs))
    if largest >= vocab:
        raise ReportedError(f"--model {args.model}: its tokenizer gives token id {largest}, but the model has only {vocab} words")


@dataclass
class LinearHead:
    """A model whose logits are softcap(last hidden state @ weight.T), weight its output layer's (V, H)."""

    logit_softcap: float = None    # Gemma-2's final_logit_softcapping; None: no soft-cap


def last_hidden_states(model, inputs):
    """(the last hidden states (N, T, H) after the final norm, the output layer's weight (V, H)).

    model is a transformers causal LM or its DDP wrapper, called as usual (so that DDP sees the forward pass
    and reduces the head's gradient with the others), but asked for the logits of the last position only."""
    outputs = model(**inputs, output_hidden_states=True, logits_to_keep=1)
    unwrapped = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    return outputs.hidden_states[-1], unwrapped.get_output_embeddings().weight


def completion_logits(model, inputs, completion_mask, head):
    """For each sequence of inputs, the logits (m, V) at the m positions that predict its completion tokens:
    one sequence at a time from the last hidden states when head is a LinearHead, else from the full logits."""
    scored = completion_mask[:, 1:].bool()                                                       # (N, T-1)
    if head is None:
        return [row[mask] for row, mask in zip(model(**inputs).logits[:, :-1], scored)]
    hidden, weight = last_hidden_states(model, inputs)
    cap = head.logit_softcap
    return ((logits if cap is None else torch.tanh(logits / cap) * cap)
            for logits in (row[mask] @ weight.T for row, mask in zip(hidden[:, :-1], scored)))


def linear_head(model, input_ids):
    """(LinearHead, "") when the model's logits are softcap(last hidden state @ weight.T), as checked on
    input_ids (1, T); (None, why not) otherwise: a head with a bias, scaled logits (Cohere, Granite), ..."""
    head, softcap = model.get_output_embeddings(), getattr(model.config, "final_logit_softcapping", None)
    if not FROM_HIDDEN_STATES:
        return None, "models.FROM_HIDDEN_STATES is False"
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None, f"its output layer is a {type(head).__name__}{' with a bias' if getattr(head, 'bias', None) is not None else ''}"
    with torch.no_grad():
        try:
            hidden, weight = last_hidden_states(model, dict(input_ids=input_ids))
        except Exception as error:                                      # no logits_to_keep, no hidden states, ...
            return None, f"its forward pass gives no last hidden states ({type(error).__name__})"
        logits = hidden @ weight.T
        logits = logits if softcap is None else torch.tanh(logits / softcap) * softcap
        expected, tolerance = model(input_ids=input_ids).logits, 1e-4 if logits.dtype == torch.float32 else 1e-2
        if hidden.shape[:2] != input_ids.shape or not torch.allclose(logits.float(), expected.float(), rtol=tolerance, atol=tolerance / 10):
            return None, "its logits are not softcap(last hidden state @ output weight.T)"
    return LinearHead(softcap), ""


@dataclass
class Models:
    """What train.py trains with."""

    policy: torch.nn.Module        # the model being trained, unwrapped: the optimizer's parameters, what is saved
    trained: torch.nn.Module       # what the training step calls: the policy, or its data-parallel wrapper
    reference: torch.nn.Module     # frozen, in eval mode, called under no_grad
    layers: list                   # the policy's layers recomputed in backward (--gradient-checkpointing)
    head: LinearHead               # both models' logits from their last hidden states; None: from full logits
    head_note: str                 # why head is None, for the one line train.py prints

    def no_sync(self, last_micro_batch):
        """Under DDP, gradients are averaged across ranks once per optimizer step, at the last micro-batch."""
        wrapped = self.trained is not self.policy
        return self.trained.no_sync() if wrapped and not last_micro_batch else contextlib.nullcontext()


def setup_models(args, device, world_size, mixed_precision, tokenizer, pairs, checkpoint=None):
    """The policy (from the checkpoint when resuming) and its reference, checked against the tokenizer and
    the pairs' token ids, ready to train on `device` in one process or, under torchrun, with DDP."""
    # In float32: the weights the optimizer updates; with bf16, the frozen reference's product weights in bf16.
    policy = load_model(checkpoint[0] if checkpoint else args.model, device, args.trust_remote_code)
    reference = load_model(args.ref_model or args.model, device, args.trust_remote_code, mixed_precision).requires_grad_(False)
    check_models(policy, reference, tokenizer, pairs, args, checkpoint[0] if checkpoint else None)
    sample = torch.tensor([(pairs[0]["prompt_ids"] + pairs[0]["chosen_ids"])[:16]], device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed_precision):        # as the models will run
        (head, note), (ref_head, ref_note) = linear_head(policy, sample), linear_head(reference, sample)
    if head is not None and head != ref_head:
        head, note = None, f"the reference: {ref_note}" if ref_head is None else "the reference's soft-cap differs"
    layers = checkpointed_layers(policy) if args.gradient_checkpointing else []
    # DDP averages the gradients over the ranks. Its buffers (rotary inv_freq) are constants: broadcasting
    # them from rank 0 before every forward pass would be one more collective per micro-batch.
    trained = policy if world_size == 1 else torch.nn.parallel.DistributedDataParallel(
        policy, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    return Models(policy, trained, reference, layers, head, note)
