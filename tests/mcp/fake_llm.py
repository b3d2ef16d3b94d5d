#!/usr/bin/env python3
"""A stand-in LLM for Koubou's MCP tests (an `exec` backend).

Reads the task as one JSON object on stdin and streams its answer on stdout:
`echo: <last line of the prompt>`, word by word. Words in the prompt steer it:
- `SLOW<n>`: take about n seconds (default 0.5 s in all), spread over the words;
- `FAIL`: print a little, then exit 3 (the attempt fails);
- `SHOWPROMPT`: answer with the whole prompt (to check attached files).
"""
import json
import re
import sys
import time

task = json.loads(sys.stdin.readline())
prompt = task["prompt"]
if "SHOWPROMPT" in prompt:
    answer = "prompt was:\n" + prompt
else:
    last = prompt.strip().splitlines()[-1] if prompt.strip() else ""
    answer = "echo: " + last
m = re.search(r"SLOW(\d+)", prompt)
total = float(m.group(1)) if m else 0.5
words = re.split(r"(?<= )", answer)
pieces = max(len(words), 10)
delay = total / pieces
for i in range(pieces):
    if i < len(words):
        sys.stdout.write(words[i])
    sys.stdout.flush()
    time.sleep(delay)
    if "FAIL" in prompt and i == 2:
        sys.stderr.write("fake_llm: failing on purpose\n")
        sys.exit(3)
sys.stdout.write("\n")
