import assert from 'node:assert/strict';
import { test } from 'node:test';

import {
  PARKED_DETAIL,
  PARKED_WHAT,
  RESTORES,
  describeState,
  formatBytes,
  formatDuration,
  formatMemory,
  formatSetting,
  kernelTitle,
  memoryView,
  parkedReasonDetail,
  parkedReasonText,
  reclaimDetail,
  reclaimText,
  splitTitle,
  statusText
} from '../format';
import type { IKernelLease } from '../tokens';
import { HELD, lease } from './fixtures';

test('durations read as seconds, minutes, hours', () => {
  assert.equal(formatDuration(0), '0s');
  assert.equal(formatDuration(42.9), '42s');
  assert.equal(formatDuration(187), '3m\u00a007s');
  assert.equal(formatDuration(3723), '1h\u00a002m\u00a003s');
  assert.equal(formatDuration(null), '–');
  assert.equal(formatDuration(-1), '–');
});

test('bytes use binary units', () => {
  assert.equal(formatBytes(512), '512 B');
  assert.equal(formatBytes(1536), '1.5 KiB');
  assert.equal(formatBytes(80 * 2 ** 30), '80.0 GiB');
  assert.equal(formatMemory(12 * 2 ** 20, 8 * 2 ** 30), '12.0 MiB / 8.0 GiB');
  assert.equal(formatMemory(null, null), '–');
  assert.equal(formatMemory(null, 16 * 2 ** 30), '– / 16.0 GiB', 'unknown is not 0 B');
});

test('the memory line shows what the arrays cover, and what is reserved apart', () => {
  const total = 16 * 2 ** 30;
  assert.deepEqual(memoryView(lease({ memory_used: 2 << 20, memory_total: total })), {
    inUse: '2.0 MiB / 16.0 GiB',
    reserved: null
  });
  assert.deepEqual(
    memoryView(lease({ memory_allocated: 80, memory_used: 2 << 20, memory_total: total })),
    { inUse: '80 B / 16.0 GiB', reserved: '2.0 MiB reserved' }
  );
  assert.deepEqual(
    memoryView(lease({ memory_allocated: 4 << 20, memory_used: 4 << 20, memory_total: total })),
    { inUse: '4.0 MiB / 16.0 GiB', reserved: null }
  );
});

test('held with its memory still parked (leased before its next GPU cell): never "0 B"', () => {
  const total = 16 * 2 ** 30;
  const leased = lease({ state: 'held', memory_used: 0, parked_bytes: 2 << 20, memory_total: total });
  assert.deepEqual(memoryView({ ...leased, memory_allocated: 120 }), {
    inUse: '120 B / 16.0 GiB',
    reserved: null,
    parked: '2.0 MiB still parked'
  });
  assert.equal(memoryView(leased).inUse, '– / 16.0 GiB', 'unknown, not 0 B');
  // restored: the agent's figure is back, nothing parked is said
  assert.equal(memoryView({ ...leased, memory_used: 2 << 20, parked_bytes: 0 }).parked, undefined);
});

test('titles are cut in the middle: the end that tells notebooks apart stays', () => {
  assert.deepEqual(splitTitle('Untitled.ipynb'), ['Unti', 'tled.ipynb']);
  assert.deepEqual(splitTitle('Untitled1.ipynb'), ['Untit', 'led1.ipynb']);
  assert.deepEqual(splitTitle('a.ipynb'), ['', 'a.ipynb']);
  assert.deepEqual(splitTitle('results-2026-12-01.csv'), ['results-2026', '-12-01.csv']);
});

test('a card is titled by the notebook file, else the kernel name, else its id', () => {
  assert.equal(kernelTitle(lease({ path: 'dir/sub/x.ipynb' })), 'x.ipynb');
  assert.equal(kernelTitle(lease({ path: null, name: 'Elastic GPU' })), 'Elastic GPU');
  assert.equal(kernelTitle(lease({ path: null, name: null, kernel_id: 'abcdef0123' })), 'kernel abcdef01');
});

test('status text shows time held and queue position', () => {
  assert.equal(statusText(HELD, 65), 'GPU held 1m\u00a005s');
  assert.equal(statusText(lease({ state: 'queued', position: 2 }), null), 'GPU queued #2');
  assert.equal(statusText(lease({ state: 'parked' }), null), 'GPU parked');
});

test('every state says what it means for the next cell', () => {
  assert.match(describeState(lease({ state: 'queued', position: 3 })), /position 3/);
  assert.match(describeState(lease({ state: 'lost' })), /Lease/);
  assert.match(describeState(lease({ state: 'parked', parked_bytes: 2048 })), /2\.0 KiB/);
  assert.match(describeState({ ...HELD, idle_timeout: 0 }), /idle release is off/);
});

test('a parked card says why: released, idle, reclaimed for a waiting notebook', () => {
  const parked = (parked_reason: IKernelLease['parked_reason']) =>
    lease({ state: 'parked', parked_reason, idle_timeout: 60, reclaim_after: 2, parked_bytes: 80 });
  assert.equal(parkedReasonText(parked('release')), 'You released it');
  assert.equal(parkedReasonText(parked('idle')), 'Idle for 1m\u00a000s');
  assert.equal(parkedReasonText({ ...parked('idle'), idle_timeout: 30 }), 'Idle for 30 s');
  assert.equal(parkedReasonText(parked('reclaim')), 'Reclaimed for a waiting notebook');
  assert.equal(parkedReasonText(parked('ended')), 'The agent ended the lease');
  assert.match(parkedReasonDetail(parked('reclaim'))!, /no GPU work for 2 s/);
  assert.equal(parkedReasonText(parked(null)), null, 'unknown: nothing made up');
  assert.equal(parkedReasonText({ ...parked('reclaim'), state: 'queued' }), null, 'only while parked');
  assert.equal(statusText(parked('reclaim'), null), 'GPU parked (reclaimed)');
  assert.equal(statusText(parked('release'), null), 'GPU parked (released)');
  assert.equal(statusText(parked('ended'), null), 'GPU parked');
});

test('a held card shows the reclaim setting next to the idle countdown', () => {
  assert.equal(reclaimText({ ...HELD, reclaim_after: 2 }), 'after 2 s idle');
  assert.equal(reclaimText({ ...HELD, reclaim_after: 0.5 }), 'after 0.5 s idle');
  assert.equal(reclaimText({ ...HELD, reclaim_after: 90 }), 'after 1m\u00a030s idle');
  assert.equal(reclaimText(HELD), null, 'not reported');
  assert.equal(reclaimText(lease({ state: 'parked', reclaim_after: 2 })), null);
  assert.equal(formatSetting(3), '3 s');
  assert.match(reclaimDetail(2, 1), /1 notebook waits for this GPU now/);
  assert.match(reclaimDetail(2, 0), /Nobody waits/);
  assert.match(describeState({ ...HELD, reclaim_after: 2 }), /or after 2 s without GPU work when another notebook waits/);
  assert.match(describeState({ ...HELD, idle_timeout: 0, reclaim_after: 2 }), /idle release is off\), or after 2 s/);
});

test('a parked card says what restoring gives back for pycuda arrays and torch tensors alike', () => {
  const text = describeState(lease({ state: 'parked', parked_bytes: 215_347 }));
  // "at the same addresses" alone is pycuda's promise: a torch session gets its tensors back
  assert.match(text, /pycuda arrays at the same addresses/);
  assert.match(text, /torch tensors with their values/);
  assert.match(RESTORES, /as it was/);
  assert.match(PARKED_DETAIL, /pycuda arrays at the same addresses, torch tensors with their values/);
});

test('the parked figure is labelled as memory plus session records, and why it is larger', () => {
  // a torch session held 204.9 KiB of tensors and parked 210.3 KiB: the index and the
  // random-number state went with them; the card says so instead of two unexplained numbers
  assert.equal(PARKED_WHAT, 'memory + session records');
  assert.match(PARKED_DETAIL, /random-number state/);
  assert.match(PARKED_DETAIL, /more than the memory in use shown while the GPU was held/);
  assert.match(describeState(lease({ state: 'parked', parked_bytes: 215_347 })),
    /^Device memory \(210\.3 KiB with its session records\) is parked;/);
});
