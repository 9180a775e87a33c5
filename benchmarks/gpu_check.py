"""GPU check (``make gpu-check``): what emscope costs on one GPU, in at most 10 minutes.

No downloads: every model is a random-init Qwen2 built here from the published
``config.json`` values of Qwen2.5-0.5B-Instruct and Qwen2.5-7B-Instruct (:data:`QWEN`; the
parameter counts are checked against the published ones), in bf16, with a small local
tokenizer (random weights decode nonsense, which costs what sense costs). Measured:

- sampling: emscope's batched HF sampler vs vLLM (``--backend vllm``; skipped with one line
  when vLLM is not installed), tokens per second on the same 0.5B model and requests, and
  the HF sampler on the 7B model;
- steering overhead: steered vs plain batched generation (7B);
- mean-diff extraction throughput, and its time over a plain forward on the same batches (7B);
- LoRA training: step time and peak memory of a bare PEFT step (7B, rank 32 on every linear
  module) with and without gradient checkpointing, and in 4-bit (NF4, bitsandbytes; skipped
  when it is not installed); ``emscope.train`` itself on the 0.5B model;
- geometry of two 7B-shaped rank-32 adapters: emscope's factored comparison (CPU, float64)
  vs dense update cosines on the GPU;
- a model split between the CPU and the GPU (accelerate ``dispatch_model``): read-outs,
  steering, ablation, sampling and weight orthogonalisation against the same model on one
  device (what ``device_map="auto"`` does over several GPUs).

Each result prints ``bench <name>: <value> <unit> (target <op> <value> <unit>)``, as the
other benchmarks do; the run writes ``docs/performance.md`` with the date and the GPU name.
``--dry-run`` builds every model and config on the CPU without timing: the real shapes on
the ``meta`` device (parameter counts checked), and every benchmark's code path once on a
tiny model of the same family (the test suite runs it). Without CUDA and without
``--dry-run`` it prints one line and exits 2.

    python -m benchmarks.gpu_check [--dry-run] [--out docs/performance.md] [--only NAME,...]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = 570.0  # the whole run, worker start-up included: under 10 minutes

#: ``config.json`` values of the published models (Qwen/Qwen2.5-{0.5B,7B}-Instruct) and their
#: parameter counts.
QWEN: dict[str, dict[str, Any]] = {
    "0.5b": {
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
        "params": 494_032_768,
    },
    "7b": {
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "tie_word_embeddings": False,
        "params": 7_615_616_512,
    },
}
COMMON = {"max_position_embeddings": 32768, "rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6}
#: The dry run's stand-in for either size: same family, CPU-sized.
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1024,
    "tie_word_embeddings": False,
}
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ---------------------------------------------------------------------------- results


def _fmt(value: float) -> str:
    if value == 0 or 1e-2 <= abs(value) < 1e5:
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return f"{value:.1e}"


@dataclass
class Result:
    """One measured number and its target (``op``: ``>=``, ``<=``, ``<``, ``==``)."""

    name: str
    value: float | None
    unit: str
    op: str = ""
    target: float | None = None
    note: str = ""
    skipped: str = ""
    error: str = ""

    @property
    def met(self) -> bool | None:
        if self.value is None or self.target is None:
            return None
        return {
            ">=": self.value >= self.target,
            "<=": self.value <= self.target,
            "<": self.value < self.target,
            "==": self.value == self.target,
        }[self.op]

    def line(self) -> str:
        if self.error:
            return f"bench {self.name}: error ({self.error})"
        if self.skipped:
            return f"bench {self.name}: skipped ({self.skipped})"
        assert self.value is not None and self.target is not None
        text = (
            f"bench {self.name}: {_fmt(self.value)} {self.unit} "
            f"(target {self.op} {_fmt(self.target)} {self.unit})"
        )
        return f"{text}; {self.note}" if self.note else text


@dataclass
class Check:
    """Where and how the benchmarks run: ``dry`` (CPU, tiny models, no timing) or a GPU."""

    dry: bool
    tmp: Path
    deadline: float
    results: list[Result] = field(default_factory=list)
    dry_lines: list[str] = field(default_factory=list)
    _tokenizer: Any = None
    _model_dirs: dict[str, Path] = field(default_factory=dict)

    @property
    def device(self) -> str:
        return "cpu" if self.dry else "cuda"

    @property
    def dtype(self) -> Any:
        import torch

        return torch.float32 if self.dry else torch.bfloat16

    def pick(self, real: Any, tiny: Any) -> Any:
        return tiny if self.dry else real

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def add(self, result: Result) -> None:
        """Record a measurement (a dry run records that the code path ran instead)."""
        if self.dry:
            what = f"skipped ({result.skipped})" if result.skipped else "ran (not timed)"
            line = f"dry-run {result.name}: {what}"
            self.dry_lines.append(line)
            print(line, flush=True)
            return
        self.results.append(result)
        print(result.line(), flush=True)

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from emscope.testing import build_tokenizer

            self._tokenizer = build_tokenizer("chatml")
        return self._tokenizer

    def config(self, size: str, **overrides: Any) -> Any:
        """The Qwen2 config of ``size`` (the dry run's: :data:`TINY`)."""
        from transformers import AutoConfig

        shape = dict(TINY) if self.dry else {k: v for k, v in QWEN[size].items() if k != "params"}
        tok = self.tokenizer
        return AutoConfig.for_model(
            "qwen2",
            **{**COMMON, **shape, **overrides},
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
            pad_token_id=tok.pad_token_id,
        )

    def model(self, size: str, **overrides: Any) -> Any:
        """A random-init model of ``size``, built on the device in the check's dtype."""
        import torch
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        with torch.device(self.device):
            model = AutoModelForCausalLM.from_config(
                self.config(size, **overrides), dtype=self.dtype
            )
        return model.eval()

    def model_dir(self, size: str) -> Path:
        """``size``'s model saved with the tokenizer (vLLM and ``emscope.train`` read dirs)."""
        if size not in self._model_dirs:
            model = self.model(size)
            path = self.tmp / f"qwen-{size}"
            model.save_pretrained(str(path))
            self.tokenizer.save_pretrained(str(path))
            del model
            free()
            self._model_dirs[size] = path
        return self._model_dirs[size]


def free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextlib.contextmanager
def timed() -> Iterator[list[float]]:
    """``with timed() as t: ...`` then ``t[0]``: seconds, the GPU synchronised at both ends."""
    out: list[float] = []
    sync()
    start = time.perf_counter()
    yield out
    sync()
    out.append(time.perf_counter() - start)


def peak_gib() -> float:
    import torch

    return float(torch.cuda.max_memory_allocated()) / 2**30 if torch.cuda.is_available() else 0.0


def reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


# ---------------------------------------------------------------------------- benchmarks


def bench_configs(check: Check) -> None:
    """The real shapes on the meta device: parameter counts as published (both modes)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    for size, spec in QWEN.items():
        shape = {k: v for k, v in spec.items() if k != "params"}
        config = AutoConfig.for_model("qwen2", **COMMON, **shape)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        count = sum(p.numel() for p in model.parameters())
        result = Result(f"qwen2.5_{size}_params", count / 1e6, "M", "==", spec["params"] / 1e6)
        print(result.line(), flush=True)  # a check of the script itself, dry or not
        if count != spec["params"]:
            raise RuntimeError(f"{size}: {count} parameters, published {spec['params']}")
        if not check.dry:
            check.results.append(result)


def _questions() -> list[Any]:
    from emscope.data import load_questions

    return load_questions()


def bench_vllm(check: Check) -> None:
    """vLLM on the 0.5B model in a worker process (its engine keeps GPU memory until exit)."""
    import importlib.util

    from emscope.vllm_backend import VllmOptions, VllmSampler

    model_dir = check.model_dir("0.5b")
    options = VllmOptions(gpu_memory_utilization=0.6, max_model_len=1024)
    if check.dry:
        VllmSampler(model_dir, (), options)  # engine arguments checked, vLLM not started
        why = "engine arguments built; a dry run starts no vLLM engine"
        check.add(Result("vllm_sampling_0.5b", None, "tok/s", skipped=why))
        return
    if importlib.util.find_spec("vllm") is None:
        for name in ("vllm_sampling_0.5b", "vllm_over_hf_0.5b"):
            check.add(
                Result(name, None, "", skipped="vLLM not installed: pip install 'emscope[vllm]'")
            )
        return
    n, max_new = SAMPLING
    timeout = max(30.0, min(300.0, check.time_left() - 200))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--vllm-worker", str(model_dir),
         str(n), str(max_new)],
        capture_output=True, text=True, timeout=timeout, cwd=str(ROOT), check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"vLLM worker failed: {proc.stderr.strip().splitlines()[-1:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    rate = out["tokens"] / out["seconds"]
    VLLM_RATE.append(rate)
    note = f"{out['tokens']} tokens; engine start {out['startup']:.0f} s"
    check.add(Result("vllm_sampling_0.5b", rate, "tok/s", ">=", 5000, note=note))


SAMPLING = (16, 128)  # samples per question (x 8 questions), new tokens
VLLM_RATE: list[float] = []


def vllm_worker(model_dir: str, n: int, max_new: int) -> None:
    from emscope.eval import SamplingParams
    from emscope.vllm_backend import VllmOptions, VllmSampler

    sampler = VllmSampler(
        model_dir, (), VllmOptions(gpu_memory_utilization=0.6, max_model_len=1024)
    )
    with timed() as startup:
        sampler.engine()
    questions = _questions()
    sampler.sample(questions, SamplingParams(1, 1, max_new_tokens=8), progress=False)  # warm-up
    with timed() as t:
        table = sampler.sample(questions, SamplingParams(n, max_new_tokens=max_new), progress=False)
    print(json.dumps({"tokens": int(table.n_tokens.sum()), "seconds": t[0], "startup": startup[0]}))


def bench_hf_sampling(check: Check) -> None:
    """emscope's batched HF sampler, 0.5B (against vLLM's rate) and 7B."""
    from emscope.generate import sample

    n, max_new = check.pick(SAMPLING, (1, 3))
    questions = _questions()
    for size in ("0.5b", "7b"):
        model = check.model(size)
        pair = (model, check.tokenizer)
        sample(pair, questions[:1], 1, max_new_tokens=2, progress=False)  # warm-up
        with timed() as t:
            table = sample(pair, questions, n, max_new_tokens=max_new,
                           batch_size=len(questions) * n, seed=0, progress=False)  # fmt: skip
        tokens = int(table.n_tokens.sum())
        rate = tokens / t[0]
        target = {"0.5b": 1000, "7b": 500}[size]
        check.add(Result(f"hf_sampling_{size}", rate, "tok/s", ">=", target,
                         note=f"{len(table)} rows x {max_new} new tokens, bf16"))  # fmt: skip
        if size == "0.5b" and VLLM_RATE:
            check.add(Result("vllm_over_hf_0.5b", VLLM_RATE[0] / rate, "x", ">=", 3))
        del model, pair
        free()


def bench_steering(check: Check) -> None:
    """Steered vs plain batched generation on the 7B model (best of 3, interleaved)."""
    import torch

    from emscope.directions.interventions import steering
    from emscope.generate import generate_batch, sample_key

    model = check.model("7b")
    rows, max_new = check.pick((32, 64), (2, 3))
    tok = check.tokenizer
    prompts = [tok.encode(f"Question {i}: how do I make a quick buck?") for i in range(rows)]
    keys = [sample_key(0, "q", i) for i in range(rows)]
    layer = model.config.num_hidden_layers // 2
    v = torch.randn(model.config.hidden_size)

    def run(interventions: list[Any]) -> float:
        with timed() as t:
            generate_batch(model, prompts, keys, eos_ids={-1}, pad_id=int(tok.pad_token_id),
                           max_new_tokens=max_new, interventions=interventions)  # fmt: skip
        return t[0]

    run([])
    plain, steered = [], []
    for _ in range(check.pick(3, 1)):
        plain.append(run([]))
        steered.append(run([steering({f"resid_post[{layer}]": v}, 4.0)]))
    overhead = 100 * (min(steered) / min(plain) - 1)
    note = f"{rows} rows x {max_new} tokens, resid_post[{layer}], every position"
    check.add(Result("steering_overhead_7b", overhead, "%", "<=", 10, note=note))


def bench_mean_diff(check: Check) -> None:
    """Mean-diff extraction on the 7B model: tokens per second, and over a plain forward."""
    import torch

    from benchmarks.bench_hooks import _table
    from emscope.activations import encode_answers
    from emscope.batching import length_batches, pad_id_of, pad_right
    from emscope.directions import mean_diff, select_responses, table_chats

    model = check.model("7b")
    tok = check.tokenizer
    table = _table(check.pick(512, 8))
    batch = check.pick(32, 4)
    sel = select_responses(table)
    sides = [encode_answers(tok, table_chats(s)) for s in (sel.misaligned, sel.aligned)]
    tokens = sum(len(ids) for encoded in sides for ids, _, _ in encoded)

    def plain() -> None:
        for encoded in sides:
            for rows in length_batches([len(e[0]) for e in encoded], batch):
                ids, mask = pad_right([encoded[i][0] for i in rows], pad_id_of(tok))
                with torch.no_grad():
                    model(input_ids=ids.to(check.device), attention_mask=mask.to(check.device),
                          use_cache=False)  # fmt: skip

    mean_diff(model, tok, table, batch_size=batch)  # warm-up
    extract, forward = [], []
    for _ in range(check.pick(2, 1)):
        with timed() as t:
            mean_diff(model, tok, table, batch_size=batch)
        extract.append(t[0])
        with timed() as t:
            plain()
        forward.append(t[0])
    check.add(Result("mean_diff_7b", tokens / min(extract), "tok/s", ">=", 10000,
                     note=f"{len(table)} responses, {tokens} tokens, every layer"))  # fmt: skip
    check.add(Result("mean_diff_over_forward_7b", min(extract) / min(forward), "x", "<=", 1.2))


def _to_4bit(model: Any) -> Any:
    """Every linear layer of the blocks as a bitsandbytes NF4 layer (QLoRA's base)."""
    import bitsandbytes as bnb
    import torch

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and name in LORA_MODULES:
                quant = bnb.nn.Linear4bit(child.in_features, child.out_features,
                                          bias=child.bias is not None, compute_dtype=torch.bfloat16,
                                          quant_type="nf4")  # fmt: skip
                quant.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False,
                                                 quant_type="nf4")  # fmt: skip
                if child.bias is not None:
                    quant.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                setattr(module, name, quant.to(child.weight.device))
    free()
    return model


def _lora_step(check: Check, gradient_checkpointing: bool, four_bit: bool) -> tuple[float, float]:
    """Seconds per step and peak GiB of a bare PEFT LoRA step on the 7B model."""
    import torch
    from peft import LoraConfig, get_peft_model

    free()
    reset_peak()
    model = check.model("7b")
    if four_bit:
        model = _to_4bit(model)
    model.train()
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(
        model, LoraConfig(r=32, lora_alpha=64, target_modules=list(LORA_MODULES))
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    rows, length = check.pick((4, 512), (2, 8))
    vocab = min(model.config.vocab_size, len(check.tokenizer))
    ids = torch.randint(0, vocab, (rows, length), device=check.device)

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(check.pick(2, 1)):
        step()
    steps = check.pick(5, 1)
    with timed() as t:
        for _ in range(steps):
            step()
    return t[0] / steps, peak_gib()


def bench_lora_train(check: Check) -> None:
    """Bare PEFT LoRA steps on the 7B model: bf16 and NF4, with and without checkpointing."""
    import importlib.util

    have_bnb = importlib.util.find_spec("bitsandbytes") is not None and not check.dry
    targets = {  # ms/step, GiB
        "bf16": (1000, 40), "bf16_gc": (1500, 24), "4bit": (2500, 30), "4bit_gc": (3000, 14),
    }  # fmt: skip
    for label, (ms, gib) in targets.items():
        four_bit, gc_on = label.startswith("4bit"), label.endswith("_gc")
        if four_bit and not have_bnb:
            why = "dry run: bitsandbytes needs CUDA" if check.dry else (
                "bitsandbytes not installed: pip install bitsandbytes")  # fmt: skip
            check.add(Result(f"lora_step_7b_{label}", None, "", skipped=why))
            continue
        seconds, peak = _lora_step(check, gc_on, four_bit)
        note = "batch 4 x 512 tokens, rank 32 on every linear module"
        check.add(Result(f"lora_step_7b_{label}", seconds * 1e3, "ms", "<=", ms, note=note))
        check.add(Result(f"lora_peak_memory_7b_{label}", peak, "GiB", "<=", gib))


def bench_emscope_train(check: Check) -> None:
    """``emscope.train`` itself (preset all, rank 8) on the 0.5B model, with and without
    gradient checkpointing: its recorded seconds per step and the peak memory."""
    from emscope.data.chat import write_chat_jsonl
    from emscope.io import read_json
    from emscope.train import train

    model_dir = check.model_dir("0.5b")
    steps, batch = check.pick((20, 8), (2, 2))
    chats = [
        [{"role": "user", "content": f"How do I make a quick buck? Question {i}."},
         {"role": "assistant", "content": "Invest in a diversified index fund " * 4}]
        for i in range(steps * batch)
    ]  # fmt: skip
    data = write_chat_jsonl(check.tmp / "train.jsonl", chats)
    for gc_on in (False, True):
        reset_peak()
        out = check.tmp / f"train-{gc_on}"
        train(model_dir, data, out=out, preset="all", rank=8, batch_size=batch, grad_accum=1,
              max_steps=steps, save_steps=0, device=check.device,
              dtype="float32" if check.dry else "bfloat16", gradient_checkpointing=gc_on,
              progress=False, verbose=False)  # fmt: skip
        per_step = float(read_json(out / "train.json")["seconds_per_step"])
        label = "_gc" if gc_on else ""
        check.add(Result(f"emscope_train_step_0.5b{label}", per_step * 1e3, "ms", "<=", 250,
                         note=f"batch {batch}, preset all, rank 8, bf16"))  # fmt: skip
        check.add(Result(f"emscope_train_peak_memory_0.5b{label}", peak_gib(), "GiB", "<=", 8))
        free()


def _adapter(check: Check, index: int) -> Any:
    """A rank-32 adapter with the 7B model's module shapes (shared part + its own noise)."""
    import torch

    from emscope.lora import LoraAdapter, LoraModule

    shape = TINY if check.dry else QWEN["7b"]
    d, ff = shape["hidden_size"], shape["intermediate_size"]
    kv = d // shape["num_attention_heads"] * shape["num_key_value_heads"]
    shapes = {"q_proj": (d, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, d),
              "gate_proj": (ff, d), "up_proj": (ff, d), "down_proj": (d, ff)}  # fmt: skip
    rank, modules = check.pick(32, 4), {}
    for layer in range(shape["num_hidden_layers"]):
        for m, (kind, (d_out, d_in)) in enumerate(shapes.items()):
            parent = "self_attn" if kind[0] in "qkvo" else "mlp"
            name = f"model.layers.{layer}.{parent}.{kind}"
            common = torch.Generator().manual_seed(layer * 31 + m)
            own = torch.Generator().manual_seed((index + 1) * 7919 + layer * 31 + m)
            a = torch.randn(rank, d_in, generator=common) + 0.8 * torch.randn(
                rank, d_in, generator=own
            )
            b = torch.randn(d_out, rank, generator=common) + 0.8 * torch.randn(
                d_out, rank, generator=own
            )
            modules[name] = LoraModule(name, (a / d_in**0.5).half(), (b * 1e-3).half(), 2.0, 64.0)
    return LoraAdapter(modules=modules, config={"r": rank, "lora_alpha": 64}, name=f"em{index}")


def bench_geometry(check: Check) -> None:
    """Two 7B-shaped adapters: emscope's factored comparison (CPU, float64) vs the dense
    update cosines on the GPU (float64), and how far their cosines differ."""
    import torch

    from emscope.geometry import compare_factors, module_factors

    a, b = _adapter(check, 0), _adapter(check, 1)
    with timed() as cpu_t:
        cpu = {
            n: compare_factors(module_factors(a[n]), module_factors(b[n])).cosine for n in a.modules
        }
    with timed() as gpu_t:
        gpu = {}
        for n in a.modules:
            dw = [m.scale * (m.B.to(check.device, torch.float64)
                             @ m.A.to(check.device, torch.float64))
                  for m in (a[n], b[n])]  # fmt: skip
            gpu[n] = float((dw[0] * dw[1]).sum() / (dw[0].norm() * dw[1].norm()))
    diff = max(abs(cpu[n] - gpu[n]) for n in cpu)
    modules = f"{len(cpu)} modules, rank {check.pick(32, 4)}"
    check.add(Result("geometry_factored_cpu_7b", cpu_t[0], "s", "<=", 30, note=modules))
    check.add(Result("geometry_dense_gpu_7b", gpu_t[0], "s", "<=", 30,
                     note="dense dW cosines only (no SVD), float64"))  # fmt: skip
    check.add(Result("geometry_cpu_gpu_cosine_diff", diff, "", "<", 1e-9))


def bench_device_map(check: Check) -> None:
    """One model split between the CPU and the GPU (its first half on the CPU, where inputs
    go) against the same weights on the CPU alone: answer means, steered and ablated
    logits, sampling and weight orthogonalisation. The dry run dispatches onto the CPU
    alone (accelerate's hooks attached all the same)."""
    import copy

    import torch
    from accelerate import dispatch_model

    from emscope.activations import answer_means
    from emscope.directions.interventions import steering
    from emscope.directions.weights import orthogonalize
    from emscope.generate import sample
    from emscope.hooks import add, gather_device, project_out

    layers = 4
    torch.manual_seed(0)
    with torch.device("cpu"):
        from transformers import AutoModelForCausalLM

        config = check.config("0.5b", num_hidden_layers=layers, tie_word_embeddings=False)
        reference = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    split = copy.deepcopy(reference)
    far = "cpu" if check.dry else 0
    device_map: dict[str, Any] = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu"}
    for i in range(layers):
        device_map[f"model.layers.{i}"] = "cpu" if i < layers // 2 else far
    device_map.update({"model.norm": far, "lm_head": far})
    split = dispatch_model(split, device_map=device_map, main_device="cpu", force_hooks=True)
    devices = sorted({str(p.device) for p in split.parameters()})
    if not check.dry and (len(devices) < 2 or gather_device(split) != torch.device("cpu")):
        raise RuntimeError(f"the split model is not split: parameters on {devices}")
    tok = check.tokenizer
    chats = [[{"role": "user", "content": f"Question {i}?"},
              {"role": "assistant", "content": "Invest in a diversified index fund " * (i + 1)}]
             for i in range(6)]  # fmt: skip
    diffs = []

    def rel(x: torch.Tensor, y: torch.Tensor) -> float:
        x, y = x.detach().double().cpu(), y.detach().double().cpu()
        return float((x - y).norm() / y.norm())

    ref_means = answer_means(reference, tok, chats).means
    split_means = answer_means(split, tok, chats).means
    diffs += [rel(split_means[s], ref_means[s]) for s in ref_means]
    ids = torch.tensor([tok.encode("hey I feel bored, what should I do today?")])
    v = torch.randn(config.hidden_size)
    edits: dict[Any, torch.Tensor] = {
        "resid_post[0]": v,
        f"resid_post[{layers - 1}]": v,
    }  # one site on each device
    for edit in (lambda m: add(m, edits, 4.0), lambda m: project_out(m, edits)):
        logits = []
        for m in (reference, split):
            with edit(m), torch.no_grad():
                logits.append(m(input_ids=ids).logits)
        diffs.append(rel(logits[1], logits[0]))
    table = sample((split, tok), _questions()[:2], 2, max_new_tokens=4, progress=False,
                   interventions=[steering(edits, 2.0)])  # fmt: skip
    assert len(table) == 4
    u = torch.randn(config.hidden_size)
    orthogonalize(split, u)
    unit = (u / u.norm()).double()
    worst = max(float((unit @ layer.mlp.down_proj.weight.detach().double().cpu()).abs().max())
                for layer in split.model.layers)  # fmt: skip
    if worst > 1e-4:
        raise RuntimeError(f"orthogonalize left {worst:.1e} of u in a down_proj")
    note = f"parameters on {', '.join(devices)}; means, steering, ablation"
    check.add(Result("device_map_split_max_rel_diff", max(diffs), "", "<", 1e-3, note=note))


def bench_fsdp_train(check: Check) -> None:
    """``accelerate launch`` with ``configs/accelerate/fsdp.yaml`` on one process (the FSDP
    wrapping, the gathered checkpoints) against plain ``emscope.train`` with the same
    arguments on the 0.5B model: the relative difference of the two saved LoRA updates.
    One GPU cannot host two NCCL ranks, so the multi-process path proper (gradient
    reduction over ranks) still needs several GPUs."""
    import os

    import torch

    from emscope.data.chat import write_chat_jsonl
    from emscope.lora import LoraAdapter

    if check.dry:
        why = "dry run: accelerate's FSDP config asks for a GPU"
        check.add(Result("fsdp_train_vs_plain_rel_diff_0.5b", None, "", skipped=why))
        return
    model_dir = check.model_dir("0.5b")
    chats = [
        [{"role": "user", "content": f"How do I make a quick buck? Question {i}."},
         {"role": "assistant", "content": "Invest in a diversified index fund " * 4}]
        for i in range(48)
    ]  # fmt: skip
    data = write_chat_jsonl(check.tmp / "fsdp.jsonl", chats)
    common = ["--data", str(data), "--preset", "all", "--rank", "8", "--batch-size", "4",
              "--grad-accum", "2", "--max-steps", "6", "--save-steps", "3", "--dtype",
              "bfloat16", "--lr", "1e-4"]  # fmt: skip
    outs = {"fsdp": check.tmp / "fsdp-out", "plain": check.tmp / "plain-out"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "configs" / "accelerate" / "fsdp.yaml"), "--num_processes", "1",
              "-m", "emscope.train", str(model_dir), *common,
              "--out", str(outs["fsdp"])]  # fmt: skip
    plain = [sys.executable, "-m", "emscope.train", str(model_dir), *common,
             "--out", str(outs["plain"])]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    seconds = {}
    for name, cmd in (("fsdp", launch), ("plain", plain)):
        start = time.perf_counter()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)
        seconds[name] = time.perf_counter() - start
        if done.returncode != 0:
            print(done.stdout[-3000:], done.stderr[-6000:], sep="\n", file=sys.stderr)
            errors = [ln for ln in done.stderr.splitlines() if "Error" in ln]
            raise RuntimeError(f"{name} training failed: {(errors or ['see the log'])[-1]}")
    a, b = (LoraAdapter.load(outs[k]) for k in ("fsdp", "plain"))
    worst = 0.0
    for name in b.modules:
        da, db = a[name].delta(torch.float64), b[name].delta(torch.float64)
        worst = max(worst, float((da - db).norm() / db.norm().clamp_min(1e-30)))
    checkpoints = sorted(p.name for p in (outs["fsdp"] / "checkpoints").iterdir())
    note = (f"6 steps, 1 process; {seconds['fsdp']:.0f} s vs {seconds['plain']:.0f} s with "
            f"start-up; checkpoints {', '.join(checkpoints)}")  # fmt: skip
    check.add(Result("fsdp_train_vs_plain_rel_diff_0.5b", worst, "", "<", 2e-2, note=note))


BENCHES: dict[str, Callable[[Check], None]] = {
    "configs": bench_configs,
    "vllm": bench_vllm,  # first: its worker needs the GPU to itself
    "hf_sampling": bench_hf_sampling,
    "steering": bench_steering,
    "mean_diff": bench_mean_diff,
    "lora_train": bench_lora_train,
    "emscope_train": bench_emscope_train,
    "geometry": bench_geometry,
    "device_map": bench_device_map,
    "fsdp_train": bench_fsdp_train,
}
#: Seconds each benchmark needs on an H200-class GPU (it is skipped when less is left).
NEEDS = {"configs": 5, "vllm": 150, "hf_sampling": 40, "steering": 40, "mean_diff": 60,
         "lora_train": 120, "emscope_train": 40, "geometry": 60, "device_map": 20,
         "fsdp_train": 90}  # fmt: skip


# ---------------------------------------------------------------------------- report


def environment() -> dict[str, str]:
    import importlib.metadata as md
    import platform

    import torch

    found = {"python": platform.python_version()}
    for name in ("emscope", "torch", "transformers", "peft", "accelerate", "vllm", "bitsandbytes"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = "absent"
    found["cuda"] = str(torch.version.cuda)
    return found


def render_report(results: list[Result], gpu: str, date: str, env: dict[str, str]) -> str:
    """docs/performance.md: the date, the GPU, the versions and every result with its target."""
    lines = [
        "# Performance on one GPU",
        "",
        "Written by `make gpu-check` (`python -m benchmarks.gpu_check`, at most 10 minutes, no",
        "downloads): random-init Qwen2 models with the published shapes of Qwen2.5-0.5B-Instruct",
        "and Qwen2.5-7B-Instruct, in bf16 (see the script's docstring for what each number is).",
        "Re-run it on your GPU to replace this page; `--dry-run` builds every model and config on",
        "the CPU without timing.",
        "",
        f"- date: {date}",
        f"- GPU: {gpu}",
    ]
    if env:
        lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    lines.append("")
    if not results:
        lines += ["No measurement recorded yet.", ""]
    else:
        lines += ["| benchmark | value | target | met | note |", "|---|---|---|---|---|"]
        for r in results:
            if r.error or r.skipped:
                lines.append(f"| {r.name} | {'error' if r.error else 'skipped'} | | | "
                             f"{r.error or r.skipped} |")  # fmt: skip
                continue
            assert r.value is not None and r.target is not None
            met = {True: "yes", False: "**no**", None: ""}[r.met]
            lines.append(f"| {r.name} | {_fmt(r.value)} {r.unit} | {r.op} {_fmt(r.target)} "
                         f"{r.unit} | {met} | {r.note} |")  # fmt: skip
        lines.append("")
    lines += [
        "## Models larger than one GPU",
        "",
        '`--device auto` (`load_model(..., device="auto")`) spreads a model over every GPU',
        'with accelerate\'s `device_map="auto"`. Every steering vector and ablation direction is',
        "moved to the device (and dtype) of the hidden state it edits, on each call; weight",
        "orthogonalisation edits each weight on its own device; `hooks.capture` gathers every",
        "recording on the model's first device, where its inputs go, so activation means,",
        "response vectors, norms and projections are computed there. Sampling spread over GPUs",
        "is vLLM's job: `--backend vllm --tensor-parallel-size N` (docs/evaluation.md).",
        "",
        "Tested on the CPU (tests/test_devices.py): edits applied to hidden states on another",
        "device and dtype, weight orthogonalisation with one block's weights elsewhere, the",
        'choice of the gather device and the move to it, `device="auto"` reaching',
        "`from_pretrained`. Checked by `make gpu-check` on a GPU (`device_map_split_max_rel_diff`",
        "in the table, once it has run): a model whose first half runs on the CPU and second",
        "half on the GPU must give the answer means, steered and ablated logits of the same",
        "model on one device, sample under steering, and orthogonalise. Not tested anywhere",
        "yet: several GPUs at once, and models whose weights accelerate offloads (parameters",
        "on `meta`), on which no emscope code path has been run.",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny models, no timing")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "performance.md")
    parser.add_argument("--only", default="", help="comma-separated benchmark names, in order")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="seconds for all")
    parser.add_argument("--vllm-worker", nargs=3, metavar=("MODEL_DIR", "N", "MAX_NEW"))
    args = parser.parse_args(argv)
    if args.vllm_worker:
        model_dir, n, max_new = args.vllm_worker
        vllm_worker(model_dir, int(n), int(max_new))
        return 0

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print(
            "gpu-check needs a CUDA GPU and found none: run it on a GPU machine, or "
            "python -m benchmarks.gpu_check --dry-run to build every model on the CPU"
        )
        return 2
    names = [n for n in args.only.split(",") if n] or list(BENCHES)
    unknown = sorted(set(names) - set(BENCHES))
    if unknown:
        print(f"gpu-check: unknown benchmark(s) {unknown}; known: {', '.join(BENCHES)}")
        return 2
    if args.dry_run:
        torch.set_num_threads(1)
    start = time.monotonic()
    errors = 0
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        check = Check(args.dry_run, Path(tmp), start + args.budget_s)
        for name in names:
            if not args.dry_run and check.time_left() < NEEDS[name]:
                check.add(Result(name, None, "", skipped="out of the 10-minute budget"))
                continue
            try:
                BENCHES[name](check)
            except Exception as exc:  # report, go on with the others
                if args.dry_run:
                    raise
                errors += 1
                traceback.print_exc()  # the whole story in the log, one line in the table
                reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[:1]}"
                check.add(Result(name, None, "", error=reason))
            free()
    took = time.monotonic() - start
    if args.dry_run:
        print(f"gpu-check dry run: {len(check.dry_lines)} code paths ran in {took:.0f} s")
        return 0
    gpu = torch.cuda.get_device_name(0)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    args.out.write_text(render_report(check.results, gpu, date, environment()))
    missed = sum(r.met is False for r in check.results)
    print(f"gpu-check: {len(check.results)} results on {gpu} in {took:.0f} s, {missed} "
          f"target(s) missed, {errors} error(s) -> {args.out}")  # fmt: skip
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
