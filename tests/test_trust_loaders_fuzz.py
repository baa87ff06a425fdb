"""Fuzzing the readers of files someone else wrote: random JSON and mutations of real files. Each reader returns
what ours would, or raises our named error (a ValueError, or the KeyError / FileNotFoundError load_model names keys
and files with), never another exception and never a hang."""

import contextlib
import functools
import json
import signal
from pathlib import Path

import pytest
from conftest import CORPUS, make_hf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_configs import OFFICIAL_LLAMA, OFFICIAL_QWEN3, PUBLISHED

import data
import ruler
from load_hf import config_from_hf, config_to_hf, load_model, save_model
from model import ModelConfig
from tokenizer import Tokenizer, TokenizerError, byte_tokenizer_json

FUZZ = settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                      HealthCheck.too_slow])
SCALARS = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12)
           | st.sampled_from(["", "..", "/", "NaN", "yarn", "llama3", "Qwen3ForCausalLM", "ByteLevel", "Split"]))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                                         max_size=4), max_leaves=10)


@st.composite
def mutated(draw, value, depth=0):
    """value with one place in it replaced by random JSON, deleted, or left (recursing into dicts and lists)."""
    if not isinstance(value, (dict, list)) or not value or depth > 4:
        return draw(JSON)
    keys = list(value) if isinstance(value, dict) else list(range(len(value)))
    key = draw(st.sampled_from(keys))
    copy = dict(value) if isinstance(value, dict) else list(value)
    action = draw(st.sampled_from(["descend", "descend", "replace", "delete"]))
    if action == "delete":
        del copy[key]
    else:
        copy[key] = draw(mutated(value[key], depth + 1)) if action == "descend" else draw(JSON)
    return copy


@contextlib.contextmanager
def no_hang(seconds=20):
    def fail(*_):
        raise AssertionError(f"no answer within {seconds} s")
    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def ours(error):
    """A named error of ours: the expected types, with a message."""
    return isinstance(error, (ValueError, KeyError, FileNotFoundError)) and str(error).strip() != ""


REAL_CONFIGS = [*PUBLISHED.values(), OFFICIAL_QWEN3 | {"ttt_mode": True}, OFFICIAL_LLAMA | {"ttt_mode": False}]


@FUZZ
@given(st.one_of(JSON, st.sampled_from(REAL_CONFIGS).flatmap(mutated)))
def test_config_json_fuzz(hf):
    with no_hang():
        try:
            cfg = config_from_hf(hf, where="fuzz/config.json")
        except Exception as e:
            assert ours(e) and isinstance(e, ValueError) and "fuzz/config.json" in str(e), repr(e)
            return
        assert isinstance(cfg, ModelConfig)
        try:
            again = config_from_hf(config_to_hf(cfg, __import__("torch").float32))
        except ValueError as e:  # a config HF cannot express (qk_norm, a llama window) is named on export
            assert "cannot be exported" in str(e)
        else:
            assert again == cfg


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    path, _ = make_hf(tmp_path_factory.mktemp("ck"), "qwen3")
    out = tmp_path_factory.mktemp("sharded") / "ck"
    save_model(load_model(path), out, max_shard_bytes=60_000)
    return out


@functools.cache
def reference(path):
    return load_model(path).state_dict()


@FUZZ
@given(st.data())
def test_safetensors_index_fuzz(sharded, data):
    index = sharded / "model.safetensors.index.json"
    original = index.read_text()
    spec = json.loads(original)
    names = sorted(set(spec["weight_map"].values()))
    place = st.sampled_from([*names, f"../{names[0]}", str(sharded / names[0]), "", ".", "config.json", "x/../y"])
    weight_map = data.draw(st.one_of(mutated(spec["weight_map"]), st.dictionaries(
        st.sampled_from(sorted(spec["weight_map"])), place | JSON, max_size=6).map(lambda d: spec["weight_map"] | d)))
    top = data.draw(st.sampled_from(["keep", "replace"]))
    try:
        index.write_text(json.dumps(spec | {"weight_map": weight_map} if top == "keep" else data.draw(JSON)))
        with no_hang():
            model = load_model(sharded)
        for key, value in model.state_dict().items():  # what ours wrote, or a refusal
            assert value.equal(reference(sharded)[key]), key
    except Exception as e:
        assert ours(e), repr(e)
    finally:
        index.write_text(original)


def small_spec():
    spec = byte_tokenizer_json()
    spec["model"]["vocab"] |= {"Ġt": 300, "he": 301, "Ġthe": 302}
    spec["model"]["merges"] = [["Ġ", "t"], ["h", "e"], ["Ġt", "he"]]
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r" ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+"}, "behavior": "Isolated",
         "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}
    return spec


@FUZZ
@given(st.builds(small_spec).flatmap(mutated))
def test_tokenizer_json_fuzz(tmp_path, spec):
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec, ensure_ascii=False))
    with no_hang():
        try:
            tok = Tokenizer.from_tokenizer_json(path)
        except Exception as e:
            assert isinstance(e, ValueError) and str(path) in str(e), repr(e)
            return
        try:
            ids = tok.encode(" the then, 42!<|endoftext|> ünï", allow_special=True)
        except TokenizerError as e:
            assert str(path) in str(e)
            return
        assert all(isinstance(i, int) for i in ids) and isinstance(tok.decode(ids), str)


PIECES = [r"\p{L}+", r"\p{N}", r"[a-m]+", r" ?\p{Lu}", r"\s+", r"[.,!]+", "x", r"\p{N}{2}", r"'s", r"[^\s]"]


@FUZZ
@given(st.lists(st.sampled_from(PIECES), min_size=1, max_size=3, unique=True).map("|".join),
       st.lists(st.text(alphabet="abcxyzXYZ 019.,!'\néü", max_size=30), min_size=1, max_size=4))
def test_split_patterns_split_as_tokenizers_does(tmp_path, pattern, texts):
    import tokenizers
    spec = small_spec()
    spec["pre_tokenizer"]["pretokenizers"][0]["pattern"] = {"Regex": pattern}
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec, ensure_ascii=False))
    ours, hf = Tokenizer.from_tokenizer_json(path), tokenizers.Tokenizer.from_file(str(path))
    for text in texts:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False).ids, (pattern, text)


@FUZZ
@given(st.sampled_from(["", None, 0, [], {}]), st.sampled_from(["content", "special"]))
def test_added_token_fields_fuzz(tmp_path, value, field):
    spec = small_spec()
    spec["added_tokens"][0][field] = value
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec))
    with no_hang(), pytest.raises(ValueError, match=f"{path} is not a tokenizer.json this module reads: added_tokens"):
        Tokenizer.from_tokenizer_json(path)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, byte_tokenizer):
    cache = tmp_path_factory.mktemp("cache")
    fresh = data.token_cache(CORPUS[:1], Path(byte_tokenizer), 256, cache, rank=0).tolist()
    return cache, fresh


@FUZZ
@given(st.one_of(JSON.map(lambda v: json.dumps(v).encode()), st.binary(max_size=40)))
def test_token_cache_sidecar_fuzz(cache_dir, byte_tokenizer, sidecar):
    cache, fresh = cache_dir
    record = next(cache.glob("*.json"))
    record.write_bytes(sidecar)
    with no_hang():
        stream = data.read_stream(CORPUS[:1], 64, Path(byte_tokenizer), 256, cache, 0)
    assert stream.tokens.tolist() == fresh
    assert set(stream.files) == {str(Path(CORPUS[0]).resolve())}


PREDICTION = {"settings": "s", "mode": "ttt", "task": "vt", "length": 1024, "index": 0, "id": "ab", "budget": 30,
              "pred": "X", "refs": ["X"]}


@FUZZ
@given(st.lists(st.one_of(st.text(max_size=30), JSON.map(json.dumps), mutated(PREDICTION).map(json.dumps)),
                max_size=6))
def test_ruler_predictions_fuzz(tmp_path, lines):
    path = tmp_path / "predictions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with no_hang():
        records = ruler.read_predictions(path)
    for r in records:
        assert isinstance(r, dict)
        if "settings" in r:  # reusable: every field evaluate reads has its type
            assert all(ok(r.get(k)) for k, (ok, _) in ruler.PREDICTION_FIELDS.items())
            ruler.METRICS["all"]([r["pred"]], [r["refs"]])
        hash(ruler.record_key(r))  # evaluate keys a dict by it
