import pytest
import torch


def cuda_ready() -> bool:
    if not torch.cuda.is_available():
        return False
    from localgp import ops

    return ops.has_cuda_kernels()


requires_cuda = pytest.mark.requires_cuda


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU and localgp's CUDA kernels")
    for item in items:
        if "requires_cuda" in item.keywords and not cuda_ready():
            item.add_marker(skip)


# The same tests run on CPU always and on CUDA wherever a GPU is present.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.requires_cuda)]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)
