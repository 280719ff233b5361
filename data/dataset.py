"""SFT data: read records, render them with a prompt template, tokenize with exact label masks.

The pipeline, one module per step (each imports only those above it in this list):

    data/errors.py          DatasetError: what is wrong where, and how to fix it
    data/readers.py         load_records(path) -> read_record(record, fmt) -> load_conversation_splits(settings)
    data/tools.py           the tool-calling text formats (Hermes / Qwen2.5, Llama 3.1), parse_tool_calls
    data/templates.py       render(messages, template, tokenizer, tools=...), render_segments, stop ids
    data/chat_templates.py  chat_template_for: the Jinja template saved with a trained model
    data/examples.py        build_sft_example(messages, ...) (+ truncation), encode_prompt, encode_prompt_completion
    data/report.py          SplitReport, BuildReport
    data/dataset.py         build_sft_dataset(settings, tokenizer) -> datasets.DatasetDict (+ BuildReport)
"""

from __future__ import annotations

import logging
import math
import re
import sys
import time
from typing import Any

import datasets
from tqdm import tqdm

from data.errors import DatasetError
from data.examples import IGNORE_INDEX, TRUNCATION_STRATEGIES, build_sft_example_with_status
from data.readers import FORMATS, load_conversation_splits
from data.report import BuildReport, SplitReport, packed_row_count
from data.templates import check_template_tokens

logger = logging.getLogger(__name__)

# Sequence (not List) so datasets 3.x, which requirements.txt allows, works too; int64 because
# cross-entropy needs long targets once a trainer sets a torch format.
_FEATURES = datasets.Features(
    {
        "input_ids": datasets.Sequence(datasets.Value("int64")),
        "attention_mask": datasets.Sequence(datasets.Value("int64")),
        "labels": datasets.Sequence(datasets.Value("int64")),
    }
)


def build_sft_dataset(settings: Any, tokenizer: Any) -> datasets.DatasetDict:
    """`build_sft_dataset_with_report` without the report, which is logged at INFO level."""
    dataset, report = build_sft_dataset_with_report(settings, tokenizer)
    logger.info("%s", report.format())
    return dataset


def build_sft_dataset_with_report(settings: Any, tokenizer: Any) -> tuple[datasets.DatasetDict, BuildReport]:
    """Load, split, render and tokenize the SFT data described by `settings`.

    Reads `dataset_path`, `dataset_format`, `prompt_template`, `system_prompt`, `role_map`,
    `max_seq_length`, `eval_dataset_path`, `eval_split_size`, `seed`, `truncation_strategy`,
    `train_on_last_turn_only` (see `load_splits` and `build_sft_example`) and `packing` (only for the
    report: the trainer packs, see techniques/sft.py).

    Returns a DatasetDict with "train" (and "eval" when there is eval data), columns input_ids,
    attention_mask, labels (lists of int64, unpadded), and a BuildReport of what was kept, truncated
    and dropped per split.

    Raises ValueError for bad settings or template tokens missing from the tokenizer (all problems
    in one message), DatasetError for malformed records or a split left without examples.
    """
    _validate_settings(settings, tokenizer)
    splits = load_conversation_splits(settings)
    report = BuildReport(
        settings.prompt_template, settings.max_seq_length, settings.truncation_strategy, packing=settings.packing
    )
    built = {}
    for name, conversations in splits.items():
        source = settings.eval_dataset_path if name == "eval" and settings.eval_dataset_path else settings.dataset_path
        built[name], lengths, report.splits[name] = _build_split(conversations, tokenizer, settings, source, name)
        if settings.packing and name == "train":
            split = report.splits[name]
            split.packed_rows = packed_row_count(lengths, settings.max_seq_length)
            split.packing_efficiency = split.total_tokens / max(1, split.packed_rows * settings.max_seq_length)
        if not lengths:
            raise DatasetError(
                f"no {name} examples left out of {len(conversations)} records (all dropped):\n{report.format()}",
                source=source,
            )
    return datasets.DatasetDict(built), report


def _validate_settings(settings, tokenizer) -> None:
    problems = []
    if settings.dataset_format not in FORMATS:
        problems.append(f"dataset_format={settings.dataset_format!r} is not one of {FORMATS}")
    if settings.truncation_strategy not in TRUNCATION_STRATEGIES:
        problems.append(f"truncation_strategy={settings.truncation_strategy!r} is not one of {TRUNCATION_STRATEGIES}")
    if settings.max_seq_length < 1:
        problems.append(f"max_seq_length={settings.max_seq_length} must be >= 1")
    try:
        check_template_tokens(settings.prompt_template, tokenizer)
    except ValueError as err:
        problems.append(str(err))
    if problems:
        raise ValueError("invalid data settings:\n  " + "\n  ".join(problems))


# A template variable left in an answer ("Hello {{name}}"): a data-generation step that was never filled in.
_PLACEHOLDER = re.compile(r"\{\{[^{}]*\}\}")
_DROP_REASONS = {
    ("dropped_too_long", "drop"): "its last exchange alone is longer than max_seq_length (truncation_strategy=drop)",
    ("dropped_too_long", "truncate_prompt"): "its last answer alone (with the assistant header) is longer than "
    "max_seq_length, and an answer is never trained without its prompt",
    ("dropped_no_supervised", "drop"): "no supervised token (an empty answer, or every answer has weight 0)",
    ("dropped_no_supervised", "truncate_prompt"): "no supervised token (an empty answer, or every answer has weight 0)",
}


# Off a terminal, a split that took at least this long gets one line saying so (a CI log shows
# where the minutes went); quicker ones, and every split on a terminal (it had a bar), none.
SLOW_SPLIT_SECONDS = 10.0


# Built rows go into Arrow every this many examples: as Python lists of ints a token costs ~80-120
# bytes while building (50k records: +1.9 GB), in Arrow 24 (three int64 columns).
ARROW_CHUNK_ROWS = 2048


def _build_split(
    conversations, tokenizer, settings, source, name
) -> tuple[datasets.Dataset, list[int], SplitReport]:
    """One split (`name`: "train", "eval") as a Dataset of unpadded rows, the rows' lengths in
    tokens (in order) and its report; records of `source` that cannot be built raise DatasetError
    naming their index."""
    rows, chunks, lengths, supervised = _empty_rows(), [], [], 0
    report = SplitReport(records=len(conversations))
    started, terminal = time.perf_counter(), sys.stderr.isatty()
    # A bar over records on a terminal (50k records take ~20-35 s on 2 cores); none in a log file
    # or CI, where a redrawn bar is noise. tqdm redraws at most every 0.1 s: no cost per record to speak of.
    bar = tqdm(conversations, desc=f"tokenizing {name}", unit=" records", disable=not terminal, leave=False)
    for conversation in bar:
        for key in conversation.ignored_keys:
            report.ignored_keys[key] = report.ignored_keys.get(key, 0) + 1
        answers = [m for m in conversation.messages if m["role"] == "assistant"]
        if any(not m["content"].strip() and not m.get("tool_calls") for m in answers):
            report.empty_answers.append(conversation.index)
        if any(_PLACEHOLDER.search(m["content"]) for m in answers):
            report.placeholder_answers.append(conversation.index)
        try:
            example, status = build_sft_example_with_status(
                conversation.messages,
                tokenizer,
                settings.prompt_template,
                settings.max_seq_length,
                settings.truncation_strategy,
                settings.train_on_last_turn_only,
                conversation.tools,
            )
        except ValueError as err:  # a turn the template cannot write (e.g. llama3: two calls in one turn)
            raise DatasetError(str(err), source=source, index=conversation.index) from None
        if example is None:
            setattr(report, status, getattr(report, status) + 1)
            reason = _DROP_REASONS[status, settings.truncation_strategy]
            report.dropped.append(f"{source}: record {conversation.index}: {status}: {reason}")
            continue
        report.kept += 1
        report.truncated += int(status in ("truncated", "truncated_mid_turn"))
        report.truncated_mid_turn += int(status == "truncated_mid_turn")
        lengths.append(len(example["input_ids"]))
        supervised += sum(label != IGNORE_INDEX for label in example["labels"])
        for key in rows:
            rows[key].append(example[key])
        if len(rows["input_ids"]) == ARROW_CHUNK_ROWS:
            chunks.append(datasets.Dataset.from_dict(rows, features=_FEATURES))
            rows = _empty_rows()
    if rows["input_ids"] or not chunks:
        chunks.append(datasets.Dataset.from_dict(rows, features=_FEATURES))
    ordered = sorted(lengths)
    report.total_tokens, report.supervised_tokens = sum(ordered), supervised
    report.length_p50, report.length_p90 = _percentile(ordered, 0.5), _percentile(ordered, 0.9)
    report.length_max = ordered[-1] if ordered else 0
    seconds = time.perf_counter() - started
    if not terminal and seconds >= SLOW_SPLIT_SECONDS:
        logger.info("%s: %s records rendered and tokenized in %.0f s", name, f"{len(conversations):,}", seconds)
    dataset = chunks[0] if len(chunks) == 1 else datasets.concatenate_datasets(chunks)
    return dataset, lengths, report


def _empty_rows() -> dict[str, list]:
    return {"input_ids": [], "attention_mask": [], "labels": []}


def _percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile (an actual example length, no interpolation)."""
    if not sorted_values:
        return 0
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]
