import * as React from 'react';

import {
  PARKED_DETAIL,
  PARKED_WHAT,
  STATE_LABELS,
  describeState,
  formatBytes,
  formatDuration,
  kernelTitle,
  memoryView,
  parkedReasonDetail,
  parkedReasonText,
  reclaimDetail,
  reclaimText,
  splitTitle
} from '../format';
import type { IActionView, IReclaimView } from '../model';
import type { IKernelLease, IUserError, LeaseState } from '../tokens';

export function StateBadge(props: { state: LeaseState }): JSX.Element {
  return (
    <span
      className={`harp-StateBadge harp-mod-${props.state}`}
      data-state={props.state}
      title={`Lease state: ${props.state}`}
    >
      {STATE_LABELS[props.state]}
    </span>
  );
}

export function EmulatedTag(): JSX.Element {
  return (
    <span
      className="harp-EmulatedTag"
      title="This agent has no real GPU: it runs array code in host memory with NumPy"
    >
      EMULATED
    </span>
  );
}

export function ErrorBox(props: { error: IUserError; onDismiss?: () => void }): JSX.Element {
  return (
    <div className="harp-ErrorBox" role="alert" data-kind={props.error.kind}>
      <div className="harp-ErrorBox-message">
        <strong>{props.error.kind}</strong>: {props.error.message}
      </div>
      {props.error.hint && <div className="harp-ErrorBox-hint">{props.error.hint}</div>}
      {props.onDismiss && (
        <button
          className="harp-ErrorBox-dismiss"
          title="Dismiss"
          aria-label="Dismiss"
          onClick={props.onDismiss}
        >
          ×
        </button>
      )}
    </div>
  );
}

export interface IKernelCardProps {
  kernel: IKernelLease;
  action: IActionView;
  heldSeconds: number | null;
  gpuSeconds: number;
  idleLeftSeconds: number | null;
  /** reclaim on demand while held: its setting and who waits (null: not held / not reported) */
  reclaim?: IReclaimView | null;
  queueWaitingSeconds: number | null;
  error: IUserError | null;
  isCurrent: boolean;
  onAction: (kernel: IKernelLease, action: IActionView['action']) => void;
  onDismissError: (kernel: IKernelLease) => void;
  onOpen: (kernel: IKernelLease) => void;
  /** opens the kernel's latest %%harp profile (shown when it has one) */
  onTimeline?: (kernel: IKernelLease) => void;
}

function Row(props: {
  label: string;
  name: string;
  wide?: boolean;
  title?: string;
  children: React.ReactNode;
}): JSX.Element {
  return (
    <div className={`harp-Field${props.wide ? ' harp-mod-wide' : ''}`}>
      <dt>{props.label}</dt>
      <dd data-field={props.name} title={props.title}>
        {props.children}
      </dd>
    </div>
  );
}

/** "after 2 s idle", with "1 waiting" apart when a notebook waits on this kernel's agent. */
function ReclaimValue(props: { kernel: IKernelLease; reclaim: IReclaimView }): JSX.Element {
  const { reclaim } = props;
  return (
    <>
      <span data-part="after">{reclaimText(props.kernel)}</span>
      {reclaim.waiting > 0 && (
        <span className="harp-Nowrap harp-Field-aside" data-part="waiting">
          {`${reclaim.waiting} waiting`}
        </span>
      )}
    </>
  );
}

export function KernelCard(props: IKernelCardProps): JSX.Element {
  const { kernel, action } = props;
  const held = kernel.state === 'held';
  const buttonLabel = action.pending
    ? action.action === 'release'
      ? 'Releasing…'
      : 'Leasing…'
    : action.action === 'release'
      ? 'Release'
      : 'Lease';
  const showAgent = kernel.agent !== null && kernel.state !== 'none';
  const title = kernelTitle(kernel);
  const [titleHead, titleTail] = splitTitle(title);
  const memory = memoryView(kernel);
  const reason = parkedReasonText(kernel);
  // the keeper's message repeats the reason ("Released for a kernel waiting in the queue: …");
  // an ended lease's message says more (which agent, expired or revoked): it stays
  const messageSaidByReason = reason !== null && kernel.parked_reason !== 'ended';
  return (
    <li
      className={`harp-KernelCard harp-mod-${kernel.state}${props.isCurrent ? ' harp-mod-current' : ''}`}
      data-kernel-id={kernel.kernel_id}
      data-state={kernel.state}
      aria-label={`${title}: ${kernel.state}`}
    >
      <div className="harp-KernelCard-header">
        <StateBadge state={kernel.state} />
        <button
          className="harp-KernelCard-title"
          title={kernel.path ? `${kernel.path} (click to open)` : kernel.kernel_id}
          onClick={() => props.onOpen(kernel)}
          disabled={!kernel.path}
        >
          <span className="harp-KernelCard-titleHead">{titleHead}</span>
          <span className="harp-KernelCard-titleTail">{titleTail}</span>
        </button>
        <button
          className={`jp-Button harp-KernelCard-action ${
            action.action === 'release' ? 'jp-mod-warn' : 'jp-mod-accept'
          }`}
          data-action={action.action}
          disabled={!action.enabled}
          title={
            action.reason ||
            (action.action === 'release'
              ? 'Park this kernel’s device memory and give the GPU back'
              : 'Lease a GPU now, so the next GPU cell does not wait')
          }
          onClick={() => props.onAction(kernel, action.action)}
        >
          {buttonLabel}
        </button>
      </div>
      <dl className="harp-KernelCard-fields">
        {showAgent && (
          <Row label="Agent" name="agent" wide>
            <span className="harp-Endpoint">{kernel.agent}</span>
            {kernel.emulated && <EmulatedTag />}
          </Row>
        )}
        {showAgent && kernel.gpu && (
          <Row label="GPU" name="gpu" wide>
            {kernel.gpu}
          </Row>
        )}
        {reason && (
          <Row
            label="Why parked"
            name="parked-reason"
            wide
            title={parkedReasonDetail(kernel) ?? ''}
          >
            <span data-reason={kernel.parked_reason}>{reason}</span>
          </Row>
        )}
        {held && (
          <Row label="Memory" name="memory" wide>
            <span
              className="harp-Nowrap"
              data-part="in-use"
              title={
                memory.reserved
                  ? 'Bytes your allocations cover, of the GPU’s memory'
                  : 'Device memory the agent has mapped for this kernel, of the GPU’s memory'
              }
            >
              {memory.inUse}
            </span>
            {memory.parked && (
              <span
                className="harp-Nowrap harp-Field-aside"
                data-part="parked"
                title={`Still parked on the agent, not yet restored. ${PARKED_DETAIL}`}
              >
                {memory.parked}
              </span>
            )}
            {memory.reserved && (
              <span
                className="harp-Nowrap harp-Field-aside"
                data-part="reserved"
                title="The agent maps device memory in 2 MiB pages: what it holds for them"
              >
                {memory.reserved}
              </span>
            )}
          </Row>
        )}
        {kernel.state === 'parked' && kernel.parked_bytes > 0 && (
          <Row label="Parked" name="parked" wide title={PARKED_DETAIL}>
            <span className="harp-Nowrap" data-part="bytes">
              {formatBytes(kernel.parked_bytes)}
            </span>
            <span className="harp-Field-aside" data-part="what">
              {`(${PARKED_WHAT})`}
            </span>
          </Row>
        )}
        {held && (
          <Row label="Time held" name="held">
            {formatDuration(props.heldSeconds)}
          </Row>
        )}
        {held && (
          <Row label="Idle release" name="idle">
            {props.idleLeftSeconds === null
              ? 'off'
              : props.idleLeftSeconds > 0
                ? `in ${formatDuration(props.idleLeftSeconds)}`
                : 'due now'}
          </Row>
        )}
        {held && props.reclaim && (
          <Row
            label="Reclaim"
            name="reclaim"
            title={reclaimDetail(props.reclaim.afterSeconds, props.reclaim.waiting)}
          >
            <ReclaimValue kernel={kernel} reclaim={props.reclaim} />
          </Row>
        )}
        {kernel.state === 'queued' && (
          <Row label="Queue" name="position" wide>
            {`position ${kernel.position ?? '?'}`}
            {props.queueWaitingSeconds !== null &&
              ` (waiting ${formatDuration(props.queueWaitingSeconds)})`}
          </Row>
        )}
        <Row label="GPU-seconds" name="gpu-seconds">
          {props.gpuSeconds.toFixed(1)}
        </Row>
      </dl>
      <p className="harp-KernelCard-note">{describeState(kernel)}</p>
      {kernel.profile_at && props.onTimeline && (
        <button
          className="jp-Button jp-mod-minimal harp-KernelCard-timeline"
          title="Open the timeline of this kernel's latest %%harp profile"
          onClick={() => props.onTimeline?.(kernel)}
        >
          Latest profile
        </button>
      )}
      {kernel.message && kernel.state !== 'held' && !messageSaidByReason && (
        <p className="harp-KernelCard-message" data-field="message">
          {kernel.message}
        </p>
      )}
      {props.error && (
        <ErrorBox error={props.error} onDismiss={() => props.onDismissError(kernel)} />
      )}
    </li>
  );
}
