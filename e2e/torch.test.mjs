// Issue 15's "Done when", walked in a real JupyterLab with ONE emulated GPU agent (CPU torch in
// its worker, labelled EMULATED): a newcomer opens an Elastic GPU notebook, trains a small CNN on
// device="harp" (no import of harp: the kernel registers the device when torch is imported),
// watches the sidebar's card lease the GPU and, after `%harp release`, park the model with its
// bytes; the next cell finds the parameters as they were and trains on; `%%harp profile` of one
// training step shows aten operators on the timeline and the sync-point advisor.
// Screenshots go to e2e/screenshots/ (or $HARP_E2E_SCREENSHOTS), as torch-*.png.
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';

import { chromium } from 'playwright-core';

import { CHROMIUM, RECLAIM_OFF, screenshotDir, startAgent, startLab, until, writeNotebook, openLabWithPanel } from './harness.mjs';

const PATH = 'cnn.ipynb';
const TRAIN = [
  'import torch',
  'torch.manual_seed(0)',
  '',
  'class Net(torch.nn.Module):',
  '    def __init__(self):',
  '        super().__init__()',
  '        self.conv1 = torch.nn.Conv2d(1, 8, 3, padding=1)',
  '        self.conv2 = torch.nn.Conv2d(8, 16, 3, padding=1)',
  '        self.fc = torch.nn.Linear(16 * 7 * 7, 10)',
  '',
  '    def forward(self, x):',
  '        x = torch.nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)',
  '        x = torch.nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)',
  '        return self.fc(x.flatten(1))',
  '',
  'model = Net().to("harp")',
  'opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)',
  'x = torch.randn(32, 1, 28, 28, device="harp")',
  'y = torch.randint(0, 10, (32,), device="harp")',
  '',
  'def step():',
  '    opt.zero_grad()',
  '    loss = torch.nn.functional.cross_entropy(model(x), y)',
  '    loss.backward()',
  '    opt.step()',
  '    return loss.item()',
  '',
  'def checksum():',
  '    return sum(p.detach().double().sum().item() for p in model.parameters())',
  '',
  'losses = [step() for _ in range(8)]',
  "print('device', next(model.parameters()).device)",
  "print('losses', ' '.join(f'{v:.4f}' for v in losses))",
  "print('checksum', repr(checksum()))"
].join('\n');
const RELEASE = '%harp release';
const RESUME = [
  "print('checksum after park', repr(checksum()))",
  "print('one more step', f'{step():.4f}')"
].join('\n');
// the editor numbers the .item() line 6 (the %%harp line is 1)
const PROFILE = [
  '%%harp profile',
  'opt.zero_grad()',
  'loss = torch.nn.functional.cross_entropy(model(x), y)',
  'loss.backward()',
  'opt.step()',
  "print('profiled loss', f'{loss.item():.4f}')"
].join('\n');
const CELLS = [TRAIN, RELEASE, RESUME, PROFILE];
const PANEL_ID = 'harp-elastic-gpu-panel';
const STEP = { timeout: 240_000 };
const SHOTS = screenshotDir({ keep: true });

let browser;
let agent;
let lab;
let page;

const panel = () => page.locator(`#${PANEL_ID}`);
const card = () =>
  panel()
    .locator('.harp-KernelCard')
    .filter({ has: page.locator(`.harp-KernelCard-title[title^="${PATH} "]`) });
const stateOf = async () => ((await card().count()) === 1 ? card().getAttribute('data-state') : null);
const waitForState = (state, timeoutMs = 60_000) =>
  until(async () => (await stateOf()) === state, `${PATH} to be ${state}`, timeoutMs);
const fieldText = async name => {
  const field = card().locator(`[data-field="${name}"]`);
  return (await field.count()) === 1 ? field.textContent() : null;
};

async function shot(name, locator = page) {
  await locator.screenshot({ path: join(SHOTS, `torch-${name}.png`) });
}

/** Run cell `index` as Shift+Enter would and wait for its reply (its execution count). */
async function runCell(index, timeoutMs = 180_000) {
  await page.evaluate(
    async ({ p, i }) => {
      const app = window.jupyterapp;
      await app.commands.execute('docmanager:open', { path: p });
      for (const widget of app.shell.widgets('main')) {
        if (widget.context?.path === p) {
          app.shell.activateById(widget.id);
          await widget.context.sessionContext.ready;
          widget.content.activeCellIndex = i;
          void app.commands.execute('notebook:run-cell');
        }
      }
      return true;
    },
    { p: PATH, i: index }
  );
  await until(
    async () =>
      page.evaluate(
        ({ p, i }) => {
          for (const widget of window.jupyterapp.shell.widgets('main')) {
            if (widget.context?.path === p) {
              return widget.content.model.cells.get(i).executionCount !== null;
            }
          }
          return false;
        },
        { p: PATH, i: index }
      ),
    `cell ${index} to finish`,
    timeoutMs,
    500
  );
  return outputText(index);
}

/** The text of one cell's outputs (streams, results and errors), from the notebook model. */
async function outputText(index) {
  return page.evaluate(
    ({ p, i }) => {
      for (const widget of window.jupyterapp.shell.widgets('main')) {
        if (widget.context?.path === p) {
          return widget.content.model.cells
            .get(i)
            .outputs.toJSON()
            .map(o => {
              if (o.output_type === 'error') {
                return `${o.ename}: ${o.evalue}\n${(o.traceback ?? []).join('\n')}`;
              }
              return typeof o.text === 'string' ? o.text : JSON.stringify(o.data ?? {});
            })
            .join('\n');
        }
      }
      return null;
    },
    { p: PATH, i: index }
  );
}

async function leaseOf() {
  const { body } = await lab.request('/harp/api/kernels');
  return body.kernels.find(k => k.path === PATH) ?? null;
}

/** "12.5 KiB" → bytes; null for anything else. */
function bytesOf(text) {
  const m = /^([\d.]+) (B|KiB|MiB|GiB)/.exec((text ?? '').trim());
  return m ? Number(m[1]) * { B: 1, KiB: 1024, MiB: 1024 ** 2, GiB: 1024 ** 3 }[m[2]] : null;
}

before(async () => {
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ['--no-sandbox', '--disable-dev-shm-usage', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--disable-quic']
  });
  agent = await startAgent(SHOTS, ['--lease-ttl', '30', ...RECLAIM_OFF]);
  lab = await startLab({ agents: agent.endpoint, logDir: SHOTS, name: 'lab-torch' });
  writeNotebook(lab.root, PATH, CELLS);
  page = await openLabWithPanel(browser, lab, { width: 1280, height: 900 });
  await panel().waitFor({ state: 'visible' });
});

after(async () => {
  await page?.context().close();
  await browser?.close();
  await lab?.stop();
  await agent?.stop();
});

let checksumBefore;

describe('a newcomer trains a small CNN on device="harp" (one emulated agent)', { timeout: 900_000 }, () => {
  test('the CNN trains on "harp" without importing harp: finite losses that fall', STEP, async () => {
    const text = await runCell(0);
    assert.doesNotMatch(text, /Error|Traceback/, text);
    assert.match(text, /^device harp(:0)?$/m, text);
    const losses = /^losses (.+)$/m.exec(text)[1].split(' ').map(Number);
    assert.equal(losses.length, 8, text);
    assert.ok(losses.every(Number.isFinite), `finite losses: ${losses}`);
    // one fixed batch, a fixed seed: training on it brings its loss down
    assert.ok(losses.at(-1) < losses[0], `the last loss below the first: ${losses}`);
    checksumBefore = /^checksum (\S+)$/m.exec(text)[1];
    console.log(`torch e2e: losses ${losses.join(' ')}; parameter checksum ${checksumBefore}`);
  });

  test('the sidebar shows the kernel holding the GPU with device memory in use', STEP, async () => {
    await waitForState('held');
    const lease = await leaseOf();
    assert.equal(lease.state, 'held', JSON.stringify(lease));
    // the model, its gradients, the optimizer's momentum and the batch
    const inUse = card().locator('[data-field="memory"] [data-part="in-use"]');
    await until(async () => bytesOf(await inUse.textContent()) > 0, 'the memory in use on the card');
    const memory = await fieldText('memory');
    assert.match(await fieldText('gpu'), /EMULATED|emulated/i, 'the emulated agent is labelled');
    console.log(`torch e2e: held, memory ${memory}`);
    await shot('held');
    await shot('card-held', card());
  });

  test('%harp release parks it: the card shows it parked with its bytes', STEP, async () => {
    const text = await runCell(1);
    assert.doesNotMatch(text, /Error|Traceback/, text);
    await waitForState('parked');
    await until(async () => (await leaseOf()).parked_bytes > 0, 'the parked bytes in the API');
    await until(async () => bytesOf(await fieldText('parked')) > 0, 'the Parked row of the card');
    assert.equal(await fieldText('parked-reason'), 'You released it');
    // the parked figure includes the session's records (torch's tensor index and RNG state),
    // so it is a little more than the held memory: the card says what it counts
    assert.match(await fieldText('parked'), /^[\d.]+ (B|KiB|MiB) ?\(memory \+ session records\)$/);
    // restoring is not "at the same addresses" alone (pycuda's promise): tensors keep their values
    const note = await card().locator('.harp-KernelCard-note').textContent();
    assert.match(note, /torch tensors with their values/, note);
    const lease = await leaseOf();
    console.log(`torch e2e: parked ${lease.parked_bytes} B, card says ${await fieldText('parked')}`);
    await shot('parked');
    await shot('card-parked', card());
  });

  test('the next cell finds the parameters as they were and trains one more step', STEP, async () => {
    const text = await runCell(2);
    assert.doesNotMatch(text, /Error|Traceback/, text);
    const after = /^checksum after park (\S+)$/m.exec(text);
    assert.ok(after, text);
    assert.equal(after[1], checksumBefore, 'the parameters survived the park bit for bit');
    const loss = Number(/^one more step (\S+)$/m.exec(text)[1]);
    assert.ok(Number.isFinite(loss), text);
    await waitForState('held');
    await shot('resumed');
  });

  test('%%harp profile of one step names aten operators and shows the advisor', STEP, async () => {
    const text = await runCell(3);
    assert.match(text, /profiled loss/, text);
    assert.match(text, /harp\.timeline/, 'the timeline output');
    const view = page.locator('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea .harp-Timeline');
    await view.waitFor({ state: 'visible' });
    const bars = view.locator('rect.harp-Timeline-span');
    await until(async () => (await bars.count()) > 10, 'the timeline bars');
    // what a hover over each bar says: its name first
    const names = await bars.evaluateAll(rects =>
      rects.map(rect => {
        const box = rect.getBoundingClientRect();
        rect.dispatchEvent(new MouseEvent('mousemove', {
          bubbles: true,
          clientX: box.left + box.width / 2,
          clientY: box.top + box.height / 2
        }));
        const tip = rect.closest('.harp-Timeline').querySelector('.harp-Timeline-tip');
        return tip.textContent.split(/\s{2}|\n/)[0];
      })
    );
    const aten = [...new Set(names.filter(n => n.includes('aten::')))];
    console.log(`torch e2e: aten bars ${aten.join(', ')}`);
    assert.ok(aten.some(n => /aten::(convolution|conv2d|addmm|linear|mm)/.test(n)),
      `a convolution or matmul bar among ${[...new Set(names)].join(', ')}`);
    // show one: the mouse on the first convolution bar
    const conv = names.findIndex(n => /aten::(convolution|conv2d|addmm)/.test(n));
    await bars.nth(conv).hover({ force: true });
    const tip = view.locator('.harp-Timeline-tip');
    await until(async () => (await tip.isVisible()) && /aten::/.test(await tip.textContent()), 'the tip');
    // a convolution runs in the model's forward, which the first cell defined: its lines 12-13,
    // named as IPython's tracebacks name that cell (not the kernel's /tmp/ipykernel_* file)
    const convTips = await bars.evaluateAll(rects =>
      rects.map(rect => {
        rect.dispatchEvent(new MouseEvent('mousemove', { bubbles: true }));
        return rect.closest('.harp-Timeline').querySelector('.harp-Timeline-tip').textContent;
      }).filter(text => text.startsWith('aten::convolution ')));
    assert.ok(convTips.length > 0 && convTips.every(t => /^at: In\[1\]:1[23]$/m.test(t)),
      `where the convolutions ran: ${convTips.join(' | ')}`);
    await bars.nth(conv).hover({ force: true });
    // the advisor: the sync point of the step, at the line the editor numbers
    const advice = view.locator('.harp-Timeline-advice');
    await advice.waitFor({ state: 'visible' });
    assert.match(await advice.textContent(), /cell:6/, await advice.textContent());
    // the header's traffic counts torch's bytes: the step's .item() brought one float32 down
    const facts = await view.locator('.harp-Timeline-fact').allTextContents();
    const traffic = facts.find(f => f.startsWith('↑')) ?? '';
    assert.match(traffic, /↓ 4 B$/, `the header's traffic: ${facts.join(' | ')}`);
    await view.scrollIntoViewIfNeeded();
    await shot('profile');
    await shot('profile-timeline', view);
  });
});
