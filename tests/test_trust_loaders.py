"""Readers of files someone else wrote (config.json, the safetensors index, tokenizer.json, the token cache and its
sidecar, .npz, ruler's predictions): each admits what ours writes and refuses the rest in one line naming the file,
the entry and the value. The oracle for what is admitted: transformers and tokenizers reading the same files."""

import json
import math
import re
import shutil

import pytest
import torch
from conftest import make_hf

import load_hf
from load_hf import load_config, load_model, save_model

# ---- config.json


def write_config(path, hf):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf))
    return path


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    path, _ = make_hf(tmp_path_factory.mktemp("qwen3"), "qwen3")
    return path


def config_of(path):
    return json.loads((path / "config.json").read_text())


@pytest.mark.parametrize("value", [[1, 2], "qwen3", 7, None], ids=["list", "string", "number", "null"])
def test_config_json_that_is_not_an_object_is_named(tmp_path, value):
    write_config(tmp_path, value)
    with pytest.raises(ValueError, match=f"{tmp_path / 'config.json'} holds a JSON .*, not an object"):
        load_config(tmp_path)


ROPE_EDITS = {
    "llama3-low-inf": ("rope_scaling", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": math.inf,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                       "low_freq_factor=inf"),
    "yarn-factor-negative": ("rope_scaling", {"rope_type": "yarn", "factor": -2.0,
                                              "original_max_position_embeddings": 64}, "factor=-2.0"),
    "v5-theta-zero": ("rope_parameters", {"rope_type": "default", "rope_theta": 0}, "rope_theta=0"),
    "v5-beta-nan": ("rope_parameters", {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4, "beta_fast": math.nan,
                                        "original_max_position_embeddings": 64}, "beta_fast=nan"),
    "original-max-zero": ("rope_scaling", {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 0},
                          "original_max_position_embeddings=0"),
    "attention-factor-string": ("rope_scaling", {"rope_type": "yarn", "factor": 2.0, "attention_factor": "1",
                                                 "original_max_position_embeddings": 64}, "attention_factor='1'"),
    "not-an-object": ("rope_scaling", [4.0, "yarn"], r"rope_scaling=\[4.0, 'yarn'\] is not allowed"),
}


@pytest.mark.parametrize("edit", ROPE_EDITS, ids=list(ROPE_EDITS))
def test_a_rope_parameter_that_is_not_positive_and_finite_is_refused_naming_file_key_and_value(
        edit, qwen3_dir, tmp_path):
    key, rope, message = ROPE_EDITS[edit]
    hf = {k: v for k, v in config_of(qwen3_dir).items() if k not in ("rope_scaling", "rope_parameters")}
    write_config(tmp_path, {**hf, key: rope})  # json.dumps writes NaN / Infinity, as Python's json reads them
    with pytest.raises(ValueError, match=f"{tmp_path / 'config.json'}.*{message}"):
        load_config(tmp_path)


@pytest.mark.parametrize("rope", [
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "beta_fast": None,
     "attention_factor": None, "truncate": False},
    {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 128, "beta_fast": 16.0, "beta_slow": 2.0},
    {"type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64}], ids=["yarn-nulls", "yarn-betas", "llama3-old-type-key"])
def test_rope_parameters_transformers_accepts_read_as_transformers_reads_them(rope, qwen3_dir, tmp_path):
    import transformers
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    from model import rope_inv_freq
    hf = {k: v for k, v in config_of(qwen3_dir).items() if k not in ("rope_scaling", "rope_parameters")}
    write_config(tmp_path, {**hf, "rope_theta": 10000.0, "rope_scaling": rope})
    ref = Qwen3RotaryEmbedding(transformers.AutoConfig.from_pretrained(tmp_path))
    inv_freq, scale = rope_inv_freq(load_config(tmp_path))
    torch.testing.assert_close(inv_freq, ref.inv_freq, rtol=1e-6, atol=0)
    assert scale == pytest.approx(ref.attention_scaling)


@pytest.mark.parametrize("edit,message", [
    ({"architectures": {"Qwen3ForCausalLM": 1}}, "architecture .* is not supported"),
    ({"use_sliding_window": True, "sliding_window": 32, "layer_types": [{"a": 1}] * 3}, "layer_types="),
    ({"use_sliding_window": True, "sliding_window": 32, "max_window_layers": "2"}, "max_window_layers='2'"),
    ({"": 1, "head_dim": "32"}, "head_dim='32'"),
], ids=["architectures-object", "layer-types-objects", "max-window-layers-string", "empty-key"])
def test_mistyped_config_fields_are_named(edit, message, qwen3_dir, tmp_path):
    write_config(tmp_path, {**config_of(qwen3_dir), **edit})
    with pytest.raises(ValueError, match=f"{tmp_path / 'config.json'}.*{message}"):
        load_config(tmp_path)


def test_one_table_writes_every_field_it_reads(qwen3_dir):
    cfg = load_config(qwen3_dir)
    hf = load_hf.config_to_hf(cfg, torch.float32)
    assert {f.key for f in load_hf.HF_TABLE} <= hf.keys()
    assert load_hf.config_from_hf(hf) == cfg


# ---- the safetensors index


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, qwen3_dir):
    out = tmp_path_factory.mktemp("sharded") / "ck"
    save_model(load_model(qwen3_dir), out, max_shard_bytes=40_000)
    return out


@pytest.fixture
def shards(sharded, tmp_path):
    shutil.copytree(sharded, tmp_path / "ck")
    return tmp_path / "ck"


def edit_index(path, fn):
    index = path / "model.safetensors.index.json"
    spec = json.loads(index.read_text())
    spec["weight_map"] = fn(spec["weight_map"])
    index.write_text(json.dumps(spec))
    return index


@pytest.mark.parametrize("value", [7, None, ["model-00001-of-00004.safetensors"]], ids=["int", "null", "list"])
def test_an_index_value_that_is_not_a_file_name_is_named(shards, value):
    key = "model.layers.2.mlp.up_proj.weight"
    index = edit_index(shards, lambda m: {**m, key: value})
    with pytest.raises(ValueError, match=re.escape(f"{index}: weight_map[{key!r}]={value!r} is not allowed")):
        load_model(shards)


def test_an_index_entry_outside_the_model_directory_is_refused(shards, tmp_path):
    key = "model.norm.weight"
    name = json.loads((shards / "model.safetensors.index.json").read_text())["weight_map"][key]
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(shards / name, outside / name)
    original = (shards / "model.safetensors.index.json").read_text()
    for value in [f"../elsewhere/{name}", str(outside / name)]:
        (shards / "model.safetensors.index.json").write_text(original)
        index = edit_index(shards, lambda m: {**m, **{k: value for k, v in m.items() if v == name}})
        with pytest.raises(ValueError, match=f"{index} names '{value}', which lies outside {shards}"):
            load_model(shards)
    (shards / "model.safetensors.index.json").write_text(original)
    (shards / name).unlink()
    (shards / name).symlink_to(outside / name)  # a link out of the directory
    with pytest.raises(ValueError, match=f"names '{name}', which lies outside"):
        load_model(shards)


def test_hub_cache_links_from_a_snapshot_into_its_blobs_still_load(sharded, tmp_path):
    repo = tmp_path / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(sharded.iterdir())):
        shutil.copy(f, repo / "blobs" / f"sha{i}")
        (snap / f.name).symlink_to(f"../../blobs/sha{i}")
    ref = load_model(sharded)
    got = load_model(snap)
    for (k, a), (_, b) in zip(ref.state_dict().items(), got.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


def test_a_tensor_in_two_shards_is_refused_naming_both_files(shards):
    from safetensors.torch import load_file, save_file
    weight_map = json.loads((shards / "model.safetensors.index.json").read_text())["weight_map"]
    key = "model.layers.1.self_attn.k_proj.weight"
    home = weight_map[key]
    other = next(v for v in sorted(set(weight_map.values())) if v != home)
    state = load_file(str(shards / other))
    state[key] = torch.zeros(load_file(str(shards / home))[key].shape)
    save_file(state, str(shards / other), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"{key}.*{other}|{other}.*{key}") as e:
        load_model(shards)
    assert home in str(e.value)


def test_a_tensor_the_index_names_but_its_file_lacks_is_named(shards):
    from safetensors.torch import load_file, save_file
    weight_map = json.loads((shards / "model.safetensors.index.json").read_text())["weight_map"]
    key = "model.layers.0.mlp.gate_proj.weight"
    state = load_file(str(shards / weight_map[key]))
    state.pop(key)
    save_file(state, str(shards / weight_map[key]), metadata={"format": "pt"})
    index = shards / "model.safetensors.index.json"
    with pytest.raises(ValueError, match=rf"{index}: weight_map\['{key}'\]='{weight_map[key]}', but .* has no tensor"):
        load_model(shards)


def test_a_shape_that_does_not_fit_the_config_is_refused_before_any_tensor_is_read(qwen3_dir, tmp_path, monkeypatch):
    shutil.copytree(qwen3_dir, tmp_path / "ck")
    hf = config_of(qwen3_dir)
    write_config(tmp_path / "ck", {**hf, "vocab_size": 1 << 40})  # 2**40 x 64 fp32: 256 TB if allocated
    monkeypatch.setattr(load_hf, "_read_tensor", lambda *a: pytest.fail("a tensor was read"))
    expects = r"shape mismatch for .*file has \(256, 64\), model expects \(1099511627776, 64\)"
    with pytest.raises(ValueError, match=expects):
        load_model(tmp_path / "ck")
