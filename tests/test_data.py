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


def _tiny_blip(folder):
    """A BLIP captioner (real classes, tiny, random weights) saved like a hub model."""
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "photo", "of", "red", "block", "on", "grass"]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]")
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    config = BlipConfig(
        text_config=dict(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, encoder_hidden_size=32, bos_token_id=5, pad_token_id=0, sep_token_id=3),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=32)
    import torch

    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return words


def test_captioner_fills_only_missing_captions(tmp_path):
    from PIL import Image

    from conceptkit.data import load_media
    from conceptkit.errors import UserError

    model = tmp_path / "blip"
    model.mkdir()
    words = _tiny_blip(model)
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 40), (200, 0, 0)).save(images / "a.png")
    Image.new("RGB", (40, 40), (0, 200, 0)).save(images / "b.png")
    (images / "a.txt").write_text("my own caption\n")
    media = load_media(str(images), 32, 1, False, captioner=str(model))
    assert media.captions[0] == "my own caption"
    generated = media.captions[1]
    assert generated and set(generated.split()) <= set(words)  # decoded by the model's own tokenizer
    with pytest.raises(UserError, match="data.captioner"):
        load_media(str(images / "b.png"), 32, 1, False, captioner=str(tmp_path / "no_model"))
    # a captioner without a chat template takes one image: of several frames in one message, the first
    from conceptkit.captioning import caption_images, load_vlm

    blip = load_vlm(str(model))
    red, green = Image.open(images / "a.png"), Image.open(images / "b.png")
    assert not blip.chat and caption_images([[red, green], red], blip) == caption_images([red, red], blip)


def test_qwen25_vl_chat_path_expands_images_and_generates(tiny_qwen_vl, monkeypatch):
    """The chat branch of conceptkit.captioning on a tiny Qwen2.5-VL (real classes, random weights):
    the chat template is applied, each image's span is expanded to its patch tokens, several images go
    in one message, generation runs, and the answer is the decoded text after the prompt."""
    from PIL import Image
    from transformers import Qwen2_5_VLForConditionalGeneration

    from conceptkit.captioning import VisionLanguageModel, caption_images, describe, load_vlm
    from conceptkit.errors import UserError

    from conftest import GenerateSpy

    spy = GenerateSpy(monkeypatch, Qwen2_5_VLForConditionalGeneration)
    vlm = load_vlm(str(tiny_qwen_vl))
    assert isinstance(vlm.network, Qwen2_5_VLForConditionalGeneration) and vlm.chat
    image = Image.new("RGB", (32, 32), (200, 0, 0))
    frames = [Image.new("RGB", (32, 32), (0, 50 * k, 0)) for k in range(4)]
    answers = caption_images([image, frames], vlm, instruction="Describe the red block.", max_new_tokens=6)
    assert not vlm.released  # the caller's model stays open for its next question
    tokenizer = vlm.processor.tokenizer
    pad = vlm.processor.image_token_id
    for call, answer, count in zip(spy.calls, answers, (1, 4)):
        inputs, output = call["inputs"], call["output"]
        ids = inputs["input_ids"][0]
        prompt = tokenizer.decode(ids, skip_special_tokens=False)
        assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
        assert "Describe the red block.<|im_end|>" in prompt
        assert prompt.count("<|vision_start|><|image_pad|>") == count  # one span per image, one message
        grid = inputs["image_grid_thw"]  # (images, 3): patches in time, height, width; 2x2 merged per token
        assert grid.tolist() == [[1, 4, 4]] * count and inputs["pixel_values"].shape[0] == 16 * count
        assert int((ids == pad).sum()) == 4 * count  # the span expanded to the image's 4 merged patches
        assert output.shape[1] > ids.shape[0]  # it generated
        written = tokenizer.decode(output[0, ids.shape[0]:], skip_special_tokens=True)
        assert answer == ("\n".join(" ".join(line.split()) for line in written.splitlines() if line.split()) or None)
    assert len(spy.calls) == 2
    vlm.release()
    assert vlm.released
    with pytest.raises(RuntimeError, match="released"):
        describe(vlm, [image], "x", 2)
    # given by name, the model is loaded for the call and released after it
    released = []
    monkeypatch.setattr(VisionLanguageModel, "release", lambda self: released.append(self.name))
    assert len(caption_images([image], str(tiny_qwen_vl), max_new_tokens=2)) == 1 and released == [str(tiny_qwen_vl)]
    with pytest.raises(UserError, match="^method.vlm: cannot load captioning model") as error:
        load_vlm(str(tiny_qwen_vl / "missing"), setting="method.vlm")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("side", [32, 33])
def test_written_clips_read_back_with_every_frame_at_even_and_odd_sizes(tmp_path, side):
    # H.264 in yuv420p cannot hold odd sizes: such clips used to be written as empty files
    import imageio.v3 as iio
    import torch

    from conceptkit.media import read_clip_frames, save_media

    clip = torch.rand(1, 3, 5, side, side, generator=torch.Generator().manual_seed(0))
    mp4, strip = save_media(clip, tmp_path, "x")
    frames = iio.imread(mp4, index=None)
    assert frames.shape == (5, side, side, 3) and strip.is_file()
    # lossy, but the frames are these frames, in order
    truth = (clip[0].permute(1, 2, 3, 0).numpy() * 255)
    assert abs(frames.astype(float) - truth).mean() < abs(frames.astype(float) - truth[::-1]).mean()
    assert read_clip_frames(mp4, 3).shape == (3, side, side, 3)
