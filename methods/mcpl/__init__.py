"""MCPL (arXiv 2310.12274): several object-level words learned at once from one image and a sentence.

The text encoder and denoiser stay frozen; every learned word is one input-embedding vector behind
its own token `<name/word>`. Training prompt: the user's sentence with each learned word replaced by
its token (wrapped by a template). Per step, over a batch of augmented views (random flip, own noise
and timestep, own template):

    L = MSE(mask * eps_hat, mask * eps) + contrastive_weight * PromptCL

mask: the learned words' cross-attention at the training step (captured at `mask_sites`, averaged
over heads and sites, the words' columns summed), resized to the latent, normalised per sample,
thresholded ('hard'), or the normalised map itself ('soft'), or all ones ('skip').
PromptCL: InfoNCE over the text encoder's OUTPUT features of the marked words across the batch;
bound adjectives are extra positives of their noun. See README.md beside this file for every
default's source and the deviations from the official code.
"""

from __future__ import annotations

import torch
from torch import nn

from conceptkit.attention import CrossAttentionMaps, maps_on_latent_grid, word_map_sites
from conceptkit.embeddings import owner_id, vocabulary_statistics_init, word_init
from conceptkit.errors import UserError
from conceptkit.method import ConceptMethod, Stage, TrainBatch, TrainingData
from conceptkit.methods.mcpl.losses import (MASK_KINDS, attention_mask, masked_denoising_loss,
                                            prompt_contrastive_loss)
from conceptkit.methods.mcpl.sentence import parse_sentence, relation_word, render
from conceptkit.training.losses import denoising_loss

MODES = ("one", "all", "diverse")
# Not learned in mode=all: words that carry no object of their own (ours; the official MCPL-all
# learns every word, articles included).
STOP_WORDS = ("a", "an", "the", "of", "on", "in", "at", "and", "or", "with", "to", "by", "for", "from", "near",
              "under", "over", "behind", "beside", "next", "is", "are", "it", "its", "this", "that", "his", "her",
              "their", "my", "your")
# Per-family budgets when steps / lr are null (README.md: "Hyperparameters").
FAMILY_STEPS = {"sd15": 6100, "wan21": 3000}
BASE_LR_PER_SAMPLE = 5e-3  # official base lr, scaled by the batch size as the official code does


class MCPL(ConceptMethod):
    name = "mcpl"
    version = "1"

    @classmethod
    def scene_overrides(cls, sentence, init_words):
        words = ",".join(f"{word}:{init}" for word, init in init_words.items())
        return [f"method.sentence='{sentence}'", f"method.init_words={{{words}}}"]

    def __init__(self, concept_name: str = "concept", sentence: str = "a photo of a {object} on a {background}",
                 mode: str = "one", init_words: dict[str, str | None] | None = None,
                 adjectives: dict[str, str] | None = None, stop_words: tuple[str, ...] = STOP_WORDS,
                 templates: tuple[str, ...] = ("{}",), mask: str = "hard", mask_threshold: float = 0.3,
                 mask_sites: tuple[str, ...] | None = None, contrastive_weight: float = 7.5e-4,
                 temperature: float = 0.3, steps: int | None = None, lr: float | None = None, batch_size: int = 4,
                 flip_p: float = 0.5, grad_clip: float | None = None, weight_decay: float = 1e-2, init_seed: int = 0):
        super().__init__(concept_name)
        self.sentence, self.mode = sentence, mode
        self.init_words = dict(init_words or {})
        self.adjectives = dict(adjectives or {})
        self.stop_words = [str(w).lower() for w in stop_words]
        self.templates = list(templates)
        self.mask, self.mask_threshold = mask, mask_threshold
        self.mask_sites = None if mask_sites is None else list(mask_sites)
        self.contrastive_weight, self.temperature = contrastive_weight, temperature
        self.steps, self.lr, self.batch_size = steps, lr, batch_size
        self.flip_p, self.grad_clip, self.weight_decay = flip_p, grad_clip, weight_decay
        self.init_seed = init_seed
        self.relations: list[str] = []  # mode diverse: the relation word of each image (data-derived)
        self.vectors = nn.ParameterDict()  # learned word -> (1, d)
        self._site_names: list[str] = []

    # identity --------------------------------------------------------------------------------
    def hparams(self):
        return dict(sentence=self.sentence, mode=self.mode, init_words=dict(self.init_words),
                    adjectives=dict(self.adjectives), stop_words=list(self.stop_words), templates=list(self.templates),
                    mask=self.mask, mask_threshold=self.mask_threshold, mask_sites=self.mask_sites,
                    contrastive_weight=self.contrastive_weight, temperature=self.temperature, steps=self.steps,
                    lr=self.lr, batch_size=self.batch_size, flip_p=self.flip_p, grad_clip=self.grad_clip,
                    weight_decay=self.weight_decay, init_seed=self.init_seed)

    def export_info(self):
        return {"relations": list(self.relations)}

    def import_info(self, info):
        self.relations = [str(r) for r in info.get("relations", [])]

    def parsed(self):
        parsed = parse_sentence(self.sentence)
        if self.mode not in MODES:
            raise UserError(f"method.mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.mask not in MASK_KINDS:
            raise UserError(f"method.mask must be one of {', '.join(MASK_KINDS)}, got {self.mask!r}")
        if parsed.has_relation != (self.mode == "diverse"):
            raise UserError("method.sentence: <relation> marks the per-image relation word and belongs to "
                            "method.mode=diverse only" if parsed.has_relation else
                            "method.mode=diverse needs <relation> in method.sentence, e.g. \"a {ball} <relation> a {box}\"")
        return parsed

    def marked_words(self) -> list[str]:
        return list(self.parsed().marked)

    def learned_words(self) -> list[str]:
        parsed = self.parsed()
        words = list(parsed.marked)
        if self.mode == "all":
            words += [w for w in parsed.plain if w.lower() not in self.stop_words]
        words += [r for r in dict.fromkeys(self.relations) if r not in words]
        for word in words:
            if word == self.concept_name:
                raise UserError(f"method.sentence learns {{{word}}}, which is also the concept's name; rename one "
                                f"(name=... or the word)")
        return words

    def token(self, word: str) -> str:
        return f"<{self.concept_name}/{word}>"

    def token_names(self):
        return [self.token(w) for w in self.learned_words()]

    # wiring ----------------------------------------------------------------------------------
    def initialize(self, backbone, data: TrainingData) -> None:
        self.parsed()  # sentence and mode errors first
        if self.mode == "diverse":
            if data.count < 2:
                raise UserError(f"method.mode=diverse learns a relation word per image and needs several images "
                                f"sharing the concepts; data.images has {data.count}")
            self.relations = [relation_word(name) for name in data.names]
        words = self.learned_words()
        unknown = sorted(set(self.init_words) - set(words))
        if unknown:
            raise UserError(f"method.init_words names {', '.join(unknown)}, which the sentence does not learn "
                            f"(learned: {', '.join(words)})")
        generator = torch.Generator().manual_seed(self.init_seed)
        self.vectors = nn.ParameterDict({w: nn.Parameter(self._initial_vector(backbone, w, generator)) for w in words})

    def _initial_vector(self, backbone, word: str, generator: torch.Generator) -> torch.Tensor:
        if word in self.init_words:
            init = self.init_words[word]
            return vocabulary_statistics_init(backbone, 1, generator) if init is None else word_init(backbone, init, 1)
        ids = backbone.tokenizer(word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise UserError(f"method.sentence: the word {word!r} splits into {len(ids)} tokens, so it has no vocabulary "
                            f"vector to start from; give it an init word (method.init_words={{{word}:object}}) or "
                            f"null for vocabulary statistics (method.init_words={{{word}:null}})")
        return word_init(backbone, word, 1)

    def attach(self, backbone) -> None:
        words = self.learned_words()
        dim = backbone.text_embedding_matrix().shape[1]
        if not len(self.vectors):
            self.vectors = nn.ParameterDict({w: nn.Parameter(torch.zeros(1, dim)) for w in words})
        owner = owner_id(self.concept_name)
        for word in words:
            backbone.tokens.register(owner, self.token(word), self.vectors[word])
        try:
            self._check_adjectives()
            self._check_fits(backbone)
            self._site_names = self._resolve_sites(backbone) if self.mask != "skip" else []
        except UserError:
            backbone.tokens.unregister(owner)
            raise

    def detach(self, backbone) -> None:
        backbone.tokens.unregister(owner_id(self.concept_name))

    def _check_fits(self, backbone) -> None:
        """'More placeholders than the method can hold': every learned token of every training prompt
        must survive the text encoder's length limit (the tokenizer would silently cut it off)."""
        for relation in (self.relations or [None]):
            for template in self.templates:
                prompt = self._training_prompt(template, relation)
                ids = set(backbone.tokenize([prompt]).input_ids[0].tolist())
                for word in self._words_in_prompt(relation):
                    if backbone.tokens.reserved_ids(self.token(word))[0] not in ids:
                        raise UserError(f"method.sentence does not fit: with {len(self.learned_words())} learned words "
                                        f"the prompt is longer than the text encoder's {backbone.tokens.max_length} "
                                        f"tokens and {{{word}}} would be cut off; shorten the sentence or learn fewer words")

    def _resolve_sites(self, backbone) -> list[str]:
        cross = [s for s in backbone.attention_sites() if s.kind == "cross"]
        if self.mask_sites is not None:
            chosen = [s.name for s in cross if any(s.name == p or s.name.startswith(p + ".") for p in self.mask_sites)]
        else:
            chosen = word_map_sites(cross)  # the official 16x16 maps on SD1.5
        if not chosen:
            raise UserError(f"method.mask_sites {self.mask_sites} match no cross-attention site of this backbone; "
                            f"choose from {', '.join(s.name for s in cross)}")
        return chosen

    # training --------------------------------------------------------------------------------
    def stages(self, backbone):
        steps = self.steps if self.steps is not None else FAMILY_STEPS.get(backbone.family, FAMILY_STEPS["sd15"])
        lr = self.lr if self.lr is not None else BASE_LR_PER_SAMPLE * self.batch_size
        return [Stage("words", steps=steps, lr=lr, batch_size=self.batch_size, grad_clip=self.grad_clip,
                      weight_decay=self.weight_decay)]

    def begin_stage(self, stage, backbone):
        self.vectors.requires_grad_(True)

    def _training_prompt(self, template: str, relation: str | None) -> str:
        tokens = {w: self.token(w) for w in self.learned_words()}
        return template.replace("{}", render(self.parsed(), tokens, self.mode == "all", relation))

    def _words_in_prompt(self, relation: str | None) -> list[str]:
        own = [w for w in self.learned_words() if w not in self.relations]
        return own + ([relation] if relation else [])

    def _positions(self, backbone, input_ids: torch.Tensor, word: str) -> torch.Tensor:
        """(B, L) bool: where `word` sits in each row (its token if learned, else its one vocabulary id)."""
        if word in self.vectors:
            return input_ids == backbone.tokens.reserved_ids(self.token(word))[0]
        ids = backbone.tokenizer(word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise UserError(f"method.adjectives: {word!r} splits into {len(ids)} tokens; bind a one-token adjective")
        return input_ids == ids[0]

    def _check_adjectives(self) -> None:
        parsed = self.parsed()
        for noun, adjective in self.adjectives.items():
            if noun not in parsed.marked:
                raise UserError(f"method.adjectives: {noun!r} is not a marked word of the sentence ({', '.join(parsed.marked)})")
            if adjective not in parsed.plain and adjective not in parsed.marked:
                raise UserError(f"method.adjectives: {adjective!r} (bound to {noun}) does not appear in method.sentence")

    def training_loss(self, batch: TrainBatch, backbone, stage):
        data, generator = batch.data, batch.generator
        rows = [int(i) for i in batch.indices]
        picks = torch.randint(0, len(self.templates), (len(rows),), generator=generator)
        prompts = [self._training_prompt(self.templates[int(p)], self.relations[i] if self.relations else None)
                   for p, i in zip(picks, rows)]
        latents = data.latents.sample(batch.indices, generator)
        # Random horizontal flip (official p = 0.5), applied to the cached latents.
        flips = (torch.rand(len(rows), generator=generator) < self.flip_p).to(latents.device)
        latents = torch.where(flips.view(-1, *([1] * (latents.ndim - 1))), latents.flip(-1), latents)
        noisy = backbone.make_noisy(latents, generator)
        context, tokenized = backbone.encode_text(prompts)
        input_ids = tokenized.input_ids
        marked = self.marked_words()
        mask_words = marked + [a for a in self.adjectives.values() if a not in marked]
        out = {}
        if self.mask == "skip":
            prediction = backbone.denoise(noisy.noisy, noisy.timesteps, context)
            rec = denoising_loss(prediction, noisy.target)
        else:
            columns = torch.stack([self._positions(backbone, input_ids, w) for w in mask_words]).any(0).float()
            prediction, maps = self._denoise_with_maps(backbone, noisy, context, columns.unsqueeze(-1))
            mask = attention_mask(maps, self.mask, self.mask_threshold).to(prediction.device)
            if prediction.ndim == 4:  # images: (B, C, H, W); the map's frame axis has length 1
                mask = mask[:, :, 0]
            rec = masked_denoising_loss(prediction, noisy.target, mask)
            out["mask_area"] = mask.mean()
        loss = rec
        if self.contrastive_weight > 0:
            features, labels = self._contrastive_features(backbone, input_ids, context, marked)
            contrastive = prompt_contrastive_loss(features, labels, self.temperature)
            loss = loss + self.contrastive_weight * contrastive
            out["contrastive"] = contrastive
        return {"loss": loss, "rec": rec, **out}

    def _denoise_with_maps(self, backbone, noisy, context, columns):
        """One denoiser call with the probabilities hook on the mask sites only (other sites keep SDPA)."""
        recorder = CrossAttentionMaps(columns)
        owner = owner_id(self.concept_name) + "__mask"
        names = set(self._site_names)
        backbone.hooks.add(owner, recorder, selector=lambda site: site.name in names)
        try:
            prediction = backbone.denoise(noisy.noisy, noisy.timesteps, context)
        finally:
            backbone.hooks.remove(owner)
        latent = noisy.noisy
        frames = latent.shape[2] if latent.ndim == 5 else 1
        return prediction, maps_on_latent_grid(recorder.maps, frames, latent.shape[-2], latent.shape[-1])

    def _contrastive_features(self, backbone, input_ids, context, marked):
        """Text-encoder output features of each marked word in every row (label k = k-th marked word),
        plus each bound adjective's feature with its noun's label."""
        features, labels = [], []
        pairs = [(k, w) for k, w in enumerate(marked)] + \
                [(marked.index(noun), adjective) for noun, adjective in self.adjectives.items()]
        for label, word in pairs:
            where = self._positions(backbone, input_ids, word).to(context.device)
            for row in range(context.shape[0]):
                if where[row].any():
                    features.append(context[row, where[row]].float().mean(dim=0))
                    labels.append(label)
        return torch.stack(features), torch.tensor(labels, device=context.device)

    # inference -------------------------------------------------------------------------------
    def interop_files(self, backbone):
        # diffusers' load_textual_inversion reads one token per file: one file per learned word.
        return {f"learned_embeds_{w}.safetensors": {self.token(w): self.vectors[w].detach().cpu().contiguous()}
                for w in self.learned_words()}

    def prompt(self, text: str) -> str:
        """`{name/word}` or `{word}` -> that word's token; `{name}` -> all marked words' tokens."""
        words = self.learned_words()
        for word in words:
            text = text.replace("{%s/%s}" % (self.concept_name, word), self.token(word))
        for word in words:
            text = text.replace("{%s}" % word, self.token(word))
        together = " and ".join(self.token(w) for w in self.marked_words())
        return text.replace("{%s}" % self.concept_name, together)

    def sample_prompts(self):
        return ["a photo of {%s}" % self.concept_name] + \
               ["a photo of {%s/%s}" % (self.concept_name, w) for w in self.marked_words()]


METHOD = MCPL
