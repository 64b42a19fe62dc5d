// The upload page: files or a folder go straight to the REST API's resumable upload sessions,
// in parts sliced from the File (never read whole), a few parts in flight at a time.
//
// Resuming after a reload: each session is remembered in localStorage under the version, the
// file's path, size and lastModified. A page cannot reopen a file by itself, so the user
// chooses the same files again; a remembered session is then asked which parts it still
// misses, and only those are sent. Files finished earlier are remembered too and skipped.
(() => {
  "use strict";

  const STORE = "smr-uploads";
  const IN_FLIGHT = 3; // parts sent at once, over all files
  const RETRIES = 6; // per request, for broken connections, 429 and 5xx answers
  const RETRY_WAIT_MAX_S = 60;
  const FORGET_AFTER_MS = 8 * 24 * 3600 * 1000; // sessions expire after 7 days on the server

  const area = document.getElementById("version-area");
  const root = document.getElementById("uploader");
  const versionKey = area ? area.dataset.version : null;
  const api = root ? root.dataset.api : null;

  // --- Remembered sessions -----------------------------------------------------------------

  function loadAll() {
    try {
      const all = JSON.parse(localStorage.getItem(STORE) || "{}");
      return all && typeof all === "object" ? all : {};
    } catch {
      return {};
    }
  }
  function saveAll(all) {
    try {
      localStorage.setItem(STORE, JSON.stringify(all));
    } catch {
      // Storage full or disabled: uploads still work, they just cannot resume.
    }
  }
  function remember(key, entry) {
    const all = loadAll();
    all[key] = { ...entry, at: Date.now() };
    saveAll(all);
  }
  function forget(key) {
    const all = loadAll();
    delete all[key];
    saveAll(all);
  }
  function prune(version) {
    const all = loadAll();
    const now = Date.now();
    for (const [key, entry] of Object.entries(all)) {
      if (!entry || now - (entry.at || 0) > FORGET_AFTER_MS || (version && entry.version === version)) {
        delete all[key];
      }
    }
    saveAll(all);
  }

  // A version that is no longer a draft takes no more files: forget its sessions.
  document.addEventListener("htmx:afterSwap", () => {
    const state = document.getElementById("scan-state");
    if (state && versionKey && state.dataset.state !== "draft") prune(versionKey);
  });
  if (!root) {
    prune(versionKey);
    return;
  }
  prune(null);

  // --- Talking to the API ------------------------------------------------------------------

  class ApiError extends Error {
    constructor(code, message, status, extra, retryAfter) {
      super(message);
      this.code = code;
      this.status = status;
      this.extra = extra || {};
      this.retryAfter = retryAfter; // seconds, from a Retry-After header
    }
    get transient() {
      return this.status === 0 || this.status === 429 || this.status >= 500;
    }
    toString() {
      return `${this.message} (${this.code})`;
    }
  }

  function csrfToken() {
    const cookie = document.cookie.split("; ").find((c) => c.startsWith("csrftoken="));
    if (cookie) return decodeURIComponent(cookie.slice("csrftoken=".length));
    const input = document.querySelector("input[name=csrfmiddlewaretoken]");
    return input ? input.value : "";
  }

  function answer(status, text, retryAfter) {
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch {
      data = null;
    }
    if (status >= 200 && status < 300) return data;
    const wait = Number.parseInt(retryAfter || "", 10);
    const after = Number.isFinite(wait) ? wait : undefined;
    if (data && data.code) throw new ApiError(data.code, data.message || "", status, data.extra, after);
    throw new ApiError(`http_${status}`, `The registry answered HTTP ${status}.`, status, {}, after);
  }

  // Broken connections, 429 and 5xx are tried again (after Retry-After when the server gives
  // one, else with a growing pause); any other answer is final.
  async function retrying(attemptOnce) {
    for (let attempt = 0; ; attempt += 1) {
      try {
        return await attemptOnce();
      } catch (err) {
        if (!(err instanceof ApiError) || !err.transient || attempt >= RETRIES) throw err;
        const seconds = err.retryAfter !== undefined ? err.retryAfter : 2 ** attempt;
        await sleep(1000 * Math.min(Math.max(seconds, 1), RETRY_WAIT_MAX_S));
      }
    }
  }

  function call(method, url, body) {
    return retrying(() => callOnce(method, url, body));
  }

  async function callOnce(method, url, body) {
    const headers = { Accept: "application/json", "X-CSRFToken": csrfToken() };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let response;
    try {
      response = await fetch(url, {
        method,
        headers,
        credentials: "same-origin",
        body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch (err) {
      throw new ApiError("network_error", `The registry could not be reached (${err.message}).`, 0);
    }
    return answer(response.status, await response.text(), response.headers.get("Retry-After"));
  }

  // XMLHttpRequest rather than fetch: it reports upload progress within a part.
  function sendBlob(url, blob, onProgress) {
    return new Promise((resolve, reject) => {
      const xhr = new XMLHttpRequest();
      xhr.open("PUT", url);
      xhr.setRequestHeader("Accept", "application/json");
      xhr.setRequestHeader("Content-Type", "application/octet-stream");
      xhr.setRequestHeader("X-CSRFToken", csrfToken());
      xhr.upload.onprogress = (event) => onProgress(event.loaded);
      xhr.onload = () => {
        try {
          resolve(answer(xhr.status, xhr.responseText, xhr.getResponseHeader("Retry-After")));
        } catch (err) {
          reject(err);
        }
      };
      xhr.onerror = () =>
        reject(new ApiError("network_error", "The connection broke while sending a part.", 0));
      xhr.onabort = () => reject(new ApiError("aborted", "The part was not sent.", 0));
      xhr.send(blob);
    });
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  // --- The page ----------------------------------------------------------------------------

  const queueTable = document.getElementById("queue");
  const queueBody = queueTable.querySelector("tbody");
  const overall = document.getElementById("overall");
  const overallBar = document.getElementById("overall-progress");
  const overallText = document.getElementById("overall-text");
  const errors = document.getElementById("upload-errors");
  const submitButton = document.getElementById("submit-version");
  const submitWait = document.getElementById("submit-wait");

  function size(n) {
    const units = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) {
      n /= 1024;
      i += 1;
    }
    return i === 0 ? `${n} bytes` : `${n.toFixed(1)} ${units[i]}`;
  }

  function showError(text) {
    const p = document.createElement("p");
    p.className = "error";
    p.textContent = text;
    errors.appendChild(p);
  }

  const items = []; // every file chosen on this page, in order
  const pending = []; // items not started yet
  let running = false;
  let drawScheduled = false;

  function busy() {
    return items.some((item) => item.state === "waiting" || item.state === "uploading");
  }

  function draw() {
    if (drawScheduled) return;
    drawScheduled = true;
    requestAnimationFrame(() => {
      drawScheduled = false;
      let total = 0;
      let sent = 0;
      for (const item of items) {
        const done = item.sentBytes();
        total += item.file.size;
        sent += done;
        item.bar.max = Math.max(item.file.size, 1);
        item.bar.value = item.file.size ? done : item.state === "done" ? 1 : 0;
        item.bar.textContent = `${Math.floor((100 * done) / Math.max(item.file.size, 1))}%`;
        item.bar.dataset.sent = String(done);
        item.statusCell.textContent = item.statusText();
      }
      overall.hidden = items.length === 0;
      queueTable.hidden = items.length === 0;
      overallBar.max = Math.max(total, 1);
      overallBar.value = sent;
      const finished = items.filter((i) => i.state === "done").length;
      overallText.textContent = `${size(sent)} of ${size(total)}, ${finished} of ${items.length} files done`;
      const wait = busy();
      if (submitButton) submitButton.disabled = wait;
      if (submitWait) submitWait.hidden = !wait;
    });
  }

  class Item {
    constructor(file, path) {
      this.file = file;
      this.path = path;
      this.key = [versionKey, path, file.size, file.lastModified].join("\n");
      this.state = "waiting"; // waiting, uploading, done, failed
      this.note = "";
      this.resumed = ""; // says how much an earlier visit had sent
      this.session = null;
      this.confirmed = 0; // bytes of parts the server holds
      this.inFlight = new Map(); // part number -> bytes sent so far
      this.remaining = 0;
      const row = document.createElement("tr");
      const pathCell = document.createElement("td");
      const code = document.createElement("code");
      code.textContent = path;
      pathCell.appendChild(code);
      const sizeCell = document.createElement("td");
      sizeCell.textContent = size(file.size);
      const barCell = document.createElement("td");
      this.bar = document.createElement("progress");
      this.bar.setAttribute("aria-label", `Upload of ${path}`);
      this.bar.dataset.path = path;
      barCell.appendChild(this.bar);
      this.statusCell = document.createElement("td");
      row.append(pathCell, sizeCell, barCell, this.statusCell);
      row.dataset.path = path;
      this.row = row;
    }
    sentBytes() {
      if (this.state === "done") return this.file.size;
      let n = this.confirmed;
      for (const loaded of this.inFlight.values()) n += loaded;
      return Math.min(n, this.file.size);
    }
    statusText() {
      const notes = [this.resumed, this.note].filter(Boolean).join("; ");
      switch (this.state) {
        case "waiting":
          return "Waiting";
        case "uploading":
          return `Uploading${this.resumed ? ` (${this.resumed})` : ""}`;
        case "done":
          return `Uploaded${notes ? ` (${notes})` : ""}`;
        default:
          return `Failed: ${this.note}`;
      }
    }
    partRange(n) {
      const start = (n - 1) * this.session.part_size;
      return [start, Math.min(start + this.session.part_size, this.file.size)];
    }
    fail(err) {
      this.state = "failed";
      this.note = String(err);
      this.inFlight.clear();
      showError(`${this.path}: ${err}`);
      draw();
    }
  }

  function uploads(id) {
    return `${api}/uploads${id ? `/${id}` : ""}`;
  }

  // Open (or reopen) the item's session: the part numbers still to send, or null if the
  // file needs no more work.
  async function prepare(item) {
    item.state = "uploading";
    const saved = loadAll()[item.key];
    if (saved && saved.done) {
      item.state = "done";
      item.note = "uploaded earlier";
      return null;
    }
    if (saved && saved.id) {
      try {
        const session = await call("GET", uploads(saved.id));
        if (session.state === "open" && new Date(session.expires_at) > new Date()) {
          item.session = session;
          item.resumed = `resumed: ${session.part_count - session.missing_parts.length} of ${session.part_count} parts were already there`;
        } else if (session.state === "completed") {
          remember(item.key, { version: versionKey, path: item.path, done: true });
          item.state = "done";
          item.note = "uploaded earlier";
          return null;
        }
      } catch (err) {
        if (err.status !== 404) throw err;
      }
      if (!item.session) forget(item.key);
    }
    if (!item.session) {
      item.session = await call("POST", uploads(), { path: item.path, size: item.file.size });
      remember(item.key, {
        version: versionKey,
        path: item.path,
        size: item.file.size,
        lastModified: item.file.lastModified,
        id: item.session.id,
      });
    }
    const missing = item.file.size === 0 ? [] : item.session.missing_parts;
    item.confirmed = item.file.size;
    for (const n of missing) {
      const [start, end] = item.partRange(n);
      item.confirmed -= end - start;
    }
    return missing;
  }

  async function sendPart(item, n) {
    const [start, end] = item.partRange(n);
    const url = `${uploads(item.session.id)}/parts/${n}`;
    try {
      await retrying(() => {
        item.inFlight.set(n, 0);
        return sendBlob(url, item.file.slice(start, end), (loaded) => {
          item.inFlight.set(n, loaded);
          draw();
        });
      });
      item.confirmed += end - start;
    } finally {
      item.inFlight.delete(n);
      draw();
    }
  }

  async function finish(item) {
    let artifact = null;
    try {
      artifact = await call("POST", `${uploads(item.session.id)}/complete`);
    } catch (err) {
      // A retried complete whose first try did complete (the answer was lost on the way).
      if (!(err.status === 409 && err.extra.state === "completed")) throw err;
    }
    remember(item.key, { version: versionKey, path: item.path, done: true });
    item.state = "done";
    item.note = artifact ? `sha256 ${artifact.sha256.slice(0, 12)}…` : "";
    draw();
    document.body.dispatchEvent(new CustomEvent("smr:uploaded", { detail: artifact }));
  }

  // Parts to send, over every queued file in order; shared by the senders (an async
  // generator hands each `next()` its own value, in call order).
  async function* parts() {
    while (pending.length) {
      const item = pending.shift();
      let missing;
      try {
        missing = await prepare(item);
      } catch (err) {
        item.fail(err);
        continue;
      }
      draw();
      if (missing === null) continue;
      if (missing.length === 0) {
        try {
          await finish(item);
        } catch (err) {
          item.fail(err);
        }
        continue;
      }
      item.remaining = missing.length;
      for (const n of missing) {
        if (item.state === "failed") break;
        yield [item, n];
      }
    }
  }

  async function sender(source) {
    for (;;) {
      const { value, done } = await source.next();
      if (done) return;
      const [item, n] = value;
      if (item.state === "failed") continue;
      try {
        await sendPart(item, n);
      } catch (err) {
        item.fail(err);
        continue;
      }
      item.remaining -= 1;
      if (item.remaining === 0 && item.state !== "failed") {
        try {
          await finish(item);
        } catch (err) {
          item.fail(err);
        }
      }
    }
  }

  async function run() {
    running = true;
    try {
      const source = parts();
      const senders = [];
      for (let i = 0; i < IN_FLIGHT; i += 1) senders.push(sender(source));
      await Promise.all(senders);
    } finally {
      running = false;
      draw();
      showResume();
    }
    if (pending.length) run(); // chosen while the last parts were finishing
  }

  function enqueue(chosen) {
    errors.textContent = "";
    if (!chosen.length) {
      showError("Nothing to upload: the selection holds no files.");
      return;
    }
    const active = new Map(items.filter((i) => i.state !== "failed").map((i) => [i.path, i]));
    for (const { file, path } of chosen) {
      if (!path) continue;
      const item = new Item(file, path);
      const earlier = active.get(path);
      if (earlier) {
        // The same file chosen again is already on its way; another one under its path is not.
        if (earlier.key !== item.key) showError(`${path}: chosen twice; only the first one is uploaded.`);
        continue;
      }
      active.set(path, item);
      items.push(item);
      pending.push(item);
      queueBody.appendChild(item.row);
    }
    draw();
    if (!running) run();
  }

  // --- Choosing files ----------------------------------------------------------------------

  // A folder's own name is dropped: "bert/config.json" is uploaded as "config.json".
  function withoutTop(relative) {
    const cut = relative.indexOf("/");
    return cut === -1 ? relative : relative.slice(cut + 1);
  }

  const folderInput = document.getElementById("pick-folder");
  const filesInput = document.getElementById("pick-files");
  folderInput.addEventListener("change", () => {
    enqueue([...folderInput.files].map((file) => ({ file, path: withoutTop(file.webkitRelativePath || file.name) })));
    folderInput.value = "";
  });
  filesInput.addEventListener("change", () => {
    enqueue([...filesInput.files].map((file) => ({ file, path: file.name })));
    filesInput.value = "";
  });

  function fileOf(entry) {
    return new Promise((resolve, reject) => entry.file(resolve, reject));
  }
  function readBatch(reader) {
    return new Promise((resolve, reject) => reader.readEntries(resolve, reject));
  }
  async function walk(entry, out) {
    if (entry.isFile) {
      // fullPath is "/top/sub/name" for a dropped folder's file.
      out.push({ file: await fileOf(entry), path: withoutTop(entry.fullPath.replace(/^\//, "")) });
      return;
    }
    const reader = entry.createReader();
    for (;;) {
      const batch = await readBatch(reader); // at most ~100 entries per call
      if (!batch.length) return;
      for (const child of batch) await walk(child, out);
    }
  }

  const dropzone = document.getElementById("dropzone");
  for (const name of ["dragenter", "dragover"]) {
    document.addEventListener(name, (event) => {
      event.preventDefault();
      dropzone.classList.add("over");
    });
  }
  document.addEventListener("dragleave", (event) => {
    if (!event.relatedTarget) dropzone.classList.remove("over");
  });
  document.addEventListener("drop", async (event) => {
    event.preventDefault();
    dropzone.classList.remove("over");
    const transfer = event.dataTransfer;
    // Entries must be taken while the event is being dispatched; reading them comes after.
    const entries = [...transfer.items]
      .filter((item) => item.kind === "file")
      .map((item) => (item.webkitGetAsEntry ? item.webkitGetAsEntry() : null));
    if (!entries.length || entries.some((e) => !e)) {
      enqueue([...transfer.files].map((file) => ({ file, path: file.name })));
      return;
    }
    const chosen = [];
    try {
      for (const entry of entries) {
        if (entry.isFile) chosen.push({ file: await fileOf(entry), path: entry.name });
        else await walk(entry, chosen);
      }
    } catch (err) {
      showError(`The dropped folder could not be read (${err.message || err}).`);
      return;
    }
    enqueue(chosen);
  });

  // --- Resuming ----------------------------------------------------------------------------

  const resume = document.getElementById("resume");
  const resumeText = document.getElementById("resume-text");
  const resumeList = document.getElementById("resume-list");

  function unfinished() {
    const inPage = new Set(items.map((i) => i.key));
    return Object.entries(loadAll()).filter(
      ([key, entry]) => entry && entry.version === versionKey && entry.id && !entry.done && !inPage.has(key),
    );
  }

  function showResume() {
    const left = unfinished();
    resume.hidden = left.length === 0;
    if (!left.length) return;
    resumeText.textContent = `${left.length} upload${left.length === 1 ? " was" : "s were"} left unfinished.`;
    resumeList.textContent = "";
    for (const [, entry] of left) {
      const li = document.createElement("li");
      const code = document.createElement("code");
      code.textContent = entry.path;
      li.append(code, ` (${size(entry.size)})`);
      resumeList.appendChild(li);
    }
  }

  document.getElementById("resume-discard").addEventListener("click", async () => {
    for (const [key, entry] of unfinished()) {
      try {
        await call("DELETE", uploads(entry.id));
      } catch (err) {
        if (err.status !== 404 && err.status !== 409) {
          showError(`${entry.path}: ${err}`);
          continue;
        }
      }
      forget(key);
    }
    showResume();
  });

  showResume();
  draw();
})();
