// The switchboard API from the browser: the session cookie authenticates, and
// state-changing calls carry the CSRF token (docs/console.md).

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

let onExpired = () => {};

export function whenExpired(callback) {
  onExpired = callback;
}

export function csrf() {
  for (const part of document.cookie.split(";")) {
    const [name, ...value] = part.trim().split("=");
    if (name === "treadmill_csrf") return value.join("=");
  }
  return "";
}

export async function call(method, path, body, extraHeaders = {}) {
  const headers = { Accept: "application/json", ...extraHeaders };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (!["GET", "HEAD"].includes(method)) headers["X-CSRF-Token"] = csrf() || "-";
  let response;
  try {
    response = await fetch(path, {
      method, headers, credentials: "same-origin",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (e) {
    throw new ApiError(0, "network", "the switchboard cannot be reached");
  }
  if (response.status === 204) return null;
  let data = null;
  try {
    data = await response.json();
  } catch (e) {
    data = null;
  }
  if (!response.ok) {
    const error = new ApiError(response.status, data?.error?.code,
      data?.error?.message || response.statusText || `HTTP ${response.status}`);
    if (response.status === 401 && !path.startsWith("/console/session")) onExpired(error);
    throw error;
  }
  return data;
}

export const get = (path) => call("GET", path);
export const post = (path, body, headers) => call("POST", path, body, headers);
export const put = (path, body) => call("PUT", path, body);
export const patch = (path, body) => call("PATCH", path, body);
export const del = (path) => call("DELETE", path);

const PREFIX = {
  403: "Not allowed",
  404: "Not found",
  409: "Conflict",
  429: "Too many attempts",
  503: "Unavailable, try again shortly",
};

export function describe(error) {
  if (!(error instanceof ApiError)) return String(error?.message || error);
  const prefix = PREFIX[error.status] || (error.status ? `Error ${error.status}` : "Error");
  return `${prefix}: ${error.message}`;
}

export function enc(value) {
  return encodeURIComponent(value);
}
