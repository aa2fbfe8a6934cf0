// A newcomer's path through the Elastic GPU sidebar, checked with the DOM where the eye would
// be fooled: two "Untitled" notebooks told apart, a memory line that stays on one line, a card
// that never shows 0 B after a restore, and the profile opened from the sidebar with its labels
// clear of the bars, the whole wall time in view and the advisor on the editor's line numbers.
// Screenshots go to e2e/screenshots/ (or $HARP_E2E_SCREENSHOTS), as newcomer-*.png.
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';

import { chromium } from 'playwright-core';

import {
  boxesOf,
  CHROMIUM,
  overflowing,
  overlapping,
  RECLAIM_OFF,
  screenshotDir,
  startAgent,
  startLab,
  until,
  writeNotebook,
  openLabWithPanel
} from './harness.mjs';

// two 40-byte arrays: what the user allocated is 80 B, what the agent maps is one 2 MiB page
const TWO_SMALL_ARRAYS =
  'import numpy as np, pycuda.autoinit, pycuda.gpuarray as ga\n' +
  'a = ga.to_gpu(np.arange(5.0))\n' +
  'b = ga.to_gpu(np.arange(5.0))\n' +
  'print((a + b).get().sum())';
// the editor numbers the .get() line 6 (the %%harp line is 1)
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
const STEP = { timeout: 180_000 };
const SHOTS = screenshotDir({ keep: true });

let browser;
let agent;
let lab;
let page;

const panel = () => page.locator(`#${PANEL_ID}`);
const cardByPath = path => panel().locator('.harp-KernelCard').filter({
  has: page.locator(`.harp-KernelCard-title[title^="${path} "]`)
});
const stateOf = async path => {
  const found = cardByPath(path);
  return (await found.count()) === 1 ? found.getAttribute('data-state') : null;
};
const waitForState = (path, state, timeoutMs = 60_000) =>
  until(async () => (await stateOf(path)) === state, `${path} to be ${state}`, timeoutMs);

async function shot(name) {
  const path = join(SHOTS, `newcomer-${name}.png`);
  await page.screenshot({ path });
  return path;
}

async function openAndRun(path) {
  await page.evaluate(async p => {
    const app = window.jupyterapp;
    await app.commands.execute('docmanager:open', { path: p });
    for (const widget of app.shell.widgets('main')) {
      if (widget.context?.path === p) {
        app.shell.activateById(widget.id);
        await widget.context.sessionContext.ready;
      }
    }
    // not awaited: a queued cell waits for the GPU
    void app.commands.execute('notebook:run-all-cells');
    return true;
  }, path);
}

async function outputText(path) {
  return page.evaluate(p => {
    for (const widget of window.jupyterapp.shell.widgets('main')) {
      if (widget.context?.path === p) {
        return widget.content.model.cells
          .get(0)
          .outputs.toJSON()
          .map(o => (typeof o.text === 'string' ? o.text : JSON.stringify(o.data ?? {})))
          .join('');
      }
    }
    return null;
  }, path);
}

/** Line boxes an element's text takes (1: it did not wrap). */
const lineCount = locator =>
  locator.evaluate(el => {
    const tops = new Set([...el.getClientRects()].map(r => Math.round(r.top)));
    return tops.size;
  });

/**
 * Nothing on the sidebar covers anything else: the pool's figures, and on each card the badge,
 * title and button, every field's label and value (and the parts of a value), the note; every
 * value fits its box and the card.
 */
async function assertSidebarReadable(when) {
  const figures = await boxesOf(panel().locator('.harp-PoolSummary-figure'));
  assert.equal(figures.length, 4, `${when}: GPUs, free, held, queued`);
  assert.deepEqual(overlapping(figures), [], `${when}: pool figures`);
  const figureParts = await boxesOf(panel().locator('.harp-PoolSummary-value, .harp-PoolSummary-label'));
  assert.deepEqual(overlapping(figureParts), [], `${when}: pool numbers and their labels`);
  const cards = panel().locator('.harp-KernelCard');
  for (let i = 0; i < (await cards.count()); i++) {
    const card = cards.nth(i);
    const name = `${when}, card ${await card.getAttribute('aria-label')}`;
    const parts = await boxesOf(card.locator(
      '.harp-KernelCard-header > *, dt, dd, .harp-KernelCard-note, .harp-KernelCard-timeline'));
    assert.deepEqual(overlapping(parts), [], `${name}: parts cover each other`);
    assert.ok(parts.length >= 8, `${name}: ${parts.length} parts checked`);
    const valueParts = await boxesOf(card.locator('dd [data-part]'));
    assert.deepEqual(overlapping(valueParts), [], `${name}: parts of a value cover each other`);
    const cardBox = await card.boundingBox();
    const outside = [...parts, ...valueParts].filter(b => b.right > cardBox.x + cardBox.width + 0.5);
    assert.deepEqual(outside.map(b => b.text), [], `${name}: past the card's right edge`);
    assert.deepEqual(await overflowing(card.locator('dd, .harp-KernelCard-titleTail')), [],
      `${name}: values wider than their box`);
  }
}

/**
 * A timeline anyone can read: labels end before the bars and cover neither a bar nor each other,
 * nor does the axis; the header's facts and the advisor's cells cover nothing; the advisor's line,
 * count and time each take one line; every bar lies in the plot.
 */
async function assertTimelineReadable(view, what) {
  // labels end before the first bar of the plot begins; no label, nor the axis, covers a bar
  // or another label
  const labelRight = await view.locator('.harp-Timeline-label').evaluateAll(els =>
    Math.max(...els.map(el => el.getBoundingClientRect().right)));
  const barsLeft = await view.locator('rect.harp-Timeline-span, rect.harp-Timeline-instant').evaluateAll(els =>
    Math.min(...els.map(el => el.getBoundingClientRect().left)));
  assert.ok(labelRight <= barsLeft, `labels end at ${labelRight}, bars start at ${barsLeft}`);
  const texts = await boxesOf(view.locator('.harp-Timeline-label, .harp-Timeline-axis'));
  const bars = await boxesOf(view.locator('rect.harp-Timeline-span, rect.harp-Timeline-instant'));
  assert.deepEqual(overlapping(texts), [], `${what}: labels and the axis cover each other`);
  assert.deepEqual(overlapping(texts, bars), [], `${what}: labels or the axis cover bars`);
  const labels = await view.locator('.harp-Timeline-label').evaluateAll(els => els.map(el => el.firstChild.textContent));
  assert.ok(labels.some(l => l.startsWith('emulated device')), `a device track in ${labels}`);
  // the numbers above and below the plot: the facts of the header, the advisor's table
  const facts = await boxesOf(view.locator('.harp-Timeline-header > *'));
  assert.deepEqual(overlapping(facts), [], `${what}: the header facts cover each other`);
  const adviceCells = await boxesOf(view.locator('.harp-Timeline-advice td'));
  assert.deepEqual(overlapping(adviceCells), [], `${what}: the advisor table cells cover each other`);
  assert.ok(texts.length >= 6 && bars.length > 10 && facts.length >= 5 && adviceCells.length >= 4,
    `${what} checked: ${texts.length} labels, ${bars.length} bars, ${facts.length} facts, ${adviceCells.length} cells`);
  // the advisor's line and its count and time are never cut over two lines ("38.69" / "ms")
  const adviceLines = await view.locator('.harp-Timeline-advice td:nth-child(odd)').evaluateAll(tds =>
    tds.map(td => {
      const range = document.createRange();
      range.selectNodeContents(td);
      return [td.textContent, new Set([...range.getClientRects()].map(r => Math.round(r.top))).size];
    }));
  assert.deepEqual(adviceLines.filter(([, lines]) => lines !== 1), [], `${what}: advisor cells on more than one line`);
  // every bar lies inside the plot
  const canvas = await view.locator('.harp-Timeline-canvas').boundingBox();
  const outside = bars.filter(b => b.right > canvas.x + canvas.width + 0.5 || b.left < canvas.x - 0.5);
  assert.deepEqual(outside.map(b => b.text), [], `${what}: bars outside the plot`);
}

before(async () => {
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ['--no-sandbox', '--disable-dev-shm-usage', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--disable-quic']
  });
  agent = await startAgent(SHOTS, ['--lease-ttl', '30', ...RECLAIM_OFF]);
  lab = await startLab({ agents: agent.endpoint, logDir: SHOTS, name: 'lab-newcomer' });
  writeNotebook(lab.root, 'Untitled.ipynb', [TWO_SMALL_ARRAYS]);
  writeNotebook(lab.root, 'Untitled1.ipynb', [TWO_SMALL_ARRAYS]);
  writeNotebook(lab.root, 'Untitled2.ipynb', [PROFILE_CELL]);
  page = await openLabWithPanel(browser, lab);
  await panel().waitFor({ state: 'visible' });
});

after(async () => {
  await page?.context().close();
  await browser?.close();
  await lab?.stop();
  await agent?.stop();
});

describe('a newcomer with two Untitled notebooks and one GPU', { timeout: 600_000 }, () => {
  test('the two cards are told apart: the ends of their names show, the path on hover', STEP, async () => {
    await openAndRun('Untitled.ipynb');
    await waitForState('Untitled.ipynb', 'held');
    await openAndRun('Untitled1.ipynb');
    await waitForState('Untitled1.ipynb', 'queued');
    const tails = [];
    for (const path of ['Untitled.ipynb', 'Untitled1.ipynb']) {
      const title = cardByPath(path).locator('.harp-KernelCard-title');
      const tail = title.locator('.harp-KernelCard-titleTail');
      // the tail is drawn whole, inside the title's box
      const [titleBox, tailBox] = [await title.boundingBox(), await tail.boundingBox()];
      assert.ok(tailBox.x >= titleBox.x - 0.5 && tailBox.x + tailBox.width <= titleBox.x + titleBox.width + 0.5,
        `${path}: the tail ${JSON.stringify(tailBox)} inside the title ${JSON.stringify(titleBox)}`);
      assert.match(await title.getAttribute('title'), new RegExp(`^${path.replace('.', '\\.')} `));
      tails.push(await tail.textContent());
    }
    assert.notEqual(tails[0], tails[1], `visible ends: ${tails}`);
    await assertSidebarReadable('one held, one queued');
    await shot('two-cards');
  });

  test('the memory line stays on one line, inside its card', STEP, async () => {
    const first = cardByPath('Untitled.ipynb');
    const memory = first.locator('[data-field="memory"] [data-part="in-use"]');
    await until(async () => /^\d[\d.]* \S+ \/ [\d.]+ GiB$/.test((await memory.textContent()) ?? ''), 'memory / total');
    assert.equal(await lineCount(memory), 1, `one line: ${await memory.textContent()}`);
    const memoryBox = await memory.boundingBox();
    const cardBox = await first.boundingBox();
    assert.ok(memoryBox.x + memoryBox.width <= cardBox.x + cardBox.width, 'inside the card');
  });

  test('after a restore the card never reads 0 B', STEP, async () => {
    const first = cardByPath('Untitled.ipynb');
    const memory = first.locator('[data-field="memory"]');
    // Release: the queued notebook gets the GPU; Lease on the first queues it behind; Release the
    // second: the first is restored. Every memory text shown from then on is sampled.
    await first.locator('.harp-KernelCard-action', { hasText: /^Release$/ }).click();
    await waitForState('Untitled.ipynb', 'parked');
    await waitForState('Untitled1.ipynb', 'held');
    await first.locator('.harp-KernelCard-action', { hasText: /^Lease$/ }).click();
    await waitForState('Untitled.ipynb', 'queued');
    await cardByPath('Untitled1.ipynb').locator('.harp-KernelCard-action', { hasText: /^Release$/ }).click();
    await waitForState('Untitled.ipynb', 'held');
    const seen = new Set();
    const deadline = Date.now() + 4000;
    while (Date.now() < deadline) {
      if ((await memory.count()) === 1) {
        seen.add(await memory.textContent());
      }
      await page.waitForTimeout(100);
    }
    // no "0 B" anywhere in the memory field: neither in use nor reserved ("120 B" is fine)
    assert.ok(![...seen].some(text => /(^|[^\d.])0 B/.test(text)), `memory after the restore: ${[...seen]}`);
    assert.equal(await lineCount(memory.locator('[data-part="in-use"]')), 1);
    // every part of the line ("120 B / 4.0 GiB", "2.0 MiB still parked") stays inside the card
    const cardRight = await first.evaluate(el => el.getBoundingClientRect().right);
    const partsRight = await memory.locator('[data-part]').evaluateAll(els =>
      els.map(el => [el.textContent, el.getBoundingClientRect().right]));
    for (const [text, right] of partsRight) {
      assert.ok(right <= cardRight, `"${text}" ends at ${right}, the card at ${cardRight}`);
    }
    await assertSidebarReadable('after the restore');
    await shot('restored');
  });

  test('after Release the card says the user released it, never "released after release"', STEP, async () => {
    const second = cardByPath('Untitled1.ipynb');
    await waitForState('Untitled1.ipynb', 'parked');
    const text = await second.textContent();
    assert.doesNotMatch(text, /released after release/i);
    assert.equal(await second.locator('[data-field="parked-reason"]').textContent(), 'You released it');
  });

  test('the profile opens from the sidebar, readable', STEP, async () => {
    await cardByPath('Untitled.ipynb').locator('.harp-KernelCard-action', { hasText: /^Release$/ }).click();
    await waitForState('Untitled.ipynb', 'parked');
    await openAndRun('Untitled2.ipynb');
    await until(async () => (await outputText('Untitled2.ipynb'))?.includes('harp.timeline'), 'the profile');
    // first where the cell shows it, in the notebook
    const inline = page.locator('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea .harp-Timeline');
    await inline.waitFor({ state: 'visible' });
    await until(async () => (await inline.locator('rect.harp-Timeline-span').count()) > 10, 'inline spans');
    await assertTimelineReadable(inline, 'the cell output');
    await shot('profile-inline');
    const card = cardByPath('Untitled2.ipynb');
    await card.locator('.harp-KernelCard-timeline').waitFor();
    await card.locator('.harp-KernelCard-timeline').click();
    const view = page.locator('.harp-TimelineView:not(.lm-mod-hidden) .harp-Timeline');
    await view.waitFor({ state: 'visible' });
    await until(async () => (await view.locator('rect.harp-Timeline-span').count()) > 10, 'spans');

    await assertTimelineReadable(view, 'the profile tab');

    // the tab has padding: the timeline does not touch its edges
    const padding = await view.evaluate(el => parseFloat(getComputedStyle(el).paddingLeft));
    assert.ok(padding >= 8, `padding ${padding}`);

    // the first view is the whole wall time
    const header = await view.locator('.harp-Timeline-header').textContent();
    const axis = await view.locator('.harp-Timeline-axis').textContent();
    const micros = text => {
      const [, value, unit] = /([\d.]+) (µs|ms|s)/.exec(text);
      return Number(value) * { µs: 1, ms: 1e3, s: 1e6 }[unit];
    };
    const wall = micros(/wall ([\d.]+ (?:µs|ms|s))/.exec(header)[1]);
    const [from, to] = axis.split('…').map(micros);
    assert.equal(from, 0, `the view starts at the cell's start: ${axis}`);
    assert.ok(to >= wall * 0.99, `the view (${axis}) covers the wall time (${header})`);

    // the advisor names the line as the editor numbers it
    assert.match(await view.locator('.harp-Timeline-advice').textContent(), /cell:6/);
    await assertSidebarReadable('with the profile open');
    await shot('profile-tab');
  });
});
