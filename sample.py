r"""Generate text: a chunked prefill builds the KV cache and fast weights, then one token per step.

    python sample.py  # the byte-level model `python train.py` wrote
    python sample.py --model HuggingFaceTB/SmolLM2-135M-Instruct --chat \
        --prompt "What is the capital of France?"
    python sample.py --model Qwen/Qwen3-0.6B-Base --prompt-file book.txt --max-new-tokens 200 --no-echo
    python sample.py --model Qwen/Qwen3-0.6B-Base --prompt-file book.txt --no-ttt  # W0 only
    python sample.py --model DIR --prompts-file prompts.jsonl  # {"prompt": ...} per line: a batch
    python sample.py --model DIR --prompt-tokens 32768 --max-new-tokens 256 --ignore-eos --compile

Output: the prompt, then the continuation as it is made (--no-echo: the continuation alone); the
prefill and decode figures go to stderr.

How a prompt is read. Each row is prefilled alone (`cache.rows(b, b + 1)`; rows of one length go
together), in pieces of --prefill-chunk tokens that start at multiples of it (default: a multiple of
the TTT chunk C, at least 4096), so TTT updates fold in piece by piece and only the last position's
logits are made. Rows may differ in length: nothing is padded, and every row's chunk boundaries sit
at its own absolute positions. Then all rows decode
together, one token per step, each at its own position. A TTT layer holds W0 + ΣΔW per row for decoding (a plain
MLP's cost per token) and folds in a chunk's update right after the step that completes it (ttt.fold, called
by model.py's `Transformer._fold_completed_chunks`, kept out of the compiled graph).

Context. A prompt plus --max-new-tokens must fit in max_position_embeddings of config.json.
--rope-scaling takes an HF rope_scaling dict and raises the limit to factor x
original_max_position_embeddings, e.g. Qwen3's YaRN (131072 tokens):
    --rope-scaling '{"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}'
--allow-long skips the check (positions past training: expect degraded text).

--compile compiles the decode step (the KV cache is preallocated, so shapes never change; CUDA
graphs on CUDA). The first steps include compilation (tens of seconds; minutes on a CPU, where it
gains little) and are left out of the decode rate.
"""

import argparse
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import torch

from cli import default_device, default_dtype, parse_dtype, parse_rope_scaling, resolve
from load_hf import load_config, load_model, load_tokenizer, with_rope_scaling
from model import sample_next

DEFAULT_CHECKPOINT = "out/bytes/hf"  # where `python train.py` (no flags) exports its model
# Default prefill piece: the multiple of C nearest above this. Big forwards are fast (64-token
# pieces are 3x slower per token than 4096-token ones, even on a CPU), and pieces bound the memory
# a long prompt needs.
PREFILL_TOKENS = 4096
COMPILE_WARMUP_STEPS = 3  # compiled decode: steps that compile / record CUDA graphs, not timed


# -----------------------------------------------------------------------------
# Prefill and decode


def prefill(model, cache, prompts: list[list[int]], chunk: int):
    """Feed each prompt into its cache row in pieces of `chunk` tokens; returns the last position's
    logits (B, V). Rows of equal length go in together; otherwise row by row, since a multi-token
    forward needs all its rows at one position."""
    device = cache.pos.device
    B = len(prompts)
    groups = [(0, B)] if len({len(p) for p in prompts}) == 1 else [(b, b + 1) for b in range(B)]
    last = []
    for b0, b1 in groups:
        rows = cache.rows(b0, b1)  # a view: the prefill writes straight into the batch's cache
        ids = torch.tensor(prompts[b0:b1], dtype=torch.long, device=device)  # (b1 - b0, T)
        for i in range(0, ids.shape[1], chunk):  # pieces start at multiples of chunk: a fold each
            logits = model(ids[:, i:i + chunk], rows, last_only=True)  # (b1 - b0, 1, V)
        last.append(logits[:, -1])
    return torch.cat(last)


def decode_one_token(model, cache, tokens):
    """One decoding step, every row at its own position: tokens (B, 1) -> next logits (B, V)."""
    return model(tokens, cache)[:, -1]


_compiled_steps = {}  # one compiled step per device type, reused by every later generate call


def compiled_decode_step(device: torch.device):
    """decode_one_token under torch.compile: static shapes, CUDA graphs on CUDA (gpt-fast's way)."""
    if device.type not in _compiled_steps:
        mode = "reduce-overhead" if device.type == "cuda" else None  # reduce-overhead = CUDA graphs
        _compiled_steps[device.type] = torch.compile(decode_one_token, mode=mode, dynamic=False)
    return _compiled_steps[device.type]


def mark_static(cache):
    """Tell the compiler the cache tensors keep their addresses, so CUDA graphs may update them in place."""
    states = [t for s in cache.ttt.values() for t in (s.dW, s.W, s.s_buf, s.h_buf, s.pos)]
    for t in [*cache.k, *cache.v, *states, cache.pos]:
        torch._dynamo.mark_static_address(t)


def _now(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # CUDA runs ahead of the host: wait, or the clock lies
    return time.perf_counter()


@torch.no_grad()
def generate(model, prompts: list[list[int]], max_new_tokens: int, *, temperature=0.0, top_k=None,
             top_p=None, eos_ids=None, seed=None, prefill_chunk=None, on_token=None, compile=False,
             stats=None) -> list[list[int]]:
    """New tokens for each prompt (a list of token ids), at most max_new_tokens per row, stopping at
    any of eos_ids (an id or a collection of ids; the stop token is not returned). Each row's result
    equals running it alone. prefill_chunk: prompt tokens per forward (default: see PREFILL_TOKENS).
    on_token(row, token) is called as tokens are made (streaming). compile: torch.compile the decode
    step. `stats`, a dict, receives timings."""
    if not prompts or min(len(p) for p in prompts) == 0:
        raise ValueError("generate needs at least one prompt, and every prompt at least one token")
    if max_new_tokens < 1:
        return [[] for _ in prompts]
    # One stop id or several (Llama-3 instruct stops at <|eot_id|> and <|eom_id|> too).
    stop = set() if eos_ids is None else {eos_ids} if isinstance(eos_ids, int) else set(eos_ids)
    device = model.lm_head.weight.device
    # A generator of its own: the same seed gives the same text whatever ran before.
    generator = None if seed is None else torch.Generator(device).manual_seed(seed)
    pick = lambda logits: sample_next(logits, temperature, top_k, top_p, generator)
    # Sized once for the longest row: decoding never reallocates, which compiled steps rely on.
    cache = model.new_cache(len(prompts), max(len(p) for p in prompts) + max_new_tokens)
    step = decode_one_token
    if compile:  # the compiled step updates the cache in place, at fixed addresses
        mark_static(cache)
        step = compiled_decode_step(device)

    start = _now(device)
    C = model.config.ttt_chunk
    piece = prefill_chunk or C * -(-PREFILL_TOKENS // C)  # a multiple of C, so folds stay aligned
    logits = prefill(model, cache, prompts, piece)  # (B, V)
    # NaN or inf weights make every logit NaN: argmax would then print token 0 for ever and a draw
    # fail inside torch. One check of the first logits catches them, for one host sync.
    if not torch.isfinite(logits).all():
        raise ValueError("the logits after the prompt are not finite (NaN or inf): the weights "
                         "hold NaN or inf, or overflow in this dtype")
    tokens = pick(logits)  # (B,)
    out, finished, times = [[] for _ in prompts], [False] * len(prompts), []
    for i in range(max_new_tokens):
        for b, t in enumerate(tokens.tolist()):  # each step's one host sync: stops, streaming
            if finished[b] or t in stop:
                finished[b] = True
                continue
            out[b].append(t)
            if on_token is not None:
                on_token(b, t)
        times.append(time.perf_counter())  # tolist() waited for the device, so this time is real
        if all(finished) or i == max_new_tokens - 1:  # no step whose token would be thrown away
            break
        # Finished rows keep stepping (their tokens are dropped); the batch shape stays fixed.
        tokens = pick(step(model, cache, tokens[:, None]))
    if stats is not None:
        stats.update(prompt_tokens=sum(map(len, prompts)), batch=len(prompts),
                     prefill_s=times[0] - start, step_s=[b - a for a, b in zip(times, times[1:])])
    return out


# -----------------------------------------------------------------------------
# Command line: checkpoint, prompts, checks


def find_checkpoint(src) -> Path:
    """An HF directory, a train.py output directory (its export sits in hf/), or a hub id."""
    if src is None:
        path = Path(DEFAULT_CHECKPOINT)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no --model given and no checkpoint at {path}, where "
                                    f"`python train.py` exports its model; train one first or pass "
                                    f"--model DIR|HUB_ID")
        return path
    path = Path(src).expanduser()
    if path.is_dir():
        for candidate in (path, path / "hf"):  # a train.py run keeps its export in hf/
            if (candidate / "config.json").is_file():
                return candidate
        raise FileNotFoundError(f"{path} has neither config.json nor hf/config.json: not an HF "
                                f"checkpoint or a train.py output directory")
    try:  # a local-looking path that is not there fails at once, without asking the hub
        return resolve(src)
    except OSError as e:
        raise FileNotFoundError(f"--model {src}: {e}") from None


def hf_adds_bos(path: Path) -> bool:
    """Whether HF's tokenizer prepends BOS to plain text (Llama-3: yes; Qwen3, SmolLM2: no), as
    tokenizer.json's post-processor says; Meta's tokenizer.model always does."""
    spec = path / "tokenizer.json"
    if not spec.is_file():
        return (path / "tokenizer.model").is_file()
    post = json.loads(spec.read_text(encoding="utf-8")).get("post_processor") or {}
    for p in post.get("processors", [post]):  # a Sequence of processors, or a single one
        if p.get("type") == "TemplateProcessing":
            return "SpecialToken" in p["single"][0]
    return False


def read_prompts(tok, vocab_size: int, add_bos: bool, *, prompt=None, prompt_file=None,
                 prompts_file=None, prompt_tokens=None, chat=False, seed=None):
    """(texts, token ids) of each prompt, from the one source given (the --prompt* flags); a text
    is what the model continues (the chat template's, with --chat), None for random ids. Raises
    ValueError with a message for the user."""
    if prompt_tokens is not None:  # random ordinary tokens, for speed runs
        # Ids both the model and the tokenizer have, never a special token (a random EOS or chat
        # marker would make the prompt unlike any text).
        allowed = torch.ones(min(vocab_size, tok.vocab_size), dtype=torch.bool)
        allowed[[i for i in tok.special_tokens.values() if i < len(allowed)]] = False
        pool = allowed.nonzero()[:, 0]
        g = torch.Generator().manual_seed(seed or 0)
        return [None], [pool[torch.randint(len(pool), (prompt_tokens,), generator=g)].tolist()]
    if prompts_file is not None:
        texts = []
        for n, line in enumerate(read_text(prompts_file).splitlines(), 1):
            if not line.strip():
                continue  # blank lines (a trailing newline, spacing) are not prompts
            try:
                texts.append(json.loads(line)["prompt"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f'{prompts_file} line {n}: expected {{"prompt": "..."}}') from None
            if not isinstance(texts[-1], str):
                raise ValueError(f"{prompts_file} line {n}: the prompt must be a string")
        if not texts:
            raise ValueError(f"{prompts_file} holds no prompts")
    else:
        texts = [read_text(prompt_file) if prompt_file is not None else prompt]
    shown, prompts = [], []
    for n, text in enumerate(texts, 1):
        if chat:  # the template spells its own special tokens (and BOS, for Llama-3)
            shown.append(tok.apply_chat([{"role": "user", "content": text}]))
            ids = tok.encode(shown[-1], allow_special=True)
        else:
            shown.append(text)
            ids = tok.encode(text, bos=add_bos)
        if not text.strip() or not ids:  # a prompt of only spaces, or of bytes the tokenizer drops
            raise ValueError("the prompt is empty" if len(texts) == 1 else f"prompt {n} is empty")
        prompts.append(ids)
    return shown, prompts


def read_text(path) -> str:
    """A UTF-8 file's text; unreadable or not UTF-8 is a ValueError that names the file."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None


class TextStream:
    """Prints the text of a growing token list, holding back a trailing partial UTF-8 character."""

    def __init__(self, tok):
        self.tok, self.ids, self.shown = tok, [], 0

    def __call__(self, row, token):
        self.ids.append(token)
        text = self.tok.decode(self.ids)  # whole text each time: a character may span tokens
        if not text.endswith("\ufffd"):
            print(text[self.shown:], end="", flush=True)
            self.shown = len(text)


def summary(stats, device, compiled: bool) -> str:
    """One line: prefill and decode rates, peak memory (CUDA allocator, or the process's RSS)."""
    steps = stats["step_s"][COMPILE_WARMUP_STEPS:] if compiled else stats["step_s"]
    rate = stats["prompt_tokens"] / stats["prefill_s"]
    # Decode counts tokens of every row: a batch's rate is what the batch produces per second.
    line = (f"prompt tokens {stats['prompt_tokens']} | prefill {rate:.0f} tok/s "
            f"({stats['prefill_s']:.2f} s)")
    if steps:
        rows = f" x {stats['batch']} rows" if stats["batch"] > 1 else ""
        rate = len(steps) * stats["batch"] / sum(steps)
        line += f" | decode {rate:.1f} tok/s ({len(steps)} steps{rows}"
        line += f" after {COMPILE_WARMUP_STEPS} warm-up)" if compiled else ")"
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        return line + f" | peak memory {peak:.2f} GiB (CUDA)"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
    return line + f" | peak RSS {peak:.2f} GiB | threads {torch.get_num_threads()}"


# -----------------------------------------------------------------------------


def fail(message: str):
    """Exit with one line for input that parses but cannot be used (a flag's value out of range, a
    prompt too long, a directory that is not a checkpoint): argparse's error() would bury it under
    the whole usage block. Errors of flag syntax (an unknown flag, a number that is not one) stay
    argparse's."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(1)


def default_threads() -> int:
    """$OMP_NUM_THREADS if set, else half the cores this process may use (at least 1). torch's
    default, every core, collapsed 14-30x beside a busy process on 2 cores (bench/RESULTS.md)."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else max(1, len(os.sched_getaffinity(0)) // 2)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # what to run
    p.add_argument("--model", help=f"HF checkpoint directory, hub id, or train.py output directory "
                                   f"(default: {DEFAULT_CHECKPOINT}, where train.py exports)")
    p.add_argument("--no-ttt", action="store_true",
                   help="same checkpoint with fast-weight updates off (W0 only)")
    p.add_argument("--rope-scaling", type=parse_rope_scaling, metavar="JSON",
                   help="HF rope_scaling dict to extend the context, e.g. Qwen3's YaRN (see above)")
    p.add_argument("--device", default=default_device(),
                   help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu: "
                        "%(default)s here)")
    p.add_argument("--dtype", type=parse_dtype,
                   help="bf16, fp16 or fp32 (default: bf16 on CUDA, fp32 on CPU)")
    # the prompt: one of these (default: a short text prompt)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default="The meaning of life is",
                     help="prompt text (default: %(default)r)")
    src.add_argument("--prompt-file", help="read the prompt from this UTF-8 text file")
    src.add_argument("--prompt-tokens", type=int, metavar="N",
                     help="a random prompt of N tokens, for speed runs (never printed)")
    src.add_argument("--prompts-file", metavar="FILE.jsonl",
                     help='one {"prompt": "..."} per line, run as one batch')
    p.add_argument("--chat", action="store_true",
                   help="wrap each prompt in the tokenizer's chat template")
    p.add_argument("--allow-long", action="store_true",
                   help="run past the model's context instead of refusing")
    p.add_argument("--no-echo", action="store_true",
                   help="print only the generated text; by default the prompt (with --chat: the "
                        "chat template's text) comes first and the continuation follows it")
    # decoding
    p.add_argument("--max-new-tokens", type=int, default=200,
                   help="K: tokens to generate per prompt at most (default: 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 means greedy (default: 0.8)")
    p.add_argument("--top-k", type=int,
                   help="sample among the k most likely tokens only (default: all)")
    p.add_argument("--top-p", type=float,
                   help="sample within the smallest set of probability >= p (default: 1)")
    p.add_argument("--seed", type=int,
                   help="seed for sampling and --prompt-tokens (default: unseeded / 0)")
    p.add_argument("--ignore-eos", action="store_true", help="always make K tokens (speed runs)")
    # speed
    p.add_argument("--prefill-chunk", type=int,
                   help=f"prompt tokens per prefill forward (default: the multiple of the TTT "
                        f"chunk C nearest above {PREFILL_TOKENS})")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (slow to compile on CPU)")
    p.add_argument("--threads", type=int, default=default_threads(),
                   help="CPU threads (default: $OMP_NUM_THREADS, else half the cores, at least 1: "
                        "%(default)s here). With torch's default, every core, decoding fell from "
                        "145-340 to 3-14 tok/s on 2 cores beside one busy process")
    return p


def check_flags(args):
    """Flag values argparse's types let through. Each is one line naming the flag, the value and
    what is allowed (fail): the usage block would bury a message about one value."""
    for name in ("max_new_tokens", "prompt_tokens", "prefill_chunk", "top_k", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    # float() accepts nan and inf: nan poisons the softmax, inf silently makes it uniform.
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        fail(f"--temperature must be a finite number >= 0 (0: greedy), got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:  # nan fails this comparison too
        fail(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.chat and args.prompt_tokens is not None:  # random ids have no text to wrap
        fail("--chat wraps text prompts; it cannot be used with --prompt-tokens")


def read_inputs(args):
    """Checkpoint path, config, tokenizer, and each prompt's text and ids (read_prompts), all
    checked before any weights are read; OSError / ValueError with a message naming the input."""
    path = find_checkpoint(args.model)
    cfg = load_config(path)
    if args.rope_scaling is not None:
        cfg = with_rope_scaling(cfg, args.rope_scaling)
    tok = load_tokenizer(path)
    texts, prompts = read_prompts(tok, cfg.vocab_size, hf_adds_bos(path), prompt=args.prompt,
                                  prompt_file=args.prompt_file, prompts_file=args.prompts_file,
                                  prompt_tokens=args.prompt_tokens, chat=args.chat, seed=args.seed)
    limit = cfg.max_position_embeddings  # past it RoPE positions were never trained
    for n, p in enumerate(prompts):
        if len(p) + args.max_new_tokens > limit and not args.allow_long:
            which = "the prompt" if len(prompts) == 1 else f"prompt {n + 1}"
            raise ValueError(f"{which} ({len(p)} tokens) + --max-new-tokens {args.max_new_tokens} "
                             f"exceeds the model's context of {limit} tokens "
                             f"(max_position_embeddings); shorten it, extend the context with "
                             f"--rope-scaling, or pass --allow-long")
    return path, cfg, tok, texts, prompts


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_flags(args)
    try:  # everything that can be wrong with the input is checked before the weights are read
        path, cfg, tok, texts, prompts = read_inputs(args)
    except (OSError, ValueError) as e:
        fail(str(e))

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    dtype = args.dtype or default_dtype(device)
    try:
        model = load_model(path, device=device, dtype=dtype, config=cfg).eval()
    except (OSError, ValueError, KeyError) as e:  # missing, truncated or mismatched weights
        # e.args[0], not str(e): str() of a KeyError wraps the message in quotes.
        fail(e.args[0] if isinstance(e, KeyError) else str(e))
    model.ttt_enabled = not args.no_ttt
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the summary reports generation, not loading
    # The prompt, then the continuation as it comes; random ids (--prompt-tokens) are not text.
    echo = [t or "" for t in texts] if not args.no_echo else [""] * len(texts)
    stream = TextStream(tok) if len(prompts) == 1 else None  # a batch prints once it is done
    if stream is not None:
        print(echo[0], end="", flush=True)
    stats = {}
    try:
        outs = generate(model, prompts, args.max_new_tokens, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                        eos_ids=None if args.ignore_eos else tok.eos_ids,
                        prefill_chunk=args.prefill_chunk, on_token=stream, compile=args.compile,
                        stats=stats)
    except ValueError as e:  # logits that are not finite
        fail(f"{path}: {e}")
    if stream is None:
        for n, (text, out) in enumerate(zip(echo, outs), 1):
            print(f"### {n}\n{text}{tok.decode(out)}\n")
    else:
        print(tok.decode(outs[0])[stream.shown:], flush=True)  # whatever the stream held back
    print(summary(stats, device, args.compile), file=sys.stderr)  # stdout stays the text alone
    return outs


if __name__ == "__main__":
    main()
