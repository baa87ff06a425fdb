"""The stabiliser study's and the growth study's plumbing: each arm's flags give train.py the
config the arm names (train.py's own parser and config builder as the oracle), --override sets a
stabiliser on an --init checkpoint and refuses a shape field there, and the growth table pairs
runs by seed as a hand computation does."""

import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import load_hf
import train
from model import PRESETS, Transformer
from study import growth, stabilisers
from study.stats import T975

ON = {"key-norm": ("ttt_key_norm", True), "target-norm": ("ttt_target_norm", True),
      "clip": ("ttt_clip_tau", 0.5), "norm-preserve": ("ttt_norm_preserve", True)}


@pytest.fixture(scope="module")
def base_hf(tmp_path_factory):
    """A small no-TTT export, as the study's base model is."""
    out = tmp_path_factory.mktemp("base") / "hf"
    load_hf.save_model(Transformer(replace(PRESETS["bytes"], num_layers=4, ttt_layers=())), out)
    return out


@pytest.mark.parametrize("part", ["recall", "text4096", "text1024", "cpt"])
@pytest.mark.parametrize("stab", list(stabilisers.STABILISERS))
def test_each_arms_flags_give_train_py_the_start_and_stabiliser_it_names(part, stab, base_hf,
                                                                         monkeypatch, tmp_path):
    real = stabilisers.study_plan
    monkeypatch.setattr(stabilisers, "study_plan", lambda sizes, out: [
        replace(real(sizes, out)[0], out=base_hf.parent)])  # cpt continues base_hf
    args = train.parse_args(stabilisers.argv(part, f"calibrated+{stab}", 3, tmp_path))
    init, cfg = train.run_config(args)
    assert args.ttt_init == "calibrated" and args.seed == 3 and cfg.ttt_layers
    off = load_hf.STABILISERS
    want = dict(ON)
    steps = {"recall": 300, "cpt": 100}.get(part, 150)
    want["warmup"] = ("ttt_lr_warmup", steps // 2)
    for key, value in off.items():  # exactly the named stabiliser is on
        assert getattr(cfg, key) == (want[stab][1] if stab in want and want[stab][0] == key
                                     else value), key
    assert (init is not None) == (part == "cpt")
    assert cfg.sliding_window == {"recall": 8, "cpt": None}.get(part, 128)
    assert args.seq_len == {"recall": 128, "text4096": 4096}.get(part, 1024)


def test_the_no_ttt_control_has_no_ttt_and_a_misspelt_arm_is_named(tmp_path):
    args = train.parse_args(stabilisers.argv("text4096", "no-ttt", 0, tmp_path))
    assert train.run_config(args)[1].ttt_layers == ()
    for arm in ("calibrated+keynorm", "calibrate+none", "calibrated"):
        with pytest.raises(SystemExit, match=re.escape(f"arm {arm!r}: expected START+STABILISER")):
            stabilisers.split(arm)


def test_override_sets_a_stabiliser_on_an_init_checkpoint_and_refuses_a_shape_field(base_hf,
                                                                                   capsys):
    args = train.parse_args(["--init", str(base_hf), "--override", "ttt_target_norm=true",
                             "ttt_clip_tau=0.25"])
    _, cfg = train.run_config(args)
    assert cfg.ttt_target_norm and cfg.ttt_clip_tau == 0.25 and cfg.ttt_layers
    assert cfg.hidden_size == 128  # the checkpoint's shape
    with pytest.raises(SystemExit):
        train.parse_args(["--init", str(base_hf), "--override", "hidden_size=64",
                          "ttt_key_norm=true"])
    err = capsys.readouterr().err
    assert "--override hidden_size: with --init the checkpoint fixes the config" in err
    assert "ttt_key_norm" in err  # the keys that may be set are listed


def test_growth_pairs_runs_by_seed_as_a_hand_computation(tmp_path):
    jobs = growth.plan(tmp_path, steps=8, seeds=(0, 1, 2), marks=(4, 8))
    assert len(jobs) == 12 and len({j.out for j in jobs}) == 12
    rng = np.random.default_rng(0)
    scores, raw = {}, {}
    edges = [0, 64, 128, 1024]
    for j in jobs:
        variants = ("on", "off") if j.arm.endswith("-ttt") else ("on",)
        scores[j.name] = {}
        for step in (4, 8):
            for v in variants:
                w = rng.normal(2.0, 0.1, (5, 3))  # 5 windows × 3 buckets
                raw[(j.arm, j.seed, step, v)] = w @ np.diff(edges) / 1024
                scores[j.name][f"{step}.{v}"] = {"edges": edges, "windows": w.tolist()}
    lines, diffs = growth.table(jobs, scores, marks=(4, 8))
    for attn in ("full", "swa"):
        for step in (4, 8):
            d = [(raw[(f"{attn}-ttt", s, step, "on")] - raw[(f"{attn}-nottt", s, step, "on")]).mean()
                 for s in range(3)]
            gain, off = diffs[(attn, step)]
            assert gain["mean"] == pytest.approx(np.mean(d), abs=1e-12)
            assert gain["ci"] == pytest.approx(T975[1] * np.std(d, ddof=1) / math.sqrt(3), abs=1e-12)
            o = [(raw[(f"{attn}-ttt", s, step, "off")] - raw[(f"{attn}-ttt", s, step, "on")]).mean()
                 for s in range(3)]
            assert off["mean"] == pytest.approx(np.mean(o), abs=1e-12)
    assert len(lines) == 2 + 4


def test_growth_keeps_a_checkpoint_at_every_mark(tmp_path):
    for job in growth.plan(tmp_path):
        args = train.parse_args(job.argv)
        assert all(m % args.save_every == 0 for m in growth.MARKS)
        assert args.keep * args.save_every >= growth.STEPS and args.steps == growth.STEPS
        swa = train.run_config(args)[1].sliding_window
        assert swa == (128 if job.arm.startswith("swa") else None)
        assert Path(args.out) == job.out


def test_the_readme_states_the_defaults_the_code_has():
    """The README's defaults line (section 6 of the study) names the from-scratch and --init start
    and the stabilisers' state; the code must agree, so changing one without the other fails."""
    import model
    from train_model import DEFAULT_TTT_INIT
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    line = next(ln for ln in readme.splitlines() if ln.startswith("**Defaults, measured**"))
    assert f"`--ttt-init {DEFAULT_TTT_INIT}`" in line
    assert train.parse_args([]).ttt_init == DEFAULT_TTT_INIT  # from scratch
    off = all(getattr(model.ModelConfig(), k) == v for k, v in load_hf.STABILISERS.items())
    assert off and all(getattr(model.PRESETS["bytes"], k) == v
                       for k, v in load_hf.STABILISERS.items())
    assert "every stabiliser off" in line
