import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    # tiny matmuls on a shared 2-core box: more threads only spin and wait on each other
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
