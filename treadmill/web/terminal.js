// A terminal into a job's console through the proxy's authenticated WebSocket
// (docs/proxy.md, "Consoles"): a console token from the switchboard goes in the first
// text message; then binary messages carry the bytes both ways.
import { enc, post } from "./api.js";
import { FitAddon } from "./vendor/xterm/addon-fit.mjs";
import { Terminal } from "./vendor/xterm/xterm.mjs";

const CLOSES = {
  4401: "the proxy refused the console token",
  4403: "the console token does not open this console",
  4429: "too many clients on this console; try again later",
};

// Open `endpoint` (a job endpoint with "auth": "token") in `screen`; `access` is
// "manage" (type) or "read" (watch). Returns a function that closes it.
export async function openTerminal(screen, jobId, endpoint, access, onStatus) {
  const grant = await post(`/api/v1/jobs/${enc(jobId)}/console-token`, { access });
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
  socket.addEventListener("open", () => {
    socket.send(grant.token);
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
    onStatus(`closed: ${CLOSES[event.code] || event.reason || `code ${event.code}`}`);
  });
  const typing = term.onData((data) => {
    if (access === "manage" && socket.readyState === WebSocket.OPEN) socket.send(encoder.encode(data));
  });
  return () => {
    typing.dispose();
    if (socket.readyState <= WebSocket.OPEN) socket.close(1000);
    term.dispose();
  };
}
