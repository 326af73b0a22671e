"""BiMamba: a Mamba mixer over the sequence and over its reverse, sharing the in/out projections (Caduceus).

    y = Mamba_f(x) + flip(Mamba_r(flip(x)))

Mamba_f and Mamba_r share `in_proj` and `out_proj` (Caduceus ties them across directions); each direction has its
own convolution, SSM parameters (dt bias, A, D; Mamba-1 also x_proj and dt_proj) and, for Mamba-2, its own gated
RMSNorm. Both projections are bias-free and linear, so the shared in-projection is computed once and flipped,
and the two directions' inner outputs are summed before one out-projection: exactly the formula above, at the
cost of one Mamba in the projections.

Mixers (`MambaConfig.mixer`):
- "mamba2" (default; H-Net's choice): in_proj -> [z, x, B, C, dt]; causal depthwise conv on [x, B, C]; SiLU;
  SSD scan with a scalar decay per head; y * silu(z) -> RMSNorm (gated, after the gate); out_proj.
- "mamba1" (Caduceus / the older DNAChunker code): in_proj -> [x, z]; causal depthwise conv on x; SiLU;
  x_proj -> [dt (rank R), B, C]; dt_proj; selective scan (decay per channel and state) with D and the z gate.
The scan backend is chosen in dnascale.models.dnachunker.ssm.

Padding: sequences are right-padded. The reverse direction flips each sequence over its own length (padding
stays at the end), and both directions are causal in their own time order, so no real output ever sees a padded
position and no masking inside the mixer is needed.

A block is pre-norm with a residual and no MLP (Caduceus' Block around BiMambaWrapper): x + BiMamba(RMSNorm(x)).
Every parameter is created and initialised in the __init__ of the module that owns it (ZeRO-3's zero.Init
partitions a module's parameters as soon as its own __init__ returns). These layers are replicated on every
tensor-parallel rank (see docs/architecture.md, DNACHUNKER).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dnascale.models.dnachunker import ssm

MIXERS: tuple[str, ...] = ("mamba2", "mamba1")


@dataclass
class MambaConfig:
    hidden: int
    mixer: str = "mamba2"
    d_state: int = 128  # Mamba-2 (H-Net) 128; Mamba-1 (Caduceus) 16
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64  # Mamba-2: channels per head
    ngroups: int = 1  # Mamba-2: B/C groups
    dt_rank: int | None = None  # Mamba-1: None = ceil(hidden / 16)
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    chunk_size: int = 64  # SSD chunk / two-level scan chunk
    scan_backend: str = "auto"
    norm_eps: float = 1e-5
    init_std: float = 0.02
    output_init_std: float = 0.02

    @property
    def inner(self) -> int:
        return self.expand * self.hidden

    @property
    def heads(self) -> int:
        return self.inner // self.headdim

    @property
    def rank(self) -> int:
        return self.dt_rank if self.dt_rank is not None else math.ceil(self.hidden / 16)

    @property
    def in_proj_size(self) -> int:
        if self.mixer == "mamba2":
            return 2 * self.inner + 2 * self.ngroups * self.d_state + self.heads
        return 2 * self.inner

    @property
    def conv_channels(self) -> int:
        return self.inner + 2 * self.ngroups * self.d_state if self.mixer == "mamba2" else self.inner


def _uniform_(tensor: torch.Tensor, bound: float) -> torch.Tensor:
    return nn.init.uniform_(tensor, -bound, bound)


def _inverse_softplus_dt(size: int, config: MambaConfig) -> torch.Tensor:
    """dt ~ log-uniform in [dt_min, dt_max] (floored), returned as the bias b with softplus(b) = dt (Mamba)."""
    dt = torch.exp(torch.rand(size) * (math.log(config.dt_max) - math.log(config.dt_min)) + math.log(config.dt_min))
    dt = dt.clamp(min=config.dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))


def causal_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Depthwise causal conv over time: x [b, l, c], weight [c, 1, k] -> [b, l, c] (position t sees t-k+1..t)."""
    length, width = x.shape[1], weight.shape[-1]
    out = F.conv1d(x.transpose(1, 2), weight, bias, padding=width - 1, groups=x.shape[-1])
    return out[..., :length].transpose(1, 2)


class Mamba2Direction(nn.Module):
    """One direction's own parameters and computation, from the shared projection to the inner output."""

    def __init__(self, config: MambaConfig) -> None:
        super().__init__()
        self.config = config
        channels, heads = config.conv_channels, config.heads
        self.conv_weight = nn.Parameter(torch.empty(channels, 1, config.d_conv))
        self.conv_bias = nn.Parameter(torch.empty(channels))
        self.dt_bias = nn.Parameter(torch.empty(heads))
        self.A_log = nn.Parameter(torch.empty(heads))
        self.D = nn.Parameter(torch.ones(heads))
        self.norm_weight = nn.Parameter(torch.ones(config.inner))
        with torch.no_grad():
            bound = 1.0 / math.sqrt(config.d_conv)  # nn.Conv1d's default for a depthwise kernel
            _uniform_(self.conv_weight, bound)
            _uniform_(self.conv_bias, bound)
            self.dt_bias.copy_(_inverse_softplus_dt(heads, config))
            self.A_log.copy_(torch.log(torch.empty(heads).uniform_(1.0, 16.0)))

    def forward(self, projected: torch.Tensor) -> torch.Tensor:
        c = self.config
        batch, length, _ = projected.shape
        z, xbc, dt = projected.split([c.inner, c.conv_channels, c.heads], dim=-1)
        xbc = F.silu(causal_conv(xbc, self.conv_weight, self.conv_bias))
        x, B, C = xbc.split([c.inner, c.ngroups * c.d_state, c.ngroups * c.d_state], dim=-1)
        compute = torch.promote_types(projected.dtype, torch.float32)  # SSM parameters: float32 at least
        dt = F.softplus(dt.to(compute) + self.dt_bias.to(compute))
        A = -torch.exp(self.A_log.to(compute))
        y = ssm.ssd_scan(
            x.reshape(batch, length, c.heads, c.headdim), dt, A,
            B.reshape(batch, length, c.ngroups, c.d_state), C.reshape(batch, length, c.ngroups, c.d_state),
            D=self.D, chunk_size=c.chunk_size, backend=c.scan_backend,
        ).reshape(batch, length, c.inner)
        # Gated RMSNorm (Mamba-2, norm after the gate), one normalisation group per B/C group.
        gated = (y * F.silu(z)).to(compute)
        groups = gated.reshape(batch, length, c.ngroups, c.inner // c.ngroups)
        normed = F.rms_norm(groups, (groups.shape[-1],), eps=c.norm_eps).reshape(batch, length, c.inner)
        return (normed * self.norm_weight.to(compute)).to(projected.dtype)


class Mamba1Direction(nn.Module):
    def __init__(self, config: MambaConfig) -> None:
        super().__init__()
        self.config = config
        inner, rank, state = config.inner, config.rank, config.d_state
        self.conv_weight = nn.Parameter(torch.empty(inner, 1, config.d_conv))
        self.conv_bias = nn.Parameter(torch.empty(inner))
        self.x_proj_weight = nn.Parameter(torch.empty(rank + 2 * state, inner))
        self.dt_proj_weight = nn.Parameter(torch.empty(inner, rank))
        self.dt_proj_bias = nn.Parameter(torch.empty(inner))
        # A_log kept flat ([inner * state], reshaped in forward): the optimizer's rule "no weight decay on 1-D
        # parameters" then exempts it, as Mamba exempts A_log and D.
        self.A_log = nn.Parameter(torch.empty(inner * state))
        self.D = nn.Parameter(torch.ones(inner))
        with torch.no_grad():
            bound = 1.0 / math.sqrt(config.d_conv)
            _uniform_(self.conv_weight, bound)
            _uniform_(self.conv_bias, bound)
            _uniform_(self.x_proj_weight, 1.0 / math.sqrt(inner))  # nn.Linear's default
            _uniform_(self.dt_proj_weight, rank ** -0.5)  # Mamba's dt_init="random", dt_scale=1
            self.dt_proj_bias.copy_(_inverse_softplus_dt(inner, config))
            self.A_log.copy_(torch.log(torch.arange(1, state + 1, dtype=torch.float32)).repeat(inner))

    def forward(self, projected: torch.Tensor) -> torch.Tensor:
        c = self.config
        x, z = projected.split([c.inner, c.inner], dim=-1)
        x = F.silu(causal_conv(x, self.conv_weight, self.conv_bias))
        dt, B, C = F.linear(x, self.x_proj_weight).split([c.rank, c.d_state, c.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj_weight)
        compute = torch.promote_types(projected.dtype, torch.float32)  # SSM parameters: float32 at least
        A = -torch.exp(self.A_log.to(compute)).reshape(c.inner, c.d_state)
        y = ssm.selective_scan(
            x.transpose(1, 2), dt.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2),
            D=self.D.to(compute), z=z.transpose(1, 2), delta_bias=self.dt_proj_bias.to(compute), delta_softplus=True,
            chunk_size=c.chunk_size, backend=c.scan_backend,
        )
        return y.transpose(1, 2).to(projected.dtype)


DIRECTIONS: dict[str, type[nn.Module]] = {"mamba2": Mamba2Direction, "mamba1": Mamba1Direction}


def reverse_index(padding: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """Gather index [B, L] that reverses each right-padded sequence over its own length (padding stays put);
    None when nothing is padded (a plain flip does)."""
    if padding is None:
        return None
    lengths = padding.sum(dim=1, keepdim=True)
    if bool((lengths == length).all()):
        return None
    t = torch.arange(length, device=padding.device)[None]
    return torch.where(t < lengths, lengths - 1 - t, t)


def flip_sequences(x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """Reverse along dim 1, per sequence when `index` (from reverse_index) is given. An involution."""
    if index is None:
        return x.flip(1)
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


class BiMamba(nn.Module):
    """The bidirectional mixer: shared in/out projections around a forward and a reverse direction."""

    def __init__(self, config: MambaConfig) -> None:
        super().__init__()
        if config.mixer not in DIRECTIONS:
            raise ValueError(f"unknown mixer {config.mixer!r}; choose one of {list(MIXERS)}")
        self.config = config
        self.in_proj_weight = nn.Parameter(torch.empty(config.in_proj_size, config.hidden))
        self.out_proj_weight = nn.Parameter(torch.empty(config.hidden, config.inner))
        with torch.no_grad():
            nn.init.normal_(self.in_proj_weight, std=config.init_std)
            nn.init.normal_(self.out_proj_weight, std=config.output_init_std)
        self.forward_direction = DIRECTIONS[config.mixer](config)
        self.reverse_direction = DIRECTIONS[config.mixer](config)

    def forward(self, x: torch.Tensor, reverse: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, L, hidden]; `reverse` from reverse_index (None: unpadded)."""
        projected = F.linear(x, self.in_proj_weight)
        inner = self.forward_direction(projected)
        inner = inner + flip_sequences(self.reverse_direction(flip_sequences(projected, reverse)), reverse)
        return F.linear(inner, self.out_proj_weight)


class BiMambaBlock(nn.Module):
    """x + BiMamba(RMSNorm(x))."""

    def __init__(self, config: MambaConfig) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(config.hidden, eps=config.norm_eps)
        self.mixer = BiMamba(config)

    def forward(self, x: torch.Tensor, reverse: torch.Tensor | None = None) -> torch.Tensor:
        return x + self.mixer(self.norm(x), reverse)


class BiMambaStack(nn.Module):
    """`layers` BiMamba blocks, optionally closed by an RMSNorm (H-Net's isotropic stages end normalised)."""

    def __init__(self, config: MambaConfig, layers: int, final_norm: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(BiMambaBlock(config) for _ in range(layers))
        self.final_norm = nn.RMSNorm(config.hidden, eps=config.norm_eps) if final_norm else None

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, L, hidden], right-padded; padding [B, L] bool (True = real) or None."""
        reverse = reverse_index(padding, x.shape[1])
        for layer in self.layers:
            x = layer(x, reverse)
        return self.final_norm(x) if self.final_norm is not None else x
