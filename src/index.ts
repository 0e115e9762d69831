/**
 * polycell in JupyterLab and Notebook 7: a job's output back in its own cell
 * after a reload, a live job handle with Kill, a jobs panel, and a
 * notification when a long job ends.
 *
 * The kernel side is in the Python package (`polycell/control.py` answers the
 * requests, `polycell/iopub.py` marks the messages); see docs/architecture.md.
 */
import { ILabShell, JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { ICommandPalette, Notification } from '@jupyterlab/apputils';
import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { IRenderMimeRegistry } from '@jupyterlab/rendermime';
import { Kernel } from '@jupyterlab/services';
import { ISettingRegistry } from '@jupyterlab/settingregistry';

import { handleRendererFactory } from './handle';
import { IJobChange, KernelJobs } from './kernelJobs';
import { IJobSource, JobsPanel } from './panel';
import { formatElapsed } from './protocol';

const PLUGIN_ID = 'polycell:plugin';
const SHOW_JOBS = 'polycell:show-jobs';

const plugin: JupyterFrontEndPlugin<void> = {
  id: PLUGIN_ID,
  description: 'Background cells (%%bg): output back in its cell after a reload, live handles, a jobs panel.',
  autoStart: true,
  requires: [INotebookTracker, IRenderMimeRegistry],
  optional: [ISettingRegistry, ICommandPalette, ILabShell],
  activate: (
    app: JupyterFrontEnd,
    tracker: INotebookTracker,
    rendermime: IRenderMimeRegistry,
    settings: ISettingRegistry | null,
    palette: ICommandPalette | null
  ): void => {
    const byKernel = new Map<Kernel.IKernelConnection, KernelJobs>();
    const notified = new Set<string>();
    let notifyAfterSeconds = 10;

    const panelOf = (jobs: KernelJobs): NotebookPanel | undefined =>
      tracker.find(panel => panel.sessionContext.session?.kernel === jobs.kernel) ?? undefined;

    const sources = (): IJobSource[] => {
      const out: IJobSource[] = [];
      tracker.forEach(panel => {
        const kernel = panel.sessionContext.session?.kernel;
        const jobs = kernel ? byKernel.get(kernel) : undefined;
        if (jobs) {
          out.push({ panel, jobs });
        }
      });
      return out;
    };

    const goToCell = (panel: NotebookPanel, cellId: string): void => {
      const index = panel.content.widgets.findIndex(cell => cell.model.id === cellId);
      if (index < 0) {
        return;
      }
      app.shell.activateById(panel.id);
      panel.content.activeCellIndex = index;
      void panel.content.scrollToItem(index, 'center');
    };

    const jobsPanel = new JobsPanel(sources, goToCell);
    app.shell.add(jobsPanel, 'left', { rank: 650 });

    const onChanged = (jobs: KernelJobs, change: IJobChange): void => {
      jobsPanel.refresh();
      const { job, ended } = change;
      if (!job || !ended || job.elapsed < notifyAfterSeconds) {
        return;
      }
      // Once per job, though every notebook on its kernel has a connection that saw it end.
      const key = `${jobs.kernel.id}/${jobs.kernelProcess}/${job.id}`;
      if (notified.has(key)) {
        return;
      }
      notified.add(key);
      const text = `job ${job.id} '${job.name}' ${job.status} after ${formatElapsed(job.elapsed)}`;
      const type = job.status === 'done' ? 'success' : job.status === 'failed' ? 'error' : 'warning';
      const panel = panelOf(jobs);
      const actions =
        panel && job.cellId
          ? [{ label: 'Go to cell', callback: () => goToCell(panel, job.cellId!) }]
          : [];
      Notification.emit(text, type, { autoClose: 10_000, actions });
    };

    const jobsFor = (kernel: Kernel.IKernelConnection): KernelJobs => {
      let jobs = byKernel.get(kernel);
      if (!jobs) {
        jobs = new KernelJobs(kernel);
        jobs.changed.connect(onChanged);
        byKernel.set(kernel, jobs);
        kernel.disposed.connect(() => {
          byKernel.get(kernel)?.dispose();
          byKernel.delete(kernel);
          jobsPanel.refresh();
        });
      }
      return jobs;
    };

    const sync = async (panel: NotebookPanel): Promise<void> => {
      await panel.context.ready;
      const kernel = panel.sessionContext.session?.kernel;
      if (!kernel || panel.isDisposed) {
        return;
      }
      try {
        await jobsFor(kernel).sync(panel.content.model);
      } catch (error) {
        console.warn(`polycell: could not reattach the jobs of ${panel.title.label}: ${(error as Error).message}`);
      }
      jobsPanel.refresh();
    };

    tracker.widgetAdded.connect((_, panel) => {
      const context = panel.sessionContext;
      // Whenever the page connects to a kernel: load, reload, kernel change, reconnect.
      void context.ready.then(() => sync(panel));
      context.kernelChanged.connect(() => void sync(panel));
      context.connectionStatusChanged.connect((_, status) => {
        if (status === 'connected') {
          void sync(panel);
        }
      });
      panel.disposed.connect(() => jobsPanel.refresh());
    });

    rendermime.addFactory(
      handleRendererFactory(node => {
        const panel = tracker.find(candidate => candidate.node.contains(node));
        const kernel = panel?.sessionContext.session?.kernel;
        return kernel ? jobsFor(kernel) : undefined;
      })
    );

    app.commands.addCommand(SHOW_JOBS, {
      label: 'Show Background Jobs',
      caption: 'The jobs of the kernels of the open notebooks (polycell)',
      execute: () => app.shell.activateById(jobsPanel.id)
    });
    palette?.addItem({ command: SHOW_JOBS, category: 'Kernel' });

    if (settings) {
      void settings.load(PLUGIN_ID).then(loaded => {
        const read = (): void => {
          notifyAfterSeconds = loaded.get('notifyAfterSeconds').composite as number;
        };
        read();
        loaded.changed.connect(read);
      });
    }
  }
};

export default plugin;
