"""Fixtures shared by several test files; plain helpers are in tests/helpers/."""

from __future__ import annotations

import pandas as pd
import pytest

from tests.helpers.index import save_tiny_encoder


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """Two random tiny BERT folders (different weights)."""
    root = tmp_path_factory.mktemp("encoders")
    return save_tiny_encoder(root / "tiny_a", 0), save_tiny_encoder(root / "tiny_b", 1)


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """A small demo task (`data/`) and its exact index (`index/`, built with the bundled
    MiniLM)."""
    import retrieval_index
    from rag_mm.demo_data import make_demo_data

    root = tmp_path_factory.mktemp("demo")
    make_demo_data(root / "data", seed=1, num_entities=24, examples_per_fact=2)
    corpus = pd.read_parquet(root / "data" / "corpus.parquet")
    retrieval_index.build_index(corpus.to_dict("records"), root / "index", progress=False)
    return root
