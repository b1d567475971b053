"""The query encoder's vision path as a folder, shared by the index build and the model.

A query picture finds a document with a similar picture only if both are embedded by the same
vision weights: the index job embeds document images with the folder, and the model's query
encoder starts from it (`RetrieverConfig.vision_dir`). `RAGModel.attach` compares the index's
recorded folder hash with the model's.

A folder holds `query_vision.json` (the `VisionConfig` fields and the output `dim`) and
`query_vision.safetensors` (`vision.*`: the `VisionTower`; `image_proj.weight`: its (dim,
hidden) projection into the text space). Write one with `save_query_vision` (from a model's
query encoder, a checkpoint, or a seeded random initialisation) and read it with
`load_query_vision`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from rag_mm.config import VisionConfig
from rag_mm.layers import VisionTower, init_weights

CONFIG_FILE = "query_vision.json"
WEIGHTS_FILE = "query_vision.safetensors"
CHECKPOINT_PREFIX = "model.retrieval.query_encoder."  # RAGModule checkpoints' state-dict keys


class QueryVisionError(ValueError):
    """A query vision folder that is missing, incomplete or does not fit the model."""


class QueryVision(nn.Module):
    """image -> image_proj(mean over patches(vision(image))): the query encoder's image term."""

    def __init__(self, config: VisionConfig, dim: int) -> None:
        super().__init__()
        self.config = config
        self.dim = dim
        self.vision = VisionTower(config)
        self.image_proj = nn.Linear(config.hidden_size, dim, bias=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_proj(self.vision(images).mean(dim=1))

    @classmethod
    def seeded(cls, config: VisionConfig, dim: int, seed: int) -> QueryVision:
        """The model's random initialisation (`RAGModel.init_weights`), from its own generator."""
        module = cls(config, dim)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            init_weights(module.vision)
            nn.init.normal_(module.image_proj.weight, 0.0, 0.02)
        return module


def save_query_vision(folder: str | Path, vision: nn.Module, image_proj: nn.Linear) -> Path:
    """Write `vision` (a `VisionTower`) and `image_proj` to `folder`; returns the folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"vision.{k}": v for k, v in vision.state_dict().items()}
    tensors["image_proj.weight"] = image_proj.weight
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    save_file(tensors, str(folder / WEIGHTS_FILE))
    config = {**dataclasses.asdict(vision.config), "dim": image_proj.out_features}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def _folder(folder: str | Path) -> Path:
    folder = Path(folder).expanduser().resolve()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise QueryVisionError(
                f"query vision folder {folder} has no {name}; write one with "
                f"rag_mm.query_vision.save_query_vision (or scripts/build_index.py --vision-from)"
            )
    return folder


def read_config(folder: str | Path) -> tuple[VisionConfig, int]:
    raw = json.loads((_folder(folder) / CONFIG_FILE).read_text())
    dim = raw.pop("dim")
    return VisionConfig(**raw), int(dim)


def load_query_vision(folder: str | Path) -> QueryVision:
    from safetensors.torch import load_file

    folder = _folder(folder)
    config, dim = read_config(folder)
    module = QueryVision(config, dim)
    module.load_state_dict(load_file(str(folder / WEIGHTS_FILE)), strict=True)
    return module.eval()


def check_fits(folder: str | Path, config: VisionConfig, dim: int) -> None:
    """Refuse a folder whose vision tower or output width differs from the model's."""
    found, found_dim = read_config(folder)
    differences = [f"{f.name} {getattr(found, f.name)} vs the model's {getattr(config, f.name)}"
                   for f in dataclasses.fields(VisionConfig)
                   if getattr(found, f.name) != getattr(config, f.name)]
    if found_dim != dim:
        differences.append(f"dim {found_dim} vs the query text encoder's {dim}")
    if differences:
        raise QueryVisionError(
            f"query vision folder {Path(folder).resolve()} does not fit the model: "
            + "; ".join(differences)
            + " (vision_dir must come from a model of this size and text encoder)"
        )


def vision_identity(folder: str | Path) -> dict:
    """JSON-able identity: path, sha256 of the two files, image_size and dim."""
    folder = _folder(folder)
    digest = hashlib.sha256()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        digest.update(name.encode() + b"\0" + (folder / name).read_bytes())
    config, dim = read_config(folder)
    return {"path": str(folder), "content_hash": "sha256:" + digest.hexdigest(),
            "image_size": config.image_size, "dim": dim}


def vision_from_checkpoint(checkpoint: str | Path, folder: str | Path) -> Path:
    """Write the query vision path of a `RAGModule` checkpoint (Lightning `.ckpt`) to `folder`."""
    from rag_mm.config import model_config

    path = Path(checkpoint)
    if not path.is_file():
        raise QueryVisionError(f"checkpoint {path} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    state = ckpt.get("state_dict", {})
    size = ckpt.get("hyper_parameters", {}).get("size")
    weight = state.get(CHECKPOINT_PREFIX + "image_proj.weight")
    if size is None or weight is None:
        raise QueryVisionError(
            f"checkpoint {path} holds no RAGModule query encoder "
            f"({CHECKPOINT_PREFIX}image_proj.weight and hyper_parameters.size)"
        )
    vision = VisionTower(model_config(size).vision)
    prefix = CHECKPOINT_PREFIX + "vision."
    vision.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    proj = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    proj.weight.data.copy_(weight)
    return save_query_vision(folder, vision, proj)
