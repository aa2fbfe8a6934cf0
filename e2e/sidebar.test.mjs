// The Elastic GPU sidebar in a real JupyterLab with real Elastic GPU kernels leasing from a real
// (emulated) GPU agent, driven in headless Debian chromium. Screenshots go to e2e/screenshots/
// (or $HARP_E2E_SCREENSHOTS); process logs next to them.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';

import { chromium } from 'playwright-core';

import {
  CHROMIUM,
  RECLAIM_OFF,
  screenshotDir,
  startAgent,
  startLab,
  until,
  writeNotebook
} from './harness.mjs';

const GPU_CELL =
  'import pycuda.autoinit, pycuda.gpuarray as ga, numpy as np\n' +
  'a = ga.to_gpu(np.arange(10.0))\n' +
  'print(a.get().sum())';
// the advisor must name the .get() line; the notebook shows the timeline inline
const PROFILE_CELL = [
  '%%harp profile',
  'import numpy as np, pycuda.autoinit, pycuda.gpuarray as ga',
  'x = ga.to_gpu(np.arange(1000, dtype=np.float32))',
  't = 0.0',
  'for _ in range(10):',
  '    t += float((x * 2).get().sum())',
  'print(t)'
].join('\n');
const PANEL_ID = 'harp-elastic-gpu-panel';
// a step that waits longer than this is stuck: fail it (and stop its processes) rather than hang
const STEP = { timeout: 180_000 };
const SHOTS = screenshotDir();
console.log(`e2e: screenshots and logs in ${SHOTS}`);

let browser;

before(async () => {
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--no-sandbox',
      '--disable-dev-shm-usage',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      '--disable-quic'
    ]
  });
});

after(async () => {
  await browser?.close();
});

/** A lab page logged in with the token, the app exposed as window.jupyterapp. */
async function openLab(lab) {
  const context = await browser.newContext({ viewport: { width: 1400, height: 900 } });
  const page = await context.newPage();
  const consoleErrors = [];
  page.on('console', message => {
    if (message.type() === 'error') {
      consoleErrors.push(message.text());
    }
  });
  await page.goto(`${lab.url}/lab?token=${lab.token}`, { timeout: 120_000 });
  await waitForApp(page);
  page.consoleErrors = consoleErrors;
  // how often the sidebar calls the server, reported at the end (no storms: events are debounced)
  page.harpCalls = { kernels: 0, pool: 0, since: Date.now() };
  page.on('request', request => {
    const path = new URL(request.url()).pathname;
    if (path.endsWith('/harp/api/kernels')) {
      page.harpCalls.kernels += 1;
    } else if (path.endsWith('/harp/api/pool')) {
      page.harpCalls.pool += 1;
    }
  });
  return page;
}

/** Wait until the lab has started and restored its layout (a restore can collapse a sidebar). */
async function waitForApp(page) {
  await page.waitForFunction(() => window.jupyterapp?.commands?.hasCommand('harp:open-panel'), null, {
    timeout: 60_000
  });
  await page.evaluate(async () => {
    await window.jupyterapp.restored;
    return true;
  });
}

const panelTab = page => page.locator(`.jp-SideBar .lm-TabBar-tab[data-id="${PANEL_ID}"]`);
const panel = page => page.locator(`#${PANEL_ID}`);
const card = (page, name) =>
  panel(page)
    .locator('.harp-KernelCard')
    .filter({ has: page.locator('.harp-KernelCard-title', { hasText: name }) });
const figure = (page, name) =>
  panel(page).locator(`.harp-PoolSummary [data-field="${name}"] .harp-PoolSummary-value`);
const statusItem = page => page.locator('#jp-main-statusbar .harp-StatusItem');

async function openPanelByItsTab(page) {
  const tab = panelTab(page);
  await tab.waitFor({ state: 'visible' });
  const classes = (await tab.getAttribute('class')) ?? '';
  if (!classes.includes('lm-mod-current')) {
    await tab.click();
  }
  await panel(page).waitFor({ state: 'visible' });
}

async function stateOf(page, name) {
  const found = card(page, name);
  return (await found.count()) === 1 ? found.getAttribute('data-state') : null;
}

async function waitForState(page, name, state, timeoutMs = 60_000) {
  await until(
    async () => (await stateOf(page, name)) === state,
    `the card of ${name} to show ${state} (it shows ${await stateOf(page, name)})`,
    timeoutMs
  );
}

/** Open (or bring to front) a notebook and run all its cells, as Shift+Enter on each would. */
async function runNotebook(page, path) {
  await openNotebook(page, path);
  await page.evaluate(() => {
    // not awaited: the command resolves only when the cells finish, and a queued cell waits
    void window.jupyterapp.commands.execute('notebook:run-all-cells');
    return true;
  });
}

async function openNotebook(page, path) {
  await page.evaluate(async p => {
    const app = window.jupyterapp;
    await app.commands.execute('docmanager:open', { path: p });
    for (const widget of app.shell.widgets('main')) {
      if (widget.context?.path === p) {
        app.shell.activateById(widget.id);
        await widget.context.sessionContext.ready;
      }
    }
    return true;
  }, path);
}

/** The text of the first cell's outputs, from the notebook model the page shows. */
async function outputText(page, path) {
  return page.evaluate(p => {
    for (const widget of window.jupyterapp.shell.widgets('main')) {
      if (widget.context?.path === p) {
        const outputs = widget.content.model.cells.get(0).outputs.toJSON();
        return outputs
          .map(o => (typeof o.text === 'string' ? o.text : JSON.stringify(o.data ?? o.text ?? o)))
          .join('');
      }
    }
    return null;
  }, path);
}

async function executionCount(page, path) {
  return page.evaluate(p => {
    for (const widget of window.jupyterapp.shell.widgets('main')) {
      if (widget.context?.path === p) {
        return widget.content.model.cells.get(0).executionCount;
      }
    }
    return null;
  }, path);
}

async function shot(page, name) {
  const path = join(SHOTS, `${name}.png`);
  await page.screenshot({ path });
  return path;
}

describe('with one emulated GPU agent', { timeout: 600_000 }, () => {
  let agent;
  let lab;
  let page;

  before(async () => {
    agent = await startAgent(SHOTS, ['--lease-ttl', '30', ...RECLAIM_OFF]);
    lab = await startLab({
      agents: agent.endpoint,
      logDir: SHOTS,
      // renew every 2 s, so a dead agent is noticed soon
      env: { HARP_LEASE_TTL: '6' }
    });
    writeNotebook(lab.root, 'alpha.ipynb', [GPU_CELL]);
    writeNotebook(lab.root, 'beta.ipynb', [GPU_CELL]);
    writeNotebook(lab.root, 'delta.ipynb', [PROFILE_CELL]);
    writeNotebook(lab.root, 'plain.ipynb', ['print(1 + 1)'], 'python3', 'Python 3 (ipykernel)');
    const kernels = await lab.request('/harp/api/kernels');
    assert.equal(kernels.status, 200, `GET /harp/api/kernels: ${JSON.stringify(kernels.body)}`);
    page = await openLab(lab);
  });

  after(async () => {
    if (page) {
      const { kernels, pool, since } = page.harpCalls;
      const seconds = Math.round((Date.now() - since) / 1000);
      console.log(`e2e: the page called GET /harp/api/kernels ${kernels}x and /pool ${pool}x in ${seconds} s`);
    }
    await page?.context().close();
    await lab?.stop();
    await agent?.stop();
  });

  test('the sidebar opens from its tab and shows the pool', STEP, async () => {
    await openPanelByItsTab(page);
    await until(async () => (await figure(page, 'gpus').textContent()) === '1', 'GPUs = 1');
    await until(async () => (await figure(page, 'free').textContent()) === '1', 'free = 1');
    assert.equal(await figure(page, 'held').textContent(), '0');
    assert.equal(await figure(page, 'queued').textContent(), '0');
    const agentRow = panel(page).locator(`.harp-AgentRow[data-endpoint="${agent.endpoint}"]`);
    await agentRow.waitFor();
    assert.equal(await agentRow.locator('.harp-EmulatedTag').count(), 1, 'emulated agent marked');
    assert.match(
      await panel(page).locator('.harp-ElasticGPUPanel-empty').textContent(),
      /No Elastic GPU kernel is running/
    );
  });

  test('a notebook on another kernelspec gets no card and no status item', STEP, async () => {
    await openNotebook(page, 'plain.ipynb');
    await until(
      async () => (await page.request.get(`${lab.url}/api/kernels?token=${lab.token}`)).ok(),
      'kernels API'
    );
    assert.equal((await lab.request('/harp/api/kernels')).body.kernels.length, 0);
    assert.equal(await panel(page).locator('.harp-KernelCard').count(), 0);
    assert.equal(await statusItem(page).isVisible(), false);
  });

  test('an Elastic GPU notebook gets a card; its GPU cell makes it held', STEP, async () => {
    await openNotebook(page, 'alpha.ipynb');
    await waitForState(page, 'alpha.ipynb', 'none');
    assert.equal(await card(page, 'alpha.ipynb').locator('.harp-KernelCard-action').textContent(), 'Lease');
    await statusItem(page).waitFor({ state: 'visible' });
    assert.match(await statusItem(page).textContent(), /no GPU yet/);

    await runNotebook(page, 'alpha.ipynb');
    await until(async () => (await outputText(page, 'alpha.ipynb'))?.includes('45.0'), 'alpha prints 45.0');
    await waitForState(page, 'alpha.ipynb', 'held');
    const alpha = card(page, 'alpha.ipynb');
    assert.equal(await alpha.locator('.harp-KernelCard-action').textContent(), 'Release');
    assert.equal(await alpha.locator('[data-field="agent"] .harp-Endpoint').textContent(), agent.endpoint);
    // the event makes the badge change at once; the fetch it triggers fills in the GPU details
    await alpha.locator('[data-field="agent"] .harp-EmulatedTag').waitFor();
    // the total is the agent's (the emulated one's --emulated-memory, or its slot's cap)
    await until(async () => {
      const { body } = await lab.request('/harp/api/kernels');
      const totalBytes = body.kernels.find(k => k.path === 'alpha.ipynb')?.memory_total;
      const shown = await alpha.locator('[data-field="memory"] [data-part="in-use"]').textContent();
      return totalBytes > 0 && new RegExp(`^\\d.* / ${(totalBytes / 2 ** 30).toFixed(1)} GiB$`).test(shown);
    }, 'memory used / the agent’s total');
    assert.match(await alpha.locator('[data-field="idle"]').textContent(), /^in /);
    await until(async () => (await figure(page, 'held').textContent()) === '1', 'pool: held = 1');
    assert.equal(await figure(page, 'free').textContent(), '0');

    // held time ticks in the browser
    const heldBefore = await alpha.locator('[data-field="held"]').textContent();
    await until(
      async () => (await alpha.locator('[data-field="held"]').textContent()) !== heldBefore,
      `held time to move on from ${heldBefore}`
    );
    await until(async () => /GPU held/.test(await statusItem(page).textContent()), 'status: GPU held');
    await shot(page, 'held');
  });

  test('the status bar item opens the sidebar', STEP, async () => {
    await panelTab(page).click(); // collapse the sidebar
    await panel(page).waitFor({ state: 'hidden' });
    await statusItem(page).click();
    await panel(page).waitFor({ state: 'visible' });
  });

  test('Release parks it; the next GPU cell holds again with the array intact', STEP, async () => {
    const alpha = card(page, 'alpha.ipynb');
    await alpha.locator('.harp-KernelCard-action', { hasText: /^Release$/ }).click();
    await waitForState(page, 'alpha.ipynb', 'parked');
    assert.equal(await alpha.locator('.harp-KernelCard-action').textContent(), 'Lease');
    await until(async () => /GPU parked/.test(await statusItem(page).textContent()), 'status: GPU parked');
    await until(async () => (await figure(page, 'free').textContent()) === '1', 'pool: free = 1');
    await shot(page, 'parked');

    const before = await executionCount(page, 'alpha.ipynb');
    await runNotebook(page, 'alpha.ipynb');
    await until(
      async () => (await executionCount(page, 'alpha.ipynb')) > before,
      'alpha runs again'
    );
    await until(async () => (await outputText(page, 'alpha.ipynb'))?.includes('45.0'), 'alpha prints 45.0');
    await waitForState(page, 'alpha.ipynb', 'held');
  });

  test('a second notebook queues at position 1 and gets the GPU when the first is released', STEP, async () => {
    await runNotebook(page, 'beta.ipynb');
    await waitForState(page, 'beta.ipynb', 'queued');
    const beta = card(page, 'beta.ipynb');
    assert.match(await beta.locator('[data-field="position"]').textContent(), /^position 1\b/);
    assert.equal(await beta.locator('.harp-KernelCard-action').isDisabled(), true);
    await until(async () => (await figure(page, 'queued').textContent()) === '1', 'pool: queued = 1');
    assert.equal(await stateOf(page, 'alpha.ipynb'), 'held');
    // beta's cell is still waiting for the GPU
    assert.equal((await outputText(page, 'beta.ipynb'))?.includes('45.0'), false);
    await until(async () => /GPU queued #1/.test(await statusItem(page).textContent()), 'status: queued #1');
    await shot(page, 'sidebar');

    await card(page, 'alpha.ipynb').locator('.harp-KernelCard-action', { hasText: /^Release$/ }).click();
    await waitForState(page, 'beta.ipynb', 'held');
    await waitForState(page, 'alpha.ipynb', 'parked');
    await until(async () => (await outputText(page, 'beta.ipynb'))?.includes('45.0'), 'beta prints 45.0');
    await until(async () => (await figure(page, 'queued').textContent()) === '0', 'pool: queued = 0');
  });

  test('Lease on a parked kernel queues it behind the holder, and it gets the GPU next', STEP, async () => {
    await card(page, 'alpha.ipynb').locator('.harp-KernelCard-action', { hasText: /^Lease$/ }).click();
    await waitForState(page, 'alpha.ipynb', 'queued');
    await card(page, 'beta.ipynb').locator('.harp-KernelCard-action', { hasText: /^Release$/ }).click();
    await waitForState(page, 'alpha.ipynb', 'held');
    await waitForState(page, 'beta.ipynb', 'parked');
  });

  test('%%harp profile draws its timeline inline, and the sidebar opens the latest one', STEP, async () => {
    await card(page, 'alpha.ipynb').locator('.harp-KernelCard-action', { hasText: /^Release$/ }).click();
    await waitForState(page, 'alpha.ipynb', 'parked');
    await runNotebook(page, 'delta.ipynb');
    const output = page.locator('.jp-NotebookPanel:not(.lm-mod-hidden) .harp-TimelineOutput');
    try {
      await output.waitFor({ state: 'visible', timeout: 60_000 });
    } catch (error) {
      await shot(page, 'timeline-failure');
      console.log('delta outputs:', await outputText(page, 'delta.ipynb'));
      console.log('console errors:', page.consoleErrors);
      throw error;
    }
    // a track label's own text (its <title> child, the hover text, names the process too)
    const labels = await output
      .locator('.harp-Timeline-label')
      .evaluateAll(els => els.map(el => el.firstChild.textContent));
    for (const track of ['API calls', 'blocked at sync points', 'wire + agent queue', 'agent execution']) {
      assert.ok(labels.includes(track), `track ${track} in ${labels}`);
    }
    assert.ok(labels.some(l => l.startsWith('emulated device')), `a device track in ${labels}`);
    assert.ok((await output.locator('rect.harp-Timeline-span').count()) > 10, 'spans drawn');
    const advice = await output.locator('.harp-Timeline-advice').textContent();
    assert.match(advice, /\(x \* 2\)\.get\(\)\.sum\(\)/);
    assert.match(advice, /10× dtoh/);
    await output.scrollIntoViewIfNeeded();
    await shot(page, 'timeline');
    // hover shows a span's details; the wheel zooms in
    const span = output.locator('rect.harp-cat-sync').first();
    await span.hover();
    await until(async () => await output.locator('.harp-Timeline-tip').isVisible(), 'hover tip');
    assert.match(await output.locator('.harp-Timeline-tip').textContent(), /wait: dtoh/);
    const axisBefore = await output.locator('.harp-Timeline-axis').textContent();
    await output.locator('.harp-Timeline-canvas').hover({ position: { x: 400, y: 20 } });
    await page.mouse.wheel(0, -400);
    await until(
      async () => (await output.locator('.harp-Timeline-axis').textContent()) !== axisBefore,
      'the view to zoom'
    );
    await shot(page, 'timeline-zoomed');

    // the notebook keeps fallbacks for other front ends
    const saved = await page.evaluate(() => {
      for (const widget of window.jupyterapp.shell.widgets('main')) {
        if (widget.context?.path === 'delta.ipynb') {
          return widget.content.model.cells.get(0).outputs.toJSON().map(o => Object.keys(o.data ?? {}));
        }
      }
      return [];
    });
    assert.ok(
      saved.some(keys => ['application/vnd.harp.timeline+json', 'text/html', 'text/plain'].every(k => keys.includes(k))),
      `outputs: ${JSON.stringify(saved)}`
    );

    const delta = card(page, 'delta.ipynb');
    await delta.locator('.harp-KernelCard-timeline').click();
    const view = page.locator('.harp-TimelineView:not(.lm-mod-hidden) .harp-Timeline');
    await view.waitFor({ state: 'visible' });
    assert.ok((await view.locator('rect.harp-Timeline-span').count()) > 10, 'spans in the view');
    assert.match(await view.locator('.harp-Timeline-advice').textContent(), /10× dtoh/);
    await shot(page, 'timeline-view');
    await card(page, 'delta.ipynb').locator('.harp-KernelCard-action', { hasText: /^Release$/ }).click();
    await waitForState(page, 'delta.ipynb', 'parked');
    await card(page, 'alpha.ipynb').locator('.harp-KernelCard-action', { hasText: /^Lease$/ }).click();
    await waitForState(page, 'alpha.ipynb', 'held'); // as the next steps expect
  });

  test('settings: the Settings Editor lists them, and "confirm before release" asks first', STEP, async () => {
    const settings = await lab.request('/lab/api/settings/harp-jupyter:plugin');
    assert.equal(settings.status, 200);
    assert.equal(settings.body.schema.title, 'Elastic GPU');
    assert.deepEqual(Object.keys(settings.body.schema.properties).sort(), [
      'confirmRelease',
      'refreshInterval',
      'showEmulatedAgents',
      'showStatusItem'
    ]);
    const saved = await lab.request('/lab/api/settings/harp-jupyter:plugin', {
      method: 'PUT',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ raw: JSON.stringify({ confirmRelease: true, showEmulatedAgents: false }) })
    });
    assert.equal(saved.status, 204, JSON.stringify(saved.body));
    await page.reload();
    await waitForApp(page);
    await page.evaluate(() => window.jupyterapp.commands.execute('harp:open-panel'));
    await panel(page).waitFor({ state: 'visible' });
    await waitForState(page, 'alpha.ipynb', 'held');
    // emulated agents are no longer listed, but still counted and noted
    await until(
      async () => /1 emulated agent hidden/.test(await panel(page).locator('.harp-PoolSummary').textContent()),
      'the emulated agent hidden'
    );
    assert.equal(await panel(page).locator('.harp-AgentRow').count(), 0);

    const release = card(page, 'alpha.ipynb').locator('.harp-KernelCard-action', { hasText: /^Release$/ });
    await release.click();
    const dialog = page.locator('.jp-Dialog');
    await dialog.waitFor();
    const said = await dialog.textContent();
    assert.match(said, /Release the GPU\?/);
    // its figure is the held one: the parked state is that and what recreates the session
    assert.match(said, /with what recreates its session, is parked on the agent/);
    await dialog.locator('button', { hasText: /^Cancel$/ }).click();
    await dialog.waitFor({ state: 'detached' });
    assert.equal(await stateOf(page, 'alpha.ipynb'), 'held', 'Cancel keeps the GPU');

    await release.click();
    await dialog.locator('button', { hasText: /^Release$/ }).click();
    await waitForState(page, 'alpha.ipynb', 'parked');
    await card(page, 'alpha.ipynb').locator('.harp-KernelCard-action', { hasText: /^Lease$/ }).click();
    await waitForState(page, 'alpha.ipynb', 'held');
  });

  test('the dark theme keeps the badges readable', STEP, async () => {
    await page.evaluate(() =>
      window.jupyterapp.commands.execute('apputils:change-theme', { theme: 'JupyterLab Dark' })
    );
    await until(
      () => page.evaluate(() => document.body.dataset.jpThemeLight === 'false'),
      'the dark theme'
    );
    await page.locator('#jupyterlab-splash').waitFor({ state: 'detached' });
    const colours = await card(page, 'alpha.ipynb')
      .locator('.harp-StateBadge')
      .evaluate(el => {
        const style = getComputedStyle(el);
        return { color: style.color, background: style.backgroundColor };
      });
    assert.notEqual(colours.color, colours.background);
    await shot(page, 'sidebar-dark');
    await page.evaluate(() =>
      window.jupyterapp.commands.execute('apputils:change-theme', { theme: 'JupyterLab Light' })
    );
  });

  test('a dead agent shows as unreachable and the holder’s card as lost, with what to do', STEP, async () => {
    // killed, not stopped: SIGTERM makes an agent drain (park, hand over, exit), a test of its own
    await agent.kill();
    await waitForState(page, 'alpha.ipynb', 'lost', 90_000);
    const alpha = card(page, 'alpha.ipynb');
    assert.match(await alpha.locator('.harp-KernelCard-note').textContent(), /press Lease/);
    assert.equal(await alpha.locator('.harp-KernelCard-action').textContent(), 'Lease');
    await panel(page).locator('.harp-RefreshButton').click();
    const warning = panel(page).locator('.harp-PoolSummary-warning[data-field="unreachable"]');
    await warning.waitFor({ timeout: 30_000 });
    assert.match(await warning.textContent(), new RegExp(agent.endpoint));
    await shot(page, 'lost');
    assert.deepEqual(
      page.consoleErrors.filter(text => /harp/i.test(text)),
      [],
      'no errors of ours in the browser console'
    );
  });
});

function machineHasGPU() {
  try {
    return /^GPU /m.test(execFileSync('nvidia-smi', ['-L'], { encoding: 'utf8' }));
  } catch {
    return false;
  }
}

describe('with no agents configured', { skip: machineHasGPU() && 'this machine has a GPU: HARP_AGENTS=auto would start agents' }, () => {
  let lab;
  let page;

  before(async () => {
    lab = await startLab({ agents: null, logDir: SHOTS, name: 'lab-no-agents' });
    page = await openLab(lab);
  });

  after(async () => {
    await page?.context().close();
    await lab?.stop();
  });

  test('the sidebar says no agents are configured and what to do', STEP, async () => {
    await openPanelByItsTab(page);
    const problem = panel(page).locator('.harp-Problem');
    await problem.waitFor();
    assert.equal(await problem.getAttribute('data-kind'), 'NoAgents');
    assert.match(await problem.locator('.harp-Problem-hint').textContent(), /HARP_AGENTS/);
    await shot(page, 'no-agents');
  });
});
