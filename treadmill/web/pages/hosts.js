// Hosts: tags, enabled, healthy, connected, current job, last seen; drain and enable
// for those who manage a host, and creation and removal for admins.
import { del, enc, get, post } from "../api.js";
import { clear, h, shortId, table, time, yesNo } from "../dom.js";

export const name = "hosts";

export async function render(main, app) {
  const holder = h("div", { id: "hosts" });
  main.append(h("h1", {}, "Hosts"), holder);
  if (app.me?.admin) main.append(createForm(app, () => load()));
  let timer = null;

  async function load() {
    clearTimeout(timer);
    const { hosts } = await get("/api/v1/hosts");
    const held = await Promise.all(hosts.map((host) =>
      get(`/console/privileges/host/${enc(host.name)}`).then((r) => r.privileges, () => [])));
    clear(holder).append(table(
      ["Host", "Tags", "Enabled", "Healthy", "Connected", "Current job", "Last seen", ""],
      hosts.map((host, i) => h("tr", { "data-host": host.name },
        h("td", {}, host.name, host.description ? h("div", { class: "muted" }, host.description) : null),
        h("td", {}, (host.tags || []).join(", ")),
        h("td", { class: "enabled" }, yesNo(host.enabled)),
        h("td", {}, yesNo(host.healthy)),
        h("td", { class: "connected" }, yesNo(host.connected)),
        h("td", { class: "current-job" }, host.current_job
          ? h("a", { href: `#/jobs/${host.current_job}`, class: "mono" }, shortId(host.current_job)) : ""),
        h("td", {}, time(host.last_seen_at)),
        h("td", {}, actions(host, held[i])))),
    ));
    timer = setTimeout(() => load().catch(app.fail), 5000);
  }

  function actions(host, privileges) {
    const buttons = [];
    const act = (what) => async () => {
      try { await post(`/api/v1/hosts/${enc(host.name)}/${what}`); await load(); } catch (e) { app.fail(e); }
    };
    if (privileges.includes("manage")) {
      buttons.push(host.enabled
        ? h("button", { class: "drain", onclick: act("drain") }, "Drain")
        : h("button", { class: "enable", onclick: act("enable") }, "Enable"));
    }
    if (app.me?.admin) {
      buttons.push(h("button", { class: "danger", onclick: async () => {
        if (!confirm(`Remove host ${host.name}?`)) return;
        try { await del(`/api/v1/hosts/${enc(host.name)}`); await load(); } catch (e) { app.fail(e); }
      } }, "Remove"));
    }
    return h("div", { class: "row" }, buttons);
  }

  await load();
  return () => clearTimeout(timer);
}

function createForm(app, reload) {
  const nameInput = h("input", { placeholder: "name", required: true });
  const tags = h("input", { placeholder: "tags" });
  const secret = h("div", {});
  const form = h("form", { class: "inline", id: "host-create" }, nameInput, tags,
    h("button", { type: "submit" }, "Add host"));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      const host = await post("/api/v1/hosts", { name: nameInput.value.trim(),
        tags: tags.value.split(/[\s,]+/).filter(Boolean) });
      clear(secret).append(h("p", { class: "secret" },
        `Host token of ${host.name} (shown once; give it to its supervisor): `, h("code", {}, host.token)));
      await reload();
    } catch (e) { app.fail(e); }
  });
  return h("div", {}, h("h2", {}, "Add a host"), form, secret);
}
