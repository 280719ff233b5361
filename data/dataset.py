"""SFT data: read records, render them with a prompt template, tokenize with exact label masks.

The pipeline, one function per step:

    load_records(path)                      -> list[dict]          (.json / .jsonl / .parquet / .csv / hub name)
    to_messages(record, fmt)                -> list[dict]          (Alpaca / ShareGPT / OpenAI messages)
    render(messages, template, tokenizer)   -> str                 (alpaca / chatml / phi3 / llama3 / tokenizer)
    build_sft_example(messages, ...)        -> dict | None         (input_ids, attention_mask, labels)
    encode_prompt(messages, ...)            -> list[int]           (generation prompt, same tokenization)
    build_sft_dataset(settings, tokenizer)  -> datasets.DatasetDict (splits "train" and maybe "eval")

Labels are built by construction, never by searching token ids: each template renders a conversation
into segments that are either prompt text (label -100) or supervised text (an assistant turn's
content plus the token that closes the turn), and every segment is tokenized on its own with
`add_special_tokens=False`. Supervised positions are therefore known exactly, whatever the token
ids are (pad == eos cannot mask the real EOS), and a prompt ending in "Answer: " followed by the
completion "four" supervises exactly the tokens of "four" and the turn end.

Sources of the formats:
- Alpaca: the prompt of Stanford Alpaca `train.py` (tatsu-lab/stanford_alpaca @761dc5bf, lines 31-42),
  target = output + eos_token directly after "### Response:".
- ChatML, Phi-3, Llama 3: hand-written renderers, byte-identical to the official chat templates
  (generic ChatML; microsoft/Phi-3-mini-4k-instruct; meta-llama/Meta-Llama-3-8B-Instruct) rendered
  by `tokenizer.apply_chat_template`; the parity is pinned by tests.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import random
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import datasets

logger = logging.getLogger(__name__)

TEMPLATES = ("alpaca", "chatml", "phi3", "llama3", "tokenizer")
FORMATS = ("auto", "alpaca", "sharegpt", "messages")
TRUNCATION_STRATEGIES = ("truncate_prompt", "drop")
IGNORE_INDEX = -100  # the label value that torch's cross-entropy (and every HF model) skips
LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")

# Stanford Alpaca train.py PROMPT_DICT, split into the preamble sentence and the blocks after it,
# so a system message can replace the preamble and later turns can repeat the blocks.
ALPACA_PREAMBLE_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
ALPACA_PREAMBLE_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)

_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
_MESSAGE_ROLES = ("system", "user", "assistant")

# Special tokens each hand-written template writes; each must be one token in the tokenizer,
# otherwise the rendered turn markers would be split into ordinary text pieces.
_TEMPLATE_TOKENS = {
    "alpaca": (),
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "phi3": ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "tokenizer": (),
}
_TURN_END = {"chatml": "<|im_end|>", "phi3": "<|end|>", "llama3": "<|eot_id|>"}

# Sequence (not List) so datasets 3.x, which requirements.txt allows, works too; int64 because
# cross-entropy needs long targets once a trainer sets a torch format.
_FEATURES = datasets.Features(
    {
        "input_ids": datasets.Sequence(datasets.Value("int64")),
        "attention_mask": datasets.Sequence(datasets.Value("int64")),
        "labels": datasets.Sequence(datasets.Value("int64")),
    }
)


class DatasetError(ValueError):
    """A record or data file that cannot be used; the message names the file, record index and field.

    Attributes `source`, `index` (0-based record index) and `field` (e.g. "conversations[3].from")
    hold the same facts for programs; any of them may be None when unknown. An error that sums up
    several malformed records (see `load_messages`) lists them in `problems`.
    """

    def __init__(self, reason: str, *, source: str | None = None, index: int | None = None, field: str | None = None):
        self.reason, self.source, self.index, self.field = reason, source, index, field
        self.problems: list[DatasetError] = []
        where = []
        if source is not None:
            where.append(str(source))
        if index is not None:
            where.append(f"record {index}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(": ".join(where + [reason]))

    def with_context(self, source: str | None = None, index: int | None = None) -> DatasetError:
        """The same error with file and record index filled in where still unknown."""
        return DatasetError(
            self.reason,
            source=self.source if self.source is not None else source,
            index=self.index if self.index is not None else index,
            field=self.field,
        )


# --------------------------------------------------------------------------------------------
# Records -> messages
# --------------------------------------------------------------------------------------------


def detect_format(record: dict) -> str:
    """The format of `record` by its keys, first match wins: `messages` -> "messages",
    `conversations` -> "sharegpt", `instruction` -> "alpaca". Raises DatasetError naming the keys."""
    for key, fmt in (("messages", "messages"), ("conversations", "sharegpt"), ("instruction", "alpaca")):
        if key in record:
            return fmt
    raise DatasetError(
        f"cannot detect the format from keys {sorted(record)}: expected 'instruction' (alpaca), "
        "'conversations' (sharegpt) or 'messages' (OpenAI messages)"
    )


def to_messages(
    record: dict,
    fmt: str | None = None,
    *,
    source: str | None = None,
    index: int | None = None,
    role_map: dict[str, str] | None = None,
) -> list[dict]:
    """One record as a list of chat messages `{"role": "system"|"user"|"assistant", "content": str}`.

    Args:
        record: one row of a data file.
        fmt: None or "auto" (detect by keys, see `detect_format`), "alpaca" (`instruction`, optional
            `input`, `output`, optional `system`), "sharegpt" (`conversations` of `from`/`value`;
            roles system, human/user, gpt/assistant) or "messages" (`messages` of `role`/`content`;
            other record keys such as `label` are ignored).
        source, index: file name and record index, only used in error messages.
        role_map: extra roles for ShareGPT `from` and messages `role`, e.g. {"function_call":
            "assistant", "observation": "user"} (setting `role_map`); each maps to system, user or
            assistant, and then follows the turn rules below like any other turn of that role.

    Alpaca: the user content is `instruction` + ("\\n\\n" + input when input != ""), and the user
    message also keeps the keys `instruction` and `input` so the alpaca template can render the
    canonical with-input prompt. A non-empty `system` becomes a system message.

    Turn rules (checked for every format): an optional system turn, only first, and kept; then
    user and assistant alternate starting with user (two consecutive turns of one role, after
    `role_map`, are rejected, never merged or dropped: merge them in the data); at least one
    assistant turn; the last turn is the assistant's (a trailing user turn would never be
    answered nor trained on: a record cut short).
    Every turn of the record becomes one message; roles come from the role field, never from
    positions.

    Raises:
        DatasetError: missing field, wrong type, unknown role not in `role_map` (e.g. `function_call`,
            `observation`, `tool`), empty conversation, broken turn order, no assistant turn. The
            message names `source`, `index`, the field and, for a role, the role itself.
        ValueError: unknown `fmt`.
    """
    if fmt not in (None, *FORMATS):
        raise ValueError(f"unknown dataset format {fmt!r}; expected one of {FORMATS}")
    try:
        if not isinstance(record, dict):
            raise DatasetError(f"expected a JSON object, got {type(record).__name__}")
        fmt = detect_format(record) if fmt in (None, "auto") else fmt
        if fmt == "alpaca":
            return _read_alpaca(record)
        extra = role_map or {}
        if fmt == "sharegpt":
            return _read_turns(record, "conversations", "from", "value", {**_SHAREGPT_ROLES, **extra})
        return _read_turns(record, "messages", "role", "content", {**{r: r for r in _MESSAGE_ROLES}, **extra})
    except DatasetError as err:
        raise err.with_context(source, index) from None


def _get_str(obj: dict, key: str, field_name: str, required: bool = True) -> str:
    value = obj.get(key)
    if value is None:
        if required:
            raise DatasetError("missing field", field=field_name)
        return ""
    if not isinstance(value, str):
        raise DatasetError(f"expected a string, got {type(value).__name__}", field=field_name)
    return value


def _read_alpaca(record: dict) -> list[dict]:
    instruction = _get_str(record, "instruction", "instruction")
    input_text = _get_str(record, "input", "input", required=False)
    output = _get_str(record, "output", "output")
    system = _get_str(record, "system", "system", required=False)
    # Stanford train.py picks the with-input prompt when input != "" (not when it is non-blank).
    content = instruction + ("\n\n" + input_text if input_text != "" else "")
    user = {"role": "user", "content": content, "instruction": instruction, "input": input_text}
    head = [{"role": "system", "content": system}] if system else []
    return head + [user, {"role": "assistant", "content": output}]


def _read_turns(record: dict, key: str, role_key: str, content_key: str, roles: dict[str, str]) -> list[dict]:
    turns = record.get(key)
    if turns is None:
        raise DatasetError("missing field", field=key)
    if not isinstance(turns, list):
        raise DatasetError(f"expected a list of turns, got {type(turns).__name__}", field=key)
    messages = []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise DatasetError(f"expected an object, got {type(turn).__name__}", field=where)
        name = _get_str(turn, role_key, f"{where}.{role_key}")
        if name not in roles:
            raise DatasetError(
                f"unknown role {name!r}; expected one of {sorted(roles)}, or map it with the role_map setting "
                f"(e.g. ROLE_MAP={name}:user)",
                field=f"{where}.{role_key}",
            )
        messages.append({"role": roles[name], "content": _get_str(turn, content_key, f"{where}.{content_key}")})
    _check_turn_order(messages, f"{key}[{{}}].{role_key}")
    return messages


def _check_turn_order(messages: list[dict], field_pattern: str) -> None:
    if not messages:
        raise DatasetError("empty conversation", field=field_pattern.split("[")[0])
    previous = None
    for i, message in enumerate(messages):
        role, where = message["role"], field_pattern.format(i)
        if role == "system" and i > 0:
            raise DatasetError("a system turn is only allowed as the first turn", field=where)
        if role == "assistant" and previous in (None, "system"):
            raise DatasetError(
                "the conversation must start with a user turn (after an optional system turn)", field=where
            )
        if role == previous:
            raise DatasetError(f"two consecutive {role!r} turns ({i - 1} and {i}); merge them in the data", field=where)
        previous = role
    if not any(m["role"] == "assistant" for m in messages):
        raise DatasetError("no assistant turn, nothing to train on", field=field_pattern.split("[")[0])
    if messages[-1]["role"] != "assistant":
        raise DatasetError(f"the conversation ends with a {messages[-1]['role']!r} turn that nothing answers (a record "
                           "cut short?): end it with the assistant's answer, or remove that turn",
                           field=field_pattern.format(len(messages) - 1))


# --------------------------------------------------------------------------------------------
# Files -> records
# --------------------------------------------------------------------------------------------


def load_records(path: str | Path) -> list[dict]:
    """All rows of a local data file, or of the "train" split of a Hugging Face Hub dataset.

    Local files by suffix: `.json` (a list of objects, or a single object = one record), `.jsonl`
    (one object per line, blank lines skipped), `.parquet`, `.csv` (all values are strings; an
    empty cell is ""). An existing local folder is loaded with `datasets.load_dataset(folder)`.
    Anything else is a hub name, loaded with `datasets.load_dataset(name, split="train")`.

    Raises:
        DatasetError: unsupported suffix; invalid JSON (with file and line number); text that is
            not UTF-8 (with line and column); a file without records; a path that is neither a
            local file nor loadable from the hub (offline, unknown name).
    """
    path_str = str(path)
    local = Path(path_str).expanduser()
    if local.is_file():
        records = _read_local_file(local)
        if not records:
            raise DatasetError("the file holds no records", source=str(local))
        return records
    if local.is_dir():
        return _load_with_datasets(path_str)
    if path_str.startswith(("/", ".", "~")):
        # Hub ids never start with these, so it was meant as a local path: skip the network retries.
        raise DatasetError(
            "no such local file (and not a Hugging Face Hub dataset name: those never start with '/', '.' or '~')",
            source=path_str,
        )
    return _load_with_datasets(path_str)


def _read_local_file(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".parquet":
        import pyarrow.parquet as pq  # a dependency of `datasets`; imported here as only parquet needs it

        return pq.read_table(path).to_pylist()
    if suffix == ".csv":
        return list(csv.DictReader(io.StringIO(_read_text(path), newline="")))
    raise DatasetError(f"unsupported file type {suffix!r}; expected one of {LOCAL_SUFFIXES}", source=str(path))


def _read_text(path: Path) -> str:
    """The file as UTF-8 text; DatasetError naming the line and column of the first byte that is not."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise DatasetError(f"not UTF-8 text: byte 0x{raw[err.start]:02x} on line {line}, column {column} ({err.reason}); "
                           "save the file as UTF-8", source=str(path)) from None


def _read_json(path: Path) -> list[dict]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise DatasetError(
            f"invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}", source=str(path)
        ) from None
    if isinstance(data, dict):
        return [data]  # a single object is one record (e.g. axolotl's conversation fixture)
    if isinstance(data, list):
        return data
    raise DatasetError(f"expected a list of records or one object, got {type(data).__name__}", source=str(path))


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    for line_number, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DatasetError(f"invalid JSON on line {line_number}: {err.msg}", source=str(path)) from None
    return records


def _load_with_datasets(name: str) -> list[dict]:
    try:
        return datasets.load_dataset(name, split="train").to_list()
    except Exception as err:  # offline, unknown repo, no "train" split: all mean this name is unusable
        raise DatasetError(
            f"{name!r} is neither an existing local file nor a dataset reachable on the Hugging Face Hub "
            f"({type(err).__name__}: {err})"
        ) from err


def load_messages(
    path: str | Path, fmt: str = "auto", system_prompt: str | None = None, role_map: dict[str, str] | None = None
) -> list[list[dict]]:
    """`to_messages` of every record in `path` (with `role_map`); `system_prompt`, when set, is
    prepended as a system message to conversations that have none.

    Every record is checked before anything is raised. One malformed record raises its own
    DatasetError (file, record index, field); several raise one DatasetError that lists them (the
    first 10 in full) and keeps them all in its `problems` attribute.
    """
    return [messages for _, messages in _load_indexed(path, fmt, system_prompt, role_map)]


def _load_indexed(path, fmt, system_prompt, role_map) -> list[tuple[int, list[dict]]]:
    """`load_messages` as (record index in the file, messages) pairs."""
    conversations, problems = [], []
    for index, record in enumerate(load_records(path)):
        try:
            messages = to_messages(record, fmt, source=str(path), index=index, role_map=role_map)
        except DatasetError as err:
            problems.append(err)
            continue
        if system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system_prompt}] + messages
        conversations.append((index, messages))
    if len(problems) == 1:
        raise problems[0]
    if problems:
        lines = [f"  {p}" for p in problems[:10]] + (
            [f"  ... and {len(problems) - 10} more"] if len(problems) > 10 else []
        )
        error = DatasetError(f"{len(problems)} malformed records:\n" + "\n".join(lines), source=str(path))
        error.problems = problems  # each with its own index and field, for programs
        raise error
    return conversations


def split_records(items: list, eval_split_size: float, seed: int) -> tuple[list, list]:
    """Hold out part of `items` for evaluation: returns (train, eval).

    `eval_split_size` 0 means no eval items; 0 < x < 1 a fraction (rounded, at least 1); x >= 1 a
    whole number of items. Which items are held out is a seeded shuffle (`random.Random(seed)`);
    both parts keep the original order. Raises ValueError for a negative or fractional count >= 1,
    and DatasetError when nothing would be left to train on.
    """
    if eval_split_size < 0 or (eval_split_size >= 1 and eval_split_size != int(eval_split_size)):
        raise ValueError(f"eval_split_size must be 0, a fraction in (0, 1) or a whole count, got {eval_split_size}")
    if eval_split_size == 0:
        return list(items), []
    n_eval = max(1, round(eval_split_size * len(items))) if eval_split_size < 1 else int(eval_split_size)
    if n_eval >= len(items):
        raise DatasetError(
            f"eval_split_size={eval_split_size} holds out {n_eval} of {len(items)} records, leaving none to train on"
        )
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    held_out = set(order[:n_eval])
    train = [item for i, item in enumerate(items) if i not in held_out]
    return train, [item for i, item in enumerate(items) if i in held_out]


def load_splits(settings: Any) -> dict[str, list[list[dict]]]:
    """Messages per split: {"train": [...]} plus "eval" when there is eval data.

    Reads `settings.dataset_path`, `dataset_format`, `system_prompt`, `role_map` (see
    `parse_role_map`), `eval_dataset_path`, `eval_split_size` and `seed`. An `eval_dataset_path`
    wins: the train file is then not split and `eval_split_size` is ignored. Otherwise
    `split_records` holds out records of the train file before anything is tokenized. Raises
    DatasetError (see `load_messages`, `split_records`).
    """
    return {name: [messages for _, messages in pairs] for name, pairs in _indexed_splits(settings).items()}


def _indexed_splits(settings) -> dict[str, list[tuple[int, list[dict]]]]:
    """`load_splits` with each conversation's record index in its file (for the report)."""
    role_map = parse_role_map(settings.role_map)
    load_args = (settings.dataset_format, settings.system_prompt, role_map)
    train = _load_indexed(settings.dataset_path, *load_args)
    if settings.eval_dataset_path:
        if settings.eval_split_size:
            logger.info("eval_dataset_path is set, so eval_split_size=%s is ignored", settings.eval_split_size)
        return {"train": train, "eval": _load_indexed(settings.eval_dataset_path, *load_args)}
    train, held_out = split_records(train, settings.eval_split_size, settings.seed)
    return {"train": train, "eval": held_out} if held_out else {"train": train}


def parse_role_map(pairs: list[str]) -> dict[str, str]:
    """The `role_map` setting, ["function_call:assistant", "observation:user"], as a dict. Raises
    ValueError for a pair that is not `from:to` with to = system, user or assistant."""
    role_map = {}
    for pair in pairs:
        name, _, role = pair.partition(":")
        if not name or role not in _MESSAGE_ROLES:
            raise ValueError(f"role_map entry {pair!r}: expected from:to with to one of {_MESSAGE_ROLES}")
        role_map[name] = role
    return role_map


def held_out_prompt(messages: list[dict]) -> tuple[list[dict], str]:
    """(the conversation up to its last assistant turn, that turn's content): a prompt to generate
    from and its reference answer, e.g. for before/after samples on eval messages."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]


# --------------------------------------------------------------------------------------------
# Messages -> text segments (prompt / supervised)
# --------------------------------------------------------------------------------------------


def render(messages: list[dict], template: str, tokenizer: Any = None, add_generation_prompt: bool = False) -> str:
    """The text the model sees for `messages` under `template` (one of TEMPLATES).

    - "alpaca": Stanford Alpaca's prompt; each assistant turn is `content + eos_token` directly
      after "### Response:". A system message replaces the preamble sentence. Multi-turn rule:
      every later user turn appends "\\n\\n### Instruction:\\n{instruction}[\\n\\n### Input:\\n{input}]
      \\n\\n### Response:" and its answer + eos. The response header is part of each user turn, so
      `add_generation_prompt` changes nothing here.
    - "chatml", "phi3", "llama3": byte-identical to the official templates rendered by
      `tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`.
    - "tokenizer": `tokenizer.apply_chat_template` with the tokenizer's own chat template.

    `tokenizer` supplies bos/eos text and may be None only for "chatml". Raises ValueError for an
    unknown template, a missing tokenizer, or alpaca messages whose turns do not alternate.
    """
    if template == "tokenizer":
        return _apply_chat_template(tokenizer, messages, add_generation_prompt)
    return "".join(text for text, _ in _segments(messages, template, tokenizer, add_generation_prompt))


def _segments(
    messages: list[dict], template: str, tokenizer: Any, add_generation_prompt: bool
) -> list[tuple[str, bool]]:
    """The rendered text as (text, supervised) pieces; each assistant turn gives exactly one
    supervised piece: its content plus the token that closes the turn."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}; expected one of {TEMPLATES}")
    if template != "chatml" and tokenizer is None:
        raise ValueError(f"the {template!r} template needs a tokenizer (for its bos/eos tokens)")
    renderer = {
        "alpaca": _alpaca_segments,
        "chatml": _chatml_segments,
        "phi3": _phi3_segments,
        "llama3": _llama3_segments,
        "tokenizer": _tokenizer_segments,
    }[template]
    return renderer(messages, tokenizer, add_generation_prompt)


def _alpaca_segments(messages, tokenizer, add_generation_prompt):
    if tokenizer.eos_token is None:
        raise ValueError("the 'alpaca' template needs tokenizer.eos_token to end each answer, but it is None")
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    turns = messages[1:] if system is not None else messages
    segments, previous = [], None
    for message in turns:
        if message["role"] == "user":
            instruction, input_text = message.get("instruction", message["content"]), message.get("input", "")
            if previous is None:
                preamble = (
                    system
                    if system is not None
                    else (ALPACA_PREAMBLE_INPUT if input_text else ALPACA_PREAMBLE_NO_INPUT)
                )
                text = preamble + "\n\n"
            else:
                text = "\n\n"
            text += f"### Instruction:\n{instruction}\n\n"
            text += f"### Input:\n{input_text}\n\n" if input_text != "" else ""
            segments.append((text + "### Response:", False))
        elif message["role"] == "assistant" and previous == "user":
            segments.append((message["content"] + tokenizer.eos_token, True))
        else:
            raise ValueError(
                "the 'alpaca' template needs alternating user/assistant turns after an optional system turn, "
                f"got {message['role']!r} after {previous!r}"
            )
        previous = message["role"]
    return segments


def _chatml_segments(messages, tokenizer, add_generation_prompt):
    segments = []
    for m in messages:
        if m["role"] == "assistant":
            segments += [("<|im_start|>assistant\n", False), (m["content"] + "<|im_end|>", True), ("\n", False)]
        else:
            segments.append((f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", False))
    if add_generation_prompt:
        segments.append(("<|im_start|>assistant\n", False))
    return segments


def _phi3_segments(messages, tokenizer, add_generation_prompt):
    segments = []
    for m in messages:
        tag = f"<|{m['role']}|>\n"
        if m["role"] == "assistant":
            segments += [(tag, False), (m["content"] + "<|end|>", True), ("\n", False)]
        elif m["role"] in ("system", "user"):
            segments.append((f"{tag}{m['content']}<|end|>\n", False))
        # the official template silently skips other roles; so do we (to_messages never makes them)
    if add_generation_prompt:
        segments.append(("<|assistant|>\n", False))
    else:
        segments.append((tokenizer.eos_token or "", False))  # the official template ends with eos_token
    return segments


def _llama3_segments(messages, tokenizer, add_generation_prompt):
    segments = []
    for i, m in enumerate(messages):
        header = (
            (tokenizer.bos_token or "") if i == 0 else ""
        ) + f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n"
        body = m["content"].strip() + "<|eot_id|>"  # the official template applies jinja's `trim` == str.strip
        segments += [(header, False), (body, True)] if m["role"] == "assistant" else [(header + body, False)]
    if add_generation_prompt:
        segments.append(("<|start_header_id|>assistant<|end_header_id|>\n\n", False))
    return segments


def _apply_chat_template(tokenizer, messages, add_generation_prompt) -> str:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "the 'tokenizer' template needs a tokenizer with a chat_template; pick alpaca/chatml/phi3/llama3 instead"
        )
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]  # alpaca's extra keys stay out of jinja
    return tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=add_generation_prompt)


def _tokenizer_segments(messages, tokenizer, add_generation_prompt):
    """Assistant spans of the tokenizer's own template, found by rendering prefixes.

    For assistant turn i the span starts where `render(messages[:i], add_generation_prompt=True)`
    ends (that prefix must be a prefix of the full text) and ends right after the first special
    token that follows the turn's content, e.g. <|im_end|>, <|eot_id|>, <end_of_turn>, </s>; the
    search stops where `render(messages[:i+1])` stops agreeing with the full text. Without such a
    token the span ends there. What follows the closing token ("\\n", a final eos) is prompt.
    """
    full = _apply_chat_template(tokenizer, messages, add_generation_prompt)
    closers = _special_token_pattern(tokenizer)
    segments, position = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start, end = _assistant_span(tokenizer, messages, i, full, closers)
        segments += [(full[position:start], False), (full[start:end], True)]
        position = end
    segments.append((full[position:], False))
    return segments


def _assistant_span(tokenizer, messages, i, full, closers) -> tuple[int, int]:
    prefix = _apply_chat_template(tokenizer, messages[:i], True)
    if not full.startswith(prefix):
        raise ValueError(
            f"the tokenizer's chat template renders turn {i} differently once later turns follow, so assistant "
            "spans cannot be found by prefix rendering; use one of the hand-written templates instead"
        )
    with_turn = _apply_chat_template(tokenizer, messages[: i + 1], False)
    limit = len(prefix) + _common_prefix_length(with_turn[len(prefix) :], full[len(prefix) :])
    content = messages[i]["content"].strip()
    found = full.find(content, len(prefix), limit)
    after_content = found + len(content) if found >= 0 else len(prefix)
    closer = closers.search(full, after_content, limit) if closers else None
    return len(prefix), closer.end() if closer else limit


def _common_prefix_length(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):  # noqa: B905 (stops at the shorter on purpose)
        if x != y:
            break
        n += 1
    return n


def _special_token_pattern(tokenizer) -> re.Pattern | None:
    tokens = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    tokens |= {t for t in (tokenizer.eos_token,) if t}
    if not tokens:
        return None
    # longest first, so "<|end|>" never wins over "<|endoftext|>" at the same position
    return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))


def turn_end_token(template: str, tokenizer: Any) -> str:
    """The token that closes an assistant turn: <|im_end|> (chatml), <|end|> (phi3), <|eot_id|>
    (llama3), eos_token (alpaca); for "tokenizer", the special token that closes the assistant span
    of a probe conversation (eos_token when the template has none)."""
    if template in _TURN_END:
        return _TURN_END[template]
    if template == "alpaca":
        return tokenizer.eos_token
    if template != "tokenizer":
        raise ValueError(f"unknown prompt template {template!r}; expected one of {TEMPLATES}")
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    supervised = next(text for text, flag in _tokenizer_segments(probe, tokenizer, False) if flag)
    closers = _special_token_pattern(tokenizer)
    match = closers.search(supervised) if closers else None
    return match.group(0) if match else tokenizer.eos_token


def stop_token_ids(template: str, tokenizer: Any) -> list[int]:
    """Token ids that end generation: eos_token_id plus the turn-end token's id, deduplicated, in that
    order (e.g. llama3 -> [id(<|end_of_text|>), id(<|eot_id|>)]), for `generate(eos_token_id=...)`."""
    ids = [tokenizer.eos_token_id]
    turn_end = turn_end_token(template, tokenizer)
    if turn_end is not None:
        ids += tokenizer.encode(turn_end, add_special_tokens=False)[:1]
    return list(dict.fromkeys(i for i in ids if i is not None))


def check_template_tokens(template: str, tokenizer: Any) -> None:
    """Raise ValueError naming `template` and every special token it writes that is not a single
    token of `tokenizer` (e.g. llama3 with a tokenizer lacking <|eot_id|>), or a missing bos/eos."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}; expected one of {TEMPLATES}")
    needed = list(_TEMPLATE_TOKENS[template])
    problems = []
    for attr, templates in (("eos_token", ("alpaca", "phi3")), ("bos_token", ("llama3",))):
        if template in templates:
            if getattr(tokenizer, attr) is None:
                problems.append(f"tokenizer.{attr} is None")
            else:
                needed.append(getattr(tokenizer, attr))
    missing = [t for t in needed if len(tokenizer.encode(t, add_special_tokens=False)) != 1]
    if missing:
        problems.append(f"not single tokens in this tokenizer: {missing}")
    if template == "tokenizer" and not getattr(tokenizer, "chat_template", None):
        problems.append("the tokenizer has no chat_template")
    if problems:
        raise ValueError(f"prompt template {template!r} cannot be used with this tokenizer: " + "; ".join(problems))


# --------------------------------------------------------------------------------------------
# Messages -> one tokenized example
# --------------------------------------------------------------------------------------------


def build_sft_example(
    messages: list[dict],
    tokenizer: Any,
    template: str,
    max_seq_length: int,
    truncation_strategy: str = "truncate_prompt",
    train_on_last_turn_only: bool = False,
) -> dict | None:
    """Token ids and labels of one conversation, or None when it yields no supervised token.

    Returns `{"input_ids", "attention_mask", "labels"}`, lists of int of one length <= max_seq_length;
    labels are the input ids (unshifted, the model shifts) on supervised positions and -100 elsewhere.

    Supervised: every assistant turn's content plus the token that closes the turn (<|im_end|>
    chatml, <|end|> phi3, <|eot_id|> llama3, eos_token alpaca, see `_tokenizer_segments` for
    "tokenizer"); only the last assistant turn when `train_on_last_turn_only`. Everything else is
    -100: system and user turns, headers, and what follows the turn end ("\\n", phi3's final eos).
    The text is rendered in segments and each is tokenized alone with `add_special_tokens=False`,
    so no BOS is ever added: the ids hold exactly the BOS the template writes (llama3, maybe
    "tokenizer"), and for ordinary messages they equal `apply_chat_template(messages,
    tokenize=True)`. "alpaca" mirrors Stanford train.py, which tokenizes with the tokenizer's
    defaults: one BOS is prepended when the tokenizer adds one by default.

    Worked example, chatml, messages [user "2+2?", assistant "4"], one token per piece, positions 0-14:

        text:   <|im_start|> user \\n 2 + 2 ? <|im_end|> \\n <|im_start|> assistant \\n 4 <|im_end|> \\n
        labels: -100 x 12 (the user turn and the assistant header),    4, <|im_end|>, -100

    Truncation, when the ids are longer than max_seq_length (n). h = 1 when the ids start with a
    BOS the template wrote (llama3; alpaca's prepended BOS; "tokenizer" when its template uses
    bos_token), else 0; s = position of the first token of the last supervised span:
      - "drop": return None.
      - "truncate_prompt" (default): remove len - n tokens from the left of the context ids[h:s]
        (the BOS stays). If the context is too short for that, all of ids[h:s] goes and the rest
        is cut from the right to n tokens (the answer loses its end).
      E.g. the example above (len 15, h = 0, s = 12) with n = 10: ids[0:5] go, leaving
      "2 ? <|im_end|> \\n <|im_start|> assistant \\n 4 <|im_end|> \\n", labels -100 x 7, 4, <|im_end|>, -100.
      With n = 2: the context ids[0:12] goes and "4 <|im_end|> \\n" is cut to "4 <|im_end|>".
    An example left without a supervised token returns None (the builder counts it).

    Raises ValueError for an unknown template or strategy, max_seq_length < 1, or template tokens
    that are not single tokens (see `check_template_tokens`).
    """
    example, _ = _build_example(
        messages, tokenizer, template, max_seq_length, truncation_strategy, train_on_last_turn_only
    )
    return example


def encode_prompt(messages: list[dict], template: str, tokenizer: Any) -> list[int]:
    """Token ids of the generation prompt for `messages` (ending with a user turn), tokenized exactly
    as `build_sft_example` tokenizes training text: the template's own BOS only (alpaca: the
    tokenizer's default BOS), never a second one. Use it instead of `tokenizer(render(...))`, which
    adds another BOS to llama3 text with tokenizers that prepend one by default.
    """
    check_template_tokens(template, tokenizer)
    segments = [(text, False) for text, _ in _segments(messages, template, tokenizer, add_generation_prompt=True)]
    ids, _ = _tokenize_segments(_merge_segments(segments), tokenizer)
    return (_default_bos(tokenizer) if template == "alpaca" else []) + ids


def _build_example(messages, tokenizer, template, max_seq_length, truncation_strategy, train_on_last_turn_only):
    """(example or None, status) with status "kept", "truncated", "dropped_too_long" or "dropped_no_supervised"."""
    if truncation_strategy not in TRUNCATION_STRATEGIES:
        raise ValueError(
            f"unknown truncation_strategy {truncation_strategy!r}; expected one of {TRUNCATION_STRATEGIES}"
        )
    if max_seq_length < 1:
        raise ValueError(f"max_seq_length must be >= 1, got {max_seq_length}")
    check_template_tokens(template, tokenizer)
    segments = _segments(messages, template, tokenizer, add_generation_prompt=False)
    if train_on_last_turn_only:
        last = max(i for i, (_, flag) in enumerate(segments) if flag) if any(f for _, f in segments) else -1
        segments = [(text, i == last) for i, (text, _) in enumerate(segments)]
    ids, labels = _tokenize_segments(_merge_segments(segments), tokenizer)
    if template == "alpaca":
        bos = _default_bos(tokenizer)
        ids, labels = bos + ids, [IGNORE_INDEX] * len(bos) + labels
    status = "kept"
    if len(ids) > max_seq_length:
        if truncation_strategy == "drop":
            return None, "dropped_too_long"
        ids, labels = _truncate(ids, labels, max_seq_length, _starts_with_template_bos(ids, template, tokenizer))
        status = "truncated"
    if all(label == IGNORE_INDEX for label in labels):
        return None, "dropped_no_supervised"
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}, status


def _merge_segments(segments: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    # Neighbouring prompt pieces are tokenized together, so segment boundaries exist only where
    # supervision changes; empty pieces carry no tokens.
    merged = []
    for text, flag in segments:
        if not text:
            continue
        if merged and merged[-1][1] == flag:
            merged[-1] = (merged[-1][0] + text, flag)
        else:
            merged.append((text, flag))
    return merged


def _tokenize_segments(segments: list[tuple[str, bool]], tokenizer) -> tuple[list[int], list[int]]:
    if not segments:
        return [], []
    pieces = tokenizer([text for text, _ in segments], add_special_tokens=False)["input_ids"]
    ids, labels = [], []
    for piece, (_, supervised) in zip(pieces, segments, strict=True):
        ids += piece
        labels += piece if supervised else [IGNORE_INDEX] * len(piece)
    return ids, labels


def _default_bos(tokenizer) -> list[int]:
    """[bos_token_id] when the tokenizer prepends it by default (e.g. Llama), else []."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return [bos] if with_special[:1] == [bos] and without[:1] != [bos] else []


def _starts_with_template_bos(ids: list[int], template: str, tokenizer) -> bool:
    # Only a BOS the template wrote counts: SmolLM2's bos is <|im_start|>, which in chatml merely
    # opens the first turn and may be truncated like any other prompt token.
    writes_bos = template in ("llama3", "alpaca") or (
        template == "tokenizer" and "bos_token" in (tokenizer.chat_template or "")
    )
    return writes_bos and bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id


def _truncate(ids: list[int], labels: list[int], n: int, has_bos: bool) -> tuple[list[int], list[int]]:
    """See `build_sft_example`: drop from the left of the context after the BOS, else cut the tail."""
    h = 1 if has_bos else 0
    supervised = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    s = supervised[-1] if supervised else len(ids)
    while s > 0 and labels[s - 1] != IGNORE_INDEX:
        s -= 1  # walk back to the first token of the last supervised span
    excess = len(ids) - n
    if s - h >= excess:
        return ids[:h] + ids[h + excess :], labels[:h] + labels[h + excess :]
    return (ids[:h] + ids[s:])[:n], (labels[:h] + labels[s:])[:n]


# --------------------------------------------------------------------------------------------
# Settings -> DatasetDict (+ report)
# --------------------------------------------------------------------------------------------


@dataclass
class SplitReport:
    """Counts for one split: records = kept + dropped_too_long + dropped_no_supervised; `truncated`
    counts kept examples that were shortened; tokens and lengths are over kept examples.

    With packing (train split only; eval batches are never packed, see techniques/sft.py):
    `packed_rows` rows of at most max_seq_length tokens hold the kept examples (TRL's best-fit
    decreasing, as the trainer packs them) and `packing_efficiency` = total_tokens / (packed_rows
    * max_seq_length), the share of row slots that hold tokens. Both stay None without packing.

    `dropped` names every dropped record: "<file>: record <index in the file>: <status>: <reason>".
    """

    records: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_supervised: int = 0
    total_tokens: int = 0
    supervised_tokens: int = 0
    length_p50: int = 0
    length_p90: int = 0
    length_max: int = 0
    packed_rows: int | None = None
    packing_efficiency: float | None = None
    dropped: list[str] = field(default_factory=list)


@dataclass
class BuildReport:
    """What `build_sft_dataset` did, per split; `format()` gives a table for the log (the packing
    columns only when `packing`)."""

    template: str
    max_seq_length: int
    truncation_strategy: str
    splits: dict[str, SplitReport] = field(default_factory=dict)
    packing: bool = False

    def format(self) -> str:
        names = [f.name for f in fields(SplitReport) if f.name != "dropped"]
        if not self.packing:
            names = [n for n in names if n not in ("packed_rows", "packing_efficiency")]
        header = ["split"] + names
        rows = [[split] + [_cell(getattr(report, n)) for n in names] for split, report in self.splits.items()]
        widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
        lines = [
            f"SFT data: template={self.template}, max_seq_length={self.max_seq_length}, "
            f"truncation_strategy={self.truncation_strategy}, packing={str(self.packing).lower()}"
        ]
        for row in [header] + rows:
            lines.append(
                "  ".join(
                    cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
                )
            )
        for split, report in self.splits.items():
            more = len(report.dropped) - 10
            lines += [f"dropped from {split}: {line}" for line in report.dropped[:10]]
            lines += [f"dropped from {split}: ... and {more} more"] if more > 0 else []
        return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def packed_row_count(lengths: list[int], max_seq_length: int) -> int:
    """Rows that TRL's best-fit-decreasing packing (`trl.pack_dataset(..., "bfd")`, what the trainer
    runs with packing on) makes of examples with these lengths, each row <= max_seq_length tokens."""
    from trl import pack_dataset  # only packing needs it; the rest of this module is TRL-free

    if not lengths:
        return 0
    rows = datasets.Dataset.from_dict({"input_ids": [[0] * n for n in lengths]})
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a count for the report, not a step worth a progress bar
    try:
        return pack_dataset(rows, max_seq_length, "bfd").num_rows
    finally:
        if bars:
            datasets.enable_progress_bars()


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
    splits = _indexed_splits(settings)
    report = BuildReport(
        settings.prompt_template, settings.max_seq_length, settings.truncation_strategy, packing=settings.packing
    )
    built = {}
    for name, conversations in splits.items():
        source = settings.eval_dataset_path if name == "eval" and settings.eval_dataset_path else settings.dataset_path
        rows, report.splits[name] = _build_split(conversations, tokenizer, settings, source)
        if settings.packing and name == "train":
            split = report.splits[name]
            split.packed_rows = packed_row_count([len(ids) for ids in rows["input_ids"]], settings.max_seq_length)
            split.packing_efficiency = split.total_tokens / max(1, split.packed_rows * settings.max_seq_length)
        if not rows["input_ids"]:
            raise DatasetError(
                f"no {name} examples left out of {len(conversations)} records (all dropped):\n{report.format()}",
                source=source,
            )
        built[name] = datasets.Dataset.from_dict(rows, features=_FEATURES)
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


_DROP_REASONS = {
    "dropped_too_long": "longer than max_seq_length (truncation_strategy=drop)",
    "dropped_no_supervised": "no supervised token (an empty answer, or truncation left none)",
}


def _build_split(conversations, tokenizer, settings, source) -> tuple[dict[str, list], SplitReport]:
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    report = SplitReport(records=len(conversations))
    for index, messages in conversations:
        example, status = _build_example(
            messages,
            tokenizer,
            settings.prompt_template,
            settings.max_seq_length,
            settings.truncation_strategy,
            settings.train_on_last_turn_only,
        )
        if example is None:
            setattr(report, status, getattr(report, status) + 1)
            report.dropped.append(f"{source}: record {index}: {status}: {_DROP_REASONS[status]}")
            continue
        report.kept += 1
        report.truncated += int(status == "truncated")
        for key in rows:
            rows[key].append(example[key])
    lengths = sorted(len(ids) for ids in rows["input_ids"])
    report.total_tokens = sum(lengths)
    report.supervised_tokens = sum(sum(label != IGNORE_INDEX for label in labels) for labels in rows["labels"])
    report.length_p50, report.length_p90 = _percentile(lengths, 0.5), _percentile(lengths, 0.9)
    report.length_max = lengths[-1] if lengths else 0
    return rows, report


def _percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile (an actual example length, no interpolation)."""
    if not sorted_values:
        return 0
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


# --------------------------------------------------------------------------------------------
# Preference pairs (DPO): prompt and completion as separately tokenized segments
# --------------------------------------------------------------------------------------------


def encode_prompt_completion(messages: list[dict], template: str, tokenizer: Any) -> tuple[list[int], list[int]]:
    """(prompt_ids, completion_ids) of a conversation whose last turn is the assistant's, for DPO.

    prompt_ids is `encode_prompt(messages[:-1], template, tokenizer)`: every earlier turn plus the
    template's assistant header, exactly what generation is given. completion_ids is the last
    assistant turn's supervised segment as `build_sft_example` supervises it (content + turn-end
    token), tokenized on its own with `add_special_tokens=False`; what the template writes after
    the turn end ("\\n", phi3's final eos) is left out. The two are never tokenized together, so a
    prompt ending in "A: " keeps its own ids whether the answer is "46" or "$46".

    Worked example, chatml, [user "2+2?", assistant "4"]:
        prompt:     <|im_start|>user\\n2+2?<|im_end|>\\n<|im_start|>assistant\\n
        completion: 4<|im_end|>

    Raises ValueError when the last turn is not the assistant's, for template tokens missing from
    the tokenizer, or when the template renders the prompt alone differently from the text before
    the answer (a "tokenizer" chat template that does so cannot be split by construction).
    """
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("a prompt/completion pair needs a conversation that ends with an assistant turn")
    check_template_tokens(template, tokenizer)
    segments = _segments(messages, template, tokenizer, add_generation_prompt=False)
    last = max(i for i, (_, supervised) in enumerate(segments) if supervised)
    before = "".join(text for text, _ in segments[:last])
    prompt = "".join(text for text, _ in _segments(messages[:-1], template, tokenizer, add_generation_prompt=True))
    if before != prompt:
        raise ValueError(
            f"the {template!r} template renders the prompt alone differently from the text before the answer "
            f"({prompt[-40:]!r} vs {before[-40:]!r}); use one of the hand-written templates"
        )
    completion = tokenizer(segments[last][0], add_special_tokens=False)["input_ids"]
    return encode_prompt(messages[:-1], template, tokenizer), completion


def template_bos_length(ids: list[int], template: str, tokenizer: Any) -> int:
    """1 when `ids` start with a BOS the template wrote (llama3, alpaca's default BOS, a "tokenizer"
    template using bos_token), else 0: left truncation of a prompt keeps these first ids."""
    return int(_starts_with_template_bos(ids, template, tokenizer))


# --------------------------------------------------------------------------------------------
# Chat templates to save with a trained model
# --------------------------------------------------------------------------------------------

# Our own Jinja equivalents of the renderers above (written for this project; the official
# template files are only used by tests to pin byte parity). Saved as `tokenizer.chat_template`
# next to a trained model, so servers that render with the tokenizer (vLLM, TGI, llama.cpp
# converters) format prompts the way the model was trained. Each is tested to equal `render`.
_CHAT_TEMPLATES = {
    "alpaca": (
        "{%- set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else none -%}"
        "{%- set ns = namespace(started=false) -%}"
        "{%- for m in messages -%}"
        "{%- if m['role'] == 'user' -%}"
        "{%- set instruction = m['instruction'] if m['instruction'] is defined else m['content'] -%}"
        "{%- set input = m['input'] if m['input'] is defined else '' -%}"
        "{%- if ns.started -%}{{ '\\n\\n' }}"
        "{%- elif system is not none -%}{{ system + '\\n\\n' }}"
        "{%- elif input -%}{{ '" + ALPACA_PREAMBLE_INPUT + "\\n\\n' }}"
        "{%- else -%}{{ '" + ALPACA_PREAMBLE_NO_INPUT + "\\n\\n' }}{%- endif -%}"
        "{{ '### Instruction:\\n' + instruction + '\\n\\n' }}"
        "{%- if input -%}{{ '### Input:\\n' + input + '\\n\\n' }}{%- endif -%}"
        "{{ '### Response:' }}{%- set ns.started = true -%}"
        "{%- elif m['role'] == 'assistant' -%}{{ m['content'] + eos_token }}{%- endif -%}"
        "{%- endfor -%}"
    ),
    "chatml": (
        "{%- for m in messages -%}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    ),
    "phi3": (
        "{%- for m in messages -%}{%- if m['role'] in ['system', 'user', 'assistant'] -%}"
        "{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- else -%}{{ eos_token }}{%- endif -%}"
    ),
    "llama3": (
        "{%- for m in messages -%}{%- if loop.first -%}{{ bos_token }}{%- endif -%}"
        "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
    ),
}


def chat_template_for(template: str, tokenizer: Any) -> str | None:
    """The Jinja chat template that renders like `render(..., template)`, to save with a model.

    Returns the tokenizer's own template for "tokenizer" (None when it has none). Alpaca's
    generation prompt is part of each user turn, so `add_generation_prompt` changes nothing there,
    as in `render`. Raises ValueError for an unknown template.
    """
    if template == "tokenizer":
        return tokenizer.chat_template
    if template not in _CHAT_TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}; expected one of {TEMPLATES}")
    return _CHAT_TEMPLATES[template]
