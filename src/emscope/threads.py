"""One thread-count convention: :func:`limit_threads` runs a block with a given number of
torch intra-op threads and BLAS threads (threadpoolctl, a scikit-learn dependency), and
restores both after. ``None`` leaves both as they are. On a busy or shared machine one
thread is often much faster than oversubscribed ones; results do not depend on it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager


@contextmanager
def limit_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` torch threads (``torch.set_num_threads``) and BLAS
    threads (``threadpoolctl.threadpool_limits``); restored after, also on an error. None:
    leave both as they are."""
    if threads is None:
        yield
        return
    if threads < 1:
        from emscope.errors import EmscopeError

        raise EmscopeError(f"threads must be at least 1, got {threads}")
    import torch

    previous = torch.get_num_threads()
    with ExitStack() as stack:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # pragma: no cover - installed with scikit-learn
            pass
        else:
            stack.enter_context(threadpool_limits(limits=threads, user_api="blas"))
        torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.set_num_threads(previous)
