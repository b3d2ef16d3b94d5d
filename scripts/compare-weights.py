#!/usr/bin/env python3
"""Compare GGUF files of one model: perplexity on a text, and how far each file's next-token
distributions are from the first file's (mean KL divergence, top-1 agreement). Used to measure
what re-encoding weights (`weights = "q8_0"` / `"q4_0"`) costs; see docs/benchmarks.md.

    PY=$(scripts/ensure-llama-cpp-python.sh)
    cat README.md ARCHITECTURE.md docs/*.md > /tmp/text.txt
    $PY scripts/compare-weights.py /tmp/text.txt ORIGINAL.gguf COPY.gguf...

The first 2,000 tokens of the text, in windows of 1,000, 2 threads, llama-cpp-python.
"""
import sys, math, numpy as np
from llama_cpp import Llama
text = open(sys.argv[1]).read()[:12000]
res = {}
for name in sys.argv[2:]:
    m = Llama(model_path=name, n_ctx=2048, logits_all=True, n_threads=2, verbose=False, seed=0)
    toks = m.tokenize(text.encode(), add_bos=False)[:2000]
    nll = 0.0; n = 0; probs = []
    for start in range(0, len(toks) - 1, 1000):
        chunk = toks[start:start + 1000]
        m.reset(); m.eval(chunk)
        logits = np.array(m.scores[:len(chunk)], dtype=np.float64)
        lp = logits - logits.max(axis=1, keepdims=True)
        lp = lp - np.log(np.exp(lp).sum(axis=1, keepdims=True))
        for i in range(len(chunk) - 1):
            nll -= lp[i, chunk[i + 1]]; n += 1
        probs.append(lp[:len(chunk) - 1])
    res[name] = np.concatenate(probs)
    print(name, "tokens", n, "perplexity %.3f" % math.exp(nll / n), flush=True)
names = sys.argv[2:]
base = res[names[0]]
for other in names[1:]:
    o = res[other]
    kl = (np.exp(base) * (base - o)).sum(axis=1).mean()
    top1 = (base.argmax(axis=1) == o.argmax(axis=1)).mean()
    print(f"{other} vs {names[0]}: mean KL {kl:.4f} nats, top-1 agreement {top1*100:.1f}%")
