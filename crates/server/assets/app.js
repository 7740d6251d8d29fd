// The dashboard: four views behind hash routes (#/jobs, #/new, #/datasets, #/jobs/<id>),
// built with DOM calls only (never innerHTML, so file names and messages cannot inject
// markup), talking to the API through api.js.

import {
  ApiError, api, apiKey, downloadWithKey, followEvents, setApiKey, uploadFile,
} from './api.js';

// ---- small helpers ---------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

const $ = (sel, root = document) => root.querySelector(sel);

function fmtBytes(n) {
  if (n === null || n === undefined) return '–';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  let x = n;
  while (x >= 1024 && i < units.length - 1) { x /= 1024; i += 1; }
  return `${i ? x.toFixed(1) : x} ${units[i]}`;
}

function fmtCount(n) {
  if (n === null || n === undefined) return '–';
  if (n >= 1e9) return `${(n / 1e9).toFixed(1)}B`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(1)}M`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)}k`;
  return String(n);
}

function fmtTime(secs) {
  return secs ? new Date(secs * 1000).toLocaleString() : '–';
}

function fmtDuration(secs) {
  if (secs === null || secs === undefined || !Number.isFinite(secs)) return '–';
  const s = Math.max(0, Math.round(secs));
  const hh = Math.floor(s / 3600);
  const mm = Math.floor((s % 3600) / 60);
  const ss = String(s % 60).padStart(2, '0');
  return hh ? `${hh}:${String(mm).padStart(2, '0')}:${ss}` : `${mm}:${ss}`;
}

function errorBox(e) {
  return h('p', { class: 'error', role: 'alert' }, e instanceof Error ? e.message : String(e));
}

function statusBadge(status, attrs = {}) {
  return h('span', { class: `badge status-${status}`, ...attrs }, status);
}

const TERMINAL = ['succeeded', 'failed', 'cancelled'];

// The key is never printed: commands refer to an environment variable instead.
function curlAuth() {
  return apiKey() ? ' -H "Authorization: Bearer $LORAFORGE_API_KEY"' : '';
}

function shellQuote(s) {
  return `'${s.replace(/'/g, "'\\''")}'`;
}

function codeBlock(text, label) {
  const code = h('code', {}, text);
  const copy = h('button', {
    type: 'button',
    class: 'copy',
    onclick: async () => {
      try {
        await navigator.clipboard.writeText(code.textContent);
        copy.textContent = 'Copied';
      } catch {
        // No clipboard API on plain http from another host: select it for Ctrl+C.
        getSelection().selectAllChildren(code);
        copy.textContent = 'Selected: press Ctrl+C';
      }
      setTimeout(() => { copy.textContent = 'Copy'; }, 2000);
    },
  }, 'Copy');
  return h('div', { class: 'code' }, h('pre', { 'aria-label': label }, code), copy);
}

/** A download link that, when a key is set, fetches with it instead (links send none). */
function downloadLink(url, filename, text, attrs = {}) {
  return h('a', {
    href: url,
    download: filename,
    ...attrs,
    onclick: (e) => {
      if (!apiKey()) return;
      e.preventDefault();
      downloadWithKey(url, filename).catch((err) => alert(err.message));
    },
  }, text);
}

// ---- the API key -----------------------------------------------------------------

function renderKeyArea({ ask = false, refused = false } = {}) {
  const area = $('#key-area');
  if (apiKey()) {
    area.replaceChildren(
      h('span', { class: 'muted' }, 'API key set (this tab only) '),
      h('button', {
        type: 'button',
        onclick: () => { setApiKey(''); renderKeyArea(); route(); },
      }, 'Forget key'),
    );
    return;
  }
  if (!ask) {
    area.replaceChildren();
    return;
  }
  if ($('#api-key', area)) return; // already asking: keep what the user is typing
  const input = h('input', {
    type: 'password', id: 'api-key', autocomplete: 'off', required: true, size: 24,
  });
  area.replaceChildren(h('form', {
    class: 'key-form',
    onsubmit: (e) => {
      e.preventDefault();
      setApiKey(input.value.trim());
      renderKeyArea();
      route();
    },
  },
  h('label', { for: 'api-key' }, refused ? 'That API key was refused. API key: ' : 'This server needs an API key: '),
  input,
  h('button', { type: 'submit' }, 'Use key')));
  input.focus();
}

window.addEventListener('loraforge:unauthorized', () => {
  const had = Boolean(apiKey());
  setApiKey('');
  renderKeyArea({ ask: true, refused: had });
});

// ---- routing ---------------------------------------------------------------------

// Timers and streams of the current view, stopped when the view changes.
let cleanups = [];
function onLeave(fn) { cleanups.push(fn); }

function show(...children) {
  const main = $('#view');
  main.replaceChildren(...children);
}

function route() {
  for (const fn of cleanups) fn();
  cleanups = [];
  const hash = location.hash || '#/jobs';
  const [path, query] = hash.slice(1).split('?');
  const params = new URLSearchParams(query || '');
  const job = path.match(/^\/jobs\/([^/]+)$/);
  const section = job ? 'jobs' : path.split('/')[1] || 'jobs';
  for (const a of document.querySelectorAll('[data-nav]')) {
    if (a.dataset.nav === section) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  let view;
  if (job) view = jobView(decodeURIComponent(job[1]));
  else if (section === 'new') view = newJobView(params);
  else if (section === 'datasets') view = datasetsView();
  else view = jobsView(params);
  view.catch((e) => show(errorBox(e)));
}

window.addEventListener('hashchange', () => { route(); $('#view').focus(); });

// ---- jobs list -------------------------------------------------------------------

function progressText(p) {
  if (!p || !p.total_steps) return '–';
  return `${p.step}/${p.total_steps}`;
}

async function jobsView(params) {
  const status = params.get('status') || '';
  document.title = 'Jobs · loraforge';
  const filter = h('select', {
    id: 'status-filter',
    onchange: () => { location.hash = filter.value ? `#/jobs?status=${filter.value}` : '#/jobs'; },
  }, ['', 'queued', 'running', 'succeeded', 'failed', 'cancelled'].map(
    (s) => h('option', { value: s, selected: s === status }, s || 'all'),
  ));
  const tbody = h('tbody');
  const more = h('button', { type: 'button', hidden: true }, 'Load more');
  const msg = h('div');
  show(
    h('h1', {}, 'Fine-tuning jobs'),
    h('div', { class: 'toolbar' },
      h('label', { for: 'status-filter' }, 'Status '), filter,
      h('a', { href: '#/new', class: 'button primary' }, 'New job')),
    h('table', { class: 'list', id: 'jobs-table' },
      h('thead', {}, h('tr', {}, ['Job', 'Model', 'Status', 'Progress', 'Created', 'Fine-tuned model']
        .map((t) => h('th', { scope: 'col' }, t)))),
      tbody),
    more, msg,
  );
  let after = null;
  let paged = false;
  async function load(reset) {
    const q = new URLSearchParams({ limit: '20' });
    if (status) q.set('status', status);
    if (!reset && after) q.set('after', after);
    const list = await api(`/v1/fine_tuning/jobs?${q}`);
    if (reset) tbody.replaceChildren();
    for (const j of list.data) {
      tbody.append(h('tr', { 'data-job': j.id },
        h('td', {}, h('a', { href: `#/jobs/${j.id}` }, j.id)),
        h('td', {}, j.model),
        h('td', {}, statusBadge(j.status)),
        h('td', {}, progressText(j.progress)),
        h('td', {}, fmtTime(j.created_at)),
        h('td', {}, j.fine_tuned_model || '–')));
    }
    if (list.data.length) after = list.data[list.data.length - 1].id;
    more.hidden = !list.has_more;
    if (!tbody.children.length) {
      tbody.append(h('tr', {}, h('td', { colspan: 6, class: 'muted' },
        status ? `No ${status} jobs.` : 'No jobs yet.')));
    }
  }
  more.addEventListener('click', () => { paged = true; load(false).catch((e) => msg.replaceChildren(errorBox(e))); });
  await load(true);
  // Statuses change while the page is open; a user who paged further keeps their pages.
  const timer = setInterval(() => {
    if (!paged) load(true).then(() => msg.replaceChildren(), (e) => msg.replaceChildren(errorBox(e)));
  }, 4000);
  onLeave(() => clearInterval(timer));
}

// ---- new job ---------------------------------------------------------------------

// Defaults match the server's; the explanations are the ones a first-time user needs.
const LORA_FIELDS = [
  { name: 'lora_r', label: 'Rank (r)', value: 8, min: 1, max: 1024, step: 1, help: 'Size of the adapter matrices. Higher learns more and makes a bigger adapter; 4–64 is usual.' },
  { name: 'lora_alpha', label: 'Alpha', value: 16, min: 0, step: 'any', help: 'Scale of the update (alpha / r). Twice the rank is a common choice.' },
  { name: 'lora_dropout', label: 'Dropout', value: 0, min: 0, max: 0.99, step: 'any', help: 'Dropout on the adapter input while training; 0.05–0.1 can help small data sets.' },
];

const TRAIN_FIELDS = [
  { name: 'n_epochs', label: 'Epochs', value: 1, min: 1, max: 100, step: 1, help: 'Passes over the training file.' },
  { name: 'batch_size', label: 'Batch size', value: 4, min: 1, max: 1024, step: 1, help: 'Examples per optimizer step. Larger is smoother and needs more memory.' },
  { name: 'learning_rate', label: 'Learning rate', value: 0.0002, min: 0, max: 1, step: 'any', help: 'AdamW step size; 1e-4 to 1e-3 suits LoRA.' },
  { name: 'max_seq_len', label: 'Max sequence length', value: 1024, min: 2, step: 1, help: 'Tokens per example; longer examples are cut. Keep it within the model\u2019s context length.' },
];

const ADVANCED_FIELDS = [
  { name: 'max_steps', label: 'Max steps', value: '', min: 1, step: 1, help: 'Stop after this many optimizer steps (instead of whole epochs).' },
  { name: 'lr_scheduler', label: 'Schedule', options: ['linear', 'cosine', 'constant'], help: 'How the learning rate changes over the run.' },
  { name: 'warmup_ratio', label: 'Warm-up ratio', value: 0, min: 0, max: 0.99, step: 'any', help: 'Share of the steps spent ramping the learning rate up.' },
  { name: 'gradient_accumulation_steps', label: 'Gradient accumulation', value: 1, min: 1, step: 1, help: 'Batches summed per optimizer step (a larger effective batch).' },
  { name: 'eval_interval', label: 'Validate every', value: '', min: 1, step: 1, help: 'Steps between validation losses (needs a validation file).' },
  { name: 'checkpoint_interval', label: 'Checkpoint every', value: '', min: 1, step: 1, help: 'Steps between checkpoints you can download or resume from.' },
];

const TARGETS = [
  { value: 'default', label: 'attention + MLP (q,k,v,o,gate,up,down)', modules: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'] },
  { value: 'all-linear', label: 'all-linear (every linear layer but the output head)' },
  { value: 'attention', label: 'attention only (q,k,v,o)', modules: ['q_proj', 'k_proj', 'v_proj', 'o_proj'] },
  { value: 'qv', label: 'q_proj + v_proj (smallest)', modules: ['q_proj', 'v_proj'] },
  { value: 'custom', label: 'custom list…' },
];

function field(f) {
  const id = `f-${f.name}`;
  const help = h('small', { id: `${id}-help` }, f.help);
  const input = f.options
    ? h('select', { id, name: f.name, 'aria-describedby': `${id}-help` },
      f.options.map((o) => h('option', { value: o }, o)))
    : h('input', {
      id, name: f.name, type: 'number', value: f.value, min: f.min, max: f.max, step: f.step,
      'aria-describedby': `${id}-help`, placeholder: f.value === '' ? 'off' : null,
    });
  return h('div', { class: 'field' }, h('label', { for: id }, f.label), input, help);
}

async function newJobView() {
  document.title = 'New job · loraforge';
  const [models, files] = await Promise.all([
    api('/v1/models'),
    api('/v1/files?limit=100'),
  ]);
  // Fine-tuned models (with a parent) are served for chat, not trained further here.
  const bases = models.data.filter((m) => !m.parent);
  const datasets = files.data.filter((f) => f.purpose === 'fine-tune' && f.status === 'processed');

  const model = h('select', { id: 'model', name: 'model', required: true, 'aria-describedby': 'model-help' },
    bases.map((m) => h('option', { value: m.id, disabled: !m.trainable },
      `${m.id} — ${fmtCount(m.parameters)} parameters, context ${m.context_length ?? '?'}`
      + `${m.tasks && m.tasks.length ? `, ${m.tasks.join('/')}` : ''}`
      + `${m.trainable ? '' : ` (not trainable: ${m.note || 'unsupported'})`}`)));
  const firstTrainable = bases.find((m) => m.trainable);
  if (firstTrainable) model.value = firstTrainable.id;
  // The tasks the chosen model trains for (GET /v1/models `tasks`): the job names the
  // task, and the server's default targets for it replace the decoder presets.
  const TASK_LABELS = {
    causal_lm: 'causal_lm — chat and text (decoders)',
    sequence_classification: 'sequence_classification — a label per text (bert, roberta)',
    text_to_image: 'text_to_image — Stable Diffusion LoRA from captioned images',
    image_classification: 'image_classification — a label per image (resnet; a zip of one folder per class)',
    speech_recognition: 'speech_recognition — transcripts of audio clips (whisper; a zip of WAV clips and transcripts)',
  };
  const task = h('select', { id: 'task', name: 'task', 'aria-describedby': 'task-help' });
  const fillTasks = () => {
    const chosen = bases.find((m) => m.id === model.value);
    const tasks = chosen && chosen.tasks && chosen.tasks.length ? chosen.tasks : ['causal_lm'];
    task.replaceChildren(...tasks.map((t) => h('option', { value: t }, TASK_LABELS[t] || t)));
  };
  fillTasks();
  model.addEventListener('change', fillTasks);
  const fileOption = (f) => h('option', { value: f.id },
    `${f.filename} — ${f.examples} examples, ${f.format}, ${fmtBytes(f.bytes)} (${f.id})`);
  const training = h('select', { id: 'training_file', name: 'training_file', required: true },
    datasets.map(fileOption));
  const validation = h('select', { id: 'validation_file', name: 'validation_file' },
    h('option', { value: '' }, 'none'), datasets.map(fileOption));
  const suffix = h('input', {
    id: 'suffix', name: 'suffix', maxlength: 64, pattern: '[A-Za-z0-9_\\-]*', 'aria-describedby': 'suffix-help',
  });
  const targets = h('select', { id: 'f-lora_target_modules', 'aria-describedby': 'targets-help' },
    TARGETS.map((t) => h('option', { value: t.value }, t.label)));
  const customTargets = h('input', {
    id: 'custom-targets', hidden: true, 'aria-label': 'Custom target modules (comma-separated)', placeholder: 'q_proj,v_proj',
  });
  targets.addEventListener('change', () => { customTargets.hidden = targets.value !== 'custom'; });
  const seed = h('input', { id: 'seed', name: 'seed', type: 'number', min: 0, step: 1, placeholder: '42' });

  const preview = h('div', { id: 'request-preview' });
  const msg = h('div', { 'aria-live': 'polite' });

  function request() {
    const req = { model: model.value, training_file: training.value };
    const ownTargets = !!task.value && task.value !== 'causal_lm';
    if (ownTargets) req.task = task.value;
    if (validation.value) req.validation_file = validation.value;
    if (suffix.value.trim()) req.suffix = suffix.value.trim();
    if (seed.value !== '') req.seed = Number(seed.value);
    const hp = {};
    for (const f of [...LORA_FIELDS, ...TRAIN_FIELDS, ...ADVANCED_FIELDS]) {
      const el = form.elements.namedItem(f.name);
      const v = el.value.trim();
      if (v === '') continue;
      hp[f.name] = f.options ? v : Number(v);
    }
    const t = TARGETS.find((x) => x.value === targets.value);
    if (ownTargets && t.value !== 'all-linear' && t.value !== 'custom') {
      // leave lora_target_modules to the server's default for the task
    } else if (t.value === 'all-linear') hp.lora_target_modules = 'all-linear';
    else if (t.value === 'custom') {
      hp.lora_target_modules = customTargets.value.split(',').map((s) => s.trim()).filter(Boolean);
    } else hp.lora_target_modules = t.modules;
    req.hyperparameters = hp;
    return req;
  }

  function updatePreview() {
    const body = JSON.stringify(request(), null, 2);
    preview.replaceChildren(codeBlock(
      `curl -s ${location.origin}/v1/fine_tuning/jobs \\\n  -H "Content-Type: application/json"${curlAuth()} \\\n  -d ${shellQuote(body)}`,
      'The request as a curl command',
    ));
  }

  const submit = h('button', { type: 'submit', class: 'primary' }, 'Create job');
  const form = h('form', {
    id: 'new-job',
    oninput: updatePreview,
    onchange: updatePreview,
    onsubmit: async (e) => {
      e.preventDefault();
      submit.disabled = true;
      msg.replaceChildren();
      for (const el of form.querySelectorAll('[aria-invalid]')) el.removeAttribute('aria-invalid');
      try {
        const job = await api('/v1/fine_tuning/jobs', { method: 'POST', body: request() });
        location.hash = `#/jobs/${job.id}`;
      } catch (err) {
        msg.replaceChildren(errorBox(err));
        const name = err instanceof ApiError && err.param ? err.param.replace(/^hyperparameters\./, '') : null;
        const el = name && (form.elements.namedItem(name) || $(`#f-${name}`));
        if (el) { el.setAttribute('aria-invalid', 'true'); el.focus(); }
      } finally {
        submit.disabled = false;
      }
    },
  },
  h('fieldset', {}, h('legend', {}, 'Model and data'),
    h('div', { class: 'field' }, h('label', { for: 'model' }, 'Base model'), model,
      h('small', { id: 'model-help' }, bases.length ? 'From the server\u2019s models directory (GET /v1/models).' : 'No models: put a HuggingFace folder or .gguf file in the models directory.')),
    h('div', { class: 'field' }, h('label', { for: 'task' }, 'Task'), task,
      h('small', { id: 'task-help' }, 'What the model learns; the training file\u2019s format must fit it.')),
    h('div', { class: 'field' }, h('label', { for: 'training_file' }, 'Training file'), training,
      datasets.length ? null : h('small', {}, 'No processed datasets yet: ', h('a', { href: '#/datasets' }, 'upload one'), '.')),
    h('div', { class: 'field' }, h('label', { for: 'validation_file' }, 'Validation file (optional)'), validation),
    h('div', { class: 'field' }, h('label', { for: 'suffix' }, 'Suffix (optional)'), suffix,
      h('small', { id: 'suffix-help' }, 'Part of the fine-tuned model\u2019s name: letters, digits, - and _.'))),
  h('fieldset', {}, h('legend', {}, 'LoRA'),
    LORA_FIELDS.map(field),
    h('div', { class: 'field' }, h('label', { for: 'f-lora_target_modules' }, 'Target modules'), targets, customTargets,
      h('small', { id: 'targets-help' }, 'Which layers get an adapter. all-linear adapts every linear layer (best quality, biggest adapter).'))),
  h('fieldset', {}, h('legend', {}, 'Training'), TRAIN_FIELDS.map(field)),
  h('details', {}, h('summary', {}, 'Advanced'),
    h('fieldset', {}, h('legend', {}, 'More settings'), ADVANCED_FIELDS.map(field),
      h('div', { class: 'field' }, h('label', { for: 'seed' }, 'Seed'), seed,
        h('small', {}, 'Adapter initialisation and shuffling; the same seed repeats a run.')))),
  h('p', {}, submit));

  show(
    h('h1', {}, 'New fine-tuning job'),
    h('div', { class: 'columns' },
      form,
      h('aside', {}, h('h2', {}, 'The request'),
        h('p', { class: 'muted' }, 'What the button sends; run it from a shell to do the same.'),
        preview, msg)),
  );
  updatePreview();
}

// ---- datasets --------------------------------------------------------------------

async function datasetsView() {
  document.title = 'Datasets · loraforge';
  const input = h('input', {
    type: 'file', id: 'file-input', multiple: true, class: 'visually-hidden',
    accept: '.jsonl,.json,.txt,application/jsonl,application/json,text/plain',
  });
  const zone = h('label', { for: 'file-input', class: 'drop', id: 'drop-zone' },
    h('strong', {}, 'Drop JSONL files here'), ' or ', h('span', { class: 'linklike' }, 'choose files'),
    h('br'), h('small', { class: 'muted' }, 'One JSON object per line: chat "messages", "prompt"/"completion", "text" or "input_ids".'));
  const uploads = h('ul', { class: 'uploads', id: 'uploads', 'aria-live': 'polite' });
  const tbody = h('tbody');
  const more = h('button', { type: 'button', hidden: true }, 'Load more');
  const msg = h('div');

  let after = null;
  async function load(reset) {
    const q = new URLSearchParams({ limit: '50' });
    if (!reset && after) q.set('after', after);
    const list = await api(`/v1/files?${q}`);
    if (reset) tbody.replaceChildren();
    for (const f of list.data) tbody.append(fileRow(f));
    if (list.data.length) after = list.data[list.data.length - 1].id;
    more.hidden = !list.has_more;
    if (!tbody.children.length) tbody.append(h('tr', {}, h('td', { colspan: 6, class: 'muted' }, 'No files yet.')));
  }

  function fileRow(f) {
    const del = h('button', {
      type: 'button',
      class: 'danger',
      'aria-label': `Delete ${f.filename}`,
      onclick: async () => {
        if (!confirm(`Delete ${f.filename} (${f.id})?`)) return;
        try {
          await api(`/v1/files/${f.id}`, { method: 'DELETE' });
          row.remove();
        } catch (e) { msg.replaceChildren(errorBox(e)); }
      },
    }, 'Delete');
    const details = f.status === 'error'
      ? h('details', {}, h('summary', {}, `${f.validation_errors.length} problem(s)`),
        h('ul', { class: 'errors' }, f.validation_errors.map((v) => h('li', {}, v))))
      : `${f.examples ?? '–'} examples, ${f.format ?? '?'}`;
    const row = h('tr', { 'data-file': f.id },
      h('td', {}, f.filename, h('br'), h('small', { class: 'muted' }, f.id)),
      h('td', {}, f.purpose),
      h('td', {}, fmtBytes(f.bytes)),
      h('td', {}, statusBadge(f.status), ' ', details),
      h('td', {}, fmtTime(f.created_at)),
      h('td', { class: 'actions' },
        downloadLink(`/v1/files/${f.id}/content`, f.filename, 'Download'), ' ', del));
    return row;
  }

  async function uploadOne(file) {
    const bar = h('progress', { max: file.size || 1, value: 0, 'aria-label': `Upload of ${file.name}` });
    const status = h('span', { class: 'muted' }, 'waiting');
    const result = h('div');
    const item = h('li', { 'data-upload': file.name }, h('strong', {}, file.name), ' ', bar, ' ', status, result);
    uploads.prepend(item);
    try {
      const f = await uploadFile(file, (loaded, total) => {
        bar.max = total || 1;
        bar.value = loaded;
        status.textContent = `${fmtBytes(loaded)} of ${fmtBytes(total)} (${total ? Math.floor((100 * loaded) / total) : 100}%)`;
      });
      status.textContent = `${fmtBytes(f.bytes)} uploaded`;
      if (f.status === 'processed') {
        item.classList.add('ok');
        result.replaceChildren(h('p', {}, statusBadge('processed'), ` ${f.examples} examples (${f.format}), ${f.id}`));
      } else {
        item.classList.add('bad');
        result.replaceChildren(h('p', {}, statusBadge('error'), ' The file was stored but cannot be used for training:'),
          h('ol', { class: 'errors' }, f.validation_errors.map((v) => h('li', {}, v))));
      }
      await load(true);
    } catch (e) {
      item.classList.add('bad');
      status.textContent = 'failed';
      result.replaceChildren(errorBox(e));
    }
  }

  async function uploadAll(list) {
    for (const file of list) await uploadOne(file);
  }

  input.addEventListener('change', () => {
    const list = [...input.files];
    input.value = '';
    uploadAll(list);
  });
  zone.addEventListener('dragover', (e) => { e.preventDefault(); zone.classList.add('over'); });
  zone.addEventListener('dragleave', () => zone.classList.remove('over'));
  zone.addEventListener('drop', (e) => {
    e.preventDefault();
    zone.classList.remove('over');
    uploadAll([...e.dataTransfer.files]);
  });
  more.addEventListener('click', () => load(false).catch((e) => msg.replaceChildren(errorBox(e))));

  show(
    h('h1', {}, 'Datasets'),
    input, zone, uploads,
    h('h2', {}, 'Files'),
    msg,
    h('table', { class: 'list', id: 'files-table' },
      h('thead', {}, h('tr', {}, ['File', 'Purpose', 'Size', 'Status', 'Uploaded', ''].map((t) => h('th', { scope: 'col' }, t)))),
      tbody),
    more,
  );
  await load(true);
}

// ---- one job ---------------------------------------------------------------------

/** The loss chart: uPlot, fed point by point; redrawn at most once per frame. */
function lossChart(container) {
  const points = new Map(); // step -> [train, valid, valid accuracy, reward accuracy]
  let plot = null;
  let pending = false;
  const caption = h('figcaption', { class: 'muted' }, 'No training steps yet.');
  const area = h('div', { class: 'chart-area' });
  container.append(area, caption);

  // Steps nearly always arrive in order; a full sort only after one that did not.
  let steps = [];
  let unsorted = false;
  function data() {
    if (unsorted) {
      steps = [...points.keys()].sort((a, b) => a - b);
      unsorted = false;
    }
    return [
      steps,
      steps.map((s) => points.get(s)[0]),
      steps.map((s) => points.get(s)[1]),
      steps.map((s) => points.get(s)[2]),
      steps.map((s) => points.get(s)[3]),
    ];
  }

  function draw() {
    pending = false;
    const d = data();
    const trained = d[1].filter((v) => v !== null).length;
    const validated = d[2].filter((v) => v !== null).length;
    container.dataset.points = String(trained);
    container.dataset.validPoints = String(validated);
    if (trained || validated) {
      const lastTrain = d[1].filter((v) => v !== null).pop();
      const lastValid = d[2].filter((v) => v !== null).pop();
      // Classification jobs also report accuracy (0..1, on its own axis).
      const lastAcc = d[3].filter((v) => v !== null).pop();
      // DPO jobs report each step's reward accuracy (same axis).
      const lastReward = d[4].filter((v) => v !== null).pop();
      caption.textContent = `${trained} training step(s)`
        + (lastTrain !== undefined ? `, latest training loss ${lastTrain.toFixed(4)}` : '')
        + (validated ? `; ${validated} validation point(s), latest ${lastValid.toFixed(4)}` : '')
        + (lastAcc !== undefined ? `, validation accuracy ${lastAcc.toFixed(4)}` : '')
        + (lastReward !== undefined ? `, reward accuracy ${lastReward.toFixed(3)}` : '');
    }
    container.setAttribute('aria-label', `Loss chart. ${caption.textContent}`);
    if (!window.uPlot) return;
    if (!plot) {
      if (!d[0].length) return;
      plot = new window.uPlot({
        width: Math.max(300, area.clientWidth),
        height: 280,
        // Steps are whole numbers: no ticks at 1.5.
        scales: { x: { time: false }, acc: { range: [0, 1] } },
        axes: [
          { label: 'step', incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000] },
          { label: 'loss' },
          { label: 'accuracy', scale: 'acc', side: 1, grid: { show: false } },
        ],
        series: [
          { label: 'step' },
          { label: 'training loss', stroke: '#2563eb', width: 2 },
          {
            label: 'validation loss', stroke: '#dc2626', width: 2, spanGaps: true, points: { show: true, size: 7 },
          },
          {
            label: 'validation accuracy', scale: 'acc', stroke: '#16a34a', width: 2, spanGaps: true, points: { show: true, size: 7 },
          },
          {
            label: 'reward accuracy (DPO)', scale: 'acc', stroke: '#9333ea', width: 1, spanGaps: true,
          },
        ],
      }, d, area);
      const ro = new ResizeObserver(() => plot.setSize({ width: Math.max(300, area.clientWidth), height: 280 }));
      ro.observe(area);
    } else {
      plot.setData(d);
    }
  }

  return {
    add(step, train, valid, acc, reward) {
      let cur = points.get(step);
      if (!cur) {
        cur = [null, null, null, null];
        if (steps.length && step < steps[steps.length - 1]) unsorted = true;
        else steps.push(step);
      }
      if (train !== null && train !== undefined) cur[0] = train;
      if (valid !== null && valid !== undefined) cur[1] = valid;
      if (acc !== null && acc !== undefined) cur[2] = acc;
      if (reward !== null && reward !== undefined) cur[3] = reward;
      points.set(step, cur);
      if (!pending) { pending = true; requestAnimationFrame(draw); }
    },
  };
}

async function jobView(id) {
  document.title = `${id} · loraforge`;
  let job = await api(`/v1/fine_tuning/jobs/${encodeURIComponent(id)}`);

  const status = h('span', { id: 'job-status', 'aria-live': 'polite' });
  const facts = h('dl', { class: 'facts' });
  const bar = h('progress', { id: 'job-progress', max: 1, value: 0, 'aria-label': 'Training progress' });
  const progressText = h('span', { id: 'progress-text' }, '');
  const streamState = h('span', { id: 'stream-state', class: 'muted' });
  const buttons = h('div', { class: 'toolbar', id: 'job-actions' });
  const downloads = h('div', { id: 'downloads' });
  const errorArea = h('div');
  const chartBox = h('figure', { id: 'loss-chart', class: 'chart', role: 'img', 'data-points': '0' });
  const ckptBody = h('tbody');
  const exportsBox = h('div', { id: 'exports' });
  const log = h('ol', { id: 'event-log', class: 'log' });
  const curls = h('div', { id: 'curl-commands' });
  const chart = lossChart(chartBox);
  const msg = h('div', { 'aria-live': 'polite' });

  show(
    h('p', {}, h('a', { href: '#/jobs' }, '← All jobs')),
    h('h1', {}, 'Job ', h('code', {}, id), ' ', status),
    facts,
    h('section', { 'aria-labelledby': 'h-progress' },
      h('h2', { id: 'h-progress' }, 'Progress'),
      h('div', { class: 'progress-row' }, bar, progressText), streamState, buttons, msg, errorArea, downloads),
    h('section', { 'aria-labelledby': 'h-chart' }, h('h2', { id: 'h-chart' }, 'Loss'), chartBox),
    h('div', { class: 'columns' },
      h('section', { 'aria-labelledby': 'h-events' }, h('h2', { id: 'h-events' }, 'Events'), log),
      h('section', { 'aria-labelledby': 'h-ckpt' }, h('h2', { id: 'h-ckpt' }, 'Checkpoints'),
        h('table', { class: 'list', id: 'checkpoints' },
          h('thead', {}, h('tr', {}, ['Step', 'Checkpoint', 'Validation loss', 'Download'].map((t) => h('th', { scope: 'col' }, t)))),
          ckptBody))),
    h('section', { 'aria-labelledby': 'h-exports' }, h('h2', { id: 'h-exports' }, 'Exports'), exportsBox),
    h('section', { 'aria-labelledby': 'h-curl' }, h('h2', { id: 'h-curl' }, 'With curl'), curls),
  );

  const base = `/v1/fine_tuning/jobs/${encodeURIComponent(id)}`;

  // Merged models of a succeeded language-model job: made by a worker on request, listed
  // with their status (polled while one is being built) and downloaded when ready.
  const EXPORT_DTYPES = {
    merged_gguf: ['f16', 'bf16', 'f32', 'q8_0', 'q4_k'],
    merged_safetensors: ['bf16', 'f16', 'f32'],
  };
  const exportForm = (() => {
    const format = h('select', { id: 'export-format', 'aria-label': 'Export format' },
      h('option', { value: 'merged_gguf' }, 'Merged GGUF + Ollama Modelfile'),
      h('option', { value: 'merged_safetensors' }, 'Merged HF folder (safetensors)'));
    const dtype = h('select', { id: 'export-dtype', 'aria-label': 'Tensor type' });
    const fillDtypes = () => dtype.replaceChildren(...EXPORT_DTYPES[format.value].map((d) => h('option', { value: d }, d)));
    format.onchange = fillDtypes;
    fillDtypes();
    const exportMsg = h('div', { 'aria-live': 'polite' });
    const go = h('button', { type: 'submit', id: 'export-create', class: 'button' }, 'Export');
    return h('form', {
      class: 'toolbar',
      onsubmit: async (e) => {
        e.preventDefault();
        exportMsg.replaceChildren();
        try {
          await api(`${base}/exports`, { method: 'POST', body: { format: format.value, dtype: dtype.value } });
          loadExports();
        } catch (err) { exportMsg.replaceChildren(errorBox(err)); }
      },
    }, format, ' ', dtype, ' ', go, exportMsg);
  })();
  const exportRows = h('tbody', { id: 'export-rows' });
  let exportPoll = null;
  // A list that arrives after the page was left must not start polling again.
  let left = false;
  async function loadExports() {
    if (job.status !== 'succeeded' || job.task !== 'causal_lm') {
      exportsBox.replaceChildren(h('p', { class: 'muted' }, job.task === 'causal_lm'
        ? 'A succeeded job can be merged into its base here.'
        : 'Exports merge a language model\'s adapter.'));
      return;
    }
    if (!exportsBox.contains(exportForm)) {
      exportsBox.replaceChildren(exportForm, h('table', { class: 'list' },
        h('thead', {}, h('tr', {}, ['Format', 'Type', 'Status', 'Download'].map((t) => h('th', { scope: 'col' }, t)))),
        exportRows));
    }
    const list = await api(`${base}/exports`);
    exportRows.replaceChildren(...list.data.map((x) => h('tr', { 'data-export': x.id },
      h('td', {}, x.format), h('td', {}, x.dtype),
      h('td', { class: 'export-status', 'data-status': x.status }, statusBadge(x.status), x.error ? ` ${x.error.message}` : ''),
      h('td', {}, x.status === 'succeeded'
        ? downloadLink(`${base}/exports/${encodeURIComponent(x.id)}/content`, x.filename, `.zip (${(x.bytes / 1e6).toFixed(1)} MB)`, { class: 'export-download' })
        : '–'))));
    if (!list.data.length) exportRows.append(h('tr', {}, h('td', { colspan: 4, class: 'muted' }, 'None yet.')));
    const building = list.data.some((x) => x.status === 'queued' || x.status === 'running');
    clearTimeout(exportPoll);
    if (building && !left) exportPoll = setTimeout(() => loadExports().catch(() => {}), 1000);
  }

  // Once steps stream in they are the newest progress; a job object fetched meanwhile
  // may be a step behind and must not move the bar back.
  let streamed = false;
  function setProgress(p, fromStream = false) {
    if (!p || !p.total_steps) return;
    if (fromStream) streamed = true;
    else if (streamed && !TERMINAL.includes(job.status)) return;
    bar.max = p.total_steps;
    bar.value = p.step;
    const parts = [`step ${p.step} of ${p.total_steps}`];
    if (p.epoch !== undefined && p.epoch !== null) parts.push(`epoch ${+p.epoch.toFixed(2)}`);
    if (p.tokens_per_second) parts.push(`${Math.round(p.tokens_per_second)} tokens/s`);
    if (job.status === 'running' && p.eta_seconds !== null && p.eta_seconds !== undefined) parts.push(`ETA ${fmtDuration(p.eta_seconds)}`);
    if (p.train_loss !== undefined && p.train_loss !== null) parts.push(`loss ${p.train_loss.toFixed(4)}`);
    if (p.reward_accuracy !== undefined && p.reward_accuracy !== null) parts.push(`reward accuracy ${p.reward_accuracy.toFixed(3)}`);
    progressText.textContent = parts.join(' · ');
  }

  async function action(name) {
    msg.replaceChildren();
    try {
      job = await api(`${base}/${name}`, { method: 'POST' });
      render();
    } catch (e) { msg.replaceChildren(errorBox(e)); }
  }

  // Built once and updated in place: a control replaced while the user clicks it
  // would swallow the click.
  const pauseBtn = h('button', { type: 'button', id: 'pause', onclick: () => action('pause') }, 'Pause');
  const resumeBtn = h('button', { type: 'button', id: 'resume', onclick: () => action('resume') }, 'Resume');
  const cancelBtn = h('button', {
    type: 'button',
    id: 'cancel',
    class: 'danger',
    onclick: () => { if (confirm(`Cancel ${id}?`)) action('cancel'); },
  }, 'Cancel');
  buttons.append(pauseBtn, resumeBtn, cancelBtn);
  {
    const origin = location.origin;
    const auth = curlAuth();
    curls.append(codeBlock([
      `# status and progress\ncurl -s ${origin}${base}${auth}`,
      `# live events (Server-Sent Events; add -H "Last-Event-ID: N" to resume after event N)\ncurl -sN "${origin}${base}/events?stream=true"${auth}`,
      `# checkpoints\ncurl -s ${origin}${base}/checkpoints${auth}`,
      `# pause, resume, cancel\ncurl -s -X POST ${origin}${base}/pause${auth}\ncurl -s -X POST ${origin}${base}/resume${auth}\ncurl -s -X POST ${origin}${base}/cancel${auth}`,
      `# the adapter once it succeeded\ncurl -s -OJ ${origin}${base}/adapter${auth}`,
    ].join('\n\n'), 'curl commands for this job'));
  }

  let renderedStatus = null;
  function render() {
    setProgress(job.progress);
    if (job.status === 'succeeded' && job.progress) { bar.max = 1; bar.value = 1; }
    const done = TERMINAL.includes(job.status);
    pauseBtn.disabled = done || job.status === 'paused';
    resumeBtn.disabled = job.status !== 'paused';
    cancelBtn.disabled = done;
    if (job.status === renderedStatus) return;
    renderedStatus = job.status;
    status.replaceChildren(statusBadge(job.status));
    facts.replaceChildren(
      h('dt', {}, 'Base model'), h('dd', {}, job.model),
      h('dt', {}, 'Training file'), h('dd', {}, job.training_file),
      h('dt', {}, 'Validation file'), h('dd', {}, job.validation_file || '–'),
      h('dt', {}, 'Created'), h('dd', {}, fmtTime(job.created_at)),
      h('dt', {}, 'Finished'), h('dd', {}, fmtTime(job.finished_at)),
      h('dt', {}, 'Fine-tuned model'), h('dd', { id: 'fine-tuned-model' }, job.fine_tuned_model || '–'),
      h('dt', {}, 'LoRA'), h('dd', {}, job.hyperparameters
        ? `r=${job.hyperparameters.lora_r}, alpha=${job.hyperparameters.lora_alpha}, lr=${job.hyperparameters.learning_rate}, batch ${job.hyperparameters.batch_size}`
        : '–'),
    );
    errorArea.replaceChildren(job.error && job.error.message ? errorBox(`Failed: ${job.error.message}`) : '');
    downloads.replaceChildren(job.status === 'succeeded'
      ? h('p', {}, 'Adapter: ',
        downloadLink(`${base}/adapter`, `${id}-adapter.zip`, 'PEFT folder (.zip)', { id: 'adapter-zip', class: 'button primary' }), ' ',
        downloadLink(`${base}/adapter?format=safetensors`, 'adapter_model.safetensors', 'adapter_model.safetensors', { id: 'adapter-safetensors', class: 'button' }),
        ...((job.adapter_formats || []).includes('gguf')
          ? [' ', downloadLink(`${base}/adapter?format=gguf`, `${id}-adapter_model.gguf`, 'LoRA GGUF (llama.cpp, Ollama)', { id: 'adapter-gguf', class: 'button' })]
          : []))
      : '');
  }

  async function loadCheckpoints() {
    const list = await api(`${base}/checkpoints`);
    const shown = [...ckptBody.querySelectorAll('tr[data-checkpoint]')].map((tr) => tr.dataset.checkpoint);
    const gguf = String(!!job && (job.adapter_formats || []).includes('gguf'));
    // Unchanged lists keep their rows (and any link being clicked).
    if (shown.join() === list.data.map((c) => c.id).join() && shown.length && ckptBody.dataset.gguf === gguf) return;
    ckptBody.dataset.gguf = gguf;
    ckptBody.replaceChildren(...list.data.map((c) => {
      const url = `${base}/checkpoints/${encodeURIComponent(c.id)}/adapter`;
      const vl = c.metrics && c.metrics.valid_loss;
      return h('tr', { 'data-checkpoint': c.id },
        h('td', {}, c.step_number),
        h('td', {}, h('code', {}, c.fine_tuned_model_checkpoint)),
        h('td', {}, vl === null || vl === undefined ? '–' : vl.toFixed(4)),
        h('td', {},
          downloadLink(url, `${id}-step-${c.step_number}-adapter.zip`, '.zip', { class: 'ckpt-zip' }), ' ',
          downloadLink(`${url}?format=safetensors`, `${id}-step-${c.step_number}-adapter_model.safetensors`, '.safetensors'),
          // Known once the job has published its own (checkpoints are written alike).
          ...(gguf === 'true'
            ? [' ', downloadLink(`${url}?format=gguf`, `${id}-step-${c.step_number}-adapter_model.gguf`, '.gguf')]
            : [])));
    }));
    if (!list.data.length) ckptBody.append(h('tr', {}, h('td', { colspan: 4, class: 'muted' }, 'None yet.')));
  }

  async function refresh() {
    try {
      job = await api(base);
      render();
    } catch (e) { msg.replaceChildren(errorBox(e)); }
  }

  let refreshTimer = null;
  function refreshSoon() {
    clearTimeout(refreshTimer);
    refreshTimer = setTimeout(refresh, 250);
  }

  // Events arrive by the hundred when a stream replays a long job: the page is updated
  // once per frame, not once per event (each update would force a layout).
  const LOG_MAX = 1000;
  let pendingLog = [];
  let pendingProgress = null;
  let flushQueued = false;
  function flush() {
    flushQueued = false;
    if (pendingProgress) setProgress(pendingProgress, true);
    pendingProgress = null;
    if (!pendingLog.length) return;
    const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
    const frag = document.createDocumentFragment();
    for (const ev of pendingLog) {
      frag.append(h('li', { class: `level-${ev.level}`, 'data-event': ev.id },
        h('time', {}, new Date(ev.created_at * 1000).toLocaleTimeString()), ' ', ev.message));
    }
    pendingLog = [];
    log.append(frag);
    // Thousands of steps would make the page heavy; the API keeps them all.
    while (log.children.length > LOG_MAX) log.firstElementChild.remove();
    if (atBottom) log.scrollTop = log.scrollHeight;
  }
  function queueFlush() {
    if (flushQueued) return;
    flushQueued = true;
    requestAnimationFrame(flush);
  }
  function logEvent(ev) {
    pendingLog.push(ev);
    if (pendingLog.length > LOG_MAX) pendingLog = pendingLog.slice(-LOG_MAX);
    queueFlush();
  }

  render();
  await loadCheckpoints();

  const stream = followEvents(id, {
    onEvent: (frame) => {
      let ev;
      try { ev = JSON.parse(frame.data); } catch { return; }
      logEvent(ev);
      const d = ev.data || {};
      if (frame.event === 'metrics') {
        if (d.train_loss !== undefined) {
          chart.add(d.step, d.train_loss, null, null, d.reward_accuracy);
          pendingProgress = d;
          queueFlush();
        } else if (d.valid_loss !== undefined) {
          chart.add(d.step, null, d.valid_loss, d.valid_accuracy ?? d.valid_reward_accuracy);
        }
        if (job.status === 'queued') refreshSoon();
      } else {
        refreshSoon();
        // The event comes before the checkpoint is stored: look again shortly after.
        if (/^Checkpoint saved/.test(ev.message)) {
          for (const ms of [500, 2000]) setTimeout(() => loadCheckpoints().catch(() => {}), ms);
        }
      }
    },
    onState: (state, err) => {
      streamState.textContent = {
        connecting: 'Connecting to the event stream…',
        live: 'Live.',
        reconnecting: 'Connection lost; reconnecting…',
        done: 'Finished.',
        error: `Event stream: ${err && err.message}`,
      }[state];
      streamState.dataset.state = state;
      if (state === 'done') {
        refresh().then(() => loadExports()).catch(() => {});
        loadCheckpoints().catch(() => {});
      }
    },
  });
  // Pauses and resumes need not leave an event at once; a slow poll catches them.
  const poll = setInterval(() => { if (!TERMINAL.includes(job.status)) refresh(); }, 3000);
  loadExports().catch(() => {});
  onLeave(() => { stream.close(); clearInterval(poll); clearTimeout(refreshTimer); left = true; clearTimeout(exportPoll); });
}

// ---- start -----------------------------------------------------------------------

renderKeyArea();
route();
