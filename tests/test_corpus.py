"""Corpora for encoder methods: the ShapeWorld corpus (deterministic, exact masks, no held-out object,
word spans), the user JSONL folder format and its one-line errors, and one-to-one matching."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conceptkit.corpus import CorpusMicroSteps, JsonlCorpus, ShapeWorldCorpus, reference_picture
from conceptkit.errors import UserError
from conceptkit.matching import hungarian, match_by_similarity


def test_shapeworld_corpus_items_are_deterministic_with_exact_masks_and_spans():
    corpus = ShapeWorldCorpus(size=40, resolution=32, seed=3)
    first, again = corpus[7], ShapeWorldCorpus(size=40, resolution=32, seed=3)[7]
    assert first.caption == again.caption and np.array_equal(first.image, again.image)
    assert ShapeWorldCorpus(size=40, resolution=32, seed=4)[7].caption != first.caption or not np.array_equal(
        ShapeWorldCorpus(size=40, resolution=32, seed=4)[7].image, first.image)
    counts = set()
    for index in range(len(corpus)):
        item = corpus[index]
        counts.add(len(item.objects))
        assert item.image.shape == (32, 32, 3) and item.image.dtype == np.uint8
        for obj in item.objects:
            assert item.caption[obj.span[0]:obj.span[1]] == obj.word == obj.description.split()[-1]  # the shape noun
            assert obj.mask.shape == (32, 32) and obj.mask.any()
            assert obj.reference.shape[0] == obj.reference.shape[1] and obj.reference.shape[2] == 3
        masks = np.stack([o.mask for o in item.objects])
        assert masks.sum(0).max() <= 1  # masks do not overlap
    assert counts == {1, 2, 3}


def test_shapeworld_corpus_never_shows_a_heldout_object():
    from conceptkit.world.factors import HELDOUT_COMBOS

    corpus = ShapeWorldCorpus(size=200, resolution=16, seed=0, object_word="description")
    seen = {o.word for i in range(len(corpus)) for o in corpus[i].objects}
    assert len(seen) > 30
    described = {" ".join([c[1]] + ([] if c[2] == "plain" else [c[2]]) + [c[0]]) for c in HELDOUT_COMBOS}
    assert not seen & described


def test_reference_picture_cuts_out_the_object():
    image = np.zeros((10, 10, 3), dtype=np.uint8)
    image[2:4, 3:8] = 200
    mask = image[..., 0] > 0
    ref = reference_picture(image, mask, fill=9)
    assert ref.shape == (5, 5, 3)
    assert (ref[1:3] == 200).all() and (ref[0] == 9).all() and (ref[3:] == 9).all()


def test_micro_steps_draw_the_same_items_from_any_start():
    """A resumed loader (start > 0) hands out exactly the items an uninterrupted one gives that step."""
    from functools import partial

    from conceptkit.training.module import batch_indices

    corpus = ShapeWorldCorpus(size=6, resolution=16)
    draw = partial(batch_indices, 0, 0, batch_size=4, count=len(corpus))
    full, resumed = CorpusMicroSteps(corpus, draw, 0, 5), CorpusMicroSteps(corpus, draw, 2, 5)
    micro, indices, items = resumed[0]
    assert micro == 2 and torch.equal(indices, full[2][1]) and len(items) == 4
    assert [i.caption for i in items] == [corpus[int(k)].caption for k in indices]
    assert not torch.equal(full[0][1], full[1][1])  # another step, other items


def _write_corpus(folder, lines):
    Image.fromarray(np.full((8, 12, 3), 50, dtype=np.uint8)).save(folder / "a.png")
    mask = np.zeros((8, 12), dtype=np.uint8)
    mask[1:4, 2:6] = 255
    Image.fromarray(mask).save(folder / "a_dog.png")
    (folder / "corpus.jsonl").write_text("\n".join(json.dumps(x) if not isinstance(x, str) else x for x in lines) + "\n")


def test_jsonl_corpus_loads_masks_and_boxes(tmp_path):
    _write_corpus(tmp_path, [{"image": "a.png", "caption": "a dog next to a mug",
                              "objects": [{"word": "dog", "mask": "a_dog.png"}, {"word": "mug", "box": [6, 2, 10, 7]}]}])
    item = JsonlCorpus(tmp_path)[0]
    assert item.caption == "a dog next to a mug" and [o.word for o in item.objects] == ["dog", "mug"]
    assert item.objects[0].span == (2, 5) and item.objects[1].span == (16, 19)
    assert item.objects[0].mask.sum() == 12 and item.objects[1].mask.sum() == 20
    assert item.objects[1].reference.shape == (5, 5, 3)


@pytest.mark.parametrize("line,message", [
    ("{not json", "corpus.jsonl:1: not valid JSON"),
    ({"image": "a.png", "caption": "a dog"}, "corpus.jsonl:1: field 'objects' is missing"),
    ({"image": "gone.png", "caption": "a dog", "objects": []}, "corpus.jsonl:1: image 'gone.png' not found"),
    ({"image": "a.png", "caption": "a dog", "objects": [{"word": "cat", "box": [0, 0, 2, 2]}]},
     "corpus.jsonl:1: objects\\[0\\] word 'cat' is not in the caption"),
    ({"image": "a.png", "caption": "a dog", "objects": [{"word": "dog"}]},
     "corpus.jsonl:1: objects\\[0\\] needs exactly one of 'mask'"),
    ({"image": "a.png", "caption": "a dog", "objects": [{"word": "dog", "box": [5, 0, 2, 2]}]},
     "corpus.jsonl:1: objects\\[0\\] box must be"),
])
def test_jsonl_corpus_bad_lines_name_the_file_and_line(tmp_path, line, message):
    _write_corpus(tmp_path, [line])
    with pytest.raises(UserError, match=message):
        JsonlCorpus(tmp_path)


def test_jsonl_corpus_wrong_mask_size_names_the_line(tmp_path):
    _write_corpus(tmp_path, [{"image": "a.png", "caption": "x", "objects": []},
                             {"image": "a.png", "caption": "a dog", "objects": [{"word": "dog", "mask": "small.png"}]}])
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(tmp_path / "small.png")
    corpus = JsonlCorpus(tmp_path)
    with pytest.raises(UserError, match="corpus.jsonl:2: objects\\[0\\] mask is 4x4, the image 12x8"):
        corpus[1]


def test_hungarian_matching_on_a_known_cost_matrix():
    cost = np.array([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]])
    # greedy per row would give rows 0 and 1 the same column 1; the optimum is 0->1, 1->0, 2->2 (total 5)
    assert [(m.row, m.column) for m in hungarian(cost)] == [(0, 1), (1, 0), (2, 2)]
    assert sum(m.score for m in hungarian(cost)) == 5.0
    similarity = np.array([[0.9, 0.8], [0.85, 0.1], [0.2, 0.3]])  # 3 references, 2 segments
    matches = match_by_similarity(similarity)
    assert [(m.row, m.column) for m in matches] == [(0, 1), (1, 0)]  # reference 2 gets no segment
    assert [(m.row, m.column) for m in match_by_similarity(similarity, min_similarity=0.82)] == [(1, 0)]
    with pytest.raises(ValueError, match="NaN"):
        hungarian([[np.nan]])


def _write_clip_corpus(folder, frames=12, lines=None):
    import imageio.v3 as iio

    clip = np.full((frames, 32, 32, 3), 40, dtype=np.uint8)
    for f in range(frames):
        clip[f, 8:16, 2 + f:10 + f] = (200, 30, 30)  # a red block moving right
    iio.imwrite(folder / "run.gif", clip, duration=100, loop=0)
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[8:16, 2:10] = 255  # where the block is on the first frame
    Image.fromarray(mask).save(folder / "run_block.png")
    lines = lines or [{"video": "run.gif", "caption": "a block moving right on grey",
                       "objects": [{"word": "block", "mask": "run_block.png"}]}]
    (folder / "corpus.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")


def test_jsonl_clip_corpus_takes_evenly_spaced_frames_with_first_frame_masks(tmp_path):
    _write_clip_corpus(tmp_path)
    item = JsonlCorpus(tmp_path, frames=5)[0]
    assert item.video.shape == (5, 32, 32, 3) and np.array_equal(item.image, item.video[0])
    red = [np.argwhere((frame[..., 0] > 150) & (frame[..., 1] < 80))[:, 1].min() for frame in item.video]
    assert red == [2, 5, 8, 10, 13]  # frames 0, 3, 6, 8, 11 of 12: evenly spaced, first and last
    reference = item.objects[0].reference
    assert (reference[..., 0] > 150).mean() > 0.9  # the block, cut out of the first frame
    assert JsonlCorpus(tmp_path)[0].video is None  # an image backbone: the clip's first frame is the item


@pytest.mark.parametrize("line,message", [
    ({"image": "run_block.png", "caption": "a block", "objects": []}, "corpus.jsonl:1: a video backbone trains on clips"),
    ({"image": "x.png", "video": "run.gif", "caption": "a block", "objects": []}, "corpus.jsonl:1: needs exactly one"),
    ({"video": "gone.mp4", "caption": "a block", "objects": []}, "corpus.jsonl:1: video 'gone.mp4' not found"),
])
def test_jsonl_clip_corpus_bad_lines_name_the_file_and_line(tmp_path, line, message):
    _write_clip_corpus(tmp_path, lines=[line])
    with pytest.raises(UserError, match=message):
        JsonlCorpus(tmp_path, frames=5)


def test_jsonl_clip_corpus_too_short_a_clip_names_the_line(tmp_path):
    _write_clip_corpus(tmp_path, frames=3)
    with pytest.raises(UserError, match=r"corpus.jsonl:1: video 'run.gif' has 3 frames, 5 are asked for \(data.frames\)"):
        JsonlCorpus(tmp_path, frames=5)[0]
