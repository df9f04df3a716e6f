"""Training media: images, clips, captions."""

from __future__ import annotations

import json

import numpy as np
import pytest


def _clip(path, frames=9, size=48):
    import imageio.v3 as iio

    video = np.zeros((frames, size, size, 3), np.uint8)
    for f in range(frames):
        video[f, 16:28, 2 + 3 * f: 14 + 3 * f] = (220, 40, 40)
    iio.imwrite(path, video, fps=8, codec="libx264", macro_block_size=1)


def test_clips_become_frames_and_train_on_wan(tmp_path):
    from conceptkit.data import load_media
    from conceptkit.training.run import train

    from conftest import train_config

    for k in range(2):
        _clip(tmp_path / f"clip{k}.mp4")
    media = load_media(str(tmp_path), resolution=32, frames=5, video_backbone=True)
    assert media.pixels.shape == (2, 3, 5, 32, 32)
    assert media.pixels.min() >= -1 and media.pixels.max() <= 1
    # the red square moves right: its mean column grows frame by frame
    red = (media.pixels[0, 0] > 0.3) & (media.pixels[0, 1] < -0.3)
    columns = [np.nonzero(red[f].numpy())[1].mean() for f in range(5)]
    assert all(b > a for a, b in zip(columns, columns[1:]))
    cfg = train_config("conceptprism", "wan21_tiny", "experiment=smoke", f"data.images={tmp_path}", "data.frames=5",
                       f"output={tmp_path / 'v.concept'}")
    folder = train(cfg)
    assert {p.suffix for p in (folder / "samples").iterdir()} == {".mp4", ".png", ".json"}


def test_captions_from_sidecars_and_files(tmp_path):
    from PIL import Image

    from conceptkit.data import load_media
    from conceptkit.errors import UserError

    for name in ("b.png", "a.png"):
        Image.new("RGB", (50, 40), (10, 200, 10)).save(tmp_path / name)
    (tmp_path / "a.txt").write_text("a green square\n")
    media = load_media(str(tmp_path), 32, 1, False)
    assert media.names == ["a.png", "b.png"] and media.captions == ["a green square", None]
    assert media.pixels.shape == (2, 3, 1, 32, 32)
    table = tmp_path / "captions.json"
    table.write_text(json.dumps({"b.png": "bee"}))
    assert load_media(str(tmp_path), 32, 1, False, str(table)).captions == ["a green square", "bee"]
    lines = tmp_path / "captions.txt"
    lines.write_text("one\n")
    with pytest.raises(UserError, match="1 lines for 2 files"):
        load_media(str(tmp_path), 32, 1, False, str(lines))
