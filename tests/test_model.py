import pytest
import torch
import torch.nn.functional as F

from model import PRESETS, Transformer


def test_last_only_and_chunked_loss_match_full_logits():
    torch.manual_seed(0)
    cfg = PRESETS["tiny"].with_ttt(layers=())
    cfg.vocab_size = 300
    model = Transformer(cfg)
    model.init_weights()
    model.double()  # fp64: sliced and whole sums round differently; fp32's error depends on the CPU
    idx, tgt = torch.randint(0, 300, (2, 40)), torch.randint(0, 300, (2, 40))
    tgt[0, :5] = -100
    full = model(idx)
    assert torch.allclose(model(idx, last_only=True), full[:, -1:], rtol=1e-10, atol=1e-12)
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
    model.double()  # fp64: a cached step and a whole forward sum in different orders
    idx = torch.randint(0, 300, (2, 30))
    full = model(idx)
    cache = model.new_cache(2, 32)
    outs = [model(idx[:, :10], cache), model(idx[:, 10:17], cache)]
    outs += [model(idx[:, t:t + 1], cache) for t in range(17, 30)]
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-10, rtol=1e-10)


def test_ragged_decode_rows_at_different_positions():
    torch.manual_seed(0)
    cfg = PRESETS["tiny"].with_ttt(layers=())
    cfg.vocab_size = 300
    model = Transformer(cfg)
    model.init_weights()
    model.double()  # fp64: a cached step and a whole forward sum in different orders
    a, b = torch.randint(0, 300, (1, 12)), torch.randint(0, 300, (1, 7))
    cache = model.new_cache(2, 20)
    model(a[:, :-1], cache.rows(0, 1))
    model(b[:, :-1], cache.rows(1, 2))
    step = model(torch.cat([a[:, -1:], b[:, -1:]]), cache)
    torch.testing.assert_close(step[0, 0], model(a)[0, -1], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(step[1, 0], model(b)[0, -1], atol=1e-10, rtol=1e-10)
    assert cache.pos.tolist() == [12, 7]


def test_loss_without_reduction_is_each_tokens_cross_entropy_and_zero_where_ignored():
    torch.manual_seed(0)
    cfg = PRESETS["tiny"].with_ttt(layers=(1,), chunk=8)
    cfg.vocab_size = 300
    model = Transformer(cfg)
    model.init_weights()
    idx, tgt = torch.randint(0, 300, (3, 20)), torch.randint(0, 300, (3, 20))
    tgt[1, 4:9] = -100
    ref = F.cross_entropy(model(idx).flatten(0, 1), tgt.flatten(), ignore_index=-100, reduction="none")
    per_token = model.loss(idx, tgt, tokens_per_slice=7, reduction="none")
    assert per_token.shape == (3, 20) and per_token.dtype == torch.float32
    torch.testing.assert_close(per_token, ref.view(3, 20))
    assert (per_token[1, 4:9] == 0).all() and (per_token[0] > 0).all()
    torch.testing.assert_close(per_token.sum() / (tgt != -100).sum(), model.loss(idx, tgt))
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'none', got 'sum'"):
        model.loss(idx, tgt, reduction="sum")


@pytest.mark.parametrize("window", [None, 4], ids=["full", "window4"])
def test_the_sink_switch_keeps_key_0_in_view_and_nothing_else(window):
    torch.manual_seed(0)
    cfg = PRESETS["tiny"].with_ttt(layers=())
    cfg.vocab_size, cfg.sliding_window = 300, window
    attn = Transformer(cfg).double().model.layers[0].self_attn
    q, k, v = (torch.randn(2, n, 9, 32, dtype=torch.float64) for n in (4, 2, 2))
    t, s = torch.arange(9)[:, None], torch.arange(9)[None]
    seen = (s <= t) & ((s > t - window) if window else True)
    seen[:, 0] = True  # by hand: causal, windowed, plus key 0
    scores = q @ k.repeat_interleave(2, 1).transpose(-1, -2) / 32 ** 0.5  # (B, H, T, S)
    want = scores.masked_fill(~seen, float("-inf")).softmax(-1) @ v.repeat_interleave(2, 1)
    attn.sink = True
    torch.testing.assert_close(attn._attend(q, k, v, None, None), want, rtol=1e-12, atol=1e-12)
    attn.sink = False
    assert window is None or not torch.allclose(attn._attend(q, k, v, None, None), want)


def test_the_sink_switch_decodes_as_the_full_forward_computes():
    torch.manual_seed(0)
    cfg = PRESETS["tiny"].with_ttt(layers=())
    cfg.vocab_size, cfg.sliding_window = 300, 4
    model = Transformer(cfg).double()
    model.init_weights()
    for block in model.model.layers:
        block.self_attn.sink = True
    idx = torch.randint(0, 300, (2, 16))
    cache = model.new_cache(2, 16)
    outs = [model(idx[:, :6], cache)] + [model(idx[:, t:t + 1], cache) for t in range(6, 16)]
    torch.testing.assert_close(torch.cat(outs, 1), model(idx), rtol=1e-10, atol=1e-10)
