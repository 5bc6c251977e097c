"""Model setup for train.py: devices and processes, precision, loading the policy and its reference,
LoRA adapters, gradient checkpointing, and training on several processes: copied (DDP) or sharded (FSDP2,
with sharding.py).

train.py reads as the loop a learner follows; what it takes to put a model of any size on the hardware
at hand is here, one function per concern.
"""

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from training.adapters import adapter_base, add_lora, quiet_peft
from training.data import gold_reward_path
from training.errors import ReportedError, note
from training.sharding import allocate_shards, broadcast_weights, load_sharded_weights, local, reshard_root, shard

# The ε-DPO loss from the last hidden states (epsdpo_chunked.epsilon_dpo_loss_from_hidden) wherever the output
# layer is a plain linear map. False: from the full logits everywhere (the tests set it to compare the two).
FROM_HIDDEN_STATES = True


def pick_device(name):
    if name == "auto":
        return torch.device(
            "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
        )
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ReportedError(f"--device {name}: not a device (cpu, cuda, cuda:N, mps or auto)") from None
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count(),
        "mps": torch.backends.mps.is_available(),
    }
    if not available.get(device.type):
        raise ReportedError(
            f"--device {name}: no such device on this machine (cuda: {torch.cuda.device_count()} GPUs, "
            f"mps: {torch.backends.mps.is_available()})"
        )
    return device


# How long a process waits in a collective for the others before the run fails, in minutes (--dist-timeout). torch's
# default is 10; at 8B, process 0 alone may read (or first download) the weights while the others wait to receive
# them, and a sharded checkpoint's collectives wait for the slowest disk.
DIST_TIMEOUT_MINUTES = 30


def cuda_allocator_settings():
    """PyTorch's CUDA allocator with expandable segments, unless PYTORCH_CUDA_ALLOC_CONF says otherwise; set before
    the first CUDA allocation (the allocator reads it then). Every micro-batch has the length of its longest pair, so
    the activations' sizes change from one to the next: fixed-size cached blocks then fragment (memory reserved, not
    usable, out of memory with room to spare), where an expandable segment grows in place (PyTorch's advice for
    inputs whose shapes change)."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def init_distributed(device_name, timeout_minutes=DIST_TIMEOUT_MINUTES):
    """(rank, world size, device). Under torchrun (WORLD_SIZE > 1) this joins the process group: NCCL on
    GPUs, gloo on CPUs, its collectives failing after timeout_minutes (--dist-timeout); otherwise one process
    on the device --device picks.

    Under torchrun each process takes the GPU of its LOCAL_RANK (which GPUs: CUDA_VISIBLE_DEVICES), so
    --device may say cuda, cpu or auto, but not one GPU for every process (cuda:N) or mps."""
    cuda_allocator_settings()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, pick_device(device_name)
    local_rank = int(os.environ["LOCAL_RANK"])
    if device_name not in ("auto", "cuda", "cpu"):
        raise ReportedError(
            f"--device {device_name}: under torchrun each process uses the GPU of its LOCAL_RANK "
            f"(choose them with CUDA_VISIBLE_DEVICES); give --device cuda, cpu or auto"
        )
    if device_name == "cuda" and torch.cuda.device_count() <= local_rank:
        raise ReportedError(
            f"--device cuda: process {local_rank} of this machine has no GPU (cuda: {torch.cuda.device_count()} GPUs)"
        )
    on_gpus = device_name == "cuda" or (device_name == "auto" and torch.cuda.device_count() > local_rank)
    if on_gpus:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if on_gpus else "gloo", timeout=datetime.timedelta(minutes=timeout_minutes))
    return dist.get_rank(), world_size, torch.device("cuda", local_rank) if on_gpus else torch.device("cpu")


def precision(name, device):
    """The autocast context of every forward pass, nanoGPT's way: with bf16, mixed precision (float32 weights
    that the optimizer updates, bf16 matrix products), because at learning rates like 5e-7 most updates of
    a bf16 weight are below its rounding step and vanish. None for float32.

    In float32 on a GPU with TF32 units (compute capability 8.0, A100, or later: those with bf16 arithmetic)
    matrix products run in TF32: inputs rounded to a 10-bit mantissa, products summed in float32 (A100: 156
    TFLOPS against float32's 19.5, by NVIDIA's figures; torch's default is full float32). ε-DPO's perturbation
    f_ref + λ (f_θ − f_ref) is elementwise, in float32, after the products: TF32 rounds the logits a little
    (bf16 autocast, 8 times more), not the comparison of z⁻, z_θ, z⁺ made from them. NVIDIA_TF32_OVERRIDE=0:
    off."""
    if name == "auto":
        name = "bfloat16" if has_bf16_arithmetic(device) else "float32"
    if name == "float32":
        if has_bf16_arithmetic(device):  # the GPUs with bf16 units have TF32 units
            torch.set_float32_matmul_precision("high")  # TF32 in matrix products (cuBLAS)
            torch.backends.cudnn.allow_tf32 = True  # and in cuDNN's (torch's default already)
        return None
    if device.type == "cuda" and not has_bf16_arithmetic(device):
        raise ReportedError(
            f"--dtype bfloat16: {torch.cuda.get_device_name(device)} (compute capability "
            f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}) has no bf16 arithmetic; "
            f"torch would emulate it, slower than float32: use --dtype float32"
        )
    return torch.autocast(device.type, dtype=torch.bfloat16)


def precision_note(device):
    """What the start line says of float32 matrix products on `device`: ", float32 products in TF32" when
    precision() allowed TF32 there, else nothing."""
    return (
        ", float32 products in TF32"
        if device.type == "cuda" and torch.get_float32_matmul_precision() != "highest"
        else ""
    )


def has_bf16_arithmetic(device):
    """A GPU with bf16 matrix units: compute capability 8.0 (A100) or later. torch.cuda.is_bf16_supported()
    also says yes where bf16 is only emulated (T4, V100), and asks about the current GPU, not this one."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def frozen_weights_in_bf16(model):
    """A frozen model's weights that autocast multiplies in bf16 anyway, stored in bf16: half their memory.

    Those are the weights and biases of its linear layers (the output layer among them) and the experts of
    a mixture (3-D parameters) where transformers multiplies them with F.linear ("eager" experts). Rounding
    to bf16 once here or at every product gives the same bf16 numbers, so under autocast the reference
    computes the policy's logits bit for bit at the start and every s is 0. The rest stays in
    float32, as autocast leaves it: embeddings (a lookup is not cast; a tied output layer is the input
    embedding), norms, and experts multiplied by grouped_mm (transformers' default), which autocast does
    not cast: the policy multiplies those in float32 too."""
    tied = model.get_input_embeddings().weight
    for module in model.modules():
        experts = getattr(getattr(module, "config", None), "_experts_implementation", None) == "eager"
        for parameter in module.parameters(recurse=False):
            if parameter.requires_grad:
                raise ValueError("frozen_weights_in_bf16: the model has trainable parameters; freeze it first")
            product = isinstance(module, torch.nn.Linear) or (experts and parameter.dim() == 3)
            if product and parameter is not tied and parameter.is_floating_point():
                parameter.data = parameter.data.to(torch.bfloat16)
    return model


_NOTED = set()  # the models whose own code a note said was not run


def load_model(name, device, trust_remote_code, frozen_in_bf16=False, base=None, dtype=torch.float32):
    """A model in float32 on `device`, in eval mode. frozen_in_bf16: frozen, with frozen_weights_in_bf16,
    converted on the CPU before it moves, so the device never holds a float32 copy of it. A peft adapter (say
    of supervised fine-tuning) is merged into its base (base: --model-base, else the one its adapter_config.json
    names): the model is that fine-tuned model, and every weight of it trains. dtype "auto": in the dtype its
    weights are stored in (config.json's), float32 where an adapter is merged (merged in bf16, it would round)."""
    from transformers import AutoModelForCausalLM

    base = base or adapter_base(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            base or name, dtype=torch.float32 if base else dtype, trust_remote_code=trust_remote_code
        )
        if base:
            from peft import PeftModel

            with quiet_peft():  # peft freezes the base it loads onto
                model = PeftModel.from_pretrained(model, name).merge_and_unload().requires_grad_(True)
    except Exception as error:  # no such model, code it would run, bad files
        on = f" (an adapter on {base})" if base else ""
        raise ReportedError(
            f"model {name}{on}: {type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
        ) from None
    if getattr(model.config, "auto_map", None) and not trust_remote_code and name not in _NOTED:
        _NOTED.add(name)  # once, not once for the policy and once for the reference
        note(
            f"{name}: its config.json names code of its own (auto_map), which runs only with --trust-remote-code; "
            f"it loads as transformers' {type(model).__name__}"
        )
    if frozen_in_bf16:
        frozen_weights_in_bf16(model.requires_grad_(False))
    # eval() for the policy too: dropout off, as DPO assumes; gradients flow all the same.
    return model.to(device).eval()


class AdaptersOff:
    """The reference of a LoRA run: the policy itself with its adapters off (peft's disable_adapter), that
    is the frozen base, under no_grad. Its weights are in memory once, and at the start (B = 0) it computes
    the policy's logits bit for bit. Called as a model: reference(**inputs).logits."""

    def __init__(self, policy):
        self.policy = policy  # the peft model, never its DDP wrapper
        self.config, self.get_output_embeddings = policy.config, policy.get_output_embeddings  # the base's head

    def __call__(self, **inputs):
        with torch.no_grad(), self.policy.disable_adapter():
            return self.policy(**inputs)


def checkpointed_layers(policy):
    """transformers' gradient checkpointing for the policy; returns the layers it recomputes in backward.

    transformers recomputes a layer only while that layer is in training mode, so train() switches those
    layers alone into it around each training step: dropout stays off everywhere, as DPO assumes."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    # Not reentrant (transformers >= 5 by default; 4.x chose the reentrant kind): that kind gives no gradients
    # to the layers' adapters when its inputs do not require grad, as with LoRA's frozen embeddings.
    if hasattr(policy, "activation_checkpointing_enable"):
        policy.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return [module for module in policy.modules() if isinstance(module, GradientCheckpointingLayer)]


@contextlib.contextmanager
def training_mode(layers):
    for layer in layers:
        layer.training = True  # this module alone, not its children
    try:
        yield
    finally:
        for layer in layers:
            layer.training = False


def check_models(policy, reference, tokenizer, pairs, args, checkpoint_folder=None):
    """The models, the tokenizer and the pairs fit together: one vocabulary, every token id inside it, and every
    pair (and, sampled for a gold reward, every prompt with --max-new-tokens) inside the models' positions."""
    vocab, ref_vocab = (model.get_output_embeddings().weight.shape[0] for model in (policy, reference))
    if ref_vocab != vocab and checkpoint_folder:  # the policy is the checkpoint's
        raise ReportedError(
            f"{checkpoint_folder}: its model has {vocab} words, the run's --model "
            f"{args.ref_model or args.model} {ref_vocab}: it is not a checkpoint of this run"
        )
    if ref_vocab != vocab:
        raise ReportedError(f"--ref-model {args.ref_model}: its vocabulary has {ref_vocab} words, the policy's {vocab}")
    vocab = min(vocab, policy.get_input_embeddings().weight.shape[0])
    largest = max(tokenizer.pad_token_id, *(max(p["prompt_ids"] + p["chosen_ids"] + p["rejected_ids"]) for p in pairs))
    if largest >= vocab:
        raise ReportedError(
            f"--model {args.model}: its tokenizer gives token id {largest}, but the model has only {vocab} words"
        )
    # Known now rather than as an IndexError at some step: a pair, or a prompt and its sample, beyond the positions
    # the model has (GPT-2's learned ones; past a rotary model's it was never trained either).
    positions, model = min(
        (getattr(model.config, "max_position_embeddings", None) or 2**62, flag)
        for model, flag in ((policy, f"--model {args.model}"), (reference, f"--ref-model {args.ref_model}"))
    )
    longest = max(len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"])) for p in pairs)
    if longest > positions:
        prompt_too = f" and --max-prompt-length {positions // 2}" if args.max_prompt_length >= positions else ""
        raise ReportedError(
            f"{model}: it takes at most {positions} positions (max_position_embeddings), and a pair "
            f"has {longest} tokens; give --max-length {positions}{prompt_too} or less"
        )
    longest_prompt = max(len(p["prompt_ids"]) for p in pairs)
    if gold_reward_path(args) and longest_prompt + args.max_new_tokens > positions:  # samples, for the gold reward
        raise ReportedError(
            f"--max-new-tokens {args.max_new_tokens}: a prompt of {longest_prompt} tokens and its sample "
            f"would pass the {positions} positions of {model}; give --max-new-tokens "
            f"{max(1, positions - longest_prompt)} or less, or a smaller --max-prompt-length"
        )


def held_bytes(policy, optimizer, reference):
    """Bytes this rank holds of the policy's weights, their gradients (during a step: as large as the weights that
    train), AdamW's state and the reference's weights: its shards under FSDP, everything otherwise (a LoRA reference
    is the policy's own weights)."""

    def size(tensors):
        return sum(local(t).numel() * local(t).element_size() for t in tensors if torch.is_tensor(t))

    return {
        "parameters": size(policy.parameters()),
        "gradients": size(weight for weight in policy.parameters() if weight.requires_grad),
        "optimizer": size(value for state in optimizer.state.values() for value in state.values()),
        "reference": size(reference.parameters()) if isinstance(reference, torch.nn.Module) else 0,
    }  # LoRA: the policy's


def make_optimizer(weights, args, device):
    """AdamW on the trained weights. On CUDA its fused kernel: the update of every weight in a few kernels, not
    several per weight (torch's foreach default), the same update (checkpoints of either load into the other)."""
    fused = device.type == "cuda"
    return torch.optim.AdamW(weights, lr=args.lr, weight_decay=args.weight_decay, fused=fused or None)


@dataclass
class LinearHead:
    """A model whose logits are softcap(last hidden state @ weight.T), weight its output layer's (V, H)."""

    vocab_size: int
    logit_softcap: float = None  # Gemma-2's final_logit_softcapping; None: no soft-cap


def last_hidden_states(model, inputs):
    """(the last hidden states (N, T, H) after the final norm, the output layer's weight (V, H)).

    model is a transformers causal LM, its DDP wrapper or AdaptersOff, called as usual (so that DDP sees the
    forward pass and reduces the head's gradient with the others), but asked for the logits of the last
    position only. The hidden states are what its decoder (get_decoder(): embeddings, layers, final norm)
    returns, caught by a hook. output_hidden_states=True would also keep every layer's output to the end of
    the pass, L + 1 tensors of (N, T, H), where the reference's no-grad pass frees each once the next layer
    has it: at 8B in float32, 33 × 16 KiB a token, 4.1 GiB for 4 pairs × 1,024 tokens. Under FSDP the
    root stays gathered after the forward pass (shard), so the weight is whole."""
    unwrapped = (
        model.module
        if isinstance(model, torch.nn.parallel.DistributedDataParallel)
        else model.policy
        if isinstance(model, AdaptersOff)
        else model
    )
    caught = []
    hook = unwrapped.get_decoder().register_forward_hook(lambda decoder, args, output: caught.append(output[0]))
    try:
        model(**inputs, logits_to_keep=1)
    finally:
        hook.remove()
    return caught[-1], unwrapped.get_output_embeddings().weight


def linear_head(model, input_ids):
    """(LinearHead, "") when the model's logits are softcap(last hidden state @ weight.T), as checked on
    input_ids (1, T); (None, why not) otherwise: a head with a bias, scaled logits (Cohere, Granite), ..."""
    head, softcap = model.get_output_embeddings(), getattr(model.config, "final_logit_softcapping", None)
    if not FROM_HIDDEN_STATES:
        return None, "models.FROM_HIDDEN_STATES is False"
    if hasattr(head, "base_layer"):  # peft's: LoRA adapts the output layer
        return None, "LoRA adapts its output layer (--lora-target), so its logits are not one matrix product"
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return (
            None,
            "its output layer is a "
            f"{type(head).__name__}{' with a bias' if getattr(head, 'bias', None) is not None else ''}",
        )
    with torch.no_grad():
        try:
            hidden, weight = last_hidden_states(model, dict(input_ids=input_ids))
        except Exception as error:  # no logits_to_keep, no hidden states, ...
            return None, f"its forward pass gives no last hidden states ({type(error).__name__})"
        logits = hidden @ weight.T
        logits = logits if softcap is None else torch.tanh(logits / softcap) * softcap
        expected, tolerance = model(input_ids=input_ids).logits, 1e-4 if logits.dtype == torch.float32 else 1e-2
        if hidden.shape[:2] != input_ids.shape or not torch.allclose(
            logits.float(), expected.float(), rtol=tolerance, atol=tolerance / 10
        ):
            return None, "its logits are not softcap(last hidden state @ output weight.T)"
    return LinearHead(weight.shape[0], softcap), ""


def shared_linear_head(policy, reference, pair, device, mixed_precision, full_logits=False):
    """(LinearHead, "") when both models' logits are softcap(last hidden state @ weight.T) with the same soft-cap,
    checked on the first tokens of a pair as the models will run (under autocast with bf16); else (None, why).
    full_logits (--full-logits): (None, why) whatever the models."""
    if full_logits:
        return None, "--full-logits"
    sample = torch.tensor([(pair["prompt_ids"] + pair["chosen_ids"])[:16]], device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed_precision):
        (head, note), (ref_head, ref_note) = linear_head(policy, sample), linear_head(reference, sample)
    if head is not None and head != ref_head:
        head, note = None, f"the reference: {ref_note}" if ref_head is None else "the reference's soft-cap differs"
    return head, note


@dataclass
class Models:
    """What train.py trains with."""

    policy: torch.nn.Module  # the model being trained, unwrapped: the optimizer's parameters, what is saved
    trained: torch.nn.Module  # what the training step calls: the policy (sharded in place by FSDP), or DDP's wrapper
    reference: (
        object  # frozen, in eval mode, called under no_grad: a model (sharded under FSDP), or AdaptersOff(policy)
    )
    layers: list  # the policy's layers recomputed in backward (--gradient-checkpointing)
    head: LinearHead  # both models' logits from their last hidden states; None: from full logits
    loss_note: str  # which loss runs at scale, and why, for the line train.py starts with

    def no_sync(self, last_micro_batch):
        """Under DDP, gradients are averaged across ranks once per optimizer step, at the last micro-batch.

        Under FSDP, at every micro-batch: its reduce-scatter leaves each rank 1/N of the gradient, and
        skipping it would keep every rank's whole unsharded gradient (in float32) between micro-batches,
        the memory FSDP is there to save; the price is one reduce-scatter per micro-batch."""
        ddp = isinstance(self.trained, torch.nn.parallel.DistributedDataParallel)
        return self.trained.no_sync() if ddp and not last_micro_batch else contextlib.nullcontext()


def setup_models(args, device, world_size, mixed_precision, tokenizer, pairs, checkpoint=None):
    """The policy (from the checkpoint when resuming) and its reference, checked against the tokenizer and
    the pairs' token ids, ready to train on `device` in one process or, under torchrun, with DDP or FSDP.

    With --lora-r, the policy is --model's frozen weights with LoRA adapters, and the reference the same model
    with its adapters off: no second model unless --ref-model names one. With --fsdp, setup_sharded_models."""
    if args.fsdp and args.lora_r:
        raise ReportedError(
            "--fsdp with --lora-r: not supported; LoRA keeps one frozen copy of the base on each GPU, "
            "so run it under torchrun without --fsdp (DDP reduces only the adapters' gradients)"
        )
    if args.fsdp and world_size == 1:
        raise ReportedError(
            "--fsdp shards the models across the processes torchrun starts, and one process has nothing "
            "to shard: run torchrun --nproc_per_node N train.py --fsdp ..., or leave --fsdp out"
        )
    if args.fsdp:
        return setup_sharded_models(args, device, mixed_precision, tokenizer, pairs, checkpoint)
    lora, from_checkpoint = args.lora_r > 0, checkpoint[0] if checkpoint else None
    # In float32: the weights the optimizer updates; with bf16, the frozen weights autocast casts, in bf16.
    if lora:
        policy = add_lora(
            load_model(args.model, device, args.trust_remote_code, mixed_precision, args.model_base),
            args,
            from_checkpoint,
        )
    else:
        policy = load_model(
            from_checkpoint or args.model,
            device,
            args.trust_remote_code,
            False,
            None if from_checkpoint else args.model_base,
        )
    reference = None
    if args.ref_model or not lora:
        reference = load_model(
            args.ref_model or args.model,
            device,
            args.trust_remote_code,
            mixed_precision,
            None if args.ref_model else args.model_base,
        ).requires_grad_(False)
    check_models(policy, reference or policy, tokenizer, pairs, args, from_checkpoint)
    head, note = shared_linear_head(
        policy, reference or AdaptersOff(policy), pairs[0], device, mixed_precision, args.full_logits
    )
    layers = checkpointed_layers(policy) if args.gradient_checkpointing else []
    # DDP averages the gradients over the ranks. Its buffers (rotary inv_freq) are constants: broadcasting
    # them from rank 0 before every forward pass would be one more collective per micro-batch.
    trained = (
        policy
        if world_size == 1
        else torch.nn.parallel.DistributedDataParallel(
            policy, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
        )
    )
    return Models(policy, trained, reference or AdaptersOff(policy), layers, head, note)


def setup_sharded_models(args, device, mixed_precision, tokenizer, pairs, checkpoint=None):
    """setup_models under --fsdp: no GPU ever holds a whole model, and process 0 alone reads weights into CPU
    memory, once per model (torchtune's and torchtitan's way). Each process builds both models on the meta
    device (empty_model: shapes, no weights), shards them, allocates its shards, and keeps its part of the
    weights process 0 reads and sends (set_model_state_dict with broadcast_from_rank0). The reference, when
    it is --model, comes from the same read. Resuming, the policy's shards come from the checkpoint, each
    process reading its own, and --model's weights are read for the reference only.

    Where every process read both models whole in float32, at 8B that was 59.8 GiB of CPU memory per process
    (479 GiB on a node of 8 GPUs); now process 0 reads them in the dtype they are stored in (read_weights): 15.0 GiB
    for Llama-3-8B's bf16, none on the others (computed)."""
    model_base = {args.model: args.model_base} if args.model_base else {}  # --model an adapter: its base
    policy = empty_model(args.model, args.trust_remote_code, model_base.get(args.model))
    reference = empty_model(
        args.ref_model or args.model, args.trust_remote_code, model_base.get(args.ref_model or args.model)
    ).requires_grad_(False)
    check_models(policy, reference, tokenizer, pairs, args)
    layers = checkpointed_layers(policy) if args.gradient_checkpointing else []
    # Under FSDP's mixed precision the policy computes wholly in bf16, so the reference is stored wholly in
    # bf16 and sharded alike: the same bf16 weights, the same casts of each unit's inputs, and at the start
    # the same logits bit for bit (every s is 0).
    param_dtype = torch.bfloat16 if mixed_precision else None
    for weight in reference.parameters() if param_dtype else ():  # not the buffers, as FSDP's casts:
        weight.data = weight.data.to(param_dtype)  # rotary frequencies stay float32
    policy, reference = (allocate_shards(shard(model, param_dtype), device) for model in (policy, reference))
    read = {}  # process 0's: one model at a time

    def weights(name):
        if dist.get_rank() == 0 and name not in read:
            read.clear()
            read[name] = read_weights(name, args.trust_remote_code, model_base.get(name))
        return read.get(name, {})

    if checkpoint:
        load_sharded_weights(policy, checkpoint[0])
    else:
        broadcast_weights(policy, weights(args.model))
    broadcast_weights(reference, weights(args.ref_model or args.model))
    read.clear()
    head, note = shared_linear_head(policy, reference, pairs[0], device, mixed_precision, args.full_logits)
    for model in (policy, reference):
        reshard_root(model)  # the check's forward passes gathered them
    return Models(policy, policy, reference, layers, head, note)


def read_weights(name, trust_remote_code, base=None):
    """Process 0's copy of a model's weights for setup_sharded_models, on the CPU, in the dtype they are stored in
    (bf16 for most released models): each process casts its part into its shards' dtype as it receives it
    (sharding.broadcast_weights), and bf16 into float32 is exact, so the float32 shards are those of a float32 read,
    from half the memory and half the traffic. Float32 where an adapter is merged into its base."""
    return load_model(name, torch.device("cpu"), trust_remote_code, False, base, "auto").state_dict()


def empty_model(name, trust_remote_code, base=None):
    """The model `name` (as load_model loads it) without its weights: its parameters on the meta device
    (shapes, no memory), its buffers real on the CPU. A buffer that is not saved with the weights (rotary
    frequencies) is computed as from_pretrained computes it: by the model's own initialization, which leaves
    the meta parameters as they are."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    base = base or adapter_base(name) or name
    try:
        config = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    except Exception as error:  # no such model, code it would run, bad files
        raise ReportedError(f"model {name}: {type(error).__name__}: {(str(error).splitlines() or [''])[0]}") from None
    for buffer_name, buffer in list(model.named_non_persistent_buffers()):
        module, _, attribute = buffer_name.rpartition(".")
        model.get_submodule(module).register_buffer(attribute, torch.zeros_like(buffer, device="cpu"), persistent=False)
    model.initialize_weights()
    with contextlib.suppress(OSError):  # the model's own, as from_pretrained loads it
        model.generation_config = GenerationConfig.from_pretrained(base)
    return model.eval()
