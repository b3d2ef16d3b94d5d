// The dashboard of a controller that runs no task itself, following a task that a worker node
// runs: submitted from the form, its answer streams into the detail token by token, then it
// shows completed with the whole answer, run by one of the node's workers; the events log names
// the node each event came from; the Nodes panel lists the worker node alive with its load.
// Run by crates/koubou/tests/cross_node.rs against real processes (`koubou serve --workers 0`
// and `koubou worker` on one Redis queue); by hand, with such a pair running:
//   KOUBOU_URL=<the controller's> KOUBOU_CONTROLLER=ctl KOUBOU_NODE=w1 KOUBOU_PROMPT='…' \
//   KOUBOU_ANSWER='<what the backend answers>' KOUBOU_NODE_MODULES=$(scripts/ensure-node-tools.sh) \
//   node tests/browser/dashboard_nodes.cjs
// Prints `task_id=<id>` for the caller. Fails on any request to a host other than 127.0.0.1, and
// on any page error (harness.cjs).
'use strict';
const { run, open, step, shot } = require('./harness.cjs');

const { KOUBOU_CONTROLLER: controller, KOUBOU_NODE: node, KOUBOU_PROMPT: prompt, KOUBOU_ANSWER: answer } = process.env;
if (!controller || !node || !prompt || !answer) {
  console.error('set KOUBOU_CONTROLLER, KOUBOU_NODE, KOUBOU_PROMPT and KOUBOU_ANSWER');
  process.exit(2);
}
// Generous: a loaded two-core machine may be slow, never wrong.
const LONG = { timeout: 60000 };

run('dashboard across nodes browser test', async (ctx) => {
  const page = await open(ctx, 'dashboard', '/dashboard');
  await page.waitForSelector('#conn.on', LONG);

  // The controller has no workers; the worker node is on the queue, alive.
  const row = `#nodes tr[data-node="${node}"]`;
  await page.waitForSelector(`${row} td.up:text-is("alive")`, LONG);
  await page.waitForSelector(`#nodes tr[data-node="${controller}"]`, LONG);
  await page.waitForFunction(() => document.querySelector('#workers-summary').textContent.startsWith('0 busy of 0'), null, LONG);
  if (await page.locator('#workers tr').count() !== 0) throw new Error('the controller lists workers of its own');
  step(`connected to the controller (${controller}, no workers); worker node ${node} listed alive`);

  // Every text the answer panel shows, with the status shown beside it then; and which of them
  // are a partial answer: more than its first token, less than all, while not completed.
  await page.evaluate(([full, first]) => {
    const a = document.querySelector('#d-answer');
    const shown = [];
    window.koubouAnswers = shown;
    window.koubouPartials = () => [...new Set(shown.filter((s) => s.status !== 'completed'
      && s.text.length > first.length && s.text.length < full.length && full.startsWith(s.text)).map((s) => s.text))];
    new MutationObserver(() => shown.push({ text: a.textContent, status: document.querySelector('#d-status').textContent }))
      .observe(a, { childList: true, characterData: true, subtree: true });
  }, [answer, answer.match(/\S+\s*/)[0]]);

  // Submitted from the form (over the WebSocket); the detail follows it.
  await page.fill('#f-prompt', prompt);
  await page.click('#f-submit');
  await page.waitForFunction((p) => document.querySelector('#d-prompt').textContent === p, prompt, LONG);
  const id = (await page.textContent('#d-id')).trim();
  console.log(`task_id=${id}`);

  // The answer so far, while the task runs.
  await page.waitForFunction(() => window.koubouPartials().length > 0, null, LONG);
  await page.screenshot({ path: shot('dashboard-nodes-running.png'), fullPage: true });
  step('partial answer streamed into the detail while the task ran');

  // Then completed, with the whole answer, on the board and in the detail.
  await page.waitForSelector(`#col-done .card[data-status="completed"][data-id="${id}"]`, LONG);
  await page.waitForFunction((full) => document.querySelector('#d-status').textContent === 'completed'
    && document.querySelector('#d-answer').textContent === full, answer, LONG);
  const partials = await page.evaluate(() => window.koubouPartials());
  if (partials.length < 3) {
    const shown = await page.evaluate(() => window.koubouAnswers);
    throw new Error(`the answer did not stream token by token; shown: ${JSON.stringify(shown)}`);
  }
  step(`completed with the whole answer after ${partials.length} partial answers: ${JSON.stringify(partials)}`);

  // Run by a worker of the node; the log names the node each event came from.
  const tail = id.slice(-12);
  await page.waitForFunction((node) => {
    const dt = [...document.querySelectorAll('#d-meta dt')].find((d) => d.textContent === 'worker');
    return dt != null && dt.nextElementSibling.textContent.startsWith(node + '/');
  }, node, LONG);
  const log = async (text) => page.waitForSelector(`#events li:has-text("${text}")`, LONG);
  await log(`[${controller}] task_created ${tail}`);
  await log(`[${node}] task_started ${tail}`);
  await log(`[${node}] task_completed ${tail}`);
  step(`run by a worker of ${node}; the events log names ${controller} for its creation and ${node} for its run`);

  // The Nodes panel: the worker node alive, its claims, backends and load (busy of max workers);
  // the controller with none.
  const cells = await page.$$eval(`${row} td`, (tds) => tds.map((td) => td.textContent));
  const [, state, , , backends, load] = cells;
  if (state !== 'alive' || backends === '–' || !/^\d+ \/ [1-9]\d*$/.test(load)) {
    throw new Error(`the Nodes panel shows ${node} as ${JSON.stringify(cells)}`);
  }
  await page.waitForSelector(`#nodes tr[data-node="${controller}"] td:text-is("0 / 0")`, LONG);
  step(`Nodes panel: ${node} ${state}, backends ${backends}, load ${load}; ${controller} 0 / 0`);

  await page.screenshot({ path: shot('dashboard-nodes.png'), fullPage: true });
  step('screenshots saved');
});
