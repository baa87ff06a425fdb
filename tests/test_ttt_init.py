"""Where the TTT parameters start (starts.TTT_INITS): the exact starts compute the base model bit for
bit, the zero factor of zero-conv / zero-proj gets the gradient the paper's start scales down, and
impossible combinations are refused by name."""

from dataclasses import replace

import pytest
import torch

import train
from model import PRESETS, Transformer, is_ttt_param
from starts import (CALIBRATED_UPDATE, EXACT_TTT_INITS, TTT_INITS, start_ttt_params,
                    update_scale)

NEW_EXACT = [m for m in EXACT_TTT_INITS if m != "paper"]


def base_and_ttt(preset, target, mode, proj=True, seed=0):
    """(plain model, the same weights with TTT layers started by `mode`): 2 layers, TTT in layer 1,
    random norm weights so the hidden_states target is not a plain RMS normalisation."""
    cfg = replace(PRESETS[preset], num_layers=2, ttt_layers=(1,), ttt_target=target, ttt_proj=proj,
                  ttt_lr=3.0)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 2.0)
    batch = torch.randint(0, cfg.vocab_size, (2, 2 * cfg.ttt_chunk),
                          generator=torch.Generator().manual_seed(seed))  # for "calibrated"
    start_ttt_params(model, torch.Generator().manual_seed(seed), mode=mode, batch=batch)
    plain = Transformer(replace(cfg, ttt_layers=()))
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not is_ttt_param(k)})
    return plain.eval(), model.eval()


@pytest.mark.parametrize("target", ["hidden_states", "input_embed"])
@pytest.mark.parametrize("preset", ["bytes", "tiny"])
@pytest.mark.parametrize("mode", EXACT_TTT_INITS)
def test_an_exact_start_gives_the_base_models_logits_bit_for_bit(mode, preset, target):
    plain, model = base_and_ttt(preset, target, mode)
    C = model.config.ttt_chunk
    idx = torch.randint(0, model.config.vocab_size, (1, 3 * C + 7))  # three updates, a partial chunk
    with torch.no_grad():
        on = model(idx)
        model.ttt_enabled = False
        off = model(idx)
        base = plain(idx)
    assert torch.equal(on, base) and torch.equal(off, base)


def test_the_other_starts_change_the_logits_so_the_test_above_can_fail():
    for mode in set(TTT_INITS) - set(EXACT_TTT_INITS):
        plain, model = base_and_ttt("bytes", "input_embed", mode)
        idx = torch.randint(0, 257, (1, 300))
        with torch.no_grad():
            assert not torch.equal(model(idx), plain(idx))


@pytest.mark.parametrize("mode", TTT_INITS)
def test_a_start_touches_only_the_ttt_parameters_chosen_by_name(mode):
    cfg = replace(PRESETS["bytes"], num_layers=2, ttt_layers=(1,))
    model = Transformer(cfg)
    model.init_weights(generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    start_ttt_params(model, mode=mode, batch=torch.randint(0, 257, (2, 256)))
    after = model.state_dict()
    for key, value in before.items():  # o_proj and ttt_proj are both D x D: only the name tells
        assert torch.equal(after[key], value) or is_ttt_param(key)
    conv, P = (after[f"model.layers.1.mlp.ttt_{n}.weight"] for n in ("conv", "proj"))
    taps = {"zero-proj": [3], "next-token": [3], "centre": [2]}.get(mode, [])
    want = torch.zeros_like(conv)
    want[:, :, taps] = 1.0
    assert torch.equal(conv, want)
    if mode == "paper":
        assert torch.equal(P, torch.diag(P.diagonal())) and 0.01 < P.diagonal().std() < 0.03
    elif mode == "calibrated":
        assert torch.equal(P, torch.eye(cfg.hidden_size) * P[0, 0]) and P[0, 0] > 0
    else:
        assert torch.equal(P, torch.eye(cfg.hidden_size) * (mode != "zero-proj"))


def ttt_grads(mode, target="hidden_states"):
    """(conv grad (D, 5), P grad (D, D), P) of layer 1 after one backward from `mode`'s start, in
    fp64: the tests below compare a sum over tokens with the same sum scaled term by term, and in
    fp32 cancellation makes their difference depend on the CPU's summation order (1 of 640 conv
    gradients off by 1.5e-4 relative on an AMD EPYC). In fp64 the same cancellation leaves ~1e-12."""
    _, model = base_and_ttt("bytes", target, mode)
    model.double().train()
    idx = torch.randint(0, 257, (2, 4 * 128 + 1), generator=torch.Generator().manual_seed(1))
    model.loss(idx[:, :-1], idx[:, 1:]).backward()
    mlp = model.model.layers[1].mlp
    return mlp.ttt_conv.weight.grad[:, 0], mlp.ttt_proj.weight.grad, mlp.ttt_proj.weight.detach()


@pytest.mark.parametrize("target", ["hidden_states", "input_embed"])
def test_the_papers_conv_gradient_is_zero_convs_scaled_by_the_small_p(target):
    # The model and so dL/dV_hat are the same from every exact start; only the factors differ.
    conv_paper, P_grad_paper, P = ttt_grads("paper", target)
    conv_zero, P_grad_zero, _ = ttt_grads("zero-conv", target)
    assert torch.equal(P_grad_paper, torch.zeros_like(P)) and torch.equal(P_grad_zero, P_grad_paper)
    assert conv_zero.abs().min() > 0  # every channel and tap learns from the first step
    torch.testing.assert_close(conv_paper, conv_zero * P.diagonal()[:, None], rtol=1e-9, atol=0)


def test_zero_proj_gives_p_the_gradient_that_zero_convs_conv_gets_on_its_tap():
    conv_zero, _, _ = ttt_grads("zero-conv")
    conv_grad, P_grad, _ = ttt_grads("zero-proj")
    assert torch.equal(conv_grad, torch.zeros_like(conv_grad))
    # dL/dP = U^T dL/dV_hat with U = s_{t+1}: its diagonal is the t+1 tap's gradient when P = I
    torch.testing.assert_close(P_grad.diagonal(), conv_zero[:, 3], rtol=1e-9, atol=0)
    assert (P_grad - torch.diag(P_grad.diagonal())).abs().max() > 0  # and it mixes channels


def test_without_p_zero_conv_is_exact_and_zero_proj_is_refused(tmp_path):
    plain, model = base_and_ttt("bytes", "hidden_states", "zero-conv", proj=False)
    idx = torch.randint(0, 257, (1, 300))
    with torch.no_grad():
        assert torch.equal(model(idx), plain(idx))
    with pytest.raises(ValueError, match="TTT init 'zero-proj' starts P at zero, but "
                                         "ttt_proj=False has no P"):
        base_and_ttt("bytes", "hidden_states", "zero-proj", proj=False)
    with pytest.raises(SystemExit, match="--ttt-init zero-proj starts P at zero, but "
                                         "ttt_proj=False has no P"):
        train.main(["--override", "ttt_proj=false", "--ttt-init", "zero-proj",
                    "--out", str(tmp_path / "run"), "--cache", str(tmp_path / "cache")])
    assert not (tmp_path / "run").exists()


def test_zero_proj_without_lookahead_reads_the_centre_tap_and_stays_exact():
    plain, model = base_and_ttt("bytes", "input_embed", "zero-proj")
    model.config.ttt_lookahead = False
    start_ttt_params(model, mode="zero-proj")
    conv = model.model.layers[1].mlp.ttt_conv.weight
    assert conv[:, 0, 2].eq(1).all() and conv[:, 0, [0, 1, 3, 4]].eq(0).all()
    idx = torch.randint(0, 257, (1, 300))
    with torch.no_grad():
        assert torch.equal(model(idx), plain(idx))


@pytest.mark.parametrize("norm", [None, "ttt_key_norm", "ttt_target_norm"])
@pytest.mark.parametrize("target", ["hidden_states", "input_embed"])
def test_calibrated_p_scales_the_update_the_next_token_start_makes(target, norm):
    # with a key or target norm on, rho is the normalised update's: what the run will compute
    _, exact = base_and_ttt("bytes", target, "paper")
    idx = torch.randint(0, 257, (3, 3 * 128 + 5))
    _, nxt = base_and_ttt("bytes", target, "next-token")  # V_hat_t = s_{t+1}: what rho measures
    for model in (exact, nxt):
        if norm:
            setattr(model.config, norm, True)
    rho = update_scale(exact, idx)[1]
    mlp = nxt.model.layers[1].mlp
    mlp.keep_state = True
    with torch.no_grad():
        nxt(idx)
    ratio = torch.linalg.matrix_norm(mlp.last_state.dW) / torch.linalg.matrix_norm(
        mlp.down_proj.weight)  # (B,): the three windows' ‖ΣΔW‖/‖W0‖
    assert rho == pytest.approx(ratio.mean().item(), rel=1e-4)
    start_ttt_params(exact, mode="calibrated", batch=idx)
    P = exact.model.layers[1].mlp.ttt_proj.weight
    assert torch.equal(P, torch.eye(128) * (CALIBRATED_UPDATE / rho))


def test_calibrated_needs_a_batch_with_a_whole_chunk():
    _, model = base_and_ttt("bytes", "input_embed", "paper")
    with pytest.raises(ValueError, match="TTT init 'calibrated' measures the update's scale on a "
                                         "batch"):
        start_ttt_params(model, mode="calibrated")
    with pytest.raises(ValueError, match="windows of 100 tokens hold no chunk of 128"):
        start_ttt_params(model, mode="calibrated", batch=torch.randint(0, 257, (1, 100)))


def test_the_default_start_is_the_official_one(tmp_path):
    assert train.parse_args([]).ttt_init == train.DEFAULT_TTT_INIT == "paper"
    assert train.parse_args(["--init", str(tmp_path)]).ttt_init == "paper"
    assert train.parse_args(["--init", str(tmp_path), "--ttt-init", "calibrated"]).ttt_init == "calibrated"
    with pytest.raises(SystemExit):  # naming a start for a model without TTT layers is a mistake
        train.parse_args(["--no-ttt", "--ttt-init", "zero-conv"])
