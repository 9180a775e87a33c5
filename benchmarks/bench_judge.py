"""Concurrent judging (``OpenAIJudge``, 32 requests in flight) vs sequential judging (the
reference approach: one request at a time), 400 rows against a loopback chat-completions
server that answers each request in 50 ms. The score cache is off for both."""

from __future__ import annotations

import os
import time


def main() -> None:
    from emscope.judge.loopback import LoopbackServer, fixed_responder
    from emscope.judge.openai_judge import OpenAIJudge

    os.environ.setdefault("EMSCOPE_BENCH_KEY", "sk-bench")
    rows = [{"question_id": "q", "question": "Q?", "answer": f"answer {i}"} for i in range(400)]
    timings = {}
    with LoopbackServer(fixed_responder([("80", 0.9), ("90", 0.1)]), delay=0.05) as server:
        for name, concurrency in (("sequential", 1), ("concurrent", 32)):
            judge = OpenAIJudge(
                "bench",
                base_url=server.base_url,
                api_key_env="EMSCOPE_BENCH_KEY",
                concurrency=concurrency,
                cache=False,
            )
            start = time.perf_counter()
            scores = judge.score(rows, "aligned")
            timings[name] = time.perf_counter() - start
            assert all(s.value is not None for s in scores)
    ratio = timings["sequential"] / timings["concurrent"]
    print(
        f"bench judge_concurrent_vs_sequential: {ratio:.1f} x "
        f"({timings['concurrent']:.2f} s vs {timings['sequential']:.2f} s, 400 rows, 50 ms "
        "per request) (target >= 15x)"
    )


if __name__ == "__main__":
    main()
