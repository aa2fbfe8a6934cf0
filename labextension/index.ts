/**
 * The plugins: the Elastic GPU model and sidebar (with its commands and settings), and the status
 * bar item for the current notebook's kernel.
 */
import {
  ILabShell,
  ILayoutRestorer,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { Dialog, ICommandPalette, ISessionContext, showDialog } from '@jupyterlab/apputils';
import { ISettingRegistry } from '@jupyterlab/settingregistry';
import { IStatusBar } from '@jupyterlab/statusbar';
import type { Widget } from '@lumino/widgets';

import {
  DEFAULT_PANEL_SETTINGS,
  ElasticGPUPanel,
  IPanelSettings
} from './components/ElasticGPUPanel';
import { ElasticGPUStatus } from './components/StatusItem';
import { formatBytes, kernelTitle } from './format';
import { gpuIcon } from './icons';
import { ElasticGPUModel } from './model';
import { ServerLeaseAPI } from './requests';
import { openTimeline } from './timeline/view';
import {
  CommandIDs,
  IElasticGPUModel,
  IKernelLease,
  PANEL_ID,
  PLUGIN_ID,
  STATUS_PLUGIN_ID
} from './tokens';

/** The session context of a notebook or console widget, or null for other widgets. */
function sessionContextOf(widget: Widget | null): ISessionContext | null {
  const candidate = (widget as { sessionContext?: unknown } | null)?.sessionContext;
  if (typeof candidate === 'object' && candidate !== null && 'kernelChanged' in candidate) {
    return candidate as ISessionContext;
  }
  return null;
}

function currentKernelId(app: JupyterFrontEnd): string | null {
  return sessionContextOf(app.shell.currentWidget)?.session?.kernel?.id ?? null;
}

function panelSettings(settings: ISettingRegistry.ISettings): IPanelSettings {
  const composite = settings.composite as Partial<Record<keyof IPanelSettings | string, unknown>>;
  const interval = composite.refreshInterval;
  return {
    refreshIntervalSeconds:
      typeof interval === 'number' && interval > 0
        ? interval
        : DEFAULT_PANEL_SETTINGS.refreshIntervalSeconds,
    showEmulatedAgents: composite.showEmulatedAgents !== false,
    confirmRelease: composite.confirmRelease === true
  };
}

async function confirmRelease(kernel: IKernelLease): Promise<boolean> {
  const parked =
    kernel.memory_used !== null && kernel.memory_used > 0
      ? ` Its ${formatBytes(kernel.memory_used)} of device memory, with what recreates its ` +
        'session, is parked on the agent'
      : ' Its device memory, with what recreates its session, is parked on the agent';
  const result = await showDialog({
    title: 'Release the GPU?',
    body:
      `${kernelTitle(kernel)} gives its GPU back to the pool.${parked} ` +
      'and restored at its next GPU cell, possibly on another GPU.',
    buttons: [Dialog.cancelButton(), Dialog.warnButton({ label: 'Release' })]
  });
  return result.button.accept;
}

const modelPlugin: JupyterFrontEndPlugin<IElasticGPUModel> = {
  id: PLUGIN_ID,
  description: 'The Elastic GPU sidebar: which kernels hold which GPU, live, with Lease / Release.',
  autoStart: true,
  provides: IElasticGPUModel,
  optional: [ISettingRegistry, ILayoutRestorer, ICommandPalette],
  activate: (
    app: JupyterFrontEnd,
    settingRegistry: ISettingRegistry | null,
    restorer: ILayoutRestorer | null,
    palette: ICommandPalette | null
  ): IElasticGPUModel => {
    const model = new ElasticGPUModel({ api: new ServerLeaseAPI(app.serviceManager.serverSettings) });

    const panel = new ElasticGPUPanel({
      model,
      confirmRelease,
      openKernel: kernel => {
        if (kernel.path) {
          void app.commands.execute('docmanager:open', { path: kernel.path });
        }
      },
      openTimeline: kernel =>
        void app.commands.execute(CommandIDs.openTimeline, {
          kernelId: kernel.kernel_id,
          title: kernelTitle(kernel)
        }),
      currentKernelId: () => currentKernelId(app)
    });
    panel.id = PANEL_ID;
    panel.title.icon = gpuIcon;
    panel.title.caption = 'Elastic GPU';
    app.shell.add(panel, 'left', { rank: 650 });
    restorer?.add(panel, 'harp-elastic-gpu');
    // the card of the current notebook is highlighted
    app.shell.currentChanged?.connect(() => panel.update());

    app.serviceManager.events.stream.connect((_, emission) => {
      model.handleEvent(emission);
    });
    app.serviceManager.kernels.runningChanged.connect((_, running) => {
      model.noteRunningKernels(running.map(kernel => kernel.id));
    });

    const kernelIdArg = (args: Record<string, unknown>): string | null =>
      typeof args.kernelId === 'string' ? args.kernelId : currentKernelId(app);

    app.commands.addCommand(CommandIDs.openPanel, {
      label: 'Show the Elastic GPU Sidebar',
      icon: gpuIcon,
      execute: () => app.shell.activateById(PANEL_ID)
    });
    app.commands.addCommand(CommandIDs.openTimeline, {
      label: 'Open the latest %%harp profile of a kernel',
      execute: args =>
        openTimeline(app, String(args.kernelId ?? ''), String(args.title ?? 'kernel'))
    });
    app.commands.addCommand(CommandIDs.refresh, {
      label: 'Refresh the Elastic GPU Sidebar',
      execute: () => model.refresh()
    });
    app.commands.addCommand(CommandIDs.leaseKernel, {
      label: 'Lease a GPU for the Current Kernel',
      isEnabled: args => {
        const kernel = model.kernel(kernelIdArg(args));
        return kernel !== null && model.actionFor(kernel).action === 'lease';
      },
      execute: args => {
        const kernelId = kernelIdArg(args);
        return kernelId ? model.lease(kernelId) : false;
      }
    });
    app.commands.addCommand(CommandIDs.releaseKernel, {
      label: 'Release the Current Kernel’s GPU',
      isEnabled: args => {
        const kernel = model.kernel(kernelIdArg(args));
        return kernel !== null && model.actionFor(kernel).action === 'release';
      },
      execute: args => {
        const kernelId = kernelIdArg(args);
        return kernelId ? model.release(kernelId) : false;
      }
    });
    if (palette) {
      const category = 'Elastic GPU';
      for (const command of Object.values(CommandIDs)) {
        palette.addItem({ command, category });
      }
    }

    if (settingRegistry) {
      settingRegistry
        .load(PLUGIN_ID)
        .then(settings => {
          const apply = (): void => {
            panel.settings = panelSettings(settings);
          };
          apply();
          settings.changed.connect(apply);
        })
        .catch(reason => {
          console.error('harp-jupyter: could not load settings, using defaults.', reason);
        });
    }

    void model.refresh();
    return model;
  }
};

const statusPlugin: JupyterFrontEndPlugin<void> = {
  id: STATUS_PLUGIN_ID,
  description: 'Status bar item: the current notebook’s Elastic GPU lease and time held.',
  autoStart: true,
  requires: [IElasticGPUModel],
  optional: [IStatusBar, ILabShell, ISettingRegistry],
  activate: (
    app: JupyterFrontEnd,
    model: IElasticGPUModel,
    statusBar: IStatusBar | null,
    labShell: ILabShell | null,
    settingRegistry: ISettingRegistry | null
  ): void => {
    if (!statusBar) {
      return;
    }
    const item = new ElasticGPUStatus(model, () => {
      void app.commands.execute(CommandIDs.openPanel);
    });
    statusBar.registerStatusItem(STATUS_PLUGIN_ID, {
      item,
      align: 'left',
      rank: 5,
      isActive: () => item.isActive,
      activeStateChanged: item.activeStateChanged
    });
    const follow = (): void => {
      item.sessionContext = sessionContextOf(app.shell.currentWidget);
    };
    (labShell ?? app.shell).currentChanged?.connect(follow);
    follow();

    settingRegistry
      ?.load(PLUGIN_ID)
      .then(settings => {
        const apply = (): void => {
          item.enabled = settings.composite.showStatusItem !== false;
        };
        apply();
        settings.changed.connect(apply);
      })
      .catch(() => undefined);
  }
};

export default [modelPlugin, statusPlugin];
