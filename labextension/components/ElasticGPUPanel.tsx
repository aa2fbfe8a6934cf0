import { ReactWidget, refreshIcon } from '@jupyterlab/ui-components';
import type { Message } from '@lumino/messaging';
import * as React from 'react';

import type { ElasticGPUModel, KernelAction } from '../model';
import type { IKernelLease, IProblem } from '../tokens';
import { ErrorBox, KernelCard } from './KernelCard';
import { PoolSummary } from './PoolSummary';

/** The panel's settings (schema/plugin.json). */
export interface IPanelSettings {
  refreshIntervalSeconds: number;
  showEmulatedAgents: boolean;
  confirmRelease: boolean;
}

export const DEFAULT_PANEL_SETTINGS: IPanelSettings = {
  refreshIntervalSeconds: 10,
  showEmulatedAgents: true,
  confirmRelease: false
};

export interface IElasticGPUPanelOptions {
  model: ElasticGPUModel;
  /** asks the user before a release when confirmRelease is on */
  confirmRelease: (kernel: IKernelLease) => Promise<boolean>;
  /** opens the kernel's notebook */
  openKernel: (kernel: IKernelLease) => void;
  /** opens the kernel's latest %%harp profile */
  openTimeline: (kernel: IKernelLease) => void;
  /** the kernel of the lab's current notebook or console */
  currentKernelId: () => string | null;
}

function ProblemBanner(props: { problem: IProblem }): JSX.Element {
  return (
    <div className="harp-Problem" role="alert" data-kind={props.problem.kind}>
      <div className="harp-Problem-message">{props.problem.message}</div>
      {props.problem.hint && <div className="harp-Problem-hint">{props.problem.hint}</div>}
    </div>
  );
}

/**
 * The "Elastic GPU" sidebar: pool summary and one card per Elastic GPU kernel. While visible it
 * polls the pool and re-renders every second so that held time and idle countdowns tick.
 */
export class ElasticGPUPanel extends ReactWidget {
  constructor(options: IElasticGPUPanelOptions) {
    super();
    this._options = options;
    this.addClass('harp-ElasticGPUPanel');
    options.model.changed.connect(this._onModelChanged, this);
  }

  get settings(): IPanelSettings {
    return this._settings;
  }

  set settings(settings: IPanelSettings) {
    this._settings = settings;
    this._applyPolling();
    this.update();
  }

  dispose(): void {
    if (this.isDisposed) {
      return;
    }
    this._stopTicking();
    this._options.model.changed.disconnect(this._onModelChanged, this);
    super.dispose();
  }

  protected onAfterShow(msg: Message): void {
    super.onAfterShow(msg);
    this._applyPolling();
    void this._options.model.refresh();
    this._startTicking();
  }

  protected onAfterHide(msg: Message): void {
    super.onAfterHide(msg);
    this._applyPolling();
    this._stopTicking();
  }

  protected render(): JSX.Element {
    const model = this._options.model;
    const now = Date.now();
    const currentKernelId = this._options.currentKernelId();
    const kernels = model.kernels;
    const pool = model.pool;
    return (
      <div className="harp-ElasticGPUPanel-content">
        <header className="harp-ElasticGPUPanel-header">
          <h2>Elastic GPU</h2>
          <button
            className="jp-ToolbarButtonComponent harp-RefreshButton"
            title="Refresh now"
            aria-label="Refresh"
            onClick={() => void model.refresh()}
          >
            <refreshIcon.react tag="span" />
          </button>
        </header>
        {model.problem && <ProblemBanner problem={model.problem} />}
        {model.kernelsError && <ErrorBox error={model.kernelsError} />}
        <PoolSummary
          overview={model.summary}
          agents={pool?.agents ?? []}
          showEmulatedAgents={this._settings.showEmulatedAgents}
        />
        {model.poolError && !model.kernelsError && <ErrorBox error={model.poolError} />}
        <h3 className="harp-ElasticGPUPanel-kernelsTitle">Kernels</h3>
        {kernels.length === 0 ? (
          <p className="harp-ElasticGPUPanel-empty">
            {model.loaded
              ? 'No Elastic GPU kernel is running. Open a notebook with the “Elastic GPU” kernel: ' +
                'it leases a GPU only while a cell does GPU work.'
              : 'Loading…'}
          </p>
        ) : (
          <ul className="harp-KernelList">
            {kernels.map(kernel => (
              <KernelCard
                key={kernel.kernel_id}
                kernel={kernel}
                action={model.actionFor(kernel)}
                heldSeconds={model.heldSeconds(kernel, now)}
                gpuSeconds={model.gpuSeconds(kernel, now)}
                idleLeftSeconds={model.idleLeftSeconds(kernel, now)}
                reclaim={model.reclaimView(kernel)}
                queueWaitingSeconds={model.queueWaitingSeconds(kernel.kernel_id, now)}
                error={model.kernelError(kernel.kernel_id)}
                isCurrent={kernel.kernel_id === currentKernelId}
                onAction={this._onAction}
                onDismissError={k => model.dismissError(k.kernel_id)}
                onOpen={this._options.openKernel}
                onTimeline={this._options.openTimeline}
              />
            ))}
          </ul>
        )}
      </div>
    );
  }

  private _onAction = async (kernel: IKernelLease, action: KernelAction): Promise<void> => {
    const model = this._options.model;
    if (action === 'release') {
      if (this._settings.confirmRelease && !(await this._options.confirmRelease(kernel))) {
        return;
      }
      await model.release(kernel.kernel_id);
    } else {
      await model.lease(kernel.kernel_id);
    }
  };

  private _onModelChanged(): void {
    this.update();
  }

  private _applyPolling(): void {
    this._options.model.setPolling(this.isVisible, this._settings.refreshIntervalSeconds * 1000);
  }

  private _startTicking(): void {
    if (this._ticker === null) {
      this._ticker = setInterval(() => this.update(), 1000);
    }
  }

  private _stopTicking(): void {
    if (this._ticker !== null) {
      clearInterval(this._ticker);
      this._ticker = null;
    }
  }

  private readonly _options: IElasticGPUPanelOptions;
  private _settings: IPanelSettings = DEFAULT_PANEL_SETTINGS;
  private _ticker: ReturnType<typeof setInterval> | null = null;
}
