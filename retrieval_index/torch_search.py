"""Exact inner-product search with torch: the stored vectors on a device, matmul + top-k in chunks.

The search path of a `Flat` index when CUDA is present (`retrieval_index.load(DIR)`), or on
request (`load(DIR, search="torch")`, CPU included). Query tensors stay where they are: a
query on the GPU is searched on the GPU and only the (n, k) keys and scores come back.

Accuracy: the vectors are stored in `dtype` (fp16 / bf16 / fp32; each element rounded with
unit roundoff u), the queries cast to it, the products accumulated in fp32 by the matmul and
the scores rounded to `dtype` once more. For unit vectors (sum_i |q_i d_i| <= 1) a score is
off from the exact one by at most `score_error_bound(dtype, dim)` = (2u + u^2 + gamma_dim) + u
(gamma_dim = dim * u32 / (1 - dim * u32), fp32 accumulation), so two documents whose exact
scores differ by more than twice that are ranked as exact search ranks them.
"""

from __future__ import annotations

import numpy as np
import torch

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CHUNK_ROWS = 262_144  # document rows per matmul: (n, CHUNK_ROWS) scores in flight


def score_error_bound(dtype: torch.dtype, dim: int) -> float:
    """Largest |score - exact score| for unit vectors searched in `dtype` (see the module doc)."""
    u, u32 = UNIT_ROUNDOFF[dtype], UNIT_ROUNDOFF[torch.float32]
    gamma = dim * u32 / (1 - dim * u32)
    inputs = 0.0 if dtype == torch.float32 else 2 * u + u * u
    output = 0.0 if dtype == torch.float32 else u
    return inputs + gamma + output


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA (10-bit mantissa, unit vectors fit its range), fp32 elsewhere."""
    return torch.float16 if device.type == "cuda" else torch.float32


class TorchExactSearch:
    """Top-k by inner product over `vectors` (n, dim), held on `device` in `dtype`."""

    def __init__(self, vectors: np.ndarray, *, device=None, dtype: torch.dtype | str | None = None,
                 chunk_rows: int = CHUNK_ROWS):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise ValueError(f"search dtype {dtype!r} is not one of {sorted(DTYPES)}")
            dtype = DTYPES[dtype]
        self.dtype = dtype or default_dtype(self.device)
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        self.chunk_rows = chunk_rows
        count, self.dim = vectors.shape
        self.vectors = torch.empty((count, self.dim), dtype=self.dtype, device=self.device)
        for start in range(0, count, chunk_rows):  # never the whole fp32 array on the device
            part = np.array(vectors[start : start + chunk_rows], dtype=np.float32)  # writable
            self.vectors[start : start + len(part)] = torch.from_numpy(part).to(self.device)

    def __len__(self) -> int:
        return len(self.vectors)

    @torch.no_grad()
    def search_tensors(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores float32 (n, k), keys int64 (n, k)) on `self.device`; -inf / -1 past the count."""
        q = queries.detach().to(self.device, self.dtype)
        n = len(q)
        best_scores = torch.full((n, 0), -torch.inf, device=self.device)
        best_keys = torch.full((n, 0), -1, dtype=torch.long, device=self.device)
        for start in range(0, len(self.vectors), self.chunk_rows):
            scores = (q @ self.vectors[start : start + self.chunk_rows].T).float()
            top, where = scores.topk(min(k, scores.shape[1]), dim=1)
            best_scores = torch.cat([best_scores, top], dim=1)
            best_keys = torch.cat([best_keys, where + start], dim=1)
            if best_scores.shape[1] > k:
                best_scores, order = best_scores.topk(k, dim=1)
                best_keys = best_keys.gather(1, order)
        if best_scores.shape[1] < k:
            pad = k - best_scores.shape[1]
            best_scores = torch.nn.functional.pad(best_scores, (0, pad), value=-torch.inf)
            best_keys = torch.nn.functional.pad(best_keys, (0, pad), value=-1)
        return best_scores, best_keys

    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Numpy `(scores, keys)` of numpy or tensor queries (a tensor is not copied to the host)."""
        if not isinstance(queries, torch.Tensor):
            queries = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
        scores, keys = self.search_tensors(queries, k)
        return scores.cpu().numpy(), keys.cpu().numpy()
