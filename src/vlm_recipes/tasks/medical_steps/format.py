"""The medical_steps prompt, memory and answer format.

User turn: the screenshot, then `PROMPT_HEADER` and one line of JSON `{"long_term_memory", "short_term_memory",
"user_goal"}`. `short_term_memory` is the previous step's output (`{}` at the first step); `long_term_memory` is the
union of the outputs of all earlier steps of the task, a later step's value winning for a key set twice
(`next_memory`). Assistant turn: the step's `Output` as compact JSON with sorted keys. Training uses the target outputs
as memory; evaluation (`MedicalStepsTask.predict`) and `MedicalStepsPredictor.run_task` use the model's own
predictions.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = [
    "PROMPT_HEADER",
    "build_step_messages",
    "dumps_compact",
    "next_memory",
    "parse_step_context",
    "parse_step_output",
]

PROMPT_HEADER = (
    "You operate medical imaging software one step at a time. From the screenshot, the user goal and the memory "
    "below, answer with this step's output as one JSON object."
)


def dumps_compact(value: Any) -> str:
    """The JSON text of an output or memory: compact, keys sorted, so that equal values render equally."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def build_step_messages(
    user_goal: str,
    short_term_memory: dict[str, Any],
    long_term_memory: dict[str, Any],
    output: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """One step's conversation: the user turn (screenshot + goal + memory), and the answer when `output` is given."""
    context = {"user_goal": user_goal, "short_term_memory": short_term_memory, "long_term_memory": long_term_memory}
    text = f"{PROMPT_HEADER}\n{dumps_compact(context)}"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    if output is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": dumps_compact(output)}]})
    return messages


def parse_step_context(messages: list[dict[str, Any]]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """`(user_goal, short_term_memory, long_term_memory)` back from the user turn that `build_step_messages` wrote.

    Evaluation needs it because `build_dataset` keeps only `id`, `images` and `messages` of a row.
    """
    user = next((message for message in messages if message["role"] == "user"), None)
    content = user["content"] if user is not None else None
    text = (
        content
        if isinstance(content, str)
        else "".join(item.get("text", "") for item in content or [] if item.get("type") == "text")
    )
    header, _, context_line = text.partition("\n")
    try:
        if header != PROMPT_HEADER:
            raise ValueError("the first line is not the medical_steps prompt header")
        context = json.loads(context_line)
        return context["user_goal"], context["short_term_memory"], context["long_term_memory"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"Not a medical_steps prompt ({error}); build rows with `MedicalStepsTask.load_rows` or "
            "`build_step_messages`."
        ) from None


def next_memory(
    long_term_memory: dict[str, Any], output: dict[str, Any] | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """`(short_term, long_term)` memory for the step after one whose output is `output`.

    Short-term memory is that output; long-term memory adds its keys to the earlier ones (a later value wins). An
    unparseable prediction (`None`) leaves nothing to remember: empty short-term memory, long-term memory unchanged.
    """
    if output is None:
        return {}, dict(long_term_memory)
    return dict(output), {**long_term_memory, **output}


def parse_step_output(text: str) -> tuple[dict[str, Any] | None, str | None]:
    """`(output, None)` when `text` (whitespace aside) is one JSON object, else `(None, why not)`.

    Strict on purpose: the model is trained to answer bare compact JSON, and a lenient parse would hide drift.
    """
    try:
        value = json.loads(text.strip())
    except json.JSONDecodeError as error:
        return None, f"invalid JSON ({error.msg} at column {error.colno})"
    if not isinstance(value, dict):
        return None, f"expected a JSON object, got {type(value).__name__}"
    return value, None
