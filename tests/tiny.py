"""Tiny tokenizers with the special tokens of real chat model families, built in-process (no hub).

`make_tokenizer(family)` returns a fresh transformers fast tokenizer around a byte-level BPE
(GPT-2 style pre-tokenizer, every byte encodable) trained on a small corpus. Training runs once per
family per session; each call wraps a new copy, so a test may set `chat_template` or other
attributes without touching other tests. No chat template is set: tests load the official ones.

Families and their special tokens (ids in this order, from 0):
- "chatml": <|im_start|> (bos), <|im_end|> (eos, also pad, as in SmolLM2's GGUF). No BOS added.
- "phi3":   <s> (bos), <|endoftext|> (eos, pad), <|system|>, <|user|>, <|assistant|>, <|end|>.
            Adds <s> with add_special_tokens=True, like the real (Llama sentencepiece) tokenizer.
- "llama3": <|begin_of_text|> (bos), <|end_of_text|> (eos), <|start_header_id|>,
            <|end_header_id|>, <|eot_id|>. Adds <|begin_of_text|> by default, like Llama 3.
- "qwen":   <|endoftext|> (pad), <|im_start|>, <|im_end|> (eos); NO bos token at all (bos_token None),
            like Qwen2.5.
- "plain":  <s> (bos), </s> (eos); no chat tokens (for "template tokens missing" tests). No BOS added.

`make_model(tokenizer)` returns a tiny random Llama (2 layers, 32 wide) sized to a tokenizer, for
tests that run, pack or toy-train a model without any files.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

FAMILIES = {
    "chatml": {
        "special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>",
        "adds_bos": False,
    },
    "phi3": {
        "special_tokens": ["<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        "bos_token": "<s>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "adds_bos": True,
    },
    "llama3": {
        "special_tokens": [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ],
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>",
        "pad_token": None,
        "adds_bos": True,
    },
    "qwen": {
        "special_tokens": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "adds_bos": False,
    },
    "plain": {
        "special_tokens": ["<s>", "</s>"],
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": None,
        "adds_bos": False,
    },
}

# Enough text that common words become single tokens; the rest falls back to bytes.
CORPUS = [
    "Below is an instruction that describes a task, paired with an input that provides further context.",
    "Write a response that appropriately completes the request.",
    "### Instruction:\n### Input:\n### Response:",
    "You are a helpful assistant. Be brief. What is two plus two? Answer: four. The answer is 4.",
    "Hello! How are you today? I am fine, thank you. Tell me a joke about cats and dogs.",
    "The quick brown fox jumps over the lazy dog. Give three tips for staying healthy.",
    "system user assistant Question: Answer: Translate the sentence into French.",
    "user\nassistant\nsystem\nuser\nassistant\n",  # role names as chat templates write them
    "Describe the process of making crepes. Mix the batter, heat the pan, pour and flip.",
]


@cache
def _trained_json(family: str, vocab_size: int, extra_corpus: tuple[str, ...] = ()) -> str:
    spec = FAMILIES[family]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=spec["special_tokens"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 4 + list(extra_corpus), trainer)
    if spec["adds_bos"]:
        bos = spec["bos_token"]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
        )
    return tokenizer.to_str()


def make_tokenizer(family: str, vocab_size: int = 500, extra_corpus: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """A fresh fast tokenizer of `family` (see module docstring); `extra_corpus` (with a larger
    `vocab_size`) makes the text of a given dataset short, e.g. for a toy training run on it."""
    spec = FAMILIES[family]
    backend = Tokenizer.from_str(_trained_json(family, vocab_size, tuple(extra_corpus)))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=spec["bos_token"],
        eos_token=spec["eos_token"],
        pad_token=spec["pad_token"],
    )


def make_model(tokenizer, attn_implementation: str = "sdpa", seed: int = 0):
    """A tiny random `LlamaForCausalLM` (fp32, eval mode; the shape of `tests.tiny_model.TINY_CONFIG`)
    over `tokenizer`'s vocabulary, with its
    bos/eos/pad ids; seeded without touching the global RNG state."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tiny_model import TINY_CONFIG  # one tiny Llama shape for every test

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        **TINY_CONFIG,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        attn_implementation=attn_implementation,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()


@contextmanager
def one_torch_thread():
    """Run tiny-model math on one thread: on a busy 2-core machine thread hand-offs cost more than the
    math itself (a 40-step toy training run takes ~0.3 s on one thread, 1-15 s on two)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
