"""In-Place TTT wired into the model: incremental decoding equals one full forward, --no-ttt equals plain W0."""

import copy

import pytest
import torch

import sample
from model import PRESETS, TTT_RECIPE, Transformer, is_ttt_param


def ttt_model(target, chunk=5, proj=True, dtype=torch.float64, seed=0, std=0.3, lr=0.5,
              layers=(0, 2, 3), num_layers=4, **kw):
    torch.manual_seed(seed)
    cfg = PRESETS["tiny"].with_ttt(layers=layers, chunk=chunk, lr=lr, target=target, proj=proj,
                                   **kw)
    cfg.vocab_size, cfg.num_layers = 300, num_layers
    model = Transformer(cfg).to(dtype)
    model.init_weights()
    with torch.no_grad():  # non-zero TTT parameters, so every update changes the logits
        for name, p in model.named_parameters():
            if is_ttt_param(name):
                p.normal_(0, std)
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
    # fp32 on purpose (the fp32 state path); 1e-4 is ~150x the 7e-7 measured: a bound, not the CPU's
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


@pytest.mark.parametrize("name", ["qwen3-4b", "qwen3-8b"])
def test_ttt_recipe_puts_ttt_in_every_sixth_layer_from_layer_0(name):
    cfg = PRESETS[name].with_ttt(**TTT_RECIPE)
    assert cfg.num_layers == 36 and cfg.ttt_layers == (0, 6, 12, 18, 24, 30)
    assert (cfg.ttt_chunk, cfg.ttt_lr, cfg.ttt_proj, cfg.ttt_target) == (4096, 3.0, True,
                                                                          "hidden_states")
    assert PRESETS["qwen3-0.6b"].with_ttt(every=6).ttt_layers == (0, 6, 12, 18, 24)
    assert Transformer(PRESETS["tiny"].with_ttt(every=2)).ttt_layers == (0, 2)


def test_no_lookahead_equals_a_conv_with_only_its_centre_tap_and_masks_the_other_grads():
    blind = ttt_model("hidden_states", chunk=4, lookahead=False)
    centre = ttt_model("hidden_states", chunk=4)
    with torch.no_grad():
        for i in (0, 2, 3):
            centre.model.layers[i].mlp.ttt_conv.weight[:, :, [0, 1, 3, 4]] = 0
    full = ttt_model("hidden_states", chunk=4)
    idx = torch.randint(0, 300, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(blind(idx), centre(idx), rtol=1e-12, atol=1e-12)
        assert (blind(idx) - full(idx)).abs().max() > 1e-3
    blind.loss(idx[:, :-1], idx[:, 1:]).backward()
    for i in (0, 2, 3):
        grad = blind.model.layers[i].mlp.ttt_conv.weight.grad
        assert grad[:, :, 2].abs().sum() > 0 and not grad[:, :, [0, 1, 3, 4]].any()


def test_bf16_forward_error_is_the_plain_models_gpu_stand_in():
    """Stands in for the GPU's bf16 forward (training, prefill) of a model with TTT layers.

    The yardstick is the same model's bf16 error with TTT switched off: every layer rounds its
    activations to bf16 (each rounding ≤ 2⁻⁹ relative), which sets the error of any bf16 forward.
    TTT adds roundings of the same kind (W = W0 + S once per chunk, ΔW's products) and, with S in
    fp32, none of them compound over the 64 chunks, so its error stays within 1.5x the plain one.
    TTT moves the hidden states by more than 10% here, so a TTT path that lost precision (a
    bf16 sum, a stale W, a rounding per token) would add errors of that size times 2⁻⁹ or more.
    """
    model = ttt_model("hidden_states", chunk=4, dtype=torch.float32, std=0.05, lr=0.02)
    idx = torch.randint(0, 300, (2, 256), generator=torch.Generator().manual_seed(0))
    bf16 = copy.deepcopy(model).bfloat16()

    def rel(a, b):
        return ((a.float() - b).norm() / b.norm()).item()

    with torch.no_grad():
        ref, got = model.hidden(idx), bf16.hidden(idx)
        model.ttt_enabled = bf16.ttt_enabled = False
        ref_plain, got_plain = model.hidden(idx), bf16.hidden(idx)
    assert rel(ref_plain, ref) > 0.1  # TTT changes the hidden states a lot
    assert rel(got_plain, ref_plain) < 10 * 2**-9  # bf16 works at all
    assert rel(got, ref) < 1.5 * rel(got_plain, ref_plain)


def test_compiled_decode_step_equals_eager_cpu_stand_in_for_cuda_graphs():
    """Stands in for sample.py's compiled decode step on CUDA (CUDA graphs, where the state's
    buffers must keep their addresses): the same decode_one_token under torch.compile on the CPU,
    rows at different positions, across several folds, with no recompilation after the first
    step. aot_eager traces and functionalizes the in-place state writes exactly as inductor
    would, without inductor's C++ build (over a minute on a cold CPU cache)."""
    # fp64: aot_eager's decompositions may sum in another order than eager, and fp32's rounding
    # of that depends on the CPU; what this test checks (no recompiles, state writes) does not.
    model = ttt_model("hidden_states", chunk=4, dtype=torch.float64, layers=(0, 1), num_layers=2)
    prompts, steps = (torch.randint(0, 300, (1, 6)), torch.randint(0, 300, (1, 3))), 14
    new = torch.randint(0, 300, (2, steps))

    def decode(step):
        cache = model.new_cache(2, 6 + steps)
        for b, p in enumerate(prompts):
            model(p, cache.rows(b, b + 1))
        sample.mark_static(cache)
        outs = [step(model, cache, new[:, :1])]
        with torch._dynamo.config.patch(error_on_recompile=True):
            outs += [step(model, cache, new[:, t:t + 1]) for t in range(1, steps)]
        return torch.stack(outs, 1), cache

    torch._dynamo.reset()
    with torch.no_grad():
        eager, eager_cache = decode(sample.decode_one_token)
        compiled, compiled_cache = decode(torch.compile(sample.decode_one_token, backend="aot_eager",
                                                        dynamic=False))
    torch.testing.assert_close(compiled, eager, rtol=1e-10, atol=1e-10)
    for i in (0, 1):
        a, b = compiled_cache.ttt[i], eager_cache.ttt[i]
        assert torch.equal(a.pos, b.pos) and a.dW.any()
        torch.testing.assert_close(a.dW, b.dW, rtol=1e-10, atol=1e-10)


def test_keep_state_leaves_the_forwards_final_state_equal_to_token_by_token_decoding():
    model = ttt_model("input_embed", chunk=4)
    idx = torch.randint(0, 300, (2, 14))
    for i in (0, 2, 3):
        model.model.layers[i].mlp.keep_state = True
    with torch.no_grad():
        cache = model.new_cache(2, 14)
        for t in range(14):
            model(idx[:, t:t + 1], cache)
    model(idx)  # with grad: last_state must come back detached
    for i in (0, 2, 3):
        state = model.model.layers[i].mlp.last_state
        assert not state.dW.requires_grad and torch.equal(state.pos, torch.tensor([14, 14]))
        torch.testing.assert_close(state.dW, cache.ttt[i].dW, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode, shift", [("next-token", 1), ("centre", 0)])
def test_tap_inits_make_the_target_the_next_or_the_current_embedding(mode, shift):
    from starts import start_ttt_params

    model, C = ttt_model("input_embed", chunk=6, layers=(1,)), 6
    start_ttt_params(model, mode=mode)
    mlp = model.model.layers[1].mlp
    x, s = torch.randn(2, 2 * C, 128, dtype=torch.float64), torch.randn(2, 2 * C, 128, dtype=torch.float64)
    with torch.no_grad():
        out = mlp(x, s)
        h = torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x)  # (B, T, F)
        v = torch.zeros(2, C, 128, dtype=torch.float64)  # V_hat of chunk 0: s_{t+shift}, 0 past the chunk
        v[:, :C - shift] = s[:, shift:C]
        w = mlp.down_proj.weight + mlp.cfg.ttt_lr * v.transpose(1, 2) @ h[:, :C]  # (B, D, F)
    torch.testing.assert_close(out[:, :C], h[:, :C] @ mlp.down_proj.weight.T)
    torch.testing.assert_close(out[:, C:], h[:, C:] @ w.transpose(1, 2))


def test_paper_init_leaves_the_model_exactly_the_base_model_and_unknown_inits_are_refused():
    from model import init_ttt_params
    from starts import start_ttt_params

    model = ttt_model("hidden_states")
    init_ttt_params(model, torch.Generator().manual_seed(0))
    idx = torch.randint(0, 300, (2, 23))
    with torch.no_grad():
        with_ttt = model(idx)
        model.ttt_enabled = False
        assert torch.equal(with_ttt, model(idx))
    with pytest.raises(ValueError, match="TTT init 'zero': expected one of paper, next-token, centre"):
        start_ttt_params(model, mode="zero")
