"""What every backbone offers methods, independent of the family.

A backbone holds frozen diffusers/transformers modules and exposes: prompt encoding through the
token table, media -> latent encoding, the training objective (noisy input and target), one denoiser
call, sampling with classifier-free guidance, attention sites and hooks, and PEFT LoRA adapters by
owner. Methods only talk to this surface; they never name a backbone class.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from conceptkit.attention import AttentionHooks, AttentionSite, ContextRows
from conceptkit.errors import UserError
from conceptkit.tokens import TokenizedPrompts, TokenTable


@dataclass
class LatentDistribution:
    """Cached VAE posterior of the training media: latents are drawn from it every step, so the VAE
    encoder runs once but training still sees posterior samples, as the official code does."""

    mean: torch.Tensor
    std: torch.Tensor

    def sample(self, index: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        # index: a CPU tensor (TrainBatch.indices); host->device copies without a blocking stream sync
        index = index.to(self.mean.device, non_blocking=True)
        mean, std = self.mean[index], self.std[index]
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device, non_blocking=True)
        return mean + std * noise

    def to(self, device) -> "LatentDistribution":
        return LatentDistribution(self.mean.to(device), self.std.to(device))


@dataclass
class SamplingStep:
    """What a `generate` callback sees at one sampling step, before the sampler steps.

    `predict()` runs this step's guided prediction again under the caller's grad mode (so guidance can
    backpropagate into tensors its hooks read, e.g. a visual prompt's appearance tokens) and returns
    (guided prediction, x0: the clean latents it implies). A callback that changes its hooks' tensors
    changes the prediction the sampler then steps with: generate predicts after every callback ran."""

    index: int  # 0 .. steps-1
    timestep: torch.Tensor  # the sampler's timestep (scalar)
    latents: torch.Tensor  # the sampler's latents entering this step (N, ...)
    backbone: "Backbone"
    context: torch.Tensor  # the guided batch's context [negative rows | prompt rows]
    guidance: float
    sampler: object

    def predict(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.backbone.guided_prediction(self.latents, self.timestep, self.context, self.guidance, self.sampler)


@dataclass
class NoisyBatch:
    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor


def shipped_weights_folder(name: str):
    """Where the ShapeWorld toy backbones' weights live inside the package (diffusers format)."""
    from importlib import resources
    from pathlib import Path

    return Path(str(resources.files("conceptkit"))) / "assets" / "backbones" / name


def shipped_encoder_folder(name: str):
    """Where the ShapeWorld auxiliary encoders ship inside the package (conceptkit.encoders formats)."""
    from importlib import resources
    from pathlib import Path

    return Path(str(resources.files("conceptkit"))) / "assets" / "encoders" / name


def shipped_vlm_folder(name: str):
    """Where the ShapeWorld vision-language model ships inside the package (a transformers folder)."""
    from importlib import resources
    from pathlib import Path

    return Path(str(resources.files("conceptkit"))) / "assets" / "vlms" / name


class Backbone:
    """Base for the backbone families. Construction is cheap (config only); `load()` builds modules."""

    family: ClassVar[str]
    default_frames: int = 1
    is_video: ClassVar[bool] = False
    vae_in_float32: ClassVar[bool] = False
    default_guidance: ClassVar[float] = 7.5

    ARCHITECTURES: ClassVar[tuple[str, ...]] = ("full", "shapes", "tiny")
    RESOLUTIONS: ClassVar[dict[str, int]]  # default resolution per architecture

    def __init__(self, *, architecture: str, weights: str, pretrained: str, path: str | None, revision: str | None,
                 dtype: str, resolution: int | None, max_text_tokens: int, seed: int):
        if architecture not in self.ARCHITECTURES:
            raise UserError(f"backbone.architecture must be one of {', '.join(self.ARCHITECTURES)}, got {architecture!r}")
        if weights not in ("pretrained", "random"):
            raise UserError(f"backbone.weights must be 'pretrained' or 'random', got {weights!r}")
        if architecture == "tiny" and weights == "pretrained":
            raise UserError("backbone.architecture=tiny has no pretrained weights: use weights=random (seeded)")
        self.architecture = architecture
        self.weights = weights
        self.pretrained = pretrained
        self.path = path
        self.revision = revision
        self.dtype_name = dtype
        self.resolution = resolution or self.RESOLUTIONS[architecture]
        self.max_text_tokens = max_text_tokens
        self.seed = seed
        self.loaded = False
        self.hooks = AttentionHooks()
        self._lora_owners: list[str] = []
        self._image_encoder = None  # built on first use (image_encoder())
        self._auxiliary: dict[tuple[str, str], object] = {}  # (kind, source) -> guidance model (auxiliary())

    # identity ---------------------------------------------------------------------------------
    def identity(self) -> dict:
        if self.weights == "random":
            source = f"random:{self.family}-{self.architecture}:seed{self.seed}"
        elif self.architecture == "shapes" and not self.path:
            source = f"conceptkit:{self.family}_shapes"  # the shipped weights, wherever the package is installed
        else:
            source = self._source()
        return {"family": self.family, "id": source, "revision": self.revision}

    def config(self) -> dict:
        """Constructor arguments: artifacts store them so `compose` can rebuild the same backbone."""
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.dtype_name]

    @property
    def vae_dtype(self) -> torch.dtype:
        """Wan keeps its VAE in float32 whatever the other parts use (as WanPipeline does)."""
        return torch.float32 if self.vae_in_float32 else self.dtype

    # loading ----------------------------------------------------------------------------------
    def load(self) -> "Backbone":
        if self.loaded:
            return self
        if self.weights == "random":
            with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
                torch.manual_seed(self.seed)
                self._build_random_modules()
        else:
            self._load_pretrained_modules(self._source())
        for module in self.frozen_modules():
            module.requires_grad_(False)
            module.eval()
            if self.weights != "pretrained":  # pretrained weights are loaded in their dtype directly
                module.to(dtype=self.vae_dtype if module is self.vae else self.dtype)
        self.tokens = TokenTable(self.tokenizer, self.input_embedding(),
                                 self.max_text_tokens, has_bos=self._tokenizer_has_bos())
        self._sites = self._install_attention_processors()
        self.loaded = True
        return self

    def _source(self) -> str:
        if self.path:
            return self.path
        if self.architecture == "shapes":
            return str(shipped_weights_folder(f"{self.family}_shapes"))
        return self.pretrained

    def _missing_weights(self, error: Exception) -> UserError:
        source = self._source()
        if self.architecture == "shapes" and not self.path:
            return UserError(f"the toy backbone weights {self.family}_shapes are not in this install ({source}); "
                             f"create them with: conceptkit pretrain backbone={self.family}_shapes")
        return UserError(
            f"backbone weights for {self.family} from {source!r} are not present and cannot be downloaded "
            f"({type(error).__name__}); download a diffusers-format copy where you have network and pass "
            f"backbone.path=/path/to/that/folder"
        )

    def frozen_modules(self) -> list[nn.Module]:
        return [self.text_encoder, self.denoiser, self.vae]

    def to(self, device) -> "Backbone":
        for module in self.frozen_modules():
            module.to(device)
        if self._image_encoder is not None:
            self._image_encoder.to(device)
        for model in self._auxiliary.values():
            model.to(device)
        return self

    # auxiliary encoders -----------------------------------------------------------------------
    image_encoder_name: str | None = None  # backbone.image_encoder (families that have one): None = the default

    def image_encoder_source(self) -> str:
        """The frozen image encoder of encoder methods (conceptkit.encoders): `backbone.image_encoder` if
        given; else a test-size CLIP for tiny, the shipped ShapeWorld encoder for the toys, ViT-H/14 at
        random for weights=random, and the family's own for real weights (`_pretrained_image_encoder`)."""
        if self.image_encoder_name:
            return self.image_encoder_name
        if self.architecture == "tiny":
            return "random:tiny"
        if self.architecture == "shapes":
            return str(shipped_encoder_folder("shapes_clip"))
        return "random:vit-h-14" if self.weights == "random" else self._pretrained_image_encoder()

    def _pretrained_image_encoder(self) -> str:
        raise UserError(f"backbone family {self.family} has no image encoder for encoder methods; use sd15 or wan21_i2v")

    def image_encoder(self):
        """The frozen image encoder encoder methods condition on (conceptkit.encoders), built on first
        use on this backbone's device. Never a submodule of a method: concepts do not store it."""
        if self._image_encoder is None:
            from conceptkit.encoders import load_image_encoder

            source = self.image_encoder_source()
            if self.architecture == "shapes" and source.startswith(str(shipped_encoder_folder(""))):
                from pathlib import Path

                if not Path(source).is_dir():
                    raise UserError(f"the ShapeWorld image encoder is not in this install ({source}); create it with: "
                                    f"conceptkit pretrain encoder=shapes_clip")
            self._image_encoder = load_image_encoder(source, seed=self.seed).to(self.device)
        return self._image_encoder

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    # attention --------------------------------------------------------------------------------
    def attention_sites(self) -> list[AttentionSite]:
        return list(self._sites)

    def auxiliary_default(self, kind: str) -> str:
        """The default source of a compositional-guidance model ("segmenter" or "identity")."""
        raise UserError(f"backbone family {self.family} has no compositional-guidance models yet; use sd15")

    def auxiliary(self, kind: str, source: str | None = None):
        """A frozen compositional-guidance model (conceptkit.encoders): the segmenter of generated
        images or the identity encoder of object crops, built once per source on this device."""
        from conceptkit.encoders import load_identity_encoder, load_segmenter

        source = source or self.auxiliary_default(kind)
        if (kind, source) not in self._auxiliary:
            if kind == "segmenter":
                model = load_segmenter(source, seed=self.seed)
            elif kind == "identity":
                encoder = self.image_encoder() if source == "image_encoder" else None
                model = load_identity_encoder(source, encoder, seed=self.seed)
            else:
                raise ValueError(f"unknown auxiliary model kind {kind!r}")
            self._auxiliary[(kind, source)] = model.to(self.device)
        return self._auxiliary[(kind, source)]

    # text -------------------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> TokenizedPrompts:
        return self.tokens.tokenize(texts)

    def encode_text(self, texts: list[str]) -> tuple[torch.Tensor, TokenizedPrompts]:
        tokenized = self.tokenize(texts)
        context = self.encode_tokens(tokenized)
        self.hooks.declare_rows(ContextRows.conditional(tokenized))  # what position-aware hooks read
        return context, tokenized

    def input_embedding(self) -> nn.Embedding:
        """The embedding module the text encoder's forward actually calls (where token hooks go)."""
        return self.text_encoder.get_input_embeddings()

    def text_embedding_matrix(self) -> torch.Tensor:
        return self.input_embedding().weight

    # LoRA (PEFT) ------------------------------------------------------------------------------
    def add_lora(self, owner: str, rank: int, alpha: float, target_modules: list[str], init: str | bool,
                 dropout: float = 0.0) -> dict[str, nn.Module]:
        """Inject a PEFT LoRA adapter named `owner` into the denoiser. Returns its trainable modules
        (lora_A / lora_B per target), keyed by module path, so the owning method can hold them."""
        from peft import LoraConfig
        from peft.tuners.tuners_utils import BaseTunerLayer

        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), init_lora_weights=init,
                            lora_dropout=dropout)
        with warnings.catch_warnings():
            # Several adapters at once is the point (composition); PEFT warns about it regardless.
            warnings.filterwarnings("ignore", ".*multiple adapters.*")
            self.denoiser.add_adapter(config, adapter_name=owner)
        self._lora_owners.append(owner)
        self._activate_loras()
        found: dict[str, nn.Module] = {}
        for name, module in self.denoiser.named_modules():
            if isinstance(module, BaseTunerLayer) and owner in module.lora_A:
                pair = nn.ModuleDict({"lora_A": module.lora_A[owner], "lora_B": module.lora_B[owner]})
                # Trainable weights stay float32 even on a bf16/fp16 backbone (PEFT casts inputs).
                found[name] = pair.to(device=self.device, dtype=torch.float32)
        return found

    def remove_lora(self, owner: str) -> None:
        if owner not in self._lora_owners:
            return
        self.denoiser.delete_adapters(owner)
        self._lora_owners.remove(owner)
        if self._lora_owners:
            self._activate_loras()
        else:
            # Last adapter gone: put the original Linear modules back so the denoiser is stock again.
            self.denoiser.unload_lora()

    def _activate_loras(self) -> None:
        self.denoiser.set_adapters(list(self._lora_owners))

    def lora_owners(self) -> list[str]:
        return list(self._lora_owners)

    # training objective ----------------------------------------------------------------------
    def make_noisy(self, latents: torch.Tensor, generator: torch.Generator | None,
                   timesteps: torch.Tensor | None = None) -> NoisyBatch:
        raise NotImplementedError

    def denoise(self, noisy: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # sampling ---------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: list[str], negative_prompt: str = "", steps: int = 25, guidance: float | None = None,
                 seed: int = 0, scheduler: str | None = None, height: int | None = None, width: int | None = None,
                 frames: int | None = None, initial_latents: torch.Tensor | None = None,
                 callbacks=()) -> torch.Tensor:
        """Returns media in [0, 1], shape (N, 3, F, H, W). Classifier-free guidance runs the
        unconditional and conditional rows as one batched denoiser call per step.

        `initial_latents` (N, ...): start from this noise instead of the seed's (regenerating "from the
        same noise"; `initial_noise` gives the seed's). `callbacks`: each is called with a `SamplingStep`
        before every sampler step and may steer it (see SamplingStep); they run in the order given."""
        guidance = self.default_guidance if guidance is None else guidance
        height = height or self.resolution
        width = width or self.resolution
        frames = frames or self.default_frames
        device = self.device
        context = self.guided_context(list(prompts), negative_prompt).to(device)
        sampler = self.sampling_scheduler(scheduler)
        sampler.set_timesteps(steps, device=device)
        if initial_latents is None:
            initial_latents = self.initial_noise(len(prompts), seed, height, width, frames)
        elif initial_latents.shape[0] != len(prompts):
            raise ValueError(f"initial_latents has {initial_latents.shape[0]} rows for {len(prompts)} prompts")
        latents = initial_latents.to(device) * getattr(sampler, "init_noise_sigma", 1.0)
        for index, t in enumerate(sampler.timesteps):
            for callback in callbacks:
                callback(SamplingStep(index, t, latents, self, context, guidance, sampler))
            with torch.no_grad():
                guided, _ = self.guided_prediction(latents, t, context, guidance, sampler)
                latents = sampler.step(guided, t, latents).prev_sample
        return self.decode(latents)

    def guided_context(self, prompts: list[str], negative_prompt: str) -> torch.Tensor:
        """The context of a guided batch, [negative rows | prompt rows], its rows declared for hooks."""
        context, tokenized = self.encode_text(prompts)
        negative, negative_tokens = self.encode_text([negative_prompt] * len(prompts))
        # Hooks that treat the unconditional rows differently (BiCo: no binders there) need to know them.
        self.hooks.declare_rows(ContextRows.guided(negative_tokens, tokenized))
        return torch.cat([negative, context])

    def initial_noise(self, n: int, seed: int = 0, height: int | None = None, width: int | None = None,
                      frames: int | None = None) -> torch.Tensor:
        """The starting noise `generate(..., seed=seed)` uses (CPU, float32)."""
        return self.initial_latents(n, height or self.resolution, width or self.resolution,
                                    frames or self.default_frames, torch.Generator().manual_seed(seed))

    def guided_prediction(self, latents: torch.Tensor, t: torch.Tensor, context: torch.Tensor, guidance: float,
                          sampler) -> tuple[torch.Tensor, torch.Tensor]:
        """One classifier-free-guided prediction at the sampler's latents (one batched denoiser call of
        [negative | prompt] rows) and the clean latents x0 it implies, in the caller's grad mode."""
        model_input = torch.cat([latents, latents])
        if hasattr(sampler, "scale_model_input"):
            model_input = sampler.scale_model_input(model_input, t)
        timestep = t.expand(model_input.shape[0]).to(latents.device)
        prediction = self.denoise(model_input.to(self.dtype), timestep, context).float()
        uncond, cond = prediction.chunk(2)
        guided = uncond + guidance * (cond - uncond)
        clean = self.predicted_clean(model_input.chunk(2)[1].float(), timestep[: latents.shape[0]], guided)
        return guided, clean

    def predicted_clean(self, model_input: torch.Tensor, timesteps: torch.Tensor,
                        prediction: torch.Tensor) -> torch.Tensor:
        """x0 implied by a prediction at the denoiser's input (family objective: epsilon, flow)."""
        raise NotImplementedError

    def sampling_scheduler(self, name: str | None):
        raise NotImplementedError

    def initial_latents(self, n, height, width, frames, generator) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_media(self, pixels: torch.Tensor, batch_size: int = 8) -> LatentDistribution:
        raise NotImplementedError

    def encode_tokens(self, tokenized: TokenizedPrompts) -> torch.Tensor:
        raise NotImplementedError

    # hooks for subclasses -------------------------------------------------------------------
    def _build_random_modules(self) -> None:
        """tokenizer, text_encoder, denoiser, vae (+ schedulers) of `self.architecture`, random init."""
        raise NotImplementedError

    def _load_pretrained_modules(self, source: str) -> None:
        raise NotImplementedError

    def _install_attention_processors(self) -> list[AttentionSite]:
        raise NotImplementedError

    def _tokenizer_has_bos(self) -> bool:
        raise NotImplementedError
