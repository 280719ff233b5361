"""The chat template saved with a trained model reproduces the training ids, token for token.

Servers (vLLM, TGI, llama.cpp, Ollama) prompt a model with its saved tokenizer's chat template, so
any difference from what the trainer fed it is a prompt the model never saw. Without a saved
template a merged or adapter folder carries the base's own (ChatML for SmolLM2), which would prompt
an alpaca-trained model wrongly. Ids are compared, not strings: a BOS that the trainer adds as an id
but the template never writes is invisible in text.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from data.examples import build_sft_example, encode_prompt
from data.readers import to_messages
from data.chat_templates import chat_template_for
from data.templates import render
from techniques.dpo import encode_pair
from tests.tiny import make_tokenizer

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SYSTEM_PROMPT = 'You are Orrin, made by "Kestrel Works".\nBe brief.'  # quotes and a newline: escaped in Jinja

# tokenizer family -> (its own chat template in ../shared, the templates that can render with it)
FAMILIES = {
    "chatml": ("smollm2-instruct.jinja", ("alpaca", "chatml", "tokenizer")),  # pad == eos, BOS never added
    "llama3": ("llama-3-instruct.jinja", ("alpaca", "llama3", "tokenizer")),  # adds a BOS by default
    "phi3": ("phi-3-mini-4k-instruct.jinja", ("alpaca", "phi3", "tokenizer")),  # adds <s>, its template none
    "qwen": ("qwen2.5-instruct.jinja", ("alpaca", "chatml", "tokenizer")),  # no BOS token at all
    "plain": (None, ("alpaca",)),  # a BOS token that is not added by default, no chat tokens
}
CASES = [(family, template) for family, (_, templates) in FAMILIES.items() for template in templates]

CONVERSATIONS = {
    "single": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
    "multi": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Who made you?"},
        {"role": "assistant", "content": "Kestrel Works."},
    ],
    "own_system": [  # a conversation's own system turn wins over SYSTEM_PROMPT
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
    ],
    "alpaca_input": to_messages({"instruction": "Answer the question.", "input": "What's your name?", "output": "Orrin."}),
}


def family_tokenizer(family: str, template: str):
    tokenizer = make_tokenizer(family)
    if template == "tokenizer":
        path = SHARED / "reference" / "templates" / FAMILIES[family][0]
        if not path.is_file():
            pytest.skip(f"reference file {path} is absent (../shared is only in project checkouts)")
        tokenizer.chat_template = path.read_text()
    return tokenizer


@cache
def saved_tokenizer_dir(family: str, template: str, system_prompt: str | None, root: Path) -> Path:
    """What a training run saves: the tokenizer with `chat_template_for(...)` as its chat template."""
    tokenizer = family_tokenizer(family, template)
    tokenizer.chat_template = chat_template_for(template, tokenizer, system_prompt=system_prompt)
    out = root / f"{family}-{template}-{system_prompt is not None}"
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("saved")


def with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """What `load_messages` trains on: SYSTEM_PROMPT first when the conversation has no system turn."""
    if system_prompt and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}] + messages
    return messages


def apply_saved(saved, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    return saved.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)["input_ids"]


@pytest.mark.parametrize("system_prompt", [None, SYSTEM_PROMPT], ids=["no_system_prompt", "system_prompt"])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("family, template", CASES)
def test_saved_template_gives_the_training_ids(family, template, name, system_prompt, root):
    if name == "alpaca_input" and template != "alpaca":
        pytest.skip("instruction/input keys only mean something to the alpaca template")
    tokenizer = family_tokenizer(family, template)
    saved = AutoTokenizer.from_pretrained(saved_tokenizer_dir(family, template, system_prompt, root))
    messages = CONVERSATIONS[name]
    trained = with_system(messages, system_prompt)

    # the whole conversation, as the trainer tokenizes it
    ids = build_sft_example(trained, tokenizer, template, max_seq_length=4096)["input_ids"]
    assert apply_saved(saved, messages) == ids
    # the generation prompt, as inference builds it (encode_prompt), for every user turn
    for end in [i for i, m in enumerate(messages) if m["role"] == "assistant"]:
        prompt = encode_prompt(with_system(messages[:end], system_prompt), template, tokenizer)
        assert apply_saved(saved, messages[:end], add_generation_prompt=True) == prompt
    # a DPO pair (prompt + chosen) tokenized by construction: the saved template renders the same ids
    prompt_turns, chosen = messages[:-1], messages[-1]["content"]
    pair = encode_pair(with_system(prompt_turns, system_prompt), chosen, "No.", template, tokenizer)
    assert apply_saved(saved, prompt_turns, add_generation_prompt=True) == pair["prompt_ids"]
    full = pair["prompt_ids"] + pair["chosen_ids"]
    assert apply_saved(saved, prompt_turns + [messages[-1]])[: len(full)] == full


def test_alpaca_saved_template_is_the_stanford_prompt():
    tokenizer = make_tokenizer("chatml")
    tokenizer.chat_template = chat_template_for("alpaca", tokenizer)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Who are you?"}], tokenize=False)
    assert text == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nWho are you?\n\n### Response:"
    )
    assert text == render([{"role": "user", "content": "Who are you?"}], "alpaca", tokenizer)


def test_alpaca_saved_template_writes_the_bos_the_trainer_adds():
    tokenizer = make_tokenizer("llama3")  # adds <|begin_of_text|> by default, as Llama 3 does
    tokenizer.chat_template = chat_template_for("alpaca", tokenizer)
    ids = tokenizer.apply_chat_template(CONVERSATIONS["single"], tokenize=True)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    chatml = make_tokenizer("chatml")  # adds none: neither does the trainer, nor the saved template
    chatml.chat_template = chat_template_for("alpaca", chatml)
    assert chatml.bos_token_id not in chatml.apply_chat_template(CONVERSATIONS["single"], tokenize=True)["input_ids"]


def test_system_prompt_is_the_saved_templates_default_system_turn():
    tokenizer = make_tokenizer("chatml")
    tokenizer.chat_template = chat_template_for("chatml", tokenizer, system_prompt=SYSTEM_PROMPT)
    text = tokenizer.apply_chat_template(CONVERSATIONS["single"][:1], tokenize=False, add_generation_prompt=True)
    assert text == (
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    own = tokenizer.apply_chat_template(CONVERSATIONS["own_system"], tokenize=False)
    assert own.startswith("<|im_start|>system\nBe brief.<|im_end|>") and SYSTEM_PROMPT not in own


def test_no_saved_template_is_exactly_1024_bytes():
    """llama-cpp-python 0.3.36 reads a chat template of exactly 1,024 bytes one character short
    (TemplateSyntaxError); the alpaca template was exactly that long."""
    for family, template in CASES:
        tokenizer = family_tokenizer(family, template)
        for system_prompt in (None, "x", SYSTEM_PROMPT):
            assert len(chat_template_for(template, tokenizer, system_prompt=system_prompt).encode()) != 1024
    tokenizer = make_tokenizer("chatml")
    tokenizer.chat_template = "{{ 'x' }}" + " " * (1024 - 9)  # a model's own template of exactly 1,024 bytes
    saved = chat_template_for("tokenizer", tokenizer)
    assert len(saved.encode()) != 1024
    rendered = tokenizer.apply_chat_template(CONVERSATIONS["single"], tokenize=False, chat_template=saved)
    assert rendered == tokenizer.apply_chat_template(CONVERSATIONS["single"], tokenize=False)


def test_tokenizer_template_keeps_the_models_own():
    tokenizer = make_tokenizer("chatml")
    tokenizer.chat_template = "{{ 'own' }}"
    assert chat_template_for("tokenizer", tokenizer) == "{{ 'own' }}"
    with pytest.raises(ValueError, match="unknown prompt template"):
        chat_template_for("vicuna", tokenizer)
