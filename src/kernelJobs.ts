/**
 * The jobs of one kernel, as one page sees them, and their output put back
 * into their cells after a reload.
 *
 * A page learns of jobs from two sources: the kernel's `jobs` list (asked over
 * the control channel whenever the page connects to the kernel) and the iopub
 * messages it already receives (every job message carries `metadata.polycell`).
 * It asks only a kernel whose kernel_info says polycell is there, or that sent
 * a job message: a kernel without polycell gets no request.
 *
 * Reattaching: JupyterLab routes a kernel message to a cell by the request the
 * message answers, and only while that request's future lives in this page. A
 * job started before the page loaded (a reload, another tab) sends its output
 * for a request no future of this page knows, and JupyterLab drops it. So for
 * each job started from a cell of this notebook by a request this page did not
 * send, while that cell has run nothing since, the page rebuilds the cell: the
 * job's handle, its journal replayed up to a position, then its live messages
 * past that position (each message says where it starts in the journal), so
 * every output is there once, in order.
 */
import { ICodeCellModel } from '@jupyterlab/cells';
import { INotebookModel } from '@jupyterlab/notebook';
import { IOutputAreaModel } from '@jupyterlab/outputarea';
import { Kernel, KernelMessage } from '@jupyterlab/services';
import { ISignal, Signal } from '@lumino/signaling';

import {
  ENDED,
  HANDLE_MIME,
  IHandleData,
  IJobRow,
  IJobsReply,
  IRecord,
  ITailReply,
  kernelHasPolycell,
  liveMark,
  recordOutput,
  request,
  textAfter
} from './protocol';

/** What the page knows of one job; `elapsed` was true at `seenAt` (performance.now()). */
export interface IJob {
  id: number;
  name: string;
  mode: string;
  status: string;
  elapsed: number;
  seenAt: number;
  lastLine: string;
  cellId?: string;
}

/**
 * A change of one job (`job` null: of them all, as when the kernel restarts or
 * the page learns which kernel process it talks to); `ended` when this page saw
 * the job go from running to its end.
 */
export interface IJobChange {
  job: IJob | null;
  ended: boolean;
}

/** Execute requests sent from this page, by any of its kernel connections: their output comes natively. */
const sentFromThisPage = new Set<string>();

/** The elapsed seconds of a job now, ticking while it runs. */
export function elapsedNow(job: IJob): number {
  return ENDED.has(job.status) ? job.elapsed : job.elapsed + (performance.now() - job.seenAt) / 1000;
}

/** A cell whose output this page rebuilds and follows, and where the replay of each of its jobs ended. */
interface IFollowed {
  outputs: IOutputAreaModel;
  request: string;
  /** Per job: the journal position its replay reached (live output before it is already shown); undefined while replaying. */
  positions: Map<number, number | undefined>;
  /** Live messages that came while a job was being replayed. */
  waiting: KernelMessage.IIOPubMessage[];
  /** Output index of each display id the job showed, for its updates. */
  displays: Map<string, number[]>;
}

export class KernelJobs {
  constructor(readonly kernel: Kernel.IKernelConnection) {
    kernel.iopubMessage.connect(this._onIOPub, this);
    kernel.anyMessage.connect(this._onAnyMessage, this);
    kernel.statusChanged.connect(this._onStatus, this);
  }

  /** The kernel's jobs changed (a new job, a new status, a new line). */
  get changed(): ISignal<this, IJobChange> {
    return this._changed;
  }

  /** The kernel said it has polycell (kernel_info or a job message). */
  get active(): boolean {
    return this._active;
  }

  /** The kernel process the jobs belong to (see `IHandleData.kernel_process`), once known. */
  get kernelProcess(): string {
    return this._kernelProcess;
  }

  get jobs(): IJob[] {
    return [...this._jobs.values()].sort((a, b) => a.id - b.id);
  }

  job(id: number): IJob | undefined {
    return this._jobs.get(id);
  }

  /** The connection is gone (the notebook changed kernel, or closed): its handles go still. */
  dispose(): void {
    this._forget();
    Signal.clearData(this);
  }

  /** Kill a job; the reply's outcome ("killed", "kill requested", "already ended"). */
  async kill(id: number): Promise<string> {
    const reply = await request<{ outcome: string }>(this.kernel, { action: 'kill', job: id });
    return reply.outcome;
  }

  /**
   * Learn the kernel's jobs and put the output of this notebook's jobs back in
   * their cells. Called when the page connects to the kernel; does nothing on
   * a kernel without polycell. One sync runs at a time: a call meanwhile (the
   * page connects, then the session says so again) makes one more run after it.
   */
  sync(notebook: INotebookModel | null): Promise<void> {
    if (this._sync) {
      this._again = notebook;
      return this._sync;
    }
    this._sync = this._syncOnce(notebook).finally(() => {
      this._sync = null;
      if (this._again !== undefined) {
        const again = this._again;
        this._again = undefined;
        this.sync(again).catch(error => console.warn(`polycell: could not reattach jobs: ${error.message}`));
      }
    });
    return this._sync;
  }

  private async _syncOnce(notebook: INotebookModel | null): Promise<void> {
    if (!this._active) {
      this._active = await kernelHasPolycell(this.kernel);
      if (!this._active) {
        return;
      }
    }
    this._syncing = true;
    try {
      const reply = await request<IJobsReply>(this.kernel, { action: 'jobs' });
      this._kernelProcess = reply.kernel_process;
      for (const row of reply.jobs) {
        this._update(row.id, fromRow(row), false);
      }
      this._changed.emit({ job: null, ended: false }); // handles drawn before now may be live
      if (notebook) {
        await this._reattach(notebook, reply);
      }
    } finally {
      this._syncing = false;
      this._early = [];
    }
  }

  // -- reattaching ------------------------------------------------------------------

  private async _reattach(notebook: INotebookModel, reply: IJobsReply): Promise<void> {
    const byCell = new Map<string, IJobRow[]>();
    for (const row of reply.jobs) {
      const { cell_id: cellId, request: msgId } = row.info;
      if (
        !cellId ||
        !msgId ||
        reply.cells[cellId] !== msgId || // the cell ran something else since
        sentFromThisPage.has(msgId) || // JupyterLab routes its output already
        this._followed.has(msgId)
      ) {
        continue;
      }
      byCell.set(cellId, [...(byCell.get(cellId) ?? []), row]);
    }
    for (const [cellId, rows] of byCell) {
      const cell = findCodeCell(notebook, cellId);
      if (!cell || this._showsTheirEnd(cell.outputs, rows)) {
        continue; // deleted (or of another notebook on this kernel); or saved as it is now
      }
      const followed: IFollowed = {
        outputs: cell.outputs,
        request: rows[0].info.request!,
        positions: new Map(rows.map(row => [row.id, undefined])),
        waiting: [],
        displays: new Map()
      };
      this._followed.set(followed.request, followed);
      try {
        cell.outputs.clear();
        for (const row of rows) {
          followed.positions.set(row.id, await this._replay(followed, row.id));
        }
      } catch (error) {
        this._followed.delete(followed.request); // the next sync tries again
        throw error;
      }
      // What came live meanwhile, then everything after it as it comes.
      const early = [...this._early, ...followed.waiting].filter(
        msg => (msg.parent_header as any)?.msg_id === followed.request
      );
      followed.waiting = [];
      for (const msg of early) {
        this._live(followed, msg);
      }
    }
  }

  /**
   * Put a job's handle and journal into its cell; returns the position the journal reaches.
   *
   * Asked until a reply reaches the journal's end as it was then: the page
   * listened before it asked, so whatever the job writes after that comes live.
   */
  private async _replay(followed: IFollowed, job: number): Promise<number> {
    let position = 0;
    for (;;) {
      const tail = await request<ITailReply>(this.kernel, { action: 'tail', job, since: position });
      if (position === 0) {
        followed.outputs.add({ output_type: 'display_data', data: tail.handle, metadata: {} });
      }
      for (const record of tail.records) {
        this._apply(followed, record);
      }
      position = tail.position;
      if (tail.caught_up || tail.ended) {
        return position;
      }
    }
  }

  /** The cell already shows the end of each of these jobs (it was saved so): nothing to redo. */
  private _showsTheirEnd(outputs: IOutputAreaModel, rows: IJobRow[]): boolean {
    const ended = new Set<number>();
    for (let i = 0; i < outputs.length; i++) {
      const shown = outputs.get(i).data[HANDLE_MIME] as unknown as IHandleData | undefined;
      if (shown?.done && shown.kernel_process === this._kernelProcess) {
        ended.add(shown.job);
      }
    }
    return rows.every(row => ENDED.has(row.status) && ended.has(row.id));
  }

  /**
   * A live message for a followed cell: kept when it lies at or past the
   * position the replay of its job reached (live messages are never sent
   * twice, so that one position is the whole rule).
   */
  private _live(followed: IFollowed, msg: KernelMessage.IIOPubMessage): void {
    const mark = liveMark(msg);
    if (!mark) {
      return;
    }
    const content = msg.content as any;
    if (!followed.positions.has(mark.job)) {
      if (mark.handle && msg.header.msg_type === 'display_data') {
        // A job the same (still running) request started after the page asked: all of it is live.
        followed.positions.set(mark.job, 0);
        followed.outputs.add({ output_type: 'display_data', data: content.data, metadata: {} });
      }
      return;
    }
    const position = followed.positions.get(mark.job);
    if (position === undefined) {
      followed.waiting.push(msg); // still replaying this job
      return;
    }
    if (mark.handle) {
      this._replaceHandle(followed.outputs, content.data);
      if (ENDED.has(mark.status ?? '')) {
        followed.positions.delete(mark.job); // its last message: the end update comes after all output
        if (followed.positions.size === 0) {
          this._followed.delete(followed.request);
        }
      }
      return;
    }
    if (mark.pos === undefined) {
      return; // a line for terminals (the end of a job), not for a notebook
    }
    const type = msg.header.msg_type;
    if (type === 'stream') {
      const text = textAfter(content.text, mark.pos, position);
      if (text) {
        this._apply(followed, { msg_type: 'stream', content: { ...content, text } });
      }
    } else if (mark.pos >= position) {
      this._apply(followed, { msg_type: type, content });
    }
  }

  /** Put one record of a job into its cell, as JupyterLab's output area does with a message. */
  private _apply(followed: IFollowed, record: IRecord): void {
    const outputs = followed.outputs;
    const content = record.content as any;
    if (record.msg_type === 'clear_output') {
      outputs.clear(Boolean(content.wait));
      followed.displays.clear();
      return;
    }
    if (record.msg_type === 'update_display_data') {
      const id = content.transient?.display_id;
      for (const index of followed.displays.get(id) ?? []) {
        if (index < outputs.length) {
          outputs.set(index, { output_type: 'display_data', data: content.data, metadata: content.metadata ?? {} });
        }
      }
      return;
    }
    const output = recordOutput(record);
    if (!output) {
      return;
    }
    outputs.add(output);
    const id = content.transient?.display_id;
    if (id && output.output_type !== 'stream') {
      followed.displays.set(id, [...(followed.displays.get(id) ?? []), outputs.length - 1]);
    }
  }

  private _replaceHandle(outputs: IOutputAreaModel, data: any): void {
    const shown = data?.[HANDLE_MIME] as IHandleData | undefined;
    if (!shown) {
      return;
    }
    for (let i = 0; i < outputs.length; i++) {
      const old = outputs.get(i).data[HANDLE_MIME] as unknown as IHandleData | undefined;
      if (old && old.job === shown.job && old.kernel_process === shown.kernel_process) {
        outputs.set(i, { output_type: 'display_data', data, metadata: {} });
      }
    }
  }

  // -- the messages this page receives ---------------------------------------------------

  private _onAnyMessage(_: Kernel.IKernelConnection, args: Kernel.IAnyMessageArgs): void {
    if (args.direction === 'send' && args.msg.header.msg_type === 'execute_request') {
      sentFromThisPage.add(args.msg.header.msg_id);
    }
  }

  private _onIOPub(_: Kernel.IKernelConnection, msg: KernelMessage.IIOPubMessage): void {
    const mark = liveMark(msg);
    if (!mark) {
      return;
    }
    this._active = true;
    const content = msg.content as any;
    if (mark.handle) {
      const data = content.data?.[HANDLE_MIME] as IHandleData | undefined;
      if (data) {
        this._kernelProcess = data.kernel_process;
        const { name, mode, status, elapsed } = data;
        this._update(mark.job, { name, mode, status, elapsed, cellId: data.cell_id ?? undefined }, true);
      }
    } else if (msg.header.msg_type === 'stream') {
      const line = lastLine(content.text);
      if (line) {
        this._update(mark.job, { lastLine: line }, true);
      }
    }
    const parent = (msg.parent_header as any)?.msg_id as string | undefined;
    const followed = parent ? this._followed.get(parent) : undefined;
    if (followed) {
      this._live(followed, msg);
    } else if (this._syncing) {
      this._early.push(msg); // perhaps for a cell about to be reattached
    }
  }

  private _onStatus(_: Kernel.IKernelConnection, status: Kernel.Status): void {
    if (status === 'restarting' || status === 'autorestarting' || status === 'dead') {
      this._active = false; // the new process may not load polycell: ask again before anything
      this._forget(); // a new kernel process: its job ids start again at 1
    }
  }

  /** Forget every job of the kernel process (its handles go still). */
  private _forget(): void {
    this._jobs.clear();
    this._followed.clear();
    this._kernelProcess = '';
    this._changed.emit({ job: null, ended: false });
  }

  private _update(id: number, fields: Partial<IJob>, live: boolean): void {
    const old = this._jobs.get(id);
    const job: IJob = {
      id,
      name: '',
      mode: '',
      status: 'running',
      elapsed: 0,
      lastLine: '',
      ...old,
      ...fields,
      seenAt: fields.elapsed !== undefined ? performance.now() : (old?.seenAt ?? performance.now())
    };
    this._jobs.set(id, job);
    // Seen running, then ended (not a job that ended long ago, first heard of now).
    const ended = live && ENDED.has(job.status) && old !== undefined && !ENDED.has(old.status);
    this._changed.emit({ job, ended });
  }

  private _jobs = new Map<number, IJob>();
  private _followed = new Map<string, IFollowed>();
  private _early: KernelMessage.IIOPubMessage[] = [];
  private _syncing = false;
  private _sync: Promise<void> | null = null;
  /** A sync asked for while one ran (undefined: none). */
  private _again: INotebookModel | null | undefined = undefined;
  private _active = false;
  private _kernelProcess = '';
  private _changed = new Signal<this, IJobChange>(this);
}

function fromRow(row: IJobRow): Partial<IJob> {
  return {
    name: row.name,
    mode: row.mode,
    status: row.status,
    elapsed: row.elapsed,
    lastLine: row.last_output,
    cellId: row.info.cell_id
  };
}

function findCodeCell(notebook: INotebookModel, cellId: string): ICodeCellModel | undefined {
  for (const cell of notebook.cells) {
    if (cell.id === cellId) {
      return cell.type === 'code' ? (cell as ICodeCellModel) : undefined;
    }
  }
  return undefined;
}

/**
 * The last non-blank line of stream text; of a line a progress bar redraws, the
 * last drawing (as `polycell.journal.last_line` finds it for the kernel's job list).
 */
export function lastLine(text: string): string {
  const lines = text.split('\n');
  for (let i = lines.length - 1; i >= 0; i--) {
    const drawn = lines[i].replace(/\r+$/, '').split('\r').pop()!.trim();
    if (drawn) {
      return drawn;
    }
  }
  return '';
}
