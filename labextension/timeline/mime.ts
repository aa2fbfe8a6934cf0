/**
 * The MIME renderer of `application/vnd.harp.timeline+json` (what `%%harp profile` outputs):
 * the notebook shows the interactive timeline; nbconvert and other front ends use the output's
 * text/html and text/plain fallbacks.
 */

import { IRenderMime } from '@jupyterlab/rendermime-interfaces';

import { TimelineData, TIMELINE_MIME_TYPE } from './layout';
import { TimelineWidget } from './widget';

export class TimelineRenderer extends TimelineWidget implements IRenderMime.IRenderer {
  constructor(options: IRenderMime.IRendererOptions) {
    super();
    this.addClass('harp-TimelineOutput');
    this._mimeType = options.mimeType;
  }

  async renderModel(model: IRenderMime.IMimeModel): Promise<void> {
    this.setData(model.data[this._mimeType] as unknown as TimelineData);
  }

  private _mimeType: string;
}

export const rendererFactory: IRenderMime.IRendererFactory = {
  safe: true,
  mimeTypes: [TIMELINE_MIME_TYPE],
  defaultRank: 10, // before text/html (50): the fallbacks are for other front ends
  createRenderer: options => new TimelineRenderer(options)
};

const extension: IRenderMime.IExtension = {
  id: 'harp-jupyter:timeline',
  description: 'Draws %%harp profile timelines',
  rendererFactory,
  rank: 10,
  dataType: 'json'
};

export default extension;
