// Counts the cl100k_base tokens of a tools/list reply and the server instructions, as sent on the wire.
// Usage: npm install --prefix "$KOUBOU_CACHE/js-tiktoken" js-tiktoken@1.0.21 (it ships the encodings), then
//   NODE_PATH="$KOUBOU_CACHE/js-tiktoken/node_modules" node tests/mcp/count_tokens.cjs TOOLS_LIST.json DISCOVER.json
// where each file holds one JSON-RPC reply line (e.g. captured from `koubou mcp` stdout).
const { getEncoding } = require("js-tiktoken");
const fs = require("fs");
const enc = getEncoding("cl100k_base");
const wire = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const tools = JSON.stringify(wire.result.tools);
const result = JSON.stringify(wire.result);
const d = JSON.parse(fs.readFileSync(process.argv[3], "utf8"));
const instr = d.result.instructions;
const out = {
  tools_json_chars: tools.length, tools_json_tokens_cl100k: enc.encode(tools).length,
  result_json_chars: result.length, result_json_tokens_cl100k: enc.encode(result).length,
  instructions_chars: instr.length, instructions_tokens_cl100k: enc.encode(instr).length,
  per_tool: wire.result.tools.map(t => [t.name, JSON.stringify(t).length, enc.encode(JSON.stringify(t)).length]),
};
console.log(JSON.stringify(out, null, 1));
