// Users, for admins: create, make admin, disable, set a password.
import { enc, get, patch, post } from "../api.js";
import { clear, h, table, time, yesNo } from "../dom.js";

export const name = "users";

export async function render(main, app) {
  const holder = h("div", { id: "users" });
  const nameInput = h("input", { placeholder: "name", required: true });
  const password = h("input", { type: "password", placeholder: "password (8+ characters)", minlength: 8 });
  const admin = h("input", { type: "checkbox" });
  const form = h("form", { class: "inline" }, nameInput, password, h("label", {}, admin, " admin"),
    h("button", { type: "submit", class: "primary" }, "Add user"));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = { name: nameInput.value.trim(), admin: admin.checked };
    if (password.value) body.password = password.value;
    try { await post("/api/v1/users", body); nameInput.value = password.value = ""; await load(); }
    catch (e) { app.fail(e); }
  });
  main.append(h("h1", {}, "Users"), form, holder);

  async function load() {
    const { users } = await get("/api/v1/users");
    const change = (user, body) => async () => {
      try { await patch(`/api/v1/users/${enc(user.name)}`, body); await load(); } catch (e) { app.fail(e); }
    };
    clear(holder).append(table(["User", "Admin", "Disabled", "Created", ""],
      users.map((u) => h("tr", { "data-user": u.name },
        h("td", {}, u.name), h("td", {}, yesNo(u.admin)), h("td", {}, yesNo(u.disabled, false)),
        h("td", {}, time(u.created_at)),
        h("td", {}, h("div", { class: "row" },
          h("button", { onclick: change(u, { admin: !u.admin }) }, u.admin ? "Revoke admin" : "Make admin"),
          h("button", { class: u.disabled ? "" : "danger", onclick: change(u, { disabled: !u.disabled }) },
            u.disabled ? "Enable" : "Disable"),
          passwordForm(u)))))));
  }
  function passwordForm(user) {
    const input = h("input", { type: "password", class: "new-password", minlength: 8,
      placeholder: "new password", autocomplete: "new-password", required: true });
    const form = h("form", { class: "row set-password" }, input,
      h("button", { type: "submit" }, "Set password"));
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      try {
        await patch(`/api/v1/users/${enc(user.name)}`, { password: input.value });
        input.value = "";
        app.notify(`The password of ${user.name} is set.`, "info");
      } catch (e) { app.fail(e); }
    });
    return form;
  }
  await load();
}
