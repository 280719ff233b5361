"""Inference: batched greedy generation equals unbatched, every stop id stops, streaming, and the
chat example (adapter folder, merged folder, one-shot, interactive) on tiny random Llamas."""

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from inference import generate_ids, generate_replies, generation_stop_ids, stream_reply
from tests.test_merge import make_adapter_dir
from tests.tiny_model import make_tiny_model_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import chat  # noqa: E402

SHORT, LONG = [5, 9], [40, 60, 80, 100, 120, 140, 160]  # prompts of 2 and 7 tokens


@pytest.fixture
def untied_dir(tmp_path):
    """Untied random weights: greedy outputs vary token to token (a tied tiny model repeats itself)."""
    return make_tiny_model_dir(tmp_path, tie_word_embeddings=False)


def test_batched_rows_equal_their_unbatched_greedy_outputs(untied_dir):
    model = AutoModelForCausalLM.from_pretrained(untied_dir)
    alone = [generate_ids(model, [ids], stop_ids=[2], pad_id=2, max_new_tokens=12)[0] for ids in (SHORT, LONG)]
    assert len(set(alone[0])) > 3 and alone[0] != alone[1]  # real, distinct continuations
    assert generate_ids(model, [SHORT, LONG], stop_ids=[2], pad_id=2, max_new_tokens=12) == alone
    assert generate_ids(model, [LONG, SHORT], stop_ids=[2], pad_id=2, max_new_tokens=12) == alone[::-1]


def always_emits(model, token_id):
    """Make `model` predict `token_id` at every position (a head with zero weight and a one-hot bias)."""
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[token_id] = 10.0
    model.lm_head = head
    return model


def test_generation_stops_on_every_stop_id(untied_dir):
    tokenizer = AutoTokenizer.from_pretrained(untied_dir)
    tokenizer.eos_token = "<|endoftext|>"  # chatml stops: eos 0 and <|im_end|> 2
    model = AutoModelForCausalLM.from_pretrained(untied_dir)
    model.generation_config.eos_token_id = [2, 7]  # e.g. a merged folder's extra stop id
    stops = generation_stop_ids(model, tokenizer, "chatml")
    assert stops == [0, 2, 7]
    conversation = [[{"role": "user", "content": "Hello world"}]]
    for stop in stops:
        always_emits(model, stop)
        assert generate_replies(model, tokenizer, conversation, "chatml", max_new_tokens=5, stop_ids=stops) == [""]
        assert generate_ids(model, [SHORT], stops, pad_id=2, max_new_tokens=5) == [[]]
    always_emits(model, 100)  # not a stop id: runs to max_new_tokens
    assert generate_ids(model, [SHORT], stops, pad_id=2, max_new_tokens=5) == [[100] * 5]


def test_streamed_reply_joins_to_the_batched_reply(untied_dir):
    model = AutoModelForCausalLM.from_pretrained(untied_dir)
    tokenizer = AutoTokenizer.from_pretrained(untied_dir)
    messages = [{"role": "user", "content": "The quick brown fox"}]
    pieces = list(stream_reply(model, tokenizer, messages, "chatml", max_new_tokens=10))
    assert len(pieces) > 1  # it really streams
    assert "".join(pieces).strip() == generate_replies(model, tokenizer, [messages], "chatml", max_new_tokens=10)[0]


def test_stream_reply_reraises_generation_errors(untied_dir):
    model = AutoModelForCausalLM.from_pretrained(untied_dir)
    tokenizer = AutoTokenizer.from_pretrained(untied_dir)
    with pytest.raises(ValueError, match="cannot be used"):  # the template's tokens are missing: no hang
        list(stream_reply(model, tokenizer, [{"role": "user", "content": "hi"}], "llama3"))


# ---------------------------------------------------------------- examples/chat.py


def merged_dir_with_settings(tmp_path, template, system_prompt=None):
    folder = make_tiny_model_dir(tmp_path, tie_word_embeddings=False, name="merged")
    (folder / "run_settings.json").write_text(json.dumps({"prompt_template": template, "system_prompt": system_prompt}))
    return folder


def test_chat_one_shot_uses_the_saved_template_and_system_prompt(tmp_path):
    folder = merged_dir_with_settings(tmp_path, "alpaca", "You are Orrin.")
    out = io.StringIO()
    [conversation] = chat.main(["--model_dir", str(folder), "--prompt", "Who are you?", "--max_new_tokens", "8"], out=out)
    assert conversation[0] == {"role": "system", "content": "You are Orrin."}
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    expected = generate_replies(model, tokenizer, [conversation[:-1]], "alpaca", max_new_tokens=8)[0]
    assert conversation[-1] == {"role": "assistant", "content": expected}
    assert "[template alpaca" in out.getvalue() and f"assistant> {expected}" in out.getvalue()


def test_chat_batch_of_prompts_equals_one_at_a_time(tmp_path):
    folder = merged_dir_with_settings(tmp_path, "chatml")
    prompts = ["Hi", "The quick brown fox jumps over the lazy dog. Hello world!"]
    argv = ["--model_dir", str(folder), "--max_new_tokens", "8"]
    batched = chat.main(argv + ["--prompt", prompts[0], "--prompt", prompts[1]], out=io.StringIO())
    alone = [chat.main(argv + ["--prompt", p], out=io.StringIO())[0] for p in prompts]
    assert batched == alone


def test_chat_interactive_keeps_the_conversation(tmp_path):
    folder = merged_dir_with_settings(tmp_path, "chatml")
    stdin = io.StringIO("Hello world\nWhat is two plus two?\n/reset\nThe answer is\n")
    first, second = chat.main(["--model_dir", str(folder), "--max_new_tokens", "6"], stdin=stdin, out=io.StringIO())
    assert [m["role"] for m in first] == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in second[:1]] == ["The answer is"] and len(second) == 2
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    expected = generate_replies(model, tokenizer, [first[:3]], "chatml", max_new_tokens=6)[0]
    assert first[3]["content"] == expected  # the second reply saw the first exchange


def test_chat_loads_base_and_template_from_an_adapter_folder(tmp_path):
    model_dir = make_tiny_model_dir(tmp_path, tie_word_embeddings=False)
    adapter_dir, live = make_adapter_dir(tmp_path, model_dir, "alpaca")
    [conversation] = chat.main(["--adapter_dir", str(adapter_dir), "--prompt", "Hello world", "--max_new_tokens", "8"],
                               out=io.StringIO())
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    expected = generate_replies(live, tokenizer, [conversation[:-1]], "alpaca", max_new_tokens=8)[0]
    assert conversation[-1]["content"] == expected


def test_chat_offers_the_tools_file_and_shows_a_tool_call(tmp_path):
    folder = merged_dir_with_settings(tmp_path, "chatml")
    tools_file = Path(__file__).resolve().parents[1] / "data" / "tool_demo_tools.json"
    out = io.StringIO()
    argv = ["--model_dir", str(folder), "--tools", str(tools_file), "--max_new_tokens", "6"]
    [conversation] = chat.main(argv + ["--prompt", "Where is Dune?"], out=out)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    tools = chat.read_tools(json.loads(tools_file.read_text()))
    expected = generate_replies(model, tokenizer, [conversation[:-1]], "chatml", max_new_tokens=6, tools=tools)[0]
    assert conversation[-1]["content"] == expected and "| tools 3]" in out.getvalue()
    assert expected != generate_replies(model, tokenizer, [conversation[:-1]], "chatml", max_new_tokens=6)[0]

    out = io.StringIO()
    reply = 'Let me look.\n<tool_call>\n{"name": "find_book", "arguments": {"title": "Dune"}}\n</tool_call>'
    assert chat.assistant_message(reply, out) == {
        "role": "assistant", "content": "Let me look.",
        "tool_calls": [{"type": "function", "function": {"name": "find_book", "arguments": {"title": "Dune"}}}],
    }
    assert out.getvalue() == '[tool call] find_book({"title": "Dune"})\n'
    stdin = io.StringIO('Where is Dune?\n/tool {"shelf": "B12"}\n')
    [conversation] = chat.main(argv, stdin=stdin, out=io.StringIO())
    assert [m["role"] for m in conversation] == ["user", "assistant", "tool", "assistant"]
    assert conversation[2]["content"] == '{"shelf": "B12"}'


def test_chat_prints_no_future_warning_and_no_redrawn_bar_into_a_pipe(tmp_path):
    """chat.py sets up logging as the training scripts do (runs.processes.setup_logging): PEFT's
    call of transformers' deprecated `is_gradient_checkpointing` warns no more, and off a terminal
    the "Loading weights" bar is off instead of redrawn with carriage returns."""
    model_dir = make_tiny_model_dir(tmp_path, tie_word_embeddings=False)
    adapter_dir, _ = make_adapter_dir(tmp_path, model_dir, "alpaca")
    script = Path(__file__).resolve().parents[1] / "examples" / "chat.py"
    result = subprocess.run([sys.executable, str(script), "--adapter_dir", str(adapter_dir), "--prompt", "hi",
                             "--max_new_tokens", "4"], capture_output=True, timeout=300)  # bytes: text mode turns \r into \n
    stdout, stderr = result.stdout.decode(errors="replace"), result.stderr.decode(errors="replace")
    assert result.returncode == 0 and "assistant> " in stdout, stderr
    assert "FutureWarning" not in stderr and "\r" not in stderr, stderr
