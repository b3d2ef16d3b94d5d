#!/usr/bin/env python3
"""Drives Koubou's MCP server with the official MCP Python SDK (`mcp` 2.3.0): a client we did
not write. Run by crates/koubou-mcp/tests/real_clients.rs; usable by hand:

    PY=$(scripts/ensure-mcp-python.sh)
    $PY tests/mcp/client_test.py --mode legacy --files-dir DIR --stdio /abs/koubou mcp --embedded
    $PY tests/mcp/client_test.py --mode 2026-07-28 --files-dir DIR --http http://127.0.0.1:8765/mcp

The server must run tasks with tests/mcp/fake_llm.py on ONE worker (pool max_workers = 1), with
[mcp] allowed_paths = [DIR], max_wait_secs = 6, progress_every_secs = 1, max_result_chars = 1000.
Prints one line per check and ends with "N passed, N failed"; exits 1 on any failure.
"""

import argparse
import asyncio
import json
import os
import sys
import time
import uuid

from mcp.client.client import Client
from mcp.client.stdio import StdioServerParameters

EXPECTED_TOOLS = {"delegate_task", "get_task", "wait_for_task", "list_tasks", "cancel_task", "system_status"}
passed = 0
failed = 0


def check(cond, what, detail=""):
    global passed, failed
    if cond:
        passed += 1
        print(f"ok   {what}", flush=True)
    else:
        failed += 1
        print(f"FAIL {what} {detail}", flush=True)
    return cond


def sc(result):
    """The structured content of a tool result (a dict)."""
    return result.structured_content or {}


def text(result):
    return "".join(getattr(c, "text", "") for c in result.content)


def connect(args):
    if args.http:
        server = args.http
    else:
        server = StdioServerParameters(command=args.stdio[0], args=args.stdio[1:], env=dict(os.environ))
    return Client(server, mode=args.mode, read_timeout_seconds=30)


async def call(client, name, arguments=None, progress=None):
    return await client.call_tool(name, arguments or {}, progress_callback=progress)


def recorder():
    notes = []

    async def on_progress(progress, total, message):
        notes.append((time.monotonic(), progress, total, message))

    return notes, on_progress


async def main(args):
    async with connect(args) as client:
        print(f"connected: protocol {client.protocol_version}, server {client.server_info}", flush=True)
        if args.mode != "auto":
            want = "2025-11-25" if args.mode == "legacy" else args.mode
            check(client.protocol_version == want, f"negotiated {want}", client.protocol_version)
        if args.mode == "legacy":
            # (In 2026-07-28 mode this SDK does not surface the instructions server/discover sends.)
            check(bool(client.instructions) and "Koubou" in client.instructions, "server instructions")

        # tools/list: the six tools, each with a schema and a description.
        listed = await client.list_tools()
        names = {t.name for t in listed.tools}
        check(names == EXPECTED_TOOLS, "tools/list has the six tools", names)
        for t in listed.tools:
            check(t.input_schema.get("type") == "object" and t.description, f"{t.name} has schema and description")
        size = len(json.dumps([t.model_dump(by_alias=True, exclude_none=True) for t in listed.tools]))
        print(f"tools/list: {size} chars of JSON for the tools (~{size // 4} tokens at 4 chars/token)", flush=True)

        # delegate_task answering directly within wait_seconds.
        r = await call(client, "delegate_task", {"prompt": "hello world", "wait_seconds": 5})
        s = sc(r)
        check(not r.is_error and s.get("status") == "completed", "delegate_task with wait returns the answer", s)
        check("echo: hello world" in (s.get("result") or ""), "answer in structuredContent.result", s)
        check("echo: hello world" not in text(r) and "structuredContent.result" in text(r),
              "the text block points to the answer instead of repeating it", text(r))
        done_id = s.get("task_id")

        # Context files from the allowed folder reach the craftsman.
        ctx = os.path.join(args.files_dir, "context.txt")
        with open(ctx, "w") as f:
            f.write("the secret word is tomato\n")
        r = await call(client, "delegate_task", {"prompt": "SHOWPROMPT what is the word?", "files": [ctx], "wait_seconds": 5})
        check(not r.is_error and "tomato" in (sc(r).get("result") or ""), "files are attached to the prompt", text(r))

        # One worker: A runs (slowly), B waits behind it with a queue position.
        a = sc(await call(client, "delegate_task", {"prompt": "SLOW30 long job A"}))
        check(a.get("status") in ("pending", "running") and a.get("next"), "delegate_task without wait returns the id", a)
        deadline = time.monotonic() + 120  # a bound against hangs; a busy machine is only slower
        while sc(await call(client, "get_task", {"task_id": a["task_id"]})).get("status") != "running":
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        b = sc(await call(client, "delegate_task", {"prompt": "job B", "priority": 7}))
        g = sc(await call(client, "get_task", {"task_id": b["task_id"]}))
        check(g.get("status") == "pending" and g.get("queue_position") == 0, "get_task shows queue position", g)

        # A bounded wait on a long task: returns in time, still running, with progress on the way.
        notes, on_progress = recorder()
        t0 = time.monotonic()
        r = await call(client, "wait_for_task", {"task_id": a["task_id"], "timeout_seconds": 3}, on_progress)
        took = time.monotonic() - t0
        s = sc(r)
        check(not r.is_error and s.get("status") == "running", "wait_for_task returns the status when not done", s)
        # At least the 3 s asked for; the upper bound only tells a return from a hang (other work
        # on the machine may delay it, never shorten it).
        check(2.5 <= took < 60, f"wait_for_task honours timeout_seconds ({took:.1f} s)")
        check(len(notes) >= 2, f"progress notifications during the wait ({len(notes)})", notes)
        check(all(n[1] < m[1] for n, m in zip(notes, notes[1:])), "progress increases", notes)
        check("partial" in s or "next" in s, "a running task shows its partial answer or what to do next", s)

        # Cancel the running task; B then runs.
        r = await call(client, "cancel_task", {"task_id": a["task_id"]})
        check(not r.is_error and sc(r).get("status") == "cancelled", "cancel_task cancels a running task", sc(r))
        r = await call(client, "cancel_task", {"task_id": a["task_id"]})
        check(r.is_error, "cancelling a finished task is a tool error", text(r))
        r = await call(client, "wait_for_task", {"task_id": b["task_id"], "timeout_seconds": 6})
        check(sc(r).get("status") == "completed", "the queued task runs after the cancel", sc(r))

        # A streaming task: progress notifications carry the answer as it arrives.
        c = sc(await call(client, "delegate_task", {"prompt": "SLOW3 streaming words arrive one by one"}))
        notes, on_progress = recorder()
        r = await call(client, "wait_for_task", {"task_id": c["task_id"]}, on_progress)
        check(sc(r).get("status") == "completed", "wait_for_task returns the finished answer", sc(r))
        check(any((n[3] or "").startswith("running:") for n in notes), "progress messages report streamed text", notes)

        # The client gives up mid-wait: the task runs on and its result is kept.
        d = sc(await call(client, "delegate_task", {"prompt": "SLOW3 survivor"}))
        try:
            await asyncio.wait_for(call(client, "wait_for_task", {"task_id": d["task_id"]}), timeout=1.0)
            check(False, "the abandoned wait should not have finished")
        except (asyncio.TimeoutError, TimeoutError):
            pass
        r = await call(client, "wait_for_task", {"task_id": d["task_id"]})
        check(sc(r).get("status") == "completed" and "survivor" in sc(r).get("result", ""), "a task outlives an abandoned call", sc(r))

        # Bad arguments are tool errors and the server keeps serving.
        bad = [
            ("delegate_task", {"prompt": "x", "priority": 11}, "priority"),
            ("delegate_task", {}, "prompt"),
            ("delegate_task", {"prompt": "x", "wait_seconds": 999}, "wait_seconds"),
            ("delegate_task", {"prompt": "x", "type": "Bad Type"}, "type"),
            ("delegate_task", {"prompt": "x", "files": ["/etc/passwd"]}, "outside"),
            ("delegate_task", {"prompt": "x", "colour": "red"}, "colour"),
            ("get_task", {"task_id": "not-a-uuid"}, "task_id"),
            ("get_task", {"task_id": str(uuid.uuid4())}, "not found"),
            ("list_tasks", {"status": "sleepy"}, "status"),
        ]
        for name, arguments, word in bad:
            r = await call(client, name, arguments)
            check(r.is_error and word in text(r), f"{name} {arguments} is a tool error naming {word!r}", text(r))
        r = await call(client, "get_task", {"task_id": done_id})
        check(sc(r).get("status") == "completed", "still serving after errors")

        # A long answer is cut at [mcp] max_result_chars (1000 here) and read on with get_task's offset.
        long = "SHOWPROMPT " + "".join(chr(ord("a") + i % 26) for i in range(2400))
        r = await call(client, "delegate_task", {"prompt": long, "wait_seconds": 5})
        s = sc(r)
        check(s.get("status") == "completed" and len(s.get("result", "")) == 1000 and "offset=1000" in s.get("next", ""),
              "a long answer is cut with the offset to read on", {k: v for k, v in s.items() if k != "result"})
        whole, offset = s.get("result", ""), 1000
        while s.get("next") and offset < 10000:
            s = sc(await call(client, "get_task", {"task_id": s["task_id"], "offset": offset}))
            whole += s.get("result", "")
            offset += len(s.get("result", "")) or 10000
        check(long in whole, "get_task with offset reads the rest", len(whole))

        r = await call(client, "list_tasks", {"limit": 50})
        ids = {t["task_id"] for t in sc(r).get("tasks", [])}
        check({a["task_id"], b["task_id"], done_id} <= ids, "list_tasks lists them", sc(r))
        r = await call(client, "list_tasks", {"status": "cancelled"})
        check([t["task_id"] for t in sc(r)["tasks"]] == [a["task_id"]] or a["task_id"] in {t["task_id"] for t in sc(r)["tasks"]}, "list_tasks filters by status")
        r = await call(client, "system_status")
        s = sc(r)
        check(s.get("status") == "healthy" and s["backends"][0]["up"] and "general" in s.get("routes", {}), "system_status", s)

    print(f"{passed} passed, {failed} failed", flush=True)
    return failed == 0


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--mode", default="legacy", help="legacy, auto or 2026-07-28")
    p.add_argument("--files-dir", required=True)
    p.add_argument("--http")
    p.add_argument("--stdio", nargs=argparse.REMAINDER)
    args = p.parse_args()
    if not (args.http or args.stdio):
        p.error("give --http URL or --stdio COMMAND...")
    ok = asyncio.run(main(args))
    sys.exit(0 if ok else 1)
