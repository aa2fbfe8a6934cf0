/**
 * Text for the sidebar and the status bar: durations, bytes, and what each lease state means for
 * the user with what to do about it. Pure functions (tested in node).
 */
import type { IKernelLease, LeaseState } from './tokens';

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
  if (h > 0) {
    return `${h}h ${pad(m)}m ${pad(s)}s`;
  }
  if (m > 0) {
    return `${m}m ${pad(s)}s`;
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
}

export function memoryView(kernel: IKernelLease): IMemoryView {
  const allocated = kernel.memory_allocated ?? null;
  const reservedBytes = kernel.memory_used;
  if (allocated === null) {
    return { inUse: formatMemory(reservedBytes, kernel.memory_total), reserved: null };
  }
  return {
    inUse: formatMemory(allocated, kernel.memory_total),
    reserved:
      reservedBytes !== null && reservedBytes !== allocated
        ? `${formatBytes(reservedBytes)} reserved`
        : null
  };
}

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
    case 'held':
      return kernel.idle_timeout > 0
        ? 'Holding a GPU; it is given back after the idle countdown with no GPU work.'
        : 'Holding a GPU until you release it (idle release is off).';
    case 'parking':
      return 'Copying device memory to the agent’s host memory before giving the GPU back.';
    case 'parked':
      return kernel.parked_bytes > 0
        ? `Device memory (${formatBytes(kernel.parked_bytes)}) is parked; ` +
            'the next GPU cell restores it at the same addresses.'
        : 'No GPU held; the next GPU cell leases one.';
    case 'lost':
      return (
        'The GPU agent stopped answering. The kernel and its CPU state are fine; ' +
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

/** The status bar text for a kernel: state, with time held or queue position. */
export function statusText(kernel: IKernelLease, heldSeconds: number | null): string {
  switch (kernel.state) {
    case 'held':
      return `GPU held ${formatDuration(heldSeconds)}`;
    case 'queued':
      return `GPU queued #${kernel.position ?? '?'}`;
    case 'none':
      return 'no GPU yet';
    default:
      return `GPU ${STATE_LABELS[kernel.state]}`;
  }
}
