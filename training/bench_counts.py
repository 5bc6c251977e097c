"""What a piece of code costs a GPU, counted on a CPU: torch operations, live tensor bytes, host synchronizations.

    with Operations() as operations: ...       operations.count: torch operations dispatched (a GPU: one kernel
                                               launch or more each, some microseconds of the host's time)
    with PeakBytes() as peak: ...              peak.peak(): the most bytes of tensors allocated inside and alive at
                                               once, as a caching allocator that frees a tensor with its last
                                               reference sees them (the GPU's extra peak memory)
    with HostSyncs(device_tensors) as syncs:   syncs.syncs: each time the host would wait for a GPU, and where

All three work on FakeTensors (torch._subclasses.fake_tensor.FakeTensorMode: shapes without values or memory),
so a 128k-word vocabulary costs nothing to count; and a FakeTensor cannot be read, so code that runs on them
never reads a device value on the host. bench.py prints these figures; the tests bound them.
"""

import ctypes
import inspect
import pathlib
import sys
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

aten = torch.ops.aten


def _in_torch(filename):
    return pathlib.Path(torch.__file__).parent in pathlib.Path(filename).parents


ROOT = pathlib.Path(__file__).resolve().parent.parent


def _ours(filename):  # this project's code (its files, not the libraries it runs)
    path = pathlib.Path(filename).resolve()
    return ROOT in path.parents and "site-packages" not in path.parts


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, (list, tuple)) and all(
        isinstance(leaf, (torch.Tensor, int, float, bool)) or leaf is None for leaf in tree
    ):
        return [leaf for leaf in tree if isinstance(leaf, torch.Tensor)]  # most calls: quick
    return [leaf for leaf in tree_leaves(tree) if isinstance(leaf, torch.Tensor)]


class Operations(TorchDispatchMode):
    """Counts the torch operations dispatched inside (forward and backward alike). FakeTensor's own metadata
    queries (the prim namespace) are no work on a device and are left out, so FakeTensors count as real ones."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.namespace != "prim"
        return func(*args, **(kwargs or {}))


class PeakBytes(TorchDispatchMode):
    """The bytes of the storages operations allocate inside, alive at once: peak() is their most, above what
    existed before (inputs are not counted; a view or an in-place result is no new memory)."""

    def __init__(self):
        super().__init__()
        self.serials, self.events, self._references = WeakIdKeyDictionary(), [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(tensor.untyped_storage()) for tensor in _tensors((args, kwargs))}
        for tensor in _tensors(out):
            storage = tensor.untyped_storage()
            if id(storage) not in inputs and storage not in self.serials and storage.nbytes():
                serial = self.serials[storage] = len(self.events)
                nbytes = storage.nbytes()
                self.events.append((serial, nbytes))
                self._references.append(weakref.ref(storage, lambda _, s=serial, n=nbytes: self.events.append((s, -n))))
        return out

    def peak(self, leave_out=()):
        """The peak, leaving out the storages of the tensors leave_out (alive at the end: a call's results,
        such as the gradients any implementation returns)."""
        left_out = {
            self.serials[tensor.untyped_storage()] for tensor in leave_out if tensor.untyped_storage() in self.serials
        }
        alive = peak = 0
        for serial, change in self.events:
            if serial not in left_out:
                alive += change
                peak = max(peak, alive)
        return peak


# Operations that read device values on the host, or whose output size depends on them: each waits for the GPU.
SYNCING = {
    aten._local_scalar_dense.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.repeat_interleave.Tensor,
    aten.equal.default,
    aten.bincount.default,
}
BOOLEAN_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


class HostSyncs(TorchDispatchMode):
    """Records, on a CPU, each place where code would make the host wait for a GPU.

    A CPU run has no device: which tensors would be on the GPU is followed instead. Those given (the models'
    weights, the batch copied to the device) are on the device, and so is every result of an operation on one
    of them. A sync is then an operation that reads device values or sizes its output by them (.item(), bool(),
    nonzero, boolean indexing, ...), .tolist(), .numpy() or .cpu() of a device tensor, or, in this project's code,
    a copy to the device that waits: Tensor.to(device) without non_blocking=True (PyTorch's blocking host-to-device
    copy waits for the stream). Not seen: torch.tensor(..., device=...), the same blocking copy (torch.tensor cannot
    be wrapped: transformers' loading then goes wrong). Each is recorded as (what, file:line of the first caller
    outside torch). paused = True: record nothing for a while (evaluation, say).
    """

    def __init__(self, device_tensors=()):
        super().__init__()
        self.on_device, self.syncs, self.paused = WeakIdKeyDictionary(), [], False
        for tensor in device_tensors:
            self.on_device[tensor] = True

    def mark(self, tensors):
        """These tensors are on the device from now on (a host-to-device copy, say)."""
        for tensor in tensors:
            self.on_device[tensor] = True
        return tensors

    def record(self, what):
        if self.paused:
            return
        for frame in inspect.stack()[2:]:
            if not _in_torch(frame.filename) and frame.filename != __file__:
                self.syncs.append((what, f"{pathlib.Path(frame.filename).name}:{frame.lineno}"))
                return

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(
            tensor in self.on_device for tensor in _tensors(args) + _tensors(list(kwargs.values()) if kwargs else [])
        ):
            if func in SYNCING or (func in BOOLEAN_INDEXING and any(t.dtype == torch.bool for t in _tensors(args[1]))):
                self.record(str(func))
            self.mark(_tensors(out))
        return out

    def __enter__(self):
        self._methods = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy", "cpu", "to")}
        tolist, numpy, cpu, to = self._methods.values()

        def reading(name, method):
            def read(tensor, *args, **kwargs):
                if tensor in self.on_device:
                    self.record(f"Tensor.{name}")
                    if name == "cpu":  # the copy on the host is a host tensor
                        with _disable_current_modes():
                            return tensor.clone()
                return method(tensor, *args, **kwargs)

            return read

        # Copies to the device are looked for in this project's own code: a CPU run cannot tell a library's host
        # tensors (an optimizer's step counters) or its device-to-device .to() from a copy to the device.
        def to_device(tensor, *args, **kwargs):
            moves = any(isinstance(a, (torch.device, str)) for a in (*args, kwargs.get("device")))
            if moves and tensor not in self.on_device and _ours(sys._getframe(1).f_code.co_filename):
                if not kwargs.get("non_blocking"):
                    self.record("Tensor.to(device) without non_blocking")
                with _disable_current_modes():
                    return self.mark([to(tensor, *args, **kwargs).clone()])[0]
            return to(tensor, *args, **kwargs)

        torch.Tensor.tolist, torch.Tensor.numpy = reading("tolist", tolist), reading("numpy", numpy)
        torch.Tensor.cpu, torch.Tensor.to = reading("cpu", cpu), to_device
        return super().__enter__()

    def __exit__(self, *exc):
        for name, method in self._methods.items():
            setattr(torch.Tensor, name, method)
        return super().__exit__(*exc)


def cpu_memory_kib(field):
    """VmRSS (resident memory now) or VmHWM (its peak) of this process, in KiB, from /proc/self/status (Linux)."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def glibc_malloc_option(option, value):
    """Set a glibc malloc option in this process (no-op where there is no glibc)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(option, value)
    except OSError:
        pass


def glibc_release_free_memory():
    """Return the pages malloc holds free to the system (malloc_trim; no-op where there is no glibc), so that
    what a step then allocates shows in resident memory even where it reuses freed space, as in a process forked
    from one that has run much before it."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


# ----------------------------------------------------------------------------------------------------
# The two ε-DPO losses at scale, as train.py runs them on a GPU in bf16 mixed precision


def loss_costs(path, pairs=4, length=1024, completion=768, vocab=128_256, width=256, fake=True):
    """What one forward + backward of an ε-DPO loss at scale costs, input_ids and completion_mask on the host:

        {"operations": torch operations dispatched,
         "extra_peak": most bytes allocated inside and alive at once, leaving out the gradients it returns
                       (of the logits; of the hidden states and the output weight), which any loss returns,
         "extra_peak_with_gradients": the same with them,
         "logits": bytes of one float32 (2B, T, V) logits tensor}

    path "hidden": epsdpo_chunked.epsilon_dpo_loss_from_hidden on bf16 hidden states (2B, T, width), the policy's
    float32 output weight and the reference's stored in bf16, under a bf16 autocast; path "logits":
    epsdpo_chunked.epsilon_dpo_loss on both models' bf16 logits (2B, T, V). fake: on FakeTensors (no memory,
    no values: a 128k vocabulary costs nothing, and no value of the device's is ever read on the host).
    """
    import contextlib

    from torch._subclasses.fake_tensor import FakeTensorMode

    import epsdpo_chunked

    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (2 * pairs, length), generator=generator)
    completion_mask = torch.zeros(2 * pairs, length, dtype=torch.long)
    completion_mask[:, length - completion :] = 1
    with FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext():
        if path == "hidden":
            ref_hidden, hidden = torch.randn(
                2, 2 * pairs, length, width, generator=None if fake else generator
            ).bfloat16()
            weight = torch.randn(vocab, width, generator=None if fake else generator)
            inputs, ref_inputs = (
                (hidden.requires_grad_(), weight.requires_grad_()),
                (ref_hidden, (weight.detach() + 0.1).bfloat16()),
            )
        else:
            ref_logits, logits = torch.randn(
                2, 2 * pairs, length, vocab, generator=None if fake else generator
            ).bfloat16()
            inputs, ref_inputs = (logits.requires_grad_(),), (ref_logits,)
    with Operations() as operations, PeakBytes() as memory:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if path == "hidden":
                out = epsdpo_chunked.epsilon_dpo_loss_from_hidden(
                    inputs[0], inputs[1], *ref_inputs, input_ids, completion_mask, 0.1, 0.01
                )
            else:
                out = epsdpo_chunked.epsilon_dpo_loss(inputs[0], *ref_inputs, input_ids, completion_mask, 0.1, 0.01)
        out.loss.backward()
    return {
        "operations": operations.count,
        "extra_peak": memory.peak(leave_out=[tensor.grad for tensor in inputs]),
        "extra_peak_with_gradients": memory.peak(),
        "logits": 2 * pairs * length * vocab * 4,
    }
