/**
 * The sidebar's timeline view: a kernel's latest `%%harp profile`, fetched from the server
 * (GET /harp/api/kernels/{id}/profile) and shown in a main-area tab, one per kernel.
 */

import { JupyterFrontEnd } from '@jupyterlab/application';
import { MainAreaWidget, showErrorMessage } from '@jupyterlab/apputils';

import { gpuIcon } from '../icons';
import { requestAPI } from '../requests';
import { TimelineData } from './layout';
import { TimelineWidget } from './widget';

const open = new Map<string, MainAreaWidget<TimelineWidget>>();

export async function openTimeline(
  app: JupyterFrontEnd,
  kernelId: string,
  title: string
): Promise<void> {
  let reply: { profile: TimelineData };
  try {
    reply = await requestAPI<{ profile: TimelineData }>(
      `kernels/${encodeURIComponent(kernelId)}/profile`
    );
  } catch (error) {
    const e = error as { message?: string; hint?: string };
    await showErrorMessage('No profile to show', `${e.message ?? error}\n${e.hint ?? ''}`);
    return;
  }
  let widget = open.get(kernelId);
  if (!widget || widget.isDisposed) {
    widget = new MainAreaWidget({ content: new TimelineWidget() });
    widget.id = `harp-timeline-${kernelId}`;
    widget.title.icon = gpuIcon;
    widget.title.closable = true;
    widget.addClass('harp-TimelineView');
    open.set(kernelId, widget);
    app.shell.add(widget, 'main');
  }
  widget.title.label = `Profile: ${title}`;
  widget.content.setData(reply.profile);
  app.shell.activateById(widget.id);
}
