"""How pytest runs the tests: in two processes (pytest-xdist, set in pytest.ini), each computing on one thread, offline.

On a 2-core machine two test processes of one thread each finish the suite in about half the time of one process
of two threads: the tests' tensors are small, and a second thread on each of them mostly waits. OMP_NUM_THREADS
also reaches the processes the tests start (train.py, compare.py's workers, torchrun's ranks), so a run in a test
and the same run in a subprocess compute in the same order, bit for bit.

The costly runs several test files read (tests/conftest.py: a torchrun launch, the demo's run, ...) are made once
per test process; the tests that read one run in the same process, so that it is made once in all. The slow tests
(marked slow: each starts fresh Python processes) are handed out after the method's facts, which run beside the
torchrun launch, and before the rest, so that the suite does not end on one of them while the other process waits.
"""

import os

os.environ["OMP_NUM_THREADS"] = "1"  # before any test module imports torch
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never download anything

import pytest

# The two_ranks fixture takes lora_run's.
SHARED_FIXTURES = ("two_ranks", "lora_run", "tiny_run", "two_checkpoints", "stopped_run")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    for item in items:
        names = set(item.fixturenames)
        if hasattr(item, "callspec"):  # a parameter may name the fixture a test asks for (request.getfixturevalue)
            names |= {value for value in item.callspec.params.values() if isinstance(value, str)}
        shared = [name for name in SHARED_FIXTURES if name in names]
        if shared:
            item.add_marker(pytest.mark.xdist_group("two_ranks" if "lora_run" in shared else shared[0]))
        if "two_ranks" in names:  # its torchrun launch
            item.add_marker(pytest.mark.slow)
    # After the groups (handed out first, the largest first): the method's facts, then the slow tests, then the rest,
    # each in the files' order. The torchrun launch keeps both cores busy for its first minute, so what runs beside it
    # should be light; a slow test at the very end would leave the other process idle.
    items.sort(key=lambda item: (not item.nodeid.startswith("test_epsdpo.py"), not item.get_closest_marker("slow")))
