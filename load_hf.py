"""The Hugging Face format, both ways: config.json read field by field, safetensors shard by shard
with strict keys, and written back; and train.py's checkpoints exported to it (checkpoint.py reads
their DCP side; the model they describe is built here, so checkpoint.py needs no model.py).

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

This module never imports train.py or data.py; the flags scripts share are cli.py's, and
train.py's model (a preset or --init with TTT settings) is made in train_model.py.
"""

import argparse
import json
import math
import os
import shutil
import warnings
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn as nn

from checkpoint import dcp_load, read_train_meta, saved_fields, verify_checkpoint
from cli import resolve
from files import EXPORT_MARK, TRAIN_META, check_export_target, remove_orphans, written_aside
from model import ModelConfig, Transformer, init_ttt_params, is_ttt_param, rope_inv_freq
from remote_code import write_remote_code
from tokenizer import Tokenizer

ARCHS = {"Qwen3ForCausalLM": "qwen3", "LlamaForCausalLM": "llama"}
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                   "special_tokens_map.json", "generation_config.json"]
# Our stabilisers (ttt.py "Stabilisers") and their off values: keys the release lacks and its
# code ignores, so each is written only when on, and read only for an In-Place TTT checkpoint.
STABILISERS = {"ttt_key_norm": False, "ttt_target_norm": False, "ttt_clip_tau": None,
               "ttt_norm_preserve": False, "ttt_lr_warmup": 0}
# Those that change what a trained model computes; ttt_lr_warmup shapes training only, and the
# official code's inference with the full η is ours.
NOT_OFFICIAL = ("ttt_key_norm", "ttt_target_norm", "ttt_clip_tau", "ttt_norm_preserve")
TTT_KEYS = ("ttt_mode", "ttt_layers", "ttt_chunk", "ttt_lr", "ttt_proj", "ttt_target",
            "ttt_lookahead", *STABILISERS)
# transformers' Qwen3Config default: layers from this index on use the window, when one is on.
QWEN3_MAX_WINDOW_LAYERS = 28

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
                     "num_kv_heads", "max_position_embeddings", "ttt_chunk"], SIZE),
    # RoPE's tables have head_dim / 2 entries, made when a config is read: bounded (real: 64-256)
    "head_dim": (lambda v: _int(v, 1) and v <= 2**16, "a positive integer <= 65536"),
    **dict.fromkeys(["rms_norm_eps", "rope_theta"], (lambda v: _number(v) and v > 0,
                                                     "a positive number")),
    **dict.fromkeys(["tie_word_embeddings", "qk_norm", "ttt_proj", "ttt_fp32_state",
                     "ttt_lookahead", "ttt_key_norm", "ttt_target_norm", "ttt_norm_preserve"],
                    FLAG),
    "rope_scaling": (lambda v: v is None or (isinstance(v, dict) and rope_problem(v) is None),
                     "null or a JSON object of RoPE parameters (each a positive finite number)"),
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
    "ttt_lr_warmup": (lambda v: _int(v, 0), "a number of steps (an integer >= 0; 0: off)"),
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
# RoPE scaling on the command line (sample.py, ruler.py: --rope-scaling)


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
# config.json -> ModelConfig -> config.json, through one table


class HFField(NamedTuple):
    """A config.json key that is a ModelConfig field: read, checked (by the field's RULES) and
    written by this one entry. default: the value when the key is absent (transformers' classes'
    own), REQUIRED for none, or a function of the config dict; null_default: null means the
    default too (otherwise null is checked like any value)."""
    key: str
    field: str
    default: object = None
    null_default: bool = False


REQUIRED = object()
HF_TABLE = (
    HFField("vocab_size", "vocab_size", REQUIRED),
    HFField("hidden_size", "hidden_size", REQUIRED),
    HFField("intermediate_size", "intermediate_size", REQUIRED),
    HFField("num_hidden_layers", "num_layers", REQUIRED),
    HFField("num_attention_heads", "num_heads", REQUIRED),
    # absent or null: plain multi-head attention, and hidden_size / heads per head
    HFField("num_key_value_heads", "num_kv_heads", lambda hf: hf["num_attention_heads"], True),
    HFField("head_dim", "head_dim", lambda hf: hf["hidden_size"] // hf["num_attention_heads"],
            True),
    HFField("rms_norm_eps", "rms_norm_eps", 1e-6),
    HFField("max_position_embeddings", "max_position_embeddings", 2048),
    HFField("tie_word_embeddings", "tie_word_embeddings", False),  # both classes default to untied
    HFField("bos_token_id", "bos_token_id"),
    HFField("eos_token_id", "eos_token_id"),
)
# The official release's In-Place TTT keys besides ttt_layers, read only when TTT is on
# (_ttt_from_hf), written only for a model with TTT layers; absent: ModelConfig's own default.
TTT_TABLE = tuple(HFField(k, k) for k in ("ttt_chunk", "ttt_lr", "ttt_proj", "ttt_target"))
# Fields of HF configs that model.py reads, or that describe features we refuse rather than
# silently drop. Anything else is carried in ModelConfig.extra and written back on export.
KNOWN = {"architectures", "model_type", "rope_theta", "rope_scaling", "rope_parameters",
         "sliding_window", "use_sliding_window", "attention_bias", "mlp_bias", "hidden_act",
         "torch_dtype", "dtype", "layer_types", "max_window_layers", *TTT_KEYS,
         "auto_map",  # names the modeling code: each export writes its own (remote_code.py)
         *(f.key for f in HF_TABLE)}


def load_config(src) -> ModelConfig:
    """The ModelConfig of a checkpoint directory or hub id, from its config.json."""
    return _read_config(resolve(src))


def _read_config(directory: Path) -> ModelConfig:
    path = directory / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: not a Hugging Face checkpoint directory")
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    return config_from_hf(hf, where=str(path))


def config_from_hf(hf: dict, where="config.json") -> ModelConfig:
    """An HF config dict -> ModelConfig, field by field (HF_TABLE); unsupported features and
    values a field does not allow are refused, naming `where`, the key and the value."""
    if not isinstance(hf, dict):
        raise ValueError(f"{where} holds a JSON {type(hf).__name__}, not an object: not a "
                         f"config.json")
    arch = _check_hf(hf, where)
    theta, rope_scaling = _rope_from_hf(hf, where)
    # Unknown fields are carried through export as they are; so are the TTT keys of a config that
    # switches TTT off (_plain), which then describe nothing here.
    carried = {k for k in hf if not k.startswith("_") and (k not in KNOWN or (_plain(hf) and k in TTT_KEYS))}
    values = {}
    for f in HF_TABLE:  # every value was checked by _check_hf before any arithmetic here
        value = hf.get(f.key)
        absent = f.key not in hf or (value is None and f.null_default)
        values[f.field] = (f.default(hf) if callable(f.default) else f.default) if absent else value
    check_field("head_dim", values["head_dim"], f"{where}: head_dim")  # also when derived
    try:  # __post_init__ checks combinations (heads a multiple of KV heads): name the file
        cfg = ModelConfig(arch=arch, rope_theta=float(theta), rope_scaling=rope_scaling,
                          qk_norm=arch == "qwen3",  # Qwen3's per-head q/k RMSNorm; LLaMA has none
                          sliding_window=_qwen3_window(hf, where) if arch == "qwen3" else None,
                          extra={k: hf[k] for k in hf if k in carried}, **values)
        inv_freq, scale = rope_inv_freq(cfg)  # a dict missing its type's keys fails here
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        raise ValueError(f"{where}: {type(e).__name__}: {e}") from None
    if not (torch.isfinite(inv_freq).all() and math.isfinite(scale)):  # e.g. llama3's lo == hi
        raise ValueError(f"{where}: rope_theta={theta!r} with {rope_scaling} gives non-finite RoPE "
                         f"frequencies")
    return _ttt_from_hf(cfg, hf, where)


def _check_hf(hf: dict, where) -> str:
    """The model.py arch of an HF config dict ("qwen3" / "llama"), after refusing an unsupported
    architecture or feature, a missing required field, and a value its ModelConfig field does not
    allow."""
    # Old configs may lack "architectures"; model_type then names the family.
    fallback = {"qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}
    model_type = str(hf.get("model_type"))
    archs = hf.get("architectures") or [fallback.get(model_type, model_type)]
    if not isinstance(archs, list) or not isinstance(archs[0], str) or archs[0] not in ARCHS:
        shown = archs[0] if isinstance(archs, list) else archs
        raise ValueError(f"{where}: architecture {shown} is not supported; supported: "
                         f"{', '.join(ARCHS)}")
    arch = ARCHS[archs[0]]
    # Features model.py does not implement: refused, since ignoring one changes the logits.
    refused = [("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu")]
    if arch == "llama":  # LlamaConfig has no window; Qwen3's is read by _qwen3_window
        refused.append(("use_sliding_window", False))
    for key, ok in refused:
        if hf.get(key, ok) != ok:
            raise ValueError(f"{where}: {key}={hf[key]!r} is not supported (only {ok!r})")
    missing = [f.key for f in HF_TABLE if f.default is REQUIRED and f.key not in hf]
    if missing:
        raise ValueError(f"{where}: {', '.join(missing)} missing (a {archs[0]} config.json names "
                         f"{', '.join(f.key for f in HF_TABLE if f.default is REQUIRED)})")
    for f in (*HF_TABLE, *TTT_TABLE, HFField("ttt_layers", "ttt_layers")):
        if f.key in hf and not (hf[f.key] is None and f.null_default):
            check_field(f.field, hf[f.key], f"{where}: {f.key}")
    check_field("ttt_mode", hf.get("ttt_mode"), f"{where}: ttt_mode")
    return arch


# RoPE's numeric parameters, in rope_scaling or transformers 5's rope_parameters: each, when
# given, a positive finite number (a NaN factor makes every frequency NaN, a zero one infinite).
ROPE_NUMBERS = ("rope_theta", "factor", "low_freq_factor", "high_freq_factor",
                "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor",
                "mscale", "mscale_all_dim")
ROPE_TYPES = ("default", "llama3", "yarn")


def rope_problem(rope: dict) -> str | None:
    """What is wrong with an HF RoPE dict ("factor=nan: expected ..."), or None. Null stands for a
    parameter's default; the keys a type needs are checked by model.rope_inv_freq."""
    kind = rope.get("rope_type", rope.get("type", "default"))  # "type": transformers 4 spelling
    if kind not in ROPE_TYPES:
        return f"rope_type={kind!r}: expected one of {', '.join(ROPE_TYPES)}"
    for key in ROPE_NUMBERS:
        v = rope.get(key)
        if v is not None and not (_number(v) and v > 0):
            return f"{key}={v!r}: expected a positive finite number"
    if not isinstance(rope.get("truncate", True), bool):
        return f"truncate={rope['truncate']!r}: expected true or false"
    return None


def _rope_from_hf(hf: dict, where) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling or None for plain RoPE) of an HF config dict. transformers 5 keeps
    theta and scaling together in rope_parameters; transformers 4 splits them. 10000 is both
    versions' default theta."""
    key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    rope = hf.get(key) or {}
    if not isinstance(rope, dict):
        raise ValueError(f"{where}: {key}={rope!r} is not allowed: expected a JSON object or null")
    rope = dict(rope)
    theta = hf.get("rope_theta", 10000.0)
    if key == "rope_parameters":
        theta = rope.pop("rope_theta", theta)
    check_field("rope_theta", theta, f"{where}: rope_theta")
    if why := rope_problem(rope):
        raise ValueError(f"{where}: {key}: {why}")
    kind = rope.get("rope_type", rope.get("type", "default"))
    return theta, None if kind == "default" else rope


def _plain(hf: dict) -> bool:
    """Whether config.json (or a ModelConfig's extra, which carries its ttt_mode exactly when
    this holds) switches TTT off: ttt_mode false or null (the official inference classes'
    default), as the official code's `if config.ttt_mode` reads it."""
    return "ttt_mode" in hf and not hf["ttt_mode"]


def _ttt_from_hf(cfg: ModelConfig, hf: dict, where) -> ModelConfig:
    """`cfg` with the In-Place TTT keys of an HF config dict (TTT_TABLE and ttt_layers;
    ttt_lookahead, ours, only when off). ttt_mode false or null: a plain model, whatever
    ttt_layers lists, as the official code reads it."""
    if _plain(hf):
        return cfg
    # An In-Place TTT checkpoint (ttt_mode true or a string; absent, a listed ttt_layers still
    # means TTT there): its keys, else ModelConfig's defaults.
    if hf.get("ttt_layers"):
        cfg = replace(cfg, ttt_layers=tuple(hf["ttt_layers"]),
                      **{f.field: hf[f.key] for f in TTT_TABLE if f.key in hf})
    lookahead = hf.get("ttt_lookahead", True)  # absent in the official release: the paper's conv
    if lookahead is not True:
        if lookahead is not False:
            raise ValueError(f"{where}: ttt_lookahead={lookahead!r} must be true or false")
        cfg = replace(cfg, ttt_lookahead=False)
    on = {k: hf[k] for k in STABILISERS if k in hf}  # absent: off, the paper's arithmetic
    for k, v in on.items():
        check_field(k, v, f"{where}: {k}")
    return replace(cfg, **on)


def _qwen3_window(hf: dict, where) -> int | None:
    """The attention window of a Qwen3 config.json, read as transformers' Qwen3 reads it: none
    unless use_sliding_window, then on the layers layer_types marks "sliding_attention" (without
    layer_types: those from max_window_layers on). model.py has one window for every layer, so a
    window on only some layers is refused rather than applied everywhere or dropped."""
    if not hf.get("use_sliding_window", False):
        return None  # transformers then ignores sliding_window, whatever its value
    window, n = hf.get("sliding_window"), hf["num_hidden_layers"]
    if not _int(window, 1):
        raise ValueError(f"{where}: use_sliding_window is true but sliding_window={window!r} is "
                         f"not a positive integer")
    start = hf.get("max_window_layers", QWEN3_MAX_WINDOW_LAYERS)
    if not _int(start, 0):
        raise ValueError(f"{where}: max_window_layers={start!r} is not an integer >= 0")
    types = hf.get("layer_types") or ["sliding_attention" if i >= start else "full_attention"
                                      for i in range(n)]
    known = ("sliding_attention", "full_attention")
    if not isinstance(types, list) or len(types) != n or any(t not in known for t in types):
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
    hf.update({f.key: getattr(cfg, f.field) for f in HF_TABLE})
    hf.update(
        architectures=[arch], model_type=cfg.arch, hidden_act="silu", attention_bias=False,
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
                  **{f.key: getattr(cfg, f.field) for f in TTT_TABLE})
    if not cfg.ttt_lookahead:  # only when off: the release has no such key
        hf["ttt_lookahead"] = False
    if cfg.ttt_layers:  # only those on: an export with all off reads as the release's own
        hf.update(stabilisers_on(cfg))
    return hf


def stabilisers_on(cfg: ModelConfig) -> dict:
    """The config.json keys of the stabilisers `cfg` turns on, with their values."""
    return {k: getattr(cfg, k) for k, off in STABILISERS.items() if getattr(cfg, k) != off}


# -----------------------------------------------------------------------------
# Weights in


def _weight_files(path: Path) -> tuple[list[Path], dict | None]:
    """The safetensors files of a checkpoint and the tensor -> file map its index gives: the shards
    model.safetensors.index.json names (each inside `path`), or the single file and None."""
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        if (path / "model.safetensors").is_file():
            return [_inside(path, "model.safetensors", path / "model.safetensors")], None
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")
    try:  # a download cut short leaves a torn index: name it, not a bare JSON error
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index} is damaged (truncated?): {type(e).__name__}: {e}") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index}: weight_map={str(weight_map)[:80]} is not allowed: expected a "
                         f"non-empty JSON object of tensor name -> shard file name")
    for key, name in weight_map.items():
        if not isinstance(name, str) or not name.endswith(".safetensors"):
            raise ValueError(f"{index}: weight_map[{key!r}]={name!r} is not allowed: expected "
                             f"the name of a .safetensors file in {path}")
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not (path / s).is_file()]
    if missing:  # an interrupted download: name the files, not the first key that fails
        raise FileNotFoundError(f"{index} lists shards that are missing: {', '.join(missing)}")
    return [_inside(path, s, index) for s in shards], weight_map


def _inside(path: Path, name: str, where: Path) -> Path:
    """path / name, refused (naming `where`) unless it lies in `path`: no absolute name, no "..",
    no link out of it, except the hub cache's own links from a snapshot into its repo's blobs/."""
    roots = [path.resolve()]
    if path.parent.name == "snapshots":  # <repo>/snapshots/<revision>/x -> <repo>/blobs/<sha>
        roots.append(path.parent.parent.resolve() / "blobs")
    file = path / name
    parts = Path(name).parts
    if Path(name).is_absolute() or ".." in parts or not any(
            file.resolve().is_relative_to(r) for r in roots):
        raise ValueError(f"{where} names {name!r}, which lies outside {path} (an absolute name, "
                         f"'..' or a link out of it): a checkpoint's files must be inside it")
    return file


def _open_safetensors(file: Path):
    from safetensors import safe_open  # where used: scripts import this module for its flags too

    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own types; the user needs the file name
        raise ValueError(f"{file} is not a readable safetensors file (truncated or corrupt?): "
                         f"{e}") from None


def _tensor_shapes(files: list[Path], weight_map: dict | None, path: Path
                   ) -> dict[str, tuple[Path, tuple]]:
    """{tensor: (file, shape)} from the files' headers alone, nothing read yet. A tensor in two
    files, in a file its index does not name for it, or named by the index but absent from its
    file is refused: which copy would be the weight is a guess."""
    index = path / "model.safetensors.index.json"
    shapes = {}
    for file in files:
        with _open_safetensors(file) as f:
            for key in f.keys():
                if key in shapes:
                    raise ValueError(f"{key} is stored in both {shapes[key][0]} and {file}: "
                                     f"refusing to guess which copy is the weight")
                if weight_map is not None and weight_map.get(key) != file.name:
                    raise ValueError(f"{file} holds {key}, but {index} places it in "
                                     f"{weight_map.get(key)!r}: refusing to guess which copy is "
                                     f"the weight")
                shapes[key] = (file, tuple(f.get_slice(key).get_shape()))
    for key, name in (weight_map or {}).items():
        if key not in shapes:
            raise ValueError(f"{index}: weight_map[{key!r}]={name!r}, but {path / name} has no "
                             f"tensor {key}")
    return shapes


def load_model(src, device="cpu", dtype=torch.float32, config: ModelConfig | None = None,
               init_missing_ttt: bool | Callable[[Transformer], None] = False) -> Transformer:
    """Build on the meta device and fill every parameter from the safetensors files, one tensor at
    a time (so memory never holds a second copy of the model). `config` overrides the checkpoint's
    (e.g. a base checkpoint with TTT layers added); `init_missing_ttt` True lets TTT parameters
    absent from the files start as init_ttt_params sets them, which leaves the logits exactly the
    base model's; a function instead sets every TTT parameter after the load (the files' ones too):
    train_model.full_model's start other than the paper's, set once."""
    path = resolve(src)
    cfg = config or _read_config(path)  # a given config must still match the files' shapes
    with torch.device("meta"):  # shapes only; each parameter gets real memory as it is read
        model = Transformer(cfg)
    plan = _plan_load(model, path)
    for file in sorted({file for file, _ in plan.values()}):
        with _open_safetensors(file) as f:
            for key in (k for k, (where, _) in plan.items() if where == file):
                # cast tensor by tensor: the model never exists in two dtypes at once
                t = _read_tensor(f, key, file, plan[key][1])
                _set_param(model, key, t.to(device=device, dtype=dtype))
    if cfg.tie_word_embeddings:  # _set_param replaced the shared Parameter: tie the new one again
        model.lm_head.weight = model.model.embed_tokens.weight
    _fill_missing(model, path, loaded=set(plan), init_missing_ttt=init_missing_ttt,
                  device=device, dtype=dtype)
    return model


def _plan_load(model: Transformer, path: Path) -> dict[str, tuple[Path, torch.Size]]:
    """{parameter: (file, shape)} to read, every name and shape checked against the model from the
    files' headers before any tensor is allocated. config.json's ttt_mode false: the official
    code builds no TTT layer and so ignores TTT weights the files may hold (e.g. a trained model
    read by its inference classes); so do we, with a warning."""
    cfg, params = model.config, dict(model.named_parameters())  # a tied head appears once
    plan, ignored = {}, []
    for key, (file, shape) in _tensor_shapes(*_weight_files(path), path).items():
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # some tied checkpoints store the head anyway; we keep the embedding
        if key not in params and _plain(cfg.extra) and is_ttt_param(key):
            ignored.append(key)
            continue
        if key not in params:
            raise KeyError(f"unexpected key {key} in {file} (not a parameter of this "
                           f"{cfg.arch} model)")
        if shape != tuple(params[key].shape):
            raise ValueError(f"shape mismatch for {key} in {file}: file has {shape}, model "
                             f"expects {tuple(params[key].shape)}")
        plan[key] = (file, params[key].shape)
    if ignored:
        warnings.warn(f"{path}: config.json says ttt_mode={cfg.extra['ttt_mode']!r}, so its "
                      f"{len(ignored)} TTT weights (e.g. {ignored[0]}) are ignored and the model "
                      f"is the plain base model, as the official code reads it", stacklevel=3)
    return plan


def _fill_missing(model: Transformer, path: Path, loaded: set, init_missing_ttt, device, dtype):
    """Refuse parameters the files lack; with init_missing_ttt, TTT ones start as init_ttt_params
    sets them (conv 0: the model computes exactly the base model), or as the function given sets
    every TTT parameter."""
    params = dict(model.named_parameters())
    missing = [k for k in params if k not in loaded]
    new_ttt = [k for k in missing if is_ttt_param(k)] if init_missing_ttt else []
    missing = [k for k in missing if k not in new_ttt]  # only TTT ones, never a base weight
    if missing:
        raise KeyError(f"{path}: missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                       f"({len(missing)} in all)")
    for key in new_ttt:  # real memory, which init_ttt_params fills
        _set_param(model, key, torch.empty(params[key].shape, device=device, dtype=dtype))
    if callable(init_missing_ttt):  # a start of the caller's: every TTT parameter, once
        init_missing_ttt(model)
    elif new_ttt:
        init_ttt_params(model)


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
    for key in NOT_OFFICIAL:  # ours to read; the release's code would compute the paper's update
        if key in hf_config:
            warnings.warn(f"{out_dir}: config.json sets {key}={hf_config[key]!r}, which the "
                          f"official In-Place TTT classes ignore (they compute the update "
                          f"without it)", stacklevel=2)
    out = Path(out_dir)
    check_export_target(out, overwrite, protect)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(out.parent)  # a killed export's temporary directory, of any target here
    # Beside the target (the same filesystem, so the rename is atomic), swapped in when complete.
    with written_aside(out) as tmp:
        tmp.mkdir()
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


def load_train_checkpoint(ckpt_dir) -> tuple[Transformer, dict]:
    """The fp32 CPU model of a train.py checkpoint, in one process whatever the world size that
    wrote it (DCP reshards on load), and its train.json."""
    import torch.distributed.checkpoint as dcp

    meta = read_train_meta(ckpt_dir)
    with torch.device("meta"):  # asdict(cfg) as train.py wrote it: the fields are the keywords
        model = Transformer(ModelConfig(**saved_config(meta, ckpt_dir)))
    fits_files(model, ckpt_dir)  # before to_empty allocates the weights train.json describes
    model.to_empty(device="cpu")  # new tensors per module: to_empty unties lm_head and embedding,
    if model.config.tie_word_embeddings:  # so tie them again (the checkpoint holds one tensor)
        model.lm_head.weight = model.model.embed_tokens.weight
    with warnings.catch_warnings():  # DCP warns that it reads in one process, which is the point
        warnings.simplefilter("ignore", UserWarning)
        try:  # only the "model" entry: the optimizer state is as large again and not needed here
            dcp_load({"model": model.state_dict()}, ckpt_dir, no_dist=True)
        except dcp.api.CheckpointException as e:  # e.g. train.json edited to another shape
            why = str(e).strip().splitlines()[-1]
            raise ValueError(f"{ckpt_dir}: its shards do not fit the model its {TRAIN_META} "
                             f"describes ({why})") from None
    return model, meta


def saved_config(meta: dict, ckpt_dir) -> dict:
    """The ModelConfig fields of a train.json (checkpoint.saved_fields), ValueError naming the
    file for a combination ModelConfig refuses (e.g. heads that do not group)."""
    config = saved_fields(meta)
    try:
        ModelConfig(**config)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{Path(ckpt_dir) / TRAIN_META}: its config is refused: {e}") from None
    return config


def fits_files(model: Transformer, ckpt_dir):
    """ValueError naming train.json when the model it describes (built on the meta device: no
    memory) holds more weights than the checkpoint's files could: nothing that large is
    allocated. Counted in one byte per weight, below any dtype a checkpoint stores."""
    weights = sum(p.numel() for p in model.parameters())
    on_disk = sum(p.stat().st_size for p in Path(ckpt_dir).iterdir() if p.is_file())
    if weights > on_disk:
        raise ValueError(f"{Path(ckpt_dir) / TRAIN_META}: its config describes a model of "
                         f"{weights:,} weights, more than the {on_disk:,} bytes of the "
                         f"checkpoint's files hold: refused (damaged, or edited?)")


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
# The command line


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
