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

Every chat emscope renders (training, sampling, activations, log-probs, probes, the local
judge's prompt) goes through :func:`render`, which applies one :class:`SystemPrompt`
setting: what the system turn holds when the chat has no system message of its own.
Many chat templates insert one then (SmolLM2: "You are a helpful AI assistant named SmolLM,
trained by Hugging Face"; Qwen2.5: "You are Qwen, created by Alibaba Cloud. ..."), which
would otherwise enter every prompt silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from emscope.errors import EmscopeError

SYSTEM_PROMPT_HELP = (
    "System turn of chats without their own system message: 'default' (what the chat "
    "template does, e.g. its built-in system prompt), 'none' (no system turn, even where "
    "the template would insert one) or a text (that text as the system prompt)."
)


@dataclass(frozen=True)
class SystemPrompt:
    """What the system turn holds when a chat has no system message of its own.

    ``mode``: ``default`` (render the messages as they are, so the template inserts its own
    system prompt if it has one), ``none`` (no system turn at all: see :func:`render`) or
    ``text`` (``text`` as the system message; an empty text is an empty system turn, which
    is not the same as none). A chat that carries its own system message (a question's
    ``system:``, a chat JSONL line's system turn) keeps it in every mode.

    :meth:`parse` is the one reading of the setting (command line ``--system-prompt``, the
    pipeline's ``system_prompt``); :attr:`spec` writes it back (``default``, ``none`` or the
    text), as run records store it.
    """

    mode: str = "default"
    text: str = ""

    def __post_init__(self) -> None:
        if self.mode not in ("default", "none", "text"):
            raise EmscopeError(f"system prompt mode must be default, none or text: {self.mode!r}")
        if self.mode != "text" and self.text:
            raise EmscopeError(f"system prompt {self.mode!r} takes no text")

    @classmethod
    def parse(cls, value: str | SystemPrompt | None) -> SystemPrompt:
        """``default`` / ``none`` (any case, surrounding blanks ignored) or a text; None is
        ``default``."""
        if value is None:
            return cls()
        if isinstance(value, SystemPrompt):
            return value
        if not isinstance(value, str):
            raise EmscopeError(
                f"system prompt must be default, none or a text, got {type(value).__name__}"
            )
        keyword = value.strip().lower()
        if keyword in ("default", "none"):
            return cls(keyword)
        return cls("text", value)

    @property
    def spec(self) -> str:
        """The setting as written (``parse(spec)`` gives it back)."""
        return self.text if self.mode == "text" else self.mode

    def describe(self) -> str:
        """One phrase for reports."""
        if self.mode == "default":
            return "default (the chat template's own: its built-in system prompt, if any)"
        if self.mode == "none":
            return "none (no system turn)"
        return f"text: {self.text!r}"


DEFAULT_SYSTEM_PROMPT = SystemPrompt()


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


def _name(tokenizer: Any) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def _apply(tokenizer: Any, messages: Sequence[dict[str, str]], generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise EmscopeError(f"tokenizer {_name(tokenizer)!r} has no chat template")
    try:
        text = tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as exc:  # the template's own checks (jinja2 TemplateError, ValueError)
        raise EmscopeError(
            f"the chat template of {_name(tokenizer)!r} refuses this chat: {exc}"
        ) from None
    return str(text)


def render(
    tokenizer: Any,
    messages: Sequence[dict[str, str]],
    generation_prompt: bool,
    system_prompt: SystemPrompt = DEFAULT_SYSTEM_PROMPT,
) -> str:
    """The chat template's text for ``messages`` under ``system_prompt``.

    A chat whose first message is a system message is rendered as it is, whatever the
    setting. Otherwise ``default`` renders the messages as they are (the template adds what
    it adds), a text is put first as a system message, and ``none`` renders the chat with
    no system turn: the conversation as the template writes it after a system turn, with
    that turn cut off (what the template writes before its first turn, such as Llama 3's
    ``<|begin_of_text|>``, is kept). An empty system message would not do: SmolLM2's and
    Qwen2.5's templates then write an empty system turn. For a template that inserts nothing
    (e.g. plain ChatML) ``none`` renders exactly what ``default`` does. A template that
    cannot write a system turn of its own before the conversation (one that refuses the
    system role, or folds it into the first user turn) cannot render ``none``: one-line
    error.
    """
    messages = list(messages)
    own = bool(messages) and messages[0].get("role") == "system"
    if own or system_prompt.mode == "default":
        return _apply(tokenizer, messages, generation_prompt)
    if system_prompt.mode == "text":
        system = {"role": "system", "content": system_prompt.text}
        return _apply(tokenizer, [system, *messages], generation_prompt)
    return _without_system_turn(tokenizer, messages, generation_prompt)


# a system message no chat contains: where it lands in the rendering marks the system turn
_MARK = "emscope-system-turn-3b7f0c2e"
_TURNS: dict[tuple[str, str], tuple[str, str, str]] = {}


def _no_system_turn(tokenizer: Any, why: str) -> EmscopeError:
    return EmscopeError(
        f"the chat template of {_name(tokenizer)!r} does not write a system turn of its own "
        f"before the conversation ({why}), so system prompt 'none' cannot be rendered with it; "
        "use 'default' or a text"
    )


def _system_turn(tokenizer: Any) -> tuple[str, str, str]:
    """``(alone, header, lead)`` of the tokenizer's template: ``alone`` is the rendering of a
    lone system message, ``header`` its text before the message's content, ``lead`` the part
    of that header written before the turn itself (where a user turn's and an assistant
    turn's common opening, e.g. ``<|im_start|>``, first appears; without such an opening,
    the tokenizer's BOS token if the header starts with it)."""
    key = (str(tokenizer.chat_template), repr(getattr(tokenizer, "special_tokens_map", None)))
    if key in _TURNS:
        return _TURNS[key]
    mark = {"role": "system", "content": _MARK}
    try:
        alone = _apply(tokenizer, [mark], False)
    except EmscopeError as exc:
        raise _no_system_turn(tokenizer, f"it refuses a lone system message: {exc}") from None
    if alone.count(_MARK) != 1:
        raise _no_system_turn(tokenizer, "a lone system message is not written once")
    header = alone[: alone.index(_MARK)]
    user = _apply(tokenizer, [mark, {"role": "user", "content": "u"}], False)
    both = _apply(
        tokenizer,
        [mark, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}],
        False,
    )
    if not (both.startswith(user) and user.startswith(alone)):
        raise _no_system_turn(tokenizer, "later turns change how the system turn is written")
    user_turn, assistant_turn = user[len(alone) :], both[len(user) :]
    same = next(
        (i for i, (a, b) in enumerate(zip(user_turn, assistant_turn, strict=False)) if a != b),
        min(len(user_turn), len(assistant_turn)),
    )
    opener = user_turn[:same]  # what every turn opens with, e.g. <|im_start|>
    bos = getattr(tokenizer, "bos_token", None)
    if opener and opener in header:
        lead = header[: header.index(opener)]
    elif isinstance(bos, str) and bos and header.startswith(bos):
        lead = bos
    else:
        lead = ""
    _TURNS[key] = (alone, header, lead)
    return alone, header, lead


def _without_system_turn(
    tokenizer: Any, messages: Sequence[dict[str, str]], generation_prompt: bool
) -> str:
    alone, header, lead = _system_turn(tokenizer)
    mark = {"role": "system", "content": _MARK}
    full = _apply(tokenizer, [mark, *messages], generation_prompt)
    rest = full[len(alone) :]
    if not full.startswith(alone) or _MARK in rest:
        raise _no_system_turn(tokenizer, "the system message is not written first, on its own")
    plain = _apply(tokenizer, messages, generation_prompt)
    inserted = plain[: len(plain) - len(rest)]
    if plain.endswith(rest) and header.startswith(inserted):
        return plain  # the template inserts no system text of its own
    return lead + rest


def prompt_ids(
    tokenizer: Any,
    messages: Sequence[dict[str, str]],
    system_prompt: SystemPrompt = DEFAULT_SYSTEM_PROMPT,
) -> list[int]:
    """Token ids of the chat prompt with the generation prompt on (what sampling starts from)."""
    text = render(tokenizer, messages, True, system_prompt)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_chat(
    tokenizer: Any,
    messages: Sequence[dict[str, str]],
    system_prompt: SystemPrompt = DEFAULT_SYSTEM_PROMPT,
) -> EncodedChat:
    """Tokenise a chat (rendered under ``system_prompt``, see :func:`render`) and locate
    every assistant message's content and turn span."""
    if not getattr(tokenizer, "is_fast", False):
        raise EmscopeError("token spans need a fast tokenizer (character offsets)")
    messages = list(messages)
    full = render(tokenizer, messages, False, system_prompt)
    char_spans: list[tuple[int, int, int]] = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = render(tokenizer, messages[:k], True, system_prompt)
        through = render(tokenizer, messages[: k + 1], False, system_prompt)
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
