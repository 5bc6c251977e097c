"""FSDP2 for train.py: sharding a model across the processes torchrun starts, filling its shards without a
whole copy on every process, keeping its units gathered where that saves traffic, and gathering its state.

torchtune's and torchtitan's way: fully_shard on each decoder layer, then on the root; models built on the meta
device and filled from process 0 (set_model_state_dict with broadcast_from_rank0); checkpoints through
torch.distributed.checkpoint. models.setup_sharded_models puts these together.

FSDP2 and DTensor are imported where a model is sharded, not at the top: the import takes 1.3 s, which a run that
shards nothing need not pay (and before it, nothing can be sharded).
"""

import contextlib
import sys

import torch
import torch.distributed as dist

from training.errors import ReportedError


def shard(model, param_dtype=None):
    """FSDP2, torchtune's way: each decoder layer, then the root (embeddings, final norm, output layer).

    Each rank keeps 1/N of every weight, and so of its gradient and AdamW state, and gathers a unit's
    whole weights only while that unit computes. param_dtype=bfloat16 gathers them in bf16 (half the
    traffic of float32) for a bf16 forward and backward; gradients are reduced in float32 into the
    float32 shards that AdamW updates: mixed precision, as autocast does it in one process.

    A layer is resharded after its forward pass (and gathered again for its backward); the root is not: it
    stays gathered, so that the output layer's weight is whole for the loss from hidden states. For the policy
    this is FSDP's default (its backward begins with the root at once); the frozen reference's root is freed
    by reshard_root once the loss is computed. A model built on the meta device is sharded the same way."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [module for module in model.modules() if type(module).__name__ in names]
    if not layers:
        raise ReportedError(
            f"--fsdp: {type(model).__name__} names no decoder layers (_no_split_modules) to shard one by one"
        )
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    precision = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for layer in layers:
        fully_shard(layer, mp_policy=precision)
    fully_shard(model, mp_policy=precision, reshard_after_forward=False)
    model.gathered_dtype = param_dtype or next(model.parameters()).dtype  # for gathered_once
    return model


def reshard_root(model):
    """Under FSDP, free the root's gathered weights (embeddings, final norm, output layer), which stay whole
    after each forward pass (shard); nothing otherwise."""
    if sharded(model):
        model.reshard()


def gathered_fits(model, device):
    """Whether a sharded model's weights, all gathered, take at most half of what its GPU has free (what
    torch's allocator holds unused counted as free); the other half is for the KV cache and the logits of
    generate(). Always on a CPU.

    One answer for all ranks, the least room any rank has (an all_reduce of each rank's answer, MIN): each rank's
    answer sets which all-gathers it issues while sampling, and ranks that answered differently would wait on
    each other's mismatched collectives forever."""
    fits = _fits_on_this_rank(model, device)
    if not (dist.is_available() and dist.is_initialized()):
        return fits
    answers = torch.tensor([float(fits)], device=device)  # on the GPU under NCCL
    dist.all_reduce(answers, op=dist.ReduceOp.MIN)
    return bool(answers.item())  # a wait, once per sampling


def _fits_on_this_rank(model, device):
    if device.type != "cuda":
        return True
    free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return sum(weight.numel() for weight in model.parameters()) * model.gathered_dtype.itemsize <= free / 2


@contextlib.contextmanager
def gathered_once(model, device):
    """Under FSDP, a block in which each unit of the model is gathered at its first forward pass and kept
    whole to the end, then resharded. generate() calls the model once per new token, and each call would
    gather every layer again: the whole model per token on every GPU (at 8B in bf16 on 8 GPUs, 13.1 GiB into
    each GPU per token). Kept whole, it costs the whole model on each GPU while the block lasts instead
    (15.0 GiB); where that does not fit (gathered_fits), units are gathered per call as in training.
    Nothing otherwise."""
    if not sharded(model) or not gathered_fits(model, device):
        yield
        return
    model.set_reshard_after_forward(False)  # every unit
    try:
        yield
    finally:
        model.set_reshard_after_forward(True)
        model.set_reshard_after_forward(False, recurse=False)  # the root, as shard() set it
        for unit in model.modules():
            if sharded(unit):
                unit.reshard()


def sharded(model):
    """Whether FSDP2 shards model (never, before anything imported it)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


def local(tensor):
    """This rank's part of a tensor: its shard of a DTensor (the whole value of a replicated one)."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return tensor.to_local() if dtensor is not None and isinstance(tensor, dtensor.DTensor) else tensor


def clip_gradient_norm(weights, max_norm):
    """Clip the gradients of weights to a total norm of max_norm, and return their norm before clipping: a plain
    tensor (0-d) on their device, under FSDP the norm over every rank's shards."""
    return local(torch.nn.utils.clip_grad_norm_(weights, max_norm))


def gathered_state_dict(model):
    """A sharded model's whole state, gathered on rank 0 in CPU memory (empty on the other ranks), so that
    no GPU ever holds the whole model, let alone twice; None for a model that is not sharded. Called on
    every rank."""
    if not sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def allocate_shards(model, device):
    """A sharded model built on the meta device, with its shards allocated on `device` (not yet filled) and
    its real buffers as they were (those on the meta device come with the weights: they are saved with them)."""
    buffers = {name: buffer for name, buffer in model.named_buffers() if not buffer.is_meta}  # fully_shard moved them
    model.to_empty(device=device)
    for name, buffer in buffers.items():
        model.get_buffer(name).copy_(buffer)
    return model


def broadcast_weights(model, state_dict):
    """A sharded model's weights from process 0's state_dict (whole, in its CPU memory; empty on the other
    processes): each tensor is sent to every process, which keeps its shard, cast to the shard's dtype."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, dict(state_dict), options=options)  # a copy: it puts the shards in the dict it gets


def load_sharded_weights(model, folder):
    """A sharded policy's weights from a checkpoint of a sharded run (torch.distributed.checkpoint), each
    process reading its own shards. checkpoints.load_checkpoint reads them again with AdamW's state."""
    from torch.distributed.checkpoint import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from training import dcp_files

    state = {"model": get_model_state_dict(model)}
    try:
        dcp_files.load(state, folder)  # runs no code from the folder
    except (CheckpointException, RuntimeError, ValueError) as error:  # another model's shards, unreadable files
        first = next(iter(error.failures.values()), error) if isinstance(error, CheckpointException) else error
        raise ReportedError(
            f"{folder}: its shards do not load into this model ({type(first).__name__}: "
            f"{(str(first).splitlines() or [''])[0][:200]})"
        ) from None
    set_model_state_dict(model, state["model"])
