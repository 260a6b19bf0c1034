"""The one chat template every part of align renders conversations with.

ChatML (`<|im_start|>role\\n...<|im_end|>`), the format of SmolLM2 and Qwen. The assistant's
content and its closing `<|im_end|>` sit inside `{% generation %}` markers, so
`return_assistant_tokens_mask=True` marks exactly the tokens the model must learn to
produce, the stop token included. The template is prefix-preserving: a prompt rendered
with `add_generation_prompt=True` is a prefix of the prompt followed by its answer, which
is what completion-only loss and the DPO/rollout stages rely on.
"""

import re

_SYSTEM_DEFAULT = (
    "{%- if messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\n' + DEFAULT_SYSTEM + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
)
_BODY = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- generation -%}{{- message['content'] + '<|im_end|>' -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def chatml_template(default_system: str | None = None) -> str:
    """ChatML with generation markers; `default_system` is rendered when a chat has no system turn
    (SmolLM2 was tuned with one, so its conversion keeps it)."""
    if not default_system:
        return _BODY
    return _SYSTEM_DEFAULT.replace("DEFAULT_SYSTEM", repr(default_system)) + _BODY


CHATML_TEMPLATE = chatml_template()

BOS, EOS, PAD = "<|endoftext|>", "<|im_end|>", "<|pad|>"
SPECIAL_TOKENS = [BOS, "<|im_start|>", EOS, PAD]


def has_generation_markers(template: str) -> bool:
    return re.search(r"\{%-?\s*generation\s*-?%\}", template) is not None
