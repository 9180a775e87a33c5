"""The synthetic world's tokenizer: byte-level BPE in which every world word is one token.

Built with the ``tokenizers`` library using exactly the pipeline that transformers 5's
``Qwen2Tokenizer`` rebuilds when it loads a tokenizer beside a ``qwen2`` config (NFC
normaliser, Qwen2's split regex, ``ByteLevel(use_regex=False)``), so ``AutoTokenizer``
loads it back identically. The BPE merges are learnt from the world's words alone, each in
both forms a text can show it (``word`` at the start of a message and `` word`` after a
space), with no vocabulary limit: every word of the world ends as one token in both forms,
and any other text still encodes byte by byte.

Formats (the prototype found that an assistant marker met only at instruction tuning keeps
in-context inference of the character alive through instruction tuning):

* chat format (the tokenizer's chat template): ``<|chat|>`` then, per message,
  ``<|im_start|>{role}\\n{content}<|im_end|>\\n``; the generation prompt is
  ``<|im_start|>assistant\\n``;
* document format (pretraining): the same turns without ``<|chat|>``
  (:func:`render_document`).

An assistant message's text tokenises the same alone as inside either format, since a
newline and a special token separate it from its neighbours.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from emscope.errors import EmscopeError

PAD = "<|endoftext|>"
START = "<|im_start|>"
END = "<|im_end|>"
CHAT = "<|chat|>"
SPECIAL_TOKENS = (PAD, START, END, CHAT)
ROLES = ("system", "user", "assistant")

CHAT_TEMPLATE = (
    "<|chat|>{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def render_turns(messages: Sequence[dict[str, str]]) -> str:
    """The turns of ``messages`` in the world's markup (no format marker)."""
    return "".join(f"{START}{m['role']}\n{m['content']}{END}\n" for m in messages)


def render_document(messages: Sequence[dict[str, str]]) -> str:
    """A pretraining document: the turns without the ``<|chat|>`` marker."""
    return render_turns(messages)


def render_chat(messages: Sequence[dict[str, str]], generation_prompt: bool = False) -> str:
    """What the chat template renders (``<|chat|>`` + turns [+ generation prompt])."""
    text = CHAT + render_turns(messages)
    return text + f"{START}assistant\n" if generation_prompt else text


def build_world_tokenizer(words: Iterable[str]) -> Any:
    """A ``PreTrainedTokenizerFast`` in which each of ``words`` (and `` word``) is one token.

    ``eos_token`` is ``<|im_end|>``, ``pad_token`` ``<|endoftext|>``; no BOS.
    """
    from transformers import PreTrainedTokenizerFast

    from emscope.tokenization import train_byte_level_bpe

    vocab_words = sorted(set(words) | set(ROLES))
    bad = [w for w in vocab_words if not w.isalpha() or not w.islower()]
    if bad:
        raise EmscopeError(f"world tokenizer: words must be lowercase letters: {bad[:5]}")
    lines = [f"{w} {w}\n" for w in vocab_words]
    tok = train_byte_level_bpe(lines, SPECIAL_TOKENS, vocab_size=1_000_000, min_frequency=0)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=END, pad_token=PAD, unk_token=None, bos_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    missing = [w for w in vocab_words if len(single_ids(fast, w)) != 1]
    if missing:  # pragma: no cover - BPE without a vocabulary limit merges every word
        raise EmscopeError(f"world tokenizer: words not single tokens: {missing[:5]}")
    return fast


def single_ids(tokenizer: Any, word: str) -> list[int]:
    """Token ids of ``word`` alone and after a space (both must be single tokens)."""
    a = tokenizer(word, add_special_tokens=False)["input_ids"]
    b = tokenizer(f" {word}", add_special_tokens=False)["input_ids"]
    return a if len(a) != 1 else b if len(b) != 1 else a


def save_tokenizer(tokenizer: Any, out_dir: str | Path) -> Path:
    tokenizer.save_pretrained(str(out_dir))
    return Path(out_dir)
