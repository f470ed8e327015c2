// One job: its state timeline, parameters, endpoints, results and live console.
import { ApiError, enc, get, post } from "../api.js";
import { append, clear, duration, h, stateBadge, table, time } from "../dom.js";
import { JobLogs } from "../logs.js";
import { openTerminal } from "../terminal.js";
import { FitAddon } from "../vendor/xterm/addon-fit.mjs";
import { Terminal } from "../vendor/xterm/xterm.mjs";

export const name = "job";

const SCROLLBACK = 10000; // lines the terminal keeps: bounded memory on an endless console
const REFRESH_MS = 5000; // re-reading a queued job (its state_message) or a held host's end

// A failed job's host is held until `held_until`; once that passed (or the hold was
// released) the host's supervisor lets it go and `held_until` becomes null.
function holding(j) {
  return Boolean(j.held_until) && new Date(j.held_until) > Date.now();
}

function secondsBetween(a, b) {
  return (new Date(b) - new Date(a)) / 1000;
}

export async function render(main, app, id) {
  const [job, held] = await Promise.all([
    get(`/api/v1/jobs/${enc(id)}`),
    get(`/console/privileges/job/${enc(id)}`).then((r) => r.privileges, () => []),
  ]);
  const abort = new AbortController();
  let events = [];
  let source = null;
  let term = null;
  let current = job;

  const summary = h("div", { class: "grid2", id: "job-summary" });
  const timeline = h("tbody", {});
  const actions = h("div", { class: "row", id: "job-actions" });
  main.append(
    h("h1", {}, "Job ", h("span", { class: "mono", id: "job-id" }, job.id)),
    actions, h("h2", {}, "Summary"), summary,
    h("h2", {}, "Timeline"),
    h("table", { id: "timeline" }, h("thead", {}, h("tr", {},
      ["At", "State", "Stage", "Duration", "Reason", "Message"].map((t) => h("th", {}, t)))), timeline));

  function renderSummary(j) {
    append(clear(summary), [
      h("span", { class: "muted" }, "Label"), h("span", { id: "job-label" }, j.label || ""),
      h("span", { class: "muted" }, "State"), h("span", { id: "job-state" }, stateBadge(j.state), " ", j.stage || ""),
      h("span", { class: "muted" }, "Owner"), h("span", {}, j.owner),
      h("span", { class: "muted" }, "Image"), h("span", { class: "mono" }, j.image?.name || "", " ", j.image?.digest || ""),
      h("span", { class: "muted" }, "Tags"), h("span", {}, (j.tags || []).join(", ")),
      h("span", { class: "muted" }, "Host"), h("span", { id: "job-host" }, j.host || ""),
      h("span", { class: "muted" }, "Timeout"), h("span", {}, duration(j.timeout)),
      h("span", { class: "muted" }, "Restarts left"), h("span", {}, `${j.restarts_left ?? ""} of ${j.max_restarts}`),
      h("span", { class: "muted" }, "Created"), h("span", {}, time(j.created_at)),
      j.deadline ? [h("span", { class: "muted" }, j.reservation ? "Reserved until" : "Deadline"),
        h("span", { id: "job-deadline" }, time(j.deadline))] : null,
      j.hold_on_failure ? [h("span", { class: "muted" }, "Hold on failure"),
        h("span", { id: "job-hold" }, duration(j.hold_on_failure))] : null,
      j.health_check ? [h("span", { class: "muted" }, "Health check"),
        h("span", {}, "this job checks its host's health")] : null,
      j.state_message ? [h("span", { class: "muted" }, "Waiting"),
        h("span", { id: "job-message", class: "bad" }, j.state_message)] : null,
      j.held_until ? [h("span", { class: "muted" }, "Host held"),
        h("span", { id: "job-held", class: "bad" }, holding(j)
          ? [`${j.host || "its host"} is held for debugging until `, time(j.held_until),
            held.includes("stop") ? " (Release host ends the hold)" : ""]
          : `${j.host || "its host"} is being released`)] : null,
      j.termination ? [h("span", { class: "muted" }, "Termination"),
        h("span", { id: "job-termination" }, j.termination.reason || "",
          j.termination.exit_status !== null && j.termination.exit_status !== undefined
            ? ` (exit ${j.termination.exit_status})` : "",
          j.termination.message ? `: ${j.termination.message}` : "")] : null]);
    renderActions(j);
  }

  function renderActions(j) {
    current = j;
    clear(actions);
    const live = j.state !== "terminated" && j.state !== "terminating";
    if (j.state === "terminated" && holding(j) && held.includes("stop")) {
      actions.append(h("button", { class: "danger", id: "release", onclick: async () => {
        if (!confirm(`Release ${j.host || "the host"}? Whatever the job left on it goes.`)) return;
        try { renderSummary(await post(`/api/v1/jobs/${enc(j.id)}/terminate`)); } catch (e) { app.fail(e); }
      } }, "Release host"));
    }
    if (live && held.includes("stop")) {
      actions.append(h("button", { class: "danger", id: "cancel", onclick: async () => {
        if (!confirm("Cancel this job?")) return;
        try { renderSummary(await post(`/api/v1/jobs/${enc(j.id)}/terminate`)); } catch (e) { app.fail(e); }
      } }, "Cancel job"));
    }
    // A snapshot copies the disk an ended job left on its host (docs/api.md, snapshots).
    if (j.state === "terminated" && j.host && held.includes("manage")) {
      actions.append(h("button", { id: "snapshot", onclick: async () => {
        const nameOf = prompt("Name of the snapshot image (e.g. you/my-image):");
        if (!nameOf) return;
        try {
          await post(`/api/v1/jobs/${enc(j.id)}/snapshots`, { name: nameOf });
          app.notify(`Snapshot ${nameOf} requested.`, "info");
          await loadSnapshots();
        } catch (e) { app.fail(e); }
      } }, "Snapshot"));
    }
  }

  let snapshots = [];
  const snapshotList = h("div", { id: "snapshots" });
  async function loadSnapshots() {
    snapshots = (await get(`/api/v1/jobs/${enc(id)}/snapshots`)).snapshots;
    append(clear(snapshotList), snapshots.length ? [h("h2", {}, "Snapshots"),
      table(["Image", "State", "Digest", "Requested", "Finished"], snapshots.map((s) =>
        h("tr", { "data-snapshot": s.id }, h("td", { class: "mono" }, s.name),
          h("td", { class: "snapshot-state" }, s.state, s.error ? `: ${s.error.message || s.error.code}` : ""),
          h("td", { class: "mono" }, s.digest || ""), h("td", {}, time(s.created_at)),
          h("td", {}, time(s.finished_at)))))] : []);
  }

  function renderTimeline() {
    const now = new Date().toISOString();
    clear(timeline).append(...events.map((e, i) => {
      const end = events[i + 1]?.at || (e.state === "terminated" ? e.at : now);
      return h("tr", {}, h("td", {}, time(e.at)), h("td", {}, stateBadge(e.state)),
        h("td", {}, e.stage || ""), h("td", {}, duration(secondsBetween(e.at, end))),
        h("td", {}, e.reason || ""), h("td", {}, e.message || ""));
    }));
  }

  renderSummary(job);
  events = (await get(`/api/v1/jobs/${enc(id)}/events`)).events;
  renderTimeline();
  main.append(snapshotList);
  await loadSnapshots();

  // Parameters (secrets masked), endpoints, results.
  const parameters = Object.entries(job.parameters || {});
  if (parameters.length) {
    main.append(h("h2", {}, "Parameters"), table(["Name", "Value"], parameters.map(([k, p]) =>
      h("tr", {}, h("td", { class: "mono" }, k),
        h("td", { class: "mono" }, p.secret ? h("span", { class: "muted" }, "•••••• (secret)") : p.value)))));
  }
  const endpoints = h("div", { id: "endpoints" });
  const terminalStatus = h("span", { class: "muted", id: "terminal-status" });
  const terminalScreen = h("div", { class: "terminal", id: "terminal", hidden: true });
  let closeTerminal = null;
  main.append(h("h2", {}, "Endpoints"), endpoints, h("div", { class: "row" }, terminalStatus),
    terminalScreen);
  async function connect(endpoint, access) {
    if (closeTerminal) { closeTerminal(); closeTerminal = null; }
    clear(terminalScreen).hidden = false;
    terminalScreen.dataset.service = endpoint.service || "";
    terminalStatus.textContent = `connecting to ${endpoint.service}…`;
    try {
      closeTerminal = await openTerminal(terminalScreen, job.id, endpoint, access,
        (text) => { terminalStatus.textContent = `${endpoint.service}: ${text}`; });
    } catch (e) {
      terminalStatus.textContent = "";
      app.fail(e);
    }
  }
  function endpointActions(e) {
    if (e.auth !== "token" || !e.url) return "";
    return h("div", { class: "row" },
      held.includes("manage") ? h("button", { class: "open-terminal",
        onclick: () => connect(e, "manage") }, "Open terminal") : null,
      h("button", { class: "watch-terminal", onclick: () => connect(e, "read") }, "Watch"));
  }
  function renderEndpoints(list) {
    clear(endpoints).append(list && list.length
      ? table(["Service", "Where", ""], list.map((e) => h("tr", { "data-service": e.service || "" },
        h("td", {}, e.service || e.name || ""),
        h("td", { class: "mono" }, e.url || (e.host && e.port ? `${e.host}:${e.port}` : JSON.stringify(e))),
        h("td", {}, endpointActions(e)))))
      : h("p", { class: "muted" }, "None."));
  }
  renderEndpoints(job.endpoints);

  const logs = new JobLogs(job.id);
  // Results: expected when the job has console patterns; an agent may report them too.
  const results = h("pre", { id: "results", class: "mono" }, "No results yet.");
  const resultsSection = h("section", { id: "results-section",
    hidden: !(job.results?.patterns && Object.keys(job.results.patterns).length) },
  h("h2", {}, "Results"), results);
  main.append(resultsSection);
  // Read on from the bytes shown: while the job runs (every REFRESH_MS) and when it ends;
  // one read at a time, so none is shown twice.
  let resultsShown = 0;
  let resultsRead = Promise.resolve();
  const resultsText = new TextDecoder();
  function loadResults() {
    resultsRead = resultsRead.then(readResults).catch(() => {});
    return resultsRead;
  }
  async function readResults() {
    const blob = await logs.fetchAll("results", resultsShown).catch(() => null);
    if (!blob || abort.signal.aborted) return;
    const bytes = new Uint8Array(await blob.arrayBuffer());
    if (!bytes.length) return;
    if (!resultsShown) results.textContent = "";
    resultsShown += bytes.length;
    results.textContent += resultsText.decode(bytes, { stream: true });
    resultsSection.hidden = false;
  }

  // The console.
  const follow = h("input", { type: "checkbox", id: "follow", checked: true });
  const status = h("span", { class: "muted", id: "console-status" }, "connecting…");
  const download = h("button", { id: "download", onclick: async () => {
    try {
      const blob = await logs.fetchAll("console");
      if (!blob) { app.notify("The log servers have no console for this job yet."); return; }
      const link = h("a", { href: URL.createObjectURL(blob), download: `job-${job.id}-console.log` });
      document.body.append(link);
      link.click();
      setTimeout(() => { URL.revokeObjectURL(link.href); link.remove(); }, 1000);
    } catch (e) { app.fail(e); }
  } }, "Download full log");
  const screen = h("div", { class: "terminal", id: "console" });
  main.append(h("h2", {}, "Console"),
    h("div", { class: "row" }, h("label", {}, follow, " follow"), download, status), screen);
  term = new Terminal({ scrollback: SCROLLBACK, convertEol: true, disableStdin: true,
    fontSize: 13, cursorBlink: false });
  const fit = new FitAddon();
  term.loadAddon(fit);
  term.open(screen);
  try { fit.fit(); } catch (e) { /* hidden: keep the default size */ }
  const onResize = () => { try { fit.fit(); } catch (e) { /* ignore */ } };
  window.addEventListener("resize", onResize);
  screen.dataset.bytes = "0";
  // Scrolling back stops following; ticking "follow" again jumps to the end.
  screen.addEventListener("wheel", (event) => { if (event.deltaY < 0) follow.checked = false; },
    { passive: true, capture: true });
  follow.addEventListener("change", () => { if (follow.checked) term.scrollToBottom(); });
  let received = 0;
  const decoder = new TextDecoder();
  logs.follow("console", 0, (chunk) => {
    received += chunk.length;
    screen.dataset.bytes = String(received);
    // Follow: keep the newest line in view. Not following: keep the lines the reader
    // looks at in view, even at the bottom (xterm.js alone would scroll on).
    const line = term.buffer.active.viewportY;
    term.write(chunk, () => {
      if (follow.checked) term.scrollToBottom();
      else term.scrollToLine(line);
      screen.dataset.viewportY = String(term.buffer.active.viewportY);
      screen.dataset.baseY = String(term.buffer.active.baseY);
    });
    // The text as received, for tests and for copy: bounded like the scroll-back.
    const text = (screen.dataset.tail || "") + decoder.decode(chunk, { stream: true });
    screen.dataset.tail = text.slice(-4096);
    status.textContent = `${received} bytes`;
  }, abort.signal, () => {
    if (!received) status.textContent = "waiting for the console's first byte";
  }).then(() => {
    if (!abort.signal.aborted) status.textContent = `${received} bytes, console closed`;
  }, (e) => { status.textContent = `console unavailable: ${e.message || e}`; });

  // The job read again: its summary, actions and endpoints.
  async function refresh() {
    try {
      const fresh = await get(`/api/v1/jobs/${enc(id)}`);
      renderSummary(fresh);
      renderEndpoints(fresh.endpoints);
    } catch (e) {
      if (!(e instanceof ApiError && e.status === 401)) app.fail(e);
    }
  }

  // Live state: the SSE watch.
  const after = events.length ? events[events.length - 1].seq : 0;
  if (job.state !== "terminated") {
    source = new EventSource(`/api/v1/jobs/${enc(id)}/events/watch?after=${after}`);
    source.addEventListener("job", async (message) => {
      const event = JSON.parse(message.data);
      if (events.some((e) => e.seq === event.seq)) return;
      events.push(event);
      renderTimeline();
      await refresh();
      if (event.state === "terminated") { source.close(); loadResults(); }
    });
  } else {
    loadResults();
  }
  // A left page gives its connection back at once (six per origin, for every tab).
  const leave = () => { if (source) source.close(); abort.abort(); };
  window.addEventListener("pagehide", leave);
  const ticker = setInterval(() => { if (events.at(-1)?.state !== "terminated") renderTimeline(); }, 1000);
  // Why a queued job waits, and a held host's end, change without a job event: re-read them.
  const poller = setInterval(async () => {
    if (snapshots.some((s) => s.state === "pending")) loadSnapshots().catch(() => {});
    if (current.state === "queued" || current.held_until) await refresh();
    // An agent or console patterns add results while the job runs.
    if (!["queued", "terminated"].includes(current.state)) loadResults();
  }, REFRESH_MS);

  return () => {
    abort.abort();
    if (closeTerminal) closeTerminal();
    clearInterval(ticker);
    clearInterval(poller);
    window.removeEventListener("resize", onResize);
    window.removeEventListener("pagehide", leave);
    if (source) source.close();
    if (term) term.dispose();
  };
}
