"""The concept format, one for every method.

<name>.concept/ (any folder name)
  concept.json        format version, name, method + method version, kind (per_concept: used by
                      {name}; encoder: an adapter conditioned on reference pictures, compose's
                      references=), hparams, method_info, backbone (family, id, revision,
                      constructor config), tokens, training summary
  weights.safetensors the method's state_dict (method tensors only, keys relative to the method); over
                      SHARD_BYTES (a fully fine-tuned DiT) it is sharded as Hugging Face shards it:
                      weights-00001-of-0000N.safetensors ... and weights.safetensors.index.json
  config.yaml         the resolved training config
  learned_embeds.safetensors / pytorch_lora_weights.safetensors
                      where the method has them: the same tensors in the layouts diffusers loads
                      (`load_textual_inversion`, `load_lora_weights`), for use outside conceptkit
  samples/            images or clips rendered at the end of training
  logs/               the training logs, one folder per stage (metrics.csv: every loss term per step;
                      TensorBoard events with trainer.logger=tensorboard); not read when loading

No pickle anywhere. Loading is strict and every mismatch is one UserError sentence. Writing goes to a
temporary sibling folder that is renamed into place, so a crash never leaves half an artifact.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

import conceptkit
from conceptkit.errors import UserError
from conceptkit.registry import backbone_class, method_class

FORMAT_VERSION = 1
SHARD_BYTES = 4 * 1024 ** 3  # weights above this go in several files (what hub tools and loaders expect)
WEIGHTS, WEIGHTS_INDEX = "weights.safetensors", "weights.safetensors.index.json"


def save_weights(tensors: dict[str, torch.Tensor], folder: Path, metadata: dict[str, str]) -> None:
    """`weights.safetensors`, or shards and their index (Hugging Face's layout) past SHARD_BYTES."""
    from safetensors.torch import save_file

    shards, current, size = [], {}, 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[key] = tensor
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(folder / WEIGHTS), metadata=metadata)
        return
    weight_map = {}
    for number, shard in enumerate(shards, 1):
        name = f"weights-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata=metadata)
        weight_map.update({key: name for key in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / WEIGHTS_INDEX).write_text(json.dumps({"metadata": {"total_size": total, **metadata},
                                                    "weight_map": weight_map}, indent=2) + "\n")


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if (folder / WEIGHTS).is_file():
        return load_file(str(folder / WEIGHTS))
    index = json.loads((folder / WEIGHTS_INDEX).read_text())
    tensors = {}
    for name in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(str(folder / name)))
    return tensors


def write_concept(folder: Path, method, backbone, config_yaml: str, training: dict[str, Any],
                  samples: torch.Tensor | None = None, sample_prompts: list[str] | None = None,
                  fps: int = 16, overwrite: bool = False, logs: Path | None = None) -> Path:
    from safetensors.torch import save_file

    from conceptkit.media import save_media

    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise UserError(f"output {folder} already exists; choose another output or pass overwrite=true")
    staging = folder.with_name(folder.name + ".writing")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    meta = {
        "format_version": FORMAT_VERSION,
        "name": method.concept_name,
        "method": method.name,
        "method_version": method.version,
        "kind": method.kind,
        "hparams": method.hparams(),
        "method_info": method.export_info(),
        "backbone": {**backbone.identity(), "config": backbone.config()},
        "tokens": method.token_names(),
        "training": training,
        "conceptkit_version": conceptkit.__version__,
    }
    (staging / "concept.json").write_text(json.dumps(meta, indent=2) + "\n")
    tensors = {k: v.detach().cpu().contiguous() for k, v in method.state_dict().items()}
    save_weights(tensors, staging, metadata={"format": "conceptkit", "method": method.name})
    for filename, file_tensors in method.interop_files(backbone).items():
        save_file(file_tensors, str(staging / filename), metadata={"format": "pt", "conceptkit_method": method.name})
    (staging / "config.yaml").write_text(config_yaml)
    if samples is not None:
        save_media(samples, staging / "samples", "sample", fps=fps)
        (staging / "samples" / "prompts.json").write_text(json.dumps(sample_prompts or [], indent=2) + "\n")
    if logs is not None and Path(logs).is_dir():
        shutil.copytree(logs, staging / "logs")
    if folder.exists():
        shutil.rmtree(folder)
    staging.rename(folder)
    return folder


def read_meta(folder: Path) -> dict[str, Any]:
    folder = Path(folder)
    path = folder / "concept.json"
    if not path.is_file():
        raise UserError(f"{folder} is not a concept folder (no concept.json); pass a folder written by conceptkit train")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not valid JSON ({error}); the concept folder is damaged") from None
    for key in ("format_version", "name", "method", "hparams", "backbone"):
        if key not in meta:
            raise UserError(f"{path} has no {key!r}; the concept folder is damaged")
    if int(meta["format_version"]) > FORMAT_VERSION:
        raise UserError(f"{folder} uses concept format {meta['format_version']}, newer than this conceptkit reads "
                        f"({FORMAT_VERSION}); upgrade conceptkit")
    cls = method_class(meta["method"])  # unknown method -> one clear line
    kind = meta.get("kind", "per_concept")  # concepts written before encoder methods existed
    if kind != cls.kind:
        raise UserError(f"{path} says kind {kind!r}, but {meta['method']} concepts are {cls.kind!r}; the concept "
                        f"folder is damaged")
    if not (folder / WEIGHTS).is_file() and not (folder / WEIGHTS_INDEX).is_file():
        raise UserError(f"{folder} has no weights.safetensors; the concept folder is damaged")
    return meta


def backbone_from_meta(meta: dict[str, Any]):
    info = meta["backbone"]
    return backbone_class(info["family"])(**info["config"])


def build_method(meta: dict[str, Any], where: str = "concept"):
    cls = method_class(meta["method"])
    if int(meta.get("method_version", cls.version)) > int(cls.version):
        raise UserError(f"{where} was made by {meta['method']} version {meta['method_version']}, newer than this "
                        f"conceptkit's ({cls.version}); upgrade conceptkit")
    try:
        method = cls(concept_name=meta["name"], **meta["hparams"])
        method.import_info(meta.get("method_info", {}))
    except (TypeError, KeyError, ValueError) as error:
        raise UserError(f"{where}: its {meta['method']} settings do not fit this conceptkit ({error}); "
                        f"the concept folder is damaged or from another version") from None
    return method


def load_concept(folder: Path, backbone):
    """Read a concept folder and attach it to a loaded backbone. Returns (method, meta)."""
    from safetensors import SafetensorError

    folder = Path(folder)
    meta = read_meta(folder)
    family = meta["backbone"]["family"]
    if family != backbone.family:
        raise UserError(f"concept {folder} was trained on backbone family {family}, but the backbone here is "
                        f"{backbone.family}; use backbone={family}")
    try:
        tensors = load_weights(folder)
    except (SafetensorError, OSError, json.JSONDecodeError, KeyError) as error:
        raise UserError(f"{folder}/weights.safetensors cannot be read ({error}); the concept folder is damaged") from None
    method = build_method(meta, str(folder))
    method.attach(backbone)
    expected = method.state_dict()
    problem = None
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        problem = f"missing {missing[:2]}" if missing else f"unexpected {unexpected[:2]}"
    else:
        for key, value in expected.items():
            if tuple(tensors[key].shape) != tuple(value.shape):
                problem = f"{key} has shape {tuple(tensors[key].shape)}, this backbone needs {tuple(value.shape)}"
                break
    if problem:
        method.detach(backbone)
        raise UserError(f"concept {folder} does not fit this backbone ({backbone.identity()['id']}): {problem}; "
                        f"it was trained on {meta['backbone']['id']}")
    method.load_state_dict(tensors, strict=True)
    method.to(backbone.device)
    return method, meta
