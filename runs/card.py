"""The model card of a run: `final/README.md` in the Hugging Face Hub's format, through huggingface_hub.

`model_card(...)` returns a `huggingface_hub.ModelCard`: the YAML front matter is a
`ModelCardData` (base_model, base_model_relation, library_name peft / transformers, pipeline_tag,
tags, datasets and license when known), the body is Markdown written here from the run's facts:
technique, data and the dataset report, before/after metrics, the prompt template the model
expects, how to load it, every setting the run read, limitations. `runs.outputs.save_final`
writes it into the final folder; a merge (techniques.lora) carries it into the merged folder.

"When known": `base_model` and `datasets` only when they name Hub repos (a local folder or file
means nothing on the Hub, and the Hub rejects such metadata); `license` from the base model
folder's own card, or for the default model the license its Hub card states.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from config import DEFAULT_MODEL_ID, SECRET_FIELDS, SECTIONS, Settings
from data.templates import render, stop_token_ids
from models import MARKER_FILE

# The offline copy of the default model (a dequantized GGUF) carries no card; its Hub card says Apache-2.0.
KNOWN_LICENSES = {DEFAULT_MODEL_ID: "apache-2.0"}
KINDS = ("sft", "full", "dpo")
# result key (summary.json) -> how the card and the summary block name it
RESULT_LABELS = {
    "eval_loss": "eval loss", "perplexity": "eval perplexity", "eval_reward_accuracy": "eval reward accuracy",
    "eval_reward_margin": "eval reward margin", "held_out_accuracy": "held-out preference accuracy (per token)",
    "held_out_accuracy_sum_logp": "held-out preference accuracy (summed)",
}


def result_label(key: str) -> str:
    """The display name of a result key (`eval_loss` -> "eval loss"); unknown keys as they are."""
    return RESULT_LABELS.get(key, key)


def technique(settings: Settings, kind: str) -> str:
    """What trained the model, in a few words: "LoRA", "QLoRA (4-bit nf4 base)", "full fine-tuning
    (LLRD 0.9)", "DPO (beta 0.1, sigmoid) on a LoRA policy", ... `kind`: sft, full or dpo."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {KINDS}")
    lora = f"QLoRA (4-bit {settings.bnb_4bit_quant_type} base)" if settings.load_in_4bit else "LoRA"
    if kind == "sft":
        return lora
    full = "full fine-tuning" + (f" (LLRD {settings.llrd_decay:g})" if settings.llrd_decay != 1 else "")
    if kind == "full":
        return full
    policy = "full" if settings.dpo_policy == "full" else lora
    start = f", continuing the SFT adapter {settings.sft_adapter_dir}" if settings.sft_adapter_dir else ""
    return f"DPO (beta {settings.beta:g}, {settings.loss_type}) on a {policy} policy{start}"


def is_adapter(settings: Settings, kind: str) -> bool:
    """True when the run saves a PEFT adapter (LoRA, QLoRA, DPO on a LoRA policy), False for full weights."""
    return kind == "sft" or (kind == "dpo" and settings.dpo_policy == "lora")


def model_card(
    settings: Settings,
    kind: str,
    results: dict[str, tuple[float | None, float | None]],
    *,
    tokenizer=None,
    model_path: str | Path | None = None,
    data_report: str | None = None,
    sections: tuple[str, ...] = tuple(SECTIONS),
    numbers: dict[str, str] | None = None,
) -> ModelCard:
    """The run's model card (see the module docstring).

    Args:
        kind: sft (LoRA / QLoRA), full or dpo.
        results: metric name -> (before training, after training), e.g. {"eval_loss": (4.44, 0.196)}.
        tokenizer: renders an example prompt in the training template and finds its stop ids.
        model_path: the resolved base model folder: its card's license, and whether it is the
            dequantized offline copy (a limitation worth stating).
        data_report: the dataset report printed before training (kept, truncated, dropped, tokens).
        sections: the settings sections the run read; their settings fill the settings table.
        numbers: more facts for the technique section (e.g. {"effective batch": "8"}).
    """
    adapter = is_adapter(settings, kind)
    base = settings.base_model_name
    data = ModelCardData(
        base_model=base if _is_hub_id(base) else None,
        base_model_relation="adapter" if adapter else "finetune",
        library_name="peft" if adapter else "transformers",
        pipeline_tag="text-generation",
        tags=_tags(settings, kind),
        datasets=[path for path in _dataset_paths(settings, kind) if _is_hub_id(path)] or None,
        license=_license(base, model_path),
    )
    body = "\n\n".join([
        f"# {technique(settings, kind)} of {base}",
        f"Trained with ft-kit: {technique(settings, kind)} of `{base}`, prompt template **{settings.prompt_template}**.",
        _technique_section(settings, kind, numbers or {}),
        _data_section(settings, kind, data_report),
        _results_section(results, kind),
        _template_section(settings, tokenizer),
        _loading_section(settings, adapter),
        _settings_section(settings, sections),
        _limitations_section(settings, kind, model_path),
    ])
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n")


def _is_hub_id(name: str) -> bool:
    """A name the Hub could hold ("org/name"), not an existing local path."""
    if Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or "/" not in name:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return Path(name).suffix.lower() not in (".json", ".jsonl", ".csv", ".parquet", ".gguf", ".txt")


def _tags(settings: Settings, kind: str) -> list[str]:
    method = {"sft": "qlora" if settings.load_in_4bit else "lora", "full": "full-fine-tuning", "dpo": "dpo"}[kind]
    tags = ["ft-kit", method, "trl", "dpo" if kind == "dpo" else "sft"]
    if is_adapter(settings, kind):
        tags += ["peft", "lora"] + (["qlora", "4-bit"] if settings.load_in_4bit else [])
    return list(dict.fromkeys(tags))


def _dataset_paths(settings: Settings, kind: str) -> list[str]:
    if kind == "dpo":
        return [p for p in (settings.dpo_dataset_path, settings.dpo_eval_dataset_path) if p]
    return [p for p in (settings.dataset_path, settings.eval_dataset_path) if p]


def _license(base: str, model_path: str | Path | None) -> str | None:
    card_file = Path(model_path) / "README.md" if model_path else None
    if card_file is not None and card_file.is_file():
        license_ = ModelCard.load(card_file, ignore_metadata_errors=True).data.license
        if license_:
            return license_
    return KNOWN_LICENSES.get(base)


def _technique_section(settings: Settings, kind: str, numbers: dict[str, str]) -> str:
    lines = ["## Technique", "", f"- method: {technique(settings, kind)}"]
    if is_adapter(settings, kind):
        targets = ",".join(settings.lora_target_modules)
        lines.append(f"- LoRA: r={settings.lora_r}, alpha={settings.lora_alpha:g}, dropout={settings.lora_dropout:g}, "
                     f"targets {targets}" + (", DoRA" if settings.use_dora else "") + (", rsLoRA" if settings.use_rslora else ""))
    if settings.load_in_4bit:
        lines.append(f"- 4-bit base: {settings.bnb_4bit_quant_type}, double quantization {settings.bnb_4bit_use_double_quant}, "
                     f"compute dtype {settings.bnb_4bit_compute_dtype}")
    if kind == "full" or (kind == "dpo" and settings.dpo_policy == "full"):
        lines.append(f"- optimizer {settings.optim}, layer-wise LR decay {settings.llrd_decay:g}, "
                     f"frozen layers {settings.freeze_layers}, frozen embeddings {settings.freeze_embeddings}")
    lines.append(f"- learning rate {settings.learning_rate:g} ({settings.lr_scheduler_type}, warmup {settings.warmup_steps:g}), "
                 f"micro batch {settings.per_device_train_batch_size} x accumulation {settings.gradient_accumulation_steps}, "
                 f"seed {settings.seed}")
    lines += [f"- {name}: {value}" for name, value in numbers.items()]
    return "\n".join(lines)


def _data_section(settings: Settings, kind: str, data_report: str | None) -> str:
    if kind == "dpo":
        train, held = settings.dpo_dataset_path, settings.dpo_eval_dataset_path
        what = f"preference pairs (chosen / rejected), max_length {settings.max_length}, max_prompt_length {settings.max_prompt_length}"
    else:
        train, held = settings.dataset_path, settings.eval_dataset_path
        what = (f"format {settings.dataset_format}, max_seq_length {settings.max_seq_length}, "
                f"over-long examples: {settings.truncation_strategy}, packing {settings.packing}")
    evaluation = f"`{held}`" if held else f"a held-out split of the training data (eval_split_size {settings.eval_split_size:g}, seed {settings.seed})"
    lines = ["## Data", "", f"- training data: `{train}` ({what})", f"- evaluation: {evaluation}"]
    if data_report:
        lines += ["", "Dataset report (printed before training):", "", "```", data_report.strip(), "```"]
    return "\n".join(lines)


def _results_section(results: dict[str, tuple[float | None, float | None]], kind: str) -> str:
    if not results:
        return "## Results\n\nNo evaluation data: no before/after figures."
    rows = ["| metric | before training | after training |", "|---|---|---|"]
    rows += [f"| {result_label(name)} | {_number(before)} | {_number(after)} |" for name, (before, after) in results.items()]
    note = ("Eval loss is the mean cross-entropy per supervised (answer) token over the whole eval set, in nats; "
            "perplexity is its exp." if kind != "dpo" else
            "Eval loss is the mean DPO loss per held-out pair (nats); reward accuracy is the share of pairs whose "
            "chosen answer gets the higher implicit reward, the margin its mean lead (beta-scaled log-ratio, nats); "
            "held-out preference accuracy compares the policy's own log-probabilities of chosen and rejected answers.")
    return "\n".join(["## Results", "", *rows, "", note])


def _number(value) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def _template_section(settings: Settings, tokenizer) -> str:
    lines = ["## Prompt template", "",
             f"Trained on the **{settings.prompt_template}** template. The tokenizer's chat template is set to it, so "
             "`tokenizer.apply_chat_template(messages, add_generation_prompt=True)` (and servers that render with "
             "it) prompt the model as it learned."]
    if tokenizer is not None:
        example = [{"role": "user", "content": "What is your name?"}]
        prompt = render(example, settings.prompt_template, tokenizer, add_generation_prompt=True)
        lines += ["", "One user turn, rendered for generation:", "", "```", prompt, "```", "",
                  f"Generation stops at token ids {stop_token_ids(settings.prompt_template, tokenizer)} "
                  "(in generation_config.json)."]
    return "\n".join(lines)


def _loading_section(settings: Settings, adapter: bool) -> str:
    base = settings.base_model_name
    if adapter:
        code = ["from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                f'base = AutoModelForCausalLM.from_pretrained("{base}")',
                'model = PeftModel.from_pretrained(base, "path/to/this/folder")',
                'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")']
        shell = ["python examples/chat.py --adapter_dir path/to/this/folder",
                 "python examples/merge_adapter.py --adapter_dir path/to/this/folder --output_dir merged"]
        quant = ("\n\nLoad the base in 4 bit as trained (bitsandbytes, the settings above) or merge it: "
                 "`merge_adapter.py` merges onto the dequantized 4-bit weights the adapter was trained against."
                 if settings.load_in_4bit else "")
    else:
        code = ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
                'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")']
        shell = ["python examples/chat.py --model_dir path/to/this/folder"]
        quant = ""
    return "\n".join(["## How to load", "", "```python", *code, "```", "", "With ft-kit (base model and template "
                      "from run_settings.json):", "", "```bash", *shell, "```"]) + quant


def _settings_section(settings: Settings, sections: tuple[str, ...]) -> str:
    saved = settings.to_saved_dict()
    rows = ["| setting | value |", "|---|---|"]
    for section in sections:
        rows += [f"| {name} | `{_cell(saved[name])}` |" for name in SECTIONS[section].model_fields
                 if name not in SECRET_FIELDS]
    return "\n".join(["## Settings", "", "Every setting of the sections this run read (all of them, secrets removed, "
                      "are in run_settings.json):", "", "<details>", "", *rows, "", "</details>"])


def _cell(value) -> str:
    text = ",".join(map(str, value)) if isinstance(value, list) else "" if value is None else str(value)
    return text.replace("|", "\\|")


def _limitations_section(settings: Settings, kind: str, model_path: str | Path | None) -> str:
    lines = ["## Limitations", "",
             "- The before/after figures come from a held-out set of the same kind as the training data: they show "
             "what the model learned from it, not its general quality or safety, which were not evaluated.",
             f"- Everything the base model ({settings.base_model_name}) cannot do or gets wrong, this model inherits; "
             "read its card."]
    if model_path is not None and (Path(model_path) / MARKER_FILE).is_file():
        lines.append("- Trained on a dequantized GGUF copy of the base, not its original weights: on the original "
                     "base the adapter behaves slightly differently; merge it onto the copy it was trained on.")
    if settings.load_in_4bit:
        lines.append("- Trained against 4-bit (QLoRA) base weights: a merge onto the original full-precision "
                     "weights differs from the trained model by the quantization error.")
    if kind == "dpo":
        lines.append("- DPO teaches the preference of the pairs it saw; reward accuracy on held-out pairs does not "
                     "measure answer quality beyond that preference.")
    return "\n".join(lines)
