"""In-Place TTT inside transformers: the modeling file every export carries beside config.json.

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("out/bytes/hf", trust_remote_code=True)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=50)   # greedy, sample.py's tokens

remote_code.py copies this file, model.py and the files model.py imports (ttt.py) into each export,
their imports made relative, and names the classes below in config.json's `auto_map`. Without
trust_remote_code transformers still builds its own Qwen3/LLaMA class and drops the TTT weights;
the official release's classes read the same `ttt_*` keys. The imports below are relative, so this
file runs only as part of an export (tests/test_remote_code.py loads one).

The model is model.py's Transformer, its modules adopted as this class's own so the weight names
are the export's. Generation is sample.py's loop, not GenerationMixin's: the fast weight of each
TTT layer is folded at every row's own chunk boundaries during decoding, which a transformers
KV cache does not carry, and a left-padded (ragged) batch is prefilled row by row so no pad
position reaches attention or a TTT update. The token choice is model.py's `sample_next`, the one
sample.py uses; draws come from torch's global generator, so `torch.manual_seed(s)` before
`generate` gives `sample.generate(..., seed=s)`'s tokens.
"""

import copy

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, LlamaConfig, PreTrainedModel, Qwen3Config
from transformers.modeling_outputs import CausalLMOutputWithPast

from .model import ModelConfig, Transformer, sample_next

PREFILL_TOKENS = 4096  # sample.py's prompt piece: the multiple of C nearest above this
# GenerationConfig options this loop does not implement: refused, since ignoring one silently
# changes the output. (value that means "off", what the option asks for)
UNSUPPORTED = {"num_beams": 1, "num_return_sequences": 1, "repetition_penalty": 1.0,
               "no_repeat_ngram_size": 0, "min_new_tokens": None, "return_dict_in_generate": False,
               "output_scores": False, "output_logits": False, "penalty_alpha": None}


# -----------------------------------------------------------------------------
# Config: our own classes (a Qwen3 or LLaMA config, renamed) so that loading an export registers
# the TTT model for them only, never for every Qwen3Config in the process.


class InPlaceTTTQwen3Config(Qwen3Config):
    pass


class InPlaceTTTLlamaConfig(LlamaConfig):
    pass


def model_config(config) -> ModelConfig:
    """model.py's ModelConfig from an export's config (the keys load_hf.config_to_hf writes)."""
    hf = config.to_dict()
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    ttt = dict(ttt_layers=tuple(hf.get("ttt_layers") or ()) if hf.get("ttt_mode", True) else ())
    # the release's keys, ours (ttt_lookahead) and the stabilisers (load_hf.STABILISERS): each
    # written only when it differs from ModelConfig's default, so absent means the default
    for key in ("chunk", "lr", "proj", "target", "lookahead", "key_norm", "target_norm",
                "clip_tau", "norm_preserve", "lr_warmup"):
        if f"ttt_{key}" in hf:
            ttt[f"ttt_{key}"] = hf[f"ttt_{key}"]
    arch = "qwen3" if isinstance(config, Qwen3Config) else "llama"
    return ModelConfig(
        arch=arch, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"], num_kv_heads=hf["num_key_value_heads"],
        head_dim=hf["head_dim"], rms_norm_eps=hf["rms_norm_eps"], rope_theta=float(theta),
        rope_scaling=None if kind == "default" else rope,
        max_position_embeddings=hf["max_position_embeddings"],
        tie_word_embeddings=hf["tie_word_embeddings"], qk_norm=arch == "qwen3",
        sliding_window=hf.get("sliding_window") if hf.get("use_sliding_window") else None,
        bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"), **ttt)


# -----------------------------------------------------------------------------
# A batch's rows without their padding


def rows_of(input_ids, attention_mask) -> list[list[int]]:
    """Each row's tokens without its padding (left or right): one run of 1s in attention_mask."""
    if attention_mask is None:
        return input_ids.tolist()
    rows = []
    for ids, keep in zip(input_ids.tolist(), attention_mask.tolist()):
        where = [i for i, k in enumerate(keep) if k]
        if not where or where[-1] - where[0] + 1 != len(where):
            raise ValueError("attention_mask must mark one unbroken run of tokens in every row "
                             "(left or right padding)")
        rows.append(ids[where[0]:where[-1] + 1])
    return rows


# -----------------------------------------------------------------------------
# The model


class InPlaceTTTQwen3ForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = InPlaceTTTQwen3Config
    base_model_prefix = "model"
    _no_split_modules = ["Block"]

    def __init__(self, config):
        super().__init__(config)
        net = Transformer(model_config(config))
        # The Transformer's modules become ours (weight names model.* and lm_head.*, as exported);
        # the Transformer itself stays outside the module tree, or every weight would count twice.
        self.model, self.lm_head = net.model, net.lm_head
        self.__dict__["_net"] = net
        if config.tie_word_embeddings:
            self._tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
        self.post_init()

    def net(self) -> Transformer:
        """model.py's Transformer over this model's current modules (transformers may swap them)."""
        net = self.__dict__["_net"]
        net.model, net.lm_head = self.model, self.lm_head
        return net

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def _init_weights(self, module):
        pass  # every weight comes from the export; a fresh model: Transformer.init_weights

    def forward(self, input_ids=None, attention_mask=None, labels=None, inputs_embeds=None,
                past_key_values=None, **kwargs):
        """Logits (B, T, V) of a full forward, each padded row computed alone from position 0
        (pad positions get zero logits); loss as transformers' causal LMs compute it."""
        if inputs_embeds is not None or past_key_values is not None:
            raise ValueError("In-Place TTT exports take input_ids without a cache (generate() "
                             "keeps its own, with the fast weights)")
        net = self.net()
        if attention_mask is None or bool(attention_mask.all()):
            logits = net(input_ids)
        else:
            rows = rows_of(input_ids, attention_mask)
            logits = torch.zeros(*input_ids.shape, net.config.vocab_size,
                                 dtype=self.lm_head.weight.dtype, device=input_ids.device)
            for b, (row, keep) in enumerate(zip(rows, attention_mask.bool())):
                logits[b, keep] = net(torch.tensor([row], device=input_ids.device))[0]
        loss = None
        if labels is not None:  # position t predicts label t + 1
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    # ---- generation: sample.py's prefill and decode loop over model.py's cache

    def _options(self, generation_config, kwargs) -> tuple:
        """(max_new_tokens, temperature, top_k, top_p, eos ids, pad id) from transformers' usual
        arguments; anything this loop does not implement is refused by name."""
        gen = copy.deepcopy(generation_config or self.generation_config)
        unused = {k: v for k, v in gen.update(**kwargs).items() if v is not None}  # None: unasked
        unused.pop("use_cache", None)  # the loop always decodes with its cache
        if unused:
            raise ValueError(f"generate() got arguments this model does not take: "
                             f"{', '.join(sorted(unused))}")
        for name, off in UNSUPPORTED.items():
            if getattr(gen, name, off) not in (off, None):
                raise ValueError(f"generate(): {name}={getattr(gen, name)!r} is not supported by "
                                 f"In-Place TTT exports (only {off!r})")
        eos = gen.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        pad = gen.pad_token_id if gen.pad_token_id is not None else (eos or [0])[0]
        sampling = gen.do_sample and (gen.temperature or 0) > 0
        return (gen.max_new_tokens, gen.max_length, gen.temperature if sampling else 0.0,
                gen.top_k if sampling else None, gen.top_p if sampling else None, eos, pad)

    def _prefill(self, cache, prompts):
        """sample.prefill: equal-length rows together, else row by row; (B, V) last logits."""
        net, C = self.net(), self.net().config.ttt_chunk
        piece = C * -(-PREFILL_TOKENS // C)  # a multiple of C, so folds stay aligned
        groups = [(0, len(prompts))] if len(set(map(len, prompts))) == 1 else \
            [(b, b + 1) for b in range(len(prompts))]
        last = []
        for b0, b1 in groups:
            ids = torch.tensor(prompts[b0:b1], device=cache.pos.device)  # (b1 - b0, T)
            for i in range(0, ids.shape[1], piece):
                logits = net(ids[:, i:i + piece], cache.rows(b0, b1), last_only=True)
            last.append(logits[:, -1])
        return torch.cat(last)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, generation_config=None,
                 stopping_criteria=None, **kwargs):
        """(B, T + n): input_ids (padding kept) then up to max_new_tokens new tokens per row; a row
        that stops (at an eos id, or when stopping_criteria says) keeps its stop token, then pad."""
        new, max_length, temperature, top_k, top_p, eos, pad = self._options(generation_config,
                                                                             kwargs)
        prompts = rows_of(input_ids, attention_mask)
        new = new if new is not None else max_length - input_ids.shape[1]
        net, seqs = self.net(), input_ids
        if new < 1:
            return seqs
        cache = net.new_cache(len(prompts), max(map(len, prompts)) + new)
        logits = self._prefill(cache, prompts)  # (B, V)
        done = torch.zeros(len(prompts), dtype=torch.bool, device=input_ids.device)
        stops = torch.tensor(eos, device=input_ids.device, dtype=torch.long)
        for i in range(new):
            tokens = sample_next(logits, temperature, top_k, top_p)  # (B,)
            tokens = tokens.masked_fill(done, pad)
            seqs = torch.cat([seqs, tokens[:, None]], 1)
            done |= torch.isin(tokens, stops)
            if stopping_criteria is not None:
                done |= stopping_criteria(seqs, logits).to(done.device)
            if bool(done.all()) or i == new - 1:  # no step whose token would be thrown away
                break
            logits = net(tokens[:, None], cache)[:, -1]  # finished rows keep stepping, unseen
        return seqs


class InPlaceTTTLlamaForCausalLM(InPlaceTTTQwen3ForCausalLM):
    config_class = InPlaceTTTLlamaConfig
