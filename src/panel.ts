/**
 * The jobs panel, in the left sidebar: every job of the kernels of the open
 * notebooks (id, name, mode, status, elapsed, last line), live from the
 * messages the page already receives, with Kill, and a click that goes to the
 * job's cell. Nothing here polls the kernel: the clock ticks in the page.
 */
import { NotebookPanel } from '@jupyterlab/notebook';
import { listIcon } from '@jupyterlab/ui-components';
import { Widget } from '@lumino/widgets';

import { elapsedClock, killButton, statusBadge } from './jobParts';
import { IJob, KernelJobs, elapsedNow } from './kernelJobs';
import { ENDED, formatElapsed } from './protocol';

/** One notebook and the jobs of its kernel. */
export interface IJobSource {
  panel: NotebookPanel;
  jobs: KernelJobs;
}

export class JobsPanel extends Widget {
  constructor(
    private readonly _sources: () => IJobSource[],
    private readonly _goToCell: (panel: NotebookPanel, cellId: string) => void
  ) {
    super();
    this.id = 'polycell-jobs';
    this.addClass('jp-polycell-jobs');
    this.title.icon = listIcon;
    this.title.caption = 'Background jobs (polycell)';
    this.title.label = '';
  }

  /**
   * Draw again soon (a job changed), when the panel is visible: the changes of
   * a quarter of a second (a job printing a flood of lines) make one drawing.
   */
  refresh(): void {
    if (this.isVisible && this._pending === undefined) {
      this._pending = setTimeout(() => {
        this._pending = undefined;
        if (this.isVisible) {
          this._render();
        }
      }, 250);
    }
  }

  protected onAfterShow(): void {
    this._render();
    this._ticker = setInterval(() => this._tick(), 1000);
  }

  protected onAfterHide(): void {
    clearInterval(this._ticker);
    this._ticker = undefined;
  }

  dispose(): void {
    clearInterval(this._ticker);
    clearTimeout(this._pending);
    super.dispose();
  }

  private _render(): void {
    this.node.replaceChildren();
    this._clocks = [];
    const heading = document.createElement('h2');
    heading.textContent = 'Jobs';
    this.node.append(heading);
    let any = false;
    for (const { panel, jobs } of this._sources()) {
      if (!jobs.active || jobs.jobs.length === 0) {
        continue;
      }
      any = true;
      const title = document.createElement('h3');
      title.textContent = panel.title.label;
      const list = document.createElement('ul');
      list.className = 'jp-polycell-jobs-list';
      for (const job of jobs.jobs) {
        list.append(this._item(panel, jobs, job));
      }
      this.node.append(title, list);
    }
    if (!any) {
      const empty = document.createElement('p');
      empty.className = 'jp-polycell-jobs-empty';
      empty.textContent = 'No jobs yet: run a cell with %%bg in a notebook.';
      this.node.append(empty);
    }
  }

  /** One job: id, name, mode, status, elapsed and Kill on a line, its last output under it. */
  private _item(panel: NotebookPanel, jobs: KernelJobs, job: IJob): HTMLLIElement {
    const item = document.createElement('li');
    item.className = 'jp-polycell-job';
    item.dataset.job = String(job.id);
    item.dataset.status = job.status;
    const head = document.createElement('div');
    head.className = 'jp-polycell-job-head';
    const id = document.createElement('b');
    id.textContent = String(job.id);
    const name = document.createElement('i');
    name.textContent = job.name;
    const mode = document.createElement('span');
    mode.className = 'jp-polycell-job-mode';
    mode.textContent = job.mode;
    const clock = elapsedClock(formatElapsed(elapsedNow(job)));
    head.append(id, name, mode, statusBadge(job.status), clock);
    if (!ENDED.has(job.status)) {
      this._clocks.push([clock, job]);
      if (job.status !== 'killing') {
        head.append(killButton(job.id, () => jobs.kill(job.id)));
      }
    }
    const last = document.createElement('div');
    last.className = 'jp-polycell-last-line';
    last.textContent = job.lastLine;
    last.title = job.lastLine;
    item.append(head, last);
    if (job.cellId) {
      item.classList.add('jp-polycell-jumps');
      item.title = 'Go to the cell that started this job';
      item.onclick = () => this._goToCell(panel, job.cellId!);
    }
    return item;
  }

  private _tick(): void {
    for (const [clock, job] of this._clocks) {
      clock.textContent = formatElapsed(elapsedNow(job));
    }
  }

  private _clocks: Array<[HTMLElement, IJob]> = [];
  private _ticker: ReturnType<typeof setInterval> | undefined;
  private _pending: ReturnType<typeof setTimeout> | undefined;
}
