import assert from 'node:assert/strict';
import { test } from 'node:test';

import {
  batchedLine,
  buildTracks,
  extent,
  fitText,
  formatMicros,
  labelColumn,
  pan,
  ProfileSummary,
  TraceEvent,
  visibleSpans,
  zoom
} from '../timeline/layout';

const TRACE: TraceEvent[] = [
  { name: 'process_name', ph: 'M', pid: 2, args: { name: 'agent tcp://h:1 (GPU)' } },
  { name: 'thread_name', ph: 'M', pid: 2, tid: 10, args: { name: 'GPU, stream 1' } },
  { name: 'process_name', ph: 'M', pid: 1, args: { name: 'notebook' } },
  { name: 'thread_name', ph: 'M', pid: 1, tid: 2, args: { name: 'blocked at sync points' } },
  { name: 'thread_name', ph: 'M', pid: 1, tid: 1, args: { name: 'API calls' } },
  { name: 'spin', ph: 'X', pid: 2, tid: 10, ts: 50, dur: 400, cat: 'gpu', args: { op: 'launch' } },
  { name: 'wait: dtoh', ph: 'X', pid: 1, tid: 2, ts: 40, dur: 500, cat: 'sync' },
  { name: 'launch', ph: 'i', pid: 1, tid: 1, ts: 10, s: 't', cat: 'api' }
];

test('tracks come in trace order with their names and events', () => {
  const tracks = buildTracks(TRACE);
  assert.deepEqual(
    tracks.map(t => [t.process, t.name]),
    [
      ['notebook', 'API calls'],
      ['notebook', 'blocked at sync points'],
      ['agent tcp://h:1 (GPU)', 'GPU, stream 1']
    ]
  );
  assert.equal(tracks[0].instants.length, 1);
  assert.deepEqual(tracks[2].spans[0], {
    name: 'spin', start: 50, end: 450, cat: 'gpu', args: { op: 'launch' }
  });
  assert.deepEqual(extent(tracks), [10, 540]);
  assert.deepEqual(extent([]), [0, 1]);
  // with the wall time: all of it, from the profile's start
  assert.deepEqual(extent(tracks, 29_000), [0, 29_000]);
});

test('the label column fits the labels, up to its share; a longer label is cut', () => {
  const measure = (text: string): number => text.length * 6;
  assert.equal(labelColumn([60, 80], 1000), 120, 'never narrower than its minimum');
  assert.equal(labelColumn([300], 1000), 316, 'the widest label and a gap');
  assert.equal(labelColumn([700], 1000), 400, 'at most 40% of the width');
  const name = 'emulated device (host NumPy time), default stream';
  assert.equal(fitText(name, 400, measure), name);
  const cut = fitText(name, 120, measure);
  assert.ok(cut.endsWith('…') && measure(cut) <= 120, cut);
  assert.ok(name.startsWith(cut.slice(0, -1)));
});

test('zoom keeps the point under the pointer; pan and zoom stay inside the profile', () => {
  const limits: [number, number] = [0, 1000];
  const zoomed = zoom({ start: 0, end: 1000 }, 0.5, 250, limits);
  assert.deepEqual(zoomed, { start: 125, end: 625 });
  assert.deepEqual(pan(zoomed, 1000, limits), { start: 500, end: 1000 });
  assert.deepEqual(pan(zoomed, -1000, limits), { start: 0, end: 500 });
  assert.deepEqual(zoom(zoomed, 10, 300, limits), { start: 0, end: 1000 });
});

test('spans outside the view, or under a pixel already drawn, are not drawn', () => {
  const spans = Array.from({ length: 1000 }, (_, i) => ({
    name: 'k', start: i, end: i + 0.1, cat: 'gpu', args: {}
  }));
  const shown = visibleSpans(spans, { start: 0, end: 1000 }, 100);
  assert.equal(shown.length, 100); // one per pixel
  assert.equal(visibleSpans(spans, { start: 2000, end: 3000 }, 100).length, 0);
  const wide = [{ name: 'w', start: 0, end: 900, cat: 'gpu', args: {} }, ...spans.slice(0, 5)];
  assert.equal(visibleSpans(wide, { start: 0, end: 1000 }, 100)[0].name, 'w');
});

test('durations read in µs, ms or s', () => {
  assert.equal(formatMicros(12.34), '12.3 µs');
  assert.equal(formatMicros(2500), '2.50 ms');
  assert.equal(formatMicros(3_200_000), '3.20 s');
});

test('a GPU batch span is a span of its own on its stream, and the summary says it', () => {
  const tracks = buildTracks([
    { name: 'thread_name', ph: 'M', pid: 2, tid: 10, args: { name: 'GPU, default stream' } },
    {
      name: 'add_one x1500',
      ph: 'X',
      pid: 2,
      tid: 10,
      ts: 100,
      dur: 2000,
      cat: 'gpu',
      args: { op: 'batch', ops: 1500, kernels: 'add_one x1500', at: 'cell:3' }
    }
  ]);
  assert.equal(tracks[0].spans.length, 1);
  assert.equal(tracks[0].spans[0].args.ops, 1500);
  const summary = { gpu_batched: { spans: 2, ops: 2000 } } as ProfileSummary;
  const line = batchedLine(summary);
  assert.ok(line?.startsWith('2000 GPU ops timed per batch, in 2 spans'), line ?? '');
  assert.ok(line?.includes('no per-kernel GPU times'));
  assert.equal(batchedLine({ gpu_batched: { spans: 0, ops: 0 } } as ProfileSummary), null);
  assert.equal(batchedLine({} as ProfileSummary), null, 'a profile saved before it');
});
