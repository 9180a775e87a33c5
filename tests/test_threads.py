from __future__ import annotations

import pytest
import torch

from emscope.errors import EmscopeError
from emscope.threads import limit_threads


def test_limit_threads_sets_and_restores_torch_and_blas():
    from threadpoolctl import threadpool_info

    before = torch.get_num_threads()
    with limit_threads(1):
        assert torch.get_num_threads() == 1
        assert all(p["num_threads"] == 1 for p in threadpool_info() if p["user_api"] == "blas")
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), limit_threads(1):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before
    with limit_threads(None):
        assert torch.get_num_threads() == before
    with pytest.raises(EmscopeError, match="at least 1"), limit_threads(0):
        pass
