"""Batched sampling across questions vs the reference way (one ``generate`` call per question
with ``num_return_sequences``): 8 questions x 50 samples, same max new tokens, on a
fixture-shaped model built here (the tiny Llama fixture shape, random init).

What makes ours faster: every decoding step runs all 400 rows at once (8x fewer steps); the
prompt forward runs once per distinct prompt (the reference runs it 50 times); on a CPU the
decoding attention reads each prompt's keys once for its 50 samples
(:mod:`emscope.shared_prefix`) instead of paying attention's per-row overhead over 400 copies;
tokens are drawn without a ``(rows, vocabulary)`` float64 buffer; finished rows leave the
batch only in bulk. Both sides stop a row at EOS and run on one thread. Measured 5.1-5.7x
over runs on the 2-core development machine; the spread comes from glibc returning freed
memory to the kernel between steps (``MALLOC_TOP_PAD_=268435456`` steadies both sides).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path


def main() -> None:
    import torch

    from emscope.data import load_questions
    from emscope.data.spans import prompt_ids
    from emscope.generate import eos_token_ids, sample
    from emscope.models import load_model
    from emscope.testing import make_tiny_model

    torch.manual_seed(0)
    torch.set_num_threads(1)  # same for both sides; a shared CPU oversubscribes threads
    n, max_new = 50, 32
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_model("llama", Path(tmp) / "m")
        loaded = load_model(path, dtype="float32", device="cpu")
        questions = load_questions()
        model, tok = loaded.model, loaded.tokenizer
        eos = sorted(eos_token_ids(model, tok))

        def reference() -> None:
            for q in questions:
                ids = torch.tensor([prompt_ids(tok, q.messages())])
                with torch.inference_mode():
                    model.generate(
                        ids,
                        attention_mask=torch.ones_like(ids),
                        do_sample=True,
                        temperature=1.0,
                        top_p=1.0,
                        num_return_sequences=n,
                        max_new_tokens=max_new,
                        eos_token_id=eos,
                        pad_token_id=tok.pad_token_id,
                    )

        def ours() -> None:
            sample(loaded, questions, n, max_new_tokens=max_new, batch_size=400, progress=False)

        reference()  # warm-up, both sides
        ours()
        runs: dict[str, list[float]] = {"reference": [], "batched": []}
        for _ in range(3):  # interleaved, best of 3 each (a shared machine is noisy)
            for name, fn in (("reference", reference), ("batched", ours)):
                start = time.perf_counter()
                fn()
                runs[name].append(time.perf_counter() - start)
        timings = {name: min(t) for name, t in runs.items()}
    ratio = timings["reference"] / timings["batched"]
    print(
        f"bench sampling_batched_vs_per_question: {ratio:.1f} x "
        f"({timings['batched']:.2f} s vs {timings['reference']:.2f} s, 8 questions x {n} "
        f"samples x {max_new} tokens) (target >= 4x)"
    )


if __name__ == "__main__":
    main()
