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
from data.tools import (
    JINJA_ARGUMENTS,
    JINJA_HERMES_ANSWER,
    LLAMA31_SYSTEM_HEAD,
    LLAMA31_TOOLS_PROMPT,
    jinja_hermes_system,
    jinja_literal,
    jinja_tool_results,
)

# Our own Jinja equivalents of `data.templates`' renderers (written for this project; the official
# template files are only used by tests to pin byte parity). Each is tested to give the training ids.
_TOOLS = "{%- set tools = tools if tools is defined and tools else none -%}"
_SYSTEM = "{%- set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else none -%}"

_ALPACA = (
    _TOOLS + _SYSTEM
    + "{%- set ns = namespace(started=false) -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}"
    "{%- set instruction = m['instruction'] if m['instruction'] is defined else m['content'] -%}"
    "{%- set input = m['input'] if m['input'] is defined else '' -%}"
    "{%- if ns.started -%}{{ '\\n\\n' }}"
    "{%- else -%}"
    + jinja_hermes_system(
        "system if system is not none else ("
        + jinja_literal(ALPACA_PREAMBLE_INPUT) + " if input else " + jinja_literal(ALPACA_PREAMBLE_NO_INPUT) + ")"
    )
    + "{{ system_text + '\\n\\n' }}{%- endif -%}"
    "{{ '### Instruction:\\n' + instruction + '\\n\\n' }}"
    "{%- if input -%}{{ '### Input:\\n' + input + '\\n\\n' }}{%- endif -%}"
    "{{ '### Response:' }}{%- set ns.started = true -%}"
    "{%- elif m['role'] == 'assistant' -%}" + JINJA_HERMES_ANSWER + "{{ eos_token }}"
    "{%- elif m['role'] == 'tool' -%}" + jinja_tool_results("\n\n### Input:\n", "\n\n### Response:")
    + "{%- endif -%}"
    "{%- endfor -%}"
)

_CHATML = (
    _TOOLS + _SYSTEM + jinja_hermes_system("system")
    + "{%- if tools and system is none -%}{{ '<|im_start|>system\\n' + system_text + '<|im_end|>\\n' }}{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}{{ '<|im_start|>assistant\\n' }}"
    + JINJA_HERMES_ANSWER + "{{ '<|im_end|>\\n' }}"
    "{%- elif m['role'] == 'tool' -%}" + jinja_tool_results("<|im_start|>user\n", "<|im_end|>\n")
    + "{%- elif loop.first and m['role'] == 'system' -%}{{ '<|im_start|>system\\n' + system_text + '<|im_end|>\\n' }}"
    "{%- else -%}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

_PHI3 = (
    _TOOLS + _SYSTEM + jinja_hermes_system("system")
    + "{%- if tools and system is none -%}{{ '<|system|>\\n' + system_text + '<|end|>\\n' }}{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}{{ '<|assistant|>\\n' }}" + JINJA_HERMES_ANSWER + "{{ '<|end|>\\n' }}"
    "{%- elif m['role'] == 'tool' -%}" + jinja_tool_results("<|user|>\n", "<|end|>\n")
    + "{%- elif loop.first and m['role'] == 'system' -%}{{ '<|system|>\\n' + system_text + '<|end|>\\n' }}"
    "{%- elif m['role'] in ['system', 'user'] -%}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- else -%}{{ eos_token }}{%- endif -%}"
)

_LLAMA31_CALL = (
    "{%- set c = m.tool_calls[0].function if m.tool_calls[0].function is defined else m.tool_calls[0] -%}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n{\"name\": \"' + c.name + '\", \"parameters\": ' }}"
    + JINJA_ARGUMENTS + "{{ '}<|eot_id|>' }}"
)
_LLAMA3 = (
    _TOOLS
    + "{%- set ns = namespace(tool_turns=false) -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'tool' or (m.tool_calls is defined and m.tool_calls) -%}"
    "{%- set ns.tool_turns = true -%}{%- endif -%}{%- endfor -%}"
    "{%- if tools or ns.tool_turns -%}"  # Llama 3.1's layout, see data.templates._llama31_segments
    "{{ bos_token + '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{%- if tools -%}{{ 'Environment: ipython\\n' }}{%- endif -%}{{ " + jinja_literal(LLAMA31_SYSTEM_HEAD) + " }}"
    "{%- set rest = messages -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{ messages[0]['content'] | trim }}{%- set rest = messages[1:] -%}{%- endif -%}"
    "{{ '<|eot_id|>' }}"
    "{%- if tools -%}"
    "{{ '<|start_header_id|>user<|end_header_id|>\\n\\n' + " + jinja_literal(LLAMA31_TOOLS_PROMPT) + " }}"
    "{%- for tool in tools -%}{{ (tool | tojson(indent=4)) + '\\n\\n' }}{%- endfor -%}"
    "{{ (rest[0]['content'] | trim) + '<|eot_id|>' }}{%- set rest = rest[1:] -%}"
    "{%- endif -%}"
    "{%- for m in rest -%}"
    "{%- if m['role'] == 'tool' -%}"
    "{{ '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + (m['content'] | tojson) + '<|eot_id|>' }}"
    "{%- elif m.tool_calls is defined and m.tool_calls -%}" + _LLAMA31_CALL
    + "{%- else -%}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + (m['content'] | trim) + '<|eot_id|>' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- else -%}"  # Llama 3's
    "{%- for m in messages -%}{%- if loop.first -%}{{ bos_token }}{%- endif -%}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
)

_CHAT_TEMPLATES = {"alpaca": _ALPACA, "chatml": _CHATML, "phi3": _PHI3, "llama3": _LLAMA3}


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


