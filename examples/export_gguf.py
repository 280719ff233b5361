"""Export a trained model to GGUF for llama.cpp, Ollama and LM Studio, checked against the model it came from.

    python examples/export_gguf.py --model_dir merged-model --outtype f16          # -> merged-model-f16.gguf
    python examples/export_gguf.py --model_dir merged-model --outtype q8_0 --output smol-q8_0.gguf
    python examples/export_gguf.py --model_dir ft-outputs/final --outtype f16      # an adapter: merged first
    python examples/export_gguf.py --model_dir ft-outputs/final --lora             # a GGUF LoRA adapter
    python examples/export_gguf.py --model_dir merged-model --outtype q4_k_m       # needs llama-quantize on PATH

The GGUF is written by llama.cpp's own converter (convert_hf_to_gguf.py, fetched once from the
llama-cpp-python sdist on PyPI into ~/.cache/ft-kit) and kept only when it passes its check: the
training chat template and every stop id are in its metadata, and its logits on a fixed chat probe
match the source folder's (f32/f16/bf16: max |diff| <= 1e-4/3e-2/1.5e-1 x the largest |logit|;
quantized: top-1 agreement >= 90% for q8_0). An Ollama Modelfile is written beside it:

    ollama create my-model -f merged-model-f16.Modelfile

`--lora` writes the adapter itself as a GGUF LoRA adapter over its base (from run_settings.json)
and the training chat template beside it, `<name>.jinja`: a GGUF adapter carries none.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: repo modules first
import runs  # noqa: E402, F401  (before any library: quietens bitsandbytes' import-time kernel warning)

from export import K_QUANTS, OUTTYPES, GGUFExport, export_gguf, export_lora_gguf  # noqa: E402
from runs import processes  # noqa: E402


def main(argv: list[str] | None = None) -> GGUFExport:
    args = parse_args(argv)
    processes.setup_logging()  # as the training scripts: INFO lines, no redrawn bars off a terminal
    if args.output is not None and args.output.exists():  # fail before fetching or merging anything
        raise SystemExit(f"{args.output} exists; choose a new --output")
    if args.lora:
        report = export_lora_gguf(args.model_dir, args.output, args.outtype, base_model_name=args.base_model_name)
    else:
        report = export_gguf(args.model_dir, args.output, args.outtype, base_model_name=args.base_model_name)
    print(f"written and checked: {report.summary()}")
    if report.modelfile is not None:
        print(f"Ollama: ollama create {report.path.stem} -f {report.modelfile}")
    if report.chat_template_file is not None:
        print(f"chat template for the server: {report.chat_template_file}")
    return report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", type=Path, required=True,
                        help="merged model folder, or an adapter folder (merged first, or exported with --lora)")
    parser.add_argument("--outtype", choices=OUTTYPES + K_QUANTS, default="f16",
                        help="GGUF weight type; k-quants need llama.cpp's llama-quantize on PATH")
    parser.add_argument("--output", type=Path, help="the .gguf to write (default <model_dir>-<outtype>.gguf)")
    parser.add_argument("--lora", action="store_true", help="export the adapter as a GGUF LoRA adapter instead of merging")
    parser.add_argument("--base_model_name", help="base model override for an adapter (default from run_settings.json)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main()
