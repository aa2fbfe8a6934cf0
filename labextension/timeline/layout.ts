/**
 * The timeline of a `%%harp profile`, as data: tracks (one per process/thread of the Chrome
 * trace the kernel made) with their spans and instants, and the arithmetic of a view (which part
 * of the time axis is shown). No DOM here, so it is unit-tested on its own.
 */

export interface TraceEvent {
  name: string;
  ph: string;
  pid: number;
  tid?: number;
  ts?: number;
  dur?: number;
  cat?: string;
  s?: string;
  args?: Record<string, unknown>;
}

export interface ProfileSummary {
  wall_s: number;
  gpu_busy_s: number;
  gpu_share: number;
  gpu_timing: boolean;
  emulated: boolean;
  bytes_up: number;
  bytes_down: number;
  calls: number;
  batches: number;
  sync_points: number;
  blocked_s: number;
  network_wait_s: number;
  top_kernels: { name: string; count: number; gpu_s: number }[];
  /** GPU ops timed together, one span per batch and stream (absent in older profiles) */
  gpu_batched?: { spans: number; ops: number };
  note: string;
}

export interface Advice {
  site: string;
  code: string;
  op: string;
  why: string;
  count: number;
  total_s: number;
  mean_ms: number;
  advice: string;
}

/** The `application/vnd.harp.timeline+json` output (and GET /harp/api/kernels/{id}/profile). */
export interface TimelineData {
  version: number;
  label: string;
  summary: ProfileSummary;
  advice: Advice[];
  trace: { traceEvents: TraceEvent[] };
  truncated?: number;
  at?: number;
}

export const TIMELINE_MIME_TYPE = 'application/vnd.harp.timeline+json';

export interface Span {
  name: string;
  start: number; // microseconds since the profile began
  end: number;
  cat: string;
  args: Record<string, unknown>;
}

export interface Track {
  pid: number;
  tid: number;
  process: string;
  name: string;
  spans: Span[];
  instants: Span[];
}

/** Tracks in trace order (the notebook first, then each agent), each with its events. */
export function buildTracks(events: TraceEvent[]): Track[] {
  const processes = new Map<number, string>();
  const names = new Map<string, string>();
  for (const e of events) {
    if (e.ph !== 'M') {
      continue;
    }
    const label = String(e.args?.name ?? '');
    if (e.name === 'process_name') {
      processes.set(e.pid, label);
    } else if (e.name === 'thread_name') {
      names.set(`${e.pid}/${e.tid}`, label);
    }
  }
  const tracks = new Map<string, Track>();
  const track = (pid: number, tid: number): Track => {
    const key = `${pid}/${tid}`;
    let found = tracks.get(key);
    if (!found) {
      found = {
        pid,
        tid,
        process: processes.get(pid) ?? `process ${pid}`,
        name: names.get(key) ?? `thread ${tid}`,
        spans: [],
        instants: []
      };
      tracks.set(key, found);
    }
    return found;
  };
  for (const e of events) {
    if (e.ph === 'X' && e.ts !== undefined) {
      track(e.pid, e.tid ?? 0).spans.push({
        name: e.name,
        start: e.ts,
        end: e.ts + (e.dur ?? 0),
        cat: e.cat ?? '',
        args: e.args ?? {}
      });
    } else if (e.ph === 'i' && e.ts !== undefined) {
      track(e.pid, e.tid ?? 0).instants.push({
        name: e.name,
        start: e.ts,
        end: e.ts,
        cat: e.cat ?? '',
        args: e.args ?? {}
      });
    }
  }
  return [...tracks.values()].sort((a, b) => a.pid - b.pid || a.tid - b.tid);
}

/** [first, last] microsecond of all events (0, 1 for an empty profile); with the profile's
 * wall time, the whole of it from its start (0): what the summary's "wall" covers is what the
 * first view shows. */
export function extent(tracks: Track[], wallMicros: number = 0): [number, number] {
  let lo = Infinity;
  let hi = -Infinity;
  for (const t of tracks) {
    for (const s of [...t.spans, ...t.instants]) {
      lo = Math.min(lo, s.start);
      hi = Math.max(hi, s.end);
    }
  }
  if (wallMicros > 0) {
    lo = Math.min(0, isFinite(lo) ? lo : 0);
    hi = Math.max(wallMicros, isFinite(hi) ? hi : 0);
  }
  if (!isFinite(lo)) {
    return [0, 1];
  }
  return [lo, hi > lo ? hi : lo + 1];
}

/** Width of the track-label column: the widest label and a gap, between `min` pixels and
 * `maxShare` of the whole width (longer labels are cut to it, see fitText). */
export function labelColumn(
  labelWidths: number[],
  totalWidth: number,
  min: number = 120,
  maxShare: number = 0.4
): number {
  const widest = Math.max(0, ...labelWidths) + 16;
  return Math.round(Math.max(min, Math.min(widest, totalWidth * maxShare)));
}

/** `text`, cut with "…" at its end so that `measure` of it is at most `maxWidth`. */
export function fitText(text: string, maxWidth: number, measure: (s: string) => number): string {
  if (measure(text) <= maxWidth) {
    return text;
  }
  let lo = 0;
  let hi = text.length;
  while (lo < hi) {
    const mid = Math.ceil((lo + hi) / 2);
    if (measure(text.slice(0, mid) + '…') <= maxWidth) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return text.slice(0, lo).trimEnd() + '…';
}

/** The part of the time axis shown, in microseconds. */
export interface View {
  start: number;
  end: number;
}

/** Zoom by `factor` (< 1 zooms in) around the time `at`, kept inside `limits`. */
export function zoom(view: View, factor: number, at: number, limits: [number, number]): View {
  const width = Math.max((view.end - view.start) * factor, 1e-3);
  const share = (at - view.start) / (view.end - view.start || 1);
  return clamp({ start: at - share * width, end: at - share * width + width }, limits);
}

/** Move the view by `delta` microseconds, kept inside `limits`. */
export function pan(view: View, delta: number, limits: [number, number]): View {
  return clamp({ start: view.start + delta, end: view.end + delta }, limits);
}

function clamp(view: View, [lo, hi]: [number, number]): View {
  const width = Math.min(view.end - view.start, hi - lo);
  let start = Math.max(lo, Math.min(view.start, hi - width));
  if (!isFinite(start)) {
    start = lo;
  }
  return { start, end: start + width };
}

/**
 * The spans of a track worth drawing at `pixels` width: inside the view, and those narrower
 * than a pixel that fall in a pixel already drawn are skipped (a profile of a million launches
 * stays fast to draw).
 */
export function visibleSpans(spans: Span[], view: View, pixels: number): Span[] {
  const scale = pixels / (view.end - view.start || 1);
  const shown: Span[] = [];
  let lastPixel = -Infinity;
  for (const s of spans) {
    if (s.end < view.start || s.start > view.end) {
      continue;
    }
    const x = Math.floor((s.start - view.start) * scale);
    if ((s.end - s.start) * scale < 1 && x <= lastPixel) {
      continue;
    }
    shown.push(s);
    lastPixel = x;
  }
  return shown;
}

/** What the summary says of GPU ops timed per batch (no per-kernel times), or null. */
export function batchedLine(summary: ProfileSummary): string | null {
  const batched = summary.gpu_batched;
  if (!batched || !batched.spans) {
    return null;
  }
  return (
    `${batched.ops} GPU ops timed per batch, in ${batched.spans} spans (one per batch and ` +
    'stream): no per-kernel GPU times for them, and the busy time counts any gaps between ' +
    'them; %%harp profile --per-op-gpu-timing times each'
  );
}

/** "1.2 ms", "340 µs", "2.5 s". */
export function formatMicros(us: number): string {
  if (us >= 1e6) {
    return `${(us / 1e6).toFixed(2)} s`;
  }
  if (us >= 1e3) {
    return `${(us / 1e3).toFixed(2)} ms`;
  }
  return `${us.toFixed(1)} µs`;
}
