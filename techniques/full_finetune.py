"""Full fine-tuning: every weight trains, with layer-wise LR decay (LLRD) and differential LR groups.

Recipe: load the model in fp32 (`load_model(settings, path, dtype=torch.float32)`: bf16 weights
would round away most updates at full-FT learning rates) -> `optimizer = build_optimizer(model,
settings)` -> `build_sft_trainer(..., optimizers=(optimizer, None))`: the trainer builds its usual
warmup + cosine/linear scheduler over this optimizer, stepping once per optimizer step and scaling
every group's own LR -> `trainer.train()` -> `trainer.save_model(dir)` (a plain transformers folder).

Learning rates, with L decoder layers numbered i = 0 (next to the embeddings) .. L - 1 (next to
the head), lr = `learning_rate` and d = `llrd_decay`:

    group                                    learning rate
    head (`lm_head`) and final norm          head_lr   (default lr)
    decoder layer i                          lr * d ** (L - i)   (top layer: lr * d, bottom: lr * d ** L)
    embeddings (token and position)          embed_lr  (default lr * d ** (L + 1))

so the default ladder has no gaps: head d**0, layers d**1 .. d**L, embeddings d**(L + 1); d = 1
turns LLRD off. Anything else outside the decoder layers (rare; e.g. OPT's project_out) trains with
the head. Tied input/output embeddings (SmolLM2, Gemma, Qwen2 small, ...) are one tensor in one
group: the head's, at head_lr (it receives the output layer's gradient; putting it at embed_lr
would all but freeze the head), without weight decay (it is an embedding).

Sources: discriminative fine-tuning, Howard & Ruder 2018, "Universal Language Model Fine-tuning
for Text Classification" (ULMFiT; eta^(l-1) = eta^l / 2.6); layer-wise LR decay, Clark et al. 2020,
"ELECTRA" (lr * decay ** (depth from the top); their code puts a pooler between the top layer and
the task head, which a causal LM lacks, hence our contiguous ladder).

Weight decay (`weight_decay`, AdamW's decoupled decay) applies to 2-D weight matrices only
(linear / Conv1D weights of shape [out, in] or [in, out], and an untied `lm_head`): never to
biases, to norm weights (found by module type and by name, so custom RMSNorm classes count) or,
by default, to embeddings (`decay_embeddings=False`: a row gets gradient only when its token
occurs, but decay shrinks every row every step, so rare tokens would drift to zero; minGPT makes
the same choice).
"""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

from config import FullFTSettings, Settings

log = logging.getLogger(__name__)

#: Where transformers' causal LMs keep their decoder blocks, tried in order. Llama, Mistral,
#: Qwen2, Phi-3, Gemma, SmolLM2: model.layers; GPT-2, GPT-J, Falcon, Bloom: transformer.h;
#: GPT-NeoX / Pythia: gpt_neox.layers; OPT: model.decoder.layers; MPT: transformer.blocks;
#: multimodal wrappers (Gemma 3, Llama 4 text): model.language_model.layers.
LAYER_LIST_PATHS = (
    "model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers",
    "transformer.blocks", "transformer.layers", "model.language_model.layers",
)
OPTIMIZERS = ("adamw_torch", "adamw_8bit", "paged_adamw_8bit")
_NORM_TYPES = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.BatchNorm1d)
# Module names of norms: input_layernorm, post_attention_layernorm, norm, final_layer_norm, ln_1, ln_f, ...
_NORM_NAME = re.compile(r"(norm|^ln_|^ln$|^ln\d)", re.IGNORECASE)


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's own list of decoder blocks: `(dotted path, nn.ModuleList of L blocks)`.

    Tries `LAYER_LIST_PATHS` first, then the one `nn.ModuleList` whose every child's class is
    named in the model's `_no_split_modules` (transformers' own name for its decoder block, e.g.
    `LlamaDecoderLayer`), which covers architectures not listed.

    Raises:
        ValueError: no such list; the message names every path tried and the block classes looked for.
    """
    for path in LAYER_LIST_PATHS:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return path, module
    block_names = set(getattr(model, "_no_split_modules", None) or ())
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) > 0 and all(type(c).__name__ in block_names for c in m)]
    if len(found) == 1:
        return found[0]
    raise ValueError(
        f"{type(model).__name__}: found no decoder layer list. Looked for an nn.ModuleList at "
        f"{', '.join(LAYER_LIST_PATHS)}, then for one whose blocks are of the model's _no_split_modules "
        f"classes ({', '.join(sorted(block_names)) or 'none declared'}); found {len(found)}. "
        "Add the path of its block list to techniques.full_finetune.LAYER_LIST_PATHS."
    )


def is_norm(name: str, module: nn.Module) -> bool:
    """A normalization module: a torch norm type, a class named *Norm* (LlamaRMSNorm, ...), or a
    module named like one (`input_layernorm`, `model.norm`, `ln_f`, `ln_1`, `final_layer_norm`)."""
    return (isinstance(module, _NORM_TYPES) or "norm" in type(module).__name__.lower()
            or bool(_NORM_NAME.search(name.rsplit(".", 1)[-1])))


def _embedding_modules(model: nn.Module, layers: nn.ModuleList) -> list[nn.Module]:
    """Input embeddings plus every nn.Embedding outside the decoder layers (position embeddings)."""
    inside = {id(m) for m in layers.modules()}
    found = [model.get_input_embeddings()]
    found += [m for m in model.modules() if isinstance(m, nn.Embedding) and id(m) not in inside and m not in found]
    return found


def llrd_param_groups(
    model: nn.Module,
    lr: float,
    llrd_decay: float,
    weight_decay: float,
    embed_lr: float | None = None,
    head_lr: float | None = None,
    *,
    decay_embeddings: bool = False,
) -> list[dict]:
    """Optimizer parameter groups: one per (depth, decay / no-decay), LRs as in the module docstring.

    Args:
        model: a transformers causal LM whose decoder blocks `decoder_layers` finds (L blocks).
        lr: peak LR of the top of the ladder (`learning_rate`).
        llrd_decay: d in (0, 1]; decoder layer i of L trains at lr * d ** (L - i); 1.0 = no decay.
        weight_decay: AdamW decay of the 2-D weight matrices (never biases, norms, embeddings).
        embed_lr: LR of the input (and position) embeddings; None = lr * d ** (L + 1).
        head_lr: LR of `lm_head`, the final norm and a tied embedding; None = lr.
        decay_embeddings: also decay embedding matrices (default False).
    Returns:
        Dicts for `torch.optim.AdamW(groups)`, ordered head, layers L-1 .. 0, embeddings, each with
        `params`, `lr`, `weight_decay`, `name` (e.g. "model.layers.3 decay") and `param_names`.
        Group 0 is the head, so the LR the trainer logs (group 0's) is head_lr's. Only trainable
        parameters appear, each exactly once (named_parameters lists a tied tensor once); empty
        groups are left out.
    Raises:
        ValueError: no decoder layer list (see `decoder_layers`).
    """
    layers_path, layers = decoder_layers(model)
    n_layers = len(layers)
    head_lr = lr if head_lr is None else head_lr
    embed_lr = lr * llrd_decay ** (n_layers + 1) if embed_lr is None else embed_lr
    layer_of = {id(p): i for i, layer in enumerate(layers) for p in layer.parameters()}
    embed_modules = _embedding_modules(model, layers)
    embedding_ids = {id(p) for m in embed_modules for p in m.parameters()}
    embedding_ids |= {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    norm_ids = {id(p) for name, m in model.named_modules() if is_norm(name, m) for p in m.parameters(recurse=False)}
    output = model.get_output_embeddings()
    head_ids = {id(p) for p in output.parameters()} if output is not None else set()

    groups: dict[tuple[int, bool], dict] = {}  # (rank: 0 head, 1 + L-1-i layer i, L + 1 embeddings, decay)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in layer_of:
            i = layer_of[id(param)]
            rank, where, group_lr = 1 + n_layers - 1 - i, f"{layers_path}.{i}", lr * llrd_decay ** (n_layers - i)
        elif id(param) in embedding_ids and id(param) not in head_ids:
            rank, where, group_lr = n_layers + 1, "embeddings", embed_lr
        else:  # lm_head, final norm, a tied embedding, anything else above or outside the layers
            rank, where, group_lr = 0, "head", head_lr
        decay = param.ndim >= 2 and id(param) not in norm_ids and (decay_embeddings or id(param) not in embedding_ids)
        group = groups.setdefault((rank, not decay), {
            "params": [], "param_names": [], "lr": group_lr, "weight_decay": weight_decay if decay else 0.0,
            "name": f"{where} {'decay' if decay else 'no_decay'}",
        })
        group["params"].append(param)
        group["param_names"].append(name)
        if id(param) in head_ids and id(param) in embedding_ids:
            group["note"] = f"{name} is also the output head (tied): one tensor, at head_lr, no weight decay"
    return [groups[key] for key in sorted(groups)]


def freeze(model: nn.Module, settings: FullFTSettings) -> None:
    """Set `requires_grad=False` on what the settings freeze; other parameters are left as they are
    (a freshly loaded model trains every weight; a parameter frozen by the caller stays frozen).

    `freeze_layers=k` freezes decoder layers 0 .. k-1 (those next to the embeddings);
    `freeze_embeddings` freezes the input embeddings and any position embeddings. A tied output
    head is the same tensor, so it freezes too (logged as a warning).

    Raises:
        ValueError: `freeze_layers` exceeds the number of decoder layers.
    """
    layers_path, layers = decoder_layers(model)
    if settings.freeze_layers > len(layers):
        raise ValueError(f"freeze_layers={settings.freeze_layers}: {type(model).__name__} has only {len(layers)} decoder layers")
    for layer in layers[: settings.freeze_layers]:
        layer.requires_grad_(False)
    if settings.freeze_embeddings:
        for module in _embedding_modules(model, layers):
            module.requires_grad_(False)
        output = model.get_output_embeddings()
        if output is not None and output.weight is model.get_input_embeddings().weight:
            log.warning("freeze_embeddings: the output head is tied to the input embeddings, so it is frozen too")


def build_optimizer(model: nn.Module, settings: Settings) -> torch.optim.Optimizer:
    """Freeze what the settings ask (`freeze`), then AdamW over `llrd_param_groups`.

    Hand it to the trainer as `build_sft_trainer(..., optimizers=(optimizer, None))`; the trainer
    then builds its scheduler (`warmup_steps`, `lr_scheduler_type`) over these groups, so each
    group follows the schedule scaled to its own LR. Build it after the model is on its final
    device or before the trainer moves it (parameters keep their identity when moved). Works
    with one device and DDP (`accelerate launch`); transformers refuses a pre-built optimizer
    under FSDP (its parameters are flattened after the optimizer would be built).

    `settings.optim`:
        adamw_torch: `torch.optim.AdamW`, fused kernel on CUDA, foreach (multi-tensor) on CPU.
        adamw_8bit / paged_adamw_8bit: bitsandbytes' 8-bit states (~75% less optimizer memory;
            paged also spills to CPU RAM under memory pressure); embeddings keep 32-bit states,
            as transformers does. CUDA only.
    Raises:
        ValueError: an unknown `optim`, an 8-bit optimizer without a CUDA GPU, or bad freezing.
    """
    if settings.optim not in OPTIMIZERS:
        raise ValueError(f"optim={settings.optim!r}: use one of {', '.join(OPTIMIZERS)}")
    if settings.optim != "adamw_torch" and not torch.cuda.is_available():
        raise ValueError(f"optim={settings.optim} needs a CUDA GPU (bitsandbytes 8-bit optimizer states); "
                         "on this machine use optim=adamw_torch")
    freeze(model, settings)
    groups = llrd_param_groups(model, settings.learning_rate, settings.llrd_decay, settings.weight_decay,
                               settings.embed_lr, settings.head_lr)
    if settings.optim == "adamw_torch":
        on_cuda = torch.cuda.is_available()
        return torch.optim.AdamW(groups, lr=settings.learning_rate, fused=on_cuda or None, foreach=None if on_cuda else True)
    import bitsandbytes as bnb

    cls = bnb.optim.AdamW8bit if settings.optim == "adamw_8bit" else bnb.optim.PagedAdamW8bit
    optimizer = cls(groups, lr=settings.learning_rate)
    manager = bnb.optim.GlobalOptimManager.get_instance()
    for module in model.modules():
        if isinstance(module, nn.Embedding):  # 8-bit states on embedding rows are unstable (bnb's advice)
            manager.register_module_override(module, "weight", {"optim_bits": 32})
    return optimizer


def format_group_table(groups: list[dict]) -> str:
    """The groups as a table: name pattern, lr, weight decay, parameter count, one row per group,
    with runs of decoder layers that share lr and decay merged (`model.layers.{0..29}.* decay`)."""
    rows: list[list] = []  # [prefix, top layer or None, kind, lr, weight decay, count, bottom layer]
    for group in groups:
        where, kind = group["name"].rsplit(" ", 1)
        count = sum(p.numel() for p in group["params"])
        match = re.fullmatch(r"(.+)\.(\d+)", where)
        if not match:
            rows.append([", ".join(group["param_names"]), None, kind, group["lr"], group["weight_decay"], count, None])
            continue
        prefix, i = match[1], int(match[2])
        run = [r for r in rows if r[0] == prefix and r[2] == kind and r[3:5] == [group["lr"], group["weight_decay"]]
               and r[6] == i + 1]  # layers arrive top first: extend a run that ends just above
        if run:
            run[0][5] += count
            run[0][6] = i
        else:
            rows.append([prefix, i, kind, group["lr"], group["weight_decay"], count, i])
    patterns = []
    for prefix, top, kind, *_, bottom in rows:
        where = prefix if top is None else f"{prefix}.{top}.*" if top == bottom else f"{prefix}.{{{bottom}..{top}}}.*"
        patterns.append(f"{where} ({kind})")
    width = max(len(p) for p in patterns + ["total trainable"])
    lines = [f"{'parameters':<{width}} {'lr':>10} {'w.decay':>8} {'count':>12}"]
    for pattern, (*_, lr, wd, count, _) in zip(patterns, rows, strict=True):
        lines.append(f"{pattern:<{width}} {lr:>10.3g} {wd:>8g} {count:>12,}")
    total = sum(p.numel() for g in groups for p in g["params"])
    lines.append(f"{'total trainable':<{width}} {'':>10} {'':>8} {total:>12,}")
    lines += [f"note: {g['note']}" for g in groups if "note" in g]
    return "\n".join(lines)
