"""What the command-line scripts share: help that shows defaults, checked numbers, the device and
dtype defaults, the values of --dtype, --rope-scaling and --ttt-layers, and where a checkpoint
named on the command line lives (a local directory, or a Hugging Face hub id fetched on first use).

    from cli import AtLeast, HelpFormatter, parse_dtype, resolve
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--steps", type=int, action=AtLeast, low=1, default=400)
    p.add_argument("--dtype", type=parse_dtype, help="bf16, fp16 or fp32")

A leaf: it imports torch and the standard library only, so data.py and every script may use it.
"""

import argparse
import json
import math
from pathlib import Path

import torch

# What a hub download fetches: config, weights and tokenizer, never other repo files (GGUF, ONNX).
HUB_FILES = ["config.json", "generation_config.json", "*.safetensors",
             "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
             "tokenizer.model", "special_tokens_map.json"]


# -----------------------------------------------------------------------------
# Help and numbers


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
    is one line naming flag and value, "error: --steps 0: must be >= 1", without the usage block
    (which says nothing about a value)."""

    def __init__(self, *args, low=1, strict=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.low, self.strict = low, strict

    def __call__(self, parser, namespace, value, option_string=None):
        above = self.low < value if self.strict else self.low <= value  # NaN fails both
        if not (above and value < math.inf):
            finite = "a finite number " if isinstance(value, float) else ""
            parser.exit(2, f"{parser.prog}: error: {option_string} {value}: must be {finite}"
                           f"{'>' if self.strict else '>='} {self.low}\n")
        setattr(namespace, self.dest, value)


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


# -----------------------------------------------------------------------------
# Device and dtype


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


# -----------------------------------------------------------------------------
# RoPE scaling


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


# -----------------------------------------------------------------------------
# Where a checkpoint named on the command line lives


def looks_local(src) -> bool:
    """Whether `src` can only be a local path: it starts with ".", "/" or "~", has other than one
    "/" (a hub id is owner/name), or its first part exists here (out/run: there is an out/)."""
    text = str(src)
    return (text.startswith((".", "/", "~")) or text.count("/") != 1
            or Path(text.split("/")[0]).exists())


def resolve(src) -> Path:
    """A local directory as is; otherwise a hub id, fetched (config, safetensors, tokenizer files
    only) or taken from the hub cache. A path that looks local (looks_local) and is not there is
    an error at once: a typo must not turn into a slow, confusing hub request."""
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"{src} is a file; expected a checkpoint directory or a hub id "
                                 f"like Qwen/Qwen3-0.6B")
    if looks_local(src):
        raise FileNotFoundError(f"no checkpoint directory at {src} (and it is not a hub id like "
                                f"Qwen/Qwen3-0.6B)")
    from huggingface_hub import snapshot_download  # only when the hub is needed at all
    try:
        return Path(snapshot_download(str(src), allow_patterns=HUB_FILES))
    except Exception as e:  # offline, unknown repo, gated repo: all end here with the hub's reason
        raise FileNotFoundError(f"could not get {src} from the Hugging Face hub and it is not "
                                f"cached locally ({type(e).__name__}: {e}). Pass a local "
                                f"directory instead.") from None
