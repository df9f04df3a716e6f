"""`conceptkit pretrain backbone=<family>_shapes`: the ShapeWorld toy backbones, from scratch.

Two stages through the same LightningModule as concept training:
  vae       the autoencoder learns to reconstruct world renders (MSE + a small KL, as LDM's ratio);
            then the latent scale is measured on the corpus and stored in the VAE config
            (SD: scaling_factor; Wan: per-channel latents_mean / latents_std)
  denoiser  the denoiser and the text encoder learn the world's captions on latents encoded once by
            the frozen VAE; a caption is re-phrased every step (the grammar's rng) and dropped with
            probability `caption_dropout` so classifier-free guidance works; with
            `grounding_weight` > 0 each object word's cross-attention is also pulled onto its object
            on stills (TokenCompose's token loss, training/grounding.py)
The corpus (scenes, renders) is generated once from `seed`; every step's randomness comes from the
micro-step generator, so the result is reproducible from the command and seed, and resumable.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from conceptkit.backbones.base import LatentDistribution, shipped_weights_folder
from conceptkit.errors import UserError
from conceptkit.method import Stage, TrainBatch, TrainingData
from conceptkit.training.grounding import GradientAttentionMaps, object_word_positions, token_grounding_loss

GROUNDING_OWNER = "pretrain_token_grounding"


@dataclass
class Corpus:
    scenes: list  # world Scene objects, images first then clips
    images: torch.Tensor  # (N, 3, 1, H, W) uint8
    clips: torch.Tensor | None  # (M, 3, F, H, W) uint8, video backbones only


def build_corpus(images: int, clips: int, frames: int, resolution: int, seed: int, orientation: str = "random",
                 progress=print, object_weights: Sequence[float] | None = None,
                 allowed: dict | None = None) -> Corpus:
    """`object_weights`: relative frequency of scenes with 1, 2 and 3 objects, images and clips alike
    (None: the world's own uniform draw, the same scenes as before this option existed). `allowed`:
    factor -> values the corpus may draw (world/factors.py ALLOWED_KEYS), e.g. one background for a
    simple first stage of a curriculum; None: every value."""
    from conceptkit.world.factors import sample_scene
    from conceptkit.world.render import render_clip, render_scene

    rng = np.random.default_rng(seed)
    probabilities = None
    if object_weights is not None:
        probabilities = np.asarray(object_weights, dtype=float) / float(np.sum(object_weights))
    scenes, image_arrays, clip_arrays = [], [], []
    started = time.time()
    def object_count() -> int | None:
        return None if probabilities is None else int(rng.choice(3, p=probabilities)) + 1

    for i in range(images):
        scene = sample_scene(rng, n_objects=object_count(), split="pretrain", allowed=allowed, orientation=orientation)
        scenes.append(scene)
        image_arrays.append(render_scene(scene, resolution))
        if (i + 1) % 5000 == 0:
            progress(f"  rendered {i + 1}/{images} images ({time.time() - started:.0f} s)")
    for i in range(clips):
        scene = sample_scene(rng, n_objects=object_count(), split="pretrain", allowed=allowed, clip_frames=frames,
                             orientation=orientation)
        scenes.append(scene)
        clip_arrays.append(render_clip(scene, frames, resolution))
    as_tensor = lambda arrays: torch.from_numpy(np.stack(arrays)).permute(0, 4, 1, 2, 3).contiguous()  # noqa: E731
    image_tensor = torch.from_numpy(np.stack(image_arrays)).permute(0, 3, 1, 2).unsqueeze(2).contiguous()
    return Corpus(scenes=scenes, images=image_tensor, clips=as_tensor(clip_arrays) if clips else None)


def _to_unit(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.float() / 127.5 - 1.0


class BackbonePretraining(nn.Module):
    """The trainable parts of a toy backbone (registered here, so Lightning checkpoints them) and the
    two pretraining stages, behind the same stage interface as a ConceptMethod."""

    def __init__(self, backbone, corpus: Corpus, vae: DictConfig, denoiser: DictConfig, clip_fraction: float,
                 keep_latent_scale: bool = False):
        super().__init__()
        # A VAE taken with init=<folder> keeps the latent scale its denoiser was trained with.
        self.keep_latent_scale = keep_latent_scale
        self.text_encoder, self.denoiser, self.vae = backbone.text_encoder, backbone.denoiser, backbone.vae
        self.corpus = corpus
        self.vae_cfg, self.denoiser_cfg = vae, denoiser
        self.clip_fraction = clip_fraction if corpus.clips is not None else 0.0
        self._latents: dict[str, LatentDistribution] = {}
        self._masks: dict[int, np.ndarray] = {}  # corpus image -> object masks, for token grounding

    def stages(self, backbone) -> list[Stage]:
        v, d = self.vae_cfg, self.denoiser_cfg
        return [Stage("vae", steps=v.steps, lr=v.lr, batch_size=v.batch_size, grad_clip=1.0, weight_decay=0.0),
                Stage("denoiser", steps=d.steps, lr=d.lr, batch_size=d.batch_size, grad_clip=1.0,
                      weight_decay=d.weight_decay)]

    def begin_stage(self, stage: Stage, backbone) -> None:
        self.requires_grad_(False)
        if stage.name == "vae":
            self.vae.requires_grad_(True).train()
            return
        self.vae.eval()
        self.text_encoder.requires_grad_(True).train()
        self.denoiser.requires_grad_(True).train()
        if not self._latents:
            if self.keep_latent_scale:
                self.apply_latent_gain(backbone)
            else:
                self.measure_latent_scale(backbone)
            # Frozen VAE from here on: encode the whole corpus once.
            clips = 0 if self.corpus.clips is None else len(self.corpus.clips)
            print(f"encoding the corpus with the frozen VAE: {len(self.corpus.images)} images, {clips} clips",
                  flush=True)
            self._latents["images"] = backbone.encode_media(_to_unit(self.corpus.images))
            if self.corpus.clips is not None:
                self._latents["clips"] = backbone.encode_media(_to_unit(self.corpus.clips))

    @torch.no_grad()
    def measure_latent_scale(self, backbone) -> None:
        """Store the corpus latent statistics in the VAE config, as SD and Wan ship them."""
        sample = _to_unit(self.corpus.images[:2048] if self.corpus.clips is None else self.corpus.clips[:512])
        means = torch.cat([self.vae.encode(chunk.to(backbone.device) if backbone.family == "wan21"
                                           else chunk[:, :, 0].to(backbone.device)).latent_dist.mean.float().cpu()
                           for chunk in sample.split(64)])
        if backbone.family == "sd15":
            self.vae.register_to_config(scaling_factor=float(1.0 / means.std()))
        else:
            dims = [0, 2, 3, 4]
            self.vae.register_to_config(latents_mean=means.mean(dim=dims).tolist(), latents_std=means.std(dim=dims).tolist())
        self.apply_latent_gain(backbone)

    def apply_latent_gain(self, backbone) -> None:
        """`vae.latent_gain`: multiply the normalised latents by this, by storing it in the same VAE config
        keys (so any loader of the folder gets it). Unit corpus variance can leave an object's part of the
        latent far below the noise (wan21_shapes: the backgrounds carry most of the variance; its card)."""
        gain = float(self.vae_cfg.get("latent_gain", 1.0))
        if gain != 1.0:
            if backbone.family == "sd15":
                self.vae.register_to_config(scaling_factor=float(self.vae.config.scaling_factor) * gain)
            else:
                self.vae.register_to_config(latents_std=[s / gain for s in self.vae.config.latents_std])
        backbone._set_latent_geometry()

    def param_groups(self, stage: Stage) -> list[dict]:
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def _pool(self, stage: Stage, generator: torch.Generator) -> str:
        fraction = self.clip_fraction
        if stage.name == "vae" and self.vae_cfg.get("clip_fraction") is not None:
            fraction = self.vae_cfg.clip_fraction
        if self.corpus.clips is not None and fraction and torch.rand((), generator=generator) < fraction:
            return "clips"
        return "images"

    def training_loss(self, batch: TrainBatch, backbone, stage: Stage) -> dict[str, torch.Tensor]:
        generator = batch.generator
        pool = self._pool(stage, generator)
        source = self.corpus.images if pool == "images" else self.corpus.clips
        picks = torch.randint(0, source.shape[0], (stage.batch_size,), generator=generator)
        device = backbone.device
        if stage.name == "vae":
            pixels = _to_unit(source[picks]).to(device)
            x = pixels[:, :, 0] if backbone.family == "sd15" else pixels
            posterior = self.vae.encode(x).latent_dist
            noise = torch.randn(posterior.mean.shape, generator=generator).to(device)
            reconstruction = self.vae.decode(posterior.mean + posterior.std * noise).sample
            mse = F.mse_loss(reconstruction, x)
            kl = posterior.kl().mean() / x[0].numel()  # LDM weighs a summed KL against a summed pixel loss
            return {"loss": mse + self.vae_cfg.kl_weight * kl, "mse": mse, "kl": kl}
        from conceptkit.world.captions import caption_scene

        offset = 0 if pool == "images" else self.corpus.images.shape[0]
        rng = np.random.default_rng(int(torch.randint(0, 2**31, (), generator=generator)))
        captions = [caption_scene(self.corpus.scenes[offset + int(i)], rng) for i in picks]
        drop = torch.rand(len(captions), generator=generator) < self.denoiser_cfg.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop)]
        latents = self._latents[pool].sample(picks, generator).to(device)
        noisy = backbone.make_noisy(latents, generator)
        context, tokenized = backbone.encode_text(captions)
        weight = self.denoiser_cfg.grounding_weight
        # Token grounding on stills only: a clip's objects move, so one mask per clip would be wrong.
        grounded = weight > 0 and pool == "images"
        recorder = GradientAttentionMaps()
        if grounded:
            sites = self.denoiser_cfg.grounding_sites
            backbone.hooks.add(GROUNDING_OWNER, recorder, selector=lambda site: site.kind == "cross" and (
                sites is None or any(site.name.startswith(prefix) for prefix in sites)))
        try:
            prediction = backbone.denoise(noisy.noisy, noisy.timesteps, context)
        finally:
            backbone.hooks.remove(GROUNDING_OWNER)
        mse = F.mse_loss(prediction.float(), noisy.target.float())
        if not grounded:
            return {"loss": mse}
        scenes = [self.corpus.scenes[int(i)] for i in picks]
        positions = [object_word_positions(scene, ids, backbone.tokenizer)
                     for scene, ids in zip(scenes, tokenized.input_ids)]
        grounding = token_grounding_loss(recorder.maps, positions,
                                         [self._object_masks(int(i), backbone.resolution) for i in picks])
        if grounding is None:  # every caption of the batch dropped
            return {"loss": mse, "mse": mse}
        return {"loss": mse + weight * grounding, "mse": mse, "grounding": grounding}

    def _object_masks(self, index: int, resolution: int) -> np.ndarray:
        """Each object's pixels in corpus image `index`, rendered once and kept (a few KB a scene)."""
        from conceptkit.world.render import object_masks

        if index not in self._masks:
            self._masks[index] = object_masks(self.corpus.scenes[index], resolution)
        return self._masks[index]


def check_grounding(denoiser: DictConfig, backbone) -> None:
    """The token-grounding settings, before any rendering or training."""
    if denoiser.grounding_weight < 0:
        raise UserError(f"denoiser.grounding_weight: must be >= 0 (0 = off), got {denoiser.grounding_weight}")
    if denoiser.grounding_sites is None:
        return
    names = [site.name for site in backbone.attention_sites() if site.kind == "cross"]
    for prefix in denoiser.grounding_sites:
        if not any(name.startswith(str(prefix)) for name in names):
            raise UserError(f"denoiser.grounding_sites: {prefix!r} names no cross-attention site of "
                            f"{backbone.family}; e.g. {names[0]}")


LATENT_STATISTICS = ("scaling_factor", "latents_mean", "latents_std")  # SD's and Wan's keys in the VAE config


def start_from(backbone, source: Path) -> dict:
    """`init=<folder>`: every trained module (text encoder, denoiser, VAE) starts from an earlier
    `conceptkit pretrain` output instead of the seeded random init, e.g. to continue a shipped release
    on a changed corpus. Returns that folder's recipe.json, which the new recipe records."""
    recipe = source / "recipe.json"
    if not recipe.is_file():
        raise UserError(f"init={source} has no recipe.json; point it at a `conceptkit pretrain` output folder")
    denoiser_dir = "unet" if backbone.family == "sd15" else "transformer"
    for module, subfolder in ((backbone.text_encoder, "text_encoder"), (backbone.denoiser, denoiser_dir),
                              (backbone.vae, "vae")):
        try:
            trained = type(module).from_pretrained(source, subfolder=subfolder)
            module.load_state_dict(trained.state_dict())
        except (OSError, ValueError, RuntimeError) as error:
            raise UserError(f"init={source}: its {subfolder} is not this backbone's architecture "
                            f"({str(error).splitlines()[0]})") from None
        if subfolder == "vae":
            module.register_to_config(**{k: v for k, v in trained.config.items() if k in LATENT_STATISTICS})
    backbone._set_latent_geometry()
    return json.loads(recipe.read_text())


def save_backbone(backbone, folder: Path, recipe: dict) -> None:
    staging = folder.with_name(folder.name + ".writing")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    denoiser_dir = "unet" if backbone.family == "sd15" else "transformer"
    backbone.tokenizer.save_pretrained(staging / "tokenizer")
    backbone.text_encoder.save_pretrained(staging / "text_encoder")
    backbone.denoiser.save_pretrained(staging / denoiser_dir)
    backbone.vae.save_pretrained(staging / "vae")
    if backbone.family == "sd15":
        backbone.train_scheduler.save_pretrained(staging / "scheduler")
    (staging / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    staging.rename(folder)


def pretrain(cfg: DictConfig, overrides: list[str] | None = None) -> Path:
    import logging

    import lightning as L
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import ModelCheckpoint
    from safetensors.torch import load_model, save_model

    from conceptkit.training.callbacks import progress_display
    from conceptkit.training.module import ConceptTrainingModule
    from conceptkit.training.run import stage_with_overrides, training_device

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    backbone = instantiate(cfg.backbone, weights="random")
    if backbone.architecture != "shapes":
        raise UserError(f"conceptkit pretrain trains the ShapeWorld toy backbones (backbone=sd15_shapes or "
                        f"wan21_shapes); {backbone.family} architecture={backbone.architecture} is not one")
    name = f"{backbone.family}_shapes"
    output = Path(cfg.output) if cfg.output else shipped_weights_folder(name)
    if output.exists() and not cfg.overwrite:
        raise UserError(f"output {output} already exists; choose another output or pass overwrite=true")
    from conceptkit.world.factors import ORIENTATIONS

    if cfg.corpus.orientation not in ORIENTATIONS:
        raise UserError(f"corpus.orientation={cfg.corpus.orientation!r}: choose one of {', '.join(ORIENTATIONS)}")
    weights = cfg.corpus.get("object_weights")
    if weights is not None and (len(weights) != 3 or min(weights) < 0 or sum(weights) <= 0):
        raise UserError(f"corpus.object_weights={list(weights)}: give three non-negative weights (scenes with 1, 2 "
                        f"and 3 objects), not all zero, e.g. [3,1,1]")
    allowed = cfg.corpus.get("allowed")
    if allowed is not None and not isinstance(allowed, DictConfig):
        raise UserError(f"corpus.allowed={allowed!r}: give factor -> values, e.g. 'corpus.allowed={{size:[large]}}'")
    if allowed is not None:  # a single value may be written without brackets
        allowed = {k: [v] if isinstance(v, str) else list(v) for k, v in OmegaConf.to_container(allowed).items()}
    if allowed:
        from conceptkit.world.factors import ALLOWED_KEYS, sample_scene

        unknown = sorted(set(allowed) - set(ALLOWED_KEYS))
        if unknown:
            raise UserError(f"corpus.allowed: unknown factor {unknown[0]!r}; use any of {', '.join(ALLOWED_KEYS)}")
        try:  # one trial draw finds values the world does not have before anything is written
            sample_scene(np.random.default_rng(0), split="pretrain", allowed=allowed)
        except (ValueError, RuntimeError) as error:
            raise UserError(f"corpus.allowed={allowed}: {error}; allow more values") from None
    gain = cfg.vae.get("latent_gain", 1.0)
    if not isinstance(gain, (int, float)) or isinstance(gain, bool) or not gain > 0:
        raise UserError(f"vae.latent_gain={gain!r}: give a positive number (1.0 keeps the measured latent scale)")
    for part in ("vae", "denoiser"):
        if cfg[part].steps == 0 and not cfg.init:
            raise UserError(f"{part}.steps=0 needs init=<folder> to take that part from")
    L.seed_everything(cfg.seed, verbose=False)
    backbone.load()
    check_grounding(cfg.denoiser, backbone)
    init_recipe = start_from(backbone, Path(cfg.init)) if cfg.init else None
    partial = output.with_name(output.name + ".partial")
    if partial.exists() and not cfg.resume:
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    started = time.time()
    clips = cfg.corpus.clips if backbone.is_video else 0
    print(f"rendering the ShapeWorld corpus: {cfg.corpus.images} images, {clips} clips (seed {cfg.seed})", flush=True)
    corpus = build_corpus(cfg.corpus.images, clips, backbone.default_frames, backbone.resolution, cfg.seed,
                          cfg.corpus.orientation, object_weights=None if weights is None else list(weights),
                          allowed=allowed)
    trainable = BackbonePretraining(backbone, corpus, cfg.vae, cfg.denoiser, cfg.corpus.clip_fraction,
                                    keep_latent_scale=bool(cfg.init) and cfg.vae.steps == 0)
    data = TrainingData(latents=None, captions=[None] * corpus.images.shape[0],
                        names=[str(i) for i in range(corpus.images.shape[0])], frames=1)
    summary = {"seed": cfg.seed, "corpus": OmegaConf.to_container(cfg.corpus), "stages": [],
               "render_seconds": round(time.time() - started, 1), "init": init_recipe}
    for index, stage in enumerate(trainable.stages(backbone)):
        if stage.steps == 0:  # e.g. vae.steps=0 with init=<folder>: keep that folder's VAE
            summary["stages"].append({"name": stage.name, "steps": 0, "from": str(cfg.init)})
            continue
        stage = stage_with_overrides(stage, cfg.trainer)
        done = partial / f"stage{index}_{stage.name}.safetensors"
        finished = json.loads(done.with_suffix(".json").read_text()) if cfg.resume and done.exists() else None
        if finished is not None and finished["steps"] == stage.steps:
            load_model(trainable, str(done))
            if stage.name == "vae":
                trainable.measure_latent_scale(backbone)
            summary["stages"].append(finished)
            continue
        if finished is not None and finished["steps"] > stage.steps:
            raise UserError(f"stage {stage.name} in {partial} already ran {finished['steps']} steps, more than "
                            f"the {stage.steps} asked; ask for at least that many or start without resume=true")
        # A finished stage asked for more steps continues from its last checkpoint: the lr is constant
        # and every step's randomness depends on its step number only, so this equals a longer run.
        backbone.to(training_device(cfg.trainer))  # the corpus encoding in begin_stage runs there too
        trainable.begin_stage(stage, backbone)
        module = ConceptTrainingModule(trainable, backbone, data, stage, index, cfg.seed)
        checkpoint_dir = partial / "checkpoints" / stage.name
        progress_bar, progress_lines = progress_display(cfg.trainer.progress_bar, f"stage {stage.name}")
        trainer = L.Trainer(
            max_steps=stage.steps, max_epochs=-1, gradient_clip_val=stage.grad_clip, precision=cfg.trainer.precision,
            accelerator=cfg.trainer.accelerator, devices=cfg.trainer.devices, strategy=cfg.trainer.strategy,
            callbacks=[ModelCheckpoint(dirpath=checkpoint_dir, every_n_train_steps=cfg.trainer.checkpoint_every,
                                       save_last=True, save_top_k=0, enable_version_counter=False), *progress_lines],
            logger=False, enable_model_summary=False, enable_progress_bar=progress_bar,
            default_root_dir=str(partial), num_sanity_val_steps=0, log_every_n_steps=1)
        last = checkpoint_dir / "last.ckpt"
        stage_start = time.time()
        with warnings.catch_warnings():
            # Frozen parts (the VAE while the denoiser trains, and vice versa) stay in eval mode on purpose.
            warnings.filterwarnings("ignore", ".*module\\(s\\) in eval mode.*")
            warnings.filterwarnings("ignore", ".*LeafSpec.*")
            # The dataloader yields step numbers only; each step's data comes from its global step.
            warnings.filterwarnings("ignore", ".*dataloader is not resumable.*")
            trainer.fit(module, ckpt_path=str(last) if cfg.resume and last.exists() else None)
        if trainer.interrupted or trainer.global_step < stage.steps:
            raise UserError(f"pretraining stopped in stage {stage.name} at step {trainer.global_step}/{stage.steps}; "
                            f"rerun with resume=true to continue from {partial}")
        loss = trainer.callback_metrics.get("loss")
        record = {"name": stage.name, "steps": stage.steps, "lr": stage.lr, "batch_size": stage.batch_size,
                  "seconds": round(time.time() - stage_start + (finished or {}).get("seconds", 0.0), 1), "final_loss": None if loss is None else float(loss)}
        save_model(trainable, str(done))  # handles the text encoder's tied embeddings
        done.with_suffix(".json").write_text(json.dumps(record))
        summary["stages"].append(record)
    summary["seconds"] = round(time.time() - started, 1)
    summary["device"] = str(backbone.device)
    summary["command"] = " ".join(["conceptkit pretrain", *(overrides or [])])
    trainable.requires_grad_(False).eval()
    save_backbone(backbone, output, {"backbone": name, "recipe": OmegaConf.to_container(cfg, resolve=True),
                                     "training": summary})
    if not cfg.trainer.keep_checkpoints:
        shutil.rmtree(partial, ignore_errors=True)
    return output
