"""Chat messages -> text: the prompt templates, their supervised segments, stop ids.

    render(messages, template, tokenizer)          -> str        (alpaca / chatml / phi3 / llama3 / tokenizer)
    render_segments(messages, template, ...)       -> [(text, supervised)]
    turn_end_token / stop_token_ids                -> what ends an assistant turn
    check_template_tokens(template, tokenizer)     -> raises when the tokenizer lacks the template's tokens

Each template renders a conversation into segments that are either prompt text or supervised text
(an assistant turn's content plus the token that closes the turn); `data.examples` tokenizes each
segment on its own, so the label masks are known by construction.

Sources of the formats:
- Alpaca: the prompt of Stanford Alpaca `train.py` (tatsu-lab/stanford_alpaca @761dc5bf, lines 31-42),
  target = output + eos_token directly after "### Response:".
- ChatML, Phi-3, Llama 3: hand-written renderers, byte-identical to the official chat templates
  (generic ChatML; microsoft/Phi-3-mini-4k-instruct; meta-llama/Meta-Llama-3-8B-Instruct) rendered
  by `tokenizer.apply_chat_template`; the parity is pinned by tests.
"""

from __future__ import annotations

import re
from typing import Any

from data.tools import (
    LLAMA31_SYSTEM_HEAD,
    arguments_json,
    call_function,
    hermes_answer,
    hermes_result,
    hermes_system,
    llama31_call,
    llama31_result,
    llama31_tool_prompt,
)

TEMPLATES = ("alpaca", "chatml", "phi3", "llama3", "tokenizer")

# Stanford Alpaca train.py PROMPT_DICT, split into the preamble sentence and the blocks after it,
# so a system message can replace the preamble and later turns can repeat the blocks.
ALPACA_PREAMBLE_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
ALPACA_PREAMBLE_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)

# Special tokens each hand-written template writes; each must be one token in the tokenizer,
# otherwise the rendered turn markers would be split into ordinary text pieces.
_TEMPLATE_TOKENS = {
    "alpaca": (),
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "phi3": ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "tokenizer": (),
}
_TURN_END = {"chatml": "<|im_end|>", "phi3": "<|end|>", "llama3": "<|eot_id|>"}


def render(
    messages: list[dict],
    template: str,
    tokenizer: Any = None,
    add_generation_prompt: bool = False,
    tools: list[dict] | None = None,
) -> str:
    """The text the model sees for `messages` (and the tool list `tools`) under `template`.

    - "alpaca": Stanford Alpaca's prompt; each assistant turn is `content + eos_token` directly
      after "### Response:". A system message replaces the preamble sentence. Multi-turn rule:
      every later user turn appends "\\n\\n### Instruction:\\n{instruction}[\\n\\n### Input:\\n{input}]
      \\n\\n### Response:" and its answer + eos. The response header is part of each user turn, so
      `add_generation_prompt` changes nothing here.
    - "chatml", "phi3", "llama3": byte-identical to the official templates rendered by
      `tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`.
    - "tokenizer": `tokenizer.apply_chat_template(messages, tools=tools)` with the tokenizer's own
      chat template (which must write the tool list and calls when the data has them).

    Tool calling (`tools`, assistant `tool_calls`, role "tool"; see `data.tools`), one way per template:
    - chatml: Qwen2.5's format, byte-identical to Qwen2.5-Instruct's template when the conversation
      has a system turn (without one, Qwen writes its own default system text, we write none): the
      tool list in the system turn, calls as <tool_call> blocks in the assistant turn, results as a
      user turn of <tool_response> blocks.
    - phi3, alpaca: Phi-3 and Alpaca publish no tool format, so the same Hermes/Qwen2.5 blocks in
      their own turns: phi3 puts the tool list in its system turn and results in a <|user|> turn;
      alpaca appends the tool list to its preamble (or system text) and writes results as
      "\\n\\n### Input:\\n<tool_response>...</tool_response>\\n\\n### Response:".
    - llama3: a conversation with tools or tool messages is written as Llama-3.1-Instruct's template
      writes it, byte for byte (its system turn with "Environment: ipython" and the cutting-knowledge
      date lines, the tool list before the first user message, one JSON call per assistant turn,
      results in an "ipython" turn); one without, as Llama 3's.

    `tokenizer` supplies bos/eos text and may be None only for "chatml". Raises ValueError for an
    unknown template, a missing tokenizer, turns the template cannot write (alpaca: turns out of
    order; llama3: two calls or text beside a call in one turn), or a "tokenizer" chat template that
    drops the tool list or the calls.
    """
    if template == "tokenizer":
        return _apply_chat_template(tokenizer, messages, add_generation_prompt, tools or None)
    return "".join(text for text, _ in render_segments(messages, template, tokenizer, add_generation_prompt, tools))


def render_segments(
    messages: list[dict], template: str, tokenizer: Any, add_generation_prompt: bool, tools: list[dict] | None = None
) -> list[tuple[str, bool]]:
    """The rendered text as (text, supervised) pieces; each assistant turn gives exactly one piece
    holding its content (and tool calls) plus the token that closes the turn, supervised unless its
    weight is 0. System, user and tool turns and the tool list are never supervised.

    Worked example, chatml, tools=[find_book], [user "Where is Dune?", assistant calling
    find_book(title="Dune"), tool '{"shelf": "B12"}', assistant "Shelf B12."]; [[...]] = supervised:

        <|im_start|>system\\n# Tools\\n\\nYou may call one or more functions ... </tool_call><|im_end|>\\n
        <|im_start|>user\\nWhere is Dune?<|im_end|>\\n<|im_start|>assistant\\n
        [[<tool_call>\\n{"name": "find_book", "arguments": {"title": "Dune"}}\\n</tool_call><|im_end|>]]\\n
        <|im_start|>user\\n<tool_response>\\n{"shelf": "B12"}\\n</tool_response><|im_end|>\\n
        <|im_start|>assistant\\n[[Shelf B12.<|im_end|>]]\\n
    """
    if template not in TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}; expected one of {TEMPLATES}")
    if template != "chatml" and tokenizer is None:
        raise ValueError(f"the {template!r} template needs a tokenizer (for its bos/eos tokens)")
    renderer = {
        "alpaca": _alpaca_segments,
        "chatml": _chatml_segments,
        "phi3": _phi3_segments,
        "llama3": _llama3_segments,
        "tokenizer": _tokenizer_segments,
    }[template]
    return renderer(messages, tokenizer, add_generation_prompt, tools or None)


def is_trained(message: dict) -> bool:
    """Whether an assistant message is supervised: yes unless it carries `"weight": 0` (context only)."""
    return message.get("weight", 1) == 1


def _tool_results(messages: list[dict], i: int, opening: str, closing: str) -> str:
    """Tool result i as one <tool_response> block; consecutive results share one turn (`opening` before
    the first, `closing` after the last, one line between blocks), as Qwen2.5 groups them."""
    first = i == 0 or messages[i - 1]["role"] != "tool"
    last = i + 1 == len(messages) or messages[i + 1]["role"] != "tool"
    return (opening if first else "\n") + hermes_result(messages[i]["content"]) + (closing if last else "")


def _alpaca_segments(messages, tokenizer, add_generation_prompt, tools):
    if tokenizer.eos_token is None:
        raise ValueError("the 'alpaca' template needs tokenizer.eos_token to end each answer, but it is None")
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    turns = messages[1:] if system is not None else messages
    segments, previous = [], None
    for i, message in enumerate(turns):
        role = message["role"]
        if role == "user":
            instruction, input_text = message.get("instruction", message["content"]), message.get("input", "")
            if previous is None:
                preamble = (
                    system
                    if system is not None
                    else (ALPACA_PREAMBLE_INPUT if input_text else ALPACA_PREAMBLE_NO_INPUT)
                )
                text = hermes_system(preamble, tools) + "\n\n"
            else:
                text = "\n\n"
            text += f"### Instruction:\n{instruction}\n\n"
            text += f"### Input:\n{input_text}\n\n" if input_text != "" else ""
            segments.append((text + "### Response:", False))
        elif role == "assistant" and previous in ("user", "tool"):
            segments.append((hermes_answer(message) + tokenizer.eos_token, is_trained(message)))
        elif role == "tool" and previous in ("assistant", "tool"):
            segments.append((_tool_results(turns, i, "\n\n### Input:\n", "\n\n### Response:"), False))
        else:
            raise ValueError(
                "the 'alpaca' template needs user/assistant turns in turn (tool results after an assistant turn) "
                f"after an optional system turn, got {role!r} after {previous!r}"
            )
        previous = role
    return segments


def _chatml_segments(messages, tokenizer, add_generation_prompt, tools):
    segments = []
    if tools and not (messages and messages[0]["role"] == "system"):
        segments.append((f"<|im_start|>system\n{hermes_system(None, tools)}<|im_end|>\n", False))
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            answer = hermes_answer(m) + "<|im_end|>"
            segments += [("<|im_start|>assistant\n", False), (answer, is_trained(m)), ("\n", False)]
        elif m["role"] == "tool":
            segments.append((_tool_results(messages, i, "<|im_start|>user\n", "<|im_end|>\n"), False))
        else:
            content = hermes_system(m["content"], tools) if i == 0 and m["role"] == "system" else m["content"]
            segments.append((f"<|im_start|>{m['role']}\n{content}<|im_end|>\n", False))
    if add_generation_prompt:
        segments.append(("<|im_start|>assistant\n", False))
    return segments


def _phi3_segments(messages, tokenizer, add_generation_prompt, tools):
    segments = []
    if tools and not (messages and messages[0]["role"] == "system"):
        segments.append((f"<|system|>\n{hermes_system(None, tools)}<|end|>\n", False))
    for i, m in enumerate(messages):
        tag = f"<|{m['role']}|>\n"
        if m["role"] == "assistant":
            segments += [(tag, False), (hermes_answer(m) + "<|end|>", is_trained(m)), ("\n", False)]
        elif m["role"] == "tool":
            segments.append((_tool_results(messages, i, "<|user|>\n", "<|end|>\n"), False))
        elif m["role"] in ("system", "user"):
            content = hermes_system(m["content"], tools) if i == 0 and m["role"] == "system" else m["content"]
            segments.append((f"{tag}{content}<|end|>\n", False))
        # the official template silently skips other roles; so do we (to_messages never makes them)
    if add_generation_prompt:
        segments.append(("<|assistant|>\n", False))
    else:
        segments.append((tokenizer.eos_token or "", False))  # the official template ends with eos_token
    return segments


def _llama3_segments(messages, tokenizer, add_generation_prompt, tools):
    if tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
        return _llama31_segments(messages, tokenizer, add_generation_prompt, tools)
    segments = []
    for i, m in enumerate(messages):
        header = (
            (tokenizer.bos_token or "") if i == 0 else ""
        ) + f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n"
        body = m["content"].strip() + "<|eot_id|>"  # the official template applies jinja's `trim` == str.strip
        segments += [(header, False), (body, is_trained(m))] if m["role"] == "assistant" else [(header + body, False)]
    if add_generation_prompt:
        segments.append(("<|start_header_id|>assistant<|end_header_id|>\n\n", False))
    return segments


def _llama31_segments(messages, tokenizer, add_generation_prompt, tools):
    """Llama-3.1-Instruct's chat template (custom tools in the first user message, no builtin tools)."""
    has_system = bool(messages) and messages[0]["role"] == "system"
    rest = messages[1:] if has_system else messages
    system = (
        (tokenizer.bos_token or "") + "<|start_header_id|>system<|end_header_id|>\n\n"
        + ("Environment: ipython\n" if tools else "") + LLAMA31_SYSTEM_HEAD
        + (messages[0]["content"].strip() if has_system else "") + "<|eot_id|>"
    )
    segments = [(system, False)]
    if tools:
        if not rest or rest[0]["role"] != "user":
            raise ValueError("the llama3 template (Llama 3.1 tools) puts the tool list in the first user turn: none")
        user = llama31_tool_prompt(tools, rest[0]["content"])
        segments.append((f"<|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|>", False))
        rest = rest[1:]
    for m in rest:
        header = f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n"
        if m["role"] == "tool":
            result = llama31_result(m["content"])
            segments.append((f"<|start_header_id|>ipython<|end_header_id|>\n\n{result}<|eot_id|>", False))
        elif m["role"] == "assistant":
            body = llama31_call(m) if m.get("tool_calls") else m["content"].strip()
            segments += [(header, False), (body + "<|eot_id|>", is_trained(m))]
        else:
            segments.append((header + m["content"].strip() + "<|eot_id|>", False))
    if add_generation_prompt:
        segments.append(("<|start_header_id|>assistant<|end_header_id|>\n\n", False))
    return segments


# Message keys a model's own chat template reads; ours (alpaca's instruction/input, weight) stay out.
_TEMPLATE_KEYS = ("role", "content", "tool_calls", "tool_call_id", "name")


def _apply_chat_template(tokenizer, messages, add_generation_prompt, tools=None) -> str:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "the 'tokenizer' template needs a tokenizer with a chat_template; pick alpaca/chatml/phi3/llama3 instead"
        )
    plain = [{k: m[k] for k in _TEMPLATE_KEYS if k in m} for m in messages]
    text = tokenizer.apply_chat_template(
        plain, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    _check_tools_rendered(text, messages, tools)
    return text


def _check_tools_rendered(text: str, messages: list[dict], tools: list[dict] | None) -> None:
    """A chat template without tool support (SmolLM2's) silently drops the tool list and the calls."""
    names = [call_function(t)["name"] for t in tools or []]
    names += [call_function(c)["name"] for m in messages for c in m.get("tool_calls") or []]
    missing = sorted({name for name in names if name not in text})
    if missing:
        raise ValueError(
            f"the tokenizer's chat template does not write the tool list or tool calls (it drops {missing}); "
            "use PROMPT_TEMPLATE=chatml, phi3, llama3 or alpaca, which write them (see data/templates.py)"
        )


def _tokenizer_segments(messages, tokenizer, add_generation_prompt, tools):
    """Assistant spans of the tokenizer's own template, found by rendering prefixes.

    For assistant turn i the span starts where `render(messages[:i], add_generation_prompt=True)`
    ends (that prefix must be a prefix of the full text) and ends right after the first special
    token that follows the turn's content and tool calls (their function names and arguments JSON,
    when the template writes them so), e.g. <|im_end|>, <|eot_id|>, <end_of_turn>, </s>; the
    search stops where `render(messages[:i+1])` stops agreeing with the full text. Without such a
    token the span ends there. What follows the closing token ("\\n", a final eos) is prompt.
    """
    full = _apply_chat_template(tokenizer, messages, add_generation_prompt, tools)
    closers = _special_token_pattern(tokenizer)
    segments, position = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start, end = _assistant_span(tokenizer, messages, i, full, closers, tools)
        segments += [(full[position:start], False), (full[start:end], is_trained(message))]
        position = end
    segments.append((full[position:], False))
    return segments


def _assistant_span(tokenizer, messages, i, full, closers, tools) -> tuple[int, int]:
    prefix = _apply_chat_template(tokenizer, messages[:i], True, tools)
    if not full.startswith(prefix):
        raise ValueError(
            f"the tokenizer's chat template renders turn {i} differently once later turns follow, so assistant "
            "spans cannot be found by prefix rendering; use one of the hand-written templates instead"
        )
    with_turn = _apply_chat_template(tokenizer, messages[: i + 1], False, tools)
    limit = len(prefix) + _common_prefix_length(with_turn[len(prefix) :], full[len(prefix) :])
    after = len(prefix)
    pieces = [messages[i]["content"].strip()]
    for call in messages[i].get("tool_calls") or []:
        pieces += [call_function(call)["name"], arguments_json(call_function(call)["arguments"])]
    for piece in pieces:  # each found after the one before it, when the template writes it that way
        found = full.find(piece, after, limit) if piece else -1
        after = found + len(piece) if found >= 0 else after
    closer = closers.search(full, after, limit) if closers else None
    return len(prefix), closer.end() if closer else limit


def _common_prefix_length(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):  # noqa: B905 (stops at the shorter on purpose)
        if x != y:
            break
        n += 1
    return n


def _special_token_pattern(tokenizer) -> re.Pattern | None:
    tokens = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    tokens |= {t for t in (tokenizer.eos_token,) if t}
    if not tokens:
        return None
    # longest first, so "<|end|>" never wins over "<|endoftext|>" at the same position
    return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))


def turn_end_token(template: str, tokenizer: Any) -> str:
    """The token that closes an assistant turn: <|im_end|> (chatml), <|end|> (phi3), <|eot_id|>
    (llama3), eos_token (alpaca); for "tokenizer", the special token that closes the assistant span
    of a probe conversation (eos_token when the template has none)."""
    if template in _TURN_END:
        return _TURN_END[template]
    if template == "alpaca":
        return tokenizer.eos_token
    if template != "tokenizer":
        raise ValueError(f"unknown prompt template {template!r}; expected one of {TEMPLATES}")
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    supervised = next(text for text, flag in _tokenizer_segments(probe, tokenizer, False, None) if flag)
    closers = _special_token_pattern(tokenizer)
    match = closers.search(supervised) if closers else None
    return match.group(0) if match else tokenizer.eos_token


def stop_token_ids(template: str, tokenizer: Any) -> list[int]:
    """Token ids that end generation: eos_token_id plus the turn-end token's id, deduplicated, in that
    order (e.g. llama3 -> [id(<|end_of_text|>), id(<|eot_id|>)]), for `generate(eos_token_id=...)`."""
    ids = [tokenizer.eos_token_id]
    turn_end = turn_end_token(template, tokenizer)
    if turn_end is not None:
        ids += tokenizer.encode(turn_end, add_special_tokens=False)[:1]
    return list(dict.fromkeys(i for i in ids if i is not None))


def check_template_tokens(template: str, tokenizer: Any) -> None:
    """Raise ValueError naming `template` and every special token it writes that is not a single
    token of `tokenizer` (e.g. llama3 with a tokenizer lacking <|eot_id|>), or a missing bos/eos,
    and how to fix it: the templates this tokenizer can use, or adding the tokens."""
    problems, missing = _template_problems(template, tokenizer)
    if problems:
        usable = [t for t in TEMPLATES if t != template and not _template_problems(t, tokenizer)[0]]
        fix = f"use PROMPT_TEMPLATE={' or '.join(usable)}, whose tokens this tokenizer has" + (
            " (tokenizer: the model's own chat template)" if "tokenizer" in usable else ""
        )
        if missing:
            fix += (
                f", or add the tokens and train their new embedding rows: tokenizer.add_special_tokens("
                f"{{'additional_special_tokens': {missing}}}), then techniques.lora.resize_token_embeddings(model, "
                "tokenizer) (and lora_target_modules / modules_to_save covering embed_tokens and lm_head)"
            )
        raise ValueError(
            f"prompt template {template!r} cannot be used with this tokenizer: " + "; ".join(problems) + f". Fix: {fix}"
        )


def _template_problems(template: str, tokenizer: Any) -> tuple[list[str], list[str]]:
    """(problems, missing special tokens) of `template` with `tokenizer`."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}; expected one of {TEMPLATES}")
    needed = list(_TEMPLATE_TOKENS[template])
    problems = []
    for attr, templates in (("eos_token", ("alpaca", "phi3")), ("bos_token", ("llama3",))):
        if template in templates:
            if getattr(tokenizer, attr) is None:
                problems.append(f"tokenizer.{attr} is None")
            else:
                needed.append(getattr(tokenizer, attr))
    missing = [t for t in needed if len(tokenizer.encode(t, add_special_tokens=False)) != 1]
    if missing:
        problems.append(f"not single tokens in this tokenizer: {missing}")
    if template == "tokenizer" and not getattr(tokenizer, "chat_template", None):
        problems.append("the tokenizer has no chat_template")
    return problems, missing


def default_bos_ids(tokenizer: Any) -> list[int]:
    """[bos_token_id] when the tokenizer prepends it by default (e.g. Llama), else []."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return [bos] if with_special[:1] == [bos] and without[:1] != [bos] else []
