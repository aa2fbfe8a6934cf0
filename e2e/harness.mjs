// Processes for the browser test: emulated GPU agents and a real `jupyter lab` (token auth on,
// fresh settings/workspaces/config dirs), each started by this file and stopped by its pid.
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

export const REPO = resolve(dirname(fileURLToPath(import.meta.url)), '..');
export const PYTHON = process.env.HARP_E2E_PYTHON ?? join(REPO, '.venv', 'bin', 'python');
export const CHROMIUM = process.env.HARP_E2E_CHROMIUM ?? '/usr/bin/chromium';

export function freePort() {
  return new Promise((resolvePort, reject) => {
    const server = createServer();
    server.unref();
    server.on('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolvePort(port));
    });
  });
}

export function sleep(ms) {
  return new Promise(r => setTimeout(r, ms));
}

/** Poll `probe` until it returns a truthy value; throw with `what` and the last value seen. */
export async function until(probe, what, timeoutMs = 60_000, everyMs = 200) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      last = await probe();
      if (last) {
        return last;
      }
    } catch (error) {
      last = error;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out waiting for ${what}; last seen: ${describe(last)}`);
    }
    await sleep(everyMs);
  }
}

function describe(value) {
  if (value instanceof Error) {
    return value.message;
  }
  try {
    return JSON.stringify(value);
  } catch {
    return String(value);
  }
}

/** A child process in its own process group, with its output kept in a log file and memory. */
class Child {
  constructor(name, argv, env, logDir) {
    this.name = name;
    this.output = '';
    this.logPath = join(logDir, `${name}.log`);
    this.process = spawn(argv[0], argv.slice(1), {
      cwd: REPO,
      env,
      detached: true,
      stdio: ['ignore', 'pipe', 'pipe']
    });
    const keep = chunk => {
      this.output += chunk.toString();
    };
    this.process.stdout.on('data', keep);
    this.process.stderr.on('data', keep);
    this.exited = new Promise(r => this.process.on('exit', (code, signal) => r({ code, signal })));
  }

  get alive() {
    return this.process.exitCode === null && this.process.signalCode === null;
  }

  async waitForOutput(pattern, timeoutMs = 30_000) {
    await until(
      () => {
        if (!this.alive) {
          throw new Error(`${this.name} exited:\n${this.output.slice(-3000)}`);
        }
        return pattern.test(this.output);
      },
      `${this.name} to print ${pattern}`,
      timeoutMs
    );
  }

  /** SIGKILL to its process group at once (an agent whose machine died: no drain, no goodbye). */
  async kill() {
    if (this.alive) {
      process.kill(-this.process.pid, 'SIGKILL');
      await this.exited;
    }
    writeFileSync(this.logPath, this.output);
  }

  /** SIGTERM, then SIGKILL to its process group (its kernels) if it does not exit in time. */
  async stop(graceMs = 15_000) {
    if (this.alive) {
      this.process.kill('SIGTERM');
      const done = await Promise.race([this.exited, sleep(graceMs).then(() => null)]);
      if (done === null && this.alive) {
        process.kill(-this.process.pid, 'SIGKILL');
        await this.exited;
      }
    }
    try {
      // whatever it started and left behind (kernels of a killed server)
      process.kill(-this.process.pid, 'SIGKILL');
    } catch {
      // the group is gone
    }
    writeFileSync(this.logPath, this.output);
  }
}

/** startAgent's extra arguments that keep an idle holder's GPU while another kernel waits (with
 * startLab's default HARP_RECLAIM_AFTER), for tests that steer the leases themselves. */
export const RECLAIM_OFF = ['--reclaim-after', '3600'];

export async function startAgent(logDir, extraArgs = []) {
  const port = await freePort();
  const endpoint = `tcp://127.0.0.1:${port}`;
  const agent = new Child(
    `agent-${port}`,
    [PYTHON, '-m', 'gpu_agent.cli', '--listen', endpoint, '--executor', 'emulated', ...extraArgs],
    { ...process.env, PYTHONUNBUFFERED: '1' },
    logDir
  );
  await agent.waitForOutput(/serving/);
  agent.endpoint = endpoint;
  return agent;
}

/** The lab extension this checkout built (harp_jupyter/labextension), on a JUPYTER_PATH entry
 * ahead of the environment's, whose installed copy may be another checkout's or an older build
 * (the lab takes the first harp-jupyter it finds on its labextensions path). */
export const BUILT_LABEXTENSION = join(REPO, 'harp_jupyter', 'labextension');

function labextensionPath(base) {
  const rest = process.env.JUPYTER_PATH ? [process.env.JUPYTER_PATH] : [];
  if (!existsSync(join(BUILT_LABEXTENSION, 'package.json'))) {
    return rest.join(':') || undefined;
  }
  const dir = join(base, 'jupyter-path');
  mkdirSync(join(dir, 'labextensions'), { recursive: true });
  symlinkSync(BUILT_LABEXTENSION, join(dir, 'labextensions', 'harp-jupyter'));
  return [dir, ...rest].join(':');
}

const NOTIFICATION_SETTINGS = JSON.stringify({ fetchNews: 'false', checkForUpdates: false });

/** A notebook whose kernelspec is the Elastic GPU one (or another), with the given code cells. */
export function writeNotebook(dir, name, cells, kernel = 'elastic-gpu', displayName = 'Elastic GPU') {
  const notebook = {
    cells: cells.map((source, index) => ({
      id: `cell-${index}`,
      cell_type: 'code',
      execution_count: null,
      metadata: {},
      outputs: [],
      source
    })),
    metadata: {
      kernelspec: { name: kernel, display_name: displayName, language: 'python' },
      language_info: { name: 'python' }
    },
    nbformat: 4,
    nbformat_minor: 5
  };
  writeFileSync(join(dir, name), JSON.stringify(notebook, null, 1));
}

/**
 * `jupyter lab` as a user would run it, with HARP_AGENTS set (or unset when `agents` is null), in
 * fresh directories. Returns {url, token, root, request(path, init), stop()}.
 */
export async function startLab({ agents, logDir, name = 'lab', env = {} }) {
  const port = await freePort();
  const token = randomBytes(16).toString('hex');
  const base = mkdtempSync(join(tmpdir(), 'harp-e2e-'));
  const dirs = Object.fromEntries(
    ['root', 'settings', 'workspaces', 'config', 'data', 'runtime'].map(d => [d, join(base, d)])
  );
  for (const dir of Object.values(dirs)) {
    mkdirSync(dir, { recursive: true });
  }
  const notificationDir = join(dirs.settings, '@jupyterlab', 'apputils-extension');
  mkdirSync(notificationDir, { recursive: true });
  writeFileSync(join(notificationDir, 'notification.jupyterlab-settings'), NOTIFICATION_SETTINGS);

  const childEnv = {
    ...process.env,
    JUPYTER_PATH: labextensionPath(base),
    JUPYTER_CONFIG_DIR: dirs.config,
    JUPYTER_DATA_DIR: dirs.data,
    JUPYTER_RUNTIME_DIR: dirs.runtime,
    HARP_IDLE_TIMEOUT: '3600',
    // the tests steer the leases themselves (Release, Lease): no reclaim unless a test asks for
    // it (the agent takes the smaller of its --reclaim-after and the kernel's; see RECLAIM_OFF)
    HARP_RECLAIM_AFTER: '3600',
    PYTHONUNBUFFERED: '1',
    ...env
  };
  delete childEnv.HARP_AGENT;
  delete childEnv.HARP_TOKEN;
  if (agents === null) {
    delete childEnv.HARP_AGENTS;
  } else {
    childEnv.HARP_AGENTS = agents;
  }
  const lab = new Child(
    `${name}-${port}`,
    [
      PYTHON,
      '-m',
      'jupyter',
      'lab',
      '--no-browser',
      '--allow-root',
      '--ip=127.0.0.1',
      `--port=${port}`,
      `--IdentityProvider.token=${token}`,
      `--ServerApp.root_dir=${dirs.root}`,
      `--LabApp.user_settings_dir=${dirs.settings}`,
      `--LabApp.workspaces_dir=${dirs.workspaces}`,
      '--LabApp.news_url=None',
      '--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate',
      '--LabApp.extension_manager=readonly',
      // window.jupyterapp, so the test can open notebooks and run cells by command id
      '--LabApp.expose_app_in_browser=True'
    ],
    childEnv,
    logDir
  );
  const url = `http://127.0.0.1:${port}`;
  const request = async (path, init = {}) => {
    const response = await fetch(`${url}${path}`, {
      ...init,
      headers: { Authorization: `token ${token}`, ...(init.headers ?? {}) }
    });
    const text = await response.text();
    let body = null;
    try {
      body = JSON.parse(text);
    } catch {
      body = text;
    }
    return { status: response.status, body };
  };
  try {
    await until(
      async () => {
        if (!lab.alive) {
          throw new Error(`jupyter lab exited:\n${lab.output.slice(-3000)}`);
        }
        return (await request('/api/status')).status === 200;
      },
      'jupyter lab to answer /api/status',
      // a busy 2-core machine has been seen to take more than a minute
      180_000,
      250
    );
  } catch (error) {
    await lab.stop(); // never left running (and its log is kept) when it did not come up
    throw error;
  }
  return { url, token, root: dirs.root, request, lab, stop: () => lab.stop() };
}

/**
 * Where screenshots and logs go; the default folder is emptied first, so it shows one run
 * (`keep`: a later test file of the same run adds to it instead).
 */
/**
 * A lab page logged in with the token, once the app has started and restored its layout (a
 * restore can collapse a sidebar), with the Elastic GPU sidebar opened.
 */
export async function openLabWithPanel(browser, lab, viewport = { width: 1280, height: 800 }) {
  const context = await browser.newContext({ viewport });
  const page = await context.newPage();
  // a loaded 2-core machine may take long over the first lab page
  await page.goto(`${lab.url}/lab?token=${lab.token}`, { timeout: 120_000 });
  await page.waitForFunction(() => window.jupyterapp?.commands?.hasCommand('harp:open-panel'), null, {
    timeout: 60_000
  });
  await page.evaluate(async () => {
    await window.jupyterapp.restored;
    await window.jupyterapp.commands.execute('harp:open-panel');
    return true;
  });
  return page;
}

export function screenshotDir({ keep = false } = {}) {
  const dir = process.env.HARP_E2E_SCREENSHOTS ?? join(REPO, 'e2e', 'screenshots');
  if (!process.env.HARP_E2E_SCREENSHOTS && !keep) {
    rmSync(dir, { recursive: true, force: true });
  }
  if (!existsSync(dir)) {
    mkdirSync(dir, { recursive: true });
  }
  return dir;
}

/** The boxes the elements of `locator` take on screen, each with the start of its text. */
export function boxesOf(locator) {
  return locator.evaluateAll(els =>
    els
      .map(el => {
        const r = el.getBoundingClientRect();
        const text = (el.textContent ?? '').trim().slice(0, 40) || el.getAttribute('class');
        return { text, left: r.left, top: r.top, right: r.right, bottom: r.bottom };
      })
      .filter(b => b.right > b.left && b.bottom > b.top)
  );
}

/**
 * Pairs of boxes that cover each other by more than `slack` px both ways, as '"a" over "b"'
 * lines: between `boxes` and `others`, or among `boxes` when `others` is left out.
 */
export function overlapping(boxes, others = null, slack = 0.5) {
  const found = [];
  boxes.forEach((a, i) => {
    for (const b of others ?? boxes.slice(i + 1)) {
      const width = Math.min(a.right, b.right) - Math.max(a.left, b.left);
      const height = Math.min(a.bottom, b.bottom) - Math.max(a.top, b.top);
      if (width > slack && height > slack) {
        found.push(`"${a.text}" over "${b.text}" (${width.toFixed(1)} x ${height.toFixed(1)} px)`);
      }
    }
  });
  return found;
}

/** Elements of `locator` whose content is wider than their box (cut or spilling out), by text. */
export function overflowing(locator) {
  return locator.evaluateAll(els =>
    els.filter(el => el.scrollWidth > el.clientWidth + 1).map(el => (el.textContent ?? '').trim())
  );
}
