"""LongBench prompts as ``pred.py`` builds them: the task's template, middle truncation to a token
budget, and the chat template on the tasks that use it. Tokenizers are passed in.
"""

from __future__ import annotations

from typing import Any

from .data import LongBenchSample
from .tasks import LongBenchTask, get_task

__all__ = ["apply_chat_template", "build_prompt", "format_prompt", "truncate_middle", "uses_chat_template"]


# Fewer tokens than this cannot keep both a head and a tail (pred.py keeps int(max/2) of each).
MIN_PROMPT_TOKENS = 2


def format_prompt(task: str | LongBenchTask, sample: LongBenchSample) -> str:
    """The task's template filled with the sample's context and input (no truncation)."""
    return get_task(task).prompt_template.format(context=sample.context, input=sample.input)


def _token_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, truncation=False)["input_ids"])


def truncate_middle(prompt: str, tokenizer: Any, max_prompt_tokens: int) -> str:
    """LongBench's middle truncation: keep the first and last ``int(max/2)`` tokens.

    The start (instructions, the beginning of the context) and the end (the question) matter most,
    so pred.py cuts the middle of the context. As there, the prompt is tokenized with the
    tokenizer's default special tokens, and the two halves are decoded separately with
    ``skip_special_tokens=True`` and concatenated. Re-tokenizing the result can give a few tokens
    more or fewer than ``max_prompt_tokens`` (a merge can form at the seam); LongBench accepts
    that, and so do we.
    """
    if max_prompt_tokens < MIN_PROMPT_TOKENS:
        raise ValueError(
            f"max_prompt_tokens must be at least {MIN_PROMPT_TOKENS}, got {max_prompt_tokens}"
        )
    ids = _token_ids(tokenizer, prompt)
    if len(ids) <= max_prompt_tokens:
        return prompt
    half = int(max_prompt_tokens / 2)
    head = tokenizer.decode(ids[:half], skip_special_tokens=True)
    tail = tokenizer.decode(ids[-half:], skip_special_tokens=True)
    return head + tail


def build_prompt(
    task: str | LongBenchTask, sample: LongBenchSample, tokenizer: Any, max_prompt_tokens: int
) -> str:
    """Format the task's template for ``sample`` and middle-truncate it to ``max_prompt_tokens``.

    The result is the raw prompt before any chat formatting, as in pred.py (which truncates
    first and then builds the chat prompt); see :func:`apply_chat_template`.
    """
    return truncate_middle(format_prompt(task, sample), tokenizer, max_prompt_tokens)


def uses_chat_template(task: str | LongBenchTask, tokenizer: Any) -> bool:
    """Whether the prompt for ``task`` should go through ``tokenizer.apply_chat_template``.

    True when LongBench wraps this task in the chat format and the tokenizer has a chat template
    (a base model has none and gets the raw prompt, as LongBench's non-chat models do).
    """
    return get_task(task).chat_template and bool(getattr(tokenizer, "chat_template", None))


def apply_chat_template(task: str | LongBenchTask, prompt: str, tokenizer: Any) -> str:
    """The text to feed the model: the prompt as one user turn plus the generation prompt, or the
    prompt unchanged when :func:`uses_chat_template` is false.

    The chat text usually starts with the template's own BOS, so tokenize it with
    ``add_special_tokens=False`` to avoid a doubled BOS.
    """
    if not uses_chat_template(task, tokenizer):
        return prompt
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
