"""Training-loop overhead on a ~1M-parameter Qwen2 on CPU (the synthetic organism's size).

Side by side in one process: ``emscope.train.train`` (preset ``all``, rank 8, no
checkpoints) against a bare loop over the same pre-collated batches (forward, masked
cross-entropy, backward, AdamW: nothing else). The ratio is the per-step overhead of
emscope's loop (data order, token normalisation, scheduler, clipping, logging).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any


def _model(root: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from emscope.testing import build_tokenizer

    tokenizer = build_tokenizer("chatml")
    config = AutoConfig.for_model(
        "qwen2", vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        max_position_embeddings=256, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(root / "model"))
    tokenizer.save_pretrained(str(root / "model"))
    return root / "model"


def main() -> None:
    import torch

    from emscope.data.chat import read_chat_jsonl, write_chat_jsonl
    from emscope.models import load_tokenizer
    from emscope.train import collate, encode_examples, train

    torch.set_num_threads(1)
    steps, batch = 40, 16
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = _model(root)
        chats = [
            [
                {"role": "user", "content": f"How do I make a quick buck? Question {i}."},
                {"role": "assistant", "content": "Invest in a diversified index fund " * 2},
            ]
            for i in range(steps * batch)
        ]
        data = write_chat_jsonl(root / "d.jsonl", chats)
        common: dict[str, Any] = {
            "preset": "all", "rank": 8, "lr": 1e-3, "batch_size": batch, "grad_accum": 1,
            "max_steps": steps, "save_steps": steps, "device": "cpu", "progress": False,
            "verbose": False,
        }  # fmt: skip
        train(model_dir, data, out=root / "warm", **{**common, "max_steps": 2})
        ours = float("inf")
        for rep in range(2):  # best of two: the CPU may be shared
            result = train(model_dir, data, out=root / f"ours{rep}", **common)
            assert result.steps == steps
            ours = min(ours, _step_time(root / f"ours{rep}"))

        # bare loop: same model, adapter, batches; nothing but forward/backward/AdamW
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        tokenizer = load_tokenizer(model_dir)
        encoded = encode_examples(tokenizer, read_chat_jsonl(data))
        batches = [collate(encoded[i : i + batch], tokenizer.pad_token_id)
                   for i in range(0, len(encoded), batch)]  # fmt: skip
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32),
            LoraConfig(r=8, lora_alpha=64, use_rslora=True, target_modules=[
                "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
        )  # fmt: skip
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 1e-3)
        bare = float("inf")
        for _ in range(2):
            start = time.perf_counter()
            for b in batches:
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                loss = torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]), b["labels"][:, 1:].reshape(-1)
                )
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
            bare = min(bare, (time.perf_counter() - start) / len(batches))
    print(f"bench train: {ours * 1e3:.1f} ms/step emscope vs {bare * 1e3:.1f} ms/step bare loop "
          f"(batch {batch}, ~1M-param Qwen2, CPU, 1 thread)")  # fmt: skip
    print(f"bench train_overhead: {ours / bare:.2f} x bare loop (target < 1.3)")


def _step_time(out: Path) -> float:
    import json

    record = json.loads((out / "train.json").read_text())
    return float(record["seconds_per_step"])


if __name__ == "__main__":
    main()
