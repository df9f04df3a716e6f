"""Training logs on disk: one row per optimiser step with every loss term the method reports.

`trainer.logger` picks Lightning loggers for each stage, writing under `<output>.partial/logs/<stage>/`:
  csv          metrics.csv (the default; what the concept folder keeps in logs/)
  tensorboard  metrics.csv plus TensorBoard event files (needs the tensorboard package)
  auto         tensorboard when it is installed, else csv
  none         no logs
The rows come from ConceptTrainingModule.flush_terms (a few steps at a time, one host sync each).
Only the first process writes: Lightning's loggers are rank-zero-only.
"""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from conceptkit.errors import UserError

LOGGERS = ("csv", "tensorboard", "auto", "none")


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None


def check_logger(kind: str) -> str:
    """The logger kind to use ('auto' resolved); one UserError line for an unknown or unusable kind."""
    kind = str(kind)
    if kind not in LOGGERS:
        raise UserError(f"trainer.logger={kind!r}: choose one of {', '.join(LOGGERS)}")
    if kind == "auto":
        return "tensorboard" if tensorboard_available() else "csv"
    if kind == "tensorboard" and not tensorboard_available():
        raise UserError("trainer.logger=tensorboard needs the tensorboard package (pip install tensorboard); "
                        "or use trainer.logger=csv")
    return kind


def stage_loggers(kind: str, folder: Path, stage_name: str) -> list:
    """Lightning loggers writing into folder/<stage_name>/ (no version subfolder, so a resumed run
    writes to the same files)."""
    kind = check_logger(kind)
    if kind == "none":
        return []
    loggers = [AppendingCSVLogger(str(folder), name=stage_name, version="")]
    if kind == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(str(folder), name=stage_name, version="", default_hp_metric=False))
    return loggers


class AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv; this one keeps the rows before the first
    step it writes (a resumed run repeats the steps after its checkpoint) and appends after them."""

    def _check_log_dir_exists(self) -> None:
        self._trimmed = False

    def save(self) -> None:
        if self.metrics and not self._trimmed and self._fs.isfile(self.metrics_file_path):
            first = min(int(row["step"]) for row in self.metrics)
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                reader = csv.DictReader(file)
                kept = [row for row in reader if int(float(row["step"])) < first]
                keys = list(reader.fieldnames or [])
            with self._fs.open(self.metrics_file_path, "w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=keys)
                writer.writeheader()
                writer.writerows(kept)
            self.metrics_keys = sorted(keys)
        if self.metrics:
            self._trimmed = True
        super().save()


class AppendingCSVLogger(CSVLogger):
    """CSVLogger whose metrics.csv survives a resumed run (see AppendingWriter)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> AppendingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def read_metrics(path: Path) -> list[dict[str, float]]:
    """A metrics.csv as rows of floats (empty cells left out)."""
    with open(path, newline="") as file:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(file)]
