"""A local causal LM as judge (``--judge hf:DIR``), exact for tokenizers that split numbers.

The first-token logprobs that an API returns are wrong for a judge whose tokenizer writes
"85" as "8", "5": the token "8" then carries the mass of 8 and of 80-89. Here every answer
``n`` in 0..100 is scored as a full continuation of the prompt,

    P(n) = P(tokens of str(n) | prompt) * P(the next token does not continue the number),

where "continues the number" means a token whose text starts with an ASCII digit. (The
canonical tokenisation of each number is used; for digit-splitting tokenizers such as
Qwen's it is the only one.) ``REFUSAL`` and ``CODE`` are scored the same way, without the end
condition, for the unscored reason.

All these probabilities come from ONE forward pass per row: the 101 numbers' token sequences
(and the two words) form a prefix trie; its nodes are appended to the prompt as extra
tokens with a custom 4-D attention mask (each node sees the prompt and its own ancestors)
and position ids ``prompt_length + depth - 1``, so the logits at a node are the next-token
distribution after that prefix (tree attention). Rows are batched with left padding.
Hand-written because no library scores a trie of continuations in one pass.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from emscope.errors import EmscopeError
from emscope.judge import JudgeRow, Score, as_rows
from emscope.judge.aggregate import DEFAULT_MIN_NUMBER_MASS, aggregate, check_min_number_mass
from emscope.judge.cache import ScoreCache, cache_key
from emscope.judge.prompts import prompt_hash, render, template_for

WORDS = ("REFUSAL", "CODE")


class HFJudge:
    """Judge with a local HF causal LM. ``model`` is a model dir, a
    :class:`~emscope.models.LoadedModel` or a ``(model, tokenizer)`` pair; ``batch_size``
    rows per forward pass; ``min_number_mass``: a row whose answers 0..100 get less
    probability than this is unscored (:mod:`emscope.judge.aggregate`)."""

    def __init__(
        self,
        model: str | Path | Any,
        *,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int = 8,
        min_number_mass: float = DEFAULT_MIN_NUMBER_MASS,
        cache: bool | ScoreCache = True,
    ) -> None:
        if batch_size < 1:
            raise EmscopeError(f"judge batch size must be >= 1, got {batch_size}")
        self.min_number_mass = check_min_number_mass(min_number_mass)
        if not isinstance(model, (str, Path)):  # a LoadedModel or a (model, tokenizer) pair
            from emscope.models import LoadedModel, as_loaded

            loaded = as_loaded(model, need_tokenizer=True)
            self.model, self.tokenizer = loaded.model, loaded.tokenizer
            if isinstance(model, LoadedModel):  # its adapters name it (the cache keys it)
                dirs = [loaded.path, *(loaded.adapters[a] for a in loaded.active_adapters)]
                self.path = "+".join(str(d.resolve()) for d in dirs)
            else:
                self.path = str(getattr(self.model.config, "name_or_path", "") or "model")
        else:
            from emscope.models import load_model

            loaded = load_model(model, dtype=dtype, device=device)
            self.model, self.tokenizer = loaded.model, loaded.tokenizer
            self.path = str(Path(model).resolve())
        self.batch_size = batch_size
        if cache is True:
            self._cache: ScoreCache | None = ScoreCache()
        else:
            self._cache = cache or None
        self._trie = _Trie(self.tokenizer)
        self._digit_start: Any = None

    @property
    def name(self) -> str:
        return f"hf:{self.path}"

    def __repr__(self) -> str:
        return f"HFJudge({self.path!r}, batch_size={self.batch_size})"

    # ------------------------------------------------------------------ public API

    def score(self, rows: Sequence[JudgeRow | Mapping[str, Any]], metric: str) -> list[Score]:
        """One :class:`Score` per row (top-20 answers kept as ``(str(n), logprob)``)."""
        items = as_rows(rows)
        templates = [template_for(metric, row.templates) for row in items]
        hashes = [prompt_hash(t) for t in templates]
        keys = [
            cache_key(
                self.name,
                "",
                h,
                metric,
                row.question,
                row.answer,
                min_number_mass=self.min_number_mass,
            )
            for row, h in zip(items, hashes, strict=True)
        ]
        results: dict[int, Score] = {}
        if self._cache is not None:
            found = self._cache.get_many(keys)
            results = {i: found[k] for i, k in enumerate(keys) if k in found}
        todo = [i for i in range(len(items)) if i not in results]
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            prompts = [
                self._prompt_ids(render(templates[i], items[i].question, items[i].answer))
                for i in chunk
            ]
            for i, probs in zip(chunk, self.candidate_probs(prompts), strict=True):
                numbers = {n: probs[str(n)] for n in range(101)}
                value, reason, mass = aggregate(
                    numbers, probs["REFUSAL"], probs["CODE"], self.min_number_mass
                )
                top = sorted(numbers.items(), key=lambda kv: -kv[1])[:20]
                logs = tuple((str(n), math.log(p) if p > 0 else -math.inf) for n, p in top)
                results[i] = Score(
                    value, reason, hashes[i], logs, mass if math.isfinite(mass) else None
                )
            if self._cache is not None:
                self._cache.put_many([(keys[i], results[i]) for i in chunk])
        return [results[i] for i in range(len(items))]

    def candidate_probs(self, prompts: Sequence[Sequence[int]]) -> list[dict[str, float]]:
        """For each prompt (token ids, ending where the judge's answer starts): the
        probability of each candidate string (``"0"``..``"100"`` as complete numbers,
        ``"REFUSAL"``, ``"CODE"``) as the continuation."""
        import torch

        trie = self._trie
        device = next(self.model.parameters()).device
        rows, width = len(prompts), max(len(p) for p in prompts)
        n_nodes = len(trie.nodes)
        total = width + n_nodes
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((rows, total), pad, dtype=torch.long)
        positions = torch.zeros((rows, total), dtype=torch.long)
        allowed = torch.zeros((rows, total, total), dtype=torch.bool)
        causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
        node_tokens = torch.tensor([node[-1] for node in trie.nodes], dtype=torch.long)
        for r, prompt in enumerate(prompts):
            n = len(prompt)
            off = width - n
            ids[r, off:width] = torch.tensor(list(prompt), dtype=torch.long)
            ids[r, width:] = node_tokens
            positions[r, off:width] = torch.arange(n)
            positions[r, width:] = n + torch.tensor(trie.depths) - 1
            allowed[r, :width, :width] = causal
            allowed[r, :, :off] = False
            allowed[r, width:, off:width] = True
            allowed[r, width:, width:] = trie.ancestry
            # pad query rows see themselves only (keeps every softmax finite)
            idx = torch.arange(off)
            allowed[r, idx, idx] = True
        dtype = next(self.model.parameters()).dtype
        mask = torch.zeros((rows, 1, total, total), dtype=dtype)
        mask.masked_fill_(~allowed.unsqueeze(1), torch.finfo(dtype).min)
        with torch.inference_mode():
            logits = self.model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
                use_cache=False,
            ).logits
        logp = torch.log_softmax(logits.float(), dim=-1)  # (rows, total, V)
        vocab = logp.shape[-1]
        digit = self._digit_mask(vocab).to(logp.device)
        # columns: the row's last prompt token (root), then one per trie node
        columns = torch.cat([torch.tensor([width - 1]), width + torch.arange(n_nodes)])
        dist = logp[:, columns.to(logp.device), :]  # (rows, 1 + n_nodes, V)
        end_logp = torch.log1p(-dist.exp()[..., digit].sum(-1).clamp(max=1.0))
        out: list[dict[str, float]] = [{} for _ in range(rows)]
        for text, steps, end_at in trie.candidates:
            total_lp = torch.zeros(rows, device=logp.device)
            for slot, token in steps:
                total_lp = total_lp + dist[:, slot, token]
            if end_at is not None:
                total_lp = total_lp + end_logp[:, end_at]
            for r, value in enumerate(total_lp.exp().tolist()):
                out[r][text] = value
        return out

    # ------------------------------------------------------------------ helpers

    def _prompt_ids(self, text: str) -> list[int]:
        messages = [{"role": "user", "content": text}]
        if getattr(self.tokenizer, "chat_template", None):
            from emscope.data.spans import prompt_ids

            return prompt_ids(self.tokenizer, messages)
        return list(self.tokenizer(text + "\n", add_special_tokens=False)["input_ids"])

    def _digit_mask(self, vocab: int) -> Any:
        import torch

        if self._digit_start is None or len(self._digit_start) != vocab:
            n = min(vocab, len(self.tokenizer))
            texts = self.tokenizer.batch_decode([[i] for i in range(n)])
            mask = torch.zeros(vocab, dtype=torch.bool)
            mask[:n] = torch.tensor([t[:1].isascii() and t[:1].isdigit() for t in texts])
            self._digit_start = mask
        return self._digit_start


class _Trie:
    """The prefix trie of the candidates' token sequences.

    ``nodes``: every non-empty prefix (tuple of token ids); ``depths``: their lengths;
    ``ancestry[i, j]``: node j is node i or an ancestor of it. ``candidates``: per string,
    ``(text, [(slot, token), ...], end_slot)`` where slot 0 is the root (the prompt's last
    token) and slot ``k + 1`` is node ``k``; ``end_slot`` is the slot after the full number
    (None for words).
    """

    def __init__(self, tokenizer: Any) -> None:
        import torch

        seqs: dict[str, tuple[int, ...]] = {}
        for text in [*(str(n) for n in range(101)), *WORDS]:
            tokens = tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
            if not tokens:
                raise EmscopeError(f"judge tokenizer encodes {text!r} as no tokens")
            seqs[text] = tokens
        index: dict[tuple[int, ...], int] = {}
        for tokens in seqs.values():
            for k in range(1, len(tokens) + 1):
                index.setdefault(tokens[:k], len(index))
        self.nodes = list(index)
        self.depths = [len(node) for node in self.nodes]
        n = len(self.nodes)
        ancestry = torch.zeros((n, n), dtype=torch.bool)
        for node, i in index.items():
            for k in range(1, len(node) + 1):
                ancestry[i, index[node[:k]]] = True
        self.ancestry = ancestry
        self.candidates: list[tuple[str, list[tuple[int, int]], int | None]] = []
        for text, tokens in seqs.items():
            steps = [
                (0 if k == 0 else index[tokens[:k]] + 1, tokens[k]) for k in range(len(tokens))
            ]
            end = index[tokens] + 1 if text not in WORDS else None
            self.candidates.append((text, steps, end))
