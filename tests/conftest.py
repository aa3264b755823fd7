import pytest
import torch

import selftune as st
from selftune.data import load_dataset


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits")


@pytest.fixture
def space3():
    return st.Space([st.Float("d0", 0.0, 0.95, init=0.6), st.Float("d1", 0.0, 0.95, init=0.6),
                     st.Float("wd", 1e-6, 1e-1, init=1e-4, log=True)])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
