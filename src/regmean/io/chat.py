"""Chat and instruction data: conversations ({role, content} turns, or a prompt and its response) rendered into the
text a model sees by its tokenizer's chat template."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from regmean.errors import RegmeanError, one_line
from regmean.units import human

Turns = tuple[tuple[str, str], ...]
CHAT_TEMPLATE = "chat template"
PLAIN = "plain concatenation (prompt, newline, response: the tokenizer has no chat template)"


TEMPLATE_SECONDS = 10
"""The longest one conversation's rendering may take (a template is code from the model's folder)."""
MAX_RENDERED = 16 * 1024**2
"""The most characters a rendered conversation may have."""
TEMPLATE_MEMORY = 1024**3
"""The most memory one conversation's rendering may take beyond what the process holds (Linux)."""


@contextmanager
def time_limit(seconds: int, message: str) -> Iterator[None]:
    """Raise RegmeanError(`message` + a fix) if the block runs longer than `seconds` (in the main thread, where
    signals arrive; elsewhere the block runs unbounded)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(*_):
        raise RegmeanError(f"{message}; fix or replace the template (tokenizer_config.json 'chat_template')")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _address_space() -> int | None:
    """This process's virtual size in bytes (Linux), or None."""
    try:
        import resource

        pages = int(Path("/proc/self/statm").read_text().split()[0])
        return pages * resource.getpagesize()
    except (ImportError, OSError, ValueError, IndexError):
        return None


@contextmanager
def memory_cap(extra: int) -> Iterator[None]:
    """Cap the process's address space at its current size plus `extra` bytes for the block (Linux; elsewhere, or
    under a tighter limit already, the block runs uncapped): code from a model's folder that tries to allocate
    more raises MemoryError instead of taking the machine's memory. The previous limit is restored."""
    current = _address_space()
    if current is None:
        yield
        return
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = current + extra
    tighter = soft != resource.RLIM_INFINITY and soft <= cap
    if tighter or (hard != resource.RLIM_INFINITY and cap > hard):
        yield
        return
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def read_turns(value, where: str) -> Turns:
    """A cell holding a conversation: a list of {"role": str, "content": str} (a Parquet list arrives as an array)."""
    if hasattr(value, "tolist") and not isinstance(value, str):
        value = value.tolist()
    if not isinstance(value, list) or not value:
        raise RegmeanError(f"{where}: expected a non-empty list of {{role, content}} messages")
    turns = []
    for turn in value:
        if not (isinstance(turn, dict) and isinstance(turn.get("role"), str) and isinstance(turn.get("content"), str)):
            raise RegmeanError(f'{where}: each message must be {{"role": text, "content": text}}, not {turn!r:.80}')
        turns.append((turn["role"], turn["content"]))
    return tuple(turns)


def render_chat(examples: Sequence, tokenizer, tokenizer_dir: str | Path) -> tuple[list, str | None]:
    """Examples with `messages` rendered into their text by the tokenizer's chat template (such texts carry their own
    special tokens), and the formatting used; None when no example is a conversation. Without a template, a prompt
    and response pair keeps its plain concatenation; a conversation is refused."""
    if not any(e.messages for e in examples):
        return list(examples), None
    if not getattr(tokenizer, "chat_template", None):
        if any(not e.text for e in examples):
            raise RegmeanError(
                f"{tokenizer_dir}: the tokenizer has no chat template to format --messages-field conversations; use "
                "a tokenizer with one (tokenizer_config.json 'chat_template'), or --prompt-field/--response-field"
            )
        return list(examples), PLAIN
    rendered = []
    for number, e in enumerate(examples, start=1):
        text = _render(tokenizer, e.messages, tokenizer_dir, number)
        rendered.append(replace(e, text=text, templated=True))
    return rendered, CHAT_TEMPLATE


def _render(tokenizer, messages: Turns, tokenizer_dir, number: int, generation_prompt: bool = False) -> str:
    """One conversation through the chat template, bounded in time, memory and length (a template is code from the
    model's folder); `generation_prompt`: followed by the header of the assistant's answer."""
    turns = [{"role": role, "content": content} for role, content in messages]
    try:
        with (
            time_limit(TEMPLATE_SECONDS, f"{tokenizer_dir}: the chat template took over {TEMPLATE_SECONDS} s"),
            memory_cap(TEMPLATE_MEMORY),
        ):
            text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)
    except RegmeanError:
        raise
    except MemoryError:
        raise RegmeanError(
            f"{tokenizer_dir}: the chat template took more than {human(TEMPLATE_MEMORY)} rendering "
            f"conversation {number}; fix the template (tokenizer_config.json 'chat_template')"
        ) from None
    except Exception as exc:  # jinja2 raises its own types, and templates raise on roles they do not accept
        raise RegmeanError(
            f"{tokenizer_dir}: the chat template cannot format a conversation ({one_line(str(exc), 200)})"
        ) from exc
    if isinstance(text, str) and len(text) > MAX_RENDERED:
        raise RegmeanError(
            f"{tokenizer_dir}: the chat template rendered conversation {number} into {len(text):,} characters "
            f"(at most {MAX_RENDERED:,}); fix the template"
        )
    if not isinstance(text, str) or not text.strip():
        raise RegmeanError(
            f"{tokenizer_dir}: the chat template rendered conversation {number} of the data empty; fix the "
            "template (tokenizer_config.json 'chat_template') or the conversation"
        )
    return text


def assistant_spans(example, tokenizer, tokenizer_dir, number: int) -> tuple[tuple[int, int], ...]:
    """The character spans of a rendered conversation's assistant turns (each answer and its end-of-turn marks,
    not the header before it): where the conversation rendered up to the answer, with the answer's header, ends,
    and where it ends rendered with the answer. Refused for a template that does not render a conversation's
    beginnings as beginnings of it (then the turns cannot be located)."""
    spans = []
    for i, (role, _) in enumerate(example.messages):
        if role != "assistant":
            continue
        before = _render(tokenizer, example.messages[:i], tokenizer_dir, number, True) if i else ""
        through = _render(tokenizer, example.messages[: i + 1], tokenizer_dir, number)
        if not (example.text.startswith(through) and through.startswith(before)):
            raise RegmeanError(
                f"{tokenizer_dir}: the chat template renders conversation {number} otherwise than its beginnings, "
                "so its assistant turns cannot be located; score every token (--score all)"
            )
        spans.append((len(before), len(through)))
    return tuple(spans)
