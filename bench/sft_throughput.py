"""Supervised tokens/s of our SFT against TRL's SFTTrainer on the same work: one run, side by side.

    python bench/sft_throughput.py             # every row and the scaling rows (2 CPU cores: ~1 hour)
    python bench/sft_throughput.py --quick     # rows a, b, c, 3 steps each, scaling at 256 (2 CPU cores: < 5 min)
    python bench/sft_throughput.py --rows a,c,c:fp32,c:gc   # some rows only (ratios need a and b)

Rows, each trained in a fresh process (so peak memory is its own) for one epoch over the same
`--examples` Alpaca demo records (a seeded shuffle of the file, the first K) on the default model
(alpaca template, max_seq_length 512, micro batch 8, LoRA r16 alpha 32 all-linear, the same
learning rate and seed everywhere):

    a  TRL SFTTrainer with its defaults: prompt/completion records, peft_config, use_cpu on a CPU
       (TRL then trains in bf16 autocast with gradient checkpointing)
    b  TRL at its best here: the fastest of its own options (packing / padding-free, gradient
       checkpointing off, bf16 or not, length-grouped batches); every variant tried is a row b:...
    c  our LoRA SFT with our defaults        d  our QLoRA        e  our full fine-tune (LLRD)
    c:<levers>  our LoRA SFT with levers switched ("+"-separated; see LEVERS), e.g. c:gc, c:fp32+random

Every step after the first `--warmup` ones is timed (the optimizer steps themselves: a callback
clocks each one). Supervised tokens are counted from every batch the collator makes, the same way
for every row; MFU uses `techniques.throughput` (FLOPs per token and peak FLOP/s of this machine).
"loss" is the mean training loss per supervised token over the whole epoch and `supervised_tokens`
the epoch's count: every row trains on the same tokens, so speed cannot come from training on
fewer or other ones. The scaling rows time b (packed) and c (packed) at max_seq_length 256 ... 2048:
rows packed from the whole demo file, `--warmup` + `--packed_steps` optimizer steps (not an epoch:
one at 2,048 tokens a row would take an hour on 2 cores); their loss covers those steps only.

Writes bench/results.json (rows with name, supervised_tokens_per_s, ratio_vs_trl_default,
ratio_vs_trl_tuned, mfu, peak_mem_gib, loss, ...; the machine, threads and versions) and
bench/results.png. This is a benchmark, not a test: ratios come from one run on one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import runs  # noqa: E402, F401  (before any library: quietens bitsandbytes' import-time kernel warning)
from transformers import TrainerCallback  # noqa: E402

DATA = REPO.parent / "shared" / "datasets" / "llamafactory" / "alpaca_en_demo.json"
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"}  # TRL docs' LoRA example
LEARNING_RATE = 2e-4
# TRL's own options on top of its defaults: name -> SFTConfig keywords
TRL_VARIANTS = {
    "no-checkpointing": dict(gradient_checkpointing=False),
    "no-checkpointing,fp32": dict(gradient_checkpointing=False, bf16=False),
    "no-checkpointing,group_by_length": dict(gradient_checkpointing=False, train_sampling_strategy="group_by_length"),
    # TRL 1.16 refuses padding_free with a max_length it cannot enforce without packing; every record
    # here already fits max_seq_length (fitting_records), so there is nothing to cut.
    "no-checkpointing,padding_free": dict(gradient_checkpointing=False, padding_free=True, max_length=None),
    "no-checkpointing,packing": dict(gradient_checkpointing=False, packing=True),
    # The model loaded in bf16 (from_pretrained(dtype=torch.bfloat16), as TRL's docs load large
    # models): autocast then has no fp32 weights to cast at every step.
    "no-checkpointing,padding_free,bf16-weights": dict(gradient_checkpointing=False, padding_free=True, max_length=None,
                                                       model_dtype="bfloat16"),
    "no-checkpointing,packing,bf16-weights": dict(gradient_checkpointing=False, packing=True, model_dtype="bfloat16"),
}
QUICK_TRL_VARIANT = "no-checkpointing,padding_free,bf16-weights"  # the fastest in the full run on a 2-core EPYC (README)
SCALING_TRL_VARIANT = "no-checkpointing,packing,bf16-weights"  # TRL's packed rows at its fastest settings
SCALING_LENGTHS = (256, 512, 1024, 2048)
# Levers of our LoRA row, each switched on top of our defaults for a row "c:<lever>+<lever>": the
# README's performance section says which won and became the default.
LEVERS = {
    "gc": ["--gradient_checkpointing", "true"],
    "nogc": ["--gradient_checkpointing", "false"],
    "dropout": ["--lora_dropout", "0.05"],
    "nodropout": ["--lora_dropout", "0"],
    "bf16": ["--mixed_precision", "bf16"],
    "fp32": ["--mixed_precision", "no"],
    "fp32-weights": ["--mixed_precision", "bf16"],  # bf16 autocast over frozen weights kept in fp32
    "peft-cast": [],  # PEFT casts each adapted input to fp32 under autocast too (techniques.lora hook off)
    "grouped": ["--group_by_length", "true"],
    "random": ["--group_by_length", "false"],
    "packing": ["--packing", "true"],
    "padding-free": ["--padding_free", "true"],
    "padded": ["--padding_free", "false"],  # padded batches (attention then takes sdpa's 4D mask)
    "varlen": ["--attn_implementation", "sdpa_varlen"],
    "sdpa": ["--attn_implementation", "sdpa"],  # one dense block-diagonal mask over each padding-free row
    "peft-norms": [],  # QLoRA (row d): norms and embeddings upcast to fp32 again, as PEFT leaves them
    "compute-bf16": ["--bnb_4bit_compute_dtype", "bfloat16"],  # QLoRA (row d): 4-bit layers dequantize to bf16
}


def main() -> None:
    args = parse_args()
    if args.worker:
        result = run_row(args.worker, args)
        Path(args.json).write_text(json.dumps(result))
        return
    # --quick: the three rows the targets compare (a, the fastest b, c), 3 steps each (1 untimed),
    # and the scaling rows at 256 only: ~45 s a row on 2 cores, under 5 minutes in all.
    rows = args.rows.split(",") if args.rows else ["a", "b", "c"] if args.quick else ["a", "b", "c", "d", "e"]
    if args.quick:
        args.examples, args.warmup, args.packed_steps = min(args.examples, 24), 1, 2
    specs = []
    for row in rows:
        if row == "b":
            variants = [QUICK_TRL_VARIANT] if args.quick else list(TRL_VARIANTS)
            specs += [f"b:{variant}" for variant in variants]
        else:
            specs.append(row)
    if args.scaling and "b" in rows and "c" in rows:
        lengths = SCALING_LENGTHS[:1] if args.quick else SCALING_LENGTHS
        specs += [f"{row}@{n}" for n in lengths for row in (f"b:{SCALING_TRL_VARIANT}", "c:packing")]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # before the rows: a missing folder must not cost the run
    results = [run_in_subprocess(spec, args) for spec in specs]
    table = summarize(results)
    print(format_table(table))
    out = {"machine": machine(), "settings": {"examples": args.examples, "warmup": args.warmup, "batch": args.batch,
                                              "max_seq_length": args.max_seq_length, "learning_rate": LEARNING_RATE,
                                              "lora": LORA, "data": str(DATA)},
           "rows": table}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    plot(table, Path(args.out).with_suffix(".png"))
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.png')}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="rows a, b, c with 3 steps each, scaling at 256 only (< 5 min)")
    parser.add_argument("--rows", default="", help="comma-separated rows (a,b,c,d,e); default all")
    parser.add_argument("--examples", type=int, default=64, help="records every row trains on (one epoch)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps at the start")
    parser.add_argument("--packed_steps", type=int, default=4, help="timed steps of the packed (scaling) rows")
    parser.add_argument("--batch", type=int, default=8, help="micro batch size")
    parser.add_argument("--max_seq_length", type=int, default=512)
    parser.add_argument("--no-scaling", dest="scaling", action="store_false", help="skip the scaling rows")
    parser.add_argument("--out", default=str(REPO / "bench" / "results.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    return parser.parse_args()


def run_in_subprocess(spec: str, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        command = [sys.executable, __file__, "--worker", spec, "--json", str(out), "--examples", str(args.examples),
                   "--warmup", str(args.warmup), "--batch", str(args.batch), "--max_seq_length", str(args.max_seq_length),
                   "--packed_steps", str(args.packed_steps)]
        started = time.perf_counter()
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"row {spec} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
            if done.returncode < 0:  # SIGKILL from the kernel's OOM killer leaves no Python error
                why = " (SIGKILL: most likely out of memory)" if done.returncode == -9 else ""
                return {"name": spec, "error": f"killed by signal {-done.returncode}{why}"}
            return {"name": spec, "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
        result = json.loads(out.read_text())
        print(f"{spec}: {result['supervised_tokens_per_s']:.1f} supervised tokens/s ({time.perf_counter() - started:.0f} s)",
              flush=True)
        return result


# ---------------------------------------------------------------- one row, in its own process


def run_row(spec: str, args: argparse.Namespace) -> dict:
    """Train the row `spec` ("a", "b:<variant>", "c", "d", "e", "c:packing"; "@N" = max_seq_length N)."""
    import torch
    from transformers import set_seed

    from techniques import throughput

    name, _, length = spec.partition("@")
    max_seq_length = int(length) if length else args.max_seq_length
    set_seed(0)
    records = fitting_records(json.loads(DATA.read_text()), max_seq_length)
    random.Random(0).shuffle(records)
    # Packed rows hold several examples each: they draw from the whole file and stop after
    # `--packed_steps` timed steps (one epoch of it at 2,048 tokens a row would take an hour here).
    packed = bool(length) or "packing" in name
    records = records if packed else records[: args.examples]
    max_steps = args.warmup + args.packed_steps if packed else -1
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_row(name, records, max_seq_length, args.batch, Path(tmp), max_steps)
        counter = CountingCollator(trainer.data_collator)
        trainer.data_collator = counter
        clock = StepClock()
        trainer.add_callback(clock)
        trainer.train()
    counts = counter.counts
    if max_steps > 0 and len(counts) == len(clock.seconds) + 1:
        counts = counts[:-1]  # stopped before the epoch's end: accelerate's loader had collated one batch ahead
    if len(counts) != len(clock.seconds):
        raise RuntimeError(f"{len(counts)} batches collated for {len(clock.seconds)} steps: one batch per step expected")
    warmup = min(args.warmup, len(counts) - 1)
    timed, seconds = counts[warmup:], sum(clock.seconds[warmup:])
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    tokens, supervised, squared = (sum(c[i] for c in timed) for i in range(3))
    epoch_supervised = sum(c[1] for c in counts)  # packed rows: the steps trained, not an epoch
    model = trainer.accelerator.unwrap_model(trainer.model)
    flops = throughput.flops_per_token(model).step_flops(tokens, supervised, squared)
    dtype = torch.bfloat16 if trainer.args.bf16 else torch.float32
    peak = throughput.peak_flops(trainer.args.device, dtype)
    return {
        "name": spec, "max_seq_length": max_seq_length, "examples": len(records), "steps": len(counts),
        "timed_steps": len(timed), "seconds": seconds, "tokens": tokens, "timed_supervised_tokens": supervised,
        "supervised_tokens": epoch_supervised,
        "supervised_tokens_per_s": supervised / seconds, "tokens_per_s": tokens / seconds,
        "mfu": flops / seconds / peak if peak else None, "matmul_dtype": str(dtype).removeprefix("torch."),
        "peak_flops": peak, "peak_mem_gib": throughput.peak_memory_gib(trainer.args.device),
        "weight_bytes_per_param": weight_bytes_per_param(model),
        "loss": sum(loss * c[1] for loss, c in zip(losses, counts, strict=True)) / epoch_supervised,
        "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
    }


def fitting_records(records: list[dict], max_seq_length: int) -> list[dict]:
    """The records whose prompt + answer + eos fit in max_seq_length tokens: TRL would truncate a
    longer one and we drop it (an answer is never cut), so only these train on the same tokens."""
    from data.readers import to_messages
    from data.templates import render
    from models import load_tokenizer, resolve_model_path
    from config import get_settings

    settings = get_settings([], env_file=None)
    tokenizer = load_tokenizer(settings, resolve_model_path(settings))
    return [r for r in records
            if len(tokenizer(render(to_messages(r), "alpaca", tokenizer))["input_ids"]) + 1 <= max_seq_length]


class CountingCollator:
    """The trainer's collator, counting (tokens, supervised tokens, sum of squared lengths) per batch."""

    def __init__(self, inner):
        self.inner, self.counts = inner, []

    def __call__(self, examples):
        from techniques.throughput import batch_token_counts

        batch = self.inner(examples)
        self.counts.append(batch_token_counts(batch))
        return batch


class StepClock(TrainerCallback):
    """Wall time of each optimizer step: forward, backward and the optimizer's step."""

    def __init__(self):
        self.seconds, self.start = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self.start)


def build_row(name: str, records: list[dict], max_seq_length: int, batch: int, tmp: Path, max_steps: int):
    """The row's trainer over `records` for one epoch, or `max_steps` optimizer steps when > 0."""
    if name == "a" or name.startswith("b:"):
        return trl_trainer(TRL_VARIANTS.get(name.partition(":")[2], {}), records, max_seq_length, batch, tmp, max_steps)
    return our_trainer(name, records, max_seq_length, batch, tmp, max_steps)


def trl_trainer(variant: dict, records, max_seq_length, batch, tmp, max_steps=-1):
    """TRL as its docs show it: prompt/completion records, a model, a LoRA peft_config."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from config import get_settings
    from data.readers import to_messages
    from data.templates import render
    from models import resolve_model_path

    path = resolve_model_path(get_settings([], env_file=None))
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = []
    for record in records:
        messages = to_messages(record)
        rows.append({"prompt": render(messages[:-1], "alpaca", tokenizer, add_generation_prompt=True),
                     "completion": messages[-1]["content"]})
    variant = dict(variant)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=variant.pop("model_dtype", "auto"))
    config = SFTConfig(**{**dict(output_dir=str(tmp), use_cpu=not torch.cuda.is_available(), max_length=max_seq_length,
                                 per_device_train_batch_size=batch, num_train_epochs=1, max_steps=max_steps,
                                 learning_rate=LEARNING_RATE, logging_steps=1, save_strategy="no", report_to="none",
                                 seed=0), **variant})
    return SFTTrainer(model=model, args=config,
                      train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer,
                      peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA))


def our_trainer(name: str, records, max_seq_length, batch, tmp, max_steps=-1):
    """Our recipe as the example scripts run it, with our defaults."""
    import torch

    from config import get_settings
    from data.dataset import build_sft_dataset_with_report
    from models import frozen_weight_dtype, load_model, load_tokenizer, resolve_model_path
    from techniques.full_finetune import build_optimizer
    from techniques.lora import apply_lora
    from techniques.qlora import apply_qlora, load_4bit_model
    from techniques.sft import build_sft_trainer

    data_file = tmp / "data.json"
    data_file.write_text(json.dumps(records))
    row, _, options = name.partition(":")
    flags = ["--dataset_path", str(data_file), "--eval_split_size", "0", "--max_seq_length", str(max_seq_length),
             "--per_device_train_batch_size", str(batch), "--num_train_epochs", "1", "--max_steps", str(max_steps),
             "--logging_steps", "1",
             "--output_dir", str(tmp / "out"), "--seed", "0", "--learning_rate", str(LEARNING_RATE if row != "e" else 5e-5),
             "--lora_r", str(LORA["r"]), "--lora_alpha", str(LORA["lora_alpha"])]
    levers = list(filter(None, options.split("+")))
    for lever in levers:
        flags += LEVERS[lever]
    if "peft-cast" in levers:
        import techniques.lora

        techniques.lora.skip_input_casts_under_autocast = lambda model: 0
    if row == "d":
        flags += ["--load_in_4bit", "true"]
    settings = get_settings(flags, env_file=None)
    path = resolve_model_path(settings)
    tokenizer = load_tokenizer(settings, path)
    data, _ = build_sft_dataset_with_report(settings, tokenizer)
    if row == "e":
        model = load_model(settings, path, dtype=torch.float32)
        return build_sft_trainer(model, tokenizer, data, settings, optimizer_factory=lambda m: build_optimizer(m, settings))
    if row == "d":
        model = apply_qlora(load_4bit_model(settings, path), settings)
        if "peft-norms" in levers:
            for param in model.parameters():
                if not param.requires_grad and param.dtype == torch.bfloat16 and type(param).__name__ != "Params4bit":
                    param.data = param.data.float()
        return build_sft_trainer(model, tokenizer, data, settings)
    dtype = "auto" if "fp32-weights" in levers else frozen_weight_dtype(settings)
    model = apply_lora(load_model(settings, path, dtype=dtype), settings)
    return build_sft_trainer(model, tokenizer, data, settings)


def weight_bytes_per_param(model) -> float:
    """Bytes of every parameter and buffer / parameter count (a 4-bit weight counts 2 per byte)."""
    nbytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    count = sum(p.numel() * (2 if p.__class__.__name__ == "Params4bit" else 1) for p in model.parameters())
    return nbytes / count


# ---------------------------------------------------------------- the table


def summarize(results: list[dict]) -> list[dict]:
    """Mark the fastest TRL variant as b and add the ratios to a and to b."""
    ok = [r for r in results if "error" not in r]
    default = next((r for r in ok if r["name"] == "a"), None)
    variants = [r for r in ok if r["name"].startswith("b:") and "@" not in r["name"]]
    tuned = max(variants, key=lambda r: r["supervised_tokens_per_s"], default=None)
    for r in ok:
        r["ratio_vs_trl_default"] = r["supervised_tokens_per_s"] / default["supervised_tokens_per_s"] if default else None
        r["ratio_vs_trl_tuned"] = r["supervised_tokens_per_s"] / tuned["supervised_tokens_per_s"] if tuned else None
        r["trl_tuned"] = r is tuned
    return results


def format_table(rows: list[dict]) -> str:
    head = f"{'row':<44} {'sup tok/s':>9} {'vs a':>6} {'vs b':>6} {'MFU':>6} {'peak GiB':>8} {'B/param':>7} {'loss':>7} {'sup tokens':>10}"
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['name']:<44} failed: {r['error']}")
            continue
        label = r["name"] + (" (= b)" if r.get("trl_tuned") else "")
        ratio = lambda x: f"{x:6.2f}" if x is not None else "     -"  # noqa: E731
        mfu = f"{100 * r['mfu']:5.1f}%" if r["mfu"] is not None else "     -"
        lines.append(f"{label:<44} {r['supervised_tokens_per_s']:9.1f} {ratio(r['ratio_vs_trl_default'])} "
                     f"{ratio(r['ratio_vs_trl_tuned'])} {mfu} {r['peak_mem_gib']:8.2f} {r['weight_bytes_per_param']:7.2f} "
                     f"{r['loss']:7.4f} {r['supervised_tokens']:10d}")
    return "\n".join(lines)


def machine() -> dict:
    import torch
    import transformers
    import trl

    from techniques.throughput import _cpu_model

    return {"cpu": _cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "trl": trl.__version__}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main_rows = [r for r in rows if "error" not in r and "@" not in r["name"]]
    scaling = [r for r in rows if "error" not in r and "@" in r["name"]]
    fig, axes = plt.subplots(1, 2 if scaling else 1, figsize=(13 if scaling else 8, 5), squeeze=False)
    ax = axes[0][0]
    names = [r["name"] + (" (b)" if r.get("trl_tuned") else "") for r in main_rows]
    values = [r["supervised_tokens_per_s"] for r in main_rows]
    colors = ["#888888" if r["name"] == "a" or r["name"].startswith("b:") else "#2b7bba" for r in main_rows]
    bars = ax.barh(names, values, color=colors)
    for bar, r in zip(bars, main_rows, strict=True):
        note = f" {r['ratio_vs_trl_default']:.2f}x a" if r.get("ratio_vs_trl_default") else ""
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, note, va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("supervised tokens per second (higher is faster)")
    ax.set_title("SFT throughput, same data and steps (grey: TRL, blue: ours)")
    if scaling:
        ax = axes[0][1]
        for prefix, label in (("b:", "TRL packed (b)"), ("c:", "ours packed (c)")):
            points = sorted((r["max_seq_length"], r["supervised_tokens_per_s"]) for r in scaling if r["name"].startswith(prefix))
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("max_seq_length (tokens per packed row)")
        ax.set_ylabel("supervised tokens per second")
        ax.set_title("cost of row length")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
