"""LoRA: train low-rank updates W + (alpha / r) * B @ A on frozen base weights (PEFT).

Recipe: `apply_lora(model, settings)` -> train -> `model.save_pretrained(dir)` (adapter only)
-> later `load_lora(base, dir)` to use it, or `merge_and_save_lora(model, out_dir)` for a plain
transformers model folder with the update folded into the weights.

Formula: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (scale alpha / r);
rank-stabilised scale alpha / sqrt(r): Kalajdzievski 2023 (rsLoRA); DoRA: Liu et al. 2024.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, PreTrainedModel

from config import LoraSettings

log = logging.getLogger(__name__)

MERGE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}
# Fixed probe ids for the merge check: any ids below the vocab size exercise every layer.
_PROBE_IDS = [[1, 5, 9, 13, 17, 21, 25, 29], [2, 4, 6, 8, 10, 12, 14, 16]]


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
    trainable, total = count_parameters(peft_model)
    log.info("LoRA r=%d alpha=%g targets=%s: trainable %s / total %s parameters (%.2f%%)",
             lora_settings.lora_r, lora_settings.lora_alpha, ",".join(lora_settings.lora_target_modules),
             f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return peft_model


def load_lora(base: PreTrainedModel, adapter_dir: str | Path, is_trainable: bool = False) -> PeftModel:
    """Attach a saved adapter folder (from `save_pretrained`) to `base`; eval mode unless trainable.

    Raises FileNotFoundError when `adapter_dir` has no `adapter_config.json`.
    """
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir} holds no adapter_config.json: not a PEFT adapter folder")
    return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=is_trainable)


@torch.no_grad()
def _probe_logits(model: torch.nn.Module) -> torch.Tensor:
    """Logits (2, 8, vocab) in fp32 for fixed probe ids, on the model's device, eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.tensor(_PROBE_IDS, device=device) % vocab
    logits = model(input_ids=ids).logits.float().cpu()
    model.train(was_training)
    return logits


def merge_and_save_lora(
    peft_model: PeftModel,
    output_dir: str | Path,
    tokenizer=None,
    dtype: torch.dtype | None = None,
) -> float:
    """Fold the adapter into the base weights and write a plain transformers model folder.

    The folder (safetensors, config, generation config, and the tokenizer when given) loads with
    `AutoModelForCausalLM.from_pretrained` without PEFT. After writing, it is reloaded and its
    logits on fixed probe ids are compared with the live adapter model's; the merge is written to
    a temporary folder beside `output_dir` and renamed only when the check passes, so a failed
    merge never leaves a half-written `output_dir`.

    `peft_model` is consumed: PEFT merges in place (`merge_and_unload`), so keep using the
    returned folder, not the object. For a QLoRA model use `techniques.qlora.merge_and_save_qlora`.

    Args:
        dtype: dtype of the saved weights; default the base model's dtype.
    Returns:
        max |logit difference| between the reloaded merged model and the live adapter model.
    Raises:
        ValueError: the difference exceeds 1e-4 (fp32) or 1e-2 (bf16/fp16).
        FileExistsError: `output_dir` exists and is not empty.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(f"{output_dir} exists and is not empty; choose a new output_dir")
    expected = _probe_logits(peft_model)
    merged = peft_model.merge_and_unload()
    if dtype is not None:
        merged = merged.to(dtype)
    save_dtype = next(merged.parameters()).dtype

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        merged.save_pretrained(tmp_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp_dir)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_dir, dtype=save_dtype)
        diff = (_probe_logits(reloaded) - expected).abs().max().item()
        tolerance = MERGE_TOLERANCE.get(save_dtype, 1e-2)
        if not diff <= tolerance:
            raise ValueError(f"merged model differs from the adapter model: max |logit diff| {diff:.3g} > {tolerance:g}")
        if output_dir.exists():
            output_dir.rmdir()
        os.replace(tmp_dir, output_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    log.info("merged model saved to %s (%s); max |logit diff| vs adapter model: %.3g", output_dir, save_dtype, diff)
    return diff
