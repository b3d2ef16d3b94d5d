// Koubou dashboard: pages of tasks from /dashboard/api, live changes from the WebSocket at
// /dashboard/ws (the protocol of docs/websocket.md). Never loads every task: each column holds
// one page (more on request) and is re-read, debounced, only when an event says it changed.
'use strict';

const $ = (id) => document.getElementById(id);
const PAGE = 30;
const COLUMNS = {
  pending: () => 'pending,retrying',
  running: () => 'running',
  done: () => $('done-filter').value,
};
const state = {
  cols: { pending: [], running: [], done: [] },
  cursor: { pending: null, running: null, done: null },
  total: { pending: 0, running: 0, done: 0 },
  selected: null,
  answer: '',
  ws: null,
  refs: new Map(),
  nextRef: 1,
};

// ---- helpers ---------------------------------------------------------------------------

async function api(path, opts = {}) {
  const r = await fetch('/dashboard/api' + path, {
    ...opts,
    headers: { 'content-type': 'application/json', ...(opts.headers || {}) },
  });
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(body.error ? body.error.message : `HTTP ${r.status}`);
  return body;
}

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'class') e.className = v;
    else if (k.startsWith('data-')) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children) if (c != null) e.append(c);
  return e;
}

function debounce(fn, ms) {
  let t = null;
  return (...args) => { clearTimeout(t); t = setTimeout(() => fn(...args), ms); };
}

function ago(iso) {
  if (!iso) return '';
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (s < 60) return `${Math.round(s)}s ago`;
  if (s < 3600) return `${Math.round(s / 60)}m ago`;
  if (s < 86400) return `${Math.round(s / 3600)}h ago`;
  return new Date(iso).toLocaleDateString();
}

const money = (v) => (v >= 0.01 || v === 0 ? v.toFixed(2) : v.toPrecision(2));
const count = (n) => (n >= 1e6 ? `${(n / 1e6).toFixed(1)}M` : n >= 1e3 ? `${(n / 1e3).toFixed(1)}k` : String(n));

const colOf = (status) =>
  status === 'running' ? 'running' : status === 'pending' || status === 'retrying' ? 'pending' : 'done';

// ---- task board ------------------------------------------------------------------------

function query(col, before, limit) {
  const p = new URLSearchParams({ status: COLUMNS[col](), limit: String(limit) });
  const q = $('q').value.trim();
  const type = $('type-filter').value;
  const tag = $('tag-filter').value.trim();
  if (q) p.set('q', q);
  if (tag) p.set('tag', tag);
  if (type) p.set('type', type);
  if (before != null) p.set('before', String(before));
  return '/tasks?' + p;
}

async function loadColumn(col, more = false) {
  try {
    const shown = state.cols[col].length;
    const limit = more ? PAGE : Math.min(Math.max(shown, PAGE), 200);
    const page = await api(query(col, more ? state.cursor[col] : null, limit));
    state.cols[col] = more ? state.cols[col].concat(page.tasks) : page.tasks;
    state.cursor[col] = page.next_cursor;
    state.total[col] = page.total;
    renderColumn(col);
  } catch (e) {
    console.warn('loading', col, e);
  }
}

const refresh = {
  pending: debounce(() => loadColumn('pending'), 250),
  running: debounce(() => loadColumn('running'), 250),
  done: debounce(() => loadColumn('done'), 250),
};
const refreshAll = () => ['pending', 'running', 'done'].forEach((c) => loadColumn(c));

function card(t) {
  const first = (t.prompt || '').split('\n')[0];
  return el('li', {
    class: `card s-${t.status}` + (t.task_id === state.selected ? ' sel' : ''),
    'data-id': t.task_id, 'data-status': t.status, title: t.prompt,
    onclick: () => select(t.task_id),
  },
  el('div', { class: 'p' }, first || '(empty prompt)'),
  el('div', { class: 'm' },
    el('span', {}, t.type), el('span', {}, 'p' + t.priority), el('span', {}, t.status),
    el('span', {}, ago(t.finished_at || t.started_at || t.created_at))));
}

function renderColumn(col) {
  $('col-' + col).replaceChildren(...state.cols[col].map(card));
  $('count-' + col).textContent = `(${state.total[col]})`;
  document.querySelector(`[data-more="${col}"]`).hidden = state.cursor[col] == null;
}

/// Moves a task we already show to the column its new status belongs in (the debounced
/// reload then brings its full record).
function moveLocally(id, status) {
  let found = null;
  let from = null;
  for (const col of Object.keys(state.cols)) {
    const i = state.cols[col].findIndex((t) => t.task_id === id);
    if (i >= 0) { found = state.cols[col][i]; from = col; state.cols[col].splice(i, 1); renderColumn(col); }
  }
  const to = colOf(status);
  if (found) {
    found.status = status;
    if (to !== 'done' || COLUMNS.done().split(',').includes(status)) {
      state.cols[to].unshift(found);
      renderColumn(to);
    }
  }
  refresh[to]();
  // The column it left has a new total (and maybe a card to bring in from the next page).
  if (from !== to) refresh[from || 'pending']();
}

// ---- detail ----------------------------------------------------------------------------

async function select(id) {
  if (state.selected && state.selected !== id) send({ type: 'unsubscribe', task_id: state.selected });
  state.selected = id;
  document.querySelectorAll('.card.sel').forEach((c) => c.classList.remove('sel'));
  document.querySelectorAll(`.card[data-id="${id}"]`).forEach((c) => c.classList.add('sel'));
  send({ type: 'subscribe', task_id: id });
  try { showTask(await api('/tasks/' + id)); } catch (e) { $('d-error').textContent = e.message; }
}

function showTask(t) {
  if (t.task_id !== state.selected) return;
  $('detail-empty').hidden = true;
  $('detail-body').hidden = false;
  $('d-status').textContent = t.status;
  $('d-status').className = 'badge s-' + t.status;
  $('d-id').textContent = t.task_id;
  $('d-prompt').textContent = t.prompt;
  state.answer = (t.result && t.result.output) || t.partial || '';
  $('d-answer').textContent = state.answer;
  $('d-answer').classList.toggle('streaming', t.status === 'running');
  $('d-error').textContent = t.error || '';
  $('d-cancel').hidden = !['pending', 'retrying', 'running'].includes(t.status);
  const where = t.remote == null ? '' : t.remote ? ' (remote)' : ' (local)';
  const meta = [
    ['type', t.type], ['priority', t.priority], ['backend', t.backend && `${t.backend} / ${t.model || ''}${where}`],
    ['tags', t.tags && t.tags.length ? t.tags.join(', ') : null],
    ['cost', t.cost != null ? money(t.cost) : null],
    ['worker', t.worker_id], ['attempts', `${t.attempts} / ${t.max_attempts}`],
    ['queue position', t.queue_position], ['created', t.created_at && new Date(t.created_at).toLocaleString()],
    ['duration', t.duration_ms != null ? `${(t.duration_ms / 1000).toFixed(2)} s` : null],
    ['tokens', t.usage && `${t.usage.prompt_tokens} in, ${t.usage.completion_tokens} out`],
  ].filter(([, v]) => v != null && v !== '');
  $('d-meta').replaceChildren(...meta.flatMap(([k, v]) => [el('dt', {}, k), el('dd', {}, String(v))]));
}

$('d-cancel').addEventListener('click', async () => {
  const id = state.selected;
  $('d-cancel').disabled = true;
  try { showTask(await api(`/tasks/${id}/cancel`, { method: 'POST' })); } catch (e) { $('d-error').textContent = e.message; }
  $('d-cancel').disabled = false;
});

// ---- submit ----------------------------------------------------------------------------

$('submit-form').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  $('f-error').textContent = '';
  const payload = {
    type: $('f-type').value,
    prompt: $('f-prompt').value,
    priority: Number($('f-priority').value),
  };
  const tags = $('f-tags').value.split(',').map((t) => t.trim()).filter(Boolean);
  if (tags.length) payload.tags = tags;
  if ($('f-json').checked) payload.json = true;
  $('f-submit').disabled = true;
  try {
    let r;
    if (state.ws && state.ws.readyState === WebSocket.OPEN) {
      r = await request({ type: 'submit_task', payload }); // the seed's message
    } else {
      r = await api('/tasks', { method: 'POST', body: JSON.stringify(payload) });
    }
    $('f-prompt').value = '';
    select(r.task_id);
  } catch (e) {
    $('f-error').textContent = e.message;
  } finally {
    $('f-submit').disabled = false;
  }
});

// ---- workers, backends, stats, charts -----------------------------------------------------

async function loadWorkers() {
  try {
    const w = await api('/workers');
    $('workers-summary').textContent = `${w.busy} busy of ${w.active} (min ${w.min_workers}, max ${w.max_workers})`;
    $('workers').replaceChildren(...w.workers.map((x) => el('tr', {},
      el('td', {}, x.worker_id), el('td', { class: x.state === 'busy' ? 'up' : '' }, x.state),
      el('td', {}, x.current_task ? x.current_task.slice(-12) : '–'),
      el('td', {}, String(x.tasks_done)), el('td', {}, String(x.tasks_failed)))));
    $('st-workers').textContent = w.active;
  } catch (e) { console.warn(e); }
}
const refreshWorkers = debounce(loadWorkers, 500);

// Every node registered with the queue (controllers and worker nodes), as of its last heartbeat.
async function loadNodes() {
  try {
    const { nodes } = await api('/nodes');
    const lost = nodes.filter((n) => n.state === 'lost').length;
    $('nodes-summary').textContent = `${nodes.length - lost} alive` + (lost ? `, ${lost} lost` : '');
    $('nodes').replaceChildren(...nodes.map((n) => el('tr', { 'data-node': n.id },
      el('td', {}, n.id),
      el('td', { class: n.state === 'lost' ? 'down' : 'up', title: 'registration runs out ' + n.expires_at }, n.state),
      el('td', {}, n.kinds ? n.kinds.join(', ') : 'any'),
      el('td', {}, n.tags ? n.tags.join(', ') : '–'),
      el('td', {}, n.backends.map((b) => `${b.name} (${b.models.join(', ') || b.kind})`).join('; ') || '–'),
      el('td', {}, `${n.busy} / ${n.max_workers}`),
      el('td', { title: n.last_seen }, ago(n.last_seen)),
      el('td', {}, `${n.host} · ${n.pid} · v${n.version}`))));
  } catch (e) { console.warn(e); }
}

async function loadHealth() {
  try {
    const h = await api('/health');
    $('backends').replaceChildren(...h.backends.map((b) => {
      const s = b.served || {};
      return el('tr', {},
        el('td', {}, b.name), el('td', {}, b.kind),
        el('td', { class: b.remote ? 'remote' : '' }, b.remote ? 'remote' : 'local'),
        el('td', { class: b.up ? 'up' : 'down', title: b.detail }, b.up ? 'up' : 'down — ' + b.detail),
        el('td', {}, b.default_model), el('td', {}, b.serves.join(', ')),
        el('td', { title: `${s.prompt_tokens || 0} prompt + ${s.completion_tokens || 0} completion` },
          count((s.prompt_tokens || 0) + (s.completion_tokens || 0))),
        el('td', {}, s.cost ? money(s.cost) : '–'));
    }));
    const sp = h.spared;
    $('spared').hidden = !sp;
    if (sp) {
      $('spared').textContent = `Local craftsmen spared ≈ ${money(sp.cost)} at ${sp.reference || '[pricing]'} prices ` +
        `(${count(sp.prompt_tokens + sp.completion_tokens)} tokens since start).`;
    }
  } catch (e) { console.warn(e); }
}

const charts = {
  queue: new Spark($('c-queue')),
  throughput: new Spark($('c-throughput'), { format: (v) => v.toFixed(2) }),
  latency: new Spark($('c-latency'), { format: (v) => v.toFixed(0) }),
  tokens: new Spark($('c-tokens'), { format: (v) => v.toFixed(1) }),
  memory: new Spark($('c-memory'), { format: (v) => v.toFixed(0) }),
};

function pushSample(m, draw = true) {
  const mem = m.rss_bytes / 1048576;
  charts.queue.push(m.at, m.queue_depth);
  charts.throughput.push(m.at, m.throughput_per_sec);
  charts.latency.push(m.at, m.latency_ms);
  charts.tokens.push(m.at, m.tokens_per_sec);
  charts.memory.push(m.at, mem);
  $('v-queue').textContent = m.queue_depth;
  $('v-throughput').textContent = m.throughput_per_sec.toFixed(2);
  $('v-latency').textContent = m.latency_ms != null ? m.latency_ms.toFixed(0) : '–';
  $('v-tokens').textContent = m.tokens_per_sec.toFixed(1);
  $('v-memory').textContent = mem.toFixed(0);
  $('st-pending').textContent = m.queue_depth;
  $('st-running').textContent = m.running;
  $('st-completed').textContent = m.completed_tasks;
  $('st-failed').textContent = m.failed_tasks;
  $('st-workers').textContent = m.active_workers;
  if (draw) Object.values(charts).forEach((c) => c.draw());
}

async function loadMetrics() {
  try {
    const h = await api('/metrics');
    h.samples.forEach((m) => pushSample(m, false));
    Object.values(charts).forEach((c) => c.draw());
  } catch (e) { console.warn(e); }
}

const refreshNodes = debounce(loadNodes, 1000);

function logEvent(m) {
  const from = m.origin ? `[${m.origin}] ` : '';
  const text = from + (m.task_id ? `${m.type} ${m.task_id.slice(-12)}` : `${m.type} ${m.backend || m.worker_id || ''} ${m.reason || m.state || ''}`);
  const li = el('li', {}, el('time', {}, new Date(m.at).toLocaleTimeString()), text);
  const list = $('events');
  list.prepend(li);
  while (list.children.length > 100) list.lastChild.remove();
}

// ---- live connection -------------------------------------------------------------------

function send(msg) {
  if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify(msg));
}

/// Sends a message with a `ref` and resolves with the answer carrying it.
function request(msg) {
  const ref = state.nextRef++;
  return new Promise((resolve, reject) => {
    state.refs.set(ref, { resolve, reject });
    send({ ...msg, ref });
    setTimeout(() => { if (state.refs.delete(ref)) reject(new Error('no answer from the server')); }, 10000);
  });
}

function onMessage(m) {
  if (m.ref != null && state.refs.has(m.ref)) {
    const p = state.refs.get(m.ref);
    state.refs.delete(m.ref);
    if (m.type === 'error') p.reject(new Error(m.error.message)); else p.resolve(m);
    return;
  }
  switch (m.type) {
    case 'metrics': pushSample(m); return;
    case 'subscribed': if (m.task) showTask(m.task); return;
    case 'error': console.warn('server:', m.error); return;
    case 'welcome': case 'unsubscribed': case 'pong': case 'task': case 'task_submitted':
    case 'initial_state': case 'periodic_stats': return;
    case 'task_token':
      if (m.task_id === state.selected) {
        state.answer += m.text;
        $('d-answer').textContent = state.answer;
      }
      return;
    case 'task_created': refresh.pending(); break;
    case 'task_claimed': case 'task_started': moveLocally(m.task_id, 'running'); break;
    case 'task_completed': moveLocally(m.task_id, 'completed'); break;
    case 'task_cancelled': moveLocally(m.task_id, 'cancelled'); break;
    case 'task_failed': moveLocally(m.task_id, m.status); break;
    case 'task_requeued': moveLocally(m.task_id, 'pending'); break;
    case 'worker_state': case 'worker_scaled': refreshWorkers(); refreshNodes(); if (m.type === 'worker_state') return; break;
    case 'backend_health': loadHealth(); break;
  }
  if (m.task_id && m.task_id === state.selected && m.type !== 'task_token') {
    api('/tasks/' + m.task_id).then(showTask).catch(() => {});
  }
  if (m.type !== 'task_claimed') logEvent(m);
}

function connect(delay = 500) {
  const ws = new WebSocket((location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/dashboard/ws');
  state.ws = ws;
  ws.onopen = () => {
    $('conn').textContent = 'live';
    $('conn').className = 'conn on';
    send({ type: 'subscribe', topic: 'tasks' });
    send({ type: 'subscribe', topic: 'metrics' });
    if (state.selected) send({ type: 'subscribe', task_id: state.selected });
    refreshAll();
    loadWorkers();
    loadNodes();
    loadHealth();
    delay = 500;
  };
  ws.onmessage = (ev) => { try { onMessage(JSON.parse(ev.data)); } catch (e) { console.warn(e); } };
  ws.onclose = (ev) => {
    $('conn').textContent = ev.reason ? `offline: ${ev.reason}` : 'offline';
    $('conn').className = 'conn off';
    for (const p of state.refs.values()) p.reject(new Error('connection lost'));
    state.refs.clear();
    setTimeout(() => connect(Math.min(delay * 2, 10000)), delay);
  };
}

// ---- start -------------------------------------------------------------------------------

$('q').addEventListener('input', debounce(refreshAll, 300));
$('type-filter').addEventListener('change', refreshAll);
$('tag-filter').addEventListener('input', debounce(refreshAll, 300));
$('done-filter').addEventListener('change', () => loadColumn('done'));
document.querySelectorAll('[data-more]').forEach((b) => b.addEventListener('click', () => loadColumn(b.dataset.more, true)));
window.addEventListener('resize', debounce(() => Object.values(charts).forEach((c) => c.draw()), 200));
setInterval(() => ['pending', 'running', 'done'].forEach(renderColumn), 30000); // keep "ago" fresh
setInterval(loadNodes, 10000); // heartbeats come every third of a node's TTL (10 s by default)

refreshAll();
loadWorkers();
loadNodes();
loadHealth();
loadMetrics();
connect();
