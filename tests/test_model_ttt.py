"""In-Place TTT wired into the model: incremental decoding equals one full forward, --no-ttt equals plain W0."""

import pytest
import torch

from model import PRESETS, Transformer


def ttt_model(target, chunk=5, proj=True, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    cfg = PRESETS["tiny"].with_ttt(layers=(0, 2, 3), chunk=chunk, lr=0.5, target=target, proj=proj)
    cfg.vocab_size = 300
    model = Transformer(cfg).to(dtype)
    model.init_weights()
    with torch.no_grad():  # non-zero TTT parameters, so every update changes the logits
        for name, p in model.named_parameters():
            if ".mlp.ttt_" in name:
                p.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("target", ["hidden_states", "input_embed"])
@pytest.mark.parametrize("proj", [True, False], ids=["proj", "no-proj"])
def test_prefill_then_decode_equals_full_forward(target, proj):
    model = ttt_model(target, proj=proj)
    idx = torch.randint(0, 300, (2, 33))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(2, 40)
        outs = [model(idx[:, :7], cache), model(idx[:, 7:13], cache)]  # a prefill continuation mid-chunk
        outs += [model(idx[:, t:t + 1], cache) for t in range(13, 33)]  # decoding crosses four chunk boundaries
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-10)


def test_fp32_decode_matches_full_forward():
    model = ttt_model("hidden_states", chunk=4, dtype=torch.float32)
    idx = torch.randint(0, 300, (2, 26))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(2, 26)
        outs = [model(idx[:, :9], cache)] + [model(idx[:, t:t + 1], cache) for t in range(9, 26)]
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-4, atol=1e-4)


def test_ttt_updates_change_the_logits_and_no_ttt_is_plain_w0():
    model = ttt_model("hidden_states")
    idx = torch.randint(0, 300, (1, 30))
    with torch.no_grad():
        on = model(idx)
        model.ttt_enabled = False
        off = model(idx)
        for i in (0, 2, 3):
            del model.model.layers[i].mlp.ttt_conv
            model.model.layers[i].mlp.use_ttt = False
        plain = model(idx)
    assert torch.equal(off, plain)
    assert torch.allclose(on[:, :5], off[:, :5], atol=1e-12)  # chunk 0 sees W0 alone
    assert (on[:, 5:] - off[:, 5:]).abs().max() > 1e-3


def test_ragged_batch_decoding_keeps_each_rows_chunk_grid():
    model = ttt_model("input_embed", chunk=4)
    a, b = torch.randint(0, 300, (1, 15)), torch.randint(0, 300, (1, 6))
    with torch.no_grad():
        cache = model.new_cache(2, 30)
        model(a, cache.rows(0, 1))
        model(b, cache.rows(1, 2))
        nxt = torch.randint(0, 300, (2, 9))
        steps = torch.cat([model(nxt[:, t:t + 1], cache) for t in range(9)], 1)
        ref_a = model(torch.cat([a, nxt[:1]], 1))[:, 15:]
        ref_b = model(torch.cat([b, nxt[1:]], 1))[:, 6:]
    torch.testing.assert_close(steps[:1], ref_a, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(steps[1:], ref_b, rtol=1e-10, atol=1e-10)


def test_multi_token_step_with_rows_at_different_positions_is_refused():
    model = ttt_model("input_embed")
    cache = model.new_cache(2, 30)
    model(torch.randint(0, 300, (1, 3)), cache.rows(0, 1))
    with pytest.raises(ValueError, match="same position"):
        model(torch.randint(0, 300, (2, 4)), cache)


def test_gradients_reach_ttt_parameters():
    model = ttt_model("hidden_states", dtype=torch.float32)
    idx = torch.randint(0, 300, (2, 20))
    model.loss(idx[:, :-1], idx[:, 1:]).backward()
    for i in (0, 2, 3):
        mlp = model.model.layers[i].mlp
        assert mlp.ttt_conv.weight.grad.abs().sum() > 0 and mlp.ttt_proj.weight.grad.abs().sum() > 0
