"""A train.py run's checkpoints: a sharded run's written in the background, while training goes on.

Under FSDP a checkpoint is every rank's shards of the policy's weights and AdamW's two moments (12 bytes a weight,
torch.distributed.checkpoint): at Llama-3-8B 96.4 GB, 12 GB from each of 8 GPUs, 10 to 48 s at 2 to 10 GB/s of writes
(computed in docs/multi-gpu.md), which would stall a run 2 to 9 % at --save-every 100. Here a rank stops only to copy
its shards into CPU memory (the staging of torch.distributed.checkpoint.async_save): the next optimizer step changes
the live tensors, never the copy. A thread of each rank writes the copy meanwhile, into a temporary folder beside.

The promise of a synchronous checkpoint holds. checkpoint-STEP appears whole or not at all: rank 0 writes its
trainer_state.pt, records the proofs of its files and renames it into place only once every rank's write has returned
without error (DCP returns the same outcome on every rank: a rank's failure reaches all of them). A resume never finds
a half-written one: until then it is a .checkpoint-STEP-XXXXXXXX temporary, which a kill -9 leaves and the next run in
the folder removes. A failed write stops every rank with one line naming the checkpoint, the previous one intact.

    with CheckpointSaver(output_dir, args, inputs) as saver:  # leaving it: the checkpoint under way finished
        for step in steps:
            ranks, ... = gather_step(..., saver.written(), signal)  # whether each rank's write has returned
            if signalled:  # a stop's checkpoint, whole (and the one under way) before the run exits
                saver.save(step, policy, optimizer, baseline_beta, s_by_noise, wait=True)
            saver.after_step(step, ranks, policy, ...)  # finished once all returned; begun every --save-every

One process and DDP: checkpoints.write_checkpoint, synchronous (docs/multi-gpu.md says why).
"""

import collections
import concurrent.futures
import datetime
import pathlib
import shutil
import tempfile

import torch
import torch.distributed as dist

from training import sharding
from training.checkpoints import (
    _checkpoint_errors,
    commit_checkpoint,
    prune_checkpoints,
    trainer_state,
    write_checkpoint,
    write_failure,
)
from training.evaluation import WRITTEN
from training.output_folder import _write_errors

# A checkpoint being written: its step, the temporary folder its shards go to, its trainer_state, the write's Future.
Pending = collections.namedtuple("Pending", "step temporary state future")


class CheckpointSaver:
    """checkpoint-STEP of a train.py run, every --save-every steps and at a stop; under FSDP written in the background.

    One is written at a time: a new one, a stop's and the end of the loop (leaving `with saver:`) first finish the one
    under way. It is finished as soon as every rank's write has returned (after_step, at the first step whose
    collective says so), so that it appears within a step of being written, not at the next --save-every.
    Finishing is collective: every rank calls it at the same point of the run."""

    def __init__(self, output_dir, args, inputs):
        self.output_dir, self.args, self.inputs = pathlib.Path(output_dir), args, inputs
        self.pending = None  # the checkpoint being written (Pending), or None
        self.group = None  # the process group of the background writes' collectives, made at the first

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        """Leaving the training loop, the checkpoint under way is finished (committed). On an error, its write is only
        waited for, since its thread uses a process group that the run's end closes, and it is not committed: rank 0
        removes its temporary folder (as the next run removes a killed run's)."""
        if kind is None:
            self.finish()
        elif self.pending is not None:
            concurrent.futures.wait([self.pending.future])
            if dist.get_rank() == 0:
                shutil.rmtree(self.pending.temporary, ignore_errors=True)
            self.pending = None

    def save(self, step, policy, optimizer, baseline_beta, s_by_noise, wait=False):
        """Begin checkpoint-STEP, once the one under way is finished; with wait, finish it too before returning.
        Not sharded: written at once by checkpoints.write_checkpoint."""
        self.finish()
        state = trainer_state(step, baseline_beta, s_by_noise, self.args, self.inputs)  # of this step, taken now
        if not sharding.sharded(policy):
            write_checkpoint(self.output_dir, step, policy, optimizer, state, self.args.keep_checkpoints)
            return
        self.pending = self._begin(step, policy, optimizer, state)
        if wait:
            self.finish()

    def written(self):
        """1.0 once this rank's background write has returned (written or failed), else 0.0 (also when none is under
        way): what this rank puts in the step's collective (evaluation.gather_step), so that every rank finishes the
        checkpoint at the same step, without a collective of its own."""
        return float(self.pending is not None and self.pending.future.done())

    def after_step(self, step, ranks, policy, optimizer, baseline_beta, s_by_noise):
        """At the end of optimizer step `step` (ranks: every rank's row of the step's collective, gather_step): the
        checkpoint under way finished if every rank's write has returned, then checkpoint-STEP every --save-every
        steps."""
        if self.pending is not None and bool(ranks[:, WRITTEN].all()):
            self.finish()
        if step % self.args.save_every == 0:
            self.save(step, policy, optimizer, baseline_beta, s_by_noise)

    def _begin(self, step, policy, optimizer, state):
        """Every rank: its shards copied into CPU memory, and a thread writing the copy into the temporary folder that
        rank 0 made. The copy is about a rank's share of the checkpoint (12 GB at 8B on 8 GPUs), held until written."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        if self.group is None:
            # gloo, of its own: the writes' collectives run in a thread beside the training's and must not interleave
            # with them (under NCCL, async_save also needs a group with a CPU backend). Every rank makes it here.
            timeout = datetime.timedelta(minutes=self.args.dist_timeout)
            self.group = dist.new_group(backend="gloo", timeout=timeout)
        temporary = (
            [tempfile.mkdtemp(prefix=f".checkpoint-{step}-", dir=self.output_dir)] if dist.get_rank() == 0 else [None]
        )
        dist.broadcast_object_list(temporary, src=0, group=self.group)  # one folder, rank 0's
        model_state, optimizer_state = get_state_dict(policy, optimizer)  # this rank's shards, the live tensors
        # Staged (copied) before it returns; the thread plans with the other ranks, writes __RANK_0.distcp, and
        # rank 0 writes .metadata once every rank's result has reached it.
        future = dcp.async_save(
            {"model": model_state, "optimizer": optimizer_state}, checkpoint_id=temporary[0], process_group=self.group
        )
        return Pending(step, pathlib.Path(temporary[0]), state, future)

    def finish(self):
        """The checkpoint under way, finished, on every rank at the same point: each waits for its write; once all
        have returned without error, rank 0 commits it (checkpoints.commit_checkpoint: trainer_state.pt, the record's
        proofs, the rename) and prunes the old ones. A failed write, or a failed commit, stops every rank with one line
        naming it (ReportedError), its temporary folder removed. Nothing when none is under way."""
        if self.pending is None:
            return
        step, temporary, state, future = self.pending
        failure = None
        try:
            future.result()  # every rank gets the same outcome: the first failure of any rank's write
        except (Exception, *_checkpoint_errors()) as error:
            failure = error
        self.pending = None
        rank = dist.get_rank()
        if rank == 0 and failure is None:
            try:
                commit_checkpoint(self.output_dir, temporary, step, state)
            except _write_errors() as error:  # trainer_state.pt or the record, on a full disk
                failure = error
        # Rank 0's outcome, learnt by every rank: all go on, or all stop. No rank goes on (or exits) before it is whole.
        failed = torch.tensor([failure is not None], dtype=torch.int32)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=self.group)
        if failed.item():
            if rank == 0:
                shutil.rmtree(temporary, ignore_errors=True)
            raise write_failure(self.output_dir, step, failure or RuntimeError("rank 0 could not commit it"))
        if rank == 0:
            prune_checkpoints(self.output_dir, self.args.keep_checkpoints)
