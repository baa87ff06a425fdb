"""train.py --cp: one window split over the ranks of a group retraces the one-rank run (losses,
validation by position, the ‖ΣΔW‖/‖W0‖ probe, the checked save's loss, the export), alone and with
data parallelism; its checkpoints resume under --cp 2 exactly and under --cp 1 to rounding;
compiled and checkpointed blocks give the eager gradients; a split that cannot run is refused by
name.

Four forked gloo ranks run every job in turn (starting ranks costs seconds on 2 cores, a job
about one); each job is its own world, joined through a file. A job on all four ranks starts only
once every rank has finished the jobs before it, so the resumes find their checkpoints. Each test
reads what the jobs wrote and compares with one rank."""

import datetime
import gc
import json
import re
import shutil
import sys
import time
from functools import partial

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import metrics, small_args, without_timing
from safetensors.torch import load_file
from test_train_precision import full_state, loss_and_grads, small_config
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

import checkpoint
import train
import train_model
from parallel import cp_shard, seq_shard, shard_loss

STEPS, RESUME_AT = 4, 2
IDX = torch.randint(0, 256, (2, 65), generator=torch.Generator().manual_seed(0))  # as test_train_precision.py
# Windows of 128 tokens: two validation buckets by position, one per shard under --cp 2
CP = ["--seq-len", "128", "--val-every", "2", "--save-every", "2"]


def resume_from(src, out, step):
    """A run directory holding run `src`'s checkpoint at `step` and its metrics up to it."""
    name = f"step_{step:06d}"
    shutil.copytree(src / "ckpt" / name, out / "ckpt" / name)
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics(src)[:step + 1]))


def compiled_grads(idx, path):
    """--compile (aot_eager) and --activation-checkpointing under --cp 2, on a world of two: one
    forward and backward of idx (B, T+1) on train.py's model; rank 0 saves the loss averaged over
    the ranks and every full gradient (FSDP has averaged them)."""
    cfg = small_config().with_ttt(lr=3.0)  # as test_train_precision.py's eager oracle
    _, _, device = train.setup_distributed("cpu")
    _, _, group = train.context_parallel(2, idx.shape[1] - 1, cfg, device)
    model = train.build_model(cfg, device, fill=False, compile="aot_eager", activation_checkpointing=True,
                              cp_group=group)
    set_model_state_dict(model, full_state(cfg), options=StateDictOptions(full_state_dict=True))
    loss = shard_loss(model, *seq_shard((idx[:, :-1], idx[:, 1:]), cp_shard(group)), group)
    loss.backward()
    dist.all_reduce(mean := loss.detach().clone())
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    if dist.get_rank() == 0:
        torch.save((mean.item() / 2, grads), path)
    dist.destroy_process_group()


def _worker(rank, jobs, root):
    torch.set_num_threads(1)  # four ranks on two cores; forked, before any op (as test_cp.py)
    for name, ranks, run, args, prepare in jobs:
        if rank not in ranks:
            continue
        if prepare is not None and rank == ranks[0]:  # the others wait to join the world below
            prepare()
        # train.setup_distributed keeps a process group it finds; main() destroys it at the end
        dist.init_process_group("gloo", init_method=f"file://{root}/{name}.init", rank=ranks.index(rank),
                                world_size=len(ranks), timeout=datetime.timedelta(seconds=120))
        run(*args)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, byte_tokenizer, cache):
    """{job: its --out}: the one-rank run, --cp 2 on two ranks (both also in bf16), 2 x 2 ranks
    (data x context parallel, with activation checkpointing), and the --cp 2 run resumed at
    RESUME_AT under --cp 2 and --cp 1; "compiled": compiled_grads' file."""
    root = tmp_path_factory.mktemp("train_cp")
    out = {name: root / name for name in ("one", "cp2", "one-bf16", "cp2-bf16", "dp2-cp2", "resume-cp2",
                                          "resume-cp1", "compiled")}
    args = lambda name, *extra: [small_args(byte_tokenizer, cache, out[name], *CP, *extra, steps=STEPS)]
    bf16 = ("--precision", "bf16", "--no-export")
    jobs = [("one", (2,), train.main, args("one"), None),
            ("one-bf16", (3,), train.main, args("one-bf16", *bf16), None),
            ("cp2", (0, 1), train.main, args("cp2", "--cp", "2"), None),
            ("cp2-bf16", (0, 1), train.main, args("cp2-bf16", "--cp", "2", *bf16), None),
            ("compiled", (2, 3), compiled_grads, (IDX, out["compiled"]), None),
            ("dp2-cp2", (0, 1, 2, 3), train.main,
             args("dp2-cp2", "--cp", "2", "--activation-checkpointing", "--no-export"), None),
            ("resume-cp2", (0, 1), train.main, args("resume-cp2", "--cp", "2", "--resume", "--no-export"),
             partial(resume_from, out["cp2"], out["resume-cp2"], RESUME_AT)),
            ("resume-cp1", (2,), train.main, args("resume-cp1", "--resume", "--no-export"),
             partial(resume_from, out["cp2"], out["resume-cp1"], RESUME_AT))]
    t0 = time.perf_counter()
    # Process groups of earlier in-process runs may wait in reference cycles: collected here, where
    # their threads live, not by a forked rank's collector, which would wait on threads fork left out.
    gc.collect()
    method = "fork" if sys.platform == "linux" and not dist.is_initialized() else "spawn"
    mp.start_processes(_worker, args=(jobs, str(root)), nprocs=4, start_method=method)
    print(f"four gloo ranks ran {len(jobs)} jobs in {time.perf_counter() - t0:.1f} s")
    return out


def assert_retraces(rows, want, rel=1e-5):
    assert [r["step"] for r in rows] == [r["step"] for r in want] == list(range(STEPS + 1))
    for got, ref in zip(rows, want):
        assert got.keys() == ref.keys(), got["step"]
        for key, value in ref.items():
            if key != "tok_s":
                assert got[key] == pytest.approx(value, rel=rel), (got["step"], key)


def saved_losses(out):
    return [checkpoint.read_train_meta(p)["loss"] for p in checkpoint.checkpoints(out / "ckpt")]


# -----------------------------------------------------------------------------


@pytest.mark.parametrize("name, world", [("cp2", 2), ("dp2-cp2", 4)])
def test_cp_run_retraces_the_one_rank_run(runs, name, world):
    one = metrics(runs["one"])
    assert one[-1]["ttt_dw_rel.1"] > 1e-3 and one[-1]["val_loss_pos.64-128"] < one[0]["val_loss_pos.64-128"] - 0.5
    assert_retraces(metrics(runs[name]), one)
    assert saved_losses(runs[name]) == pytest.approx(saved_losses(runs["one"]), rel=1e-5)  # checked saves
    ckpt = checkpoint.checkpoints(runs[name] / "ckpt")[-1]
    meta = checkpoint.read_train_meta(ckpt)
    assert (meta["args"]["cp"], meta["world_size"]) == (2, world)
    assert {f"__{r}_0.distcp" for r in range(world)} <= set(meta["files"])  # parameters sharded over every rank


def test_cp_run_in_bf16_retraces_the_one_rank_bf16_run(runs):
    """bf16 compute, the GPU default: rounded in another order than one rank, as two data-parallel
    ranks are (test_train_precision.py, same tolerance; measured here: <= 3.2e-5)."""
    one, cp = metrics(runs["one-bf16"]), metrics(runs["cp2-bf16"])
    assert [r["step"] for r in cp] == [r["step"] for r in one] and cp[-1]["loss"] < cp[1]["loss"] - 0.5
    for got, want in zip(cp, one):
        for key in ("loss", "val_loss", "val_loss_pos.64-128"):
            if key in want:
                assert got[key] == pytest.approx(want[key], rel=2e-4), (got["step"], key)


def test_cp_export_holds_the_one_rank_weights(runs):
    one, cp = load_file(runs["one"] / "hf" / "model.safetensors"), load_file(runs["cp2"] / "hf" / "model.safetensors")
    assert one.keys() == cp.keys()
    for key in one:  # Adam moves an entry whose gradient is near zero by up to lr, whatever its rounding
        torch.testing.assert_close(cp[key], one[key], rtol=0, atol=1e-4, msg=key)


def test_cp2_checkpoint_resumes_under_cp2_exactly(runs):
    assert without_timing(metrics(runs["resume-cp2"])) == without_timing(metrics(runs["cp2"]))


def test_cp2_checkpoint_resumes_under_cp1_to_rounding(runs):
    assert_retraces(metrics(runs["resume-cp1"]), metrics(runs["cp2"]))


def test_compiled_and_checkpointed_blocks_under_cp_give_the_one_rank_eager_gradients(runs):
    """As test_train_precision.py's "both" case, with each sequence split over two ranks: the
    collectives (shard_keys, the TTT prefix) stay out of the compiled graphs and run again in the
    recomputation."""
    cfg = small_config().with_ttt(lr=3.0)
    loss, grads = torch.load(runs["compiled"], weights_only=True)
    want_loss, want = loss_and_grads(cfg, full_state(cfg), IDX)
    assert loss == pytest.approx(want_loss, rel=1e-5)
    assert grads.keys() == want.keys()
    for name, g in grads.items():
        scale = want[name].abs().max().item()  # per parameter: TTT gradients are ~20x smaller
        torch.testing.assert_close(g, want[name], rtol=1e-5, atol=1e-6 * scale, msg=name)


@pytest.mark.parametrize("extra, message", [
    (["--seq-len", "40"], "--cp 2: a sequence of 40 tokens splits into shards of 20, not a whole number of TTT "
                          "chunks of 16: use a length that is a multiple of 2 x 16 = 32"),
    (["--no-ttt", "--seq-len", "63"], "--cp 2: a sequence of 63 tokens does not split into 2 equal shards"),
    ([], "--cp 2: 1 rank(s) do not form groups of 2"),
], ids=["shard-not-whole-chunks", "unequal-shards", "world-not-a-multiple"])
def test_a_split_that_cannot_run_is_refused_before_anything_is_written(tmp_path, byte_tokenizer, cache, extra,
                                                                       message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        train.main(small_args(byte_tokenizer, cache, tmp_path / "run", "--cp", "2", *extra))
    assert not (tmp_path / "run").exists()


def test_prepare_only_tokenises_in_one_process_for_a_cp_job(tmp_path, byte_tokenizer):
    args = small_args(byte_tokenizer, str(tmp_path / "cache"), tmp_path / "run", "--cp", "4", "--prepare-only")
    assert train.main(args) is None and list((tmp_path / "cache").glob("*.bin"))


def test_one_rank_takes_a_length_that_is_not_whole_chunks(byte_tokenizer):
    flags = train.parse_args(small_args(byte_tokenizer, "", ""))
    cfg = train_model.model_config(override=dict(flags.override), ttt_layers=flags.ttt_layers, ttt_chunk=16)
    try:
        _, _, device = train.setup_distributed("cpu")
        assert train.context_parallel(1, 40, cfg, device) == (0, 1, None)
    finally:
        dist.destroy_process_group()
