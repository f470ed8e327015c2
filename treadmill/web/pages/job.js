// One job: its state timeline, parameters, endpoints, results and live console.
import { ApiError, enc, get, post } from "../api.js";
import { append, clear, duration, h, stateBadge, table, time } from "../dom.js";
import { JobLogs } from "../logs.js";
import { openTerminal } from "../terminal.js";
import { FitAddon } from "../vendor/xterm/addon-fit.mjs";
import { Terminal } from "../vendor/xterm/xterm.mjs";

export const name = "job";

const SCROLLBACK = 10000; // lines the terminal keeps: bounded memory on an endless console

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
      j.termination ? [h("span", { class: "muted" }, "Termination"),
        h("span", { id: "job-termination" }, j.termination.reason || "",
          j.termination.exit_status !== null && j.termination.exit_status !== undefined
            ? ` (exit ${j.termination.exit_status})` : "",
          j.termination.message ? `: ${j.termination.message}` : "")] : null]);
    renderActions(j);
  }

  function renderActions(j) {
    clear(actions);
    const live = j.state !== "terminated" && j.state !== "terminating";
    if (live && held.includes("stop")) {
      actions.append(h("button", { class: "danger", id: "cancel", onclick: async () => {
        if (!confirm("Cancel this job?")) return;
        try { renderSummary(await post(`/api/v1/jobs/${enc(j.id)}/terminate`)); } catch (e) { app.fail(e); }
      } }, "Cancel job"));
    }
    if (live && held.includes("manage")) {
      actions.append(h("button", { id: "snapshot", onclick: async () => {
        const nameOf = prompt("Name of the snapshot image (e.g. you/my-image):");
        if (!nameOf) return;
        try {
          await post(`/api/v1/jobs/${enc(j.id)}/snapshots`, { name: nameOf });
          app.notify(`Snapshot ${nameOf} requested.`, "info");
        } catch (e) { app.fail(e); }
      } }, "Snapshot"));
    }
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
  const results = h("pre", { id: "results", class: "mono" });
  if (job.results?.patterns && Object.keys(job.results.patterns).length) {
    main.append(h("h2", {}, "Results"), results);
  }
  async function loadResults() {
    if (!results.isConnected) return;
    const blob = await logs.fetchAll("results").catch(() => null);
    results.textContent = blob ? await blob.text() : "No results yet.";
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
  let received = 0;
  const decoder = new TextDecoder();
  logs.follow("console", 0, (chunk) => {
    received += chunk.length;
    screen.dataset.bytes = String(received);
    term.write(chunk);
    // The text as received, for tests and for copy: bounded like the scroll-back.
    const text = (screen.dataset.tail || "") + decoder.decode(chunk, { stream: true });
    screen.dataset.tail = text.slice(-4096);
    if (follow.checked) term.scrollToBottom();
    status.textContent = `${received} bytes`;
  }, abort.signal).then(() => {
    if (!abort.signal.aborted) status.textContent = `${received} bytes, console closed`;
  }, (e) => { status.textContent = `console unavailable: ${e.message || e}`; });

  // Live state: the SSE watch.
  const after = events.length ? events[events.length - 1].seq : 0;
  if (job.state !== "terminated") {
    source = new EventSource(`/api/v1/jobs/${enc(id)}/events/watch?after=${after}`);
    source.addEventListener("job", async (message) => {
      const event = JSON.parse(message.data);
      if (events.some((e) => e.seq === event.seq)) return;
      events.push(event);
      renderTimeline();
      try {
        const fresh = await get(`/api/v1/jobs/${enc(id)}`);
        renderSummary(fresh);
        renderEndpoints(fresh.endpoints);
      } catch (e) {
        if (!(e instanceof ApiError && e.status === 401)) app.fail(e);
      }
      if (event.state === "terminated") { source.close(); loadResults(); }
    });
  } else {
    loadResults();
  }
  const ticker = setInterval(() => { if (events.at(-1)?.state !== "terminated") renderTimeline(); }, 1000);

  return () => {
    abort.abort();
    if (closeTerminal) closeTerminal();
    clearInterval(ticker);
    window.removeEventListener("resize", onResize);
    if (source) source.close();
    if (term) term.dispose();
  };
}
