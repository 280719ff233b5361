"""One settings object for every run: defaults < recipe YAML < `.env` < environment < command-line flags.

Every field's env name is the field name upper-cased (`LORA_R`), its flag is the field name
(`--lora_r 32`, also `--lora-r 32`), its recipe key is the field name (`lora_r: 32`). The
`description=` of each field is the single source of truth for `--help`, for `.env.example` (a
test keeps them in sync) and for the run config saved beside the model.

    from config import get_settings
    settings = get_settings()                       # .env + environment + sys.argv
    settings = get_settings(["--max_steps", "10"])  # explicit flags, e.g. in a notebook
    settings = get_settings(["--config", "recipes/cpu_demo.yaml", "--max_steps", "10"])  # a recipe, one flag over it

A recipe (`--config recipe.yaml`, see recipes/) is a flat YAML mapping of field names to values,
read through pydantic-settings' YAML source: it replaces the defaults and is itself overridden by
`.env`, the environment and flags, in that order. A key that is not a setting is an error naming
it (a typo would otherwise silently train with the default); so is `hf_token` (a recipe is meant
to be shared: keep the token in the environment or `.env`).

Fields are grouped by what reads them (`ModelSettings`, `LoraSettings`, ...). `Settings` is flat
(so env names stay short and unprefixed) and inherits every group, so a technique function that
takes `LoraSettings` accepts the whole `Settings` too.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import json
import os
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence

import yaml
from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict, YamlConfigSettingsSource

REPO_ROOT = Path(__file__).resolve().parent
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
TEMPLATES = ("alpaca", "chatml", "phi3", "llama3", "tokenizer")
DATASET_FORMATS = ("auto", "alpaca", "sharegpt", "messages")
PRECISIONS = ("bf16", "fp16", "no")
COMPUTE_DTYPES = ("auto", "bfloat16", "float16", "float32")
# transformers' SchedulerType names that run without lr_scheduler_kwargs (cosine_with_min_lr needs a
# min_lr, reduce_lr_on_plateau an eval metric, warmup_stable_decay its decay steps).
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt")
# Settings a folder's saved run_settings.json must never switch on: they decide whether code or
# pickles from disk or the hub get executed, so only the user's own settings for this run may.
SECURITY_FIELDS = ("trust_remote_code", "allow_pickle_weights")
# Env-name prefixes only ft-kit uses: an environment variable with one of them that names no
# setting is a typo (LORA_ALHPA), rejected like an unknown .env line.
OWN_ENV_PREFIXES = ("LORA_", "BNB_4BIT_", "DPO_", "LLRD_")
# REPORT_TO name -> the package its transformers callback needs (pip install <package>).
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}


class ModelSettings(BaseModel):
    base_model_name: str = Field(
        DEFAULT_MODEL_ID,
        description="Base model: a hub id, a local HF model folder, or a local .gguf file. "
        "The default also works offline (a dequantized Q4_1 GGUF copy from PyPI).",
    )
    hf_token: SecretStr | None = Field(
        None, description="Hub token for gated models. Secret: never printed, logged or saved."
    )
    model_cache_dir: str = Field(
        "~/.cache/ft-kit", description="Where converted models (GGUF -> HF folder) are cached."
    )
    trust_remote_code: bool = Field(
        False, description="Allow model code from the hub repo. Only from your own settings: a saved run_settings.json never turns it on."
    )
    allow_pickle_weights: bool = Field(
        False, description="Also load pickle weights (pytorch_model*.bin), which can run code when loaded; "
        "default: safetensors only. Never read from a saved run_settings.json.",
    )
    attn_implementation: str = Field(
        "sdpa_varlen", description="Attention kernel: sdpa_varlen (torch sdpa, once per example of a padding-free "
        "or packed row, plain sdpa otherwise; bench: 1.34x over sdpa with padding_free), sdpa (one dense mask over a "
        "padding-free row), eager, or flash_attention_2 (GPU only).",
    )


class LoraSettings(BaseModel):
    lora_r: int = Field(16, ge=1, description="LoRA rank; higher learns more and costs more memory.")
    lora_alpha: float = Field(32, gt=0, allow_inf_nan=False, description="LoRA scale numerator: the update is (alpha / r) * B @ A.")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input, in [0, 1); 0 (the default) lets PEFT skip a copy of every adapted input (bench: 1.22x).")
    lora_target_modules: Annotated[list[str], NoDecode] = Field(
        ["all-linear"],
        description="Comma-separated module names to adapt (q_proj,v_proj), or all-linear "
        "(every linear layer but the output head).",
    )
    lora_bias: Literal["none", "all", "lora_only"] = Field(
        "none", description="Which biases to train: none, all, or lora_only."
    )
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA); slower, sometimes better.")
    use_rslora: bool = Field(False, description="Rank-stabilised scale alpha / sqrt(r) instead of alpha / r.")

    @field_validator("lora_target_modules", mode="before")
    @classmethod
    def _split_modules(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [name.strip() for name in value.split(",") if name.strip()]
        if not value:
            raise ValueError("give module names (q_proj,v_proj) or all-linear")
        return value


class QLoraSettings(BaseModel):
    load_in_4bit: bool = Field(False, description="QLoRA: load the base in 4 bit (bitsandbytes) and train LoRA on top.")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type: nf4 or fp4.")
    bnb_4bit_use_double_quant: bool = Field(True, description="Also quantize the quantization constants (saves ~0.4 bit/param).")
    bnb_4bit_compute_dtype: str = Field(
        "auto", description="Matmul dtype for 4-bit layers: auto (bf16 where supported, else fp32), bfloat16, float16, float32."
    )
    bnb_4bit_quant_storage: Literal["auto", "uint8", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Storage dtype of the packed 4-bit weights: auto (uint8; the compute dtype under FSDP, "
        "which needs it), uint8, bfloat16, float16, float32.",
    )


    @field_validator("load_in_4bit")
    @classmethod
    def _needs_bitsandbytes(cls, value: bool) -> bool:
        if value:
            try:
                import bitsandbytes  # noqa: F401
            except Exception as exc:  # ImportError or a broken native library: both mean no QLoRA
                raise ValueError(f"load_in_4bit=true needs a working bitsandbytes (pip install 'bitsandbytes>=0.46'): {exc}")
        return value

    @field_validator("bnb_4bit_compute_dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        if value not in COMPUTE_DTYPES:
            raise ValueError(f"must be one of {', '.join(COMPUTE_DTYPES)}")
        return value


class TrainingSettings(BaseModel):
    output_dir: str = Field("./ft-outputs", description="Where checkpoints, the final adapter and the run config go.")
    num_train_epochs: float = Field(3.0, gt=0, allow_inf_nan=False, description="Epochs over the training split (ignored when max_steps > 0).")
    max_steps: int = Field(-1, ge=-1, description="Stop after this many optimizer steps; -1 = use num_train_epochs.")
    learning_rate: float = Field(
        1e-3, gt=0, allow_inf_nan=False,
        description="Peak learning rate. LoRA takes ~10x full fine-tuning rates: 1e-3 suits small models; try 2e-4 on 7B+.",
    )
    per_device_train_batch_size: int = Field(8, ge=1, description="Micro batch size per device.")
    per_device_eval_batch_size: int = Field(8, ge=1, description="Eval batch size per device.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro batches per optimizer step.")
    warmup_steps: float = Field(0.1, ge=0, description="Linear warmup: optimizer steps (>= 1) or a ratio of all steps (< 1).")
    lr_scheduler_type: str = Field("cosine", description=f"Scheduler: {', '.join(SCHEDULERS)}.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, description="Gradient clipping norm.")
    seed: int = Field(42, description="Seed for init, shuffling and the eval split.")
    logging_steps: int = Field(5, ge=1, description="Log the training loss every N optimizer steps.")
    eval_steps: int = Field(0, ge=0, description="Evaluate every N steps; 0 = only before and after training.")
    save_steps: int = Field(0, ge=0, description="Save a checkpoint every N steps; 0 = only the final model.")
    save_total_limit: int | None = Field(
        None, ge=1, description="Keep at most this many checkpoints (oldest deleted first; the newest complete one "
        "is always kept); empty = keep all.",
    )
    resume_from_checkpoint: str | None = Field(
        None, description="Continue a run: auto (the latest complete checkpoint in output_dir; a fresh start when "
        "there is none) or a checkpoint folder; empty = start fresh.",
    )
    overwrite_output_dir: bool = Field(
        False, description="Start fresh in an output_dir that holds an earlier run (its checkpoints are deleted, "
        "its final folder replaced at the end); otherwise such a folder is refused.",
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward: less memory, ~30% slower.")
    group_by_length: bool = Field(
        False, description="SFT: batch training examples of similar length together (transformers' LengthGroupedSampler, "
        "seeded per epoch). It pads less with padding_free=false (bench: 1.49x then); padding-free batches have "
        "no padding to save, so the default is plain random batches.",
    )
    peak_flops: float | None = Field(
        None, gt=0, description="Peak FLOP/s of one device for the MFU in the logs; empty = the GPU's datasheet "
        "figure, or a short matmul measurement on a CPU.",
    )
    mixed_precision: Literal["bf16", "fp16", "no"] = Field(
        "bf16",
        description="bf16, fp16 or no (fp32). bf16 runs on a bf16 GPU and on CPUs with AVX512-BF16 or AMX "
        "(LoRA keeps its frozen weights in bf16 there); other CPUs fall back to no with a warning. fp16 needs a "
        "GPU; bf16 on a GPU without bf16 support is an error.",
    )
    use_liger_kernel: bool = Field(
        False, description="SFT on a CUDA GPU: Liger's Triton kernels (RMSNorm, RoPE, SwiGLU) patched into the model "
        "by transformers (pip install liger-kernel); an error on a CPU or without the package.",
    )
    report_to: Annotated[list[str], NoDecode] = Field(
        ["tensorboard"],
        description="Where training logs go besides metrics.jsonl: tensorboard (<output_dir>/runs), wandb, mlflow, "
        "trackio (comma-separated for several; each needs its package), or none.",
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _split_trackers(cls, value: Any) -> Any:
        names = [name.strip() for name in value.split(",") if name.strip()] if isinstance(value, str) else value
        unknown = [name for name in names if name not in (*TRACKERS, "none")]
        if unknown or not names or ("none" in names and len(names) > 1):
            raise ValueError(f"expected none, or one or more of {', '.join(TRACKERS)}; got {names}")
        return names

    @field_validator("peak_flops", mode="before")
    @classmethod
    def _empty_flops_is_none(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("max_steps")
    @classmethod
    def _steps_not_zero(cls, value: int) -> int:
        if value == 0:
            raise ValueError("must be -1 (train for num_train_epochs) or >= 1")
        return value

    @field_validator("lr_scheduler_type")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        if value not in SCHEDULERS:
            raise ValueError(f"must be one of {', '.join(SCHEDULERS)}")
        return value

    @field_validator("resume_from_checkpoint", "save_total_limit", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value == "" else value


class DataSettings(BaseModel):
    dataset_path: str = Field(
        "data/identity_demo.jsonl",
        description="Training data: a local .json/.jsonl/.parquet/.csv file or a datasets hub name.",
    )
    dataset_format: Literal["auto", "alpaca", "sharegpt", "messages"] = Field(
        "auto", description="Record format: auto, alpaca, sharegpt, or messages (OpenAI role/content)."
    )
    prompt_template: Literal["alpaca", "chatml", "phi3", "llama3", "tokenizer"] = Field(
        "alpaca", description="Prompt format: alpaca, chatml, phi3, llama3, or tokenizer (the model's own chat template)."
    )
    system_prompt: str | None = Field(None, description="System prompt added to conversations that have none.")
    max_seq_length: int = Field(512, ge=8, description="Longest example in tokens; longer ones follow truncation_strategy.")
    truncation_strategy: Literal["truncate_prompt", "drop"] = Field(
        "truncate_prompt", description="Over-long examples lose whole earliest exchanges first; when the last exchange "
        "alone is too long: truncate_prompt (cut its prompt from the left, the answer kept whole) or drop."
    )
    train_on_last_turn_only: bool = Field(False, description="Supervise only the last assistant turn of each conversation.")
    role_map: Annotated[list[str], NoDecode] = Field(
        [],
        description="Extra record roles as from:to pairs, to = system/user/assistant/tool/function_call, e.g. "
        "bot:assistant,tool_response:tool (ShareGPT 'from' and messages 'role'; function_call and "
        "observation are read as tool calls and results without it). "
        "An unmapped unknown role stops the run naming the role and record.",
    )
    packing: bool = Field(
        False,
        description="Pack examples into rows of max_seq_length (TRL best-fit packing, position ids restart per "
        "example, no cross-example attention): less padding, but a step then holds "
        "per_device_train_batch_size rows, i.e. more examples.",
    )
    padding_free: bool = Field(
        True,
        description="SFT: concatenate each batch's examples into one row without padding (TRL's padding-free "
        "collator; position ids restart per example): the same examples per step, no padding computed. "
        "Use it with attn_implementation sdpa_varlen or flash_attention_2 (bench: 1.57x over padded batches).",
    )
    eval_dataset_path: str | None = Field(None, description="Held-out eval file; when empty, eval_split_size of the training data is held out.")
    eval_split_size: float = Field(0.1, ge=0, description="Held-out share of the training data: a fraction (< 1), a record count (>= 1), or 0 for none.")

    @field_validator("eval_split_size")
    @classmethod
    def _fraction_or_count(cls, value: float) -> float:
        if value >= 1 and value != int(value):
            raise ValueError("must be 0, a fraction in (0, 1), or a whole record count")
        return value

    @field_validator("system_prompt", "eval_dataset_path", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("role_map", mode="before")
    @classmethod
    def _role_pairs(cls, value: Any) -> Any:
        pairs = [item.strip() for item in value.split(",") if item.strip()] if isinstance(value, str) else value
        targets = ("system", "user", "assistant", "tool", "function_call")
        bad = [p for p in pairs if p.count(":") != 1 or p.split(":")[1] not in targets]
        if bad:
            raise ValueError(f"expected from:to pairs with to = {', '.join(targets)}; got {bad}")
        return pairs


class FullFTSettings(BaseModel):
    """Full fine-tuning: layer-wise LR decay and differential LR groups (techniques/full_finetune.py)."""

    llrd_decay: float = Field(1.0, gt=0, le=1, description="Layer-wise LR decay: layer i of L trains at lr * llrd_decay ** (L - i); 1.0 = off.")
    embed_lr: float | None = Field(None, gt=0, description="LR of the input embeddings; empty = lr * llrd_decay ** (L + 1).")
    head_lr: float | None = Field(None, gt=0, description="LR of the output head and final norm; empty = learning_rate.")
    freeze_embeddings: bool = Field(False, description="Keep the input embeddings frozen.")
    freeze_layers: int = Field(0, ge=0, description="Keep the first k decoder layers frozen.")
    optim: str = Field("adamw_torch", description="Optimizer: adamw_torch, or adamw_8bit / paged_adamw_8bit (bitsandbytes, GPU).")

    @field_validator("optim")
    @classmethod
    def _known_optim(cls, value: str) -> str:
        known = ("adamw_torch", "adamw_8bit", "paged_adamw_8bit")  # techniques.full_finetune.OPTIMIZERS
        if value not in known:
            raise ValueError(f"must be one of {', '.join(known)}")
        return value

    @field_validator("embed_lr", "head_lr", mode="before")
    @classmethod
    def _empty_lr_is_none(cls, value: Any) -> Any:
        return None if value == "" else value


class DPOSettings(BaseModel):
    """Direct Preference Optimization through TRL's DPOTrainer (techniques/dpo.py)."""

    dpo_dataset_path: str = Field(
        "data/preference_demo.jsonl",
        description="Preference pairs: prompt/chosen/rejected (strings or messages), ShareGPT "
        "conversations + chosen + rejected, or chosen/rejected transcripts sharing their prompt.",
    )
    dpo_eval_dataset_path: str | None = Field(None, description="Held-out preference pairs; when empty, eval_split_size of dpo_dataset_path is held out.")
    dpo_policy: Literal["lora", "full"] = Field(
        "lora",
        description="What DPO trains: lora (adapters; QLoRA with load_in_4bit=true; reference = the adapter off) "
        "or full (every weight; reference = a frozen copy, or precomputed log-probs).",
    )
    sft_adapter_dir: str | None = Field(
        None, description="Start the LoRA policy from this trained SFT adapter; the reference is that adapter, frozen.",
    )
    beta: float = Field(0.1, gt=0, description="DPO temperature: how far the policy may move from the reference.")
    loss_type: str = Field("sigmoid", description="DPO loss: sigmoid (DPO), ipo, hinge, robust, or another TRL loss type.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Conservative DPO (cDPO): assumed share of flipped preference labels.")
    max_prompt_length: int = Field(256, ge=1, description="Longest prompt in tokens (cut from the left).")
    max_length: int = Field(512, ge=2, description="Longest prompt + completion in tokens.")
    precompute_ref_log_probs: bool = Field(False, description="Compute reference log-probs once before training (saves memory).")
    ref_model: str | None = Field(None, description="Reference model path; empty = the policy's own start (adapter disabled or a frozen copy).")
    rpo_alpha: float | None = Field(None, ge=0, description="Weight of an added SFT (NLL) term on chosen answers (RPO); empty = off.")

    @field_validator("ref_model", "rpo_alpha", "sft_adapter_dir", "dpo_eval_dataset_path", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("loss_type")
    @classmethod
    def _known_loss(cls, value: str) -> str:
        # TRL 1.16 DPOConfig.loss_type; "sft" alone is not preference optimization (use rpo_alpha).
        known = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
                 "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm")
        if value not in known:
            raise ValueError(f"must be one of {', '.join(known)}")
        return value


# Section name -> its settings, in the order --help and .env.example list them (a script's own
# sections come first in its --help: get_settings(sections=...)).
SECTIONS: dict[str, type[BaseModel]] = {
    "model": ModelSettings, "lora": LoraSettings, "qlora": QLoraSettings, "training": TrainingSettings,
    "data": DataSettings, "full_ft": FullFTSettings, "dpo": DPOSettings,
}
GROUPS: tuple[type[BaseModel], ...] = tuple(SECTIONS.values())

# The recipe file of the Settings being built by get_settings; read by Settings.settings_customise_sources
# (pydantic-settings gives a source no other way to learn a path chosen at run time). Set only for
# the duration of one get_settings call.
_RECIPE: ContextVar[Path | None] = ContextVar("recipe", default=None)


class RecipeError(ValueError):
    """A recipe file that cannot be used: missing, not YAML, not a mapping, unknown keys, or a secret in it."""


class RecipeSource(YamlConfigSettingsSource):
    """pydantic-settings' YAML source for one recipe file, refusing what it would silently ignore.

    Raises RecipeError naming the file and each key that is not a setting (with the closest
    setting names), `hf_token` (secrets stay out of shareable files), a missing file (the YAML
    source skips missing files) or YAML that is not a mapping.
    """

    def __init__(self, settings_cls: type[BaseSettings], recipe: Path):
        if not recipe.is_file():
            raise RecipeError(f"recipe {recipe}: no such file")
        try:
            data = yaml.safe_load(recipe.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise RecipeError(f"recipe {recipe}: not valid YAML: {err}") from None
        if data is not None and not isinstance(data, dict):
            raise RecipeError(f"recipe {recipe}: expected a mapping of setting names to values, got {type(data).__name__}")
        fields = settings_cls.model_fields
        problems = [f"{key!r} is not a setting" + _closest(str(key), fields) for key in data or {} if key not in fields]
        problems += [f"{key!r} is a secret: set {key.upper()} in the environment or .env, not in a shareable recipe"
                     for key in data or {} if key in SECRET_FIELDS]
        if problems:
            raise RecipeError(f"recipe {recipe}: " + "; ".join(problems))
        super().__init__(settings_cls, yaml_file=recipe)


def _closest(name: str, names) -> str:
    close = difflib.get_close_matches(name.lower(), list(names), n=1, cutoff=0.6)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


# Bases in reverse order: pydantic lists inherited fields from the last base first, so --help
# and .env.example read model, lora, qlora, training, data.
class Settings(
    DPOSettings, FullFTSettings, DataSettings, TrainingSettings, QLoraSettings, LoraSettings, ModelSettings, BaseSettings
):
    """All settings of a run. See the module docstring for sources and names.

    Raises pydantic.ValidationError naming every invalid field at once (bounds are `Field`
    constraints and field validators, which pydantic checks all together).
    """

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", case_sensitive=False,
        extra="forbid",  # an unknown .env line (or keyword) is an error naming it, not silently ignored
        env_ignore_empty=True,  # `KEY=` in a copied .env.example means "the default"
        validate_default=True, hide_input_in_errors=True,
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Highest first: flags (init keywords), environment, .env, the recipe; the defaults come
        # last. pydantic-settings ignores unknown environment variables (the environment holds many
        # that are not ours); _MisspelledEnv hands over those with an ft-kit prefix, which
        # extra="forbid" then rejects by name.
        recipe = _RECIPE.get()
        recipe_source = (RecipeSource(settings_cls, recipe),) if recipe is not None else ()
        return init_settings, env_settings, dotenv_settings, *recipe_source, file_secret_settings, _MisspelledEnv(settings_cls)

    def to_saved_dict(self) -> dict[str, Any]:
        """Every setting as JSON-ready values, secrets (`SECRET_FIELDS`) removed: they never leave memory."""
        return self.model_dump(mode="json", exclude=set(SECRET_FIELDS))


class _MisspelledEnv(PydanticBaseSettingsSource):
    """Environment variables named like ft-kit settings (`OWN_ENV_PREFIXES`) that name none."""

    def get_field_value(self, field, field_name):  # required by the base class; unused by __call__
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        known = set(self.settings_cls.model_fields)
        return {name.lower(): value for name, value in os.environ.items()
                if name.upper().startswith(OWN_ENV_PREFIXES) and name.lower() not in known and value != ""}


#: Settings holding secrets: every `*_token` / `*_key` field. They are `SecretStr` (printed as
#: '**********'), never saved, never shown as a default; tests/test_config.py checks the types.
SECRET_FIELDS = tuple(name for name in Settings.model_fields if name.endswith(("_token", "_key")))


def format_settings_error(err: ValidationError) -> str:
    """One line per invalid setting: its flag and env name and what is wrong; an unknown name in
    `.env` or the environment with the closest setting name, e.g.

        invalid settings (flag / env name):
          --lora_r / LORA_R: Input should be greater than or equal to 1
          LORA_RANK (.env): not a setting; did you mean LORA_R?
    """
    import difflib

    lines = []
    for e in err.errors():
        if not e["loc"]:
            lines.append(e["msg"])
            continue
        name = str(e["loc"][0])
        if e["type"] == "extra_forbidden":
            # pydantic-settings reports unknown .env keys; of the environment only _MisspelledEnv's
            in_env = name.upper().startswith(OWN_ENV_PREFIXES) and any(k.lower() == name for k in os.environ)
            where = "environment" if in_env else ".env"
            close = difflib.get_close_matches(name, list(Settings.model_fields), n=1, cutoff=0.6)
            hint = (f"did you mean {close[0].upper()}?" if close else "see --help or .env.example for every setting"
                    if where == "environment" else "a .env line sets an ft-kit setting only (export other variables "
                    "in the shell); see .env.example for every setting")
            lines.append(f"{name.upper()} ({where}): not a setting; {hint}")
        else:
            lines.append(f"--{name} / {name.upper()}: {e['msg']}")
    return "invalid settings (flag / env name):\n  " + "\n  ".join(lines)


def cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies bf16 matrices in hardware: x86 AVX512-BF16 or AMX tiles, which
    torch's CPU autocast reaches through oneDNN. A 2-core AMD EPYC (AVX512-BF16) measured 915 GFLOP/s
    in bf16 against 217 in fp32; CPUs without them emulate bf16 and run it slower than fp32.
    """
    import torch

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def check_kernels(settings: TrainingSettings) -> None:
    """Raise ValueError when `use_liger_kernel` cannot run here: Liger's kernels are Triton, so
    they need a CUDA GPU and the `liger-kernel` package (transformers would fail later, deep in
    the trainer, or not at all)."""
    import torch

    if not settings.use_liger_kernel:
        return
    if not torch.cuda.is_available():
        raise ValueError("use_liger_kernel=true needs a CUDA GPU (Liger's kernels are Triton) and none is visible; "
                         "set USE_LIGER_KERNEL=false on a CPU")
    if importlib.util.find_spec("liger_kernel") is None:
        raise ValueError("use_liger_kernel=true needs the liger-kernel package: pip install liger-kernel")


def resolve_precision(settings: TrainingSettings, warn: bool = True) -> Literal["bf16", "fp16", "no"]:
    """The mixed precision a run actually uses, after checking the hardware.

    `bf16` (the default) runs the matmuls in bf16 autocast on a bf16 GPU and on a CPU with native
    bf16 (`cpu_has_native_bf16`: 2.39x fp32 for our LoRA SFT on a 2-core EPYC, README "Performance").
    On other CPUs it falls back to `no` (fp32) with a warning (`warn=False`: silently, for an early
    check), since emulated bf16 is slower than fp32 there. Raises ValueError for `fp16` without a
    CUDA GPU (CPU autocast has no fp16: someone who asked for it expects a GPU), and for `bf16` on a
    CUDA device without bf16 support (pre-Ampere): pick fp16 there.
    """
    import logging

    import torch

    wanted = settings.mixed_precision
    if wanted == "no":
        return "no"
    if not torch.cuda.is_available():
        if wanted == "fp16":
            raise ValueError("mixed_precision=fp16 needs a CUDA GPU and none is visible; on a CPU set "
                             "MIXED_PRECISION=bf16 (CPUs with AVX512-BF16 or AMX) or no (fp32)")
        if cpu_has_native_bf16():
            return "bf16"
        if warn:
            logging.getLogger(__name__).warning(
                "mixed_precision=bf16: this CPU has no native bf16 (AVX512-BF16 or AMX), where bf16 is slower "
                "than fp32; this run trains in fp32 (mixed_precision=no)."
            )
        return "no"
    if wanted == "bf16" and not torch.cuda.is_bf16_supported():
        raise ValueError("mixed_precision=bf16: this GPU has no bf16 support; set MIXED_PRECISION=fp16 or no")
    return wanted


# ---------------------------------------------------------------- command line


def _section_of(name: str) -> str:
    return next(section for section, group in SECTIONS.items() if name in group.model_fields)


def build_parser(prog: str | None = None, sections: Sequence[str] = ()) -> argparse.ArgumentParser:
    """An argparse parser with `--config` and one flag per setting, `--name` and `--name-with-dashes`.

    `--help` lists the settings by section (model, lora, qlora, training, data, full_ft, dpo), the
    `sections` named first in their given order (a script's own), then the rest in that order.
    Flags default to "not given" so that only what the user typed overrides a recipe, `.env` and the environment.
    Raises ValueError for a section name that is not in SECTIONS.
    """
    unknown = [name for name in sections if name not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown settings sections {unknown}; known: {', '.join(SECTIONS)}")
    parser = argparse.ArgumentParser(
        prog=prog,
        usage="%(prog)s [-h] [--config RECIPE.yaml] [--SETTING VALUE ...]",
        description="Every flag is also an environment variable (upper-case name), a .env line and a recipe key. "
        "Precedence: defaults < recipe (--config) < .env < environment < flags.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument_group("recipe").add_argument(
        "--config", metavar="RECIPE.yaml", type=Path,
        help="YAML file of settings (field names as keys, see recipes/); .env, environment and flags override it.",
    )
    order = list(dict.fromkeys([*sections, *SECTIONS]))
    groups = {section: parser.add_argument_group(f"{section} settings") for section in order}
    for name, info in Settings.model_fields.items():
        default = "(none)" if info.default is None or name in SECRET_FIELDS else _env_value(info.default)
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        groups[_section_of(name)].add_argument(
            *flags, dest=name, metavar=name.upper(),
            help=f"{info.description} [default: {default}; env: {name.upper()}]".replace("%", "%%"),
        )
    return parser


def _env_value(value: Any) -> str:
    """How a default is written in .env: lists comma-joined, booleans lower-case."""
    if isinstance(value, list):
        return ",".join(value)
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def get_settings(argv: Sequence[str] | None = None, env_file: str | Path | None = ".env",
                 sections: Sequence[str] = ()) -> Settings:
    """Build `Settings` from defaults, a recipe (`--config`), `.env`, the environment and flags.

    Args:
        argv: flags to parse (`["--lora_r", "32"]`, `["--config", "recipes/cpu_demo.yaml"]`); None
            reads `sys.argv[1:]`. `--help` prints every setting with its description, default and
            env name, by section, then exits.
        env_file: the dotenv file to read (relative to the working directory); None reads none.
        sections: the sections `--help` lists first (a script's own, e.g. ("dpo", "lora")).
    Raises:
        pydantic.ValidationError listing every invalid setting at once, an unknown name in the
        `env_file` or an environment variable with an ft-kit prefix (`OWN_ENV_PREFIXES`) among
        them; RecipeError for a recipe that is missing, not a YAML mapping, or has keys that are not
        settings; ValueError for a REPORT_TO tracker whose package is missing (checked here, before
        any model loads, and not when a saved run's settings are reloaded for chat or merge). When
        reading `sys.argv` (a script's command line) it exits instead, with status 2 and
        `format_settings_error`'s lines, like argparse does for a bad flag.
    """
    import sys

    parser = build_parser(sections=sections)
    flags = vars(parser.parse_args(sys.argv[1:] if argv is None else list(argv)))
    recipe = _RECIPE.set(flags.pop("config", None))
    try:
        settings = Settings(_env_file=env_file, **flags)
        check_trackers(settings)
        return settings
    except ValidationError as err:
        if argv is not None:
            raise
        parser.exit(2, format_settings_error(err) + "\n")
    except ValueError as err:  # RecipeError, a missing tracker package
        if argv is not None:
            raise
        parser.exit(2, f"{err}\n")
    finally:
        _RECIPE.reset(recipe)


def check_trackers(settings: TrainingSettings) -> None:
    """Raise ValueError naming each REPORT_TO tracker whose package is not installed, with the
    command that installs it (transformers would fail later, after the model has loaded)."""
    missing = [name for name in settings.report_to if name in TRACKERS and importlib.util.find_spec(TRACKERS[name]) is None]
    if missing:
        commands = "; ".join(f"{name} needs the {TRACKERS[name]} package: pip install {TRACKERS[name]}" for name in missing)
        raise ValueError(f"--report_to / REPORT_TO={','.join(settings.report_to)}: {commands} (or REPORT_TO=none)")


def save_settings(settings: Settings, path: str | Path) -> Path:
    """Write the resolved settings as JSON, secrets removed. Returns the file path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings.to_saved_dict(), indent=2) + "\n")
    return path


def env_example_text() -> str:
    """The text of `.env.example`: every setting with its description and default, by group.

    `python config.py` rewrites `.env.example` from it; a test fails when the two disagree.
    """
    lines = [
        "# Copy to .env and edit. Every line is optional: the value shown is the default.",
        "# Precedence: defaults < recipe (--config x.yaml) < .env < environment variables < command-line flags (--name value).",
        "# Generated from config.py by `python config.py`; do not edit by hand.",
    ]
    for section, group in SECTIONS.items():
        lines += ["", f"# ---- {section} settings"]
        for name, info in group.model_fields.items():
            default = "" if info.default is None or name in SECRET_FIELDS else _env_value(info.default)
            lines += [f"# {info.description}", f"{name.upper()}={default}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    (REPO_ROOT / ".env.example").write_text(env_example_text())
    print(f"wrote {REPO_ROOT / '.env.example'}")
