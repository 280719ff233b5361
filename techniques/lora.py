"""LoRA: train low-rank updates W + (alpha / r) * B @ A on frozen base weights (PEFT).

Recipe: `apply_lora(model, settings)` -> train -> `save_lora(model, dir, tokenizer)` (or
`trainer.save_model(dir)`) -> later `load_lora(base, dir)` to use it, or
`merge_and_save_lora(model, out_dir)` for a plain transformers model folder with the update folded
into the weights (`examples/merge_adapter.py` from the shell). Both reproduce the trained model:
with tied embeddings, and with tokens added by `resize_token_embeddings` (their new rows are saved
beside the adapter, `save_added_token_rows`, and restored on a fresh base).

Formula: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (scale alpha / r);
rank-stabilised scale alpha / sqrt(r): Kalajdzievski 2023 (rsLoRA); DoRA: Liu et al. 2024.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from huggingface_hub import ModelCard
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from config import SECRET_FIELDS, SECURITY_FIELDS, LoraSettings, Settings
from data.templates import stop_token_ids

log = logging.getLogger(__name__)

# Merge check: max |logit diff| <= tolerance * max(1, largest |logit| of the probe). Relative, because
# rounding W + B@A once instead of computing the two paths apart grows with the logits' scale:
# SmolLM2-135M (|logits| ~30) merged in fp32 differs by ~2e-3, a 2-layer test model by ~1e-6.
MERGE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}
# Fixed probe ids for the merge check: any ids below the vocab size exercise every layer.
_PROBE_IDS = [[1, 5, 9, 13, 17, 21, 25, 29], [2, 4, 6, 8, 10, 12, 14, 16]]
# Embedding rows that resizing added (new tokens), saved beside the adapter; see save_added_token_rows.
ADDED_ROWS_FILE = "added_token_rows.safetensors"


def lora_config(settings: LoraSettings) -> LoraConfig:
    """The PEFT `LoraConfig` for a causal LM from the `lora_*` settings.

    `lora_target_modules == ["all-linear"]` becomes PEFT's "all-linear" (every nn.Linear but the
    output head).
    """
    targets = settings.lora_target_modules
    return LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
        bias=settings.lora_bias,
        use_dora=settings.use_dora,
        use_rslora=settings.use_rslora,
        task_type="CAUSAL_LM",
    )


def linear_layer_names(model: torch.nn.Module) -> list[str]:
    """Sorted distinct last name parts of the model's linear layers (`q_proj`, `down_proj`, ...).

    Counts `torch.nn.Linear` and bitsandbytes' 4/8-bit linear layers (subclasses of it), and
    GPT-2 style `Conv1D` projections.
    """
    from transformers.pytorch_utils import Conv1D

    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if isinstance(module, (torch.nn.Linear, Conv1D)) and name}
    return sorted(names)


def check_target_modules(model: torch.nn.Module, targets: list[str]) -> None:
    """Raise ValueError unless every target name matches at least one module of `model`.

    A name matches a module whose full name equals it or ends with `.name` (PEFT's rule).
    PEFT itself only fails when *no* name matches, so a typo next to a good name would silently
    train fewer layers than asked for.
    """
    if targets == ["all-linear"]:
        return
    module_names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in module_names)]
    if missing:
        raise ValueError(
            f"lora_target_modules: {', '.join(missing)} match no module of {type(model).__name__}. "
            f"Its linear layers are: {', '.join(linear_layer_names(model))} (or use all-linear)."
        )


def skip_input_casts_under_autocast(model: torch.nn.Module) -> int:
    """Let autocast alone set the dtype of each LoRA matmul; returns the number of layers hooked.

    PEFT casts the input of every adapted layer to its adapter's dtype (fp32) before `lora_A`.
    Under bf16/fp16 autocast that copy is undone at once: autocast casts it back for the matmul,
    and the backward pays both copies again. A forward pre-hook turns PEFT's cast off
    (`cast_input_dtype_enabled`, the switch behind `peft.helpers.disable_input_dtype_casting`)
    while autocast is on for the input's device and leaves it on otherwise (fp32 runs, generation
    outside autocast), so the values are unchanged: bf16 -> fp32 -> bf16 is exact. 1.26x on our
    bf16 LoRA step (2-core EPYC, README "Performance"). DoRA and other LoRA variants keep the cast.
    """
    hooked = 0
    for module in model.modules():
        if isinstance(module, BaseTunerLayer) and hasattr(module, "cast_input_dtype_enabled") \
                and not getattr(module, "lora_variant", None):
            module.register_forward_pre_hook(_cast_unless_autocast)
            hooked += 1
    return hooked


def _cast_unless_autocast(module: torch.nn.Module, args: tuple) -> None:
    if args and isinstance(args[0], torch.Tensor):
        module.cast_input_dtype_enabled = not torch.is_autocast_enabled(args[0].device.type)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a 4-bit weight counts its unpacked elements."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if param.__class__.__name__ == "Params4bit":  # packed: two 4-bit values per uint8 element
            n *= 2
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total


def apply_lora(model: PreTrainedModel, lora_settings: LoraSettings) -> PeftModel:
    """Freeze `model` and attach LoRA adapters named by `lora_settings`; returns the PeftModel.

    Args:
        model: a transformers causal LM (full precision, or 4-bit prepared by `techniques.qlora`).
        lora_settings: `LoraSettings` or the whole `Settings`: lora_r, lora_alpha, lora_dropout,
            lora_target_modules, lora_bias, use_dora, use_rslora.
    Raises:
        ValueError: a target module name matches no module (the message lists the linear layers).
    """
    check_target_modules(model, list(lora_settings.lora_target_modules))
    peft_model = get_peft_model(model, lora_config(lora_settings))
    skip_input_casts_under_autocast(peft_model)
    trainable, total = count_parameters(peft_model)
    log.info("LoRA r=%d alpha=%g targets=%s: trainable %s / total %s parameters (%.2f%%)",
             lora_settings.lora_r, lora_settings.lora_alpha, ",".join(lora_settings.lora_target_modules),
             f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return peft_model


# ---------------------------------------------------------------- added tokens


def resize_token_embeddings(model: PreTrainedModel, tokenizer) -> int:
    """Grow the input embedding (and an untied output head) to hold every token of `tokenizer`.

    Never shrinks: a checkpoint padded beyond its tokenizer (e.g. 32064 rows for 32011 tokens)
    keeps its rows, and new tokens take padding rows first. Rows added here get transformers'
    mean-based random values, which the adapter is then trained with, so save them with
    `save_added_token_rows` (a fresh base would grow different ones). Returns the rows before.
    """
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer))
    return rows


def save_lora(peft_model: PeftModel, adapter_dir: str | Path, tokenizer=None, base_vocab_rows: int | None = None) -> Path:
    """Save the adapter, the tokenizer (when given) and the embedding rows added by resizing.

    The base embedding matrices are not copied whole (PEFT's `save_embedding_layers="auto"`
    would, once resized): `save_added_token_rows` keeps only the rows a fresh base lacks.
    """
    adapter_dir = Path(adapter_dir)
    peft_model.save_pretrained(adapter_dir, save_embedding_layers=False)
    if tokenizer is not None:
        tokenizer.save_pretrained(adapter_dir)
    save_added_token_rows(peft_model, adapter_dir, base_vocab_rows)
    return adapter_dir


def save_added_token_rows(model: torch.nn.Module, adapter_dir: str | Path, base_vocab_rows: int | None = None) -> Path | None:
    """Write the embedding rows a fresh base model lacks to `adapter_dir / ADDED_ROWS_FILE`.

    Rows `base_vocab_rows ..` of the input embedding (and of the output head when it is untied),
    the values the adapter was trained with; `load_lora` grows a fresh base and restores them
    exactly. Call it after `trainer.save_model(dir)` when training resized the embeddings.

    Args:
        base_vocab_rows: embedding rows of the base checkpoint; default its config's vocab_size
            (read from the folder or hub id the base model was loaded from).
    Returns:
        The file, or None when the model has no rows beyond the base's (nothing written).
    """
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    if base_vocab_rows is None:
        base_vocab_rows = AutoConfig.from_pretrained(base.config.name_or_path).get_text_config().vocab_size
    embed = _base_layer(base.get_input_embeddings()).weight
    head = _base_layer(base.get_output_embeddings()).weight
    if embed.shape[0] <= base_vocab_rows:
        return None
    tensors = {"embed_tokens": embed[base_vocab_rows:]}
    if head is not embed:
        tensors["lm_head"] = head[base_vocab_rows:]
    path = Path(adapter_dir) / ADDED_ROWS_FILE
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path),
              metadata={"first_row": str(base_vocab_rows), "vocab_rows": str(embed.shape[0])})
    log.info("saved %d added embedding rows (%d..%d) to %s", embed.shape[0] - base_vocab_rows,
             base_vocab_rows, embed.shape[0] - 1, path)
    return path


def _base_layer(module: torch.nn.Module) -> torch.nn.Module:
    """The base model's own module under PEFT wrappers (LoRA layer, modules_to_save, trainable tokens)."""
    while True:
        if isinstance(module, AuxiliaryTrainingWrapper):
            module = module.original_module
        elif isinstance(module, BaseTunerLayer):
            module = module.get_base_layer()
        else:
            return module


def _prepare_base_for_adapter(base: PreTrainedModel, adapter_dir: Path) -> None:
    """Grow `base` to the adapter's vocabulary (never below its own rows) and restore added rows.

    The vocabulary is the larger of the adapter tokenizer's length and the rows recorded in
    `ADDED_ROWS_FILE`; an adapter saved by `trainer.save_model` after resizing carries whole
    embedding matrices instead, which PEFT loads once the shapes agree.
    """
    needed = 0
    if (adapter_dir / "tokenizer_config.json").is_file():
        needed = len(AutoTokenizer.from_pretrained(adapter_dir))
    rows_file = adapter_dir / ADDED_ROWS_FILE
    saved, first = {}, 0
    if rows_file.is_file():
        with safe_open(str(rows_file), framework="pt") as f:
            meta = f.metadata()
            saved = {key: f.get_tensor(key) for key in f.keys()}
        first, needed = int(meta["first_row"]), max(needed, int(meta["vocab_rows"]))
    if needed > base.get_input_embeddings().num_embeddings:
        base.resize_token_embeddings(needed, mean_resizing=False)  # rows filled below or by PEFT
    with torch.no_grad():
        for key, module in (("embed_tokens", base.get_input_embeddings()), ("lm_head", base.get_output_embeddings())):
            if key in saved:
                rows = saved[key]
                module.weight[first:first + rows.shape[0]].copy_(rows.to(module.weight.dtype))


# ---------------------------------------------------------------- loading a trained adapter


def adapter_settings(adapter_dir: str | Path, **overrides) -> Settings:
    """The settings an adapter was trained with (its `run_settings.json`), to rebuild its base model.

    An adapter without `run_settings.json` (trained elsewhere) gets the defaults with
    `base_model_name` from its `adapter_config.json`. `overrides` win (e.g. base_model_name=...).

    A folder is data, not a decision of the user's: its saved security switches
    (`config.SECURITY_FIELDS`: trust_remote_code, allow_pickle_weights) and secrets are never read
    back; they come from the environment of this run (TRUST_REMOTE_CODE=true), as do settings a
    newer or older version saved that this one does not know (logged, not an error).

    Raises FileNotFoundError when the folder holds neither run_settings.json nor adapter_config.json.
    """
    adapter_dir = Path(adapter_dir)
    saved_file = adapter_dir / "run_settings.json"
    if saved_file.is_file():
        saved = json.loads(saved_file.read_text())
    elif (adapter_dir / "adapter_config.json").is_file():
        saved = {"base_model_name": _read_json(adapter_dir / "adapter_config.json")["base_model_name_or_path"]}
    else:
        raise FileNotFoundError(f"{adapter_dir} holds neither run_settings.json nor adapter_config.json: "
                                "not an adapter folder from training")
    ignored = sorted(set(saved) - set(Settings.model_fields))
    if ignored:
        log.info("%s: ignoring saved settings this version does not know: %s", saved_file, ", ".join(ignored))
    kept = {k: v for k, v in saved.items() if k in Settings.model_fields and k not in SECURITY_FIELDS + SECRET_FIELDS}
    return Settings(_env_file=None, **{**kept, **{k: v for k, v in overrides.items() if v is not None}})


def load_lora(base: PreTrainedModel, adapter_dir: str | Path, is_trainable: bool = False) -> PeftModel:
    """Attach a saved adapter folder (from `save_pretrained` / `save_lora`) to `base`; eval mode
    unless trainable.

    When training added tokens, `base` is first grown to the adapter's vocabulary (never below its
    own, possibly padded, size) and the added rows are restored exactly (`save_added_token_rows`).
    The stop ids of the folder's `generation_config.json` join the base's generation config, so
    `generate` and a later merge stop on every one of them.

    Raises FileNotFoundError when `adapter_dir` has no `adapter_config.json`, and AdapterMismatchError
    when its weights do not fit `base` (`check_adapter_fits`).
    """
    adapter_dir = Path(adapter_dir)
    check_adapter_fits(base, adapter_dir)
    _prepare_base_for_adapter(base, adapter_dir)
    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=is_trainable)
    gen = base.generation_config
    gen.eos_token_id = _unique(_adapter_stop_ids(adapter_dir) + _as_list(gen.eos_token_id))
    return model


class AdapterMismatchError(ValueError):
    """An adapter folder trained for another base model than the one it is attached to."""


def check_adapter_fits(base: torch.nn.Module, adapter_dir: str | Path) -> None:
    """Raise AdapterMismatchError unless every LoRA matrix of the folder fits a module of `base`.

    Reads only the shapes in `adapter_model.safetensors` (no weights): `lora_A` of module m must be
    [r, m.in_features] and `lora_B` [m.out_features, r], and m must exist. PEFT itself would stop
    with a bare size-mismatch RuntimeError; this message names the module, both shapes and the
    base the adapter records. Same-shaped bases (another fine-tune of one architecture) cannot be
    told apart by shapes and pass. Raises FileNotFoundError without `adapter_config.json`.
    """
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir} holds no adapter_config.json: not a PEFT adapter folder")
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        return  # an older pickle adapter: PEFT checks what it can
    trained_on = _read_json(adapter_dir / "adapter_config.json").get("base_model_name_or_path")
    names = dict(base.named_modules())
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            for part, dim in ((".lora_A.weight", 1), (".lora_B.weight", 0)):
                if not key.endswith(part):
                    continue
                module_name = key.removeprefix("base_model.model.").removesuffix(part)
                module = names.get(module_name)
                shape = f.get_slice(key).get_shape()
                wanted = None if module is None else getattr(module, "in_features" if dim else "out_features", None)
                if module is None or (wanted is not None and shape[dim] != wanted):
                    has = "has no such module" if module is None else f"has {wanted} {'in' if dim else 'out'} features there"
                    raise AdapterMismatchError(
                        f"the adapter in {adapter_dir} was trained for another base model ({trained_on}): its "
                        f"{module_name} takes {shape[dim]} {'in' if dim else 'out'} features, but the base "
                        f"{getattr(base.config, 'name_or_path', '') or type(base).__name__} {has}. Pass the base "
                        "it was trained on (base_model_name / --base_model_name)")


def _adapter_stop_ids(adapter_dir: Path) -> list[int]:
    """eos ids of the adapter folder's generation_config.json (the training template's stop ids)."""
    gen_file = adapter_dir / "generation_config.json"
    return _as_list(_read_json(gen_file).get("eos_token_id")) if gen_file.is_file() else []


def _as_list(ids) -> list[int]:
    return [] if ids is None else list(ids) if isinstance(ids, (list, tuple)) else [ids]


def _unique(ids) -> list[int]:
    return list(dict.fromkeys(i for i in ids if i is not None))


def _read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


# ---------------------------------------------------------------- merging


@torch.no_grad()
def _probe_logits(model: torch.nn.Module) -> torch.Tensor:
    """Logits (3, 8, vocab) in fp32 for fixed probe ids, on the model's device, eval mode.

    The third row holds the last 8 ids of the vocabulary, where added tokens live.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    vocab = _base_layer(model.get_input_embeddings()).weight.shape[0]
    ids = torch.tensor(_PROBE_IDS + [[vocab - 1 - i for i in range(8)]], device=device) % vocab
    logits = model(input_ids=ids).logits.float().cpu()
    model.train(was_training)
    return logits


def merge_and_save_lora(
    peft_model: PeftModel,
    output_dir: str | Path,
    tokenizer=None,
    dtype: torch.dtype | None = None,
    *,
    template: str | None = None,
    stop_ids: list[int] | None = None,
    adapter_dir: str | Path | None = None,
) -> float:
    """Fold the adapter into the base weights and write a plain transformers model folder.

    The folder (safetensors, config, generation config, and the tokenizer with its chat template)
    loads with `AutoModelForCausalLM.from_pretrained` without PEFT. After writing, it is reloaded
    and its logits on fixed probe ids are compared with the live adapter model's; the merge is
    written to a temporary folder beside `output_dir` and renamed only when the check passes, so a
    failed merge never leaves a half-written `output_dir`.

    The generation config stops on every stop id: those of `template` (eos + turn end, e.g.
    <|im_end|>), `stop_ids`, the adapter folder's generation config, and the base's eos.

    Tied embeddings (`tie_word_embeddings=True`): PEFT merges in place, so an adapter on `lm_head`
    would also change the shared input embedding (and one on `embed_tokens` the head). The head
    gets its own copy first; the saved config stays tied only when the two matrices are still
    equal after merging, and is untied otherwise (both matrices saved).

    `peft_model` is consumed: PEFT merges in place (`merge_and_unload`), so keep using the
    returned folder, not the object. For a QLoRA model use `techniques.qlora.merge_and_save_qlora`.

    Args:
        tokenizer: saved into the folder; default the adapter folder's tokenizer, if any.
        dtype: dtype of the saved weights; default the base model's dtype.
        template: the prompt template trained with (its stop ids go into the generation config);
            default the adapter folder's run_settings.json `prompt_template`, if any.
        stop_ids: more ids to stop generation on.
        adapter_dir: the adapter folder the model was loaded from; its run_settings.json is
            copied too, so `examples/chat.py` renders the training template, and its model card
            (README.md) too, restated for a merged model (`merged_card`).
    Returns:
        max |logit difference| between the reloaded merged model and the live adapter model.
    Raises:
        ValueError: the difference exceeds 1e-4 (fp32) or 1e-2 (bf16/fp16) times the largest
            |logit| of the probe (at least 1; see MERGE_TOLERANCE); or `template` without a tokenizer.
        FileExistsError: `output_dir` exists and is not empty.
    """
    output_dir = _check_output_dir(output_dir)
    expected = _probe_logits(peft_model)
    return _merge_check_save(peft_model, output_dir, expected, tokenizer, dtype, template, stop_ids, adapter_dir)


def _check_output_dir(output_dir: str | Path) -> Path:
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(f"{output_dir} exists and is not empty; choose a new output_dir")
    return output_dir


def _merge_check_save(peft_model, output_dir: Path, expected, tokenizer, dtype, template, stop_ids, adapter_dir) -> float:
    """Merge, save into a temporary folder, reload, compare with `expected` logits, rename."""
    adapter_dir = Path(adapter_dir) if adapter_dir is not None else None
    run_settings = adapter_dir / "run_settings.json" if adapter_dir is not None else None
    if tokenizer is None and adapter_dir is not None and (adapter_dir / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    if template is None and run_settings is not None and run_settings.is_file():
        template = _read_json(run_settings).get("prompt_template")
    if template is not None and tokenizer is None:
        raise ValueError(f"template={template!r} needs the tokenizer to find its stop ids; pass tokenizer=")
    stops = (stop_token_ids(template, tokenizer) if template else []) + list(stop_ids or [])
    stops += _adapter_stop_ids(adapter_dir) if adapter_dir is not None else []

    was_tied = _untie_embeddings(peft_model)
    merged = peft_model.merge_and_unload(progressbar=sys.stderr.isatty())  # a bar per layer on a terminal only
    if was_tied:
        _tie_if_equal(merged)
    if dtype is not None:
        merged = merged.to(dtype)
    save_dtype = next(merged.parameters()).dtype
    gen = merged.generation_config
    gen.eos_token_id = _unique(stops + _as_list(gen.eos_token_id))
    if tokenizer is not None and tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        merged.save_pretrained(tmp_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp_dir)
        if run_settings is not None and run_settings.is_file():
            shutil.copy(run_settings, tmp_dir / "run_settings.json")
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_dir, dtype=save_dtype)
        diff = (_probe_logits(reloaded) - expected).abs().max().item()
        tolerance = MERGE_TOLERANCE.get(save_dtype, 1e-2) * max(1.0, expected.abs().max().item())
        if not diff <= tolerance:
            hint = ("; a 16-bit weight cannot hold W + B@A as exactly as the adapter model computes it:"
                    " merge with dtype=torch.float32" if save_dtype != torch.float32 else "")
            raise ValueError(f"merged model differs from the adapter model: max |logit diff| {diff:.3g} > {tolerance:.3g}"
                             f" ({MERGE_TOLERANCE.get(save_dtype, 1e-2):g} x the largest |logit|){hint}")
        if adapter_dir is not None and (adapter_dir / "README.md").is_file():
            merged_card(adapter_dir / "README.md", save_dtype, diff).save(tmp_dir / "README.md")
        if output_dir.exists():
            output_dir.rmdir()
        os.replace(tmp_dir, output_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    log.info("merged model saved to %s (%s, tied embeddings %s, stop ids %s); max |logit diff| vs adapter model: "
             "%.3g (allowed %.3g)", output_dir, save_dtype, merged.config.tie_word_embeddings, gen.eos_token_id,
             diff, tolerance)
    return diff


def merged_card(card_file: str | Path, dtype: torch.dtype, diff: float) -> ModelCard:
    """The adapter folder's model card (runs/card.py) restated for its merge: `library_name:
    transformers`, `base_model_relation: finetune` (a merged adapter is a fine-tune of the base),
    tag "merged", and a note under the title saying how the merge loads and how exact it is."""
    card = ModelCard.load(card_file)
    card.data.library_name = "transformers"
    card.data.base_model_relation = "finetune"
    card.data.tags = list(dict.fromkeys([*(t for t in card.data.tags or [] if t != "peft"), "merged"]))
    note = (f"**Merged model**: the adapter below folded into the base weights ({str(dtype).removeprefix('torch.')}; "
            f"the merged model's logits differ from the adapter model's by at most {diff:.3g}). It loads with "
            "`AutoModelForCausalLM.from_pretrained(folder)`, no PEFT needed, or `python examples/chat.py --model_dir folder`.")
    title, _, rest = card.text.lstrip("\n").partition("\n")
    card.text = f"\n{title}\n\n{note}\n{rest}" if title.startswith("# ") else f"\n{note}\n\n{card.text.lstrip()}"
    return card


def _untie_embeddings(peft_model: PeftModel) -> bool:
    """Give the output head its own copy of a tied input embedding; True if they were tied.

    PEFT merges into the shared matrix in place: a LoRA on `lm_head` would also move every input
    embedding, one on `embed_tokens` every output logit, unlike the adapter model it merges.
    """
    base = peft_model.get_base_model()
    embed, head = _base_layer(base.get_input_embeddings()), _base_layer(base.get_output_embeddings())
    if head.weight is not embed.weight:
        return False
    head.weight = torch.nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
    base.config.tie_word_embeddings = False
    return True


def _tie_if_equal(merged: PreTrainedModel) -> None:
    """Tie head and embedding again when the merge left them equal (the adapter touched neither);
    otherwise keep them apart and say so in the config, so every loader reads both matrices."""
    embed, head = merged.get_input_embeddings(), merged.get_output_embeddings()
    equal = torch.equal(embed.weight, head.weight)
    if equal:
        head.weight = embed.weight
    merged.config.tie_word_embeddings = equal
