/**
 * The job handle, rendered live: job id and name, mode, a status badge, the
 * elapsed time ticking while the job runs, and a Kill button.
 *
 * The handle's data says which kernel process the job is of (`kernel_process`): a
 * handle saved in a notebook from an earlier kernel shows what it last said,
 * and offers no Kill.
 */
import { IRenderMime } from '@jupyterlab/rendermime-interfaces';
import { Widget } from '@lumino/widgets';

import { elapsedClock, killButton, statusBadge } from './jobParts';
import { IJob, IJobChange, KernelJobs, elapsedNow } from './kernelJobs';
import { ENDED, HANDLE_MIME, IHandleData, formatElapsed } from './protocol';

/** Finds the jobs of the kernel of the notebook a node is in. */
export type JobsLocator = (node: HTMLElement) => KernelJobs | undefined;

export class HandleWidget extends Widget implements IRenderMime.IRenderer {
  constructor(private readonly _locate: JobsLocator) {
    super();
    this.addClass('jp-polycell-handle');
  }

  async renderModel(model: IRenderMime.IMimeModel): Promise<void> {
    this._data = model.data[HANDLE_MIME] as unknown as IHandleData;
    this._connect();
    this._render();
  }

  protected onAfterAttach(): void {
    this._connect(); // rendered before it was in a notebook: find its kernel now
    this._render();
  }

  protected onBeforeDetach(): void {
    this._stopTicking();
  }

  dispose(): void {
    this._stopTicking();
    this._jobs?.changed.disconnect(this._onChanged, this);
    super.dispose();
  }

  /** The live job, when this handle is of a job of the kernel the notebook talks to. */
  private get _live(): IJob | undefined {
    const jobs = this._jobs;
    if (!jobs || !this._data || jobs.kernelProcess !== this._data.kernel_process) {
      return undefined;
    }
    return jobs.job(this._data.job);
  }

  private _connect(): void {
    if ((this._jobs && !this._jobs.kernel.isDisposed) || !this.node.isConnected) {
      return;
    }
    this._jobs?.changed.disconnect(this._onChanged, this);
    this._jobs = this._locate(this.node);
    this._jobs?.changed.connect(this._onChanged, this);
  }

  private _onChanged(_: KernelJobs, change: IJobChange): void {
    // Redrawn when its status or liveness changes, not for each line the job prints.
    if (this._data && (change.job === null || change.job.id === this._data.job)) {
      const live = this._live;
      if (this.node.dataset.status !== (live?.status ?? this._data.status) || this._drawnLive !== !!live) {
        this._render();
      }
    }
  }

  private _render(): void {
    const data = this._data;
    if (!data) {
      return;
    }
    this._connect(); // a handle drawn before its notebook had a kernel finds it now
    const live = this._live;
    this._drawnLive = !!live;
    const status = live?.status ?? data.status;
    const elapsed = live ? elapsedNow(live) : data.elapsed;
    const running = !ENDED.has(status);
    this.node.dataset.job = String(data.job);
    this.node.dataset.status = status;
    this.node.replaceChildren();
    const label = document.createElement('span');
    label.className = 'jp-polycell-handle-label';
    label.append('⧉ job ');
    const id = document.createElement('b');
    id.textContent = String(data.job);
    const name = document.createElement('i');
    name.textContent = data.name;
    label.append(id, ' ', name, ` (${data.mode})`);
    const clock = elapsedClock(running ? formatElapsed(elapsed) : `after ${formatElapsed(elapsed)}`);
    this._clock = clock;
    this.node.append(label, statusBadge(status), clock);
    const jobs = this._jobs;
    if (jobs && live && running && status !== 'killing') {
      this.node.append(killButton(data.job, () => jobs.kill(data.job))); // its next update says how it went
    }
    if (live && running) {
      this._startTicking();
    } else {
      this._stopTicking();
    }
  }

  /** Once a second while the job runs: only the clock changes (the Kill button stays put). */
  private _tick(): void {
    const live = this._live;
    if (live && this._clock) {
      this._clock.textContent = formatElapsed(elapsedNow(live));
    }
  }

  private _startTicking(): void {
    if (this._ticker === undefined && this.isAttached) {
      this._ticker = setInterval(() => this._tick(), 1000);
    }
  }

  private _stopTicking(): void {
    if (this._ticker !== undefined) {
      clearInterval(this._ticker);
      this._ticker = undefined;
    }
  }

  private _data: IHandleData | undefined;
  private _drawnLive = false;
  private _clock: HTMLElement | undefined;
  private _jobs: KernelJobs | undefined;
  private _ticker: ReturnType<typeof setInterval> | undefined;
}

/** The renderer factory, registered on the app's rendermime registry by the plugin. */
export function handleRendererFactory(locate: JobsLocator): IRenderMime.IRendererFactory {
  return {
    safe: true,
    mimeTypes: [HANDLE_MIME],
    defaultRank: 10, // ahead of text/html (50): the handle is live where this extension is
    createRenderer: () => new HandleWidget(locate)
  };
}
