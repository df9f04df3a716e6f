"""Training logs (every loss term per step on disk, kept in the concept) and the bench's HTML report."""

from __future__ import annotations

import base64
import csv
import json

import lightning as L
import pytest

from conftest import train_config


def _rows(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def _cfg(tmp_path, name, method="conceptprism", *extra):
    return train_config(method, "sd15_tiny", "trainer.max_steps=5", "trainer.log_every=2", "trainer.progress_bar=false",
                        "sample.count=0", "name=p", f"output={tmp_path / name}", *extra)


def test_every_loss_term_is_logged_once_per_step_and_kept_in_the_concept(tmp_path):
    from conceptkit.training.run import train

    folder = train(_cfg(tmp_path, "a.concept", "conceptprism", "method.lora_accumulate=2", "trainer.keep_checkpoints=true"))
    stages = {s["name"]: s for s in json.loads((folder / "concept.json").read_text())["training"]["stages"]}
    for stage, terms in (("tokens", {"loss", "rec", "excl"}), ("lora", {"loss", "rec"})):
        partial_csv = tmp_path / "a.concept.partial" / "logs" / stage / "metrics.csv"
        kept_csv = folder / "logs" / stage / "metrics.csv"
        assert kept_csv.read_text() == partial_csv.read_text()
        rows = _rows(kept_csv)
        assert set(rows[0]) == terms | {"step"}, rows[0]
        assert [int(r["step"]) for r in rows] == [0, 1, 2, 3, 4]  # one row per optimiser step, none twice
        assert all(r[t] != "" for r in rows for t in terms)
        # a step's row is the mean over its micro-steps (2 in the lora stage), so the rows average to
        # the stage means recorded in concept.json
        for term in terms:
            mean = sum(float(r[term]) for r in rows) / len(rows)
            assert mean == pytest.approx(stages[stage]["mean_terms"][term], rel=1e-5, abs=1e-6), (stage, term)
        assert stages[stage]["final_loss"] == pytest.approx(float(rows[-1]["loss"]), rel=1e-5)
        assert "lr:" in (folder / "logs" / stage / "hparams.yaml").read_text()  # the stage's settings beside it


class CrashAt(L.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


def test_a_resumed_run_appends_to_its_log_and_repeats_no_step(tmp_path):
    """Checkpoint at step 2, rows up to step 2 flushed, crash at step 4: the resumed run restarts at
    step 2 and must neither lose rows 0-1 nor write row 2 twice; the log equals an uninterrupted one."""
    from conceptkit.training.run import train

    extra = ("trainer.log_every=1", "trainer.checkpoint_every=2")
    reference = _rows(train(_cfg(tmp_path, "ref.concept", "lora", *extra)) / "logs" / "lora" / "metrics.csv")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(_cfg(tmp_path, "x.concept", "lora", *extra), callbacks=[CrashAt(4)])
    before = _rows(tmp_path / "x.concept.partial" / "logs" / "lora" / "metrics.csv")
    assert [int(r["step"]) for r in before] == [0, 1, 2]  # row 2 is past the checkpoint: stale on resume
    resumed = _rows(train(_cfg(tmp_path, "x.concept", "lora", *extra, "resume=true")) / "logs" / "lora" / "metrics.csv")
    assert resumed == reference


def test_logger_choices(tmp_path):
    from conceptkit.errors import UserError
    from conceptkit.training.logs import check_logger, tensorboard_available
    from conceptkit.training.run import train

    folder = train(_cfg(tmp_path, "n.concept", "lora", "trainer.logger=none", "trainer.max_steps=2"))
    assert not (folder / "logs").exists()
    assert check_logger("auto") == ("tensorboard" if tensorboard_available() else "csv")
    with pytest.raises(UserError, match="trainer.logger='wandb': choose one of csv, tensorboard, auto, none"):
        train(_cfg(tmp_path, "w.concept", "lora", "trainer.logger=wandb"))
    if not tensorboard_available():
        with pytest.raises(UserError, match="pip install tensorboard"):
            train(_cfg(tmp_path, "t.concept", "lora", "trainer.logger=tensorboard"))
    assert not (tmp_path / "w.concept.partial").exists()  # refused before anything was written


# --- the bench's HTML report ---------------------------------------------------------------------

SPEED_ROWS = [
    {"method": m, "backbone": b, "stage": "lora", "device": "cpu", "step_seconds": s, "micro_step_seconds": s,
     "peak_memory_mb": 900.0, "step_memory_mb": 12.0, "trainable_params": 1000}
    for m, b, s in (("lora", "sd15_tiny", 0.02), ("lora", "wan21_tiny", 0.01), ("textual_inversion", "sd15_tiny", 0.07))
]


def _embedded_pngs(text):
    marker = 'src="data:image/png;base64,'
    chunks = text.split(marker)[1:]
    return [base64.b64decode(chunk.split('"', 1)[0]) for chunk in chunks]


def test_html_report_holds_the_table_and_embedded_plots(tmp_path):
    pytest.importorskip("matplotlib")
    from conceptkit.bench.quality import quality_charts
    from conceptkit.bench.report import write_html_report
    from conceptkit.bench.speed import _table, speed_charts

    markdown = "# conceptkit bench: training step\n\n" + _table(SPEED_ROWS) + "\n"
    text = write_html_report(tmp_path, "speed", markdown, speed_charts(SPEED_ROWS)).read_text()
    assert "<h1>conceptkit bench: training step</h1>" in text
    assert "<th>micro-step s</th>" in text and "<td>textual_inversion</td>" in text and "<td>0.0700</td>" in text
    pngs = _embedded_pngs(text)
    assert len(pngs) == 2 and all(p.startswith(b"\x89PNG\r\n\x1a\n") for p in pngs)  # one file: no PNG beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]
    results = {"vae_reconstruction": {"shape": 0.5, "colour": 1.0, "samples": 4},
               "pretrain": {"shape": 0.25, "colour": 0.75, "all": 0.0, "samples": 2}}
    chart, = quality_charts(results)
    assert chart.categories == ["shape", "colour", "all"] and chart.series["vae_reconstruction"] == [0.5, 1.0, None]
    text = write_html_report(tmp_path, "quality", "## pretrain\n\n| shape |\n|---|\n| 0.25 |\n", [chart]).read_text()
    assert "<h2>pretrain</h2>" in text and "<td>0.25</td>" in text and len(_embedded_pngs(text)) == 1


def test_html_report_without_matplotlib_is_the_table_and_a_note(tmp_path, monkeypatch):
    from conceptkit.bench import report
    from conceptkit.bench.speed import _table, speed_charts

    monkeypatch.setattr(report, "matplotlib_available", lambda: False)
    text = report.write_html_report(tmp_path, "speed", _table(SPEED_ROWS), speed_charts(SPEED_ROWS)).read_text()
    assert "<td>wan21_tiny</td>" in text and report.NO_MATPLOTLIB in text and "data:image/png" not in text


def test_conceptkit_bench_writes_report_html_beside_results_md(tmp_path):
    from conceptkit.bench import run_suite
    from conceptkit.bench.report import matplotlib_available
    from conceptkit.config import compose

    run_suite(compose("bench", ["methods=[lora]", "backbones=[sd15_tiny]", "steps=1", "warmup=0", f"output={tmp_path}"]))
    assert (tmp_path / "results.md").is_file()
    text = (tmp_path / "report.html").read_text()
    assert "<td>sd15_tiny</td>" in text and "<td>lora</td>" in text
    assert ("data:image/png;base64," in text) == matplotlib_available()


def test_progress_off_a_terminal_is_plain_lines_with_the_loss(tmp_path, capsys):
    # Lightning's bar draws nothing until a stage ends when stdout is a file (a batch job's log):
    # there the progress is one line per interval and one at each stage's end, with the latest loss.
    import re

    from conceptkit.training.run import train

    cfg = train_config("textual_inversion", "sd15_tiny", "trainer.max_steps=4", "trainer.log_every=2",
                       "sample.count=0", "name=p", f"output={tmp_path / 'p.concept'}")
    train(cfg)
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("stage ")]
    assert lines and re.fullmatch(r"stage embedding: step 4/4 \(100 %\), [0-9.]+ s/step, ~0 s left, loss [0-9.e-]+",
                                  lines[-1]), lines
    assert "━" not in out  # no redrawn bar
