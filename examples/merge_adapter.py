"""Merge a trained adapter into its base model: a plain transformers folder, no PEFT needed to load it.

    python examples/merge_adapter.py --adapter_dir ft-outputs/final --output_dir merged-model
    python examples/merge_adapter.py --adapter_dir ft-outputs/final --output_dir merged-bf16 --dtype bfloat16
    python examples/merge_adapter.py --adapter_dir qlora-run/final --output_dir merged --qlora_merge original
    python examples/merge_adapter.py --adapter_dir ft-outputs/final --output_dir merged --base_model_name ./my-base
    python examples/chat.py --model_dir merged-model --prompt "Tell me your name and who built you."

The base model, prompt template and 4-bit settings come from the adapter folder's
run_settings.json (written by examples/finetune_llm_lora.py), else the base model named in its
adapter_config.json. The merged folder holds safetensors weights, config, tokenizer (with its chat
template), a generation config that stops on every stop id of the template, and the run settings.
The merge is checked: the reloaded folder's logits must match the adapter model's (max |diff| <=
1e-4 in fp32, 1e-2 in bf16/fp16, times the largest |logit|), else nothing is written. QLoRA adapters are merged onto the
dequantized 4-bit weights they were trained against (exact, the default) or, with
`--qlora_merge original`, onto the original full-precision weights (see
techniques/qlora.merge_and_save_qlora for how these differ).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: repo modules first
import runs  # noqa: E402, F401  (before any library: quietens bitsandbytes' import-time kernel warning)

import torch  # noqa: E402

from inference import load_adapter_model  # noqa: E402
from models import load_tokenizer, resolve_model_path  # noqa: E402
from runs import cli, processes  # noqa: E402
from techniques.lora import adapter_settings, merge_and_save_lora  # noqa: E402
from techniques.qlora import merge_and_save_qlora  # noqa: E402

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv: list[str] | None = None) -> float:
    args = parse_args(argv)
    processes.setup_logging()
    if args.output_dir.exists() and not args.output_dir.is_dir():  # fail before loading anything
        raise NotADirectoryError(f"--output_dir {args.output_dir} is a file; choose a new folder")
    if args.output_dir.exists() and any(args.output_dir.iterdir()):
        raise FileExistsError(f"--output_dir {args.output_dir} exists and is not empty; choose a new folder")

    # 1. What the adapter was trained with: base model, template, 4-bit or not.
    settings = adapter_settings(args.adapter_dir, base_model_name=args.base_model_name)
    print(f"adapter {args.adapter_dir} | base {settings.base_model_name} | template {settings.prompt_template}"
          f" | {'QLoRA (4-bit base), merge onto ' + args.qlora_merge if settings.load_in_4bit else 'LoRA'}")

    # 2. The adapter model as trained (added tokens and stop ids restored by load_lora), and the
    #    tokenizer saved with it (else the base model's).
    model = load_adapter_model(args.adapter_dir, settings)
    has_tokenizer = (args.adapter_dir / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(settings, args.adapter_dir if has_tokenizer else resolve_model_path(settings))

    # 3. Merge, save to a temporary folder, reload, compare logits, rename.
    if settings.load_in_4bit:
        dtype = DTYPES[args.dtype] or torch.float32
        diff = merge_and_save_qlora(model, args.output_dir, settings, tokenizer, dtype, onto=args.qlora_merge,
                                    adapter_dir=args.adapter_dir)
    else:
        diff = merge_and_save_lora(model, args.output_dir, tokenizer, DTYPES[args.dtype], adapter_dir=args.adapter_dir)
    print(f"merged model saved to {args.output_dir} (model card README.md carried over); "
          f"max |logit diff| vs the adapter model: {diff:.3g}")
    print(f"next:\n  chat:   python examples/chat.py --model_dir {args.output_dir}\n"
          f"  export: python examples/export_gguf.py --model_dir {args.output_dir}   (GGUF for llama.cpp)")
    return diff


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter_dir", type=Path, required=True, help="adapter folder (adapter_config.json, run_settings.json)")
    parser.add_argument("--output_dir", type=Path, required=True, help="new folder for the merged model (must not exist or be empty)")
    parser.add_argument("--base_model_name", help="base model override (hub id, folder, .gguf); default from run_settings.json")
    parser.add_argument("--dtype", choices=list(DTYPES), default="auto",
                        help="saved weight dtype; auto = the base model's (fp32 for QLoRA merges)")
    parser.add_argument("--qlora_merge", choices=["dequantized", "original"], default="dequantized",
                        help="QLoRA only: add the update to dequant(Q(W)) (exact, default) or to the original W")
    return parser.parse_args(argv)


if __name__ == "__main__":
    cli.run(main)
