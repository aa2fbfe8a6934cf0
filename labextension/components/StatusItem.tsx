import type { ISessionContext } from '@jupyterlab/apputils';
import { ReactWidget } from '@jupyterlab/ui-components';
import { ISignal, Signal } from '@lumino/signaling';
import * as React from 'react';

import {
  formatDuration,
  kernelTitle,
  memoryView,
  parkedReasonDetail,
  parkedReasonText,
  reclaimText,
  statusText
} from '../format';
import { gpuIcon } from '../icons';
import type { IElasticGPUModel } from '../tokens';

/**
 * The status bar item for the current notebook's (or console's) kernel: its lease state and time
 * held; active only when that kernel is an Elastic GPU kernel. A click opens the sidebar.
 */
export class ElasticGPUStatus extends ReactWidget {
  constructor(model: IElasticGPUModel, onClick: () => void) {
    super();
    this._model = model;
    this.addClass('harp-StatusItem');
    this.node.addEventListener('click', onClick);
    this.node.title = 'Elastic GPU: click to open the sidebar';
    model.changed.connect(this._onChanged, this);
  }

  /** emitted when isActive may have changed */
  get activeStateChanged(): ISignal<this, void> {
    return this._activeStateChanged;
  }

  get isActive(): boolean {
    return this._enabled && this._model.kernel(this._kernelId()) !== null;
  }

  set enabled(enabled: boolean) {
    this._enabled = enabled;
    this._onChanged();
  }

  set sessionContext(sessionContext: ISessionContext | null) {
    if (this._sessionContext === sessionContext) {
      return;
    }
    this._sessionContext?.kernelChanged.disconnect(this._onChanged, this);
    this._sessionContext = sessionContext;
    sessionContext?.kernelChanged.connect(this._onChanged, this);
    this._onChanged();
  }

  get kernelId(): string | null {
    return this._kernelId();
  }

  dispose(): void {
    if (this.isDisposed) {
      return;
    }
    this._setTicking(false);
    Signal.clearData(this);
    super.dispose();
  }

  protected render(): JSX.Element | null {
    const kernel = this._model.kernel(this._kernelId());
    if (!kernel) {
      return null;
    }
    const held = this._model.heldSeconds(kernel);
    const details = [
      `${kernelTitle(kernel)}: ${kernel.state}`,
      kernel.agent ? `agent ${kernel.agent}${kernel.emulated ? ' (EMULATED)' : ''}` : '',
      kernel.state === 'held' ? `memory ${memoryView(kernel).inUse}` : '',
      kernel.state === 'held' ? `held ${formatDuration(held)}` : '',
      reclaimText(kernel) ? `reclaimed ${reclaimText(kernel)} when another notebook waits` : '',
      parkedReasonText(kernel)
        ? `${parkedReasonText(kernel)}. ${parkedReasonDetail(kernel) ?? ''}`
        : '',
      'Click to open the Elastic GPU sidebar'
    ].filter(Boolean);
    return (
      <span
        className={`harp-StatusItem-content harp-mod-${kernel.state}`}
        data-state={kernel.state}
        title={details.join('\n')}
      >
        <gpuIcon.react tag="span" className="harp-StatusItem-icon" />
        <span className="harp-StatusItem-text">{statusText(kernel, held)}</span>
      </span>
    );
  }

  private _kernelId(): string | null {
    return this._sessionContext?.session?.kernel?.id ?? null;
  }

  private _onChanged(): void {
    const kernel = this._model.kernel(this._kernelId());
    this._setTicking(kernel?.state === 'held');
    this.update();
    this._activeStateChanged.emit();
  }

  private _setTicking(on: boolean): void {
    if (on && this._ticker === null) {
      this._ticker = setInterval(() => this.update(), 1000);
    } else if (!on && this._ticker !== null) {
      clearInterval(this._ticker);
      this._ticker = null;
    }
  }

  private readonly _model: IElasticGPUModel;
  private readonly _activeStateChanged = new Signal<this, void>(this);
  private _sessionContext: ISessionContext | null = null;
  private _enabled = true;
  private _ticker: ReturnType<typeof setInterval> | null = null;
}
