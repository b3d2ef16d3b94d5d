// Drives the dashboard (and GraphiQL) in Debian's headless Chromium with playwright-core.
// Run by crates/koubou-live/tests/browser.rs against a real server; can be run by hand:
//   KOUBOU_URL=http://127.0.0.1:8765 KOUBOU_NODE_MODULES=$(scripts/ensure-node-tools.sh) \
//   node tests/browser/dashboard.cjs
// Fails on any request to a host other than 127.0.0.1, and on any page error (harness.cjs).
'use strict';
const { run, open, step, shot } = require('./harness.cjs');

run('dashboard browser test', async (ctx) => {
  const page = await open(ctx, 'dashboard', '/dashboard');
  await page.waitForSelector('#conn.on', { timeout: 10000 });
  step('connected');

  // Submit from the form and watch it finish on the board, its answer in the detail panel.
  await page.fill('#f-prompt', 'Write a haiku about a lathe');
  await page.selectOption('#f-type', 'code');
  await page.fill('#f-priority', '8');
  await page.fill('#f-tags', 'Confidential, poetry');
  await page.click('#f-submit');
  await page.waitForSelector('#col-done .card[data-status="completed"]:has-text("haiku about a lathe")', { timeout: 30000 });
  await page.waitForFunction(() => document.querySelector('#d-answer').textContent.includes('finished the piece'), null, { timeout: 10000 });
  const status = await page.textContent('#d-status');
  if (status !== 'completed') throw new Error(`detail shows ${status}`);
  // Where it ran and its tags, in the detail; local or remote, in the backends table.
  await page.waitForSelector('#d-meta:has-text("(local)")', { timeout: 5000 });
  await page.waitForSelector('#d-meta:has-text("confidential, poetry")', { timeout: 5000 });
  await page.waitForSelector('#backends td:has-text("local")', { timeout: 10000 });
  step('submitted task completed on the board, answer streamed into the detail, where it ran shown');
  await page.fill('#f-tags', '');

  // The tag filter narrows the board to the tagged task.
  await page.fill('#tag-filter', 'poetry');
  await onlyCardsWith(page, 'lathe');
  await page.fill('#tag-filter', '');
  step('tag filter narrows the board');

  // Submit a slow one, see it running, cancel it.
  await page.fill('#f-prompt', 'slow: carve a temple gate');
  await page.click('#f-submit');
  await page.waitForSelector('#col-running .card:has-text("carve a temple gate")', { timeout: 20000 });
  await page.waitForFunction(() => document.querySelector('#d-answer').textContent.length > 0, null, { timeout: 10000 });
  await page.screenshot({ path: shot('dashboard-running.png'), fullPage: true });
  await page.click('#d-cancel');
  await page.waitForSelector('#col-done .card[data-status="cancelled"]:has-text("carve a temple gate")', { timeout: 10000 });
  await page.waitForSelector('#d-status:has-text("cancelled")', { timeout: 5000 });
  step('slow task cancelled');

  // Validation errors show in the form.
  await page.fill('#f-prompt', 'too urgent');
  await page.fill('#f-priority', '11');
  await page.click('#f-submit');
  await page.waitForFunction(() => document.querySelector('#f-error').textContent.includes('priority'), null, { timeout: 5000 });
  await page.fill('#f-priority', '5');
  step('validation error shown');

  // Search narrows the board.
  await page.fill('#q', 'lathe');
  await onlyCardsWith(page, 'lathe');
  await page.fill('#q', '');
  step('search filters the board');

  // Let a metrics sample or two arrive so the charts have lines.
  await page.waitForTimeout(4500);
  await page.click('#col-done .card[data-status="completed"]');
  await page.waitForTimeout(500);
  await page.screenshot({ path: shot('dashboard.png'), fullPage: true });
  await page.emulateMedia({ colorScheme: 'dark' });
  await page.waitForTimeout(300);
  await page.evaluate(() => window.dispatchEvent(new Event('resize')));
  await page.waitForTimeout(400);
  await page.screenshot({ path: shot('dashboard-dark.png'), fullPage: true });
  step('screenshots saved');

  // GraphiQL: served by Koubou, nothing from elsewhere.
  const g = await open(ctx, 'graphiql', '/graphql');
  await g.waitForSelector('.graphiql-container', { timeout: 15000 });
  await g.waitForTimeout(1000);
  await g.screenshot({ path: shot('graphiql.png') });
  step('GraphiQL rendered');
});

// Waits until the board shows cards, every one of them about `word`.
function onlyCardsWith(page, word) {
  return page.waitForFunction((w) => {
    const cards = [...document.querySelectorAll('.card')];
    return cards.length > 0 && cards.every((c) => c.title.includes(w));
  }, word, { timeout: 5000 });
}
