#!/usr/bin/env python3
"""Benchmark llama.cpp through llama-cpp-python on the same terms as
crates/koubou-llama/examples/bench_engine.rs: same GGUF, same raw prompt (~85 tokens, tokenized
with BOS and special tokens parsed), same thread count, N greedy tokens (end-of-generation
ignored), median of R runs.

Run it with the venv's python:
    PY=$(scripts/ensure-llama-cpp-python.sh)
    $PY scripts/bench-llama-cpp-python.py --model ~/.cache/koubou/models/smollm2-135m-instruct.Q4_1.gguf --threads 1
Add --load to keep one other core busy (a `yes` process, bounded by `timeout`) while measuring.
Prints one human line, or one JSON object with --json.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# Keep in sync with BENCH_PROMPT in crates/koubou-llama/examples/bench_engine.rs.
BENCH_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant who writes clear, detailed and well organised "
    "explanations for curious readers.<|im_end|>\n<|im_start|>user\nExplain step by step how a "
    "bicycle works: describe the frame, the wheels, the chain and the gears, the brakes, and how the "
    "rider keeps balance while moving. Then give three practical tips for keeping a bicycle in good "
    "condition through the winter.<|im_end|>\n<|im_start|>assistant\n"
)


def vm_hwm_mb():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--load", action="store_true", help="keep one other core busy while measuring")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from llama_cpp import Llama  # imported late so --help works without the venv

    llm = Llama(
        model_path=args.model,
        n_ctx=args.ctx,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_batch=512,
        n_ubatch=512,
        verbose=False,
        seed=0,
    )
    prompt_tokens = llm.tokenize(BENCH_PROMPT.encode("utf-8"), add_bos=True, special=True)

    load = None
    if args.load:
        # Bounded by `timeout`; stopped with SIGTERM, which timeout forwards to `yes`.
        load = subprocess.Popen(
            ["timeout", "600", "yes"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.3)
    try:
        runs = []
        first_tokens = None
        for _ in range(args.runs):
            llm.reset()
            t0 = time.perf_counter()
            stamps = []
            toks = []
            for tok in llm.generate(prompt_tokens, temp=0.0, top_k=1, reset=True):
                stamps.append(time.perf_counter())
                toks.append(tok)
                if len(toks) >= args.tokens:
                    break
            first = stamps[0] - t0
            gen = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
            runs.append((len(prompt_tokens) / first, gen, first))
            if first_tokens is None:
                first_tokens = toks
    finally:
        if load is not None:
            load.terminate()
            load.wait()

    result = {
        "engine": "llama-cpp-python",
        "threads": args.threads,
        "load": args.load,
        "prompt_tokens": len(prompt_tokens),
        "gen_tokens": args.tokens,
        "runs": args.runs,
        "prompt_tps": statistics.median(r[0] for r in runs),
        "gen_tps": statistics.median(r[1] for r in runs),
        "first_token_s": statistics.median(r[2] for r in runs),
        "peak_rss_mb": vm_hwm_mb(),
        "first_tokens": first_tokens[:16],
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"llama-cpp-python threads={args.threads} load={'yes' if args.load else 'no '} seqs=1: "
            f"prompt {result['prompt_tps']:7.1f} tok/s  gen {result['gen_tps']:6.1f} tok/s  "
            f"first token {result['first_token_s']:.3f} s  peak RSS {result['peak_rss_mb']:.0f} MB  "
            f"(prompt {len(prompt_tokens)} tok, {args.tokens} tok, median of {args.runs})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
