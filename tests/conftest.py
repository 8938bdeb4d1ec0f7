"""Test markers: GPU-only tests are skipped here, by marker, never by an import error.

  @pytest.mark.gpu     needs a CUDA device
  @pytest.mark.kernel  needs gate._C built for the CUDA device present (implies gpu)
No device is queried at import time: the checks run when the tests are collected.
"""

import pytest
import torch


def _skip_reason(item) -> str | None:
    needs_kernel = item.get_closest_marker("kernel") is not None
    needs_gpu = needs_kernel or item.get_closest_marker("gpu") is not None
    if needs_gpu and not torch.cuda.is_available():
        return "needs a CUDA GPU"
    if needs_kernel:
        from gate import ops

        if not ops.extension_available():
            return f"gate._C is not built: {ops.extension_error()}"
        if ops.backend_for(torch.device("cuda"), torch.bfloat16) != "moegate":
            return "gate._C holds no machine code for this GPU"
    return None


def pytest_collection_modifyitems(config, items):
    for item in items:
        reason = _skip_reason(item)
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def cuda_device():
    return torch.device("cuda")
