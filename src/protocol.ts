/**
 * What the polycell kernel says, and how to ask it: the shapes of its
 * messages, the control-channel request (`polycell_request`, the one
 * `polycell tail` uses), and journal records turned into notebook outputs.
 *
 * See the kernel side in `polycell/control.py` (requests), `polycell/journal.py`
 * (records and their positions) and `polycell/iopub.py` (live messages).
 */
import type * as nbformat from '@jupyterlab/nbformat';
import { Kernel, KernelMessage } from '@jupyterlab/services';
import { JSONObject } from '@lumino/coreutils';

/** The job handle's own MIME type; its text/plain and text/html stay for other front ends. */
export const HANDLE_MIME = 'application/vnd.polycell.job+json';

/** The help link a kernel with polycell has in its kernel_info reply. */
export const HELP_LINK_TEXT = 'polycell';

/** How long a control request may take before it counts as unanswered. */
export const REQUEST_TIMEOUT_MS = 10_000;

/** A handle's data (`polycell.view.handle_data`). */
export interface IHandleData {
  job: number;
  name: string;
  mode: string;
  status: string;
  done: boolean;
  elapsed: number;
  /** The kernel process the job belongs to: job ids start again at 1 in every kernel. */
  kernel_process: string;
  /** The cell that started the job (the request's `metadata.cellId`), if a notebook did. */
  cell_id?: string | null;
}

/** One row of the `jobs` reply (`polycell.view.job_row`). */
export interface IJobRow {
  id: number;
  name: string;
  mode: string;
  status: string;
  elapsed: number;
  last_output: string;
  where: string;
  info: { cell_id?: string; request?: string; [key: string]: unknown };
}

export interface IJobsReply {
  kernel_process: string;
  jobs: IJobRow[];
  /** The msg_id of the last request each cell ran, for the cells with jobs. */
  cells: { [cellId: string]: string };
}

/** A journal record: an iopub message without its envelope. */
export interface IRecord {
  msg_type: string;
  content: JSONObject;
}

export interface ITailReply {
  /** The job's handle as a display's data (text, HTML and `HANDLE_MIME`). */
  handle: JSONObject;
  records: IRecord[];
  position: number;
  /** The position is the journal's end as it was when the kernel answered. */
  caught_up: boolean;
  ended: boolean;
  job: IJobRow;
}

/** The `metadata.polycell` of a job's live message. */
export interface ILiveMark {
  job: number;
  /** The journal position of the message's first unit; absent for the handle's updates. */
  pos?: number;
  handle?: boolean;
  status?: string;
}

export const ENDED = new Set(['done', 'failed', 'killed']);

/** A one-line failure of a polycell request. */
export class PolycellError extends Error {}

/**
 * Send one `polycell_request` on the control channel and return the reply content.
 *
 * The control channel is answered by a thread of its own in the kernel, so this
 * works while a foreground cell keeps the kernel busy.
 */
export async function request<T>(
  kernel: Kernel.IKernelConnection,
  content: JSONObject
): Promise<T> {
  const answer = await controlRequest(kernel, 'polycell_request', content);
  if (answer.status !== 'ok') {
    throw new PolycellError(String(answer.evalue ?? 'the kernel refused the request'));
  }
  return answer as T;
}

/**
 * Whether the kernel has polycell, from its kernel_info: the one JupyterLab asked
 * for when it connected, or the one asked here on the control channel, whichever
 * comes first (the first waits while a foreground cell keeps the kernel busy).
 */
export async function kernelHasPolycell(kernel: Kernel.IKernelConnection): Promise<boolean> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const late = new Promise<undefined>(resolve => (timer = setTimeout(resolve, INFO_WAIT_MS)));
  let info = await Promise.race([kernel.info.catch(() => undefined), late]);
  clearTimeout(timer);
  if (info === undefined) {
    const asked = controlRequest(kernel, 'kernel_info_request', {}) as Promise<KernelMessage.IInfoReply>;
    info = await new Promise<KernelMessage.IInfoReply | undefined>(resolve => {
      let failed = 0; // the slower one may fail or time out: nothing to say
      for (const reply of [kernel.info, asked]) {
        reply.then(resolve, () => ++failed === 2 && resolve(undefined));
      }
    });
  }
  return hasPolycell(info);
}

/** How long to wait for JupyterLab's own kernel_info before asking on the control channel. */
const INFO_WAIT_MS = 1000;

/** The content of the reply to one control-channel request. */
async function controlRequest(kernel: Kernel.IKernelConnection, msgType: string, content: JSONObject): Promise<any> {
  // polycell_request is not a message type @jupyterlab/services knows, so not one its types allow.
  const msg = KernelMessage.createMessage({
    msgType,
    channel: 'control',
    session: kernel.clientId,
    username: kernel.username,
    content
  } as any) as unknown as KernelMessage.IControlMessage;
  const future = kernel.sendControlMessage(msg as any, true, true);
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(
      () => reject(new PolycellError(`no answer from the kernel within ${REQUEST_TIMEOUT_MS / 1000}s`)),
      REQUEST_TIMEOUT_MS
    );
  });
  try {
    const reply = (await Promise.race([future.done, timeout])) as KernelMessage.IMessage;
    return reply.content;
  } finally {
    clearTimeout(timer);
    if (!future.isDisposed) {
      future.dispose();
    }
  }
}

/** Whether a kernel_info reply says polycell is loaded in the kernel. */
export function hasPolycell(info: KernelMessage.IInfoReply | undefined): boolean {
  return (info?.help_links ?? []).some(link => link.text === HELP_LINK_TEXT);
}

/** The polycell mark of a live iopub message, if it is a job's. */
export function liveMark(msg: KernelMessage.IMessage): ILiveMark | null {
  const mark = (msg.metadata as any)?.polycell;
  return mark && typeof mark.job === 'number' ? (mark as ILiveMark) : null;
}

/**
 * The part of stream text at `pos` that lies at or after `position`.
 *
 * Positions count characters as Python does (code points), so text that
 * straddles `position` is cut by code points, not UTF-16 units.
 */
export function textAfter(text: string, pos: number, position: number): string {
  if (pos >= position) {
    return text;
  }
  if (pos + text.length <= position) {
    return ''; // a code point is at least one UTF-16 unit: all of it is before
  }
  return Array.from(text)
    .slice(position - pos)
    .join('');
}

/** A record as a notebook output, or null for what is not an output (update, clear). */
export function recordOutput(record: IRecord): nbformat.IOutput | null {
  const c = record.content as any;
  switch (record.msg_type) {
    case 'stream':
      return { output_type: 'stream', name: c.name, text: c.text };
    case 'display_data':
      return { output_type: 'display_data', data: c.data, metadata: c.metadata ?? {} };
    case 'execute_result':
      return {
        output_type: 'execute_result',
        data: c.data,
        metadata: c.metadata ?? {},
        execution_count: c.execution_count ?? null
      };
    case 'error':
      return { output_type: 'error', ename: c.ename, evalue: c.evalue, traceback: c.traceback };
    default:
      return null;
  }
}

/** Elapsed seconds as polycell writes them everywhere (`polycell.view.format_elapsed`): 4.2s, 3m05s, 2h01m. */
export function formatElapsed(seconds: number): string {
  if (seconds < 60) {
    return `${seconds.toFixed(1)}s`;
  }
  const whole = Math.floor(seconds);
  const minutes = Math.floor(whole / 60);
  if (minutes < 60) {
    return `${minutes}m${String(whole % 60).padStart(2, '0')}s`;
  }
  return `${Math.floor(minutes / 60)}h${String(minutes % 60).padStart(2, '0')}m`;
}
