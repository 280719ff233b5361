"""QLoRA: a frozen 4-bit base (bitsandbytes NF4/FP4) with LoRA adapters trained in higher precision.

Recipe: `load_4bit_model(settings)` -> `apply_qlora(model, settings)` -> train -> save the adapter
-> `merge_and_save_qlora(model, out_dir, settings)` for a 16/32-bit merged folder.

Source: Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs" (NF4, double
quantization); bitsandbytes >= 0.46 also runs 4-bit layers on CPU (slowly), so this path works on
a laptop too.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from peft import PeftModel, prepare_model_for_kbit_training
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from transformers import BitsAndBytesConfig, PreTrainedModel

from config import QLoraSettings, Settings, resolve_precision
from models import load_model
from techniques.lora import _base_layer, _check_output_dir, _merge_check_save, _probe_logits, apply_lora

log = logging.getLogger(__name__)


def compute_dtype(settings: Settings) -> torch.dtype:
    """The matmul dtype of the 4-bit layers, which is also the dtype the model loads in: `auto` is
    bf16 on a bf16 GPU, and on a CPU that trains in bf16 (`config.resolve_precision`: native bf16,
    AVX512-BF16 or AMX); else fp32."""
    if settings.bnb_4bit_compute_dtype == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.bfloat16 if resolve_precision(settings, warn=False) == "bf16" else torch.float32
    return getattr(torch, settings.bnb_4bit_compute_dtype)


def adapter_dtype(settings: Settings) -> torch.dtype:
    """The dtype the LoRA adapters of a 4-bit model train in: the compute dtype on a GPU (the QLoRA
    paper's recipe, which TRL applies), fp32 on a CPU, where bf16 adapter weights would round away
    most AdamW updates (see `adapter_dtype_kept`)."""
    return compute_dtype(settings) if torch.cuda.is_available() else torch.float32


def fsdp_launch() -> bool:
    """True when `accelerate launch` runs this process with an FSDP config (ACCELERATE_USE_FSDP)."""
    return parse_flag_from_env("ACCELERATE_USE_FSDP")


def quant_storage_dtype(settings: QLoraSettings) -> torch.dtype:
    """The dtype the packed 4-bit weights are stored in: `auto` is uint8, except under FSDP, which
    shards a layer's weights together only when they share one float dtype: there the compute
    dtype, which is also the dtype the model is loaded in (PEFT's and bitsandbytes' FSDP-QLoRA
    guides)."""
    if settings.bnb_4bit_quant_storage == "auto":
        return compute_dtype(settings) if fsdp_launch() else torch.uint8
    return getattr(torch, settings.bnb_4bit_quant_storage)


def bnb_config(settings: QLoraSettings) -> BitsAndBytesConfig:
    """The transformers `BitsAndBytesConfig` for 4-bit loading: quant type (nf4/fp4), double
    quantization, compute dtype and storage dtype from the `bnb_4bit_*` settings."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=settings.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=settings.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=compute_dtype(settings),
        bnb_4bit_quant_storage=quant_storage_dtype(settings),
    )


def device_map(local_rank: int, cuda: bool, fsdp: bool) -> dict | None:
    """Where a process loads its 4-bit model: its own GPU (`{"": local_rank}`; every rank on
    cuda:0 would put N models on one GPU), the CPU without CUDA, or None under FSDP, which places
    the shards itself."""
    if fsdp:
        return None
    return {"": local_rank} if cuda else {"": "cpu"}


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

    placement = device_map(PartialState(cpu=not torch.cuda.is_available()).local_process_index, torch.cuda.is_available(), fsdp_launch())
    model = load_model(settings, path=path, dtype=compute_dtype(settings),
                       quantization_config=bnb_config(settings), device_map=placement)
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

    `prepare_model_for_kbit_training` freezes the base, upcasts the unquantized weights (norms,
    embeddings, head) to fp32 and makes the input embeddings' output require grad, so gradients
    reach the adapters through checkpointed blocks.

    A run in bf16 (`config.resolve_precision`) then casts those frozen weights back to bf16, as the
    LoRA path loads them (`models.frozen_weight_dtype`): under bf16 autocast every matmul runs in
    bf16 whatever they are stored in, and fp32 norms and embeddings would make the whole residual
    stream fp32, which doubled QLoRA's activation memory and put its peak above LoRA's (bench/:
    9.07 against 6.70 GiB before). PEFT's upcast is for fp16 training, which keeps it.
    """
    low = {name for name, param in model.named_parameters() if param.dtype == torch.bfloat16
           and param.__class__.__name__ != "Params4bit"}
    model = prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=settings.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    if resolve_precision(settings, warn=False) == "bf16":
        for name, param in model.named_parameters():
            if name in low:
                param.data = param.data.to(torch.bfloat16)
    return apply_lora(model, settings)


@contextmanager
def adapter_dtype_kept(model: torch.nn.Module, settings: Settings):
    """Around building a TRL trainer for a 4-bit model: its trainable weights end up as they were
    before, in `adapter_dtype` (fp32 on a CPU, the compute dtype on a GPU).

    TRL's SFT and DPO trainers cast a quantized model's trainable adapter weights to bf16 (the
    QLoRA paper's GPU recipe). On a CPU bf16 adapter weights round away most AdamW updates (at
    |w| ~ 0.2 a bf16 step is ~1e-3, the size of a whole update at lr 1e-3), and the adapter would
    not be the one PEFT initialised. Nothing changes for a model that is not quantized.
    """
    if not getattr(model, "is_loaded_in_4bit", False):
        yield
        return
    saved = {name: param.data for name, param in model.named_parameters() if param.requires_grad}
    yield
    dtype = adapter_dtype(settings)
    for name, param in model.named_parameters():
        if name in saved:
            param.data = saved[name].to(dtype, copy=True)


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
    *,
    onto: str = "dequantized",
    template: str | None = None,
    stop_ids: list[int] | None = None,
    adapter_dir: str | Path | None = None,
) -> float:
    """Merge a QLoRA adapter into a 16/32-bit copy of the base and save a plain model folder.

    Never merges into 4-bit weights (rounding the delta to 4 bit would destroy it). The base is
    reloaded in `dtype` (from `settings`) and the adapter added to it in one of two ways:

    - `onto="dequantized"` (default, exact): each quantized linear weight is replaced by
      `dequant(Q(W))`, the weights the adapter was trained against, so the merged weight is
      `dequant(Q(W)) + scale * B @ A` and the merged model reproduces the live QLoRA model's
      logits (checked against it, tolerance as in `merge_and_save_lora`). The unquantized parts
      (embeddings, norms, head) are copied from the QLoRA model as trained (in its compute dtype).
    - `onto="original"`: `W + scale * B @ A` on the original full-precision weights, as if the
      adapter had been trained with LoRA. The adapter never saw W: the result differs from the
      trained model by the quantization error W - dequant(Q(W)) of every layer (for NF4 roughly
      1e-2 relative per weight), and its logits can drift from the trained model's by 0.1 or
      more. It keeps the base's full-precision detail; check its quality before shipping it. The
      save is checked against the full-precision base + adapter; the difference to the live
      QLoRA model is logged.

    Other keyword arguments as in `merge_and_save_lora`. Returns the max |logit difference|
    against the model the folder reproduces (the live QLoRA model for "dequantized").
    Raises like `merge_and_save_lora`; ValueError for an unknown `onto`.
    """
    if onto not in ("dequantized", "original"):
        raise ValueError(f"onto={onto!r}: expected 'dequantized' (exact) or 'original'")
    output_dir = _check_output_dir(output_dir)
    live = _probe_logits(peft_model)
    base = load_model(settings, dtype=dtype)
    base_rows = base.get_input_embeddings().num_embeddings
    live_rows = _base_layer(peft_model.get_input_embeddings()).weight.shape[0]
    if live_rows > base_rows:  # training added tokens
        base.resize_token_embeddings(live_rows, mean_resizing=False)
    exact = dequantized_state(peft_model)
    if onto == "dequantized":
        state = {_plain_name(k): v for k, v in exact.items()}
        state.update(_unquantized_weights(peft_model))  # embeddings, norms, head as trained
        missing = _copy_weights(base, state)
        if missing:
            raise RuntimeError(f"weights of the QLoRA model with no home in the base model: {missing[:5]}")
    elif live_rows > base_rows:
        _copy_added_rows(peft_model, base, base_rows)
    config = peft_model.peft_config[peft_model.active_adapter]
    full = PeftModel(base, config)
    set_peft_model_state_dict(full, get_peft_model_state_dict(peft_model))
    full.to(dtype)
    expected = live
    if onto == "original":
        expected = _probe_logits(full)
        log.info("QLoRA merge onto the original weights: max |logit diff| vs the trained QLoRA model %.3g",
                 (expected - live).abs().max().item())
    log.info("QLoRA merge: adding the adapter to %s of %d quantized layers (%s)",
             "dequant(Q(W))" if onto == "dequantized" else "the original W", len(exact), dtype)
    return _merge_check_save(full, output_dir, expected, tokenizer, dtype, template, stop_ids, adapter_dir)


def _plain_name(peft_name: str) -> str:
    """`base_model.model.x.q_proj.base_layer.weight` -> `x.q_proj.weight`, the plain base's name."""
    return peft_name.removeprefix("base_model.model.").replace(".base_layer.", ".").replace(".original_module.", ".")


def _unquantized_weights(qlora_model: PeftModel) -> dict[str, torch.Tensor]:
    """The 4-bit model's own unquantized weights (embeddings, norms, head) by plain name; adapter
    weights (LoRA, modules_to_save copies) are PEFT's to load."""
    return {_plain_name(name): param.detach() for name, param in qlora_model.named_parameters()
            if param.__class__.__name__ != "Params4bit" and "lora_" not in name and ".modules_to_save." not in name}


def _copy_weights(base: PreTrainedModel, state: dict[str, torch.Tensor]) -> list[str]:
    """Copy each tensor into the base parameter of that name; returns the names with no home."""
    params = dict(base.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, value in state.items():
            if name in params:
                params[name].copy_(value.to(params[name].dtype))
    return [name for name in state if name not in params]


def _copy_added_rows(qlora_model: PeftModel, base: PreTrainedModel, first_row: int) -> None:
    """Embedding (and head) rows from `first_row` on: the added tokens a fresh base lacks."""
    source = qlora_model.get_base_model()
    with torch.no_grad():
        for get in ("get_input_embeddings", "get_output_embeddings"):
            target = getattr(base, get)().weight
            target[first_row:].copy_(_base_layer(getattr(source, get)()).weight[first_row:].to(target.dtype))
