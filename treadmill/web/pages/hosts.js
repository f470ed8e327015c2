// Hosts: tags, enabled, healthy (and the health history), connected, current job (and a
// failed job's hold), last seen; drain, enable and tags for those who manage a host, and
// creation, new tokens and removal for admins.
import { del, enc, get, post, put } from "../api.js";
import { clear, h, shortId, table, time, yesNo } from "../dom.js";

export const name = "hosts";

export async function render(main, app) {
  const holder = h("div", { id: "hosts" });
  const health = h("div", { id: "host-health" });
  const secret = h("div", { id: "host-secret" });
  main.append(h("h1", {}, "Hosts"), holder, secret, health);
  if (app.me?.admin) main.append(createForm(app, secret, () => load()));
  let timer = null;
  let stopped = false;

  async function load() {
    clearTimeout(timer);
    const { hosts } = await get("/api/v1/hosts");
    // An admin may do everything: no need to ask host by host.
    const held = app.me?.admin ? hosts.map(() => ["manage"]) : await Promise.all(hosts.map((host) =>
      get(`/console/privileges/host/${enc(host.name)}`).then((r) => r.privileges, () => [])));
    if (stopped) return;
    clear(holder).append(table(
      ["Host", "Tags", "Enabled", "Healthy", "Connected", "Current job", "Last seen", ""],
      hosts.map((host, i) => h("tr", { "data-host": host.name },
        h("td", {}, host.name, host.description ? h("div", { class: "muted" }, host.description) : null),
        h("td", { class: "tags" }, (host.tags || []).join(", ")),
        h("td", { class: "enabled" }, yesNo(host.enabled)),
        h("td", { class: "healthy" }, yesNo(host.healthy),
          host.consecutive_failures ? h("div", { class: "muted" },
            `${host.consecutive_failures} failure${host.consecutive_failures === 1 ? "" : "s"} in a row`) : null),
        h("td", { class: "connected" }, yesNo(host.connected)),
        h("td", { class: "current-job" }, host.current_job
          ? h("a", { href: `#/jobs/${host.current_job}`, class: "mono" }, shortId(host.current_job)) : "",
        host.held_by ? h("div", { class: "muted held" }, `held by ${host.held_by}`,
          host.held_until ? ` until ${time(host.held_until)}` : "") : null),
        h("td", {}, time(host.last_seen_at)),
        h("td", {}, actions(host, held[i])))),
    ));
    timer = setTimeout(() => load().catch(app.fail), 5000);
  }

  function actions(host, privileges) {
    const buttons = [h("button", { class: "health", onclick: () => showHealth(host.name) }, "Health")];
    const act = (what, body) => async () => {
      try {
        await (body ? put(`/api/v1/hosts/${enc(host.name)}/${what}`, body)
          : post(`/api/v1/hosts/${enc(host.name)}/${what}`));
        await load();
      } catch (e) { app.fail(e); }
    };
    if (privileges.includes("manage")) {
      if (host.enabled) buttons.push(h("button", { class: "drain", onclick: act("drain") }, "Drain"));
      // Enable also puts a host back in service after failures or a failing health check.
      if (!host.enabled || !host.healthy) {
        buttons.push(h("button", { class: "enable", onclick: act("enable") },
          host.healthy ? "Enable" : "Back in service"));
      }
      buttons.push(h("button", { class: "edit-tags", onclick: () => {
        const tags = prompt(`Tags of ${host.name} (separated by spaces):`, (host.tags || []).join(" "));
        if (tags !== null) act("tags", { tags: tags.split(/[\s,]+/).filter(Boolean) })();
      } }, "Tags"));
    }
    if (app.me?.admin) {
      buttons.push(h("button", { class: "new-token", onclick: async () => {
        if (!confirm(`Give ${host.name} a new token? Its supervisor's current one stops working.`)) return;
        try { showToken(secret, await post(`/api/v1/hosts/${enc(host.name)}/token`)); } catch (e) { app.fail(e); }
      } }, "New token"));
      buttons.push(h("button", { class: "danger remove", onclick: async () => {
        if (!confirm(`Remove host ${host.name}?`)) return;
        try { await del(`/api/v1/hosts/${enc(host.name)}`); await load(); } catch (e) { app.fail(e); }
      } }, "Remove"));
    }
    return h("div", { class: "row" }, buttons);
  }

  async function showHealth(hostName) {
    try {
      const state = await get(`/api/v1/hosts/${enc(hostName)}/health`);
      const check = state.check;
      clear(health).append(h("h2", {}, `Health of ${hostName}`),
        h("div", { class: "grid2" },
          h("span", { class: "muted" }, "Healthy"), yesNo(state.healthy),
          h("span", { class: "muted" }, "Failures in a row"), h("span", {}, String(state.consecutive_failures)),
          h("span", { class: "muted" }, "Health check"), h("span", { id: "health-check" }, check
            ? `${check.image?.name || check.image?.digest} (${check.scope} ${check.target}), expects exit ${check.expect_exit}`
              + (check.every_jobs ? `, every ${check.every_jobs} jobs` : "")
              + (check.every_hours ? `, every ${check.every_hours} h` : "")
            : "none"),
          h("span", { class: "muted" }, "Last check"), h("span", {}, time(state.last_check_at) || "never")),
        state.events.length
          ? table(["At", "Event", "Healthy", "Job", "By", "Message"], state.events.map((e) =>
            h("tr", { "data-event": e.event }, h("td", {}, time(e.at)), h("td", {}, e.event),
              h("td", {}, yesNo(e.healthy)),
              h("td", {}, e.job ? h("a", { href: `#/jobs/${e.job}`, class: "mono" }, shortId(e.job)) : ""),
              h("td", {}, e.actor || ""), h("td", {}, e.reason ? `${e.reason}: ` : "", e.message || ""))))
          : h("p", { class: "muted" }, "No health events yet."),
        app.me?.admin ? checkForm(hostName, check) : null);
    } catch (e) { app.fail(e); }
  }

  // Admins set the host's own health check (or remove it); a tag's check, and one with
  // parameters, is set with `tml host health-check set` (docs/cli.md).
  function checkForm(hostName, check) {
    const own = check?.scope === "host" ? check : null;
    const image = h("input", { class: "check-image", required: true, placeholder: "image (catalogue name or digest)",
      value: own ? own.image?.name || own.image?.digest : "" });
    const expect = h("input", { class: "check-exit", type: "number", min: 0, max: 255,
      value: String(own?.expect_exit ?? 0) });
    const everyJobs = h("input", { class: "check-every-jobs", type: "number", min: 1,
      placeholder: "every N jobs", value: own?.every_jobs ?? "" });
    const everyHours = h("input", { class: "check-every-hours", type: "number", min: 0,
      step: "any", placeholder: "every N hours", value: own?.every_hours ?? "" });
    const form = h("form", { class: "inline", id: "health-check-form" },
      image, h("label", {}, "expect exit ", expect), everyJobs, everyHours,
      h("button", { type: "submit" }, "Set health check"),
      own ? h("button", { type: "button", class: "danger", id: "health-check-remove", onclick: async () => {
        try { await del(`/api/v1/health-checks/hosts/${enc(hostName)}`); await showHealth(hostName); }
        catch (e) { app.fail(e); }
      } }, "Remove") : null);
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const body = { image: image.value.trim(), expect_exit: Number(expect.value || 0) };
      if (everyJobs.value) body.every_jobs = Number(everyJobs.value);
      if (everyHours.value) body.every_hours = Number(everyHours.value);
      try { await put(`/api/v1/health-checks/hosts/${enc(hostName)}`, body); await showHealth(hostName); }
      catch (e) { app.fail(e); }
    });
    return h("div", {}, h("h2", {}, `Health check of ${hostName}`), form);
  }

  await load();
  return () => { stopped = true; clearTimeout(timer); };
}

function showToken(where, host) {
  clear(where).append(h("p", { class: "secret" },
    `Host token of ${host.name} (shown once; give it to its supervisor): `, h("code", {}, host.token)));
}

function createForm(app, secret, reload) {
  const nameInput = h("input", { placeholder: "name", required: true });
  const tags = h("input", { placeholder: "tags" });
  const form = h("form", { class: "inline", id: "host-create" }, nameInput, tags,
    h("button", { type: "submit" }, "Add host"));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      showToken(secret, await post("/api/v1/hosts", { name: nameInput.value.trim(),
        tags: tags.value.split(/[\s,]+/).filter(Boolean) }));
      await reload();
    } catch (e) { app.fail(e); }
  });
  return h("div", {}, h("h2", {}, "Add a host"), form);
}
