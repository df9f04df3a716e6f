"""Optional automatic captions from an image-to-text model (`data.captioner=<hub id or local folder>`).

ConceptPrism initialises each residual group from a caption of its image (the official code asks a VLM
for 8-32 words on subject, background, lighting and style); BiCo asks a VLM (`method.vlm`) for its
training prompts. Any transformers model of the image-text-to-text family works: chat VLMs
(Qwen2.5-VL, ...) get the instruction through their chat template, captioners without one (BLIP, ...)
get no instruction (they caption best unprompted). Only files with no caption from a sidecar or
`data.captions` are captioned.

A model is loaded once into a `VisionLanguageModel` (`load_vlm`), which `caption_images` takes as well
as a name: a caller with several questions for one model (BiCo: a clip's prompts, then one per frame)
loads it once and calls `release()` when done, so a 7B VLM does not stay beside the backbone. One item
of `caption_images` is one message: a single image, or a list of images (e.g. frames of one clip, in
time order) that a chat VLM sees together; a model without a chat template sees the first of them.

Decoding is greedy unless the caller passes a sampling `Decoding` (BiCo: the official code samples its
prompts). Sampling is seeded per message and leaves the global torch RNG as it was, so the same
settings write the same answers and training's random stream does not depend on whether a VLM ran.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from conceptkit.errors import UserError

DEFAULT_INSTRUCTION = ("Describe this image in one sentence of 8 to 32 words: the subject, the background, "
                       "the lighting and the style.")


@dataclass(frozen=True)
class Decoding:
    """How `generate` picks tokens: greedy (`sample=False`, the other fields unused), or sampled with
    temperature / top-k / top-p from the torch RNG seeded with `seed` (so an answer reproduces)."""

    sample: bool = False
    temperature: float = 1.0
    top_k: int = 50  # 0: no top-k cut (transformers' convention)
    top_p: float = 1.0
    seed: int = 0

    def generate_kwargs(self) -> dict:
        if not self.sample:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p}

    def for_item(self, index: int) -> Decoding:
        """The decoding of message `index` of a batch: its own seed, so messages do not share one random
        stream and an item's answer does not depend on the items before it (the official code: seed + i)."""
        return replace(self, seed=self.seed + index) if self.sample else self


GREEDY = Decoding()


@dataclass
class VisionLanguageModel:
    """A loaded image-text-to-text model: its processor, its network (eval mode) and their device."""

    name: str
    processor: Any
    network: Any
    device: Any  # torch.device

    @property
    def chat(self) -> bool:
        """Chat VLMs (Qwen2.5-VL, ...) take the instruction and several images through their chat template."""
        return getattr(self.processor, "chat_template", None) is not None

    @property
    def released(self) -> bool:
        return self.network is None

    def release(self) -> None:
        """Drop the weights so their memory can go back (the GPU cache too): a 7B VLM is ~16 GB in bf16."""
        self.network = self.processor = None
        if getattr(self.device, "type", None) == "cuda":
            import gc

            import torch

            gc.collect()  # a model can sit in reference cycles: collect them, or the cache keeps their tensors
            torch.cuda.empty_cache()


SHIPPED_VLMS = ("shapes_qwen25vl",)  # trained by `conceptkit pretrain vlm=<name>`, shipped in the package


def resolve_vlm(model: str, setting: str) -> str:
    """A shipped VLM's name -> its package folder (a local folder of that name wins); other names as given.
    A shipped name whose weights are missing: one line saying how to train them."""
    from conceptkit.backbones.base import shipped_vlm_folder

    model = str(model)
    if model not in SHIPPED_VLMS or Path(model).exists():
        return model
    folder = shipped_vlm_folder(model)
    if not (folder / "config.json").exists():
        raise UserError(f"{setting}={model}: the shipped ShapeWorld VLM is missing from {folder}; train it with "
                        f"conceptkit pretrain vlm={model}")
    return str(folder)


def load_vlm(model: str, setting: str = "data.captioner") -> VisionLanguageModel:
    """Load `model` (hub id, local folder, or a shipped name: SHIPPED_VLMS) once. `setting` names the
    config key in the one-line error."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    name, model = str(model), resolve_vlm(model, setting)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        processor = AutoProcessor.from_pretrained(model)
        network = AutoModelForImageTextToText.from_pretrained(
            model, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32).to(device).eval()
    except (OSError, ValueError) as error:
        raise UserError(f"{setting}: cannot load captioning model {model!r} ({type(error).__name__}); "
                        f"point it at a local folder or set {setting}=null") from None
    return VisionLanguageModel(name=name, processor=processor, network=network, device=device)


def chat_content(text: str, images: int, text_first: bool = False) -> list[dict]:
    """One user turn's content for a chat template: an image entry per picture (the template writes a
    vision span for each, the processor expands it to that picture's patch tokens) and the text, after
    the pictures (captioning's order) or, `text_first`, before them (BindWeave's MLLM turn)."""
    pictures, words = [{"type": "image"} for _ in range(images)], [{"type": "text", "text": text}]
    return words + pictures if text_first else pictures + words


def describe(vlm: VisionLanguageModel, images: list, instruction: str, max_new_tokens: int,
             decoding: Decoding = GREEDY, text_first: bool = False) -> str | None:
    """The model's answer to one message holding `images` (one or more, in order) and the instruction
    (after them; `text_first`: before them, BindWeave's order): its non-empty lines, or None when it
    answers nothing. Greedy by default; a sampling `decoding` reproduces through its seed."""
    import torch

    if vlm.released:
        raise RuntimeError(f"the vision-language model {vlm.name!r} was released; load it again")
    if vlm.chat:
        content = chat_content(instruction, len(images), text_first)
        text = vlm.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    else:
        images, text = images[:1], ""  # plain captioners take one image and caption best unprompted
    inputs = vlm.processor(images=images, text=text, return_tensors="pt").to(vlm.device)
    with torch.no_grad():
        generated = generate_answer(vlm, inputs, max_new_tokens, decoding)
    # A chat model's output starts with the prompt it was given: keep only the answer.
    prompt_length = inputs["input_ids"].shape[1] if vlm.chat and "input_ids" in inputs else 0
    answer = vlm.processor.batch_decode(generated[:, prompt_length:], skip_special_tokens=True)[0]
    # Lines are kept (a list of prompts is one per line); spaces within a line are normalised.
    lines = (" ".join(line.split()) for line in answer.splitlines())
    return "\n".join(line for line in lines if line) or None


def generate_answer(vlm: VisionLanguageModel, inputs, max_new_tokens: int, decoding: Decoding):
    """The network's `generate` with `decoding`'s settings. Sampling draws from the global torch RNG
    (transformers' generate takes no torch.Generator), so it runs inside fork_rng: seeded for this
    message, and the caller's RNG states are restored afterwards."""
    import torch

    kwargs = dict(max_new_tokens=max_new_tokens, **decoding.generate_kwargs())
    if not decoding.sample:
        return vlm.network.generate(**inputs, **kwargs)
    # torch.manual_seed seeds every CUDA device, not only the VLM's: fork (and so restore) them all.
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(decoding.seed)
        return vlm.network.generate(**inputs, **kwargs)


def caption_images(images: list, model: str | VisionLanguageModel, instruction: str | list[str] = DEFAULT_INSTRUCTION,
                   max_new_tokens: int = 48, setting: str = "data.captioner",
                   decoding: Decoding = GREEDY) -> list[str | None]:
    """One answer per item of `images`: an item is one image, or a list of images shown in one message.
    `instruction` is one for every item, or a list with one per item. `model` is a name (loaded here,
    released after; `setting` names it in a loading error) or a loaded VisionLanguageModel (the
    caller's: left open). Item i decodes with `decoding.for_item(i)` (sampling: seed + i)."""
    instructions = [instruction] * len(images) if isinstance(instruction, str) else list(instruction)
    if len(instructions) != len(images):
        raise ValueError(f"caption_images got {len(instructions)} instructions for {len(images)} items")
    vlm = model if isinstance(model, VisionLanguageModel) else load_vlm(model, setting)
    try:
        return [describe(vlm, item if isinstance(item, (list, tuple)) else [item], text, max_new_tokens,
                         decoding.for_item(i))
                for i, (item, text) in enumerate(zip(images, instructions))]
    finally:
        if vlm is not model:
            vlm.release()


def fill_missing_captions(files: list[Path], captions: list[str | None], model: str) -> list[str | None]:
    from PIL import Image

    from conceptkit.data import VIDEO_SUFFIXES

    missing = [i for i, c in enumerate(captions) if c is None]
    if not missing:
        return captions
    images = []
    for i in missing:
        if files[i].suffix.lower() in VIDEO_SUFFIXES:
            import imageio.v3 as iio

            images.append(Image.fromarray(iio.imread(files[i], index=0)[..., :3]))
        else:
            with Image.open(files[i]) as image:
                images.append(image.convert("RGB"))
    filled = list(captions)
    for i, caption in zip(missing, caption_images(images, model)):
        filled[i] = " ".join(caption.split()) if caption else None  # a caption is one line
    return filled
