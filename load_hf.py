"""The Hugging Face format, both ways: config.json read field by field, safetensors shard by shard
with strict keys, and written back; and train.py's checkpoints exported to it (checkpoint.py reads
their DCP side).

    from load_hf import load_model, load_tokenizer, save_model
    model = load_model("Qwen/Qwen3-0.6B-Base", device="cuda", dtype=torch.bfloat16)  # or a dir
    tok = load_tokenizer("Qwen/Qwen3-0.6B-Base")
    save_model(model, "out/qwen3-ttt", tokenizer_src="Qwen/Qwen3-0.6B-Base")

Parameter names are identical on both sides (model.py uses HF's), so loading is a checked copy:
every key must exist, every shape must match, nothing may be left over. Official In-Place TTT
checkpoints add `mlp.ttt_conv.weight` (D, 1, 5) and `mlp.ttt_proj.weight` (D, D) in their TTT
layers and `ttt_*` keys in config.json.

    python load_hf.py info SRC          # print the config we read
    python load_hf.py export CKPT OUT   # a train.py checkpoint (any world size) -> HF safetensors

An export replaces only an earlier export (its EXPORT_MARK lists the files it wrote), or, with
--overwrite, another directory; never a file, a train.py checkpoint or run directory. A train.py
checkpoint's train.json carries sizes and sha256 of its files, checked before an export.

The flags every script shares (--device and --dtype defaults, --rope-scaling, counts >= 1, help
that shows defaults) are parsed here too, and a training run's model is made here: a preset or an
HF config with TTT settings layered on (model_config), its weights or a fresh init (full_model).
This module never imports train.py or data.py.
"""

import argparse
import json
import math
import os
import shutil
import warnings
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch
import torch.nn as nn

from checkpoint import (RUN_FILES, TRAIN_META, load_train_checkpoint, read_train_meta,
                        remove_orphans, tmp_sibling, verify_checkpoint)
from model import (PRESETS, TTT_RECIPE, ModelConfig, Transformer, init_ttt_params, is_ttt_param,
                   rope_inv_freq, ttt_init_problem)
from remote_code import write_remote_code
from tokenizer import Tokenizer

ARCHS = {"Qwen3ForCausalLM": "qwen3", "LlamaForCausalLM": "llama"}
# What a hub download fetches: config, weights and tokenizer, never other repo files (GGUF, ONNX).
HUB_FILES = ["config.json", "generation_config.json", "*.safetensors",
             "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
             "tokenizer.model", "special_tokens_map.json"]
# Copied beside an export, so the result is a complete checkpoint for transformers and sample.py.
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                   "special_tokens_map.json", "generation_config.json"]
# In every export: the names save_model wrote, so a later export knows what it may replace.
EXPORT_MARK = ".inplace-ttt-export.json"
TTT_KEYS = ("ttt_mode", "ttt_layers", "ttt_chunk", "ttt_lr", "ttt_proj", "ttt_target",
            "ttt_lookahead")
# transformers' Qwen3Config default: layers from this index on use the window, when one is on.
QWEN3_MAX_WINDOW_LAYERS = 28
# Fields of HF configs that model.py reads, or that describe features we refuse rather than
# silently drop. Anything else is carried in ModelConfig.extra and written back on export.
KNOWN = {"architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size",
         "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
         "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "max_position_embeddings",
         "tie_word_embeddings", "sliding_window", "use_sliding_window", "bos_token_id",
         "eos_token_id", "attention_bias", "mlp_bias", "hidden_act", "torch_dtype", "dtype",
         "layer_types", "max_window_layers", *TTT_KEYS,
         "auto_map"}  # names the modeling code: each export writes its own (remote_code.py)
# config.json names of ModelConfig fields, where they differ or are read as they are.
HF_FIELDS = {"vocab_size": "vocab_size", "hidden_size": "hidden_size",
             "intermediate_size": "intermediate_size", "num_hidden_layers": "num_layers",
             "num_attention_heads": "num_heads", "num_key_value_heads": "num_kv_heads",
             "head_dim": "head_dim", "rms_norm_eps": "rms_norm_eps", "rope_theta": "rope_theta",
             "max_position_embeddings": "max_position_embeddings",
             "tie_word_embeddings": "tie_word_embeddings", "bos_token_id": "bos_token_id",
             "eos_token_id": "eos_token_id", "ttt_layers": "ttt_layers", "ttt_chunk": "ttt_chunk",
             "ttt_lr": "ttt_lr", "ttt_proj": "ttt_proj", "ttt_target": "ttt_target"}
# Without these a config.json does not describe a model; every other field has a default.
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads")


# -----------------------------------------------------------------------------
# What each ModelConfig field may hold: checked where a value enters (a config.json field here,
# --override in train.py), so a bad value is named instead of failing deep inside torch (a string
# size), silently training something else (a float size) or never stopping (a string EOS id).


def _int(v, low) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low  # bool is an int subclass


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


SIZE = (lambda v: _int(v, 1), "a positive integer")
FLAG = (lambda v: isinstance(v, bool), "true or false")
TOKEN = (lambda v: v is None or _int(v, 0), "a token id (an integer >= 0) or null")
RULES = {  # field -> (test, what is allowed); a field not listed here is not checked
    "arch": (lambda v: v in ("qwen3", "llama"), "'qwen3' or 'llama'"),
    **dict.fromkeys(["vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings", "ttt_chunk"], SIZE),
    **dict.fromkeys(["rms_norm_eps", "rope_theta"], (lambda v: _number(v) and v > 0,
                                                     "a positive number")),
    **dict.fromkeys(["tie_word_embeddings", "qk_norm", "ttt_proj", "ttt_fp32_state",
                     "ttt_lookahead"], FLAG),
    "rope_scaling": (lambda v: v is None or isinstance(v, dict), "a JSON object or null"),
    "sliding_window": (lambda v: v is None or _int(v, 1), "a positive integer or null"),
    "bos_token_id": TOKEN,
    "eos_token_id": (lambda v: TOKEN[0](v) or (isinstance(v, list) and v != []
                                               and all(_int(i, 0) for i in v)),
                     "a token id (an integer >= 0), a non-empty list of them, or null"),
    "ttt_layers": (lambda v: isinstance(v, (list, tuple)) and all(_int(i, 0) for i in v),
                   "a list of layer indices (integers >= 0)"),
    "ttt_lr": (lambda v: _number(v) and v >= 0, "a finite number >= 0"),
    "ttt_target": (lambda v: v in ("hidden_states", "input_embed"),
                   "'hidden_states' or 'input_embed'"),
    "ttt_clip_tau": (lambda v: v is None or (_number(v) and v > 0), "a positive number or null"),
    # Not a ModelConfig field but config.json's switch (see config_from_hf): the official release
    # writes true (training classes) or false (inference classes); our older exports a string.
    "ttt_mode": (lambda v: v is None or isinstance(v, (bool, str)),
                 "true, false, null or a string"),
    "extra": (lambda v: isinstance(v, dict), "a JSON object"),
}


def check_field(name: str, value, where: str):
    """Raise ValueError naming `where` (e.g. "config.json: hidden_size"), the value and what the
    ModelConfig field `name` allows."""
    test, allowed = RULES.get(name, (lambda v: True, ""))
    if not test(value):
        raise ValueError(f"{where}={value!r} is not allowed: expected {allowed}")


# -----------------------------------------------------------------------------
# Flags every script shares: device and dtype defaults, counts, RoPE scaling, help with defaults;
# and train.py's ModelConfig fields (--override KEY=VALUE, --ttt-layers), checked by RULES


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help with the module docstring as written and "(default: X)" after each flag that has a
    default (not after None, off switches, empty lists, or a help that names its own default)."""

    def _get_help_string(self, action):
        none = action.default is None or action.default is False or action.default == []
        if none or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class AtLeast(argparse.Action):
    """argparse action for a number that must be finite and >= low (> low with strict=True), set
    where the flag is declared: add_argument("--steps", type=int, action=AtLeast, low=1). The error
    names flag and value: "--steps 0: must be >= 1"."""

    def __init__(self, *args, low=1, strict=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.low, self.strict = low, strict

    def __call__(self, parser, namespace, value, option_string=None):
        above = self.low < value if self.strict else self.low <= value  # NaN fails both
        if not (above and value < math.inf):
            finite = "a finite number " if isinstance(value, float) else ""
            parser.error(f"{option_string} {value}: must be {finite}{'>' if self.strict else '>='} "
                         f"{self.low}")
        setattr(namespace, self.dest, value)


def default_device(name: str | None = None) -> str:
    """--device as given, else "cuda" when a GPU is available, else "cpu"."""
    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device) -> torch.dtype:
    """The compute dtype without --dtype / --precision: bf16 on a GPU (tensor-core matmuls at
    several times fp32's rate, half the memory), fp32 on a CPU, which gains little from bf16."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


# Short names first (what the help text shows); torch's own names are accepted too.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
          "bfloat16": torch.bfloat16, "float16": torch.float16, "half": torch.float16,
          "float32": torch.float32, "float": torch.float32}


def parse_dtype(text: str) -> torch.dtype:
    """argparse `type=` for --dtype: bf16 / fp16 / fp32, or torch's names (bfloat16, float16,
    float32)."""
    key = str(text).lower().removeprefix("torch.")  # "torch.bfloat16" as str(dtype) prints it
    if key not in DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}: use bf16, fp16 or fp32 "
                                         f"(or torch's names bfloat16, float16, float32)")
    return DTYPES[key]


def parse_rope_scaling(text: str) -> dict:
    """argparse `type=` for --rope-scaling: an HF rope_scaling JSON object with the keys its type
    needs."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError('expected a JSON object like {"rope_type": "yarn", ...}')
    kind = value.get("rope_type", value.get("type"))  # transformers 4 configs still say "type"
    if kind not in ("llama3", "yarn"):
        raise argparse.ArgumentTypeError(f"{text} is malformed: rope_type must be 'llama3' or "
                                         f"'yarn', got {kind!r}")
    for key in ("factor", "original_max_position_embeddings"):  # both types need both
        v = value.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise argparse.ArgumentTypeError(f"{text} is malformed: {key} must be a positive "
                                             f"number, got {v!r}")
    return value


def parse_override(text: str) -> tuple[str, object]:
    """argparse `type=` for --override: KEY=VALUE with KEY a ModelConfig field and VALUE JSON (or a
    bare string, e.g. arch=llama)."""
    key, eq, value = text.partition("=")
    if not eq or key not in ModelConfig.__dataclass_fields__:
        names = ", ".join(ModelConfig.__dataclass_fields__)
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE with KEY a ModelConfig "
                                         f"field ({names})")
    try:
        value = json.loads(value)
    except json.JSONDecodeError:  # not JSON: a bare string such as llama or hidden_states
        pass
    try:  # the field's own rule (RULES): hidden_size=abc or =64.5 is named here
        check_field(key, value, key)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return key, value


def parse_layers(text: str) -> tuple[int, ...]:
    """argparse `type=` for --ttt-layers: comma-separated non-negative layer indices."""
    try:
        layers = tuple(int(i) for i in text.split(","))
    except ValueError:
        layers = (-1,)  # reported just below, with the same message as a negative index
    if any(i < 0 for i in layers):
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated layer indices like "
                                         f"5,11,17")
    return layers


def with_rope_scaling(cfg: ModelConfig, rope_scaling: dict) -> ModelConfig:
    """The config with an HF rope_scaling dict applied; the context becomes factor x original
    length."""
    if cfg.rope_scaling is not None:  # stacking two scalings is never what anyone means
        raise ValueError(f"the checkpoint already scales RoPE ({cfg.rope_scaling}); drop "
                         f"--rope-scaling")
    limit = int(rope_scaling["factor"] * rope_scaling["original_max_position_embeddings"])
    try:  # a dict missing a type's own key (llama3's low_freq_factor, ...) fails here, not mid-run
        rope_inv_freq(replace(cfg, rope_scaling=rope_scaling))
    except (KeyError, TypeError) as e:
        raise ValueError(f"--rope-scaling {json.dumps(rope_scaling)} is malformed "
                         f"({type(e).__name__}: {e})") from None
    return replace(cfg, rope_scaling=rope_scaling, max_position_embeddings=limit)


# -----------------------------------------------------------------------------
# Where the files are


def resolve(src) -> Path:
    """A local directory as is; otherwise a hub id, fetched (config, safetensors, tokenizer files
    only) or taken from the hub cache."""
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"{src} is a file; expected a checkpoint directory or a hub id "
                                 f"like Qwen/Qwen3-0.6B")
    # A typo in a local path must not turn into a confusing hub request.
    if str(src).count("/") != 1 or str(src).startswith((".", "/", "~")):
        raise FileNotFoundError(f"no checkpoint directory at {src} (and it is not a hub id like "
                                f"Qwen/Qwen3-0.6B)")
    from huggingface_hub import snapshot_download  # only when the hub is needed at all
    try:
        return Path(snapshot_download(str(src), allow_patterns=HUB_FILES))
    except Exception as e:  # offline, unknown repo, gated repo: all end here with the hub's reason
        raise FileNotFoundError(f"could not get {src} from the Hugging Face hub and it is not "
                                f"cached locally ({type(e).__name__}: {e}). Pass a local "
                                f"directory instead.") from None


# -----------------------------------------------------------------------------
# config.json -> ModelConfig -> config.json


def load_config(src) -> ModelConfig:
    """The ModelConfig of a checkpoint directory or hub id, from its config.json."""
    return _read_config(resolve(src))


def _read_config(directory: Path) -> ModelConfig:
    path = directory / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: not a Hugging Face checkpoint directory")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    return config_from_hf(hf, where=str(path))


def config_from_hf(hf: dict, where="config.json") -> ModelConfig:
    """An HF config dict -> ModelConfig, field by field; unsupported features are refused, naming
    `where` and the field."""
    arch = _check_hf(hf, where)
    theta, rope_scaling = _rope_from_hf(hf, where)
    # Unknown fields are carried through export as they are; so are the TTT keys of a config that
    # switches TTT off (_plain), which then describe nothing here.
    carried = {k for k in hf if k[0] != "_" and (k not in KNOWN or (_plain(hf) and k in TTT_KEYS))}
    heads = hf["num_attention_heads"]
    window = _qwen3_window(hf, where) if arch == "qwen3" else None
    # Defaults below are the transformers classes' own, for keys an older config.json leaves out.
    try:  # __post_init__ checks combinations (heads a multiple of KV heads): name the file
        cfg = ModelConfig(
            arch=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,  # absent or null: plain MHA
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),  # both default to untied
            qk_norm=arch == "qwen3",  # Qwen3's per-head q/k RMSNorm; LLaMA has none
            sliding_window=window,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            extra={k: hf[k] for k in hf if k in carried},
        )
        rope_inv_freq(cfg)  # a scaling dict missing its type's keys fails here, not mid-forward
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: {type(e).__name__}: {e}") from None
    return _ttt_from_hf(cfg, hf, where)


def _check_hf(hf: dict, where) -> str:
    """The model.py arch of an HF config dict ("qwen3" / "llama"), after refusing an unsupported
    architecture or feature, a missing required field, and a value its ModelConfig field does not
    allow."""
    # Old configs may lack "architectures"; model_type then names the family.
    fallback = {"qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}
    model_type = str(hf.get("model_type"))
    archs = hf.get("architectures") or [fallback.get(model_type, model_type)]
    if archs[0] not in ARCHS:
        raise ValueError(f"{where}: architecture {archs[0]} is not supported; supported: "
                         f"{', '.join(ARCHS)}")
    arch = ARCHS[archs[0]]
    # Features model.py does not implement: refused, since ignoring one changes the logits.
    refused = [("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu")]
    if arch == "llama":  # LlamaConfig has no window; Qwen3's is read by _qwen3_window
        refused.append(("use_sliding_window", False))
    for key, ok in refused:
        if hf.get(key, ok) != ok:
            raise ValueError(f"{where}: {key}={hf[key]!r} is not supported (only {ok!r})")
    missing = [key for key in REQUIRED if key not in hf]
    if missing:
        raise ValueError(f"{where}: {', '.join(missing)} missing (a {archs[0]} config.json "
                         f"names {', '.join(REQUIRED)})")
    for key, name in HF_FIELDS.items():  # each value checked before any arithmetic uses it
        if key in hf and not (hf[key] is None and key in ("num_key_value_heads", "head_dim")):
            check_field(name, hf[key], f"{where}: {key}")  # those two: null means the default
    check_field("ttt_mode", hf.get("ttt_mode"), f"{where}: ttt_mode")
    return arch


def _rope_from_hf(hf: dict, where) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling or None for plain RoPE) of an HF config dict. transformers 5 keeps
    theta and scaling together in rope_parameters; transformers 4 splits them. 10000 is both
    versions' default theta."""
    if "rope_parameters" in hf and hf["rope_parameters"]:
        rope = dict(hf["rope_parameters"])
        theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    else:
        rope, theta = dict(hf.get("rope_scaling") or {}), hf.get("rope_theta", 10000.0)
    check_field("rope_theta", theta, f"{where}: rope_theta")  # rope_parameters' own is unchecked
    kind = rope.get("rope_type", rope.get("type", "default"))  # "type": transformers 4 spelling
    return theta, None if kind == "default" else rope


def _plain(hf: dict) -> bool:
    """Whether config.json switches TTT off: ttt_mode false or null (the official inference
    classes' default), as the official code's `if config.ttt_mode` reads it."""
    return "ttt_mode" in hf and not hf["ttt_mode"]


def _ttt_from_hf(cfg: ModelConfig, hf: dict, where) -> ModelConfig:
    """`cfg` with the In-Place TTT keys of an HF config dict (the official release's ttt_* keys;
    ttt_lookahead, ours, only when off). ttt_mode false or null: a plain model, whatever
    ttt_layers lists, as the official code reads it."""
    if _plain(hf):
        return cfg
    # An In-Place TTT checkpoint (ttt_mode true or a string; absent, a listed ttt_layers still
    # means TTT there): its keys, else ModelConfig's defaults.
    if hf.get("ttt_layers"):
        cfg = cfg.with_ttt(layers=hf["ttt_layers"], chunk=hf.get("ttt_chunk", cfg.ttt_chunk),
                           lr=hf.get("ttt_lr", cfg.ttt_lr), proj=hf.get("ttt_proj", cfg.ttt_proj),
                           target=hf.get("ttt_target", cfg.ttt_target))
    lookahead = hf.get("ttt_lookahead", True)  # absent in the official release: the paper's conv
    if lookahead is not True:
        if lookahead is not False:
            raise ValueError(f"{where}: ttt_lookahead={lookahead!r} must be true or false")
        cfg = replace(cfg, ttt_lookahead=False)
    return cfg


def _qwen3_window(hf: dict, where) -> int | None:
    """The attention window of a Qwen3 config.json, read as transformers' Qwen3 reads it: none
    unless use_sliding_window, then on the layers layer_types marks "sliding_attention" (without
    layer_types: those from max_window_layers on). model.py has one window for every layer, so a
    window on only some layers is refused rather than applied everywhere or dropped."""
    if not hf.get("use_sliding_window", False):
        return None  # transformers then ignores sliding_window, whatever its value
    window, n = hf.get("sliding_window"), hf["num_hidden_layers"]
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"{where}: use_sliding_window is true but sliding_window={window!r} is "
                         f"not a positive integer")
    start = hf.get("max_window_layers", QWEN3_MAX_WINDOW_LAYERS)
    types = hf.get("layer_types") or ["sliding_attention" if i >= start else "full_attention"
                                      for i in range(n)]
    unknown = set(types) - {"sliding_attention", "full_attention"}
    if unknown or len(types) != n:
        raise ValueError(f"{where}: layer_types={types!r} is not supported (only "
                         f"'sliding_attention' and 'full_attention', one per layer)")
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    if sliding and len(sliding) != n:
        raise ValueError(f"{where}: a sliding window on layers {sliding} only is not supported: "
                         f"model.py applies sliding_window to every layer or to none")
    return window if sliding else None


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    """ModelConfig -> an HF config dict that transformers loads into the same model (`dtype`: the
    weights' storage dtype, recorded for transformers' default)."""
    arch = {v: k for k, v in ARCHS.items()}[cfg.arch]
    # rope_parameters always names its type ("default" for plain RoPE), as transformers 5 writes it
    rope = {"rope_type": "default", **(cfg.rope_scaling or {})}
    # Unknown fields first, so ours win on any clash; a plain checkpoint's carried TTT keys only
    # while the model has no TTT layers of its own.
    hf = {k: v for k, v in cfg.extra.items() if not (cfg.ttt_layers and k in TTT_KEYS)}
    hf.update(
        architectures=[arch], model_type=cfg.arch, vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, hidden_act="silu",
        rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings, attention_bias=False,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
        dtype=str(dtype).removeprefix("torch."),
        # both layouts, so transformers 4 and 5 read the same RoPE
        rope_parameters={**rope, "rope_theta": cfg.rope_theta}, rope_theta=cfg.rope_theta,
        rope_scaling=cfg.rope_scaling,
    )
    if cfg.arch == "llama":  # a LlamaConfig field only; Qwen3's MLP has no bias option
        if cfg.sliding_window is not None:  # exported anyway, transformers would attend to all
            raise ValueError(f"sliding_window={cfg.sliding_window} cannot be exported for "
                             f"arch='llama': transformers' LlamaConfig has no sliding window "
                             f"(only arch='qwen3' exports one, or use sliding_window=None)")
        hf["mlp_bias"] = False
    elif cfg.sliding_window is None:
        hf.update(use_sliding_window=False, sliding_window=None)
    else:  # every layer windowed, as in model.py: transformers' Qwen3 computes the same logits
        hf.update(use_sliding_window=True, sliding_window=cfg.sliding_window, max_window_layers=0,
                  layer_types=["sliding_attention"] * cfg.num_layers)
    if cfg.qk_norm != (cfg.arch == "qwen3"):  # the architecture fixes it: no config key says it
        raise ValueError(f"qk_norm={cfg.qk_norm} cannot be exported for arch={cfg.arch!r}: "
                         f"transformers' Qwen3 always has q/k norms, LLaMA never")
    if cfg.ttt_layers:  # the official release's keys and values, so its code reads ours as its own
        hf.update(ttt_mode=True, ttt_layers=list(cfg.ttt_layers),
                  ttt_chunk=cfg.ttt_chunk, ttt_lr=cfg.ttt_lr, ttt_proj=cfg.ttt_proj,
                  ttt_target=cfg.ttt_target)
    if not cfg.ttt_lookahead:  # only when off: the release has no such key
        hf["ttt_lookahead"] = False
    return hf


# -----------------------------------------------------------------------------
# Weights in


def _weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards its index names, or the single file."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:  # a download cut short leaves a torn index: name it, not a bare JSON error
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index} is damaged (truncated?): {type(e).__name__}: {e}") from None
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:  # an interrupted download: name the files, not the first key that fails
            raise FileNotFoundError(f"{index} lists shards that are missing: {', '.join(missing)}")
        return [path / s for s in shards]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")


def load_model(src, device="cpu", dtype=torch.float32, config: ModelConfig | None = None,
               init_missing_ttt: bool = False) -> Transformer:
    """Build on the meta device and fill every parameter from the safetensors files, one tensor at
    a time (so memory never holds a second copy of the model). `config` overrides the checkpoint's
    (e.g. a base checkpoint with TTT layers added); `init_missing_ttt` lets TTT parameters absent
    from the files start as init_ttt_params sets them, which leaves the logits exactly the base
    model's."""
    from safetensors import safe_open  # where used: scripts import this module for its flags too

    path = resolve(src)
    cfg = config or _read_config(path)  # a given config must still match the files' shapes
    with torch.device("meta"):  # shapes only; each parameter gets real memory as it is read
        model = Transformer(cfg)
    params = dict(model.named_parameters())  # tied lm_head appears once, as embed_tokens
    # config.json's ttt_mode false: the official code builds no TTT layer and so ignores TTT
    # weights the files may hold (e.g. a trained model read by its inference classes); so do we.
    plain = "ttt_mode" in cfg.extra and not cfg.extra["ttt_mode"]
    loaded, ignored = set(), []
    for file in _weight_files(path):
        try:
            f = safe_open(str(file), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own types; the user needs the file name
            raise ValueError(f"{file} is not a readable safetensors file (truncated or corrupt?): "
                             f"{e}") from None
        with f:
            for key in f.keys():
                if key == "lm_head.weight" and cfg.tie_word_embeddings:
                    continue  # some tied checkpoints store the head anyway; we keep the embedding
                if key not in params and plain and is_ttt_param(key):
                    ignored.append(key)
                    continue
                if key not in params:
                    raise KeyError(f"unexpected key {key} in {file} (not a parameter of this "
                                   f"{cfg.arch} model)")
                # cast tensor by tensor: the model never exists in two dtypes at once
                t = _read_tensor(f, key, file, params[key].shape)
                _set_param(model, key, t.to(device=device, dtype=dtype))
                loaded.add(key)
    if ignored:
        warnings.warn(f"{path}: config.json says ttt_mode={cfg.extra['ttt_mode']!r}, so its "
                      f"{len(ignored)} TTT weights (e.g. {ignored[0]}) are ignored and the model "
                      f"is the plain base model, as the official code reads it", stacklevel=2)
    missing = [k for k in params if k not in loaded]
    new_ttt = [k for k in missing if is_ttt_param(k)]
    if init_missing_ttt:  # only TTT parameters may be missing, never a base weight
        missing = [k for k in missing if k not in new_ttt]
    if missing:
        raise KeyError(f"{path}: missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                       f"({len(missing)} in all)")
    for key in new_ttt if init_missing_ttt else []:  # real memory; init_ttt_params fills it below
        _set_param(model, key, torch.empty(params[key].shape, device=device, dtype=dtype))
    if cfg.tie_word_embeddings:  # _set_param replaced the shared Parameter: tie the new one again
        model.lm_head.weight = model.model.embed_tokens.weight
    if new_ttt and init_missing_ttt:  # conv 0: the model computes exactly the base model
        init_ttt_params(model)
    return model


def _read_tensor(f, key, file, shape) -> torch.Tensor:
    """Tensor `key` of the open safetensors file f, checked: readable, floating point, `shape`."""
    try:
        t = f.get_tensor(key)
    except Exception as e:  # the header was fine but the data is cut short
        raise ValueError(f"cannot read {key} from {file} (truncated or corrupt?): {e}") from None
    if not t.is_floating_point():  # int8 / int32 / bool: quantised or not weights
        raise ValueError(f"{key} in {file} is stored as {t.dtype}; only floating-point weights are "
                         f"supported (a quantised checkpoint must be dequantised first)")
    if t.shape != shape:
        raise ValueError(f"shape mismatch for {key} in {file}: file has {tuple(t.shape)}, model "
                         f"expects {tuple(shape)}")
    return t


def _set_param(model: nn.Module, key: str, t: torch.Tensor):
    """Swap in a new Parameter (a meta tensor cannot be copied into)."""
    mod_name, _, name = key.rpartition(".")
    setattr(model.get_submodule(mod_name), name, nn.Parameter(t, requires_grad=True))


def load_tokenizer(src) -> Tokenizer:
    """The tokenizer of a checkpoint directory or hub id."""
    return Tokenizer.from_dir(resolve(src))


# -----------------------------------------------------------------------------
# A training run's model (train.py): its config and its starting weights. Errors name
# train.py's flags.


def resolve_init(init) -> Path | None:
    """--init as a local directory: a hub id is fetched (or found in the hub cache) once, here;
    every later step reads the directory."""
    try:
        return resolve(init) if init else None
    except OSError as e:
        raise SystemExit(f"--init {init}: {e}") from None


def model_config(preset="bytes", init=None, override=None, ttt_layers=None, ttt_chunk=None,
                 ttt_lr=None, ttt_target=None, no_ttt=False) -> ModelConfig:
    """The preset (with `override` fields) or the `init` checkpoint's config, with the TTT settings
    given here layered on its own or, where it has none, on model.TTT_RECIPE. None leaves a setting
    as it is; no_ttt removes every TTT layer (the baseline)."""
    if init:  # the checkpoint fixes the shape (parse_args refuses --override with --init)
        try:
            cfg = load_config(init)
        except (OSError, ValueError) as e:  # the file and field are in the message
            raise SystemExit(f"--init {init}: {e}") from None
    else:
        try:  # all fields at once: __post_init__ checks the combination, not each step
            cfg = replace(PRESETS[preset], **(override or {}))
        except (TypeError, ValueError) as e:
            raise SystemExit(f"--override {override}: {e}") from None
    if not cfg.ttt_layers:  # a base checkpoint or a preset without TTT: the official recipe
        # From scratch the target source stays the token embeddings, as the bytes preset and every
        # from-scratch run here have used: the recipe's hidden_states target is tuned for continual
        # pretraining of a trained model, whose MLP inputs are already meaningful.
        recipe = TTT_RECIPE if init else {**TTT_RECIPE, "target": "input_embed"}
        cfg = cfg.with_ttt(**recipe)
    flags = dict(chunk=ttt_chunk, lr=ttt_lr, target=ttt_target)
    layers = () if no_ttt else ttt_layers  # None keeps the layers chosen above
    # From a flag an index past the last layer is a mistake: an error, not model.py's warning
    # (meant for official config.json files, which list index 36 for 36-layer models).
    if layers and max(layers) >= cfg.num_layers:
        raise SystemExit(f"--ttt-layers {','.join(map(str, layers))}: the model has "
                         f"{cfg.num_layers} layers, so indices must be 0..{cfg.num_layers - 1}")
    return cfg.with_ttt(layers=layers, **{k: v for k, v in flags.items() if v is not None})


def check_config(cfg: ModelConfig, ttt_init, export: bool):
    """Settings that fail only with this config, refused before any data or weights load."""
    if cfg.ttt_layers and (why := ttt_init_problem(cfg, ttt_init)):
        raise SystemExit(f"--ttt-init {ttt_init} {why}")
    if export:  # a config HF cannot express must fail now, not after the last step
        try:
            config_to_hf(cfg, torch.float32)
        except ValueError as e:
            raise SystemExit(f"{e}; or pass --no-export") from None


def full_model(cfg, init, seed, ttt_init="paper", batch=None) -> Transformer:
    """A complete fp32 CPU model: HF weights (new TTT parameters as init_ttt_params sets them) or a
    fresh init; ttt_init other than "paper" then resets every TTT parameter to that start
    ("calibrated" measures its P on `batch`, token ids (B, T)). Seeded,
    so the run starts the same whatever the world size. It lives in rank 0's host memory while the
    shards are filled (4 bytes per parameter: 32 GB for an 8B model)."""
    torch.manual_seed(seed)  # the random diagonal of new ttt_proj weights draws from it
    if init:  # fp32: master weights, whatever dtype the checkpoint was stored in
        try:
            model = load_model(init, "cpu", torch.float32, config=cfg, init_missing_ttt=True)
        except (OSError, ValueError, KeyError) as e:  # a flawed file: its name and flaw, no trace
            raise SystemExit(f"--init {init}: {e}") from None
    else:
        with torch.device("meta"):  # no memory until to_empty, and no init work thrown away
            model = Transformer(cfg)
        model.to_empty(device="cpu")
        model.init_weights(generator=torch.Generator().manual_seed(seed))
    if ttt_init != "paper":  # a deterministic start (no random draws): study.py's matched starts
        init_ttt_params(model, mode=ttt_init, batch=batch)
    return model


# -----------------------------------------------------------------------------
# Export targets: what an export may replace


def check_export_target(out, overwrite=False, protect=()):
    """Refuse an export target whose replacement would lose what is not an export: a file, a
    train.py checkpoint or run directory (or a directory holding one), anything in `protect` (the
    checkpoint being exported, a run's ckpt/ and metrics.jsonl) or around it, whatever
    `overwrite` says; and without `overwrite`, any non-empty directory but an earlier export whose
    files are all listed in its EXPORT_MARK (a file a user added there makes it theirs)."""
    out = Path(out)
    here = out.resolve()
    for p in (Path(q).resolve() for q in protect):
        if p == here or p in here.parents or here in p.parents:
            raise FileExistsError(f"{out} would replace or lie inside {p}, which an export never "
                                  f"touches: choose another directory")
    if out.is_symlink():  # replacing it would write through the link, then fail to delete it
        raise FileExistsError(f"{out} is a symbolic link (to {os.readlink(out)}): an export never "
                              f"writes through a link; choose another directory")
    if not out.exists():  # found now, not after a whole training run
        base = next(p for p in out.absolute().parents if p.exists())
        if not base.is_dir():
            raise NotADirectoryError(f"{out} cannot be made: {base} is a file")
        if not os.access(base, os.W_OK | os.X_OK):
            raise PermissionError(f"{out} cannot be made: {base} is not writable")
        return
    if not out.is_dir():
        raise FileExistsError(f"{out} is a file; an export writes a directory: choose another path")
    entries = sorted(e.name for e in out.iterdir())
    runs = [str((d / name).relative_to(out)) for d in [out, *(out / e for e in entries)]
            for name in RUN_FILES if d.is_dir() and (d / name).exists()]
    if runs:
        raise FileExistsError(f"{out} holds train.py output ({', '.join(runs[:3])}), which an "
                              f"export never replaces: choose another directory")
    try:
        ours = set(json.loads((out / EXPORT_MARK).read_text())["files"]) | {EXPORT_MARK}
    except (OSError, ValueError, KeyError, TypeError):  # no mark, or not ours to read
        ours = set()
    if entries and not set(entries) <= ours and not overwrite:
        more = f" and {len(entries) - 1} more" if len(entries) > 1 else ""
        raise FileExistsError(f"{out} exists and is not an export of ours (it holds {entries[0]}"
                              f"{more}): choose another directory, or pass --overwrite to replace "
                              f"it")


# -----------------------------------------------------------------------------
# Weights out


def save_model(model: Transformer, out_dir, tokenizer_src=None, max_shard_bytes: int = 5 * 2**30,
               overwrite=False, protect=()):
    """Write config.json, safetensors (sharded with an index when larger than max_shard_bytes), the
    modeling code transformers runs with trust_remote_code (remote_code.py) and the tokenizer files
    of tokenizer_src. Written to a temporary directory first and swapped in when
    complete, so a failure never leaves a half-written checkpoint where a good one was.
    check_export_target(out_dir, overwrite, protect) says what may be replaced."""
    # A config transformers cannot express, or a target not ours to replace, fails here, before
    # anything is written.
    dtype = next(model.parameters()).dtype  # one dtype throughout: the model's
    hf_config = config_to_hf(model.config, dtype)
    out = Path(out_dir)
    check_export_target(out, overwrite, protect)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(out.parent)  # a killed export's temporary directory, of any target here
    # Beside the target: the same filesystem, so os.replace below is an atomic rename.
    tmp = tmp_sibling(out)
    tmp.mkdir()
    try:
        # the modeling code first: a file of it that cannot travel fails before the weights
        hf_config["auto_map"] = write_remote_code(tmp, model.config.arch)
        _write_weights(model, tmp, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        if tokenizer_src is not None:  # a failure here still leaves the old checkpoint intact
            src = resolve(tokenizer_src)
            for name in TOKENIZER_FILES:
                if (src / name).is_file():
                    shutil.copy(src / name, tmp / name)
        (tmp / EXPORT_MARK).write_text(json.dumps({"files": sorted(os.listdir(tmp))}) + "\n")
        # Swap: the old export moves aside and is deleted only once the new one is in place (a
        # kill in between leaves it under a tmp_sibling name, which the next export removes).
        old = tmp_sibling(out.with_name(f"{out.name}.old"))
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        if old.exists():
            shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful swap
    return out


def _write_weights(model: Transformer, directory: Path, max_shard_bytes: int):
    """model.safetensors, or shards of at most max_shard_bytes (unless one tensor is larger) and
    model.safetensors.index.json, as transformers writes them."""
    from safetensors.torch import save_file

    # contiguous: safetensors stores raw buffers; a transposed view would be refused
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:  # HF stores a tied head once, as the embedding
        state.pop("lm_head.weight", None)
    # Greedy shards in state-dict order: none past max_shard_bytes unless one tensor is.
    shards, size = [[]], 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += nbytes
    meta = {"format": "pt"}  # transformers refuses safetensors files without it
    if len(shards) == 1:
        save_file(state, str(directory / "model.safetensors"), metadata=meta)
        return
    weight_map = {}
    for i, keys in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: state[k] for k in keys}, str(directory / name), metadata=meta)
        weight_map.update(dict.fromkeys(keys, name))
    total = sum(v.numel() * v.element_size() for v in state.values())  # the index's field
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


# -----------------------------------------------------------------------------
# train.py checkpoints -> HF


def export_checkpoint(ckpt_dir, out_dir, tokenizer=None, overwrite=False, protect=(),
                      verify=True) -> Path:
    """A train.py checkpoint -> HF safetensors (fp32) + config.json + tokenizer files (by default
    the run's own). Used at the end of training and by `python load_hf.py export`. The target is
    checked (check_export_target; the checkpoint itself is always protected) and, unless
    verify=False (train.py, which has just written or verified it), the checkpoint too, before its
    weights are read."""
    protect = (ckpt_dir, *protect)
    meta = read_train_meta(ckpt_dir)  # cheap: a directory that is no checkpoint is named first
    check_export_target(out_dir, overwrite, protect)
    # the run's tokenizer by default: the export then decodes exactly what the model was trained on
    if tokenizer is None and not Path(meta["tokenizer"]).is_dir():
        raise FileNotFoundError(f"the run's tokenizer {meta['tokenizer']} (named in "
                                f"{Path(ckpt_dir) / TRAIN_META}) is gone, e.g. with its cache: "
                                f"pass --tokenizer DIR")
    if verify:  # every byte read: after the cheap checks
        verify_checkpoint(ckpt_dir)
    model, meta = load_train_checkpoint(ckpt_dir)
    return save_model(model, out_dir, tokenizer_src=tokenizer or meta["tokenizer"],
                      overwrite=overwrite, protect=protect)


# -----------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description="Inspect Hugging Face checkpoints as this codebase "
                                             "reads them; export train.py checkpoints.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    info = sub.add_parser("info", help="print the ModelConfig read from SRC's config.json")
    info.add_argument("src", help="local checkpoint directory or hub id")
    export = sub.add_parser("export",
                            help="convert a train.py checkpoint (ckpt/step_N) to an HF checkpoint")
    export.add_argument("ckpt", help="checkpoint directory written by train.py, e.g. "
                                     "out/bytes/ckpt/step_000400")
    export.add_argument("out", help="output directory for config.json, safetensors and tokenizer "
                                    "files")
    export.add_argument("--tokenizer", help="copy tokenizer files from here (default: the training "
                                            "run's tokenizer)")
    export.add_argument("--overwrite", action="store_true",
                        help="replace OUT even when it is not an earlier export (never a file, a "
                             "checkpoint or a train.py run directory)")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "info":  # what the loader makes of a config.json, before any weights load
            cfg = load_config(args.src)
            for f in fields(cfg):
                print(f"{f.name:26s} {asdict(cfg)[f.name]}")
        elif args.cmd == "export":
            out = export_checkpoint(args.ckpt, args.out, args.tokenizer, args.overwrite)
            print(f"exported {out}")
    except (OSError, ValueError, KeyError) as e:  # bad paths and files: their message, no traceback
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
