"""Diversified training prompts for one concept source, and the per-frame prompts of a video concept.

The official pipeline asks Qwen2.5-VL-7B-Instruct first for the concept phrases of a source (for a
video: spatial phrases -- objects, colours, style -- and temporal ones -- motion), then for 60 prompts
written from the source and those phrases, sampled (temperature 0.7, top-k 50, top-p 0.95). conceptkit
asks the vision-language model the user configures (`method.vlm`: a hub id or local folder, any
transformers image-text-to-text model, through conceptkit.captioning), with the decoding the caller
passes (BiCo: sampled and seeded, or greedy), or, without one, varies the wording offline with fixed
templates around the description (and warns: the offline prompts vary the frame, not the content, so
the binders see less diverse text).

What the VLM sees: an image source, its image (INSTRUCTION, one call); a video source, several evenly
spaced frames of the clip in one message, in time order: first for its concept phrases
(PHRASES_INSTRUCTION, two lines "spatial: ..." / "temporal: ...", parsed by `parse_concept_phrases`),
then for its prompts (`clip_instruction`: both phrase lists, and the subject, appearance and motion;
without usable phrases, CLIP_INSTRUCTION as before). Several images rather than a video input: every
chat VLM that takes images takes several (the same processor call as one image, in every transformers
version), each frame keeps its full resolution (Qwen2.5-VL's video input fuses pairs of frames into
one patch), and a few frames cost few tokens. A model without a chat template (BLIP, ...) sees the
first frame only.

`vlm` is a name (loaded for the call, then released) or a loaded conceptkit.captioning.VisionLanguageModel
(the caller's: BiCo loads the model once per concept and asks it for the clips' phrases, the clip's
prompts and then every frame's).

Video concepts train their first stage on the clip's frames as images (temporal disentanglement).
The official code gives every frame its own prompt, written by the VLM from that frame and the
clip's spatial concept phrases only (motion phrases removed): `frame_instruction` does the same.
`per_frame_prompts` returns one list of candidate prompts per frame: the user's `method.frame_prompts`
(every frame draws from it), else the VLM's one prompt per frame, else still-image wordings derived
from the clip's prompts: the user's `method.prompts`, or the offline templates (without the one that
says "video") around the description and that clip's caption.
"""

from __future__ import annotations

import json
import re
import warnings
from typing import TYPE_CHECKING

from conceptkit.captioning import GREEDY, Decoding
from conceptkit.errors import UserError
from conceptkit.vlm_requests import (INSTRUCTION, PHRASES_INSTRUCTION, SPATIAL, TEMPORAL, clip_instruction,
                                     frame_instruction, parse_prompt_lines)

if TYPE_CHECKING:  # annotations only
    from conceptkit.captioning import VisionLanguageModel

# Offline wordings [ours]: each wraps the description; cycled (with the caption when one exists).
TEMPLATES = (
    "{d}", "a photo of {d}", "a picture of {d}", "a close-up of {d}", "a video of {d}", "{d}, high quality",
    "a detailed shot of {d}", "a cinematic shot of {d}", "a clear view of {d}", "an image showing {d}",
    "{d} in natural light", "a wide shot of {d}", "a realistic rendering of {d}", "a frame showing {d}",
    "a snapshot of {d}",
)

# Still-image wordings for a clip's frames: a frame is an image, so no template that says "video".
STILL_TEMPLATES = tuple(t for t in TEMPLATES if "video" not in t)

# The requests' texts (INSTRUCTION, CLIP_INSTRUCTION, ...) live in the core, conceptkit.vlm_requests: the
# ShapeWorld VLM is trained to answer them.
MAX_PHRASE_WORDS = 8  # a concept phrase is a word or a few; a longer piece is a sentence, not a phrase [ours]


def offline_prompts(description: str, caption: str | None, count: int) -> list[str]:
    bases = [description] + ([caption] if caption and caption != description else [])
    prompts = []
    for i in range(count):
        template = TEMPLATES[i % len(TEMPLATES)]
        base = bases[(i // len(TEMPLATES)) % len(bases)]
        prompts.append(template.format(d=base))
    return prompts


def _clean_phrases(items) -> list[str]:
    """Phrases from a comma / semicolon separated string or a list: stripped of quotes, brackets and
    markdown, "none" and over-long pieces dropped, duplicates (any case) dropped, order kept."""
    pieces = re.split(r"[,;]", items) if isinstance(items, str) else [str(item) for item in items]
    phrases, seen = [], set()
    for piece in pieces:
        phrase = " ".join(piece.strip(" \t\"'`*[]{}().").split())
        if not phrase or phrase.lower() in ("none", "n/a", "-") or len(phrase.split()) > MAX_PHRASE_WORDS:
            continue
        if phrase.lower() not in seen:
            seen.add(phrase.lower())
            phrases.append(phrase)
    return phrases


def _labelled_json(text: str) -> dict | None:
    """The official code's answer format: a JSON object with "spatial" and "temporal" lists."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        return None
    try:
        value = json.loads(text[start:end + 1])
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict):
        return None
    found = {str(key).strip().lower(): item for key, item in value.items()}
    return {label: found[label] for label in (SPATIAL, TEMPORAL) if isinstance(found.get(label), (str, list))}


def _labelled_lines(text: str) -> dict:
    """Lines "spatial: a, b" / "temporal: c" (any case; markdown, quotes or a word like "concepts"
    around the label allowed, so the code's JSON lines read too when the object is not valid JSON);
    the first line of each label wins."""
    found = {}
    for line in text.splitlines():
        match = re.match(r"^[\s*#\"'\-\u2022]*(spatial|temporal)\b[^:]{0,20}:(.*)$", line, re.IGNORECASE)
        if match and match.group(1).lower() not in found:
            found[match.group(1).lower()] = match.group(2)
    return found


def parse_concept_phrases(text: str | None) -> dict[str, list[str]] | None:
    """A VLM answer to PHRASES_INSTRUCTION -> {"spatial": [...], "temporal": [...]}, or None when it is
    not usable: both labels must be there (an answer without one did not follow the format, or was cut
    off) and at least one spatial phrase; an empty temporal list ("temporal: none", a still clip) is
    an answer. Two labelled lines, or the official code's JSON object."""
    if not text:
        return None
    found = _labelled_json(text) or _labelled_lines(text)
    if SPATIAL not in found or TEMPORAL not in found:
        return None
    phrases = {label: _clean_phrases(found[label]) for label in (SPATIAL, TEMPORAL)}
    return phrases if phrases[SPATIAL] else None


def vlm_name(vlm: str | VisionLanguageModel) -> str:
    """The name a warning shows for `method.vlm`, given as a name or as a loaded model."""
    return str(getattr(vlm, "name", vlm))


def concept_phrases(clips: list[list], vlm: str | VisionLanguageModel) -> list[dict[str, list[str]] | None]:
    """Each clip's spatial and temporal concept phrases (one message per clip: its frames in time order),
    None for a clip whose answer is not usable (one warning for all of them). Greedy decoding [ours]:
    the phrases are the VLM's most likely reading; the variety comes from the prompts written after."""
    from conceptkit.captioning import caption_images

    instructions = [PHRASES_INSTRUCTION.format(frames=len(clip)) for clip in clips]
    answers = caption_images([list(clip) for clip in clips], vlm, instruction=instructions, max_new_tokens=160,
                             setting="method.vlm")
    phrases = [parse_concept_phrases(answer) for answer in answers]
    failed = sum(1 for p in phrases if p is None)
    if failed:
        warnings.warn(f"method.vlm {vlm_name(vlm)!r} gave no usable spatial / temporal concept phrases for {failed} "
                      f"of {len(clips)} clips; their prompts are written without them", stacklevel=2)
    return phrases


def diversified_prompts(description: str, caption: str | None, count: int, vlm: str | VisionLanguageModel | None,
                        image=None, own: list[str] | None = None, clip: list | None = None,
                        phrases: dict[str, list[str]] | None = None, decoding: Decoding = GREEDY) -> list[str]:
    """The training prompts: the user's own list, else the VLM's, else the offline fallback.
    The VLM sees `clip` (frames of a video source, in time order, with its concept `phrases` when
    known) when given, else `image`; it decodes with `decoding`."""
    if own:
        prompts = [str(p).strip() for p in own if str(p).strip()]
        if not prompts:
            raise UserError("method.prompts is a list of empty strings; give training prompts or set it to null")
        return prompts
    if count < 1:
        raise UserError(f"method.prompt_count must be at least 1, got {count}")
    if vlm:
        from conceptkit.captioning import caption_images

        if clip:
            message, instruction = list(clip), clip_instruction(len(clip), count, phrases)
        else:
            message, instruction = image, INSTRUCTION.format(count=count)
        answer = caption_images([message], vlm, instruction=instruction, max_new_tokens=60 * count,
                                setting="method.vlm", decoding=decoding)[0] or ""
        prompts = parse_prompt_lines(answer, count)
        if prompts:
            return prompts
        warnings.warn(f"method.vlm {vlm_name(vlm)!r} returned no usable prompts; using the offline wordings",
                      stacklevel=2)
    else:
        warnings.warn("method.vlm is not set: BiCo's training prompts are offline template wordings of the "
                      "description (less diverse than the paper's VLM prompts); set method.vlm=<Qwen2.5-VL id or "
                      "folder> or method.prompts=[...]", stacklevel=2)
    return offline_prompts(description, caption, count)


def still_prompts(description: str, caption: str | None) -> list[str]:
    """Offline wordings of one clip's frames: every still template around the description and the caption."""
    bases = [description] + ([caption] if caption and caption != description else [])
    return [template.format(d=base) for base in bases for template in STILL_TEMPLATES]


def per_frame_prompts(description: str, captions: list[str | None], frames: int,
                      vlm: str | VisionLanguageModel | None = None, images: list | None = None,
                      own: list[str] | None = None, clip_prompts: list[str] | None = None,
                      phrases: list[dict[str, list[str]] | None] | None = None,
                      decoding: Decoding = GREEDY) -> list[list[str]]:
    """Stage-1 prompts of a video concept: one candidate list per frame, clip by clip (frame k of clip n
    at n * frames + k). `images` (PIL, same order) are needed only when the VLM writes them; it is
    given each clip's spatial phrases from `phrases` (one entry per clip, None: unknown) and decodes
    frame i with `decoding.for_item(i)`."""
    count = len(captions) * frames
    if own:
        pool = [str(p).strip() for p in own if str(p).strip()]
        if not pool:
            raise UserError("method.frame_prompts is a list of empty strings; give still-image prompts or set it to null")
        return [list(pool) for _ in range(count)]
    clip_pool = [str(p).strip() for p in clip_prompts or [] if str(p).strip()]

    def derived(k: int) -> list[str]:
        return list(clip_pool) if clip_pool else still_prompts(description, captions[k // frames])

    if vlm:
        from conceptkit.captioning import caption_images

        clip_phrases = list(phrases or [])
        instructions = [frame_instruction(clip_phrases[k // frames] if k // frames < len(clip_phrases) else None)
                        for k in range(count)]
        answers = caption_images(list(images), vlm, instruction=instructions, max_new_tokens=80,
                                 setting="method.vlm", decoding=decoding)
        written = [parse_prompt_lines(answer or "", 1) for answer in answers]
        prompts = [lines or derived(k) for k, lines in enumerate(written)]
        failed = sum(1 for lines in written if not lines)
        if failed:
            warnings.warn(f"method.vlm {vlm_name(vlm)!r} wrote no usable prompt for {failed} of {count} frames; "
                          f"those frames train with prompts derived from the clip's", stacklevel=2)
        return prompts
    source = ("method.prompts (motion words included)" if clip_pool
              else "offline still-image wordings of the description and caption")
    warnings.warn(f"this video concept's frames (stage 1) train with {source}, not per-frame prompts; set "
                  f"method.frame_prompts=[...] (still-image wording, no motion) or method.vlm=<Qwen2.5-VL id or folder>",
                  stacklevel=2)
    return [derived(k) for k in range(count)]
