"""A Qwen3 / LLaMA-3 decoder in one file, with In-Place TTT in chosen MLPs.

Parameter names are Hugging Face's (`model.layers.{i}.self_attn.q_proj`, `mlp.down_proj`, ...), so loading a
checkpoint is a checked copy (load_hf.py) and the fast weight of the paper is literally `mlp.down_proj`.
Reading order: config and presets, RoPE, norm, attention, MLP (+TTT), block, the model, the cache.

Batches and padding: there is none. A forward without a cache takes equal-length rows starting at position 0.
With a cache (incremental decoding) every row carries its own position: a ragged batch of prompts is prefilled
row by row through `cache.rows(b, b + 1)`, then decoded together one token per step, each row folding its TTT
chunk updates at its own absolute chunk boundaries. No padded position ever reaches attention or a TTT update.

    from model import PRESETS, Transformer
    model = Transformer(PRESETS["tiny"])
    logits = model(torch.randint(0, 1000, (2, 64)))           # (B, T, V)
"""

import math
import warnings
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from torch.utils.checkpoint import checkpoint

import ttt

try:  # optional: flash-attn when installed on CUDA, else torch SDPA (same results)
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None


# -----------------------------------------------------------------------------
# Config


@dataclass
class ModelConfig:
    arch: str = "qwen3"  # "qwen3" or "llama": picks the HF architecture name on export
    vocab_size: int = 151936
    hidden_size: int = 1024  # D
    intermediate_size: int = 3072  # F: the fast weight down_proj is D x F
    num_layers: int = 28
    num_heads: int = 16
    num_kv_heads: int = 8  # GQA: each KV head serves num_heads / num_kv_heads query heads
    head_dim: int = 128  # explicit: Qwen3 has head_dim != hidden_size / num_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: dict | None = None  # HF dict: {"rope_type": "llama3"|"yarn", "factor": ..., ...}
    max_position_embeddings: int = 40960  # the context the checkpoint was trained for (sample.py checks it)
    tie_word_embeddings: bool = True  # lm_head shares embed_tokens' weight (small models)
    qk_norm: bool = True  # Qwen3 RMS-normalises q and k per head before RoPE
    sliding_window: int | None = None  # every layer sees the last W keys only (from-scratch experiments)
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    # In-Place TTT (ttt.py). An empty ttt_layers gives the plain base model.
    ttt_layers: tuple = ()  # layer indices whose down_proj is a fast weight
    ttt_chunk: int = 4096  # C: tokens per update, chunks start at absolute multiples of C
    ttt_lr: float = 3.0  # eta: step size of the fast-weight update
    ttt_proj: bool = True  # learned target projection P (mlp.ttt_proj); False means V_hat = conv(s)
    ttt_target: str = "hidden_states"  # source s of the target: "hidden_states" (MLP input) or "input_embed"
    ttt_fp32_state: bool = True  # accumulate the sum of updates in fp32 (bf16 rounds small updates away)
    ttt_clip_tau: float | None = None  # rescale each chunk's update to Frobenius norm <= tau (inference option)
    ttt_mode: str | None = None  # the official release's config key, kept so export writes it back
    extra: dict = field(default_factory=dict)  # unknown HF config fields, carried through export untouched

    def __post_init__(self):
        self.ttt_layers = tuple(int(i) for i in self.ttt_layers)
        if self.ttt_target not in ("hidden_states", "input_embed"):
            raise ValueError(f"ttt_target must be 'hidden_states' or 'input_embed', got {self.ttt_target!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")

    def with_ttt(self, layers=None, every=None, **kw) -> "ModelConfig":
        """Copy with TTT in `layers` (or every `every`-th layer, counting from layer `every - 1`)."""
        if every is not None:
            layers = tuple(range(every - 1, self.num_layers, every))
        kw = {f"ttt_{k}": v for k, v in kw.items()}
        return replace(self, ttt_layers=tuple(layers if layers is not None else self.ttt_layers), **kw)


def _qwen3(D, F, L, H, KV, tie):
    return ModelConfig("qwen3", 151936, D, F, L, H, KV, 128, 1e-6, 1e6, None, 40960, tie, True,
                       bos_token_id=151643, eos_token_id=151645)


def _llama(D, F, L, H, KV, tie, theta=500000.0, scaling=32.0, ctx=131072, vocab=128256, bos=128000, eos=128001):
    rope = {"rope_type": "llama3", "factor": scaling, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}
    return ModelConfig("llama", vocab, D, F, L, H, KV, D // H, 1e-5, theta, rope, ctx, tie, False,
                       bos_token_id=bos, eos_token_id=eos)


PRESETS = {
    # Tests and CPU demos: Qwen3 layout and tokenizer, a few million parameters besides the embedding.
    "tiny": ModelConfig("qwen3", 151936, 128, 384, 4, 4, 2, 32, 1e-6, 1e4, None, 4096, True, True,
                        bos_token_id=151643, eos_token_id=151643, ttt_layers=(1, 3), ttt_chunk=64, ttt_lr=0.1,
                        ttt_target="input_embed"),
    # Qwen/Qwen3-0.6B-Base, Qwen/Qwen3-1.7B-Base, Qwen/Qwen3-4B-Base, Qwen/Qwen3-8B-Base, Qwen/Qwen3-14B-Base
    "qwen3-0.6b": _qwen3(1024, 3072, 28, 16, 8, True),
    "qwen3-1.7b": _qwen3(2048, 6144, 28, 16, 8, True),
    "qwen3-4b": _qwen3(2560, 9728, 36, 32, 8, True),
    "qwen3-8b": _qwen3(4096, 12288, 36, 32, 8, False),
    "qwen3-14b": _qwen3(5120, 17408, 40, 40, 8, False),
    # meta-llama/Llama-3.2-1B, meta-llama/Llama-3.2-3B, meta-llama/Llama-3.1-8B
    "llama-3.2-1b": _llama(2048, 8192, 16, 32, 8, True),
    "llama-3.2-3b": _llama(3072, 8192, 28, 24, 8, True),
    "llama-3.1-8b": _llama(4096, 14336, 32, 32, 8, False, scaling=8.0),
    # HuggingFaceTB/SmolLM2-135M-Instruct (LLaMA architecture, plain RoPE)
    "smollm2-135m": replace(_llama(576, 1536, 30, 9, 3, True, theta=100000.0, ctx=8192, vocab=49152, bos=1, eos=2),
                            rope_scaling=None),
}
TTT_RECIPE = dict(every=6, chunk=4096, lr=3.0, proj=True, target="hidden_states")


# -----------------------------------------------------------------------------
# Rotary embeddings (fp32, HF's rotate_half convention; computed on the fly so meta-device construction is safe)


def rope_inv_freq(cfg: ModelConfig, device=None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim/2,) and the cos/sin scale, for plain, llama3 and yarn RoPE as HF defines them."""
    dim, base = cfg.head_dim, cfg.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    rs = cfg.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "default":
        return inv_freq, 1.0
    if kind == "llama3":
        # Long wavelengths are slowed by `factor`, short ones kept, the band in between interpolated smoothly.
        factor, lo, hi, old = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"], \
            rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old / lo, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        # Interpolate low frequencies by `factor`, keep high ones, ramp in between; scale cos/sin by mscale.
        factor, old = rs["factor"], rs["original_max_position_embeddings"]
        mscale, mscale_all = rs.get("mscale"), rs.get("mscale_all_dim")

        def get_mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attn = rs.get("attention_factor")
        if attn is None:
            attn = get_mscale(factor, mscale) / get_mscale(factor, mscale_all) if mscale and mscale_all \
                else get_mscale(factor)
        beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

        def correction_dim(rot):
            return dim * math.log(old / (rot * 2 * math.pi)) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if rs.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        high = high + 0.001 if low == high else high
        ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
        pos_freqs = base ** (torch.arange(0, dim, 2, device=device).float() / dim)
        extrapolate = 1 - ramp
        inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
        return inv, float(attn)
    raise ValueError(f"unsupported rope_scaling type {kind!r}: supported are default, llama3, yarn")


def rope_cos_sin(cfg: ModelConfig, pos: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (B, 1, T, head_dim) for integer positions pos (B, T), computed in fp32."""
    inv_freq, scale = rope_inv_freq(cfg, pos.device)
    freqs = pos[..., None].float() * inv_freq  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd)
    return (emb.cos() * scale).to(dtype)[:, None], (emb.sin() * scale).to(dtype)[:, None]


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


# -----------------------------------------------------------------------------
# Layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32, cast back before the weight, as HF does (matters for bf16 parity).
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        hd, H, KV = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        self.q_proj = nn.Linear(cfg.hidden_size, H * hd, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, KV * hd, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, KV * hd, bias=False)
        self.o_proj = nn.Linear(H * hd, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, kv=None, pos=None):
        """x (B, T, D). kv: this layer's (k, v) cache of shape (B, KV, S, hd), written in place at `pos` (B,)."""
        B, T, _ = x.shape
        hd = self.cfg.head_dim
        q = self.q_proj(x).view(B, T, -1, hd)  # (B, T, H, hd)
        k = self.k_proj(x).view(B, T, -1, hd)  # (B, T, KV, hd)
        v = self.v_proj(x).view(B, T, -1, hd).transpose(1, 2)  # (B, KV, T, hd)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H|KV, T, hd)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        y = self._attend(q, k, v, kv, pos)  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def _attend(self, q, k, v, kv, pos):
        W, (B, _, T, _) = self.cfg.sliding_window, q.shape
        if kv is not None and T == 1:  # decoding: rows may sit at different positions, so mask per row
            rows = torch.arange(B, device=q.device)
            kv[0][rows, :, pos], kv[1][rows, :, pos] = k[:, :, 0], v[:, :, 0]
            mask = _mask(pos[:, None], kv[0].shape[2], W)[:, None]  # (B, 1, 1, S): the whole static cache
            return F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask, enable_gqa=True)
        if kv is not None:  # prefill, or its continuation: every row at position p
            p = int(pos[0])
            kv[0][:, :, p:p + T], kv[1][:, :, p:p + T] = k, v
            k, v = kv[0][:, :, :p + T], kv[1][:, :, :p + T]  # (B, KV, S, hd) with S = p + T
        S = k.shape[2]
        # Causal with the diagonal at the bottom right: query t sits at position S - T + t.
        if flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            y = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
                                window_size=(W - 1 if W else -1, 0))
            return y.transpose(1, 2)
        if W is not None:
            mask = _mask(torch.arange(S - T, S, device=q.device)[None], S, W)[:, None]  # (1, 1, T, S)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        bias = None if S == T else causal_lower_right(T, S)  # no (T, S) mask is ever built for a long prefill
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=S == T, enable_gqa=True)


def _mask(qpos, S, window):
    """Boolean (B, T, S) mask: query at position qpos sees keys at positions <= qpos (and > qpos - window)."""
    kpos = torch.arange(S, device=qpos.device)
    m = kpos <= qpos[..., None]
    if window is not None:
        m &= kpos > qpos[..., None] - window
    return m


class MLP(nn.Module):
    """SwiGLU. In a TTT layer down_proj is the fast weight W0 and ttt_conv / ttt_proj build the update target."""

    def __init__(self, cfg: ModelConfig, use_ttt: bool):
        super().__init__()
        self.cfg, self.use_ttt = cfg, use_ttt
        # With keep_state, a TTT forward leaves its final ttt.TTTState (detached) in last_state, so a
        # caller (train.py's ‖ΣΔW‖ probe) reads what was computed instead of redoing the layer's TTT.
        self.keep_state, self.last_state = False, None
        D, Fd = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(D, Fd, bias=False)
        self.up_proj = nn.Linear(D, Fd, bias=False)
        self.down_proj = nn.Linear(Fd, D, bias=False)
        if use_ttt:
            self.ttt_conv = nn.Conv1d(D, D, kernel_size=5, padding=2, groups=D, bias=False)  # weight (D, 1, 5)
            if cfg.ttt_proj:
                self.ttt_proj = nn.Linear(D, D, bias=False)  # weight P used as stored: V_hat = U @ P

    def forward(self, x, embeds, cache=None, layer=None, enabled=True):
        h = F.silu(self.gate_proj(x)) * self.up_proj(x)  # H: (B, T, F)
        if not (self.use_ttt and enabled):
            return self.down_proj(h)
        cfg, C = self.cfg, self.cfg.ttt_chunk
        s = x if cfg.ttt_target == "hidden_states" else embeds  # (B, T, D)
        st = None if cache is None else cache.ttt[layer]
        if st is not None and h.shape[1] == 1:
            return self._decode(h, s, st, cache.pos)
        init = None
        if st is not None:  # a prefill (or its continuation), all rows at one position: go on from the cached state
            p = int(cache.pos[0])
            init = ttt.TTTState(st.dW, st.s_buf[:, :p % C], st.h_buf[:, :p % C], p)
        out, new = ttt.chunked(h, s, self.down_proj.weight, self.ttt_conv.weight, self._P(), cfg.ttt_lr, C,
                               initial_state=init, clip_tau=cfg.ttt_clip_tau, fp32_state=cfg.ttt_fp32_state)
        if self.keep_state:
            self.last_state = ttt.TTTState(new.dW.detach(), new.s_buf.detach(), new.h_buf.detach(), new.pos)
        if st is not None:
            n = new.pos % C
            st.dW.copy_(new.dW)
            st.s_buf[:, :n], st.h_buf[:, :n] = new.s_buf, new.h_buf
            st.W.copy_(self.down_proj.weight + st.dW)
        return out

    def _P(self):
        return self.ttt_proj.weight if self.cfg.ttt_proj else None

    def _decode(self, h, s, st, pos):
        """One token per row at per-row positions pos (B,): apply W0 + sum dW and buffer the token.
        A completed chunk is folded in by fold() after the step, outside any compiled graph."""
        out = torch.bmm(h, st.W.transpose(1, 2))  # (B, 1, F) @ (B, F, D) -> (B, 1, D): a plain MLP's cost
        rows, slot = torch.arange(h.shape[0], device=h.device), pos % self.cfg.ttt_chunk
        st.s_buf[rows, slot], st.h_buf[rows, slot] = s[:, 0], h[:, 0]
        return out

    @torch.no_grad()
    def fold(self, st, rows):
        """Fold the now complete chunk of each row in `rows` into its fast weight."""
        cfg = self.cfg
        dW = ttt.chunk_update(st.s_buf[rows], st.h_buf[rows], self.ttt_conv.weight, self._P(), cfg.ttt_lr,
                              cfg.ttt_clip_tau)
        st.dW[rows] += dW.to(st.dW.dtype)
        st.W[rows] = (self.down_proj.weight + st.dW[rows]).to(st.W.dtype)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, use_ttt: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, use_ttt)

    def forward(self, x, embeds, cos, sin, cache=None, layer=None, ttt_enabled=True):
        kv = None if cache is None else (cache.k[layer], cache.v[layer])
        pos = None if cache is None else cache.pos
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv, pos)
        return x + self.mlp(self.post_attention_layernorm(x), embeds, cache, layer, ttt_enabled)


# -----------------------------------------------------------------------------
# The model


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        bad = [i for i in cfg.ttt_layers if not 0 <= i < cfg.num_layers]
        if bad:  # the official config lists index 36 for 36-layer models: ignore such entries, loudly
            warnings.warn(f"ttt_layers {bad} are outside 0..{cfg.num_layers - 1} and are ignored", stacklevel=2)
        self.ttt_layers = tuple(sorted(set(cfg.ttt_layers) - set(bad)))
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.hidden_size),
            layers=nn.ModuleList(Block(cfg, i in self.ttt_layers) for i in range(cfg.num_layers)),
            norm=RMSNorm(cfg.hidden_size, cfg.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.ttt_enabled = True  # False: TTT layers apply W0 only and never update (`--no-ttt`)

    def hidden(self, idx, cache=None):
        """Final-norm hidden states (B, T, D) for token ids idx (B, T)."""
        B, T = idx.shape
        if cache is not None and not torch.compiler.is_compiling():  # the compiled decode step has a fixed size
            if T > 1 and bool((cache.pos != cache.pos[0]).any()):
                raise ValueError("a multi-token step needs every row at the same position; prefill ragged batches "
                                 "row by row with cache.rows(b, b + 1)")
            if int(cache.pos.max()) + T > cache.k[0].shape[2]:
                raise ValueError(f"cache holds {cache.k[0].shape[2]} positions; this step would need "
                                 f"{int(cache.pos.max()) + T}")
        x = self.model.embed_tokens(idx)
        start = torch.zeros(B, dtype=torch.long, device=idx.device) if cache is None else cache.pos
        cos, sin = rope_cos_sin(self.config, start[:, None] + torch.arange(T, device=idx.device), x.dtype)
        embeds = x
        for i, block in enumerate(self.model.layers):
            x = block(x, embeds, cos, sin, cache, i, self.ttt_enabled)
        if cache is not None:
            cache.pos += T
            if T == 1 and self.ttt_enabled and self.ttt_layers:
                self._fold_completed_chunks(cache)
        return self.model.norm(x)

    @torch.compiler.disable  # data-dependent (which rows completed a chunk), cheap, and rare: keep it eager
    def _fold_completed_chunks(self, cache):
        """After a decode step, fold in the update of every chunk that the step completed, row by row. Doing it
        after all layers is the same as inside each: the new fast weight is first read by the next token."""
        done = (cache.pos % self.config.ttt_chunk == 0).nonzero()[:, 0]
        if len(done):
            for i in self.ttt_layers:
                self.model.layers[i].mlp.fold(cache.ttt[i], done)

    def forward(self, idx, cache=None, last_only=False):
        """Logits (B, T, V), or (B, 1, V) with last_only (a long prompt never needs all T x V logits)."""
        h = self.hidden(idx, cache)
        return self.lm_head(h[:, -1:] if last_only else h)

    def loss(self, idx, targets, ignore_index=-100, tokens_per_slice=1024):
        """Mean cross-entropy. Logits are made one slice of tokens at a time and recomputed in backward,
        so at most tokens_per_slice x V fp32 logits exist at once."""
        h = self.hidden(idx).flatten(0, 1)  # (B*T, D)
        t = targets.flatten()
        total = h.new_zeros((), dtype=torch.float32)
        for i in range(0, t.numel(), tokens_per_slice):
            total = total + checkpoint(self._ce_sum, h[i:i + tokens_per_slice], t[i:i + tokens_per_slice],
                                       ignore_index, use_reentrant=False)
        return total / (t != ignore_index).sum().clamp(min=1)

    def _ce_sum(self, h, t, ignore_index):
        return F.cross_entropy(self.lm_head(h).float(), t, ignore_index=ignore_index, reduction="sum")

    # ---- initialisation (from scratch, after meta-device construction, or for new TTT parameters)

    @torch.no_grad()
    def init_weights(self, std=0.02, generator=None):
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif not is_ttt_param(name):
                p.normal_(0.0, std, generator=generator)
        init_ttt_params(self, generator)

    def num_params(self, exclude_embedding=False):
        n = sum(p.numel() for p in self.parameters())
        return n - self.model.embed_tokens.weight.numel() if exclude_embedding else n

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (forward + backward): 6N for the weights, attention scores, TTT's update."""
        c = self.config
        attn = 12 * c.num_layers * c.num_heads * c.head_dim * seq_len // 2  # causal: half the score matrix
        ttt_extra = 6 * len(self.ttt_layers) * c.hidden_size * (c.intermediate_size + c.hidden_size)
        return 6 * self.num_params(exclude_embedding=True) + attn + ttt_extra

    # ---- incremental decoding

    def new_cache(self, batch_size, max_seq_len, device=None, dtype=None):
        p = self.lm_head.weight
        return Cache.create(self, batch_size, max_seq_len, device or p.device, dtype or p.dtype)


def is_ttt_param(name: str) -> bool:
    """Whether a parameter name (HF layout, any prefix) is one of In-Place TTT's new parameters."""
    return ".mlp.ttt_" in name or name.startswith("mlp.ttt_")


@torch.no_grad()
def init_ttt_params(model: Transformer, generator=None):
    """New TTT parameters: conv zero (so V_hat = 0 and the model is exactly the base model), P diagonal N(0, 0.02^2).
    Selected by name, never by shape (o_proj is square too)."""
    for name, p in model.named_parameters():
        if not is_ttt_param(name):
            continue
        if name.endswith("ttt_conv.weight"):
            p.zero_()
        elif name.endswith("ttt_proj.weight"):
            p.zero_()
            d = torch.randn(p.shape[0], generator=generator, dtype=torch.float32) * 0.02
            p.diagonal().copy_(d.to(p.device, p.dtype))


@dataclass
class LayerTTT:
    """Per-layer decoding state: fp32 sum of updates, the combined weight used per token, the open chunk's tokens."""
    dW: torch.Tensor  # (B, D, F) fp32 sum of completed chunks' updates
    W: torch.Tensor  # (B, D, F) W0 + dW in the model dtype, refreshed when a chunk completes
    s_buf: torch.Tensor  # (B, C, D) target source of the open chunk, slot = position mod C
    h_buf: torch.Tensor  # (B, C, F) activations of the open chunk


@dataclass
class Cache:
    """Preallocated KV cache and TTT state. pos (B,) is the number of tokens each row has seen."""
    k: list
    v: list
    ttt: dict
    pos: torch.Tensor

    @classmethod
    def create(cls, model, B, S, device, dtype):
        c = model.config
        kv = lambda: torch.zeros(B, c.num_kv_heads, S, c.head_dim, device=device, dtype=dtype)
        D, Fd, C = c.hidden_size, c.intermediate_size, c.ttt_chunk
        sdt = torch.promote_types(dtype, torch.float32) if c.ttt_fp32_state else dtype  # as ttt.py does
        ttt_state = {}
        for i in model.ttt_layers:
            W0 = model.model.layers[i].mlp.down_proj.weight.detach()
            ttt_state[i] = LayerTTT(torch.zeros(B, D, Fd, device=device, dtype=sdt),
                                    W0.to(device, dtype).expand(B, D, Fd).clone(),
                                    torch.zeros(B, C, D, device=device, dtype=dtype),
                                    torch.zeros(B, C, Fd, device=device, dtype=dtype))
        return cls([kv() for _ in range(c.num_layers)], [kv() for _ in range(c.num_layers)], ttt_state,
                   torch.zeros(B, dtype=torch.long, device=device))

    def rows(self, b0, b1):
        """A view of rows [b0, b1): writes through to this cache (prefill a ragged batch one row at a time)."""
        sl = slice(b0, b1)
        return Cache([k[sl] for k in self.k], [v[sl] for v in self.v],
                     {i: LayerTTT(t.dW[sl], t.W[sl], t.s_buf[sl], t.h_buf[sl]) for i, t in self.ttt.items()},
                     self.pos[sl])
