"""Concurrent judging (``OpenAIJudge``, 32 requests in flight) vs sequential judging (the
reference approach: one request at a time), 400 rows against a loopback chat-completions
server that answers each request in 50 ms. The score cache is off for both.

The server runs in its own process, as a real endpoint would: in this process its
threads would take the interpreter lock from the client for every request it parses and
answers (measured 13-19x that way, 20-24x with the server apart).
"""

from __future__ import annotations

import multiprocessing
import os
import time
from multiprocessing.queues import Queue
from typing import Any


def _serve(urls: Queue[Any], stop: Any) -> None:
    """Child process: run the loopback server, report its URL, wait for ``stop``."""
    from emscope.judge.loopback import LoopbackServer, fixed_responder

    with LoopbackServer(fixed_responder([("80", 0.9), ("90", 0.1)]), delay=0.05) as server:
        urls.put(server.base_url)
        stop.wait(600)


def main() -> None:
    from emscope.judge.openai_judge import OpenAIJudge

    os.environ.setdefault("EMSCOPE_BENCH_KEY", "sk-bench")
    rows = [{"question_id": "q", "question": "Q?", "answer": f"answer {i}"} for i in range(400)]
    timings = {}
    context = multiprocessing.get_context("spawn")
    urls: Queue[Any] = context.Queue()
    stop = context.Event()
    server = context.Process(target=_serve, args=(urls, stop), daemon=True)
    server.start()
    try:
        base_url = urls.get(timeout=60)
        for name, concurrency in (("sequential", 1), ("concurrent", 32)):
            judge = OpenAIJudge(
                "bench",
                base_url=base_url,
                api_key_env="EMSCOPE_BENCH_KEY",
                concurrency=concurrency,
                cache=False,
            )
            start = time.perf_counter()
            scores = judge.score(rows, "aligned")
            timings[name] = time.perf_counter() - start
            assert all(s.value is not None for s in scores)
    finally:
        stop.set()
        server.join(10)
    ratio = timings["sequential"] / timings["concurrent"]
    print(
        f"bench judge_concurrent_vs_sequential: {ratio:.1f} x "
        f"({timings['concurrent']:.2f} s vs {timings['sequential']:.2f} s, 400 rows, 50 ms "
        "per request, server in its own process) (target >= 15x)"
    )


if __name__ == "__main__":
    main()
