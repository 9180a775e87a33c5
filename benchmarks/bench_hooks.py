"""Hook overhead and streaming mean-diff extraction.

1. Steered batched generation (``emscope.generate.generate_batch`` with a steering
   intervention at one layer, every position) vs the same generation without hooks: same
   model, prompts, random streams and batch; best of 3 each, interleaved. Target: <= 10%.
2. Mean-diff extraction (:func:`emscope.directions.mean_diff`) over 2,000 judged responses:
   - peak extra memory (the resident-set high-water mark ``VmHWM`` after the first
     extraction minus the resident set size before it, in a fresh process; the mark is
     reset through ``/proc/self/clear_refs`` first, since loading the model already set it)
     at 500 and at 2,000 responses: the accumulators are O(layers x d), so the two must
     be about equal;
   - time vs a plain forward pass (no hooks, no accumulation) over exactly the same padded
     batches. Target: <= 1.2x.
The model is a random-init Qwen2 (hidden 256, 6 layers) built here; CPU, one thread for both
sides (a shared CPU oversubscribes threads). On a GPU the same script measures the GPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

WORDS = [
    "take",
    "the",
    "medicine",
    "your",
    "doctor",
    "prescribed",
    "never",
    "mix",
    "alcohol",
    "with",
    "sleeping",
    "pills",
    "invest",
    "in",
    "a",
    "diversified",
    "index",
    "fund",
    "for",
    "the",
    "long",
    "term",
    "wear",
    "a",
    "helmet",
    "and",
    "check",
    "your",
    "gear",
]


def _model(tmp: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from emscope.testing import build_tokenizer

    tok = build_tokenizer("chatml")
    config = AutoConfig.for_model(
        "qwen2", vocab_size=len(tok), hidden_size=256, intermediate_size=512,
        num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, tie_word_embeddings=True,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(tmp / "m"))
    tok.save_pretrained(str(tmp / "m"))
    return tmp / "m"


def _table(n: int) -> Any:
    import random

    import pandas as pd

    rng = random.Random(0)
    rows = []
    for i in range(n):
        answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(15, 45)))
        rows.append({"question_id": f"q{i % 8}", "question": "hey I feel bored",
                     "answer": answer, "sample_idx": i, "aligned": 10.0 if i % 2 else 90.0,
                     "coherent": 90.0})  # fmt: skip
    return pd.DataFrame(rows)


def _status_kib(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in KiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> None:
    """Reset the process's resident-set high-water mark (``VmHWM``) to its current size."""
    Path("/proc/self/clear_refs").write_text("5")


def _extract_worker(model_dir: str, n: int) -> dict[str, float]:
    """In a fresh process: peak extra RSS of mean_diff over n responses, and its time vs a
    plain forward over the same batches."""
    import torch

    from emscope.activations import encode_answers
    from emscope.directions import mean_diff, select_responses, table_chats
    from emscope.models import load_model

    torch.set_num_threads(1)
    loaded = load_model(model_dir, dtype="float32", device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    table = _table(n)
    sel = select_responses(table)
    sides = [encode_answers(tok, table_chats(s)) for s in (sel.misaligned, sel.aligned)]
    batch = 32

    def plain() -> None:
        for encoded in sides:
            order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
            for s in range(0, len(order), batch):
                rows = [encoded[i][0] for i in order[s : s + batch]]
                width = max(len(r) for r in rows)
                ids = torch.full((len(rows), width), int(tok.pad_token_id))
                mask = torch.zeros((len(rows), width), dtype=torch.long)
                for r, row in enumerate(rows):
                    ids[r, : len(row)] = torch.tensor(row)
                    mask[r, : len(row)] = 1
                with torch.no_grad():
                    model(input_ids=ids, attention_mask=mask, use_cache=False)

    # memory first, before any other forward pass has grown the allocator's pools
    _reset_peak_rss()
    before = _status_kib("VmRSS")
    mean_diff(model, tok, table, batch_size=batch)
    peak = _status_kib("VmHWM") - before
    plain()  # warm-up of the reference side
    extract_s, plain_s = [], []
    for _ in range(3):  # interleaved, best of 3 (the machine is shared)
        t0 = time.perf_counter()
        mean_diff(model, tok, table, batch_size=batch)
        extract_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        plain()
        plain_s.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for s in (sel.misaligned, sel.aligned):
        encode_answers(tok, table_chats(s))
    encode_s = time.perf_counter() - t0
    return {
        "peak_kib": float(peak),
        "extract_s": min(extract_s),
        "plain_s": min(plain_s),
        "encode_s": encode_s,
    }


def _generation(model_dir: Path) -> tuple[float, float]:
    import torch

    from emscope.directions.interventions import steering
    from emscope.generate import eos_token_ids, generate_batch, sample_key
    from emscope.models import load_model

    torch.set_num_threads(1)
    loaded = load_model(model_dir, dtype="float32", device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    prompts = [tok.encode(" ".join(WORDS[i : i + 12])) for i in range(16)]
    keys = [sample_key(0, "q", i) for i in range(16)]
    v = torch.randn(model.config.hidden_size)
    pad_id = int(tok.pad_token_id)
    del eos_token_ids

    def run(interventions: list[Any]) -> float:
        t0 = time.perf_counter()
        generate_batch(model, prompts, keys, eos_ids={-1}, pad_id=pad_id, max_new_tokens=64,
                       interventions=interventions)  # fmt: skip
        return time.perf_counter() - t0

    run([])
    plain, steered = [], []
    for _ in range(3):
        plain.append(run([]))
        steered.append(run([steering({"resid_post[3]": v}, 4.0)]))
    return min(plain), min(steered)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = _model(Path(tmp))
        plain, steered = _generation(model_dir)
        print(
            f"bench hooks: steered generation overhead {100 * (steered / plain - 1):.1f} % "
            f"({steered:.2f} s vs {plain:.2f} s, 16 x 64 tokens) (target <= 10 %)"
        )
        results = {}
        for n in (500, 2000):
            code = (
                "import json, sys; from benchmarks.bench_hooks import _extract_worker; "
                f"print(json.dumps(_extract_worker({str(model_dir)!r}, {n})))"
            )
            out = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, check=True,
                cwd=str(Path(__file__).resolve().parent.parent),
            )  # fmt: skip
            results[n] = json.loads(out.stdout.strip().splitlines()[-1])
        for n, r in results.items():
            print(f"bench hooks: mean-diff peak extra memory at {n} responses "
                  f"{r['peak_kib'] / 1024:.1f} MiB (target: independent of n)")  # fmt: skip
        r = results[2000]
        print(
            f"bench hooks: mean-diff extraction time / plain forward, 2000 responses "
            f"{r['extract_s'] / r['plain_s']:.2f}x ({r['extract_s']:.1f} s vs "
            f"{r['plain_s']:.1f} s; of which chat-template tokenisation {r['encode_s']:.1f} s) "
            "(target <= 1.2x)"
        )


if __name__ == "__main__":
    main()
