// Shared by the browser scripts of this folder: what they read from the environment, Debian's
// headless Chromium on a fresh profile through playwright-core, and the checks every page gets —
// no request to a host but 127.0.0.1, no page error. A script calls `run(name, body)`;
// `body(ctx)` drives the pages, opening each with `open(ctx, name, path)`.
'use strict';
const path = require('path');
const fs = require('fs');
const os = require('os');

const base = process.env.KOUBOU_URL;
const modules = process.env.KOUBOU_NODE_MODULES;
const chromium = process.env.KOUBOU_CHROMIUM || '/usr/bin/chromium';
const artifacts = process.env.KOUBOU_ARTIFACTS || path.join(__dirname, '..', '..', 'artifacts');
if (!base || !modules) {
  console.error('set KOUBOU_URL and KOUBOU_NODE_MODULES (scripts/ensure-node-tools.sh prints it)');
  process.exit(2);
}
const { chromium: pw } = require(path.join(modules, 'playwright-core'));

const foreign = [];
const errors = [];
const watched = new WeakSet();
function watch(page, name) {
  watched.add(page);
  page.on('request', (r) => {
    const u = new URL(r.url());
    if (['data:', 'blob:', 'about:'].includes(u.protocol)) return;
    if (u.hostname !== '127.0.0.1') foreign.push(`${name}: ${r.url()}`);
  });
  page.on('pageerror', (e) => errors.push(`${name}: ${e.message}`));
  page.on('console', (m) => { if (m.type() === 'error') errors.push(`${name} console: ${m.text()}`); });
}

// A page of `ctx` (the blank one it starts with, or a new one), watched, at `base + where`.
async function open(ctx, name, where) {
  const page = ctx.pages().find((p) => !watched.has(p)) || await ctx.newPage();
  watch(page, name);
  await page.goto(base + where);
  return page;
}

function step(s) { console.log('ok -', s); }

// The path of a screenshot called `file`.
const shot = (file) => path.join(artifacts, file);

function run(name, body) {
  async function main() {
    fs.mkdirSync(artifacts, { recursive: true });
    const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'koubou-chromium-'));
    // A fresh profile (--user-data-dir, which playwright passes for a persistent context).
    const ctx = await pw.launchPersistentContext(profile, {
      executablePath: chromium,
      headless: true,
      viewport: { width: 1400, height: 1000 },
      args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
        '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    });
    try {
      await body(ctx);
    } finally {
      await ctx.close();
      fs.rmSync(profile, { recursive: true, force: true });
    }
    if (foreign.length) throw new Error('requests to other hosts:\n' + foreign.join('\n'));
    if (errors.length) throw new Error('page errors:\n' + errors.join('\n'));
    console.log(`${name} passed`);
  }
  main().catch((e) => { console.error('FAILED:', e.message); process.exit(1); });
}

module.exports = { run, open, step, shot };
