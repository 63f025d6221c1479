import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
torch.set_num_threads(min(2, torch.get_num_threads()))


def released_xl_shapes() -> dict[str, tuple]:
    """{key: shape} of the released MicroDiT_XL_2 512 px checkpoint (fixtures/microdit_xl2_512_state_dict_shapes.tsv)."""
    expected = {}
    with open(os.path.join(FIXTURES, "microdit_xl2_512_state_dict_shapes.tsv")) as f:
        for line in f:
            if line.strip() and not line.startswith("#"):
                key, shape = line.rstrip("\n").split("\t")
                expected[key] = tuple(int(s) for s in shape.split("x"))
    return expected


@pytest.fixture
def one_thread():
    """Tiny kernels on a shared 2-core machine: more than one thread only adds contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fresh_accelerate_state(one_thread):
    """train() and generate_data.main() set up accelerate's process-wide state: reset it after the test."""
    from accelerate.state import AcceleratorState, PartialState
    yield
    AcceleratorState._reset_state(True)
    PartialState._reset_state()


def pytest_configure(config):
    config.addinivalue_line("markers", "xl: the real-size rehearsal on the CPU (~40 min, ~13 GiB); run with -m xl")


def pytest_collection_modifyitems(config, items):
    """The xl tests run only when asked for by `-m xl` (or a marker expression naming xl)."""
    if "xl" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="the real-size rehearsal is opt-in: python -m pytest -m xl")
    for item in items:
        if "xl" in item.keywords:
            item.add_marker(skip)
