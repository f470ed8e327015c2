// The console's shell: who is logged in, the navigation and a hash router.
import { ApiError, del, describe, get, whenExpired } from "./api.js";
import { clear, h } from "./dom.js";
import * as hosts from "./pages/hosts.js";
import * as images from "./pages/images.js";
import * as job from "./pages/job.js";
import * as jobs from "./pages/jobs.js";
import * as login from "./pages/login.js";
import * as submit from "./pages/submit.js";
import * as tokens from "./pages/tokens.js";
import * as users from "./pages/users.js";

const ROUTES = [
  [/^#\/jobs\/([0-9a-f-]{36})$/, job],
  [/^#\/jobs\/?$/, jobs],
  [/^#\/submit$/, submit],
  [/^#\/hosts$/, hosts],
  [/^#\/images$/, images],
  [/^#\/tokens$/, tokens],
  [/^#\/users$/, users],
  [/^#\/login$/, login],
];

const app = {
  me: null,
  cleanup: null,
  notify(message, kind = "error") {
    const box = document.getElementById("notice");
    box.textContent = message;
    box.className = kind === "error" ? "" : kind;
    box.hidden = !message;
  },
  fail(error) {
    app.notify(describe(error));
  },
  go(hash) {
    if (location.hash === hash) route();
    else location.hash = hash;
  },
  async refreshMe() {
    try {
      app.me = await get("/api/v1/whoami");
    } catch (e) {
      if (!(e instanceof ApiError) || e.status !== 401) throw e;
      app.me = null;
    }
    renderBar();
    return app.me;
  },
};

function renderBar() {
  const nav = clear(document.getElementById("nav"));
  const who = clear(document.getElementById("who"));
  if (!app.me) return;
  const links = [["#/jobs", "Jobs"], ["#/submit", "Submit"], ["#/hosts", "Hosts"],
    ["#/images", "Images"], ["#/tokens", "My tokens"]];
  if (app.me.admin) links.push(["#/users", "Users"]);
  for (const [href, text] of links) {
    nav.append(h("a", { href, class: location.hash.startsWith(href) ? "active" : "" }, text));
  }
  who.append(h("span", { id: "whoami" }, app.me.name, app.me.admin ? " (admin)" : ""),
    h("button", { id: "logout", onclick: logOut }, "Log out"));
}

async function logOut() {
  try {
    await del("/console/session");
  } catch (e) {
    // The session may be gone already; the cookies are cleared either way.
  }
  app.me = null;
  renderBar();
  app.go("#/login");
}

async function route() {
  if (app.cleanup) {
    try { app.cleanup(); } catch (e) { /* a page's cleanup must not stop the next page */ }
    app.cleanup = null;
  }
  app.notify("");
  const hash = location.hash || "#/jobs";
  let page = jobs, params = [];
  for (const [pattern, module] of ROUTES) {
    const match = hash.match(pattern);
    if (match) { page = module; params = match.slice(1); break; }
  }
  if (!app.me && page !== login) {
    await app.refreshMe().catch(app.fail);
    if (!app.me) { app.go("#/login"); return; }
  }
  renderBar();
  const main = clear(document.getElementById("main"));
  try {
    app.cleanup = (await page.render(main, app, ...params)) || null;
  } catch (e) {
    if (!(e instanceof ApiError && e.status === 401)) app.fail(e);
  }
  document.body.dataset.page = page.name;
}

whenExpired(() => {
  app.me = null;
  renderBar();
  if (location.hash !== "#/login") {
    sessionStorage.setItem("treadmill-next", location.hash);
    app.go("#/login");
    app.notify("Your session has ended: log in again.", "info");
  }
});

window.addEventListener("hashchange", route);
// Back from the browser's page cache: the page closed its watches when it was left.
window.addEventListener("pageshow", (event) => { if (event.persisted) route(); });
route();
