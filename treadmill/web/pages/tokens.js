// My API tokens: create (the secret is shown once), revoke.
import { del, enc, get, post } from "../api.js";
import { clear, h, table, time } from "../dom.js";

export const name = "tokens";

export async function render(main, app) {
  const holder = h("div", { id: "tokens" });
  const secret = h("div", { id: "new-token" });
  const label = h("input", { id: "token-label", placeholder: "label", maxlength: 256 });
  const days = h("input", { id: "token-days", type: "number", min: 1, max: 365, value: "30" });
  const form = h("form", { class: "inline" }, label, h("label", {}, "days ", days),
    h("button", { type: "submit", class: "primary" }, "Create a token"));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      const token = await post("/api/v1/tokens", { label: label.value,
        expires_in: Number(days.value) * 86400 });
      clear(secret).append(h("p", { class: "secret" },
        "Your new token (copy it now, it is not shown again): ", h("code", { id: "token-secret" }, token.token)));
      await load();
    } catch (e) { app.fail(e); }
  });
  main.append(h("h1", {}, "My tokens"), form, secret, holder);

  async function load() {
    const { tokens } = await get("/api/v1/tokens");
    clear(holder).append(table(["Label", "Created", "Expires", "Last used", "Revoked", ""],
      tokens.map((t) => h("tr", { "data-token": t.id },
        h("td", {}, t.label || ""), h("td", {}, time(t.created_at)), h("td", {}, time(t.expires_at) || "never"),
        h("td", {}, time(t.last_used_at)), h("td", {}, time(t.revoked_at)),
        h("td", {}, t.revoked_at ? "" : h("button", { class: "danger", onclick: async () => {
          try { await del(`/api/v1/tokens/${enc(t.id)}`); await load(); } catch (e) { app.fail(e); }
        } }, "Revoke"))))));
  }
  await load();
}
