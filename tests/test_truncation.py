"""Truncation at turn boundaries: whole earliest exchanges go first (system turn and tool list kept), an
answer is never trained without the prompt that led to it, and only when the last exchange alone is
too long does TRUNCATION_STRATEGY apply, counted in the report."""

from __future__ import annotations

import pytest

from data.dataset import build_sft_dataset_with_report
from data.examples import IGNORE_INDEX, build_sft_example, encode_prompt
from data.examples import build_sft_example_with_status as with_status
from tests.test_dataset import EVERY_TEMPLATE, settings, supervised_runs, tokenizer_for, write_jsonl
from tests.test_tools import CONVERSATIONS as TOOL_CONVERSATIONS
from tests.test_tools import TOOLS
from tests.tiny import make_tokenizer

DOC_EXAMPLE = [  # the worked example of build_sft_example's docstring
    {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
    {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"},
]
LONG = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Tell me a joke about cats and dogs."},
    {"role": "assistant", "content": "The quick brown fox jumps over the lazy dog."},
    {"role": "user", "content": "Another one?"},
    {"role": "assistant", "content": "Cats and dogs."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "The answer is 4."},
]


def test_docstring_worked_example():
    tokenizer = make_tokenizer("chatml")
    full = build_sft_example(DOC_EXAMPLE, tokenizer, "chatml", 64)
    last = build_sft_example(DOC_EXAMPLE[2:], tokenizer, "chatml", 64)
    assert len(full["input_ids"]) == 30 and len(last["input_ids"]) == 15
    assert with_status(DOC_EXAMPLE, tokenizer, "chatml", 20, "truncate_prompt", False) == (last, "truncated")
    assert with_status(DOC_EXAMPLE, tokenizer, "chatml", 20, "drop", False) == (last, "truncated")  # turns go first
    cut, status = with_status(DOC_EXAMPLE, tokenizer, "chatml", 10, "truncate_prompt", False)
    assert status == "truncated_mid_turn"
    assert cut["input_ids"] == last["input_ids"][5:] and cut["labels"] == last["labels"][5:]
    assert tokenizer.decode(cut["input_ids"]) == "3?<|im_end|>\n<|im_start|>assistant\n6<|im_end|>\n"
    assert with_status(DOC_EXAMPLE, tokenizer, "chatml", 10, "drop", False) == (None, "dropped_too_long")
    assert with_status(DOC_EXAMPLE, tokenizer, "chatml", 8, "truncate_prompt", False)[1] == "truncated_mid_turn"
    assert with_status(DOC_EXAMPLE, tokenizer, "chatml", 7, "truncate_prompt", False) == (None, "dropped_too_long")


def tails(messages):
    """Every conversation that dropping whole earliest exchanges can leave (system turn kept)."""
    head = messages[:1] if messages[0]["role"] == "system" else []
    starts = [i for i, m in enumerate(messages) if m["role"] == "user"]
    return [head + messages[s:] for s in starts]


@pytest.mark.parametrize("family, template", EVERY_TEMPLATE)
def test_every_length_cuts_at_a_turn_boundary_or_keeps_the_last_answer_with_its_header(family, template):
    """For every max_seq_length: the row is a whole tail of exchanges, or (mid-turn) the last answer
    whole after at least the turn end + assistant header; never a fragment of an earlier answer."""
    tokenizer = tokenizer_for(family, template)
    whole = {len(e["input_ids"]): e for e in (build_sft_example(t, tokenizer, template, 4096) for t in tails(LONG))}
    answer = supervised_runs(build_sft_example(LONG, tokenizer, template, 4096))[-1]
    probe = encode_prompt([{"role": "user", "content": "x"}], template, tokenizer)
    seen = set()
    for n in range(1, max(whole) + 1):
        example, status = with_status(LONG, tokenizer, template, n, "truncate_prompt", False)
        seen.add(status)
        if status in ("kept", "truncated"):
            assert example == whole[max(length for length in whole if length <= n)]
        elif status == "truncated_mid_turn":
            assert len(example["input_ids"]) == n and supervised_runs(example) == [answer]
            start = next(i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX)
            # at least the previous turn's end + the assistant header, as the generation prompt ends
            assert example["input_ids"][start - 3 : start] == probe[-3:]
        else:
            assert (example, status) == (None, "dropped_too_long") and n < len(answer) + len(probe)
    assert seen == {"kept", "truncated", "truncated_mid_turn", "dropped_too_long"}


@pytest.mark.parametrize("template, family", [("chatml", "chatml"), ("llama3", "llama3"), ("phi3", "phi3"), ("alpaca", "chatml")])
def test_the_system_turn_and_tool_list_stay_when_earlier_exchanges_go(template, family):
    tokenizer = make_tokenizer(family)
    messages = TOOL_CONVERSATIONS["two_exchanges"]  # system, a book lookup exchange, a timer exchange
    second = next(i for i in range(2, len(messages)) if messages[i]["role"] == "user")
    kept = build_sft_example(messages[:1] + messages[second:], tokenizer, template, 8192, tools=TOOLS)
    full = build_sft_example(messages, tokenizer, template, 8192, tools=TOOLS)
    n = len(kept["input_ids"]) + 2
    assert len(full["input_ids"]) > n
    example, status = with_status(messages, tokenizer, template, n, "truncate_prompt", False, TOOLS)
    assert (example, status) == (kept, "truncated")
    text = tokenizer.decode(example["input_ids"])
    assert "You are the library assistant." in text and "Start a kitchen timer." in text  # system + tool list
    assert "Where is Dune?" not in text  # the first exchange went whole, its call and result with it


def test_the_last_answer_is_the_last_trained_one():
    """A trailing weight-0 answer or user turn is context: the exchange to keep is the last trained one."""
    tokenizer = make_tokenizer("chatml")
    messages = DOC_EXAMPLE + [{"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye", "weight": 0}]
    kept = build_sft_example(messages[2:], tokenizer, "chatml", 64)
    assert with_status(messages, tokenizer, "chatml", len(kept["input_ids"]), "drop", False) == (kept, "truncated")
    assert supervised_runs(kept) == [tokenizer.encode("6<|im_end|>", add_special_tokens=False)]


def test_report_counts_each_case_and_names_each_drop(tmp_path):
    tokenizer = make_tokenizer("chatml")
    long_question = "Tell me a joke about cats and dogs. " * 6
    records = [
        {"messages": DOC_EXAMPLE},  # 30 tokens: fits
        {"messages": DOC_EXAMPLE + DOC_EXAMPLE},  # 60: drops whole exchanges
        {"messages": [{"role": "user", "content": long_question}, {"role": "assistant", "content": "No."}]},  # cut inside
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": long_question}]},  # answer too long
    ]
    path = write_jsonl(tmp_path / "t.jsonl", records)
    data, report = build_sft_dataset_with_report(settings(dataset_path=str(path), max_seq_length=32), tokenizer)
    train = report.splits["train"]
    assert (train.kept, train.truncated, train.truncated_mid_turn, train.dropped_too_long) == (3, 2, 1, 1)
    assert train.dropped == [
        f"{path}: record 3: dropped_too_long: its last answer alone (with the assistant header) is longer than "
        "max_seq_length, and an answer is never trained without its prompt"
    ]
    assert all(len(ids) <= 32 for ids in data["train"]["input_ids"])
    _, report = build_sft_dataset_with_report(
        settings(dataset_path=str(path), max_seq_length=32, truncation_strategy="drop"), tokenizer
    )
    train = report.splits["train"]
    assert (train.kept, train.truncated, train.truncated_mid_turn, train.dropped_too_long) == (2, 1, 0, 2)
    assert train.dropped[0] == (
        f"{path}: record 2: dropped_too_long: its last exchange alone is longer than max_seq_length "
        "(truncation_strategy=drop)"
    )
    assert "truncated_mid_turn" in report.format()


def test_no_row_starts_with_a_piece_of_an_earlier_answer():
    """The fault: left truncation kept the end of an earlier assistant turn, supervised, with no header
    and no prompt before it. Now the first supervised token of every row follows its header."""
    tokenizer = make_tokenizer("chatml")
    header = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    full = build_sft_example(LONG, tokenizer, "chatml", 4096)
    for n in range(10, len(full["input_ids"])):
        example = build_sft_example(LONG, tokenizer, "chatml", n)
        if example is None:
            continue
        for i, label in enumerate(example["labels"]):
            if label != IGNORE_INDEX and (i == 0 or example["labels"][i - 1] == IGNORE_INDEX):
                assert example["input_ids"][i - len(header) : i] == header, n
