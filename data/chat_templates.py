"""The chat template saved with a trained model: our Jinja twin of each prompt template.

    chat_template_for(template, tokenizer, system_prompt) -> str | None

Saved as `tokenizer.chat_template` next to a trained model, so servers that render with the
tokenizer (vLLM, TGI, llama.cpp converters) prompt the model token for token as it was trained
(`data.templates.render` + `data.examples`); tests pin the ids.
"""

from __future__ import annotations

import json
from typing import Any

from data.templates import ALPACA_PREAMBLE_INPUT, ALPACA_PREAMBLE_NO_INPUT, TEMPLATES, default_bos_ids

# Our own Jinja equivalents of `data.templates`' renderers (written for this project; the official
# template files are only used by tests to pin byte parity). Each is tested to give the training ids.
_CHAT_TEMPLATES = {
    "alpaca": (
        "{%- set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else none -%}"
        "{%- set ns = namespace(started=false) -%}"
        "{%- for m in messages -%}"
        "{%- if m['role'] == 'user' -%}"
        "{%- set instruction = m['instruction'] if m['instruction'] is defined else m['content'] -%}"
        "{%- set input = m['input'] if m['input'] is defined else '' -%}"
        "{%- if ns.started -%}{{ '\\n\\n' }}"
        "{%- elif system is not none -%}{{ system + '\\n\\n' }}"
        "{%- elif input -%}{{ '" + ALPACA_PREAMBLE_INPUT + "\\n\\n' }}"
        "{%- else -%}{{ '" + ALPACA_PREAMBLE_NO_INPUT + "\\n\\n' }}{%- endif -%}"
        "{{ '### Instruction:\\n' + instruction + '\\n\\n' }}"
        "{%- if input -%}{{ '### Input:\\n' + input + '\\n\\n' }}{%- endif -%}"
        "{{ '### Response:' }}{%- set ns.started = true -%}"
        "{%- elif m['role'] == 'assistant' -%}{{ m['content'] + eos_token }}{%- endif -%}"
        "{%- endfor -%}"
    ),
    "chatml": (
        "{%- for m in messages -%}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    ),
    "phi3": (
        "{%- for m in messages -%}{%- if m['role'] in ['system', 'user', 'assistant'] -%}"
        "{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- else -%}{{ eos_token }}{%- endif -%}"
    ),
    "llama3": (
        "{%- for m in messages -%}{%- if loop.first -%}{{ bos_token }}{%- endif -%}"
        "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
    ),
}


def chat_template_for(template: str, tokenizer: Any, system_prompt: str | None = None) -> str | None:
    """The Jinja chat template to save with a model trained on `template`: `apply_chat_template(messages,
    tokenize=True)` of the saved tokenizer gives the ids the trainer saw (`build_sft_example`), and
    with `add_generation_prompt=True` the ids of `encode_prompt`.

    - "tokenizer": the tokenizer's own template (None when it has none); otherwise our Jinja twin of
      `render(..., template)`. Alpaca's generation prompt is part of each user turn, so
      `add_generation_prompt` changes nothing there, as in `render`.
    - `system_prompt` (the `system_prompt` setting, which the trainer prepends to conversations
      without a system turn) becomes the template's default system turn, so a request without one
      is prompted as training prompted it.
    - alpaca on a tokenizer that adds a BOS by default (Llama, Phi-3): the trainer prepends that BOS
      id, as Stanford's recipe does, so the template writes `bos_token` first.
    - No template is exactly 1,024 bytes long: llama-cpp-python 0.3.36 reads such a template one
      character short and fails (TemplateSyntaxError); a Jinja comment is appended instead.

    Raises ValueError for an unknown template.
    """
    if template == "tokenizer":
        text = tokenizer.chat_template
        if text is None:
            return None
    elif template in _CHAT_TEMPLATES:
        text = _CHAT_TEMPLATES[template]
    else:
        raise ValueError(f"unknown prompt template {template!r}; expected one of {TEMPLATES}")
    if template == "alpaca" and default_bos_ids(tokenizer):
        text = "{{ bos_token }}" + text
    if system_prompt:
        text = _default_system_turn(system_prompt) + text
    if len(text.encode()) == 1024:
        text += "{# not 1024 bytes long: llama-cpp-python 0.3.36 misreads those #}"
    return text


def _default_system_turn(system_prompt: str) -> str:
    # A JSON string is a valid Jinja string literal (\n, \" and \\ escapes; other text kept as is).
    # No whitespace control after the last tag, so the template that follows renders unchanged.
    literal = json.dumps(system_prompt, ensure_ascii=False)
    return (
        "{%- if not messages or messages[0]['role'] != 'system' %}"
        "{%- set messages = [{'role': 'system', 'content': " + literal + "}] + messages %}"
        "{%- endif %}"
    )


