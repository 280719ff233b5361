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


def render(messages: list[dict], template: str, tokenizer: Any = None, add_generation_prompt: bool = False) -> str:
    """The text the model sees for `messages` under `template` (one of TEMPLATES).

    - "alpaca": Stanford Alpaca's prompt; each assistant turn is `content + eos_token` directly
      after "### Response:". A system message replaces the preamble sentence. Multi-turn rule:
      every later user turn appends "\\n\\n### Instruction:\\n{instruction}[\\n\\n### Input:\\n{input}]
      \\n\\n### Response:" and its answer + eos. The response header is part of each user turn, so
      `add_generation_prompt` changes nothing here.
    - "chatml", "phi3", "llama3": byte-identical to the official templates rendered by
      `tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`.
    - "tokenizer": `tokenizer.apply_chat_template` with the tokenizer's own chat template.

    `tokenizer` supplies bos/eos text and may be None only for "chatml". Raises ValueError for an
    unknown template, a missing tokenizer, or alpaca messages whose turns do not alternate.
    """
    if template == "tokenizer":
        return _apply_chat_template(tokenizer, messages, add_generation_prompt)
    return "".join(text for text, _ in render_segments(messages, template, tokenizer, add_generation_prompt))


def render_segments(
    messages: list[dict], template: str, tokenizer: Any, add_generation_prompt: bool
) -> list[tuple[str, bool]]:
    """The rendered text as (text, supervised) pieces; each assistant turn gives exactly one piece
    holding its content plus the token that closes the turn, supervised unless its weight is 0."""
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
    return renderer(messages, tokenizer, add_generation_prompt)


def is_trained(message: dict) -> bool:
    """Whether an assistant message is supervised: yes unless it carries `"weight": 0` (context only)."""
    return message.get("weight", 1) == 1


def _alpaca_segments(messages, tokenizer, add_generation_prompt):
    if tokenizer.eos_token is None:
        raise ValueError("the 'alpaca' template needs tokenizer.eos_token to end each answer, but it is None")
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    turns = messages[1:] if system is not None else messages
    segments, previous = [], None
    for message in turns:
        if message["role"] == "user":
            instruction, input_text = message.get("instruction", message["content"]), message.get("input", "")
            if previous is None:
                preamble = (
                    system
                    if system is not None
                    else (ALPACA_PREAMBLE_INPUT if input_text else ALPACA_PREAMBLE_NO_INPUT)
                )
                text = preamble + "\n\n"
            else:
                text = "\n\n"
            text += f"### Instruction:\n{instruction}\n\n"
            text += f"### Input:\n{input_text}\n\n" if input_text != "" else ""
            segments.append((text + "### Response:", False))
        elif message["role"] == "assistant" and previous == "user":
            segments.append((message["content"] + tokenizer.eos_token, is_trained(message)))
        else:
            raise ValueError(
                "the 'alpaca' template needs alternating user/assistant turns after an optional system turn, "
                f"got {message['role']!r} after {previous!r}"
            )
        previous = message["role"]
    return segments


def _chatml_segments(messages, tokenizer, add_generation_prompt):
    segments = []
    for m in messages:
        if m["role"] == "assistant":
            segments += [("<|im_start|>assistant\n", False), (m["content"] + "<|im_end|>", is_trained(m)), ("\n", False)]
        else:
            segments.append((f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", False))
    if add_generation_prompt:
        segments.append(("<|im_start|>assistant\n", False))
    return segments


def _phi3_segments(messages, tokenizer, add_generation_prompt):
    segments = []
    for m in messages:
        tag = f"<|{m['role']}|>\n"
        if m["role"] == "assistant":
            segments += [(tag, False), (m["content"] + "<|end|>", is_trained(m)), ("\n", False)]
        elif m["role"] in ("system", "user"):
            segments.append((f"{tag}{m['content']}<|end|>\n", False))
        # the official template silently skips other roles; so do we (to_messages never makes them)
    if add_generation_prompt:
        segments.append(("<|assistant|>\n", False))
    else:
        segments.append((tokenizer.eos_token or "", False))  # the official template ends with eos_token
    return segments


def _llama3_segments(messages, tokenizer, add_generation_prompt):
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


def _apply_chat_template(tokenizer, messages, add_generation_prompt) -> str:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "the 'tokenizer' template needs a tokenizer with a chat_template; pick alpaca/chatml/phi3/llama3 instead"
        )
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]  # alpaca's extra keys stay out of jinja
    return tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=add_generation_prompt)


def _tokenizer_segments(messages, tokenizer, add_generation_prompt):
    """Assistant spans of the tokenizer's own template, found by rendering prefixes.

    For assistant turn i the span starts where `render(messages[:i], add_generation_prompt=True)`
    ends (that prefix must be a prefix of the full text) and ends right after the first special
    token that follows the turn's content, e.g. <|im_end|>, <|eot_id|>, <end_of_turn>, </s>; the
    search stops where `render(messages[:i+1])` stops agreeing with the full text. Without such a
    token the span ends there. What follows the closing token ("\\n", a final eos) is prompt.
    """
    full = _apply_chat_template(tokenizer, messages, add_generation_prompt)
    closers = _special_token_pattern(tokenizer)
    segments, position = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start, end = _assistant_span(tokenizer, messages, i, full, closers)
        segments += [(full[position:start], False), (full[start:end], is_trained(message))]
        position = end
    segments.append((full[position:], False))
    return segments


def _assistant_span(tokenizer, messages, i, full, closers) -> tuple[int, int]:
    prefix = _apply_chat_template(tokenizer, messages[:i], True)
    if not full.startswith(prefix):
        raise ValueError(
            f"the tokenizer's chat template renders turn {i} differently once later turns follow, so assistant "
            "spans cannot be found by prefix rendering; use one of the hand-written templates instead"
        )
    with_turn = _apply_chat_template(tokenizer, messages[: i + 1], False)
    limit = len(prefix) + _common_prefix_length(with_turn[len(prefix) :], full[len(prefix) :])
    content = messages[i]["content"].strip()
    found = full.find(content, len(prefix), limit)
    after_content = found + len(content) if found >= 0 else len(prefix)
    closer = closers.search(full, after_content, limit) if closers else None
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
    supervised = next(text for text, flag in _tokenizer_segments(probe, tokenizer, False) if flag)
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
    token of `tokenizer` (e.g. llama3 with a tokenizer lacking <|eot_id|>), or a missing bos/eos."""
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
    if problems:
        raise ValueError(f"prompt template {template!r} cannot be used with this tokenizer: " + "; ".join(problems))



def default_bos_ids(tokenizer: Any) -> list[int]:
    """[bos_token_id] when the tokenizer prepends it by default (e.g. Llama), else []."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return [bos] if with_special[:1] == [bos] and without[:1] != [bos] else []
