"""PyTorch twins of difftrain's models, for the benchmarks (scripts/bench_torch.py).

`TutorialUNet` mirrors src/models/tutorial_unet.rs layer for layer, with the same parameter
names (so it could load difftrain's safetensors) and therefore the same parameter count.
UNet2DModel needs no twin: the benchmark builds diffusers' own class from the config.json that
`bench --diffusers-config` writes.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.embeddings import get_timestep_embedding


class LnResBlock(nn.Module):
    """x + conv2(silu(conv1(silu(ln(x))))), 1x1 conv on the skip when channels change."""

    def __init__(self, cin, cout, size):
        super().__init__()
        self.ln = nn.LayerNorm([cin, size, size])
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv2(F.silu(self.conv1(F.silu(self.ln(x)))))
        return (self.skip(x) if self.skip is not None else x) + h


class TimeMlp(nn.Module):
    def __init__(self, dim, c):
        super().__init__()
        self.linear_1 = nn.Linear(dim, c)
        self.linear_2 = nn.Linear(c, c)

    def forward(self, t):
        return self.linear_2(F.silu(self.linear_1(t)))[:, :, None, None]


class Level(nn.Module):
    pass


class TutorialUNet(nn.Module):
    def __init__(self, image_size=28, in_channels=1, channels=(10, 20, 40, 80), time_embed_dim=128):
        super().__init__()
        c = list(channels)
        sizes = [image_size]
        for _ in range(1, len(c)):
            s = sizes[-1]
            sizes.append(s // 2 if s % 2 == 0 else (s - 1) // 2)
        levels = len(c) - 1
        e = time_embed_dim
        resample = lambda s: (4, 1) if s % 2 == 0 else (3, 0)
        self.time_embed_dim = e
        self.down = nn.ModuleList()
        for i in range(levels):
            cin = in_channels if i == 0 else c[i - 1]
            k, p = resample(sizes[i])
            lvl = Level()
            lvl.te = TimeMlp(e, cin)
            lvl.block1 = LnResBlock(cin, c[i], sizes[i])
            lvl.block2 = LnResBlock(c[i], c[i], sizes[i])
            lvl.down = nn.Conv2d(c[i], c[i], k, 2, p)
            self.down.append(lvl)
        self.mid = Level()
        self.mid.te = TimeMlp(e, c[levels - 1])
        self.mid.block1 = LnResBlock(c[levels - 1], c[levels], sizes[levels])
        self.mid.block2 = LnResBlock(c[levels], c[levels - 1], sizes[levels])
        self.up = nn.ModuleList()
        for i in reversed(range(levels)):
            k, p = resample(sizes[i])
            cout = c[0] if i == 0 else c[i - 1]
            lvl = Level()
            lvl.up = nn.ConvTranspose2d(c[i], c[i], k, 2, p)
            lvl.te = TimeMlp(e, 2 * c[i])
            lvl.block1 = LnResBlock(2 * c[i], c[i], sizes[i])
            lvl.block2 = LnResBlock(c[i], cout, sizes[i])
            self.up.append(lvl)
        self.conv_out = nn.Conv2d(c[0], in_channels, 3, 1, 1)

    def forward(self, x, timesteps):
        t = get_timestep_embedding(timesteps, self.time_embed_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        skips = []
        for lvl in self.down:
            h = lvl.block2(lvl.block1(x + lvl.te(t)))
            x = lvl.down(h)
            skips.append(h)
        x = self.mid.block2(self.mid.block1(x + self.mid.te(t)))
        for lvl in self.up:
            h = torch.cat([skips.pop(), lvl.up(x)], dim=1)
            x = lvl.block2(lvl.block1(h + lvl.te(t)))
        return self.conv_out(x)
