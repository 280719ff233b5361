"""A tiny, randomly initialised Llama-style causal LM and tokenizer for tests.

Nothing here touches the network: the tokenizer is a byte-level BPE trained
on a few sentences with the ``tokenizers`` library, and the model is a
seeded ``LlamaForCausalLM`` with a few thousand parameters. Both are saved
as a normal Hugging Face folder that ``AutoModelForCausalLM.from_pretrained``
and ``AutoTokenizer.from_pretrained`` load, so tests across the project can
exercise the real loading code in well under a second.

Usage::

    from tests.tiny_model import make_tiny_model_dir

    def test_something(tmp_path):
        model_dir = make_tiny_model_dir(tmp_path)

``write_tiny_gguf`` turns such a folder into an unquantized (F32) GGUF file
written the way llama.cpp writes Llama checkpoints, for tests of GGUF input.
``make_tiny_model_dir(tmp_path, tokenizer=make_tiny_llama_tokenizer())`` makes a
folder that llama.cpp's own converter accepts, for tests of GGUF output.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Same special tokens and ids as SmolLM2: <|endoftext|>=0, <|im_start|>=1, <|im_end|>=2.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
UNK_TOKEN = "<|endoftext|>"

# The ChatML template SmolLM2-Instruct uses, minus its default system prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! This is a tiny tokenizer for tests.",
    "user assistant system: what is two plus two? It is four.",
    "Fine-tuning a small language model with LoRA adapters.",
    "The answer is 42, and the question is unknown.",
    "Instruction: write a short poem about the sea.\nResponse: waves and salt.",
] * 4

TINY_CONFIG = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
)

_BPE_VOCAB_SIZE = 384  # 256 byte symbols + 3 specials + ~125 merges


def _build_backend_tokenizer():
    """A byte-level BPE ``tokenizers.Tokenizer`` with the ChatML specials at ids 0, 1, 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=_BPE_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return tok


# What both tiny tokenizers share: the specials' roles, the ChatML template, no BOS added.
_TOKENIZER_SETTINGS = dict(
    bos_token=BOS_TOKEN,
    eos_token=EOS_TOKEN,
    pad_token=EOS_TOKEN,
    unk_token=UNK_TOKEN,
    chat_template=CHATML_TEMPLATE,
    model_max_length=TINY_CONFIG["max_position_embeddings"],
    add_bos_token=False,
)


def make_tiny_tokenizer():
    """A ``PreTrainedTokenizerFast``: bos ``<|im_start|>``, eos = pad ``<|im_end|>``, ChatML template."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=_build_backend_tokenizer(),
        **_TOKENIZER_SETTINGS,
    )


def make_tiny_llama_tokenizer():
    """A Llama-2 style tokenizer (``LlamaTokenizer``: byte-fallback BPE over "▁"-marked text, as
    SentencePiece models are stored in ``tokenizer.json``) with the same specials, ids and ChatML
    template as ``make_tiny_tokenizer``. Its vocabulary is the specials, the 256 byte tokens and
    single characters, without merges, so text is split into characters.

    llama.cpp's converter reads this kind without a pre-tokenizer hash (its "llama" vocabulary); a
    byte-level BPE is only accepted when the hash of its tokenization is one llama.cpp knows, which a
    tokenizer trained for tests never is.
    """
    import string

    from transformers import LlamaTokenizer

    pieces = SPECIAL_TOKENS + [f"<0x{b:02X}>" for b in range(256)] + ["▁"]
    pieces += list(string.ascii_letters + string.digits + string.punctuation)
    return LlamaTokenizer(
        vocab={piece: i for i, piece in enumerate(pieces)},
        merges=[],
        **_TOKENIZER_SETTINGS,
    )


def make_tiny_model_dir(
    tmp_path,
    tie_word_embeddings: bool = True,
    vocab_size: int | None = None,
    *,
    name: str = "tiny-llama",
    seed: int = 0,
    tokenizer=None,
) -> Path:
    """Write a tiny Llama causal LM and its tokenizer into ``tmp_path / name``; return that folder.

    Args:
        tmp_path: parent folder (e.g. pytest's ``tmp_path``); created if missing.
        tie_word_embeddings: share the input embedding with the LM head (as SmolLM2 does).
        vocab_size: rows of the embedding matrix; ``None`` means exactly the tokenizer's size.
            A larger value pads the matrix (as many real checkpoints do).
        name: sub-folder name, so one test can make several models.
        seed: torch seed for the weights; the global RNG state is left untouched.
        tokenizer: the tokenizer to save (and size the model to); default ``make_tiny_tokenizer()``.

    The folder holds ``config.json``, ``model.safetensors``, ``generation_config.json`` and the
    tokenizer files (``tokenizer.json``, ``tokenizer_config.json``, chat template). Deterministic:
    the same arguments give the same weights and token ids.

    Raises:
        ValueError: if ``vocab_size`` is smaller than the tokenizer's vocabulary.
    """
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(tmp_path) / name
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = tokenizer if tokenizer is not None else make_tiny_tokenizer()
    n_tokens = len(tokenizer)
    if vocab_size is None:
        vocab_size = n_tokens
    elif vocab_size < n_tokens:
        raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer's {n_tokens} tokens")

    config = LlamaConfig(
        vocab_size=vocab_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
        **TINY_CONFIG,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _llama_cpp_permute(weights, n_head: int):
    """llama.cpp's reordering of q/k rows (rotary halves interleaved), as its converter writes them."""
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape
    )


def write_tiny_gguf(model_dir, gguf_path) -> Path:
    """Write the tiny model folder ``model_dir`` as an F32 GGUF file at ``gguf_path``; return the path.

    Follows llama.cpp's Llama layout (tensor names, permuted q/k rows, ``gpt2`` byte-level
    tokenizer metadata, chat template), so transformers' GGUF loader reads it back into the same
    model: same logits, same token ids. The LM head is written only when it is not tied.
    """
    import json

    import gguf
    from transformers import AutoTokenizer, LlamaForCausalLM

    model_dir = Path(model_dir)
    gguf_path = Path(gguf_path)
    gguf_path.parent.mkdir(parents=True, exist_ok=True)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    cfg = model.config
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads

    writer = gguf.GGUFWriter(str(gguf_path), arch="llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(cfg.hidden_size // n_head)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    # Tokenizer, as llama.cpp stores a byte-level BPE: tokens in id order, merges, control types.
    tok_json = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(cfg.vocab_size)]
    special = set(tokenizer.all_special_tokens)
    types = [
        gguf.TokenType.CONTROL if t in special else gguf.TokenType.UNUSED if t.startswith("[PAD") else gguf.TokenType.NORMAL
        for t in tokens
    ]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok_json["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(tokenizer.chat_template)

    sd = {k: v.detach().to(torch.float32).numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        writer.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.attn_q.weight", _llama_cpp_permute(sd[p + "self_attn.q_proj.weight"], n_head))
        writer.add_tensor(f"blk.{i}.attn_k.weight", _llama_cpp_permute(sd[p + "self_attn.k_proj.weight"], n_kv))
        writer.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        writer.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        writer.add_tensor("output.weight", sd["lm_head.weight"])

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return gguf_path
