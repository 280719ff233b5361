"""Generation with the same prompt template the model was trained with.

- `generate_ids`: batched greedy generation from token ids, left-padded with an attention mask so
  that every row equals its own unbatched output; stops on every stop id.
- `generate_replies`: the same from conversations, rendered as in training (`encode_prompt`).
- `stream_reply`: one reply as text pieces while they are generated (TextIteratorStreamer).
- `load_adapter_model`: a trained adapter folder on its base model (4-bit for QLoRA adapters).
"""

from __future__ import annotations

from pathlib import Path
from threading import Thread
from typing import Iterator

import torch
from transformers import TextIteratorStreamer

from config import Settings
from data.examples import encode_prompt, template_bos_length
from data.templates import stop_token_ids


def generation_stop_ids(model, tokenizer, template: str) -> list[int]:
    """Every id that ends a reply: the template's (eos + turn end, e.g. <|im_end|>) first, then the
    model's generation config eos ids (a merged folder or `load_lora` put the training ones there)."""
    ids = stop_token_ids(template, tokenizer)
    eos = model.generation_config.eos_token_id
    ids += eos if isinstance(eos, (list, tuple)) else [eos]
    return list(dict.fromkeys(i for i in ids if i is not None))


@torch.no_grad()
def generate_ids(
    model,
    prompts: list[list[int]],
    stop_ids: list[int],
    pad_id: int,
    max_new_tokens: int = 48,
    streamer=None,
) -> list[list[int]]:
    """Greedy continuations of `prompts` (token id lists of any lengths), generated as one batch.

    Rows are left-padded with `pad_id` and an attention mask of 0 on the padding, so each row
    continues from its own last token at its own positions: row i equals the unbatched greedy
    output of `prompts[i]` (a test checks it for prompts of 2 and 7 tokens). Generation stops at
    any of `stop_ids`; each returned row is cut before its first stop id (so the padding of rows
    that finished early is gone too). `streamer` (batch of one only) receives tokens as they come.
    """
    device = next(model.parameters()).device
    width = max(len(ids) for ids in prompts)
    input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in prompts], device=device)
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts], device=device)
    was_training = model.training
    model.eval()
    out = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
        do_sample=False, eos_token_id=stop_ids, pad_token_id=pad_id, streamer=streamer,
    )
    model.train(was_training)
    return [_cut_at_stop(row[width:].tolist(), stop_ids) for row in out]


def fit_prompt(ids: list[int], keep: int, head: int = 0) -> list[int]:
    """The prompt cut from the left to `keep` tokens, as training truncates a prompt
    (`truncate_prompt`): its first `head` ids (a BOS the template wrote) stay when keep > head."""
    if len(ids) <= keep:
        return ids
    head = min(head, keep - 1)
    return ids[:head] + ids[len(ids) - (keep - head):]


def _cut_at_stop(ids: list[int], stop_ids: list[int]) -> list[int]:
    stops = set(stop_ids)
    return next((ids[:i] for i, token in enumerate(ids) if token in stops), ids)


def generate_replies(
    model,
    tokenizer,
    conversations: list[list[dict]],
    template: str,
    max_new_tokens: int = 48,
    batch_size: int = 8,
    stop_ids: list[int] | None = None,
    tools: list[dict] | None = None,
    max_length: int | None = None,
) -> list[str]:
    """Greedy replies to each conversation (its last turn must be the user's, or a tool result).

    Prompts are encoded exactly as training text was (`encode_prompt`: the template's own BOS,
    never a second one; `tools`, the tool list every conversation is offered, written as in
    training) and generated in batches by `generate_ids`, stopping at any of the template's stop
    ids (eos plus the turn-end token) plus `stop_ids`. A reply that calls a tool holds the call as
    the template writes it (`data.tools.parse_tool_calls` reads it back). With `max_length` (e.g.
    the run's max_seq_length), prompt + reply fit in it as training rows do: a longer prompt keeps
    its last `max_length - max_new_tokens` tokens (`fit_prompt`), so one huge record cannot make
    `generate` allocate attention for tens of thousands of tokens.

    Returns the decoded new text of each conversation, special tokens removed, stripped.
    """
    stops = stop_token_ids(template, tokenizer) + list(stop_ids or [])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    replies = []
    for start in range(0, len(conversations), batch_size):
        encoded = [encode_prompt(c, template, tokenizer, tools) for c in conversations[start:start + batch_size]]
        if max_length is not None:
            keep = max(1, max_length - max_new_tokens)
            encoded = [fit_prompt(ids, keep, template_bos_length(ids, template, tokenizer)) for ids in encoded]
        for ids in generate_ids(model, encoded, stops, pad_id, max_new_tokens):
            replies.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
    return replies


def stream_reply(
    model,
    tokenizer,
    messages: list[dict],
    template: str,
    max_new_tokens: int = 256,
    stop_ids: list[int] | None = None,
    tools: list[dict] | None = None,
) -> Iterator[str]:
    """The greedy reply to `messages` as text pieces, yielded while generation runs (in a thread).

    Same prompt and stops as `generate_replies`; the pieces join to its (unstripped) reply.
    """
    stops = stop_token_ids(template, tokenizer) + list(stop_ids or [])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    errors = []

    def run():
        try:
            prompt = encode_prompt(messages, template, tokenizer, tools)
            generate_ids(model, [prompt], stops, pad_id, max_new_tokens, streamer)
        except BaseException as exc:  # re-raised below; end the stream so the reader never hangs
            errors.append(exc)
            streamer.end()

    thread = Thread(target=run, daemon=True)
    thread.start()
    yield from streamer
    thread.join()
    if errors:
        raise errors[0]


def load_adapter_model(adapter_dir: str | Path, settings: Settings):
    """The base model named by `settings` (4-bit when `load_in_4bit`, as trained) with the adapter
    folder attached (`techniques.lora.load_lora`: added tokens and stop ids included)."""
    from models import load_model, resolve_model_path
    from techniques.lora import load_lora
    from techniques.qlora import load_4bit_model

    path = resolve_model_path(settings)
    base = load_4bit_model(settings, path) if settings.load_in_4bit else load_model(settings, path)
    if not settings.load_in_4bit and torch.cuda.is_available():
        base.to("cuda")
    return load_lora(base, adapter_dir)
