"""An independent eager SiT, built the way the upstream release builds it, for the tests.

It shares no code with sit_fast: the patch embedding, attention and MLP are timm's (the modules the
upstream model imports), and the rest is written here from the architecture as published (adaLN-Zero
blocks, sin-cos position table, sinusoidal timestep features, a label table with a null row for
guidance). A state_dict that loads into this module strictly has the upstream layout; outputs and
gradients that match it are the upstream maths, whatever sit_fast's own modules do.
"""
import math

import numpy as np
import torch
import torch.nn as nn
from timm.models.vision_transformer import Attention, Mlp, PatchEmbed


def sincos_table(dim: int, positions: np.ndarray) -> np.ndarray:
    """(len(positions), dim): dim/2 sines then dim/2 cosines of position * 10000^(-2i/dim)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.outer(positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def position_table(dim: int, grid: int) -> np.ndarray:
    """(grid*grid, dim), tokens in row-major order: first half of the channels encodes the column,
    the second half the row (the MAE table that DiT and SiT use)."""
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    return np.concatenate([sincos_table(dim // 2, cols), sincos_table(dim // 2, rows)], axis=1)


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimeEmbed(nn.Module):
    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t):
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
        args = t[:, None].float() * freqs[None]
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class LabelEmbed(nn.Module):
    def __init__(self, num_classes: int, hidden: int, dropout: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout > 0), hidden)
        self.num_classes = num_classes
        self.dropout = dropout

    def forward(self, labels, train: bool):
        if train and self.dropout > 0:
            dropped = torch.rand(labels.shape[0], device=labels.device) < self.dropout
            labels = torch.where(dropped, self.num_classes, labels)
        return self.embedding_table(labels)


class Block(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, num_heads=heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"), drop=0)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        x = x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x


class Final(nn.Module):
    def __init__(self, hidden: int, patch: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class UpstreamSiT(nn.Module):
    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True):
        super().__init__()
        self.input_size, self.in_channels, self.num_classes = input_size, in_channels, num_classes
        self.learn_sigma = learn_sigma
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.patch_size = patch_size
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimeEmbed(hidden_size)
        self.y_embedder = LabelEmbed(num_classes, hidden_size, class_dropout_prob)
        grid = input_size // patch_size
        table = torch.from_numpy(position_table(hidden_size, grid)).float()[None]
        self.pos_embed = nn.Parameter(table, requires_grad=False)
        self.blocks = nn.ModuleList([Block(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = Final(hidden_size, patch_size, self.out_channels)

    def unpatchify(self, x):
        n, tokens, _ = x.shape
        g, p, c = int(math.isqrt(tokens)), self.patch_size, self.out_channels
        x = x.reshape(n, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)  # n, c, grid row, p row, grid col, p col
        return x.reshape(n, c, g * p, g * p)

    def forward(self, x, t, y):
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        for block in self.blocks:
            x = block(x, c)
        x = self.unpatchify(self.final_layer(x, c))
        if self.learn_sigma:
            x = x[:, : self.in_channels]
        return x

    def forward_with_cfg(self, x, t, y, cfg_scale):
        """Guidance on the first three channels only, as the upstream release does."""
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half]), t, y)
        guided, rest = out[:, :3], out[:, 3:]
        cond, uncond = guided.chunk(2)
        mixed = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([mixed, mixed]), rest], dim=1)
