"""Chat messages -> token ids with exact label masks: one SFT example, a generation prompt, a DPO pair.

    build_sft_example(messages, ...)        -> dict | None         (input_ids, attention_mask, labels)
    encode_prompt(messages, ...)            -> list[int]           (generation prompt, same tokenization)
    encode_prompt_completion(messages, ...) -> (prompt_ids, completion_ids)   (DPO)

Labels are built by construction, never by searching token ids: `data.templates` renders a
conversation into prompt segments (label -100) and supervised segments, and every segment is
tokenized on its own with `add_special_tokens=False`. Supervised positions are therefore known
exactly, whatever the token ids are (pad == eos cannot mask the real EOS), and a prompt ending in
"Answer: " followed by the completion "four" supervises exactly the tokens of "four" and the turn end.
"""

from __future__ import annotations

import bisect
from typing import Any

from data.templates import check_template_tokens, default_bos_ids, is_trained, render_segments

TRUNCATION_STRATEGIES = ("truncate_prompt", "drop")
IGNORE_INDEX = -100  # the label value that torch's cross-entropy (and every HF model) skips


def build_sft_example(
    messages: list[dict],
    tokenizer: Any,
    template: str,
    max_seq_length: int,
    truncation_strategy: str = "truncate_prompt",
    train_on_last_turn_only: bool = False,
    tools: list[dict] | None = None,
) -> dict | None:
    """Token ids and labels of one conversation, or None when it yields no supervised token.

    Returns `{"input_ids", "attention_mask", "labels"}`, lists of int of one length <= max_seq_length;
    labels are the input ids (unshifted, the model shifts) on supervised positions and -100 elsewhere.

    Supervised: every assistant turn's content plus the token that closes the turn (<|im_end|>
    chatml, <|end|> phi3, <|eot_id|> llama3, eos_token alpaca, see `data.templates` for
    "tokenizer"); only the last assistant turn when `train_on_last_turn_only`. Everything else is
    -100: system and user turns, headers, and what follows the turn end ("\\n", phi3's final eos).
    The text is rendered in segments and each is tokenized alone with `add_special_tokens=False`,
    so no BOS is ever added: the ids hold exactly the BOS the template writes (llama3, maybe
    "tokenizer"), and for ordinary messages they equal `apply_chat_template(messages,
    tokenize=True)`. "alpaca" mirrors Stanford train.py, which tokenizes with the tokenizer's
    defaults: one BOS is prepended when the tokenizer adds one by default.

    Worked example, chatml, messages [user "2+2?", assistant "4"], one token per piece, positions 0-14:

        text:   <|im_start|> user \\n 2 + 2 ? <|im_end|> \\n <|im_start|> assistant \\n 4 <|im_end|> \\n
        labels: -100 x 12 (the user turn and the assistant header),    4, <|im_end|>, -100

    Truncation, when the ids are longer than max_seq_length (n), works on whole turns first: the
    earliest exchanges (a user turn and the assistant and tool turns answering it) are dropped, the
    system turn and the tool list always kept, fewest first, until the rest fits; so an answer is
    never trained without the prompt that led to it (status "truncated"). Only when even the last
    exchange that holds a trained answer does not fit does `truncation_strategy` apply:
      - "drop": return None (status "dropped_too_long").
      - "truncate_prompt" (default): that exchange's last answer (its supervised span and what
        follows it) stays whole; the tokens before it are cut from the left, after the BOS the
        template wrote (h = 1 for llama3, alpaca's prepended BOS, a "tokenizer" template using
        bos_token; else 0), and become context: an earlier answer of the exchange (a tool call) is
        not trained. The cut never reaches into the end of the turn before the answer and the
        assistant header (status "truncated_mid_turn"); when those and the answer do not fit, None
        (status "dropped_too_long").

    Worked example, chatml, [user "2+2?", assistant "4", user "3+3?", assistant "6"] (30 tokens,
    one token per piece as above; each exchange is 15 tokens):
      - n = 20: the first exchange goes; the row is the 15 tokens of [user "3+3?", assistant "6"],
        labels -100 x 12, 6, <|im_end|>, -100 (never "4 <|im_end|>" without "2+2?" before it).
      - n = 10: the last exchange alone is too long. truncate_prompt removes its first 5 ids,
        leaving "3 ? <|im_end|> \\n <|im_start|> assistant \\n 6 <|im_end|> \\n", labels -100 x 7, 6,
        <|im_end|>, -100; drop returns None.
      - n = 7: the answer (3 ids) + <|im_end|> \\n <|im_start|> assistant \\n (5 ids) do not fit: None.
    An example left without a supervised token returns None (the builder counts it).

    Raises ValueError for an unknown template or strategy, max_seq_length < 1, or template tokens
    that are not single tokens (see `check_template_tokens`).
    """
    example, _ = build_sft_example_with_status(
        messages, tokenizer, template, max_seq_length, truncation_strategy, train_on_last_turn_only, tools
    )
    return example


def encode_prompt(messages: list[dict], template: str, tokenizer: Any, tools: list[dict] | None = None) -> list[int]:
    """Token ids of the generation prompt for `messages` (ending with a user or tool turn; with the
    tool list `tools` written as in training, see `data.templates.render`), tokenized exactly
    as `build_sft_example` tokenizes training text: the template's own BOS only (alpaca: the
    tokenizer's default BOS), never a second one. Use it instead of `tokenizer(render(...))`, which
    adds another BOS to llama3 text with tokenizers that prepend one by default.
    """
    check_template_tokens(template, tokenizer)
    rendered = render_segments(messages, template, tokenizer, add_generation_prompt=True, tools=tools)
    segments = [(text, False) for text, _ in rendered]
    ids, _ = _tokenize_segments(_merge_segments(segments), tokenizer)
    return (default_bos_ids(tokenizer) if template == "alpaca" else []) + ids


def build_sft_example_with_status(
    messages, tokenizer, template, max_seq_length, truncation_strategy, train_on_last_turn_only, tools=None
):
    """(example or None, status), status one of "kept", "truncated" (earliest turns dropped),
    "truncated_mid_turn" (the last exchange cut inside its prompt), "dropped_too_long",
    "dropped_no_supervised"; see `build_sft_example`."""
    if truncation_strategy not in TRUNCATION_STRATEGIES:
        raise ValueError(
            f"unknown truncation_strategy {truncation_strategy!r}; expected one of {TRUNCATION_STRATEGIES}"
        )
    if max_seq_length < 1:
        raise ValueError(f"max_seq_length must be >= 1, got {max_seq_length}")
    check_template_tokens(template, tokenizer)

    def encode(conversation):
        return _encode(conversation, tokenizer, template, train_on_last_turn_only, tools)

    ids, labels = encode(messages)
    status = "kept"
    if len(ids) > max_seq_length:
        tails = _shorter_tails(messages)
        # Each tail is shorter than the one before it: bisect for the longest that fits.
        first_fit = bisect.bisect_left(tails, True, key=lambda tail: len(encode(tail)[0]) <= max_seq_length)
        if first_fit < len(tails):
            ids, labels = encode(tails[first_fit])
            status = "truncated"
        elif truncation_strategy == "drop":
            return None, "dropped_too_long"
        else:
            ids, labels = encode(tails[-1]) if tails else (ids, labels)
            probe = encode_prompt([{"role": "user", "content": "x"}], template, tokenizer)
            has_bos = _starts_with_template_bos(ids, template, tokenizer)
            cut = _cut_before_last_answer(ids, labels, max_seq_length, probe, has_bos)
            if cut is None:
                return None, "dropped_too_long"
            (ids, labels), status = cut, "truncated_mid_turn"
    if all(label == IGNORE_INDEX for label in labels):
        return None, "dropped_no_supervised"
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}, status


def _encode(messages, tokenizer, template, train_on_last_turn_only, tools) -> tuple[list[int], list[int]]:
    segments = render_segments(messages, template, tokenizer, add_generation_prompt=False, tools=tools)
    if train_on_last_turn_only:
        last = max(i for i, (_, flag) in enumerate(segments) if flag) if any(f for _, f in segments) else -1
        segments = [(text, i == last) for i, (text, _) in enumerate(segments)]
    ids, labels = _tokenize_segments(_merge_segments(segments), tokenizer)
    if template == "alpaca":
        bos = default_bos_ids(tokenizer)
        ids, labels = bos + ids, [IGNORE_INDEX] * len(bos) + labels
    return ids, labels


def _shorter_tails(messages: list[dict]) -> list[list[dict]]:
    """The conversation without its first 1, 2, ... exchanges (an exchange starts at a user turn), the
    system turn kept, longest first, down to the last exchange that holds a trained answer."""
    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    starts = [i for i, m in enumerate(messages) if m["role"] == "user"]
    trained = [i for i, m in enumerate(messages) if m["role"] == "assistant" and is_trained(m)]
    last_needed = max((s for s in starts if trained and s < trained[-1]), default=None)
    return [head + messages[s:] for s in starts[1:] if last_needed is not None and s <= last_needed]


def _cut_before_last_answer(ids, labels, n, probe, has_bos) -> tuple[list[int], list[int]] | None:
    """truncate_prompt inside one exchange (see `build_sft_example`): everything before the last
    supervised span becomes context and is cut from the left after the BOS, never into the tokens it
    shares at its end with the generation prompt `probe` (the previous turn's end + the header)."""
    h = 1 if has_bos else 0
    supervised = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    if not supervised:
        return None
    s = supervised[-1]
    while s > 0 and labels[s - 1] != IGNORE_INDEX:
        s -= 1  # walk back to the first token of the last supervised span
    header = _common_suffix_length(ids[h:s], probe)
    excess = len(ids) - n
    if s - h - excess < header:
        return None
    labels = [IGNORE_INDEX] * s + labels[s:]
    return ids[:h] + ids[h + excess :], labels[:h] + labels[h + excess :]


def _common_suffix_length(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


def _merge_segments(segments: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    # Neighbouring prompt pieces are tokenized together, so segment boundaries exist only where
    # supervision changes; empty pieces carry no tokens.
    merged = []
    for text, flag in segments:
        if not text:
            continue
        if merged and merged[-1][1] == flag:
            merged[-1] = (merged[-1][0] + text, flag)
        else:
            merged.append((text, flag))
    return merged


def _tokenize_segments(segments: list[tuple[str, bool]], tokenizer) -> tuple[list[int], list[int]]:
    if not segments:
        return [], []
    pieces = tokenizer([text for text, _ in segments], add_special_tokens=False)["input_ids"]
    ids, labels = [], []
    for piece, (_, supervised) in zip(pieces, segments, strict=True):
        ids += piece
        labels += piece if supervised else [IGNORE_INDEX] * len(piece)
    return ids, labels


def _starts_with_template_bos(ids: list[int], template: str, tokenizer) -> bool:
    # Only a BOS the template wrote counts: SmolLM2's bos is <|im_start|>, which in chatml merely
    # opens the first turn and may be truncated like any other prompt token.
    writes_bos = template in ("llama3", "alpaca") or (
        template == "tokenizer" and "bos_token" in (tokenizer.chat_template or "")
    )
    return writes_bos and bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id


def encode_prompt_completion(messages: list[dict], template: str, tokenizer: Any) -> tuple[list[int], list[int]]:
    """(prompt_ids, completion_ids) of a conversation whose last turn is the assistant's, for DPO.

    prompt_ids is `encode_prompt(messages[:-1], template, tokenizer)`: every earlier turn plus the
    template's assistant header, exactly what generation is given. completion_ids is the last
    assistant turn's supervised segment as `build_sft_example` supervises it (content + turn-end
    token), tokenized on its own with `add_special_tokens=False`; what the template writes after
    the turn end ("\\n", phi3's final eos) is left out. The two are never tokenized together, so a
    prompt ending in "A: " keeps its own ids whether the answer is "46" or "$46".

    Worked example, chatml, [user "2+2?", assistant "4"]:
        prompt:     <|im_start|>user\\n2+2?<|im_end|>\\n<|im_start|>assistant\\n
        completion: 4<|im_end|>

    Raises ValueError when the last turn is not the assistant's, for template tokens missing from
    the tokenizer, or when the template renders the prompt alone differently from the text before
    the answer (a "tokenizer" chat template that does so cannot be split by construction).
    """
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("a prompt/completion pair needs a conversation that ends with an assistant turn")
    check_template_tokens(template, tokenizer)
    segments = render_segments(messages, template, tokenizer, add_generation_prompt=False)
    last = max(i for i, (_, supervised) in enumerate(segments) if supervised)
    before = "".join(text for text, _ in segments[:last])
    prompt_segments = render_segments(messages[:-1], template, tokenizer, add_generation_prompt=True)
    prompt = "".join(text for text, _ in prompt_segments)
    if before != prompt:
        raise ValueError(
            f"the {template!r} template renders the prompt alone differently from the text before the answer "
            f"({prompt[-40:]!r} vs {before[-40:]!r}); use one of the hand-written templates"
        )
    completion = tokenizer(segments[last][0], add_special_tokens=False)["input_ids"]
    return encode_prompt(messages[:-1], template, tokenizer), completion


def template_bos_length(ids: list[int], template: str, tokenizer: Any) -> int:
    """1 when `ids` start with a BOS the template wrote (llama3, alpaca's default BOS, a "tokenizer"
    template using bos_token), else 0: left truncation of a prompt keeps these first ids."""
    return int(_starts_with_template_bos(ids, template, tokenizer))
