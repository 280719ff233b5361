"""Direct Preference Optimization (TRL `DPOTrainer`) on LoRA, QLoRA and full models.

Recipe: `build_preference_dataset(settings, tokenizer)` -> `load_policy(settings)` ->
`build_dpo_trainer(policy, tokenizer, splits["train"], splits.get("eval"), settings)` -> train ->
save (the adapter, or the full model).

Policy and reference (`dpo_policy`, `load_in_4bit`, `sft_adapter_dir`, `ref_model`):

| policy | trains | reference at step 0 |
|---|---|---|
| lora | a new LoRA adapter on the base | the same model with the adapter disabled (= the base) |
| lora + sft_adapter_dir | the SFT adapter itself, further | a frozen copy of the SFT adapter (TRL's "ref" adapter), NOT the base |
| lora + load_in_4bit | LoRA on the 4-bit base (QLoRA) | the 4-bit base, adapter disabled |
| full | every weight | a frozen in-memory copy, or (precompute_ref_log_probs) log-probs computed once before training, so no second model stays in memory |

`ref_model` (a model folder) replaces any of these references. Dropout is off in policy and
reference (TRL's `disable_dropout`): both log-prob passes must agree at step 0, where every reward
is 0 and the sigmoid loss is ln 2, and a dropout-noised log-ratio is a noisy reward. Attention
dropout, which HF models apply functionally and TRL leaves on, is zeroed too.

Losses (`loss_type`, `beta` = β, `label_smoothing` = ε; Δ = [log πθ(yw|x) - log πref(yw|x)] -
[log πθ(yl|x) - log πref(yl|x)], summed over completion tokens; σ the logistic function):
- sigmoid: -log σ(βΔ). Rafailov et al. 2023, "Direct Preference Optimization: Your Language
  Model is Secretly a Reward Model", eq. 7. With ε > 0, conservative DPO (cDPO):
  -(1-ε) log σ(βΔ) - ε log σ(-βΔ), Mitchell 2023, "A note on DPO with noisy preferences and
  relationship to IPO". TRL 1.16's sigmoid ignores ε, so cDPO is passed as the exact combination
  2(1-ε)·sigmoid - (1-2ε)·robust (both are -log σ(βΔ) plus a term linear in βΔ).
- ipo: (Δ̄ - 1/(2β))², Δ̄ = Δ with each side divided by its completion length (TRL's choice, agreed
  with the authors). Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from
  Human Preferences", eq. 17.
- hinge: max(0, 1 - βΔ). Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human
  Feedback" (the RSO paper, Liu et al. 2023, uses it with β as the inverse margin).
- robust: [-(1-ε) log σ(βΔ) + ε log σ(-βΔ)] / (1-2ε). Chowdhury et al. 2024, "Provably Robust DPO:
  Aligning Language Models with Noisy Feedback", eq. 10.
- TRL's other types pass through unchanged: exo_pair (Ji et al. 2024, EXO), nca_pair (Chen et al.
  2024, NCA), bco_pair (Jung et al. 2024, BCO), sppo_hard (Wu et al. 2024, SPPO), aot and
  aot_unpaired (Melnyk et al. 2024, AOT), apo_zero and apo_down (D'Oosterlinck et al. 2024, APO),
  discopop (Chris Lu et al. 2024, DiscoPOP), sigmoid_norm (length-normalized DPO).
- rpo_alpha = α adds α · mean NLL of the chosen tokens (TRL's "sft" loss). Pang et al. 2024,
  "Iterative Reasoning Preference Optimization" (RPO), eq. 1.
tests/test_dpo.py pins each of these against its formula computed by hand.

Data: records are read by `to_preference` (prompt/chosen/rejected as strings or messages; alpaca
instruction + chosen/rejected; ShareGPT conversations + chosen + rejected; chosen/rejected
transcripts whose shared prefix is the prompt) and rendered with the SFT templates
(`prompt_template`: alpaca, chatml, phi3, llama3, tokenizer), so an SFT-then-DPO pipeline sees one
format. Each pair is tokenized by construction (`data.examples.encode_prompt_completion`): the
prompt once, each answer alone, and TRL gets `prompt_ids` / `chosen_ids` / `rejected_ids`
(the columns TRL 1.16 reads), so both rows share identical prompt ids and the completion mask is
exactly the answer plus its turn-end token. Truncation is ours too (`truncate_pair`); TRL's
`max_length` stays off.
"""

from __future__ import annotations

import copy
import logging
import math
import re
from typing import Any

import datasets
import torch
from accelerate.utils import is_peft_model
from peft import PeftModel, prepare_model_for_kbit_training
from transformers import PreTrainedModel
from trl import DPOConfig, DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference

from config import Settings
from data.errors import DatasetError
from data.examples import encode_prompt_completion, template_bos_length
from data.readers import load_records, split_records, to_messages
from models import frozen_weight_dtype, load_model
from techniques.checkpoints import AtomicCheckpointsMixin
from techniques.lora import apply_lora, check_adapter_fits, skip_input_casts_under_autocast
from techniques.qlora import adapter_dtype, apply_qlora, load_4bit_model
from techniques.throughput import ThroughputMixin
from techniques.training import ExactEvalMixin, RunLogMixin, trainer_arguments

log = logging.getLogger(__name__)

PAIR_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
_FEATURES = datasets.Features({name: datasets.Sequence(datasets.Value("int64")) for name in PAIR_COLUMNS})
# Losses that read label_smoothing themselves in TRL 1.16 (sigmoid gets it through the cDPO combination).
_SMOOTHED_LOSSES = ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired")
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


# --------------------------------------------------------------------------------------------
# Records -> (prompt messages, chosen answer, rejected answer)
# --------------------------------------------------------------------------------------------


def to_preference(record: dict, *, source: str | None = None, index: int | None = None) -> tuple[list[dict], str, str]:
    """One preference record as (prompt messages ending with a user turn, chosen answer, rejected answer).

    Formats, by keys (first match wins):
    - `prompt` + `chosen` + `rejected`: the prompt is a string (one user turn; an optional `system`
      string adds a system turn) or a message list (role/content or from/value); each answer is a
      string, an assistant message, or a list holding one.
    - `instruction` (+ `input`, `system`) + `chosen` + `rejected`: Alpaca preference pairs.
    - `conversations` + `chosen` + `rejected`: ShareGPT preference pairs (LLaMA-Factory), the
      answers being `{"from": "gpt", "value": ...}`.
    - `chosen` + `rejected` only: transcripts. Both are message lists, or Anthropic HH strings
      ("\\n\\nHuman: ...\\n\\nAssistant: ..."), parsed into turns; the prompt is their longest shared
      prefix of turns, and each must continue it with exactly one assistant turn.

    Turn order is checked as for SFT (`data.readers.to_messages`). Raises DatasetError naming the
    source, record index and field.
    """
    try:
        if not isinstance(record, dict):
            raise DatasetError(f"expected a JSON object, got {type(record).__name__}")
        for key in ("chosen", "rejected"):
            if key not in record:
                raise DatasetError("missing field", field=key)
        if "prompt" in record or "instruction" in record or "conversations" in record:
            return _explicit_prompt(record)
        return _transcripts(record)
    except DatasetError as err:
        raise err.with_context(source, index) from None


def _explicit_prompt(record: dict) -> tuple[list[dict], str, str]:
    chosen, rejected = _answer(record["chosen"], "chosen"), _answer(record["rejected"], "rejected")
    if "prompt" in record:
        prompt = record["prompt"]
        if isinstance(prompt, str):
            system = record.get("system") or ""
            turns = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        elif isinstance(prompt, list):
            turns = prompt
        else:
            raise DatasetError(f"expected a string or a list of messages, got {type(prompt).__name__}", field="prompt")
        messages = _checked_turns(turns, "prompt", chosen)
    elif "instruction" in record:
        fields = {k: record[k] for k in ("instruction", "input", "system") if k in record}
        messages = to_messages({**fields, "output": chosen}, "alpaca")
    else:
        turns = record["conversations"]
        if not isinstance(turns, list):
            raise DatasetError(f"expected a list of turns, got {type(turns).__name__}", field="conversations")
        messages = to_messages({"conversations": turns + [{"from": "gpt", "value": chosen}]}, "sharegpt")
    return messages[:-1], chosen, rejected  # turns alternate, so the prompt ends with a user turn


def _answer(value: Any, field: str) -> str:
    """An answer given as a string, {role/from, content/value} or a list holding one such message."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        role, content = value.get("role", value.get("from")), value.get("content", value.get("value"))
        if role not in ("assistant", "gpt"):
            raise DatasetError(f"the answer's role must be assistant (or gpt), got {role!r}", field=field)
        if not isinstance(content, str):
            raise DatasetError("the answer has no string content/value", field=field)
        return content
    raise DatasetError("expected a string, an assistant message or a list holding one", field=field)


def _checked_turns(turns: list, field: str, answer: str | None = None) -> list[dict]:
    """Messages (role/content, or ShareGPT from/value) + the `answer` as a last assistant turn,
    checked like SFT conversations (`data.readers.to_messages`)."""
    sharegpt = bool(turns) and isinstance(turns[0], dict) and "from" in turns[0]
    if answer is not None:
        turns = turns + [{"from": "gpt", "value": answer} if sharegpt else {"role": "assistant", "content": answer}]
    try:
        if sharegpt:
            return to_messages({"conversations": turns}, "sharegpt")
        return to_messages({"messages": turns}, "messages")
    except DatasetError as err:
        raise DatasetError(err.reason, field=f"{field} ({err.field})") from None


def _transcripts(record: dict) -> tuple[list[dict], str, str]:
    chosen, rejected = (_transcript_turns(record[key], key) for key in ("chosen", "rejected"))
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    for name, turns in (("chosen", chosen), ("rejected", rejected)):
        if len(turns) != shared + 1 or turns[-1]["role"] != "assistant":
            raise DatasetError(
                f"a transcript pair must share every turn but the last, an assistant turn ({shared} shared, "
                f"{len(turns)} in {name})", field=name,
            )
    return chosen[:shared], chosen[-1]["content"], rejected[-1]["content"]


def _transcript_turns(value: Any, field: str) -> list[dict]:
    if isinstance(value, str):
        parts = _HH_TURN.split(value)
        if len(parts) < 3 or parts[0].strip():
            raise DatasetError(
                "a transcript string must read '\\n\\nHuman: ...\\n\\nAssistant: ...' (Anthropic HH); "
                "give prompt/chosen/rejected for other text", field=field,
            )
        value = [{"role": "user" if who == "Human" else "assistant", "content": text}
                 for who, text in zip(parts[1::2], parts[2::2], strict=True)]
    if not isinstance(value, list):
        raise DatasetError(f"expected a list of messages or a transcript string, got {type(value).__name__}", field=field)
    return _checked_turns(value, field)


def load_preference_pairs(path: str, system_prompt: str | None = None) -> list[tuple[list[dict], str, str]]:
    """`to_preference` of every record in `path` (see `data.readers.load_records` for file types);
    `system_prompt` is prepended to prompts without a system turn. Every record is checked before
    raising: one DatasetError names each malformed record (the first 10) and keeps all in `problems`.
    A pair whose chosen and rejected answers are the same text is malformed too: its DPO gradient is
    zero (the log-ratios cancel), so it teaches nothing and usually means a data bug; they are
    counted and named in one error."""
    pairs, problems, same = [], [], []
    for index, record in enumerate(load_records(path)):
        try:
            prompt, chosen, rejected = to_preference(record, source=str(path), index=index)
        except DatasetError as err:
            problems.append(err)
            continue
        if chosen == rejected:
            same.append(index)
            continue
        if system_prompt and prompt[0]["role"] != "system":
            prompt = [{"role": "system", "content": system_prompt}] + prompt
        pairs.append((prompt, chosen, rejected))
    if same:
        shown = ", ".join(map(str, same[:10])) + (f", ... ({len(same) - 10} more)" if len(same) > 10 else "")
        problems.append(DatasetError(f"{len(same)} of the pairs have chosen == rejected (records {shown}): such a pair "
                                     "teaches nothing; fix or remove them", source=str(path), field="rejected"))
    if len(problems) == 1:
        raise problems[0]
    if problems:
        lines = "\n".join(f"  {p}" for p in problems[:10])
        error = DatasetError(f"{len(problems)} malformed preference records:\n{lines}", source=str(path))
        error.problems = problems
        raise error
    return pairs


# --------------------------------------------------------------------------------------------
# Pairs -> token ids (by construction), truncation, DatasetDict
# --------------------------------------------------------------------------------------------


def encode_pair(prompt: list[dict], chosen: str, rejected: str, template: str, tokenizer) -> dict[str, list[int]]:
    """`{"prompt_ids", "chosen_ids", "rejected_ids"}` of one pair, untruncated.

    The prompt is tokenized once (`encode_prompt` of the prompt turns + assistant header) and each
    answer alone (content + turn-end token), so both rows share the prompt ids whatever the answers
    start with. Worked example, chatml, prompt [user "23*2?"], chosen "46", rejected "$46":

        prompt_ids:   <|im_start|>user\\n23*2?<|im_end|>\\n<|im_start|>assistant\\n
        chosen_ids:   46<|im_end|>           rejected_ids: $46<|im_end|>

    TRL's collator builds the rows prompt+chosen and prompt+rejected with completion_mask 1 exactly
    on the answer ids (TRL shifts it by one for the log-probs).
    """
    prompt_ids, chosen_ids = encode_prompt_completion(prompt + [{"role": "assistant", "content": chosen}], template, tokenizer)
    prompt_again, rejected_ids = encode_prompt_completion(prompt + [{"role": "assistant", "content": rejected}], template, tokenizer)
    if prompt_again != prompt_ids:  # cannot happen with the hand-written templates; guards "tokenizer"
        raise ValueError(f"the {template!r} template renders the prompt differently for the two answers")
    return {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids}


def truncate_pair(pair: dict[str, list[int]], max_length: int, max_prompt_length: int, head: int = 0) -> tuple[dict, bool]:
    """Fit prompt + each answer into `max_length` tokens; returns (pair, whether anything was cut).

    Nothing changes when prompt + the longer answer fit. Otherwise the prompt is cut from the left
    to p = min(max_prompt_length, max_length - 1) tokens when longer than p (its first `head` ids,
    a BOS the template wrote, stay when p > head), and both answers are cut from the right to
    max_length - len(prompt). So every row fits, keeps >= 1 answer token, keeps its prompt whole when the prompt has at most
    p tokens, and chosen and rejected keep the same prompt. E.g. prompt 10, answers 6 and 3,
    max_length 12, max_prompt_length 8: the prompt keeps its last 8 ids, the answers 4 and 3.
    """
    prompt, chosen, rejected = pair["prompt_ids"], pair["chosen_ids"], pair["rejected_ids"]
    if len(prompt) + max(len(chosen), len(rejected)) <= max_length:
        return pair, False
    keep = min(max_prompt_length, max_length - 1)
    if len(prompt) > keep:
        head = min(head, keep - 1)  # the prompt's last id (the assistant header) always stays
        prompt = prompt[:head] + prompt[len(prompt) - (keep - head):]
    room = max_length - len(prompt)
    return {"prompt_ids": prompt, "chosen_ids": chosen[:room], "rejected_ids": rejected[:room]}, True


def build_preference_dataset(settings: Settings, tokenizer) -> datasets.DatasetDict:
    """Load, split, render, tokenize and truncate the preference pairs described by `settings`.

    Reads `dpo_dataset_path`, `dpo_eval_dataset_path` (else `eval_split_size` of the records are
    held out, seeded by `seed`), `system_prompt`, `prompt_template`, `max_length`,
    `max_prompt_length`. Returns splits "train" (and "eval") with columns prompt_ids, chosen_ids,
    rejected_ids; a per-split report (records, truncated, token lengths) is logged.
    """
    train = load_preference_pairs(settings.dpo_dataset_path, settings.system_prompt)
    if settings.dpo_eval_dataset_path:
        splits = {"train": train, "eval": load_preference_pairs(settings.dpo_eval_dataset_path, settings.system_prompt)}
    else:
        train, held_out = split_records(train, settings.eval_split_size, settings.seed)
        splits = {"train": train, "eval": held_out} if held_out else {"train": train}
    built = {}
    for name, pairs in splits.items():
        rows, truncated = {column: [] for column in PAIR_COLUMNS}, 0
        for prompt, chosen, rejected in pairs:
            pair = encode_pair(prompt, chosen, rejected, settings.prompt_template, tokenizer)
            head = template_bos_length(pair["prompt_ids"], settings.prompt_template, tokenizer)
            pair, cut = truncate_pair(pair, settings.max_length, settings.max_prompt_length, head)
            truncated += cut
            for column in PAIR_COLUMNS:
                rows[column].append(pair[column])
        lengths = sorted(len(p) + max(len(c), len(r)) for p, c, r in zip(*rows.values(), strict=True))
        log.info("DPO data %s: %d pairs, %d truncated to max_length=%d (max_prompt_length=%d); longest row %d, "
                 "median %d tokens", name, len(pairs), truncated, settings.max_length, settings.max_prompt_length,
                 lengths[-1], lengths[len(lengths) // 2])
        built[name] = datasets.Dataset.from_dict(rows, features=_FEATURES)
    return datasets.DatasetDict(built)


# --------------------------------------------------------------------------------------------
# Policy, reference, trainer
# --------------------------------------------------------------------------------------------


def load_policy(settings: Settings, model_path: str | None = None) -> PreTrainedModel | PeftModel:
    """The model DPO trains, by `dpo_policy` / `load_in_4bit` / `sft_adapter_dir` (table above).

    Raises ValueError for combinations that do not exist (full + 4-bit, full + an SFT adapter).
    """
    problems = []
    if settings.dpo_policy == "full" and settings.load_in_4bit:
        problems.append("dpo_policy=full cannot train 4-bit weights; use dpo_policy=lora with load_in_4bit=true (QLoRA)")
    if settings.dpo_policy == "full" and settings.sft_adapter_dir:
        problems.append("dpo_policy=full with sft_adapter_dir: merge the adapter first (techniques.lora.merge_and_save_lora)")
    if problems:
        raise ValueError("invalid DPO settings:\n  " + "\n  ".join(problems))
    if settings.dpo_policy == "full":
        return load_model(settings, model_path, dtype=torch.float32)
    base = (load_4bit_model(settings, model_path) if settings.load_in_4bit
            else load_model(settings, model_path, dtype=frozen_weight_dtype(settings)))
    if not settings.sft_adapter_dir:
        return apply_qlora(base, settings) if settings.load_in_4bit else apply_lora(base, settings)
    if settings.load_in_4bit:
        base = prepare_model_for_kbit_training(
            base, use_gradient_checkpointing=settings.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    # Trainable "default" adapter = the SFT adapter; DPOTrainer adds a frozen copy named "ref".
    check_adapter_fits(base, settings.sft_adapter_dir)
    policy = PeftModel.from_pretrained(base, settings.sft_adapter_dir, is_trainable=True)
    skip_input_casts_under_autocast(policy)
    return policy


def loss_types_and_weights(settings: Settings) -> tuple[list[str], list[float]]:
    """TRL `loss_type` / `loss_weights` for our settings: cDPO and RPO as weighted TRL losses.

    sigmoid with ε = label_smoothing > 0 -> [sigmoid, robust] weighted [2(1-ε), -(1-2ε)], which is
    exactly -(1-ε) log σ(βΔ) - ε log σ(-βΔ); rpo_alpha = α appends ("sft", α). Raises ValueError
    when label_smoothing is set for a loss that would ignore it.
    """
    eps = settings.label_smoothing
    if eps and settings.loss_type not in _SMOOTHED_LOSSES:
        raise ValueError(f"label_smoothing={eps} has no effect on loss_type={settings.loss_type}; "
                         f"it applies to {', '.join(_SMOOTHED_LOSSES)}")
    if settings.loss_type == "sigmoid" and eps:
        types, weights = ["sigmoid", "robust"], [2 * (1 - eps), -(1 - 2 * eps)]
    else:
        types, weights = [settings.loss_type], [1.0]
    if settings.rpo_alpha:
        types, weights = types + ["sft"], weights + [settings.rpo_alpha]
    return types, weights


def dpo_config(settings: Settings, **overrides) -> DPOConfig:
    """TRL `DPOConfig`: `techniques.training.trainer_arguments` (precision, checkpointing, CPU, schedule)
    plus the dpo settings; `overrides` win over everything.

    `max_length=None` because pairs arrive truncated by `truncate_pair`, and `disable_dropout=True`
    (see the module doc); the learning rate is ours, not TRL's 1e-6 default. Raises ValueError for
    `use_liger_kernel` (an SFT setting: TRL's Liger DPO loss would replace the losses built here).
    """
    if settings.use_liger_kernel:
        raise ValueError("use_liger_kernel=true is an SFT setting (LoRA, QLoRA, full fine-tune); DPO trains without "
                         "it: set USE_LIGER_KERNEL=false")
    loss_type, loss_weights = loss_types_and_weights(settings)
    args = trainer_arguments(settings)
    args.update(
        max_length=None,
        beta=settings.beta,
        loss_type=loss_type,
        loss_weights=loss_weights,
        label_smoothing=settings.label_smoothing,
        precompute_ref_log_probs=settings.precompute_ref_log_probs,
        disable_dropout=True,
    )
    args.update(overrides)
    return DPOConfig(**args)


class PreTokenizedDPOTrainer(AtomicCheckpointsMixin, RunLogMixin, ThroughputMixin, ExactEvalMixin, DPOTrainer):
    """`DPOTrainer` over rows that already hold prompt_ids / chosen_ids / rejected_ids, with eval
    metrics weighted by pairs, DDP-safe training (`techniques.training.ExactEvalMixin`) and
    checkpoints written whole (`techniques.checkpoints`).

    TRL 1.16 always re-tokenizes `prompt + chosen` in one piece and splits where it stops agreeing
    with the tokenized prompt, which moves the boundary when tokens merge across it ("A: " + "46");
    our rows are split by construction, so its preparation step is skipped.

    Eval: TRL computes the loss and the reward metrics (rewards/chosen, rejected, margins,
    accuracies, logps) as means over each batch's pairs; weighting each batch by its pair count
    makes them means over every eval pair, whatever the eval batch size.
    """

    def eval_weight(self, inputs: dict) -> int:
        """Pairs in the batch: the collator stacks the chosen rows, then the rejected rows."""
        return inputs["input_ids"].shape[0] // 2

    def flops_reference(self):
        """The reference's forward pass, for the FLOPs count: none when its log-probs were
        precomputed, the frozen model when there is one, else the policy with its adapter off."""
        if self.precompute_ref_logps:
            return None
        return self.ref_model if self.ref_model is not None else self.accelerator.unwrap_model(self.model)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        missing = [column for column in PAIR_COLUMNS if column not in dataset.column_names]
        if missing:
            raise ValueError(f"the {dataset_name} dataset lacks {missing}; build it with build_preference_dataset")
        return dataset


def build_dpo_trainer(model, tokenizer, train_dataset, eval_dataset, settings: Settings, callbacks=None,
                      **config_overrides) -> DPOTrainer:
    """A DPO trainer over pre-tokenized pairs (`build_preference_dataset`), for any `load_policy` model.

    The reference: `ref_model` when set (loaded frozen); else for a plain (full) model a frozen
    deep copy, or none with `precompute_ref_log_probs` (TRL then scores the data with the policy
    before its first step); for a PeftModel none, so TRL disables the adapter -- or, for an adapter
    that was trained before (`sft_adapter_dir`), adds and uses a frozen copy named "ref".
    On a 4-bit base the adapters are kept in `techniques.qlora.adapter_dtype` (see the comment below).
    """
    _no_attention_dropout(model)
    ref = None
    if settings.ref_model:
        ref = _frozen(_no_attention_dropout(load_model(settings, settings.ref_model, dtype=next(model.parameters()).dtype)))
    elif not is_peft_model(model) and not settings.precompute_ref_log_probs:
        ref = _frozen(copy.deepcopy(model))  # ~2x weight memory: precompute_ref_log_probs avoids it
    trainer = PreTokenizedDPOTrainer(
        model=model,
        ref_model=ref,
        args=dpo_config(settings, **config_overrides),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    trainer.peak_flops_setting = settings.peak_flops
    if settings.load_in_4bit:
        # TRL casts the trainable adapter of a quantized model to bf16 (the QLoRA paper's GPU recipe),
        # after copying a re-trained adapter into "ref". Restore it from that exact copy, both in the
        # adapter dtype (techniques.qlora.adapter_dtype): else policy != reference at step 0, and on CPU bf16
        # weights round away AdamW's small updates.
        dtype = adapter_dtype(settings)
        params = dict(trainer.model.named_parameters())
        for name, param in params.items():
            if "lora_" in name:
                param.data = params.get(name.replace(".default.", ".ref."), param).data.to(dtype, copy=True)
    return trainer


def _no_attention_dropout(model: torch.nn.Module) -> torch.nn.Module:
    # TRL's disable_dropout zeroes nn.Dropout modules only; HF attention applies `attention_dropout`
    # (from the config, copied into each attention module) functionally while training.
    for module in model.modules():
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    return model


def _frozen(model: PreTrainedModel) -> PreTrainedModel:
    model.eval()
    model.requires_grad_(False)
    return model


# --------------------------------------------------------------------------------------------
# Measuring preferences
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def pair_log_probs(model, dataset: datasets.Dataset, pad_token_id: int, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities log π(chosen | prompt) and log π(rejected | prompt), one per pair.

    Rows are collated as TRL trains on them (`DataCollatorForPreference`), scored in eval mode
    without dropout; the sums run over the completion mask (answer + turn-end token).
    """
    collate = DataCollatorForPreference(pad_token_id=pad_token_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        ids, mask = batch["input_ids"].to(device), batch["completion_mask"].to(device)
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"].to(device), use_cache=False).logits
        token_logps = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        sums = (token_logps * mask[:, 1:]).sum(dim=1).cpu()
        c, r = sums.chunk(2)
        chosen.append(c)
        rejected.append(r)
    model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


def preference_accuracy(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, dataset: datasets.Dataset | None = None) -> float:
    """Share of pairs where the model prefers the chosen answer: by summed log-probability, or, given
    the `dataset` the log-probs were computed on, by mean log-probability per answer token (so that
    answer length alone cannot decide it)."""
    if len(chosen_logps) == 0:
        return math.nan
    if dataset is not None:
        chosen_logps = chosen_logps / torch.tensor([len(ids) for ids in dataset["chosen_ids"]])
        rejected_logps = rejected_logps / torch.tensor([len(ids) for ids in dataset["rejected_ids"]])
    return (chosen_logps > rejected_logps).float().mean().item()
