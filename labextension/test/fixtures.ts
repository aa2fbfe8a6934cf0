import type {
  IKernelLease,
  IKernelReply,
  IKernelsReply,
  ILeaseAPI,
  IPoolReply
} from '../tokens';

export function lease(overrides: Partial<IKernelLease> = {}): IKernelLease {
  return {
    kernel_id: 'k1',
    path: 'work/a.ipynb',
    name: 'a.ipynb',
    execution_state: 'idle',
    state: 'none',
    agent: null,
    gpu: null,
    emulated: null,
    memory_used: null,
    memory_total: null,
    parked_bytes: 0,
    held_since: null,
    held_s: null,
    gpu_seconds: 0,
    idle_timeout: 60,
    idle_left_s: null,
    position: null,
    message: '',
    ...overrides
  };
}

export const HELD = lease({
  state: 'held',
  agent: 'tcp://127.0.0.1:5555',
  gpu: 'EMULATED (host memory)',
  emulated: true,
  memory_used: 80,
  memory_total: 8 << 30,
  held_since: 1_700_000_000,
  held_s: 10,
  gpu_seconds: 25,
  idle_left_s: 50
});

export function poolReply(overrides: Partial<IPoolReply> = {}): IPoolReply {
  return {
    agents: [
      {
        endpoint: 'tcp://127.0.0.1:5555',
        reachable: true,
        error: null,
        gpu: 'EMULATED (host memory)',
        emulated: true,
        memory_total: 8 << 30,
        memory_used: 80,
        utilization: null,
        holder: { kernel_id: 'k1', user: 'u', since: 1_700_000_000, path: 'work/a.ipynb' },
        queue: [{ kernel_id: 'k2', user: 'u', position: 1, waiting_s: 3, path: 'b.ipynb' }],
        parked_bytes: 0,
        parked_count: 0
      },
      {
        endpoint: 'tcp://10.0.0.9:5555',
        reachable: false,
        error: 'no answer within 1 s',
        gpu: null,
        emulated: null,
        memory_total: null,
        memory_used: null,
        utilization: null,
        holder: null,
        queue: [],
        parked_bytes: 0,
        parked_count: 0
      }
    ],
    summary: { gpus: 2, free: 0, held: 1, queued: 1, unreachable: 1 },
    problem: null,
    ...overrides
  };
}

/** An ILeaseAPI whose replies the test sets, counting calls; `gate` holds replies back. */
export class FakeAPI implements ILeaseAPI {
  kernelsReply: IKernelsReply = { kernels: [], agents: [], problem: null };
  poolReply: IPoolReply = poolReply();
  kernelReply: (kernelId: string, action: 'lease' | 'release') => Promise<IKernelReply> =
    async kernelId => ({ kernel: lease({ kernel_id: kernelId }) });
  calls = { kernels: 0, pool: 0, lease: 0, release: 0 };
  gate: Promise<void> = Promise.resolve();

  async getKernels(): Promise<IKernelsReply> {
    this.calls.kernels += 1;
    await this.gate;
    return structuredClone(this.kernelsReply);
  }

  async getPool(): Promise<IPoolReply> {
    this.calls.pool += 1;
    await this.gate;
    return structuredClone(this.poolReply);
  }

  lease(kernelId: string): Promise<IKernelReply> {
    this.calls.lease += 1;
    return this.kernelReply(kernelId, 'lease');
  }

  release(kernelId: string): Promise<IKernelReply> {
    this.calls.release += 1;
    return this.kernelReply(kernelId, 'release');
  }
}

export function sleep(ms: number): Promise<void> {
  return new Promise(resolve => setTimeout(resolve, ms));
}

/** A promise with its resolve function, to hold a fake reply until the test lets it go. */
export function deferred(): { promise: Promise<void>; resolve: () => void } {
  let resolve: () => void = () => undefined;
  const promise = new Promise<void>(r => {
    resolve = r;
  });
  return { promise, resolve };
}
