"""The command line: fast help, one-line errors with a non-zero exit, and no half-written output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "conceptkit.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})


def test_help_imports_no_heavy_library():
    code = ("import sys, conceptkit.cli as c; c.main(['--help']); "
            "heavy = [m for m in ('torch', 'diffusers', 'lightning', 'transformers', 'hydra') if m in sys.modules]; "
            "print('HEAVY', heavy)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "usage: conceptkit" in done.stdout
    assert "HEAVY []" in done.stdout


def _assert_one_line_error(done, *fragments):
    assert done.returncode != 0
    lines = [line for line in done.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_bad_inputs_give_one_clear_line(tmp_path: Path):
    from PIL import Image

    empty = tmp_path / "empty"
    empty.mkdir()
    _assert_one_line_error(run_cli("train", f"data.images={empty}", f"output={tmp_path}/a"), "data.images", "no images")
    assert not (tmp_path / "a").exists() and not (tmp_path / "a.partial").exists()

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    Image.new("RGB", (40, 40)).save(corrupt / "good.png")
    (corrupt / "bad.png").write_bytes(b"not a png at all")
    _assert_one_line_error(run_cli("train", f"data.images={corrupt}", f"output={tmp_path}/b"), "bad.png")
    assert not (tmp_path / "b").exists() and not (tmp_path / "b.partial").exists()

    single = tmp_path / "single"
    single.mkdir()
    Image.new("RGB", (40, 40)).save(single / "one.png")
    _assert_one_line_error(run_cli("train", "method=conceptprism", f"data.images={single}", f"output={tmp_path}/c"),
                           "at least 2 reference images")
    assert not (tmp_path / "c").exists()

    _assert_one_line_error(run_cli("train", "method=dreamfusion"), "unknown method", "conceptprism")
    _assert_one_line_error(run_cli("train", "backbone=sdxl"), "unknown backbone", "sd15_tiny")
    _assert_one_line_error(run_cli("train", "trainer.max_stepz=3"), "max_stepz")
    _assert_one_line_error(run_cli("bogus"), "unknown command")
    _assert_one_line_error(run_cli("train", "name=my-dog"), "name=", "letter")
    _assert_one_line_error(run_cli("compose", f"concepts=[{tmp_path}/nothing]"), "not a concept folder")


def test_missing_weights_name_the_fix(tmp_path: Path):
    done = run_cli("train", "backbone=sd15", f"backbone.path={tmp_path}/no_such_model", f"output={tmp_path}/x")
    _assert_one_line_error(done, "not present", "backbone.path=")


def test_concept_from_the_other_family_is_refused(tmp_path: Path):
    common = ["experiment=smoke", "sample.count=0", "method=textual_inversion", "backbone=sd15_tiny"]
    assert run_cli("train", *common, "name=img", f"output={tmp_path}/img.concept").returncode == 0
    assert run_cli("train", *common, "backbone=wan21_tiny", "name=vid", f"output={tmp_path}/vid.concept").returncode == 0
    done = run_cli("compose", f"concepts=[{tmp_path}/img.concept,{tmp_path}/vid.concept]", f"output={tmp_path}/out")
    _assert_one_line_error(done, "cannot share a backbone")
    assert not (tmp_path / "out").exists()
    from conceptkit.artifact import load_concept
    from conceptkit.errors import UserError

    from conftest import make_backbone

    with pytest.raises(UserError, match="backbone family wan21"):
        load_concept(tmp_path / "vid.concept", make_backbone("sd15_tiny"))
    listing = run_cli("ls", str(tmp_path)).stdout
    assert "img.concept: {img} method=textual_inversion backbone=sd15" in listing


def test_concepts_that_render_alike_are_refused(tmp_path: Path):
    common = ["experiment=smoke", "sample.count=0", "method=lora", "backbone=sd15_tiny"]
    for name in ("mug", "cup"):
        assert run_cli("train", *common, f"name={name}", f"output={tmp_path}/{name}.concept").returncode == 0
    done = run_cli("compose", f"concepts=[{tmp_path}/mug.concept,{tmp_path}/cup.concept]", f"output={tmp_path}/out")
    _assert_one_line_error(done, "both render as 'sks object'", "method.identifier")
    assert run_cli("train", *common, "name=tea", "method.identifier=zwx", f"output={tmp_path}/tea.concept").returncode == 0
    done = run_cli("compose", f"concepts=[{tmp_path}/mug.concept,{tmp_path}/tea.concept]", "count=1", "steps=2",
                   f"output={tmp_path}/out")
    assert done.returncode == 0, done.stderr


def test_train_hint_is_each_method_s_own_compose_call():
    """The train CLI's "render it:" line: {name} in the sample prompt for per-concept methods, named
    references for KV-mixed, an ordered reference list for BindWeave (its compose form)."""
    from conceptkit.registry import method_class

    assert method_class("lora").compose_example("c.concept", "dog", "a photo of {name}") == \
        'concepts=[c.concept] prompt="a photo of {dog}"'
    assert "references={star:star.png" in method_class("kv_mixed").compose_example("kv.concept", "kv", "x")
    assert "references=[star.png,circle.png]" in method_class("bindweave").compose_example("bw.concept", "bw", "x")
