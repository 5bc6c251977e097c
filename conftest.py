"""How pytest runs the tests: in two processes (pytest-xdist, set in pytest.ini), each computing on one thread.

On a 2-core machine two test processes of one thread each finish the suite in about half the time of one process
of two threads: the tests' tensors are small, and a second thread on each of them mostly waits. OMP_NUM_THREADS
also reaches the processes the tests start (train.py, compare.py's workers, torchrun's ranks), so a run in a test
and the same run in a subprocess compute in the same order, bit for bit.

The tests that share a costly module fixture (a torchrun launch, the demo's run) run in one process, so that it is
computed once.
"""

import os

os.environ["OMP_NUM_THREADS"] = "1"  # before any test module imports torch

import pytest

SHARED_FIXTURES = ("two_ranks", "lora_run", "tiny_run", "two_checkpoints")  # the two_ranks fixture takes lora_run's


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    for item in items:
        shared = [name for name in SHARED_FIXTURES if name in item.fixturenames]
        if shared:
            item.add_marker(pytest.mark.xdist_group("two_ranks" if "lora_run" in shared else shared[0]))
