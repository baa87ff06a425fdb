"""A Qwen3 / LLaMA-3 decoder in one file, with In-Place TTT in chosen MLPs.

Parameter names are Hugging Face's (`model.layers.{i}.self_attn.q_proj`, `mlp.down_proj`, ...), so
loading a checkpoint is a checked copy (load_hf.py) and the fast weight of the paper is literally
`mlp.down_proj`. All TTT arithmetic lives in ttt.py; the MLP here only calls it. Reading order:
config and presets, RoPE, norm, attention, MLP (+TTT), block, the model (with the paper's start of
the TTT parameters, init_ttt_params; the other starts are an extension, starts.py), the cache.

Batches and padding: there is none. A forward without a cache takes equal-length rows starting at
position 0. With a cache (incremental decoding) every row carries its own position: a ragged batch
of prompts is prefilled row by row through `cache.rows(b, b + 1)`, then decoded together one token
per step, each row folding its TTT chunk updates at its own absolute chunk boundaries. No padded
position ever reaches attention or a TTT update.

Parallelism is applied from outside (parallel.py): FSDP2 wraps the blocks, and context
parallelism sets two hooks, Attention.gather_kv and MLP.incoming_state, and places a shard of
longer sequences at its position with `start`. Without them this is single-device code.

    from model import PRESETS, Transformer
    model = Transformer(PRESETS["bytes"])                     # train.py's default: byte-level
    logits = model(torch.randint(0, 257, (2, 64)))            # (B, T, V)
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
    max_position_embeddings: int = 40960  # the context the checkpoint was trained for (sample.py)
    tie_word_embeddings: bool = True  # lm_head shares embed_tokens' weight (small models)
    qk_norm: bool = True  # Qwen3 RMS-normalises q and k per head before RoPE
    sliding_window: int | None = None  # every layer sees the last W keys only (from scratch)
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    # In-Place TTT (ttt.py). An empty ttt_layers gives the plain base model.
    ttt_layers: tuple = ()  # layer indices whose down_proj is a fast weight
    ttt_chunk: int = 4096  # C: tokens per update, chunks start at absolute multiples of C
    ttt_lr: float = 3.0  # eta: step size of the fast-weight update
    ttt_proj: bool = True  # learned target projection P (mlp.ttt_proj); False: V_hat = conv(s)
    ttt_target: str = "hidden_states"  # target source s: "hidden_states" (MLP input), "input_embed"
    ttt_lookahead: bool = True  # False: conv centre tap only, V_hat_t from s_t alone (a study)
    ttt_fp32_state: bool = True  # sum the updates in fp32 (bf16 rounds small updates away)
    # Stabilisers (ttt.py "Stabilisers"; off by default = the paper's arithmetic). The official
    # code ignores these keys, so an export with one on warns (load_hf.save_model).
    ttt_clip_tau: float | None = None  # rescale each chunk's update to norm <= tau (the paper, C)
    ttt_key_norm: bool = False  # rows of H at unit norm in the update (DeltaNet, LaCT)
    ttt_target_norm: bool = False  # s RMS-normalised before the conv: rho stays put as s grows
    ttt_norm_preserve: bool = False  # fast weight's rows rescaled to W0's row norms (LaCT)
    ttt_lr_warmup: int = 0  # training steps over which eta ramps up to ttt_lr (0: off)
    extra: dict = field(default_factory=dict)  # unknown HF config fields, carried through export

    def __post_init__(self):
        self.ttt_layers = tuple(int(i) for i in self.ttt_layers)
        if self.ttt_target not in ("hidden_states", "input_embed"):
            raise ValueError(f"ttt_target must be 'hidden_states' or 'input_embed', "
                             f"got {self.ttt_target!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")

    def with_ttt(self, layers=None, every=None, **kw) -> "ModelConfig":
        """Copy with TTT in `layers` (or in layers 0, every, 2·every, ...); kw sets ttt_{key}."""
        if every is not None:
            layers = tuple(range(0, self.num_layers, every))
        kw = {f"ttt_{k}": v for k, v in kw.items()}
        return replace(self, ttt_layers=tuple(layers if layers is not None else self.ttt_layers),
                       **kw)


# The official In-Place TTT recipe for continual pretraining, from the release's
# configs/pretrain/qwen3_longct.yaml and llama3_longct.yaml: TTT in every 6th layer counting from
# layer 0, 4096-token chunks, eta = 3, the learned projection P, targets from the MLP input.
# Use it as cfg.with_ttt(**TTT_RECIPE).
TTT_RECIPE = dict(every=6, chunk=4096, lr=3.0, proj=True, target="hidden_states")

# What a family's checkpoints share; each preset below adds its shape.
_QWEN3 = dict(arch="qwen3", vocab_size=151936, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-6,
              rope_theta=1e6, max_position_embeddings=40960, qk_norm=True,
              bos_token_id=151643, eos_token_id=151645)
_LLAMA3 = dict(arch="llama", vocab_size=128256, num_kv_heads=8, rms_norm_eps=1e-5,
               rope_theta=500000.0, max_position_embeddings=131072, qk_norm=False,
               bos_token_id=128000, eos_token_id=128001)


def _llama3_rope(factor):
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


PRESETS = {
    # The CPU demo and the study (train.py's default): byte-level, tokenizer.write_byte_tokenizer's
    # 257 ids (not padded: on a CPU a round size buys no speed, and padding rows would be ids the
    # sampler could draw but training never shows). 0.85M parameters besides the 33K embedding,
    # about 5,000 tokens/s through loss, backward and AdamW on one core at context 1024. TTT in
    # layers 1 and 3, after an attention layer has mixed context into the MLP input (H then says
    # where in the text we are); C = 1024 / 8, the recipe's 4096-of-32K ratio; from-scratch targets
    # from the token embeddings, as train.py defaults; eta 1.0, what the study's recall task uses.
    "bytes": ModelConfig(
        arch="qwen3", vocab_size=257, hidden_size=128, intermediate_size=384, num_layers=4,
        num_heads=4, num_kv_heads=4, head_dim=32, rms_norm_eps=1e-6, rope_theta=1e4,
        max_position_embeddings=1024, tie_word_embeddings=True, qk_norm=True,
        bos_token_id=256, eos_token_id=256,
        ttt_layers=(1, 3), ttt_chunk=128, ttt_lr=1.0, ttt_target="input_embed"),
    # Tests and bench.py --small: Qwen3 layout and tokenizer, a few million parameters plus the
    # 151,936-row embedding (which is 96% of its FLOPs: too slow a demo, see "bytes").
    "tiny": ModelConfig(
        arch="qwen3", vocab_size=151936, hidden_size=128, intermediate_size=384, num_layers=4,
        num_heads=4, num_kv_heads=2, head_dim=32, rms_norm_eps=1e-6, rope_theta=1e4,
        max_position_embeddings=4096, tie_word_embeddings=True, qk_norm=True,
        bos_token_id=151643, eos_token_id=151643,
        ttt_layers=(1, 3), ttt_chunk=64, ttt_lr=0.1, ttt_target="input_embed"),
    # Qwen/Qwen3-0.6B-Base
    "qwen3-0.6b": ModelConfig(**_QWEN3, hidden_size=1024, intermediate_size=3072, num_layers=28,
                              num_heads=16, tie_word_embeddings=True),
    # Qwen/Qwen3-1.7B-Base
    "qwen3-1.7b": ModelConfig(**_QWEN3, hidden_size=2048, intermediate_size=6144, num_layers=28,
                              num_heads=16, tie_word_embeddings=True),
    # Qwen/Qwen3-4B-Base
    "qwen3-4b": ModelConfig(**_QWEN3, hidden_size=2560, intermediate_size=9728, num_layers=36,
                            num_heads=32, tie_word_embeddings=True),
    # Qwen/Qwen3-8B-Base
    "qwen3-8b": ModelConfig(**_QWEN3, hidden_size=4096, intermediate_size=12288, num_layers=36,
                            num_heads=32, tie_word_embeddings=False),
    # Qwen/Qwen3-14B-Base
    "qwen3-14b": ModelConfig(**_QWEN3, hidden_size=5120, intermediate_size=17408, num_layers=40,
                             num_heads=40, tie_word_embeddings=False),
    # meta-llama/Llama-3.2-1B
    "llama-3.2-1b": ModelConfig(**_LLAMA3, hidden_size=2048, intermediate_size=8192, num_layers=16,
                                num_heads=32, head_dim=64, rope_scaling=_llama3_rope(32.0),
                                tie_word_embeddings=True),
    # meta-llama/Llama-3.2-3B
    "llama-3.2-3b": ModelConfig(**_LLAMA3, hidden_size=3072, intermediate_size=8192, num_layers=28,
                                num_heads=24, head_dim=128, rope_scaling=_llama3_rope(32.0),
                                tie_word_embeddings=True),
    # meta-llama/Llama-3.1-8B
    "llama-3.1-8b": ModelConfig(**_LLAMA3, hidden_size=4096, intermediate_size=14336, num_layers=32,
                                num_heads=32, head_dim=128, rope_scaling=_llama3_rope(8.0),
                                tie_word_embeddings=False),
    # HuggingFaceTB/SmolLM2-135M-Instruct (LLaMA architecture, plain RoPE, its own tokenizer)
    "smollm2-135m": ModelConfig(
        arch="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
        num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
        max_position_embeddings=8192, tie_word_embeddings=True, qk_norm=False, bos_token_id=1,
        eos_token_id=2),
}


# -----------------------------------------------------------------------------
# Rotary embeddings (fp32, HF's rotate_half convention; computed on the fly, so meta-device
# construction is safe)


def rope_inv_freq(cfg: ModelConfig, device=None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim/2,) and cos/sin scale of plain, llama3 or yarn RoPE, as HF."""
    dim, base = cfg.head_dim, cfg.rope_theta
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    inv_freq = 1.0 / (base ** exponents)
    rs = cfg.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "default":
        return inv_freq, 1.0
    if kind == "llama3":
        # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old / lo, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        # Interpolate low frequencies by `factor`, keep high ones, ramp between; cos/sin × mscale.
        factor, old = rs["factor"], rs["original_max_position_embeddings"]
        mscale, mscale_all = rs.get("mscale"), rs.get("mscale_all_dim")

        def get_mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attn = rs.get("attention_factor")
        if attn is None:
            attn = get_mscale(factor, mscale) / get_mscale(factor, mscale_all) \
                if mscale and mscale_all else get_mscale(factor)
        beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

        def correction_dim(rot):
            return dim * math.log(old / (rot * 2 * math.pi)) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if rs.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        high = high + 0.001 if low == high else high
        ramp = (torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)
        pos_freqs = base ** (torch.arange(0, dim, 2, device=device).float() / dim)
        extrapolate = 1 - ramp.clamp(0, 1)
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
        # A switch for probes, off in training and in every checkpoint: True keeps key 0 (the
        # window's first token, an "attention sink") in view of every query whatever the sliding
        # window, to ask whether a windowed model misses its first token (study/probes.py). Key 0
        # is position 0: a whole window or a cache, not a context-parallel shard.
        self.sink = False
        # k, v (B, KV, T, hd) -> the keys and values these queries reach, theirs last, as in a
        # prefill. None: this call's own. Context parallelism (parallel.py) sets it to gather the
        # earlier shards' of a split sequence.
        self.gather_kv = None

    def forward(self, x, cos, sin, kv=None, pos=None):
        """x (B, T, D). kv: this layer's cache (k, v), each (B, KV, S, hd), written at pos (B,)."""
        B, T, _ = x.shape
        hd = self.cfg.head_dim
        q = self.q_proj(x).view(B, T, -1, hd)  # (B, T, H, hd)
        k = self.k_proj(x).view(B, T, -1, hd)  # (B, T, KV, hd)
        v = self.v_proj(x).view(B, T, -1, hd).transpose(1, 2)  # (B, KV, T, hd)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H|KV, T, hd)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if self.gather_kv is not None:  # a shard of a split sequence: no cache
            k, v = self.gather_kv(k, v)  # (B, KV, S, hd)
        y = self._attend(q, k, v, kv, pos)  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def _attend(self, q, k, v, kv, pos):
        W, (B, _, T, _) = self.cfg.sliding_window, q.shape
        if kv is not None and T == 1:  # decoding: rows may sit at different positions: mask per row
            rows = torch.arange(B, device=q.device)
            kv[0][rows, :, pos], kv[1][rows, :, pos] = k[:, :, 0], v[:, :, 0]
            mask = _mask(pos[:, None], kv[0].shape[2], W)[:, None]  # (B, 1, 1, S): the whole cache
            if self.sink:
                mask[..., 0] = True
            return F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask, enable_gqa=True)
        if kv is not None:  # prefill, or its continuation: every row at position p
            p = int(pos[0])
            kv[0][:, :, p:p + T], kv[1][:, :, p:p + T] = k, v
            k, v = kv[0][:, :, :p + T], kv[1][:, :, :p + T]  # (B, KV, S, hd) with S = p + T
        S = k.shape[2]
        # Causal with the diagonal at the bottom right: query t sits at position S - T + t.
        flash = flash_attn_func is not None and q.is_cuda and not self.sink
        if flash and q.dtype in (torch.float16, torch.bfloat16):
            y = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                causal=True, window_size=(W - 1 if W else -1, 0))
            return y.transpose(1, 2)
        if W is not None or self.sink:
            mask = _mask(torch.arange(S - T, S, device=q.device)[None], S, W)[:, None]  # (1,1,T,S)
            if self.sink:  # key 0 is at or before every query: still causal
                mask[..., 0] = True
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        bias = None if S == T else causal_lower_right(T, S)  # never a (T, S) mask for a long prefill
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=S == T,
                                              enable_gqa=True)


def _mask(qpos, S, window):
    """Boolean (B, T, S): a query at qpos sees keys at positions <= qpos (and > qpos - window)."""
    kpos = torch.arange(S, device=qpos.device)
    m = kpos <= qpos[..., None]
    if window is not None:
        m &= kpos > qpos[..., None] - window
    return m


class MLP(nn.Module):
    """SwiGLU. In a TTT layer down_proj is the fast weight W0, and ttt_conv / ttt_proj build the
    update target; ttt.py does all of the TTT arithmetic."""

    def __init__(self, cfg: ModelConfig, use_ttt: bool):
        super().__init__()
        self.cfg, self.use_ttt = cfg, use_ttt
        # What a TTT forward leaves for a caller to read, from the final state it computed anyway
        # (nothing is redone): with keep_state the ttt.TTTState itself (detached) in last_state;
        # with measure_update only ‖ΣΔW‖ / ‖W0‖ per row (B,) in update_ratio, train.py's
        # validation probe, taken here because only inside the forward is W0 whole under FSDP.
        self.keep_state, self.last_state = False, None
        self.measure_update, self.update_ratio = False, None
        # (h, s, w0, conv_w, proj_w, lr, chunk, clip_tau, fp32_state) -> the ttt.TTTState these
        # tokens start from. None: position 0 (or the cache's state). Context parallelism
        # (parallel.py) sets it to the state the earlier shards of a split sequence leave.
        self.incoming_state = None
        # η's factor, set by Transformer.ttt_lr_scale during training (η warm-up); 1.0 otherwise.
        self.lr_scale = 1.0
        D, Fd = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(D, Fd, bias=False)
        self.up_proj = nn.Linear(D, Fd, bias=False)
        self.down_proj = nn.Linear(Fd, D, bias=False)
        if use_ttt:
            self.ttt_conv = nn.Conv1d(D, D, kernel_size=5, padding=2, groups=D, bias=False)
            if cfg.ttt_proj:
                self.ttt_proj = nn.Linear(D, D, bias=False)  # weight P used as stored: V_hat = U P

    def forward(self, x, embeds, state=None, enabled=True):
        """x, embeds (B, T, D). state: this layer's ttt.TTTState in a decoding cache, updated in
        place; a one-token step takes each row at its own position (then `fold`)."""
        h = F.silu(self.gate_proj(x)) * self.up_proj(x)  # H: (B, T, F)
        if not (self.use_ttt and enabled):
            return self.down_proj(h)
        cfg = self.cfg
        s = x if cfg.ttt_target == "hidden_states" else embeds  # (B, T, D)
        if state is not None and h.shape[1] == 1:
            return ttt.decode_step(h, s, state)
        opts = dict(fp32_state=cfg.ttt_fp32_state, **self._stabilisers())
        start = state
        if self.incoming_state is not None:  # a shard of a split sequence: no cache
            start = self.incoming_state(h, s, *self._ttt_weights(), cfg.ttt_chunk, **opts)
        out, new = ttt.chunked(h, s, *self._ttt_weights(), cfg.ttt_chunk, initial_state=start,
                               **opts)
        if self.keep_state:
            self.last_state = new.detach()
        if self.measure_update:  # fp32 norms: (B, D, F) -> (B,), over (D, F) -> ()
            dW, w0 = new.dW.detach().float(), self.down_proj.weight.detach().float()
            self.update_ratio = torch.linalg.matrix_norm(dW) / torch.linalg.matrix_norm(w0)
        if state is not None:  # a prefill (or its continuation): the cache goes on from here
            state.copy_(new)
        return out

    def fold(self, state, rows):
        """Fold the now complete chunk of each row in `rows` into its fast weight."""
        ttt.fold(*self._ttt_weights(), state, rows, **self._stabilisers())

    def _ttt_weights(self):
        """(w0, conv_w, proj_w, lr) as every ttt.py function takes them."""
        conv_w = self.ttt_conv.weight
        P = self.ttt_proj.weight if self.cfg.ttt_proj else None
        conv_w = conv_w if self.cfg.ttt_lookahead else ttt.centre_tap(conv_w)
        # x · 1.0 is x exactly, so no warm-up passes the configured η bit for bit
        return self.down_proj.weight, conv_w, P, self.cfg.ttt_lr * self.lr_scale

    def _stabilisers(self):
        """The config's stabilisers as ttt.py's keyword arguments."""
        c = self.cfg
        return dict(clip_tau=c.ttt_clip_tau, key_norm=c.ttt_key_norm,
                    target_norm=c.ttt_target_norm, norm_preserve=c.ttt_norm_preserve)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, use_ttt: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, use_ttt)

    def forward(self, x, embeds, cos, sin, cache=None, layer=None, ttt_enabled=True):
        kv = None if cache is None else (cache.k[layer], cache.v[layer])
        pos, state = (None, None) if cache is None else (cache.pos, cache.ttt.get(layer))
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv, pos)
        return x + self.mlp(self.post_attention_layernorm(x), embeds, state, ttt_enabled)


# -----------------------------------------------------------------------------
# The model


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        bad = [i for i in cfg.ttt_layers if not 0 <= i < cfg.num_layers]
        if bad:  # the official config lists index 36 for 36-layer models: ignore such entries, loudly
            warnings.warn(f"ttt_layers {bad} are outside 0..{cfg.num_layers - 1} and are ignored",
                          stacklevel=2)
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

    @property
    def ttt_lr_scale(self) -> float:
        """η's factor in every TTT layer: 1.0 (the configured η) except while a training step
        warms η up (ttt_lr_warmup_scale); validation, sampling and export use the full η."""
        mlps = [self.model.layers[i].mlp for i in self.ttt_layers]
        return mlps[0].lr_scale if mlps else 1.0

    @ttt_lr_scale.setter
    def ttt_lr_scale(self, scale: float):
        for i in self.ttt_layers:
            self.model.layers[i].mlp.lr_scale = float(scale)

    def hidden(self, idx, cache=None, start=0):
        """Final-norm hidden states (B, T, D) for token ids idx (B, T).

        start: the position of idx's first token without a cache. Context parallelism
        (parallel.py) gives rank r the tokens [rT, (r+1)T) of split sequences at start rT; its
        hooks bring in what the earlier shards' tokens contribute."""
        B, T = idx.shape
        if start and cache is not None:
            raise ValueError("start places a shard of a split training sequence; a decoding "
                             "cache keeps its own positions")
        if cache is not None and not torch.compiler.is_compiling():  # compiled: a fixed-size step
            if T > 1 and bool((cache.pos != cache.pos[0]).any()):
                raise ValueError("a multi-token step needs every row at the same position; prefill "
                                 "ragged batches row by row with cache.rows(b, b + 1)")
            if int(cache.pos.max()) + T > cache.k[0].shape[2]:
                raise ValueError(f"cache holds {cache.k[0].shape[2]} positions; this step would "
                                 f"need {int(cache.pos.max()) + T}")
        x = self.model.embed_tokens(idx)
        first = torch.full((B,), start, device=idx.device) if cache is None else cache.pos  # (B,)
        cos, sin = rope_cos_sin(self.config, first[:, None] + torch.arange(T, device=idx.device),
                                x.dtype)
        embeds = x
        for i, block in enumerate(self.model.layers):
            x = block(x, embeds, cos, sin, cache, i, self.ttt_enabled)
        if cache is not None:
            cache.pos += T
            if T == 1 and self.ttt_enabled and self.ttt_layers:
                self._fold_completed_chunks(cache)
        return self.model.norm(x)

    @torch.compiler.disable  # data dependent (which rows completed a chunk) and rare: keep it eager
    def _fold_completed_chunks(self, cache):
        """After a decode step, fold in every chunk that the step completed (ttt.fold), row by row.
        Doing it after all layers equals doing it in each: the next token first reads the result."""
        done = (cache.pos % self.config.ttt_chunk == 0).nonzero()[:, 0]
        if len(done):
            for i in self.ttt_layers:
                self.model.layers[i].mlp.fold(cache.ttt[i], done)

    def forward(self, idx, cache=None, last_only=False):
        """Logits (B, T, V), or (B, 1, V) with last_only (a long prompt needs no T x V logits)."""
        h = self.hidden(idx, cache)
        return self.lm_head(h[:, -1:] if last_only else h)

    def loss(self, idx, targets, ignore_index=-100, tokens_per_slice=1024, reduction="mean",
             start=0):
        """Cross-entropy: the mean over targets != ignore_index, or with reduction="none" each
        token's (B, T) fp32, 0 at ignored targets (validation's loss by position). Logits are made
        one slice of tokens at a time and recomputed in backward, so at most tokens_per_slice x V
        fp32 logits exist at once. start: as in `hidden`."""
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        h = self.hidden(idx, start=start).flatten(0, 1)  # (B*T, D)
        t = targets.flatten()
        per_slice = "sum" if reduction == "mean" else "none"  # a mean: one number per slice
        parts = [checkpoint(self._ce, h[i:i + tokens_per_slice], t[i:i + tokens_per_slice],
                            ignore_index, per_slice, use_reentrant=False)
                 for i in range(0, t.numel(), tokens_per_slice)]
        if reduction == "none":
            return torch.cat(parts).view(targets.shape)  # (B, T)
        return sum(parts) / (t != ignore_index).sum().clamp(min=1)

    def _ce(self, h, t, ignore_index, reduction):
        logits = self.lm_head(h)  # in fp32 at least (fp64 stays fp64: the exactness tests)
        return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), t,
                               ignore_index=ignore_index, reduction=reduction)

    # ---- initialisation (from scratch, after meta-device construction, or for new TTT parameters)

    @torch.no_grad()
    def init_weights(self, std=0.02, generator=None, ttt=True):
        """Norms 1, other weights N(0, std^2), then the TTT parameters as init_ttt_params sets them
        (ttt=False leaves those to the caller: train_model.full_model sets another start once)."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif not is_ttt_param(name):
                p.normal_(0.0, std, generator=generator)
        if ttt:
            init_ttt_params(self, generator)

    def num_params(self, exclude_embedding=False):
        n = sum(p.numel() for p in self.parameters())
        return n - self.model.embed_tokens.weight.numel() if exclude_embedding else n

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (forward + backward): 6N, attention scores, TTT's update."""
        c = self.config
        attn = 12 * c.num_layers * c.num_heads * c.head_dim * seq_len // 2  # causal: half the scores
        ttt_extra = 6 * len(self.ttt_layers) * c.hidden_size * (c.intermediate_size + c.hidden_size)
        return 6 * self.num_params(exclude_embedding=True) + attn + ttt_extra

    # ---- incremental decoding

    def new_cache(self, batch_size, max_seq_len, device=None, dtype=None):
        p = self.lm_head.weight
        return Cache.create(self, batch_size, max_seq_len, device or p.device, dtype or p.dtype)


def ttt_lr_warmup_scale(step: int, warmup: int) -> float:
    """η's factor at training step `step` (0-based): min(1, (step + 1) / warmup), 1.0 with warmup
    0. The Qwen3-1.7B reproduction (issue #24) kept ΔW bounded by warming η up over 200 steps."""
    return min(1.0, (step + 1) / warmup) if warmup else 1.0


def is_ttt_param(name: str) -> bool:
    """Whether a parameter name (HF layout, any prefix) is one of In-Place TTT's new parameters."""
    return ".mlp.ttt_" in name or name.startswith("mlp.ttt_")


@torch.no_grad()
def init_ttt_params(model: Transformer, generator=None):
    """The paper's start of the TTT parameters (the official release's): the conv at zero and P
    diagonal with entries N(0, 0.02^2) drawn from `generator`. V_hat = conv(s) P is then zero, so
    the model computes exactly the base model until training moves the conv. Parameters are
    selected by name, never by shape (o_proj is square too). Other starts: starts.py."""
    for name, p in model.named_parameters():
        if not is_ttt_param(name):
            continue
        p.zero_()
        if name.endswith("ttt_proj.weight"):
            d = torch.randn(p.shape[0], generator=generator, dtype=torch.float32) * 0.02
            p.diagonal().copy_(d.to(p.device, p.dtype))


@dataclass
class Cache:
    """Preallocated KV cache and, per TTT layer, a ttt.TTTState. pos (B,) is the number of tokens
    each row has seen (each TTT state keeps its own copy, which ttt.py advances)."""
    k: list
    v: list
    ttt: dict
    pos: torch.Tensor

    @classmethod
    def create(cls, model, B, S, device, dtype):
        c = model.config
        kv = lambda: torch.zeros(B, c.num_kv_heads, S, c.head_dim, device=device, dtype=dtype)
        states = {i: ttt.init_state(model.model.layers[i].mlp.down_proj.weight, B, c.ttt_chunk,
                                    dtype, device, c.ttt_fp32_state, decode=True)
                  for i in model.ttt_layers}
        return cls([kv() for _ in range(c.num_layers)], [kv() for _ in range(c.num_layers)], states,
                   torch.zeros(B, dtype=torch.long, device=device))

    def rows(self, b0, b1):
        """A view of rows [b0, b1) that writes through (prefill a ragged batch row by row)."""
        sl = slice(b0, b1)
        return Cache([k[sl] for k in self.k], [v[sl] for v in self.v],
                     {i: t.rows(b0, b1) for i, t in self.ttt.items()}, self.pos[sl])


# -----------------------------------------------------------------------------
# Choosing the next token: sample.py's, and an export's generate() (which carries model.py)


def sample_next(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """Next token ids (B,) from logits (B, V): argmax at temperature 0, else a draw from the
    tempered softmax restricted to the top_k tokens and to the smallest set whose probability
    reaches top_p."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature  # fp32: a bf16 softmax over 150K tokens loses the tail
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass (the first
        # always stays).
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
