"""Does In-Place TTT help, and how should its new parameters start? A CPU-sized study.

    python -m study              # the whole study: about 47 minutes on 2 cores; rerun to resume
    python -m study --quick      # the same pipeline at toy sizes: about 3 minutes (the tests run it)
    pip install matplotlib       # for the plots; without it the tables are still written

Every arm is one `python train.py ...` run (OMP_NUM_THREADS=1, two at a time), scored from its HF
export, so the study uses the project's own trainer, data path and export. Finished arms (their
result.json) are skipped, a half-trained one resumes from its last checkpoint. Writes
<out>/RESULTS.md (the tables) and three pictures, <out>/study.png, <out>/text.png and
<out>/learned.png (default out/study, or out/study-quick).

1. Recall beyond the window, from scratch. Each sequence of T tokens binds n_live keys (ids
   [0, K)) to values (ids [K, K + V)) as key, value pairs, then repeats bound keys with their
   values; a key is never rebound within a sequence. A repeat is a query whose value is
   predictable only from the key's earlier occurrence d tokens back; the loss is on those answers
   alone (train.py's loss_mask), and half the queries reach back d >= W, past a sliding window of
   W tokens. Arms: full attention and SWA without TTT; SWA + TTT with the paper's look-ahead target
   from each start of starts.TTT_INITS (paper, zero-conv, zero-proj, calibrated: all exactly the
   base model at step 0; next-token, which is not, as the ceiling); the reconstruction target
   (conv held to its centre tap) from two exact starts that learn (zero-conv, calibrated; from
   zero-proj it ended at 0.05-0.10 over five seeds in an earlier run: dropped for time). Scored
   on fresh sequences: argmax accuracy at the answers, by distance.
2. Why the paper's start stalls: V_hat = conv(s) P, and each factor's gradient is scaled by the
   other. Each TTT arm's gradient norms of conv and P at step 0 (one backward on its first batch,
   computed here) and its ‖ΣΔW‖/‖W0‖ during training (train.py's metrics.jsonl).
3. Continual pretraining, the paper's main use: the quick start's model without TTT (`train.py
   --no-ttt`, trained here first) continued with --init from its export, without TTT and with TTT
   from each start; paired with the no-TTT run of the same seed (same batches, same windows).
4. Real text from scratch: full attention, SWA and SWA + TTT at a context of many windows, several
   seeds, scored on held-out speeches (the same windows for every arm), paired differences with
   intervals, and checks of two anomalies: SWA with its window's first token kept in view (an
   attention sink), full attention limited to a window at evaluation, and windows shifted by half
   their length (does a loss follow the position or the text?).
5. What the fast weight learned: the conv taps per start and target, and on one recall sequence
   the probability of each far answer before and after the chunk holding its binding is folded in.

One idea per file: task.py (the recall task), arms.py (the arms as train.py flags, and the runner),
probes.py (what is measured in a run's model; a run's flags are read back from its train.json,
so no file here imports train.py), stats.py (spreads and paired differences), report.py (the
tables), plots.py (the pictures), run.py (the command); long_context.py is part 4 at context 4,096.
"""
