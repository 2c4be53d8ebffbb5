// The gateway's HTTP API from the browser: JSON in and out, errors as ApiError with the server's
// message, and the token (asked for once on a 401, kept in localStorage, sent as a Bearer header).

const TOKEN_KEY = "runwire.token";

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export function getToken() {
  try {
    return localStorage.getItem(TOKEN_KEY) || "";
  } catch {
    return ""; // storage disabled: the page still works without a token
  }
}

export function forgetToken() {
  try { localStorage.removeItem(TOKEN_KEY); } catch { /* storage disabled */ }
}

function storeToken(token) {
  try { localStorage.setItem(TOKEN_KEY, token); } catch { /* storage disabled: kept for this page only */ }
  memoryToken = token;
  // streams waiting out a backoff reconnect at once with the new token
  window.dispatchEvent(new Event("runwire-token"));
}

let memoryToken = "";
export function currentToken() {
  return getToken() || memoryToken;
}

// One prompt at a time: every request that meets a 401 waits for the same answer.
let asking = null;
export function askForToken(reason) {
  if (asking) return asking;
  const dialog = document.getElementById("token-dialog");
  const form = dialog.querySelector("form");
  const input = dialog.querySelector("input");
  const note = dialog.querySelector(".dialog-note");
  note.textContent = reason;
  input.value = "";
  asking = new Promise((resolve) => {
    const done = (ev) => {
      ev.preventDefault();
      const token = input.value.trim();
      if (!token) return;
      form.removeEventListener("submit", done);
      dialog.close();
      storeToken(token);
      asking = null;
      resolve(token);
    };
    form.addEventListener("submit", done);
  });
  dialog.showModal();
  input.focus();
  return asking;
}

// fetch + JSON. On 401 asks for the token and retries; other errors become ApiError with the
// server's {"error": {"code", "message"}} when it sent one.
export async function api(path, { method = "GET", body } = {}) {
  for (let attempt = 0; ; attempt++) {
    const headers = { Accept: "application/json" };
    const token = currentToken();
    if (token) headers.Authorization = `Bearer ${token}`;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let resp;
    try {
      resp = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body), cache: "no-store" });
    } catch (e) {
      throw new ApiError(0, "unreachable", `gateway unreachable (${method} ${path}): ${e.message}`);
    }
    if (resp.status === 401) {
      await askForToken(token ? "The gateway refused this token. Enter the API token (RUNWIRE_TOKEN):"
                              : "This gateway needs an API token (RUNWIRE_TOKEN):");
      continue;
    }
    const text = await resp.text();
    let data = null;
    if (text) {
      try { data = JSON.parse(text); } catch { data = null; }
    }
    if (!resp.ok) {
      const err = data && data.error;
      const message = (err && err.message) || (text && text.slice(0, 300)) || resp.statusText;
      throw new ApiError(resp.status, (err && err.code) || `http_${resp.status}`, message);
    }
    return data;
  }
}
