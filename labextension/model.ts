/**
 * The Elastic GPU sidebar's state: this server's Elastic GPU kernels and their leases, the agent
 * pool, requests in flight, errors to show, and the arithmetic that lets countdowns tick between
 * fetches. No DOM here: the model is tested in node (labextension/test/).
 */
import { ISignal, Signal } from '@lumino/signaling';

import {
  IElasticGPUModel,
  IKernelLease,
  IKernelsReply,
  ILeaseAPI,
  ILeaseEvent,
  IPoolOverview,
  IPoolReply,
  IProblem,
  IUserError,
  LEASE_EVENT_SCHEMA_ID,
  LEASE_STATES
} from './tokens';

export type KernelAction = 'lease' | 'release';

/** a held lease younger than this that shows no memory yet is fetched again (followUpMs) */
const FRESH_LEASE_SECONDS = 5;

/** What the card's button shows and whether it can be pressed. */
export interface IActionView {
  action: KernelAction;
  enabled: boolean;
  /** a request for this kernel is in flight */
  pending: boolean;
  /** why the button is disabled, for its tooltip ('' when enabled) */
  reason: string;
}

/** What the card shows of reclaim on demand while held: the setting, and who waits for it. */
export interface IReclaimView {
  /** seconds without GPU work after which a waiting notebook takes the GPU */
  afterSeconds: number;
  /** kernels waiting in the queue of this kernel's agent (from the pool); 0 when none or unknown */
  waiting: number;
}

export interface IModelOptions {
  api: ILeaseAPI;
  /** clock in ms (injected by tests) */
  now?: () => number;
  /** lease events within this many ms cause one refetch */
  debounceMs?: number;
  /** a fresh lease that shows no memory yet is fetched again after this many ms */
  followUpMs?: number;
}

/** A kernel's lease as last known, with the client time it became known (for countdowns). */
interface IKernelRecord {
  lease: IKernelLease;
  receivedAtMs: number;
}

/** Anything thrown, as an error the user can read. */
export function toUserError(error: unknown): IUserError {
  if (typeof error === 'object' && error !== null) {
    const e = error as { kind?: unknown; message?: unknown; hint?: unknown };
    if (typeof e.kind === 'string' && typeof e.message === 'string') {
      return { kind: e.kind, message: e.message, hint: typeof e.hint === 'string' ? e.hint : '' };
    }
    if (typeof e.message === 'string') {
      return { kind: 'Error', message: e.message, hint: '' };
    }
  }
  return { kind: 'Error', message: String(error), hint: '' };
}

export function isLeaseEvent(emission: { schema_id: string }): emission is ILeaseEvent {
  const event = emission as Partial<ILeaseEvent>;
  return (
    emission.schema_id === LEASE_EVENT_SCHEMA_ID &&
    typeof event.kernel_id === 'string' &&
    typeof event.state === 'string' &&
    (LEASE_STATES as readonly string[]).includes(event.state)
  );
}

export class ElasticGPUModel implements IElasticGPUModel {
  constructor(options: IModelOptions) {
    this._api = options.api;
    this._now = options.now ?? (() => Date.now());
    this._debounceMs = options.debounceMs ?? 200;
    this._followUpMs = options.followUpMs ?? 1000;
  }

  get changed(): ISignal<this, void> {
    return this._changed;
  }

  get isDisposed(): boolean {
    return this._isDisposed;
  }

  /** true once GET kernels answered (successfully or not) */
  get loaded(): boolean {
    return this._loaded;
  }

  get kernels(): readonly IKernelLease[] {
    return this._records.map(record => record.lease);
  }

  /** configured agent endpoints, as GET kernels reports them */
  get agents(): readonly string[] {
    return this._agents;
  }

  /** the server's problem with the whole setup (kernels' first, else the pool's) */
  get problem(): IProblem | null {
    return this._kernelsProblem ?? this._pool?.problem ?? null;
  }

  /** GET kernels failed (the last time it was tried) */
  get kernelsError(): IUserError | null {
    return this._kernelsError;
  }

  get poolError(): IUserError | null {
    return this._poolError;
  }

  get pool(): IPoolReply | null {
    return this._pool;
  }

  kernel(kernelId: string | null | undefined): IKernelLease | null {
    return this._record(kernelId)?.lease ?? null;
  }

  /** the last failed Lease / Release of this kernel, until the next one or dismissError */
  kernelError(kernelId: string): IUserError | null {
    return this._kernelErrors.get(kernelId) ?? null;
  }

  dismissError(kernelId: string): void {
    if (this._kernelErrors.delete(kernelId)) {
      this._changed.emit();
    }
  }

  pendingAction(kernelId: string): KernelAction | null {
    return this._pending.get(kernelId) ?? null;
  }

  /** Release when held, Lease otherwise; disabled while a request or a transition is under way. */
  actionFor(kernel: IKernelLease): IActionView {
    const pending = this._pending.get(kernel.kernel_id);
    if (pending) {
      return { action: pending, enabled: false, pending: true, reason: 'A request is in flight.' };
    }
    if (kernel.execution_state === 'dead') {
      return { action: 'lease', enabled: false, pending: false, reason: 'The kernel is dead.' };
    }
    switch (kernel.state) {
      case 'held':
        return { action: 'release', enabled: true, pending: false, reason: '' };
      case 'acquiring':
        return { action: 'lease', enabled: false, pending: false, reason: 'Already acquiring.' };
      case 'queued':
        return {
          action: 'lease',
          enabled: false,
          pending: false,
          reason: 'Already waiting in the queue for a GPU.'
        };
      case 'parking':
        return {
          action: 'lease',
          enabled: false,
          pending: false,
          reason: 'Parking its device memory; Lease is possible once parked.'
        };
      default:
        return { action: 'lease', enabled: true, pending: false, reason: '' };
    }
  }

  /** Seconds since the current lease was granted, ticking between fetches; null unless held. */
  heldSeconds(kernel: IKernelLease, nowMs: number = this._now()): number | null {
    if (kernel.state !== 'held' || kernel.held_s === null) {
      return null;
    }
    // held_s is the server's own count, so the client's clock skew does not matter; only the
    // time since it arrived is added.
    return kernel.held_s + this._elapsedSeconds(kernel.kernel_id, nowMs);
  }

  /** GPU-seconds of all leases, growing while held. */
  gpuSeconds(kernel: IKernelLease, nowMs: number = this._now()): number {
    if (kernel.state !== 'held') {
      return kernel.gpu_seconds;
    }
    return kernel.gpu_seconds + this._elapsedSeconds(kernel.kernel_id, nowMs);
  }

  /** Seconds to the idle release, counting down to 0; null when not held or never released. */
  idleLeftSeconds(kernel: IKernelLease, nowMs: number = this._now()): number | null {
    if (kernel.state !== 'held' || kernel.idle_timeout <= 0 || kernel.idle_left_s === null) {
      return null;
    }
    // A busy kernel may be running GPU work, which holds the idle clock; the next fetch tells.
    if (kernel.execution_state === 'busy') {
      return kernel.idle_left_s;
    }
    return Math.max(0, kernel.idle_left_s - this._elapsedSeconds(kernel.kernel_id, nowMs));
  }

  /** Reclaim on demand as it applies to a held kernel now; null when not held or not reported. */
  reclaimView(kernel: IKernelLease): IReclaimView | null {
    const after = kernel.reclaim_after;
    if (kernel.state !== 'held' || after === null || after === undefined) {
      return null;
    }
    const agent = this._pool?.agents.find(a => a.endpoint === kernel.agent);
    const waiting = agent ? agent.queue.filter(q => q.kernel_id !== kernel.kernel_id).length : 0;
    return { afterSeconds: after, waiting };
  }

  /** Seconds this kernel has waited in an agent's queue (from the pool), or null. */
  queueWaitingSeconds(kernelId: string, nowMs: number = this._now()): number | null {
    if (!this._pool) {
      return null;
    }
    for (const agent of this._pool.agents) {
      const entry = agent.queue.find(q => q.kernel_id === kernelId);
      if (entry) {
        return entry.waiting_s + Math.max(0, (nowMs - this._poolReceivedAtMs) / 1000);
      }
    }
    return null;
  }

  /** Pool figures: the server's when GET pool has answered, else what the kernels tell. */
  get summary(): IPoolOverview {
    if (this._pool) {
      const agents = this._pool.agents;
      return {
        ...this._pool.summary,
        unreachableAgents: agents
          .filter(agent => !agent.reachable)
          .map(agent => ({ endpoint: agent.endpoint, error: agent.error })),
        emulatedAgents: agents.filter(agent => agent.emulated === true).length,
        fromPool: true
      };
    }
    const kernels = this.kernels;
    return {
      gpus: this._agents.length,
      free: null,
      held: kernels.filter(k => k.state === 'held').length,
      queued: kernels.filter(k => k.state === 'queued').length,
      unreachable: 0,
      unreachableAgents: [],
      emulatedAgents: 0,
      fromPool: false
    };
  }

  /** Fetch kernels and pool now. */
  async refresh(): Promise<void> {
    await Promise.all([this.refreshKernels(), this.refreshPool()]);
  }

  /** GET kernels; a call while one is in flight runs one more fetch after it, not another in parallel. */
  refreshKernels(): Promise<void> {
    if (this._kernelsFetch) {
      this._kernelsAgain = true;
      return this._kernelsFetch;
    }
    this._kernelsFetch = this._fetchRepeatedly(
      () => this._api.getKernels().then(reply => this._applyKernels(reply)),
      error => {
        this._kernelsError = toUserError(error);
      },
      () => {
        const again = this._kernelsAgain;
        this._kernelsAgain = false;
        return again;
      }
    ).finally(() => {
      this._kernelsFetch = null;
    });
    return this._kernelsFetch;
  }

  refreshPool(): Promise<void> {
    if (this._poolFetch) {
      this._poolAgain = true;
      return this._poolFetch;
    }
    this._poolFetch = this._fetchRepeatedly(
      () => this._api.getPool().then(reply => this._applyPool(reply)),
      error => {
        this._poolError = toUserError(error);
      },
      () => {
        const again = this._poolAgain;
        this._poolAgain = false;
        return again;
      }
    ).finally(() => {
      this._poolFetch = null;
    });
    return this._poolFetch;
  }

  /** One refetch of kernels and pool after the burst of triggers within debounceMs ends. */
  scheduleRefresh(): void {
    if (this._isDisposed) {
      return;
    }
    if (this._debounceTimer !== null) {
      clearTimeout(this._debounceTimer);
    }
    this._debounceTimer = setTimeout(() => {
      this._debounceTimer = null;
      void this.refresh();
    }, this._debounceMs);
  }

  /**
   * An emission of the lab's event stream. Lease events update the kernel's state at once (so the
   * badge changes without waiting for the fetch) and schedule a refetch. Returns whether it was one.
   */
  handleEvent(emission: { schema_id: string }): boolean {
    if (!isLeaseEvent(emission)) {
      return false;
    }
    const index = this._records.findIndex(r => r.lease.kernel_id === emission.kernel_id);
    if (index >= 0) {
      const previous = this._records[index].lease;
      const lease: IKernelLease = {
        ...previous,
        state: emission.state,
        agent: emission.agent !== undefined ? emission.agent : previous.agent,
        position: emission.state === 'queued' ? emission.position ?? previous.position : null,
        message: emission.message ?? previous.message,
        // while held, the agent's applied value (it bounds the kernel's setting by its own)
        reclaim_after:
          emission.reclaim_after !== undefined ? emission.reclaim_after : previous.reclaim_after,
        // why it is parked shows with the badge, not a fetch later ("reclaimed for a waiting
        // notebook"); the server clears it once the kernel holds a GPU again
        parked_reason:
          emission.parked_reason !== undefined
            ? emission.parked_reason
            : emission.state === 'held'
              ? null
              : previous.parked_reason
      };
      if (emission.state === 'held' && previous.state !== 'held') {
        lease.held_s = 0;
        lease.idle_left_s = lease.idle_timeout > 0 ? lease.idle_timeout : null;
      }
      const receivedAtMs =
        emission.state === previous.state ? this._records[index].receivedAtMs : this._now();
      if (emission.state === previous.state) {
        // same state: keep the ticking counters anchored where they were
        lease.held_s = previous.held_s;
      }
      this._records = [
        ...this._records.slice(0, index),
        { lease, receivedAtMs },
        ...this._records.slice(index + 1)
      ];
      this._changed.emit();
    }
    this.scheduleRefresh();
    return true;
  }

  /** Kernel ids the lab knows are running; a change (start / shutdown) triggers a refetch. */
  noteRunningKernels(kernelIds: Iterable<string>): void {
    const ids = [...kernelIds].sort().join(',');
    if (ids !== this._runningKernelIds) {
      this._runningKernelIds = ids;
      this.scheduleRefresh();
    }
  }

  lease(kernelId: string): Promise<boolean> {
    return this._request(kernelId, 'lease');
  }

  release(kernelId: string): Promise<boolean> {
    return this._request(kernelId, 'release');
  }

  /** Refetch every intervalMs while active (the panel is visible); 0 stops it. */
  setPolling(active: boolean, intervalMs: number = this._pollIntervalMs): void {
    this._pollIntervalMs = intervalMs;
    if (this._pollTimer !== null) {
      clearInterval(this._pollTimer);
      this._pollTimer = null;
    }
    if (active && intervalMs > 0 && !this._isDisposed) {
      this._pollTimer = setInterval(() => void this.refresh(), intervalMs);
    }
  }

  get polling(): boolean {
    return this._pollTimer !== null;
  }

  dispose(): void {
    if (this._isDisposed) {
      return;
    }
    this._isDisposed = true;
    this.setPolling(false);
    if (this._debounceTimer !== null) {
      clearTimeout(this._debounceTimer);
      this._debounceTimer = null;
    }
    if (this._followUpTimer !== null) {
      clearTimeout(this._followUpTimer);
      this._followUpTimer = null;
    }
    Signal.clearData(this);
  }

  private async _request(kernelId: string, action: KernelAction): Promise<boolean> {
    if (this._pending.has(kernelId)) {
      return false;
    }
    this._pending.set(kernelId, action);
    this._kernelErrors.delete(kernelId);
    this._changed.emit();
    let ok = false;
    try {
      const reply =
        action === 'lease' ? await this._api.lease(kernelId) : await this._api.release(kernelId);
      this._replaceKernel(reply.kernel);
      ok = true;
    } catch (error) {
      this._kernelErrors.set(kernelId, toUserError(error));
    } finally {
      this._pending.delete(kernelId);
      if (!this._isDisposed) {
        this._changed.emit();
      }
    }
    this.scheduleRefresh();
    return ok;
  }

  private async _fetchRepeatedly(
    fetchOnce: () => Promise<void>,
    onError: (error: unknown) => void,
    again: () => boolean
  ): Promise<void> {
    do {
      try {
        await fetchOnce();
      } catch (error) {
        onError(error);
      }
      if (!this._isDisposed) {
        this._changed.emit();
      }
    } while (again() && !this._isDisposed);
  }

  private _applyKernels(reply: IKernelsReply): void {
    const now = this._now();
    this._records = reply.kernels.map(lease => ({ lease, receivedAtMs: now }));
    this._agents = reply.agents;
    this._kernelsProblem = reply.problem;
    this._kernelsError = null;
    this._loaded = true;
    this._followUpFreshLeases(reply.kernels);
    for (const kernelId of [...this._kernelErrors.keys()]) {
      if (!this._records.some(r => r.lease.kernel_id === kernelId)) {
        this._kernelErrors.delete(kernelId);
      }
    }
  }

  /**
   * A lease granted seconds ago may not show its memory yet (the kernel is still restoring its
   * parked arrays when the agent reports): fetch once more shortly, rather than show 0 B until
   * the next poll.
   */
  private _followUpFreshLeases(kernels: IKernelLease[]): void {
    const settling = kernels.some(
      k =>
        k.state === 'held' &&
        !k.memory_used &&
        k.held_s !== null &&
        k.held_s < FRESH_LEASE_SECONDS
    );
    if (!settling || this._followUpTimer !== null || this._isDisposed) {
      return;
    }
    this._followUpTimer = setTimeout(() => {
      this._followUpTimer = null;
      void this.refreshKernels();
    }, this._followUpMs);
  }

  private _applyPool(reply: IPoolReply): void {
    this._pool = reply;
    this._poolReceivedAtMs = this._now();
    this._poolError = null;
  }

  private _replaceKernel(lease: IKernelLease): void {
    const record = { lease, receivedAtMs: this._now() };
    const index = this._records.findIndex(r => r.lease.kernel_id === lease.kernel_id);
    this._records =
      index >= 0
        ? [...this._records.slice(0, index), record, ...this._records.slice(index + 1)]
        : [...this._records, record];
  }

  private _record(kernelId: string | null | undefined): IKernelRecord | null {
    if (!kernelId) {
      return null;
    }
    return this._records.find(r => r.lease.kernel_id === kernelId) ?? null;
  }

  private _elapsedSeconds(kernelId: string, nowMs: number): number {
    const record = this._record(kernelId);
    return record ? Math.max(0, (nowMs - record.receivedAtMs) / 1000) : 0;
  }

  private readonly _api: ILeaseAPI;
  private readonly _now: () => number;
  private readonly _debounceMs: number;
  private readonly _followUpMs: number;
  private readonly _changed = new Signal<this, void>(this);
  private _isDisposed = false;
  private _loaded = false;
  private _records: IKernelRecord[] = [];
  private _agents: string[] = [];
  private _kernelsProblem: IProblem | null = null;
  private _kernelsError: IUserError | null = null;
  private _pool: IPoolReply | null = null;
  private _poolReceivedAtMs = 0;
  private _poolError: IUserError | null = null;
  private readonly _pending = new Map<string, KernelAction>();
  private readonly _kernelErrors = new Map<string, IUserError>();
  private _kernelsFetch: Promise<void> | null = null;
  private _kernelsAgain = false;
  private _poolFetch: Promise<void> | null = null;
  private _poolAgain = false;
  private _debounceTimer: ReturnType<typeof setTimeout> | null = null;
  private _followUpTimer: ReturnType<typeof setTimeout> | null = null;
  private _pollTimer: ReturnType<typeof setInterval> | null = null;
  private _pollIntervalMs = 10_000;
  private _runningKernelIds = '';
}
