"""A training run's model: its config (a preset, or --init's checkpoint, with the TTT settings
layered on), the checks that config must pass before any data or weights load, its starting
weights, and the model built sharded (parallel.py) and filled. Errors name train.py's flags.

    cfg = model_config("bytes", ttt_chunk=64)               # a preset with TTT_RECIPE's layers
    model = build_model(cfg, device, seed=0)               # after parallel.setup_distributed
"""

import argparse
import json
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from cli import default_dtype, resolve
from load_hf import check_field, config_to_hf, load_config, load_model
from model import PRESETS, TTT_RECIPE, ModelConfig, Transformer, is_ttt_param
from parallel import parallelize
from starts import MODEL_TTT_INIT, start_ttt_params, ttt_init_problem

# Where new TTT weights start (train.py --ttt-init; README "Does In-Place TTT help, and how should
# it start?"): the official start (conv 0, P diag N(0, 0.02^2)) with --init and from scratch. With
# --init its small P keeps continual pretraining stable, where zero-conv and zero-proj spike and
# calibrated gains nothing. From scratch it stalls on the recall task, but every start that learns there
# diverged on text in some run (calibrated at context 1024; zero-conv at 4096, 2 of 3 seeds), and
# a default must not: pass --ttt-init zero-conv or calibrated for a memory task, and watch
# ‖ΣΔW‖/‖W0‖.
DEFAULT_TTT_INIT = MODEL_TTT_INIT  # "paper", named once in starts.py


# -----------------------------------------------------------------------------
# The config: --preset with --override, or --init's, and the TTT flags


def parse_override(text: str) -> tuple[str, object]:
    """argparse `type=` for --override: KEY=VALUE with KEY a ModelConfig field and VALUE JSON (or a
    bare string, e.g. arch=llama)."""
    key, eq, value = text.partition("=")
    if not eq or key not in ModelConfig.__dataclass_fields__:
        names = ", ".join(ModelConfig.__dataclass_fields__)
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE with KEY a ModelConfig "
                                         f"field ({names})")
    try:
        value = json.loads(value)
    except json.JSONDecodeError:  # not JSON: a bare string such as llama or hidden_states
        pass
    try:  # the field's own rule (RULES): hidden_size=abc or =64.5 is named here
        check_field(key, value, key)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return key, value




def resolve_init(init) -> Path | None:
    """--init as a local directory: a hub id is fetched (or found in the hub cache) once, here;
    every later step reads the directory."""
    try:
        return resolve(init) if init else None
    except OSError as e:
        raise SystemExit(f"--init {init}: {e}") from None


def model_config(preset="bytes", init=None, override=None, ttt_layers=None, ttt_chunk=None,
                 ttt_lr=None, ttt_target=None, no_ttt=False) -> ModelConfig:
    """The preset (with `override` fields) or the `init` checkpoint's config, with the TTT settings
    given here layered on its own or, where it has none, on model.TTT_RECIPE. None leaves a setting
    as it is; no_ttt removes every TTT layer (the baseline)."""
    if init:  # the checkpoint fixes the shape (parse_args admits only stabilisers with --init)
        try:
            cfg = replace(load_config(init), **(override or {}))
        except (OSError, ValueError) as e:  # the file and field are in the message
            raise SystemExit(f"--init {init}: {e}") from None
    else:
        try:  # all fields at once: __post_init__ checks the combination, not each step
            cfg = replace(PRESETS[preset], **(override or {}))
        except (TypeError, ValueError) as e:
            raise SystemExit(f"--override {override}: {e}") from None
    if not cfg.ttt_layers:  # a base checkpoint or a preset without TTT: the official recipe
        # From scratch the target source stays the token embeddings, as the bytes preset and every
        # from-scratch run here have used: the recipe's hidden_states target is tuned for continual
        # pretraining of a trained model, whose MLP inputs are already meaningful.
        recipe = TTT_RECIPE if init else {**TTT_RECIPE, "target": "input_embed"}
        cfg = cfg.with_ttt(**recipe)
    flags = dict(chunk=ttt_chunk, lr=ttt_lr, target=ttt_target)
    layers = () if no_ttt else ttt_layers  # None keeps the layers chosen above
    # From a flag an index past the last layer is a mistake: an error, not model.py's warning
    # (meant for official config.json files, which list index 36 for 36-layer models).
    if layers and max(layers) >= cfg.num_layers:
        raise SystemExit(f"--ttt-layers {','.join(map(str, layers))}: the model has "
                         f"{cfg.num_layers} layers, so indices must be 0..{cfg.num_layers - 1}")
    return cfg.with_ttt(layers=layers, **{k: v for k, v in flags.items() if v is not None})


def check_config(cfg: ModelConfig, ttt_init, export: bool):
    """Settings that fail only with this config, refused before any data or weights load."""
    if cfg.ttt_layers and (why := ttt_init_problem(cfg, ttt_init)):
        raise SystemExit(f"--ttt-init {ttt_init} {why}")
    if export:  # a config HF cannot express must fail now, not after the last step
        try:
            config_to_hf(cfg, torch.float32)
        except ValueError as e:
            raise SystemExit(f"{e}; or pass --no-export") from None


def full_model(cfg, init, seed, ttt_init=DEFAULT_TTT_INIT, batch=None) -> Transformer:
    """A complete fp32 CPU model: HF weights (new TTT parameters as model.init_ttt_params sets
    them) or a fresh init; a ttt_init other than the model's own start (starts.MODEL_TTT_INIT) sets
    every TTT parameter instead ("calibrated" measures its P on `batch`, token ids (B, T)): either
    start is set once. Seeded, so the run starts the same whatever the world size. It lives in rank
    0's host memory while the shards are filled (4 bytes per parameter: 32 GB for an 8B model)."""
    torch.manual_seed(seed)  # the random diagonal of new ttt_proj weights draws from it
    # A deterministic start (no random draws): the study's matched comparisons, and --ttt-init.
    other = None if ttt_init == MODEL_TTT_INIT else partial(start_ttt_params, mode=ttt_init,
                                                             batch=batch)
    if init:  # fp32: master weights, whatever dtype the checkpoint was stored in
        try:
            model = load_model(init, "cpu", torch.float32, config=cfg,
                               init_missing_ttt=other or True)
        except (OSError, ValueError, KeyError) as e:  # a flawed file: its name and flaw, no trace
            raise SystemExit(f"--init {init}: {e}") from None
    else:
        with torch.device("meta"):  # no memory until to_empty, and no init work thrown away
            model = Transformer(cfg)
        model.to_empty(device="cpu")
        model.init_weights(generator=torch.Generator().manual_seed(seed), ttt=other is None)
        if other:
            other(model)
    return model


# -----------------------------------------------------------------------------
# Built on the meta device, sharded, then filled


def build_model(cfg, device, *, init=None, seed=0, ttt_init=DEFAULT_TTT_INIT, calibration=None,
                fill=True, train_only="all", activation_checkpointing=False, compile=False,
                precision=None, cp_group=None) -> Transformer:
    """Meta-device model -> parallel.parallelize (context parallelism over cp_group, activation
    checkpointing, compile, FSDP2) -> real memory, filled from full_model() (weights of `init` or
    a seeded fresh init, TTT parameters as ttt_init says; calibration: the token ids a "calibrated"
    start measures on) unless a checkpoint load will fill it (fill=False). train_only "ttt"
    freezes all but the TTT parameters. compile: True (inductor) or a torch.compile backend name,
    e.g. "aot_eager". precision "bf16" / "fp32" (None: default_dtype of the device)."""
    with torch.device("meta"):  # shapes only: even rank 0 never holds the model on the GPU whole
        model = Transformer(cfg)
    bf16 = precision == "bf16" if precision else default_dtype(device) == torch.bfloat16
    parallelize(model, device, cp_group=cp_group, bf16=bf16,
                activation_checkpointing=activation_checkpointing, compile=compile)
    model.to_empty(device=device)  # real memory for the shards only, contents undefined
    if fill:  # rank 0 alone holds the full model; the others receive their shards from it
        first = dist.get_rank() == 0
        source = full_model(cfg, init, seed, ttt_init, calibration).state_dict() if first else {}
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, source, options=options)
        del source  # free rank 0's full copy before training allocates
    if train_only == "ttt":  # the base weights stay exactly the checkpoint's
        for name, p in model.named_parameters():
            p.requires_grad_(is_ttt_param(name))
    return model
