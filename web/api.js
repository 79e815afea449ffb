// The HTTP API as the page uses it: its answers, and a session's creation and end.
import { $, params, state, unknownAvatar } from "./page.js";

export function authHeaders(s, extra = {}) {
  return { Authorization: `Bearer ${s.token}`, ...extra };
}

// An answer of the API: its JSON, or for an error an Error with the server's message. An answer
// that is not the API's JSON (a proxy's error page, a server restarting) is its HTTP status: it
// was JSON.parse's complaint about the body ("Unexpected token '<'").
export async function apiJson(res) {
  const isJson = (res.headers.get("Content-Type") || "").includes("json");
  const json = isJson ? await res.json().catch(() => null) : null;
  if (!res.ok) {
    // a refusal for now (503 full, 429 busy) says when to ask again, as the server does (Retry-After)
    const retry = res.headers.get("Retry-After") || "";
    const when = /^\d+$/.test(retry) ? `; try again in ${retry} s` : "";
    const said = json && (json.message || json.error);
    const error = new Error(`${res.status}: ${said || res.statusText || "error"}${when}`);
    // the server's own words, for what the page says as the WebSocket API does, which has no status
    // (a speak refused)
    if (said) error.said = `${said}${when}`;
    throw error;
  }
  if (json === null) throw new Error(`${res.status}: the answer is not JSON`);
  return json;
}

// How long a request that a server answers at once (the avatars, a session's creation) may wait for
// its answer. The browser sets no limit of its own: a server (or proxy) that took the connection and
// never answered left the page "connecting" for good. Generous: a real server answers within a second
// (as the WebSocket's start, websocket.js).
const ANSWER_MS = 10000;

// fetch, a server it cannot reach said as such: the browser's own words for it ("Failed to fetch",
// "NetworkError when attempting to fetch resource.") were all the page said of a server down. With
// `answerMs`, one not answered within it is given up (as one cut off by its own signal, if any).
// The answer is read whole before it is returned, its body in the same limit: a body that never ended
// (a proxy that stalled after the headers) left its reader waiting for good, the page 'connecting'.
// `headersCame`, if any, is called as the answer's headers come, before its body is read.
export async function apiFetch(url, init = {}, answerMs = 0, headersCame = null) {
  const limit = answerMs ? new AbortController() : null;
  let timedOut = false;
  const limitTimer = limit && setTimeout(() => { timedOut = true; limit.abort(); }, answerMs);
  // (removed as the request settles: a signal that outlives its requests, a WebRTC connection's that
  // each of its speaks uses, kept one listener per request for as long as the connection lasted)
  const cutOff = () => limit.abort();
  if (limit && init.signal) {
    if (init.signal.aborted) limit.abort();
    else init.signal.addEventListener("abort", cutOff, { once: true });
  }
  try {
    const res = await fetch(url, limit ? { ...init, signal: limit.signal } : init);
    headersCame?.();
    return await readWhole(res);
  } catch (e) {
    // (said here, not as the abort's reason: a browser may reject with its own AbortError instead)
    if (timedOut) throw noAnswerIn(answerMs);
    if (e.name === "AbortError") throw e;  // cut off by the page itself: nothing to say
    throw new Error(`the server does not answer (${e.message})`);
  } finally {
    clearTimeout(limitTimer);
    if (limit && init.signal) init.signal.removeEventListener("abort", cutOff);
  }
}

// An answer with its body read: one whose body ends only after its request's limit fails with it
// (its signal cuts the body off), where a body read after the limit was let go waited on for good.
export async function readWhole(res) {
  const body = await res.arrayBuffer();
  const bodiless = [101, 103, 204, 205, 304].includes(res.status);  // (a Response may not have one)
  return new Response(bodiless ? null : body, { status: res.status, statusText: res.statusText, headers: res.headers });
}

const noAnswerIn = (answerMs) => Object.assign(new Error(`the server does not answer (no answer in ${answerMs / 1000} s)`),
  { unanswered: true });

export const answeredFetch = (url, init) => apiFetch(url, init, ANSWER_MS);

// A picture's upload counts in that wait: at a slow uplink's 64 KiB/s (a phone's on a poor signal) a
// picture of 4 MiB, the most a server takes by default, takes a minute to send, and was given up at 10 s
const UPLOAD_BYTES_PER_S = 64 * 1024;

// A session's creation not answered in time is given up, not cut off: a server that has the request
// makes the session all the same, and with its answer cut off the session was left to the server's
// unclaimed timeout (20 s), a server of one session refusing the next connect meanwhile (503). The
// answer that comes after the page gave up is that session's DELETE, and nothing else. An answer may
// never come whole (its body stalled after the headers, a server still making the session): the
// session is ended by its request's key as the page gives up. A server that has not had the request
// yet keeps nothing of the key: the late answer's headers say it has it now, and the session is ended
// by its key then (a DELETE of the session the answer names waited for its body, which may never end:
// the session was left to the server's unclaimed limit). ask(headersCame): the request's answer.
async function sessionAnswer(ask, answerMs, key) {
  let limitTimer, givenUp = false;
  const answer = ask(() => {
    if (!givenUp) return;
    endByKey(key);
    creating.delete(key);
  });
  const limit = new Promise((_, reject) => {
    limitTimer = setTimeout(() => {
      givenUp = true;
      endByKey(key);
      reject(noAnswerIn(answerMs));
    }, answerMs);
  });
  // (one whose headers came before the give-up is ended by its key as the page gives up; one that
  // failed after it has nothing to end)
  const settled = () => { if (givenUp) creating.delete(key); };
  answer.then(settled, settled);
  try {
    return await Promise.race([answer, limit]);
  } finally {
    clearTimeout(limitTimer);
  }
}

export async function createSession() {
  const caption = $("caption").value.trim();
  const file = $("upload").files[0];
  let body, headers = {};
  if (params.get("token")) headers.Authorization = `Bearer ${params.get("token")}`;
  if (file) {
    body = new FormData();
    body.append("reference", file);
    if (caption) body.append("caption", caption);
  } else {
    if (state.avatars && !state.avatars.has(state.avatar)) throw new Error(unknownAvatar());
    body = JSON.stringify({ avatar: state.avatar, caption: caption || undefined });
    headers["Content-Type"] = "application/json";
  }
  const answerMs = ANSWER_MS + (file ? Math.ceil(file.size / UPLOAD_BYTES_PER_S) * 1000 : 0);
  const key = headers["Streamgen-Request-Key"] = randomKey();
  creating.add(key);
  try {
    const made = await answeredSession(key, body, headers, file, answerMs);
    creating.delete(key);
    return made;
  } catch (e) {
    if (!e.unanswered) creating.delete(key);  // (one given up is the late answer's to let go: sessionAnswer)
    throw e;
  }
}

// The keys of the sessions asked for whose answers the page has not read yet: a page left (reloaded)
// as its answer came ended none of them (it knew no id), and each held a place on the server until
// its unclaimed limit, 20 s, a server of one session refusing the reloaded page. `pagehide` ends
// them by their keys (DELETE /v1/sessions), keepalive requests, as deleteSession's.
const creating = new Set();

export function abandonCreations() {
  for (const key of creating) endByKey(key);
  creating.clear();
}

// (204 whatever the server knows of the key: nothing to say of its answer)
const endByKey = (key) => fetch("/v1/sessions", {
  method: "DELETE", headers: { "Streamgen-Request-Key": key }, keepalive: true,
}).catch(() => {});

// (crypto.randomUUID is only in secure contexts: a page from http://192.168.1.20:8000 has none)
const randomKey = () => Array.from(crypto.getRandomValues(new Uint8Array(16)),
  (b) => b.toString(16).padStart(2, "0")).join("");

async function answeredSession(key, body, headers, file, answerMs) {
  const ask = (headersCame) => apiFetch("/v1/sessions", { method: "POST", body, headers }, 0, headersCame);
  const res = await sessionAnswer(ask, answerMs, key);
  if (res.status === 401) {  // the server's words are for programs (a header): a page takes it from its address
    throw new Error(`401: this server needs its token: open the page as ${location.pathname}?token=<server token>`);
  }
  if (file && res.status === 413) throw await pictureTooLarge(res, file);
  if (file && (res.status === 415 || res.status === 422)) {
    // a picture the server cannot read (not an image, corrupt, too small), in the page's words for
    // it: "415: reference is not an image ..." named the API's field, not the picture chosen. (A
    // caption refused is said in the server's words.)
    const json = await res.clone().json().catch(() => null);
    if (json?.error === "bad_image") throw new Error(json.message.replace(/^reference( image)?/, "your picture"));
  }
  return apiJson(res);
}

// A picture too large, said in a user's words with the server's limit: its own are for programs
// ("413: request body of 4.84 MiB; the limit is 4 MiB", "413: reference image is 4100x4100 pixels;
// at most 16777216 pixels are accepted"). A 413 that is not the API's (a proxy's page) names no limit.
async function pictureTooLarge(res, file) {
  const said = (await res.json().catch(() => null))?.message || "";
  const pixels = said.match(/(?:is (\d+x\d+) pixels|too many pixels); at most (\d+) pixels/);
  if (pixels) {
    const most = Number(pixels[2]), side = Math.floor(Math.sqrt(most));
    const what = pixels[1] ? `is ${pixels[1]} pixels, more` : "has more pixels";
    return new Error(`your picture ${what} than this server takes (at most ${Number((most / 1e6).toPrecision(3))} `
      + `megapixels, as ${side}x${side}): choose a smaller one`);
  }
  const limit = said.match(/limit (?:is|of) (\d[\d.]* (?:bytes|KiB|MiB|GiB))/);
  return new Error(`your picture is ${sizeText(file.size)}, larger than this server takes`
    + `${limit ? ` (at most ${limit[1]})` : ""}: choose a smaller one`);
}

// a byte count as the server says it (server/app.py's size_text): "4.84 MiB"
function sizeText(n) {
  for (const [unit, size] of [["GiB", 2 ** 30], ["MiB", 2 ** 20], ["KiB", 2 ** 10]]) {
    if (n >= size) return `${Number((n / size).toPrecision(3))} ${unit}`;
  }
  return `${n} bytes`;
}

export function deleteSession(s) {
  // keepalive: a DELETE sent as the page goes (pagehide) outlives it, as the Fetch spec promises
  // only such requests. One that fails is said on the console, not on the page: the peer
  // connection's closing ends the session on the server as well. (A 404 is a session the server
  // ended already.) Resolved once answered, or failed.
  return fetch(s.resource, { method: "DELETE", headers: authHeaders(s), keepalive: true }).then((res) => {
    if (!res.ok && res.status !== 404) console.warn(`ending the session: DELETE ${res.status}`);
  }, (e) => console.warn("ending the session: DELETE failed:", e));
}
