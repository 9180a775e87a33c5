"""Token spans of assistant content, found from the chat template (never by substring search).

For an assistant message at index ``k`` the template is rendered three times: the prompt
before it with the generation prompt on, the conversation through it, and the whole
conversation. The content's character range starts where the first rendering ends (after
any whitespace the template puts there; leading and trailing whitespace of the content
itself is not part of the span, since templates such as Llama 3's trim it); the
conversation text is tokenised once with character offsets, and the span is the tokens that
overlap that range. The turn span adds the template's end-of-turn text (e.g. ``<|im_end|>``)
that follows the content, which the training loss includes so the model learns to stop.

Token indices are 0-based, half-open ``[start, end)``, into :attr:`EncodedChat.input_ids`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from emscope.errors import EmscopeError


@dataclass(frozen=True)
class EncodedChat:
    """A tokenised chat and the spans of each assistant message."""

    input_ids: tuple[int, ...]
    content_spans: tuple[tuple[int, int], ...]
    turn_spans: tuple[tuple[int, int], ...]

    @property
    def answer_span(self) -> tuple[int, int]:
        """Content span of the last assistant message."""
        return self.content_spans[-1]

    def loss_mask(self, include_end_of_turn: bool = True, last_only: bool = False) -> list[bool]:
        """True at tokens that carry loss (assistant content, optionally the end-of-turn)."""
        spans = self.turn_spans if include_end_of_turn else self.content_spans
        if last_only:
            spans = spans[-1:]
        mask = [False] * len(self.input_ids)
        for start, end in spans:
            for i in range(start, end):
                mask[i] = True
        return mask


def render(tokenizer: Any, messages: Sequence[dict[str, str]], generation_prompt: bool) -> str:
    """The chat template's text for ``messages``."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
        raise EmscopeError(f"tokenizer {name!r} has no chat template")
    try:
        text = tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as exc:  # the template's own checks (jinja2 TemplateError, ValueError)
        name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
        raise EmscopeError(f"the chat template of {name!r} refuses this chat: {exc}") from None
    return str(text)


def prompt_ids(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of the chat prompt with the generation prompt on (what sampling starts from)."""
    text = render(tokenizer, messages, generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_chat(tokenizer: Any, messages: Sequence[dict[str, str]]) -> EncodedChat:
    """Tokenise a chat and locate every assistant message's content and turn span."""
    if not getattr(tokenizer, "is_fast", False):
        raise EmscopeError("token spans need a fast tokenizer (character offsets)")
    messages = list(messages)
    full = render(tokenizer, messages, generation_prompt=False)
    char_spans: list[tuple[int, int, int]] = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = render(tokenizer, messages[:k], generation_prompt=True)
        through = render(tokenizer, messages[: k + 1], generation_prompt=False)
        if not (full.startswith(through) and through.startswith(prefix)):
            raise EmscopeError(
                "the chat template renders earlier turns differently once later turns follow "
                f"(assistant message {k}); cannot locate assistant tokens from it"
            )
        # the content follows the generation prompt, after at most a whitespace separator
        # (e.g. Mistral's " "), and possibly trimmed by the template (e.g. Llama 3's | trim)
        rest = through[len(prefix) :]
        start = len(prefix) + len(rest) - len(rest.lstrip())
        content = message["content"].strip()
        if not through.startswith(content, start):
            raise EmscopeError(
                f"assistant message {k}: the chat template does not render its content "
                "right after the generation prompt; cannot locate assistant tokens"
            )
        char_spans.append((start, start + len(content), len(through)))

    encoding = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = tuple(encoding["input_ids"])
    offsets = encoding["offset_mapping"]
    content_spans, turn_spans = [], []
    for c0, c1, t1 in char_spans:
        content_spans.append(_token_range(offsets, c0, c1))
        turn_spans.append(_token_range(offsets, c0, t1))
    return EncodedChat(ids, tuple(content_spans), tuple(turn_spans))


def _token_range(offsets: Sequence[tuple[int, int]], c0: int, c1: int) -> tuple[int, int]:
    """Tokens overlapping characters ``[c0, c1)`` (an empty range sits at the first token
    at or after ``c0``)."""
    inside = [i for i, (a, b) in enumerate(offsets) if a < c1 and b > c0 and b > a]
    if inside:
        return inside[0], inside[-1] + 1
    after = [i for i, (a, _) in enumerate(offsets) if a >= c0]
    at = after[0] if after else len(offsets)
    return at, at
