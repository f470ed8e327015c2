// A terminal into a job's console through the proxy's authenticated WebSocket
// (docs/proxy.md, "Consoles"): a console token from the switchboard goes in the first
// text message; then binary messages carry the bytes both ways, and a new token goes in
// a text message at 80% of the last one's lifetime (the proxy closes a console whose
// token expired unrenewed, so a user whose right was revoked loses it).
import { enc, post } from "./api.js";
import { FitAddon } from "./vendor/xterm/addon-fit.mjs";
import { Terminal } from "./vendor/xterm/xterm.mjs";

const RENEW_AT = 0.8; // of a console token's lifetime
const RETRY_MS = 10000; // a renewal that failed (not refused) is tried again

const CLOSES = {
  4401: "the proxy refused the console token",
  4403: "the console token does not open this console",
  4429: "too many clients on this console; try again later",
};

// Open `endpoint` (a job endpoint with "auth": "token") in `screen`; `access` is
// "manage" (type) or "read" (watch). Returns a function that closes it.
export async function openTerminal(screen, jobId, endpoint, access, onStatus) {
  const path = `/api/v1/jobs/${enc(jobId)}/console-token`;
  const grant = await post(path, { access });
  const granted = Date.now();
  const term = new Terminal({ scrollback: 5000, disableStdin: access !== "manage",
    fontSize: 13, cursorBlink: access === "manage" });
  const fit = new FitAddon();
  term.loadAddon(fit);
  term.open(screen);
  try { fit.fit(); } catch (e) { /* hidden: keep the default size */ }
  const socket = new WebSocket(endpoint.url);
  socket.binaryType = "arraybuffer";
  const encoder = new TextEncoder();
  let received = 0;
  let renewal = null;
  const renewIn = (ms) => { renewal = setTimeout(renew, Math.max(0, ms)); };
  async function renew() {
    renewal = null;
    if (socket.readyState !== WebSocket.OPEN) return;
    try {
      const next = await post(path, { access });
      if (socket.readyState !== WebSocket.OPEN) return;
      socket.send(next.token);
      screen.dataset.renewals = String(Number(screen.dataset.renewals || 0) + 1);
      renewIn(next.expires_in * 1000 * RENEW_AT);
    } catch (error) {
      if (socket.readyState !== WebSocket.OPEN) return;
      if ([401, 403, 404].includes(error.status)) {
        onStatus("no new console token (access revoked?): the console closes when its token expires");
      } else {
        renewIn(RETRY_MS);
      }
    }
  }
  socket.addEventListener("open", () => {
    socket.send(grant.token);
    renewIn(granted + grant.expires_in * 1000 * RENEW_AT - Date.now());
    onStatus(access === "manage" ? "connected: type here" : "connected, read only");
    term.focus();
  });
  socket.addEventListener("message", (message) => {
    if (!(message.data instanceof ArrayBuffer)) return;
    const bytes = new Uint8Array(message.data);
    received += bytes.length;
    screen.dataset.bytes = String(received);
    screen.dataset.tail = ((screen.dataset.tail || "") + new TextDecoder().decode(bytes)).slice(-4096);
    term.write(bytes);
  });
  socket.addEventListener("close", (event) => {
    clearTimeout(renewal);
    const why = event.code === 4401 && event.reason === "console token expired"
      ? "the console token expired and was not renewed" : CLOSES[event.code];
    onStatus(`closed: ${why || event.reason || `code ${event.code}`}`);
  });
  const typing = term.onData((data) => {
    if (access === "manage" && socket.readyState === WebSocket.OPEN) socket.send(encoder.encode(data));
  });
  return () => {
    clearTimeout(renewal);
    typing.dispose();
    if (socket.readyState <= WebSocket.OPEN) socket.close(1000);
    term.dispose();
  };
}
