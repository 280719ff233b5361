"""QLoRA: a frozen 4-bit base (bitsandbytes NF4/FP4) with LoRA adapters trained in higher precision.

Recipe: `load_4bit_model(settings)` -> `apply_qlora(model, settings)` -> train -> save the adapter
-> `merge_and_save_qlora(model, out_dir, settings)` for a 16/32-bit merged folder.

Source: Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs" (NF4, double
quantization); bitsandbytes >= 0.46 also runs 4-bit layers on CPU (slowly), so this path works on
a laptop too.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from peft import PeftModel, prepare_model_for_kbit_training
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from transformers import BitsAndBytesConfig, PreTrainedModel

from config import QLoraSettings, Settings
from models import load_model
from techniques.lora import apply_lora, merge_and_save_lora

log = logging.getLogger(__name__)


def compute_dtype(settings: QLoraSettings) -> torch.dtype:
    """The matmul dtype of the 4-bit layers: `auto` is bf16 on a bf16 GPU, else fp32."""
    if settings.bnb_4bit_compute_dtype == "auto":
        cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return getattr(torch, settings.bnb_4bit_compute_dtype)


def bnb_config(settings: QLoraSettings) -> BitsAndBytesConfig:
    """The transformers `BitsAndBytesConfig` for 4-bit loading: quant type (nf4/fp4), double
    quantization and compute dtype from the `bnb_4bit_*` settings."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=settings.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=settings.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=compute_dtype(settings),
    )


def load_4bit_model(settings: Settings, path: str | None = None) -> PreTrainedModel:
    """Load the base model with every linear layer but the head quantized to 4 bit.

    Args:
        path: a resolved local model folder (`models.resolve_model_path`); default resolves it.
    Raises:
        RuntimeError: bitsandbytes is missing or cannot run on this machine.
    """
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:
        raise RuntimeError(f"QLoRA (load_in_4bit=true) needs a working bitsandbytes>=0.46: {exc}") from exc
    import bitsandbytes as bnb

    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    model = load_model(settings, path=path, dtype=compute_dtype(settings),
                       quantization_config=bnb_config(settings), device_map={"": device})
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            # bitsandbytes 0.50 repacks CPU weights for an AVX512-bf16 kernel at the first eval
            # forward and keeps them so; that kernel has no backward, so training after any eval
            # (trainer.evaluate(), sampling) would silently lose the gradient through every 4-bit
            # layer. It also computes in bf16, unlike training. Keep the standard layout.
            module.support_avx512bf16_for_cpu = False
    return model


def apply_qlora(model: PreTrainedModel, settings: Settings) -> PeftModel:
    """Prepare a 4-bit model for training and attach LoRA.

    `prepare_model_for_kbit_training` freezes the base, upcasts norms to fp32 and makes the input
    embeddings' output require grad, so gradients reach the adapters through checkpointed blocks.
    """
    model = prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=settings.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    return apply_lora(model, settings)


def dequantized_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`{module_name + ".weight": dequant(Q(W))}` in fp32 for every bitsandbytes 4-bit layer."""
    import bitsandbytes as bnb

    weights = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = module.weight
            if getattr(weight.quant_state, "packing_format_for_cpu", False):
                # bitsandbytes repacks CPU weights for its AVX512-bf16 kernel at the first eval
                # forward; undo it (as its own `.cuda()` does) before reading the standard layout.
                weight.data, weight.quant_state = bnb.functional._convert_weight_packed_for_cpu_inverse(
                    weight.data, weight.quant_state)
            w = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
            weights[name + ".weight"] = w.float().cpu()
    return weights


def merge_and_save_qlora(
    peft_model: PeftModel,
    output_dir: str | Path,
    settings: Settings,
    tokenizer=None,
    dtype: torch.dtype = torch.float32,
) -> float:
    """Merge a QLoRA adapter into a 16/32-bit copy of the base and save a plain model folder.

    Never merges into 4-bit weights (rounding the delta to 4 bit would destroy it). The base is
    reloaded in `dtype` and each quantized linear weight is replaced by `dequant(Q(W))`, the
    exact weights the adapter was trained against; the merged weight is then
    `dequant(Q(W)) + scale * B @ A`, so the merged model reproduces the live QLoRA model's logits
    (checked; see `merge_and_save_lora`). Merging onto the original full-precision W instead adds
    the delta to weights the adapter never saw: the result differs from the trained model by the
    quantization error W - dequant(Q(W)), which for NF4 is roughly 1e-2 relative per weight.

    Returns the max |logit difference| against the live QLoRA model; raises like
    `merge_and_save_lora`.
    """
    base = load_model(settings, dtype=dtype)
    exact = dequantized_state(peft_model)
    # PEFT names the quantized layer `...q_proj.base_layer`; the plain base calls it `...q_proj`.
    prefix = "base_model.model."
    remapped = {k.removeprefix(prefix).replace(".base_layer.", "."): v.to(dtype) for k, v in exact.items()}
    missing = base.load_state_dict(remapped, strict=False).unexpected_keys
    if missing:
        raise RuntimeError(f"dequantized weights with no home in the base model: {missing[:5]}")
    config = peft_model.peft_config[peft_model.active_adapter]
    full = PeftModel(base, config)
    set_peft_model_state_dict(full, get_peft_model_state_dict(peft_model))
    full.to(dtype)
    log.info("QLoRA merge: adding the adapter to dequant(Q(W)) of %d quantized layers (%s)", len(exact), dtype)
    return merge_and_save_lora(full, output_dir, tokenizer=tokenizer, dtype=dtype)
