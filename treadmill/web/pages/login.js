// Log in with a password: the switchboard puts the session's token into an HttpOnly cookie.
import { post } from "../api.js";
import { h } from "../dom.js";

export const name = "login";

export async function render(main, app) {
  const user = h("input", { name: "user", id: "login-user", autocomplete: "username", required: true });
  const password = h("input", { name: "password", id: "login-password", type: "password",
    autocomplete: "current-password", required: true });
  const form = h("form", { class: "stack", id: "login-form" },
    h("h1", {}, "Log in to Treadmill"),
    h("label", {}, "User", user),
    h("label", {}, "Password", password),
    h("button", { class: "primary", type: "submit" }, "Log in"));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      await post("/console/session", { user: user.value, password: password.value },
        { "X-CSRF-Token": "login" });
      await app.refreshMe();
      const next = sessionStorage.getItem("treadmill-next");
      sessionStorage.removeItem("treadmill-next");
      app.go(next && next !== "#/login" ? next : "#/jobs");
    } catch (e) {
      app.fail(e);
    }
  });
  main.append(form);
  user.focus();
}
