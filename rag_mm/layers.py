"""Transformer building blocks shared by the vision tower and the fused generator.

Pre-norm, LayerNorm (no BatchNorm), SDPA attention. Projection names (`q_proj`, `k_proj`,
`v_proj`, `o_proj`, `up`, `down`) are the ones tensor-parallel plans refer to.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from rag_mm.config import VisionConfig


class Attention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.o_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | BlockMask | None = None, *,
                is_causal: bool = False) -> torch.Tensor:
        """`mask`: bool (batch, 1, T, T), True where a query may attend a key, or a
        FlexAttention `BlockMask`; None = full, or causal with `is_causal`."""
        batch, seq, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            # -1 keeps the head width right when tensor parallelism shards the projections
            return t.view(batch, seq, self.num_heads, -1).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        if isinstance(mask, BlockMask):
            out = flex_attention(q, k, v, block_mask=mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class MLP(nn.Module):
    def __init__(self, hidden_size: int, mlp_ratio: float) -> None:
        super().__init__()
        inner = int(hidden_size * mlp_ratio)
        self.up = nn.Linear(hidden_size, inner)
        self.down = nn.Linear(inner, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(hidden_size)
        self.attn = Attention(hidden_size, num_heads)
        self.mlp_norm = nn.LayerNorm(hidden_size)
        self.mlp = MLP(hidden_size, mlp_ratio)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | BlockMask | None = None, *,
                is_causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), mask, is_causal=is_causal)
        return x + self.mlp(self.mlp_norm(x))


class VisionTower(nn.Module):
    """Images (batch, C, H, W) in [-1, 1] -> patch features (batch, num_patches, hidden)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = nn.Conv2d(
            config.num_channels, config.hidden_size, config.patch_size, stride=config.patch_size
        )
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches, config.hidden_size))
        self.blocks = nn.ModuleList(
            Block(config.hidden_size, config.num_heads, config.mlp_ratio)
            for _ in range(config.num_layers)
        )
        self.norm = nn.LayerNorm(config.hidden_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def causal_mask(key_valid: torch.Tensor) -> torch.Tensor:
    """Bool (batch, 1, T, T): causal, padding keys hidden; every position sees itself."""
    seq = key_valid.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=key_valid.device).tril()
    eye = torch.eye(seq, dtype=torch.bool, device=key_valid.device)
    return (causal & key_valid[:, None, None, :]) | eye


def flex_causal_mask(key_valid: torch.Tensor) -> BlockMask:
    """`causal_mask`'s rule as a FlexAttention block mask (no (T, T) tensor per row; fully
    hidden blocks are skipped by the kernel)."""
    batch, seq = key_valid.shape

    def mask_mod(b, h, q_idx, kv_idx):
        return ((kv_idx <= q_idx) & key_valid[b, kv_idx]) | (q_idx == kv_idx)

    return create_block_mask(mask_mod, batch, None, seq, seq, device=key_valid.device)


def decoder_attention(key_valid: torch.Tensor, kind: str):
    """(mask, is_causal) for `Attention` under `GeneratorConfig.attention` = `kind`:
    "masked" the boolean `causal_mask` (SDPA kernels that take a mask: no FlashAttention),
    "flex" the same rule as a FlexAttention block mask, "causal" no mask at all
    (FlashAttention / cuDNN; only for sequences padded at the end, see
    `RetrievalUnit.assemble`)."""
    if kind == "causal":
        return None, True
    if kind == "flex":
        return flex_causal_mask(key_valid), False
    return causal_mask(key_valid), False


def init_weights(module: nn.Module, *, std: float = 0.02, residual_layers: int = 1) -> None:
    """Initialise every Linear/Conv/Embedding/LayerNorm/pos-embed below `module`.

    - Linear, Conv2d, Embedding weights: normal(0, std); biases zero.
    - Residual output projections (`o_proj`, `down`): normal(0, std / sqrt(2 * residual_layers)).
    - LayerNorm: weight one, bias zero.
    - Vision position embeddings: normal(0, std).
    """
    for name, sub in module.named_modules():
        if isinstance(sub, (nn.Linear, nn.Conv2d, nn.Embedding)):
            is_residual_out = name.endswith(("o_proj", "down"))
            scale = std / (2 * residual_layers) ** 0.5 if is_residual_out else std
            nn.init.normal_(sub.weight, 0.0, scale)
            if getattr(sub, "bias", None) is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.LayerNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)
        elif isinstance(sub, VisionTower):
            nn.init.normal_(sub.pos_embed, 0.0, std)
