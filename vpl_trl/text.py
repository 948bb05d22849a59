"""Text as the models see it: chat or plain prompts and responses, rendered for scoring and for generation.

- `is_chat`, `render_text`: a (prompt, response) as the reward model scores it (the chat template for chat data).
- `completion_text`, `join_response`: a policy's completion as text, joined to its prompt as training data joins them.
- `dialogue_messages`, `policy_input_text`: the text a policy continues (a `Human:/Assistant:` dialogue as chat turns).
"""

from __future__ import annotations

import re
from typing import Any

from transformers import PreTrainedTokenizerBase
from trl.data_utils import is_conversational


def is_chat(value: Any) -> bool:
    """Whether a prompt or response is chat messages (TRL's conversational format) rather than text; an empty
    message list counts as chat."""
    return value == [] or is_conversational({"prompt": value})


def render_text(tokenizer, prompt: Any, response: Any) -> str:
    """The text that is scored: prompt + response, or the chat rendered with the tokenizer's template."""
    if is_chat(response) or is_chat(prompt):
        messages = []
        if prompt:
            messages += prompt if is_chat(prompt) else [{"role": "user", "content": prompt}]
        messages += response if is_chat(response) else [{"role": "assistant", "content": response}]
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return (prompt or "") + response


def completion_text(completion: Any) -> str:
    """The text of a completion given as a string or as chat messages (TRL's conversational format)."""
    if isinstance(completion, str):
        return completion
    return "".join(message["content"] for message in completion if message.get("role", "assistant") == "assistant")


def join_response(prompt: Any, response: str) -> str:
    """The response as scored after `prompt`: after a plain-text prompt ending in a non-space (`...Assistant:`)
    a response gets the leading space that `Human:/Assistant:` data (HH-RLHF, Pets) put there."""
    if isinstance(prompt, str) and prompt and not prompt[-1].isspace() and response and not response[0].isspace():
        return " " + response
    return response


def dialogue_messages(text: str) -> list[dict[str, str]] | None:
    """Chat messages of a `Human: ... Assistant:` dialogue ending in an open assistant turn (HH-RLHF and Pets
    prompts), or None when `text` is not one."""
    turns = re.split(r"(?:^|\n\n)(Human|Assistant):", text)
    if turns[0].strip() or len(turns) < 3 or turns[1] != "Human" or turns[-2] != "Assistant" or turns[-1].strip():
        return None
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[turns[i]], "content": turns[i + 1].strip()} for i in range(1, len(turns) - 2, 2)]


def policy_input_text(tokenizer: PreTrainedTokenizerBase, prompt: Any) -> str:
    """The text a policy continues: the chat template with a generation prompt when the tokenizer has one
    (a `Human:/Assistant:` dialogue becomes its turns, other text one user message)."""
    if getattr(tokenizer, "chat_template", None):
        messages = prompt if is_chat(prompt) else dialogue_messages(prompt) or [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if is_chat(prompt):
        raise ValueError("a chat prompt needs a policy tokenizer with a chat template.")
    return prompt
