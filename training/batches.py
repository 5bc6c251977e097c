"""Preference pairs -> what a training step and an evaluation compute on: the order of the pairs, step by step and
process by process, and B pairs collated into one right-padded batch on the device (prompts left-padded, to sample).

    micro_batches    a process's micro-batches, step by step, in a seeded order
    collate          B pairs -> one right-padded batch of 2B rows: the B chosen sequences, then the B rejected
    collate_prompts  B pairs -> their prompts, left-padded for sampling
"""

import sys
from dataclasses import dataclass

import torch

NOISE_CODES = {None: 0, False: 1, True: 2}  # a pair's "noisy" flag, as a number


@dataclass
class Batch:
    input_ids: torch.Tensor  # (2B, T): B chosen sequences, then B rejected ones, right-padded
    attention_mask: torch.Tensor  # (2B, T): 1 on tokens, 0 on padding (the models need none: model_inputs)
    completion_mask: torch.Tensor  # (2B, T): 1 on completion tokens
    noise: torch.Tensor  # (B,): the row's "noisy" flag: 0 absent, 1 false (clean), 2 true (mislabelled)
    # input_ids and completion_mask as collate made them, on the host (the CPU): the loss at scale finds the scored
    # positions there, so that it never waits for the device to read them back.
    host_input_ids: torch.Tensor = None
    host_completion_mask: torch.Tensor = None


def collate(pairs, pad_token_id, device):
    """One batch of 2B rows for one concatenated forward pass: the B chosen sequences, then the B rejected."""
    sequences = [(p["prompt_ids"], p["chosen_ids"]) for p in pairs] + [
        (p["prompt_ids"], p["rejected_ids"]) for p in pairs
    ]
    length = max(len(prompt) + len(completion) for prompt, completion in sequences)
    input_ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    completion_mask = torch.zeros_like(input_ids)
    for row, (prompt, completion) in enumerate(sequences):
        end = len(prompt) + len(completion)
        input_ids[row, :end] = torch.tensor(prompt + completion)
        attention_mask[row, :end] = 1
        completion_mask[row, len(prompt) : end] = 1
    noise = torch.tensor([NOISE_CODES[p.get("noisy")] for p in pairs])
    return Batch(*to_device([input_ids, attention_mask, completion_mask, noise], device), input_ids, completion_mask)


def model_inputs(input_ids):
    """What a model is called with on right-padded rows (N, T): their ids alone, no attention mask.

    Under causal attention no position attends to the padding after it, and a right-padded row has padding only
    after its tokens: a mask would change the outputs at padding positions alone, which nothing reads (no completion
    position is padding), and the positions are 0, 1, ... either way. Without a mask transformers builds the causal one
    from the shape; given one, its mask preparation first reads on the host whether the mask holds any padding: a
    wait for the GPU, twice in each model's forward pass (4 a micro-batch). Left-padded prompts (collate_prompts,
    for sampling) do need theirs."""
    return dict(input_ids=input_ids)


def to_device(tensors, device):
    """Tensors made on the host, copied to `device`. To a GPU from pinned (page-locked) memory, without
    waiting: the copies queue behind the work already on the GPU, and the host goes on to the next batch
    instead of stalling until each copy is done (a copy from ordinary memory makes the host wait)."""
    if torch.device(device).type != "cuda":
        return [tensor.to(device) for tensor in tensors]
    return [tensor.pin_memory().to(device, non_blocking=True) for tensor in tensors]


def collate_prompts(pairs, pad_token_id, device):
    """The prompts of B pairs, left-padded as generate() wants them: input_ids and attention_mask, (B, T)."""
    width = max(len(p["prompt_ids"]) for p in pairs)
    input_ids = torch.tensor([[pad_token_id] * (width - len(p["prompt_ids"])) + p["prompt_ids"] for p in pairs])
    attention_mask = torch.tensor([[0] * (width - len(p["prompt_ids"])) + [1] * len(p["prompt_ids"]) for p in pairs])
    return tuple(to_device([input_ids, attention_mask], device))


def micro_batches(pairs, batch_size, grad_accum, world_size, rank, seed, first_step=1):
    """This rank's micro-batches, endlessly, from optimizer step first_step on.

    Each step takes the next batch_size × grad_accum × world_size pairs of a seeded order, a fresh order each
    epoch (an epoch: the whole steps the pairs make; the rest waits for the next epoch's order). Micro-batch m of
    a step is its pairs [m B W, (m + 1) B W), of which rank r keeps [r B, (r + 1) B) (B = batch_size,
    W = world_size): N processes train on what one process with N times the batch size trains on. Which pairs
    make a step depends on its size alone, so a run resumed on another number of processes, with B and
    grad_accum chosen to keep B × grad_accum × W, trains every step on the same pairs.
    """
    micro_batch, step_size = batch_size * world_size, batch_size * grad_accum * world_size
    steps_per_epoch, epoch_of_order = len(pairs) // step_size, None
    for step in range(first_step - 1, sys.maxsize):
        epoch, index = divmod(step, steps_per_epoch)
        if epoch != epoch_of_order:
            order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
            epoch_of_order = epoch
        step_pairs = order[index * step_size : (index + 1) * step_size]
        for start in range(rank * batch_size, step_size, micro_batch):
            yield [pairs[i] for i in step_pairs[start : start + batch_size]]
