// Job logs straight from the log servers, with a read capability token from the
// switchboard (POST /api/v1/jobs/{id}/logs/token); docs/logserver.md.
import { enc, post } from "./api.js";

export class JobLogs {
  constructor(jobId) {
    this.jobId = jobId;
    this.access = null;
    this.obtained = 0;
  }

  async token() {
    // Renew well before the token's end.
    const age = (Date.now() - this.obtained) / 1000;
    if (!this.access || age > this.access.expires_in / 2) {
      this.access = await post(`/api/v1/jobs/${enc(this.jobId)}/logs/token`);
      this.obtained = Date.now();
    }
    return this.access;
  }

  url(server, stream, query = "") {
    return `${server.replace(/\/+$/, "")}/v1/jobs/${enc(this.jobId)}/streams/${enc(stream)}${query}`;
  }

  // Follow a stream from `offset`: onData(Uint8Array) per chunk, onOpen() when a log
  // server answers (a stream without a byte yet waits there for its first); resolves
  // when the stream is closed, rejects when no server could be read. `signal` aborts.
  async follow(stream, offset, onData, signal, onOpen = () => {}) {
    let lastError = null;
    for (let attempt = 0; attempt < 30 && !signal.aborted; attempt++) {
      const access = await this.token();
      const servers = access.servers || [];
      if (!servers.length) throw new Error("this job has no log servers");
      const server = servers[attempt % servers.length];
      try {
        const response = await fetch(this.url(server, stream, `?follow=1&offset=${offset}`), {
          headers: { Authorization: `Bearer ${access.token}` }, signal, cache: "no-store",
        });
        if (!response.ok) throw new Error(`log server ${response.status}`);
        onOpen();
        const reader = response.body.getReader();
        for (;;) {
          const { done, value } = await reader.read();
          if (done) return offset; // the server ends a follow when the stream is closed
          offset += value.length;
          onData(value);
        }
      } catch (e) {
        if (signal.aborted) return offset;
        lastError = e;
        await new Promise((resolve) => setTimeout(resolve, Math.min(5000, 250 * 2 ** attempt)));
      }
    }
    if (lastError) throw lastError;
    return offset;
  }

  // The whole stream as a Blob (from the first server that has it), or what follows its
  // first `offset` bytes (an empty Blob when nothing does yet); null if no server has it.
  async fetchAll(stream, offset = 0) {
    const access = await this.token();
    for (const server of access.servers || []) {
      try {
        const response = await fetch(this.url(server, stream, offset ? `?offset=${offset}` : ""), {
          headers: { Authorization: `Bearer ${access.token}` }, cache: "no-store",
        });
        if (response.ok) return await response.blob();
        if (response.status === 416) return new Blob([]); // nothing after `offset` yet
        if (response.status === 404) continue;
      } catch (e) {
        // try the next replica
      }
    }
    return null;
  }
}
