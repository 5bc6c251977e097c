"""The ε-DPO loss of one micro-batch: both models' forward passes, then epsdpo.py's loss or epsdpo_chunked.py's.

A new loss variant goes here: train.py, evaluation and bench.py all call micro_batch_loss.
"""

import torch

import epsdpo
import epsdpo_chunked
from training.batches import model_inputs
from training.models import last_hidden_states
from training.sharding import reshard_root

# Below this many bytes of float32 logits a micro-batch, epsdpo.py's loss (the method as written) on full logits;
# above, epsdpo_chunked.py's: from the last hidden states where the output layer allows, else from logits in chunks.
PLAIN_LOSS_BYTES = 64 * 2**20


def micro_batch_loss(policy, reference, batch, beta, epsilon, head=None):
    """One concatenated forward pass of chosen and rejected per model, then the ε-DPO loss: epsdpo.py's when the
    logits are small; at scale from the last hidden states when the output layer is a plain linear map (head, see
    models.linear_head), never a (2B, T, V) tensor, else from the logits in chunks."""
    inputs = dict(model_inputs(batch.input_ids), use_cache=False)  # right-padded: no attention mask, no wait
    on_host = (batch.host_input_ids, batch.host_completion_mask)  # at scale the loss finds the positions there: no wait
    if head and batch.input_ids.numel() * head.vocab_size * 4 > PLAIN_LOSS_BYTES:
        hidden, weight = last_hidden_states(policy, inputs)  # (2B, T, H), (V, H)
        with torch.no_grad():
            ref_hidden, ref_weight = last_hidden_states(reference, inputs)
        out = epsdpo_chunked.epsilon_dpo_loss_from_hidden(
            hidden, weight, ref_hidden, ref_weight, *on_host, beta, epsilon, head.logit_softcap
        )
        reshard_root(reference)  # FSDP: the reference's output layer, whole for the loss, freed before the backward
        return out
    logits = policy(**inputs).logits  # (2B, T, V)
    with torch.no_grad():
        ref_logits = reference(**inputs).logits
    reshard_root(reference)
    if logits.numel() * 4 <= PLAIN_LOSS_BYTES:  # the method as written; its checks wait once
        return epsdpo.epsilon_dpo_loss(logits, ref_logits, batch.input_ids, batch.completion_mask, beta, epsilon)
    return epsdpo_chunked.epsilon_dpo_loss(logits, ref_logits, *on_host, beta, epsilon)
