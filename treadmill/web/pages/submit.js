// Submit a job: an image from the catalogue (or a digest), tags, parameters and secret
// parameters, timeout, restarts, and how long to hold the host if the job fails.
import { get, post } from "../api.js";
import { h } from "../dom.js";

export const name = "submit";

function words(text) {
  return text.split(/[\s,]+/).map((t) => t.trim()).filter(Boolean);
}

export async function render(main, app) {
  const catalogue = await get("/api/v1/images").catch((e) => { app.fail(e); return { images: [] }; });
  const image = h("input", { id: "submit-image", list: "catalogue", required: true,
    placeholder: "catalogue name or sha256:…" });
  const list = h("datalist", { id: "catalogue" },
    catalogue.images.map((i) => h("option", { value: i.name }, i.description || i.name)));
  const tags = h("input", { id: "submit-tags", placeholder: "tags, e.g. arch=x86_64 qemu" });
  const label = h("input", { id: "submit-label", maxlength: 256 });
  const timeout = h("input", { id: "submit-timeout", type: "number", min: 1, placeholder: "seconds (default from the switchboard)" });
  const restarts = h("input", { id: "submit-restarts", type: "number", min: 0, max: 100, value: "0" });
  const hold = h("input", { id: "submit-hold", type: "number", min: 1,
    placeholder: "minutes; empty: the host is freed at once" });
  const rows = h("div", { class: "params", id: "submit-params" });
  function addParameter() {
    rows.append(h("div", { class: "param" },
      h("input", { class: "param-name", placeholder: "NAME" }),
      h("input", { class: "param-value", placeholder: "value" }),
      h("label", {}, h("input", { type: "checkbox", class: "param-secret" }), " secret"),
      h("button", { type: "button", onclick: (e) => e.target.closest(".param").remove() }, "×")));
  }
  image.addEventListener("change", () => {
    const chosen = catalogue.images.find((i) => i.name === image.value);
    if (chosen && !tags.value) tags.placeholder = `the image's: ${(chosen.host_tags || []).join(" ") || "none"}`;
  });
  const form = h("form", { class: "stack", id: "submit-form" },
    h("h1", {}, "Submit a job"),
    h("label", {}, "Image", image, list),
    h("label", {}, "Host tags", tags),
    h("label", {}, "Label", label),
    h("div", {}, h("div", {}, "Parameters"), rows,
      h("button", { type: "button", id: "add-param", onclick: addParameter }, "Add a parameter")),
    h("label", {}, "Timeout", timeout),
    h("label", {}, "Restarts", restarts),
    h("label", {}, "Hold the host if the job fails (to debug it; Release host ends the hold)", hold),
    h("button", { class: "primary", type: "submit" }, "Submit"));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = { image: image.value.trim() };
    if (tags.value.trim()) body.tags = words(tags.value);
    if (label.value) body.label = label.value;
    if (timeout.value) body.timeout = Number(timeout.value);
    if (restarts.value) body.max_restarts = Number(restarts.value);
    if (hold.value) body.hold_on_failure = Math.round(Number(hold.value) * 60);
    const parameters = {};
    for (const row of rows.querySelectorAll(".param")) {
      const key = row.querySelector(".param-name").value.trim();
      if (!key) continue;
      parameters[key] = { value: row.querySelector(".param-value").value,
        secret: row.querySelector(".param-secret").checked };
    }
    if (Object.keys(parameters).length) body.parameters = parameters;
    try {
      const job = await post("/api/v1/jobs", body, { "Idempotency-Key": crypto.randomUUID() });
      app.go(`#/jobs/${job.id}`);
    } catch (e) {
      app.fail(e);
    }
  });
  main.append(form);
}
