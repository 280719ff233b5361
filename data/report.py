"""What the SFT dataset builder did, per split: counts, token totals, lengths, packing, dropped records."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import datasets


@dataclass
class SplitReport:
    """Counts for one split: records = kept + dropped_too_long + dropped_no_supervised; `truncated`
    counts kept examples that were shortened (earliest whole turns dropped, see
    `data.examples.build_sft_example`), `truncated_mid_turn` those of them whose last exchange alone
    was too long, so its prompt was cut inside a turn (truncation_strategy=truncate_prompt); tokens
    and lengths are over kept examples.

    With packing (train split only; eval batches are never packed, see techniques/sft.py):
    `packed_rows` rows of at most max_seq_length tokens hold the kept examples (TRL's best-fit
    decreasing, as the trainer packs them) and `packing_efficiency` = total_tokens / (packed_rows
    * max_seq_length), the share of row slots that hold tokens. Both stay None without packing.

    `dropped` names every dropped record: "<file>: record <index in the file>: <status>: <reason>".
    `ignored_keys` counts, per key the readers did not read ("label", "messages[].name"), the records
    that hold it. `empty_answers` and `placeholder_answers` are the indices (in their file) of records
    with an assistant answer that is empty (no text, no tool call: the model learns to say nothing) or
    still holds a template placeholder such as `{{name}}`; `format()` warns about both.
    """

    records: int = 0
    kept: int = 0
    truncated: int = 0
    truncated_mid_turn: int = 0
    dropped_too_long: int = 0
    dropped_no_supervised: int = 0
    total_tokens: int = 0
    supervised_tokens: int = 0
    length_p50: int = 0
    length_p90: int = 0
    length_max: int = 0
    packed_rows: int | None = None
    packing_efficiency: float | None = None
    dropped: list[str] = field(default_factory=list)
    ignored_keys: dict[str, int] = field(default_factory=dict)
    empty_answers: list[int] = field(default_factory=list)
    placeholder_answers: list[int] = field(default_factory=list)


@dataclass
class BuildReport:
    """What `build_sft_dataset` did, per split; `format()` gives a table for the log (the packing
    columns only when `packing`)."""

    template: str
    max_seq_length: int
    truncation_strategy: str
    splits: dict[str, SplitReport] = field(default_factory=dict)
    packing: bool = False

    def format(self) -> str:
        lists = ("dropped", "ignored_keys", "empty_answers", "placeholder_answers")
        names = [f.name for f in fields(SplitReport) if f.name not in lists]
        if not self.packing:
            names = [n for n in names if n not in ("packed_rows", "packing_efficiency")]
        header = ["split"] + names
        rows = [[split] + [_cell(getattr(report, n)) for n in names] for split, report in self.splits.items()]
        widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
        lines = [
            f"SFT data: template={self.template}, max_seq_length={self.max_seq_length}, "
            f"truncation_strategy={self.truncation_strategy}, packing={str(self.packing).lower()}"
        ]
        for row in [header] + rows:
            lines.append(
                "  ".join(
                    cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
                )
            )
        for split, report in self.splits.items():
            more = len(report.dropped) - 10
            lines += [f"dropped from {split}: {line}" for line in report.dropped[:10]]
            lines += [f"dropped from {split}: ... and {more} more"] if more > 0 else []
            if report.ignored_keys:
                counts = ", ".join(f"{key!r} ({n} records)" for key, n in report.ignored_keys.items())
                lines.append(f"not read in {split} (ignored): {counts}")
            warnings = (
                (report.empty_answers, "an empty answer (trained to answer nothing)"),
                (report.placeholder_answers, "an answer still holding a template placeholder like {{name}}"),
            )
            for indices, what in warnings:
                if indices:
                    more = f", ... and {len(indices) - 10} more" if len(indices) > 10 else ""
                    shown = ", ".join(map(str, indices[:10])) + more
                    lines.append(f"warning: {split}: {len(indices)} records with {what}: records {shown}")
        return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def packed_row_count(lengths: list[int], max_seq_length: int) -> int:
    """Rows that TRL's best-fit-decreasing packing (`trl.pack_dataset(..., "bfd")`, what the trainer
    runs with packing on) makes of examples with these lengths, each row <= max_seq_length tokens."""
    from trl import pack_dataset  # only packing needs it; the rest of this module is TRL-free

    if not lengths:
        return 0
    rows = datasets.Dataset.from_dict({"input_ids": [[0] * n for n in lengths]})
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a count for the report, not a step worth a progress bar
    try:
        return pack_dataset(rows, max_seq_length, "bfd").num_rows
    finally:
        if bars:
            datasets.enable_progress_bars()

