"""Deploy what you trained: a GGUF file for llama.cpp, Ollama and LM Studio, written by llama.cpp's own
converter and checked against the model it came from before it is reported written.

Recipe: `export_gguf(model_dir, outtype="f16")` ->
1. an adapter folder is first merged into a temporary folder (`merge_and_save_lora`, itself checked);
2. llama.cpp's `convert_hf_to_gguf.py` with its own `gguf-py` (`llama_cpp_converter`: fetched once
   from the llama-cpp-python sdist on PyPI, cached under `model_cache_dir`) writes a temporary file,
   run as a subprocess of this interpreter; k-quants then go through llama.cpp's `llama-quantize`;
3. the file is read back: its chat template must equal the one saved with the model, every stop id
   (generation config + training template) must be its eos/eot/eom id (llama.cpp's
   `gguf_new_metadata.py` sets missing ones), and its logits on a fixed chat probe, read by
   transformers through the `gguf` package, must match the source folder's (`GGUF_TOLERANCE`,
   `GGUF_MIN_TOP1`);
4. only then is it renamed to its final name, with an Ollama `Modelfile` beside it.

`export_lora_gguf(adapter_dir)` writes the adapter itself as a GGUF LoRA adapter
(`convert_lora_to_gguf.py`, the base from the run's settings) for use over a base GGUF, with the
training chat template beside it: a GGUF adapter carries none, and llama.cpp would use the base's.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from config import Settings
from data.templates import stop_token_ids
from models import DEFAULT_MODEL_CACHE_DIR, _sha256, pip_download

log = logging.getLogger(__name__)

# llama.cpp's converter as vendored in this llama-cpp-python release (llama.cpp and gguf-py of one
# version; its gguf-py is 0.19.0, like requirements.txt's gguf). The sdist is 77 MB, fetched once.
LLAMA_CPP_SDIST = "llama-cpp-python==0.3.36"
LLAMA_CPP_SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
_VENDOR_PREFIX = "llama_cpp_python-0.3.36/vendor/llama.cpp/"
_CONVERTER_PARTS = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
_CONVERTER_MARKER = "ft_kit_converter.json"
CONVERTER_TIMEOUT_S = 1800  # a 7B model in f16 takes minutes; a hung converter should not hang us forever

# Output types llama.cpp's converter writes itself, and k-quants that need llama-quantize.
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
K_QUANTS = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
# Round-trip check, unquantized types: max |logit diff| <= tolerance * max(1, largest |logit|) of the
# probe. Measured (fp32 sources): SmolLM2-135M base (largest |logit| 39): f32 0, f16 1.0e-3 x,
# bf16 7.0e-3 x; the demo adapter merged into it (|logit| 36): f16 1.1e-2 x, bf16 5.8e-2 x; a 2-layer,
# 32-wide test model: f16 1.6e-4 with |logits| < 1. About 2.6x the largest seen.
GGUF_TOLERANCE = {"f32": 1e-4, "f16": 3e-2, "bf16": 1.5e-1}
# Every type: share of probe positions whose top-1 token equals the source's. Measured on SmolLM2-135M
# base / demo merged: f16 100% / 100%, bf16 98.9% / 97.7%, q8_0 97.7% (86 of 88) / not measured.
# k-quants: not measured here (no llama-quantize).
GGUF_MIN_TOP1 = {"f32": 0.99, "f16": 0.95, "bf16": 0.9, "q8_0": 0.9, **{q: 0.7 for q in K_QUANTS}}
# The fixed probe: one conversation rendered with the model's own chat template (so template and
# special tokens are exercised), plus the last 8 ids of the vocabulary, where added tokens live.
PROBE_CONVERSATION = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "What is the capital of France? Answer in one word."},
    {"role": "assistant", "content": "Paris. It has been the capital since 987, more or less."},
    {"role": "user", "content": "Spell 42 in words, then count: 1, 2, 3."},
]
_STOP_KEYS = ("eos", "eot", "eom")  # the GGUF keys llama.cpp ends generation on: tokenizer.ggml.<key>_token_id


@dataclass
class GGUFExport:
    """What `export_gguf` / `export_lora_gguf` wrote and how it was checked."""

    path: Path
    outtype: str
    seconds: float
    modelfile: Path | None = None
    chat_template_file: Path | None = None
    chat_template_bytes: int = 0
    stop_ids: list[int] = field(default_factory=list)
    max_abs_diff: float | None = None       # unquantized types: max |logit diff| vs the source folder
    tolerance: float | None = None           # ... and what it was allowed
    top1_agreement: float | None = None      # every type: share of probe positions with the source's top-1
    probe_positions: int = 0

    def summary(self) -> str:
        """One line for a log or a script's output."""
        if self.top1_agreement is None:
            check = "tensors and metadata checked"
        else:
            check = f"top-1 agreement {self.top1_agreement:.1%} >= {GGUF_MIN_TOP1[self.outtype]:.0%}"
        if self.max_abs_diff is not None:
            check = f"max |logit diff| {self.max_abs_diff:.3g} <= {self.tolerance:.3g}, {check}"
        return (f"{self.path} ({self.outtype}, {self.path.stat().st_size / 2**20:.1f} MiB): {check} over "
                f"{self.probe_positions} probe positions; chat template {self.chat_template_bytes} bytes; "
                f"stop ids {self.stop_ids}; {self.seconds:.1f} s")


# ---------------------------------------------------------------- llama.cpp's converter


def llama_cpp_converter(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding llama.cpp's `convert_hf_to_gguf.py`, `convert_lora_to_gguf.py`, `conversion/`
    and `gguf-py/`, as vendored in the `LLAMA_CPP_SDIST` sdist; fetched with `pip download` once and
    cached as `<cache_dir>/llama.cpp-converter-<version>/` (default cache: `model_cache_dir`, i.e.
    ~/.cache/ft-kit). Built in a temporary folder and renamed into place, so an interrupted fetch
    is never mistaken for a finished one.

    Raises:
        RuntimeError: pip failed, or the sdist's sha256 is not `LLAMA_CPP_SDIST_SHA256`.
    """
    root = Path(os.path.expanduser(str(cache_dir or Settings(_env_file=None).model_cache_dir or DEFAULT_MODEL_CACHE_DIR)))
    final = root / f"llama.cpp-converter-{LLAMA_CPP_SDIST.split('==')[1]}"
    if (final / _CONVERTER_MARKER).is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f".{final.name}.partial-", dir=root) as tmp:
        download, out = Path(tmp) / "sdist", Path(tmp) / "converter"
        log.info("fetching llama.cpp's converter: pip download %s (sdist, 77 MB, once)", LLAMA_CPP_SDIST)
        pip_download(LLAMA_CPP_SDIST, download, "--no-binary", "llama-cpp-python")  # the sdist; build tools as wheels
        sdist = next(download.glob("*.tar.gz"))
        digest = _sha256(sdist)
        if digest != LLAMA_CPP_SDIST_SHA256:
            raise RuntimeError(f"{sdist.name} has sha256 {digest}, expected {LLAMA_CPP_SDIST_SHA256}")
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(_VENDOR_PREFIX)
                       and m.name[len(_VENDOR_PREFIX):].startswith(_CONVERTER_PARTS)]
            for member in members:
                member.name = member.name[len(_VENDOR_PREFIX):]
            tar.extractall(out, members=members, filter="data")
        (out / _CONVERTER_MARKER).write_text(json.dumps({"sdist": LLAMA_CPP_SDIST, "sha256": digest}) + "\n")
        try:
            os.rename(out, final)
        except OSError:
            if not (final / _CONVERTER_MARKER).is_file():  # not another process finishing first
                raise
    log.info("llama.cpp's converter cached at %s (%.1f s)", final, time.monotonic() - started)
    return final


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> str:
    """Run a llama.cpp tool; its output on success, else RuntimeError with its last lines."""
    log.info("running %s", " ".join(str(c) for c in cmd))
    try:
        proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd,
                              timeout=CONVERTER_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{what} took longer than {CONVERTER_TIMEOUT_S} s") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-8:])
        raise RuntimeError(f"{what} exited with {proc.returncode}:\n{tail}")
    return proc.stdout + proc.stderr


# ---------------------------------------------------------------- merged model -> GGUF


def export_gguf(
    model_dir: str | os.PathLike,
    output: str | os.PathLike | None = None,
    outtype: str = "f16",
    *,
    cache_dir: str | os.PathLike | None = None,
    base_model_name: str | None = None,
) -> GGUFExport:
    """Write `model_dir` as a GGUF file with llama.cpp's converter, check it, write a Modelfile beside it.

    Args:
        model_dir: a merged (or any transformers) causal LM folder; an adapter folder
            (adapter_config.json) is merged first into a temporary folder, on the base its
            run_settings.json names (QLoRA adapters onto the dequantized 4-bit weights, in fp32).
        output: the .gguf file to write (must not exist); default `<model_dir>-<outtype>.gguf`.
        outtype: f32, f16, bf16 or q8_0 (written by the converter), or a k-quant such as q4_k_m
            (converter to f16, then llama.cpp's `llama-quantize`, which must be on PATH).
        cache_dir: where llama.cpp's converter is cached; default the settings' model_cache_dir.
        base_model_name: base override for an adapter folder.
    Returns:
        A `GGUFExport`: the path, the Modelfile, and the check's numbers (for f32/f16/bf16 the max
        |logit diff| and its tolerance, for quantized types the top-1 agreement on the probe).
    Raises:
        ValueError: unknown outtype; the GGUF's chat template differs from the saved one; a stop id
            cannot be recorded; the logits differ beyond `GGUF_TOLERANCE` / `GGUF_MIN_TOP1`.
            Nothing is left behind.
        FileExistsError: `output` exists.  FileNotFoundError: `model_dir` is neither kind of folder.
        RuntimeError: a k-quant without `llama-quantize`; the converter or pip failed.
    """
    started = time.monotonic()
    outtype = outtype.lower()
    if outtype not in OUTTYPES + K_QUANTS:
        raise ValueError(f"outtype={outtype!r}: expected one of {', '.join(OUTTYPES + K_QUANTS)}")
    quantize = shutil.which("llama-quantize") if outtype in K_QUANTS else None
    if outtype in K_QUANTS and quantize is None:
        raise RuntimeError(f"outtype={outtype} (a k-quant) needs llama.cpp's llama-quantize binary on PATH; it was "
                           f"not found. Build it (cmake -B build && cmake --build build --target llama-quantize in a "
                           f"llama.cpp checkout) or use {', '.join(OUTTYPES)}, which need nothing more.")
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file() and not (model_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{model_dir} holds neither config.json (a model folder) nor adapter_config.json "
                                "(an adapter folder)")
    output = Path(output) if output is not None else Path(f"{model_dir}-{outtype}.gguf")
    if output.exists():
        raise FileExistsError(f"{output} exists; choose a new --output")
    output.parent.mkdir(parents=True, exist_ok=True)
    converter = llama_cpp_converter(cache_dir)

    with tempfile.TemporaryDirectory(prefix=f".{output.name}.tmp-", dir=output.parent.resolve()) as tmp:
        tmp = Path(tmp)
        source = _merged_source(model_dir, tmp / "merged", base_model_name)
        tokenizer = AutoTokenizer.from_pretrained(source)
        stops = required_stop_ids(source, tokenizer)
        written = tmp / "model.gguf"
        _run([sys.executable, converter / "convert_hf_to_gguf.py", source, "--outfile", written,
              "--outtype", "f16" if quantize else outtype], "llama.cpp's convert_hf_to_gguf.py")
        if quantize:
            _run([quantize, written, tmp / "quantized.gguf", outtype.upper()], "llama-quantize")
            written = tmp / "quantized.gguf"
        written = _record_stop_ids(written, stops, tokenizer, converter)
        report = GGUFExport(path=output, outtype=outtype, seconds=0.0, stop_ids=stops)
        check_gguf_metadata(written, tokenizer.chat_template, stops)
        _check_logits(written, source, tokenizer, report)
        report.chat_template_bytes = len((tokenizer.chat_template or "").encode())
        os.replace(written, output)
    if report.chat_template_bytes == 1024:
        log.warning("the chat template is exactly 1,024 bytes: llama-cpp-python 0.3.36 reads such a metadata string one "
                    "byte short (a TemplateSyntaxError on load); llama.cpp itself reads it whole")
    if not tokenizer.chat_template:
        log.warning("%s has no chat template: the GGUF has none, so llama.cpp and Ollama fall back to their own", model_dir)
    report.modelfile = write_modelfile(output, [tokenizer.decode([i]) for i in stops])
    report.seconds = time.monotonic() - started
    log.info("GGUF written: %s", report.summary())
    return report


def _merged_source(model_dir: Path, merged_dir: Path, base_model_name: str | None) -> Path:
    """`model_dir` itself, or an adapter folder merged into `merged_dir` (checked by the merge)."""
    if not (model_dir / "adapter_config.json").is_file():
        return model_dir
    from models import load_model, resolve_model_path
    from techniques.lora import adapter_settings, load_lora, merge_and_save_lora
    from techniques.qlora import load_4bit_model, merge_and_save_qlora

    settings = adapter_settings(model_dir, base_model_name=base_model_name)
    path = resolve_model_path(settings)
    log.info("merging the adapter %s onto %s first (into a temporary folder)", model_dir, settings.base_model_name)
    if settings.load_in_4bit:
        model = load_lora(load_4bit_model(settings, path), model_dir)
        merge_and_save_qlora(model, merged_dir, settings, None, torch.float32, adapter_dir=model_dir)
    else:
        merge_and_save_lora(load_lora(load_model(settings, path), model_dir), merged_dir, adapter_dir=model_dir)
    return merged_dir


def required_stop_ids(model_dir: str | os.PathLike, tokenizer) -> list[int]:
    """Every id that ends a reply of the model in `model_dir`: its generation_config.json eos ids
    (a merged folder holds the training template's there), then the stop ids of the template in its
    run_settings.json (eos + turn end, `data.dataset.stop_token_ids`), then the tokenizer's eos."""
    model_dir = Path(model_dir)
    ids = []
    if (model_dir / "generation_config.json").is_file():
        eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
        ids += eos if isinstance(eos, (list, tuple)) else [eos]
    if (model_dir / "run_settings.json").is_file():
        template = json.loads((model_dir / "run_settings.json").read_text()).get("prompt_template")
        ids += stop_token_ids(template, tokenizer) if template else []
    ids.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(i for i in ids if i is not None))


def gguf_metadata(gguf_path: str | os.PathLike) -> dict:
    """The GGUF file's metadata as plain Python values (strings, numbers, lists), read with `gguf`;
    the token list, scores, types and merges are left out."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    skip = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")
    return {key: item.contents() for key, item in reader.fields.items() if key not in skip}


def check_gguf_metadata(gguf_path: str | os.PathLike, chat_template: str | None, stop_ids: list[int]) -> dict:
    """Raise ValueError unless the GGUF's `tokenizer.chat_template` equals `chat_template` byte for byte
    and every id of `stop_ids` is one of its eos/eot/eom token ids; returns the metadata."""
    meta = gguf_metadata(gguf_path)
    held = meta.get("tokenizer.chat_template")
    if held != chat_template:
        got = "none" if held is None else f"{len(held.encode())} bytes"
        want = "none" if chat_template is None else f"{len(chat_template.encode())} bytes"
        raise ValueError(f"{gguf_path}: tokenizer.chat_template ({got}) differs from the saved chat template ({want})")
    recorded = {meta.get(f"tokenizer.ggml.{key}_token_id") for key in _STOP_KEYS}
    missing = [i for i in stop_ids if i not in recorded]
    if missing:
        raise ValueError(f"{gguf_path}: stop ids {missing} are not among its eos/eot/eom token ids {sorted(recorded - {None})}")
    return meta


def _record_stop_ids(gguf_path: Path, stops: list[int], tokenizer, converter: Path) -> Path:
    """Put stop ids the converter left out into the free eot/eom slots (llama.cpp's gguf_new_metadata.py);
    returns the file holding them (a rewritten copy when something was added)."""
    meta = gguf_metadata(gguf_path)
    slots = {key: meta.get(f"tokenizer.ggml.{key}_token_id") for key in _STOP_KEYS}
    missing = [i for i in stops if i not in slots.values()]
    free = [key for key, value in slots.items() if value is None]
    if not missing:
        return gguf_path
    if len(missing) > len(free):
        names = tokenizer.convert_ids_to_tokens(missing)
        raise ValueError(f"stop ids {missing} ({names}) do not fit the GGUF's free stop slots {free}: llama.cpp stops "
                         "on its eos, eot and eom ids only")
    rewritten = gguf_path.with_name("stops.gguf")
    args = [a for key, i in zip(free, missing) for a in ("--special-token-by-id", key, str(i))]
    _run([sys.executable, converter / "gguf-py" / "gguf" / "scripts" / "gguf_new_metadata.py", gguf_path, rewritten,
          *args, "--force"], "llama.cpp's gguf_new_metadata.py")
    gguf_path.unlink()
    return rewritten


@torch.no_grad()
def _check_logits(gguf_path: Path, source: Path, tokenizer, report: GGUFExport) -> None:
    """Fill `report` with the GGUF-vs-source comparison on the probe; ValueError when it fails."""
    probes = _probe_ids(tokenizer)
    reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    expected = [reference(input_ids=torch.tensor([ids])).logits[0] for ids in probes]
    del reference
    exported = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32).eval()
    got = [exported(input_ids=torch.tensor([ids])).logits[0] for ids in probes]
    expected, got = torch.cat(expected), torch.cat(got)
    report.probe_positions = expected.shape[0]
    report.top1_agreement = (expected.argmax(-1) == got.argmax(-1)).float().mean().item()
    if report.outtype in GGUF_TOLERANCE:
        report.max_abs_diff = (expected - got).abs().max().item()
        report.tolerance = GGUF_TOLERANCE[report.outtype] * max(1.0, expected.abs().max().item())
        if not report.max_abs_diff <= report.tolerance:
            raise ValueError(f"the {report.outtype} GGUF differs from {source}: max |logit diff| {report.max_abs_diff:.3g} > "
                             f"{report.tolerance:.3g} ({GGUF_TOLERANCE[report.outtype]:g} x the largest |logit|)")
    if not report.top1_agreement >= GGUF_MIN_TOP1[report.outtype]:
        raise ValueError(f"the {report.outtype} GGUF agrees with {source} on the top-1 token at only "
                         f"{report.top1_agreement:.1%} of {report.probe_positions} probe positions "
                         f"(at least {GGUF_MIN_TOP1[report.outtype]:.0%} required)")


def _probe_ids(tokenizer) -> list[list[int]]:
    """`PROBE_CONVERSATION` in the tokenizer's chat template (plain text without one), and the last 8 ids."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(PROBE_CONVERSATION, tokenize=False, add_generation_prompt=True)
    else:
        text = "\n".join(m["content"] for m in PROBE_CONVERSATION)
    vocab = len(tokenizer)
    return [tokenizer.encode(text, add_special_tokens=False), [vocab - 1 - i for i in range(8)]]


def write_modelfile(gguf_path: str | os.PathLike, stop_strings: list[str], adapter: str | os.PathLike | None = None) -> Path:
    """Write an Ollama Modelfile beside `gguf_path` (`<name>.Modelfile`): FROM the file, one
    PARAMETER stop per stop string; with `adapter`, `gguf_path` is the base and ADAPTER the LoRA GGUF.
    Ollama reads the chat template embedded in the GGUF. Returns the Modelfile's path."""
    gguf_path = Path(gguf_path)
    target = Path(adapter) if adapter is not None else gguf_path
    lines = [f"FROM {_relative(gguf_path, target.parent)}"]
    if adapter is not None:
        lines.append(f"ADAPTER ./{target.name}")
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in dict.fromkeys(stop_strings)]
    path = target.with_suffix(".Modelfile")
    path.write_text("\n".join(lines) + "\n")
    return path


def _relative(path: Path, start: Path) -> str:
    rel = os.path.relpath(path.resolve(), start.resolve())
    return rel if rel.startswith(("../", "/")) else f"./{rel}"


# ---------------------------------------------------------------- adapter -> GGUF LoRA adapter


def export_lora_gguf(
    adapter_dir: str | os.PathLike,
    output: str | os.PathLike | None = None,
    outtype: str = "f16",
    *,
    cache_dir: str | os.PathLike | None = None,
    base_model_name: str | None = None,
) -> GGUFExport:
    """Write a LoRA adapter folder as a GGUF adapter (llama.cpp's `convert_lora_to_gguf.py`) for use
    over a GGUF of its base model (`llama-cli -m base.gguf --lora adapter.gguf`, Ollama's ADAPTER).

    The base model is the one in the run's run_settings.json (or `base_model_name`), resolved to a
    local folder and passed as `--base`: adapter_config.json records only where the base was loaded
    from (often a local cache path). The training chat template is written beside the file as
    `<name>.jinja`, because a GGUF adapter carries none and llama.cpp / vLLM would otherwise use the
    base's template (`--chat-template-file` / `--chat-template`).

    Check: the file's `adapter.lora.alpha` equals the adapter's lora_alpha, and for every adapted
    module the norm ||B @ A|| of its update, read back from the file, matches the adapter's
    (rel. error <= GGUF_TOLERANCE[outtype], compared as sorted lists, so the check needs no
    name mapping and is blind to llama.cpp's q/k row permutation).

    Args:
        output: the .gguf to write (must not exist); default `<adapter_dir>-lora-<outtype>.gguf`.
        outtype: f32, f16 or bf16.
    Raises:
        ValueError: DoRA, rsLoRA or added-token adapters (llama.cpp applies plain alpha / r LoRA
            only: merge and use `export_gguf` instead); a failed check (nothing left behind).
        FileExistsError: `output` exists.  RuntimeError: the converter failed.
    """
    from models import resolve_model_path
    from techniques.lora import ADDED_ROWS_FILE, adapter_settings

    started = time.monotonic()
    adapter_dir = Path(adapter_dir)
    if outtype not in GGUF_TOLERANCE:
        raise ValueError(f"outtype={outtype!r}: a GGUF adapter is written as one of {', '.join(GGUF_TOLERANCE)}")
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{adapter_dir} holds no adapter_config.json: not a PEFT adapter folder")
    lora = json.loads(config_file.read_text())
    unsupported = [name for name, on in (("use_dora", lora.get("use_dora")), ("use_rslora", lora.get("use_rslora")),
                                         (ADDED_ROWS_FILE, (adapter_dir / ADDED_ROWS_FILE).is_file())) if on]
    if unsupported:
        raise ValueError(f"{adapter_dir}: {', '.join(unsupported)}: llama.cpp applies plain LoRA (alpha / r) only; "
                         "merge the adapter and export the merged model with export_gguf instead")
    output = Path(output) if output is not None else Path(f"{adapter_dir}-lora-{outtype}.gguf")
    if output.exists():
        raise FileExistsError(f"{output} exists; choose a new --output")
    output.parent.mkdir(parents=True, exist_ok=True)
    base = resolve_model_path(adapter_settings(adapter_dir, base_model_name=base_model_name))
    converter = llama_cpp_converter(cache_dir)
    tokenizer_dir = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else Path(base)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    with tempfile.TemporaryDirectory(prefix=f".{output.name}.tmp-", dir=output.parent.resolve()) as tmp:
        written = Path(tmp) / "adapter.gguf"
        _run([sys.executable, converter / "convert_lora_to_gguf.py", adapter_dir, "--base", base,
              "--outfile", written, "--outtype", outtype], "llama.cpp's convert_lora_to_gguf.py")
        report = GGUFExport(path=output, outtype=outtype, seconds=0.0, stop_ids=required_stop_ids(adapter_dir, tokenizer))
        _check_lora_tensors(written, adapter_dir, float(lora["lora_alpha"]), outtype)
        os.replace(written, output)
    if tokenizer.chat_template:
        report.chat_template_file = output.with_suffix(".jinja")
        report.chat_template_file.write_text(tokenizer.chat_template)
        report.chat_template_bytes = len(tokenizer.chat_template.encode())
    report.seconds = time.monotonic() - started
    log.info("GGUF adapter written: %s", report.summary())
    return report


def _check_lora_tensors(gguf_path: Path, adapter_dir: Path, lora_alpha: float, outtype: str) -> None:
    """ValueError unless the GGUF adapter holds the adapter's alpha and the same per-module ||B @ A||."""
    import gguf
    from safetensors.torch import load_file

    meta = gguf_metadata(gguf_path)
    if meta.get("general.type") != "adapter" or meta.get("adapter.type") != "lora":
        raise ValueError(f"{gguf_path}: not a LoRA adapter GGUF (general.type {meta.get('general.type')!r})")
    if abs(float(meta.get("adapter.lora.alpha", float("nan"))) - lora_alpha) > 1e-6 * max(1.0, lora_alpha):
        raise ValueError(f"{gguf_path}: adapter.lora.alpha {meta.get('adapter.lora.alpha')} != lora_alpha {lora_alpha}")
    reader = gguf.GGUFReader(str(gguf_path))
    tensors = {t.name: torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float() for t in reader.tensors}
    got = sorted(torch.linalg.matrix_norm(tensors[a.replace(".lora_a", ".lora_b")] @ tensors[a]).item()
                 for a in tensors if a.endswith(".lora_a"))
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    want = sorted(torch.linalg.matrix_norm(weights[a.replace("lora_A", "lora_B")].float() @ weights[a].float()).item()
                  for a in weights if ".lora_A." in a)
    if len(got) != len(want):
        raise ValueError(f"{gguf_path}: {len(got)} adapted modules, the adapter has {len(want)}")
    worst = max((abs(g - w) / max(w, 1e-12) for g, w in zip(got, want)), default=0.0)
    if not worst <= GGUF_TOLERANCE[outtype]:
        raise ValueError(f"{gguf_path}: a module's ||B @ A|| differs from the adapter's by {worst:.3g} (relative) > "
                         f"{GGUF_TOLERANCE[outtype]:g}")
