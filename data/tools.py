"""Tool-calling text: how a tool list, a tool call and a tool result are written, in the two published
formats our templates follow, and how to read tool calls back out of a generated reply.

Messages (as `data.readers` makes them, and as transformers' chat templates take them): an
assistant message may hold `tool_calls`, a list of `{"type": "function", "function": {"name": str,
"arguments": dict}}`; a tool result is a message of role "tool" with string `content`; the tool
list (`tools=`) is a list of `{"type": "function", "function": {"name", "description", "parameters"}}`.

- Hermes / Qwen2.5 (used by chatml, phi3 and alpaca), as Qwen2.5-Instruct's chat template writes it:
  the tool list is a "# Tools" block in the system text with one JSON schema per line inside
  <tools></tools>; each call is `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`
  after the assistant's text (one line apart); consecutive tool results are one turn of
  `<tool_response>\\n...\\n</tool_response>` blocks, one line apart.
- Llama 3.1 JSON tool calling (used by llama3), as Llama-3.1-Instruct's chat template writes it:
  see `data.templates` (the whole conversation takes the 3.1 layout).

Every function here has a Jinja twin (the JINJA_* strings, used by `data.chat_templates`); tests
pin that both give the same ids. JSON is written as transformers' `tojson` filter writes it:
`json.dumps(value, ensure_ascii=False)` (`indent=4` where the template asks for it).
"""

from __future__ import annotations

import json
import re
from typing import Any


def tojson(value: Any, indent: int | None = None) -> str:
    """transformers' Jinja `tojson` filter: json.dumps with ensure_ascii=False."""
    return json.dumps(value, ensure_ascii=False, indent=indent)


def call_function(call: dict) -> dict:
    """The `{"name", "arguments"}` part of one tool call (OpenAI wraps it in "function")."""
    return call["function"] if "function" in call else call


def arguments_json(arguments: Any) -> str:
    """Arguments as the templates write them: a dict as JSON; a string (OpenAI's wire form, already JSON) as is."""
    return arguments if isinstance(arguments, str) else tojson(arguments)


# ---------------------------------------------------------------- Hermes / Qwen2.5

HERMES_TOOLS_HEAD = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
HERMES_TOOLS_TAIL = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call>"
)


def hermes_system(system: str | None, tools: list[dict] | None) -> str | None:
    """The system text with the tool list appended (Qwen2.5: "{system}\\n\\n# Tools..."); the tool list
    alone without a system text; `system` unchanged without tools."""
    if not tools:
        return system
    tool_list = HERMES_TOOLS_HEAD + "".join("\n" + tojson(tool) for tool in tools) + HERMES_TOOLS_TAIL
    return f"{system}\n\n{tool_list}" if system else tool_list


def hermes_answer(message: dict) -> str:
    """An assistant turn's text: its content, then each tool call, one line apart."""
    parts = [message["content"]] if message.get("content") else []
    for call in message.get("tool_calls") or []:
        function = call_function(call)
        parts.append(
            '<tool_call>\n{"name": "' + function["name"] + '", "arguments": '
            + arguments_json(function["arguments"]) + "}\n</tool_call>"
        )
    return "\n".join(parts)


def hermes_result(content: str) -> str:
    return "<tool_response>\n" + content + "\n</tool_response>"


def jinja_literal(text: str) -> str:
    """`text` as a single-quoted Jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


# Jinja twins. In every JINJA_* string the loop variable is `m` (a message) and the tool list `tools`.
JINJA_ARGUMENTS = (
    "{%- if c.arguments is string -%}{{ c.arguments }}{%- else -%}{{ c.arguments | tojson }}{%- endif -%}"
)
JINJA_HERMES_ANSWER = (
    "{%- set sep = namespace(text='') -%}"
    "{%- if m.content -%}{{ m.content }}{%- set sep.text = '\\n' -%}{%- endif -%}"
    "{%- if m.tool_calls is defined and m.tool_calls -%}{%- for call in m.tool_calls -%}"
    "{%- set c = call.function if call.function is defined else call -%}"
    "{{ sep.text + '<tool_call>\\n{\"name\": \"' + c.name + '\", \"arguments\": ' }}" + JINJA_ARGUMENTS
    + "{{ '}\\n</tool_call>' }}{%- set sep.text = '\\n' -%}"
    "{%- endfor -%}{%- endif -%}"
)


def jinja_hermes_system(source: str) -> str:
    """Jinja that sets `system_text` from the expression `source` (a string or none) and `tools`, as
    `hermes_system` does."""
    return (
        "{%- set system_text = " + source + " -%}"
        "{%- if tools -%}"
        "{%- set tool_list = namespace(text=" + jinja_literal(HERMES_TOOLS_HEAD) + ") -%}"
        "{%- for tool in tools -%}{%- set tool_list.text = tool_list.text + '\\n' + (tool | tojson) -%}{%- endfor -%}"
        "{%- set tool_list.text = tool_list.text + " + jinja_literal(HERMES_TOOLS_TAIL) + " -%}"
        "{%- set system_text = (system_text + '\\n\\n' + tool_list.text) if system_text else tool_list.text -%}"
        "{%- endif -%}"
    )


def jinja_tool_results(opening: str, closing: str) -> str:
    """Jinja for tool result `m` inside `for m in messages`, grouped as `data.templates` groups them."""
    return (
        "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' -%}{{ " + jinja_literal(opening) + " }}"
        "{%- else -%}{{ '\\n' }}{%- endif -%}"
        "{{ '<tool_response>\\n' + m['content'] + '\\n</tool_response>' }}"
        "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' -%}"
        "{{ " + jinja_literal(closing) + " }}{%- endif -%}"
    )


# ---------------------------------------------------------------- Llama 3.1 JSON tool calling

LLAMA31_SYSTEM_HEAD = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
LLAMA31_TOOLS_PROMPT = (
    "Given the following functions, please respond with a JSON for a function call with its proper arguments "
    "that best answers the given prompt.\n\n"
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
    "Do not use variables.\n\n"
)


def llama31_tool_prompt(tools: list[dict], user_content: str) -> str:
    """The first user turn's text with the tool list before it (the 3.1 default, tools_in_user_message)."""
    return LLAMA31_TOOLS_PROMPT + "".join(tojson(tool, indent=4) + "\n\n" for tool in tools) + user_content.strip()


def llama31_call(message: dict) -> str:
    """`{"name": ..., "parameters": {...}}`: Llama 3.1 writes one call per turn and no text beside it."""
    calls = message["tool_calls"]
    if len(calls) != 1 or message.get("content"):
        raise ValueError(
            "the llama3 template writes tool calls in Llama 3.1's format: one call per assistant turn, with no "
            f"text beside it (this turn has {len(calls)} calls and {len(message.get('content') or '')} characters "
            "of text); split the turn, or use the chatml template (Hermes format)"
        )
    function = call_function(calls[0])
    return '{"name": "' + function["name"] + '", "parameters": ' + arguments_json(function["arguments"]) + "}"


def llama31_result(content: Any) -> str:
    # The official template tests `content is mapping or content is iterable`, which a string passes,
    # so it writes every result as JSON: a string result appears quoted. We write what it writes.
    return tojson(content)


# ---------------------------------------------------------------- reading calls back

_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def parse_tool_calls(reply: str) -> list[dict]:
    """The tool calls in a generated reply, as `{"name": str, "arguments": dict}`: every
    <tool_call>...</tool_call> block (Hermes), or else a reply that is one JSON object with "name" and
    "parameters" or "arguments" (Llama 3.1). Blocks that are not valid JSON calls are left out."""
    blocks = _HERMES_CALL.findall(reply) or [reply.strip()]
    calls = []
    for block in blocks:
        try:
            value = json.loads(block)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict) and isinstance(value.get("name"), str):
            arguments = value.get("arguments", value.get("parameters", {}))
            calls.append({"name": value["name"], "arguments": arguments})
    return calls
