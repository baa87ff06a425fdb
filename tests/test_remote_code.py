"""Exports run in transformers alone (trust_remote_code): logits are model.py's, generate() gives sample.py's tokens,
and the export's modeling code is model.py's import closure, refused loudly when a file cannot travel."""

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import remote_code
import sample
from load_hf import save_model
from model import PRESETS, Transformer

ROOT = Path(__file__).resolve().parents[1]
# Byte-level, C = 16: a 70-token forward and 40 decoded tokens cross several chunk boundaries.
BASE = replace(PRESETS["bytes"], num_layers=2, ttt_layers=(0, 1), ttt_chunk=16, max_position_embeddings=256)
CASES = {
    "qwen3-tied": BASE,
    "qwen3-untied-window": replace(BASE, tie_word_embeddings=False, sliding_window=24),
    "llama-tied": replace(BASE, arch="llama", qk_norm=False, rope_theta=500000.0),
}


def random_model(cfg, seed=0):
    """A model.py Transformer whose weights make varied text and whose fast weights move (std 0.02 greedy-decodes one
    byte for ever)."""
    model = Transformer(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0.0, 0.3 if "embed" in name else 0.1, generator=g)
    return model.eval()


def load_export(path):
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def exported(request, tmp_path_factory):
    model = random_model(CASES[request.param])
    out = save_model(model, tmp_path_factory.mktemp(request.param) / "export")
    return model, load_export(out)


def left_padded(prompts, pad=0):
    T = max(map(len, prompts))
    ids = torch.full((len(prompts), T), pad)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):], mask[b, T - len(p):] = torch.tensor(p), 1
    return ids, mask


def new_tokens(out, T, eos):
    """Each row's generated tokens up to (not including) its first eos, as sample.generate returns them."""
    rows = []
    for row in out[:, T:].tolist():
        rows.append(row[:next((i for i, t in enumerate(row) if t == eos), len(row))])
    return rows


def test_export_logits_equal_model_py(exported):
    model, hf = exported
    ids = torch.randint(0, 257, (2, 70), generator=torch.Generator().manual_seed(1))
    assert "InPlaceTTT" in type(hf).__name__
    torch.testing.assert_close(hf(ids).logits, model(ids), rtol=0, atol=0)


def test_export_logits_of_a_left_padded_row_equal_the_row_alone(exported):
    model, hf = exported
    prompts = [list(range(5, 75)), list(range(40, 73))]
    ids, mask = left_padded(prompts)
    logits = hf(ids, attention_mask=mask).logits
    torch.testing.assert_close(logits[1, -33:], model(torch.tensor([prompts[1]]))[0], rtol=0, atol=0)
    torch.testing.assert_close(logits[0], model(torch.tensor([prompts[0]]))[0], rtol=0, atol=0)


@pytest.mark.parametrize("prompts", [[list(range(60, 90))], [list(range(60, 90)), list(range(100, 145)), [7] * 17]],
                         ids=["batch1", "ragged3"])
@pytest.mark.parametrize("how", [dict(), dict(temperature=0.8, top_k=50, top_p=0.9, seed=3)], ids=["greedy", "seeded"])
def test_export_generate_gives_sample_py_tokens(exported, prompts, how):
    model, hf = exported
    eos = model.config.eos_token_id
    want = sample.generate(model, prompts, 40, eos_ids=eos, **how)
    ids, mask = left_padded(prompts)
    if how:
        torch.manual_seed(how["seed"])  # transformers' convention: the global generator
        kw = dict(do_sample=True, temperature=how["temperature"], top_k=how["top_k"], top_p=how["top_p"])
    else:
        kw = dict(do_sample=False)
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=40, eos_token_id=eos, **kw)
    assert new_tokens(out, ids.shape[1], eos) == want
    assert len(set(want[0])) > 3  # varied text, not one byte repeated


def test_export_generate_folds_the_fast_weight_while_decoding(exported):
    model, hf = exported
    prompt = [list(range(60, 90))]  # 30 tokens: decoding crosses positions 32, 48, 64
    ids = torch.tensor(prompt)
    out = hf.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=None)[0, 30:].tolist()
    model.ttt_enabled = False  # W0 only: what a loader that drops the TTT weights would decode
    try:
        plain = sample.generate(model, prompt, 40)[0]
    finally:
        model.ttt_enabled = True
    assert out == sample.generate(model, prompt, 40)[0]
    assert out != plain
    # The oracle for the decode-time folds: one full forward (the chunked path) over prompt + output, whose argmax
    # at each position is the token decoded there (up to float rounding between the two paths).
    logits = model(torch.tensor([prompt[0] + out]))[0, 29:-1]  # (40, V): the logits that chose each output token
    chosen = logits.gather(-1, torch.tensor(out)[:, None])[:, 0]
    torch.testing.assert_close(chosen, logits.max(-1).values, rtol=0, atol=1e-4)


def test_export_generate_refuses_what_it_does_not_implement(exported):
    _, hf = exported
    with pytest.raises(ValueError, match="num_beams=4 is not supported"):
        hf.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, num_beams=4)


def test_loading_an_export_leaves_plain_qwen3_checkpoints_to_transformers(exported, saved):
    import transformers
    plain = transformers.AutoModelForCausalLM.from_pretrained(saved, trust_remote_code=True)
    assert type(plain) is transformers.Qwen3ForCausalLM


def test_export_without_trust_remote_code_is_the_plain_family_class(exported, tmp_path):
    import transformers
    model, _ = exported
    out = save_model(model, tmp_path / "export")
    plain = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(plain).__name__ in ("Qwen3ForCausalLM", "LlamaForCausalLM")


# ---- what the export carries: model.py's import closure


def project_copy(tmp_path, extra_model_lines):
    """A copy of the project's modeling files with lines appended to model.py."""
    for name in ("modeling_inplace_ttt.py", "model.py", "ttt.py"):
        shutil.copy(ROOT / name, tmp_path / name)
    with open(tmp_path / "model.py", "a") as f:
        f.write("\n" + "\n".join(extra_model_lines) + "\n")
    return tmp_path


def test_export_carries_a_file_model_py_comes_to_import(tmp_path):
    root = tmp_path / "p"
    root.mkdir()
    (root / "helpers.py").write_text("import ttt\nHALF = 0.5\n")
    project_copy(root, ["import helpers", "from helpers import HALF"])
    out = tmp_path / "out"
    out.mkdir()
    remote_code.write_remote_code(out, "qwen3", root)
    assert sorted(p.name for p in out.iterdir()) == ["helpers.py", "model.py", "modeling_inplace_ttt.py", "ttt.py"]
    assert "from . import helpers\nfrom .helpers import HALF\n" in (out / "model.py").read_text()
    assert (out / "helpers.py").read_text().startswith("from . import ttt\n")
    assert "from .helpers import __name__" in (out / "modeling_inplace_ttt.py").read_text()


@pytest.mark.parametrize("line, message", [
    ("from study import long_context", r"model.py line \d+: it imports study, a part of the project's package study/"),
    ("import study.long_context", r"model.py line \d+: it imports study.long_context"),
    ("import importlib; ttt2 = importlib.import_module('ttt')", r"import_module\(\) imports a module found at run"),
], ids=["package", "dotted", "importlib"])
def test_export_refuses_a_project_import_it_cannot_carry(tmp_path, line, message):
    root = tmp_path / "p"
    root.mkdir()
    (root / "study").mkdir()
    project_copy(root, [line])
    with pytest.raises(ValueError, match=message):
        remote_code.write_remote_code(tmp_path, "qwen3", root)


def test_export_refuses_before_writing_anything(tmp_path, monkeypatch):
    root = tmp_path / "p"
    root.mkdir()
    (root / "study").mkdir()
    project_copy(root, ["from study import x"])
    monkeypatch.setattr(remote_code, "ROOT", root)
    monkeypatch.setattr(remote_code.write_remote_code, "__defaults__", (root,))
    with pytest.raises(ValueError, match="cannot carry"):
        save_model(random_model(BASE), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---- lm-evaluation-harness on an export, offline, on a task made from a local file

TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
doc_to_text: "{{{{question}}}}"
"""
MC = "output_type: multiple_choice\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\n" \
     "metric_list:\n  - metric: acc\n"
GEN = "output_type: generate_until\ndoc_to_target: \"{{choices[answer]}}\"\n" \
      "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 24\n  do_sample: false\n" \
      "metric_list:\n  - metric: exact_match\n"


def lm_eval_samples(export, tmp_path):
    """Run the lm_eval command (the README's) on two local tasks; {task: [sample rows]}."""
    import json
    import os
    import subprocess
    import sys
    rows = [{"question": f"Question {i}: which comes first?" + " more" * i, "choices": [" apple", " pear", " fig"],
             "answer": i % 3} for i in range(4)]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name, body in (("local_mc", MC), ("local_gen", GEN)):
        (tasks / f"{name}.yaml").write_text(TASK.format(name=name, data=tmp_path / "qa.jsonl") + body)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
           f"pretrained={export},trust_remote_code=True,dtype=float32", "--include_path", str(tasks),
           "--tasks", "local_mc,local_gen", "--device", "cpu", "--batch_size", "2",
           "--output_path", str(tmp_path / "res"), "--log_samples"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return {t: [json.loads(line) for f in (tmp_path / "res").rglob(f"samples_{t}_*.jsonl")
                for line in f.read_text().splitlines()] for t in ("local_mc", "local_gen")}


def test_lm_eval_harness_scores_an_export_as_model_py_does(tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -r requirements-extras.txt)")
    import transformers

    from tokenizer import write_byte_tokenizer
    model = random_model(BASE)
    export = save_model(model, tmp_path / "export", tokenizer_src=write_byte_tokenizer(tmp_path / "tok"))
    samples = lm_eval_samples(export, tmp_path)
    tok = transformers.AutoTokenizer.from_pretrained(export)
    assert len(samples["local_mc"]) == len(samples["local_gen"]) == 4
    for s in samples["local_mc"]:  # each choice's log-likelihood: model.py's sum of log-probabilities
        for args, resp in zip(s["arguments"].values(), s["resps"]):
            ctx, cont = tok.encode(args["arg_0"]), tok.encode(args["arg_1"])
            logp = model(torch.tensor([ctx + cont])).log_softmax(-1)[0, len(ctx) - 1:-1]
            want = logp.gather(-1, torch.tensor(cont)[:, None]).sum().item()
            assert float(resp[0][0]) == pytest.approx(want, abs=1e-4)
    for s in samples["local_gen"]:  # greedy text (left-padded batches of 2): sample.py's, cut at the newline
        ctx = tok.encode(s["arguments"]["gen_args_0"]["arg_0"])
        want = tok.decode(sample.generate(model, [ctx], 24, eos_ids=model.config.eos_token_id)[0]).split("\n")[0]
        assert s["resps"][0][0] == want


STABILISED = {"key-norm": dict(ttt_key_norm=True), "target-norm": dict(ttt_target_norm=True),
              "clip": dict(ttt_clip_tau=0.05), "norm-preserve": dict(ttt_norm_preserve=True)}


@pytest.mark.parametrize("on", list(STABILISED.values()), ids=list(STABILISED))
def test_an_export_with_a_stabiliser_on_computes_it_in_transformers(on, tmp_path):
    model = random_model(replace(BASE, **on))
    with pytest.warns(UserWarning, match="official In-Place TTT classes ignore"):
        out = save_model(model, tmp_path / "export")
    ids = torch.randint(0, 257, (2, 70), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(load_export(out)(ids).logits, model(ids), rtol=0, atol=0)
