"""`sdpa_varlen`: torch's scaled-dot-product attention run once per example of a padding-free row.

Packed rows (and TRL's padding-free batches) hold several examples in one row, with position ids
that restart at 0 for each example and no attention mask. transformers' `sdpa` then builds one
dense block-diagonal mask over the whole row: its cost grows with the square of the row's tokens,
T^2 rather than the sum of each example's t_i^2, and the mask itself stops torch from skipping the
causal upper triangle. On a 2-core CPU a batch of 8 rows of 1,024 tokens ran out of 24 GiB that way
(bench/, scaling rows). Flash attention's varlen kernels avoid this on a GPU by reading the
sequence boundaries; this is the same idea for any device, through transformers' documented
extension points (`AttentionInterface` and `AttentionMaskInterface`, "Customizing attention
function" in its docs): each example's slice goes through transformers' own `sdpa` with
`is_causal=True`, so no mask is built and no token sees another example.

Everything else (a padded batch, generation with a KV cache, sliding-window layers) is plain
`sdpa`, unchanged. The position ids must reach the attention function, as flash attention needs
them too: `models.load_model` keeps plain `sdpa` for a model class without flash-attention support.

    attention.register()
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa_varlen")
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "sdpa_varlen"


def example_bounds(position_ids: torch.Tensor) -> list[int]:
    """Start offsets of the examples in one padding-free row, plus the row's length at the end.

    An example starts wherever the position id does not follow the previous one by 1 (the rule of
    transformers' `find_packed_sequence_indices`).

    Args:
        position_ids: int tensor of shape (T,).

    Returns:
        [0, s_1, ..., T]: example i covers tokens s_i .. s_{i+1} - 1. [0, T] for a single example.
    """
    steps = position_ids[1:] - position_ids[:-1]
    starts = (torch.nonzero(steps != 1).flatten() + 1).tolist()
    return [0, *starts, position_ids.shape[0]]


def sdpa_varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention with transformers' signature: query (B, H, T, D), key/value (B, H_kv, S, D).

    Returns (B, T, H, D) as `sdpa_attention_forward` does, and None for the weights. Rows without a
    mask whose `position_ids` (B, T) restart run `sdpa` once per example with `is_causal=True` and
    are concatenated back in order; anything else (a mask, a KV cache where S != T, no position ids,
    one example per row) is a single `sdpa_attention_forward` call.
    """
    plain = (attention_mask is not None or position_ids is None or query.shape[2] != key.shape[2]
             or query.shape[2] < 2 or not getattr(module, "is_causal", True))
    bounds = None if plain else [example_bounds(row) for row in position_ids.expand(query.shape[0], -1)]
    if bounds is None or all(len(b) == 2 for b in bounds):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("is_causal", None)
    rows = []
    for b, row_bounds in enumerate(bounds):
        pieces = [
            sdpa_attention_forward(module, query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e],
                                   None, is_causal=True, **kwargs)[0]
            for s, e in zip(row_bounds[:-1], row_bounds[1:])
        ]
        rows.append(torch.cat(pieces, dim=1))
    return torch.cat(rows, dim=0), None


def sdpa_varlen_mask(*args, attention_mask: torch.Tensor | None = None, local_size: int | None = None,
                     **kwargs) -> torch.Tensor | None:
    """The mask `sdpa_varlen` needs: none for full-attention layers over rows without padding (the
    attention reads the example bounds from the position ids), else `sdpa_mask`'s, for plain `sdpa`:
    a padded batch, and sliding-window or chunked layers (`local_size`), whose mask transformers
    builds with the packed rows' bounds in it, so they stay exact, at dense cost."""
    if attention_mask is None and local_size is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, local_size=local_size, **kwargs)


def register() -> str:
    """Make `attn_implementation="sdpa_varlen"` known to transformers (idempotent); returns the name.

    `models.load_model` calls it when the settings ask for this kernel.
    """
    AttentionInterface.register(NAME, sdpa_varlen_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_varlen_mask)
    return NAME
