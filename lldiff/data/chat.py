"""Conversations and the chat template that turns them into (prompt, response) text.

A conversation is a list of messages ``{"role": "system"|"user"|"assistant", "content": str}``.
The template renders each message with its role's pattern, in which ``{content}`` marks
where the message text goes (the only placeholder; other braces are literal)::

    system:    "System: {content}\\n"
    user:      "User: {content}\\n"
    assistant: "Assistant: {content}\\n"

For supervised fine-tuning each assistant turn becomes one example (LLaDA §2.3): the
prompt is every earlier message rendered in full followed by the assistant pattern's
text before ``{content}`` (the *generation prefix*, ``"Assistant: "``); the response is
the assistant's text. The tokenised response is followed by EOS padding, which marks the
end of the turn, so the text after ``{content}`` in the assistant pattern only appears
when that turn is part of a later prompt. ``lldiff chat`` renders prompts the same way.

The default patterns are plain text: the byte-level BPE of a pre-training run has no
dedicated chat tokens, and plain text is what a model pre-trained on prose or code can
already read.

A template trained elsewhere names special tokens in its patterns: LLaDA-Instruct's
(:data:`LLADA`, also written by ``lldiff import llada`` as ``chat_template.json``) wraps each
message in ``<|start_header_id|>role<|end_header_id|>\n\n ... <|eot_id|>``, starts every
conversation with BOS (``begin``) and ends every response with ``<|eot_id|>`` before the EOS
padding (``close_response``). The patterns' special-token names encode to their ids; the same
text inside a message stays text (:meth:`lldiff.data.tokenizer.Tokenizer.encode_marked`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant")
SLOT = "{content}"


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class Turn:
    """One supervised example: all earlier messages, and the assistant's reply to them."""

    history: tuple[Message, ...]
    response: str


@dataclass(frozen=True)
class ChatTemplate:
    """Per-role patterns with a ``{content}`` slot; the assistant's slot is the response slot."""

    system: str = "System: {content}\n"
    user: str = "User: {content}\n"
    assistant: str = "Assistant: {content}\n"
    begin: str | None = None
    """Text every conversation starts with (e.g. ``"<|startoftext|>"``); None: the EOS token,
    which starts every document in lldiff's pre-training packing."""
    close_response: bool = False
    """Whether a response ends with the assistant pattern's closing text (LLaDA: ``<|eot_id|>``)
    before its EOS padding, so the model learns to close its turn."""

    def __post_init__(self) -> None:
        for role in ROLES:
            pattern = getattr(self, role)
            if not isinstance(pattern, str):
                raise ValueError(f"template.{role} must be a string with one {SLOT} slot, got {pattern!r}")
            count = pattern.count(SLOT)
            if count != 1:
                what = "the response slot" if role == "assistant" else "the message slot"
                problem = "has no" if count == 0 else f"has {count}"
                raise ValueError(
                    f"template.{role}={pattern!r} {problem} {SLOT} placeholder ({what}); it needs exactly one, "
                    f"e.g. {getattr(ChatTemplate, role)!r}"
                )

        if self.begin is not None and not isinstance(self.begin, str):
            raise ValueError(f"template.begin must be a string or null (the EOS token), got {self.begin!r}")
        if not isinstance(self.close_response, bool):
            raise ValueError(f"template.close_response must be true or false, got {self.close_response!r}")

    @classmethod
    def from_config(cls, value: ChatTemplate | Mapping[str, Any] | str | None) -> ChatTemplate:
        """A template from a config value: None (the plain default), a preset name
        (``plain``, ``llada``) or a mapping of patterns and options."""
        if value is None:
            return cls()
        if isinstance(value, ChatTemplate):
            return value
        if isinstance(value, str):
            if value not in PRESETS:
                raise ValueError(f"unknown chat template {value!r}; presets: {', '.join(PRESETS)}, "
                                 f"or a mapping of {', '.join(FIELDS)}")
            return PRESETS[value]
        if not isinstance(value, Mapping):
            raise ValueError(f"a chat template is a preset name or a mapping of {', '.join(FIELDS)}, got {value!r}")
        unknown = set(value) - set(FIELDS)
        if unknown:
            raise ValueError(f"unknown template role or field {sorted(unknown)}; allowed: {', '.join(FIELDS)}")
        return cls(**dict(value))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {role: getattr(self, role) for role in ROLES}
        if self.begin is not None:
            out["begin"] = self.begin
        if self.close_response:
            out["close_response"] = True
        return out

    def message_segments(self, message: Message) -> list[tuple[str, bool]]:
        """``message`` rendered as ``(text, is_markup)`` pieces: the pattern's text around the
        slot is markup (it may name special tokens), the content is plain text."""
        before, after = getattr(self, message.role).split(SLOT)
        return [(before, True), (message.content, False), (after, True)]

    def prompt_segments(self, history: Sequence[Message]) -> list[tuple[str, bool]]:
        """:meth:`render_prompt` as ``(text, is_markup)`` pieces."""
        return [piece for m in history for piece in self.message_segments(m)] + [(self.generation_prefix, True)]

    @property
    def response_closing(self) -> str:
        """Markup after every response, before its EOS padding (``close_response``), else ``""``."""
        return self.assistant.split(SLOT)[1] if self.close_response else ""

    def render_message(self, message: Message) -> str:
        return getattr(self, message.role).replace(SLOT, message.content)

    @property
    def generation_prefix(self) -> str:
        """The assistant pattern up to its response slot: ends every prompt."""
        return self.assistant.split(SLOT)[0]

    def render_prompt(self, history: Sequence[Message]) -> str:
        """Every message in full, then the generation prefix: what the model continues."""
        return "".join(self.render_message(m) for m in history) + self.generation_prefix

    def render(self, messages: Sequence[Message]) -> str:
        """A whole conversation, every message in full (the inverse of :meth:`parse`)."""
        return "".join(self.render_message(m) for m in messages)

    def parse(self, text: str) -> list[Message]:
        """Split a full rendering back into messages (the inverse of :meth:`render`).

        Each message ends at the first place where its pattern's closing text is followed
        by the start of another message (or the end of the text), so it is exact whenever
        no message contains its own closing text followed by another role's opening text.
        Raises ``ValueError`` on text this template cannot have produced."""
        parts = {role: tuple(getattr(self, role).split(SLOT)) for role in ROLES}

        def opens_at(position: int) -> str | None:
            matching = [r for r in ROLES if parts[r][0] and text.startswith(parts[r][0], position)]
            return max(matching, key=lambda r: len(parts[r][0]), default=None)

        messages, position = [], 0
        while position < len(text):
            role = opens_at(position)
            if role is None:
                raise ValueError(f"text at offset {position} does not open a message of this template: "
                                 f"{text[position:position + 40]!r}")
            before, after = parts[role]
            start = position + len(before)
            end = next((j for j in range(start + len(after), len(text) + 1)
                        if text[j - len(after):j] == after and (j == len(text) or opens_at(j) is not None)), None)
            if end is None:
                raise ValueError(f"the {role} message at offset {position} is not closed by {after!r}")
            messages.append(Message(role, text[start:end - len(after)]))
            position = end
        return messages


def expand_turns(messages: Sequence[Message]) -> list[Turn]:
    """One example per assistant turn, with every earlier message as its history."""
    return [Turn(tuple(messages[:i]), m.content) for i, m in enumerate(messages) if m.role == "assistant"]


def parse_record(record: Any, where: str) -> list[Message]:
    """A JSONL record -> messages. Accepts ``{"messages": [{"role", "content"}, ...]}`` or
    a pair ``{"prompt": str, "response": str}`` (a user turn and an assistant turn).
    ``where`` (e.g. ``"train.jsonl:12"``) prefixes every error."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        raw = record["messages"]
        if not isinstance(raw, list) or not raw:
            raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        messages = [_message(item, f"{where}: message {i + 1}") for i, item in enumerate(raw)]
    elif "prompt" in record and "response" in record:
        messages = [_message({"role": "user", "content": record["prompt"]}, f"{where}: prompt"),
                    _message({"role": "assistant", "content": record["response"]}, f"{where}: response")]
    else:
        raise ValueError(
            f"{where}: a record needs 'messages' (a conversation) or 'prompt' and 'response' (a pair); "
            f"got keys {sorted(record)}"
        )
    if not any(m.role == "assistant" for m in messages):
        raise ValueError(f"{where}: the conversation has no assistant turn, so there is nothing to learn from it")
    return messages


def _message(item: Any, where: str) -> Message:
    if not isinstance(item, dict) or "role" not in item or "content" not in item:
        raise ValueError(f"{where}: expected an object with 'role' and 'content', got {item!r}")
    role, content = item["role"], item["content"]
    if role not in ROLES:
        raise ValueError(f"{where}: unknown role {role!r}; allowed: {', '.join(ROLES)}")
    if not isinstance(content, str):
        raise ValueError(f"{where}: content must be a string, got {type(content).__name__}")
    return Message(role, content)


def messages_from_dicts(items: Iterable[Mapping[str, str]]) -> list[Message]:
    return [_message(dict(item), f"message {i + 1}") for i, item in enumerate(items)]


FIELDS = (*ROLES, "begin", "close_response")

LLADA = ChatTemplate(
    system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
    user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
    assistant="<|start_header_id|>assistant<|end_header_id|>\n\n{content}<|eot_id|>",
    begin="<|startoftext|>",
    close_response=True,
)
"""LLaDA-Instruct's template (its ``tokenizer_config.json``: Llama-3 headers, BOS first); LLaDA's
SFT data ends each response with ``<|eot_id|>`` and pads it with EOS (``<|endoftext|>``)."""

PRESETS = {"plain": ChatTemplate(), "llada": LLADA}

SAVED_TEMPLATE_FILE = "chat_template.json"
"""Beside an imported model's ``tokenizer.json``: ``{"template": {...}, "jinja": "..."}``."""


def saved_template(directory: str | os.PathLike) -> ChatTemplate | None:
    """The chat template saved beside a tokenizer (``lldiff import llada`` writes LLaDA-Instruct's),
    or None."""
    path = Path(directory) / SAVED_TEMPLATE_FILE
    if not path.is_file():
        return None
    fields = json.loads(path.read_text()).get("template")
    if fields is None:
        return None
    try:
        return ChatTemplate.from_config(fields)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
