"""MicroDiT (Sehwag et al. 2024, "Stretching Each Dollar", arXiv 2407.15811): our own implementation.

It reproduces SonyResearch/micro_diffusion `models/dit.py` (commit 900d7d4): the same constructor arguments,
state-dict keys and arithmetic, so the released checkpoints load with `load_state_dict(strict=True)` and the
official outputs are matched (tests/test_microdit.py). Differences from the official module:
  * `forward` returns the output tensor, not `{'sample': tensor}`;
  * patch masking (`mask_ratio`, a training-time speed trick) is not supported;
  * the expert-choice MoE uses gather/scatter by default (fast); `set_moe_impl("einsum")` selects the
    official one-hot einsums, which are bit-identical to the official code on CPU (see `ExpertChoiceFFN`);
  * an optional zero-initialised guidance-scale embedding (`add_guidance_embedder`) for w-conditioned
    students; its keys (`guidance_embedder.*`) are the only ones outside the official layout.

Shapes: x (N, C, S, S) latents, t (N,) or (1,) timestep input (EDM c_noise = ln(sigma)/4),
y (N, 1, L, caption_channels) caption embeddings; T = (S/p)^2 tokens.
"""
import math
import os
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from utils import UserError, first_line


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def layer_norm(dim: int, eps: float) -> nn.LayerNorm:
    """MicroDiT's LayerNorm: a weight, no bias."""
    return nn.LayerNorm(dim, eps=eps, bias=False)


def qk_norm(dim: int, eps: float) -> nn.LayerNorm:
    """Non-affine LayerNorm over the whole q or k width (all heads together)."""
    return nn.LayerNorm(dim, eps=eps, elementwise_affine=False)


def gelu_tanh() -> nn.GELU:
    return nn.GELU(approximate="tanh")


def qkv_hidden_dim(dim: int, ratio: float, head_dim: int) -> int:
    """Self-attention width: dim if ratio == 1, else int(dim*ratio) rounded up to a multiple of 2*head_dim."""
    if ratio == 1.0:
        return dim
    return 2 * head_dim * math.ceil(int(dim * ratio) / (2 * head_dim))


def ffn_hidden_dim(dim: int, ratio: float, multiple_of: int, moe: bool) -> int:
    """FFN width: SwiGLU takes 2/3 of int(dim*ratio), the MoE does not; both round up to multiple_of."""
    hidden = int(dim * ratio)
    if not moe:
        hidden = int(2 * hidden / 3)
    return multiple_of * math.ceil(hidden / multiple_of)


def expand_multipliers(multipliers: Sequence[float], depth: int) -> list:
    """Per-block ratios: a list of length depth as is, else each value repeated depth/len times."""
    multipliers = list(multipliers)
    if depth % len(multipliers) != 0:
        raise ValueError(f"{len(multipliers)} multipliers do not divide depth {depth}")
    return [m for m in multipliers for _ in range(depth // len(multipliers))]


def sincos_pos_embed(dim: int, grid: int, interpolation_scale: float) -> np.ndarray:
    """(grid*grid, dim) float64 2-D sin-cos table; token r*grid+q holds [E(q/s), E(r/s)], E = [sin, cos]."""
    pos = np.arange(grid, dtype=np.float64) / interpolation_scale
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim // 4))
    angles = np.einsum("m,d->md", pos, omega)
    emb_1d = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)  # (grid, dim/2)
    col = np.tile(emb_1d, (grid, 1))  # token r*grid+q -> E(q/s)
    row = np.repeat(emb_1d, grid, axis=0)  # token r*grid+q -> E(r/s)
    return np.concatenate([col, row], axis=1)


class PatchEmbed(nn.Module):
    """timm's PatchEmbed as MicroDiT uses it: conv with kernel = stride = patch, tokens in row-major order."""

    def __init__(self, patch_size: int, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Scalar -> (N, dim): 512-wide sinusoid [cos, sin] (float32), then Linear-GELUtanh-Linear."""

    frequency_dim = 512

    def __init__(self, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(self.frequency_dim, dim), gelu_tanh(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class Mlp(nn.Module):
    """fc1 -> GELU(tanh) -> LayerNorm -> fc2 (the caption projection and the pooled-caption MLP)."""

    def __init__(self, in_dim: int, dim: int, eps: float):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, dim)
        self.act = gelu_tanh()
        self.norm = layer_norm(dim, eps)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(self.act(self.fc1(x))))


class CaptionEmbedder(nn.Module):
    def __init__(self, caption_channels: int, dim: int, eps: float):
        super().__init__()
        self.y_proj = Mlp(caption_channels, dim, eps)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.y_proj(y)


def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(N, L, H*hd) -> (N, H, L, hd)."""
    return x.unflatten(-1, (-1, head_dim)).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(N, H, L, hd) -> (N, L, H*hd)."""
    return x.transpose(1, 2).flatten(2)


class SelfAttention(nn.Module):
    """QK-normed self-attention, width `hidden` (a multiple of head_dim), q|k|v from one projection."""

    def __init__(self, dim: int, hidden: int, head_dim: int, use_bias: bool, eps: float):
        super().__init__()
        self.head_dim = head_dim
        self.qkv = nn.Linear(dim, 3 * hidden, bias=use_bias)
        self.proj = nn.Linear(hidden, dim, bias=use_bias)
        self.ln_q = qk_norm(hidden, eps)
        self.ln_k = qk_norm(hidden, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k = self.ln_q(q), self.ln_k(k)
        out = F.scaled_dot_product_attention(*(split_heads(z, self.head_dim) for z in (q, k, v)))
        return self.proj(merge_heads(out))


class CrossAttention(nn.Module):
    """QK-normed cross-attention from image tokens (N, T, d) to caption tokens (N, 1, L, d); width d."""

    def __init__(self, dim: int, head_dim: int, use_bias: bool, eps: float):
        super().__init__()
        self.head_dim = head_dim
        self.q_linear = nn.Linear(dim, dim, bias=use_bias)
        self.kv_linear = nn.Linear(dim, 2 * dim, bias=use_bias)
        self.proj = nn.Linear(dim, dim, bias=use_bias)
        self.ln_q = qk_norm(dim, eps)
        self.ln_k = qk_norm(dim, eps)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        q = self.ln_q(self.q_linear(x))
        k, v = self.kv_linear(cond.flatten(1, 2)).chunk(2, dim=-1)
        k = self.ln_k(k)
        out = F.scaled_dot_product_attention(*(split_heads(z, self.head_dim) for z in (q, k, v)))
        return self.proj(merge_heads(out))


class FeedForward(nn.Module):
    """SwiGLU: w3(SiLU(w1 x) * w2 x)."""

    def __init__(self, dim: int, hidden: int, use_bias: bool):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=use_bias)
        self.w2 = nn.Linear(dim, hidden, bias=use_bias)
        self.w3 = nn.Linear(hidden, dim, bias=use_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class ExpertChoiceFFN(nn.Module):
    """Expert-choice MoE (Zhou et al. 2022, arXiv 2202.09368): each of E experts picks its top-k tokens.

    k = int(capacity * T / E); gate weights are the raw softmax over experts; expert e computes
    GELU(x w1[e]) w2[e] (exact GELU) and its outputs are scatter-summed back to the tokens it chose.
    `impl="gather"` indexes the chosen tokens (fast, the default); `impl="einsum"` multiplies by one-hot
    matrices as the official code does, which is bit-identical to it on CPU but costs O(k*T*d) per expert.
    The two differ by rounding only (about 1e-7 relative per forward).
    """

    def __init__(self, dim: int, hidden: int, num_experts: int, capacity: float):
        super().__init__()
        self.num_experts, self.capacity = num_experts, capacity
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.w1 = nn.Parameter(torch.ones(num_experts, dim, hidden))
        self.w2 = nn.Parameter(torch.ones(num_experts, hidden, dim))
        self.impl = "gather"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        k = int(self.capacity * t / self.num_experts)
        probs = F.softmax(self.gate(x), dim=-1)  # (n, t, E)
        g, idx = torch.topk(probs.permute(0, 2, 1), k, dim=-1)  # (n, E, k)
        if self.impl == "einsum":
            p = F.one_hot(idx, num_classes=t).to(x.dtype)  # (n, E, k, t)
            xin = torch.einsum("nekt,ntd->nekd", p, x)
        else:
            xin = x.gather(1, idx.reshape(n, -1, 1).expand(-1, -1, d)).view(n, self.num_experts, k, d)
        h = F.gelu(torch.einsum("nekd,edf->nekf", xin, self.w1))
        h = torch.einsum("nekf,efd->nekd", h, self.w2)
        out = g.unsqueeze(-1).to(h.dtype) * h
        if self.impl == "einsum":
            return torch.einsum("nekt,nekd->ntd", p, out)
        return x.new_zeros(n, t, d).scatter_add_(1, idx.reshape(n, -1, 1).expand(-1, -1, d), out.reshape(n, -1, d))


class DiTBlock(nn.Module):
    """adaLN-modulated self-attention, un-modulated cross-attention, adaLN-modulated FFN (dense or MoE)."""

    def __init__(self, dim: int, head_dim: int, qkv_ratio: float, mlp_ratio: float, cond_dim: int,
                 multiple_of: int, use_bias: bool, eps: float, moe: bool, num_experts: int, capacity: float):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = (layer_norm(dim, eps) for _ in range(3))
        self.attn = SelfAttention(dim, qkv_hidden_dim(dim, qkv_ratio, head_dim), head_dim, use_bias, eps)
        self.cross_attn = CrossAttention(dim, head_dim, use_bias, eps)
        hidden = ffn_hidden_dim(dim, mlp_ratio, multiple_of, moe)
        self.mlp = ExpertChoiceFFN(dim, hidden, num_experts, capacity) if moe else FeedForward(dim, hidden, use_bias)
        self.adaLN_modulation = nn.Sequential(gelu_tanh(), nn.Linear(cond_dim, 6 * dim))

    def forward(self, x: torch.Tensor, y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + self.cross_attn(self.norm2(x), y)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm3(x), shift_mlp, scale_mlp))


class PromptBlock(nn.Module):
    """Pre-norm transformer block over the caption tokens (`y_emb_preprocess`): no modulation, no gates."""

    def __init__(self, dim: int, head_dim: int, multiple_of: int, use_bias: bool, eps: float):
        super().__init__()
        self.norm1 = layer_norm(dim, eps)
        self.attn = SelfAttention(dim, dim, head_dim, use_bias, eps)
        self.norm2 = layer_norm(dim, eps)
        self.mlp = FeedForward(dim, ffn_hidden_dim(dim, 4.0, multiple_of, moe=False), use_bias)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        y = y + self.attn(self.norm1(y))
        return y + self.mlp(self.norm2(y))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_dim: int, eps: float):
        super().__init__()
        self.norm_final = layer_norm(dim, eps)
        self.adaLN_modulation = nn.Sequential(gelu_tanh(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def projection(in_dim: int, out_dim: int, use_bias: bool, eps: float) -> nn.Module:
    """LayerNorm -> Linear between the backbone and patch-mixer widths; Identity when they are equal."""
    if in_dim == out_dim:
        return nn.Identity()
    return nn.Sequential(layer_norm(in_dim, eps), nn.Linear(in_dim, out_dim, bias=use_bias))


class DiT(nn.Module):
    """MicroDiT: patch-mixer blocks, then DiT blocks with cross-attention and expert-choice MoE every n-th FFN.

    Constructor arguments and defaults are the official ones (the bare defaults differ from the presets).
    Patch masking (`mask_ratio`) is not supported: it only speeds up pre-training.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        dim: int = 1152,
        depth: int = 28,
        head_dim: int = 64,
        multiple_of: int = 256,
        caption_channels: int = 1024,
        pos_interp_scale: float = 1.0,
        norm_eps: float = 1e-6,
        depth_init: bool = True,
        qkv_multipliers: Sequence[float] = (1.0,),
        ffn_multipliers: Sequence[float] = (4.0,),
        use_patch_mixer: bool = True,
        patch_mixer_depth: int = 4,
        patch_mixer_dim: int = 512,
        patch_mixer_qkv_ratio: float = 1.0,
        patch_mixer_mlp_ratio: float = 1.0,
        use_bias: bool = True,
        num_experts: int = 8,
        expert_capacity: float = 1,
        experts_every_n: int = 2,
        init_std: float = 0.02,
        zero_init: bool = True,
    ):
        super().__init__()
        self.config = {k: (list(map(float, v)) if k.endswith("multipliers") else v)
                       for k, v in locals().items() if k not in ("self", "__class__")}
        self.input_size, self.patch_size = input_size, patch_size
        self.in_channels, self.caption_channels = in_channels, caption_channels
        self.depth, self.depth_init, self.init_std, self.zero_init = depth, depth_init, init_std, zero_init
        num_patches = (input_size // patch_size) ** 2
        block_kw = dict(head_dim=head_dim, cond_dim=dim, multiple_of=multiple_of, use_bias=use_bias, eps=norm_eps,
                        num_experts=num_experts, capacity=expert_capacity)

        self.x_embedder = PatchEmbed(patch_size, in_channels, dim)
        self.t_embedder = TimestepEmbedder(dim)
        self.y_embedder = CaptionEmbedder(caption_channels, dim, norm_eps)
        self.y_emb_preprocess = PromptBlock(dim, head_dim, multiple_of, use_bias, norm_eps)
        self.pooled_y_emb_process = Mlp(dim, dim, norm_eps)
        pos = sincos_pos_embed(dim, input_size // patch_size, pos_interp_scale)
        self.register_buffer("pos_embed", torch.from_numpy(pos).float().unsqueeze(0))
        self.register_buffer("mask_token", torch.zeros(1, 1, patch_size**2 * in_channels))

        self.use_patch_mixer = use_patch_mixer
        if use_patch_mixer:
            self.patch_mixer = nn.ModuleList([
                DiTBlock(patch_mixer_dim, qkv_ratio=patch_mixer_qkv_ratio, mlp_ratio=patch_mixer_mlp_ratio,
                         moe=(1 <= i <= patch_mixer_depth - 1 and (i + 1) % experts_every_n == 0), **block_kw)
                for i in range(patch_mixer_depth)])
            self.patch_mixer_map_xin = projection(dim, patch_mixer_dim, use_bias, norm_eps)
            self.patch_mixer_map_xout = projection(patch_mixer_dim, dim, use_bias, norm_eps)
            self.patch_mixer_map_y = projection(dim, patch_mixer_dim, use_bias, norm_eps)

        qkv_ratios = expand_multipliers(qkv_multipliers, depth)
        mlp_ratios = expand_multipliers(ffn_multipliers, depth)
        self.blocks = nn.ModuleList([
            DiTBlock(dim, qkv_ratio=qkv_ratios[i], mlp_ratio=mlp_ratios[i],
                     moe=(i <= depth - 2 and (i + 1) % experts_every_n == 0), **block_kw)
            for i in range(depth)])
        self.final_layer = FinalLayer(dim, patch_size**2 * in_channels, norm_eps)
        self.guidance_embedder: Optional[TimestepEmbedder] = None
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The official initialisation (only matters when training from scratch): spec in micro_diffusion dit.py.

        `init_std` (official: 0.02, for widths ~1024) scales every normal and truncated-normal init; a narrow
        DiT trained from scratch takes 0.02 * sqrt(1024 / dim), the width scaling of muP (Yang et al. 2021,
        arXiv 2203.03466): with 0.02 at dim 96 its caption path stays on a plateau several times longer.
        `zero_init=False` draws the officially zero-initialised layers (adaLN modulations, final layer, the prompt
        block's output projections) like their neighbours: a random network whose every path carries signal and
        gradient, standing in for trained weights (with the official zeros a LoRA adapter's gradient is exactly 0).
        """
        s = self.init_std

        def trunc(w: torch.Tensor, std: float) -> None:
            nn.init.trunc_normal_(w, std=std, a=-2, b=2)

        def zero(w: torch.Tensor) -> None:
            if self.zero_init:
                nn.init.zeros_(w)
            else:
                trunc(w, s)

        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for lin in (self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.pooled_y_emb_process.fc1,
                    self.pooled_y_emb_process.fc2, self.y_embedder.y_proj.fc1, self.y_embedder.y_proj.fc2):
            nn.init.normal_(lin.weight, std=s)
        for i, block in enumerate(self.transformer_blocks()):
            in_backbone = i < self.depth
            std_out = s / math.sqrt(2 * (i + 1)) if in_backbone and self.depth_init else s / math.sqrt(2 * self.depth)
            for norm in (block.norm1, block.norm2, block.norm3):
                norm.reset_parameters()
            for lin in (block.attn.qkv, block.cross_attn.q_linear, block.cross_attn.kv_linear):
                trunc(lin.weight, s)
            for lin in (block.attn.proj, block.cross_attn.proj):
                trunc(lin.weight, std_out)
            if isinstance(block.mlp, ExpertChoiceFFN):
                trunc(block.mlp.gate.weight, s)
                trunc(block.mlp.w1, s)
                trunc(block.mlp.w2, std_out)
            else:
                trunc(block.mlp.w1.weight, s)
                trunc(block.mlp.w2.weight, std_out)
                trunc(block.mlp.w3.weight, std_out)
            zero(block.adaLN_modulation[1].weight)
        pre = self.y_emb_preprocess
        for lin in (pre.attn.qkv, pre.attn.proj, pre.mlp.w1, pre.mlp.w2, pre.mlp.w3):
            trunc(lin.weight, s)
        zero(pre.attn.proj.weight)
        zero(pre.mlp.w3.weight)
        zero(self.final_layer.adaLN_modulation[1].weight)
        zero(self.final_layer.linear.weight)

    def set_moe_impl(self, impl: str) -> None:
        """"gather" (default, fast) or "einsum" (the official one-hot arithmetic, bit-exact on CPU)."""
        if impl not in ("gather", "einsum"):
            raise ValueError(f"unknown MoE implementation {impl!r}")
        for m in self.modules():
            if isinstance(m, ExpertChoiceFFN):
                m.impl = impl

    def transformer_blocks(self) -> list[DiTBlock]:
        """The transformer blocks: the backbone's, then the patch mixer's (if it has one)."""
        return list(self.blocks) + (list(self.patch_mixer) if self.use_patch_mixer else [])

    def add_guidance_embedder(self) -> None:
        """Add a w-embedding (LCM, arXiv 2310.04378) summed into the timestep embedding; zero-initialised,
        so the model's output is unchanged until it is trained. Keys: `guidance_embedder.*`."""
        dim = self.t_embedder.mlp[2].out_features
        ref = self.t_embedder.mlp[0].weight
        self.guidance_embedder = TimestepEmbedder(dim).to(device=ref.device, dtype=ref.dtype)
        nn.init.normal_(self.guidance_embedder.mlp[0].weight, std=0.02)
        nn.init.zeros_(self.guidance_embedder.mlp[0].bias)
        nn.init.zeros_(self.guidance_embedder.mlp[2].weight)
        nn.init.zeros_(self.guidance_embedder.mlp[2].bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) -> (N, C, S, S); feature index = (p_row*p + p_col)*C + c."""
        n, t, _ = x.shape
        g, p, c = int(round(math.sqrt(t))), self.patch_size, self.in_channels
        x = x.reshape(n, g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(n, c, g * p, g * p)

    def forward_without_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                            guidance: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (N, C, S, S), t (N,) or (1,), y (N, 1, L, Cc) -> (N, C, S, S); `guidance` (N,) needs the embedder."""
        n = x.shape[0]
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t.expand(n))
        if guidance is not None:
            if self.guidance_embedder is None:
                raise ValueError("guidance given but the model has no guidance embedder")
            c = c + self.guidance_embedder(guidance.expand(n))
        y = self.y_embedder(y)
        y = self.y_emb_preprocess(y.squeeze(1)).unsqueeze(1)
        c = c + self.pooled_y_emb_process(y.mean(dim=2).squeeze(1))
        if self.use_patch_mixer:
            x = self.patch_mixer_map_xin(x)
            y_mixer = self.patch_mixer_map_y(y)
            for block in self.patch_mixer:
                x = block(x, y_mixer, c)
            x = self.patch_mixer_map_xout(x)
        for block in self.blocks:
            x = block(x, y, c)
        return self.unpatchify(self.final_layer(x, c))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg: float = 1.0,
                guidance: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Classifier-free guidance when cfg != 1: uncond + cfg (cond - uncond), where the unconditional
        branch sees an all-zero caption embedding; both branches run as one batch of 2N (cond first)."""
        if cfg == 1.0:
            return self.forward_without_cfg(x, t, y, guidance)
        t2 = t if len(t) == 1 else torch.cat([t, t])
        g2 = None if guidance is None else torch.cat([guidance.expand(len(x)), guidance.expand(len(x))])
        out = self.forward_without_cfg(torch.cat([x, x]), t2, torch.cat([y, torch.zeros_like(y)]), g2)
        cond, uncond = out.chunk(2)
        return uncond + cfg * (cond - uncond)


def _preset(dim: int, depth: int, head_dim: int, mixer_depth: int, mixer_dim: int, **kw) -> DiT:
    args = dict(patch_size=2, multiple_of=256, norm_eps=1e-6, depth_init=True, use_patch_mixer=True,
                patch_mixer_qkv_ratio=1.0, patch_mixer_mlp_ratio=4.0, use_bias=False, caption_channels=1024,
                pos_interp_scale=1.0, input_size=32, num_experts=8, expert_capacity=2.0, experts_every_n=2,
                in_channels=4, qkv_multipliers=np.linspace(0.5, 1.0, depth).tolist(),
                ffn_multipliers=np.linspace(0.5, 4.0, depth).tolist())
    args.update(kw)
    return DiT(dim=dim, depth=depth, head_dim=head_dim, patch_mixer_depth=mixer_depth,
               patch_mixer_dim=mixer_dim, **args)


def MicroDiT_XL_2(**kw) -> DiT:
    """1.16B parameters; the released 512px teacher is MicroDiT_XL_2(input_size=64, pos_interp_scale=2.0)."""
    return _preset(dim=1024, depth=28, head_dim=64, mixer_depth=6, mixer_dim=768, **kw)


def MicroDiT_Tiny_2(**kw) -> DiT:
    return _preset(dim=512, depth=16, head_dim=32, mixer_depth=4, mixer_dim=512, **kw)


class CheckpointError(UserError):
    """A checkpoint that does not fit the model: names the missing, unexpected and mis-shaped keys."""


_NESTING_KEYS = ("state", "model", "state_dict", "module", "ema")
_PREFIXES = ("dit.", "module.", "_orig_mod.")


def read_state_dict(path: str) -> dict:
    """Tensors of a DiT checkpoint: a `.safetensors` file, or a `torch.save` file (`.pt`/`.pth`/`.bin`) holding
    a state dict, possibly nested (composer's `state.model` with `dit.` keys, `state_dict`, `model`, `ema`)."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        try:
            obj = load_file(path)
        except Exception as e:  # safetensors raises several types for a corrupt or truncated file
            raise UserError(f"cannot read {path} as safetensors ({first_line(e)})") from None
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"cannot read {path} as a tensor-only torch checkpoint ({type(e).__name__}); "
                            "convert it to a plain state dict or .safetensors") from None
    for _ in range(4):  # unwrap nesting such as {'state': {'model': {...}}}
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        inner = next((obj[k] for k in _NESTING_KEYS if isinstance(obj, dict) and isinstance(obj.get(k), dict)), None)
        if inner is None:
            raise UserError(f"no state dict of tensors found in {path}")
        obj = inner
    for prefix in _PREFIXES:
        if any(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items() if k.startswith(prefix)}
    return obj


def load_dit_weights(dit: DiT, source: Union[str, dict]) -> None:
    """Load a checkpoint (path or state dict) strictly; a mismatch raises one `CheckpointError` that counts the
    missing, unexpected and mis-shaped keys and names the first of each."""
    state = read_state_dict(source) if isinstance(source, str) else source
    name = source if isinstance(source, str) else "state dict"
    own = dit.state_dict()
    mismatched = [f"{k} {tuple(state[k].shape)}, model {tuple(v.shape)}"
                  for k, v in own.items() if k in state and state[k].shape != v.shape]
    missing = [f"{k} missing" for k in own if k not in state]
    unexpected = [f"{k} unexpected" for k in state if k not in own]
    if missing or unexpected or mismatched:
        examples = [kind[0] for kind in (mismatched, missing, unexpected) if kind]  # the first of each kind
        raise CheckpointError(f"{name} does not fit this DiT: {len(mismatched)} mis-shaped, {len(missing)} missing, "
                              f"{len(unexpected)} unexpected keys ({'; '.join(examples)}); check --preset")
    dit.load_state_dict(state, strict=True)
