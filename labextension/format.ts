/**
 * Text for the sidebar and the status bar: durations, bytes, and what each lease state means for
 * the user with what to do about it. Pure functions (tested in node).
 */
import type { IKernelLease, LeaseState, ParkReason } from './tokens';

/** 42s, 3m 07s, 1h 02m 03s (whole seconds, rounded down). */
export function formatDuration(seconds: number | null): string {
  if (seconds === null || !Number.isFinite(seconds) || seconds < 0) {
    return '–';
  }
  const total = Math.floor(seconds);
  const h = Math.floor(total / 3600);
  const m = Math.floor((total % 3600) / 60);
  const s = total % 60;
  const pad = (n: number): string => String(n).padStart(2, '0');
  // no-break spaces: a narrow card wraps around a duration, never inside it ("1h 00m / 00s")
  if (h > 0) {
    return `${h}h\u00a0${pad(m)}m\u00a0${pad(s)}s`;
  }
  if (m > 0) {
    return `${m}m\u00a0${pad(s)}s`;
  }
  return `${s}s`;
}

const BYTE_UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];

/** 512 B, 1.5 KiB, 80.0 GiB. */
export function formatBytes(bytes: number | null): string {
  if (bytes === null || !Number.isFinite(bytes) || bytes < 0) {
    return '–';
  }
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < BYTE_UNITS.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return unit === 0 ? `${value} B` : `${value.toFixed(1)} ${BYTE_UNITS[unit]}`;
}

/** "12.0 MiB / 80.0 GiB"; an unknown part reads "–" (never "0 B", which would be a claim). */
export function formatMemory(used: number | null, total: number | null): string {
  if (used === null && total === null) {
    return '–';
  }
  if (total === null) {
    return formatBytes(used);
  }
  return `${formatBytes(used)} / ${formatBytes(total)}`;
}

/** The card's memory line: the bytes the user's allocations cover, of the GPU's total, and,
 * apart, what the agent reserves for them (it maps device memory in 2 MiB pages). Until the
 * kernel reports its own bytes, the agent's reserved bytes are all that is known. */
export interface IMemoryView {
  /** "80 B / 16.0 GiB" */
  inUse: string;
  /** "2.0 MiB reserved", or null when it says nothing more than inUse */
  reserved: string | null;
  /** held, but its device memory is still parked on the agent (leased before its next GPU
   * call, which restores it): "2.0 MiB still parked" */
  parked?: string;
}

export function memoryView(kernel: IKernelLease): IMemoryView {
  const allocated = kernel.memory_allocated ?? null;
  const reservedBytes = kernel.memory_used;
  if (kernel.state === 'held' && !reservedBytes && kernel.parked_bytes > 0) {
    // nothing on the device yet is not "0 B": the memory is parked, not gone
    return {
      inUse: formatMemory(allocated, kernel.memory_total),
      reserved: null,
      parked: `${formatBytes(kernel.parked_bytes)} still parked`
    };
  }
  if (allocated === null) {
    return { inUse: formatMemory(reservedBytes, kernel.memory_total), reserved: null };
  }
  return {
    inUse: formatMemory(allocated, kernel.memory_total),
    // 0 B reserved while the kernel has arrays: they are on their way (restoring), not gone
    reserved:
      reservedBytes && reservedBytes !== allocated ? `${formatBytes(reservedBytes)} reserved` : null
  };
}

/** What restoring a parked session gives back, for pycuda's arrays and torch's tensors alike
 * (the lease state does not say which a kernel uses). */
export const RESTORES =
  'restores it as it was: pycuda arrays at the same addresses, torch tensors with their values';

/** Why the parked figure is more than the memory a held kernel showed: the agent keeps, with
 * the device memory, what recreates the session (torch's tensor index and random-number state,
 * compiled kernels). The card's words for it, and its hover text. */
export const PARKED_WHAT = 'memory + session records';
export const PARKED_DETAIL =
  'What the agent keeps for this kernel: its device memory, plus the records that recreate ' +
  'the session (torch’s tensor index and random-number state, compiled kernels), so more than ' +
  'the memory in use shown while the GPU was held. The next GPU cell ' +
  RESTORES +
  '.';

export const STATE_LABELS: Record<LeaseState, string> = {
  none: 'no GPU',
  acquiring: 'acquiring',
  queued: 'queued',
  held: 'held',
  parking: 'parking',
  parked: 'parked',
  lost: 'lost'
};

/** One sentence on what the state means for the user's next GPU cell, and what to do. */
export function describeState(kernel: IKernelLease): string {
  switch (kernel.state) {
    case 'none':
      return 'No GPU used yet: the first cell that does GPU work leases one.';
    case 'acquiring':
      return 'Asking the pool for a GPU.';
    case 'queued':
      return (
        `Every GPU is busy: waiting at position ${kernel.position ?? '?'} in the queue. ` +
        'The cell runs when a GPU is released.'
      );
    case 'held': {
      const after = kernel.reclaim_after;
      const reclaim =
        after !== null && after !== undefined
          ? `after ${formatSetting(after)} without GPU work when another notebook waits`
          : null;
      if (kernel.idle_timeout > 0) {
        return reclaim
          ? `Holding a GPU; it goes back after the idle countdown, or ${reclaim}.`
          : 'Holding a GPU; it is given back after the idle countdown with no GPU work.';
      }
      return reclaim
        ? `Holding a GPU until you release it (idle release is off), or ${reclaim}.`
        : 'Holding a GPU until you release it (idle release is off).';
    }
    case 'parking':
      return 'Copying device memory to the agent’s host memory before giving the GPU back.';
    case 'parked':
      return kernel.parked_bytes > 0
        ? `Device memory (${formatBytes(kernel.parked_bytes)} with its session records) is ` +
            `parked; the next GPU cell ${RESTORES}.`
        : 'No GPU held; the next GPU cell leases one.';
    case 'lost':
      return (
        'The GPU agent stopped answering, or shut down without handing on this kernel’s ' +
        'parked state (the message says which). The kernel and its CPU state are fine; ' +
        'device arrays on that agent are gone. Run a GPU cell or press Lease to get a GPU again, ' +
        'and tell your GPU operator if the agent stays unreachable.'
      );
  }
}

/**
 * A title cut in the middle: [head, tail], where the tail (the end of the name and its
 * extension) is never cut, so "Untitled.ipynb" and "Untitled1.ipynb" stay apart in a narrow
 * card: the head takes the ellipsis (CSS) when space runs out.
 */
export function splitTitle(title: string, tailChars: number = 10): [string, string] {
  const dot = title.lastIndexOf('.');
  const extension = dot > 0 ? title.length - dot : 0;
  const cut = Math.max(0, title.length - Math.max(tailChars, extension + 4));
  return [title.slice(0, cut), title.slice(cut)];
}

/** The notebook's file name, else the kernel's name, else a short id. */
export function kernelTitle(kernel: IKernelLease): string {
  if (kernel.path) {
    const parts = kernel.path.split('/');
    return parts[parts.length - 1] || kernel.path;
  }
  return kernel.name || `kernel ${kernel.kernel_id.slice(0, 8)}`;
}

/** "2 s", "1.5 s", "1m 30s": a setting in seconds as the user wrote it (never rounded to 0). */
export function formatSetting(seconds: number): string {
  if (!Number.isFinite(seconds) || seconds < 0) {
    return '–';
  }
  return seconds < 60 ? `${Number(seconds.toFixed(2))} s` : formatDuration(seconds);
}

/** Why a parked kernel is parked, as the card's "Why parked" shows it; null when not parked or
 * not known (a kernel parked by an older server). */
export function parkedReasonText(kernel: IKernelLease): string | null {
  if (kernel.state !== 'parked' || !kernel.parked_reason) {
    return null;
  }
  const texts: Record<ParkReason, string> = {
    release: 'You released it',
    idle: `Idle for ${formatSetting(kernel.idle_timeout)}`,
    reclaim: 'Reclaimed for a waiting notebook',
    ended: 'The agent ended the lease'
  };
  return texts[kernel.parked_reason] ?? null;
}

/** The longer story behind parkedReasonText (the row's tooltip, the status bar's). */
export function parkedReasonDetail(kernel: IKernelLease): string | null {
  if (kernel.state !== 'parked' || !kernel.parked_reason) {
    return null;
  }
  switch (kernel.parked_reason) {
    case 'release':
      return 'Released with Release or %harp release; its device memory is kept.';
    case 'idle':
      return (
        `No GPU work for ${formatSetting(kernel.idle_timeout)} (the idle timeout): ` +
        'the GPU went back to the pool; its device memory is kept.'
      );
    case 'reclaim': {
      const after =
        kernel.reclaim_after !== null && kernel.reclaim_after !== undefined
          ? ` for ${formatSetting(kernel.reclaim_after)}`
          : '';
      return (
        `Another notebook was waiting for the GPU and this one had no GPU work${after}, ` +
        'so the agent parked it; its device memory is kept and its next GPU cell gets a GPU ' +
        'again (queueing like anyone else if none is free).'
      );
    }
    case 'ended':
      return 'The agent ended the lease (it expired or an operator revoked it).';
    default:
      return null;
  }
}

/** The reclaim setting while held: "after 2 s idle" (when another notebook waits), or null. */
export function reclaimText(kernel: IKernelLease): string | null {
  if (kernel.state !== 'held' || kernel.reclaim_after === null || kernel.reclaim_after === undefined) {
    return null;
  }
  return `after ${formatSetting(kernel.reclaim_after)} idle`;
}

/** What reclaim on demand means for a held kernel, with `waiting` notebooks queued for its GPU
 * now (the Reclaim row's tooltip). */
export function reclaimDetail(afterSeconds: number, waiting: number): string {
  const after = formatSetting(afterSeconds);
  const now =
    waiting > 0
      ? `${waiting} notebook${waiting > 1 ? 's wait' : ' waits'} for this GPU now: this kernel ` +
        `is parked once it has had no GPU work for ${after}.`
      : 'Nobody waits for this GPU now.';
  return (
    `While another notebook waits for this GPU, the agent parks this kernel after ${after} ` +
    `without GPU work (a running cell is never interrupted) and serves the waiter. ${now}`
  );
}

/** The status bar text for a kernel: state, with time held, queue position or why parked. */
export function statusText(kernel: IKernelLease, heldSeconds: number | null): string {
  switch (kernel.state) {
    case 'held':
      return `GPU held ${formatDuration(heldSeconds)}`;
    case 'queued':
      return `GPU queued #${kernel.position ?? '?'}`;
    case 'none':
      return 'no GPU yet';
    case 'parked': {
      const why: Partial<Record<ParkReason, string>> = {
        release: 'released',
        idle: 'idle',
        reclaim: 'reclaimed'
      };
      const reason = kernel.parked_reason ? why[kernel.parked_reason] : undefined;
      return reason ? `GPU parked (${reason})` : 'GPU parked';
    }
    default:
      return `GPU ${STATE_LABELS[kernel.state]}`;
  }
}
