"""Records -> chat messages: read data files (local or hub), check turns, split off eval records.

    load_records(path)                      -> list[dict]          (.json / .jsonl / .parquet / .csv / hub name)
    to_messages(record, fmt)                -> list[dict]          (Alpaca / ShareGPT / OpenAI messages)
    load_messages(path, fmt, ...)           -> list[list[dict]]    (every record checked before raising)
    load_splits(settings)                   -> {"train": ..., "eval": ...}

A malformed record raises DatasetError naming the file, the record index and the field.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from data.errors import ROLE_MAP_TARGETS, DatasetError, fix_hints, role_map_hint, suggest_role

logger = logging.getLogger(__name__)

FORMATS = ("auto", "alpaca", "sharegpt", "messages")
LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")

ROLES = ("system", "user", "assistant", "tool")  # the roles of messages
_SHAREGPT_ROLES = {
    "system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "function_call": "function_call", "observation": "tool", "tool": "tool",
}


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
    """One record as a list of chat messages `{"role": "system"|"user"|"assistant", "content": str}`
    (`read_record(...).messages`; see there for the formats, turn rules and errors)."""
    return read_record(record, fmt, source=source, index=index, role_map=role_map).messages


@dataclass
class Conversation:
    """One record as read: its messages, its tool list, its index in its file, and the keys the
    reader did not read.

    `tools` is the record's tool list in the form chat templates take (`tools=`): a list of
    `{"type": "function", "function": {"name", "description", "parameters"}}`, or None.
    `ignored_keys` names each unread key once, record keys by name ("label") and keys of turns by
    their list ("messages[].name"): the dataset report counts them, so nothing is dropped unseen.
    """

    messages: list[dict]
    index: int | None = None
    tools: list[dict] | None = None
    ignored_keys: tuple[str, ...] = ()


def read_record(
    record: dict,
    fmt: str | None = None,
    *,
    source: str | None = None,
    index: int | None = None,
    role_map: dict[str, str] | None = None,
) -> Conversation:
    """One record as a Conversation of chat messages `{"role", "content"}` (+ `weight`, `tool_calls`).

    Args:
        record: one row of a data file.
        fmt: None or "auto" (detect by keys, see `detect_format`), "alpaca" (`instruction`, optional
            `input`, `output`, optional `system`), "sharegpt" (`conversations` of `from`/`value`,
            optional `system`; roles system, human/user, gpt/assistant, function_call, observation)
            or "messages" (`messages` of `role`/`content`; roles system, user, assistant, tool).
            Every format may give a `tools` list. Any other key (a record's `label`, a message's
            `name`) is not read and is listed in `ignored_keys`.
        source, index: file name and record index, used in error messages (and `index` kept).
        role_map: extra roles for ShareGPT `from` and messages `role`, e.g. {"bot": "assistant"}
            (setting `role_map`); each maps to system, user, assistant, tool or function_call (a
            tool-call turn holding the JSON call), and then follows the turn rules below like any
            other turn of that role. It wins over the built-in names.

    Alpaca: the user content is `instruction` + ("\\n\\n" + input when input != ""), and the user
    message also keeps the keys `instruction` and `input` so the alpaca template can render the
    canonical with-input prompt. A non-empty `system` becomes a system message (also in ShareGPT,
    whose conversation must then not start with its own system turn).

    Tool calling, in the form transformers' chat templates take it (and `data.templates` renders):
    - an assistant message may hold `tool_calls`: [{"type": "function", "function": {"name": str,
      "arguments": dict}}] (OpenAI messages: `tool_calls` as OpenAI writes them, arguments a JSON
      string or an object, `content` may be null; ShareGPT: a `function_call` turn whose value is
      the JSON call {"name", "arguments"} or a list of them, content "");
    - a tool result is a message of role "tool" (OpenAI role `tool`, ShareGPT `observation`);
      `tool_call_id` and `name` are kept;
    - `tools`: a list (or its JSON string, as glaive / LLaMA-Factory store it) of function schemas,
      each `{"name", "description", "parameters"}` or OpenAI's `{"type": "function", "function": ...}`,
      kept in the second form; an empty list is None.

    Weights (OpenAI chat fine-tuning format; mistral-finetune, axolotl): an assistant message or
    ShareGPT gpt turn may carry `"weight": 0` (context only: rendered, never trained) or `1` (trained,
    the default); the message keeps it.

    Turn rules (checked for every format): an optional system turn, only first, and kept; then a
    user turn; the assistant answers a user turn or tool results; tool results follow an assistant
    turn with tool calls (or another result) and are followed by an assistant turn; two
    consecutive user or assistant turns (after `role_map`) are rejected, never merged or dropped:
    merge them in the data. At least one assistant turn, and the last turn is the assistant's (a
    trailing user or tool turn is answered by nothing: a record cut short). Every turn of the
    record becomes one message; roles come from the role field, never from positions.

    Raises:
        DatasetError: missing field, wrong type, unknown roles not in `role_map` (all of the record's
            at once, with the suggested ROLE_MAP as `hint`), a tool call or tool
            list that is not valid JSON of the shape above, a weight other than 0 or 1 or on a
            non-assistant turn, empty conversation, broken turn order (naming the role_map entry that
            mapped the turns, when one did), no assistant turn. The message names `source`, `index`,
            the field and, for a role, the role itself.
        ValueError: unknown `fmt`.
    """
    if fmt not in (None, *FORMATS):
        raise ValueError(f"unknown dataset format {fmt!r}; expected one of {FORMATS}")
    try:
        if not isinstance(record, dict):
            raise DatasetError(f"expected a JSON object, got {type(record).__name__}")
        fmt = detect_format(record) if fmt in (None, "auto") else fmt
        tools = read_tools(record["tools"], "tools") if "tools" in record else None
        if fmt == "alpaca":
            messages, ignored = _read_alpaca(record), _unread(record, _ALPACA_KEYS)
        else:
            key, role_key, content_key, roles, known = (
                ("conversations", "from", "value", _SHAREGPT_ROLES, _SHAREGPT_KEYS) if fmt == "sharegpt"
                else ("messages", "role", "content", {r: r for r in ROLES}, _MESSAGES_KEYS)
            )
            messages, turn_keys = _read_turns(record, key, role_key, content_key, roles, role_map or {})
            ignored = _unread(record, known) + tuple(f"{key}[].{k}" for k in turn_keys)
        return Conversation(messages, index, tools, ignored)
    except DatasetError as err:
        raise err.with_context(source, index) from None


_ALPACA_KEYS = ("instruction", "input", "output", "system", "tools")
_SHAREGPT_KEYS = ("conversations", "system", "tools")
_MESSAGES_KEYS = ("messages", "tools")
_FUNCTION_CALL = "function_call"  # ShareGPT's tool-call turn (glaive, LLaMA-Factory), read into `tool_calls`
_TURN_KEYS = {"assistant": ("tool_calls",), "tool": ("tool_call_id", "name")}  # read on turns of these roles


def _unread(obj: dict, known) -> tuple[str, ...]:
    return tuple(k for k in obj if k not in known)


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


def _read_turns(
    record: dict, key: str, role_key: str, content_key: str, roles: dict[str, str], role_map: dict[str, str]
) -> tuple[list[dict], list[str]]:
    """(messages, keys of turns that were not read, each once)."""
    turns = record.get(key)
    if turns is None:
        raise DatasetError("missing field", field=key)
    if not isinstance(turns, list):
        raise DatasetError(f"expected a list of turns, got {type(turns).__name__}", field=key)
    roles = {**roles, **role_map}
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DatasetError(f"expected an object, got {type(turn).__name__}", field=f"{key}[{i}]")
    names = [_get_str(turn, role_key, f"{key}[{i}].{role_key}") for i, turn in enumerate(turns)]
    _check_known_roles(names, roles, f"{key}[{{}}].{role_key}")
    messages, unread = [], {}
    for i, (turn, name) in enumerate(zip(turns, names, strict=True)):
        where = f"{key}[{i}]"
        messages.append(_read_turn(turn, roles[name], where, content_key))
        known = (role_key, content_key, "weight", *_TURN_KEYS.get(messages[-1]["role"], ()))
        unread.update(dict.fromkeys(_unread(turn, known)))
    system = _get_str(record, "system", "system", required=False) if key == "conversations" else ""
    if system:
        if messages and messages[0]["role"] == "system":
            raise DatasetError("a system text in both the record and its first turn; keep one", field="system")
        messages.insert(0, {"role": "system", "content": system})
    try:
        _check_turn_order(messages, f"{key}[{{}}].{role_key}", offset=int(bool(system)))
    except DatasetError as err:
        raise _with_mapping_note(err, names, role_map, f"{key}[{{}}].{role_key}") from None
    return messages, list(unread)


def _check_known_roles(names: list[str], roles: dict[str, str], field_pattern: str) -> None:
    """One error naming every unknown role of the record (and where), with the ROLE_MAP to fix it."""
    unknown = {}
    for i, name in enumerate(names):
        if name not in roles:
            unknown.setdefault(name, []).append(field_pattern.format(i))
    if unknown:
        listed = ", ".join(f"{name!r} ({', '.join(fields)})" for name, fields in unknown.items())
        suggestions = {name: suggest_role(name) for name in unknown}
        raise DatasetError(
            f"unknown role{'s' if len(unknown) > 1 else ''} {listed}; known: {', '.join(sorted(roles))}",
            field=next(iter(unknown.values()))[0],
            hint=role_map_hint(suggestions),
            roles=suggestions,
        )


def _with_mapping_note(
    err: DatasetError, names: list[str], role_map: dict[str, str], field_pattern: str
) -> DatasetError:
    """A turn-order error at a turn whose role role_map gave names the mapping: the data may be right."""
    mapped = [i for i, name in enumerate(names) if name in role_map]
    near = [i for i in mapped if err.field in (field_pattern.format(i), field_pattern.format(i + 1))]
    if not near:
        return err
    notes = ", ".join(f"turn {i} is {names[i]!r}, which role_map maps to {role_map[names[i]]!r}" for i in near)
    pairs = ",".join(f"{names[i]}:{role_map[names[i]]}" for i in near)
    return DatasetError(
        f"{err.reason} ({notes})", field=err.field,
        hint=f"check the mapping ROLE_MAP={pairs}: the turns it maps break the turn order",
    )


def _read_turn(turn: dict, role: str, where: str, content_key: str) -> dict:
    content_field = f"{where}.{content_key}"
    if role == _FUNCTION_CALL:
        calls = _read_calls(_json(_get_str(turn, content_key, content_field), content_field), content_field)
        message = {"role": "assistant", "content": "", "tool_calls": calls}
    elif role == "assistant" and turn.get("tool_calls"):
        content = _get_str(turn, content_key, content_field, required=False)  # OpenAI: null beside calls
        calls = _read_calls(turn["tool_calls"], f"{where}.tool_calls")
        message = {"role": role, "content": content, "tool_calls": calls}
    else:
        message = {"role": role, "content": _get_str(turn, content_key, content_field)}
    if turn.get("tool_calls") and message["role"] != "assistant":
        raise DatasetError(
            f"tool calls on a {role!r} turn; only assistant turns call tools", field=f"{where}.tool_calls"
        )
    if role == "tool":
        message.update({k: turn[k] for k in ("tool_call_id", "name") if k in turn})
    if "weight" in turn:
        message["weight"] = _weight(turn["weight"], message["role"], f"{where}.weight")
    return message


def _json(text: str, field_name: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        reason = f"not valid JSON ({err.msg} at character {err.pos}): {text[:60]!r}"
        raise DatasetError(reason, field=field_name) from None


def _read_calls(value: Any, field_name: str) -> list[dict]:
    """Tool calls (one call or a list; OpenAI `{"function": {...}}` or bare `{"name", "arguments"}`)
    as [{"type": "function", "function": {"name": str, "arguments": dict}}] (+ the call's `id`)."""
    calls = value if isinstance(value, list) else [value]
    if not calls:
        raise DatasetError("an empty list of tool calls", field=field_name)
    read = []
    for j, call in enumerate(calls):
        where = f"{field_name}[{j}]" if isinstance(value, list) else field_name
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise DatasetError('expected a tool call {"name": str, "arguments": {...}}', field=where)
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            arguments = _json(arguments, f"{where}.arguments")
        if not isinstance(arguments, dict):
            reason = f"tool call arguments must be a JSON object, got {type(arguments).__name__}"
            raise DatasetError(reason, field=where)
        read.append({"type": "function", "function": {"name": function["name"], "arguments": arguments}})
        if isinstance(call, dict) and "id" in call:
            read[-1]["id"] = call["id"]
    return read


def read_tools(value: Any, field_name: str = "tools") -> list[dict] | None:
    """A tool list (a list, or its JSON string) as [{"type": "function", "function": schema}], None when
    empty. Each schema needs a string `name`. Raises DatasetError naming `field_name` (and the item)."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        value = _json(value, field_name)
    if not isinstance(value, list):
        raise DatasetError(f"expected a list of function schemas, got {type(value).__name__}", field=field_name)
    tools = []
    for j, tool in enumerate(value):
        schema = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(schema, dict) or not isinstance(schema.get("name"), str):
            raise DatasetError(
                'expected a function schema {"name": str, "description", "parameters"}', field=f"{field_name}[{j}]"
            )
        tools.append({"type": "function", "function": schema})
    return tools or None


def _weight(value: Any, role: str, field_name: str) -> int:
    if role != "assistant":
        raise DatasetError(f"a weight is only read on assistant turns, this one is {role!r}", field=field_name)
    if isinstance(value, bool) or value not in (0, 1):
        raise DatasetError(
            f"weight must be 0 (context only, not trained) or 1 (trained), got {value!r}", field=field_name
        )
    return int(value)


def _check_turn_order(messages: list[dict], field_pattern: str, offset: int = 0) -> None:
    """Raise DatasetError at the first turn that breaks the rules of `read_record`; `offset` = messages
    that are not turns of the list (a record-level system text), for the field name."""
    if not messages:
        raise DatasetError("empty conversation", field=field_pattern.split("[")[0])
    previous = None
    for i, message in enumerate(messages):
        role, where = message["role"], field_pattern.format(i - offset)
        if role == "system" and i > 0:
            raise DatasetError("a system turn is only allowed as the first turn", field=where)
        if role in ("assistant", "tool") and previous in (None, "system"):
            raise DatasetError(
                "the conversation must start with a user turn (after an optional system turn)", field=where
            )
        if role == "tool" and not (previous == "tool" or messages[i - 1].get("tool_calls")):
            raise DatasetError("a tool result must follow an assistant turn with tool calls", field=where)
        if previous == "tool" and role not in ("tool", "assistant"):
            raise DatasetError(f"tool results must be followed by the assistant's turn, not {role!r}", field=where)
        if role == previous and role != "tool":
            raise DatasetError(
                f"two consecutive {role!r} turns ({i - 1 - offset} and {i - offset}); merge them in the data",
                field=where,
            )
        previous = role
    if not any(m["role"] == "assistant" for m in messages):
        raise DatasetError("no assistant turn, nothing to train on", field=field_pattern.split("[")[0])
    if messages[-1]["role"] != "assistant":
        raise DatasetError(f"the conversation ends with a {messages[-1]['role']!r} turn that nothing answers (a record "
                           "cut short?): end it with the assistant's answer, or remove that turn",
                           field=field_pattern.format(len(messages) - 1 - offset))


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
    """The messages of `load_conversations(path, fmt, system_prompt, role_map)`."""
    return [conversation.messages for conversation in load_conversations(path, fmt, system_prompt, role_map)]


def load_conversations(
    path: str | Path, fmt: str = "auto", system_prompt: str | None = None, role_map: dict[str, str] | None = None
) -> list[Conversation]:
    """`read_record` of every record in `path` (with `role_map`); `system_prompt`, when set, is
    prepended as a system message to conversations that have none.

    Every record is checked before anything is raised. One malformed record raises its own
    DatasetError (file, record index, field); several raise one DatasetError that lists them (the
    first 10 in full) and keeps them all in its `problems` attribute.
    """
    conversations, problems = [], []
    for index, record in enumerate(load_records(path)):
        try:
            conversation = read_record(record, fmt, source=str(path), index=index, role_map=role_map)
        except DatasetError as err:
            problems.append(err)
            continue
        if system_prompt and conversation.messages[0]["role"] != "system":
            conversation.messages.insert(0, {"role": "system", "content": system_prompt})
        conversations.append(conversation)
    if len(problems) == 1:
        raise problems[0]
    if problems:
        lines = [f"  {p}" for p in problems[:10]] + (
            [f"  ... and {len(problems) - 10} more"] if len(problems) > 10 else []
        )
        hint = "\n  fix: ".join(fix_hints(problems)) or None  # one ROLE_MAP for the unknown roles of every record
        error = DatasetError(f"{len(problems)} malformed records:\n" + "\n".join(lines), source=str(path), hint=hint)
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
    splits = load_conversation_splits(settings)
    return {name: [conversation.messages for conversation in split] for name, split in splits.items()}


def load_conversation_splits(settings: Any) -> dict[str, list[Conversation]]:
    """`load_splits` as Conversations: with each record's index in its file and its unread keys."""
    role_map = parse_role_map(settings.role_map)
    load_args = (settings.dataset_format, settings.system_prompt, role_map)
    train = load_conversations(settings.dataset_path, *load_args)
    if settings.eval_dataset_path:
        if settings.eval_split_size:
            logger.info("eval_dataset_path is set, so eval_split_size=%s is ignored", settings.eval_split_size)
        return {"train": train, "eval": load_conversations(settings.eval_dataset_path, *load_args)}
    train, held_out = split_records(train, settings.eval_split_size, settings.seed)
    return {"train": train, "eval": held_out} if held_out else {"train": train}


def parse_role_map(pairs: list[str]) -> dict[str, str]:
    """The `role_map` setting, ["bot:assistant", "tool_response:tool"], as a dict. Raises ValueError
    for a pair that is not `from:to` with to one of ROLE_MAP_TARGETS (function_call: a tool-call turn
    whose text is the JSON call, as ShareGPT's function_call)."""
    role_map = {}
    for pair in pairs:
        name, _, role = pair.partition(":")
        if not name or role not in ROLE_MAP_TARGETS:
            raise ValueError(f"role_map entry {pair!r}: expected from:to with to one of {ROLE_MAP_TARGETS}")
        role_map[name] = role
    return role_map


def held_out_prompt(messages: list[dict]) -> tuple[list[dict], str]:
    """(the conversation up to its last assistant turn, that turn's content): a prompt to generate
    from and its reference answer, e.g. for before/after samples on eval messages."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]

