/**
 * The contract with the harp_jupyter server extension (docs/sidebar-api.md), the plugin ids,
 * command ids and the token other extensions use to reach the Elastic GPU model.
 */
import { Token } from '@lumino/coreutils';
import type { ISignal } from '@lumino/signaling';

/** Lease states of a kernel, as the sidebar shows them (docs/leases-design.md). */
export type LeaseState =
  | 'none'
  | 'acquiring'
  | 'queued'
  | 'held'
  | 'parking'
  | 'parked'
  | 'lost';

export const LEASE_STATES: readonly LeaseState[] = [
  'none',
  'acquiring',
  'queued',
  'held',
  'parking',
  'parked',
  'lost'
];

/** Why a lease ended with the kernel's state parked (docs/leases-design.md). */
export type ParkReason = 'release' | 'idle' | 'reclaim' | 'ended';

/** A problem the server reports about the whole setup (e.g. no agents configured). */
export interface IProblem {
  kind: string;
  message: string;
  hint: string;
}

/** One Elastic GPU kernel and its lease (`GET /harp/api/kernels`). */
export interface IKernelLease {
  kernel_id: string;
  path: string | null;
  name: string | null;
  execution_state: string;
  state: LeaseState;
  agent: string | null;
  gpu: string | null;
  emulated: boolean | null;
  /** device memory the agent has mapped for this kernel (2 MiB pages) */
  memory_used: number | null;
  memory_total: number | null;
  /** bytes the kernel's own allocations cover (its arrays), when the kernel reports them */
  memory_allocated?: number | null;
  parked_bytes: number;
  held_since: number | null;
  held_s: number | null;
  gpu_seconds: number;
  idle_timeout: number;
  idle_left_s: number | null;
  /** seconds without GPU work after which a waiting kernel may take this one's GPU */
  reclaim_after?: number | null;
  /** why the last lease ended parked: 'reclaim' = taken back for a kernel in the queue */
  parked_reason?: ParkReason | null;
  position: number | null;
  message: string;
  /** when the kernel's latest %%harp profile was taken (epoch s); absent before the first */
  profile_at?: number | null;
}

export interface IKernelsReply {
  kernels: IKernelLease[];
  agents: string[];
  problem: IProblem | null;
}

/** `POST /harp/api/kernels/{id}/lease|release`. */
export interface IKernelReply {
  kernel: IKernelLease;
}

export interface IPoolHolder {
  kernel_id: string;
  user: string;
  since: number;
  path: string | null;
}

export interface IPoolQueueEntry {
  kernel_id: string;
  user: string;
  position: number;
  waiting_s: number;
  path: string | null;
}

export interface IPoolAgent {
  endpoint: string;
  reachable: boolean;
  error: string | null;
  gpu: string | null;
  emulated: boolean | null;
  memory_total: number | null;
  memory_used: number | null;
  utilization: number | null;
  holder: IPoolHolder | null;
  queue: IPoolQueueEntry[];
  parked_bytes: number;
  parked_count: number;
}

export interface IPoolSummary {
  gpus: number;
  free: number;
  held: number;
  queued: number;
  unreachable: number;
}

export interface IPoolReply {
  agents: IPoolAgent[];
  summary: IPoolSummary;
  problem: IProblem | null;
}

/** The lease event on jupyter_server's event bus, as the lab's event stream delivers it. */
export interface ILeaseEvent {
  schema_id: string;
  kernel_id: string;
  state: LeaseState;
  previous?: LeaseState | null;
  agent?: string | null;
  position?: number | null;
  message?: string;
  /** the reclaim_after in force (while held: what the agent applies) */
  reclaim_after?: number | null;
  parked_reason?: ParkReason | null;
}

export const LEASE_EVENT_SCHEMA_ID = 'https://harp-jupyter.dev/events/lease';

/** The server calls the model needs; requests.ts implements them, tests stub them. */
export interface ILeaseAPI {
  getKernels(): Promise<IKernelsReply>;
  getPool(): Promise<IPoolReply>;
  lease(kernelId: string): Promise<IKernelReply>;
  release(kernelId: string): Promise<IKernelReply>;
}

/** An error shown to the user: what happened and what to do about it. */
export interface IUserError {
  kind: string;
  message: string;
  hint: string;
}

/** The pool figures the summary shows; `free` is null until the pool has answered. */
export interface IPoolOverview {
  gpus: number;
  free: number | null;
  held: number;
  queued: number;
  unreachable: number;
  unreachableAgents: { endpoint: string; error: string | null }[];
  emulatedAgents: number;
  fromPool: boolean;
}

/** What other extensions (and the status bar plugin) can use. */
export interface IElasticGPUModel {
  readonly changed: ISignal<IElasticGPUModel, void>;
  readonly kernels: readonly IKernelLease[];
  readonly problem: IProblem | null;
  kernel(kernelId: string | null | undefined): IKernelLease | null;
  heldSeconds(kernel: IKernelLease, nowMs?: number): number | null;
  refresh(): Promise<void>;
}

export const IElasticGPUModel = new Token<IElasticGPUModel>(
  'harp-jupyter:IElasticGPUModel',
  'The Elastic GPU lease state of this server’s kernels, kept live.'
);

export const PLUGIN_ID = 'harp-jupyter:plugin';
export const STATUS_PLUGIN_ID = 'harp-jupyter:status';
export const PANEL_ID = 'harp-elastic-gpu-panel';

export namespace CommandIDs {
  export const openPanel = 'harp:open-panel';
  export const refresh = 'harp:refresh';
  export const leaseKernel = 'harp:lease-kernel';
  export const releaseKernel = 'harp:release-kernel';
  export const openTimeline = 'harp:open-timeline';
}
