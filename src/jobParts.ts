/**
 * The parts a job is drawn with, in its handle and in the jobs panel alike: a
 * status badge, a clock and a Kill button. Their class names are what
 * style/base.css colours and the browser tests find.
 */
/** The job's status, coloured by it. */
export function statusBadge(status: string): HTMLSpanElement {
  const badge = document.createElement('span');
  badge.className = `jp-polycell-badge jp-polycell-status-${status}`;
  badge.textContent = status;
  return badge;
}

/** The elapsed time; its text is set again each second while the job runs. */
export function elapsedClock(text: string): HTMLSpanElement {
  const clock = document.createElement('span');
  clock.className = 'jp-polycell-elapsed';
  clock.textContent = text;
  return clock;
}

/** A Kill button: disabled while the kill is asked, usable again (and saying why) if it fails. */
export function killButton(job: number, kill: () => Promise<unknown>): HTMLButtonElement {
  const button = document.createElement('button');
  button.className = 'jp-polycell-kill jp-mod-styled jp-mod-warn';
  button.textContent = 'Kill';
  button.title = `Kill job ${job}`;
  button.onclick = event => {
    event.stopPropagation(); // in the jobs panel, a click on the job goes to its cell
    button.disabled = true;
    kill().catch((error: Error) => {
      button.disabled = false;
      button.title = `Kill failed: ${error.message}`;
    });
  };
  return button;
}
