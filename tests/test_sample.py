import json
import os
import shutil
from dataclasses import replace

import pytest
import torch
from conftest import load_hf_reference, rewrite_weights

import sample
from load_hf import load_config, load_model, load_tokenizer, save_model
from model import PRESETS, Transformer
from sample import generate, sample_next


def tiny_model(chunk=4, vocab=300, seed=0, **overrides):
    """Untied, std 0.1, TTT parameters N(0, 0.5^2): greedy text varies and the fast-weight updates
    change it."""
    cfg = replace(PRESETS["tiny"], vocab_size=vocab, ttt_chunk=chunk, tie_word_embeddings=False,
                  **overrides)
    g = torch.Generator().manual_seed(seed)
    model = Transformer(cfg)
    model.init_weights(std=0.1, generator=g)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mlp.ttt_" in name:
                p.normal_(0.0, 0.5, generator=g)
    return model.eval()


def random_prompt(n, seed, vocab=300):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def model64():
    return tiny_model().double()


# ---- generate: exactness against the full forward, batching, stopping, sampling


@pytest.mark.parametrize("prefill_chunk", [4, 3, None],
                         ids=["chunk-C", "chunk-3-unaligned", "default"])
def test_greedy_tokens_are_argmax_of_full_forward(model64, prefill_chunk):
    prompt = random_prompt(13, seed=1)  # C = 4: three chunks complete in the prompt, more later
    out = generate(model64, [prompt], 14, prefill_chunk=prefill_chunk)[0]
    assert len(out) == 14
    seq = prompt + out
    with torch.no_grad():
        ref = [int(model64(torch.tensor([seq[:13 + i]]))[0, -1].argmax()) for i in range(14)]
    assert out == ref


def test_ttt_updates_change_the_greedy_text(model64):
    prompt = random_prompt(13, seed=1)
    with_ttt = generate(model64, [prompt], 14)[0]
    model64.ttt_enabled = False
    try:
        without = generate(model64, [prompt], 14)[0]
    finally:
        model64.ttt_enabled = True
    assert with_ttt != without


def test_batch_of_different_lengths_equals_each_alone(model64):
    prompts = [random_prompt(n, seed=n) for n in (9, 1, 14, 3)]
    alone = [generate(model64, [p], 12)[0] for p in prompts]
    assert generate(model64, prompts, 12) == alone


def test_equal_lengths_are_prefilled_together_and_equal_each_alone(model64):
    prompts = [random_prompt(10, seed=s) for s in (5, 6)]
    assert generate(model64, prompts, 9) == [generate(model64, [p], 9)[0] for p in prompts]


def test_rows_stop_at_their_own_eos(model64):
    prompts = [random_prompt(n, seed=n) for n in (9, 14, 3)]
    full = generate(model64, prompts, 12)
    eos = full[0][5]
    out = generate(model64, prompts, 12, eos_ids={eos, 299})
    for row, ref in zip(out, full):
        assert row == (ref[:ref.index(eos)] if eos in ref else ref)
    assert len(out[0]) <= 5


def test_on_token_streams_every_token_in_order(model64):
    prompts = [random_prompt(n, seed=n) for n in (9, 4)]
    seen = []
    out = generate(model64, prompts, 6, on_token=lambda row, tok: seen.append((row, tok)))
    assert [[t for r, t in seen if r == row] for row in range(2)] == out


def test_top_k_1_equals_greedy(model64):
    prompt = random_prompt(11, seed=3)
    greedy = generate(model64, [prompt], 10)
    assert generate(model64, [prompt], 10, temperature=1.0, top_k=1, seed=0) == greedy


def test_tiny_top_p_equals_greedy(model64):
    prompt = random_prompt(11, seed=3)
    greedy = generate(model64, [prompt], 10)
    assert generate(model64, [prompt], 10, temperature=1.0, top_p=1e-9, seed=0) == greedy


@pytest.mark.parametrize("kw", [dict(), dict(top_k=20), dict(top_p=0.9)],
                         ids=["plain", "top-k", "top-p"])
def test_sampling_is_reproducible_with_a_seed(model64, kw):
    prompt = random_prompt(11, seed=3)
    runs = [generate(model64, [prompt], 16, temperature=1.5, seed=s, **kw)[0] for s in (7, 7, 8)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


@pytest.mark.parametrize("kw, allowed", [(dict(top_k=3), {0, 1, 2}), (dict(top_p=0.75), {0, 1}),
                                         (dict(top_k=3, top_p=0.9), {0, 1, 2})],
                         ids=["top-k", "top-p", "both"])
def test_sample_next_draws_only_allowed_tokens(kw, allowed):
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(4000, 4)
    draws = sample_next(logits, temperature=1.0, generator=torch.Generator().manual_seed(0), **kw)
    assert set(draws.tolist()) == allowed


# ---- the command line on a tiny checkpoint with SmolLM2's tokenizer


@pytest.fixture(scope="module")
def tiny_ckpt(smollm2_dir, tmp_path_factory):
    """A train.py-style output directory: run/hf holds the HF export (TTT in layers 1 and 3,
    C = 4, 64 positions)."""
    model = tiny_model(vocab=49152, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
    run = tmp_path_factory.mktemp("run")
    save_model(model, run / "hf", tokenizer_src=smollm2_dir)
    return run


@pytest.fixture(scope="module")
def weightless(tiny_ckpt, tmp_path_factory):
    """Config and tokenizer without weights: an input error reported from here was found before
    any loading."""
    path = tmp_path_factory.mktemp("weightless")
    shutil.copytree(tiny_ckpt / "hf", path, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("*.safetensors"))
    return path


def greedy_args(*extra):
    return ["--temperature", "0", "--max-new-tokens", "12", *extra]


def test_no_ttt_equals_a_model_without_ttt_layers(tiny_ckpt, capsys):
    argv = greedy_args("--model", str(tiny_ckpt), "--prompt", "It was a bright cold day in April")
    with_ttt, without = sample.main(argv)[0], sample.main(argv + ["--no-ttt"])[0]
    ttt_model = load_model(tiny_ckpt / "hf")
    base = Transformer(load_config(tiny_ckpt / "hf").with_ttt(layers=()))
    base.load_state_dict({k: v for k, v in ttt_model.state_dict().items() if ".mlp.ttt_" not in k})
    tok = load_tokenizer(tiny_ckpt / "hf")
    prompt = tok.encode("It was a bright cold day in April")
    ref = generate(base.eval(), [prompt], 12, eos_ids=tok.eos_ids)[0]
    assert without == ref and with_ttt != ref
    assert capsys.readouterr().out.endswith(tok.decode(ref) + "\n")


def test_prompts_file_runs_one_batch_equal_to_each_prompt(tiny_ckpt, tmp_path, capsys):
    texts = ["Call me Ishmael.",
             "It is a truth universally acknowledged, that a single man in possession",
             "Happy families"]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    argv = greedy_args("--model", str(tiny_ckpt), "--prompts-file", str(tmp_path / "p.jsonl"),
                       "--no-echo")
    batch = sample.main(argv)
    model, tok = load_model(tiny_ckpt / "hf"), load_tokenizer(tiny_ckpt / "hf")
    assert batch == [generate(model, [tok.encode(t)], 12, eos_ids=tok.eos_ids)[0] for t in texts]
    out = capsys.readouterr().out
    assert all(f"### {n}\n{tok.decode(row)}\n" in out for n, row in enumerate(batch, 1))


def test_no_flags_use_the_train_py_checkpoint(tiny_ckpt, tmp_path, monkeypatch, capsys):
    (tmp_path / "out" / "bytes").mkdir(parents=True)
    os.symlink(tiny_ckpt / "hf", tmp_path / "out" / "bytes" / "hf")
    monkeypatch.chdir(tmp_path)
    out = sample.main(["--max-new-tokens", "5"])
    assert 0 < len(out[0]) <= 5
    assert "prompt tokens" in capsys.readouterr().err


YARN = '{"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64}'


@pytest.mark.parametrize("extra", [["--allow-long"], ["--rope-scaling", YARN]],
                         ids=["allow-long", "yarn"])
def test_long_prompt_runs_when_asked(tiny_ckpt, extra):
    argv = greedy_args("--model", str(tiny_ckpt), "--prompt-tokens", "60", "--ignore-eos", *extra)
    out = sample.main(argv)
    assert len(out[0]) == 12


BAD = {
    "unknown-model": (["--model", "{tmp}/nope", "--prompt", "hi"], "no checkpoint directory at"),
    "not-a-checkpoint": (["--model", "{tmp}", "--prompt", "hi"],
                         "neither config.json nor hf/config.json"),
    "no-default-checkpoint": (["--prompt", "hi"],
                              "no --model given and no checkpoint at out/bytes/hf"),
    "empty-prompt": (["--model", "{ckpt}", "--prompt", ""], "the prompt is empty"),
    "blank-prompt-file": (["--model", "{ckpt}", "--prompt-file", "{tmp}/blank.txt"],
                          "the prompt is empty"),
    "unreadable-file": (["--model", "{ckpt}", "--prompt-file", "{tmp}/missing.txt"], "cannot read"),
    "jsonl-without-prompt": (["--model", "{ckpt}", "--prompts-file", "{tmp}/bad.jsonl"],
                             'bad.jsonl line 2: expected {"prompt": "..."}'),
    "jsonl-empty-prompt": (["--model", "{ckpt}", "--prompts-file", "{tmp}/empty.jsonl"],
                           "prompt 2 is empty"),
    "too-long": (["--model", "{ckpt}", "--prompt-tokens", "60", "--max-new-tokens", "5"],
                 "the prompt (60 tokens) + --max-new-tokens 5 exceeds the model's context of 64 "
                 "tokens"),
    "too-long-in-batch": (["--model", "{ckpt}", "--prompts-file", "{tmp}/long.jsonl",
                           "--max-new-tokens", "40"],
                          "prompt 2 (33 tokens) + --max-new-tokens 40 exceeds"),
    "malformed-rope-scaling": (["--model", "{ckpt}", "--rope-scaling", '{"rope_type": "yarn"}'],
                               "is malformed"),
    "rope-scaling-not-json": (["--model", "{ckpt}", "--rope-scaling", "yarn"], "not JSON"),
    "zero-new-tokens": (["--model", "{ckpt}", "--max-new-tokens", "0"],
                        "--max-new-tokens must be at least 1"),
    "zero-top-k": (["--model", "{ckpt}", "--top-k", "0"], "--top-k must be at least 1, got 0"),
    "nan-temperature": (["--model", "{ckpt}", "--temperature", "nan"],
                        "--temperature must be a finite number >= 0 (0: greedy), got nan"),
    "inf-temperature": (["--model", "{ckpt}", "--temperature", "inf"],
                        "--temperature must be a finite number >= 0 (0: greedy), got inf"),
    "negative-temperature": (["--model", "{ckpt}", "--temperature", "-0.5"], "got -0.5"),
    "zero-top-p": (["--model", "{ckpt}", "--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    "large-top-p": (["--model", "{ckpt}", "--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    "nan-top-p": (["--model", "{ckpt}", "--top-p", "nan"], "--top-p must be in (0, 1], got nan"),
    "corrupt-tokenizer": (["--model", "{tmp}/badtok"], "badtok/tokenizer.json is not JSON"),
    "chat-random-prompt": (["--model", "{ckpt}", "--prompt-tokens", "8", "--chat"],
                           "cannot be used with"),
    "two-prompts": (["--model", "{ckpt}", "--prompt", "a", "--prompt-file", "x"],
                    "not allowed with argument"),
    "missing-weights": (["--model", "{ckpt}", "--max-new-tokens", "2"], "no model.safetensors"),
    "zero-threads": (["--model", "{ckpt}", "--threads", "0"], "--threads must be at least 1, got 0"),
    "negative-new-tokens": (["--model", "{ckpt}", "--max-new-tokens", "-1"],
                            "error: --max-new-tokens must be at least 1, got -1\n"),
    "minus-one-temperature": (["--model", "{ckpt}", "--temperature", "-1"],
                              "error: --temperature must be a finite number >= 0 (0: greedy), "
                              "got -1.0\n"),
}


# Input that parses but cannot be used, or a flag's value out of its range: one line, not
# argparse's usage block.
ONE_LINE = {"unknown-model", "not-a-checkpoint", "no-default-checkpoint", "empty-prompt",
            "blank-prompt-file", "unreadable-file", "jsonl-without-prompt", "jsonl-empty-prompt",
            "too-long", "too-long-in-batch", "corrupt-tokenizer", "missing-weights",
            "zero-new-tokens", "zero-top-k", "nan-temperature", "inf-temperature",
            "negative-temperature", "zero-top-p", "large-top-p", "nan-top-p", "chat-random-prompt",
            "zero-threads", "negative-new-tokens", "minus-one-temperature"}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_is_a_clear_error(case, weightless, tmp_path, monkeypatch, capsys):
    argv, message = BAD[case]
    (tmp_path / "blank.txt").write_text("  \n")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "fine"}\n{"text": "no prompt key"}\n')
    (tmp_path / "empty.jsonl").write_text('{"prompt": "fine"}\n{"prompt": ""}\n')
    long = json.dumps({"prompt": "word " * 32})
    (tmp_path / "long.jsonl").write_text('{"prompt": "short"}\n' + long + "\n")
    shutil.copytree(weightless, tmp_path / "badtok")
    (tmp_path / "badtok" / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": {')
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        sample.main([a.replace("{tmp}", str(tmp_path)).replace("{ckpt}", str(weightless))
                     for a in argv])
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert message in err
    if case in ONE_LINE:
        assert err.startswith("error: ") and err.count("\n") == 1
    else:  # about a flag's syntax or value: argparse's usage, then its error
        assert err.startswith("usage: ")


def test_help_shows_the_prompts_default_and_the_device_and_examples_keep_their_lines(capsys,
                                                                                   monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # argparse wraps help at the terminal's width
    with pytest.raises(SystemExit):
        sample.main(["--help"])
    out = capsys.readouterr().out
    assert "prompt text (default: 'The meaning of life is')" in out
    assert "cpu, cuda, cuda:1, ... (default: cuda when available, else cpu: " in out
    examples = [line for line in out.splitlines() if line.startswith("    python sample.py")]
    assert len(examples) == 6 and not any("   " in line.strip() for line in examples)
    assert "--chat \\\n        --prompt" in out  # the continued example stays two lines


def test_the_prompt_comes_first_and_no_echo_prints_the_continuation_alone(tiny_ckpt, capsys):
    prompt = "Whan that Aprille with his shoures soote"
    argv = greedy_args("--model", str(tiny_ckpt), "--prompt", prompt)
    tok = load_tokenizer(tiny_ckpt / "hf")
    new = tok.decode(sample.main(argv)[0])
    assert new and capsys.readouterr().out == prompt + new + "\n"
    assert tok.decode(sample.main(argv + ["--no-echo"])[0]) == new
    assert capsys.readouterr().out == new + "\n"


def test_chat_echoes_the_template_and_random_prompts_are_not_printed(tiny_ckpt, capsys):
    tok = load_tokenizer(tiny_ckpt / "hf")
    new = tok.decode(sample.main(greedy_args("--model", str(tiny_ckpt), "--chat", "--prompt", "Hi"))[0])
    assert capsys.readouterr().out == tok.apply_chat([{"role": "user", "content": "Hi"}]) + new + "\n"
    new = tok.decode(sample.main(greedy_args("--model", str(tiny_ckpt), "--prompt-tokens", "9"))[0])
    assert capsys.readouterr().out == new + "\n"


def test_a_batch_shows_each_prompt_before_its_continuation(tiny_ckpt, tmp_path, capsys):
    texts = ["Stately, plump Buck Mulligan", "Mother died today."]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    batch = sample.main(greedy_args("--model", str(tiny_ckpt), "--prompts-file",
                                    str(tmp_path / "p.jsonl")))
    tok = load_tokenizer(tiny_ckpt / "hf")
    assert capsys.readouterr().out == "".join(f"### {n}\n{t}{tok.decode(row)}\n\n"
                                              for n, (t, row) in enumerate(zip(texts, batch), 1))


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("temperature", ["0", "0.7"], ids=["greedy", "sampling"])
def test_non_finite_weights_are_a_one_line_error_naming_the_model(tiny_ckpt, tmp_path, capsys,
                                                                   value, temperature):
    bad = shutil.copytree(tiny_ckpt / "hf", tmp_path / "damaged")

    def poison(state):
        state["model.layers.2.mlp.down_proj.weight"][3, 5] = value
        return state
    rewrite_weights(bad, poison)
    with pytest.raises(SystemExit) as e:
        sample.main(["--model", str(bad), "--temperature", temperature, "--seed", "1",
                     "--max-new-tokens", "6", "--no-echo"])
    out, err = capsys.readouterr()
    assert e.value.code != 0 and out == ""
    assert err.startswith(f"error: {bad}: the logits after the prompt are not finite")
    assert err.count("\n") == 1


def test_generate_refuses_non_finite_logits():
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight[7, 0] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        generate(model, [random_prompt(5, 0)], 3)


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """main() sets torch's thread count; later tests in this process keep theirs."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_threads_default_to_omp_num_threads_else_half_the_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)))
    assert sample.default_threads() == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {4})
    assert sample.default_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert sample.default_threads() == 5
    assert sample.build_parser().parse_args([]).threads == 5


@pytest.mark.parametrize("threads", [1, 3])
def test_threads_flag_sets_torch_threads_on_cpu(tiny_ckpt, threads):
    torch.set_num_threads(2)
    sample.main(greedy_args("--model", str(tiny_ckpt), "--threads", str(threads)))
    assert torch.get_num_threads() == threads


# ---- a real checkpoint


def test_smollm2_greedy_chat_answer_equals_transformers(smollm2_dir, capsys):
    question = "What is the capital of France?"
    ours = sample.main(greedy_args("--model", str(smollm2_dir), "--chat", "--prompt", question)
                       + ["--max-new-tokens", "24"])[0]
    tok = load_tokenizer(smollm2_dir)
    chat = tok.apply_chat([{"role": "user", "content": question}])
    ids = torch.tensor([tok.encode(chat, allow_special=True)])
    hf = load_hf_reference(smollm2_dir)
    ref = hf.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:].tolist()
    assert ours == [t for t in ref if t not in tok.eos_ids]
    assert "Paris" in capsys.readouterr().out
