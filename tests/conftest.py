import os

import pytest
import torch

# Set in this process by in-process training runs (training.distributed.setup_distributed). A subprocess that
# inherits them would join this process's rendezvous port instead of starting its own group.
_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _no_inherited_rendezvous():
    for key in _DIST_ENV:
        os.environ.pop(key, None)
    yield
