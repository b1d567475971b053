"""Sentence embeddings from a local transformer folder, pooled as sentence-transformers does.

`TextEncoder.from_pretrained()` loads the bundled all-MiniLM-L6-v2 (or any local BERT-like
folder); pooling (mean or CLS) and L2 normalisation follow the folder's sentence-transformers
files (`modules.json`, `1_Pooling/config.json`, `sentence_bert_config.json`), so the vectors
match `SentenceTransformer(folder).encode(...)`. `encoder_identity(folder)` names a folder by
the sha256 of its weights, config and tokenizer files; index manifests store it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rag_mm.tokenizer import ModelFolderError, default_encoder_path, resolve_model_folder

__all__ = [
    "ModelFolderError",
    "PoolingConfig",
    "TextEncoder",
    "default_encoder_path",
    "encoder_identity",
    "read_pooling_config",
]

WEIGHT_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)
POOLING_MODES = ("mean", "cls")
DEFAULT_MAX_LENGTH = 256
# Files whose bytes define the vector space: weights, configs, tokenizer (not README etc.).
_HASHED_SUFFIXES = (".safetensors", ".bin", ".model")
_HASHED_NAMES = {
    "config.json",
    "modules.json",
    "sentence_bert_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
}
_HASH_CACHE: dict[tuple, str] = {}


@dataclass(frozen=True, kw_only=True)
class PoolingConfig:
    """How token states become one sentence vector."""

    mode: str = "mean"  # "mean" over non-padding tokens, or "cls" (the first token)
    normalize: bool = True  # L2-normalise the pooled vector
    max_length: int = DEFAULT_MAX_LENGTH  # tokens kept per text (longer texts are truncated)

    def __post_init__(self) -> None:
        if self.mode not in POOLING_MODES:
            raise ValueError(f"pooling mode must be one of {POOLING_MODES}, got {self.mode!r}")
        if self.max_length < 2:
            raise ValueError(f"pooling max_length must be >= 2 tokens, got {self.max_length}")


def read_pooling_config(folder: str | Path) -> PoolingConfig:
    """The pooling a sentence-transformers folder declares (mean + normalize when it declares none)."""
    folder = Path(folder)
    max_length = DEFAULT_MAX_LENGTH
    sbert = folder / "sentence_bert_config.json"
    if sbert.is_file():
        max_length = int(json.loads(sbert.read_text()).get("max_seq_length", max_length))
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return PoolingConfig(max_length=max_length)
    modules = json.loads(modules_file.read_text())
    types = [m["type"].rsplit(".", 1)[-1] for m in modules]
    mode = "mean"
    for module, kind in zip(modules, types):
        if kind == "Pooling":
            mode = _pooling_mode(folder / module["path"] / "config.json")
    return PoolingConfig(mode=mode, normalize="Normalize" in types, max_length=max_length)


def _pooling_mode(config_file: Path) -> str:
    config = json.loads(config_file.read_text())
    if config.get("pooling_mode_cls_token"):
        return "cls"
    if config.get("pooling_mode_mean_tokens"):
        return "mean"
    enabled = sorted(k for k, v in config.items() if k.startswith("pooling_mode") and v)
    raise ValueError(f"{config_file}: unsupported pooling {enabled}; supported: mean or cls token")


class TextEncoder(nn.Module):
    """A transformer encoder + pooling: `forward(input_ids, attention_mask) -> (B, dim)`."""

    def __init__(self, model: nn.Module, pooling: PoolingConfig, *, path: Path | None = None):
        super().__init__()
        self.model = model
        self.pooling = pooling
        self.path = path  # the folder the weights came from (None for random init)

    @classmethod
    def from_pretrained(
        cls, path: str | Path | None = None, *, dtype: torch.dtype | None = None
    ) -> TextEncoder:
        """Load weights from a local folder (default: the bundled all-MiniLM-L6-v2)."""
        from transformers import AutoModel

        folder = resolve_model_folder(path, needs=("config.json",), what="encoder")
        if not any((folder / name).is_file() for name in WEIGHT_FILES):
            raise ModelFolderError(
                f"encoder folder {folder} has a config.json but no weights (one of "
                f"{list(WEIGHT_FILES)}); refusing to initialise an encoder at random"
            )
        model, info = AutoModel.from_pretrained(
            str(folder),
            local_files_only=True,
            dtype=dtype or torch.float32,
            output_loading_info=True,
        )
        missing = sorted(k for k in info["missing_keys"] if not k.startswith("pooler."))
        if missing:
            raise ModelFolderError(
                f"encoder weights in {folder} lack {len(missing)} parameters "
                f"(e.g. {missing[:3]}); refusing to initialise them at random"
            )
        return cls(model.eval(), read_pooling_config(folder), path=folder)

    @classmethod
    def from_config(cls, config, *, pooling: PoolingConfig | None = None) -> TextEncoder:
        """A randomly initialised encoder from a transformers config (e.g. a tiny `BertConfig`)."""
        from transformers import AutoModel

        return cls(AutoModel.from_config(config), pooling or PoolingConfig())

    def save_pretrained(self, folder: str | Path, *, tokenizer=None) -> Path:
        """Write weights, config and sentence-transformers pooling files (and `tokenizer`) to `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(folder))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(folder))
        _write_pooling_files(folder, self.pooling, self.dim)
        return folder

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling.mode == "cls":
            pooled = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        pooled = at_least_fp32(pooled)
        return F.normalize(pooled, p=2, dim=1) if self.pooling.normalize else pooled


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """`x` in float32, or kept in float64 (bf16 / fp16 results are upcast; a float64 model,
    the parity tests' exact reference, stays float64)."""
    return x if x.dtype == torch.float64 else x.float()


def _write_pooling_files(folder: Path, pooling: PoolingConfig, dim: int) -> None:
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ]
    if pooling.normalize:
        modules.append(
            {
                "idx": 2,
                "name": "2",
                "path": "2_Normalize",
                "type": "sentence_transformers.models.Normalize",
            }
        )
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    pool = {
        "word_embedding_dimension": dim,
        "pooling_mode_cls_token": pooling.mode == "cls",
        "pooling_mode_mean_tokens": pooling.mode == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pool, indent=2))
    sbert = {"max_seq_length": pooling.max_length, "do_lower_case": False}
    (folder / "sentence_bert_config.json").write_text(json.dumps(sbert, indent=2))


def encoder_identity(path: str | Path | None = None) -> dict:
    """Name, resolved path, content hash, dim and pooling of a local encoder folder (JSON-able)."""
    folder = resolve_model_folder(path, needs=("config.json",), what="encoder")
    config = json.loads((folder / "config.json").read_text())
    pooling = read_pooling_config(folder)
    name = "all-MiniLM-L6-v2 (bundled)" if folder == default_encoder_path() else folder.name
    dim = next((config[k] for k in ("hidden_size", "dim", "d_model") if k in config), None)
    return {
        "name": name,
        "path": str(folder),
        "content_hash": folder_content_hash(folder),
        "dim": dim,
        "pooling": pooling.mode,
        "normalize": pooling.normalize,
        "max_length": pooling.max_length,
    }


def folder_content_hash(folder: Path) -> str:
    """sha256 over the weight, config and tokenizer files of `folder`, cached per file mtimes."""
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and (p.name in _HASHED_NAMES or p.suffix in _HASHED_SUFFIXES)
    )
    stats = tuple(
        (str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in files
    )
    key = (str(folder), stats)
    if key not in _HASH_CACHE:
        digest = hashlib.sha256()
        for p in files:
            digest.update(str(p.relative_to(folder)).encode() + b"\0")
            with p.open("rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
        _HASH_CACHE[key] = "sha256:" + digest.hexdigest()
    return _HASH_CACHE[key]
