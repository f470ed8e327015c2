// The jobs list: filters, and live updates (the SSE watch of the newest active jobs,
// and a refresh of the page every few seconds for the others and for new jobs).
import { enc, get } from "../api.js";
import { clear, h, shortId, stateBadge, time } from "../dom.js";

export const name = "jobs";

const STATES = ["queued", "assigned", "initializing", "ready", "terminating", "terminated"];
const ACTIVE = STATES.filter((s) => s !== "terminated");
const MAX_WATCHES = 3; // a browser holds six connections per origin: leave the rest free
const REFRESH_MS = 5000;
const PAGE = 100;
const MAX_PAGE = 500; // the API's largest page

export async function render(main, app) {
  const params = new URLSearchParams(location.hash.split("?")[1] || "");
  const state = h("select", { id: "filter-state" },
    h("option", { value: "" }, "any state"),
    h("option", { value: "active" }, "active"),
    STATES.map((s) => h("option", { value: s }, s)));
  state.value = params.get("state") || "";
  const owner = h("input", { id: "filter-owner", placeholder: "owner", value: params.get("owner") || "" });
  const prefix = h("input", { id: "filter-id", placeholder: "id prefix", size: 10 });
  const body = h("tbody", {});
  let limit = PAGE;
  const more = h("button", { id: "more", hidden: true, onclick: () => {
    limit = Math.min(MAX_PAGE, limit + PAGE);
    load();
  } }, "Show older jobs");
  const form = h("form", { class: "inline" }, state, owner, prefix,
    h("button", { type: "submit" }, "Filter"),
    h("a", { href: "#/submit" }, h("button", { type: "button", class: "primary" }, "Submit a job")));
  main.append(h("h1", {}, "Jobs"), form,
    h("table", { id: "jobs" }, h("thead", {}, h("tr", {},
      ["Job", "Label", "Image", "State", "Stage", "Host", "Owner", "Created"].map((t) => h("th", {}, t)))),
    body), h("p", {}, more));

  const watches = new Map();
  let timer = null;
  let stopped = false;

  function query() {
    const q = new URLSearchParams({ limit: String(limit) });
    if (state.value === "active") q.set("state", ACTIVE.join(","));
    else if (state.value) q.set("state", state.value);
    if (owner.value.trim()) q.set("owner", owner.value.trim());
    if (prefix.value.trim()) q.set("id_prefix", prefix.value.trim());
    return q.toString();
  }

  function row(job) {
    return h("tr", { "data-job": job.id },
      h("td", {}, h("a", { href: `#/jobs/${job.id}`, class: "mono" }, shortId(job.id))),
      h("td", { class: "label" }, job.label || ""),
      h("td", { class: "mono" }, job.image?.name || (job.image?.digest || "").slice(0, 19)),
      h("td", { class: "state-cell" }, stateBadge(job.state)),
      h("td", { class: "stage-cell" }, job.stage || "",
        job.state_message ? h("div", { class: "muted waiting" }, job.state_message) : null),
      h("td", {}, job.host || ""),
      h("td", {}, job.owner),
      h("td", {}, time(job.created_at)));
  }

  function watch(jobs) {
    if (document.hidden) return;
    const wanted = new Set(jobs.filter((j) => j.state !== "terminated").slice(0, MAX_WATCHES).map((j) => j.id));
    for (const [id, source] of watches) {
      if (!wanted.has(id)) { source.close(); watches.delete(id); }
    }
    for (const id of wanted) {
      if (watches.has(id)) continue;
      const source = new EventSource(`/api/v1/jobs/${enc(id)}/events/watch`);
      source.addEventListener("job", (message) => {
        const event = JSON.parse(message.data);
        const tr = body.querySelector(`tr[data-job="${CSS.escape(id)}"]`);
        if (!tr) return;
        clear(tr.querySelector(".state-cell")).append(stateBadge(event.state));
        tr.querySelector(".stage-cell").textContent = event.stage || "";
        if (event.state === "terminated") { source.close(); watches.delete(id); }
      });
      source.onerror = () => { if (source.readyState === EventSource.CLOSED) watches.delete(id); };
      watches.set(id, source);
    }
  }

  async function load() {
    clearTimeout(timer);
    try {
      const result = await get(`/api/v1/jobs?${query()}`);
      if (stopped) return;
      clear(body).append(...result.jobs.map(row));
      if (!result.jobs.length) body.append(h("tr", {}, h("td", { colspan: 8, class: "muted" }, "No jobs.")));
      watch(result.jobs);
      more.hidden = !result.next_cursor || limit >= MAX_PAGE;
    } catch (e) {
      if (stopped) return;
      app.fail(e);
    }
    if (!stopped && !document.hidden) timer = setTimeout(load, REFRESH_MS);
  }

  // A browser holds six connections per origin for all its tabs: a hidden or left page
  // gives its watches back (else a few open tabs stall every other page of the console).
  function release() {
    for (const source of watches.values()) source.close();
    watches.clear();
  }
  function visibility() {
    if (document.hidden) { release(); clearTimeout(timer); } else if (!stopped) load();
  }
  document.addEventListener("visibilitychange", visibility);
  window.addEventListener("pagehide", release);

  form.addEventListener("submit", (event) => { event.preventDefault(); limit = PAGE; load(); });
  await load();
  return () => {
    stopped = true;
    clearTimeout(timer);
    release();
    document.removeEventListener("visibilitychange", visibility);
    window.removeEventListener("pagehide", release);
  };
}
