"""Greedy batched generation with the same prompt template the model was trained with."""

from __future__ import annotations

import torch

from data.dataset import encode_prompt, stop_token_ids


@torch.no_grad()
def generate_replies(
    model,
    tokenizer,
    conversations: list[list[dict]],
    template: str,
    max_new_tokens: int = 48,
    batch_size: int = 8,
) -> list[str]:
    """Greedy replies to each conversation (its last turn must be the user's).

    Prompts are encoded exactly as training text was (`encode_prompt`: the template's own BOS,
    never a second one), left-padded with an attention mask so every
    row continues from its own last token, and generation stops at any of the template's stop ids
    (eos plus the turn-end token).

    Returns the decoded new text of each conversation, special tokens removed, stripped.
    """
    stops = stop_token_ids(template, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    replies = []
    for start in range(0, len(conversations), batch_size):
        encoded = [encode_prompt(c, template, tokenizer) for c in conversations[start:start + batch_size]]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in encoded], device=device)
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device)
        out = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
            do_sample=False, eos_token_id=stops, pad_token_id=pad_id,
        )
        replies += [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]
    model.train(was_training)
    return replies
