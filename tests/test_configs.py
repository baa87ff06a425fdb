"""config.json as others write it: the official release's configuration classes (training and inference, Qwen3 and
LLaMA-3), its recipe yaml, and published checkpoints. The rule: a validation never refuses a config that the
official code or transformers writes. transformers reads the same files as the oracle."""

import json
import warnings

import pytest
import torch
from conftest import LLAMA, QWEN3, make_hf, rewrite_weights

from load_hf import load_config, load_model, save_model
from model import Transformer

# What the official configuration classes write with their defaults (hf_models/*: training, ttt_mode true;
# inference_model/*: ttt_mode false), in the layout of the transformers they pin (4.57: rope_theta and
# rope_scaling; no "architectures", which only a model's save adds).
OFFICIAL_TTT = {"ttt_layers": [0, 6, 12, 18, 24, 30], "ttt_proj": True, "ttt_lr": 0.3, "ttt_chunk": 8192,
                "ttt_target": "hidden_states"}
OFFICIAL_QWEN3 = {
    "attention_bias": False, "attention_dropout": 0.0, "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 22016, "layer_types": ["full_attention"] * 32,
    "max_position_embeddings": 32768, "max_window_layers": 28, "model_type": "qwen3", "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-06, "rope_scaling": None,
    "rope_theta": 10000.0, "sliding_window": None, "tie_word_embeddings": False, "transformers_version": "4.57.3",
    "use_cache": True, "use_sliding_window": False, "vocab_size": 151936, **OFFICIAL_TTT}
OFFICIAL_LLAMA = {
    "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 11008,
    "max_position_embeddings": 2048, "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 32, "pad_token_id": None, "pretraining_tp": 1,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "transformers_version": "4.57.3", "use_cache": True, "vocab_size": 32000, **OFFICIAL_TTT}

# Published checkpoints' config.json (shapes as on the hub).
QWEN3_4B_BASE = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151643, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2560, "initializer_range": 0.02,
    "intermediate_size": 9728, "max_position_embeddings": 32768, "max_window_layers": 36, "model_type": "qwen3",
    "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 151936}
LLAMA31_8B_INSTRUCT = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.42.3", "use_cache": True, "vocab_size": 128256}
SMOLLM2_135M = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 0,
    "eos_token_id": 0, "hidden_act": "silu", "hidden_size": 576, "initializer_range": 0.041666666666666664,
    "intermediate_size": 1536, "is_llama_config": True, "max_position_embeddings": 8192, "model_type": "llama",
    "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_interleaved": False, "rope_scaling": None, "rope_theta": 100000,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.40.1", "use_cache": True,
    "vocab_size": 49152}
QWEN3_YARN = {**QWEN3_4B_BASE, "max_position_embeddings": 131072,
              "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}
# transformers 5 writes theta and scaling together in rope_parameters, and "dtype" for "torch_dtype".
QWEN3_V5 = {**{k: v for k, v in QWEN3_4B_BASE.items() if k not in ("rope_scaling", "rope_theta", "torch_dtype")},
            "dtype": "bfloat16", "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
            "transformers_version": "5.0.0"}
PUBLISHED = {"qwen3-4b-base": QWEN3_4B_BASE, "llama-3.1-8b-instruct": LLAMA31_8B_INSTRUCT,
             "smollm2-135m": SMOLLM2_135M, "qwen3-yarn": QWEN3_YARN, "qwen3-transformers5": QWEN3_V5}


def write_config(path, hf):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf, indent=2))
    return path


def transformers_rope(path):
    """inv_freq and attention scaling as transformers computes them for the config.json in path."""
    import transformers
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding
    hf = transformers.AutoConfig.from_pretrained(path)
    rope = {"qwen3": Qwen3RotaryEmbedding, "llama": LlamaRotaryEmbedding}[hf.model_type](hf)
    return hf, rope.inv_freq, rope.attention_scaling


def assert_reads_as_transformers(path):
    from model import rope_inv_freq
    cfg = load_config(path)
    hf, inv_freq, scale = transformers_rope(path)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == (
        hf.hidden_size, hf.intermediate_size, hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads)
    assert cfg.head_dim == getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    assert cfg.tie_word_embeddings == hf.tie_word_embeddings and cfg.eos_token_id == hf.eos_token_id
    ours, our_scale = rope_inv_freq(cfg)
    torch.testing.assert_close(ours, inv_freq, rtol=1e-6, atol=0)
    assert our_scale == pytest.approx(scale)
    return cfg


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_configs_load_as_transformers_reads_them(tmp_path, name):
    assert_reads_as_transformers(write_config(tmp_path / name, PUBLISHED[name]))


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
@pytest.mark.parametrize("layout", ["transformers4", "transformers5"])
def test_official_training_class_config_loads_with_ttt(tmp_path, arch, layout):
    hf = {"qwen3": OFFICIAL_QWEN3, "llama": OFFICIAL_LLAMA}[arch] | {"ttt_mode": True}
    if layout == "transformers5":
        hf = {k: v for k, v in hf.items() if k != "rope_scaling"} | {
            "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}}
    cfg = assert_reads_as_transformers(write_config(tmp_path / "c", hf))
    assert (cfg.ttt_layers, cfg.ttt_chunk, cfg.ttt_lr, cfg.ttt_proj, cfg.ttt_target) == (
        (0, 6, 12, 18, 24, 30), 8192, 0.3, True, "hidden_states")
    with torch.device("meta"):
        model = Transformer(cfg)
    assert model.ttt_layers == (0, 6, 12, 18, 24, 30)


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_official_inference_class_config_loads_as_a_plain_model(tmp_path, arch):
    hf = {"qwen3": OFFICIAL_QWEN3, "llama": OFFICIAL_LLAMA}[arch] | {"ttt_mode": False}
    cfg = assert_reads_as_transformers(write_config(tmp_path / "c", hf))
    assert cfg.ttt_layers == ()
    with torch.device("meta"):
        model = Transformer(cfg)
    assert not [n for n, _ in model.named_parameters() if ".mlp.ttt_" in n]


def test_recipe_yaml_on_qwen3_4b_base_loads_and_ignores_layer_36(tmp_path):
    # configs/pretrain/qwen3_longct.yaml's foundation keys on the base model's config (ttt_lr an integer in YAML)
    hf = QWEN3_4B_BASE | {"ttt_layers": [0, 6, 12, 18, 24, 30, 36], "ttt_mode": True, "ttt_proj": True,
                          "ttt_lr": 3, "ttt_chunk": 4096}
    cfg = assert_reads_as_transformers(write_config(tmp_path / "c", hf))
    with torch.device("meta"), pytest.warns(UserWarning, match=r"\[36\] are outside 0..35"):
        model = Transformer(cfg)
    assert model.ttt_layers == (0, 6, 12, 18, 24, 30) and cfg.ttt_lr == 3 and cfg.ttt_chunk == 4096


def official_tiny(tmp_path, arch, ttt_mode, ttt_weights):
    """A tiny random transformers model saved with the official TTT keys in its config.json (ttt_mode as given,
    layers 0 and 2 listed), optionally with TTT weights in its safetensors (a trained model read by the inference
    classes). transformers ignores the TTT keys and weights: its logits are the base model's."""
    base = {"qwen3": QWEN3, "llama": LLAMA}[arch]
    path, _ = make_hf(tmp_path / "ck", arch, **{**OFFICIAL_TTT, "ttt_layers": [0, 2], "ttt_chunk": 8})
    cfg = json.loads((path / "config.json").read_text()) | {"ttt_mode": ttt_mode}
    (path / "config.json").write_text(json.dumps(cfg))
    if ttt_weights:
        D = base["hidden_size"]
        extra = {f"model.layers.{i}.mlp.ttt_{k}.weight": torch.randn(*shape)
                 for i in (0, 2) for k, shape in (("conv", (D, 1, 5)), ("proj", (D, D)))}
        rewrite_weights(path, lambda state: {**state, **extra})
    return path


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
@pytest.mark.parametrize("ttt_weights", [False, True], ids=["no-ttt-weights", "ttt-weights-in-files"])
def test_ttt_mode_false_gives_transformers_logits(tmp_path, arch, ttt_weights):
    from conftest import load_hf_reference
    path = official_tiny(tmp_path, arch, False, ttt_weights)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_model(path)
    assert any("ttt_mode=False" in str(w.message) for w in caught) == ttt_weights
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers names the TTT weights it drops
        hf = load_hf_reference(path)
    idx = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()


def test_ttt_mode_true_with_ttt_weights_builds_the_ttt_layers(tmp_path):
    path = official_tiny(tmp_path, "qwen3", True, True)
    model = load_model(path)
    assert model.ttt_layers == (0, 2) and model.config.ttt_chunk == 8
    assert model.model.layers[2].mlp.ttt_proj.weight.abs().sum() > 0  # read from the files, not initialised


def test_export_writes_ttt_mode_true_and_a_plain_model_keeps_the_official_keys(tmp_path):
    ttt = load_model(official_tiny(tmp_path / "a", "qwen3", True, True))
    save_model(ttt, tmp_path / "ttt-out")
    written = json.loads((tmp_path / "ttt-out" / "config.json").read_text())
    assert written["ttt_mode"] is True and written["ttt_layers"] == [0, 2]
    assert load_config(tmp_path / "ttt-out") == ttt.config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = load_model(official_tiny(tmp_path / "b", "qwen3", False, True))
    save_model(plain, tmp_path / "plain-out")
    written = json.loads((tmp_path / "plain-out" / "config.json").read_text())
    assert written["ttt_mode"] is False and written["ttt_layers"] == [0, 2]  # read back by the official code
    assert load_config(tmp_path / "plain-out").ttt_layers == ()


def test_our_older_exports_with_a_string_ttt_mode_still_load(tmp_path):
    path = official_tiny(tmp_path, "llama", "in_place", True)
    assert load_model(path).ttt_layers == (0, 2)


def test_truncated_safetensors_index_names_the_file(tmp_path):
    path, hf = make_hf(tmp_path / "ck", "qwen3")
    save_model(load_model(path), tmp_path / "sharded", max_shard_bytes=40_000)
    index = tmp_path / "sharded" / "model.safetensors.index.json"
    index.write_text(index.read_text()[:40])
    with pytest.raises(ValueError, match="model.safetensors.index.json is damaged"):
        load_model(tmp_path / "sharded")
