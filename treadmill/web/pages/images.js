// The image catalogue, the registered image stores and, for an image's managers, its grants.
import { enc, get } from "../api.js";
import { clear, h, shortId, table, time } from "../dom.js";

export const name = "images";

export async function render(main, app) {
  const [{ images }, stores] = await Promise.all([get("/api/v1/images"),
    get("/api/v1/stores").catch(() => ({ stores: [] }))]);
  const grants = h("div", { id: "image-grants" });
  main.append(h("h1", {}, "Images"), table(
    ["Name", "Kind", "Digest", "Host tags", "Stores", "Owner", "Updated", ""],
    images.map((image) => h("tr", { "data-image": image.name },
      h("td", {}, image.name, image.description ? h("div", { class: "muted" }, image.description) : null),
      h("td", {}, image.kind || ""),
      h("td", { class: "mono", title: image.digest }, shortId(image.digest.replace("sha256:", ""))),
      h("td", {}, (image.host_tags || []).join(", ")),
      h("td", {}, (image.stores || []).join(" ")),
      h("td", {}, image.owner || ""),
      h("td", {}, time(image.updated_at)),
      h("td", {}, h("button", { onclick: () => showGrants(image.name) }, "Grants"))))),
  grants,
  h("h2", {}, "Image stores"), table(["URL", "Service", "Cache", "Description"],
    stores.stores.map((s) => h("tr", {}, h("td", { class: "mono" }, s.url), h("td", {}, s.service),
      h("td", {}, s.cache ? "cache" : ""), h("td", {}, s.description || "")))));

  async function showGrants(nameOf) {
    try {
      const result = await get(`/api/v1/images/${nameOf.split("/").map(enc).join("/")}/grants`);
      clear(grants).append(h("h2", {}, `Grants on ${nameOf}`), result.grants.length
        ? table(["User", "Privilege", "Since"], result.grants.map((g) =>
          h("tr", {}, h("td", {}, g.user), h("td", {}, g.privilege), h("td", {}, time(g.created_at)))))
        : h("p", { class: "muted" }, "None: only its owner and admins use it."));
    } catch (e) { app.fail(e); }
  }
}
