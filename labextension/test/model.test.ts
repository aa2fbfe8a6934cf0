import assert from 'node:assert/strict';
import { test } from 'node:test';

import { ElasticGPUModel, isLeaseEvent, toUserError } from '../model';
import { LEASE_EVENT_SCHEMA_ID } from '../tokens';
import { FakeAPI, HELD, deferred, lease, poolReply, sleep } from './fixtures';

function makeModel(
  api: FakeAPI,
  clock: { ms: number } = { ms: 1_000_000 },
  debounceMs = 5
): ElasticGPUModel {
  return new ElasticGPUModel({ api, now: () => clock.ms, debounceMs });
}

const event = (fields: Record<string, unknown>) => ({ schema_id: LEASE_EVENT_SCHEMA_ID, ...fields });

test('refresh loads kernels, agents and pool', async () => {
  const api = new FakeAPI();
  api.kernelsReply = { kernels: [HELD], agents: ['tcp://127.0.0.1:5555'], problem: null };
  const model = makeModel(api);
  let changes = 0;
  model.changed.connect(() => (changes += 1));
  assert.equal(model.loaded, false);
  await model.refresh();
  assert.equal(model.loaded, true);
  assert.deepEqual(model.kernels, [HELD]);
  assert.deepEqual(model.agents, ['tcp://127.0.0.1:5555']);
  assert.equal(model.kernel('k1')?.state, 'held');
  assert.equal(model.kernel('nope'), null);
  assert.equal(model.kernel(null), null);
  assert.ok(changes >= 2);
  model.dispose();
});

test('the summary comes from the kernels until the pool answers, then from the pool', async () => {
  const api = new FakeAPI();
  api.kernelsReply = {
    kernels: [HELD, lease({ kernel_id: 'k2', state: 'queued', position: 1 })],
    agents: ['tcp://a:1', 'tcp://b:1', 'tcp://c:1'],
    problem: null
  };
  const model = makeModel(api);
  await model.refreshKernels();
  assert.deepEqual(model.summary, {
    gpus: 3,
    free: null,
    held: 1,
    queued: 1,
    unreachable: 0,
    unreachableAgents: [],
    emulatedAgents: 0,
    fromPool: false
  });
  await model.refreshPool();
  const summary = model.summary;
  assert.equal(summary.fromPool, true);
  assert.equal(summary.gpus, 2);
  assert.equal(summary.free, 0);
  assert.equal(summary.unreachable, 1);
  assert.deepEqual(summary.unreachableAgents, [
    { endpoint: 'tcp://10.0.0.9:5555', error: 'no answer within 1 s' }
  ]);
  assert.equal(summary.emulatedAgents, 1);
  model.dispose();
});

test('held time, GPU-seconds and the idle countdown tick with the clock between fetches', async () => {
  const api = new FakeAPI();
  api.kernelsReply = { kernels: [HELD], agents: [], problem: null };
  const clock = { ms: 5_000_000 };
  const model = makeModel(api, clock);
  await model.refreshKernels();
  const k = model.kernel('k1')!;
  assert.equal(model.heldSeconds(k), 10);
  assert.equal(model.idleLeftSeconds(k), 50);
  assert.equal(model.gpuSeconds(k), 25);
  clock.ms += 7_500;
  assert.equal(model.heldSeconds(k), 17.5);
  assert.equal(model.idleLeftSeconds(k), 42.5);
  assert.equal(model.gpuSeconds(k), 32.5);
  clock.ms += 3_600_000;
  assert.equal(model.idleLeftSeconds(k), 0, 'the countdown stops at zero');
  // a clock that goes backwards does not count down backwards
  assert.equal(model.heldSeconds(k, 0), 10);
  model.dispose();
});

test('a busy kernel keeps its idle countdown; states other than held have no counters', async () => {
  const api = new FakeAPI();
  const parked = lease({ kernel_id: 'k2', state: 'parked', gpu_seconds: 4 });
  api.kernelsReply = {
    kernels: [{ ...HELD, execution_state: 'busy' }, parked, { ...HELD, kernel_id: 'k3', idle_timeout: 0 }],
    agents: [],
    problem: null
  };
  const clock = { ms: 1 };
  const model = makeModel(api, clock);
  await model.refreshKernels();
  clock.ms += 20_000;
  assert.equal(model.idleLeftSeconds(model.kernel('k1')!), 50);
  assert.equal(model.heldSeconds(model.kernel('k2')!), null);
  assert.equal(model.idleLeftSeconds(model.kernel('k2')!), null);
  assert.equal(model.gpuSeconds(model.kernel('k2')!), 4, 'GPU-seconds do not grow while parked');
  assert.equal(model.idleLeftSeconds(model.kernel('k3')!), null, 'idle release off');
  model.dispose();
});

test('queue waiting time comes from the pool and ticks', async () => {
  const api = new FakeAPI();
  const clock = { ms: 0 };
  const model = makeModel(api, clock);
  assert.equal(model.queueWaitingSeconds('k2'), null);
  await model.refreshPool();
  clock.ms = 2_000;
  assert.equal(model.queueWaitingSeconds('k2'), 5);
  assert.equal(model.queueWaitingSeconds('k1'), null);
  model.dispose();
});

test('only lease events of our schema are taken', () => {
  assert.equal(isLeaseEvent(event({ kernel_id: 'k1', state: 'held' })), true);
  assert.equal(isLeaseEvent({ schema_id: 'https://events.jupyter.org/x', kernel_id: 'k1', state: 'held' } as never), false);
  assert.equal(isLeaseEvent(event({ kernel_id: 'k1', state: 'exploded' })), false);
  assert.equal(isLeaseEvent(event({ state: 'held' })), false);
});

test('a lease event changes the badge at once, and a burst of events makes one refetch', async () => {
  const api = new FakeAPI();
  api.kernelsReply = { kernels: [lease()], agents: [], problem: null };
  const clock = { ms: 100_000 };
  const model = makeModel(api, clock, 20);
  await model.refresh();
  const before = { ...api.calls };

  assert.equal(model.handleEvent({ schema_id: 'https://events.jupyter.org/other' }), false);
  assert.equal(model.handleEvent(event({ kernel_id: 'k1', state: 'queued', previous: 'acquiring', position: 2 })), true);
  assert.equal(model.kernel('k1')?.state, 'queued');
  assert.equal(model.kernel('k1')?.position, 2);
  model.handleEvent(event({ kernel_id: 'k1', state: 'queued', previous: 'queued', position: 1 }));
  assert.equal(model.kernel('k1')?.position, 1);
  model.handleEvent(event({ kernel_id: 'k1', state: 'held', previous: 'queued', agent: 'tcp://x:1' }));
  const k = model.kernel('k1')!;
  assert.equal(k.state, 'held');
  assert.equal(k.agent, 'tcp://x:1');
  assert.equal(k.position, null);
  assert.equal(model.heldSeconds(k), 0, 'held time starts at the event');
  assert.equal(model.idleLeftSeconds(k), 60);
  model.handleEvent(event({ kernel_id: 'unknown', state: 'held' }));
  assert.equal(api.calls.kernels, before.kernels, 'no fetch before the debounce ends');

  await sleep(80);
  assert.equal(api.calls.kernels, before.kernels + 1, 'one GET kernels for the burst');
  assert.equal(api.calls.pool, before.pool + 1, 'one GET pool for the burst');
  assert.equal(model.kernel('k1')?.state, 'none', 'the fetched state wins');
  model.dispose();
});

test('refreshes asked for while one is in flight run once more after it, not in parallel', async () => {
  const api = new FakeAPI();
  const gate = deferred();
  api.gate = gate.promise;
  const model = makeModel(api);
  const first = model.refreshKernels();
  const second = model.refreshKernels();
  const third = model.refreshKernels();
  assert.equal(api.calls.kernels, 1);
  gate.resolve();
  await Promise.all([first, second, third]);
  assert.equal(api.calls.kernels, 2);
  model.dispose();
});

test('Release when held, Lease otherwise; disabled during transitions and for a dead kernel', () => {
  const model = makeModel(new FakeAPI());
  assert.deepEqual(model.actionFor(HELD), { action: 'release', enabled: true, pending: false, reason: '' });
  for (const state of ['none', 'parked', 'lost'] as const) {
    assert.deepEqual(model.actionFor(lease({ state })), { action: 'lease', enabled: true, pending: false, reason: '' });
  }
  for (const state of ['acquiring', 'queued', 'parking'] as const) {
    const view = model.actionFor(lease({ state }));
    assert.equal(view.action, 'lease');
    assert.equal(view.enabled, false);
    assert.ok(view.reason.length > 0);
  }
  assert.equal(model.actionFor({ ...HELD, execution_state: 'dead' }).enabled, false);
  model.dispose();
});

test('release: one request at a time, the button disabled meanwhile, the reply replaces the card', async () => {
  const api = new FakeAPI();
  api.kernelsReply = { kernels: [HELD], agents: [], problem: null };
  const gate = deferred();
  api.kernelReply = async kernelId => {
    await gate.promise;
    return { kernel: lease({ kernel_id: kernelId, state: 'parked', parked_bytes: 80 }) };
  };
  const model = makeModel(api);
  await model.refreshKernels();
  const first = model.release('k1');
  assert.equal(model.pendingAction('k1'), 'release');
  assert.deepEqual(model.actionFor(model.kernel('k1')!), {
    action: 'release',
    enabled: false,
    pending: true,
    reason: 'A request is in flight.'
  });
  assert.equal(await model.release('k1'), false, 'a second press does nothing');
  gate.resolve();
  assert.equal(await first, true);
  assert.equal(api.calls.release, 1);
  assert.equal(model.pendingAction('k1'), null);
  assert.equal(model.kernel('k1')?.state, 'parked');
  assert.equal(model.actionFor(model.kernel('k1')!).action, 'lease');
  model.dispose();
});

test('a failed request leaves its error and hint on the card until the next try or dismiss', async () => {
  const api = new FakeAPI();
  api.kernelsReply = { kernels: [HELD], agents: [], problem: null };
  api.kernelReply = async () => {
    throw Object.assign(new Error('the cell is running GPU work'), {
      kind: 'KernelBusy',
      hint: 'try again when the cell ends'
    });
  };
  const model = makeModel(api);
  await model.refreshKernels();
  assert.equal(await model.release('k1'), false);
  assert.deepEqual(model.kernelError('k1'), {
    kind: 'KernelBusy',
    message: 'the cell is running GPU work',
    hint: 'try again when the cell ends'
  });
  assert.equal(model.kernel('k1')?.state, 'held', 'the state is unchanged');
  model.dismissError('k1');
  assert.equal(model.kernelError('k1'), null);
  await model.release('k1');
  assert.notEqual(model.kernelError('k1'), null);
  api.kernelReply = async kernelId => ({ kernel: lease({ kernel_id: kernelId, state: 'parked' }) });
  await model.release('k1');
  assert.equal(model.kernelError('k1'), null, 'cleared by the next try');
  model.dispose();
});

test('failed fetches become errors the panel shows; the next success clears them', async () => {
  const api = new FakeAPI();
  const model = makeModel(api);
  const failing = async () => {
    throw Object.assign(new Error('no route'), { kind: 'ServerExtensionMissing', hint: 'enable it' });
  };
  const getKernels = api.getKernels.bind(api);
  api.getKernels = failing;
  await model.refreshKernels();
  assert.equal(model.kernelsError?.kind, 'ServerExtensionMissing');
  assert.equal(model.loaded, false);
  api.getKernels = getKernels;
  await model.refreshKernels();
  assert.equal(model.kernelsError, null);
  model.dispose();
});

test('the server’s problem (no agents) is passed on, the kernels’ before the pool’s', async () => {
  const api = new FakeAPI();
  const noAgents = { kind: 'NoAgents', message: 'No GPU agents are configured.', hint: 'Set HARP_AGENTS.' };
  api.poolReply = poolReply({ problem: { kind: 'PoolProblem', message: 'm', hint: 'h' } });
  const model = makeModel(api);
  await model.refreshPool();
  assert.equal(model.problem?.kind, 'PoolProblem');
  api.kernelsReply = { kernels: [], agents: [], problem: noAgents };
  await model.refreshKernels();
  assert.deepEqual(model.problem, noAgents);
  model.dispose();
});

test('kernels starting or stopping trigger a refetch; the same set does not', async () => {
  const api = new FakeAPI();
  const model = makeModel(api);
  model.noteRunningKernels(['a', 'b']);
  await sleep(30);
  assert.equal(api.calls.kernels, 1);
  model.noteRunningKernels(['b', 'a']);
  await sleep(30);
  assert.equal(api.calls.kernels, 1);
  model.noteRunningKernels(['b']);
  await sleep(30);
  assert.equal(api.calls.kernels, 2);
  model.dispose();
});

test('polling runs only while switched on', async () => {
  const api = new FakeAPI();
  const model = makeModel(api);
  model.setPolling(true, 10);
  assert.equal(model.polling, true);
  await sleep(55);
  model.setPolling(false);
  const calls = api.calls.pool;
  assert.ok(calls >= 2, `polled ${calls} times`);
  await sleep(40);
  assert.equal(api.calls.pool, calls);
  assert.equal(model.polling, false);
  model.dispose();
});

test('anything thrown becomes a readable error', () => {
  assert.deepEqual(toUserError(new Error('x')), { kind: 'Error', message: 'x', hint: '' });
  assert.deepEqual(toUserError('boom'), { kind: 'Error', message: 'boom', hint: '' });
  assert.deepEqual(toUserError({ kind: 'K', message: 'm', hint: 'h' }), { kind: 'K', message: 'm', hint: 'h' });
});

test('a fresh lease that shows no memory yet is fetched again soon, and then left alone', async () => {
  const api = new FakeAPI();
  const restoring = { ...HELD, memory_used: 0, held_s: 0.3 };
  api.kernelsReply = { kernels: [restoring], agents: [], problem: null };
  const model = new ElasticGPUModel({ api, debounceMs: 5, followUpMs: 5 });
  await model.refreshKernels();
  assert.equal(api.calls.kernels, 1);
  api.kernelsReply = { kernels: [{ ...restoring, memory_used: 2 << 20 }], agents: [], problem: null };
  const deadline = Date.now() + 5000;
  while (model.kernel('k1')?.memory_used !== 2 << 20 && Date.now() < deadline) {
    await sleep(5);
  }
  assert.equal(model.kernel('k1')?.memory_used, 2 << 20);
  assert.equal(api.calls.kernels, 2);
  model.dispose();
});

test('a lease held for long with no memory is not refetched', async () => {
  const api = new FakeAPI();
  api.kernelsReply = { kernels: [{ ...HELD, memory_used: 0, held_s: 600 }], agents: [], problem: null };
  const model = new ElasticGPUModel({ api, debounceMs: 5, followUpMs: 1 });
  await model.refreshKernels();
  assert.equal((model as unknown as { _followUpTimer: unknown })._followUpTimer, null);
  model.dispose();
});

test('a lease event tells why the kernel is parked at once; holding again clears it', async () => {
  const api = new FakeAPI();
  api.kernelsReply = { kernels: [{ ...HELD, reclaim_after: 2 }], agents: [], problem: null };
  const model = makeModel(api, { ms: 1_000_000 }, 60_000);
  await model.refreshKernels();
  model.handleEvent(event({ kernel_id: 'k1', state: 'parking', previous: 'held', parked_reason: null }));
  assert.equal(model.kernel('k1')?.parked_reason, null);
  model.handleEvent(
    event({ kernel_id: 'k1', state: 'parked', previous: 'parking', parked_reason: 'reclaim' })
  );
  assert.equal(model.kernel('k1')?.state, 'parked');
  assert.equal(model.kernel('k1')?.parked_reason, 'reclaim');
  assert.equal(model.kernel('k1')?.reclaim_after, 2, 'the setting is kept');
  // an event without the field (an older server) keeps what is known
  model.handleEvent(event({ kernel_id: 'k1', state: 'acquiring', previous: 'parked' }));
  assert.equal(model.kernel('k1')?.parked_reason, 'reclaim');
  model.handleEvent(event({ kernel_id: 'k1', state: 'held', previous: 'acquiring' }));
  assert.equal(model.kernel('k1')?.parked_reason, null, 'held: no reason to show');
  model.dispose();
});

test('a held event carries the reclaim_after the agent applies; the card shows it at once', async () => {
  const api = new FakeAPI();
  api.kernelsReply = { kernels: [{ ...HELD, state: 'queued', reclaim_after: 5 }], agents: [], problem: null };
  const model = makeModel(api, { ms: 1_000_000 }, 60_000);
  await model.refreshKernels();
  model.handleEvent(event({ kernel_id: 'k1', state: 'held', previous: 'queued', reclaim_after: 2 }));
  assert.equal(model.kernel('k1')?.reclaim_after, 2, 'the agent bounds the kernel\'s 5 s by its 2 s');
  model.handleEvent(event({ kernel_id: 'k1', state: 'held', previous: 'held' }));
  assert.equal(model.kernel('k1')?.reclaim_after, 2, 'an event without it keeps what is known');
  model.dispose();
});

test('reclaim while held: the setting and how many notebooks wait on its agent', async () => {
  const api = new FakeAPI();
  api.kernelsReply = {
    kernels: [
      { ...HELD, reclaim_after: 2 },
      lease({ kernel_id: 'k2', state: 'queued', position: 1, reclaim_after: 2 }),
      lease({ kernel_id: 'k3', state: 'held', agent: 'tcp://10.0.0.9:5555', reclaim_after: null })
    ],
    agents: [],
    problem: null
  };
  const model = makeModel(api);
  await model.refreshKernels();
  // before the pool answers nobody is known to wait
  assert.deepEqual(model.reclaimView(model.kernel('k1')!), { afterSeconds: 2, waiting: 0 });
  await model.refreshPool(); // k2 waits at tcp://127.0.0.1:5555, the agent k1 holds
  assert.deepEqual(model.reclaimView(model.kernel('k1')!), { afterSeconds: 2, waiting: 1 });
  assert.equal(model.reclaimView(model.kernel('k2')!), null, 'queued: nothing to reclaim');
  assert.equal(model.reclaimView(model.kernel('k3')!), null, 'not reported (an older server)');
  model.dispose();
});
