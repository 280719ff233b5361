"""What every example script does around its trainer, in one home: processes, measuring, outputs.

The scripts in examples/ run unchanged as one process (`python examples/x.py`) or as several
(`torchrun --nproc_per_node N`, `accelerate launch`, see configs/accelerate/). Under several
processes this package keeps the rank discipline the scripts rely on, through accelerate's
`PartialState` (no distributed code of our own):

- only the main process prints (`processes.say`) and logs at INFO (`processes.setup_logging`); the others warn only;
- the model folder is resolved (and converted or fetched, the first time) on the local main
  process first, so the others find it in the cache (`processes.resolve_model_once`);
- the dataset is built once per machine by its local main process and shared with the others
  (`processes.prepare_once`), so the dataset report is printed once and nothing is tokenized N times;
- held-out answers are generated on the main process, or skipped with the reason when the
  weights are sharded (FSDP, ZeRO-3) (`measure.held_out_answers`);
- the final folder is written through the trainer's collective `save_model` (FSDP full state
  dicts and ZeRO-3 gather their shards there) into a temporary folder that the main process
  renames into place once complete (`outputs.save_final`).

Modules: `runs.processes` (rank discipline), `runs.measure` (numbers before and after training),
`runs.outputs` (what a run leaves in its output_dir).
"""

import logging

# bitsandbytes 0.50, imported by peft on every run (4-bit or not, `--help` included), looks for a
# faster 4-bit CPU kernel in the optional `kernels` package on CPUs with AVX512-BF16 and logs
# "Failed to load CPU gemm_4bit_forward from kernels-community" when it is missing; it falls back to
# its own kernels, so the line is noise. Only that logger is quietened (its errors still show), and
# before bitsandbytes is imported: each example imports this package before any library for that.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
