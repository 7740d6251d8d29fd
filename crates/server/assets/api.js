// The dashboard's only way to the server: JSON calls, uploads and the job event stream,
// all same-origin and all carrying the API key when one is set.

const KEY_STORAGE = 'loraforge.apiKey';

// Session storage: the key lives as long as the tab, is never written into a URL, and
// is not shared with other sites.
export function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || '';
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
}

export class ApiError extends Error {
  constructor(status, body, text) {
    const e = body && body.error;
    super(e && e.message ? e.message : `HTTP ${status}${text ? `: ${text.slice(0, 200)}` : ''}`);
    this.status = status;
    this.param = e ? e.param : null;
    this.code = e ? e.code : null;
  }
}

// A 401 anywhere means "ask for the key"; the page listens for this one event.
function unauthorized() {
  window.dispatchEvent(new CustomEvent('loraforge:unauthorized'));
}

function authHeaders(extra = {}) {
  const h = { ...extra };
  const key = apiKey();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

function parseBody(text) {
  try {
    return text ? JSON.parse(text) : null;
  } catch {
    return null;
  }
}

export async function api(path, { method = 'GET', body, signal } = {}) {
  const init = { method, signal, headers: authHeaders() };
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const r = await fetch(path, init);
  const text = await r.text();
  const data = parseBody(text);
  if (r.status === 401) unauthorized();
  if (!r.ok) throw new ApiError(r.status, data, text);
  return data;
}

// XMLHttpRequest rather than fetch: it reports upload progress. The File goes into
// FormData as is, so the browser streams it from disk instead of reading it into memory.
export function uploadFile(file, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open('POST', '/v1/files');
    const key = apiKey();
    if (key) xhr.setRequestHeader('Authorization', `Bearer ${key}`);
    xhr.upload.onprogress = (e) => onProgress(e.loaded, e.lengthComputable ? e.total : file.size);
    xhr.onload = () => {
      const data = parseBody(xhr.responseText);
      if (xhr.status === 401) unauthorized();
      if (xhr.status >= 200 && xhr.status < 300) resolve(data);
      else reject(new ApiError(xhr.status, data, xhr.responseText));
    };
    xhr.onerror = () => reject(new ApiError(0, null, 'the connection failed'));
    xhr.onabort = () => reject(new ApiError(0, null, 'upload aborted'));
    const form = new FormData();
    // The server reads `purpose` before it starts streaming `file`.
    form.append('purpose', 'fine-tune');
    form.append('file', file, file.name);
    xhr.send(form);
  });
}

// Downloads that need the key cannot be plain links (a link sends no Authorization
// header): fetch, then hand the browser a blob URL. Adapters are megabytes, so holding
// one in memory is fine.
export async function downloadWithKey(url, filename) {
  const r = await fetch(url, { headers: authHeaders() });
  if (r.status === 401) unauthorized();
  if (!r.ok) {
    const text = await r.text();
    throw new ApiError(r.status, parseBody(text), text);
  }
  const blob = await r.blob();
  const href = URL.createObjectURL(blob);
  const a = document.createElement('a');
  a.href = href;
  a.download = filename;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(href), 60_000);
}

/** One SSE frame (the fields this server sends), or null for a comment/keep-alive. */
export function parseFrame(raw) {
  let id = null;
  let event = 'message';
  const data = [];
  let any = false;
  for (const line of raw.split('\n')) {
    if (line === '' || line.startsWith(':')) continue;
    const i = line.indexOf(':');
    const field = i < 0 ? line : line.slice(0, i);
    let value = i < 0 ? '' : line.slice(i + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    any = true;
    if (field === 'id') id = value;
    else if (field === 'event') event = value;
    else if (field === 'data') data.push(value);
  }
  return any ? { id, event, data: data.join('\n') } : null;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/**
 * Follows a job's event stream until `done`, reconnecting after a dropped connection
 * with `Last-Event-ID` so the server replays only what was missed; frames at or
 * before the last id seen are dropped, so a replay never duplicates anything.
 *
 * fetch() rather than EventSource: EventSource cannot send an Authorization header,
 * and one code path for keyed and open servers is one path to get right.
 *
 * onEvent(frame) gets each new frame ({id, event, data}); onState(state, error) gets
 * 'connecting' | 'live' | 'reconnecting' | 'done' | 'error'. Returns { close }.
 */
export function followEvents(jobId, { onEvent, onState }) {
  let lastId = null;
  let closed = false;
  let controller = null;
  // Set once a connection is up: the next drop then retries quickly again.
  let connected = false;
  const url = `/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}/events?stream=true`;

  // Resolves true when the stream ended with `done`, false when it was cut.
  async function connectOnce() {
    controller = new AbortController();
    const headers = authHeaders({ Accept: 'text/event-stream' });
    if (lastId !== null) headers['Last-Event-ID'] = lastId;
    const r = await fetch(url, { headers, signal: controller.signal, cache: 'no-store' });
    if (r.status === 401) unauthorized();
    if (!r.ok) {
      const text = await r.text();
      throw new ApiError(r.status, parseBody(text), text);
    }
    connected = true;
    onState('live');
    const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = '';
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return false;
      buf += value.replace(/\r/g, '');
      // Split once per chunk: a replay chunk holds hundreds of frames.
      const raws = buf.split('\n\n');
      buf = raws.pop();
      for (const raw of raws) {
        const frame = parseFrame(raw);
        if (!frame) continue;
        if (frame.event === 'done') {
          reader.cancel().catch(() => {});
          return true;
        }
        if (frame.id !== null) {
          if (lastId !== null && Number(frame.id) <= Number(lastId)) continue;
          lastId = frame.id;
        }
        onEvent(frame);
      }
    }
  }

  (async () => {
    let backoff = 500;
    onState('connecting');
    while (!closed) {
      try {
        const finished = await connectOnce();
        if (finished) {
          onState('done');
          return;
        }
      } catch (e) {
        if (closed) return;
        // A missing job or a missing key does not heal by retrying.
        if (e instanceof ApiError && [400, 401, 403, 404].includes(e.status)) {
          onState('error', e);
          return;
        }
      }
      if (closed) return;
      onState('reconnecting');
      if (connected) backoff = 500;
      connected = false;
      await sleep(backoff);
      backoff = Math.min(backoff * 2, 10_000);
    }
  })();

  return {
    close() {
      closed = true;
      if (controller) controller.abort();
    },
  };
}
