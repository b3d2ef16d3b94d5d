#!/usr/bin/env python3
"""A stand-in for the Anthropic Messages API on 127.0.0.1, so that Claude Code can run a real
turn offline: its first reply asks for one tool call, its second ends the turn. Every request
body is appended as one JSON line to LOG, so a test can read the `tool_result` Claude Code
hands its model — what the model would really see of a tool's result.

    fake_anthropic.py LOG TOOL ARGS_JSON

Prints `listening on PORT` once ready; serves until killed.
"""

import http.server
import json
import sys

LOG, TOOL, ARGS = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])


def has_tool_result(body):
    msgs = body.get("messages") or []
    last = msgs[-1] if msgs else {}
    content = last.get("content")
    return isinstance(content, list) and any(c.get("type") == "tool_result" for c in content)


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        n = int(self.headers.get("content-length") or 0)
        body = json.loads(self.rfile.read(n) or b"{}")
        with open(LOG, "a") as f:
            f.write(json.dumps({"path": self.path, "body": body}) + "\n")
        offered = [t.get("name") for t in body.get("tools") or []]
        if TOOL in offered and not has_tool_result(body):
            blocks, stop = [{"type": "tool_use", "id": "toolu_koubou_1", "name": TOOL, "input": ARGS}], "tool_use"
        else:
            blocks, stop = [{"type": "text", "text": "done"}], "end_turn"
        message = {"id": "msg_fake", "type": "message", "role": "assistant", "model": body.get("model", "fake"),
                   "content": blocks, "stop_reason": stop, "stop_sequence": None,
                   "usage": {"input_tokens": 1, "output_tokens": 1}}
        if not body.get("stream"):
            out = json.dumps(message).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.end_headers()

        def event(kind, data):
            self.wfile.write(f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode())

        event("message_start", {"type": "message_start", "message": dict(message, content=[], stop_reason=None)})
        for i, b in enumerate(blocks):
            if b["type"] == "tool_use":
                event("content_block_start", {"type": "content_block_start", "index": i, "content_block": dict(b, input={})})
                delta = {"type": "input_json_delta", "partial_json": json.dumps(b["input"])}
            else:
                event("content_block_start", {"type": "content_block_start", "index": i,
                                              "content_block": {"type": "text", "text": ""}})
                delta = {"type": "text_delta", "text": b["text"]}
            event("content_block_delta", {"type": "content_block_delta", "index": i, "delta": delta})
            event("content_block_stop", {"type": "content_block_stop", "index": i})
        event("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                                "usage": {"output_tokens": 1}})
        event("message_stop", {"type": "message_stop"})

    def do_GET(self):
        self.send_response(404)
        self.end_headers()


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(f"listening on {server.server_address[1]}", flush=True)
server.serve_forever()
