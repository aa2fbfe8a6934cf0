import * as React from 'react';

import { formatBytes, formatMemory } from '../format';
import type { IPoolAgent, IPoolOverview } from '../tokens';
import { EmulatedTag } from './KernelCard';

function Figure(props: { name: string; label: string; value: number | null }): JSX.Element {
  return (
    <div className="harp-PoolSummary-figure" data-field={props.name}>
      <span className="harp-PoolSummary-value">{props.value === null ? '–' : props.value}</span>
      <span className="harp-PoolSummary-label">{props.label}</span>
    </div>
  );
}

function AgentRow(props: { agent: IPoolAgent }): JSX.Element {
  const { agent } = props;
  const holder = agent.holder ? agent.holder.path ?? agent.holder.kernel_id.slice(0, 8) : null;
  return (
    <li
      className={`harp-AgentRow${agent.reachable ? '' : ' harp-mod-unreachable'}`}
      data-endpoint={agent.endpoint}
    >
      <div className="harp-AgentRow-head">
        <span className="harp-Endpoint">{agent.endpoint}</span>
        {agent.emulated && <EmulatedTag />}
        {!agent.reachable && <span className="harp-UnreachableTag">unreachable</span>}
      </div>
      {agent.reachable ? (
        <div className="harp-AgentRow-detail">
          {agent.gpu ?? 'unknown GPU'} ·{' '}
          <span className="harp-Nowrap" data-field="agent-memory">
            {formatMemory(agent.memory_used, agent.memory_total)}
          </span>
          {agent.utilization !== null && ` · ${agent.utilization}% busy`}
          {' · '}
          {holder ? `held by ${holder}` : 'free'}
          {agent.queue.length > 0 && ` · ${agent.queue.length} queued`}
          {agent.parked_count > 0 &&
            ` · ${agent.parked_count} parked (${formatBytes(agent.parked_bytes)})`}
        </div>
      ) : (
        <div className="harp-AgentRow-detail">{agent.error ?? 'did not answer'}</div>
      )}
    </li>
  );
}

export interface IPoolSummaryProps {
  overview: IPoolOverview;
  agents: readonly IPoolAgent[];
  showEmulatedAgents: boolean;
}

export function PoolSummary(props: IPoolSummaryProps): JSX.Element {
  const { overview } = props;
  const listed = props.agents.filter(a => props.showEmulatedAgents || a.emulated !== true);
  const hidden = props.agents.length - listed.length;
  return (
    <section className="harp-PoolSummary" aria-label="GPU pool">
      <div className="harp-PoolSummary-figures">
        <Figure name="gpus" label="GPUs" value={overview.gpus} />
        <Figure name="free" label="free" value={overview.free} />
        <Figure name="held" label="held" value={overview.held} />
        <Figure name="queued" label="queued" value={overview.queued} />
      </div>
      {overview.emulatedAgents > 0 && (
        <div className="harp-PoolSummary-note">
          <EmulatedTag /> {overview.emulatedAgents} of {props.agents.length} agent
          {props.agents.length === 1 ? '' : 's'} {overview.emulatedAgents === 1 ? 'has' : 'have'} no
          real GPU (host memory and NumPy).
        </div>
      )}
      {overview.unreachable > 0 && (
        <div className="harp-PoolSummary-warning" role="alert" data-field="unreachable">
          {overview.unreachable} agent{overview.unreachable === 1 ? '' : 's'} unreachable:{' '}
          {overview.unreachableAgents.map(a => a.endpoint).join(', ')}.{' '}
          {overview.unreachable < props.agents.length
            ? 'Kernels lease from the others meanwhile. '
            : 'GPU cells cannot get a GPU until one answers. '}
          Check that harp-agent runs there and that this server can reach it.
        </div>
      )}
      {listed.length > 0 && (
        <ul className="harp-AgentList">
          {listed.map(agent => (
            <AgentRow key={agent.endpoint} agent={agent} />
          ))}
        </ul>
      )}
      {hidden > 0 && (
        <div className="harp-PoolSummary-note">
          {hidden} emulated agent{hidden === 1 ? '' : 's'} hidden (settings).
        </div>
      )}
    </section>
  );
}
