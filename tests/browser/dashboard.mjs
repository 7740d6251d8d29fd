// Drives the dashboard in the system Chromium against a running `loraforge serve`
// (crates/server/tests/dashboard.rs starts the servers and runs this):
//
//   node tests/browser/dashboard.mjs BASE_URL SCREENSHOT_DIR [KEYED_BASE_URL API_KEY]
//
// BASE_URL serves the tiny-llama fixture without a key; KEYED_BASE_URL (optional) is a
// second server started with --api-key API_KEY. Exits non-zero on the first failure.

import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const [base, shots, keyedBase, apiKey] = process.argv.slice(2);
if (!base || !shots) {
  console.error('usage: node dashboard.mjs BASE_URL SCREENSHOT_DIR [KEYED_BASE_URL API_KEY]');
  process.exit(2);
}
const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const data = (name) => path.join(repo, 'tests/data', name);
fs.mkdirSync(shots, { recursive: true });

const t0 = Date.now();
const log = (msg) => console.log(`[dashboard ${((Date.now() - t0) / 1000).toFixed(1)}s] ${msg}`);

// Long enough that the chart visibly grows while the job runs, short enough for CI.
const STEPS = Number(process.env.DASHBOARD_STEPS || 600);
const EVAL_EVERY = 100;
const CHECKPOINT_EVERY = 200;

async function apiJson(url, init = {}) {
  const r = await fetch(url, init);
  assert.ok(r.ok, `${init.method || 'GET'} ${url}: ${r.status}`);
  return r.json();
}

async function until(what, fn, timeoutMs = 30_000, everyMs = 100) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

/** Every request a context makes must go to `host` (the server) and nowhere else. */
function watchHosts(context, host, foreign) {
  context.on('request', (req) => {
    const u = new URL(req.url());
    if (u.protocol === 'data:' || u.protocol === 'blob:') return;
    if (u.host !== host) foreign.push(req.url());
  });
}

function watchErrors(page, errors) {
  page.on('pageerror', (e) => errors.push(`page error: ${e.message}`));
  page.on('console', (m) => {
    if (m.type() !== 'error') return;
    // The page's CSP blocks other hosts before any request is made, so an attempt
    // shows up only as this console error.
    if (m.text().includes('Content Security Policy')) errors.push(`blocked: ${m.text()}`);
    else console.log(`  console: ${m.text()}`);
  });
}

const points = (page) => page.locator('#loss-chart').getAttribute('data-points').then(Number);
const validPoints = (page) => page.locator('#loss-chart').getAttribute('data-valid-points').then(Number);
const shownStatus = (page) => page.locator('#job-status').innerText();

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox'],
});
log(`chromium ${browser.version()}`);

try {
  // ---- the open server ------------------------------------------------------------
  const context = await browser.newContext({ acceptDownloads: true, viewport: { width: 1280, height: 900 } });
  const foreign = [];
  const errors = [];
  watchHosts(context, new URL(base).host, foreign);
  const page = await context.newPage();
  watchErrors(page, errors);
  page.on('dialog', (d) => d.accept());

  const shell = await page.goto(`${base}/`);
  assert.equal(shell.status(), 200);
  await page.locator('#jobs-table').waitFor();
  await page.getByText('No jobs yet.').waitFor();
  log('the jobs list loads on an empty server');

  // Datasets: a bad file dropped onto the zone names its line; a good one is picked.
  await page.locator('nav [data-nav="datasets"]').click();
  await page.locator('#drop-zone').waitFor();
  const badText = fs.readFileSync(data('bad-line7.jsonl'), 'utf8');
  const dt = await page.evaluateHandle((text) => {
    const t = new DataTransfer();
    t.items.add(new File([text], 'bad-line7.jsonl', { type: 'application/jsonl' }));
    return t;
  }, badText);
  await page.dispatchEvent('#drop-zone', 'drop', { dataTransfer: dt });
  const badItem = page.locator('li[data-upload="bad-line7.jsonl"]');
  await badItem.locator('ol.errors li').first().waitFor();
  const badErrors = await badItem.locator('ol.errors li').allInnerTexts();
  assert.equal(badErrors.length, 1, `errors: ${badErrors}`);
  assert.match(badErrors[0], /^line 7: "messages" must be a non-empty array/);
  log(`dropped bad file: ${badErrors[0]}`);

  await page.setInputFiles('#file-input', data('chat-small.jsonl'));
  const goodItem = page.locator('li[data-upload="chat-small.jsonl"].ok');
  await goodItem.waitFor();
  const goodText = await goodItem.innerText();
  const fileId = goodText.match(/file-[0-9a-f]+/)[0];
  const bar = goodItem.locator('progress');
  assert.equal(await bar.getAttribute('value'), await bar.getAttribute('max'), 'progress bar full');
  assert.match(goodText, /40 examples \(chat\)/);
  log(`uploaded chat-small.jsonl as ${fileId}`);

  // Both are listed; the bad one is deleted.
  const files = (await apiJson(`${base}/v1/files`)).data;
  const badId = files.find((f) => f.filename === 'bad-line7.jsonl').id;
  await page.locator(`tr[data-file="${badId}"]`).waitFor();
  await page.locator(`tr[data-file="${fileId}"]`).waitFor();
  await page.locator(`tr[data-file="${badId}"] button.danger`).click();
  await page.locator(`tr[data-file="${badId}"]`).waitFor({ state: 'detached' });
  assert.equal((await fetch(`${base}/v1/files/${badId}`)).status, 404);
  log('deleted the bad file');

  // New job: the form's request preview is what the button sends.
  await page.locator('nav [data-nav="new"]').click();
  const modelOption = await page.locator('#model option[value="tiny-llama"]').innerText();
  assert.match(modelOption, /parameters, context \d+/);
  // The task picker follows the model: a ResNet trains image_classification only, a
  // Whisper speech_recognition.
  const taskValues = () => page.locator('#task option').evaluateAll((o) => o.map((x) => x.value));
  await page.selectOption('#model', 'tiny-resnet');
  assert.deepEqual(await taskValues(), ['image_classification']);
  await page.selectOption('#model', 'tiny-whisper-asr');
  assert.deepEqual(await taskValues(), ['speech_recognition']);
  await page.selectOption('#model', 'tiny-llama');
  assert.deepEqual(await taskValues(), ['causal_lm']);
  await page.selectOption('#training_file', fileId);
  await page.selectOption('#validation_file', fileId);
  await page.fill('#f-lora_r', '4');
  await page.fill('#f-lora_alpha', '8');
  await page.fill('#f-batch_size', '2');
  await page.fill('#f-learning_rate', '0.001');
  await page.selectOption('#f-lora_target_modules', 'all-linear');
  await page.locator('details summary').click();
  await page.fill('#f-max_steps', String(STEPS));
  await page.fill('#f-eval_interval', String(EVAL_EVERY));
  await page.fill('#f-checkpoint_interval', String(CHECKPOINT_EVERY));
  await page.fill('#suffix', 'dash');
  const preview = await page.locator('#request-preview code').innerText();
  assert.ok(preview.startsWith(`curl -s ${base}/v1/fine_tuning/jobs`), preview);
  const previewBody = JSON.parse(preview.slice(preview.indexOf("-d '") + 4, preview.lastIndexOf("'")));
  assert.equal(previewBody.hyperparameters.max_steps, STEPS);
  assert.equal(previewBody.hyperparameters.lora_target_modules, 'all-linear');

  // The first event stream is served canned and cut short after a few steps: the page
  // must reconnect with Last-Event-ID and end with every step exactly once.
  const streamIds = [];
  let cannedLast = null;
  await page.route(/\/events\?stream=true$/, async (route) => {
    streamIds.push(route.request().headers()['last-event-id'] ?? null);
    if (streamIds.length > 1) return route.continue();
    const jobId = route.request().url().match(/jobs\/([^/]+)\/events/)[1];
    const events = await until('three training steps', async () => {
      const list = (await apiJson(`${base}/v1/fine_tuning/jobs/${jobId}/events?limit=1000`)).data;
      return list.filter((e) => e.type === 'metrics').length >= 3 ? list.reverse() : null;
    }, 30_000, 50);
    const upTo = events.findIndex((e) => e.message.startsWith('Step 3/'));
    const canned = events.slice(0, upTo + 1);
    cannedLast = canned[canned.length - 1].id.replace('ftevent-', '');
    const body = canned.map((e) => `id: ${e.id.replace('ftevent-', '')}\nevent: ${e.type}\ndata: ${JSON.stringify(e)}\n\n`).join('');
    await route.fulfill({ status: 200, headers: { 'content-type': 'text/event-stream' }, body });
  });

  const [sent] = await Promise.all([
    page.waitForRequest((r) => r.method() === 'POST' && r.url() === `${base}/v1/fine_tuning/jobs`),
    page.getByRole('button', { name: 'Create job' }).click(),
  ]);
  assert.deepEqual(JSON.parse(sent.postData()), previewBody);
  await page.waitForURL(/#\/jobs\/ftjob-/);
  const jobId = page.url().split('#/jobs/')[1];
  log(`created ${jobId} (${STEPS} steps)`);

  // Live: the chart gains points while the job runs.
  await until('the reconnect', () => streamIds.length >= 2, 40_000);
  assert.equal(streamIds[0], null);
  assert.equal(streamIds[1], cannedLast, 'reconnected with the last event id seen');
  log(`stream cut after event ${cannedLast}; reconnected with Last-Event-ID ${streamIds[1]}`);
  const first = await until('chart points', async () => {
    const n = await points(page);
    return n >= 4 ? n : null;
  }, 30_000);
  const grown = await until('the chart to grow', async () => {
    const n = await points(page);
    return n >= first + 2 ? n : null;
  }, 30_000, 50);
  // The screenshot once validation points and a checkpoint are in, still mid-run.
  await until('validation points', async () => (await validPoints(page)) >= 2, 30_000, 50);
  await page.locator('#checkpoints tr[data-checkpoint]').first().waitFor();
  const mid = await apiJson(`${base}/v1/fine_tuning/jobs/${jobId}`);
  assert.equal(mid.status, 'running', 'still training when the chart grew');
  assert.equal(await shownStatus(page), 'running');
  assert.ok(grown < STEPS && mid.progress.step < STEPS, `the chart grew mid-run (${first} -> ${grown} of ${STEPS})`);
  await page.waitForFunction(() => document.querySelector('#progress-text').textContent.includes('tokens/s'));
  assert.match(await page.locator('#progress-text').innerText(), /step \d+ of \d+ .*tokens\/s · ETA \d+:\d\d/);
  await page.screenshot({ path: path.join(shots, 'job-running.png'), fullPage: true });
  log(`chart grew from ${first} to ${grown} points while running; screenshot job-running.png`);

  // Finished: status, every point once, validation points, checkpoints, adapter.
  await page.locator('#job-status .status-succeeded').waitFor({ timeout: 90_000 });
  await page.locator('#stream-state[data-state="done"]').waitFor();
  await until('all points drawn', async () => (await points(page)) === STEPS, 5_000);
  const done = await apiJson(`${base}/v1/fine_tuning/jobs/${jobId}`);
  assert.equal(done.status, 'succeeded');
  const allEvents = (await apiJson(`${base}/v1/fine_tuning/jobs/${jobId}/events?limit=1000`)).data;
  const shownIds = await page.locator('#event-log li').evaluateAll((els) => els.map((e) => e.dataset.event));
  assert.equal(new Set(shownIds).size, shownIds.length, 'no event shown twice');
  assert.deepEqual(shownIds, allEvents.map((e) => e.id).reverse(), 'every event shown once, in order');
  assert.equal(await validPoints(page), STEPS / EVAL_EVERY);
  // Checkpoints at every CHECKPOINT_EVERY steps before the last (the last step is the adapter).
  const wantCkpts = Math.ceil(STEPS / CHECKPOINT_EVERY) - 1;
  await until('the checkpoints', async () => (await page.locator('#checkpoints tr[data-checkpoint]').count()) === wantCkpts, 5_000);
  await page.locator('#adapter-zip').waitFor();
  await page.screenshot({ path: path.join(shots, 'job-succeeded.png'), fullPage: true });
  log(`succeeded: ${STEPS} points, ${shownIds.length} events, each once; screenshot job-succeeded.png`);

  const [download] = await Promise.all([page.waitForEvent('download'), page.click('#adapter-zip')]);
  const viaPage = fs.readFileSync(await download.path());
  const viaApi = Buffer.from(await (await fetch(`${base}/v1/fine_tuning/jobs/${jobId}/adapter`)).arrayBuffer());
  assert.ok(viaApi.length > 1000, `adapter is ${viaApi.length} bytes`);
  assert.ok(viaPage.equals(viaApi), `downloaded ${viaPage.length} bytes, the API serves ${viaApi.length}`);
  assert.equal(download.suggestedFilename(), `${jobId}-adapter.zip`);
  const [ckpt] = await Promise.all([page.waitForEvent('download'), page.locator('a.ckpt-zip').first().click()]);
  const ckptBytes = fs.readFileSync(await ckpt.path());
  assert.equal(ckptBytes.subarray(0, 2).toString(), 'PK', 'a checkpoint downloads as a zip');
  // The LoRA GGUF llama.cpp loads: offered for this decoder job, the API's bytes.
  const [gguf] = await Promise.all([page.waitForEvent('download'), page.click('#adapter-gguf')]);
  const ggufPage = fs.readFileSync(await gguf.path());
  const ggufApi = Buffer.from(await (await fetch(`${base}/v1/fine_tuning/jobs/${jobId}/adapter?format=gguf`)).arrayBuffer());
  assert.equal(ggufPage.subarray(0, 4).toString(), 'GGUF', 'the GGUF download is a GGUF file');
  assert.ok(ggufPage.equals(ggufApi), `GGUF: downloaded ${ggufPage.length} bytes, the API serves ${ggufApi.length}`);
  assert.equal(gguf.suggestedFilename(), `${jobId}-adapter_model.gguf`);
  log(`adapter download: ${viaPage.length} bytes, equal to GET /adapter; checkpoint zip ${ckptBytes.length} bytes; LoRA GGUF ${ggufPage.length} bytes`);

  // An export: the merged HF folder, asked for on the page, built by the worker, listed
  // with its status, and downloaded as the API serves it.
  await page.selectOption('#export-format', 'merged_safetensors');
  await page.selectOption('#export-dtype', 'bf16');
  await page.click('#export-create');
  await page.locator('#export-rows .export-status[data-status="succeeded"]').waitFor({ timeout: 60_000 });
  const exports = (await apiJson(`${base}/v1/fine_tuning/jobs/${jobId}/exports`)).data;
  assert.equal(exports.length, 1);
  assert.equal(exports[0].format, 'merged_safetensors');
  assert.equal(exports[0].dtype, 'bf16');
  const [exp] = await Promise.all([page.waitForEvent('download'), page.click('#export-rows a.export-download')]);
  const expPage = fs.readFileSync(await exp.path());
  const expApi = Buffer.from(await (await fetch(`${base}/v1/fine_tuning/jobs/${jobId}/exports/${exports[0].id}/content`)).arrayBuffer());
  assert.equal(expPage.subarray(0, 2).toString(), 'PK', 'the export downloads as a zip');
  assert.ok(expPage.equals(expApi), `export: downloaded ${expPage.length} bytes, the API serves ${expApi.length}`);
  assert.equal(exp.suggestedFilename(), exports[0].filename);
  log(`export: merged_safetensors bf16 built and downloaded, ${expPage.length} bytes`);

  // Jobs list with its filter.
  await page.locator('nav [data-nav="jobs"]').click();
  await page.locator(`tr[data-job="${jobId}"] .status-succeeded`).waitFor();
  await page.selectOption('#status-filter', 'running');
  await page.getByText('No running jobs.').waitFor();
  await page.selectOption('#status-filter', 'succeeded');
  await page.locator(`tr[data-job="${jobId}"]`).waitFor();
  log('jobs list filters by status');

  // A second job: pause, resume, cancel.
  await page.locator('nav [data-nav="new"]').click();
  await page.selectOption('#training_file', fileId);
  await page.fill('#f-batch_size', '2');
  await page.locator('details summary').click();
  await page.fill('#f-max_steps', '100000');
  await page.getByRole('button', { name: 'Create job' }).click();
  await page.waitForURL(/#\/jobs\/ftjob-/);
  const second = page.url().split('#/jobs/')[1];
  assert.notEqual(second, jobId);
  await until('the second job to train', async () => (await points(page)) >= 2, 40_000);
  await page.click('#pause');
  await page.locator('#job-status .status-paused').waitFor({ timeout: 30_000 });
  await page.click('#resume');
  await page.locator('#job-status .status-running').waitFor({ timeout: 30_000 });
  const beforeCancel = await points(page);
  await until('training after the resume', async () => (await points(page)) > beforeCancel, 30_000);
  await page.click('#cancel');
  await page.locator('#job-status .status-cancelled').waitFor({ timeout: 30_000 });
  assert.equal((await apiJson(`${base}/v1/fine_tuning/jobs/${second}`)).status, 'cancelled');
  assert.ok(await page.locator('#cancel').isDisabled());
  log(`second job ${second}: paused, resumed, cancelled`);

  assert.deepEqual(foreign, [], 'requests to other hosts');
  assert.deepEqual(errors, []);
  log('no request left the server\'s host');
  await context.close();

  // The watchers themselves: an attempt to reach another host is caught.
  {
    const ctx = await browser.newContext();
    const f = [];
    const errs = [];
    watchHosts(ctx, new URL(base).host, f);
    const pg = await ctx.newPage();
    watchErrors(pg, errs);
    await pg.goto(`${base}/`);
    await pg.evaluate(() => fetch('http://203.0.113.9/x').catch(() => null));
    await until('the blocked request to be noticed', () => f.length + errs.length > 0, 5_000);
    await ctx.close();
  }

  // ---- a server that requires a key ------------------------------------------------
  if (keyedBase) {
    const kctx = await browser.newContext({ viewport: { width: 1280, height: 800 } });
    const kforeign = [];
    const kerrors = [];
    const urls = [];
    const auths = [];
    watchHosts(kctx, new URL(keyedBase).host, kforeign);
    kctx.on('request', (r) => {
      urls.push(r.url());
      if (new URL(r.url()).pathname.startsWith('/v1/')) auths.push(r.headers().authorization ?? null);
    });
    const kp = await kctx.newPage();
    watchErrors(kp, kerrors);
    assert.equal((await kp.goto(`${keyedBase}/`)).status(), 200, 'the page loads without a key');
    await kp.locator('#api-key').waitFor();
    await kp.fill('#api-key', 'wrong');
    await kp.getByRole('button', { name: 'Use key' }).click();
    await kp.getByText('That API key was refused').waitFor();
    await kp.fill('#api-key', apiKey);
    await kp.getByRole('button', { name: 'Use key' }).click();
    await kp.getByText('No jobs yet.').waitFor();
    assert.equal(await kp.evaluate(() => sessionStorage.getItem('loraforge.apiKey')), apiKey);
    await kp.locator('nav [data-nav="datasets"]').click();
    await kp.setInputFiles('#file-input', data('chat-small.jsonl'));
    await kp.locator('li[data-upload="chat-small.jsonl"].ok').waitFor();
    assert.ok(auths.at(-1) === `Bearer ${apiKey}`, 'API calls carry the key');
    assert.ok(urls.every((u) => !u.includes(apiKey)), 'the key never appears in a URL');
    assert.deepEqual(kforeign, []);
    assert.deepEqual(kerrors, []);
    log('keyed server: the page asks for the key, refuses a wrong one, then works');
    await kctx.close();
  }
  log('all dashboard checks passed');
} catch (e) {
  // What the page looked like when it failed, for the CI log reader.
  let n = 0;
  for (const c of browser.contexts()) {
    for (const pg of c.pages()) {
      n += 1;
      const file = path.join(shots, `failure-${n}.png`);
      await pg.screenshot({ path: file, fullPage: true }).catch(() => {});
      console.error(`failure screenshot: ${file} (${pg.url()})`);
    }
  }
  throw e;
} finally {
  await browser.close();
}
