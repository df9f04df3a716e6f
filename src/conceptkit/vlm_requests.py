"""What a vision-language model is asked about a concept's pictures, and how a list answer is read.

BiCo asks these (methods/bico/diversify.py: its prompts, concept phrases and per-frame prompts); the
ShapeWorld VLM (`conceptkit pretrain vlm=shapes_qwen25vl`) is trained to answer exactly them, so the
texts live here, in the core, where both read them.
"""

from __future__ import annotations

import re

INSTRUCTION = ("Write {count} different prompts for a text-to-video model that would reproduce what this image "
               "shows: the subject, its appearance and its surroundings. Each prompt one sentence of 10 to 40 "
               "words, varied in wording. One prompt per line, no numbering.")

CLIP_INSTRUCTION = ("These {frames} images are frames of one video clip, in time order. Write {count} different "
                    "prompts for a text-to-video model that would reproduce this video: the subject, its appearance, "
                    "its surroundings and its motion (how it moves or changes over the clip). Each prompt one "
                    "sentence of 10 to 40 words, varied in wording. One prompt per line, no numbering.")

FRAME_INSTRUCTION = ("Write one prompt for a text-to-image model that would reproduce this still frame of a video: "
                     "the subject, its appearance and its surroundings. Describe what is visible, not motion or "
                     "change over time. One sentence of 10 to 40 words, no numbering.")

# The official code asks for JSON ({"spatial": [...], "temporal": [...]}); two labelled lines [ours] are
# shorter to ask for and parse line by line even when an answer is cut off or wrapped in other text
# (an answer in the code's JSON is read too).
PHRASES_INSTRUCTION = ("These {frames} images are frames of one video clip, in time order. List the concepts that "
                       "compose this video as short phrases of one to a few words, in exactly two lines:\n"
                       "spatial: the subject, its appearance and its surroundings (objects, colours, materials, style)\n"
                       "temporal: the motion (how the subject moves or changes over the clip, camera movement)\n"
                       "Phrases separated by commas; write none on a line with nothing to list. No other text.")

CLIP_PHRASES_INSTRUCTION = ("These {frames} images are frames of one video clip, in time order. Its spatial concepts "
                            "(the subject, its appearance and its surroundings): {spatial}. Its temporal concepts "
                            "(its motion): {temporal}. Write {count} different prompts for a text-to-video model that "
                            "would reproduce this video, each built from these concepts (rearranged or paraphrased, "
                            "true to the frames): the subject, its appearance, its surroundings and its motion. Each "
                            "prompt one sentence of 10 to 40 words, varied in wording. One prompt per line, no "
                            "numbering.")

# Spatial phrases only: a frame's prompt describes a still image (official: the temporal phrases are removed).
FRAME_PHRASES_INSTRUCTION = ("This image is a still frame of a video whose spatial concepts (the subject, its "
                             "appearance and its surroundings) are: {spatial}. Write one prompt for a text-to-image "
                             "model that would reproduce this frame, built from these concepts where the frame shows "
                             "them. Describe what is visible, not motion or change over time. One sentence of 10 to "
                             "40 words, no numbering.")

SPATIAL, TEMPORAL = "spatial", "temporal"


def parse_prompt_lines(text: str, count: int) -> list[str]:
    """A VLM answer -> up to `count` prompts: one per non-empty line, list markers stripped."""
    prompts = []
    for line in text.splitlines():
        line = re.sub(r"^\s*(?:[-*\u2022]|\d+[.):])\s*", "", line).strip().strip('"').strip()
        if len(line.split()) >= 3:
            prompts.append(line)
    return prompts[:count]


def _listed(phrases: list[str]) -> str:
    return ", ".join(phrases) if phrases else "none"


def clip_instruction(frames: int, count: int, phrases: dict[str, list[str]] | None = None) -> str:
    """What the VLM is asked for a clip's prompts: with the clip's spatial and temporal phrases when
    known, else the phrase-free CLIP_INSTRUCTION."""
    if phrases is None:
        return CLIP_INSTRUCTION.format(frames=frames, count=count)
    return CLIP_PHRASES_INSTRUCTION.format(frames=frames, count=count, spatial=_listed(phrases[SPATIAL]),
                                           temporal=_listed(phrases[TEMPORAL]))


def frame_instruction(phrases: dict[str, list[str]] | None = None) -> str:
    """What the VLM is asked for one frame's prompt: with its clip's spatial phrases only (never the
    temporal ones) when known, else the phrase-free FRAME_INSTRUCTION."""
    if phrases is None:
        return FRAME_INSTRUCTION
    return FRAME_PHRASES_INSTRUCTION.format(spatial=_listed(phrases[SPATIAL]))
