"""A stand-in LLM for tests: reads the task JSON on stdin, streams its answer word by word.

A prompt containing "slow" streams one word and then sleeps (something to cancel); one
containing "explode" fails.
"""
import json
import sys
import time

task = json.load(sys.stdin)
prompt = task.get("prompt", "")
if "explode" in prompt:
    print("the craftsman dropped the hammer", file=sys.stderr)
    sys.exit(3)
words = ("Answer to " + json.dumps(prompt) + ": the craftsman worked carefully and finished the piece.").split(" ")
for i, w in enumerate(words):
    sys.stdout.write(w + ("" if i == len(words) - 1 else " "))
    sys.stdout.flush()
    if "slow" in prompt and i == 1:
        time.sleep(600)
    time.sleep(0.04)
